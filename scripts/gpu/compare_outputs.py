#!/usr/bin/env python3
"""Compares two output folders of the same pipeline run on two execution providers (the
CPU run is the reference, the other normally CUDA): what scripts/gpu-check.sh calls
for its parity checks. Prints one JSON object (also written to --json) and exits 0 when
every check passes, 1 when one fails, 2 when the folders cannot be compared.

    python3 scripts/gpu/compare_outputs.py CPU_OUT CUDA_OUT [--atol 1e-3]
        [--classifier-onnx tests/fixtures/text_classifier/model/model.onnx]

Needs pyarrow only (no numpy), so it runs on any Python that can read Parquet.

What it checks, per output shard `<stem>.parquet` (rows joined on --id-column):
  - the same shards, row counts and ids on both sides, and the same quarantined ids
    (`<stem>.quarantine.parquet`) with the same `error_stage` and `error`;
  - float columns and lists of floats (clip_similarity, the embeddings, pseudo_prob,
    text_feature): the same nulls and list lengths, and max |cpu - other| <= --atol;
  - `pseudo_label` (and `pseudo_label_name`, which follows it): an argmax may flip only
    on a near-tie: every flipped row's top-2 probability margin must be < --margin-tol.
    With --classifier-onnx (the classifier whose `logits` are a Gemm of `text_feature`,
    as exported by scripts/fixtures/make_text_classifier.py) the margin is computed
    exactly from each side's text_feature; without it, it is estimated as
    |pseudo_prob_cpu - pseudo_prob_other| + the largest pseudo_prob difference on rows
    that did not flip;
  - `caption_final` (greedy decoding): the share of generated captions (rows whose
    caption_source is `generated` on the CPU side) that are identical must be at least
    --min-caption-share; `caption_source` itself must be equal;
  - every other column (ids, given captions, image bytes, labels): equal.
"""

import argparse
import json
import math
import struct
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

QUARANTINE_SUFFIX = ".quarantine.parquet"
LABEL = "pseudo_label"
LABEL_NAME = "pseudo_label_name"
PROB = "pseudo_prob"
FEATURE = "text_feature"
CAPTION = "caption_final"
CAPTION_SOURCE = "caption_source"


class Unusable(Exception):
    """The folders cannot be compared (exit code 2)."""


# ------------------------------------------------------------------ Parquet folders

def shards(folder):
    """{stem: path} of the output shards in `folder` (quarantine shards left out)."""
    if not folder.is_dir():
        raise Unusable(f"{folder} is not a folder")
    found = {}
    for p in sorted(folder.glob("*.parquet")):
        if p.name.endswith(QUARANTINE_SUFFIX):
            continue
        found[p.name[: -len(".parquet")]] = p
    return found


def read_sorted(path, id_column):
    table = pq.read_table(path)
    if id_column not in table.column_names:
        raise Unusable(f"{path} has no id column `{id_column}` (columns: {', '.join(table.column_names)})")
    return table.sort_by([(id_column, "ascending")])


def combined(column):
    return column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column


def is_float(t):
    return pa.types.is_floating(t)


def is_list(t):
    return pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t)


def is_float_like(t):
    return is_float(t) or (is_list(t) and is_float(t.value_type))


# ------------------------------------------------------------------ column comparisons

def float_diff(a, b):
    """Max abs difference of two aligned float (or list-of-float) arrays, with the
    problems that make them incomparable (null masks, list lengths, NaN positions)."""
    problems = []
    if not pc.is_null(a).equals(pc.is_null(b)):
        problems.append("null rows differ")
    if is_list(a.type):
        la, lb = pc.list_value_length(a), pc.list_value_length(b)
        if not pc.fill_null(pc.equal(la, lb), True).to_pylist() == [True] * len(la):
            problems.append("list lengths differ")
            return None, problems
        # Null lists contribute no values on either side (same null masks checked above).
        a = pc.list_flatten(a)
        b = pc.list_flatten(b)
        if len(a) != len(b):
            problems.append("list values differ in number")
            return None, problems
    a = a.cast(pa.float64())
    b = b.cast(pa.float64())
    nan_a, nan_b = pc.fill_null(pc.is_nan(a), False), pc.fill_null(pc.is_nan(b), False)
    if not nan_a.equals(nan_b):
        problems.append("NaN positions differ")
    diff = pc.abs(pc.subtract(a, b))
    diff = pc.filter(diff, pc.invert(pc.fill_null(pc.is_nan(diff), True)))
    worst = pc.max(diff).as_py() if len(diff) else 0.0
    return (0.0 if worst is None else worst), problems


