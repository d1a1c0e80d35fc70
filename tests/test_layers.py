"""The model's layers on their own: config round trips (as keras-rs and KerasHub test theirs),
the library layers against the math they replaced, and seeded starting weights. Tiny dims."""

from __future__ import annotations

import numpy as np
import pytest

import trainer  # noqa: F401  (TF_USE_LEGACY_KERAS before TensorFlow)

tf = pytest.importorskip("tensorflow")
keras = pytest.importorskip("keras")

from trainer.history import HistoryEncoder, SetEncoder  # noqa: E402
from trainer.layers import MLP, IdDropout, Projection  # noqa: E402
from trainer.ranking_head import RankingHead  # noqa: E402
from trainer.text_encoder import TextCache, TextEncoder  # noqa: E402
from trainer.towers import CandidateTower, QueryTower, id_embedding  # noqa: E402


def random(*shape: int, seed: int = 0) -> tf.Tensor:
    return tf.constant(np.random.default_rng(seed).normal(size=shape), tf.float32)


def round_trip(layer: keras.layers.Layer, *args, **kwargs) -> keras.layers.Layer:
    """Rebuilds ``layer`` from its config, copies its weights, and checks both agree: the same
    config again, the same outputs on ``args`` (``training=False``). Returns the clone."""
    expected = layer(*args, **kwargs)
    clone = layer.__class__.from_config(layer.get_config())
    assert clone.get_config() == layer.get_config()
    clone(*args, **kwargs)
    clone.set_weights(layer.get_weights())
    np.testing.assert_allclose(clone(*args, **kwargs), expected, atol=1e-6)
    return clone


def gelu(x: np.ndarray) -> np.ndarray:
    return keras.ops.gelu(x, approximate=False).numpy()


# ----------------------------------------------------------------------------- building blocks


def test_id_dropout_round_trip_and_drops_whole_vectors():
    layer = round_trip(IdDropout(0.5, seed=3), random(64, 4), training=False)
    assert layer.get_config()["rate"] == 0.5 and layer.get_config()["seed"] == 3
    dropped = layer(tf.ones([64, 4]), training=True).numpy()
    rows = dropped.sum(-1)
    assert set(rows.tolist()) <= {0.0, 4.0} and 0 < (rows == 0).sum() < 64


def test_mlp_and_projection_round_trip():
    round_trip(MLP([6, 3], 0.1, name="mlp"), random(2, 5, 4))
    projection = round_trip(Projection([6], 4, 0.1), random(3, 5), residual=random(3, 4))
    out = projection(random(3, 5)).numpy()
    assert out.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(out, axis=-1), 1.0, rtol=1e-5)


def test_text_cache_round_trip():
    cache = TextCache(["a", "b", "a", "c"], 3)
    assert cache.keys == ["a", "b", "c"]
    cache.vectors.assign(random(4, 3))
    rows = cache.lookup(tf.constant(["c", "zzz", "a"]))
    assert rows.numpy().tolist() == [3, 0, 1]
    round_trip(cache, rows)


def test_text_encoder_config_rebuilds_the_same_encoder():
    import keras_hub

    vocabulary = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "toy", "story"]
    backbone = keras_hub.models.BertBackbone(
        vocabulary_size=len(vocabulary),
        num_layers=1,
        num_heads=1,
        hidden_dim=8,
        intermediate_dim=8,
        max_sequence_length=8,
    )
    tokenizer = keras_hub.models.BertTokenizer(vocabulary=vocabulary, lowercase=True)
    encoder = TextEncoder(backbone, tokenizer, 8, "cls")
    round_trip(encoder, encoder.tokenize(tf.constant(["Toy story", "story"])))


# ----------------------------------------------------------------------------- history encoders


@pytest.mark.parametrize("transformer", [True, False])
def test_history_encoder_round_trip(transformer: bool):
    encoder = HistoryEncoder(8, 2, 4, transformer=transformer, dropout=0.1, id_dropout=0.2)
    table, rows = random(5, 6), tf.constant([[1, 2, 0], [3, 0, 0]])
    ids, mask = random(2, 3, 4), tf.constant([[True, True, False], [True, False, False]])
    titles, title_mask = random(2, 2, 6), tf.constant([[True, False], [False, False]])
    round_trip(encoder, table, rows, ids, mask, titles, title_mask)
    assert encoder(table, rows, ids, mask).shape == (2, 16)


def test_set_encoder_round_trip_and_projected_tables():
    encoder = SetEncoder(8, 0.1, id_dropout=0.2)
    text, ids = random(6, 5), random(6, 4, seed=1)
    rows = tf.constant([[2, 3, 0, 0], [0, 0, 0, 0]])  # the second bag is empty
    clone = round_trip(encoder, text, ids, rows)
    out = encoder(text, ids, rows).numpy()
    assert np.isfinite(out).all() and out.shape == (2, 16)
    # What an export serves: the tables projected once, then read as they are.
    projected = clone.project(text, ids)
    np.testing.assert_allclose(clone(*projected, rows, projected=True), out, atol=1e-6)


