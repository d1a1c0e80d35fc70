"""Data pipeline: loaders in every layout, split invariants, TFRecord round trip, bad input."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections import defaultdict

import numpy as np
import pytest

from tests.conftest import REPO
from trainer.data import features, records, schema, splits
from trainer.data.movielens import DataError, load_source
from trainer.data.prepare import PrepareConfig, prepare, synthetic_raw

# ----------------------------------------------------------------------------- fixtures

MOVIES = [
    ("1", "Toy Story", "1995", ["Animation", "Children's", "Comedy"]),
    ("2", "GoldenEye", "1995", ["Action", "Thriller"]),
    ("3", "Heat", "1995", ["Crime"]),
]
PEOPLE = [("1", 24, "M", "technician"), ("2", 53, "F", "other")]
RATINGS = [("1", "1", 5, 100), ("1", "2", 3, 200), ("2", "1", 4, 150), ("2", "3", 2, 160)]
from trainer.data.movielens import ML100K_GENRES as ML100K_GENRES_ORDER  # noqa: E402


def _write(directory, name, lines, encoding="utf-8"):
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, name), "w", encoding=encoding) as f:
        f.write("\n".join(lines) + "\n")


def write_recbole(d, ratings=RATINGS):
    _write(
        d,
        "ml-100k.inter",
        ["user_id:token\titem_id:token\trating:float\ttimestamp:float"]
        + [f"{u}\t{i}\t{r}\t{t}" for u, i, r, t in ratings],
    )
    _write(
        d,
        "ml-100k.item",
        ["item_id:token\tmovie_title:token_seq\trelease_year:token\tclass:token_seq"]
        + [f"{i}\t{t}\t{y}\t{' '.join(g)}" for i, t, y, g in MOVIES],
    )
    _write(
        d,
        "ml-100k.user",
        ["user_id:token\tage:token\tgender:token\toccupation:token\tzip_code:token"]
        + [f"{u}\t{a}\t{g}\t{o}\t00000" for u, a, g, o in PEOPLE],
    )


def write_grouplens_100k(d, ratings=RATINGS):
    _write(d, "u.data", [f"{u}\t{i}\t{r}\t{t}" for u, i, r, t in ratings])
    rows = []
    for i, t, y, g in MOVIES:
        flags = "|".join("1" if name in g else "0" for name in ML100K_GENRES_ORDER)
        rows.append(f"{i}|{t} ({y})|01-Jan-{y}||http://x|{flags}")
    _write(d, "u.item", rows, encoding="latin-1")
    _write(d, "u.user", [f"{u}|{a}|{g}|{o}|00000" for u, a, g, o in PEOPLE])


def write_ml1m(d, ratings=RATINGS):
    _write(d, "ratings.dat", [f"{u}::{i}::{r}::{t}" for u, i, r, t in ratings])
    _write(d, "movies.dat", [f"{i}::{t} ({y})::{'|'.join(g)}" for i, t, y, g in MOVIES])
    _write(d, "users.dat", [f"{u}::{g}::{a}::17::00000" for u, a, g, _ in PEOPLE])


def write_csv(d, ratings=RATINGS):
    _write(
        d,
        "ratings.csv",
        ["userId,movieId,rating,timestamp"] + [f"{u},{i},{r}.0,{t}" for u, i, r, t in ratings],
    )
    _write(
        d,
        "movies.csv",
        ["movieId,title,genres"] + [f'{i},"{t} ({y})",{"|".join(g)}' for i, t, y, g in MOVIES],
    )


WRITERS = {
    "recbole": write_recbole,
    "ml-100k": write_grouplens_100k,
    "ml-1m": write_ml1m,
    "csv": write_csv,
}


# ----------------------------------------------------------------------------- loaders


@pytest.mark.parametrize("layout", sorted(WRITERS))
def test_loader_reads_every_layout(tmp_path, layout):
    WRITERS[layout](str(tmp_path))
    raw = load_source(str(tmp_path))
    assert sorted(r[:3] for r in raw.ratings) == sorted((u, i, float(r)) for u, i, r, _ in RATINGS)
    assert raw.items["1"].title == "Toy Story" and raw.items["1"].year == "1995"
    assert raw.items["1"].genres == ["Animation", "Children's", "Comedy"]
    assert set(raw.users) == {"1", "2"}
    if layout != "csv":  # ml-20m/25m have no profiles
        assert raw.users["2"].gender == "F"
        assert features.age_band(raw.users["2"].age) == "50-55"
    assert features.item_text(raw.items["1"]) == (
        "Toy Story (1995). Genres: Animation, Children's, Comedy"
    )


@pytest.mark.parametrize(
    ("layout", "ratings", "message"),
    [
        (
            "ml-100k",
            RATINGS + [("1", "1", 4, 300)],
            r"u\.data:5: duplicate rating of item 1 by "
            r"user 1 \(first at line 1\)",
        ),
        ("recbole", [("1", "1", 7, 1)], r"ml-100k\.inter:2: rating 7\.0 is out of range"),
        ("ml-1m", [("1", "1", "x", 1)], r"ratings\.dat:1: rating 'x' is not a number"),
        ("csv", [("1", "9", 4, 1)], r"ratings\.csv: rating #1 names unknown item '9'"),
    ],
)
def test_bad_ratings_name_file_and_line(tmp_path, layout, ratings, message):
    WRITERS[layout](str(tmp_path), ratings=ratings)
    with pytest.raises(DataError, match=message):
        load_source(str(tmp_path))


def test_wrong_columns_and_missing_files(tmp_path):
    write_recbole(str(tmp_path))
    _write(str(tmp_path), "ml-100k.inter", ["user:token\titem:token\trating:float\tts:float"])
    with pytest.raises(DataError, match=r"ml-100k\.inter:1: wrong columns"):
        load_source(str(tmp_path))
    write_ml1m(str(tmp_path / "m"))
    os.remove(tmp_path / "m" / "users.dat")
    with pytest.raises(DataError, match=r"ml-1m layout is missing users\.dat"):
        load_source(str(tmp_path / "m"))
    with pytest.raises(DataError, match="no known MovieLens layout"):
        load_source(str(tmp_path / "m" / ".." / ".."))
    _write(str(tmp_path / "c"), "u.data", ["1\t1\t5"])
    _write(str(tmp_path / "c"), "u.item", [])
    _write(str(tmp_path / "c"), "u.user", [])
    with pytest.raises(DataError, match=r"u\.data:1: expected 4 '\\t'-separated columns, got 3"):
        load_source(str(tmp_path / "c"))


def test_corrupt_encoding_is_reported(tmp_path):
    write_recbole(str(tmp_path))
    with open(tmp_path / "ml-100k.item", "ab") as f:
        f.write(b"4\t\xff\xfe\t1990\tDrama\n")
    with pytest.raises(DataError, match=r"ml-100k\.item: not valid utf-8"):
        load_source(str(tmp_path))


# ----------------------------------------------------------------------------- splits


def test_recbole_split_counts_match_recbole():
    assert splits.recbole_split_counts(10) == [8, 1, 1]
    assert splits.recbole_split_counts(20) == [16, 2, 2]
    assert splits.recbole_split_counts(5) == [3, 1, 1]  # shares below one interaction round up
    assert splits.recbole_split_counts(1) == [1, 0, 0]


def test_split_sizes_and_disjointness(tiny_data_dir):
    manifest = records.read_manifest(tiny_data_dir)
    total = manifest["counts"]["ratings"]
    keys = {}
    for split in ("p1", "p2", "p3", "p4"):
        seen = set()
        for part in manifest["splits"][split]["parts"]:
            events = records.load_events(tiny_data_dir, split, part)
            pairs = set(zip(events["user_id"], events["item_id"], strict=True))
            assert len(pairs) == len(events["user_id"])
            assert not pairs & seen, f"{split}/{part} overlaps another part"
            seen |= pairs
            keys[(split, part)] = len(pairs)
        assert len(seen) == total
    assert keys[("p1", "train")] == round(0.8 * total)
    # p2: per user 80/10/10 with RecBole's rounding.
    events = {p: records.load_events(tiny_data_dir, "p2", p) for p in ("train", "valid", "test")}
    per_user = defaultdict(lambda: [0, 0, 0])
    for i, p in enumerate(("train", "valid", "test")):
        for user in events[p]["user_id"]:
            per_user[user][i] += 1
    for counts in per_user.values():
        assert counts == splits.recbole_split_counts(sum(counts))


def test_no_query_mentions_its_event_or_the_future(tiny_data_dir):
    manifest = records.read_manifest(tiny_data_dir)
    threshold, count = manifest["liked_threshold"], manifest["query_titles"]
    for split in ("p1", "p2", "p3"):
        train = records.load_events(tiny_data_dir, split, "train")
        when = {
            (u, i): t
            for u, i, t in zip(train["user_id"], train["item_id"], train["timestamp"], strict=True)
        }
        liked_by_user = defaultdict(list)  # (timestamp, item) of each well-rated train rating
        for u, i, t, r in zip(
            train["user_id"], train["item_id"], train["timestamp"], train["rating"], strict=True
        ):
            if r >= threshold:
                liked_by_user[u].append((int(t), i))
        titles = dict(zip(train["item_id"], train["item_title"], strict=True))
        for part in manifest["splits"][split]["parts"]:
            events = records.load_events(tiny_data_dir, split, part)
            for n in range(len(events["user_id"])):
                user, item, ts = events["user_id"][n], events["item_id"][n], events["timestamp"][n]
                history = [h for h in events["history"][n] if h]
                assert item not in history
                # Every history item is a training rating of this user made strictly earlier.
                assert all(when[(user, h)] < ts for h in history)
                # The text lists the user's latest liked titles, all strictly earlier.
                earlier = sorted(p for p in liked_by_user[user] if p[0] < ts)[::-1][:count]
                shown = [titles[i] for _, i in earlier]
                liked = events["query_text"][n].split("Liked: ", 1)[1].rstrip(".")
                assert liked == ("; ".join(shown) if shown else "nothing yet")
                assert events["item_title"][n] not in shown


def test_cold_items_absent_from_training(tiny_data_dir):
    manifest = records.read_manifest(tiny_data_dir)
    cold = set(manifest["splits"]["p3"]["cold_items"])
    assert len(cold) == round(0.1 * manifest["counts"]["items"])
    train = records.load_events(tiny_data_dir, "p3", "train")
    assert not cold & set(train["item_id"])
    assert not cold & {h for row in train["history"] for h in row}
    users = records.load_users(tiny_data_dir, "p3")
    assert not cold & {h for row in users["history"] for h in row}
    catalog = records.load_catalog(tiny_data_dir, "p3")
    is_cold = dict(zip(catalog["item_id"], catalog["is_cold"], strict=True))
    assert {i for i, c in is_cold.items() if c} == cold
    assert all(
        p == 0 for i, p in zip(catalog["item_id"], catalog["popularity"], strict=True) if i in cold
    )
    test = records.load_events(tiny_data_dir, "p3", "test")
    assert cold & set(test["item_id"])


def test_splits_are_fixed_by_the_seed(tmp_path):
    raw = synthetic_raw(seed=3)
    a = prepare(PrepareConfig(output=str(tmp_path / "a"), seed=7), raw)
    b = prepare(PrepareConfig(output=str(tmp_path / "b"), seed=7), raw)
    c = prepare(PrepareConfig(output=str(tmp_path / "c"), seed=8), raw)
    assert a["files_sha256"] == b["files_sha256"]
    assert a["files_sha256"] != c["files_sha256"]


def test_p4_new_users_never_in_training(tiny_data_dir):
    manifest = records.read_manifest(tiny_data_dir)
    held = manifest["splits"]["p4"]["heldout_users"]
    valid, test = set(held["valid"]), set(held["test"])
    assert valid and test and not valid & test
    assert len(valid | test) == round(0.1 * manifest["counts"]["users"])
    events = {p: records.load_events(tiny_data_dir, "p4", p) for p in schema.PARTS["p4"]}
    train = events["train"]
    assert not (valid | test) & set(train["user_id"])
    assert not (valid | test) & {h for row in train["history"] for h in row}
    # Each new user: fold-in history and targets in their own part only.
    foldin = defaultdict(set)
    for user, item in zip(events["foldin"]["user_id"], events["foldin"]["item_id"], strict=True):
        foldin[user].add(item)
    assert set(foldin) == valid | test
    for part, members in (("valid", valid), ("test", test)):
        assert set(events[part]["user_id"]) == members
        for user, item in zip(events[part]["user_id"], events[part]["item_id"], strict=True):
            assert item not in foldin[user]
    users = records.load_users(tiny_data_dir, "p4")
    num_train = dict(zip(users["user_id"], users["num_train"], strict=True))
    assert all(num_train[u] == 0 for u in valid | test)
    assert all(num_train[u] > 0 for u in set(num_train) - valid - test)


def test_split_p4_seeded_shares_and_small_users():
    users = [str(u) for u in range(50) for _ in range(10)] + ["tiny"]  # "tiny": one rating
    parts = splits.split_p4(users, seed=5)
    again = splits.split_p4(users, seed=5)
    assert list(parts) == list(again)
    assert list(parts) != list(splits.split_p4(users, seed=6))
    held = splits.heldout_users(users, parts)
    assert len(held["valid"]) == 2 and len(held["test"]) == 3  # round(0.1 * 51), valid first
    assert "tiny" not in held["valid"] + held["test"]
    for user in held["valid"] + held["test"]:
        mine = [p for u, p in zip(users, parts, strict=True) if u == user]
        assert mine.count("foldin") == 8 and len(mine) - mine.count("foldin") == 2
    others = {u for u in users} - set(held["valid"]) - set(held["test"])
    assert all(p == "train" for u, p in zip(users, parts, strict=True) if u in others)
    # A two-rating user still gets one fold-in and one target rating.
    pair = splits.split_p4(["a", "a", "b", "b"], seed=0, heldout_fraction=0.5)
    assert sorted(pair[pair != "train"]) == ["foldin", "test"]
    with pytest.raises(ValueError, match="heldout_fraction"):
        splits.split_p4(users, seed=0, heldout_fraction=1.5)
    with pytest.raises(ValueError, match="foldin_fraction"):
        splits.split_p4(users, seed=0, foldin_fraction=0.0)


# ----------------------------------------------------------------------------- storage


def test_tfrecord_round_trip_and_reader(tiny_data_dir):
    events = records.load_events(tiny_data_dir, "p1", "train")
    ds = records.make_dataset(tiny_data_dir, "p1", "train", batch_size=64, shuffle=True, seed=1)
    rows = set()
    for batch in ds:
        assert batch["history"].shape[1] == schema.HISTORY_LENGTH
        rows |= {
            (u.decode(), i.decode(), float(r))
            for u, i, r in zip(
                batch["user_id"].numpy(),
                batch["item_id"].numpy(),
                batch["rating"].numpy(),
                strict=True,
            )
        }
    assert rows == set(
        zip(events["user_id"], events["item_id"], events["rating"].tolist(), strict=True)
    )
    positives = records.make_dataset(tiny_data_dir, "p1", "train", 1000, min_rating=4.0)
    ratings = np.concatenate([b["rating"].numpy() for b in positives])
    assert ratings.min() >= 4.0 and len(ratings) == int((events["rating"] >= 4).sum())
    catalog = records.load_catalog(tiny_data_dir, "p1")
    assert len(catalog["item_id"]) == 60
    assert catalog["popularity"].sum() == len(events["user_id"])


def test_reader_errors(tiny_data_dir, tmp_path):
    with pytest.raises(DataError, match="not a prepared data directory"):
        records.make_dataset(str(tmp_path), "p1", "train", 8)
    with pytest.raises(DataError, match=r"split 'p9' was not prepared"):
        records.make_dataset(tiny_data_dir, "p9", "train", 8)
    with pytest.raises(DataError, match=r"split 'p1' has no part 'valid'"):
        records.make_dataset(tiny_data_dir, "p1", "valid", 8)


def test_manifest_records_seed_counts_and_hashes(tiny_data_dir):
    with open(os.path.join(tiny_data_dir, "manifest.json")) as f:
        manifest = json.load(f)
    assert manifest["seed"] == 0
    assert manifest["counts"]["items"] == 60
    assert all(re.fullmatch(r"[0-9a-f]{64}", h) for h in manifest["files_sha256"].values())
    assert "p1/catalog.tfrecord" in manifest["files_sha256"]


def test_prepare_refuses_to_clobber_and_leaves_no_partial_output(tmp_path):
    raw = synthetic_raw(seed=1)
    out = tmp_path / "out"
    prepare(PrepareConfig(output=str(out)), raw)
    with pytest.raises(DataError, match="already holds prepared data"):
        prepare(PrepareConfig(output=str(out)), raw)
    broken = tmp_path / "broken"
    with pytest.raises(DataError):
        prepare(PrepareConfig(output=str(broken), source=str(tmp_path / "missing")))
    assert not broken.exists()
    assert not [p for p in os.listdir(tmp_path) if ".tmp-" in p]


def test_cli_prints_table_and_rejects_bad_flags(tmp_path):
    WRITERS["ml-100k"](str(tmp_path / "src"))
    cmd = [
        sys.executable,
        "-m",
        "trainer.data",
        "prepare",
        "--source",
        str(tmp_path / "src"),
        "--output",
        str(tmp_path / "out"),
    ]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert re.search(r"\s4\s+2\s+3", done.stdout)  # ratings users items
    assert "p2    train" in done.stdout
    bad = subprocess.run(
        cmd[:-2] + ["--output", str(tmp_path / "x"), "--cold-fraction", "2"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert bad.returncode == 2 and "--cold-fraction must be in (0, 1)" in bad.stderr
    assert "Traceback" not in bad.stderr


# ----------------------------------------------------------------------------- ML-100K cache


def _fake_wheel(cache: str, contents: dict[str, bytes]) -> None:
    import zipfile

    from trainer.data import movielens

    with zipfile.ZipFile(os.path.join(cache, movielens.RECBOLE_WHEEL), "w") as archive:
        for ext, data in contents.items():
            archive.writestr(movielens.RECBOLE_ML100K.format(ext), data)


def test_ml100k_is_extracted_through_a_staged_folder(tmp_path, monkeypatch):
    """The cached copy appears whole (replacing a damaged one) or not at all."""
    import hashlib

    from trainer.data import movielens

    contents = {ext: f"{ext} rows\n".encode() for ext in movielens.ML100K_SHA256}
    sums = {ext: hashlib.sha256(data).hexdigest() for ext, data in contents.items()}
    monkeypatch.setattr(movielens, "ML100K_SHA256", sums)
    cache = str(tmp_path)
    damaged = tmp_path / "ml-100k"
    damaged.mkdir()
    (damaged / "ml-100k.inter").write_bytes(b"truncated")
    _fake_wheel(cache, contents)
    target = movielens.fetch_ml100k(cache)
    assert target == str(damaged)
    assert {p.name: p.read_bytes() for p in damaged.iterdir()} == {
        f"ml-100k.{ext}": data for ext, data in contents.items()
    }
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ml-100k", movielens.RECBOLE_WHEEL]

    bad = tmp_path / "bad"
    bad.mkdir()
    _fake_wheel(str(bad), {**contents, "item": b"not the item file"})
    with pytest.raises(DataError, match="sha256"):
        movielens.fetch_ml100k(str(bad))
    assert [p.name for p in bad.iterdir()] == [movielens.RECBOLE_WHEEL]  # nothing half-written