def mismatches(a, b):
    """Row indexes where two aligned arrays differ (nulls compare equal to nulls)."""
    return [i for i, (x, y) in enumerate(zip(a.to_pylist(), b.to_pylist())) if x != y]


# ------------------------------------------------------------------ classifier head

def _varint(buf, i):
    value = shift = 0
    while True:
        byte = buf[i]
        i += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if byte < 0x80:
            return value, i


def _fields(buf):
    """(field number, wire type, value) of one protobuf message."""
    i, n = 0, len(buf)
    while i < n:
        key, i = _varint(buf, i)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, i = _varint(buf, i)
        elif wire == 1:
            value, i = buf[i:i + 8], i + 8
        elif wire == 5:
            value, i = buf[i:i + 4], i + 4
        elif wire == 2:
            length, i = _varint(buf, i)
            value, i = buf[i:i + length], i + length
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        yield number, wire, value


def _grouped(buf):
    out = {}
    for number, wire, value in _fields(buf):
        out.setdefault(number, []).append((wire, value))
    return out


def _tensor(buf):
    """(name, dims, float values) of an ONNX TensorProto holding float32."""
    f = _grouped(buf)
    name = f[8][0][1].decode() if 8 in f else ""
    dims = []
    for wire, v in f.get(1, []):
        if wire == 0:
            dims.append(v)
        else:  # packed
            j = 0
            while j < len(v):
                d, j = _varint(v, j)
                dims.append(d)
    data_type = f[2][0][1] if 2 in f else 0
    if data_type != 1:
        raise ValueError(f"initializer {name} is not float32 (type {data_type})")
    if 9 in f:
        raw = f[9][0][1]
        values = list(struct.unpack(f"<{len(raw) // 4}f", raw))
    else:
        values = []
        for wire, v in f.get(4, []):
            if wire == 5:
                values.append(struct.unpack("<f", v)[0])
            else:
                values.extend(struct.unpack(f"<{len(v) // 4}f", v))
    return name, dims, values


def classifier_head(path, logits_name, feature_name):
    """W (rows = classes), b, alpha, beta of the Gemm that maps `feature_name` to
    `logits_name` in an ONNX file, read with a minimal protobuf reader (no onnx
    package needed)."""
    model = _grouped(Path(path).read_bytes())
    graph = _grouped(model[7][0][1])
    inits = {}
    for _, buf in graph.get(5, []):
        try:
            name, dims, values = _tensor(buf)
        except ValueError:
            continue
        inits[name] = (dims, values)
    for _, buf in graph.get(1, []):
        node = _grouped(buf)
        op = node.get(4, [(2, b"")])[0][1].decode()
        inputs = [v.decode() for _, v in node.get(1, [])]
        outputs = [v.decode() for _, v in node.get(2, [])]
        if logits_name not in outputs:
            continue
        if op != "Gemm" or not inputs or inputs[0] != feature_name:
            raise ValueError(f"`{logits_name}` is made by {op}({', '.join(inputs)}), "
                             f"not by a Gemm of `{feature_name}`")
        attrs = {"alpha": 1.0, "beta": 1.0, "transA": 0, "transB": 0}
        for _, abuf in node.get(5, []):
            a = _grouped(abuf)
            aname = a[1][0][1].decode()
            if 2 in a:
                attrs[aname] = struct.unpack("<f", a[2][0][1])[0]
            elif 3 in a:
                attrs[aname] = a[3][0][1]
        if attrs["transA"]:
            raise ValueError("Gemm with transA is not supported")
        dims, w = inits[inputs[1]]
        rows, cols = dims
        if attrs["transB"]:
            weights = [w[r * cols:(r + 1) * cols] for r in range(rows)]
        else:  # [in, out]: transpose to one row per class
            weights = [[w[i * cols + c] for i in range(rows)] for c in range(cols)]
        bias = inits[inputs[2]][1] if len(inputs) > 2 and inputs[2] in inits else [0.0] * len(weights)
        if len(bias) == 1:
            bias = bias * len(weights)
        return weights, bias, float(attrs["alpha"]), float(attrs["beta"])
    raise ValueError(f"no node makes `{logits_name}`")


def top2_margin(feature, head):
    """Softmax probability of the top class minus that of the second."""
    weights, bias, alpha, beta = head
    logits = [alpha * sum(w * x for w, x in zip(row, feature)) + beta * b
              for row, b in zip(weights, bias)]
    top = max(logits)
    exps = [math.exp(v - top) for v in logits]
    total = sum(exps)
    probs = sorted((e / total for e in exps), reverse=True)
    return probs[0] - probs[1] if len(probs) > 1 else 1.0


# ------------------------------------------------------------------ one shard

