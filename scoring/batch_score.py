"""Batch scoring: top-k recommendations for every user of a split, to sharded Parquet.

``python -m scoring.batch_score (--export DIR | --server HOST:PORT) --data DIR --split p2
--output DIR -k 10 [--exclude-seen] [--diversity 0.3] [--shard-size 5000]``

Users come from the split's ``users.tfrecord`` (query features built from the whole train part),
are streamed through ``tf.data`` in batches and sent to the export's ``serving_default``
signature, either in process (``--export``: a version dir or a model base, whose highest numeric
version is used) or over gRPC to TF Serving / ``serving.server`` (``--server``).

Output layout (long format, one row per user and rank; rows whose id is the export's ``""``
padding are dropped)::

    OUTPUT/
      part-00000.parquet   user_id: string, rank: int32 (1-based), item_id: string,
      part-00001.parquet   title: string, score: float32
      ...
      _RUN.json            the settings the shards were written with (checked on resume)
      _SUCCESS             JSON manifest written last: counts, settings, timing

Shard ``i`` holds users ``[i * shard_size, (i + 1) * shard_size)`` in ``users.tfrecord`` order.
Each shard is written to a hidden temp name and renamed (:mod:`scoring.shards`), so a killed run
leaves only whole shards; rerunning the same command skips them. Paths are local or ``gs://``.

The notebook's library: :func:`score_users` here, the backends in :mod:`scoring.backends`,
the shard reader in :mod:`scoring.shards` and the analysis in :mod:`scoring.analysis`.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections import defaultdict
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from common import cli
from scoring import shards
from scoring.backends import (
    QUERY_INPUTS,
    ExportScorer,
    Retriever,
    ServerScorer,
    absolute,
    check_k,
    decode,
    encode,
)
from scoring.cli import batch_score_parser
from trainer.data import records, schema

# --------------------------------------------------------------------------- inputs


def seen_items(
    data_dir: str, split: str, parts: Sequence[str] = ("train",)
) -> dict[str, list[str]]:
    """Item ids each user rated in ``parts`` of ``split`` (in file order, duplicates kept once)."""
    seen: dict[str, dict[str, None]] = defaultdict(dict)  # dict keeps order and dedups
    for part in parts:
        events = records.load_events(data_dir, split, part)
        for user, item in zip(events["user_id"], events["item_id"], strict=True):
            seen[user][item] = None
    return {user: list(items) for user, items in seen.items()}


def user_batches(
    users: dict[str, np.ndarray],
    batch_size: int,
    seen: dict[str, list[str]] | None = None,
    rows: slice = slice(None),
):
    """A ``tf.data`` pipeline of request batches over ``users[rows]``.

    Yields dicts: query features (``tf.string`` ``[B]``, ``history`` ``[B, H]``) and
    ``exclude_item_ids`` ``[B, E]`` (``E >= 1``, padded with ``""``, which no item id equals).
    Exclusions travel ragged and are padded per batch, so one heavy user does not widen every
    request.
    """
    import tensorflow as tf

    features = {n: encode(users[n][rows]) for n in QUERY_INPUTS}
    ids = users["user_id"][rows]
    lists = [(seen or {}).get(u, []) for u in ids]
    flat = encode(np.array([i for items in lists for i in items], dtype=object))
    exclude = tf.RaggedTensor.from_row_lengths(
        tf.constant(flat, tf.string, shape=[len(flat)]),
        tf.constant([len(items) for items in lists], tf.int64, shape=[len(lists)]),
    )
    ds = tf.data.Dataset.from_tensor_slices({**features, "exclude_item_ids": exclude})

    def dense(batch):
        padded = batch["exclude_item_ids"].to_tensor(default_value="")
        padded = tf.pad(
            padded, [[0, 0], [0, tf.maximum(0, 1 - tf.shape(padded)[1])]], constant_values=""
        )
        return {**batch, "exclude_item_ids": padded}

    return ds.batch(batch_size).map(dense, num_parallel_calls=tf.data.AUTOTUNE).prefetch(2)


# --------------------------------------------------------------------------- scoring


def _to_table(user_ids: np.ndarray, out: dict[str, np.ndarray]):
    """One batch's ``[B, k]`` outputs -> long pyarrow table, padding rows dropped."""
    import pyarrow as pa

    item_ids = np.asarray(out["item_ids"], dtype=object)
    batch, k = item_ids.shape
    titles = np.asarray(out.get("titles", np.full((batch, k), "", dtype=object)), dtype=object)
    scores = np.asarray(out["scores"], dtype=np.float32)
    keep = (item_ids != "").reshape(-1)
    columns = {
        "user_id": np.repeat(decode(user_ids), k)[keep],
        "rank": np.tile(np.arange(1, k + 1, dtype=np.int32), batch)[keep],
        "item_id": item_ids.reshape(-1)[keep],
        "title": titles.reshape(-1)[keep],
        "score": scores.reshape(-1)[keep],
    }
    return pa.table(columns, schema=shards.arrow_schema())


