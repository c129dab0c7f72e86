//! No document may crash the indexer: generated hostile HTML, Markdown and
//! text (unbalanced and deeply nested tags, tables of empty cells, front
//! matter cut short, NULs, invalid UTF-8, box drawing) go through extraction
//! and chunking with any valid chunking setting; nothing may panic, the text
//! stays within its bound, and every chunk's offsets point into it. Pure:
//! needs nothing running.

use proptest::prelude::*;
use stowage_common::spec::index::{
    Chunking, ChunkingStrategy, MAX_CHUNK_OVERLAP, MAX_CHUNK_SIZE, MIN_CHUNK_SIZE,
};
use stowage_worker::index::chunk::chunk_document;
use stowage_worker::index::extract::{DEFAULT_MAX_BYTES, extract};

/// Pieces a hostile page is made of.
fn piece() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("<main>".to_string()),
        Just("</main>".to_string()),
        Just("<div class=\"body\" role=\"main\">".to_string()),
        Just("</div>".to_string()),
        Just("<table><tr><td>".to_string()),
        Just("</td><td></td></tr>".to_string()),
        Just("<nav><a href=\"#x\">menu</a></nav>".to_string()),
        Just("<h1>".to_string()),
        Just("</h2>".to_string()),
        Just("<h6 id=\"a\">¶</h6>".to_string()),
        Just("<pre>  a\n\tb  </pre>".to_string()),
        Just("<title>".to_string()),
        Just("<script>x<y</script>".to_string()),
        Just("<!-- -->".to_string()),
        Just("<![CDATA[".to_string()),
        Just("&amp;&#0;&#x110000;&nbsp;".to_string()),
        Just("---\ntitle: ".to_string()),
        Just("\n# ".to_string()),
        Just("\n```\n".to_string()),
        Just("│─┼═╬".to_string()),
        Just("\u{0}\u{feff}\u{202e}".to_string()),
        "[a-zA-Z .,;\n]{0,80}",
        ".{0,40}",
    ]
}

fn document() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        prop::collection::vec(piece(), 0..200).prop_map(|p| p.concat().into_bytes()),
        // Nesting deep enough to reach the parser's depth limit.
        (1usize..2000).prop_map(|n| "<div><b>x".repeat(n).into_bytes()),
        prop::collection::vec(any::<u8>(), 0..2000),
    ]
}

fn chunking() -> impl Strategy<Value = Chunking> {
    (
        prop_oneof![
            Just(ChunkingStrategy::Recursive),
            Just(ChunkingStrategy::Markdown)
        ],
        prop_oneof![
            Just(MIN_CHUNK_SIZE),
            Just(MAX_CHUNK_SIZE),
            MIN_CHUNK_SIZE..=MAX_CHUNK_SIZE
        ],
    )
        .prop_flat_map(|(strategy, size)| {
            (0..size.min(MAX_CHUNK_OVERLAP + 1)).prop_map(move |overlap| Chunking {
                strategy,
                size,
                overlap,
            })
        })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 300, ..ProptestConfig::default() })]

    #[test]
    fn no_document_crashes_extraction_or_chunking(
        bytes in document(),
        content_type in prop_oneof![
            Just("text/html"), Just("text/markdown"), Just("text/plain"), Just("application/xhtml+xml")
        ],
        cfg in chunking(),
    ) {
        let Ok(doc) = extract(Some(content_type), "doc", &bytes, DEFAULT_MAX_BYTES) else {
            return Ok(());
        };
        prop_assert!(doc.text.len() <= bytes.len() + 1024, "{} from {}", doc.text.len(), bytes.len());
        let Ok(chunks) = chunk_document(&doc, &cfg) else { return Ok(()) };
        for c in &chunks {
            prop_assert!(c.byte_start <= c.byte_end && c.byte_end <= doc.text.len());
            prop_assert!(doc.text.is_char_boundary(c.byte_start) && doc.text.is_char_boundary(c.byte_end));
            prop_assert!(c.text.chars().any(char::is_alphanumeric), "{:?}", c.text);
        }
    }
}
