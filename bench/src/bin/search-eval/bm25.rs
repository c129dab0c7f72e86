//! The plain baseline: BM25 (k1 1.2, b 0.75) over whole pages, in process.
//! "Plain" on purpose: the page's text with tags stripped (scripts and
//! styles dropped), lower-cased alphanumeric tokens, a short English stop
//! list, no stemming, no fields, no chunks — what a simple search box over
//! the files would do.

use std::collections::HashMap;

const K1: f64 = 1.2;
const B: f64 = 0.75;

const STOP: &[&str] = &[
    "a", "an", "and", "are", "as", "at", "be", "but", "by", "can", "do", "does", "for", "from",
    "how", "i", "if", "in", "into", "is", "it", "its", "my", "no", "not", "of", "on", "or", "so",
    "such", "that", "the", "their", "then", "there", "these", "this", "to", "was", "we", "what",
    "when", "which", "will", "with", "without", "you", "your",
];

pub fn tokens(text: &str) -> Vec<String> {
    text.split(|c: char| !c.is_alphanumeric() && c != '_')
        .filter(|w| !w.is_empty())
        .map(str::to_lowercase)
        .filter(|w| !STOP.contains(&w.as_str()))
        .collect()
}

/// Text of an HTML page: tags out, `<script>`/`<style>` bodies out, a few
/// entities decoded.
pub fn html_text(html: &str) -> String {
    let mut out = String::with_capacity(html.len() / 2);
    let lower = html.to_ascii_lowercase();
    let mut i = 0;
    while i < html.len() {
        if html.as_bytes()[i] == b'<' {
            let skip_to = ["script", "style"].iter().find_map(|tag| {
                lower[i + 1..]
                    .starts_with(tag)
                    .then(|| lower[i..].find(&format!("</{tag}")).map(|e| i + e))
                    .flatten()
            });
            let from = skip_to.unwrap_or(i);
            match lower[from..].find('>') {
                Some(e) => i = from + e + 1,
                None => break,
            }
            out.push(' ');
        } else {
            let next = html[i..].find('<').map_or(html.len(), |e| i + e);
            out.push_str(&html[i..next]);
            i = next;
        }
    }
    out.replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&quot;", "\"")
        .replace("&nbsp;", " ")
        .replace("&#160;", " ")
        .replace("&amp;", "&")
}

pub struct Index {
    names: Vec<String>,
    lengths: Vec<f64>,
    avg: f64,
    postings: HashMap<String, Vec<(usize, u32)>>,
}

impl Index {
    pub fn new(pages: &[(String, String)]) -> Index {
        let mut postings: HashMap<String, Vec<(usize, u32)>> = HashMap::new();
        let mut lengths = Vec::with_capacity(pages.len());
        for (i, (_, text)) in pages.iter().enumerate() {
            let toks = tokens(text);
            lengths.push(toks.len() as f64);
            let mut tf: HashMap<String, u32> = HashMap::new();
            for t in toks {
                *tf.entry(t).or_default() += 1;
            }
            for (t, n) in tf {
                postings.entry(t).or_default().push((i, n));
            }
        }
        let avg = lengths.iter().sum::<f64>() / lengths.len().max(1) as f64;
        Index {
            names: pages.iter().map(|(n, _)| n.clone()).collect(),
            lengths,
            avg,
            postings,
        }
    }

    /// The page names, best first, at most `k`.
    pub fn search(&self, query: &str, k: usize) -> Vec<&str> {
        let n = self.names.len() as f64;
        let mut scores = vec![0.0f64; self.names.len()];
        let mut terms = tokens(query);
        terms.sort();
        terms.dedup();
        for t in terms {
            let Some(list) = self.postings.get(&t) else {
                continue;
            };
            let df = list.len() as f64;
            let idf = (1.0 + (n - df + 0.5) / (df + 0.5)).ln();
            for &(doc, tf) in list {
                let tf = f64::from(tf);
                let norm = 1.0 - B + B * self.lengths[doc] / self.avg;
                scores[doc] += idf * tf * (K1 + 1.0) / (tf + K1 * norm);
            }
        }
        let mut order: Vec<usize> = (0..scores.len()).filter(|&i| scores[i] > 0.0).collect();
        order.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]).then(a.cmp(&b)));
        order
            .into_iter()
            .take(k)
            .map(|i| self.names[i].as_str())
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strips_tags_scripts_and_ranks_the_rarer_term_first() {
        let t = html_text("<p>a&amp;b</p><script>var x = 1;</script><style>p{}</style>c");
        assert_eq!(tokens(&t), ["b", "c"]);
        let pages = vec![
            ("one".to_string(), "vacuum vacuum table".to_string()),
            ("two".to_string(), "table table index".to_string()),
            ("three".to_string(), "table other".to_string()),
        ];
        let idx = Index::new(&pages);
        assert_eq!(idx.search("vacuum table", 3)[0], "one");
        assert_eq!(idx.search("index", 3), ["two"]);
    }
}
