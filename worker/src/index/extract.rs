//! Text extraction: plain text, Markdown, HTML and PDF, chosen by the
//! object's content type or, failing that, its key's extension. Other types
//! are skipped with the reason; a file larger than the limit is skipped; a
//! malformed file fails with what is wrong with it.
//!
//! What comes out is what a reader reads, with the document's title and
//! headings as structure for the chunker:
//! - HTML: the main content, without navigation or page furniture, tables
//!   as rows of ` | `-separated cells (see [`super::html`]); the `<title>`.
//! - Markdown: as written (the heading-aware splitter reads its syntax),
//!   less a leading YAML (`---`) or TOML (`+++`) front matter block, whose
//!   `title` is the title; else the first `#` heading.
//! - PDF: page by page, less page numbers and the running headers and
//!   footers repeated on most pages.
//!
//! The text is bounded: never longer than [`super::html::MAX_TEXT_BYTES`],
//! nor — PDF aside, whose compressed streams can hold more text than the
//! file's size — than the input plus [`super::html::SLACK`] bytes (an HTML
//! page's invalid bytes, each decoded to a 3-byte replacement character,
//! included).

use pulldown_cmark::{Event, HeadingLevel, Parser, Tag, TagEnd};

pub use super::html::Heading;
use super::html::{self, MAX_TEXT_BYTES};

/// Largest object extracted by default.
pub const DEFAULT_MAX_BYTES: usize = 32 * 1024 * 1024;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    Plain,
    Markdown,
    Html,
    Pdf,
}

impl Format {
    pub fn as_str(self) -> &'static str {
        match self {
            Format::Plain => "text",
            Format::Markdown => "markdown",
            Format::Html => "html",
            Format::Pdf => "pdf",
        }
    }

    /// From the content type (parameters ignored), else from the key's
    /// extension when the type is missing or generic.
    pub fn detect(content_type: Option<&str>, key: &str) -> Option<Format> {
        let mime = content_type
            .map(|t| {
                t.split(';')
                    .next()
                    .unwrap_or_default()
                    .trim()
                    .to_ascii_lowercase()
            })
            .filter(|t| {
                !t.is_empty() && t != "application/octet-stream" && t != "binary/octet-stream"
            });
        if let Some(mime) = mime {
            return match mime.as_str() {
                "text/markdown" | "text/x-markdown" => Some(Format::Markdown),
                "text/html" | "application/xhtml+xml" => Some(Format::Html),
                "application/pdf" => Some(Format::Pdf),
                // text/plain is what many tools send for .md files.
                "text/plain" => Some(by_extension(key).unwrap_or(Format::Plain)),
                m if m.starts_with("text/") => Some(Format::Plain),
                _ => None,
            };
        }
        by_extension(key)
    }
}

fn by_extension(key: &str) -> Option<Format> {
    let name = key.rsplit('/').next().unwrap_or(key);
    let ext = name.rsplit_once('.')?.1.to_ascii_lowercase();
    match ext.as_str() {
        "txt" | "text" | "log" | "csv" | "rst" => Some(Format::Plain),
        "md" | "markdown" | "mdx" => Some(Format::Markdown),
        "html" | "htm" | "xhtml" => Some(Format::Html),
        "pdf" => Some(Format::Pdf),
        _ => None,
    }
}

