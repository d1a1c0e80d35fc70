"""Index scale benchmark: ScaNN vs brute force inside an exported SavedModel.

For synthetic *clustered* catalogs (Gaussian clusters on the unit sphere, like trained item
embeddings, not uniform noise) of 100k and 1M items it reports build time, export size on disk,
ScaNN recall@10 against brute force, and single-query latency (p50/p95) of both exports after
reloading them, with the same index parameters ``trainer.export`` derives from the catalog size.

    python benchmarks/index_scale.py [--sizes 100000 1000000] [--dim 64] [--queries 300]

Writes ``benchmarks/results/index_scale.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")  # before TensorFlow: TFRS needs Keras 2

import tensorflow as tf  # noqa: E402
import tensorflow_recommenders as tfrs  # noqa: E402
from scann.scann_ops.py import scann_ops  # noqa: E402,F401  (registers the ops for loading)

from trainer.metrics import format_table  # noqa: E402
from trainer.serving_module import SAVE_NAMESPACES, IndexConfig  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def clustered(num: int, dim: int, clusters: int, rng: np.random.Generator) -> np.ndarray:
    centers = rng.normal(size=(clusters, dim)).astype(np.float32)
    labels = rng.integers(0, clusters, size=num)
    points = centers[labels] + 0.35 * rng.normal(size=(num, dim)).astype(np.float32)
    return points / np.linalg.norm(points, axis=1, keepdims=True)


class IndexModule(tf.Module):
    def __init__(self, embeddings: np.ndarray, config: IndexConfig):
        super().__init__()
        self.k = 10
        self.embeddings = tf.Variable(embeddings, trainable=False)
        self.scann = None
        if config.kind == "scann":
            self.scann = tfrs.layers.factorized_top_k.ScaNN(
                k=self.k,
                num_leaves=config.num_leaves,
                num_leaves_to_search=config.num_leaves_to_search,
                num_reordering_candidates=config.num_reordering_candidates,
            )
            self.scann.index(tf.constant(embeddings), tf.range(len(embeddings), dtype=tf.int32))

    @tf.function(input_signature=[tf.TensorSpec([None, None], tf.float32)])
    def search(self, queries):
        if self.scann is not None:
            scores, ids = self.scann(queries, k=self.k)
            return {"scores": scores, "ids": tf.cast(ids, tf.int32)}
        top = tf.math.top_k(tf.matmul(queries, self.embeddings, transpose_b=True), k=self.k)
        return {"scores": top.values, "ids": top.indices}


def dir_size(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


def run_size(num: int, dim: int, num_queries: int, rng: np.random.Generator, tmp: str) -> list:
    items = clustered(num, dim, clusters=max(50, num // 1000), rng=rng)
    queries = clustered(num_queries, dim, clusters=max(50, num // 1000), rng=rng)
    rows, answers = [], {}
    for kind in ("brute_force", "scann"):
        config = IndexConfig(kind=kind, max_k=10).resolved(num)
        start = time.time()
        module = IndexModule(items, config)
        module.search(queries[:1])
        build = time.time() - start
        path = os.path.join(tmp, f"{kind}-{num}")
        tf.saved_model.save(
            module,
            path,
            signatures={"serving_default": module.search},
            options=tf.saved_model.SaveOptions(namespace_whitelist=SAVE_NAMESPACES),
        )
        del module
        search = tf.saved_model.load(path).signatures["serving_default"]
        ids = search(tf.constant(queries))["ids"].numpy()
        latencies = []
        for q in queries:
            start = time.perf_counter()
            search(tf.constant(q[None, :]))
            latencies.append(1000 * (time.perf_counter() - start))
        answers[kind] = ids
        rows.append(
            {
                "items": num,
                "index": kind,
                "build_s": round(build, 2),
                "export_mb": round(dir_size(path) / 2**20, 1),
                "p50_ms": round(float(np.percentile(latencies, 50)), 3),
                "p95_ms": round(float(np.percentile(latencies, 95)), 3),
            }
        )
        shutil.rmtree(path)
        if kind == "scann":
            rows[-1]["leaves"] = f"{config.num_leaves}/{config.num_leaves_to_search}"
    recall = np.mean(
        [
            len(set(a) & set(b)) / 10
            for a, b in zip(answers["scann"], answers["brute_force"], strict=True)
        ]
    )
    for row in rows:
        row["recall@10"] = round(float(recall), 4) if row["index"] == "scann" else 1.0
    rows[-1]["speedup"] = round(rows[0]["p50_ms"] / rows[-1]["p50_ms"], 1)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--queries", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = np.random.default_rng(args.seed)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for num in args.sizes:
            print(f"building indexes over {num:,} clustered {args.dim}-d items...", flush=True)
            rows += run_size(num, args.dim, args.queries, rng, tmp)
            print(format_table(rows[-2:], list(rows[-1])), flush=True)
    columns = [
        "items",
        "index",
        "build_s",
        "export_mb",
        "recall@10",
        "p50_ms",
        "p95_ms",
        "speedup",
        "leaves",
    ]
    table = format_table(rows, columns)
    os.makedirs(RESULTS, exist_ok=True)
    with open(os.path.join(RESULTS, "index_scale.json"), "w") as f:
        json.dump(
            {
                "dim": args.dim,
                "queries": args.queries,
                "seed": args.seed,
                "cpu_cores": os.cpu_count(),
                "rows": rows,
            },
            f,
            indent=2,
        )
    with open(os.path.join(RESULTS, "index_scale.md"), "w") as f:
        f.write(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
