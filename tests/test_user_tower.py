"""The query tower reads what the user did: whole-history queries, typed titles, negatives."""

from __future__ import annotations

import numpy as np
import pytest

import trainer  # noqa: F401  (TF_USE_LEGACY_KERAS before TensorFlow)

tf = pytest.importorskip("tensorflow")

from trainer import baselines, train_queries  # noqa: E402
from trainer.config import ConfigError, TrainConfig  # noqa: E402
from trainer.data import records  # noqa: E402
from trainer.features import cached_or_encoded, dummy_features, liked_titles  # noqa: E402
from trainer.input_pipeline import plan_data, train_dataset  # noqa: E402
from trainer.losses import full_softmax  # noqa: E402
from trainer.model import build_model  # noqa: E402


def _config(
    data_dir: str, split: str = "p2", train_queries: str = "events", **model
) -> TrainConfig:
    config = TrainConfig()
    config.data.data, config.data.split = data_dir, split
    config.data.train_queries = train_queries
    config.data.user_batch_size = 8
    config.model.preset = "tiny"
    config.optim.batch_size = 64
    for name, value in model.items():
        setattr(config.model, name, value)
    config = config.resolve(has_gpu=False)
    config.validate()
    return config


def test_liked_titles_parses_prepared_and_free_text():
    texts = tf.constant(
        [
            "Age 25-34, male, engineer. Liked: Fargo (1996); Heat (1995).",
            "Age 18-24, female, writer. Liked: nothing yet.",
            "space adventure with robots",
            "",
        ]
    )
    got = [[t.decode() for t in row] for row in liked_titles(texts, 3).numpy()]
    assert got == [
        ["Fargo (1996)", "Heat (1995)", ""],
        ["", "", ""],
        ["space adventure with robots", "", ""],
        ["", "", ""],
    ]
    many = tf.constant(["Liked: " + "; ".join(f"T{i}" for i in range(9)) + "."])
    assert [t.decode() for t in liked_titles(many, 4).numpy()[0]] == ["T0", "T1", "T2", "T3"]


def test_no_training_query_contains_its_own_target(tiny_data_dir):
    config = _config(tiny_data_dir)
    plan = plan_data(config)
    assert plan.users is not None  # p2 trains on whole-history queries
    full = dict(zip(plan.users["user_id"], plan.users["history"], strict=True))
    steps = plan.train_examples // config.optim.batch_size
    seen_any = 0
    for batch in train_dataset(plan, config, epoch=0, skip_steps=0, steps_per_epoch=steps):
        history = batch["history"].numpy().astype(str)
        items = batch["item_id"].numpy().astype(str)
        users = batch["user_id"].numpy().astype(str)
        for row, item, user in zip(history, items, users, strict=True):
            real = [h for h in row if h]
            assert item not in real
            assert set(real) <= set(full[user]) - {item}
            seen_any += len(real)
    assert seen_any > 0


def test_history_dropout_is_fresh_each_epoch_and_fixed_by_the_seed(tiny_data_dir):
    config = _config(tiny_data_dir)
    plan = plan_data(config)
    steps = 2

    def first(epoch: int) -> np.ndarray:
        ds = train_dataset(plan, config, epoch=epoch, skip_steps=0, steps_per_epoch=steps)
        return next(iter(ds))["history"].numpy()

    np.testing.assert_array_equal(first(0), first(0))
    assert not np.array_equal(first(0) != b"", first(1) != b"")


@pytest.fixture(scope="module")
def tower_model(tiny_data_dir):
    config = _config(tiny_data_dir)
    plan = plan_data(config)
    return build_model(config.model, plan.assets, seed=3), plan


