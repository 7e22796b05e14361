//! The vision model g of docs/method.md section 4: a backbone giving features h(x), then
//! the linear head giving logits. The backbone is the built-in small CNN or a
//! user's TorchScript module; the head is always ours, so h(x) is by construction the
//! input of the last linear layer.

use std::path::{Path, PathBuf};

use tch::nn;
use tch::{Device, Kind, Tensor};

use super::spec::BackboneSpec;
use trustflow_engine::error::{Error, Result};

/// Input side used when probing a TorchScript module's output at start-up.
const PROBE_ROWS: i64 = 2;

/// libtorch's random generator is process-wide: seeding it and drawing the initial
/// weights happen under this lock, so concurrent trainings in one process (tests, a
/// library user's threads) each get exactly the weights their seed gives.
static INIT: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// The built-in backbone: three stages of conv-BN-ReLU (the first two with two convs
/// and a 2x2 max-pool), then global average pooling. Works for any input side >= 4.
#[derive(Debug)]
struct SmallCnn {
    blocks: Vec<(nn::Conv2D, nn::BatchNorm)>,
    /// After which block indices a 2x2 max-pool runs.
    pool_after: [usize; 2],
}

impl SmallCnn {
    fn new(vs: &nn::Path, width: i64) -> Self {
        let conv = nn::ConvConfig {
            padding: 1,
            bias: false,
            ..Default::default()
        };
        let channels = [
            (3, width),
            (width, width),
            (width, 2 * width),
            (2 * width, 2 * width),
            (2 * width, 4 * width),
        ];
        let blocks = channels
            .iter()
            .enumerate()
            .map(|(i, &(cin, cout))| {
                let at = vs / format!("block{i}");
                (
                    nn::conv2d(&at / "conv", cin, cout, 3, conv),
                    nn::batch_norm2d(&at / "bn", cout, Default::default()),
                )
            })
            .collect();
        SmallCnn {
            blocks,
            pool_after: [1, 3],
        }
    }

    fn features(&self, xs: &Tensor, train: bool) -> Tensor {
        let mut x = xs.shallow_clone();
        for (i, (conv, bn)) in self.blocks.iter().enumerate() {
            x = x.apply(conv).apply_t(bn, train).relu();
            if self.pool_after.contains(&i) && x.size()[2] >= 2 && x.size()[3] >= 2 {
                x = x.max_pool2d_default(2);
            }
        }
        x.adaptive_avg_pool2d([1, 1]).flatten(1, -1)
    }
}

enum Backbone {
    Builtin(SmallCnn),
    Script {
        module: tch::TrainableCModule,
        file: PathBuf,
    },
}

/// Backbone + linear head, with all trainable tensors in one [`nn::VarStore`].
pub struct VisionModel {
    pub vs: nn::VarStore,
    backbone: Backbone,
    head: nn::Linear,
    pub feature_dim: i64,
    pub classes: i64,
    train_mode: bool,
}

impl std::fmt::Debug for VisionModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VisionModel")
            .field("feature_dim", &self.feature_dim)
            .field("classes", &self.classes)
            .finish()
    }
}

/// What one forward pass gives: h(x) and g(x).
pub struct Forward {
    pub features: Tensor,
    pub logits: Tensor,
}

impl VisionModel {
    /// Builds the model on `device`. `script_override` loads a TorchScript backbone
    /// from a checkpoint's copy instead of `spec`'s file (buffers such as batch-norm
    /// statistics live in the module, not in the var store). `input_side` is the
    /// augmentation size, used to probe the module's output shape. `seed` fixes the
    /// initial weights.
    pub fn new(
        spec: &BackboneSpec,
        resolve: impl Fn(&str) -> PathBuf,
        classes: i64,
        input_side: i64,
        device: Device,
        script_override: Option<&Path>,
        seed: u64,
    ) -> Result<Self> {
        let _init = INIT.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let build = |vs: &nn::VarStore| {
            tch::manual_seed(seed as i64);
            build_parts(
                &vs.root(),
                spec,
                &resolve,
                classes,
                input_side,
                vs.device(),
                script_override,
            )
        };
        let mut vs = nn::VarStore::new(device);
        let (backbone, head, feature_dim) = build(&vs)?;
        if device != Device::Cpu {
            // One seed must give one set of initial weights on every device, but CUDA
            // draws from its own generator: draw them on the CPU and copy them over.
            let cpu = nn::VarStore::new(Device::Cpu);
            build(&cpu)?;
            vs.copy(&cpu)
                .map_err(|e| Error::Internal(format!("copying initial weights: {e}")))?;
        }
        Ok(VisionModel {
            vs,
            backbone,
            head,
            feature_dim,
            classes,
            train_mode: true,
        })
    }

