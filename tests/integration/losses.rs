//! Parity of the TRUST losses (crates/trustflow-train/src/losses.rs) with an independent
//! PyTorch implementation: the golden files in tests/fixtures/losses/ come from
//! scripts/fixtures/losses.py (see its header; Python is not needed to run these
//! tests). Values must agree within 1e-5, gradients within 1e-4 and the parameters after
//! SGD steps within 1e-5 (absolute). Also the edge cases of docs/method.md section 5
//! (no NaN or infinity from any input) and the switching of terms.

use std::path::PathBuf;

use serde_json::Value;
use tch::nn;
use tch::{Device, Kind, Tensor};
use trustflow_train::losses::{
    LossError, LossTerms, TEMPERATURE_RANGE, TrustBatch, caption_similarity, contrastive_anchors,
    self_training_ce, soft_contrastive, source_ce, trust_loss, weighted_target_ce,
};

const VALUE_TOL: f64 = 1e-5;
const GRAD_TOL: f64 = 1e-4;
const STEP_TOL: f64 = 1e-5;

/// The inputs of a case that the fixtures differentiate, in the fixture's names.
const GRAD_INPUTS: [&str; 7] = [
    "source_logits",
    "target_logits",
    "target_strong_logits",
    "source_features",
    "source_features_strong",
    "target_features",
    "target_features_strong",
];
const FEATURES: [&str; 4] = [
    "source_features",
    "target_features",
    "source_features_strong",
    "target_features_strong",
];

