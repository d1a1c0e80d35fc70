"""Batch scoring: top-k recommendations for every user of a split, to sharded Parquet.

``python -m trainer.batch_score (--export DIR | --server HOST:PORT) --data DIR --split p2
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
Each shard is written to a hidden temp name and renamed, so a killed run leaves only whole
shards; rerunning the same command skips them. Paths go through ``tf.io.gfile`` (local or
``gs://``).

The functions here are also the notebook's library: :func:`score_users`, :class:`ExportScorer`,
:class:`ServerScorer`, :func:`write_shards`, :func:`read_results` and the analysis helpers at
the end (metrics of a scored table, exposure, genre mix, MMR trade-off, explanations).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import json
import math
import os
import re
import sys
import time
import uuid
from collections import defaultdict
from collections.abc import Iterator, Sequence
from typing import Any, Protocol

import numpy as np

import trainer  # noqa: F401  (TF_USE_LEGACY_KERAS before TensorFlow loads)
from trainer import metrics
from trainer.data import records, schema
from trainer.data.movielens import DataError

RETRIEVE_SIGNATURE = "serving_default"
EMBED_SIGNATURE = "candidate_embedding"
QUERY_FEATURES = (*schema.QUERY_STRING_FEATURES, "history")
RUN_FILE = "_RUN.json"
SUCCESS_FILE = "_SUCCESS"
SHARD_PATTERN = "part-{:05d}.parquet"
_SHARD_RE = re.compile(r"part-(\d{5})\.parquet")
# Written as a hidden name so readers globbing part-*.parquet never see a half-written shard.
_TMP_PREFIX = ".tmp-part-"
COLUMNS = ("user_id", "rank", "item_id", "title", "score")


class ScoringError(ValueError):
    """Batch scoring cannot run as asked (bad flags, missing model or data, unreachable server)."""


# --------------------------------------------------------------------------- scorers


class Retriever(Protocol):
    """What scoring needs from a model: the retrieve signature, in process or remote."""

    def retrieve(
        self,
        features: dict[str, np.ndarray],
        k: int,
        exclude_item_ids: np.ndarray,
        diversity: float,
    ) -> dict[str, np.ndarray]:
        """Query features (strings ``[B]``, ``history`` ``[B, H]``), exclusions ``[B, E]``.

        Returns ``item_ids`` / ``titles`` (``str`` object arrays) and ``scores`` float32, all
        ``[B, k]``.
        """

    def candidate_embeddings(
        self, catalog: dict[str, np.ndarray], batch_size: int = 512
    ) -> np.ndarray:
        """``[N, D]`` embeddings of the catalog's items, in catalog order."""

    def describe(self) -> dict[str, Any]:
        """JSON-ready identity of the model (recorded in the run manifest)."""


def _decode(values: np.ndarray) -> np.ndarray:
    """bytes -> str object array (any shape); other dtypes unchanged."""
    values = np.asarray(values)
    if values.dtype == object or values.dtype.kind == "S":
        return (
            np.vectorize(
                lambda v: v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v),
                otypes=[object],
            )(values)
            if values.size
            else values.astype(object)
        )
    return values


def _encode(values: np.ndarray) -> np.ndarray:
    """str -> bytes object array (what tf.constant and TensorProtos want for strings)."""
    values = np.asarray(values, dtype=object)
    if not values.size:
        return values
    return np.vectorize(
        lambda v: v if isinstance(v, bytes) else str(v).encode("utf-8"), otypes=[object]
    )(values)


def resolve_export_dir(path: str) -> str:
    """A SavedModel version dir from either that dir or a model base (highest numeric version).

    TF Serving ignores non-numeric folders (an exporter's ``.tmp-*``), and so does this.
    """
    import tensorflow as tf

    path = path.rstrip("/") or "/"
    if not tf.io.gfile.isdir(path):
        raise ScoringError(f"--export {path}: no such directory")
    if tf.io.gfile.exists(os.path.join(path, "saved_model.pb")):
        return path
    versions = sorted(
        (
            int(name.rstrip("/"))
            for name in tf.io.gfile.listdir(path)
            if re.fullmatch(r"\d+/?", name)
            and tf.io.gfile.exists(os.path.join(path, name.rstrip("/"), "saved_model.pb"))
        ),
        reverse=True,
    )
    if not versions:
        raise ScoringError(
            f"--export {path}: neither a SavedModel (no saved_model.pb) nor a model base with "
            "numeric version folders holding one"
        )
    return os.path.join(path, str(versions[0]))


