//! Deterministic synthetic text: documents about a handful of topics, each
//! drawing most words from its topic, so that keyword and vector search
//! have something to find.

use rand::rngs::StdRng;
use rand::seq::IndexedRandom;
use rand::{Rng, SeedableRng};

pub const TOPICS: &[(&str, &[&str])] = &[
    (
        "storage",
        &[
            "bucket",
            "object",
            "multipart",
            "checksum",
            "upload",
            "replica",
            "erasure",
            "durability",
            "prefix",
            "versioning",
            "lifecycle",
            "retention",
        ],
    ),
    (
        "database",
        &[
            "postgres",
            "index",
            "vacuum",
            "replication",
            "transaction",
            "query",
            "planner",
            "backup",
            "schema",
            "migration",
            "lock",
            "tuple",
        ],
    ),
    (
        "network",
        &[
            "latency",
            "packet",
            "router",
            "firewall",
            "dns",
            "tls",
            "certificate",
            "bandwidth",
            "gateway",
            "proxy",
            "socket",
            "handshake",
        ],
    ),
    (
        "kitchen",
        &[
            "flour", "butter", "oven", "recipe", "simmer", "garlic", "onion", "dough", "sauce",
            "pepper", "roast", "bake",
        ],
    ),
    (
        "garden",
        &[
            "soil", "compost", "seedling", "prune", "harvest", "tomato", "mulch", "water", "frost",
            "rose", "weed", "bloom",
        ],
    ),
    (
        "finance",
        &[
            "invoice", "budget", "ledger", "expense", "payment", "audit", "forecast", "revenue",
            "tax", "receipt", "approval", "quarter",
        ],
    ),
    (
        "travel",
        &[
            "train",
            "ticket",
            "hotel",
            "passport",
            "airport",
            "luggage",
            "itinerary",
            "museum",
            "harbour",
            "map",
            "border",
            "journey",
        ],
    ),
    (
        "music",
        &[
            "melody",
            "chord",
            "rhythm",
            "guitar",
            "piano",
            "tempo",
            "harmony",
            "concert",
            "lyrics",
            "drum",
            "scale",
            "rehearsal",
        ],
    ),
];

const COMMON: &[&str] = &[
    "the", "a", "of", "and", "to", "in", "is", "that", "for", "it", "with", "as", "on", "be",
    "this", "by", "from", "when", "after", "before", "every", "each", "most", "only", "then",
    "should", "must", "can", "will", "keeps", "needs", "makes", "checks", "starts", "stops",
    "team", "week", "plan", "note", "step", "first", "next", "last", "small", "large", "new",
];

pub struct Generator {
    rng: StdRng,
}

impl Generator {
    pub fn new(seed: u64) -> Generator {
        Generator {
            rng: StdRng::seed_from_u64(seed),
        }
    }

    pub fn topic(&mut self) -> usize {
        self.rng.random_range(0..TOPICS.len())
    }

    pub fn sentence(&mut self, topic: usize) -> String {
        let n = self.rng.random_range(8..17);
        let mut words: Vec<&str> = (0..n)
            .map(|_| {
                if self.rng.random_bool(0.4) {
                    *TOPICS[topic].1.choose(&mut self.rng).unwrap_or(&"note")
                } else {
                    *COMMON.choose(&mut self.rng).unwrap_or(&"the")
                }
            })
            .collect();
        let mut first = words[0].to_string();
        if let Some(c) = first.get_mut(0..1) {
            c.make_ascii_uppercase();
        }
        words[0] = &first;
        format!("{}.", words.join(" "))
    }

    /// A paragraph of `sentences` sentences.
    pub fn paragraph(&mut self, topic: usize, sentences: usize) -> String {
        (0..sentences)
            .map(|_| self.sentence(topic))
            .collect::<Vec<_>>()
            .join(" ")
    }

    /// A Markdown document: a title and 3–7 sections of one paragraph.
    pub fn document(&mut self, title: &str) -> String {
        let topic = self.topic();
        let mut doc = format!("# {title}: {}\n\n", TOPICS[topic].0);
        for s in 0..self.rng.random_range(3..8) {
            let sentences = self.rng.random_range(3..7);
            doc.push_str(&format!(
                "## Section {}\n\n{}\n\n",
                s + 1,
                self.paragraph(topic, sentences)
            ));
        }
        doc
    }

    /// A chunk-sized text (≈ 100–200 tokens).
    pub fn chunk(&mut self) -> (usize, String) {
        let topic = self.topic();
        let sentences = self.rng.random_range(6..11);
        (topic, self.paragraph(topic, sentences))
    }

    pub fn unit(&mut self, dims: usize) -> Vec<f32> {
        normalize(
            (0..dims)
                .map(|_| self.rng.random_range(-1.0..1.0))
                .collect(),
        )
    }

    /// `center` moved by `noise` in a random direction, normalised.
    pub fn near(&mut self, center: &[f32], noise: f32) -> Vec<f32> {
        normalize(
            center
                .iter()
                .map(|c| c + noise * self.rng.random_range(-1.0f32..1.0))
                .collect(),
        )
    }

    pub fn words(&mut self, topic: usize, n: usize) -> String {
        (0..n)
            .map(|_| *TOPICS[topic].1.choose(&mut self.rng).unwrap_or(&"note"))
            .collect::<Vec<_>>()
            .join(" ")
    }
}

fn normalize(mut v: Vec<f32>) -> Vec<f32> {
    let n = v.iter().map(|x| x * x).sum::<f32>().sqrt();
    if n > 0.0 {
        v.iter_mut().for_each(|x| *x /= n);
    }
    v
}
