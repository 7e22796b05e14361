#!/usr/bin/env python3
"""The Python baseline of the benchmark harness (`trustflow bench run SPEC`, see
src/bench/harness.rs): the same work as a one-stage trustflow pipeline, written the way
a user of pyarrow + Pillow + onnxruntime + numpy + tokenizers would write it.

Two modes, matching the bench pipelines:

* `--mode clip` (benches/pipelines/clip-*.yaml, a single `clip_score` stage): read the
  shards in batches of `--batch-size` rows, decode each image with Pillow
  (`Image.open(...).convert("RGB")`, formats JPEG/PNG/WebP, size and pixel limits
  checked from the header first), CLIP-preprocess it as transformers'
  `CLIPImageProcessor` does (resize the shortest side with the configured Pillow filter,
  centre crop with zero padding, rescale, normalise, channels first; every setting from
  `preprocessor_config.json`), cut the caption to 75 characters and tokenise it with the
  `tokenizers` package from `tokenizer.json` (truncation to `config.json`'s
  `text_config.max_position_embeddings`, right padding with the pad token), run the two
  ONNX models once per batch, unit-normalise, take the cosine and write `clip_similarity`
  beside the canonical columns (and, with `--emit-embeddings`, the unit embeddings
  `clip_image_embedding` and `clip_text_embedding`, as the stage's `emit_embeddings`).
* `--mode decode` (pipelines/decode-only.yaml, a single `decode` stage): fully decode
  every image and write `width`, `height` and `image_format`.

Two decoders (`--decoder`):

* `pillow` (default): the reference above, whose pixels the engine matches byte for
  byte.
* `opencv`: a stronger peer, what img2dataset does. The header is still read by
  Pillow for the limits and the format (no pixels decoded), then `cv2.imdecode`
  (`IMREAD_COLOR | IMREAD_IGNORE_ORIENTATION`, as Pillow ignores EXIF orientation too)
  and BGR to RGB, and the resize is `cv2.resize` with img2dataset's defaults: area
  interpolation when shrinking, Lanczos when enlarging. The crop, rescale and normalise
  steps are the same. Its pixels are not the reference's (another resize filter; OpenCV
  also accepts some truncated files that Pillow refuses), so the harness compares its
  rows but does not expect equal values. OpenCV's own thread pool is limited to one
  thread (`cv2.setNumThreads(1)`): the pool's `--workers` threads are the budget, as
  for the engine.

Rows whose image is null, unreadable, over the limits or of another format, or whose
caption is null (clip mode), go to `<stem>.quarantine.parquet` with an `error` column,
as the engine's quarantine does. Output shards are `<out>/<stem>.parquet`, holding the
canonical columns present in the input (`id`, `image`, `caption`, `label`, `domain`,
`split`; img2dataset's `key`/`jpg` are renamed to `id`/`image`) plus the stage's
columns, written with the pipeline's compression in row groups of 1,024 rows.

Parallelism: `--workers` batches are processed at once, in order, with at most
2 x workers batches read ahead. `--pool thread` (the default, what a user writes
first) uses a ThreadPoolExecutor sharing one onnxruntime session per model (Pillow,
numpy and onnxruntime release the GIL in their heavy loops; the per-row Python code
does not). `--pool process` uses a ProcessPoolExecutor with one pair of sessions per
process (no GIL contention, but the models are loaded once per worker and batches are
pickled both ways). Each session gets `intra_op_num_threads = --intra-op-threads`
and `inter_op_num_threads = 1`: the same thread budget as the engine's stage
(`workers` x `intra_op_threads`). Unlike the engine (which serialises calls to one
session behind a mutex), concurrent threads call the shared session directly.

Prints one JSON line on stdout at the end: rows (in, out, quarantined), `wall_s` (from
the first read to the last write, after models are loaded: comparable with the
engine's `wall_s`, which also starts after plan time), `total_s` (from process start),
`rows_per_s` (rows in / wall_s), `cpu_seconds` (this process from the first read on,
plus the pool processes over their whole life), `cpu_utilisation` (cpu_seconds / wall_s),
`peak_rss_bytes` (this process's high-water mark) and `children_peak_rss_bytes` (the
largest worker process's, process pool only).

Environment: the reference venv (scripts/fixtures/setup-venv.sh) has numpy, Pillow 13,
tokenizers and onnxruntime 1.31.1 pinned; pyarrow comes from $TRUSTFLOW_PYLIBS
(scripts/setup.sh) on PYTHONPATH. Nothing is installed by this script.

    PYTHONPATH=$TRUSTFLOW_PYLIBS ~/.cache/trustflow/refvenv/bin/python \
        scripts/bench/python_baseline.py --mode clip --input CORPUS_DIR --out OUT_DIR \
        --model tests/fixtures/clip/model --batch-size 32 --workers 2 --intra-op-threads 1
"""

