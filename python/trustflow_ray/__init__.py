"""Run a trustflow pipeline across a Ray cluster, exactly once per shard.

    python -m trustflow_ray run PIPELINE.yaml --input URI --out URI [--parts N]

See docs/ray.md. The driver lists the shards once (`trustflow plan`), runs one Ray task
per part (`trustflow run --shards FILE`, FILE holding that part's shards), and merges
the parts' reports into one.
"""

__version__ = "0.1.0"