def score_table(
    scorer: Retriever,
    users: dict[str, np.ndarray],
    k: int,
    *,
    seen: dict[str, list[str]] | None = None,
    diversity: float = 0.0,
    batch_size: int = 256,
    rows: slice = slice(None),
    on_batch: Callable[[int], Any] | None = None,
):
    """Top-``k`` of ``users[rows]`` as a long pyarrow table (columns ``shards.COLUMNS``).

    ``on_batch(n)`` is called after each batch of ``n`` users (progress bars).
    """
    import pyarrow as pa

    tables = []
    for batch in user_batches(users, batch_size, seen, rows).as_numpy_iterator():
        features = {n: batch[n] for n in QUERY_INPUTS}
        out = scorer.retrieve(features, k, batch["exclude_item_ids"], diversity)
        tables.append(_to_table(batch["user_id"], out))
        if on_batch is not None:
            on_batch(len(batch["user_id"]))
    return pa.concat_tables(tables) if tables else shards.arrow_schema().empty_table()


def score_users(
    scorer: Retriever,
    users: dict[str, np.ndarray],
    k: int,
    *,
    seen: dict[str, list[str]] | None = None,
    diversity: float = 0.0,
    batch_size: int = 256,
):
    """Top-``k`` of every user as a pandas DataFrame (one row per user and rank).

    Args:
      scorer: an :class:`~scoring.backends.ExportScorer`, a
        :class:`~scoring.backends.ServerScorer` or anything :class:`~scoring.backends.Retriever`.
      users: :func:`trainer.data.records.load_users` output (``U`` users).
      k: list length (at most the export's ``max_k``).
      seen: user id -> item ids never to recommend (``exclude_item_ids``), or ``None``.
      diversity: MMR λ in ``[0, 1]`` (0 = plain top-k).
    """
    check_k(k, getattr(scorer, "max_k", None))
    return score_table(
        scorer, users, k, seen=seen, diversity=diversity, batch_size=batch_size
    ).to_pandas()


# --------------------------------------------------------------------------- sharded output


@dataclasses.dataclass
class ScoreConfig:
    """Settings that decide what the shards contain (``_RUN.json``), plus run-only knobs."""

    data: str
    split: str
    output: str
    k: int = 10
    diversity: float = 0.0
    exclude_seen: bool = False
    exclude_parts: tuple[str, ...] = ("train",)
    shard_size: int = 5000
    batch_size: int = 256  # does not change results; not part of the resume check
    progress: bool = True

    def fingerprint(self, scorer: Retriever, num_users: int) -> dict[str, Any]:
        """What must match for a rerun to reuse existing shards."""
        return {
            "data": absolute(self.data),
            "split": self.split,
            "k": self.k,
            "diversity": self.diversity,
            "exclude_seen": self.exclude_seen,
            "exclude_parts": list(self.exclude_parts) if self.exclude_seen else [],
            "shard_size": self.shard_size,
            "num_users": num_users,
            "model": scorer.describe(),
        }