fn fixture(name: &str) -> Value {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/losses")
        .join(format!("{name}.json"));
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("{}: {e} (run scripts/fixtures/losses.py)", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn shape(v: &Value) -> Vec<i64> {
    v["shape"]
        .as_array()
        .expect("shape")
        .iter()
        .map(|d| d.as_i64().expect("dimension"))
        .collect()
}

fn numbers(v: &Value) -> Vec<f64> {
    v["data"]
        .as_array()
        .expect("data")
        .iter()
        .map(|x| x.as_f64().expect("number"))
        .collect()
}

/// A fixture tensor: integer labels as Int64, everything else float32.
fn tensor(name: &str, v: &Value) -> Tensor {
    let data = numbers(v);
    let t = if name.ends_with("labels") {
        Tensor::from_slice(&data.iter().map(|&x| x as i64).collect::<Vec<_>>())
    } else {
        Tensor::from_slice(&data.iter().map(|&x| x as f32).collect::<Vec<_>>())
    };
    t.reshape(shape(v))
}

fn flat(t: &Tensor) -> Vec<f64> {
    Vec::<f64>::try_from(&t.detach().to_kind(Kind::Double).reshape([-1])).expect("to vec")
}

fn scalar(t: &Tensor) -> f64 {
    t.double_value(&[])
}

fn assert_close(what: &str, got: &Tensor, want: &Value, tol: f64) {
    assert_eq!(got.size(), shape(want), "{what}: shape");
    let got = flat(got);
    let want = numbers(want);
    let worst = got
        .iter()
        .zip(&want)
        .map(|(g, w)| (g - w).abs())
        .fold(0.0, f64::max);
    assert!(
        worst <= tol,
        "{what}: max |diff| {worst:e} > {tol:e}\n got {got:?}\nwant {want:?}"
    );
}

fn assert_value(what: &str, got: f64, want: &Value, tol: f64) {
    let want = want.as_f64().expect("value");
    assert!(
        (got - want).abs() <= tol,
        "{what}: got {got}, want {want} (|diff| {:e})",
        (got - want).abs()
    );
}

/// Gradients of `loss` w.r.t. `inputs` (zeros where `loss` does not depend on one).
fn grads(loss: &Tensor, inputs: &[&Tensor]) -> Vec<Tensor> {
    Tensor::run_backward(&[loss], inputs, true, false)
        .into_iter()
        .zip(inputs)
        .map(|(g, x)| if g.defined() { g } else { x.zeros_like() })
        .collect()
}

/// One golden case: its JSON and its inputs as leaf tensors (gradient on where the
/// fixture differentiates).
struct Case {
    fx: Value,
    inputs: serde_json::Map<String, Value>,
}

impl Case {
    fn load(name: &str) -> Case {
        let fx = fixture(name);
        let inputs = fx["inputs"].as_object().expect("inputs").clone();
        Case { fx, inputs }
    }

    fn tau(&self) -> (f64, f64) {
        (
            self.fx["tau"].as_f64().expect("tau"),
            self.fx["tau_base"].as_f64().expect("tau_base"),
        )
    }

    /// Fresh leaf tensors for every input.
    fn leaves(&self) -> std::collections::BTreeMap<String, Tensor> {
        self.inputs
            .iter()
            .map(|(k, v)| {
                let t = tensor(k, v);
                let t = if GRAD_INPUTS.contains(&k.as_str()) {
                    t.set_requires_grad(true)
                } else {
                    t
                };
                (k.clone(), t)
            })
            .collect()
    }
}

fn batch_of(x: &std::collections::BTreeMap<String, Tensor>) -> TrustBatch {
    let get = |k: &str| x.get(k).map(Tensor::shallow_clone);
    TrustBatch {
        source_logits: get("source_logits"),
        source_labels: get("source_labels"),
        source_features: get("source_features"),
        source_features_strong: get("source_features_strong"),
        source_caption_features: get("source_caption_features"),
        target_logits: get("target_logits"),
        target_strong_logits: get("target_strong_logits"),
        pseudo_labels: get("pseudo_labels"),
        weights: get("weights"),
        target_features: get("target_features"),
        target_features_strong: get("target_features_strong"),
        target_caption_features: get("target_caption_features"),
    }
}

fn captions(x: &std::collections::BTreeMap<String, Tensor>) -> Tensor {
    Tensor::cat(
        &[&x["source_caption_features"], &x["target_caption_features"]],
        0,
    )
}

fn anchors(x: &std::collections::BTreeMap<String, Tensor>) -> Tensor {
    contrastive_anchors(
        &x["source_features"],
        &x["target_features"],
        &x["source_features_strong"],
        &x["target_features_strong"],
    )
}

/// The values of the four terms as computed by the per-term functions.
struct Terms {
    src: Tensor,
    tgt: Tensor,
    self_train: Tensor,
    ctr: Tensor,
}

/// Checks every term's value and gradients, the similarity matrix, and the total from
/// `trust_loss`, against the fixture. Returns the leaves and terms for extra checks.
fn check_parity(name: &str) -> (Case, std::collections::BTreeMap<String, Tensor>, Terms) {
    let case = Case::load(name);
    let (tau, tau_base) = case.tau();
    let fx = &case.fx;
    let x = case.leaves();

    assert_close(
        &format!("{name}: similarity"),
        &caption_similarity(&captions(&x)),
        &fx["similarity"],
        1e-6,
    );

    let terms = Terms {
        src: source_ce(&x["source_logits"], &x["source_labels"]),
        tgt: weighted_target_ce(&x["target_logits"], &x["pseudo_labels"], &x["weights"]),
        self_train: self_training_ce(
            &x["target_strong_logits"],
            &x["target_logits"],
            &x["weights"],
        ),
        ctr: soft_contrastive(&anchors(&x), &captions(&x), tau, tau_base),
    };
    let per_term: [(&str, &Tensor, &[&str]); 4] = [
        ("src", &terms.src, &["source_logits"]),
        ("tgt", &terms.tgt, &["target_logits"]),
        (
            "self_train",
            &terms.self_train,
            &["target_logits", "target_strong_logits"],
        ),
        ("ctr", &terms.ctr, &FEATURES),
    ];
    for (term, loss, wrt) in per_term {
        assert_value(
            &format!("{name}: {term}"),
            scalar(loss),
            &fx["values"][term],
            VALUE_TOL,
        );
        let inputs: Vec<&Tensor> = wrt.iter().map(|k| &x[*k]).collect();
        for (k, g) in wrt.iter().zip(grads(loss, &inputs)) {
            assert_close(
                &format!("{name}: d{term}/d{k}"),
                &g,
                &fx["grads"][term][*k],
                GRAD_TOL,
            );
        }
    }

    let out = trust_loss(&batch_of(&x), &LossTerms::default(), tau, tau_base)
        .unwrap_or_else(|e| panic!("{name}: {e}"));
    let reported = [
        ("src", out.src),
        ("tgt", out.tgt),
        ("self_train", out.self_train),
        ("ctr", out.ctr),
    ];
    for (term, v) in reported {
        let v = v.unwrap_or_else(|| panic!("{name}: {term} missing"));
        assert_value(
            &format!("{name}: trust_loss {term}"),
            v,
            &fx["values"][term],
            VALUE_TOL,
        );
    }
    assert_value(
        &format!("{name}: total"),
        scalar(&out.total),
        &fx["values"]["total"],
        VALUE_TOL,
    );
    let inputs: Vec<&Tensor> = GRAD_INPUTS.iter().map(|k| &x[*k]).collect();
    for (k, g) in GRAD_INPUTS.iter().zip(grads(&out.total, &inputs)) {
        assert_close(
            &format!("{name}: dL/d{k}"),
            &g,
            &fx["grads"]["total"][*k],
            GRAD_TOL,
        );
    }
    (case, x, terms)
}

#[test]
fn parity_random() {
    check_parity("random");
}

#[test]
fn parity_all_weights_zero() {
    let (_, _, terms) = check_parity("weights_zero");
    assert_eq!(scalar(&terms.tgt), 0.0);
    assert!(scalar(&terms.self_train) > 0.0);
}

#[test]
fn parity_all_weights_one() {
    let (_, _, terms) = check_parity("weights_one");
    assert_eq!(scalar(&terms.self_train), 0.0);
    assert!(scalar(&terms.tgt) > 0.0);
}

#[test]
fn parity_identical_captions_give_zero_contrastive_loss() {
    let (case, x, terms) = check_parity("identical_captions");
    // S = 1 exactly everywhere, so no anchor has negative mass: L_ctr = 0, no gradient,
    // and no NaN (the authors' code returns NaN here).
    let s = flat(&caption_similarity(&captions(&x)));
    assert!(s.iter().all(|&v| v == 1.0), "S = {s:?}");
    assert_eq!(scalar(&terms.ctr), 0.0);
    let inputs: Vec<&Tensor> = FEATURES.iter().map(|k| &x[*k]).collect();
    for g in grads(&terms.ctr, &inputs) {
        assert!(flat(&g).iter().all(|&v| v == 0.0));
    }
    assert_eq!(case.fx["values"]["ctr"].as_f64(), Some(0.0));
}

#[test]
fn parity_single_class_batch() {
    check_parity("single_class");
}

#[test]
fn parity_one_class_model() {
    let (_, _, terms) = check_parity("one_class_model");
    for t in [&terms.src, &terms.tgt, &terms.self_train] {
        assert_eq!(scalar(t), 0.0);
    }
}

#[test]
fn parity_batch_of_one() {
    check_parity("batch_of_one");
}

#[test]
fn parity_zero_norm_caption() {
    let (case, x, _) = check_parity("zero_norm_caption");
    let b = case.fx["B"].as_i64().expect("B") as usize;
    let s = Vec::<Vec<f32>>::try_from(&caption_similarity(&captions(&x))).expect("S");
    let row = b + 1; // target row 1
    for (j, v) in s[row].iter().enumerate() {
        assert_eq!(*v, if j == row { 1.0 } else { 0.0 }, "S[{row}][{j}]");
        assert_eq!(s[j][row], *v);
    }
}

#[test]
fn parity_negative_caption_features_are_clamped() {
    let (_, x, _) = check_parity("negative_captions");
    let s = flat(&caption_similarity(&captions(&x)));
    assert!(s.iter().all(|&v| (0.0..=1.0).contains(&v)));
    assert!(
        s.iter().filter(|&&v| v == 0.0).count() >= 4,
        "expected clamped negative cosines: {s:?}"
    );
}

/// The tiny model of sgd_step.json: feature = Linear(D_in, D), head = Linear(D, C).
struct Tiny {
    feature_weight: Tensor,
    feature_bias: Tensor,
    head_weight: Tensor,
    head_bias: Tensor,
}

impl Tiny {
    fn feature(&self, x: &Tensor) -> Tensor {
        x.matmul(&self.feature_weight.tr()) + &self.feature_bias
    }

    fn head(&self, h: &Tensor) -> Tensor {
        h.matmul(&self.head_weight.tr()) + &self.head_bias
    }

    fn params(&self) -> [(&'static str, &Tensor); 4] {
        [
            ("feature_weight", &self.feature_weight),
            ("feature_bias", &self.feature_bias),
            ("head_weight", &self.head_weight),
            ("head_bias", &self.head_bias),
        ]
    }

    fn loss(&self, data: &Value, tau: f64, tau_base: f64) -> trustflow_train::LossValues {
        let get = |k: &str| tensor(k, &data[k]);
        let hs = self.feature(&get("source_images"));
        let hs2 = self.feature(&get("source_images_strong"));
        let ht = self.feature(&get("target_images"));
        let ht2 = self.feature(&get("target_images_strong"));
        let batch = TrustBatch {
            source_logits: Some(self.head(&hs)),
            source_labels: Some(get("source_labels")),
            source_features: Some(hs),
            source_features_strong: Some(hs2),
            source_caption_features: Some(get("source_caption_features")),
            target_logits: Some(self.head(&ht)),
            target_strong_logits: Some(self.head(&ht2)),
            pseudo_labels: Some(get("pseudo_labels")),
            weights: Some(get("weights")),
            target_features: Some(ht),
            target_features_strong: Some(ht2),
            target_caption_features: Some(get("target_caption_features")),
        };
        trust_loss(&batch, &LossTerms::default(), tau, tau_base).expect("trust_loss")
    }
}

fn check_step(fx: &Value, step: usize, out: &trustflow_train::LossValues, model: &Tiny) {
    let want = &fx["steps"][step];
    let got = [
        ("src", out.src),
        ("tgt", out.tgt),
        ("self_train", out.self_train),
        ("ctr", out.ctr),
        ("total", Some(scalar(&out.total))),
    ];
    for (term, v) in got {
        assert_value(
            &format!("step {step}: {term}"),
            v.expect("term on"),
            &want["values"][term],
            VALUE_TOL,
        );
    }
    for (name, p) in model.params() {
        assert_close(
            &format!("step {step}: {name} after the step"),
            p,
            &want["params_after"][name],
            STEP_TOL,
        );
    }
}

/// Two SGD steps (lr, momentum 0.9, weight decay 5e-4 as recorded) with the trainer's
/// own optimiser ([`trustflow_train::sgd::Sgd`]): parameters must match
/// torch.optim.SGD after each step.
#[test]
fn sgd_steps_match_pytorch() {
    let fx = fixture("sgd_step");
    let (tau, tau_base) = (
        fx["tau"].as_f64().unwrap(),
        fx["tau_base"].as_f64().unwrap(),
    );
    let sgd = &fx["sgd"];
    // The trainer's SGD is torch's with dampening 0 and no Nesterov.
    assert_eq!(sgd["dampening"].as_f64(), Some(0.0));
    assert_eq!(sgd["nesterov"].as_bool(), Some(false));
    let vs = nn::VarStore::new(Device::Cpu);
    let root = vs.root();
    let init = |k: &str| root.var_copy(k, &tensor(k, &fx["init"][k]));
    let model = Tiny {
        feature_weight: init("feature_weight"),
        feature_bias: init("feature_bias"),
        head_weight: init("head_weight"),
        head_bias: init("head_bias"),
    };
    let mut opt = trustflow_train::sgd::Sgd::new(
        &vs,
        sgd["momentum"].as_f64().unwrap(),
        sgd["weight_decay"].as_f64().unwrap(),
    );
    let lr = sgd["lr"].as_f64().unwrap();
    let steps = fx["steps"].as_array().expect("steps").len();
    assert!(steps >= 2, "the momentum buffer needs a second step");
    for step in 0..steps {
        let out = model.loss(&fx["data"], tau, tau_base);
        opt.zero_grad();
        out.total.backward();
        opt.step(lr);
        check_step(&fx, step, &out, &model);
    }
}

/// The same steps written out by hand (PyTorch's SGD: d = g + wd p; buf = d on the
/// first step, then momentum * buf + (1 - dampening) d; p -= lr buf), independent of the
/// trainer's optimiser.
#[test]
fn sgd_steps_by_hand_match_pytorch() {
    let fx = fixture("sgd_step");
    let (tau, tau_base) = (
        fx["tau"].as_f64().unwrap(),
        fx["tau_base"].as_f64().unwrap(),
    );
    let sgd = &fx["sgd"];
    let (lr, momentum, wd) = (
        sgd["lr"].as_f64().unwrap(),
        sgd["momentum"].as_f64().unwrap(),
        sgd["weight_decay"].as_f64().unwrap(),
    );
    let init = |k: &str| tensor(k, &fx["init"][k]).set_requires_grad(true);
    let mut model = Tiny {
        feature_weight: init("feature_weight"),
        feature_bias: init("feature_bias"),
        head_weight: init("head_weight"),
        head_bias: init("head_bias"),
    };
    let mut buffers: Vec<Option<Tensor>> = vec![None, None, None, None];
    for step in 0..fx["steps"].as_array().unwrap().len() {
        let out = model.loss(&fx["data"], tau, tau_base);
        let params: Vec<&Tensor> = model.params().iter().map(|(_, p)| *p).collect();
        let gs = grads(&out.total, &params);
        let updated: Vec<Tensor> = tch::no_grad(|| {
            params
                .iter()
                .zip(gs)
                .zip(buffers.iter_mut())
                .map(|((p, g), buf)| {
                    let d = g + *p * wd;
                    let b = match buf.take() {
                        None => d,
                        Some(b) => b * momentum + d,
                    };
                    let next = *p - &b * lr;
                    *buf = Some(b);
                    next.detach().set_requires_grad(true)
                })
                .collect()
        });
        let mut it = updated.into_iter();
        model = Tiny {
            feature_weight: it.next().unwrap(),
            feature_bias: it.next().unwrap(),
            head_weight: it.next().unwrap(),
            head_bias: it.next().unwrap(),
        };
        check_step(&fx, step, &out, &model);
    }
}

fn random_batch(seed: i64, b: i64, c: i64, d: i64, dt: i64) -> TrustBatch {
    tch::manual_seed(seed);
    let leaf = |t: Tensor| t.set_requires_grad(true);
    TrustBatch {
        source_logits: Some(leaf(Tensor::randn([b, c], (Kind::Float, Device::Cpu)))),
        source_labels: Some(Tensor::randint(c, [b], (Kind::Int64, Device::Cpu))),
        source_features: Some(leaf(Tensor::randn([b, d], (Kind::Float, Device::Cpu)))),
        source_features_strong: Some(leaf(Tensor::randn([b, d], (Kind::Float, Device::Cpu)))),
        source_caption_features: Some(Tensor::rand([b, dt], (Kind::Float, Device::Cpu))),
        target_logits: Some(leaf(Tensor::randn([b, c], (Kind::Float, Device::Cpu)))),
        target_strong_logits: Some(leaf(Tensor::randn([b, c], (Kind::Float, Device::Cpu)))),
        pseudo_labels: Some(Tensor::randint(c, [b], (Kind::Int64, Device::Cpu))),
        weights: Some(Tensor::rand([b], (Kind::Float, Device::Cpu))),
        target_features: Some(leaf(Tensor::randn([b, d], (Kind::Float, Device::Cpu)))),
        target_features_strong: Some(leaf(Tensor::randn([b, d], (Kind::Float, Device::Cpu)))),
        target_caption_features: Some(Tensor::rand([b, dt], (Kind::Float, Device::Cpu))),
    }
}

fn leaves_of(b: &TrustBatch) -> Vec<(&'static str, &Tensor)> {
    [
        ("source_logits", &b.source_logits),
        ("target_logits", &b.target_logits),
        ("target_strong_logits", &b.target_strong_logits),
        ("source_features", &b.source_features),
        ("source_features_strong", &b.source_features_strong),
        ("target_features", &b.target_features),
        ("target_features_strong", &b.target_features_strong),
    ]
    .into_iter()
    .filter_map(|(k, t)| t.as_ref().filter(|t| t.requires_grad()).map(|t| (k, t)))
    .collect()
}

/// trust_loss succeeds, every term and the total are finite, and so is the gradient
/// w.r.t. every logit and feature input.
fn assert_finite(what: &str, batch: &TrustBatch, tau: f64, tau_base: f64) {
    let out = trust_loss(batch, &LossTerms::default(), tau, tau_base)
        .unwrap_or_else(|e| panic!("{what}: {e}"));
    let total = scalar(&out.total);
    assert!(total.is_finite(), "{what}: total {total}");
    for v in [out.src, out.tgt, out.self_train, out.ctr] {
        assert!(v.expect("term on").is_finite(), "{what}: {v:?}");
    }
    let leaves = leaves_of(batch);
    let inputs: Vec<&Tensor> = leaves.iter().map(|(_, t)| *t).collect();
    for ((k, _), g) in leaves.iter().zip(grads(&out.total, &inputs)) {
        assert!(
            flat(&g).iter().all(|v| v.is_finite()),
            "{what}: d/d{k} = {g:?}"
        );
    }
}

fn replace(t: &mut Option<Tensor>, f: impl Fn(&Tensor) -> Tensor) {
    if let Some(old) = t.take() {
        *t = Some(f(&old.detach()).set_requires_grad(old.requires_grad()));
    }
}

#[test]
fn no_nan_or_infinity_on_extreme_inputs() {
    let taus = [0.07, 1e-4, 1e-6, 1e3, 1e6];
    let mut cases: Vec<(String, TrustBatch, f64)> = Vec::new();
    for &tau in &taus {
        cases.push((
            format!("generic, tau {tau:e}"),
            random_batch(1, 4, 5, 8, 6),
            tau,
        ));

        let mut b = random_batch(2, 4, 5, 8, 6);
        for t in [
            &mut b.source_logits,
            &mut b.target_logits,
            &mut b.target_strong_logits,
        ] {
            replace(t, |x| x.sign() * 1e30);
        }
        cases.push((format!("logits +-1e30, tau {tau:e}"), b, tau));

        let mut b = random_batch(3, 4, 5, 8, 6);
        let same = Tensor::randn([1, 8], (Kind::Float, Device::Cpu));
        for t in [
            &mut b.source_features,
            &mut b.source_features_strong,
            &mut b.target_features,
            &mut b.target_features_strong,
        ] {
            replace(t, |x| same.expand_as(x).copy());
        }
        cases.push((format!("identical features, tau {tau:e}"), b, tau));

        let mut b = random_batch(4, 4, 5, 8, 6);
        for t in [
            &mut b.source_features,
            &mut b.source_features_strong,
            &mut b.target_features,
            &mut b.target_features_strong,
        ] {
            replace(t, |x| x.zeros_like());
        }
        cases.push((format!("zero features, tau {tau:e}"), b, tau));

        for scale in [1e30, 1e-30, 1e-44] {
            let mut b = random_batch(5, 4, 5, 8, 6);
            for t in [&mut b.source_features, &mut b.target_features_strong] {
                replace(t, |x| x * scale);
            }
            cases.push((format!("features x {scale:e}, tau {tau:e}"), b, tau));
        }

        let mut b = random_batch(6, 4, 5, 8, 6);
        let same = Tensor::rand([1, 6], (Kind::Float, Device::Cpu));
        for t in [
            &mut b.source_caption_features,
            &mut b.target_caption_features,
        ] {
            replace(t, |x| same.expand_as(x).copy());
        }
        cases.push((format!("identical captions, tau {tau:e}"), b, tau));

        let mut b = random_batch(7, 4, 5, 8, 6);
        for t in [
            &mut b.source_caption_features,
            &mut b.target_caption_features,
        ] {
            replace(t, |x| x.zeros_like());
        }
        cases.push((format!("zero captions, tau {tau:e}"), b, tau));

        let mut b = random_batch(8, 4, 5, 8, 6);
        for t in [
            &mut b.source_caption_features,
            &mut b.target_caption_features,
        ] {
            replace(t, |x| x.sign() * 1e30 - 0.5e30);
        }
        cases.push((format!("huge signed captions, tau {tau:e}"), b, tau));

        // near-duplicate captions: S a hair below 1, the smallest non-zero negative mass
        let mut b = random_batch(9, 4, 5, 8, 6);
        let same = Tensor::rand([1, 6], (Kind::Float, Device::Cpu)) + 1.0;
        for t in [
            &mut b.source_caption_features,
            &mut b.target_caption_features,
        ] {
            replace(t, |x| same.expand_as(x) + (x - 0.5) * 1e-4);
        }
        cases.push((format!("near-identical captions, tau {tau:e}"), b, tau));
    }
    for (what, batch, tau) in &cases {
        assert_finite(what, batch, *tau, 0.07);
        assert_finite(&format!("{what}, tau_base = tau"), batch, *tau, *tau);
        let (lo, hi) = TEMPERATURE_RANGE;
        assert_finite(&format!("{what}, tau_base {lo:e}"), batch, *tau, lo);
        assert_finite(&format!("{what}, tau_base {hi:e}"), batch, *tau, hi);
    }
}

/// The contrastive function on its own, with temperatures far below what trust_loss
/// accepts: still finite in value and gradient.
#[test]
fn contrastive_is_finite_for_any_positive_tau() {
    for tau in [1e-10, 1e-20, 1e-30, 1e-38, 1e-45] {
        for (what, scale) in [
            ("generic", 1.0),
            ("tiny", 1e-30),
            ("huge", 1e30),
            ("zero", 0.0),
        ] {
            tch::manual_seed(11);
            let f = (Tensor::randn([16, 8], (Kind::Float, Device::Cpu)) * scale)
                .set_requires_grad(true);
            let caps = Tensor::rand([8, 6], (Kind::Float, Device::Cpu));
            let loss = soft_contrastive(&f, &caps, tau, 0.07);
            let v = scalar(&loss);
            assert!(v.is_finite(), "{what} features, tau {tau:e}: {v}");
            let g = grads(&loss, &[&f]);
            assert!(
                flat(&g[0]).iter().all(|x| x.is_finite()),
                "{what} features, tau {tau:e}: gradient"
            );
        }
    }
}

/// A cross-entropy beyond float32 (logits of +-3e38) is reported as an error naming the
/// term, never returned as infinity or NaN.
#[test]
fn a_loss_beyond_float32_is_an_error_not_a_number() {
    let mut b = random_batch(12, 4, 5, 8, 6);
    replace(&mut b.source_logits, |x| x.sign() * 3e38);
    match trust_loss(&b, &LossTerms::default(), 0.07, 0.07) {
        Err(LossError::NonFiniteLoss { term: "src", .. }) => {}
        other => panic!("expected a non-finite `src` error, got {other:?}"),
    }
}

#[test]
fn contrastive_gradient_reaches_the_features() {
    // The authors' script computes these features under no_grad; here L_ctr must move h.
    let case = Case::load("random");
    let x = case.leaves();
    let (tau, tau_base) = case.tau();
    let loss = soft_contrastive(&anchors(&x), &captions(&x), tau, tau_base);
    let inputs: Vec<&Tensor> = FEATURES.iter().map(|k| &x[*k]).collect();
    for (k, g) in FEATURES.iter().zip(grads(&loss, &inputs)) {
        let norm = scalar(&g.norm());
        assert!(norm > 1e-3, "dL_ctr/d{k} has norm {norm}");
    }
}

#[test]
fn switching_a_term_off_removes_it_from_the_total() {
    let case = Case::load("random");
    let (tau, tau_base) = case.tau();
    let x = case.leaves();
    let full = trust_loss(&batch_of(&x), &LossTerms::default(), tau, tau_base).unwrap();
    let v = [
        full.src.unwrap(),
        full.tgt.unwrap(),
        full.self_train.unwrap(),
        full.ctr.unwrap(),
    ];
    assert!((scalar(&full.total) - v.iter().sum::<f64>()).abs() < VALUE_TOL);
    for off in 0..4 {
        let mut scales = [1.0; 4];
        scales[off] = 0.0;
        let terms = LossTerms {
            src: scales[0],
            tgt: scales[1],
            self_train: scales[2],
            ctr: scales[3],
        };
        let out = trust_loss(&batch_of(&x), &terms, tau, tau_base).unwrap();
        let got = [out.src, out.tgt, out.self_train, out.ctr];
        assert!(got[off].is_none(), "term {off} should be off");
        let want: f64 = (0..4).filter(|&i| i != off).map(|i| v[i]).sum();
        assert!(
            (scalar(&out.total) - want).abs() < VALUE_TOL,
            "term {off} off: {} vs {want}",
            scalar(&out.total)
        );
    }
    // scaling
    let terms = LossTerms {
        tgt: 2.5,
        ctr: 0.5,
        ..LossTerms::default()
    };
    let out = trust_loss(&batch_of(&x), &terms, tau, tau_base).unwrap();
    let want = v[0] + 2.5 * v[1] + v[2] + 0.5 * v[3];
    assert!((scalar(&out.total) - want).abs() < VALUE_TOL);
    assert_eq!(out.tgt, full.tgt, "term values are reported unscaled");
}

#[test]
fn a_switched_off_term_needs_none_of_its_inputs() {
    let case = Case::load("random");
    let (tau, tau_base) = case.tau();
    let x = case.leaves();
    // source-only (the first ablation): nothing else is needed
    let only_src = TrustBatch {
        source_logits: Some(x["source_logits"].shallow_clone()),
        source_labels: Some(x["source_labels"].shallow_clone()),
        ..TrustBatch::default()
    };
    let terms = LossTerms {
        src: 1.0,
        tgt: 0.0,
        self_train: 0.0,
        ctr: 0.0,
    };
    let out = trust_loss(&only_src, &terms, tau, tau_base).unwrap();
    assert_value(
        "source only",
        scalar(&out.total),
        &case.fx["values"]["src"],
        VALUE_TOL,
    );
    assert_eq!((out.tgt, out.self_train, out.ctr), (None, None, None));

    // without L_ctr the features get no gradient at all
    let mut b = batch_of(&x);
    let no_ctr = LossTerms {
        ctr: 0.0,
        ..LossTerms::default()
    };
    let out = trust_loss(&b, &no_ctr, tau, tau_base).unwrap();
    let g = Tensor::run_backward(&[&out.total], &[&x["source_features"]], true, false);
    assert!(
        !g[0].defined(),
        "features must not be in the graph without L_ctr"
    );

    // ... and its inputs may then be absent; switched on, their absence is an error
    b.source_caption_features = None;
    b.target_features_strong = None;
    assert!(trust_loss(&b, &no_ctr, tau, tau_base).is_ok());
    match trust_loss(&b, &LossTerms::default(), tau, tau_base) {
        Err(LossError::MissingInput { term: "ctr", input }) => {
            assert_eq!(input, "source_features_strong".replace("source", "target"))
        }
        other => panic!("expected a missing-input error, got {other:?}"),
    }

    // L_self alone needs the weights and both target views but no pseudo-labels
    let mut b = batch_of(&x);
    b.pseudo_labels = None;
    let only_self = LossTerms {
        src: 0.0,
        tgt: 0.0,
        self_train: 1.0,
        ctr: 0.0,
    };
    let out = trust_loss(&b, &only_self, tau, tau_base).unwrap();
    assert_value(
        "self only",
        scalar(&out.total),
        &case.fx["values"]["self_train"],
        VALUE_TOL,
    );
    b.weights = None;
    assert!(matches!(
        trust_loss(&b, &only_self, tau, tau_base),
        Err(LossError::MissingInput {
            term: "self_train",
            input: "weights"
        })
    ));
}

#[test]
fn bad_batches_are_rejected_before_any_loss() {
    let case = Case::load("random");
    let (tau, tau_base) = case.tau();
    let x = case.leaves();
    let err = |b: &TrustBatch| match trust_loss(b, &LossTerms::default(), tau, tau_base) {
        Ok(_) => panic!("expected an error"),
        Err(e) => e.to_string(),
    };

    let mut b = batch_of(&x);
    b.source_labels = Some(Tensor::from_slice(&[0i64, 1, 5, 2]));
    assert_eq!(
        err(&b),
        "`source_labels`: label 5 at row 2 is outside [0, 5)"
    );
    let mut b = batch_of(&x);
    b.weights = Some(Tensor::from_slice(&[0.5f32, -0.1, 0.5, 0.5]));
    assert_eq!(
        err(&b),
        "`weights`: -0.10000000149011612 at row 1 is not a weight in [0, 1]"
    );
    let mut b = batch_of(&x);
    b.pseudo_labels = Some(Tensor::from_slice(&[0i64, 1, 2]));
    assert_eq!(
        err(&b),
        "`pseudo_labels` has 3 target rows but `target_logits` has 4"
    );
    let mut b = batch_of(&x);
    b.target_features = Some(Tensor::zeros([4, 7], (Kind::Float, Device::Cpu)));
    assert_eq!(
        err(&b),
        "`target_features` has 7 feature columns but `source_features` has 8"
    );
    let mut b = batch_of(&x);
    b.target_caption_features = Some(Tensor::full([4, 6], f64::NAN, (Kind::Float, Device::Cpu)));
    assert_eq!(
        err(&b),
        "`target_caption_features` holds 24 NaN or infinite value(s)"
    );
    let mut b = batch_of(&x);
    b.source_features = Some(Tensor::zeros([4, 2, 4], (Kind::Float, Device::Cpu)));
    assert!(err(&b).contains("expected a 2-D tensor"));

    // the crate's error type carries the message
    let e: trustflow_engine::Error = trust_loss(&b, &LossTerms::default(), tau, tau_base)
        .unwrap_err()
        .into();
    assert!(
        e.to_string()
            .starts_with("stage `train`: `source_features`")
    );
}
