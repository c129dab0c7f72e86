//! Planning a sync run: the bucket listing against the documents already
//! indexed. An object is new when no document has its key, changed when its
//! content differs or its last indexing failed (a provider outage, say: each
//! run tries it again), unchanged otherwise; a document whose object is gone
//! is deleted. Include and exclude globs (relative to the prefix) choose the
//! objects.
//!
//! Content is compared by SHA-256 where both sides know it, else by ETag. A
//! listing carries no hash, and identical bytes written again (a multipart
//! upload over a single PUT, another part size) get a new ETag: the objects
//! whose ETag changed under a document that has a hash are the
//! [`hash_candidates`], and [`content_hash`] says what a HEAD of one (its
//! `sha256` metadata) or Stowage's own record of writing it tells. Same
//! content under a new ETag is unchanged and [`Plan::retagged`]: its
//! document's ETag is updated, so the next run needs no lookup.

use std::collections::HashMap;

use stowage_common::spec::select::Selector;

/// An object in the listing.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Listed {
    pub key: String,
    pub etag: String,
    /// Its content hash, where known (see [`content_hash`]): never from
    /// the listing itself.
    pub sha256_hex: Option<String>,
    pub size: i64,
}

/// What the index holds for a key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Indexed {
    pub etag: Option<String>,
    pub sha256_hex: Option<String>,
    /// The content type it was indexed with (extraction and search filters
    /// depend on it: the same bytes under another type are another
    /// document).
    pub content_type: Option<String>,
    /// Its last indexing failed.
    pub failed: bool,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Plan {
    pub new: Vec<Listed>,
    pub changed: Vec<Listed>,
    pub deleted: Vec<String>,
    /// Counts the retagged ones too.
    pub unchanged: usize,
    /// Unchanged content under a new ETag: the document stays, its recorded
    /// ETag is updated.
    pub retagged: Vec<Listed>,
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
                let same_etag = doc.etag.as_deref() == Some(object.etag.as_str());
                let same_content = match (&doc.sha256_hex, &object.sha256_hex) {
                    (Some(a), Some(b)) => a == b,
                    _ => same_etag,
                };
                if same_content && !doc.failed {
                    plan.unchanged += 1;
                    if !same_etag {
                        plan.retagged.push(object);
                    }
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

/// The listed objects worth a content-hash lookup: selected, with no hash
/// yet, under a document that has one, did not fail (a failed one is tried
/// again anyway) and records another ETag. Only these are HEADed, never the
/// whole listing.
pub fn hash_candidates<'a>(
    selector: &Selector,
    listing: &'a [Listed],
    indexed: &HashMap<String, Indexed>,
) -> Vec<&'a Listed> {
    listing
        .iter()
        .filter(|o| o.sha256_hex.is_none() && selector.wants(&o.key))
        .filter(|o| {
            indexed.get(&o.key).is_some_and(|doc| {
                doc.sha256_hex.is_some()
                    && !doc.failed
                    && doc.etag.as_deref() != Some(o.etag.as_str())
            })
        })
        .collect()
}

/// What a HEAD of an object says.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Head {
    pub etag: String,
    pub content_type: Option<String>,
    /// Its `sha256` metadata (`x-amz-meta-sha256`, which Stowage writes).
    pub sha256_metadata: Option<String>,
}

/// Stowage's own record of writing the current object at a key, on the
/// collection's store (same endpoint, same bucket): the ETag the write
/// returned and the SHA-256 of the bytes it wrote.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Recorded {
    pub etag: String,
    pub sha256_hex: String,
}

/// The content hash of the object at version `etag` (as listed), from its
/// HEAD's `sha256` metadata, else from Stowage's record of writing exactly
/// that version; `None` when neither knows it, when the object changed
/// since it was listed, or when its content type is not the one `doc` was
/// indexed with (its bytes would not make the same document).
pub fn content_hash(
    etag: &str,
    doc: &Indexed,
    head: &Head,
    recorded: Option<&Recorded>,
) -> Option<String> {
    if !same_etag(&head.etag, etag)
        || !same_content_type(head.content_type.as_deref(), doc.content_type.as_deref())
    {
        return None;
    }
    head.sha256_metadata
        .as_deref()
        .and_then(sha256_hex)
        .or_else(|| {
            recorded
                .filter(|r| same_etag(&r.etag, etag))
                .and_then(|r| sha256_hex(&r.sha256_hex))
        })
}

