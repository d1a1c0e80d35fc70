"""Resumable sharded Parquet output: whole shards only, reused when a run is repeated.

The layout is the one ``python -m scoring.batch_score --help`` shows: ``part-NNNNN.parquet``
shards of :data:`COLUMNS`, ``_RUN.json`` (the settings, checked on resume) and the ``_SUCCESS``
manifest, written last.

Shard ``i`` holds users ``[i * shard_size, (i + 1) * shard_size)``. Every file is staged
(:mod:`common.staging`: a hidden temporary sibling, then a rename), so a killed run leaves only
whole shards and readers globbing ``part-*.parquet`` never see half of one; rerunning the same
command skips the shards on disk. Paths are local or ``gs://``.
"""

from __future__ import annotations

import io
import json
import math
import os
import re
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

from common import staging
from scoring import ScoringError

RUN_FILE = "_RUN.json"
SUCCESS_FILE = "_SUCCESS"
SHARD_PATTERN = "part-{:05d}.parquet"
_SHARD_RE = re.compile(r"part-(\d{5})\.parquet")
# What common.staging.staged_file names the temporaries of this module's files.
_TEMP_RE = re.compile(r"\.tmp-[0-9a-f]{8}-(part-\d{5}\.parquet|_RUN\.json|_SUCCESS)")
COLUMNS = ("user_id", "rank", "item_id", "title", "score")

#: Scores ``users[rows]`` into a table of :data:`COLUMNS`, calling ``on_batch(n)`` after each
#: batch of ``n`` users (the progress bar).
ScoreRows = Callable[[slice, Callable[[int], Any]], Any]


def arrow_schema():
    """The shards' pyarrow schema: :data:`COLUMNS` with their types."""
    import pyarrow as pa

    return pa.schema(
        [
            ("user_id", pa.string()),
            ("rank", pa.int32()),
            ("item_id", pa.string()),
            ("title", pa.string()),
            ("score", pa.float32()),
        ]
    )


def write_parquet(table, path: str) -> None:
    """Writes a pyarrow table to ``path`` (zstd), staged; an existing ``path`` is an error."""
    import pyarrow.parquet as pq

    buffer = io.BytesIO()
    pq.write_table(table, buffer, compression="zstd")
    staging.write_bytes(path, buffer.getvalue(), overwrite=False)


def _read_json(path: str) -> dict | None:
    import tensorflow as tf

    if not tf.io.gfile.exists(path):
        return None
    with tf.io.gfile.GFile(path) as f:
        return json.load(f)


def _parquet_rows(path: str) -> int:
    import pyarrow.parquet as pq
    import tensorflow as tf

    with tf.io.gfile.GFile(path, "rb") as f:
        return pq.ParquetFile(io.BytesIO(f.read())).metadata.num_rows


def _clean_temp_files(output: str) -> None:
    """Removes what a killed run left half-written (only names this module creates)."""
    import tensorflow as tf

    for name in tf.io.gfile.listdir(output):
        if _TEMP_RE.fullmatch(name):
            tf.io.gfile.remove(os.path.join(output, name))


def _start(output: str, fingerprint: dict[str, Any], overwrite: bool) -> dict[str, Any] | None:
    """Prepares ``output`` for a run with ``fingerprint``; a finished run's manifest, if any.

    Shards of the same settings stay; of other settings they are an error, or deleted with
    ``overwrite``.
    """
    import tensorflow as tf

    tf.io.gfile.makedirs(output)
    previous = _read_json(os.path.join(output, RUN_FILE))
    if previous is not None and previous != fingerprint:
        if not overwrite:
            changed = sorted(
                k for k in set(previous) | set(fingerprint) if previous.get(k) != fingerprint.get(k)
            )
            raise ScoringError(
                f"{output} holds shards written with other settings (differ: "
                f"{', '.join(changed)}); use a new --output or --overwrite"
            )
        for name in tf.io.gfile.listdir(output):
            if _SHARD_RE.fullmatch(name) or name in (RUN_FILE, SUCCESS_FILE):
                tf.io.gfile.remove(os.path.join(output, name))
    elif previous == fingerprint:
        done = _read_json(os.path.join(output, SUCCESS_FILE))
        if done is not None:
            return done
    _clean_temp_files(output)
    staging.write_json(os.path.join(output, RUN_FILE), fingerprint)
    return None