import time

PROCESS_START = time.monotonic()

import argparse  # noqa: E402
import collections  # noqa: E402
import concurrent.futures as cf  # noqa: E402
import glob  # noqa: E402
import io  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import resource  # noqa: E402
import sys  # noqa: E402
import warnings  # noqa: E402

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
from PIL import Image  # noqa: E402

cv2 = None  # imported by init_worker for --decoder opencv

CANONICAL = ["id", "image", "caption", "label", "domain", "split"]
RENAMES = {"key": "id", "jpg": "image"}
PIL_FORMATS = {"jpeg": "JPEG", "png": "PNG", "webp": "WEBP"}
CLIP_CAPTION_CHARS = 75
ROW_GROUP_ROWS = 1024

# Our own pixel limit is checked from the header below; make Pillow's bomb guard an
# error rather than a warning so that it can never decode a bomb either.
warnings.simplefilter("error", Image.DecompressionBombWarning)


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mode", choices=["clip", "decode"], required=True)
    p.add_argument("--input", action="append", required=True,
                   help="shard file, folder of shards or glob (may repeat)")
    p.add_argument("--out", required=True)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--intra-op-threads", type=int, default=1)
    p.add_argument("--pool", choices=["thread", "process"], default="thread")
    p.add_argument("--compression", choices=["snappy", "zstd", "none"], default="zstd")
    p.add_argument("--max-pixels", type=int, default=40_000_000)
    p.add_argument("--max-bytes", type=int, default=33_554_432)
    p.add_argument("--formats", default="jpeg,png,webp")
    p.add_argument("--decoder", choices=["pillow", "opencv"], default="pillow")
    # clip mode
    p.add_argument("--model", help="CLIP export folder (Optimum layout)")
    p.add_argument("--vision-model")
    p.add_argument("--text-model")
    p.add_argument("--tokenizer")
    p.add_argument("--config")
    p.add_argument("--preprocessor-config")
    p.add_argument("--text-output", default="text_embeds")
    p.add_argument("--caption-column", default="caption")
    p.add_argument("--emit-embeddings", action="store_true",
                   help="also write the unit embeddings, as clip_score's emit_embeddings")
    args = p.parse_args()
    if args.batch_size < 1 or args.workers < 1 or args.intra_op_threads < 0:
        p.error("--batch-size and --workers must be >= 1, --intra-op-threads >= 0")
    args.formats = [f.strip().lower() for f in args.formats.split(",") if f.strip()]
    unknown = [f for f in args.formats if f not in PIL_FORMATS]
    if unknown:
        p.error(f"unknown formats {unknown}; expected jpeg, png, webp")
    if args.mode == "clip":
        def file(explicit, name):
            if explicit:
                return explicit
            if not args.model:
                p.error(f"--model or --{name.replace('_', '-').split('.')[0]} is required")
            return os.path.join(args.model, name)
        args.vision_model = file(args.vision_model, "vision_model.onnx")
        args.text_model = file(args.text_model, "text_model.onnx")
        args.tokenizer = file(args.tokenizer, "tokenizer.json")
        args.config = file(args.config, "config.json")
        args.preprocessor_config = file(args.preprocessor_config, "preprocessor_config.json")
    return args


