"""Baselines (popularity, EASE) and the p4 new-user evaluation, on hand-made and synthetic data."""

from __future__ import annotations

import json

import numpy as np
import pytest

from trainer import evaluate as ev
from trainer import metrics, ranking
from trainer.baselines import (
    HELDOUT_USER_KEY,
    TYPED_ITEMS_KEY,
    EaseScorer,
    PopularityScorer,
    fit_ease,
)
from trainer.data import records

# 5 users x 6 items, binary.
X = np.array(
    [
        [1, 1, 0, 0, 1, 0],
        [0, 1, 1, 0, 0, 0],
        [1, 0, 1, 1, 0, 0],
        [0, 0, 0, 1, 1, 1],
        [1, 1, 1, 0, 0, 1],
    ],
    dtype=np.float64,
)


def test_ease_equals_the_closed_form_by_hand():
    lam = 2.0
    p = np.linalg.inv(X.T @ X + lam * np.eye(6))
    expected = np.empty((6, 6))
    for i in range(6):
        for j in range(6):
            expected[i, j] = 0.0 if i == j else -p[i, j] / p[j, j]
    b = fit_ease(X, lam)
    np.testing.assert_allclose(b, expected, rtol=1e-10, atol=1e-12)
    assert np.all(np.diag(b) == 0)
    # And it is what EASE is defined as: per column j, ridge regression of item j on the others.
    for j in range(6):
        others = np.delete(np.arange(6), j)
        a = X[:, others]
        ridge = np.linalg.solve(a.T @ a + lam * np.eye(5), a.T @ X[:, j])
        np.testing.assert_allclose(b[others, j], ridge, rtol=1e-9, atol=1e-12)


def test_ease_rejects_bad_input():
    with pytest.raises(ValueError, match="positive"):
        fit_ease(X, 0.0)
    with pytest.raises(ValueError, match="2-D"):
        fit_ease(X[0], 1.0)
    with pytest.raises(ValueError, match="non-finite"):
        fit_ease(np.full((2, 2), np.nan), 1.0)


CATALOG = {
    "item_id": np.array([str(i) for i in range(1, 7)], dtype=object),
    "popularity": np.array([5, 1, 9, 0, 3, 2]),
}


def _events(pairs: list[tuple[str, str]]) -> dict[str, np.ndarray]:
    return {
        "user_id": np.array([u for u, _ in pairs], dtype=object),
        "item_id": np.array([i for _, i in pairs], dtype=object),
    }


def _scorer() -> EaseScorer:
    train = _events(
        [(f"u{r}", str(c + 1)) for r in range(5) for c in range(6) if X[r, c]]
        + [("u0", "1")]  # a repeated rating still counts once (binary)
    )
    foldin = _events([("new", "4"), ("new", "6")])
    return EaseScorer.fit(CATALOG, train, 2.0, foldin)


def _query(user: str, history: list[str], heldout: str | None = None) -> dict[str, np.ndarray]:
    q = {
        "user_id": np.array([user], dtype=object),
        "history": np.array([(history + [""] * 4)[:4]], dtype=object),
    }
    if heldout is not None:
        q[HELDOUT_USER_KEY] = np.array([heldout], dtype=object)
    return q


def _row(items: list[int]) -> np.ndarray:
    x = np.zeros(6)
    x[items] = 1.0
    return x


def test_ease_scorer_input_rules():
    scorer = _scorer()
    b = fit_ease(X, 2.0)
    # 1. a train user: the train row, whatever the history says.
    np.testing.assert_allclose(
        scorer.score(_query("u1", ["5"]))[0], _row([1, 2]) @ b, rtol=1e-5, atol=1e-6
    )
    # 2. a new user (p4: blank user id, heldout_user_id names them): the fold-in row.
    np.testing.assert_allclose(
        scorer.score(_query("", ["1"], heldout="new"))[0], _row([3, 5]) @ b, rtol=1e-5, atol=1e-6
    )
    # 3. an unknown user: the known history ids; unknown ids and padding ignored.
    np.testing.assert_allclose(
        scorer.score(_query("stranger", ["3", "zzz", ""]))[0], _row([2]) @ b, rtol=1e-5, atol=1e-6
    )
    # 4. nothing known: popularity-like scores, no error.
    empty = scorer.score(_query("", ["zzz"]))[0]
    np.testing.assert_allclose(empty, np.log1p(CATALOG["popularity"].astype(np.float32)))
    assert scorer.item_embeddings() is None and scorer.predict_ratings({}) is None