def test_history_and_query_text_move_the_ranking_without_a_user_id(tower_model):
    model, plan = tower_model
    # Random weights are enough: the test is that the tower reads these inputs at all.
    items = plan.assets.item_ids
    titles = plan.assets.item_titles

    def query(history: list[str], text: str) -> dict[str, tf.Tensor]:
        return {
            "user_id": tf.constant([""]),
            "user_age": tf.constant(["25-34"]),
            "user_gender": tf.constant(["F"]),
            "user_occupation": tf.constant(["writer"]),
            "query_text": tf.constant([text]),
            "history": tf.constant([history + [""] * 3]),
        }

    model.set_text_mode("live")
    base = model.query_embeddings(query([], "")).numpy()
    by_history = model.query_embeddings(query(items[:3], "")).numpy()
    other_history = model.query_embeddings(query(items[10:13], "")).numpy()
    by_titles = model.query_embeddings(query([], f"Liked: {titles[0]}; {titles[1]}.")).numpy()
    free = model.query_embeddings(query([], "a dark love story")).numpy()
    for a, b in ((base, by_history), (by_history, other_history), (base, by_titles), (base, free)):
        assert np.abs(a - b).max() > 1e-4
    unknown = model.query_embeddings(query(["no-such-item"], "")).numpy()
    assert np.all(np.isfinite(unknown))


def test_cached_or_encoded_matches_the_live_encoder(tower_model):
    model, plan = tower_model
    cache, encoder = model.title_cache, model.candidate_encoder
    texts = tf.constant([plan.assets.item_titles[0], "a title nobody has", "", "Star Wars"])
    mixed = cached_or_encoded(cache, encoder, texts).numpy()
    live = encoder.encode_strings(texts).numpy()
    np.testing.assert_allclose(mixed[[0, 1, 3]], live[[0, 1, 3]], atol=1e-5)
    np.testing.assert_array_equal(mixed[2], 0.0)


@pytest.mark.parametrize("negatives", ["full", "mixed", "in_batch"])
def test_every_negative_sampler_gives_a_finite_loss_and_gradients(tiny_data_dir, negatives):
    config = _config(tiny_data_dir, negatives=negatives, sampled_negatives=16)
    plan = plan_data(config)
    model = build_model(config.model, plan.assets, seed=0)
    ds = train_dataset(plan, config, epoch=0, skip_steps=0, steps_per_epoch=1)
    batch = next(iter(ds))

    @tf.function(autograph=True)
    def step(features):
        with tf.GradientTape() as tape:
            loss, sums = model.compute_losses(features, global_batch_size=64)
        grads = tape.gradient(loss, model.trainable_variables)
        return loss, sums, grads

    loss, sums, grads = step(batch)
    assert np.isfinite(float(loss)) and float(sums["retrieval_loss"]) > 0
    assert 0 <= float(sums["hits_at_10"]) <= float(sums["positives"])
    assert any(g is not None and float(tf.reduce_sum(tf.abs(g))) > 0 for g in grads)


def test_full_softmax_leaves_the_users_history_out(tiny_data_dir):
    config = _config(tiny_data_dir, temperature=1.0)
    plan = plan_data(config)
    model = build_model(config.model, plan.assets, seed=0)
    catalog = records.load_catalog(tiny_data_dir, "p2")
    ids = list(catalog["item_id"])
    features = dummy_features(plan.assets, batch=1)
    target = features["item_id"].numpy()[0].decode()
    others = [i for i in ids if i != target][:5]
    features["history"] = tf.constant([others])
    features["rating"] = tf.constant([5.0])
    query_inputs = model.preprocess_query(features)
    candidate_inputs = model.preprocess_candidate(features)
    query = model.query_tower(query_inputs)
    items, scores = model.catalog_logits(query, False)
    loss, _ = full_softmax(
        scores, candidate_inputs["row"], tf.ones([1]), query_inputs["history_rows"]
    )
    logits = (query @ tf.transpose(items)).numpy()[0]
    keep = np.asarray(catalog["popularity"]) > 0  # untrained items are no negatives
    keep[[ids.index(i) for i in others]] = False
    expected = -logits[ids.index(target)] + np.log(np.exp(logits[keep]).sum())
    np.testing.assert_allclose(float(loss), expected, rtol=1e-4)