/// Whether an object of content type `a` makes the same document as one of
/// `b`: the same type, or none (missing, or a generic octet stream: a
/// single PUT from the AWS SDK says `application/octet-stream`, a multipart
/// upload gets the server's `binary/octet-stream`; extraction goes by the
/// key's extension for all of them).
pub fn same_content_type(a: Option<&str>, b: Option<&str>) -> bool {
    fn generic(t: Option<&str>) -> bool {
        t.map(|t| {
            t.split(';')
                .next()
                .unwrap_or_default()
                .trim()
                .to_ascii_lowercase()
        })
        .is_none_or(|t| {
            t.is_empty() || t == "application/octet-stream" || t == "binary/octet-stream"
        })
    }
    a == b || (generic(a) && generic(b))
}

fn same_etag(a: &str, b: &str) -> bool {
    a.trim_matches('"') == b.trim_matches('"')
}

/// `s` as a lowercase hex SHA-256, if it is one (metadata is anyone's to
/// write).
fn sha256_hex(s: &str) -> Option<String> {
    let s = s.trim();
    (s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit())).then(|| s.to_ascii_lowercase())
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
            content_type: None,
            failed: false,
        }
    }

    const SHA_A: &str = "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
    const SHA_B: &str = "bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb";

    /// A document indexed from bytes hashing to `sha`, as text/plain.
    fn hashed(etag: &str, sha: &str) -> Indexed {
        Indexed {
            sha256_hex: Some(sha.into()),
            content_type: Some("text/plain".into()),
            ..indexed(etag)
        }
    }

    fn head(etag: &str, sha256_metadata: Option<&str>) -> Head {
        Head {
            etag: etag.into(),
            content_type: Some("text/plain".into()),
            sha256_metadata: sha256_metadata.map(str::to_string),
        }
    }

    fn keys(objects: &[Listed]) -> Vec<&str> {
        objects.iter().map(|o| o.key.as_str()).collect()
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
        assert_eq!(keys(&p.new), ["kb/added.md"]);
        assert_eq!(keys(&p.changed), ["kb/edited.md"]);
        assert_eq!(p.deleted, ["kb/removed.md"]);
        assert!(p.retagged.is_empty());
        assert_eq!((p.unchanged, p.excluded, p.seen()), (1, 2, 3));
    }

    #[test]
    fn content_hash_wins_over_etag_when_both_sides_know_it() {
        // A multipart re-upload of identical bytes gets a new ETag.
        let sel = selector();
        let docs: HashMap<String, Indexed> =
            [("kb/a.pdf".to_string(), hashed("old-etag", SHA_A))].into();
        let mut obj = listed("kb/a.pdf", "new-etag-2");
        obj.sha256_hex = Some(SHA_A.into());
        let same = plan(&sel, vec![obj.clone()], &docs);
        assert_eq!((same.unchanged, same.changed.len()), (1, 0));
        assert_eq!(same.retagged, [obj.clone()], "its new ETag is recorded");
        obj.sha256_hex = Some(SHA_B.into());
        let other = plan(&sel, vec![obj], &docs);
        assert_eq!((other.unchanged, other.changed.len()), (0, 1));
        assert!(other.retagged.is_empty());
    }

    #[test]
    fn an_unchanged_etag_needs_no_retag_and_a_failed_document_is_never_retagged() {
        let sel = selector();
        let mut failed = hashed("e2", SHA_A);
        failed.failed = true;
        let docs: HashMap<String, Indexed> = [
            ("kb/a.md".to_string(), hashed("e1", SHA_A)),
            ("kb/b.md".to_string(), failed),
        ]
        .into();
        let mut a = listed("kb/a.md", "e1");
        a.sha256_hex = Some(SHA_A.into());
        let mut b = listed("kb/b.md", "e2-new");
        b.sha256_hex = Some(SHA_A.into());
        let p = plan(&sel, vec![a, b], &docs);
        assert_eq!((p.unchanged, keys(&p.changed)), (1, vec!["kb/b.md"]));
        assert!(p.retagged.is_empty());
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

    #[test]
    fn only_objects_whose_etag_changed_under_a_hashed_document_are_candidates() {
        let sel = selector();
        let mut failed = hashed("e4", SHA_A);
        failed.failed = true;
        let docs: HashMap<String, Indexed> = [
            ("kb/retagged.md".to_string(), hashed("e1", SHA_A)),
            ("kb/same.md".to_string(), hashed("e2", SHA_A)),
            ("kb/unhashed.md".to_string(), indexed("e3")),
            ("kb/failed.md".to_string(), failed),
            ("other/x.md".to_string(), hashed("e5", SHA_A)),
        ]
        .into();
        let mut known = listed("kb/known.md", "e6-new");
        known.sha256_hex = Some(SHA_A.into());
        let listing = vec![
            listed("kb/retagged.md", "e1-new"),
            listed("kb/same.md", "e2"),
            listed("kb/unhashed.md", "e3-new"),
            listed("kb/failed.md", "e4-new"),
            listed("other/x.md", "e5-new"),
            listed("kb/new.md", "e7"),
            known,
        ];
        let candidates = hash_candidates(&sel, &listing, &docs);
        assert_eq!(
            candidates
                .iter()
                .map(|o| o.key.as_str())
                .collect::<Vec<_>>(),
            ["kb/retagged.md"]
        );
    }

    #[test]
    fn the_hash_comes_from_the_metadata_then_from_stowages_record_of_that_version() {
        let doc = hashed("old", SHA_A);
        let record = |etag: &str, sha: &str| Recorded {
            etag: etag.into(),
            sha256_hex: sha.into(),
        };
        // The object's own metadata, whatever the record says.
        assert_eq!(
            content_hash(
                "new",
                &doc,
                &head("new", Some(SHA_A)),
                Some(&record("new", SHA_B))
            ),
            Some(SHA_A.to_string())
        );
        // No metadata: Stowage's record of writing exactly this version
        // (ETags compared without their quotes).
        assert_eq!(
            content_hash(
                "new",
                &doc,
                &head("new", None),
                Some(&record("\"new\"", SHA_B))
            ),
            Some(SHA_B.to_string())
        );
        // A record of another version (someone else wrote it since) says
        // nothing.
        assert_eq!(
            content_hash(
                "new",
                &doc,
                &head("new", None),
                Some(&record("older", SHA_A))
            ),
            None
        );
        assert_eq!(content_hash("new", &doc, &head("new", None), None), None);
        // Metadata that is no SHA-256 is ignored; an uppercase one is read.
        assert_eq!(
            content_hash(
                "new",
                &doc,
                &head("new", Some("not-a-hash")),
                Some(&record("new", SHA_B))
            ),
            Some(SHA_B.to_string())
        );
        assert_eq!(
            content_hash("new", &doc, &head("new", Some(&SHA_A.to_uppercase())), None),
            Some(SHA_A.to_string())
        );
    }

    #[test]
    fn no_hash_for_an_object_replaced_since_its_listing_or_of_another_content_type() {
        let doc = hashed("old", SHA_A);
        // Listed as `new`, HEADed as a later version.
        assert_eq!(
            content_hash("new", &doc, &head("newer", Some(SHA_A)), None),
            None
        );
        // Same bytes, another type: extraction and search filters differ.
        let mut markdown = head("new", Some(SHA_A));
        markdown.content_type = Some("text/markdown".into());
        assert_eq!(content_hash("new", &doc, &markdown, None), None);
        let mut untyped = head("new", Some(SHA_A));
        untyped.content_type = None;
        assert_eq!(content_hash("new", &doc, &untyped, None), None);
        // No type is no type, however a server spells it.
        let octets = Indexed {
            content_type: Some("binary/octet-stream".into()),
            ..doc.clone()
        };
        for t in [
            None,
            Some("application/octet-stream"),
            Some("Binary/Octet-Stream"),
        ] {
            untyped.content_type = t.map(str::to_string);
            assert_eq!(
                content_hash("new", &octets, &untyped, None),
                Some(SHA_A.to_string()),
                "{t:?}"
            );
        }
    }
}
