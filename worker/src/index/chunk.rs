//! Chunking with text-splitter: recursive (paragraphs, lines, sentences,
//! words) or Markdown-aware (headings and blocks first), size and overlap in
//! characters. Each chunk knows where it came from: byte and character
//! offsets into the extracted text and, for Markdown, its heading path.

use pulldown_cmark::{Event, HeadingLevel, Parser, Tag, TagEnd};
use stowage_common::spec::index::{Chunking, ChunkingStrategy};
use text_splitter::{ChunkConfig, MarkdownSplitter, TextSplitter};

use super::extract::Format;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Chunk {
    pub text: String,
    pub byte_start: usize,
    pub byte_end: usize,
    pub char_start: usize,
    pub char_end: usize,
    /// The Markdown headings this chunk sits under, outermost first.
    pub heading_path: Vec<String>,
}

#[derive(Debug, PartialEq, thiserror::Error)]
#[error("chunking: {0}")]
pub struct ChunkError(String);

pub fn chunk(text: &str, format: Format, cfg: &Chunking) -> Result<Vec<Chunk>, ChunkError> {
    let config = ChunkConfig::new(cfg.size as usize)
        .with_overlap(cfg.overlap as usize)
        .map_err(|e| ChunkError(e.to_string()))?;
    let markdown = format == Format::Markdown && cfg.strategy == ChunkingStrategy::Markdown;
    let pieces: Vec<_> = if markdown {
        MarkdownSplitter::new(config)
            .chunk_char_indices(text)
            .collect()
    } else {
        TextSplitter::new(config).chunk_char_indices(text).collect()
    };
    let headings = if markdown { headings(text) } else { Vec::new() };
    Ok(pieces
        .into_iter()
        .map(|p| Chunk {
            byte_start: p.byte_offset,
            byte_end: p.byte_offset + p.chunk.len(),
            char_start: p.char_offset,
            char_end: p.char_offset + p.chunk.chars().count(),
            heading_path: path_at(&headings, p.byte_offset),
            text: p.chunk.to_string(),
        })
        .collect())
}

/// Every heading: (byte offset, level, title).
fn headings(text: &str) -> Vec<(usize, usize, String)> {
    let mut out = Vec::new();
    let mut current: Option<(usize, usize, String)> = None;
    for (event, range) in Parser::new(text).into_offset_iter() {
        match event {
            Event::Start(Tag::Heading { level, .. }) => {
                current = Some((range.start, level_number(level), String::new()));
            }
            Event::Text(t) | Event::Code(t) => {
                if let Some((_, _, title)) = &mut current {
                    title.push_str(&t);
                }
            }
            Event::End(TagEnd::Heading(_)) => out.extend(current.take()),
            _ => {}
        }
    }
    out
}

fn level_number(l: HeadingLevel) -> usize {
    match l {
        HeadingLevel::H1 => 1,
        HeadingLevel::H2 => 2,
        HeadingLevel::H3 => 3,
        HeadingLevel::H4 => 4,
        HeadingLevel::H5 => 5,
        HeadingLevel::H6 => 6,
    }
}

/// The headings in force at byte `at`: the last of each level above the
/// deepest one that starts at or before it.
fn path_at(headings: &[(usize, usize, String)], at: usize) -> Vec<String> {
    let mut stack: Vec<(usize, &str)> = Vec::new();
    for (offset, level, title) in headings {
        if *offset > at {
            break;
        }
        while stack.last().is_some_and(|(l, _)| l >= level) {
            stack.pop();
        }
        stack.push((*level, title));
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
        let text = "Stowage moves documents. ".repeat(40);
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
}