def shard_files(inputs):
    """Parquet shards named by files, folders or globs, skipping quarantine shards."""
    found = []
    for item in inputs:
        if os.path.isdir(item):
            paths = sorted(glob.glob(os.path.join(item, "*.parquet")))
        elif any(c in item for c in "*?["):
            paths = sorted(glob.glob(item))
        else:
            paths = [item]
        found.extend(p for p in paths if not p.endswith(".quarantine.parquet"))
    if not found:
        sys.exit(f"python_baseline: no Parquet shards in {inputs}")
    return found


# ---------------------------------------------------------------- images


def open_rgb(data, limits, decoder="pillow"):
    """RGB pixels of `data` as an (h, w, 3) uint8 array (OpenCV) or a Pillow image,
    and the format; or an exception saying why the image cannot be used."""
    max_bytes, max_pixels, formats = limits
    if len(data) > max_bytes:
        raise ValueError(f"image of {len(data)} bytes is over the limit of {max_bytes}")
    with Image.open(io.BytesIO(data), formats=[PIL_FORMATS[f] for f in formats]) as im:
        w, h = im.size
        if w * h > max_pixels:
            raise ValueError(f"image of {w}x{h} pixels is over the limit of {max_pixels}")
        fmt = (im.format or "").lower()
        if decoder == "pillow":
            return im.convert("RGB"), fmt  # decodes the whole image
    bgr = cv2.imdecode(np.frombuffer(data, np.uint8),
                       cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION)
    if bgr is None:
        raise ValueError("OpenCV cannot decode the image")
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB), fmt


def image_size(rgb):
    """(width, height) of a Pillow image or an (h, w, 3) array."""
    if isinstance(rgb, np.ndarray):
        return rgb.shape[1], rgb.shape[0]
    return rgb.size


class ClipPreprocessor:
    """transformers' CLIPImageProcessor (PIL backend) from preprocessor_config.json."""

    def __init__(self, path):
        with open(path) as f:
            c = json.load(f)
        self.do_resize = c.get("do_resize", True)
        size = c.get("size", {"shortest_edge": 224})
        if isinstance(size, int):
            size = {"shortest_edge": size}
        self.shortest = size.get("shortest_edge")
        self.exact = (size.get("height"), size.get("width"))
        self.resample = c.get("resample", 3)
        self.do_center_crop = c.get("do_center_crop", True)
        crop = c.get("crop_size", {"height": 224, "width": 224})
        if isinstance(crop, int):
            crop = {"height": crop, "width": crop}
        self.crop = (crop["height"], crop["width"])
        self.do_rescale = c.get("do_rescale", True)
        self.rescale = c.get("rescale_factor", 1 / 255)
        self.do_normalize = c.get("do_normalize", True)
        self.mean = np.array(c.get("image_mean", [0.48145466, 0.4578275, 0.40821073]), np.float32)
        self.std = np.array(c.get("image_std", [0.26862954, 0.26130258, 0.27577711]), np.float32)
        if not self.do_center_crop:
            raise SystemExit("python_baseline: needs do_center_crop (fixed-size batches)")

    def __call__(self, im):
        w, h = image_size(im)
        if self.do_resize:
            if self.shortest:
                short, long = (w, h) if w <= h else (h, w)
                new_long = int(self.shortest * long / short)
                nw, nh = (self.shortest, new_long) if w <= h else (new_long, self.shortest)
            else:
                nh, nw = self.exact
            if nw == 0 or nh == 0:
                raise ValueError(f"image of {w}x{h} pixels would be resized to {nw}x{nh}")
            if (nw, nh) != (w, h) and isinstance(im, np.ndarray):
                # img2dataset's defaults: area when shrinking, Lanczos when enlarging.
                shrink = nw <= w and nh <= h
                im = cv2.resize(im, (nw, nh), interpolation=cv2.INTER_AREA if shrink
                                else cv2.INTER_LANCZOS4)
            elif (nw, nh) != (w, h):
                im = im.resize((nw, nh), resample=self.resample)
        arr = np.asarray(im)
        rh, rw = arr.shape[:2]
        ch, cw = self.crop
        top, left = (rh - ch) // 2, (rw - cw) // 2
        out = np.zeros((ch, cw, 3), np.uint8)
        y0, y1 = max(top, 0), min(top + ch, rh)
        x0, x1 = max(left, 0), min(left + cw, rw)
        out[y0 - top:y1 - top, x0 - left:x1 - left] = arr[y0:y1, x0:x1]
        x = out.astype(np.float64)
        if self.do_rescale:
            x = x * self.rescale
        x = x.astype(np.float32)
        if self.do_normalize:
            x = (x - self.mean) / self.std
        return x.transpose(2, 0, 1)


