"""trainer.ranking and trainer.metrics against hand-computed tiny cases (NumPy only, except the
mmr_rerank_tf test)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from trainer import metrics, ranking

# --------------------------------------------------------------------------- top_k_from_scores


def test_top_k_sorts_descending_and_breaks_ties_by_lower_index():
    scores = np.array([[0.1, 0.9, 0.5, 0.9, 0.5],
                       [1.0, 1.0, 1.0, 1.0, 1.0]])  # fmt: skip
    top = ranking.top_k_from_scores(scores, 3)
    assert top.dtype == np.int64
    np.testing.assert_array_equal(top, [[1, 3, 2], [0, 1, 2]])


def test_top_k_tie_straddling_the_cut_keeps_lowest_indices():
    # items 2, 4, 6 tie for the 2nd place; only item 2 fits in k=2
    scores = np.array([[0.0, 5.0, 3.0, 0.0, 3.0, 1.0, 3.0]])
    np.testing.assert_array_equal(ranking.top_k_from_scores(scores, 2), [[1, 2]])
    np.testing.assert_array_equal(ranking.top_k_from_scores(scores, 4), [[1, 2, 4, 6]])


def test_top_k_excludes_training_items_as_list_mask_and_sparse():
    scores = np.array([[5.0, 4.0, 3.0, 2.0], [1.0, 2.0, 3.0, 4.0]])
    expected = [[1, 3], [3, 1]]
    as_list = [np.array([0, 2]), np.array([2, 0])]
    np.testing.assert_array_equal(ranking.top_k_from_scores(scores, 2, as_list), expected)
    mask = np.zeros((2, 4), dtype=bool)
    mask[0, [0, 2]] = mask[1, [0, 2]] = True
    np.testing.assert_array_equal(ranking.top_k_from_scores(scores, 2, mask), expected)
    np.testing.assert_array_equal(scores[0], [5.0, 4.0, 3.0, 2.0])  # input not modified


def test_top_k_excludes_with_a_scipy_sparse_mask():
    sparse = pytest.importorskip("scipy.sparse")
    scores = np.array([[5.0, 4.0, 3.0, 2.0], [1.0, 2.0, 3.0, 4.0]])
    mask = sparse.csr_matrix(([1, 1, 1], ([0, 0, 1], [0, 2, 3])), shape=(2, 4))
    np.testing.assert_array_equal(ranking.top_k_from_scores(scores, 2, mask), [[1, 3], [2, 1]])


def test_top_k_pads_with_minus_one_when_too_few_remain():
    scores = np.array([[1.0, 2.0, 3.0], [3.0, -np.inf, 1.0]])
    top = ranking.top_k_from_scores(scores, 3, [np.array([0, 1]), np.array([], dtype=np.int64)])
    np.testing.assert_array_equal(top, [[2, -1, -1], [0, 2, -1]])


def test_top_k_larger_than_catalog():
    scores = np.array([[0.2, 0.3], [0.3, 0.3]])
    top = ranking.top_k_from_scores(scores, 10)
    np.testing.assert_array_equal(top, [[1, 0], [0, 1]])


def test_top_k_rejects_nan_and_bad_k():
    with pytest.raises(ValueError, match="NaN"):
        ranking.top_k_from_scores(np.array([[np.nan, 1.0]]), 1)
    with pytest.raises(ValueError):
        ranking.top_k_from_scores(np.ones((1, 2)), 0)
    with pytest.raises(ValueError):
        ranking.top_k_from_scores(np.ones((2, 2)), 1, [np.array([0])])  # 1 list for 2 rows


def test_top_k_matches_full_stable_sort_on_random_ties():
    rng = np.random.default_rng(0)
    scores = rng.integers(0, 5, size=(50, 40)).astype(np.float32)  # many ties
    exclude = [rng.choice(40, size=rng.integers(0, 38), replace=False) for _ in range(50)]
    top = ranking.top_k_from_scores(scores, 7, exclude)
    for row, ex in zip(range(50), exclude, strict=True):
        s = scores[row].astype(np.float64)
        s[ex] = -np.inf
        order = [i for i in np.argsort(-s, kind="stable") if s[i] > -np.inf][:7]
        np.testing.assert_array_equal(top[row], order + [-1] * (7 - len(order)))


def test_top_k_chunked_matches_dense():
    rng = np.random.default_rng(1)
    q = rng.normal(size=(23, 4))
    c = rng.normal(size=(57, 4))
    c[10] = c[3]  # an exact tie: item 3 must come before item 10
    exclude = [rng.choice(57, size=5, replace=False) for _ in range(23)]
    dense = ranking.top_k_from_scores(q @ c.T, 12, exclude)
    chunked = ranking.top_k_chunked(q, c, 12, exclude, query_block=5, candidate_block=8)
    np.testing.assert_array_equal(chunked, dense)
    np.testing.assert_array_equal(ranking.top_k_chunked(q, c[:4], 6, candidate_block=3),
                                  ranking.top_k_from_scores(q @ c[:4].T, 6))  # fmt: skip


def test_index_of_and_items_by_user():
    index = ranking.index_of({"item_id": np.array(["a", "b", "c"], dtype=object)})
    assert index == {"a": 0, "b": 1, "c": 2}
    events = {"user_id": np.array(["u", "v", "u"]), "item_id": np.array(["c", "a", "b"])}
    groups = ranking.items_by_user(events, index)
    assert groups == {"u": [2, 1], "v": [0]} and groups["nobody"] == []


# --------------------------------------------------------------------------- ranking_metrics


def test_ranking_metrics_hand_computed():
    top = np.array([[3, 1, 4, 0], [2, 0, 1, 4]])
    truth = [np.array([1, 0]), np.array([3])]
    r = metrics.ranking_metrics(top, truth, ks=(2, 4))
    # user 0: hits at ranks 2 and 4; user 1: none
    assert r["num_users"] == 2
    assert r["recall@2"] == pytest.approx((1 / 2 + 0) / 2)
    assert r["recall@4"] == pytest.approx((2 / 2 + 0) / 2)
    assert r["precision@2"] == pytest.approx((1 / 2) / 2)
    assert r["precision@4"] == pytest.approx((2 / 4) / 2)
    assert r["hit@2"] == pytest.approx(0.5)
    assert r["mrr@2"] == pytest.approx((1 / 2) / 2)
    assert r["mrr@4"] == pytest.approx((1 / 2) / 2)
    idcg2 = 1 + 1 / math.log2(3)
    assert r["ndcg@2"] == pytest.approx((1 / math.log2(3)) / idcg2 / 2)
    assert r["ndcg@4"] == pytest.approx((1 / math.log2(3) + 1 / math.log2(5)) / idcg2 / 2)
    assert list(r) == ["recall@2", "recall@4", "mrr@2", "mrr@4", "ndcg@2", "ndcg@4", "hit@2",
                       "hit@4", "precision@2", "precision@4", "num_users"]  # fmt: skip


def test_ranking_metrics_ideal_dcg_uses_min_of_truth_and_k():
    # 5 relevant items, only one in the top 2 at rank 1: IDCG@2 over 2 positions, recall / 5
    r = metrics.ranking_metrics(np.array([[7, 8]]), [np.array([7, 1, 2, 3, 4])], ks=(2,))
    assert r["ndcg@2"] == pytest.approx(1 / (1 + 1 / math.log2(3)))
    assert r["recall@2"] == pytest.approx(1 / 5)
    assert r["precision@2"] == pytest.approx(1 / 2)


def test_ranking_metrics_skips_users_without_test_items():
    top = np.array([[0, 1], [0, 1], [1, 0]])
    truth = [np.array([0]), np.array([], dtype=np.int64), np.array([0])]
    r = metrics.ranking_metrics(top, truth, ks=(1, 2))
    assert r["num_users"] == 2
    assert r["hit@1"] == pytest.approx(0.5)
    assert r["mrr@2"] == pytest.approx((1 + 1 / 2) / 2)
    empty = metrics.ranking_metrics(top, [np.array([], dtype=np.int64)] * 3, ks=(1,))
    assert empty["num_users"] == 0 and math.isnan(empty["recall@1"])


def test_ranking_metrics_padding_short_lists_and_duplicate_truth():
    # -1 never matches (even if -1 sneaks into the truth), k > K counts as misses,
    # precision still divides by k, and a duplicated relevant item counts once.
    top = np.array([[2, -1, -1]])
    r = metrics.ranking_metrics(top, [np.array([2, 2, -1, 5])], ks=(1, 5))
    assert r["recall@5"] == pytest.approx(1 / 2)
    assert r["precision@5"] == pytest.approx(1 / 5)
    assert r["precision@1"] == pytest.approx(1.0)
    assert r["ndcg@5"] == pytest.approx(1 / (1 + 1 / math.log2(3)))


def test_ranking_metrics_with_top_k_exclusion_end_to_end():
    scores = np.array([[0.9, 0.8, 0.7, 0.1]])
    top = ranking.top_k_from_scores(scores, 2, [np.array([0])])  # item 0 was a training item
    np.testing.assert_array_equal(top, [[1, 2]])
    r = metrics.ranking_metrics(top, [np.array([2])], ks=(1, 2))
    assert (r["hit@1"], r["hit@2"], r["mrr@2"]) == (0.0, 1.0, 0.5)


# --------------------------------------------------------------------------- factorized top-k


def test_factorized_top_k_accuracy_and_ties():
    scores = np.array([
        [0.9, 0.5, 0.5, 0.1],  # true 2: one item strictly higher, tied with 1 -> in at k=2
        [0.5, 0.5, 0.5, 0.5],  # true 3: all tied -> in at k=1
        [0.1, 0.2, 0.3, 0.4],  # true 0: three higher -> in only at k=4
    ])  # fmt: skip
    r = metrics.factorized_top_k_accuracy(scores, np.array([2, 3, 0]), ks=(1, 2, 3, 4, 100))
    assert r == pytest.approx({"top_1_accuracy": 1 / 3, "top_2_accuracy": 2 / 3,
                               "top_3_accuracy": 2 / 3, "top_4_accuracy": 1.0,
                               "top_100_accuracy": 1.0})  # fmt: skip


def test_factorized_top_k_non_finite_true_score_is_a_miss():
    scores = np.array([[-np.inf, 0.0], [1.0, 0.0]])
    r = metrics.factorized_top_k_accuracy(scores, np.array([0, 0]), ks=(2,))
    assert r["top_2_accuracy"] == pytest.approx(0.5)


def test_factorized_top_k_chunked_matches_dense():
    rng = np.random.default_rng(2)
    q = rng.normal(size=(31, 6)).astype(np.float32)
    c = rng.normal(size=(70, 6)).astype(np.float32)
    c[5] = c[9]  # duplicates: a tie with the true item never pushes it out
    truth = rng.integers(0, 70, size=31)
    truth[:4] = 9
    dense = metrics.factorized_top_k_accuracy(q @ c.T, truth, ks=(1, 5, 10, 100))
    chunked = metrics.factorized_top_k_accuracy_chunked(
        q, c, truth, ks=(1, 5, 10, 100), query_block=7, candidate_block=16
    )
    assert chunked == pytest.approx(dense)
    assert chunked["top_100_accuracy"] == 1.0


# --------------------------------------------------------------------------- beyond accuracy


def test_catalog_coverage():
    top = np.array([[0, 1], [1, -1]])
    assert metrics.catalog_coverage(top, 4) == pytest.approx(0.5)


def test_gini_uniform_and_single_item():
    assert metrics.gini_index(np.array([[0, 1], [2, 3]]), 4) == pytest.approx(0.0)
    assert metrics.gini_index(np.array([[2], [2], [2]]), 4) == pytest.approx(3 / 4)
    # half the catalog never shown, the other half equally: counts [0, 0, 1, 1]
    assert metrics.gini_index(np.array([[0], [1]]), 4) == pytest.approx(0.5)
    assert math.isnan(metrics.gini_index(np.array([[-1]]), 4))


def test_intra_list_diversity_identical_vs_orthogonal():
    emb = np.array([[1.0, 0.0, 0.0], [2.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 3.0]])
    assert metrics.intra_list_diversity(np.array([[0, 1]]), emb) == pytest.approx(0.0)
    assert metrics.intra_list_diversity(np.array([[0, 2, 3]]), emb) == pytest.approx(1.0)
    # user 2 has a single valid item and is skipped; users 0 and 1 average to 0.5
    top = np.array([[0, 1, -1], [0, 2, 3], [3, -1, -1]])
    assert metrics.intra_list_diversity(top, emb, user_block=2) == pytest.approx(0.5)
    # mixed list: cos pairs (0,1)=1, (0,2)=0, (1,2)=0 -> 1 - 1/3
    assert metrics.intra_list_diversity(np.array([[0, 1, 2]]), emb) == pytest.approx(2 / 3)


def test_popularity_percentile():
    popularity = np.array([10, 0, 5, 5, 20])  # ascending ranks: 1->0, 2,3->1.5, 0->3, 4->4
    assert metrics.popularity_percentile(np.array([[4]]), popularity) == pytest.approx(100.0)
    assert metrics.popularity_percentile(np.array([[1]]), popularity) == pytest.approx(0.0)
    assert metrics.popularity_percentile(np.array([[2, -1], [0, 3]]), popularity) == pytest.approx(
        100 * (1.5 + 3 + 1.5) / 4 / 3
    )
    assert metrics.popularity_percentile(np.array([[0, 1]]), np.ones(3)) == pytest.approx(50.0)


def test_rmse():
    assert metrics.rmse(np.array([1.0, 2.0, 3.0]), np.array([1.0, 4.0, 3.0])) == pytest.approx(
        math.sqrt(4 / 3)
    )
    with pytest.raises(ValueError):
        metrics.rmse(np.ones(2), np.ones(3))


# --------------------------------------------------------------------------- MMR


def _near_duplicate_case():
    # items 0 and 1 are near-duplicates and the most relevant; item 2 is orthogonal to them
    emb = np.array([[1.0, 0.0], [0.99, 0.01], [0.0, 1.0], [0.7, 0.7]])
    candidates = np.array([[0, 1, 2]])
    relevance = np.array([[1.0, 0.95, 0.6]])
    return candidates, relevance, emb


def test_mmr_lambda_zero_is_plain_top_k():
    candidates, relevance, emb = _near_duplicate_case()
    np.testing.assert_array_equal(ranking.mmr_rerank(candidates, relevance, emb, 2, 0.0), [[0, 1]])
    # unsorted candidates: still by relevance
    picked = ranking.mmr_rerank(np.array([[2, 0, 1]]), np.array([[0.6, 1.0, 0.95]]), emb, 3, 0.0)
    np.testing.assert_array_equal(picked, [[0, 1, 2]])


def test_mmr_diversity_picks_the_dissimilar_item_second():
    candidates, relevance, emb = _near_duplicate_case()
    for lam in (0.3, 0.6, 0.9):
        # second pick: item 1 scores (1-l)*0.95 - l*~1.0, item 2 scores (1-l)*0.6 - 0
        np.testing.assert_array_equal(
            ranking.mmr_rerank(candidates, relevance, emb, 3, lam), [[0, 2, 1]]
        )
    np.testing.assert_array_equal(ranking.mmr_rerank(candidates, relevance, emb, 3, 0.1),
                                  [[0, 1, 2]])  # fmt: skip


def test_mmr_padding_exclusions_and_k_beyond_candidates():
    emb = np.eye(4)
    candidates = np.array([[3, -1, 1, 2]])
    relevance = np.array([[0.5, 9.0, -np.inf, 0.1]])
    picked = ranking.mmr_rerank(candidates, relevance, emb, 5, 0.5)
    # -1 never picked, -inf (excluded) after every finite candidate, then -1 padding
    np.testing.assert_array_equal(picked, [[3, 2, 1, -1, -1]])


def test_mmr_ties_go_to_the_earlier_candidate():
    emb = np.eye(3)
    picked = ranking.mmr_rerank(np.array([[2, 0, 1]]), np.array([[1.0, 1.0, 1.0]]), emb, 3, 0.5)
    np.testing.assert_array_equal(picked, [[2, 0, 1]])
    with pytest.raises(ValueError):
        ranking.mmr_rerank(np.array([[0]]), np.array([[1.0]]), emb, 1, 1.5)


def test_mmr_rerank_tf_agrees_with_numpy():
    tf = pytest.importorskip("tensorflow")
    rng = np.random.default_rng(3)
    emb = rng.normal(size=(40, 8)).astype(np.float32)
    emb[7] = emb[3] * 2.0  # an exact duplicate direction
    candidates = np.stack([rng.choice(40, size=15, replace=False) for _ in range(6)])
    candidates[0, :2] = [3, 7]
    candidates[1, -3:] = -1  # padding
    relevance = rng.normal(size=(6, 15)).astype(np.float32)
    relevance[2, [1, 4]] = -np.inf  # excluded
    relevance[3] = 0.25  # all tied

    fn = tf.function(lambda c, r, lam: ranking.mmr_rerank_tf(c, r, emb, 18, lam),
                     input_signature=[tf.TensorSpec([None, None], tf.int64),
                                      tf.TensorSpec([None, None], tf.float32),
                                      tf.TensorSpec([], tf.float32)])  # fmt: skip
    for lam in (0.0, 0.3, 0.7, 1.0):
        expected = ranking.mmr_rerank(candidates, relevance, emb, 18, lam)
        got = fn(tf.constant(candidates, tf.int64), tf.constant(relevance), tf.constant(lam))
        assert got.dtype == tf.int64
        np.testing.assert_array_equal(got.numpy(), expected, err_msg=f"lambda={lam}")
    c, r, e = _near_duplicate_case()
    np.testing.assert_array_equal(ranking.mmr_rerank_tf(c, r, e, 2, 0.6).numpy(), [[0, 2]])


# --------------------------------------------------------------------------- format_table


def test_format_table():
    table = metrics.format_table([{"metric": "recall@10", "value": 0.12345},
                                  {"metric": "a|b", "extra": 1}], ["metric", "value"])  # fmt: skip
    assert table.splitlines() == [
        "| metric    | value  |",
        "| --------- | ------ |",
        "| recall@10 | 0.1235 |",
        "| a\\|b      |        |",
    ]


def test_per_user_figures_average_to_the_reported_ones():
    rng = np.random.default_rng(3)
    top = np.stack([rng.permutation(20)[:10] for _ in range(6)])
    truth = [rng.choice(20, size=n, replace=False) for n in (3, 0, 5, 1, 0, 8)]
    per_user, users = metrics.per_user_ranking_metrics(top, truth, ks=(5, 10))
    assert users.tolist() == [0, 2, 3, 5]  # users without relevant items are left out
    summary = metrics.ranking_metrics(top, truth, ks=(5, 10))
    for name, values in per_user.items():
        assert values.shape == (4,) and np.mean(values) == pytest.approx(summary[name])
    # User 3's one relevant item, by hand.
    (item,) = truth[3]
    rank = list(top[3]).index(item) + 1 if item in top[3] else None
    assert per_user["recall@10"][2] == (rank is not None)
    assert per_user["ndcg@10"][2] == pytest.approx(1 / np.log2(rank + 1) if rank else 0.0)


def test_paired_difference_by_hand():
    d = metrics.paired_difference([1.0, 2.0, 3.0], [0.0, 2.0, 2.0])  # differences 1, 0, 1
    assert d["mean"] == pytest.approx(2 / 3) and d["n"] == 3
    assert d["se"] == pytest.approx(np.std([1, 0, 1], ddof=1) / np.sqrt(3))
    assert (d["low"], d["high"]) == pytest.approx((2 / 3 - 1.96 * d["se"], 2 / 3 + 1.96 * d["se"]))
    assert metrics.paired_difference([0.5], [0.25])["se"] == 0.0
    assert np.isnan(metrics.paired_difference([], [])["mean"])
    with pytest.raises(ValueError, match="same 1-D shape"):
        metrics.paired_difference([1.0, 2.0], [1.0])