def test_ease_folds_in_the_items_of_typed_titles_before_the_history():
    scorer = _scorer()
    b = fit_ease(X, 2.0)
    query = _query("", ["3"])
    query[TYPED_ITEMS_KEY] = np.array([["5", "zzz", ""]], dtype=object)
    np.testing.assert_allclose(scorer.score(query)[0], _row([4]) @ b, rtol=1e-5, atol=1e-6)
    query[TYPED_ITEMS_KEY] = np.array([["zzz", "", ""]], dtype=object)  # none known: history
    np.testing.assert_allclose(scorer.score(query)[0], _row([2]) @ b, rtol=1e-5, atol=1e-6)


def test_typed_titles_task_keeps_only_what_a_new_user_types():
    from trainer.evaluate import RankingTask, typed_titles_task

    catalog = {
        "item_id": np.array(["1", "2", "3"], dtype=object),
        "item_title": np.array(["Heat (1995)", "Fargo (1996)", "Mr. Jones (1993)"], dtype=object),
    }
    queries = {
        "user_id": np.array(["u1", "u2", "u3"], dtype=object),
        HELDOUT_USER_KEY: np.array(["u1", "u2", "u3"], dtype=object),
        "history": np.array([["1", "2"], ["3", ""], ["", ""]], dtype=object),
        "query_text": np.array(
            [
                "Age 25-34, male, engineer. Liked: Fargo (1996); Mr. Jones (1993).",
                "Age 18-24, female, artist. Liked: nothing yet.",
                "Liked: Unknown Film (2001); Heat (1995).",
            ],
            dtype=object,
        ),
    }
    exclude, truth = [np.array([0, 1]), np.array([2]), np.array([], np.int64)], [[2], [0], [1]]
    task = typed_titles_task(RankingTask(queries, exclude, truth), catalog)
    q = task.queries
    assert HELDOUT_USER_KEY not in q and (q["user_id"] == "").all() and (q["history"] == "").all()
    assert q[TYPED_ITEMS_KEY].tolist() == [["2", "3"], ["", ""], ["1", ""]]
    assert q["query_text"] is queries["query_text"]
    assert task.exclude is exclude and task.truth is truth


def test_ease_scorer_mixed_batch_and_no_history_field():
    scorer = _scorer()
    batch = {"user_id": np.array(["u3", "nobody"], dtype=object)}
    scores = scorer.score(batch)
    assert scores.shape == (2, 6)
    np.testing.assert_allclose(scores[0], _row([3, 4, 5]) @ fit_ease(X, 2.0), atol=1e-6)
    assert np.argmax(scores[1]) == 2  # the most popular item


# ----------------------------------------------------------------------------- p4 harness


class SpyScorer:
    """Random scores; keeps every query batch it was asked to score."""

    name = "spy"

    def __init__(self, num_items: int):
        self.num_items = num_items
        self.seen: list[dict] = []
        self.rng = np.random.default_rng(0)

    def score(self, queries):
        self.seen.append(queries)
        return self.rng.random((len(queries["user_id"]), self.num_items))

    def item_embeddings(self):
        return None

    def predict_ratings(self, events):
        return None


@pytest.mark.parametrize("part", ["valid", "test"])
def test_p4_ranks_new_users_without_ids_and_removes_fold_in(tiny_data_dir, part):
    catalog = records.load_catalog(tiny_data_dir, "p4")
    index = ranking.index_of(catalog)
    held = records.read_manifest(tiny_data_dir)["splits"]["p4"]["heldout_users"][part]
    task = ev.ranking_task(tiny_data_dir, "p4", catalog, part)
    assert list(task.queries[HELDOUT_USER_KEY]) == held
    assert set(task.queries["user_id"]) == {""}
    foldin = ranking.items_by_user(records.load_events(tiny_data_dir, "p4", "foldin"), index)
    truth = ranking.items_by_user(records.load_events(tiny_data_dir, "p4", part), index)
    for n, user in enumerate(held):
        assert sorted(task.exclude[n]) == sorted(foldin[user]) and len(foldin[user])
        assert sorted(task.truth[n]) == sorted(truth[user]) and len(truth[user])
    spy = SpyScorer(len(catalog["item_id"]))
    report = ev.evaluate(spy, tiny_data_dir, "p4", part=part)
    assert report["metrics"]["num_users"] == len(held)
    # Each user's figures, under the held-out id (the query sends none): their mean is the
    # report's figure.
    per_user = report["per_user"]
    assert per_user["user_id"] == held
    for name in ev.PAIRED_METRICS:
        assert np.mean(per_user[name]) == pytest.approx(report["metrics"][name], abs=1e-5)
    assert all(set(q["user_id"]) == {""} for q in spy.seen)
    # The same figures by hand: the spy's first batch, fold-in removed.
    result, pool = ev.evaluate_full_ranking(
        SpyScorer(len(index)), tiny_data_dir, "p4", catalog, part
    )
    for n, user in enumerate(held):
        assert not set(pool[n].tolist()) & set(foldin[user])
    scores = np.random.default_rng(0).random((len(held), len(index)))
    top = ranking.top_k_from_scores(scores, 100, [np.array(foldin[u]) for u in held])
    expected = metrics.ranking_metrics(top, [np.array(truth[u]) for u in held], ks=(10, 20))
    assert result == pytest.approx(expected)


