//! The built-in model on ONNX Runtime, through the `ort` crate.
//!
//! Nothing of ONNX Runtime is linked or downloaded at build time: its shared
//! library (`libonnxruntime.so`, the one the PyPI `onnxruntime` wheel ships;
//! `scripts/stack install onnx` installs it, the worker image carries it) is
//! opened at run time from a path the worker is given (`--onnx-runtime-path`,
//! env `ORT_DYLIB_PATH`). The graph is built from the model's own weights by
//! `scripts/model/build_onnx.py` into a folder holding `model.onnx` (fp32),
//! `model_int8.onnx` (dynamic per-channel int8) and `tokenizer.json`; it takes
//! int64 `input_ids`, `attention_mask`, `token_type_ids` `[batch, sequence]`
//! (right-padded) and gives `sentence_embedding` `[batch, 384]`, mean-pooled
//! and L2-normalised.
//!
//! One session per process, behind a lock: its intra-op thread pool already
//! uses every CPU the pod has, so two forward passes at once would only take
//! turns. Its threads do not spin waiting for work (ONNX Runtime's default):
//! between batches the worker has uploads and extraction to run on the same
//! cores.

use std::path::{Path, PathBuf};
use std::sync::{Mutex, PoisonError};

use ort::environment::Environment;
use ort::session::Session;
use ort::session::builder::GraphOptimizationLevel;
use ort::value::Tensor;

use super::EmbedError;
use super::builtin::DIMENSIONS;

/// Which of the folder's graphs runs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Precision {
    /// `model.onnx`: the model's own fp32 weights; the same vectors as the
    /// reference implementation.
    #[default]
    Fp32,
    /// `model_int8.onnx`: weights quantised to int8 per output channel,
    /// activations quantised per batch. About twice as fast as fp32; its
    /// vectors differ slightly from fp32's (bench/README.md has the measured
    /// agreement), so a collection must not mix the two.
    Int8,
}

impl Precision {
    pub fn file_name(self) -> &'static str {
        match self {
            Precision::Fp32 => "model.onnx",
            Precision::Int8 => "model_int8.onnx",
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Precision::Fp32 => "fp32",
            Precision::Int8 => "int8",
        }
    }
}

/// Where ONNX Runtime and the graph are, and how to run them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OnnxOptions {
    /// `libonnxruntime.so` (e.g. `libonnxruntime.so.1.32.0`).
    pub runtime: PathBuf,
    /// Folder with `model.onnx`, `model_int8.onnx` and `tokenizer.json`.
    pub dir: PathBuf,
    pub precision: Precision,
    /// Intra-op threads; 0 means one per CPU this process may use.
    pub threads: usize,
}

impl OnnxOptions {
    /// The graph file these options select.
    pub fn graph(&self) -> PathBuf {
        self.dir.join(self.precision.file_name())
    }

    /// The thread count the session gets.
    pub fn effective_threads(&self) -> usize {
        if self.threads > 0 {
            self.threads
        } else {
            available_cpus()
        }
    }
}

/// CPUs this process may use: the scheduler affinity mask and the cgroup
/// CPU quota (a pod's `resources.limits.cpu`, rounded down, at least 1), as
/// `std::thread::available_parallelism` computes them.
pub fn available_cpus() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// The one ONNX Runtime environment of this process and the library it was
/// opened from: ONNX Runtime allows one environment per process, and `ort`
/// opens one library per process.
static ENVIRONMENT: Mutex<Option<(PathBuf, Environment)>> = Mutex::new(None);

fn environment(runtime: &Path) -> Result<Environment, String> {
    // A missing file is the common mistake: say so before dlopen does.
    if !runtime.is_file() {
        return Err(format!(
            "ONNX Runtime library {} does not exist (--onnx-runtime-path, ORT_DYLIB_PATH; \
             `scripts/stack install onnx` installs it)",
            runtime.display()
        ));
    }
    let mut slot = ENVIRONMENT.lock().unwrap_or_else(PoisonError::into_inner);
    if let Some((loaded, env)) = slot.as_ref() {
        if loaded != runtime {
            return Err(format!(
                "ONNX Runtime is already loaded from {} in this process; cannot open {}",
                loaded.display(),
                runtime.display()
            ));
        }
        return Ok(env.clone());
    }
    let env = ort::init_from(runtime)
        .map_err(|e| format!("opening ONNX Runtime: {e}"))?
        .with_name("stowage-embed")
        .build()
        .map_err(|e| format!("starting ONNX Runtime: {e}"))?;
    *slot = Some((runtime.to_path_buf(), env.clone()));
    Ok(env)
}

