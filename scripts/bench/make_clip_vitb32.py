#!/usr/bin/env python3
"""A CLIP with the shape of OpenAI's ViT-B/32 (vision: 224 px, patch 32, 12 layers of
width 768; text: 12 layers of width 512, 77 tokens; projection 512) and random
weights, exported to ONNX in Optimum's layout. Random weights cost exactly what the
real ones cost, so this is the model-bound benchmark model (`trustflow bench ceiling`).
Too large to commit (about 600 MB); written outside the repository:

    $(bash scripts/fixtures/setup-venv.sh) scripts/bench/make_clip_vitb32.py \
        [--out ~/.cache/trustflow/models/clip-vitb32-random]

The tokenizer is the tiny test CLIP's (tests/fixtures/clip/model/tokenizer.json): its
ids all lie inside this model's 49,408-token vocabulary, and token counts (what costs
time) are those of real captions.
"""

import argparse
import os
import shutil
import sys
from pathlib import Path

import torch
from transformers import CLIPConfig, CLIPModel

# The ONNX export wrappers are the tiny test CLIP's, so both models have one layout.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "fixtures"))
from make_clip import TextExport, VisionExport, export  # noqa: E402

SEED = 32


def main():
    root = Path(__file__).resolve().parents[2]
    cache = Path(os.environ.get("TRUSTFLOW_CACHE", Path.home() / ".cache" / "trustflow"))
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=cache / "models" / "clip-vitb32-random")
    args = parser.parse_args()
    torch.manual_seed(SEED)
    out = args.out
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    tiny = root / "tests" / "fixtures" / "clip" / "model"
    for name in ("tokenizer.json", "tokenizer_config.json"):
        if (tiny / name).exists():
            shutil.copy(tiny / name, out / name)
    config = CLIPConfig(projection_dim=512)  # the defaults are ViT-B/32's shape
    config._attn_implementation = "eager"
    model = CLIPModel(config).eval()
    model.config.save_pretrained(out)
    (out / "preprocessor_config.json").write_text(
        '{\n  "crop_size": {"height": 224, "width": 224},\n  "do_center_crop": true,\n'
        '  "do_normalize": true,\n  "do_rescale": true,\n  "do_resize": true,\n'
        '  "image_mean": [0.48145466, 0.4578275, 0.40821073],\n'
        '  "image_std": [0.26862954, 0.26130258, 0.27577711],\n'
        '  "image_processor_type": "CLIPImageProcessor",\n  "resample": 3,\n'
        '  "rescale_factor": 0.00392156862745098,\n  "size": {"shortest_edge": 224}\n}\n')
    with torch.no_grad():
        export(VisionExport(model), (torch.zeros(2, 3, 224, 224),), out / "vision_model.onnx",
               ["pixel_values"], ["image_embeds"],
               {"pixel_values": {0: "batch_size"}, "image_embeds": {0: "batch_size"}})
        ids = torch.ones((2, 7), dtype=torch.int64)
        mask = torch.ones((2, 7), dtype=torch.int64)
        export(TextExport(model), (ids, mask), out / "text_model.onnx",
               ["input_ids", "attention_mask"], ["text_embeds"],
               {"input_ids": {0: "batch_size", 1: "sequence_length"},
                "attention_mask": {0: "batch_size", 1: "sequence_length"},
                "text_embeds": {0: "batch_size"}})
    print(out)


if __name__ == "__main__":
    main()
