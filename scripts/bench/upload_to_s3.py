"""Upload the *.parquet files of local folders to a bucket of an S3 server, for the
benchmark scripts: `upload_to_s3.py BUCKET PREFIX_OR_- DIR...`. Each folder goes under
PREFIX (or, with `-`, under the folder's own name). The bucket is created if needed.
The endpoint and credentials come from AWS_ENDPOINT_URL and AWS_* (boto3 ships with
moto: run with PYTHONPATH=$TRUSTFLOW_MOTO_DIR).
"""

import glob
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import boto3


def main() -> None:
    bucket, prefix, *folders = sys.argv[1:]
    s3 = boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"])
    # The server may still be starting.
    for _ in range(100):
        try:
            s3.create_bucket(Bucket=bucket)
            break
        except s3.exceptions.BucketAlreadyOwnedByYou:
            break
        except Exception:
            time.sleep(0.2)
    for folder in dict.fromkeys(folders):
        under = os.path.basename(folder.rstrip("/")) if prefix == "-" else prefix
        files = sorted(glob.glob(os.path.join(folder, "*.parquet")))
        with ThreadPoolExecutor(16) as pool:
            list(pool.map(lambda p: s3.upload_file(p, bucket, f"{under}/{os.path.basename(p)}"),
                          files))


if __name__ == "__main__":
    main()
