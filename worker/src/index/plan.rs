//! Planning a sync run: the bucket listing against the documents already
//! indexed. An object is new when no document has its key, changed when its
//! ETag (or, where both are known, its SHA-256) differs or its last
//! indexing failed (a provider outage, say: each run tries it again),
//! unchanged otherwise; a document whose object is gone is deleted. Include and
//! exclude globs (relative to the prefix) choose the objects.

use std::collections::HashMap;

use stowage_common::spec::select::Selector;

/// An object in the listing.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Listed {
    pub key: String,
    pub etag: String,
    pub sha256_hex: Option<String>,
    pub size: i64,
}

/// What the index holds for a key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Indexed {
    pub etag: Option<String>,
    pub sha256_hex: Option<String>,
    /// Its last indexing failed.
    pub failed: bool,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Plan {
    pub new: Vec<Listed>,
    pub changed: Vec<Listed>,
    pub deleted: Vec<String>,
    pub unchanged: usize,
    /// Listed objects the globs leave out.
    pub excluded: usize,
}

impl Plan {
    pub fn seen(&self) -> usize {
        self.new.len() + self.changed.len() + self.unchanged
    }
}

pub fn plan(selector: &Selector, listing: Vec<Listed>, indexed: &HashMap<String, Indexed>) -> Plan {
    let mut plan = Plan::default();
    let mut present = std::collections::HashSet::new();
    for object in listing {
        if !selector.wants(&object.key) {
            plan.excluded += 1;
            continue;
        }
        present.insert(object.key.clone());
        match indexed.get(&object.key) {
            None => plan.new.push(object),
            Some(doc) => {
                let same_content = match (&doc.sha256_hex, &object.sha256_hex) {
                    (Some(a), Some(b)) => a == b,
                    _ => doc.etag.as_deref() == Some(object.etag.as_str()),
                };
                if same_content && !doc.failed {
                    plan.unchanged += 1;
                } else {
                    plan.changed.push(object);
                }
            }
        }
    }
    let mut deleted: Vec<String> = indexed
        .keys()
        .filter(|k| !present.contains(*k))
        .cloned()
        .collect();
    deleted.sort();
    plan.deleted = deleted;
    plan
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Everything under `kb/`.
    fn selector() -> Selector {
        let source = serde_json::from_value(serde_json::json!({"bucket": "docs", "prefix": "kb/"}))
            .expect("source");
        Selector::new(&source).expect("selector")
    }

    fn listed(key: &str, etag: &str) -> Listed {
        Listed {
            key: key.into(),
            etag: etag.into(),
            sha256_hex: None,
            size: 10,
        }
    }

    fn indexed(etag: &str) -> Indexed {
        Indexed {
            etag: Some(etag.into()),
            sha256_hex: None,
            failed: false,
        }
    }

    #[test]
    fn new_changed_unchanged_and_deleted() {
        let sel = selector();
        let docs: HashMap<String, Indexed> = [
            ("kb/same.md".to_string(), indexed("e1")),
            ("kb/edited.md".to_string(), indexed("e2")),
            ("kb/removed.md".to_string(), indexed("e3")),
        ]
        .into();
        let p = plan(
            &sel,
            vec![
                listed("kb/same.md", "e1"),
                listed("kb/edited.md", "e2-new"),
                listed("kb/added.md", "e4"),
                listed("kb/", ""),
                listed("other/outside.md", "e5"),
            ],
            &docs,
        );
        assert_eq!(
            p.new.iter().map(|o| o.key.as_str()).collect::<Vec<_>>(),
            ["kb/added.md"]
        );
        assert_eq!(
            p.changed.iter().map(|o| o.key.as_str()).collect::<Vec<_>>(),
            ["kb/edited.md"]
        );
        assert_eq!(p.deleted, ["kb/removed.md"]);
        assert_eq!((p.unchanged, p.excluded, p.seen()), (1, 2, 3));
    }

    #[test]
    fn content_hash_wins_over_etag_when_both_sides_know_it() {
        // A multipart re-upload of identical bytes gets a new ETag.
        let sel = selector();
        let docs: HashMap<String, Indexed> = [(
            "kb/a.pdf".to_string(),
            Indexed {
                etag: Some("old-etag".into()),
                sha256_hex: Some("abc".into()),
                failed: false,
            },
        )]
        .into();
        let mut obj = listed("kb/a.pdf", "new-etag-2");
        obj.sha256_hex = Some("abc".into());
        assert_eq!(plan(&sel, vec![obj.clone()], &docs).unchanged, 1);
        obj.sha256_hex = Some("def".into());
        assert_eq!(plan(&sel, vec![obj], &docs).changed.len(), 1);
    }

    #[test]
    fn a_failed_document_is_tried_again_even_if_unchanged() {
        let sel = selector();
        let mut doc = indexed("e1");
        doc.failed = true;
        let docs: HashMap<String, Indexed> = [("kb/a.md".to_string(), doc)].into();
        let p = plan(&sel, vec![listed("kb/a.md", "e1")], &docs);
        assert_eq!((p.changed.len(), p.unchanged), (1, 0));
    }
}