def test_p2_full_ranking_unchanged(tiny_data_dir):
    """p2 test: every user, train and valid items removed, test items relevant."""
    catalog = records.load_catalog(tiny_data_dir, "p2")
    index = ranking.index_of(catalog)
    scorer = PopularityScorer(catalog["popularity"])
    result, _ = ev.evaluate_full_ranking(scorer, tiny_data_dir, "p2", catalog, "test")
    users = records.load_users(tiny_data_dir, "p2")["user_id"]
    seen = ranking.items_by_user(records.load_events(tiny_data_dir, "p2", "train"), index)
    for u, items in ranking.items_by_user(
        records.load_events(tiny_data_dir, "p2", "valid"), index
    ).items():
        seen[u].extend(items)
    truth = ranking.items_by_user(records.load_events(tiny_data_dir, "p2", "test"), index)
    scores = scorer.score({"user_id": users})
    top = ranking.top_k_from_scores(scores, 100, [np.array(seen.get(u, [])) for u in users])
    expected = metrics.ranking_metrics(top, [np.array(truth.get(u, [])) for u in users])
    assert result == pytest.approx(expected)


def test_cli_ease_chooses_l2_on_valid_and_pins_it(tiny_data_dir, tmp_path, capsys):
    out = tmp_path / "ease.json"
    argv = ["--data", tiny_data_dir, "--split", "p4", "--baseline", "ease", "--no-mmr"]
    assert ev.main([*argv, "--output", str(out)]) == 0
    report = json.loads(out.read_text())
    config = report["scorer_config"]
    assert config["l2"] in ev.EASE_L2_GRID and config["chosen_on"] == "valid part"
    assert [r["l2"] for r in config["grid"]] == list(ev.EASE_L2_GRID)
    best = max(config["grid"], key=lambda r: (r["recall@10"], r["ndcg@10"], -r["l2"]))
    assert best["l2"] == config["l2"]
    assert report["metrics"]["num_users"] > 0 and "L2 weight chosen" in capsys.readouterr().out
    assert ev.main([*argv, "--ease-l2", "50", "--output", str(out)]) == 0
    assert json.loads(out.read_text())["scorer_config"] == {
        "l2": 50.0,
        "chosen_on": "pinned (--ease-l2)",
    }
    assert ev.main([*argv, "--ease-l2", "-1"]) == 2
    assert ev.main([*argv[:-3], "--baseline", "popularity", "--ease-l2", "5"]) == 2
    assert "--ease-l2 is only for --baseline ease" in capsys.readouterr().err


def test_ease_l2_on_p1_uses_the_loops_holdout(tiny_data_dir):
    l2, grid = ev.select_ease_l2(tiny_data_dir, "p1", grid=(10.0, 100.0))
    assert l2 in (10.0, 100.0) and len(grid) == 2
    assert all(0.0 <= r["recall@10"] <= 1.0 for r in grid)


# ----------------------------------------------------------------------------- benchmark plumbing