def score_to_shards(
    scorer: Retriever,
    users: dict[str, np.ndarray],
    config: ScoreConfig,
    seen: dict[str, list[str]] | None = None,
    *,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Scores every user into ``config.output/part-NNNNN.parquet``; resumable.

    Shards already on disk are kept when ``_RUN.json`` shows the same settings (a finished run
    returns its manifest at once); different settings are an error unless ``overwrite``, which
    deletes the old shards first. Settings include the model's identity: the export's version
    dir, or the versions the server reports as available.

    Returns the ``_SUCCESS`` manifest (also written to the output dir).
    """
    check_k(config.k, getattr(scorer, "max_k", None))
    num_users = len(users["user_id"])

    def score_rows(rows: slice, on_batch: Callable[[int], Any]):
        return score_table(
            scorer,
            users,
            config.k,
            seen=seen,
            diversity=config.diversity,
            batch_size=config.batch_size,
            rows=rows,
            on_batch=on_batch,
        )

    return shards.write_shards(
        score_rows,
        num_users,
        config.output,
        config.fingerprint(scorer, num_users),
        shard_size=config.shard_size,
        overwrite=overwrite,
        progress=config.progress,
        desc=f"scoring {config.split}",
        extra={"batch_size": config.batch_size},
    )


# --------------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    return batch_score_parser()


def _validate(args: argparse.Namespace, parser: argparse.ArgumentParser) -> tuple[str, ...]:
    """Flag combinations argparse cannot check; the parts ``--exclude-seen`` removes."""
    if bool(args.export) == bool(args.server):
        parser.error("give exactly one of --export DIR or --server HOST:PORT")
    if args.k < 1:
        parser.error(f"-k must be at least 1, got {args.k}")
    for flag in ("batch_size", "shard_size"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')} must be at least 1")
    if not 0.0 <= args.diversity <= 1.0:
        parser.error(f"--diversity must be in [0, 1], got {args.diversity}")
    if args.timeout <= 0:
        parser.error("--timeout must be positive")
    parts = tuple(p.strip() for p in args.exclude_parts.split(",") if p.strip())
    allowed = schema.PARTS[args.split]
    bad = [p for p in parts if p not in allowed]
    if bad or not parts:
        parser.error(
            f"--exclude-parts must name parts of {args.split} ({', '.join(allowed)}), "
            f"got {args.exclude_parts!r}"
        )
    return parts


def _run(args: argparse.Namespace, config: ScoreConfig) -> int:
    scorer = None
    try:
        # Data first: it is cheap to check and the usual mistake.
        records.part_files(args.data, args.split, "train")
        users = records.load_users(args.data, args.split)
        seen = (
            seen_items(args.data, args.split, config.exclude_parts) if args.exclude_seen else None
        )
        if args.export:
            scorer = ExportScorer(args.export, args.signature)
        else:
            scorer = ServerScorer(args.server, args.model_name, args.signature, args.timeout)
        manifest = score_to_shards(scorer, users, config, seen, overwrite=args.overwrite)
    except KeyboardInterrupt:
        print(
            f"\ninterrupted; shards written so far are kept in {args.output}. Run the same "
            "command again to resume.",
            file=sys.stderr,
        )
        return 130
    finally:
        if isinstance(scorer, ServerScorer):
            scorer.close()
    print(
        f"{manifest['num_users']} users, {manifest['num_rows']} rows in "
        f"{manifest['num_shards']} shard(s) under {args.output} "
        f"({manifest['skipped_shards']} kept from an earlier run, "
        f"{manifest['seconds_this_run']}s)"
    )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    config = ScoreConfig(
        data=args.data,
        split=args.split,
        output=args.output,
        k=args.k,
        diversity=args.diversity,
        exclude_seen=args.exclude_seen,
        exclude_parts=_validate(args, parser),
        shard_size=args.shard_size,
        batch_size=args.batch_size,
        progress=not args.no_progress,
    )
    return cli.run(lambda: _run(args, config))  # ScoringError, DataError: exit 2


if __name__ == "__main__":
    sys.exit(main())