def load_custom_ops() -> None:
    """Registers the TF Text and ScaNN ops an export uses; loading fails without them."""
    import tensorflow_text  # noqa: F401

    # A brute-force export needs no ScaNN; a ScaNN one then fails loudly on load.
    with contextlib.suppress(ImportError):
        from scann.scann_ops.py import scann_ops  # noqa: F401


class ExportScorer:
    """An export loaded in this process; calls its signatures directly.

    Args:
      path: a version dir (``.../movielens/3``) or a model base (``.../movielens``).
      signature: the retrieve signature's name.
    """

    def __init__(self, path: str, signature: str = RETRIEVE_SIGNATURE):
        import tensorflow as tf

        self._tf = tf
        self.path = resolve_export_dir(path)
        load_custom_ops()
        try:
            self.model = tf.saved_model.load(self.path)
        except (OSError, ValueError, tf.errors.OpError) as e:
            raise ScoringError(f"cannot load the SavedModel at {self.path}: {e}") from e
        if signature not in self.model.signatures:
            raise ScoringError(
                f"{self.path} has no signature {signature!r}; it has "
                f"{sorted(self.model.signatures)}"
            )
        self.signature = signature
        self.max_k = _export_max_k(self.path)

    def _call(self, signature: str, inputs: dict[str, Any]) -> dict[str, np.ndarray]:
        fn = self.model.signatures[signature]
        declared = fn.structured_input_signature[1]
        missing = sorted(set(declared) - set(inputs))
        if missing:
            raise ScoringError(
                f"signature {signature!r} needs inputs {missing} this tool does not provide"
            )
        tensors = {
            name: self._tf.constant(inputs[name], dtype=spec.dtype)
            for name, spec in declared.items()
        }
        try:
            outputs = fn(**tensors)
        except self._tf.errors.OpError as e:
            raise ScoringError(
                f"the model rejected the request: {e.message.splitlines()[0]}"
            ) from e
        return {name: _decode(value.numpy()) for name, value in outputs.items()}

    def retrieve(self, features, k, exclude_item_ids, diversity):
        batch = len(features["user_id"])
        inputs = {
            **{n: _encode(features[n]) for n in QUERY_FEATURES},
            "k": np.full([batch], k, np.int32),  # per query (every input has a batch dim)
            "exclude_item_ids": _encode(exclude_item_ids),
            "diversity": np.full([batch], diversity, np.float32),
        }
        return self._call(self.signature, inputs)

    def query_embeddings(self, features: dict[str, np.ndarray]) -> np.ndarray:
        """``[B, D]`` query embeddings (``query_embedding`` signature)."""
        inputs = {n: _encode(features[n]) for n in QUERY_FEATURES}
        return self._call("query_embedding", inputs)["embeddings"]

    def candidate_embeddings(self, catalog, batch_size=512):
        if EMBED_SIGNATURE not in self.model.signatures:
            raise ScoringError(f"{self.path} has no {EMBED_SIGNATURE!r} signature")
        return _embed_catalog(
            lambda inputs: self._call(EMBED_SIGNATURE, inputs), catalog, batch_size
        )

    def describe(self):
        return {
            "export": _absolute(self.path),
            "signature": self.signature,
        }


def _export_max_k(version_dir: str) -> int | None:
    """The export's largest allowed ``k``, from the exporter's metadata when it wrote one."""
    import tensorflow as tf

    path = os.path.join(version_dir, "assets.extra", "recall_check.json")
    if not tf.io.gfile.exists(path):
        return None
    try:
        with tf.io.gfile.GFile(path) as f:
            return int(json.load(f)["index"]["max_k"])
    except (KeyError, TypeError, ValueError):
        return None