def _quality_module():
    import importlib.util
    import os
    import sys

    from tests.conftest import REPO

    spec = importlib.util.spec_from_file_location(
        "benchmarks_quality", os.path.join(REPO, "benchmarks", "quality.py")
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


def test_quality_benchmark_aggregates_seeds_and_checks_targets():
    q = _quality_module()
    per_seed = {
        s: {"metrics": {"recall@10": r, "ndcg@10": n, "num_users": 9}, "train_seconds": 10.0}
        for s, r, n in ((42, 0.30, 0.35), (1, 0.32, 0.33), (2, 0.31, 0.34))
    }
    entry = q.aggregate(per_seed)
    assert entry["metrics"]["recall@10"] == pytest.approx(0.31)
    assert entry["spread"]["recall@10"]["std"] == pytest.approx(0.01)
    assert (entry["spread"]["ndcg@10"]["min"], entry["spread"]["ndcg@10"]["max"]) == (0.33, 0.35)
    rows = {"two_tower": entry, "ease": {"metrics": {"recall@10": 0.28, "ndcg@10": 0.345}}}
    recall, ndcg = (t for t in q.TARGETS if t.split == "p2")
    assert recall.check(rows) == ("≥ 0.29 and > ease (0.2800)", True)
    assert ndcg.check(rows)[1] is False  # 0.34 is not above EASE's 0.345
    cold = next(t for t in q.TARGETS if t.split == "p3")
    p3 = {"two_tower": {"metrics": {"recall@10": 0.2, "cold_recall@10": 0.09}}}
    assert cold.check(p3) == ("≥ 0.5 × recall@10 (0.1000)", False)
    table = q.markdown({"seeds": [42, 1, 2], "protocols": {"p2": "x"}, "splits": {"p2": rows}})
    assert "0.3100 ± 0.0100" in table and "(0.3000–0.3200)" in table
    priors = (
        {"weight": 0.02, "new_item_bias": 0.05, "content_prior": True},
        {"weight": 0.04, "new_item_bias": 0.0, "content_prior": False},
    )
    for seed, prior in zip((42, 1), priors, strict=False):
        per_seed[seed]["train"] = {"popularity_prior": prior}
    assert q._prior_weights({"per_seed": per_seed}) == "0.02, b 0.05, content / 0.04"
    share = {"share": 0.5, "met": False, "valid_ratio": 0.41}
    per_seed[1]["train"]["popularity_prior"]["new_item_recall_share"] = share
    assert q._prior_weights({"per_seed": per_seed}).endswith("/ 0.04, new-item share 0.41 (short)")


def test_quality_benchmark_pairs_systems_user_by_user():
    """Ours (the mean of its seeds, per user) against each other system on the users both
    scored; the verdict says whether the 95% interval leaves out 0."""
    q = _quality_module()

    def report(users, recall, ndcg):
        return {"per_user": {"user_id": users, "recall@10": recall, "ndcg@10": ndcg}}

    users = ["a", "b", "c", "d"]
    ours = {
        "per_seed": {
            "42": report(users, [0.6, 0.4, 0.5, 0.7], [0.5, 0.5, 0.5, 0.5]),
            "1": report(users, [0.4, 0.4, 0.5, 0.5], [0.5, 0.5, 0.5, 0.5]),
        }
    }
    # EASE also scored a user ours did not ("e"): left out of the pairs.
    ease = report([*users, "e"], [0.1, 0.2, 0.1, 0.2, 0.9], [0.5, 0.4, 0.6, 0.5, 0.0])
    rows = q.paired_rows({"two_tower": ours, "ease": ease})
    (row,) = rows
    recall = row["recall@10"]  # ours per user 0.5, 0.4, 0.5, 0.6 -> differences .4 .2 .4 .4
    assert recall["n"] == 4 and recall["mean"] == pytest.approx(0.35)
    assert recall["se"] == pytest.approx(np.std([0.4, 0.2, 0.4, 0.4], ddof=1) / 2)
    assert recall["low"] > 0 and q._paired_cell(recall).endswith("above")
    assert q._paired_cell(row["ndcg@10"]) == "+0.0000 ± 0.0408 (-0.0800 … +0.0800), level"
    assert q.paired_rows({"two_tower": {"metrics": {}}, "ease": ease}) == []  # p1: no lists
    # A system whose reports have no per-user lists is left out, the others kept.
    assert q.paired_rows({"two_tower": ours, "old": {"metrics": {}}, "ease": ease}) == rows
    table = q.markdown(
        {
            "seeds": [42, 1],
            "protocols": {"p4": "x"},
            "splits": {"p4": {"two_tower": {"metrics": {}}, "ease": {"metrics": {}}}},
            "paired": {"p4": rows},
        }
    )
    assert "two_tower − each system on the users both scored" in table
    assert "| ease | 4 | +0.3500 ± 0.0500 (+0.2520 … +0.4480), above |" in table
    stored = {"two_tower": ours, "ease": ease}
    q._drop_per_user(stored)
    assert "per_user" not in ease and "per_user" not in ours["per_seed"]["42"]


def test_quality_benchmark_reuses_only_models_whose_training_ended(tmp_path):
    q = _quality_module()
    assert q._finished(str(tmp_path / "missing")) is None
    for status, reused in (
        ("finished", True),
        ("early_stopped", True),
        ("max_steps", True),
        ("interrupted", False),
    ):
        (tmp_path / "metrics.json").write_text(json.dumps({"status": status, "seconds": 9.5}))
        assert (q._finished(str(tmp_path)) is not None) is reused, status
    (tmp_path / "metrics.json").write_text("{not json")
    assert q._finished(str(tmp_path)) is None


def test_p4_without_heldout_users_in_the_manifest_is_a_clear_error(tiny_data_dir, tmp_path):
    import shutil

    from trainer.data.movielens import DataError

    old = tmp_path / "old"
    shutil.copytree(tiny_data_dir, old)
    manifest = json.loads((old / "manifest.json").read_text())
    del manifest["splits"]["p4"]["heldout_users"]
    (old / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DataError, match="lists no held-out users"):
        ev.heldout_users(str(old), "p4", "test")
    assert ev.main(["--data", str(old), "--split", "p4", "--baseline", "popularity"]) == 2
