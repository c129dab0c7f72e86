//! Chunking that follows the document's structure: the text is cut into
//! sections at its headings (HTML's, and Markdown's under the Markdown
//! strategy), so that a heading starts a chunk and never trails the one
//! before; each section is split with text-splitter — recursive
//! (paragraphs, lines, sentences, words) or Markdown-aware (blocks first) —
//! to the size and overlap in characters. Then:
//! - a chunk without a letter or digit (a border, a rule, box drawing) is
//!   dropped;
//! - a fragment shorter than a quarter of the size is merged with its
//!   neighbour when both fit in one chunk: with the chunk before it in its
//!   section, or, a section that is only a heading and a line, with the
//!   chunk after it (which then starts with that heading);
//! - a chunk whose text is exactly that of an earlier one of the document
//!   is dropped.
//!
//! Each chunk knows where it came from: byte and character offsets into
//! the extracted text and the headings it sits under. The text stored is
//! the source's; what is embedded and keyword-indexed is [`context`]: the
//! document's title and the heading path, then the text.

use stowage_common::spec::index::{Chunking, ChunkingStrategy};
use text_splitter::{ChunkConfig, MarkdownSplitter, TextSplitter};

use super::extract::{Extracted, Format, Heading, markdown_headings};

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Chunk {
    pub text: String,
    pub byte_start: usize,
    pub byte_end: usize,
    pub char_start: usize,
    pub char_end: usize,
    /// The headings this chunk sits under, outermost first.
    pub heading_path: Vec<String>,
}

#[derive(Debug, PartialEq, thiserror::Error)]
#[error("chunking: {0}")]
pub struct ChunkError(String);

/// Chunks of bare text of `format` (Markdown headings found here).
pub fn chunk(text: &str, format: Format, cfg: &Chunking) -> Result<Vec<Chunk>, ChunkError> {
    let headings = if format == Format::Markdown {
        markdown_headings(text)
    } else {
        Vec::new()
    };
    split(text, format, &headings, cfg)
}

/// Chunks of an extracted document, cut at its headings.
pub fn chunk_document(doc: &Extracted, cfg: &Chunking) -> Result<Vec<Chunk>, ChunkError> {
    split(&doc.text, doc.format, &doc.headings, cfg)
}

/// Separates the labels of a chunk's context.
pub const CONTEXT_SEPARATOR: &str = " › ";
/// Longest context label line, in bytes.
const MAX_CONTEXT_BYTES: usize = 600;

/// What is embedded and keyword-indexed for a chunk: `title › heading ›
/// heading`, a blank line, then the text. A heading equal to the title, or
/// to the label before it, is not repeated; without labels, the text.
pub fn context(title: Option<&str>, heading_path: &[String], text: &str) -> String {
    let mut labels: Vec<&str> = Vec::new();
    for label in title
        .into_iter()
        .chain(heading_path.iter().map(String::as_str))
    {
        let label = label.trim();
        if label.is_empty() || labels.contains(&label) {
            continue;
        }
        labels.push(label);
    }
    let mut line = String::new();
    for label in labels {
        let extra = label.len() + CONTEXT_SEPARATOR.len();
        if line.len() + extra > MAX_CONTEXT_BYTES {
            break;
        }
        if !line.is_empty() {
            line.push_str(CONTEXT_SEPARATOR);
        }
        line.push_str(label);
    }
    if line.is_empty() {
        text.to_string()
    } else {
        format!("{line}\n\n{text}")
    }
}

/// A piece of the text: byte range, and whether a section starts there.
#[derive(Clone, Copy, Debug)]
struct Piece {
    start: usize,
    end: usize,
    chars: usize,
    section_start: bool,
}

