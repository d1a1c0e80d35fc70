"""The four evaluation protocols, fixed by a seed.

* ``p1``: TensorFlow Recommenders' tutorials: a random 80/20 split of all ratings.
* ``p2``: RecBole's default for general recommenders (``RS: [0.8, 0.1, 0.1]``, grouped by user,
  random order): each user's ratings shuffled and split 80/10/10 into train/valid/test, with
  RecBole's own rounding (``_calcu_split_ids``).
* ``p3``: cold-start items: a share of movies (10%) and all their ratings are kept out of
  training; the other ratings are split as in ``p2``; the held-out movies' ratings are split
  50/50 between valid and test, so model choices can be made without touching test.
* ``p4``: new users (strong generalisation, as in the Mult-VAE and EASE papers): a share of
  users (10%) and all their ratings are kept out of training, half of them valid users and
  half test users; each held-out user's ratings are split into a random 80% ``foldin`` (the
  history a new user sends) and 20% targets (``valid`` or ``test``). Everyone else's ratings
  are all ``train``.

Each function returns, for every rating index, the name of its part.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np


def recbole_split_counts(total: int, ratios: tuple[float, ...] = (0.8, 0.1, 0.1)) -> list[int]:
    """How RecBole 1.2.1 divides ``total`` interactions of one user by ``ratios``.

    A port of ``recbole.data.dataset.Dataset._calcu_split_ids``: every part but the first gets
    ``int(ratio * total)``, and a part whose share is between 0 and 1 interaction takes one from
    the first part, as long as the first keeps at least one.
    """
    counts = [int(r * total) for r in ratios]
    counts[0] = total - sum(counts[1:])
    for i in range(1, len(ratios)):
        if counts[0] <= 1:
            break
        if 0 < ratios[-i] * total < 1:
            counts[-i] += 1
            counts[0] -= 1
    return counts


def split_p1(num_ratings: int, seed: int, train_fraction: float = 0.8) -> np.ndarray:
    """Random ``train_fraction`` of all ratings to train, the rest to test."""
    order = np.random.default_rng(seed).permutation(num_ratings)
    parts = np.full(num_ratings, "test", dtype=object)
    parts[order[: int(round(train_fraction * num_ratings))]] = "train"
    return parts


def _by_user(users: list[str], indices: np.ndarray) -> dict[str, list[int]]:
    groups: dict[str, list[int]] = defaultdict(list)
    for index in indices:
        groups[users[index]].append(int(index))
    return groups


def split_p2(users: list[str], seed: int, indices: np.ndarray | None = None) -> np.ndarray:
    """Per-user random 80/10/10 split of the ratings at ``indices`` (all by default).

    Ratings not in ``indices`` get part ``""``.
    """
    indices = np.arange(len(users)) if indices is None else indices
    rng = np.random.default_rng(seed)
    parts = np.full(len(users), "", dtype=object)
    for user in sorted(groups := _by_user(users, indices)):
        members = np.array(groups[user])[rng.permutation(len(groups[user]))]
        n_train, n_valid, _ = recbole_split_counts(len(members))
        parts[members[:n_train]] = "train"
        parts[members[n_train : n_train + n_valid]] = "valid"
        parts[members[n_train + n_valid :]] = "test"
    return parts


def choose_cold_items(item_ids: list[str], fraction: float, seed: int) -> set[str]:
    """A seeded random ``fraction`` of the catalog (at least one item)."""
    ordered = sorted(item_ids)
    count = max(1, int(round(fraction * len(ordered))))
    chosen = np.random.default_rng(seed).choice(len(ordered), size=count, replace=False)
    return {ordered[i] for i in chosen}


def split_p3(users: list[str], items: list[str], cold: set[str], seed: int) -> np.ndarray:
    """Cold items' ratings to valid/test (50/50); the rest split per user as in ``p2``."""
    is_cold = np.array([item in cold for item in items], dtype=bool)
    parts = split_p2(users, seed, np.flatnonzero(~is_cold))
    cold_indices = np.flatnonzero(is_cold)
    coin = np.random.default_rng(seed + 1).random(len(cold_indices)) < 0.5
    parts[cold_indices[coin]] = "valid"
    parts[cold_indices[~coin]] = "test"
    return parts


def _foldin_count(total: int, foldin_fraction: float) -> int:
    """Fold-in ratings of a held-out user with ``total >= 2`` ratings: at least one fold-in and
    at least one target."""
    return min(total - 1, max(1, int(round(foldin_fraction * total))))


def split_p4(
    users: list[str], seed: int, heldout_fraction: float = 0.1, foldin_fraction: float = 0.8
) -> np.ndarray:
    """New users: a seeded ``heldout_fraction`` of users out of training entirely.

    ``round(heldout_fraction * #users)`` users are drawn among those with at least two ratings
    (a smaller user cannot have both a fold-in and a target rating, so stays in train); the
    first half of the draw (rounded down) are valid users, the rest test users. Each held-out
    user's ratings are shuffled: ``round(foldin_fraction * n)`` (clipped to ``[1, n - 1]``)
    become ``"foldin"``, the rest ``"valid"`` or ``"test"``. Every other rating is ``"train"``.

    Args:
        users: user id of each rating ``[R]``.
        seed: fixes the users drawn and each user's fold-in/target split.
        heldout_fraction: share of all users held out, in ``(0, 1)``.
        foldin_fraction: share of a held-out user's ratings used as fold-in, in ``(0, 1)``.

    Returns:
        ``[R]`` object array of part names.
    """
    if not 0.0 < heldout_fraction < 1.0:
        raise ValueError(f"heldout_fraction must be in (0, 1), got {heldout_fraction}")
    if not 0.0 < foldin_fraction < 1.0:
        raise ValueError(f"foldin_fraction must be in (0, 1), got {foldin_fraction}")
    groups = _by_user(users, np.arange(len(users)))
    everyone = sorted(groups)
    eligible = [u for u in everyone if len(groups[u]) >= 2]
    count = min(len(eligible), int(round(heldout_fraction * len(everyone))))
    # Its own stream (not p2's `seed`), so p4's draw does not mirror p2's per-user shuffles.
    rng = np.random.default_rng([seed, 4])
    drawn = [eligible[i] for i in rng.choice(len(eligible), size=count, replace=False)]
    parts = np.full(len(users), "train", dtype=object)
    for position, user in enumerate(drawn):
        target = "valid" if position < count // 2 else "test"
        members = np.array(groups[user])[rng.permutation(len(groups[user]))]
        n_foldin = _foldin_count(len(members), foldin_fraction)
        parts[members[:n_foldin]] = "foldin"
        parts[members[n_foldin:]] = target
    return parts


def heldout_users(users: list[str], parts: np.ndarray) -> dict[str, list[str]]:
    """The held-out users of a p4 split by target part: ``{"valid": [...], "test": [...]}``,
    each sorted (numeric ids by value)."""
    out: dict[str, set[str]] = {"valid": set(), "test": set()}
    for user, part in zip(users, parts, strict=True):
        if part in out:
            out[part].add(user)
    return {part: sorted(members, key=_id_order) for part, members in out.items()}


def _id_order(user_id: str) -> tuple[int, str]:
    return (int(user_id), user_id) if user_id.isdigit() else (1 << 62, user_id)