def test_export_ranks_by_history_and_typed_titles_through_the_session_loader(
    tiny_export, tiny_data_dir
):
    """Same demographics, no user id: what the user did (or typed) decides the top-10."""
    from serving.session_runner import SessionModel

    catalog = records.load_catalog(tiny_data_dir, "p2")
    ids, titles = list(catalog["item_id"]), list(catalog["item_title"])

    def request(histories: list[list[str]], texts: list[str]) -> dict[str, np.ndarray]:
        width = max(1, *(len(h) for h in histories))
        batch = len(texts)
        return {
            "user_id": np.array([""] * batch, object),
            "user_age": np.array(["25-34"] * batch, object),
            "user_gender": np.array(["F"] * batch, object),
            "user_occupation": np.array(["writer"] * batch, object),
            "query_text": np.array(texts, object),
            "history": np.array([h + [""] * (width - len(h)) for h in histories], object),
            "k": np.full([batch], 10, np.int32),
            "exclude_item_ids": np.array([[""]] * batch, object),
            "diversity": np.zeros([batch], np.float32),
        }

    with SessionModel(tiny_export) as served:
        out = served.run(
            "serving_default",
            request(
                [ids[:5], ids[20:25], [], [], ["no-such-item"] * 300, ids[:5]],
                ["", "", f"Liked: {titles[0]}; {titles[1]}.", f"Liked: {titles[30]}.", "", ""],
            ),
        )
    top = [list(row) for row in out["item_ids"]]
    scores = out["scores"]
    # A two-epoch tiny model barely separates users, so the lists may share their items; the
    # scores of the same demographics must still move with the history and with the titles.
    # (A random tiny BERT gives different titles close vectors, and two histories of this
    # tiny data move the scores by ~1e-4 (9.6e-5 seen); the same request twice gives the same
    # scores exactly, which the last row checks.)
    assert top[0] != top[1] or np.abs(scores[0] - scores[1]).max() > 1e-5
    assert top[2] != top[3] or np.abs(scores[2] - scores[3]).max() > 1e-6
    assert np.abs(scores[0] - scores[2]).max() > 1e-5
    assert top[0] == top[5] and np.array_equal(scores[0], scores[5])
    # Unknown ids and a history longer than the cap are no error: ids are still returned.
    assert all(len(row) == 10 and all(row) for row in top)
    assert np.all(np.isfinite(out["scores"]))


def test_training_history_subset_keeps_only_the_users_other_items():
    users = {
        "user_id": np.array(["u1", "u2"], object),
        "history": np.array([["a", "b", "c", "d", "e", ""], ["f", "", "", "", "", ""]], object),
    }
    attach = train_queries.whole_history_queries(users, dropout=0.0, seed=5, max_items=3)
    batch = {"user_id": tf.constant(["u1", "u2", "u9"]), "item_id": tf.constant(["c", "f", "a"])}
    history = attach(tf.constant(0, tf.int64), batch)["history"].numpy().astype(str)
    assert history.shape == (3, 3)
    assert len(set(history[0])) == 3 and set(history[0]) <= {"a", "b", "d", "e"}
    assert set(history[1]) == {""}  # the user's only item is the target
    assert set(history[2]) == {""}  # an unknown user has no history
    again = attach(tf.constant(0, tf.int64), batch)["history"].numpy().astype(str)
    np.testing.assert_array_equal(history, again)


# ----------------------------------------------------------------------------- user batches


def _user_batches(plan, config, seed: int = 0, titles_only: float = 0.0):
    d = config.data
    return train_queries.user_batches(
        plan.users,
        plan.catalog,
        batch_size=d.user_batch_size,
        passes=2,
        target_fraction=d.user_target_fraction,
        seed=seed,
        max_items=d.train_history_items,
        titles_only=titles_only,
    )