def _embed_catalog(call, catalog: dict[str, np.ndarray], batch_size: int) -> np.ndarray:
    """Runs the ``candidate_embedding`` signature over the catalog in batches -> ``[N, D]``."""
    size = len(catalog["item_id"])
    parts = []
    for block in metrics.iter_blocks(size, batch_size):
        inputs = {n: _encode(catalog[n][block]) for n in schema.CANDIDATE_STRING_FEATURES}
        parts.append(np.asarray(call(inputs)["embeddings"], dtype=np.float32))
    return np.concatenate(parts) if parts else np.zeros((0, 0), np.float32)


class ServerScorer:
    """A model behind TF Serving (or ``serving.server``), through ``serving.client``.

    Checks at construction that the server answers and the model has the signature, so an
    unreachable server is a clear :class:`ScoringError`, not a traceback mid-run.
    """

    def __init__(
        self,
        target: str,
        model_name: str = "movielens",
        signature: str = RETRIEVE_SIGNATURE,
        timeout_s: float = 60.0,
    ):
        import grpc

        from serving.client import ServingClient

        if not re.fullmatch(r"[^\s:]+:\d{1,5}", target):
            raise ScoringError(f"--server must be HOST:PORT, got {target!r}")
        self._grpc = grpc
        self.target, self.model_name, self.signature = target, model_name, signature
        self.client = ServingClient(target, model_name, timeout_s=timeout_s, retries=2)
        try:
            signatures = self.client.metadata()
        except grpc.RpcError as e:
            self.client.close()
            code = e.code().name if hasattr(e, "code") else "UNKNOWN"
            details = e.details() if hasattr(e, "details") else str(e)
            if code in ("UNAVAILABLE", "DEADLINE_EXCEEDED"):
                raise ScoringError(
                    f"cannot reach a model server at {target} ({code}); is it "
                    "running and is the port its gRPC port?"
                ) from e
            raise ScoringError(f"server {target}, model {model_name!r}: {code}: {details}") from e
        if signature not in signatures:
            self.client.close()
            raise ScoringError(
                f"model {model_name!r} at {target} has no signature {signature!r}; "
                f"it has {sorted(signatures)}"
            )
        self.signatures = signatures
        self.max_k = None

    def _rpc(self, fn, *args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except self._grpc.RpcError as e:
            raise ScoringError(f"server {self.target}: {e.code().name}: {e.details()}") from e

    def retrieve(self, features, k, exclude_item_ids, diversity):
        columns = {n: _encode(features[n]) for n in QUERY_FEATURES}
        out = self._rpc(
            self.client.retrieve,
            columns,
            k=int(k),
            exclude_item_ids=list(_encode(exclude_item_ids)),
            diversity=float(diversity),
            signature_name=self.signature,
        )
        return {name: _decode(value) for name, value in out.items()}

    def candidate_embeddings(self, catalog, batch_size=512):
        if EMBED_SIGNATURE not in self.signatures:
            raise ScoringError(f"model {self.model_name!r} has no {EMBED_SIGNATURE!r} signature")
        return _embed_catalog(
            lambda inputs: self._rpc(self.client.predict, inputs, EMBED_SIGNATURE),
            catalog,
            batch_size,
        )

    def describe(self):
        identity = {
            "server": self.target,
            "model_name": self.model_name,
            "signature": self.signature,
        }
        # A new version on the server is a different model: resuming must not mix the two.
        with contextlib.suppress(self._grpc.RpcError):  # no ModelService: identity by name
            identity["versions"] = sorted(
                s["version"] for s in self.client.status() if s["state"] == "AVAILABLE"
            )
        return identity

    def close(self) -> None:
        self.client.close()


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

    features = {n: _encode(users[n][rows]) for n in QUERY_FEATURES}
    ids = users["user_id"][rows]
    lists = [(seen or {}).get(u, []) for u in ids]
    flat = _encode(np.array([i for items in lists for i in items], dtype=object))
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
    return pa.table(
        {
            "user_id": pa.array(np.repeat(_decode(user_ids), k)[keep], pa.string()),
            "rank": pa.array(np.tile(np.arange(1, k + 1, dtype=np.int32), batch)[keep], pa.int32()),
            "item_id": pa.array(item_ids.reshape(-1)[keep], pa.string()),
            "title": pa.array(titles.reshape(-1)[keep], pa.string()),
            "score": pa.array(scores.reshape(-1)[keep], pa.float32()),
        }
    )


def _empty_table():
    import pyarrow as pa

    return pa.table(
        {
            "user_id": pa.array([], pa.string()),
            "rank": pa.array([], pa.int32()),
            "item_id": pa.array([], pa.string()),
            "title": pa.array([], pa.string()),
            "score": pa.array([], pa.float32()),
        }
    )


def score_table(
    scorer: Retriever,
    users: dict[str, np.ndarray],
    k: int,
    *,
    seen: dict[str, list[str]] | None = None,
    diversity: float = 0.0,
    batch_size: int = 256,
    rows: slice = slice(None),
    on_batch=None,
):
    """Top-``k`` of ``users[rows]`` as a long pyarrow table (columns :data:`COLUMNS`).

    ``on_batch(n)`` is called after each batch of ``n`` users (progress bars).
    """
    import pyarrow as pa

    tables = []
    for batch in user_batches(users, batch_size, seen, rows).as_numpy_iterator():
        features = {n: batch[n] for n in QUERY_FEATURES}
        out = scorer.retrieve(features, k, batch["exclude_item_ids"], diversity)
        tables.append(_to_table(batch["user_id"], out))
        if on_batch is not None:
            on_batch(len(batch["user_id"]))
    return pa.concat_tables(tables) if tables else _empty_table()


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
      scorer: an :class:`ExportScorer`, a :class:`ServerScorer` or anything :class:`Retriever`.
      users: :func:`trainer.data.records.load_users` output (``U`` users).
      k: list length (at most the export's ``max_k``).
      seen: user id -> item ids never to recommend (``exclude_item_ids``), or ``None``.
      diversity: MMR λ in ``[0, 1]`` (0 = plain top-k).
    """
    _check_k(k, getattr(scorer, "max_k", None))
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
            "data": _absolute(self.data),
            "split": self.split,
            "k": self.k,
            "diversity": self.diversity,
            "exclude_seen": self.exclude_seen,
            "exclude_parts": list(self.exclude_parts) if self.exclude_seen else [],
            "shard_size": self.shard_size,
            "num_users": num_users,
            "model": scorer.describe(),
        }


def _absolute(path: str) -> str:
    """Local paths made absolute (so a resume from another directory still matches)."""
    return path if "://" in path else os.path.abspath(path)


def _check_k(k: int, max_k: int | None) -> None:
    if k < 1:
        raise ScoringError(f"-k must be at least 1, got {k}")
    if max_k is not None and k > max_k:
        raise ScoringError(f"-k {k} is more than the export allows (max_k = {max_k})")


def _write_json(path: str, value: dict) -> None:
    import tensorflow as tf

    tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
    with tf.io.gfile.GFile(tmp, "w") as f:
        json.dump(value, f, indent=2, sort_keys=True)
    tf.io.gfile.rename(tmp, path, overwrite=True)


def _read_json(path: str) -> dict | None:
    import tensorflow as tf

    if not tf.io.gfile.exists(path):
        return None
    with tf.io.gfile.GFile(path) as f:
        return json.load(f)


def write_parquet(table, path: str) -> None:
    """Writes a pyarrow table to ``path`` atomically: hidden temp name, then rename."""
    import pyarrow.parquet as pq
    import tensorflow as tf

    buffer = io.BytesIO()
    pq.write_table(table, buffer, compression="zstd")
    directory, name = os.path.split(path)
    tmp = os.path.join(directory, f"{_TMP_PREFIX}{name}.{uuid.uuid4().hex[:8]}")
    with tf.io.gfile.GFile(tmp, "wb") as f:
        f.write(buffer.getvalue())
    tf.io.gfile.rename(tmp, path, overwrite=False)


def _parquet_rows(path: str) -> int:
    import pyarrow.parquet as pq
    import tensorflow as tf

    with tf.io.gfile.GFile(path, "rb") as f:
        return pq.ParquetFile(io.BytesIO(f.read())).metadata.num_rows


def _clean_temp_files(output: str) -> None:
    """Removes what a killed run left half-written (only names this module creates)."""
    import tensorflow as tf

    for name in tf.io.gfile.listdir(output):
        if name.startswith(_TMP_PREFIX) or re.fullmatch(r"(_RUN\.json|_SUCCESS)\.tmp-\w+", name):
            tf.io.gfile.remove(os.path.join(output, name))


def write_shards(
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
    import tensorflow as tf
    from tqdm import tqdm

    _check_k(config.k, getattr(scorer, "max_k", None))
    num_users = len(users["user_id"])
    output = config.output
    fingerprint = config.fingerprint(scorer, num_users)
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
    _write_json(os.path.join(output, RUN_FILE), fingerprint)

    num_shards = max(1, math.ceil(num_users / config.shard_size))
    started = time.time()
    stats = {"rows": 0, "skipped_shards": 0, "scored_users": 0}
    with tqdm(
        total=num_users,
        unit="user",
        desc=f"scoring {config.split}",
        disable=not config.progress,
        file=sys.stderr,
    ) as bar:
        for shard in range(num_shards):
            rows = slice(shard * config.shard_size, min((shard + 1) * config.shard_size, num_users))
            path = os.path.join(output, SHARD_PATTERN.format(shard))
            if tf.io.gfile.exists(path):  # written whole by an earlier run (rename is atomic)
                stats["rows"] += _parquet_rows(path)
                stats["skipped_shards"] += 1
                bar.update(rows.stop - rows.start)
                continue
            table = score_table(
                scorer,
                users,
                config.k,
                seen=seen,
                diversity=config.diversity,
                batch_size=config.batch_size,
                rows=rows,
                on_batch=bar.update,
            )
            write_parquet(table, path)
            stats["rows"] += table.num_rows
            stats["scored_users"] += rows.stop - rows.start
    seconds = time.time() - started
    manifest = {
        "settings": fingerprint,
        "batch_size": config.batch_size,
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
    _write_json(os.path.join(output, SUCCESS_FILE), manifest)
    return manifest


def iter_shard_paths(output_dir: str) -> Iterator[str]:
    """Paths of the shards present in ``output_dir``, in order."""
    import tensorflow as tf

    for name in sorted(tf.io.gfile.listdir(output_dir)):
        if _SHARD_RE.fullmatch(name):
            yield os.path.join(output_dir, name)


def read_results(output_dir: str):
    """Every shard of a scoring run as one pandas DataFrame (columns :data:`COLUMNS`).

    Raises :class:`ScoringError` when the directory holds no shard; a run without
    ``_SUCCESS`` is read as far as it got.
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


# --------------------------------------------------------------------------- analysis


def _catalog_index(catalog: dict[str, np.ndarray]) -> dict[str, int]:
    return {str(item): i for i, item in enumerate(catalog["item_id"])}


def top_k_matrix(results, user_ids: Sequence[str], catalog: dict[str, np.ndarray], k: int):
    """A scored table -> ``[U, k]`` catalog indices in ``user_ids`` order (``-1`` = none)."""
    index = _catalog_index(catalog)
    position = {str(u): i for i, u in enumerate(user_ids)}
    top = np.full((len(user_ids), k), -1, dtype=np.int64)
    frame = results[results["rank"] <= k]
    rows = frame["user_id"].map(position)
    cols = frame["item_id"].map(index)
    ok = rows.notna().to_numpy() & cols.notna().to_numpy()
    top[rows[ok].astype(np.int64).to_numpy(), frame["rank"][ok].to_numpy() - 1] = (
        cols[ok].astype(np.int64).to_numpy()
    )
    return top


def truth_lists(
    data_dir: str,
    split: str,
    user_ids: Sequence[str],
    catalog: dict[str, np.ndarray],
    part: str = "test",
) -> list[np.ndarray]:
    """Each user's ``part`` items as catalog indices (the relevant sets of ``ranking_metrics``)."""
    index = _catalog_index(catalog)
    events = records.load_events(data_dir, split, part)
    groups: dict[str, list[int]] = defaultdict(list)
    for user, item in zip(events["user_id"], events["item_id"], strict=True):
        groups[user].append(index.get(item, -1))
    return [np.array(groups.get(u, []), dtype=np.int64) for u in user_ids]


def evaluate_results(
    results,
    data_dir: str,
    split: str,
    *,
    catalog: dict[str, np.ndarray] | None = None,
    item_embeddings: np.ndarray | None = None,
    ks: Sequence[int] = (10,),
    part: str = "test",
) -> dict[str, float]:
    """RecBole-style metrics of a scored table against ``part``, plus beyond-accuracy figures.

    The protocol is whatever the scoring run did: with ``--exclude-seen`` (train items) it is
    close to RecBole's full ranking on p1; on p2/p3 RecBole also removes valid items
    (``--exclude-parts train,valid``). Figures are over users with ``part`` items.
    """
    catalog = records.load_catalog(data_dir, split) if catalog is None else catalog
    user_ids = list(dict.fromkeys(results["user_id"]))
    top = top_k_matrix(results, user_ids, catalog, max(ks))
    out = metrics.ranking_metrics(top, truth_lists(data_dir, split, user_ids, catalog, part), ks)
    num_items = len(catalog["item_id"])
    k = max(ks)
    out[f"coverage@{k}"] = metrics.catalog_coverage(top, num_items)
    out[f"gini@{k}"] = metrics.gini_index(top, num_items)
    out[f"popularity_percentile@{k}"] = metrics.popularity_percentile(top, catalog["popularity"])
    if item_embeddings is not None:
        out[f"intra_list_diversity@{k}"] = metrics.intra_list_diversity(top, item_embeddings)
    return out


def lorenz_curve(results, num_items: int) -> tuple[np.ndarray, np.ndarray]:
    """Exposure Lorenz curve over the whole catalog (never-shown items count as 0).

    Returns ``(x, y)``, both ``[N + 1]`` from 0 to 1: the least-exposed ``x`` share of items
    gets the ``y`` share of all recommendation slots (the diagonal = equal exposure).
    """
    shown = results["item_id"].value_counts().to_numpy()
    if len(shown) > num_items:
        raise ValueError(f"{len(shown)} distinct items recommended, catalog has {num_items}")
    counts = np.sort(np.concatenate([np.zeros(num_items - len(shown)), shown]))
    x = np.linspace(0.0, 1.0, num_items + 1)
    total = counts.sum()
    y = np.concatenate([[0.0], np.cumsum(counts) / total]) if total else x.copy()
    return x, y


def genre_mix(item_ids: Sequence[str], catalog: dict[str, np.ndarray]) -> dict[str, float]:
    """Share of each genre among ``item_ids`` (an item with g genres counts 1/g to each)."""
    genres = {
        str(i): str(g).split("|")
        for i, g in zip(catalog["item_id"], catalog["item_genres"], strict=True)
    }
    totals: dict[str, float] = defaultdict(float)
    count = 0
    for item in item_ids:
        names = [g for g in genres.get(str(item), []) if g]
        if not names:
            continue
        count += 1
        for name in names:
            totals[name] += 1.0 / len(names)
    return {g: v / count for g, v in sorted(totals.items())} if count else {}


def diversity_tradeoff(
    scorer: Retriever,
    users: dict[str, np.ndarray],
    data_dir: str,
    split: str,
    lambdas: Sequence[float] = (0.0, 0.25, 0.5, 0.75),
    *,
    k: int = 10,
    seen: dict[str, list[str]] | None = None,
    catalog: dict[str, np.ndarray] | None = None,
    item_embeddings: np.ndarray | None = None,
    batch_size: int = 256,
) -> list[dict[str, float]]:
    """Recall@k and intra-list diversity of the export's own MMR at each λ (``diversity``)."""
    catalog = records.load_catalog(data_dir, split) if catalog is None else catalog
    if item_embeddings is None:
        item_embeddings = scorer.candidate_embeddings(catalog)
    rows = []
    for lam in lambdas:
        table = score_users(
            scorer, users, k, seen=seen, diversity=float(lam), batch_size=batch_size
        )
        result = evaluate_results(
            table, data_dir, split, catalog=catalog, item_embeddings=item_embeddings, ks=(k,)
        )
        rows.append(
            {
                "lambda": float(lam),
                f"recall@{k}": result[f"recall@{k}"],
                f"ndcg@{k}": result[f"ndcg@{k}"],
                f"intra_list_diversity@{k}": result[f"intra_list_diversity@{k}"],
                f"coverage@{k}": result[f"coverage@{k}"],
            }
        )
    return rows


def explain(
    results,
    users: dict[str, np.ndarray],
    catalog: dict[str, np.ndarray],
    item_embeddings: np.ndarray,
    user_ids: Sequence[str],
    *,
    top: int = 3,
    neighbours: int = 2,
) -> list[dict[str, Any]]:
    """For each user's first ``top`` recommendations, the nearest movies of their history.

    Nearness is the cosine between candidate-tower embeddings ``[N, D]`` (the export's
    ``candidate_embedding``): "recommended because you liked ...". Rows: user_id, rank, title,
    score, because (list of ``(history title, cosine)``).
    """
    index = _catalog_index(catalog)
    unit = item_embeddings / np.maximum(
        np.linalg.norm(item_embeddings, axis=1, keepdims=True), 1e-12
    )
    row_of = {str(u): i for i, u in enumerate(users["user_id"])}
    out = []
    for user in user_ids:
        history = [index[h] for h in users["history"][row_of[str(user)]] if h in index]
        recs = results[(results["user_id"] == str(user)) & (results["rank"] <= top)]
        for rec in recs.sort_values("rank").itertuples():
            item = index.get(rec.item_id)
            if item is None or not history:
                continue
            cosines = unit[history] @ unit[item]
            best = np.argsort(-cosines, kind="stable")[:neighbours]
            out.append(
                {
                    "user_id": str(user),
                    "rank": int(rec.rank),
                    "title": rec.title,
                    "score": float(rec.score),
                    "because": [
                        (str(catalog["item_title"][history[j]]), float(cosines[j])) for j in best
                    ],
                }
            )
    return out


# --------------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    from trainer.cli import batch_score_parser  # TF-free, so that --help answers before TF

    return batch_score_parser()


def _validate(args: argparse.Namespace, parser: argparse.ArgumentParser) -> tuple[str, ...]:
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


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    parts = _validate(args, parser)
    config = ScoreConfig(
        data=args.data,
        split=args.split,
        output=args.output,
        k=args.k,
        diversity=args.diversity,
        exclude_seen=args.exclude_seen,
        exclude_parts=parts,
        shard_size=args.shard_size,
        batch_size=args.batch_size,
        progress=not args.no_progress,
    )
    scorer = None
    try:
        # Data first: it is cheap to check and the usual mistake.
        records.part_files(args.data, args.split, "train")
        users = records.load_users(args.data, args.split)
        seen = seen_items(args.data, args.split, parts) if args.exclude_seen else None
        if args.export:
            scorer = ExportScorer(args.export, args.signature)
        else:
            scorer = ServerScorer(args.server, args.model_name, args.signature, args.timeout)
        manifest = write_shards(scorer, users, config, seen, overwrite=args.overwrite)
    except (ScoringError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
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


if __name__ == "__main__":
    sys.exit(main())