    /// Training or evaluation mode (batch-norm statistics, dropout).
    pub fn set_train(&mut self, train: bool) -> Result<()> {
        self.train_mode = train;
        if let Backbone::Script { module, file } = &mut self.backbone {
            let r = if train {
                module.f_set_train()
            } else {
                module.f_set_eval()
            };
            r.map_err(|e| Error::input(&*file, format!("cannot switch mode: {e}")))?;
        }
        Ok(())
    }

    pub fn forward(&self, images: &Tensor) -> Result<Forward> {
        let features = match &self.backbone {
            Backbone::Builtin(cnn) => cnn.features(images, self.train_mode),
            Backbone::Script { module, file } => module
                .forward_ts(&[images])
                .map_err(|e| Error::input(file, format!("forward failed: {e}")))?
                .to_kind(Kind::Float),
        };
        let logits = features.apply(&self.head);
        Ok(Forward { features, logits })
    }

    /// The TorchScript backbone, to be saved with a checkpoint.
    pub fn script(&self) -> Option<&tch::TrainableCModule> {
        match &self.backbone {
            Backbone::Script { module, .. } => Some(module),
            Backbone::Builtin(_) => None,
        }
    }
}

/// The backbone and the head under `root`, on `device`.
fn build_parts(
    root: &nn::Path,
    spec: &BackboneSpec,
    resolve: &impl Fn(&str) -> PathBuf,
    classes: i64,
    input_side: i64,
    device: Device,
    script_override: Option<&Path>,
) -> Result<(Backbone, nn::Linear, i64)> {
    let (backbone, feature_dim) = match spec {
        BackboneSpec::Builtin { width } => (
            Backbone::Builtin(SmallCnn::new(&(root / "backbone"), *width)),
            4 * width,
        ),
        BackboneSpec::Torchscript { path } => {
            let file = match script_override {
                Some(p) => p.to_path_buf(),
                None => resolve(path),
            };
            if !file.is_file() {
                return Err(Error::input(
                    &file,
                    "model.backbone.path: no such TorchScript file",
                ));
            }
            let mut module =
                tch::TrainableCModule::load(&file, root / "backbone").map_err(|e| {
                    Error::input(
                        &file,
                        format!("model.backbone.path: not a loadable TorchScript module: {e}"),
                    )
                })?;
            let dim = probe_features(&mut module, &file, input_side, device)?;
            (Backbone::Script { module, file }, dim)
        }
    };
    let head = nn::linear(root / "head", feature_dim, classes, Default::default());
    Ok((backbone, head, feature_dim))
}

/// Runs the module once on zeros and checks it returns `[N, D]` float features.
fn probe_features(
    module: &mut tch::TrainableCModule,
    file: &Path,
    side: i64,
    device: Device,
) -> Result<i64> {
    module
        .f_set_eval()
        .map_err(|e| Error::input(file, format!("cannot switch to eval mode: {e}")))?;
    let input = Tensor::zeros([PROBE_ROWS, 3, side, side], (Kind::Float, device));
    let out = tch::no_grad(|| module.forward_ts(&[&input])).map_err(|e| {
        Error::input(
            file,
            format!(
                "model.backbone: the module cannot run on images of shape [{PROBE_ROWS}, 3, \
                 {side}, {side}] (augment.size = {side}): {e}"
            ),
        )
    })?;
    let shape = out.size();
    let fits = shape.len() == 2 && shape[0] == PROBE_ROWS && shape[1] >= 1;
    if !fits
        || !matches!(
            out.kind(),
            Kind::Float | Kind::Double | Kind::Half | Kind::BFloat16
        )
    {
        return Err(Error::input(
            file,
            format!(
                "model.backbone: the module returns {:?} {shape:?} for input [{PROBE_ROWS}, 3, \
                 {side}, {side}]; the trainer needs float features [N, D] (pool and flatten \
                 inside the module, e.g. a timm model created with num_classes=0)",
                out.kind()
            ),
        ));
    }
    module
        .f_set_train()
        .map_err(|e| Error::input(file, format!("cannot switch to train mode: {e}")))?;
    Ok(shape[1])
}
