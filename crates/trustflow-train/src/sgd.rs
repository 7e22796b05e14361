//! SGD exactly as `torch.optim.SGD` (momentum, dampening 0, no Nesterov, L2 weight
//! decay added to the gradient) and the learning-rate schedule. Written out here
//! rather than taken from `tch::nn::Optimizer` because a resumable checkpoint needs
//! the momentum buffers, which libtorch's optimiser does not expose through tch.

use std::collections::BTreeMap;

use tch::{Kind, Tensor, nn};

use super::spec::{OptimizerSpec, Schedule};

/// The SGD update for every trainable variable of a var store.
pub struct Sgd {
    pub momentum: f64,
    pub weight_decay: f64,
    /// Trainable variables by var-store name (sorted: one fixed order).
    params: BTreeMap<String, Tensor>,
    /// Momentum buffers; absent until a variable's first step, as in torch.
    buffers: BTreeMap<String, Tensor>,
}

impl std::fmt::Debug for Sgd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sgd")
            .field("momentum", &self.momentum)
            .field("weight_decay", &self.weight_decay)
            .field("params", &self.params.len())
            .finish()
    }
}

impl Sgd {
    pub fn new(vs: &nn::VarStore, momentum: f64, weight_decay: f64) -> Self {
        let params = vs
            .variables()
            .into_iter()
            .filter(|(_, t)| t.requires_grad())
            .collect();
        Sgd {
            momentum,
            weight_decay,
            params,
            buffers: BTreeMap::new(),
        }
    }

    pub fn zero_grad(&mut self) {
        for p in self.params.values_mut() {
            p.zero_grad();
        }
    }

    /// One update with learning rate `lr`; variables without a gradient are skipped
    /// (as torch does).
    pub fn step(&mut self, lr: f64) {
        tch::no_grad(|| {
            for (name, p) in self.params.iter_mut() {
                let grad = p.grad();
                if !grad.defined() {
                    continue;
                }
                let mut d = if self.weight_decay != 0.0 {
                    &grad + &*p * self.weight_decay
                } else {
                    grad.shallow_clone()
                };
                if self.momentum != 0.0 {
                    let buf = match self.buffers.get_mut(name) {
                        Some(buf) => {
                            let _ = buf.g_mul_scalar_(self.momentum).g_add_(&d);
                            buf.shallow_clone()
                        }
                        None => {
                            let buf = d.detach().copy();
                            self.buffers.insert(name.clone(), buf.shallow_clone());
                            buf
                        }
                    };
                    d = buf;
                }
                let _ = p.g_add_(&(d * -lr));
            }
        });
    }

    /// The momentum buffers, named `momentum/<variable>`, for a checkpoint.
    pub fn state(&self) -> Vec<(String, Tensor)> {
        self.buffers
            .iter()
            .map(|(k, v)| (format!("momentum/{k}"), v.shallow_clone()))
            .collect()
    }

    /// Restores buffers written by [`Sgd::state`]; names of unknown variables or
    /// shapes that differ are errors (the checkpoint is not this model's).
    pub fn load_state(&mut self, named: Vec<(String, Tensor)>) -> Result<(), String> {
        self.buffers.clear();
        for (key, value) in named {
            let Some(name) = key.strip_prefix("momentum/") else {
                continue;
            };
            let Some(p) = self.params.get(name) else {
                return Err(format!("momentum buffer for unknown variable `{name}`"));
            };
            if p.size() != value.size() {
                return Err(format!(
                    "momentum buffer `{name}` has shape {:?}, the variable {:?}",
                    value.size(),
                    p.size()
                ));
            }
            self.buffers.insert(
                name.to_string(),
                value.to_device(p.device()).to_kind(Kind::Float),
            );
        }
        Ok(())
    }
}

/// The learning rate before step `t` (0-based) of `total` steps.
pub fn learning_rate(o: &OptimizerSpec, t: u64, total: u64) -> f64 {
    match o.schedule {
        Schedule::Constant => o.lr,
        Schedule::Cosine => {
            let progress = if total == 0 {
                0.0
            } else {
                (t.min(total) as f64) / total as f64
            };
            o.lr_min + (o.lr - o.lr_min) * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cosine_starts_at_lr_and_ends_at_lr_min() {
        let o = OptimizerSpec {
            lr: 0.1,
            lr_min: 0.001,
            ..Default::default()
        };
        assert_eq!(learning_rate(&o, 0, 100), 0.1);
        assert!((learning_rate(&o, 50, 100) - 0.0505).abs() < 1e-12);
        assert!((learning_rate(&o, 100, 100) - 0.001).abs() < 1e-12);
        let c = OptimizerSpec {
            schedule: Schedule::Constant,
            ..o
        };
        assert_eq!(learning_rate(&c, 70, 100), 0.1);
    }
}
