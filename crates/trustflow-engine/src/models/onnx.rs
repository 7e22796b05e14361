//! ONNX Runtime models: the process-wide environment, loaded once from the library that
//! `ORT_DYLIB_PATH` names (`scripts/setup.sh` exports it), and [`OnnxModel`], one session
//! per model file, checked against what the stage feeds it and reads from it.
//!
//! **One session, shared behind a mutex.** In ort 2.0.0-rc.15 `Session::run` takes
//! `&mut self` (some execution providers' allocators are not thread safe), so a model
//! shared by a stage's workers holds its session in a [`Mutex`]. Only the ONNX call is
//! serialised: decoding, preprocessing and tokenisation run outside the lock, so the
//! workers of a stage overlap them with inference. A session per worker would multiply
//! the weights in memory and the intra-op thread pools; parallelism inside one call
//! comes from `intra_op_threads` instead.
//!
//! Everything here happens at plan time (when the stage is built): a missing file, a
//! file that is not ONNX, inputs or outputs that do not match, or an execution provider
//! that is not available all stop the run before any data is read, with the file named.

use std::borrow::Cow;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};

use ort::environment::Environment;
use ort::ep::ExecutionProvider as _;
use ort::session::{Session, SessionInputValue};
use ort::value::{Outlet, Tensor, TensorElementType, ValueType};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// Where a model runs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum ExecutionProviderName {
    /// ONNX Runtime's CPU execution provider (always available).
    #[default]
    Cpu,
    /// NVIDIA CUDA. Needs an ONNX Runtime library built with CUDA (e.g. from the
    /// `onnxruntime-gpu` wheel) and a GPU; otherwise the stage fails at start-up, unless
    /// `fallback: cpu` is set.
    Cuda,
}

impl ExecutionProviderName {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Cpu => "cpu",
            Self::Cuda => "cuda",
        }
    }
}

/// What to do when the requested execution provider is not available.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Fallback {
    /// Fail at start-up, naming the provider (default: never fall back silently).
    #[default]
    None,
    /// Run on the CPU instead, with a warning in the log.
    Cpu,
}

/// How to open a model's sessions: the ONNX Runtime settings every model stage takes,
/// flattened into its config (a pipeline writes `execution_provider: cuda` directly
/// under the stage).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct SessionConfig {
    /// ONNX Runtime threads inside one operator, per model. Default 1 (scale with
    /// `workers` instead); 0 lets ONNX Runtime use one per core.
    #[serde(default = "one")]
    #[schemars(range(max = 256))]
    pub intra_op_threads: usize,
    /// Where the models run: `cpu` (default) or `cuda`.
    #[serde(default)]
    pub execution_provider: ExecutionProviderName,
    /// When the execution provider is not available: `none` (default) fails at start-up;
    /// `cpu` runs on the CPU instead and logs a warning.
    #[serde(default)]
    pub fallback: Fallback,
    /// ONNX Runtime sessions per model (1 to 16). With 1 (default) the stage's workers
    /// take turns on each model; with `sessions: workers`, several calls of the same
    /// model run at once (what a model-bound stage needs on a multi-core CPU), at the
    /// cost of the model's weights in memory once per session.
    #[serde(default = "one")]
    #[schemars(range(min = 1, max = 16))]
    pub sessions: usize,
    /// With `execution_provider: cuda`: let matrix products and convolutions use
    /// TensorFloat-32 (faster on Ampere and later GPUs, about 1e-3 relative error).
    /// Default false: CUDA outputs then agree with the CPU's to float32 rounding.
    #[serde(default)]
    pub tf32: bool,
}

fn one() -> usize {
    1
}

impl Default for SessionConfig {
    fn default() -> Self {
        Self {
            intra_op_threads: 1,
            sessions: 1,
            execution_provider: ExecutionProviderName::Cpu,
            fallback: Fallback::None,
            tf32: false,
        }
    }
}

impl SessionConfig {
    /// Problems with these settings, as (field, message); empty when valid.
    pub fn validate(&self) -> Vec<(String, String)> {
        let mut problems = Vec::new();
        if self.intra_op_threads > 256 {
            problems.push((
                "intra_op_threads".to_string(),
                format!("expected 0 to 256 threads, found {}", self.intra_op_threads),
            ));
        }
        if !(1..=16).contains(&self.sessions) {
            problems.push((
                "sessions".to_string(),
                format!("must lie in [1, 16], got {}", self.sessions),
            ));
        }
        problems
    }
}

static ENVIRONMENT: OnceLock<std::result::Result<Environment, String>> = OnceLock::new();