# ---------------------------------------------------------------- models


class Clip:
    """The two ONNX sessions, the tokenizer and the preprocessor of one worker."""

    def __init__(self, args):
        import onnxruntime as ort
        from tokenizers import Tokenizer

        so = ort.SessionOptions()
        so.intra_op_num_threads = args.intra_op_threads
        so.inter_op_num_threads = 1
        providers = ["CPUExecutionProvider"]
        self.vision = ort.InferenceSession(args.vision_model, so, providers=providers)
        self.text = ort.InferenceSession(args.text_model, so, providers=providers)
        self.text_inputs = {i.name for i in self.text.get_inputs()}
        self.text_output = args.text_output
        with open(args.config) as f:
            config = json.load(f)
        context = (config.get("text_config") or {}).get("max_position_embeddings") or 77
        tok = Tokenizer.from_file(args.tokenizer)
        self.pad_id = self._pad_id(tok, args.tokenizer)
        tok.enable_truncation(max_length=context)
        tok.no_padding()
        self.tokenizer = tok
        self.pre = ClipPreprocessor(args.preprocessor_config)

    @staticmethod
    def _pad_id(tok, path):
        if tok.padding:
            return tok.padding["pad_id"]
        names = []
        cfg = os.path.join(os.path.dirname(path), "tokenizer_config.json")
        if os.path.exists(cfg):
            with open(cfg) as f:
                pad = json.load(f).get("pad_token")
            if isinstance(pad, dict):
                pad = pad.get("content")
            if pad:
                names.append(pad)
        for name in names + ["<|endoftext|>", "<pad>", "[PAD]"]:
            i = tok.token_to_id(name)
            if i is not None:
                return i
        raise SystemExit(f"python_baseline: {path}: no pad token")

    def embed(self, pixels, tokens):
        image = self.vision.run(["image_embeds"], {"pixel_values": np.stack(pixels)})[0]
        seq = max(len(t) for t in tokens)
        ids = np.full((len(tokens), seq), self.pad_id, np.int64)
        mask = np.zeros((len(tokens), seq), np.int64)
        for i, t in enumerate(tokens):
            ids[i, :len(t)] = t
            mask[i, :len(t)] = 1
        feeds = {"input_ids": ids}
        if "attention_mask" in self.text_inputs:
            feeds["attention_mask"] = mask
        text = self.text.run([self.text_output], feeds)[0]
        return image.astype(np.float64), text.astype(np.float64)


# ---------------------------------------------------------------- batches


def canonical(batch, caption):
    """The canonical columns of an input batch (renaming img2dataset's), in canonical
    order, plus the caption column when it has another name."""
    names = [RENAMES.get(n, n) for n in batch.schema.names]
    batch = pa.RecordBatch.from_arrays(batch.columns, names=names)
    keep = [n for n in CANONICAL if n in names]
    if caption and caption not in keep and caption in names:
        keep.append(caption)
    return batch.select(keep)


def warm_up(_):
    """A task that keeps a pool process busy long enough for the others to start."""
    time.sleep(0.3)
    return os.getpid()


def image_bytes(column):
    values = column.to_pylist()
    if pa.types.is_struct(column.type):  # Hugging Face Image feature {bytes, path}
        values = [v["bytes"] if v else None for v in values]
    return values