fn split(
    text: &str,
    format: Format,
    headings: &[Heading],
    cfg: &Chunking,
) -> Result<Vec<Chunk>, ChunkError> {
    let size = cfg.size as usize;
    let config = ChunkConfig::new(size)
        .with_overlap(cfg.overlap as usize)
        .map_err(|e| ChunkError(e.to_string()))?;
    let markdown = format == Format::Markdown && cfg.strategy == ChunkingStrategy::Markdown;
    let headings: &[Heading] = if markdown || format == Format::Html {
        headings
    } else {
        &[]
    };
    // Section bounds: the start, each heading, the end.
    let mut bounds: Vec<usize> = std::iter::once(0)
        .chain(headings.iter().map(|h| h.offset))
        .filter(|&o| o < text.len() && text.is_char_boundary(o))
        .collect();
    bounds.sort_unstable();
    bounds.dedup();
    bounds.push(text.len());
    let (md_splitter, text_splitter) = if markdown {
        (Some(MarkdownSplitter::new(config)), None)
    } else {
        (None, Some(TextSplitter::new(config)))
    };
    let mut pieces: Vec<Piece> = Vec::new();
    for w in bounds.windows(2) {
        let (a, b) = (w[0], w[1]);
        let section = &text[a..b];
        let found: Vec<(usize, &str)> = match (&md_splitter, &text_splitter) {
            (Some(s), _) => s.chunk_indices(section).collect(),
            (_, Some(s)) => s.chunk_indices(section).collect(),
            _ => Vec::new(),
        };
        for (i, (offset, piece)) in found.into_iter().enumerate() {
            // No letter or digit: a border, a rule, box drawing.
            if !piece.chars().any(char::is_alphanumeric) {
                continue;
            }
            pieces.push(Piece {
                start: a + offset,
                end: a + offset + piece.len(),
                chars: piece.chars().count(),
                section_start: i == 0 && a > 0,
            });
        }
    }
    let merged = merge_tiny(text, pieces, size);
    // Character offsets: pieces are in text order.
    let mut seen = std::collections::HashSet::new();
    let (mut at_byte, mut at_char) = (0usize, 0usize);
    let mut out = Vec::with_capacity(merged.len());
    for p in merged {
        at_char += text[at_byte..p.start].chars().count();
        at_byte = p.start;
        let chunk_text = &text[p.start..p.end];
        if !seen.insert(chunk_text) {
            continue; // the same text again in this document
        }
        out.push(Chunk {
            text: chunk_text.to_string(),
            byte_start: p.start,
            byte_end: p.end,
            char_start: at_char,
            char_end: at_char + p.chars,
            heading_path: path_at(headings, p.start),
        });
    }
    Ok(out)
}

/// Merges fragments shorter than a quarter of `size` with a neighbour when
/// the two fit in `size` characters, never gluing a section's start onto
/// the end of a longer chunk before it.
fn merge_tiny(text: &str, pieces: Vec<Piece>, size: usize) -> Vec<Piece> {
    let tiny = (size / 4).max(1);
    let mut out: Vec<Piece> = Vec::with_capacity(pieces.len());
    for p in pieces {
        if let Some(last) = out.last_mut()
            && p.start >= last.start
            && if p.section_start {
                // Only a section that is a heading and a line goes on
                // into the next section.
                last.chars < tiny && (last.section_start || last.start == 0)
            } else {
                last.chars < tiny || p.chars < tiny
            }
        {
            let end = last.end.max(p.end);
            let chars = text[last.start..end].chars().count();
            if chars <= size {
                last.end = end;
                last.chars = chars;
                continue;
            }
        }
        out.push(p);
    }
    out
}