/// The input names the graph must have, in the order `forward` passes them.
const INPUTS: [&str; 3] = ["input_ids", "attention_mask", "token_type_ids"];
const OUTPUT: &str = "sentence_embedding";

/// One ONNX Runtime session of the graph.
pub(super) struct OnnxBert {
    session: Mutex<Session>,
    threads: usize,
}

impl OnnxBert {
    pub(super) fn load(options: &OnnxOptions) -> Result<OnnxBert, EmbedError> {
        let graph = options.graph();
        let fail = |reason: String| EmbedError::Load {
            path: graph.display().to_string(),
            reason,
        };
        if !graph.is_file() {
            return Err(fail(format!(
                "no {} in {} (`scripts/stack install onnx` builds it; \
                 scripts/model/build_onnx.py)",
                options.precision.file_name(),
                options.dir.display()
            )));
        }
        let env = environment(&options.runtime).map_err(fail)?;
        let threads = options.effective_threads();
        let session = Session::builder(&env)
            .and_then(|b| {
                b.with_optimization_level(GraphOptimizationLevel::All)
                    .map_err(Into::into)
            })
            .and_then(|b| b.with_intra_threads(threads).map_err(Into::into))
            .and_then(|b| b.with_inter_threads(1).map_err(Into::into))
            .and_then(|b| b.with_intra_op_spinning(false).map_err(Into::into))
            .and_then(|b| b.with_inter_op_spinning(false).map_err(Into::into))
            .and_then(|mut b| b.commit_from_file(&graph))
            .map_err(|e| fail(format!("creating the session: {e}")))?;
        let inputs: Vec<&str> = session.inputs().iter().map(|i| i.name()).collect();
        let outputs: Vec<&str> = session.outputs().iter().map(|o| o.name()).collect();
        if INPUTS.iter().any(|want| !inputs.contains(want)) || !outputs.contains(&OUTPUT) {
            return Err(fail(format!(
                "the graph takes {inputs:?} and gives {outputs:?}; expected {INPUTS:?} → {OUTPUT}"
            )));
        }
        Ok(OnnxBert {
            session: Mutex::new(session),
            threads,
        })
    }

    pub(super) fn threads(&self) -> usize {
        self.threads
    }

    /// `sentence_embedding` of one right-padded batch: `ids`, `mask`, `types`
    /// are `rows × width`, row-major.
    pub(super) fn forward(
        &self,
        rows: usize,
        width: usize,
        ids: Vec<i64>,
        mask: Vec<i64>,
        types: Vec<i64>,
    ) -> Result<Vec<Vec<f32>>, String> {
        let shape = [rows, width];
        let tensor = |data: Vec<i64>| Tensor::from_array((shape, data)).map_err(|e| e.to_string());
        let (ids, mask, types) = (tensor(ids)?, tensor(mask)?, tensor(types)?);
        // A panic while the lock was held (turned into an error by the
        // batcher) leaves the session itself intact: keep using it.
        let mut session = self.session.lock().unwrap_or_else(PoisonError::into_inner);
        let outputs = session
            .run(ort::inputs![INPUTS[0] => ids, INPUTS[1] => mask, INPUTS[2] => types])
            .map_err(|e| format!("running the graph: {e}"))?;
        let (got, values) = outputs[OUTPUT]
            .try_extract_tensor::<f32>()
            .map_err(|e| format!("reading {OUTPUT}: {e}"))?;
        let dims: &[i64] = got;
        if dims != [rows as i64, DIMENSIONS as i64] {
            return Err(format!(
                "{OUTPUT} has shape {dims:?}, expected [{rows}, {DIMENSIONS}]"
            ));
        }
        Ok(values
            .chunks_exact(DIMENSIONS)
            .map(<[f32]>::to_vec)
            .collect())
    }
}