/// The process-wide ONNX Runtime environment, created on first use from the library at
/// `ORT_DYLIB_PATH`. ort allows one environment per process, so every model shares it.
pub fn environment() -> Result<Environment> {
    ENVIRONMENT
        .get_or_init(init_environment)
        .clone()
        .map_err(Error::Environment)
}

fn init_environment() -> std::result::Result<Environment, String> {
    let Some(path) = std::env::var_os("ORT_DYLIB_PATH") else {
        return Err(
            "ONNX Runtime is not set up: ORT_DYLIB_PATH is not set; it must name \
                    libonnxruntime.so (version 1.31 or later). `source scripts/setup.sh` \
                    installs it and sets the variable"
                .to_string(),
        );
    };
    let path = PathBuf::from(path);
    if !path.is_file() {
        return Err(format!(
            "ONNX Runtime library not found: ORT_DYLIB_PATH={} is not a file \
             (`source scripts/setup.sh` installs it)",
            path.display()
        ));
    }
    let builder = ort::init_from(&path).map_err(|e| {
        format!(
            "cannot load ONNX Runtime from ORT_DYLIB_PATH={}: {e}",
            path.display()
        )
    })?;
    builder
        .with_name("trustflow")
        .with_telemetry(false)
        .build()
        .map_err(|e| {
            format!(
                "cannot create the ONNX Runtime environment ({}): {e}",
                path.display()
            )
        })
}

/// A tensor a stage feeds to or reads from a model, for the start-up check. The name
/// is a fixed one (`input_ids`) or one the pipeline file sets (an output's name).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorSpec {
    pub name: Cow<'static, str>,
    pub element: TensorElementType,
    /// Expected rank.
    pub rank: usize,
}

impl TensorSpec {
    pub fn new(
        name: impl Into<Cow<'static, str>>,
        element: TensorElementType,
        rank: usize,
    ) -> Self {
        Self {
            name: name.into(),
            element,
            rank,
        }
    }
}

/// Input data for [`OnnxModel::run`], row-major.
#[derive(Debug, Clone, PartialEq)]
pub enum InputTensor {
    F32 { shape: Vec<usize>, data: Vec<f32> },
    I64 { shape: Vec<usize>, data: Vec<i64> },
}

/// A float output of [`OnnxModel::run`], row-major.
#[derive(Debug, Clone, PartialEq)]
pub struct OutputTensor {
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
}

/// One ONNX model loaded into one session.
#[derive(Debug)]
pub struct OnnxModel {
    path: PathBuf,
    /// One or more sessions of the same file (`SessionConfig::sessions`).
    sessions: Vec<Mutex<Session>>,
    /// Where the next call starts looking for a free session.
    next: std::sync::atomic::AtomicUsize,
    provider: ExecutionProviderName,
}