def compare_shard(cpu_path, other_path, args, head, report):
    a = read_sorted(cpu_path, args.id_column)
    b = read_sorted(other_path, args.id_column)
    entry = {"rows_cpu": a.num_rows, "rows_other": b.num_rows}
    report["shards"][cpu_path.stem] = entry
    problems = report["problems"]
    if a.num_rows != b.num_rows or not combined(a[args.id_column]).equals(combined(b[args.id_column])):
        problems.append(f"{cpu_path.stem}: rows or ids differ ({a.num_rows} vs {b.num_rows})")
        return
    names_a, names_b = set(a.column_names), set(b.column_names)
    if names_a != names_b:
        problems.append(f"{cpu_path.stem}: columns differ: only cpu {sorted(names_a - names_b)}, "
                        f"only other {sorted(names_b - names_a)}")
    columns = report["columns"]
    flips = []
    for name in a.column_names:
        if name not in names_b:
            continue
        x, y = combined(a[name]), combined(b[name])
        col = columns.setdefault(name, {"type": str(x.type), "rows": 0})
        col["rows"] += len(x)
        if x.type != y.type:
            problems.append(f"{cpu_path.stem}.{name}: types differ ({x.type} vs {y.type})")
            continue
        if is_float_like(x.type):
            worst, issues = float_diff(x, y)
            for issue in issues:
                problems.append(f"{cpu_path.stem}.{name}: {issue}")
            if worst is not None:
                col["max_abs_diff"] = max(col.get("max_abs_diff", 0.0), worst)
                col["atol"] = args.atol
                if worst > args.atol:
                    col["pass"] = False
                else:
                    col.setdefault("pass", True)
            continue
        bad = mismatches(x, y)
        if name == LABEL:
            col["flips"] = col.get("flips", 0) + len(bad)
            flips = bad
        elif name == LABEL_NAME:
            col["mismatches"] = col.get("mismatches", 0) + len(bad)
            if set(bad) - set(flips_of(a, b)):
                problems.append(f"{cpu_path.stem}.{name}: differs on rows where {LABEL} does not")
        elif name == CAPTION:
            generated = [i for i, s in enumerate(combined(a[CAPTION_SOURCE]).to_pylist())
                         if s == "generated"] if CAPTION_SOURCE in names_a else list(range(len(x)))
            given_bad = [i for i in bad if i not in set(generated)]
            gen_bad = [i for i in bad if i in set(generated)]
            col["generated_rows"] = col.get("generated_rows", 0) + len(generated)
            col["generated_identical"] = col.get("generated_identical", 0) + len(generated) - len(gen_bad)
            if given_bad:
                problems.append(f"{cpu_path.stem}.{name}: {len(given_bad)} given captions differ")
            xs, ys = x.to_pylist(), y.to_pylist()
            examples = col.setdefault("examples", [])
            for i in gen_bad[: max(0, 3 - len(examples))]:
                examples.append({"cpu": xs[i], "other": ys[i]})
        else:
            col["mismatches"] = col.get("mismatches", 0) + len(bad)
            if bad:
                problems.append(f"{cpu_path.stem}.{name}: {len(bad)} rows differ")
    if flips:
        check_flips(a, b, flips, head, columns.setdefault(LABEL, {}), cpu_path.stem, problems)


def flips_of(a, b):
    if LABEL not in a.column_names or LABEL not in b.column_names:
        return []
    return mismatches(combined(a[LABEL]), combined(b[LABEL]))


def check_flips(a, b, flips, head, col, stem, problems):
    margins = []
    if head is not None and FEATURE in a.column_names:
        fa, fb = combined(a[FEATURE]).to_pylist(), combined(b[FEATURE]).to_pylist()
        for i in flips:
            margins.append(max(top2_margin(fa[i], head), top2_margin(fb[i], head)))
        col["margin_method"] = "exact (classifier head)"
    elif PROB in a.column_names:
        pa_, pb_ = combined(a[PROB]).to_pylist(), combined(b[PROB]).to_pylist()
        flipped = set(flips)
        agree = [abs(p - q) for i, (p, q) in enumerate(zip(pa_, pb_))
                 if i not in flipped and p is not None and q is not None]
        eps = max(agree, default=0.0)
        for i in flips:
            margins.append(abs(pa_[i] - pb_[i]) + eps)
        col["margin_method"] = "estimate (|pseudo_prob diff| + largest diff elsewhere)"
    else:
        problems.append(f"{stem}.{LABEL}: {len(flips)} flips and no way to tell their margins")
        return
    col["max_margin_at_flip"] = max(col.get("max_margin_at_flip", 0.0), max(margins))


# ------------------------------------------------------------------ quarantine