#[derive(Debug, PartialEq, thiserror::Error)]
pub enum ExtractError {
    #[error("not indexed: {0} is not text, Markdown, HTML or PDF")]
    Unsupported(String),
    #[error("not indexed: {size} bytes is more than the extraction limit of {limit}")]
    TooLarge { size: usize, limit: usize },
    #[error("not indexed: the {0} document contains no text")]
    Empty(&'static str),
    #[error("malformed {format}: {reason}")]
    Malformed {
        format: &'static str,
        reason: String,
    },
}

impl ExtractError {
    /// Skipped (recorded with the reason) rather than failed.
    pub fn is_skip(&self) -> bool {
        !matches!(self, ExtractError::Malformed { .. })
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Extracted {
    pub format: Format,
    pub text: String,
    /// The title the document gives itself, if any.
    pub title: Option<String>,
    /// Headings with their byte offsets in `text`, in order (HTML, and
    /// Markdown's `#` headings).
    pub headings: Vec<Heading>,
    /// Cut short by a limit of the extraction.
    pub truncated: bool,
}

pub fn extract(
    content_type: Option<&str>,
    key: &str,
    bytes: &[u8],
    max_bytes: usize,
) -> Result<Extracted, ExtractError> {
    if bytes.len() > max_bytes {
        return Err(ExtractError::TooLarge {
            size: bytes.len(),
            limit: max_bytes,
        });
    }
    let format = Format::detect(content_type, key).ok_or_else(|| {
        ExtractError::Unsupported(match content_type {
            Some(t) if !t.is_empty() => format!("content type {t:?}"),
            _ => format!("{key:?} (no content type, unknown extension)"),
        })
    })?;
    let mut out = Extracted {
        format,
        text: String::new(),
        title: None,
        headings: Vec::new(),
        truncated: false,
    };
    match format {
        Format::Plain => out.text = utf8(format, bytes)?.to_string(),
        Format::Markdown => markdown(utf8(format, bytes)?, &mut out),
        Format::Html => {
            // As a browser reads it: a broken byte is a replacement
            // character, not a reason to lose the page.
            let source =
                String::from_utf8_lossy(bytes.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(bytes));
            let page = html::extract_decoded(&source, bytes.len());
            out.text = page.text;
            out.title = page.title;
            out.headings = page.headings;
            out.truncated = page.truncated;
        }
        Format::Pdf => {
            out.text = pdf(bytes)?;
            if out.text.len() > MAX_TEXT_BYTES {
                let mut end = MAX_TEXT_BYTES;
                while !out.text.is_char_boundary(end) {
                    end -= 1;
                }
                out.text.truncate(end);
                out.truncated = true;
            }
        }
    }
    if out.text.trim().is_empty() {
        return Err(ExtractError::Empty(format.as_str()));
    }
    Ok(out)
}

/// Markdown: front matter off (its `title` kept), headings found.
fn markdown(source: &str, out: &mut Extracted) {
    let (front_title, body) = front_matter(source);
    out.text = body.to_string();
    out.headings = markdown_headings(&out.text);
    out.title = front_title.or_else(|| {
        out.headings
            .iter()
            .find(|h| h.level == 1)
            .map(|h| h.text.clone())
    });
}

/// A leading `---` (YAML) or `+++` (TOML) block: its `title`, and the text
/// after it. Unterminated, it is text.
fn front_matter(source: &str) -> (Option<String>, &str) {
    let fence = if source.starts_with("---\n") || source.starts_with("---\r\n") {
        "---"
    } else if source.starts_with("+++\n") || source.starts_with("+++\r\n") {
        "+++"
    } else {
        return (None, source);
    };
    let mut offset = 0;
    let mut title = None;
    for (i, line) in source.split_inclusive('\n').enumerate() {
        offset += line.len();
        let trimmed = line.trim_end();
        if i > 0 && trimmed == fence {
            return (title, &source[offset..]);
        }
        if i > 0
            && title.is_none()
            && let Some((key, value)) = trimmed.split_once([':', '='])
            && key.trim() == "title"
        {
            let value = value.trim().trim_matches(['"', '\'']).trim();
            if !value.is_empty() {
                title = Some(value.chars().take(300).collect());
            }
        }
    }
    (None, source)
}

/// Every `#` heading of Markdown text, with its byte offset.
pub fn markdown_headings(text: &str) -> Vec<Heading> {
    let mut out = Vec::new();
    let mut current: Option<Heading> = None;
    for (event, range) in Parser::new(text).into_offset_iter() {
        match event {
            Event::Start(Tag::Heading { level, .. }) => {
                current = Some(Heading {
                    offset: range.start,
                    level: level_number(level),
                    text: String::new(),
                });
            }
            Event::Text(t) | Event::Code(t) => {
                if let Some(h) = &mut current
                    && h.text.len() < 300
                {
                    h.text.push_str(&t);
                }
            }
            Event::End(TagEnd::Heading(_)) => {
                if let Some(mut h) = current.take() {
                    h.text = h.text.split_whitespace().collect::<Vec<_>>().join(" ");
                    out.push(h);
                }
            }
            _ => {}
        }
    }
    out
}

fn level_number(l: HeadingLevel) -> u8 {
    match l {
        HeadingLevel::H1 => 1,
        HeadingLevel::H2 => 2,
        HeadingLevel::H3 => 3,
        HeadingLevel::H4 => 4,
        HeadingLevel::H5 => 5,
        HeadingLevel::H6 => 6,
    }
}

fn malformed(format: Format, reason: String) -> ExtractError {
    ExtractError::Malformed {
        format: format.as_str(),
        reason,
    }
}

fn utf8(format: Format, bytes: &[u8]) -> Result<&str, ExtractError> {
    let bytes = bytes.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(bytes);
    std::str::from_utf8(bytes).map_err(|e| {
        malformed(
            format,
            format!("not UTF-8: invalid byte at offset {}", e.valid_up_to()),
        )
    })
}

fn pdf(bytes: &[u8]) -> Result<String, ExtractError> {
    if !bytes.starts_with(b"%PDF-") {
        return Err(malformed(Format::Pdf, "no %PDF- header".into()));
    }
    // The PDF parser panics on some damaged files: a damaged file must fail
    // its document, not the worker.
    match std::panic::catch_unwind(|| pdf_extract::extract_text_from_mem_by_pages(bytes)) {
        Ok(Ok(pages)) => Ok(pdf_pages(&pages)),
        Ok(Err(e)) => Err(malformed(Format::Pdf, e.to_string())),
        Err(_) => Err(malformed(
            Format::Pdf,
            "the PDF parser could not read it".into(),
        )),
    }
}

/// A line that is only a page number: `12`, `- 12 -`, `Page 3`, `3 of 10`,
/// `Page 3 of 10`, `iv`.
fn page_number(line: &str) -> bool {
    let l = line
        .trim()
        .trim_matches(['-', '–', '—', ' '])
        .to_ascii_lowercase();
    let l = l.strip_prefix("page").map_or(l.as_str(), str::trim);
    if l.is_empty() {
        return false;
    }
    let words: Vec<&str> = l.split_whitespace().collect();
    let number = |w: &str| {
        w.chars().all(|c| c.is_ascii_digit())
            || (w.len() <= 6 && w.chars().all(|c| matches!(c, 'i' | 'v' | 'x' | 'l')))
    };
    match words.as_slice() {
        [n] => number(n),
        [n, "of" | "/", m] => number(n) && number(m),
        _ => false,
    }
}

/// Digits out, whitespace collapsed: a running header with its page number
/// looks the same on every page.
fn running_key(line: &str) -> String {
    line.split_whitespace()
        .map(|w| {
            w.chars()
                .filter(|c| !c.is_ascii_digit())
                .collect::<String>()
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// Lines among the first and last two of each page.
const RUNNING_LINES: usize = 2;

/// How many lines at each end of a page of `n` lines can be a running
/// header or footer: two, but never more than a third of the page (a short
/// page is mostly body).
fn edge_lines(n: usize) -> usize {
    RUNNING_LINES.min(n / 3)
}

/// Pages joined by blank lines, less page numbers, and less the lines at
/// the top or bottom of a page that recur there on at least half of the
/// pages (running headers and footers), when there are three pages or more.
fn pdf_pages(pages: &[String]) -> String {
    use std::collections::HashMap;
    let edges = |page: &str| -> Vec<String> {
        let lines: Vec<&str> = page.lines().filter(|l| !l.trim().is_empty()).collect();
        let (n, k) = (lines.len(), edge_lines(lines.len()));
        let mut keys: Vec<String> = lines
            .iter()
            .enumerate()
            .filter(|(i, _)| *i < k || *i + k >= n)
            .map(|(_, l)| running_key(l))
            .filter(|k| !k.trim().is_empty())
            .collect();
        keys.sort();
        keys.dedup();
        keys
    };
    let mut seen: HashMap<String, usize> = HashMap::new();
    if pages.len() >= 3 {
        for page in pages {
            for key in edges(page) {
                *seen.entry(key).or_default() += 1;
            }
        }
    }
    let running = |line: &str| {
        seen.get(&running_key(line))
            .is_some_and(|&n| n.saturating_mul(2) >= pages.len())
    };
    let mut out = String::new();
    for page in pages {
        let n = page.lines().filter(|l| !l.trim().is_empty()).count();
        let k = edge_lines(n);
        let mut text = String::new();
        let mut i = 0;
        let mut blank = false;
        for line in page.lines() {
            if line.trim().is_empty() {
                blank = true;
                continue;
            }
            let edge = i < k || i + k >= n;
            i += 1;
            if page_number(line) || (edge && running(line)) {
                continue;
            }
            if !text.is_empty() {
                text.push_str(if blank { "\n\n" } else { "\n" });
            }
            blank = false;
            text.push_str(line.trim_end());
        }
        if text.is_empty() {
            continue;
        }
        if !out.is_empty() {
            out.push_str("\n\n");
        }
        out.push_str(&text);
        if out.len() > MAX_TEXT_BYTES {
            break;
        }
    }
    out
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A minimal one-page PDF showing `text` (Helvetica), with a correct
    /// cross-reference table.
    pub fn pdf_with(text: &str) -> Vec<u8> {
        let content = format!("BT /F1 12 Tf 72 720 Td ({text}) Tj ET");
        let objects = [
            "<< /Type /Catalog /Pages 2 0 R >>".to_string(),
            "<< /Type /Pages /Kids [3 0 R] /Count 1 >>".to_string(),
            "<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents 4 0 R \
             /Resources << /Font << /F1 5 0 R >> >> >>"
                .to_string(),
            format!(
                "<< /Length {} >>\nstream\n{content}\nendstream",
                content.len()
            ),
            "<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica /Encoding /WinAnsiEncoding >>"
                .to_string(),
        ];
        let mut out = b"%PDF-1.4\n".to_vec();
        let mut offsets = Vec::new();
        for (i, o) in objects.iter().enumerate() {
            offsets.push(out.len());
            out.extend_from_slice(format!("{} 0 obj\n{o}\nendobj\n", i + 1).as_bytes());
        }
        let xref = out.len();
        out.extend_from_slice(
            format!("xref\n0 {}\n0000000000 65535 f \n", objects.len() + 1).as_bytes(),
        );
        for off in offsets {
            out.extend_from_slice(format!("{off:010} 00000 n \n").as_bytes());
        }
        out.extend_from_slice(
            format!(
                "trailer\n<< /Size {} /Root 1 0 R >>\nstartxref\n{xref}\n%%EOF\n",
                objects.len() + 1
            )
            .as_bytes(),
        );
        out
    }

    #[test]
    fn formats_come_from_the_content_type_then_the_extension() {
        assert_eq!(
            Format::detect(Some("text/markdown; charset=utf-8"), "a"),
            Some(Format::Markdown)
        );
        assert_eq!(
            Format::detect(Some("text/plain"), "notes/readme.md"),
            Some(Format::Markdown)
        );
        assert_eq!(
            Format::detect(Some("application/octet-stream"), "a/b.PDF"),
            Some(Format::Pdf)
        );
        assert_eq!(Format::detect(None, "page.htm"), Some(Format::Html));
        assert_eq!(Format::detect(Some("text/csv"), "x"), Some(Format::Plain));
        assert_eq!(Format::detect(Some("image/png"), "a.md"), None);
        assert_eq!(Format::detect(None, "archive.tar.gz"), None);
    }

    #[test]
    fn plain_markdown_and_html_become_text() {
        let t =
            extract(None, "a.txt", "\u{feff}héllo".as_bytes(), DEFAULT_MAX_BYTES).expect("text");
        assert_eq!((t.format, t.text.as_str()), (Format::Plain, "héllo"));
        let md = extract(None, "a.md", b"# Title\n\nBody.", DEFAULT_MAX_BYTES).expect("md");
        assert_eq!(
            md.text, "# Title\n\nBody.",
            "Markdown is kept for the heading-aware splitter"
        );
        let html = extract(
            Some("text/html"),
            "p",
            b"<html><head><title>t</title><script>var x=1;</script></head><body><h1>Stowage</h1><p>Moves <b>documents</b>.</p></body></html>",
            DEFAULT_MAX_BYTES,
        )
        .expect("html");
        assert!(
            html.text.contains("Stowage") && html.text.contains("Moves documents."),
            "{:?}",
            html.text
        );
        assert!(
            !html.text.contains("var x"),
            "scripts are not text: {:?}",
            html.text
        );
    }

    #[test]
    fn pdf_text_is_extracted() {
        let doc = extract(
            Some("application/pdf"),
            "r.pdf",
            &pdf_with("Quarterly revenue grew"),
            DEFAULT_MAX_BYTES,
        )
        .expect("pdf");
        assert_eq!(doc.format, Format::Pdf);
        assert!(
            doc.text.contains("Quarterly revenue grew"),
            "{:?}",
            doc.text
        );
    }

    #[test]
    fn bad_input_is_skipped_or_failed_with_the_reason() {
        let e =
            extract(Some("image/png"), "x.png", b"\x89PNG", DEFAULT_MAX_BYTES).expect_err("png");
        assert!(e.is_skip() && e.to_string().contains("image/png"), "{e}");
        let e = extract(None, "big.txt", &[b'a'; 100], 10).expect_err("size");
        assert_eq!(
            e,
            ExtractError::TooLarge {
                size: 100,
                limit: 10
            }
        );
        assert!(e.is_skip());
        let e = extract(None, "a.txt", b"ok \xff\xfe", DEFAULT_MAX_BYTES).expect_err("utf8");
        assert!(!e.is_skip() && e.to_string().contains("offset 3"), "{e}");
        let e = extract(
            None,
            "a.pdf",
            b"%PDF-1.4\nthis is not a pdf",
            DEFAULT_MAX_BYTES,
        )
        .expect_err("pdf");
        assert!(
            matches!(e, ExtractError::Malformed { format: "pdf", .. }),
            "{e}"
        );
        let mut truncated = pdf_with("cut short");
        truncated.truncate(truncated.len() / 2);
        let e = extract(None, "a.pdf", &truncated, DEFAULT_MAX_BYTES).expect_err("truncated");
        assert!(!e.is_skip(), "{e}");
        let e = extract(None, "a.pdf", b"GIF89a", DEFAULT_MAX_BYTES).expect_err("header");
        assert!(e.to_string().contains("%PDF-"), "{e}");
        let e = extract(None, "blank.md", b"  \n\n", DEFAULT_MAX_BYTES).expect_err("empty");
        assert_eq!(e, ExtractError::Empty("markdown"));
    }

    #[test]
    fn markdown_front_matter_gives_the_title_and_goes() {
        let md = extract(
            None,
            "a.md",
            b"---\ntitle: \"Install guide\"\ntags: [a]\n---\n# Installing\n\nRun it.\n",
            DEFAULT_MAX_BYTES,
        )
        .expect("md");
        assert_eq!(md.title.as_deref(), Some("Install guide"));
        assert_eq!(md.text, "# Installing\n\nRun it.\n");
        assert_eq!(md.headings.len(), 1);
        assert_eq!(
            (md.headings[0].offset, md.headings[0].text.as_str()),
            (0, "Installing")
        );
        let md = extract(
            None,
            "b.md",
            b"intro\n\n# First\n\n## Second\n",
            DEFAULT_MAX_BYTES,
        )
        .expect("md");
        assert_eq!(md.title.as_deref(), Some("First"), "the first # heading");
        let md = extract(None, "c.md", b"---\nnot closed\n", DEFAULT_MAX_BYTES).expect("md");
        assert_eq!(md.text, "---\nnot closed\n");
    }

    #[test]
    fn html_with_broken_utf8_is_read_as_a_browser_would() {
        let html = b"<title>Caf\xe9</title><main><p>cr\xc3\xa8me \xff br\xfbl\xe9e</p></main>";
        let doc = extract(Some("text/html"), "p.html", html, DEFAULT_MAX_BYTES).expect("html");
        assert_eq!(doc.title.as_deref(), Some("Caf\u{fffd}"));
        assert!(doc.text.starts_with("crème \u{fffd} br"), "{:?}", doc.text);
        let e = extract(
            Some("text/html"),
            "e.html",
            b"<nav>only a menu</nav>",
            DEFAULT_MAX_BYTES,
        )
        .expect_err("nothing to read");
        assert_eq!(e, ExtractError::Empty("html"));
    }

    #[test]
    fn invalid_bytes_cannot_make_html_text_longer_than_its_bound() {
        let mut html = b"<main><p>".to_vec();
        for _ in 0..30_000 {
            html.extend(b"a\xFF");
        }
        html.extend(b"</p></main>");
        let doc = extract(Some("text/html"), "p.html", &html, DEFAULT_MAX_BYTES).expect("html");
        assert!(
            doc.text.len() <= html.len() + html::SLACK,
            "{} bytes of text from {}",
            doc.text.len(),
            html.len()
        );
        assert!(doc.truncated && doc.text.starts_with("a\u{fffd}a"));
    }

    #[test]
    fn pdf_pages_lose_numbers_and_running_headers() {
        let pages: Vec<String> = (1..=4)
            .map(|n| {
                format!(
                    "ACME Handbook, chapter 2\n\nBody of page {n} with its own words.\n\
                     More of page {n}.\n\n- {n} -\n"
                )
            })
            .collect();
        let text = pdf_pages(&pages);
        assert!(!text.contains("ACME Handbook"), "{text}");
        assert!(
            !text.contains("- 1 -") && !text.lines().any(|l| l.trim() == "- 3 -"),
            "{text}"
        );
        assert!(
            text.starts_with(
                "Body of page 1 with its own words.\nMore of page 1.\n\nBody of page 2"
            )
        );
        assert!(page_number("Page 3 of 10") && page_number("xiv") && page_number("12"));
        assert!(!page_number("12 apples") && !page_number("Chapter 12"));
        // Fewer than three pages: nothing is taken for a running header.
        assert!(pdf_pages(&pages[..2]).contains("ACME Handbook"));
    }

    #[test]
    fn html_text_is_bounded_by_its_input() {
        for html in [
            "<p>&nbsp;&amp;&lt;</p>".repeat(10_000),
            format!("<table><tr>{}", "<td>x".repeat(100_000)),
            "<h1>a</h1><br><br><p>b</p><li>c".repeat(10_000),
        ] {
            let doc = extract(
                Some("text/html"),
                "x.html",
                html.as_bytes(),
                DEFAULT_MAX_BYTES,
            )
            .expect("html");
            assert!(doc.text.len() <= html.len() + super::html::SLACK);
        }
    }
}