/// The headings in force at byte `at`: the last of each level above the
/// deepest one that starts at or before it.
fn path_at(headings: &[Heading], at: usize) -> Vec<String> {
    let mut stack: Vec<(u8, &str)> = Vec::new();
    for h in headings {
        if h.offset > at {
            break;
        }
        while stack.last().is_some_and(|(l, _)| *l >= h.level) {
            stack.pop();
        }
        stack.push((h.level, &h.text));
    }
    stack.into_iter().map(|(_, t)| t.to_string()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(strategy: ChunkingStrategy, size: u32, overlap: u32) -> Chunking {
        Chunking {
            strategy,
            size,
            overlap,
        }
    }

    const GUIDE: &str = "# Guide\n\nIntro paragraph about Stowage.\n\n## Install\n\nRun the chart. \
Then apply the CRDs and wait for the operator.\n\n### Helm\n\nValues for Postgres and NATS.\n\n## Use\n\n\
Apply an UploadJob and watch it with kubectl.\n";

    #[test]
    fn markdown_chunks_know_their_headings_and_offsets() {
        let chunks = chunk(
            GUIDE,
            Format::Markdown,
            &cfg(ChunkingStrategy::Markdown, 80, 0),
        )
        .expect("chunks");
        assert!(chunks.len() >= 3, "{chunks:#?}");
        for c in &chunks {
            assert!(c.text.chars().count() <= 80, "{c:?}");
            assert_eq!(
                &GUIDE[c.byte_start..c.byte_end],
                c.text,
                "byte offsets point at the text"
            );
            assert_eq!(GUIDE[..c.byte_start].chars().count(), c.char_start);
            assert_eq!(c.char_end - c.char_start, c.text.chars().count());
        }
        let helm = chunks
            .iter()
            .find(|c| c.text.contains("Values for Postgres"))
            .expect("helm chunk");
        assert_eq!(helm.heading_path, ["Guide", "Install", "Helm"]);
        let usage = chunks
            .iter()
            .find(|c| c.text.contains("UploadJob"))
            .expect("use chunk");
        assert_eq!(
            usage.heading_path,
            ["Guide", "Use"],
            "a sibling replaces Install/Helm"
        );
    }

    #[test]
    fn recursive_chunks_overlap_and_cover_the_text() {
        // Numbered: identical chunks of a document are dropped.
        let text: String = (0..40)
            .map(|i| format!("Stowage moves {i:02} documents. "))
            .collect();
        let chunks = chunk(
            &text,
            Format::Plain,
            &cfg(ChunkingStrategy::Recursive, 100, 30),
        )
        .expect("chunks");
        assert!(chunks.len() > 5);
        assert!(
            chunks
                .iter()
                .all(|c| c.text.chars().count() <= 100 && c.heading_path.is_empty())
        );
        for pair in chunks.windows(2) {
            assert!(
                pair[1].byte_start < pair[0].byte_end,
                "consecutive chunks overlap: {pair:?}"
            );
        }
        assert_eq!(chunks[0].byte_start, 0);
        assert_eq!(
            chunks.last().map(|c| c.byte_end),
            Some(text.trim_end().len())
        );
    }

    #[test]
    fn markdown_strategy_on_plain_text_falls_back_to_recursive() {
        let text = "# not a heading in a .txt file\n\nbody";
        let chunks =
            chunk(text, Format::Plain, &cfg(ChunkingStrategy::Markdown, 64, 0)).expect("chunks");
        assert!(chunks.iter().all(|c| c.heading_path.is_empty()));
        assert!(
            chunk(
                text,
                Format::Plain,
                &cfg(ChunkingStrategy::Recursive, 64, 64)
            )
            .is_err(),
            "overlap >= size"
        );
    }

    fn html(name: &str) -> Extracted {
        let page = crate::index::html::tests::pg(name);
        crate::index::extract::extract(Some("text/html"), name, page.as_bytes(), 1 << 25)
            .expect("extracted")
    }

    fn median(chunks: &[Chunk]) -> usize {
        let mut lens: Vec<usize> = chunks.iter().map(|c| c.text.chars().count()).collect();
        lens.sort_unstable();
        lens.get(lens.len() / 2).copied().unwrap_or(0)
    }

    #[test]
    fn html_chunks_follow_the_headings() {
        let doc = html("sql-createindex.html");
        let chunks = chunk_document(&doc, &Chunking::default()).expect("chunks");
        for c in &chunks {
            assert_eq!(&doc.text[c.byte_start..c.byte_end], c.text);
            assert!(c.text.chars().count() <= 1000);
            assert!(
                !c.heading_path.is_empty(),
                "every chunk is under a heading: {c:?}"
            );
            // A heading never ends a chunk: it starts the next one.
            for h in &doc.headings {
                assert!(
                    !(c.text.ends_with(&h.text) && c.byte_end == h.offset + h.text.len()),
                    "heading {:?} trails a chunk",
                    h.text
                );
            }
        }
        let concurrently = chunks
            .iter()
            .find(|c| c.text.contains("When this option is used, PostgreSQL will build the index without taking any locks"))
            .expect("the CONCURRENTLY parameter");
        // The reference page's sections are h2 like its name: siblings.
        assert_eq!(concurrently.heading_path, ["Parameters"]);
        let examples = chunks
            .iter()
            .find(|c| {
                c.text
                    .contains("CREATE UNIQUE INDEX title_idx ON films (title);")
            })
            .expect("the first example");
        assert_eq!(examples.heading_path, ["Examples"]);
        assert!(
            (20..60).contains(&chunks.len()) && median(&chunks) > 400,
            "{} chunks, median {}",
            chunks.len(),
            median(&chunks)
        );
    }

    #[test]
    fn a_short_page_is_a_few_full_chunks() {
        let doc = html("ddl-basics.html");
        let chunks = chunk_document(&doc, &Chunking::default()).expect("chunks");
        assert!((3..=8).contains(&chunks.len()), "{chunks:#?}");
        assert!(chunks[0].text.starts_with("5.1. Table Basics"));
        assert!(
            chunks
                .iter()
                .all(|c| c.heading_path.first().map(String::as_str) == Some("5.1. Table Basics"))
        );
        assert!(median(&chunks) > 500, "{chunks:#?}");
    }

    #[test]
    fn the_generated_index_makes_a_bounded_number_of_chunks() {
        let doc = html("bookindex.html");
        let chunks = chunk_document(&doc, &Chunking::default()).expect("chunks");
        // 445 kB of HTML; the old extraction made thousands of chunks of it.
        assert!(chunks.len() < 400, "{}", chunks.len());
        assert!(median(&chunks) > 700, "{}", median(&chunks));
        let catalog = html("catalog-pg-class.html");
        let chunks = chunk_document(&catalog, &Chunking::default()).expect("chunks");
        assert!(
            (5..40).contains(&chunks.len()) && median(&chunks) > 500,
            "{}",
            chunks.len()
        );
    }

    #[test]
    fn borders_duplicates_and_fragments() {
        let plain = |text: &str, size: u32| {
            chunk(
                text,
                Format::Plain,
                &cfg(ChunkingStrategy::Recursive, size, 0),
            )
            .expect("chunks")
        };
        assert!(plain("┌────┐\n│    │\n└────┘\n\n----\n\n****", 64).is_empty());
        let text = "The same paragraph, said once.\n\nThe same paragraph, said once.\n\n\
                    And then something else entirely.";
        let chunks = plain(text, 40);
        let texts: Vec<&str> = chunks.iter().map(|c| c.text.as_str()).collect();
        assert_eq!(
            texts,
            [
                "The same paragraph, said once.",
                "And then something else entirely."
            ]
        );
        // Fragments under a quarter of the size join a neighbour.
        let chunks = plain(
            "Short.\n\nA much longer paragraph follows the short one here.",
            100,
        );
        assert_eq!(chunks.len(), 1, "{chunks:?}");
        assert_eq!(chunks[0].char_end, chunks[0].text.chars().count());
    }

    #[test]
    fn a_lone_heading_goes_on_into_the_next_section() {
        let doc = Extracted {
            format: Format::Html,
            text: "Chapter 5\n\n5.1 Basics\n\nTables hold rows.".into(),
            title: None,
            headings: vec![
                Heading {
                    offset: 0,
                    level: 1,
                    text: "Chapter 5".into(),
                },
                Heading {
                    offset: 11,
                    level: 2,
                    text: "5.1 Basics".into(),
                },
            ],
            truncated: false,
        };
        let chunks =
            chunk_document(&doc, &cfg(ChunkingStrategy::Markdown, 200, 0)).expect("chunks");
        assert_eq!(chunks.len(), 1, "{chunks:?}");
        assert_eq!(chunks[0].text, doc.text);
        assert_eq!(chunks[0].heading_path, ["Chapter 5"]);
        // A long section before a heading keeps it to itself.
        let body = "Words of the first section. ".repeat(6);
        let text = format!("{body}\n\nNext\n\nMore text.");
        let next = body.len() + 2;
        let doc = Extracted {
            text: text.clone(),
            headings: vec![Heading {
                offset: next,
                level: 2,
                text: "Next".into(),
            }],
            ..doc
        };
        let chunks =
            chunk_document(&doc, &cfg(ChunkingStrategy::Markdown, 200, 0)).expect("chunks");
        assert_eq!(chunks.len(), 2, "{chunks:?}");
        assert!(chunks[1].text.starts_with("Next") && chunks[1].heading_path == ["Next"]);
    }

    #[test]
    fn context_leads_with_title_and_headings() {
        let path = vec!["CREATE INDEX".to_string(), "Parameters".to_string()];
        assert_eq!(
            context(Some("CREATE INDEX"), &path, "CONCURRENTLY ..."),
            "CREATE INDEX › Parameters\n\nCONCURRENTLY ..."
        );
        assert_eq!(context(None, &[], "text"), "text");
        assert_eq!(context(Some(" "), &["A".into()], "t"), "A\n\nt");
    }
}
