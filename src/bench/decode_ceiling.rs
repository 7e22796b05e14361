//! The decode ceiling: how fast this machine's cores can decode the corpus's images
//! (and, for `clip_score`, preprocess them exactly as the stage does) with nothing else
//! running. No Parquet, no queues, no sink, no model: the images' bytes are read into
//! memory first, then as many threads as the stage has `workers` take them in turn
//! and do the stage's per-image work, for at least `min_seconds`.
//!
//! The pipeline does that work and more on the same cores, so a decode-bound pipeline's
//! rows/s divided by this ceiling is at most 1 up to noise; what it lacks is what the
//! rest of the pipeline costs.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::time::{Duration, Instant};

use arrow::array::{Array, AsArray};
use arrow::datatypes::DataType;
use serde::{Deserialize, Serialize};

use trustflow_engine::columns::IMAGE;
use trustflow_engine::error::{Error, Result};
use trustflow_engine::models::image::{ImageSettings, decode_check};
use trustflow_engine::plan::Plan;
use trustflow_engine::stages::StageKind;
use trustflow_engine::stages::clip_score::ClipScoreStage;

/// The `decode_ceiling:` section of a bench spec.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DecodeCeilingSpec {
    /// Default true.
    #[serde(default = "super::harness::yes")]
    pub enabled: bool,
    /// The stage whose per-image work is measured: a `decode` or `clip_score` stage
    /// (default: the first of them).
    #[serde(default)]
    pub stage: Option<String>,
    /// Least seconds per measurement (the images are taken again in turn until then).
    /// Default 5.
    #[serde(default = "default_seconds")]
    pub min_seconds: f64,
    /// Most images held in memory for it (the corpus's first ones). Default 5,000.
    #[serde(default = "default_max_images")]
    pub max_images: usize,
}

fn default_seconds() -> f64 {
    5.0
}
fn default_max_images() -> usize {
    5000
}

/// One image's work, as the measured stage does it.
enum Work {
    /// `decode`: decode fully to prove the image usable, keep nothing.
    Decode(ImageSettings),
    /// `clip_score`: decode (a JPEG draft when the stage asks for it), resize, crop and
    /// normalise into the model's input.
    Clip(Box<ClipScoreStage>),
}

impl Work {
    fn once(&self, bytes: &[u8], pixels: &mut Vec<f32>) {
        match self {
            Work::Decode(settings) => {
                let _ = decode_check(bytes, &settings.limits(), &settings.formats);
            }
            Work::Clip(stage) => {
                pixels.clear();
                let _ = stage.pixels(bytes, pixels);
            }
        }
    }
}

/// Everything a measurement needs, made once.
pub struct DecodeCeiling {
    pub stage: String,
    pub workers: usize,
    images: Vec<Vec<u8>>,
    work: Work,
    min_seconds: f64,
}

impl DecodeCeiling {
    /// The stage to measure in `plan`, and the corpus's image bytes (the plan's shards,
    /// read through the engine's own reader, up to `max_images`).
    pub fn prepare(plan: &Plan, spec: &DecodeCeilingSpec) -> Result<Self> {
        let pipeline = &plan.pipeline;
        let found = pipeline.spec.stages.iter().find_map(|s| {
            let name = s.resolved_name();
            let wanted = spec.stage.as_deref().is_none_or(|w| w == name);
            let work = match &s.kind {
                StageKind::Decode(c) => Some(Ok(Work::Decode(c.image.clone()))),
                StageKind::ClipScore(c) => {
                    let mut config = c.clone();
                    config.resolve_paths(pipeline.base_dir());
                    Some(ClipScoreStage::new(name.clone(), config).map(|s| Work::Clip(Box::new(s))))
                }
                _ => None,
            };
            let workers = s.common.workers.unwrap_or(1).max(1);
            work.filter(|_| wanted).map(|w| (name, workers, w))
        });
        let Some((stage, workers, work)) = found else {
            return Err(Error::Invalid(format!(
                "the decode ceiling needs a decode or clip_score stage{}, and {} has none",
                spec.stage
                    .as_ref()
                    .map(|s| format!(" named `{s}`"))
                    .unwrap_or_default(),
                pipeline.file.display()
            )));
        };
        Ok(DecodeCeiling {
            stage,
            workers,
            work: work?,
            images: corpus_images(plan, spec.max_images)?,
            min_seconds: spec.min_seconds,
        })
    }

    pub fn images(&self) -> usize {
        self.images.len()
    }

    /// One measurement: images per second over every worker, at least one pass over
    /// the images and `min_seconds`.
    pub fn rows_per_s(&self) -> Result<f64> {
        if self.images.is_empty() {
            return Err(Error::Invalid(
                "the decode ceiling found no image in the corpus".into(),
            ));
        }
        let next = AtomicUsize::new(0);
        let done = AtomicU64::new(0);
        let min = Duration::from_secs_f64(self.min_seconds.max(0.0));
        let started = Instant::now();
        std::thread::scope(|scope| {
            for _ in 0..self.workers {
                scope.spawn(|| {
                    let mut pixels = Vec::new();
                    loop {
                        let i = next.fetch_add(1, Relaxed);
                        if i >= self.images.len() && started.elapsed() >= min {
                            return;
                        }
                        self.work
                            .once(&self.images[i % self.images.len()], &mut pixels);
                        done.fetch_add(1, Relaxed);
                    }
                });
            }
        });
        Ok(done.load(Relaxed) as f64 / started.elapsed().as_secs_f64().max(1e-9))
    }
}

/// The image bytes of the plan's shards, in order, as the reader hands them on (the
/// stored column mapped to `image`), up to `max` of them. Rows the source quarantines
/// never reach a stage, so they are left out here too.
fn corpus_images(plan: &Plan, max: usize) -> Result<Vec<Vec<u8>>> {
    let mut images = Vec::new();
    super::ceiling::read_canonical(plan, 0..plan.source.shards.len(), |batch| {
        let Some(column) = batch.column_by_name(IMAGE) else {
            return Err(Error::Invalid(
                "the decode ceiling needs image bytes; this corpus has image paths".into(),
            ));
        };
        let bytes: Vec<Option<&[u8]>> = match column.data_type() {
            DataType::LargeBinary => column.as_binary::<i64>().iter().collect(),
            DataType::Binary => column.as_binary::<i32>().iter().collect(),
            DataType::BinaryView => column.as_binary_view().iter().collect(),
            other => {
                return Err(Error::Invalid(format!(
                    "the decode ceiling needs image bytes; `image` is {other}"
                )));
            }
        };
        images.extend(bytes.into_iter().flatten().map(<[u8]>::to_vec));
        images.truncate(max);
        Ok(images.len() >= max)
    })?;
    Ok(images)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spec_defaults() {
        let spec: DecodeCeilingSpec = serde_json::from_str("{}").unwrap();
        assert!(spec.enabled);
        assert_eq!(spec.min_seconds, 5.0);
        assert_eq!(spec.max_images, 5000);
        assert!(serde_json::from_str::<DecodeCeilingSpec>(r#"{"secs": 1}"#).is_err());
    }
}