def split(batch, good, extra, bad):
    """(output batch of the `good` rows with `extra` columns, quarantine batch)."""
    out = None
    if good:
        out = batch.take(pa.array(good, pa.int64()))
        for name, arr in extra:
            out = out.append_column(name, arr)
    quarantine = None
    if bad:
        rows = [r for r, _ in bad]
        quarantine = batch.take(pa.array(rows, pa.int64()))
        quarantine = quarantine.append_column("error_stage", pa.array([STAGE] * len(bad)))
        quarantine = quarantine.append_column("error", pa.array([e for _, e in bad]))
    return out, quarantine


STAGE = "clip_score"
WORKER = None  # per-process state of the process pool (or the shared state of threads)


def clip_batch(batch):
    state, limits, caption_column, emit, decoder = WORKER
    images = image_bytes(batch.column("image"))
    captions = batch.column(caption_column).to_pylist()
    pixels, tokens, kept, bad = [], [], [], []
    for row, (data, caption) in enumerate(zip(images, captions)):
        if data is None:
            bad.append((row, "image is null"))
            continue
        if caption is None:
            bad.append((row, f"caption `{caption_column}` is null"))
            continue
        try:
            ids = state.tokenizer.encode(caption[:CLIP_CAPTION_CHARS]).ids
            if not ids:
                raise ValueError("tokenizer gave no tokens for the caption")
            rgb, _ = open_rgb(data, limits, decoder)
            pixels.append(state.pre(rgb))
        except Exception as e:  # a bad row, never a failed run
            bad.append((row, f"{type(e).__name__}: {e}"))
            continue
        tokens.append(ids)
        kept.append(row)
    good, similarity, units = [], [], ([], [])
    if kept:
        image, text = state.embed(pixels, tokens)
        image_norm = np.linalg.norm(image, axis=1)
        text_norm = np.linalg.norm(text, axis=1)
        for i, row in enumerate(kept):
            a, b = image_norm[i], text_norm[i]
            if not (np.isfinite(a) and np.isfinite(b) and a > 0 and b > 0):
                bad.append((row, "CLIP gave an embedding of zero (or non-finite) norm"))
                continue
            u, v = image[i] / a, text[i] / b
            good.append(row)
            similarity.append(float(np.dot(u, v)))
            if emit:
                units[0].append(u.astype(np.float32))
                units[1].append(v.astype(np.float32))
    bad.sort()
    extra = [("clip_similarity", pa.array(similarity, pa.float32()))]
    if emit and good:
        for name, vectors in zip(["clip_image_embedding", "clip_text_embedding"], units):
            flat = pa.array(np.concatenate(vectors), pa.float32())
            extra.append((name, pa.FixedSizeListArray.from_arrays(flat, len(vectors[0]))))
    return split(batch, good, extra, bad)


def decode_batch(batch):
    _, limits, _, _, decoder = WORKER
    good, bad, widths, heights, formats = [], [], [], [], []
    for row, data in enumerate(image_bytes(batch.column("image"))):
        if data is None:
            bad.append((row, "image is null"))
            continue
        try:
            rgb, fmt = open_rgb(data, limits, decoder)
        except Exception as e:
            bad.append((row, f"{type(e).__name__}: {e}"))
            continue
        good.append(row)
        w, h = image_size(rgb)
        widths.append(w)
        heights.append(h)
        formats.append(fmt)
    extra = [
        ("width", pa.array(widths, pa.uint32())),
        ("height", pa.array(heights, pa.uint32())),
        ("image_format", pa.array(formats, pa.string())),
    ]
    return split(batch, good, extra, bad)


def init_worker(args):
    global WORKER, STAGE, cv2
    limits = (args.max_bytes, args.max_pixels, args.formats)
    if args.decoder == "opencv":
        import cv2
        cv2.setNumThreads(1)
    if args.mode == "clip":
        STAGE = "clip_score"
        WORKER = (Clip(args), limits, args.caption_column, args.emit_embeddings, args.decoder)
    else:
        STAGE = "decode"
        WORKER = (None, limits, None, False, args.decoder)


# ---------------------------------------------------------------- output