impl OnnxModel {
    /// Load `path` with `config`. Errors name the file: missing, not a readable ONNX
    /// model, or an execution provider that is not available (unless `fallback: cpu`).
    pub fn load(path: &Path, config: &SessionConfig) -> Result<Self> {
        let meta = std::fs::metadata(path)
            .map_err(|e| Error::input(path, format!("cannot open the ONNX model: {e}")))?;
        if !meta.is_file() {
            return Err(Error::input(path, "is not a file (expected an ONNX model)"));
        }
        let env = environment()?;
        let wrap = |what: &str, e: &dyn std::fmt::Display| {
            Error::input(path, format!("cannot {what}: {e}"))
        };
        let mut builder = Session::builder(&env).map_err(|e| wrap("create a session", &e))?;
        builder = builder
            .with_intra_threads(config.intra_op_threads)
            .map_err(|e| wrap("set intra_op_threads", &e))?
            .with_inter_threads(1)
            .map_err(|e| wrap("set inter-op threads", &e))?;
        let provider = match config.execution_provider {
            ExecutionProviderName::Cpu => ExecutionProviderName::Cpu,
            ExecutionProviderName::Cuda => {
                let registered = match ort::ep::CUDA::is_available() {
                    Ok(true) => {
                        // Explicit either way: ONNX Runtime's own default has changed
                        // between releases.
                        let cuda = ort::ep::CUDA::default()
                            .with_tf32(config.tf32)
                            .build()
                            .error_on_failure();
                        match builder.with_execution_providers([cuda]) {
                            Ok(b) => {
                                builder = b;
                                Ok(())
                            }
                            Err(e) => {
                                let message = e.to_string();
                                builder = e.recover();
                                Err(format!("registering CUDA failed: {message}"))
                            }
                        }
                    }
                    Ok(false) => Err(
                        "the ONNX Runtime library in use has no CUDA execution provider \
                         (a CPU-only build; use an onnxruntime-gpu build and a machine with \
                         a GPU)"
                            .to_string(),
                    ),
                    Err(e) => Err(format!("cannot list execution providers: {e}")),
                };
                match (registered, config.fallback) {
                    (Ok(()), _) => ExecutionProviderName::Cuda,
                    (Err(reason), Fallback::Cpu) => {
                        tracing::warn!(
                            model = %path.display(),
                            "execution_provider `cuda` is not available ({reason}); \
                             running on CPU because `fallback: cpu` is set"
                        );
                        ExecutionProviderName::Cpu
                    }
                    (Err(reason), Fallback::None) => {
                        return Err(Error::input(
                            path,
                            format!(
                                "execution_provider `cuda` is not available: {reason}. \
                                 Set `fallback: cpu` to run on CPU instead"
                            ),
                        ));
                    }
                }
            }
        };
        let load_err = |e: &dyn std::fmt::Display| {
            Error::input(
                path,
                format!("cannot load as an ONNX model (is it an ONNX file?): {e}"),
            )
        };
        let mut sessions = Vec::with_capacity(config.sessions.max(1));
        // The builder is consumed by a commit: the extra sessions reuse its settings
        // through a clone taken first.
        for _ in 1..config.sessions.max(1) {
            let extra = builder
                .clone()
                .commit_from_file(path)
                .map_err(|e| load_err(&e))?;
            sessions.push(Mutex::new(extra));
        }
        let session = builder.commit_from_file(path).map_err(|e| load_err(&e))?;
        sessions.insert(0, Mutex::new(session));
        tracing::info!(
            model = %path.display(),
            provider = provider.as_str(),
            intra_op_threads = config.intra_op_threads,
            "loaded ONNX model"
        );
        Ok(Self {
            path: path.to_path_buf(),
            sessions,
            next: std::sync::atomic::AtomicUsize::new(0),
            provider,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The execution provider the session actually uses (CPU after a fallback).
    pub fn provider(&self) -> ExecutionProviderName {
        self.provider
    }

    /// Input names in the model's order.
    pub fn input_names(&self) -> Vec<String> {
        self.with_session(|s| s.inputs().iter().map(|o| o.name().to_string()).collect())
    }

    /// Output names in the model's order.
    pub fn output_names(&self) -> Vec<String> {
        self.with_session(|s| s.outputs().iter().map(|o| o.name().to_string()).collect())
    }

    /// The declared shape of an input or output (`-1` for dynamic axes), if it is a tensor.
    pub fn shape_of(&self, name: &str) -> Option<Vec<i64>> {
        self.with_session(|s| {
            s.inputs()
                .iter()
                .chain(s.outputs())
                .find(|o| o.name() == name)
                .and_then(|o| o.dtype().tensor_shape().map(|shape| shape.to_vec()))
        })
    }

    fn with_session<R>(&self, f: impl FnOnce(&Session) -> R) -> R {
        let guard = self.sessions[0]
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        f(&guard)
    }

    /// A free session if there is one (round robin from a moving start), else waits
    /// for the start one.
    fn acquire(&self) -> Result<std::sync::MutexGuard<'_, Session>> {
        let n = self.sessions.len();
        let start = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed) % n;
        for i in 0..n {
            if let Ok(guard) = self.sessions[(start + i) % n].try_lock() {
                return Ok(guard);
            }
        }
        self.sessions[start]
            .lock()
            .map_err(|_| Error::input(&self.path, "session lock poisoned by a panic"))
    }

    /// Check the model against what a stage needs: every `required` input and every
    /// output must exist with the given element type and rank; `optional` inputs are
    /// checked when present; the model must have no other inputs (they could not be fed).
    /// The error names the file (its path) and the mismatch.
    pub fn check(
        &self,
        required: &[TensorSpec],
        optional: &[TensorSpec],
        outputs: &[TensorSpec],
    ) -> Result<()> {
        let problem = self.with_session(|s| {
            let listed = |outlets: &[Outlet]| {
                if outlets.is_empty() {
                    "none".to_string()
                } else {
                    outlets
                        .iter()
                        .map(|o| o.name().to_string())
                        .collect::<Vec<_>>()
                        .join(", ")
                }
            };
            for spec in required {
                match s.inputs().iter().find(|o| o.name() == spec.name.as_ref()) {
                    None => {
                        return Some(format!(
                            "expected an input `{}`, found inputs: {}",
                            spec.name,
                            listed(s.inputs())
                        ));
                    }
                    Some(o) => {
                        if let Some(p) = mismatch("input", spec, o.dtype()) {
                            return Some(p);
                        }
                    }
                }
            }
            for outlet in s.inputs() {
                match optional
                    .iter()
                    .find(|spec| spec.name.as_ref() == outlet.name())
                {
                    Some(spec) => {
                        if let Some(p) = mismatch("input", spec, outlet.dtype()) {
                            return Some(p);
                        }
                    }
                    None if !required
                        .iter()
                        .any(|spec| spec.name.as_ref() == outlet.name()) =>
                    {
                        let known: Vec<&str> = required
                            .iter()
                            .chain(optional)
                            .map(|s| s.name.as_ref())
                            .collect();
                        return Some(format!(
                            "has an input `{}` that this stage cannot feed (it feeds: {})",
                            outlet.name(),
                            known.join(", ")
                        ));
                    }
                    None => {}
                }
            }
            for spec in outputs {
                match s.outputs().iter().find(|o| o.name() == spec.name.as_ref()) {
                    None => {
                        return Some(format!(
                            "expected an output `{}`, found outputs: {}",
                            spec.name,
                            listed(s.outputs())
                        ));
                    }
                    Some(o) => {
                        if let Some(p) = mismatch("output", spec, o.dtype()) {
                            return Some(p);
                        }
                    }
                }
            }
            None
        });
        match problem {
            Some(message) => Err(Error::input(&self.path, message)),
            None => Ok(()),
        }
    }

    /// Run the model on `inputs` and return the float `outputs` named.
    pub fn run(
        &self,
        inputs: Vec<(&str, InputTensor)>,
        outputs: &[&str],
    ) -> Result<Vec<OutputTensor>> {
        let fail =
            |e: &dyn std::fmt::Display| Error::input(&self.path, format!("inference failed: {e}"));
        let mut values: Vec<(String, SessionInputValue<'static>)> =
            Vec::with_capacity(inputs.len());
        for (name, input) in inputs {
            let value: SessionInputValue<'static> = match input {
                InputTensor::F32 { shape, data } => Tensor::from_array((shape, data))
                    .map_err(|e| fail(&e))?
                    .into(),
                InputTensor::I64 { shape, data } => Tensor::from_array((shape, data))
                    .map_err(|e| fail(&e))?
                    .into(),
            };
            values.push((name.to_string(), value));
        }
        let mut session = self.acquire()?;
        let results = session.run(values).map_err(|e| fail(&e))?;
        outputs
            .iter()
            .map(|name| {
                let value = results.get(*name).ok_or_else(|| {
                    Error::input(&self.path, format!("inference gave no output `{name}`"))
                })?;
                let (shape, data) = value
                    .try_extract_tensor::<f32>()
                    .map_err(|e| fail(&format!("output `{name}`: {e}")))?;
                Ok(OutputTensor {
                    shape: shape.iter().map(|&d| d.max(0) as usize).collect(),
                    data: data.to_vec(),
                })
            })
            .collect()
    }
}

/// A type or rank mismatch between a declared outlet and what the stage needs.
fn mismatch(what: &str, spec: &TensorSpec, dtype: &ValueType) -> Option<String> {
    let (Some(element), Some(shape)) = (dtype.tensor_type(), dtype.tensor_shape()) else {
        return Some(format!(
            "{what} `{}` is not a tensor ({dtype}); expected a {}-d {} tensor",
            spec.name, spec.rank, spec.element
        ));
    };
    if element != spec.element {
        return Some(format!(
            "{what} `{}` has element type {element}, expected {}",
            spec.name, spec.element
        ));
    }
    if shape.len() != spec.rank {
        return Some(format!(
            "{what} `{}` has rank {} (shape {:?}), expected rank {}",
            spec.name,
            shape.len(),
            shape.to_vec(),
            spec.rank
        ));
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn provider_names_serialise_in_snake_case() {
        assert_eq!(
            serde_json::to_string(&ExecutionProviderName::Cuda).unwrap(),
            "\"cuda\""
        );
        assert_eq!(
            serde_json::from_str::<Fallback>("\"cpu\"").unwrap(),
            Fallback::Cpu
        );
        assert!(serde_json::from_str::<ExecutionProviderName>("\"gpu\"").is_err());
        assert_eq!(SessionConfig::default().intra_op_threads, 1);
    }

    #[test]
    fn missing_file_is_named() {
        let err = OnnxModel::load(
            Path::new("/nonexistent/dir/model.onnx"),
            &SessionConfig::default(),
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.starts_with("/nonexistent/dir/model.onnx: cannot open the ONNX model"),
            "{err}"
        );
    }
}
