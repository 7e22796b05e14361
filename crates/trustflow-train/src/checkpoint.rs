//! Resumable checkpoints: `OUTPUT/checkpoints/step-NNNNNNNN/` holds the model's
//! variables and the optimiser's momentum buffers (safetensors), the TorchScript
//! backbone when there is one (it carries buffers such as batch-norm statistics), and
//! `state.json` (where in the schedule the run stands, and the running epoch's
//! partial sums). A checkpoint is written into a temporary folder and renamed, then
//! `LATEST` is replaced the same way, so a kill at any moment leaves the previous
//! checkpoint intact. The two newest checkpoints are kept.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use tch::Tensor;

use super::model::VisionModel;
use super::sgd::Sgd;
use trustflow_engine::error::{Error, Result};

const FORMAT: u32 = 1;
const LATEST: &str = "LATEST";
const KEEP: usize = 2;
const MODEL_FILE: &str = "model.safetensors";
const OPTIMIZER_FILE: &str = "optimizer.safetensors";
const BACKBONE_FILE: &str = "backbone.pt";
const STATE_FILE: &str = "state.json";

/// Where in the schedule a checkpoint stands.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct CheckpointState {
    pub format: u32,
    /// Hash of the training file's settings and the shards' fingerprints: a
    /// checkpoint only resumes the run that wrote it.
    pub spec_hash: String,
    /// The epoch and step (within it) that run next.
    pub epoch: u64,
    pub step: u64,
    /// Steps done so far over all epochs (the schedule position).
    pub global_step: u64,
    pub steps_per_epoch: u64,
    pub total_steps: u64,
    /// Lines of `metrics.jsonl` that belong to finished epochs.
    pub metrics_lines: usize,
    /// Sums of the unfinished epoch so far.
    pub partial: EpochSums,
}

pub fn folder(output: &Path) -> PathBuf {
    output.join("checkpoints")
}

/// Writes a checkpoint and points `LATEST` at it; returns its folder.
pub fn save(
    output: &Path,
    state: &CheckpointState,
    model: &VisionModel,
    sgd: &Sgd,
) -> Result<PathBuf> {
    let root = folder(output);
    std::fs::create_dir_all(&root).map_err(|e| Error::io(&root, e))?;
    let name = format!("step-{:08}", state.global_step);
    let dir = root.join(&name);
    let tmp = root.join(format!(".{name}.tmp"));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
    }
    std::fs::create_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
    let torch = |path: &Path, e: tch::TchError| Error::output(path, e);
    let model_file = tmp.join(MODEL_FILE);
    model
        .vs
        .save(&model_file)
        .map_err(|e| torch(&model_file, e))?;
    let opt_file = tmp.join(OPTIMIZER_FILE);
    let named = sgd.state();
    Tensor::write_safetensors(&named, &opt_file).map_err(|e| torch(&opt_file, e))?;
    if let Some(script) = model.script() {
        let file = tmp.join(BACKBONE_FILE);
        script.save(&file).map_err(|e| torch(&file, e))?;
    }
    let state_file = tmp.join(STATE_FILE);
    let json = serde_json::to_vec_pretty(state).map_err(|e| Error::output(&state_file, e))?;
    std::fs::write(&state_file, json).map_err(|e| Error::io(&state_file, e))?;
    if dir.exists() {
        std::fs::remove_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
    }
    std::fs::rename(&tmp, &dir).map_err(|e| Error::io(&dir, e))?;
    let latest_tmp = root.join(".LATEST.tmp");
    std::fs::write(&latest_tmp, &name).map_err(|e| Error::io(&latest_tmp, e))?;
    std::fs::rename(&latest_tmp, root.join(LATEST)).map_err(|e| Error::io(&root, e))?;
    prune(&root, &name)?;
    Ok(dir)
}

/// Deletes all but the [`KEEP`] newest checkpoints (never `latest`).
fn prune(root: &Path, latest: &str) -> Result<()> {
    let mut names: Vec<String> = std::fs::read_dir(root)
        .map_err(|e| Error::io(root, e))?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("step-"))
        .collect();
    names.sort();
    let excess = names.len().saturating_sub(KEEP);
    for name in names.into_iter().take(excess) {
        if name != latest {
            let dir = root.join(&name);
            std::fs::remove_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
        }
    }
    Ok(())
}

