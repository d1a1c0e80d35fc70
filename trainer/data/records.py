"""TFRecord storage of prepared data, and the ``tf.data`` readers over it.

Paths go through ``tf.io.gfile``, so a data directory can be local or on ``gs://``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping

import numpy as np
import tensorflow as tf

from trainer.data import schema
from trainer.data.movielens import DataError

MANIFEST = "manifest.json"


# --------------------------------------------------------------------------- writing


def _feature(value: object) -> tf.train.Feature:
    if isinstance(value, str):
        return tf.train.Feature(bytes_list=tf.train.BytesList(value=[value.encode("utf-8")]))
    if isinstance(value, float | np.floating):
        return tf.train.Feature(float_list=tf.train.FloatList(value=[float(value)]))
    if isinstance(value, int | np.integer):
        return tf.train.Feature(int64_list=tf.train.Int64List(value=[int(value)]))
    if (
        isinstance(value, list | tuple)
        and value
        and all(isinstance(v, float | np.floating) for v in value)
    ):
        return tf.train.Feature(float_list=tf.train.FloatList(value=[float(v) for v in value]))
    if isinstance(value, list | tuple):
        return tf.train.Feature(
            bytes_list=tf.train.BytesList(value=[str(v).encode("utf-8") for v in value])
        )
    raise TypeError(f"cannot store {type(value).__name__} in a tf.train.Example")


def to_example(record: Mapping[str, object]) -> bytes:
    """Serializes a flat dict of str / float / int / list-of-str / list-of-float values."""
    features = {name: _feature(value) for name, value in record.items()}
    return tf.train.Example(features=tf.train.Features(feature=features)).SerializeToString()


def shard_paths(directory: str, name: str, num_shards: int) -> list[str]:
    return [
        os.path.join(directory, f"{name}-{i:05d}-of-{num_shards:05d}.tfrecord")
        for i in range(num_shards)
    ]


def write_sharded(
    directory: str, name: str, records: Iterable[Mapping[str, object]], num_shards: int
) -> list[str]:
    """Writes records round-robin into ``num_shards`` files; returns their paths."""
    paths = shard_paths(directory, name, num_shards)
    writers = [tf.io.TFRecordWriter(path) for path in paths]
    try:
        for index, record in enumerate(records):
            writers[index % num_shards].write(to_example(record))
    finally:
        for writer in writers:
            writer.close()
    return paths


def write_file(path: str, records: Iterable[Mapping[str, object]]) -> str:
    """Writes records into the one file ``path`` (a table read whole: catalog, users)."""
    with tf.io.TFRecordWriter(path) as writer:
        for record in records:
            writer.write(to_example(record))
    return path


# --------------------------------------------------------------------------- reading


def read_manifest(data_dir: str) -> dict:
    """The manifest of a prepared data directory; a directory without one is not prepared."""
    path = os.path.join(data_dir, MANIFEST)
    if not tf.io.gfile.exists(path):
        raise DataError(
            f"{data_dir}: no {MANIFEST}; this is not a prepared data directory "
            "(run `python -m trainer.data prepare --output DIR` first)"
        )
    try:
        with tf.io.gfile.GFile(path) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: corrupt manifest ({e})") from e


def part_files(data_dir: str, split: str, part: str) -> list[str]:
    """The shard files of one part of one protocol, checked against the manifest."""
    manifest = read_manifest(data_dir)
    splits = manifest.get("splits", {})
    if split not in splits:
        raise DataError(f"{data_dir}: split {split!r} was not prepared (have: {sorted(splits)})")
    if part not in splits[split]["parts"]:
        raise DataError(
            f"{data_dir}: split {split!r} has no part {part!r} "
            f"(have: {sorted(splits[split]['parts'])})"
        )
    files = sorted(tf.io.gfile.glob(os.path.join(data_dir, split, f"{part}-*.tfrecord")))
    expected = splits[split]["parts"][part]["shards"]
    if len(files) != expected:
        raise DataError(
            f"{data_dir}/{split}: expected {expected} shards of {part!r}, found {len(files)}"
        )
    return files


def _history_length(data_dir: str) -> int:
    return int(read_manifest(data_dir).get("history_length", schema.HISTORY_LENGTH))


def user_history_length(data_dir: str) -> int:
    """Columns of ``history`` in ``users.tfrecord`` (older data dirs: the event length)."""
    manifest = read_manifest(data_dir)
    return int(manifest.get("user_history_length", _history_length(data_dir)))


def make_dataset(
    data_dir: str,
    split: str,
    part: str,
    batch_size: int,
    *,
    shuffle: bool = False,
    seed: int | None = None,
    repeat: bool = False,
    min_rating: float | None = None,
    drop_remainder: bool = False,
    shuffle_buffer: int = 50_000,
) -> tf.data.Dataset:
    """Streams rating events of one part as batches of features.

    Shards are read in parallel (interleave), optionally shuffled, filtered to
    ``rating >= min_rating``, batched, parsed in batches and prefetched.

    Yields dicts with the keys of :func:`schema.event_feature_spec`: string features ``[B]``,
    ``history`` ``[B, H]``, ``rating`` float32 ``[B]``, ``timestamp`` int64 ``[B]``.
    """
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    files = part_files(data_dir, split, part)
    spec = schema.event_feature_spec(_history_length(data_dir))
    ds = tf.data.Dataset.from_tensor_slices(files)
    if shuffle:
        ds = ds.shuffle(len(files), seed=seed, reshuffle_each_iteration=True)
    ds = ds.interleave(
        tf.data.TFRecordDataset,
        cycle_length=min(len(files), 8),
        num_parallel_calls=tf.data.AUTOTUNE,
        deterministic=not shuffle,
    )
    if min_rating is not None:
        threshold = float(min_rating)
        ds = ds.filter(
            lambda r: (
                tf.io.parse_single_example(r, {"rating": spec["rating"]})["rating"] >= threshold
            )
        )
    if shuffle:
        ds = ds.shuffle(shuffle_buffer, seed=seed, reshuffle_each_iteration=True)
    if repeat:
        ds = ds.repeat()
    ds = ds.batch(batch_size, drop_remainder=drop_remainder)
    ds = ds.map(lambda r: tf.io.parse_example(r, spec), num_parallel_calls=tf.data.AUTOTUNE)
    return ds.prefetch(tf.data.AUTOTUNE)


def _tf_message(error: tf.errors.OpError) -> str:
    """The first line of a TF error without its ``{{function_node ...}}`` prefix."""
    text = str(error.message).split("\n")[0]
    return text.split("}} ")[-1].split(" [Op:")[0].strip()


def _load_table(files: list[str], spec: dict[str, tf.io.FixedLenFeature]) -> dict[str, np.ndarray]:
    """Reads whole files into numpy arrays; strings become object arrays of ``str``."""
    chunks: dict[str, list[np.ndarray]] = {name: [] for name in spec}
    for path in files:  # one at a time, so that a damaged file is named in the error
        ds = tf.data.TFRecordDataset(path).batch(4096).map(lambda r: tf.io.parse_example(r, spec))
        try:
            for batch in ds.as_numpy_iterator():
                for name, values in batch.items():
                    chunks[name].append(values)
        except tf.errors.DataLossError as e:
            raise DataError(
                f"{path}: corrupt or truncated TFRecord ({_tf_message(e)}); prepare the data "
                "again (`python -m trainer.data prepare --overwrite`)"
            ) from None
        except tf.errors.InvalidArgumentError as e:
            raise DataError(
                f"{path}: records do not match the prepared-data schema ({_tf_message(e)})"
            ) from None
    table = {}
    for name, parts in chunks.items():
        values = np.concatenate(parts) if parts else np.zeros([0, *spec[name].shape])
        if spec[name].dtype == tf.string:
            values = np.vectorize(lambda b: b.decode("utf-8"), otypes=[object])(values)
        table[name] = values
    return table


def _split_file(data_dir: str, split: str, name: str) -> list[str]:
    read_manifest(data_dir)
    path = os.path.join(data_dir, split, f"{name}.tfrecord")
    if not tf.io.gfile.exists(path):
        raise DataError(f"{data_dir}: split {split!r} has no {name}.tfrecord")
    return [path]


def load_catalog(data_dir: str, split: str) -> dict[str, np.ndarray]:
    """Every item of the catalog, with this split's train popularity; keys of the catalog spec."""
    return _load_table(_split_file(data_dir, split, "catalog"), schema.catalog_feature_spec())