def test_set_encoder_serving_path_equals_the_training_math_with_titles():
    encoder = SetEncoder(8, 0.1, id_dropout=0.2)
    text, ids = random(6, 5), random(6, 4, seed=1)
    # A full bag, an empty one, one of titles only, one with an unknown row (1) among items.
    rows = tf.constant([[2, 3, 4], [0, 0, 0], [0, 0, 0], [5, 1, 0]])
    titles = random(4, 2, 5, seed=2)
    title_mask = tf.constant([[True, False], [False, False], [True, True], [False, True]])
    encoder.build()
    encoder.title_type.assign(random(1, 1, 8, seed=3))  # zero at init: it must still count
    out = encoder(text, ids, rows, titles, title_mask).numpy()
    projected = encoder.project(text, ids)
    served = encoder(*projected, rows, titles, title_mask, projected=True)
    np.testing.assert_allclose(served, out, atol=1e-5)
    # The export stores one table, the sum of the two projections.
    summed = encoder(projected[0] + projected[1], None, rows, titles, title_mask, projected=True)
    np.testing.assert_allclose(summed, out, atol=1e-5)
    # Items and titles both move it: nothing on the serving path is dropped.
    assert np.abs(out[0] - out[1]).max() > 1e-3 and np.abs(out[2] - out[1]).max() > 1e-3


# ----------------------------------------------------------------------------- ranking head


def test_feature_cross_is_x0_times_affine_plus_x():
    import keras_rs

    cross = keras_rs.layers.FeatureCross()
    x0, x = random(4, 6), random(4, 6, seed=1)
    out = cross(x0, x).numpy()
    w, b = (v.numpy() for v in cross.dense.weights)
    np.testing.assert_allclose(out, x0.numpy() * (x.numpy() @ w + b) + x.numpy(), rtol=1e-5)


def test_ranking_head_equals_the_dcn_math_and_round_trips():
    head = RankingHead([8], 2, 0.1, initial_rating=3.0, id_buckets=10, factor_dim=3)
    q, c = random(2, 4), random(2, 3, 4, seed=1)  # one query against a list of 3
    users, items = tf.constant([1, 2]), tf.constant([[3, 4, 5], [6, 7, 8]])
    got = round_trip(head, q, c, users, items)(q, c, users, items).numpy()
    # The same head by hand: x0 = [q, c, q * c], two crosses x0 * (x W + b) + x, the MLP, the
    # output Dense, then b_user + b_item + <p_user, p_item>.
    qb = np.broadcast_to(q.numpy()[:, None], c.shape)
    x0 = np.concatenate([qb, c.numpy(), qb * c.numpy()], -1)
    x = x0
    for cross in head.crosses:
        w, b = (v.numpy() for v in cross.dense.weights)
        x = x0 * (x @ w + b) + x
    (w1, b1), (w2, b2) = head.mlp.dense[0].get_weights(), head.out.get_weights()
    rating = (gelu(x @ w1 + b1) @ w2 + b2)[..., 0]
    u = head.user_terms.embeddings.numpy()[users.numpy()][:, None]
    i = head.item_terms.embeddings.numpy()[items.numpy()]
    expected = rating + u[..., 0] + i[..., 0] + (u[..., 1:] * i[..., 1:]).sum(-1)
    np.testing.assert_allclose(got, expected, atol=1e-5)


def test_ranking_head_id_terms_are_biased_matrix_factorisation():
    head = RankingHead([8], 0, 0.0, id_buckets=10, factor_dim=3)
    q = tf.math.l2_normalize(tf.random.normal([2, 4]), -1)
    c = tf.math.l2_normalize(tf.random.normal([2, 4]), -1)
    users, items = tf.constant([1, 2]), tf.constant([3, 4])
    head(q, c, users, items)
    base = RankingHead([8], 0, 0.0)
    base(q, c)
    base.set_weights(head.get_weights()[:-2])
    user_terms = head.user_terms.embeddings.numpy()[[1, 2]]
    item_terms = head.item_terms.embeddings.numpy()[[3, 4]]
    expected = (
        base(q, c).numpy()
        + user_terms[:, 0]
        + item_terms[:, 0]
        + (user_terms[:, 1:] * item_terms[:, 1:]).sum(-1)
    )
    np.testing.assert_allclose(head(q, c, users, items).numpy(), expected, rtol=1e-5)
    np.testing.assert_allclose(
        head.id_penalty(users, items).numpy(),
        (user_terms**2).sum(-1) + (item_terms**2).sum(-1),
        rtol=1e-5,
    )
    with pytest.raises(ValueError, match="user and item ids"):
        head(q, c)


