"""A 4:2:0 copy of a benchmark corpus: every JPEG that decodes is re-encoded by Pillow
(libjpeg-turbo) at quality 85 with 4:2:0 chroma subsampling, as most web photos are
stored; every other value (PNG, WebP, damaged bytes, captions) is kept as it is. The
corpus `trustflow bench gen` writes has 4:4:4 JPEGs only (the `image` crate's
encoder), which leaves out the chroma upsampling a decoder pays on real photos.

    $(bash scripts/fixtures/setup-venv.sh) scripts/bench/reencode_420.py SRC_DIR DST_DIR

Shards keep their names, 64-row row groups and zstd; the output is the same on every
run (Pillow's encoder is deterministic).
"""

import glob
import io
import os
import sys

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image


def reencode(value):
    if not value or value[:2] != b"\xff\xd8":
        return value, False
    try:
        with Image.open(io.BytesIO(value)) as image:
            image.load()
            out = io.BytesIO()
            image.save(out, "JPEG", quality=85, subsampling=2)
            return out.getvalue(), True
    except OSError:
        return value, False  # a damaged file stays damaged


def main() -> None:
    if len(sys.argv) != 3:
        sys.exit("usage: reencode_420.py SRC_DIR DST_DIR")
    src, dst = sys.argv[1:]
    shards = sorted(glob.glob(os.path.join(src, "*.parquet")))
    if not shards:
        sys.exit(f"reencode_420.py: no *.parquet in {src}")
    os.makedirs(dst, exist_ok=True)
    rows = changed = 0
    for shard in shards:
        table = pq.read_table(shard)
        index = table.schema.get_field_index("image")
        field = table.schema.field(index)
        values = []
        for value in table.column("image").to_pylist():
            value, done = reencode(value)
            values.append(value)
            rows += 1
            changed += done
        table = table.set_column(index, field, pa.array(values, type=field.type))
        pq.write_table(table, os.path.join(dst, os.path.basename(shard)), row_group_size=64, compression="zstd")
    print(f"{rows} rows, {changed} JPEGs re-encoded at 4:2:0, into {dst}", file=sys.stderr)


if __name__ == "__main__":
    main()