def test_titles_only_users_keep_their_titles_and_targets_and_lose_history_and_id(
    tiny_data_dir,
):
    """--user-titles-only: the chosen users read as new users who type titles; the split
    into input and targets (and the softmax's known positives) stays the same."""
    config = _config(tiny_data_dir, train_queries="users")
    plan = plan_data(config)
    plain = list(_user_batches(plan, config))
    mixed = list(_user_batches(plan, config, titles_only=0.5))
    new_users = 0
    for a, b in zip(plain, mixed, strict=True):
        for key in ("query_text", "seen", "targets", "target_ratings", "user_age"):
            np.testing.assert_array_equal(a[key].numpy(), b[key].numpy())
        ids, history = b["user_id"].numpy(), b["history"].numpy()
        blank = ids == b""
        assert not (a["user_id"].numpy() == b"").any()
        np.testing.assert_array_equal(history[~blank], a["history"].numpy()[~blank])
        assert (history[blank] == b"").all()
        new_users += int(blank.sum())
    total = sum(len(b["user_id"]) for b in mixed)
    assert 0 < new_users < total
    every = next(iter(_user_batches(plan, config, titles_only=1.0)))
    assert (every["history"].numpy() == b"").all() and (every["user_id"].numpy() == b"").all()


def test_user_batches_never_put_a_target_in_its_own_query(tiny_data_dir):
    config = _config(tiny_data_dir, train_queries="users")
    config.data.train_history_items = 4  # a cap, so the uncapped `seen` set matters too
    plan = plan_data(config)
    full = dict(zip(plan.users["user_id"], plan.users["history"], strict=True))
    title_of = dict(zip(plan.catalog["item_id"], plan.catalog["item_title"], strict=True))
    targets_seen = 0
    for batch in _user_batches(plan, config):
        for user, history, seen, targets, text in zip(
            *(batch[k].numpy().astype(str) for k in ("user_id", "history", "seen", "targets")),
            batch["query_text"].numpy().astype(str),
            strict=True,
        ):
            history, seen, targets = ({i for i in row if i} for row in (history, seen, targets))
            assert targets and not targets & seen and not targets & history
            assert history <= seen and seen | targets == {i for i in full[user] if i}
            typed = liked_titles(tf.constant([text]), 20).numpy().astype(str)[0]
            assert not {title_of[t] for t in targets} & set(typed)
            targets_seen += len(targets)
    assert targets_seen > 0


def test_user_batches_are_fresh_each_step_and_fixed_by_the_seed(tiny_data_dir):
    config = _config(tiny_data_dir, train_queries="users")
    plan = plan_data(config)

    def targets(seed: int) -> list[np.ndarray]:
        return [b["targets"].numpy() for b in _user_batches(plan, config, seed)]

    first = targets(0)
    for a, b in zip(first, targets(0), strict=True):
        np.testing.assert_array_equal(a, b)
    assert any(not np.array_equal(a, b) for a, b in zip(first, targets(1), strict=True))


def test_user_batches_never_read_p4_heldout_users(tiny_data_dir):
    config = _config(tiny_data_dir, split="p4", train_queries="users")
    plan = plan_data(config)
    heldout = set(records.read_manifest(tiny_data_dir)["splits"]["p4"]["heldout_users"])
    assert heldout
    trained = set()
    for batch in _user_batches(plan, config):
        trained |= set(batch["user_id"].numpy().astype(str))
    assert trained and not trained & heldout


def test_user_losses_are_the_multinomial_likelihood_of_the_targets(tiny_data_dir):
    config = _config(tiny_data_dir, train_queries="users", temperature=1.0, dropout=0.0)
    config.model.id_dropout = config.model.history_id_dropout = 0.0
    plan = plan_data(config)
    model = build_model(config.model, plan.assets, seed=0)
    batch = next(iter(_user_batches(plan, config)))
    loss, sums = model.compute_user_losses(batch, global_batch_size=1)
    ids = list(plan.catalog["item_id"])
    query = model.query_embeddings(batch, training=True).numpy()
    items = model.candidate_embeddings(
        {k: tf.constant(v) for k, v in plan.catalog.items()}, training=True
    ).numpy()
    expected = 0.0
    for row, (seen, targets) in enumerate(
        zip(batch["seen"].numpy().astype(str), batch["targets"].numpy().astype(str), strict=True)
    ):
        logits = items @ query[row]
        keep = np.asarray(plan.catalog["popularity"]) > 0
        keep[[ids.index(i) for i in seen if i]] = False
        normaliser = np.log(np.exp(logits[keep]).sum())
        expected += sum(normaliser - logits[ids.index(t)] for t in targets if t)
    np.testing.assert_allclose(float(sums["retrieval_loss"]), expected, rtol=1e-4)
    assert float(sums["examples"]) == float((batch["targets"].numpy() != b"").sum())
    assert np.isfinite(float(loss))