/// The folder `LATEST` names, if any.
pub fn latest(output: &Path) -> Result<Option<PathBuf>> {
    let root = folder(output);
    let pointer = root.join(LATEST);
    match std::fs::read_to_string(&pointer) {
        Ok(name) => {
            let dir = root.join(name.trim());
            if !dir.join(STATE_FILE).is_file() {
                return Err(Error::input(
                    &pointer,
                    format!("points at {}, which is not a checkpoint", dir.display()),
                ));
            }
            Ok(Some(dir))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(Error::io(&pointer, e)),
    }
}

pub fn read_state(dir: &Path) -> Result<CheckpointState> {
    let file = dir.join(STATE_FILE);
    let text = std::fs::read_to_string(&file).map_err(|e| Error::io(&file, e))?;
    let state: CheckpointState = serde_json::from_str(&text)
        .map_err(|e| Error::input(&file, format!("not a checkpoint state: {e}")))?;
    if state.format != FORMAT {
        return Err(Error::input(
            &file,
            format!(
                "checkpoint format {} (this build reads {FORMAT})",
                state.format
            ),
        ));
    }
    Ok(state)
}

/// The TorchScript backbone saved with a checkpoint, if it has one.
pub fn backbone_file(dir: &Path) -> Option<PathBuf> {
    let file = dir.join(BACKBONE_FILE);
    file.is_file().then_some(file)
}

/// Loads variables and momentum buffers into a model built like the one saved.
pub fn restore(dir: &Path, model: &mut VisionModel, sgd: &mut Sgd) -> Result<()> {
    let model_file = dir.join(MODEL_FILE);
    model
        .vs
        .load(&model_file)
        .map_err(|e| Error::input(&model_file, format!("does not fit the model: {e}")))?;
    let opt_file = dir.join(OPTIMIZER_FILE);
    let named = Tensor::read_safetensors(&opt_file)
        .map_err(|e| Error::input(&opt_file, format!("unreadable: {e}")))?;
    sgd.load_state(named)
        .map_err(|m| Error::input(&opt_file, m))?;
    Ok(())
}

pub const STATE_FORMAT: u32 = FORMAT;

/// Running sums of one epoch (saved in checkpoints so a resumed epoch reports the
/// same means).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct EpochSums {
    pub steps: u64,
    pub skipped_steps: u64,
    pub total: f64,
    pub src: f64,
    pub tgt: f64,
    pub self_train: f64,
    pub ctr: f64,
    pub idle_s: f64,
    /// Time in steps, waiting included (not evaluation or checkpoints).
    #[serde(default)]
    pub step_s: f64,
    pub wall_s: f64,
    pub rows_dropped: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A resumed epoch continues its loss sums from the checkpoint, so they must come
    /// back from the state file bit for bit: serde_json's default float parsing may be
    /// one ulp off (hence its `float_roundtrip` feature, enabled in Cargo.toml).
    #[test]
    fn epoch_sums_round_trip_bit_for_bit() {
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 11) as f64 / (1u64 << 53) as f64
        };
        let mut sums = EpochSums::default();
        for step in 0..20_000 {
            sums.steps += 1;
            sums.total += 3.0 * next();
            sums.src += next();
            sums.tgt += 0.5 * next();
            sums.self_train += next() * 1e-3;
            sums.ctr += next() / 7.0;
            sums.wall_s += next() * 0.1;
            let text = serde_json::to_vec_pretty(&sums).unwrap();
            let back: EpochSums = serde_json::from_slice(&text).unwrap();
            for (name, a, b) in [
                ("total", sums.total, back.total),
                ("src", sums.src, back.src),
                ("tgt", sums.tgt, back.tgt),
                ("self_train", sums.self_train, back.self_train),
                ("ctr", sums.ctr, back.ctr),
                ("wall_s", sums.wall_s, back.wall_s),
            ] {
                assert_eq!(
                    a.to_bits(),
                    b.to_bits(),
                    "{name} at step {step}: {a:?} read as {b:?}"
                );
            }
        }
    }
}
