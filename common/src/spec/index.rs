//! The IndexCollection specification: what to index and how, as the
//! operator's custom resource, the planner and the indexer agree on it.

use serde::{Deserialize, Serialize};

use super::{
    Endpoint, MAX_PREFIX_CHARS, SecretRef, SpecError, invalid, validate_bucket, validate_chars,
    validate_endpoint, validate_secret_name, validate_url,
};

/// Most include or exclude patterns a collection may list.
pub const MAX_PATTERNS: usize = 100;
/// Longest glob pattern, in characters.
pub const MAX_PATTERN_CHARS: usize = 1024;
/// Chunk size bounds, in characters.
pub const MIN_CHUNK_SIZE: u32 = 64;
pub const MAX_CHUNK_SIZE: u32 = 32_768;
pub const MAX_CHUNK_OVERLAP: u32 = 16_384;
/// Embedding dimensions bounds (pgvector's HNSW indexes up to 16,000).
pub const MAX_DIMENSIONS: u32 = 16_000;
pub const MAX_MODEL_CHARS: usize = 256;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase")]
pub struct IndexSpec {
    pub source: IndexSource,
    /// Index objects as UploadJobs land them, within seconds, instead of
    /// waiting for the next resync.
    #[serde(default)]
    pub watch_uploads: bool,
    #[serde(default)]
    pub chunking: Chunking,
    #[serde(default)]
    pub embedding: Embedding,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase")]
pub struct IndexSource {
    #[cfg_attr(feature = "schema", schemars(length(min = 3, max = 63)))]
    pub bucket: String,
    #[serde(default)]
    #[cfg_attr(feature = "schema", schemars(length(max = MAX_PREFIX_CHARS)))]
    pub prefix: String,
    /// Glob patterns (relative to the prefix) an object must match; empty
    /// means every object.
    #[serde(default)]
    #[cfg_attr(
        feature = "schema",
        schemars(length(max = MAX_PATTERNS), inner(length(min = 1, max = MAX_PATTERN_CHARS)))
    )]
    pub include: Vec<String>,
    /// Glob patterns of objects to leave out, applied after `include`.
    #[serde(default)]
    #[cfg_attr(
        feature = "schema",
        schemars(length(max = MAX_PATTERNS), inner(length(min = 1, max = MAX_PATTERN_CHARS)))
    )]
    pub exclude: Vec<String>,
    #[serde(flatten)]
    pub endpoint: Endpoint,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase")]
pub enum ChunkingStrategy {
    /// Split on paragraphs, then lines, then sentences, then words.
    Recursive,
    /// Like `recursive`, but Markdown headings and blocks come first, and
    /// each chunk records its heading path.
    #[default]
    Markdown,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[cfg_attr(
    feature = "schema",
    schemars(extend("x-kubernetes-validations" = [{
        "rule": "self.overlap < self.size",
        "message": "chunking.overlap must be smaller than chunking.size"
    }]))
)]
#[serde(rename_all = "camelCase", default)]
pub struct Chunking {
    pub strategy: ChunkingStrategy,
    /// Largest chunk, in characters.
    #[cfg_attr(feature = "schema", schemars(range(min = MIN_CHUNK_SIZE, max = MAX_CHUNK_SIZE)))]
    pub size: u32,
    /// Characters shared by consecutive chunks.
    #[cfg_attr(feature = "schema", schemars(range(max = MAX_CHUNK_OVERLAP)))]
    pub overlap: u32,
}

impl Default for Chunking {
    fn default() -> Self {
        Chunking {
            strategy: ChunkingStrategy::default(),
            size: 1000,
            overlap: 100,
        }
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase")]
pub enum EmbeddingProvider {
    /// The model shipped with the worker (all-MiniLM-L6-v2); no network.
    #[default]
    Builtin,
    /// An OpenAI-compatible `/v1/embeddings` endpoint.
    Openai,
    /// Ollama's `/api/embed`.
    Ollama,
    /// Hugging Face Text Embeddings Inference's `/embed`.
    Tei,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[cfg_attr(
    feature = "schema",
    schemars(extend("x-kubernetes-validations" = [{
        "rule": "self.provider == 'builtin' || has(self.endpoint)",
        "message": "embedding.endpoint is required for remote providers"
    }]))
)]
#[serde(rename_all = "camelCase", default)]
pub struct Embedding {
    pub provider: EmbeddingProvider,
    #[cfg_attr(feature = "schema", schemars(length(min = 1, max = MAX_MODEL_CHARS)))]
    pub model: String,
    #[cfg_attr(feature = "schema", schemars(range(min = 1, max = MAX_DIMENSIONS)))]
    pub dimensions: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "schema", schemars(length(min = 1, max = super::MAX_URL_CHARS)))]
    pub endpoint: Option<String>,
    /// Secret holding the provider's API key (`api_key`), in the
    /// collection's own namespace.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub credentials_secret_ref: Option<SecretRef>,
    /// Allow the endpoint to be a loopback, private or link-local address:
    /// only where the installation permits it (`--allow-private-networks`).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub allow_private_networks: bool,
}

impl Default for Embedding {
    fn default() -> Self {
        Embedding {
            provider: EmbeddingProvider::Builtin,
            model: "all-MiniLM-L6-v2".into(),
            dimensions: 384,
            endpoint: None,
            credentials_secret_ref: None,
            allow_private_networks: false,
        }
    }
}

impl Embedding {
    /// What identifies an embedding generation: changing any of it builds a
    /// new index beside the old one.
    pub fn generation_key(&self) -> String {
        format!("{:?}/{}/{}", self.provider, self.model, self.dimensions).to_lowercase()
    }
}

impl IndexSpec {
    /// The fields of this spec that ask for private networks.
    /// The fields that ask for the processes' own S3 credentials.
    pub fn worker_credentials(&self) -> Vec<&'static str> {
        if self.source.endpoint.use_worker_credentials {
            vec!["source.useWorkerCredentials"]
        } else {
            Vec::new()
        }
    }