def test_ease_distillation_mixes_the_teachers_softmax_into_the_user_loss(tiny_data_dir):
    config = _config(tiny_data_dir, train_queries="users", temperature=1.0, dropout=0.0)
    config.model.id_dropout = config.model.history_id_dropout = 0.0
    weight, tau, l2 = 0.4, 0.5, 3.0
    config.model.distill_ease, config.model.distill_temperature = weight, tau
    plan = plan_data(config)
    teacher = train_queries.ease_teacher(plan.users, plan.catalog, l2)
    ids = [str(i) for i in plan.catalog["item_id"]]
    # The teacher is EASE's closed form on the users' train rows, in catalog order.
    x = np.zeros((len(plan.users["user_id"]), len(ids)))
    for u, history in enumerate(plan.users["history"].astype(str)):
        x[u, [ids.index(i) for i in history if i in ids]] = 1.0
    np.testing.assert_allclose(teacher, baselines.fit_ease(x, l2), atol=1e-5)

    model = build_model(config.model, plan.assets, seed=0)
    d = config.data
    batch = next(
        iter(
            train_queries.user_batches(
                plan.users, plan.catalog, batch_size=d.user_batch_size, passes=1,
                target_fraction=d.user_target_fraction, seed=0, teacher=teacher,
            )
        )
    )  # fmt: skip
    _, sums = model.compute_user_losses(batch, global_batch_size=1)
    query = model.query_embeddings(batch, training=True).numpy()
    items = model.candidate_embeddings(
        {k: tf.constant(v) for k, v in plan.catalog.items()}, training=True
    ).numpy()
    seen_ids = batch["seen"].numpy().astype(str)
    target_ids = batch["targets"].numpy().astype(str)
    multinomial = distilled = 0.0
    for row, (seen, targets) in enumerate(zip(seen_ids, target_ids, strict=True)):
        kept = [ids.index(i) for i in seen if i]
        hot = np.zeros(len(ids))
        hot[kept] = 1.0
        scores = hot @ teacher
        np.testing.assert_allclose(batch["teacher"].numpy()[row], scores, atol=1e-4)
        keep = np.asarray(plan.catalog["popularity"]) > 0
        keep[kept] = False
        logits = items @ query[row]
        log_p = logits[keep] - np.log(np.exp(logits[keep]).sum())
        target = np.exp(scores[keep] / tau) / np.exp(scores[keep] / tau).sum()
        rows = [ids.index(t) for t in targets if t]
        multinomial += -sum(log_p[keep[:r].sum()] for r in rows)
        distilled += -(target * log_p).sum() * len(rows)
    expected = (1 - weight) * multinomial + weight * distilled
    np.testing.assert_allclose(float(sums["retrieval_loss"]), expected, rtol=1e-4)


def test_ease_distillation_needs_user_batches(tiny_data_dir):
    with pytest.raises(ConfigError, match="--distill-ease needs --train-queries users"):
        _config(tiny_data_dir, train_queries="events", distill_ease=0.5)
    with pytest.raises(ConfigError, match="--distill-ease must be in"):
        _config(tiny_data_dir, train_queries="users", distill_ease=1.0)


def test_new_item_bias_flag_is_checked():
    from trainer.flags import parse_args

    assert parse_args(["--data", "d", "--new-item-bias", "0.15"]).model.new_item_bias == 0.15
    with pytest.raises(ConfigError, match=r"--new-item-bias must be in \[0, 1\], got 2"):
        parse_args(["--data", "d", "--new-item-bias", "2"])
    with pytest.raises(ConfigError, match="needs --popularity-prior"):
        parse_args(["--data", "d", "--new-item-bias", "0.1", "--no-popularity-prior"])