def test_ranking_head_starts_from_the_hand_written_crosses_weights():
    # The hand-written cross built a Dense("glorot_uniform") at the head's first call: one seed
    # drawn per layer, after everything the head makes up front. Same seed, same kernels.
    q, c = random(2, 4), random(2, 4, seed=1)
    keras.utils.set_random_seed(3)
    head = RankingHead([8], 2, 0.0, id_buckets=10, factor_dim=3)
    head(q, c, tf.constant([1, 2]), tf.constant([3, 4]))
    keras.utils.set_random_seed(3)
    reference = RankingHead([8], 0, 0.0, id_buckets=10, factor_dim=3)
    kernels = [keras.layers.Dense(12) for _ in range(2)]
    for dense in kernels:
        dense.build((None, 12))
    for cross, dense in zip(head.crosses, kernels, strict=True):
        np.testing.assert_array_equal(cross.dense.kernel.numpy(), dense.kernel.numpy())
        # Checkpoint keys are variable paths: the same as the hand-written layer's.
        assert cross.dense.kernel.path == f"{head.name}/{cross.name}/dense/kernel"
    reference(q, c, tf.constant([1, 2]), tf.constant([3, 4]))
    np.testing.assert_array_equal(head.out.kernel.numpy(), reference.out.kernel.numpy())


# ----------------------------------------------------------------------------- towers


def _tower_inputs(batch: int = 3) -> dict:
    return {
        "text": random(batch, 6),
        "user_id": tf.constant([1, 2, 3][:batch]),
        "item_id": tf.constant([4, 5, 6][:batch]),
        **{name: tf.constant([0, 1, 2][:batch]) for name in ("user_age", "user_gender")},
        "user_occupation": tf.constant([2, 1, 0][:batch]),
        "history_rows": tf.constant([[2, 3, 0], [4, 0, 0], [0, 0, 0]][:batch]),
        "history_ids": tf.constant([[7, 8, 0], [9, 0, 0], [0, 0, 0]][:batch]),
        "genres": tf.constant(np.eye(3, 4)[:batch], tf.float32),
        "year": tf.constant([0, 1, 2][:batch]),
    }


def _rebuilt(tower: keras.layers.Layer, *callables) -> keras.layers.Layer:
    """The tower rebuilt from its plain config plus the model-owned callables it was given."""
    config = dict(tower.get_config())
    config.pop("dtype")  # the global policy's, as the tower's
    return tower.__class__(*callables, **config)


@pytest.mark.parametrize("history", ["set", "transformer", "none"])
def test_query_tower_config_plus_its_callables_rebuilds_it(history: str):
    items = id_embedding(20, 4, "item_id_embedding")
    text_table = random(6, 6, seed=2)
    callables = (
        lambda text, training=False: text,
        lambda rows: (text_table, rows),
        items,
    )
    tower = QueryTower(
        *callables,
        embedding_dim=4,
        tower_layers=[8],
        dropout=0.1,
        id_buckets=20,
        id_embedding_dim=4,
        id_dropout=0.2,
        id_residual=True,
        field_buckets=5,
        field_embedding_dim=3,
        history=history,
        history_dim=8,
        history_heads=2,
        history_length=3,
        history_id_dropout=0.2,
        catalog_tables=lambda: (text_table, items(tf.range(6))),
    )
    inputs = _tower_inputs()
    out = tower(inputs).numpy()
    np.testing.assert_allclose(np.linalg.norm(out, axis=-1), 1.0, rtol=1e-5)
    clone = _rebuilt(tower, *callables)
    clone.catalog_tables = tower.catalog_tables
    assert clone.get_config() == tower.get_config()
    clone(inputs)
    clone.set_weights(tower.get_weights())
    np.testing.assert_allclose(clone(inputs).numpy(), out, atol=1e-6)


def test_candidate_tower_from_model_config_reads_the_config():
    from trainer.config import ModelConfig

    config = ModelConfig(embedding_dim=4, tower_layers=(8,), id_buckets=20, id_embedding_dim=4)
    config.history_dim, config.field_embedding_dim = 8, 3
    items = id_embedding(config.id_buckets, config.id_embedding_dim, "item_id_embedding")
    text_vectors = lambda text, training=False: text  # noqa: E731
    tower = CandidateTower.from_model_config(
        config, text_vectors=text_vectors, item_id_embedding=items, num_years=3
    )
    settings = tower.get_config()
    assert settings["embedding_dim"] == 4 and settings["tower_layers"] == [8]
    assert settings["id_dropout"] == config.id_dropout and settings["num_years"] == 3
    inputs = _tower_inputs()
    out = tower(inputs).numpy()
    clone = _rebuilt(tower, text_vectors, items)
    clone(inputs)
    clone.set_weights(tower.get_weights())
    np.testing.assert_allclose(clone(inputs).numpy(), out, atol=1e-6)