def load_users(data_dir: str, split: str) -> dict[str, np.ndarray]:
    """Every user's query features from the whole train part; ``history`` is ``[U, H]``."""
    spec = schema.user_feature_spec(user_history_length(data_dir))
    return _load_table(_split_file(data_dir, split, "users"), spec)


def load_events(data_dir: str, split: str, part: str) -> dict[str, np.ndarray]:
    """A whole part in memory (for evaluation)."""
    spec = schema.event_feature_spec(_history_length(data_dir))
    return _load_table(part_files(data_dir, split, part), spec)


def damaged_files(data_dir: str) -> list[str]:
    """Files of a prepared directory whose sha256 differs from the manifest's (or missing ones).

    Reads every file: meant for the error path (a ``DataLossError`` while streaming), where TF
    names no file.
    """
    recorded = read_manifest(data_dir).get("files_sha256", {})
    bad = []
    for name, digest in sorted(recorded.items()):
        path = os.path.join(data_dir, name)
        if not tf.io.gfile.exists(path) or _sha256(path) != digest:
            bad.append(path)
    return bad


def _sha256(path: str) -> str:
    import hashlib

    digest = hashlib.sha256()
    with tf.io.gfile.GFile(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def data_loss_error(data_dir: str, error: tf.errors.DataLossError) -> DataError:
    """A :class:`DataError` naming the damaged file(s) behind a streaming ``DataLossError``."""
    bad = damaged_files(data_dir) if data_dir else []
    where = ", ".join(bad) if bad else f"a TFRecord under {data_dir or 'the data dir'}"
    return DataError(
        f"{where}: corrupt or truncated TFRecord ({_tf_message(error)}); prepare the data again "
        "(`python -m trainer.data prepare --overwrite`)"
    )
