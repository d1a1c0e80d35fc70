"""Prepares a MovieLens data set: text features, the three protocols, TFRecords and a manifest.

The output is written to a temporary sibling folder and renamed into place at the end, so an
interrupted run leaves nothing half-written under ``--output``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import time
from collections import defaultdict
from collections.abc import Iterator

import numpy as np
import tensorflow as tf

from common import staging
from trainer.data import features, schema, splits
from trainer.data.movielens import (
    ML100K_COUNTS,
    DataError,
    Item,
    RawData,
    User,
    fetch_ml100k,
    load_source,
)
from trainer.data.records import MANIFEST, write_file, write_sharded

MANIFEST_VERSION = 1

# Stages and counts go here; `python -m trainer.data` prints them to stderr as they happen.
log = logging.getLogger("trainer.data")


@dataclasses.dataclass
class PrepareConfig:
    """What ``python -m trainer.data prepare`` does."""

    output: str
    dataset: str = "ml-100k"  # "ml-100k" (offline copy), "synthetic", or named by --source
    source: str | None = None  # a directory in one of GroupLens's layouts
    cache_dir: str | None = None
    seed: int = 42
    history_length: int = schema.HISTORY_LENGTH  # per p1 event query
    user_history_length: int = schema.USER_HISTORY_LENGTH  # per user (whole history) query
    liked_threshold: float = schema.LIKED_THRESHOLD
    query_titles: int = schema.QUERY_TITLES
    cold_fraction: float = 0.1
    train_shards: int = 4
    overwrite: bool = False

    def validate(self) -> None:
        if not self.output:
            raise DataError("--output is required")
        if self.dataset not in ("ml-100k", "synthetic") and not self.source:
            raise DataError(
                f"--dataset {self.dataset!r} needs --source DIR (only ml-100k and "
                "synthetic are built in)"
            )
        if self.history_length < 1:
            raise DataError(f"--history-length must be at least 1, got {self.history_length}")
        if self.user_history_length < 1:
            raise DataError(
                f"--user-history-length must be at least 1, got {self.user_history_length}"
            )
        if not 0.0 < self.cold_fraction < 1.0:
            raise DataError(f"--cold-fraction must be in (0, 1), got {self.cold_fraction}")
        if self.train_shards < 1:
            raise DataError(f"--train-shards must be at least 1, got {self.train_shards}")
        if self.query_titles < 0:
            raise DataError(f"--query-titles must be non-negative, got {self.query_titles}")


def _padded(ids: list[str], length: int) -> list[str]:
    return (ids + [""] * length)[:length]


@dataclasses.dataclass
class _Split:
    name: str
    parts: np.ndarray  # part name per rating index; "" = not used
    cold: set[str]


class _Builder:
    """Turns one :class:`RawData` and one split into records."""

    def __init__(self, raw: RawData, config: PrepareConfig):
        self.raw = raw
        self.config = config
        self.user_fields = {uid: features.user_fields(u) for uid, u in raw.users.items()}
        self.item_text = {iid: features.item_text(i) for iid, i in raw.items.items()}
        self.item_name = {iid: features.movie_name(i) for iid, i in raw.items.items()}
        by_user: dict[str, list[int]] = defaultdict(list)
        for index, (user, *_) in enumerate(raw.ratings):
            by_user[user].append(index)
        # Chronological per user; equal timestamps keep a fixed order but never see each other.
        self.by_user = {
            u: sorted(idx, key=lambda i: (raw.ratings[i][3], raw.ratings[i][1]))
            for u, idx in by_user.items()
        }

    def _query(
        self, user: str, history: list[str], liked: list[str], length: int | None
    ) -> dict[str, object]:
        """The query of ``user`` given their earlier ratings (``history``: every rated item,
        ``liked``: the well-rated ones, both oldest first). ``length`` = None: no history field
        (per-user protocols' events, whose training query the loop builds)."""
        titles = [self.item_name[i] for i in liked[::-1][: self.config.query_titles]]
        fields = self.user_fields[user]
        query: dict[str, object] = {
            **fields,
            "query_text": features.query_text(fields, titles),
        }
        if length is not None:
            query["history"] = _padded(history[::-1][:length], length)
        return query

    def _candidate(self, item_id: str) -> dict[str, object]:
        item = self.raw.items[item_id]
        return {
            "item_id": item_id,
            "item_title": self.item_name[item_id],
            "item_year": item.year,
            "item_genres": "|".join(item.genres),
            "item_text": self.item_text[item_id],
        }

    def events(self, split: _Split) -> tuple[dict[str, list[dict]], list[dict]]:
        """Records of every part, and one user record per user, from this split's train part.

        A query reads the user's ratings of the parts a user brings with them: train, and in
        p4 the new users' fold-in. p1 events carry their own past (every earlier such rating);
        the other protocols' events carry none (see :data:`schema.HISTORY_LENGTH`).
        """
        out: dict[str, list[dict]] = defaultdict(list)
        users = []
        threshold = self.config.liked_threshold
        event_length = self.config.history_length if split.name == "p1" else None
        for user in sorted(self.by_user):
            history: list[str] = []
            ratings: list[float] = []
            liked: list[str] = []
            num_train = 0
            ordered = self.by_user[user]
            start = 0
            while start < len(ordered):
                ts = self.raw.ratings[ordered[start]][3]
                stop = start
                while stop < len(ordered) and self.raw.ratings[ordered[stop]][3] == ts:
                    stop += 1
                group = ordered[start:stop]
                # only ratings strictly before `ts`
                query = self._query(user, history, liked, event_length)
                for index in group:
                    part = split.parts[index]
                    if part:
                        _, item, rating, _ = self.raw.ratings[index]
                        out[part].append(
                            {
                                **query,
                                **self._candidate(item),
                                "rating": float(rating),
                                "timestamp": int(ts),
                            }
                        )
                for index in group:
                    if split.parts[index] in _HISTORY_PARTS:
                        num_train += split.parts[index] == "train"
                        history.append(self.raw.ratings[index][1])
                        ratings.append(float(self.raw.ratings[index][2]))
                        if self.raw.ratings[index][2] >= threshold:
                            liked.append(self.raw.ratings[index][1])
                start = stop
            length = self.config.user_history_length
            query = self._query(user, history, liked, length)
            # Aligned with the query's history (most recent first): user batches train the
            # ranking head on the held-out items' ratings.
            query["history_ratings"] = (ratings[::-1] + [0.0] * length)[:length]
            users.append({**query, "num_train": num_train})
        return out, users

    def catalog(self, split: _Split) -> list[dict]:
        popularity: dict[str, int] = defaultdict(int)
        for index, (_, item, _, _) in enumerate(self.raw.ratings):
            if split.parts[index] == "train":
                popularity[item] += 1
        return [
            {
                **self._candidate(item),
                "popularity": popularity[item],
                "is_cold": int(item in split.cold),
            }
            for item in sorted(self.raw.items, key=_id_order)
        ]


#: Parts whose ratings a user's query may read: what the model knows of them when it ranks.
_HISTORY_PARTS = ("train", "foldin")


def _id_order(item_id: str) -> tuple[int, str]:
    return (int(item_id), item_id) if item_id.isdigit() else (1 << 62, item_id)


def make_splits(raw: RawData, config: PrepareConfig) -> list[_Split]:
    users = [r[0] for r in raw.ratings]
    items = [r[1] for r in raw.ratings]
    cold = splits.choose_cold_items(list(raw.items), config.cold_fraction, config.seed)
    return [
        _Split("p1", splits.split_p1(len(raw.ratings), config.seed), set()),
        _Split("p2", splits.split_p2(users, config.seed), set()),
        _Split("p3", splits.split_p3(users, items, cold, config.seed), cold),
        _Split("p4", splits.split_p4(users, config.seed), set()),
    ]


def _shuffled(records: list[dict], seed: int) -> Iterator[dict]:
    # Written in a seeded random order, so a bounded shuffle buffer still mixes users.
    for index in np.random.default_rng(seed).permutation(len(records)):
        yield records[index]


def _file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with tf.io.gfile.GFile(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def write_prepared(raw: RawData, config: PrepareConfig, directory: str) -> dict:
    """Writes every split of ``raw`` under ``directory`` and returns the manifest."""
    builder = _Builder(raw, config)
    manifest: dict = {
        "version": MANIFEST_VERSION,
        "dataset": raw.name,
        "seed": config.seed,
        "history_length": config.history_length,
        "user_history_length": config.user_history_length,
        "liked_threshold": config.liked_threshold,
        "query_titles": config.query_titles,
        "cold_fraction": config.cold_fraction,
        "counts": {"ratings": len(raw.ratings), "users": len(raw.users), "items": len(raw.items)},
        "source_sha256": raw.source_hashes,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "splits": {},
        "files_sha256": {},
    }
    started = time.time()
    log.info("splitting %s ratings under %s", f"{len(raw.ratings):,}", ", ".join(schema.PROTOCOLS))
    for split in make_splits(raw, config):
        split_start = time.time()
        split_dir = os.path.join(directory, split.name)
        tf.io.gfile.makedirs(split_dir)
        log.info("%s: building queries and histories", split.name)
        records, users = builder.events(split)
        parts = {}
        for part in schema.PARTS[split.name]:
            rows = records.get(part, [])
            shards = config.train_shards if part == "train" else 1
            write_sharded(split_dir, part, _shuffled(rows, config.seed), shards)
            parts[part] = {
                "examples": len(rows),
                "positives": sum(r["rating"] >= config.liked_threshold for r in rows),
                "users": len({r["user_id"] for r in rows}),
                "items": len({r["item_id"] for r in rows}),
                "shards": shards,
            }
        write_file(os.path.join(split_dir, "catalog.tfrecord"), builder.catalog(split))
        write_file(os.path.join(split_dir, "users.tfrecord"), users)
        manifest["splits"][split.name] = {
            "parts": parts,
            "cold_items": sorted(split.cold, key=_id_order),
        }
        log.info(
            "%s: wrote %s, %s users (%.1f s)",
            split.name,
            ", ".join(f"{part} {info['examples']:,}" for part, info in parts.items()),
            f"{len(users):,}",
            time.time() - split_start,
        )
        if "foldin" in schema.PARTS[split.name]:  # p4: who the new (held-out) users are
            manifest["splits"][split.name]["heldout_users"] = splits.heldout_users(
                [r[0] for r in raw.ratings], split.parts
            )
    files = sorted(tf.io.gfile.glob(os.path.join(directory, "*", "*.tfrecord")))
    log.info("hashing %d files for the manifest", len(files))
    for path in files:
        manifest["files_sha256"][os.path.relpath(path, directory)] = _file_sha256(path)
    log.info("all splits written in %.1f s", time.time() - started)
    with tf.io.gfile.GFile(os.path.join(directory, MANIFEST), "w") as f:
        json.dump(manifest, f, indent=2)
    return manifest


def load_raw(config: PrepareConfig) -> RawData:
    """The raw data named by the config: ``--source``, the offline ML-100K, or synthetic."""
    if config.source:
        return load_source(config.source)
    if config.dataset == "synthetic":
        return synthetic_raw(seed=config.seed)
    raw = load_source(fetch_ml100k(config.cache_dir))
    counts = {"ratings": len(raw.ratings), "users": len(raw.users), "items": len(raw.items)}
    if counts != ML100K_COUNTS:
        raise DataError(f"MovieLens-100K has the wrong size {counts}, expected {ML100K_COUNTS}")
    return raw


def prepare(config: PrepareConfig, raw: RawData | None = None) -> dict:
    """Loads (unless ``raw`` is given), splits and writes; the output appears once complete."""
    config.validate()
    output = config.output.rstrip("/")
    if tf.io.gfile.exists(output) and not config.overwrite:
        if tf.io.gfile.exists(os.path.join(output, MANIFEST)):
            raise DataError(f"{output} already holds prepared data; pass --overwrite to replace it")
        if tf.io.gfile.listdir(output):
            raise DataError(f"{output} exists and is not empty; choose another --output")
    parent, name = os.path.split(output)
    for path in staging.remove_stale(parent or ".", f"{name}.tmp-"):
        log.info("removed %s, left by a run that was killed", path)
    if raw is None:
        log.info("loading %s", config.source or config.dataset)
        raw = load_raw(config)
    log.info(
        "loaded %s ratings, %s users, %s items",
        f"{len(raw.ratings):,}",
        f"{len(raw.users):,}",
        f"{len(raw.items):,}",
    )
    # <output>.tmp-<host>~<pid>~<random>, renamed onto --output (the old one moved aside first)
    # once complete; on GCS the manifest, written last, marks a complete folder.
    with staging.staged_dir(output, replace=True) as tmp:
        manifest = write_prepared(raw, config, tmp)
    log.info("renamed into place: %s", output)
    return manifest


# --------------------------------------------------------------------------- synthetic data

_WORDS = (
    "Star",
    "Night",
    "River",
    "Stone",
    "Love",
    "War",
    "Ghost",
    "City",
    "Dream",
    "Fire",
    "Ocean",
    "Shadow",
    "King",
    "Road",
    "Winter",
    "Summer",
    "Secret",
    "Last",
    "Silent",
    "Golden",
)
_GENRES = ("Action", "Comedy", "Drama", "Horror", "Romance", "Sci-Fi", "Thriller", "Western")
_OCCUPATIONS = ("engineer", "student", "writer", "artist", "doctor", "lawyer")


def synthetic_raw(
    num_users: int = 40, num_items: int = 60, num_ratings: int = 1500, seed: int = 0
) -> RawData:
    """A small MovieLens-like data set with learnable structure: users like some genres."""
    rng = np.random.default_rng(seed)
    items = {}
    for i in range(1, num_items + 1):
        title = " ".join(rng.choice(_WORDS, size=2, replace=False))
        genres = sorted(rng.choice(_GENRES, size=int(rng.integers(1, 3)), replace=False))
        items[str(i)] = Item(str(i), f"{title} {i}", str(int(rng.integers(1970, 2000))), genres)
    users = {
        str(u): User(
            str(u),
            int(rng.integers(15, 70)),
            str(rng.choice(["M", "F"])),
            str(rng.choice(_OCCUPATIONS)),
        )
        for u in range(1, num_users + 1)
    }
    taste = {u: set(rng.choice(_GENRES, size=2, replace=False)) for u in users}
    pairs = rng.choice(
        num_users * num_items, size=min(num_ratings, num_users * num_items), replace=False
    )
    ratings = []
    for pair in pairs:
        user, item = str(pair // num_items + 1), str(pair % num_items + 1)
        match = len(taste[user] & set(items[item].genres))
        rating = float(np.clip(2 + 1.5 * match + rng.normal(0, 0.7), 1, 5).round())
        ratings.append((user, item, rating, int(880_000_000 + rng.integers(0, 5_000_000))))
    used = {r[0] for r in ratings}
    users = {u: p for u, p in users.items() if u in used}
    return RawData("synthetic", ratings, items, users, {})


def prepare_synthetic(
    output_dir: str,
    num_users: int = 40,
    num_items: int = 60,
    num_ratings: int = 1500,
    seed: int = 0,
    **overrides: object,
) -> dict:
    """Tiny fake data in the real layout, for tests and demos that must not need MovieLens."""
    config = PrepareConfig(output=output_dir, dataset="synthetic", seed=seed, **overrides)
    return prepare(config, synthetic_raw(num_users, num_items, num_ratings, seed))
