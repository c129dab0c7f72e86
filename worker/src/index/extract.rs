//! Text extraction: plain text, Markdown, HTML and PDF, chosen by the
//! object's content type or, failing that, its key's extension. Other types
//! are skipped with the reason; a file larger than the limit is skipped; a
//! malformed file fails with what is wrong with it.

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
    let text = match format {
        Format::Plain | Format::Markdown => utf8(format, bytes)?.to_string(),
        Format::Html => html2text::config::plain_no_decorate()
            .string_from_read(utf8(format, bytes)?.as_bytes(), usize::MAX / 2)
            .map_err(|e| malformed(format, e.to_string()))?,
        Format::Pdf => pdf(bytes)?,
    };
    if text.trim().is_empty() {
        return Err(ExtractError::Empty(format.as_str()));
    }
    Ok(Extracted { format, text })
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
    match std::panic::catch_unwind(|| pdf_extract::extract_text_from_mem(bytes)) {
        Ok(Ok(text)) => Ok(text),
        Ok(Err(e)) => Err(malformed(Format::Pdf, e.to_string())),
        Err(_) => Err(malformed(
            Format::Pdf,
            "the PDF parser could not read it".into(),
        )),
    }
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
}