def write_shards(
    score_rows: ScoreRows,
    num_users: int,
    output: str,
    fingerprint: dict[str, Any],
    *,
    shard_size: int,
    overwrite: bool = False,
    progress: bool = True,
    desc: str = "scoring",
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Writes ``score_rows`` of every shard of ``num_users`` users to ``output``; resumable.

    Shards already on disk are kept when ``_RUN.json`` holds the same ``fingerprint`` (a
    finished run returns its manifest at once); a different fingerprint is a
    :class:`ScoringError` unless ``overwrite``, which deletes the old shards first.

    Returns the ``_SUCCESS`` manifest (also written to ``output``), ``extra`` merged in.
    """
    import tensorflow as tf
    from tqdm import tqdm

    done = _start(output, fingerprint, overwrite)
    if done is not None:
        return done
    num_shards = max(1, math.ceil(num_users / shard_size))
    started = time.time()
    stats = {"rows": 0, "skipped_shards": 0, "scored_users": 0}
    with tqdm(
        total=num_users, unit="user", desc=desc, disable=not progress, file=sys.stderr
    ) as bar:
        for shard in range(num_shards):
            rows = slice(shard * shard_size, min((shard + 1) * shard_size, num_users))
            path = os.path.join(output, SHARD_PATTERN.format(shard))
            if tf.io.gfile.exists(path):  # written whole by an earlier run (rename is atomic)
                stats["rows"] += _parquet_rows(path)
                stats["skipped_shards"] += 1
                bar.update(rows.stop - rows.start)
                continue
            table = score_rows(rows, bar.update)
            write_parquet(table, path)
            stats["rows"] += table.num_rows
            stats["scored_users"] += rows.stop - rows.start
    seconds = time.time() - started
    manifest = {
        "settings": fingerprint,
        **(extra or {}),
        "num_users": num_users,
        "num_rows": stats["rows"],
        "num_shards": num_shards,
        "shards": [SHARD_PATTERN.format(i) for i in range(num_shards)],
        "skipped_shards": stats["skipped_shards"],
        "scored_users_this_run": stats["scored_users"],
        "seconds_this_run": round(seconds, 3),
        "users_per_second": round(stats["scored_users"] / seconds, 1) if seconds > 0 else None,
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
        "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    staging.write_json(os.path.join(output, SUCCESS_FILE), manifest)
    return manifest


def iter_shard_paths(output_dir: str) -> Iterator[str]:
    """Paths of the shards present in ``output_dir``, in order."""
    import tensorflow as tf

    for name in sorted(tf.io.gfile.listdir(output_dir)):
        if _SHARD_RE.fullmatch(name):
            yield os.path.join(output_dir, name)


def read_results(output_dir: str):
    """Every shard of a scoring run (this package's or Beam's) as one pandas DataFrame.

    Columns :data:`COLUMNS`. Raises :class:`ScoringError` when the directory holds no shard; a
    run without ``_SUCCESS`` is read as far as it got.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq
    import tensorflow as tf

    if not tf.io.gfile.isdir(output_dir):
        raise ScoringError(f"{output_dir}: no such directory")
    paths = list(iter_shard_paths(output_dir))
    if not paths:
        raise ScoringError(f"{output_dir}: no part-*.parquet shards")
    tables = []
    for path in paths:
        with tf.io.gfile.GFile(path, "rb") as f:
            tables.append(pq.read_table(io.BytesIO(f.read())))
    return pa.concat_tables(tables).to_pandas()