    pub fn private_networks(&self) -> Vec<&'static str> {
        let mut out = Vec::new();
        if self.source.endpoint.allow_private_networks {
            out.push("source.allowPrivateNetworks");
        }
        if self.embedding.allow_private_networks {
            out.push("embedding.allowPrivateNetworks");
        }
        out
    }

    /// What the schema cannot check, with the field named.
    pub fn validate(&self) -> Result<(), SpecError> {
        validate_bucket("source.bucket", &self.source.bucket)?;
        validate_endpoint("source.endpoint", &self.source.endpoint)?;
        validate_chars("source.prefix", &self.source.prefix, MAX_PREFIX_CHARS)?;
        for (field, patterns) in [
            ("source.include", &self.source.include),
            ("source.exclude", &self.source.exclude),
        ] {
            if patterns.len() > MAX_PATTERNS {
                return Err(invalid(
                    field,
                    format!("{} patterns; at most {MAX_PATTERNS}", patterns.len()),
                ));
            }
            for (i, p) in patterns.iter().enumerate() {
                if p.is_empty() || p.chars().count() > MAX_PATTERN_CHARS {
                    return Err(invalid(
                        format!("{field}[{i}]"),
                        format!("a pattern has 1 to {MAX_PATTERN_CHARS} characters"),
                    ));
                }
            }
        }
        if let Err(e) = super::select::Selector::new(&self.source) {
            return Err(invalid(
                e.field,
                format!("{:?} is not a valid glob: {}", e.pattern, e.message),
            ));
        }
        let c = &self.chunking;
        if !(MIN_CHUNK_SIZE..=MAX_CHUNK_SIZE).contains(&c.size) || c.overlap >= c.size {
            return Err(invalid(
                "chunking",
                format!(
                    "size {} must be within [{MIN_CHUNK_SIZE}, {MAX_CHUNK_SIZE}] and overlap {} \
                     smaller than size",
                    c.size, c.overlap
                ),
            ));
        }
        let e = &self.embedding;
        if e.model.is_empty()
            || e.model.chars().count() > MAX_MODEL_CHARS
            || !(1..=MAX_DIMENSIONS).contains(&e.dimensions)
        {
            return Err(invalid(
                "embedding",
                format!(
                    "model must have 1 to {MAX_MODEL_CHARS} characters and dimensions be \
                     within [1, {MAX_DIMENSIONS}]"
                ),
            ));
        }
        if let Some(r) = &e.credentials_secret_ref {
            validate_secret_name("embedding", &r.name)?;
        }
        match (e.provider, &e.endpoint) {
            (EmbeddingProvider::Builtin, _) if e.dimensions != 384 => {
                return Err(invalid(
                    "embedding.dimensions",
                    format!("the builtin model has 384 dimensions, not {}", e.dimensions),
                ));
            }
            (EmbeddingProvider::Builtin, _) => {}
            (_, None) => {
                return Err(invalid(
                    "embedding.endpoint",
                    "required for the openai, ollama and tei providers",
                ));
            }
            (_, Some(url)) => {
                validate_url("embedding.endpoint", url)?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(extra: serde_json::Value) -> IndexSpec {
        let mut v = serde_json::json!({"source": {"bucket": "docs", "prefix": "kb/"}});
        if let (Some(o), Some(e)) = (v.as_object_mut(), extra.as_object()) {
            o.extend(e.clone());
        }
        serde_json::from_value(v).expect("fixture parses")
    }

    #[test]
    fn defaults_use_the_builtin_model() {
        let s = spec(serde_json::json!({}));
        assert_eq!(s.embedding.dimensions, 384);
        assert_eq!(s.chunking.size, 1000);
        assert_eq!(s.validate(), Ok(()));
        assert_eq!(s.embedding.generation_key(), "builtin/all-minilm-l6-v2/384");
    }

    #[test]
    fn rejects_what_the_schema_cannot_judge() {
        let s = spec(
            serde_json::json!({"embedding": {"provider": "openai", "model": "m", "dimensions": 8}}),
        );
        assert!(
            s.validate()
                .expect_err("no endpoint")
                .to_string()
                .starts_with("embedding.endpoint:")
        );
        let s = spec(serde_json::json!({"chunking": {"size": 100, "overlap": 100}}));
        assert!(
            s.validate()
                .expect_err("overlap")
                .to_string()
                .starts_with("chunking:")
        );
        let s = spec(serde_json::json!({"source": {"bucket": "docs", "include": ["a[b"]}}));
        assert!(
            s.validate().expect_err("glob").to_string().starts_with(
                "source.include: \"a[b\" is not a valid glob: unclosed character class"
            )
        );
        let s = spec(serde_json::json!({"embedding": {"dimensions": 768}}));
        assert!(
            s.validate()
                .expect_err("dims")
                .to_string()
                .contains("384 dimensions")
        );
    }
}
