//! `trustflow fit-text`: fits the text head of `pseudo_label`'s `head` kind with
//! libtorch (`tch`) on frozen sentence embeddings: class-weighted cross-entropy, AdamW,
//! gradient clipping at 1.0, a fixed seed. The head itself (reading, writing,
//! inference) lives in the engine, which needs no libtorch; it is re-exported here.

use std::path::{Path, PathBuf};

use rand::SeedableRng;
use rand::seq::SliceRandom;
use rand_chacha::ChaCha8Rng;
use tch::nn::{self, Module, OptimizerConfig};
use tch::{Device, Kind, Tensor};

use trustflow_engine::error::{Error, Result};
use trustflow_engine::models::onnx::SessionConfig;
pub use trustflow_engine::models::text_head::*;

fn to_vec(t: &Tensor) -> Vec<f32> {
    let t = t.to_kind(Kind::Float).contiguous().view([-1]);
    Vec::<f32>::try_from(&t).unwrap_or_default()
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
        return Err(Error::Invalid(format!(
            "cannot fit a head: {rows} rows, {} values, dimension {dim}",
            x.len()
        )));
    }
    if c < 2 || labels.iter().any(|&l| l >= c) {
        return Err(Error::Invalid(format!(
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
    .map_err(|e| Error::Internal(format!("cannot build AdamW: {e}")))?;
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
    TextHead::from_parts(
        meta,
        to_vec(&hidden.ws),
        hidden
            .bs
            .as_ref()
            .map(to_vec)
            .unwrap_or_else(|| vec![0.0; opts.hidden]),
        to_vec(&out.ws),
        out.bs.as_ref().map(to_vec).unwrap_or_else(|| vec![0.0; c]),
    )
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

/// Everything `trustflow fit-text` needs (with the `cli` feature, its flags).
#[derive(Debug, Clone)]
#[cfg_attr(feature = "cli", derive(clap::Args))]
pub struct FitTextOptions {
    /// Parquet shards with captions and labels.
    #[cfg_attr(
        feature = "cli",
        arg(long, required = true, num_args = 1.., value_name = "SHARD")
    )]
    pub train: Vec<PathBuf>,
    /// The head file to write (safetensors; the sidecar `<file>.json` goes beside it).
    #[cfg_attr(feature = "cli", arg(long, value_name = "HEAD_FILE"))]
    pub out: PathBuf,
    /// Caption column. Default: `caption_clean` when present, else `caption`.
    #[cfg_attr(feature = "cli", arg(long))]
    pub caption_column: Option<String>,
    /// Integer label column.
    #[cfg_attr(feature = "cli", arg(long, default_value = "label"))]
    pub label_column: String,
    /// Keep only rows where COLUMN (compared as text) equals VALUE, e.g.
    /// `--where domain=source`; may repeat (all must hold).
    #[cfg_attr(
        feature = "cli",
        arg(long = "where", value_name = "COLUMN=VALUE", value_parser = parse_filter)
    )]
    pub filters: Vec<(String, String)>,
    /// Keep only rows whose `split` column equals this (e.g. `train`); shorthand for
    /// `--where split=VALUE`.
    #[cfg_attr(feature = "cli", arg(long))]
    pub split: Option<String>,
    /// ONNX sentence encoder (file or folder). Default: $TRUSTFLOW_MINILM_DIR.
    #[cfg_attr(feature = "cli", arg(long))]
    pub encoder: Option<PathBuf>,
    /// The encoder's tokenizer.json. Default: $TRUSTFLOW_MINILM_TOKENIZER.
    #[cfg_attr(feature = "cli", arg(long))]
    pub tokenizer: Option<PathBuf>,
    /// Class names in label order, comma-separated. Default: 0..C-1 with C the largest
    /// label + 1.
    #[cfg_attr(feature = "cli", arg(long, value_delimiter = ','))]
    pub classes: Option<Vec<String>>,
    /// Share of rows held out (seeded) for the held-out accuracy, in [0, 1).
    #[cfg_attr(feature = "cli", arg(long, default_value_t = 0.2))]
    pub holdout: f64,
    #[cfg_attr(feature = "cli", command(flatten))]
    pub fit: FitOptions,
}

/// `COLUMN=VALUE` of `--where`.
pub fn parse_filter(text: &str) -> std::result::Result<(String, String), String> {
    let (column, value) = text
        .split_once('=')
        .ok_or_else(|| format!("expected COLUMN=VALUE, found {text:?}"))?;
    Ok((column.trim().to_string(), value.to_string()))
}

impl FitTextOptions {
    /// The row filters with `split` folded in.
    fn all_filters(&self) -> Vec<(String, String)> {
        let mut filters = self.filters.clone();
        if let Some(split) = &self.split {
            filters.push(("split".to_string(), split.clone()));
        }
        filters
    }

    fn check(&self) -> Result<()> {
        if !(0.0..1.0).contains(&self.holdout) {
            return Err(Error::Invalid(format!(
                "holdout: expected a share in [0, 1), found {}",
                self.holdout
            )));
        }
        if self.fit.hidden == 0 || self.fit.epochs == 0 || self.fit.batch_size == 0 {
            return Err(Error::Invalid(
                "hidden, epochs and batch_size must each be >= 1".into(),
            ));
        }
        Ok(())
    }
}

/// Read, embed, hold out, fit, evaluate and save; returns the metrics (also in the
/// sidecar).
pub fn fit_text(opts: &FitTextOptions) -> Result<serde_json::Value> {
    opts.check()?;
    let data = read_labelled(
        &opts.train,
        opts.caption_column.as_deref(),
        &opts.label_column,
        &opts.all_filters(),
    )?;
    if data.labels.is_empty() {
        return Err(Error::Invalid(format!(
            "no usable rows in the training shards ({} skipped for a null caption or label, \
             {} by the filters)",
            data.skipped_null, data.skipped_filter
        )));
    }
    let top = data.labels.iter().copied().max().unwrap_or(0);
    let classes = match &opts.classes {
        Some(c) if c.len() > top => c.clone(),
        Some(c) => {
            return Err(Error::Invalid(format!(
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
