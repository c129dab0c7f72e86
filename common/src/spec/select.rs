//! Which objects of a source belong in its index: under the prefix, matched
//! by an include glob (if any) and by no exclude glob — globs relative to
//! the prefix, `*` within one path segment, `**` across them. One
//! implementation for the spec's validation, the worker's planning and the
//! operator's routing of object events.

use globset::{GlobBuilder, GlobSet, GlobSetBuilder};

use super::index::IndexSource;

#[derive(Debug, thiserror::Error)]
#[error("{field}: {pattern:?} is not a valid glob: {message}")]
pub struct GlobError {
    pub field: &'static str,
    pub pattern: String,
    pub message: String,
}

/// The objects of a source that belong in its index.
pub struct Selector {
    prefix: String,
    include: Option<GlobSet>,
    exclude: GlobSet,
}

impl Selector {
    pub fn new(source: &IndexSource) -> Result<Selector, GlobError> {
        let set = |field: &'static str, patterns: &[String]| {
            let mut b = GlobSetBuilder::new();
            for p in patterns {
                // `*` stays within one path segment, `**` crosses them.
                let glob = GlobBuilder::new(p)
                    .literal_separator(true)
                    .build()
                    .map_err(|e| GlobError {
                        field,
                        pattern: p.clone(),
                        message: e.kind().to_string(),
                    })?;
                b.add(glob);
            }
            b.build().map_err(|e| GlobError {
                field,
                pattern: patterns.join(","),
                message: e.to_string(),
            })
        };
        Ok(Selector {
            prefix: source.prefix.clone(),
            include: if source.include.is_empty() {
                None
            } else {
                Some(set("source.include", &source.include)?)
            },
            exclude: set("source.exclude", &source.exclude)?,
        })
    }

    pub fn wants(&self, key: &str) -> bool {
        let Some(rel) = key.strip_prefix(&self.prefix) else {
            return false;
        };
        if rel.is_empty() || rel.ends_with('/') {
            return false; // "directory" markers
        }
        self.include.as_ref().is_none_or(|i| i.is_match(rel)) && !self.exclude.is_match(rel)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn source(include: &[&str], exclude: &[&str]) -> IndexSource {
        serde_json::from_value(serde_json::json!({
            "bucket": "docs", "prefix": "kb/", "include": include, "exclude": exclude,
        }))
        .expect("source")
    }

    #[test]
    fn globs_are_relative_to_the_prefix() {
        let sel = Selector::new(&source(&["**/*.md", "*.pdf"], &["drafts/**"])).expect("selector");
        assert!(sel.wants("kb/guide.md"));
        assert!(sel.wants("kb/deep/er/notes.md"));
        assert!(sel.wants("kb/report.pdf"));
        assert!(!sel.wants("kb/sub/report.pdf"), "*.pdf does not cross /");
        assert!(!sel.wants("kb/drafts/wip.md"));
        assert!(!sel.wants("kb/image.png"));
        assert!(!sel.wants("elsewhere/guide.md"));
        let e = Selector::new(&source(&["a[b"], &[]))
            .err()
            .expect("invalid glob");
        assert!(e.to_string().starts_with("source.include: \"a[b\""), "{e}");
    }
}