class ShardWriter:
    """Buffers a shard's output batches and writes row groups of ROW_GROUP_ROWS rows."""

    def __init__(self, path, compression):
        self.path, self.compression = path, compression
        self.writer, self.pending, self.rows = None, [], 0

    def add(self, batch):
        if batch is None or batch.num_rows == 0:
            return
        self.pending.append(batch)
        self.rows += batch.num_rows
        if self.rows >= ROW_GROUP_ROWS:
            self.flush()

    def flush(self):
        if not self.pending:
            return
        table = pa.Table.from_batches(self.pending)
        if self.writer is None:
            self.writer = pq.ParquetWriter(self.path, table.schema, compression=self.compression)
        self.writer.write_table(table, row_group_size=ROW_GROUP_ROWS)
        self.pending, self.rows = [], 0

    def close(self):
        self.flush()
        if self.writer is not None:
            self.writer.close()


def main():
    args = parse_args()
    shards = shard_files(args.input)
    os.makedirs(args.out, exist_ok=True)
    work = clip_batch if args.mode == "clip" else decode_batch
    if args.pool == "process":
        pool = cf.ProcessPoolExecutor(args.workers, initializer=init_worker, initargs=(args,))
        # Start every worker (and load its models) before the clock starts, as the
        # engine builds its stages at plan time.
        list(pool.map(warm_up, range(args.workers)))
    else:
        init_worker(args)
        pool = cf.ThreadPoolExecutor(args.workers)
    compression = None if args.compression == "none" else args.compression
    caption = args.caption_column if args.mode == "clip" else None

    started = time.monotonic()
    cpu_started = resource.getrusage(resource.RUSAGE_SELF)
    rows_in = rows_out = rows_quarantined = 0
    window = collections.deque()

    def drain_one():
        nonlocal rows_out, rows_quarantined
        future, out, quarantine = window.popleft()
        good, bad = future.result()
        if good is not None:
            rows_out += good.num_rows
            out.add(good)
        if bad is not None:
            rows_quarantined += bad.num_rows
            quarantine.add(bad)

    for path in shards:
        stem = os.path.basename(path)[: -len(".parquet")] if path.endswith(".parquet") else os.path.basename(path)
        out = ShardWriter(os.path.join(args.out, stem + ".parquet"), compression)
        quarantine = ShardWriter(os.path.join(args.out, stem + ".quarantine.parquet"), compression)
        reader = pq.ParquetFile(path)
        names = reader.schema_arrow.names
        wanted = [n for n in names if RENAMES.get(n, n) in CANONICAL or n == caption]
        for batch in reader.iter_batches(batch_size=args.batch_size, columns=wanted):
            batch = canonical(batch, caption)
            rows_in += batch.num_rows
            window.append((pool.submit(work, batch), out, quarantine))
            while len(window) > 2 * args.workers:
                drain_one()
        while window:
            drain_one()
        out.close()
        quarantine.close()
    wall = time.monotonic() - started
    pool.shutdown(wait=True)

    me = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    # This process from the first read on; pool processes over their whole life (their
    # model loading included: their time is only known once they are reaped).
    cpu = (me.ru_utime + me.ru_stime - cpu_started.ru_utime - cpu_started.ru_stime
           + kids.ru_utime + kids.ru_stime)
    print(json.dumps({
        "mode": args.mode,
        "decoder": args.decoder,
        "pool": args.pool,
        "workers": args.workers,
        "intra_op_threads": args.intra_op_threads,
        "batch_size": args.batch_size,
        "shards": len(shards),
        "rows_in": rows_in,
        "rows_out": rows_out,
        "rows_quarantined": rows_quarantined,
        "wall_s": wall,
        "total_s": time.monotonic() - PROCESS_START,
        "rows_per_s": rows_in / max(wall, 1e-9),
        "cpu_seconds": cpu,
        "cpu_utilisation": cpu / max(wall, 1e-9),
        "peak_rss_bytes": me.ru_maxrss * 1024,
        "children_peak_rss_bytes": kids.ru_maxrss * 1024 if args.pool == "process" else None,
    }), flush=True)


if __name__ == "__main__":
    main()