def compare_quarantine(cpu_dir, other_dir, args, report):
    q = report["quarantine"]
    for path in sorted(cpu_dir.glob("*" + QUARANTINE_SUFFIX)):
        other = other_dir / path.name
        if not other.exists():
            report["problems"].append(f"{path.name}: missing in {other_dir}")
            continue
        keys = [args.id_column, "error_stage", "error"]
        ta, tb = pq.read_table(path), pq.read_table(other)
        q["rows_cpu"] = q.get("rows_cpu", 0) + ta.num_rows
        q["rows_other"] = q.get("rows_other", 0) + tb.num_rows
        present = [k for k in keys if k in ta.column_names and k in tb.column_names]
        if args.id_column not in present:
            report["problems"].append(f"{path.name}: no `{args.id_column}` column")
            continue
        ra = sorted(tuple(r[k] for k in present) for r in ta.select(present).to_pylist())
        rb = sorted(tuple(r[k] for k in present) for r in tb.select(present).to_pylist())
        if ra != rb:
            report["problems"].append(
                f"{path.name}: quarantined rows differ ({len(set(ra) ^ set(rb))} rows in one only)")


# ------------------------------------------------------------------ main

def compare(args):
    cpu_dir, other_dir = Path(args.cpu_out), Path(args.other_out)
    report = {"cpu_out": str(cpu_dir), "other_out": str(other_dir), "shards": {},
              "columns": {}, "quarantine": {}, "problems": []}
    head = None
    if args.classifier_onnx:
        try:
            head = classifier_head(args.classifier_onnx, args.logits_output, args.feature_output)
        except (OSError, ValueError, KeyError, IndexError) as e:
            report["classifier_head_error"] = str(e)
    sa, sb = shards(cpu_dir), shards(other_dir)
    if not sa:
        raise Unusable(f"no output shards in {cpu_dir}")
    if set(sa) != set(sb):
        report["problems"].append(f"shards differ: cpu {sorted(sa)}, other {sorted(sb)}")
    for stem in sorted(set(sa) & set(sb)):
        compare_shard(sa[stem], sb[stem], args, head, report)
    compare_quarantine(cpu_dir, other_dir, args, report)

    cols = report["columns"]
    rows = sum(s["rows_cpu"] for s in report["shards"].values())
    report["rows"] = rows
    for name, col in cols.items():
        if col.get("pass") is False:
            report["problems"].append(f"{name}: max abs diff {col['max_abs_diff']:.3g} > atol {args.atol}")
    if LABEL in cols:
        col = cols[LABEL]
        col["margin_tol"] = args.margin_tol
        worst = col.get("max_margin_at_flip")
        if worst is not None and worst >= args.margin_tol:
            report["problems"].append(
                f"{LABEL}: {col.get('flips', 0)} flips, one with margin {worst:.3g} >= {args.margin_tol}")
    if CAPTION in cols:
        col = cols[CAPTION]
        n = col.get("generated_rows", 0)
        col["identical_share"] = (col.get("generated_identical", 0) / n) if n else None
        col["min_share"] = args.min_caption_share
        if n == 0:
            report["problems"].append(f"{CAPTION}: no generated captions to compare")
        elif col["identical_share"] < args.min_caption_share:
            report["problems"].append(
                f"{CAPTION}: {col['identical_share']:.3f} of generated captions identical "
                f"(< {args.min_caption_share})")
    report["pass"] = not report["problems"]
    return report


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("cpu_out", help="output folder of the CPU run (the reference)")
    parser.add_argument("other_out", help="output folder of the other run (CUDA)")
    parser.add_argument("--id-column", default="id")
    parser.add_argument("--atol", type=float, default=1e-3,
                        help="largest allowed |cpu - other| of float columns (default 1e-3)")
    parser.add_argument("--margin-tol", type=float, default=1e-3,
                        help="a pseudo_label flip passes only below this top-2 margin (default 1e-3)")
    parser.add_argument("--min-caption-share", type=float, default=0.95,
                        help="smallest share of identical generated captions (default 0.95)")
    parser.add_argument("--classifier-onnx", help="the pseudo_label model, for exact flip margins")
    parser.add_argument("--logits-output", default="logits",
                        help="the classifier's logits output (pseudo_label's logits_output)")
    parser.add_argument("--feature-output", default="features",
                        help="the classifier's feature output (pseudo_label's feature_output)")
    parser.add_argument("--json", help="also write the report here")
    args = parser.parse_args(argv)
    try:
        report = compare(args)
        code = 0 if report["pass"] else 1
    except (Unusable, OSError, pa.ArrowException) as e:
        report = {"pass": False, "error": str(e)}
        code = 2
    text = json.dumps(report, indent=2, sort_keys=True, default=str)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")
    return code


if __name__ == "__main__":
    sys.exit(main())
