"""The item-item term of the served score (trainer.item_item): the same numbers in NumPy, in the
graph and through the export; its weight chosen on valid; bad settings refused."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import tensorflow as tf

import trainer  # noqa: F401  (TF_USE_LEGACY_KERAS before TFRS)
from common import contract
from tests.conftest import TINY_ITEM_ITEM_WEIGHT
from trainer import item_item
from trainer.config import ConfigError

RNG = np.random.default_rng(7)
B = RNG.normal(size=(6, 6)).astype(np.float32)
np.fill_diagonal(B, 0.0)
INDEX = {f"m{i}": i for i in range(6)}
# A repeated id, padding, an unknown id, an empty history, a full one.
HISTORY = np.array(
    [["m1", "m3", "m1", ""], ["zzz", "", "", ""], ["m5", "m0", "m2", "m4"]], dtype=object
)


def test_ease_scores_are_the_binary_history_row_times_b_in_numpy_and_in_the_graph():
    by_hand = np.stack([B[1] + B[3], np.zeros(6, np.float32), B[5] + B[0] + B[2] + B[4]])
    np.testing.assert_allclose(item_item.ease_scores(HISTORY, INDEX, B), by_hand, atol=1e-6)
    rows = np.array([[INDEX.get(h, -1) for h in row] for row in HISTORY], dtype=np.int64)
    graph = item_item.ease_scores_tf(tf.constant(rows), tf.constant(B)).numpy()
    np.testing.assert_allclose(graph, by_hand, atol=1e-6)


def test_the_blend_ranks_as_the_sum_of_per_query_standardised_scores():
    scores = RNG.normal(size=(3, 6)).astype(np.float32)
    e = item_item.ease_scores(HISTORY, INDEX, B)
    blended = item_item.blend_full(scores, e, 0.3)

    def z(x):
        std = x.std(axis=1, keepdims=True)
        return np.where(std > 0, (x - x.mean(axis=1, keepdims=True)) / np.where(std > 0, std, 1), 0)

    want = z(scores) + 0.3 * z(e)
    np.testing.assert_array_equal(np.argsort(-blended, axis=1), np.argsort(-want, axis=1))
    # No known history item: the two-tower's scores as they were; weight 0: no term at all.
    np.testing.assert_array_equal(blended[1], scores[1])
    assert item_item.blend_full(scores, e, 0.0) is scores
    assert not np.array_equal(np.argsort(-blended[2]), np.argsort(-scores[2]))
    # The graph's version of the same formula.
    graph = item_item.blend_terms(
        tf.constant(scores),
        tf.constant(scores.std(axis=1, keepdims=True)),
        tf.constant(e),
        tf.constant(e.std(axis=1, keepdims=True)),
        tf.constant(0.3),
        where=tf.where,
    )
    np.testing.assert_allclose(graph.numpy(), blended, atol=1e-6)


def test_the_scores_deviation_comes_from_the_catalog_covariance():
    vectors = RNG.normal(size=(50, 5)).astype(np.float32)
    queries = RNG.normal(size=(4, 5)).astype(np.float32)
    got = item_item.score_std_from_covariance(
        tf.constant(queries), tf.constant(item_item.covariance(vectors))
    )
    np.testing.assert_allclose(got.numpy()[:, 0], (queries @ vectors.T).std(axis=1), rtol=1e-4)


def test_catalog_weights_follow_another_catalog_order_and_zero_unknown_items():
    index, weights = item_item.catalog_weights(["m0", "m1", "m2"], B[:3, :3], ["m2", "new", "m0"])
    assert index == {"m2": 0, "new": 1, "m0": 2}
    want = np.array([[B[2, 2], 0, B[2, 0]], [0, 0, 0], [B[0, 2], 0, B[0, 0]]], np.float32)
    np.testing.assert_array_equal(weights, want)


def test_a_new_items_column_is_the_cosine_weighted_mean_of_its_rated_neighbours():
    weights = B.copy()
    weights[:, 4:] = 0.0  # nobody rated items 4 and 5: EASE gives them zero columns and rows
    weights[4:, :] = 0.0
    vectors = np.array(
        [[1, 0], [0.8, 0.6], [0, 1], [-1, 0], [0.6, 0.8], [-0.6, -0.8]], dtype=np.float32
    )
    vectors[2] *= 3.0  # the cosine, not the length, weighs a neighbour
    filled = item_item.fill_new_items(weights, vectors, neighbours=2)
    # Item 4's two nearest rated items: 1 (cosine 0.96) and 2 (0.8).
    np.testing.assert_allclose(
        filled[:, 4], (0.96 * weights[:, 1] + 0.8 * weights[:, 2]) / 1.76, rtol=1e-5, atol=1e-6
    )
    # Item 5 points away from every rated item but 3 (cosine 0.6); 0 (-0.6) weighs nothing.
    np.testing.assert_allclose(filled[:, 5], weights[:, 3], atol=1e-6)
    np.testing.assert_array_equal(filled[:, :4], weights[:, :4])  # rated columns, all rows kept
    assert not filled[4:].any()  # a new item in a history still adds nothing
    e = item_item.ease_scores(np.array([["m1", "m3"]], dtype=object), INDEX, filled)
    np.testing.assert_allclose(e[0, 4], (0.96 * e[0, 1] + 0.8 * e[0, 2]) / 1.76, rtol=1e-5)
    # Nothing to fill, or no neighbours asked for: the same numbers.
    np.testing.assert_array_equal(item_item.fill_new_items(B, RNG.normal(size=(6, 2))), B)
    np.testing.assert_array_equal(item_item.fill_new_items(weights, vectors, 0), weights)


def test_a_catalogs_unknown_items_are_filled_only_for_a_model_that_filled_its_own():
    vectors = RNG.normal(size=(3, 4)).astype(np.float32)
    ids = ["m2", "new", "m0"]
    _, plain = item_item.catalog_weights(["m0", "m1", "m2"], B[:3, :3], ids, vectors, 0)
    _, filled = item_item.catalog_weights(["m0", "m1", "m2"], B[:3, :3], ids, vectors, 10)
    assert not plain[:, 1].any() and filled[:, 1].any()
    np.testing.assert_array_equal(filled[:, [0, 2]], plain[:, [0, 2]])
    np.testing.assert_array_equal(filled, item_item.fill_new_items(plain, vectors, 10))


def test_training_records_the_term_and_the_export_serves_what_evaluation_scores(
    tiny_model_dir, tiny_data_dir
):
    from trainer.data import records
    from trainer.evaluate import EASE_L2_GRID
    from trainer.export import build_module
    from trainer.inference import ModelScorer
    from trainer.serving_module import IndexConfig

    with open(os.path.join(tiny_model_dir, "metrics.json")) as f:
        chosen = json.load(f)["item_item"]
    assert chosen["weight"] == pytest.approx(TINY_ITEM_ITEM_WEIGHT)
    assert chosen["l2"] in EASE_L2_GRID
    module, catalog, users, _ = build_module(
        tiny_model_dir, None, IndexConfig(kind="brute_force", max_k=10)
    )
    model = module.keras_model
    assert float(model.item_item_weight.numpy()) == pytest.approx(TINY_ITEM_ITEM_WEIGHT)
    keys = (*contract.QUERY_FEATURES, contract.HISTORY)
    queries = {k: users[k][:8] for k in keys}
    served = module.retrieve(
        **{k: tf.constant(v.astype(str)) for k, v in queries.items()},
        k=tf.constant([10] * 8),
        exclude_item_ids=tf.constant([[""]] * 8),
        diversity=tf.constant([0.0] * 8, tf.float32),
    )
    scorer = ModelScorer(model, catalog)
    scores = scorer.score(queries)
    top = np.argsort(-scores, axis=1, kind="stable")[:, :10]
    ids = np.asarray(catalog["item_id"]).astype(str)
    np.testing.assert_allclose(
        served["scores"].numpy(), np.take_along_axis(scores, top, 1), atol=1e-4
    )
    assert served["item_ids"].numpy().astype(str).tolist() == ids[top].tolist()
    # The term reorders the lists: without it the same queries rank otherwise.
    model.item_item_weight.assign(0.0)
    try:
        alone = ModelScorer(model, catalog).score(queries)
    finally:
        model.item_item_weight.assign(TINY_ITEM_ITEM_WEIGHT)
    assert np.argsort(-alone, axis=1, kind="stable")[:, :10].tolist() != top.tolist()
    assert records.load_catalog(tiny_data_dir, "p2")["item_id"].tolist() == ids.tolist()


def test_the_weight_is_chosen_on_valid_from_the_grid(tiny_model_dir):
    from trainer.input_pipeline import plan_data
    from trainer.model_dir import load_trained
    from trainer.validation import choose_item_item

    model, config = load_trained(tiny_model_dir)
    config.model.item_item_weight = None
    chosen = choose_item_item(model, plan_data(config), config)
    # (new-item neighbours, α) -> valid recall@10: without the fill, and with it when the
    # catalog has items nobody rated in train.
    curve = {(0, float(a)): r for a, r in chosen["valid_recall_at_10"].items()}
    assert {a for _, a in curve} == set(item_item.ITEM_ITEM_WEIGHTS)
    neighbours = item_item.NEW_ITEM_NEIGHBOURS
    filled = chosen["valid_recall_at_10_filled"]
    assert bool(filled) == (chosen["unrated_items"] > 0)
    curve |= {(neighbours, float(a)): r for a, r in filled.items()}
    best = max(round(r, 9) for r in curve.values())
    want = min((c for c, r in curve.items() if round(r, 9) == best), key=lambda c: (c[1], c[0]))
    assert (chosen["new_item_neighbours"], chosen["weight"]) == want
    assert float(model.item_item_weight.numpy()) == pytest.approx(chosen["weight"])
    assert float(model.item_item_neighbours.numpy()) == chosen["new_item_neighbours"]
    assert np.abs(model.item_item.numpy()).sum() > 0


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--item-item-weight", "-0.1"], "--item-item-weight must be in"),
        (["--item-item-weight", "nan"], "--item-item-weight must be in"),
        (["--no-item-item", "--item-item-weight", "0.2"], "it needs --item-item"),
    ],
)
def test_bad_item_item_settings_are_refused(flags, message):
    from trainer.flags import parse_args

    with pytest.raises(ConfigError, match=message):
        parse_args(["--data", "x", *flags])
