"""Export: reload in a fresh process, both index variants, warm-up, atomicity, bad input, and
the saved SignatureDefs against the serving contract."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

from common import contract
from common.contract import CANDIDATE_FEATURES, RECALL_FILE, WARMUP_FILE
from tests.conftest import REPO
from trainer.data import records
from trainer.export import build_module, export, save_export
from trainer.model import log_popularity_by_row, untrained_by_row
from trainer.serving_module import ExportError, IndexConfig

QUERY_KEYS = (*contract.QUERY_FEATURES, contract.HISTORY)


def _queries(data_dir: str, n: int = 3) -> dict[str, tf.Tensor]:
    users = records.load_users(data_dir, "p2")
    return {k: tf.constant(users[k][:n].astype(str)) for k in QUERY_KEYS}


def _retrieve(signature, queries, k=5, exclude=None, diversity=0.0):
    """``k`` and ``diversity``: one value for every query, or a list of per-query values."""
    batch = int(queries["query_text"].shape[0])
    exclude = tf.constant(exclude if exclude is not None else [[""]] * batch)
    return signature(
        **queries,
        k=tf.constant(np.broadcast_to(np.asarray(k, np.int32), [batch])),
        exclude_item_ids=exclude,
        diversity=tf.constant(np.broadcast_to(np.asarray(diversity, np.float32), [batch])),
    )


@pytest.fixture(scope="module")
def brute_force_export(tiny_model_dir, tmp_path_factory):
    """A brute-force export of the tiny model: ``<base>/movielens/1``."""
    base = str(tmp_path_factory.mktemp("brute_force"))
    return export(tiny_model_dir, base, "movielens", IndexConfig(kind="brute_force", max_k=10))


@pytest.fixture(scope="module")
def loaded(tiny_export):
    import tensorflow_text  # noqa: F401
    from scann.scann_ops.py import scann_ops  # noqa: F401

    return tf.saved_model.load(tiny_export)


def test_export_layout_and_metadata(tiny_export):
    assert os.path.basename(tiny_export) == "1"
    assert not [n for n in os.listdir(os.path.dirname(tiny_export)) if n.startswith(".tmp")]
    with open(os.path.join(tiny_export, "assets.extra", RECALL_FILE)) as f:
        info = json.load(f)
    assert info["recall_at_10_vs_brute_force"] >= 0.95
    assert info["index"]["kind"] == "scann" and info["num_items"] == 60


def test_warmup_file_parses(tiny_export):
    from tensorflow_serving.apis import prediction_log_pb2

    path = os.path.join(tiny_export, "assets.extra", WARMUP_FILE)
    signatures = []
    for raw in tf.data.TFRecordDataset(path).as_numpy_iterator():
        log = prediction_log_pb2.PredictionLog.FromString(raw)
        signatures.append(log.predict_log.request.model_spec.signature_name)
    assert sorted(signatures) == [
        "candidate_embedding",
        "query_embedding",
        "rank",
        "serving_default",
    ]


def test_fresh_process_matches_in_memory_model(
    tiny_export, tiny_model_dir, tiny_data_dir, tmp_path
):
    module, *_ = build_module(tiny_model_dir, None, IndexConfig(kind="scann", max_k=20))
    expected = _retrieve(module.retrieve, _queries(tiny_data_dir), k=5)
    script = f"""
import json, numpy as np, tensorflow as tf
import tensorflow_text
from scann.scann_ops.py import scann_ops
sig = tf.saved_model.load({tiny_export!r}).signatures["serving_default"]
q = json.load(open({str(tmp_path / "q.json")!r}))
out = sig(**{{k: tf.constant(v) for k, v in q.items()}}, k=tf.constant([5] * 3),
          exclude_item_ids=tf.constant([[""]] * 3), diversity=tf.constant([0.0] * 3))
print(json.dumps({{"ids": out["item_ids"].numpy().astype(str).tolist(),
                   "scores": out["scores"].numpy().tolist()}}))
"""
    queries = {k: v.numpy().astype(str).tolist() for k, v in _queries(tiny_data_dir).items()}
    (tmp_path / "q.json").write_text(json.dumps(queries))
    env = {k: v for k, v in os.environ.items() if k != "TF_USE_LEGACY_KERAS"}
    done = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=str(tmp_path),
        env=env,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    got = json.loads(done.stdout.strip().splitlines()[-1])
    assert got["ids"] == expected["item_ids"].numpy().astype(str).tolist()
    np.testing.assert_allclose(got["scores"], expected["scores"].numpy(), atol=1e-4)


def test_signatures_and_options(loaded, tiny_data_dir, tiny_model_dir):
    sigs = loaded.signatures
    assert set(sigs) == {"serving_default", "rank", "query_embedding", "candidate_embedding"}
    queries = _queries(tiny_data_dir)
    plain = _retrieve(sigs["serving_default"], queries, k=10)
    assert plain["item_ids"].shape == (3, 10) and plain["titles"].shape == (3, 10)
    scores = plain["scores"].numpy()
    assert np.all(np.diff(scores, axis=1) <= 1e-6)
    # Exclusions remove exactly those items; unknown ids are ignored.
    first = plain["item_ids"].numpy()[:, :2].astype(str)
    excluded = _retrieve(
        sigs["serving_default"],
        queries,
        k=10,
        exclude=[[*row, "no-such-item"] for row in first.tolist()],
    )
    ids = excluded["item_ids"].numpy().astype(str)
    for row, out in zip(first, ids, strict=True):
        assert not set(row) & set(out)
    # Diversity re-ranks the same pool: still k distinct items, some order changes.
    diverse = _retrieve(sigs["serving_default"], queries, k=10, diversity=0.9)
    assert all(len(set(r)) == 10 for r in diverse["item_ids"].numpy().tolist())
    # Embeddings: D unit columns and the popularity-prior column (the query's holds 1, the
    # candidate's the weight chosen on valid times log(1 + train count)); the retrieve scores
    # are their inner products with the catalog's.
    emb = sigs["query_embedding"](**queries)["embeddings"].numpy()
    np.testing.assert_allclose(np.linalg.norm(emb[:, :-1], axis=1), 1.0, atol=1e-4)
    with open(os.path.join(tiny_model_dir, "metrics.json")) as f:
        prior = json.load(f)["popularity_prior"]
    np.testing.assert_allclose(emb[:, -1], 1.0, atol=1e-6)
    catalog = records.load_catalog(tiny_data_dir, "p2")
    items = sigs["candidate_embedding"](
        **{k: tf.constant(np.asarray(catalog[k]).astype(str)) for k in CANDIDATE_FEATURES}
    )["embeddings"].numpy()
    log_counts = log_popularity_by_row(catalog["popularity"])[2:]
    new_items = untrained_by_row(catalog["popularity"])[2:]
    want_column = prior["weight"] * log_counts + prior["new_item_bias"] * new_items
    np.testing.assert_allclose(items[:, -1], want_column, rtol=1e-5, atol=1e-7)
    # ... plus the item-item term of each query's history (the tiny model's weight is fixed).
    history = queries[contract.HISTORY].numpy()
    want = np.sort(_with_item_item(tiny_model_dir, emb @ items.T, history), axis=1)
    np.testing.assert_allclose(scores, want[:, ::-1][:, :10], atol=1e-4)
    new = sigs["candidate_embedding"](
        item_id=tf.constant(["brand-new"]),
        item_title=tf.constant(["A New Film (2026)"]),
        item_year=tf.constant(["2026"]),
        item_genres=tf.constant(["Drama"]),
        item_text=tf.constant(["A New Film (2026). Genres: Drama"]),
    )["embeddings"]
    assert new.shape == (1, emb.shape[1]) and np.isfinite(new.numpy()).all()
    ratings = sigs["rank"](**queries, candidate_item_ids=tf.constant([["1", "2"]] * 3))["ratings"]
    assert ratings.shape == (3, 2) and np.isfinite(ratings.numpy()).all()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"k": 0}, "k must be at least 1"),
        ({"k": 21}, "k must be at most 20"),
        ({"diversity": 1.5}, "diversity must be <= 1"),
    ],
)
def test_bad_retrieve_arguments(loaded, tiny_data_dir, change, message):
    with pytest.raises(tf.errors.InvalidArgumentError, match=message):
        _retrieve(
            loaded.signatures["serving_default"],
            _queries(tiny_data_dir),
            k=change.get("k", 5),
            diversity=change.get("diversity", 0.0),
        )


def test_bad_batches_and_ids(loaded, tiny_data_dir):
    queries = _queries(tiny_data_dir)
    empty = {k: v[:0] for k, v in queries.items()}
    with pytest.raises(tf.errors.InvalidArgumentError, match="empty batch"):
        _retrieve(loaded.signatures["serving_default"], empty, exclude=tf.zeros([0, 1], tf.string))
    with pytest.raises(tf.errors.InvalidArgumentError, match="not in the catalog"):
        loaded.signatures["rank"](**queries, candidate_item_ids=tf.constant([["1", "zzz"]] * 3))
    with pytest.raises((TypeError, ValueError, tf.errors.InvalidArgumentError)):
        loaded.signatures["query_embedding"](**{**queries, "user_id": tf.constant([1, 2, 3])})
    # Empty strings and a short history are valid queries.
    blank = {k: tf.fill(tf.shape(v)[:1], "") for k, v in queries.items() if k != "history"}
    out = _retrieve(
        loaded.signatures["serving_default"], {**blank, "history": tf.constant([[""]] * 3)}, k=3
    )
    assert out["item_ids"].shape == (3, 3)


def test_brute_force_export_and_no_overwrite(tiny_model_dir, brute_force_export):
    path = brute_force_export
    base = os.path.dirname(os.path.dirname(path))
    assert path.endswith(os.path.join("movielens", "1"))
    assert tf.saved_model.load(path).signatures["serving_default"] is not None
    with pytest.raises(ExportError, match="already exists"):
        export(tiny_model_dir, base, "movielens", IndexConfig(kind="brute_force"), version=1)
    assert export(tiny_model_dir, base, "movielens", IndexConfig(kind="brute_force")).endswith("2")


def test_interrupted_export_leaves_nothing(tiny_model_dir, tiny_data_dir, tmp_path, monkeypatch):
    module, catalog, users, _ = build_module(tiny_model_dir, None, IndexConfig(kind="brute_force"))

    def boom(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(tf.saved_model, "save", boom)
    with pytest.raises(KeyboardInterrupt):
        save_export(module, str(tmp_path), "movielens", None, users, catalog)
    assert os.listdir(tmp_path / "movielens") == []


def test_low_recall_fails_the_export(tiny_model_dir, tmp_path, monkeypatch):
    import trainer.export as export_lib

    monkeypatch.setattr(export_lib, "recall_against_brute_force", lambda *a, **k: 0.5)
    with pytest.raises(ExportError, match="recall@10 0.5000 is below --min-recall 0.95"):
        export(tiny_model_dir, str(tmp_path), "movielens", IndexConfig(kind="scann"))
    assert not os.path.exists(tmp_path / "movielens" / "1")


def test_low_recall_searches_more_leaves_when_not_pinned(tiny_model_dir, tmp_path, monkeypatch):
    import trainer.export as export_lib

    searched = []

    def recall(module, embeddings, exact):
        searched.append(module.index_config.num_leaves_to_search)
        return 0.9 if module.index_config.num_leaves_to_search < 20 else 0.99

    monkeypatch.setattr(export_lib, "recall_against_brute_force", recall)
    path = export(tiny_model_dir, str(tmp_path), "m", IndexConfig(kind="scann", num_leaves=30))
    assert searched == [8, 16, 30]
    with open(os.path.join(path, "assets.extra", "recall_check.json")) as f:
        info = json.load(f)
    assert info["index"]["num_leaves_to_search"] == 30
    assert info["recall_at_10_vs_brute_force"] == 0.99
    # A pinned --num-leaves-to-search is kept: the check fails instead.
    pinned = IndexConfig(kind="scann", num_leaves=30, num_leaves_to_search=8)
    with pytest.raises(ExportError, match="below --min-recall"):
        export(tiny_model_dir, str(tmp_path), "m", pinned)


def test_a_derived_leaf_count_that_passes_is_halved_while_it_would_still_pass(
    tiny_model_dir, tmp_path, monkeypatch
):
    import trainer.export as export_lib

    built, tried = [], []
    monkeypatch.setattr(
        export_lib,
        "recall_against_brute_force",
        lambda module, *a, **k: built.append(module.index_config.num_leaves_to_search) or 0.99,
    )

    def at_leaves(module, embeddings, exact, leaves):
        tried.append(leaves)
        return 0.99 if leaves >= 3 else 0.9

    monkeypatch.setattr(export_lib, "recall_at_leaves", at_leaves)
    small = {"num_leaves": 6, "max_k": 5}  # 3 of 6 leaves still hold the 10-item pool
    path = export(tiny_model_dir, str(tmp_path), "m", IndexConfig(kind="scann", **small))
    assert tried == [3, 1]  # derived 6 (all) passes; 3 would too, 1 would not
    assert built == [6, 3]  # the index is rebuilt at 3 and checked again
    with open(os.path.join(path, "assets.extra", "recall_check.json")) as f:
        assert json.load(f)["index"]["num_leaves_to_search"] == 3
    # A pinned count is only checked, never lowered.
    tried.clear()
    pinned = IndexConfig(kind="scann", num_leaves_to_search=6, **small)
    path = export(tiny_model_dir, str(tmp_path), "m", pinned)
    assert tried == []
    with open(os.path.join(path, "assets.extra", "recall_check.json")) as f:
        assert json.load(f)["index"]["num_leaves_to_search"] == 6


def test_query_time_leaves_search_the_built_index(tiny_model_dir, tiny_data_dir):
    import trainer.export as export_lib

    index = IndexConfig(kind="scann", num_leaves=6, num_leaves_to_search=6, max_k=20)
    module, _, users, _ = build_module(tiny_model_dir, None, index)
    queries = {k: np.asarray(users[k]).astype(object) for k in export_lib._QUERY_INPUTS}
    embeddings = module.query_embedding(**queries)["embeddings"]
    exact = export_lib.exact_top_k(module, embeddings)
    # Every leaf searched: the query-time path answers as the index's own search does.
    full = export_lib.recall_at_leaves(module, embeddings, exact, 6)
    assert full == pytest.approx(export_lib.recall_against_brute_force(module, embeddings, exact))
    assert full > 0.9
    # One leaf holds fewer items than the reordering set: a count the tuner must refuse.
    assert export_lib.recall_at_leaves(module, embeddings, exact, 1) == 0.0


def test_cli_errors(tmp_path):
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "trainer.export",
            "--model-dir",
            str(tmp_path / "none"),
            "--export-base",
            str(tmp_path),
            "--model-name",
            "m",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
    )
    assert done.returncode == 2 and "is not a trained model dir" in done.stderr
    assert "Traceback" not in done.stderr


def _session_cases(path, tiny_data_dir):
    """Every signature's warm-up request plus retrieve with mixed per-query k and diversity."""
    from tensorflow_serving.apis import prediction_log_pb2

    cases = []
    for raw in tf.data.TFRecordDataset(os.path.join(path, "assets.extra", WARMUP_FILE)):
        request = prediction_log_pb2.PredictionLog.FromString(raw.numpy()).predict_log.request
        inputs = {k: tf.make_ndarray(v) for k, v in request.inputs.items()}
        cases.append((request.model_spec.signature_name, inputs))
    queries = {k: v.numpy() for k, v in _queries(tiny_data_dir).items()}
    mixed = {
        **queries,
        "k": np.array([1, 7, 4], np.int32),
        "exclude_item_ids": np.array([["1", "2"], ["", ""], ["3", "no-such-item"]], object),
        "diversity": np.array([0.0, 0.8, 0.3], np.float32),
    }
    cases.append(("serving_default", mixed))
    return cases


@pytest.mark.parametrize("variant", ["scann", "brute_force"])
def test_every_signature_runs_through_the_session_loader(
    variant, tiny_export, brute_force_export, tiny_data_dir
):
    """TF Serving's path (MetaGraph restore + Session.run on signature tensor names) gives what
    tf.saved_model.load gives, for every signature of both index variants."""
    from serving.session_runner import SessionModel

    path = tiny_export if variant == "scann" else brute_force_export
    reference = tf.saved_model.load(path).signatures
    cases = _session_cases(path, tiny_data_dir)
    assert {name for name, _ in cases} == set(reference)
    with SessionModel(path) as model:
        # The MetaGraph also holds the loader's own `__saved_model_init_op` (tables, index).
        assert {n for n in model.signature_defs if not n.startswith("__")} == set(reference)
        for name, inputs in cases:
            got = model.run(name, inputs)
            want = reference[name](**{k: tf.constant(v) for k, v in inputs.items()})
            assert set(got) == set(want)
            for key, value in want.items():
                value = value.numpy()
                assert got[key].shape == value.shape, (name, key)
                if value.dtype == object:
                    assert got[key].tolist() == value.tolist(), (name, key)
                else:
                    np.testing.assert_allclose(got[key], value, atol=1e-5, err_msg=f"{name}/{key}")
        # Per-query k: each row holds its own k items, then padding, up to the batch's largest k.
        ids = model.run("serving_default", cases[-1][1])["item_ids"].astype(str)
        assert ids.shape == (3, 7)
        assert [int((row != "").sum()) for row in ids] == [1, 7, 4]
        assert not {"1", "2"} & set(ids[0]) and "3" not in ids[2]
        # The checks hold on this path too, with their own messages.
        rank_inputs = next(inputs for name, inputs in cases if name == "rank")
        bad_rank = dict(rank_inputs)
        bad_rank["candidate_item_ids"] = np.array(
            [["1", "zzz"]] * len(rank_inputs["query_text"]), object
        )
        with pytest.raises(tf.errors.InvalidArgumentError, match="not in the catalog"):
            model.run("rank", bad_rank)
        short_k = dict(cases[-1][1], k=np.array([3, 3], np.int32))
        with pytest.raises(tf.errors.InvalidArgumentError, match="input k must have the same"):
            model.run("serving_default", short_k)
        # Runs go through one Session callable per (feeds, fetches): another feed order or an
        # output filter makes its own and answers the same; a bad shape names the input.
        full = model.run("serving_default", cases[-1][1])
        reordered = dict(reversed(list(cases[-1][1].items())))
        scores = model.run("serving_default", reordered, ["scores"])
        assert list(scores) == ["scores"]
        np.testing.assert_array_equal(scores["scores"], full["scores"])
        count = len(model._callables)
        model.run("serving_default", reordered, ["scores"])
        assert len(model._callables) == count
        with pytest.raises(ValueError, match="shape \\(3, 1\\) for input 'k'"):
            model.run("serving_default", dict(cases[-1][1], k=np.ones([3, 1], np.int32)))


@pytest.mark.parametrize("variant", ["scann", "brute_force"])
def test_signature_defs_are_the_contract(variant, tiny_export, brute_force_export):
    """What TF Serving reads (the MetaGraph's SignatureDefs) is common.contract.SIGNATURES:
    the same signatures, input and output names, dtypes and shapes (a contract ``None`` is a
    dimension of any size: ``-1`` for inputs, any size or ``-1`` for outputs; ranks equal)."""
    from serving.session_runner import SessionModel

    with SessionModel(tiny_export if variant == "scann" else brute_force_export) as model:
        saved = {n: s for n, s in model.signature_defs.items() if not n.startswith("__")}
    assert set(saved) == set(contract.SIGNATURES)
    for name, want in contract.SIGNATURES.items():
        for side in ("inputs", "outputs"):
            tensors, expected = getattr(saved[name], side), getattr(want, side)
            assert set(tensors) == set(expected), (name, side)
            for key, spec in expected.items():
                info = tensors[key]
                assert tf.dtypes.as_dtype(info.dtype).name == spec.dtype, (name, key)
                dims = [d.size for d in info.tensor_shape.dim]
                assert len(dims) == len(spec.shape), (name, key, dims)
                for got, size in zip(dims, spec.shape, strict=True):
                    if size is not None:
                        assert got == size, (name, key, dims)
                    elif side == "inputs":
                        assert got == -1, (name, key, dims)


def test_every_input_has_a_batch_dimension(tiny_export):
    from serving.session_runner import SessionModel

    with SessionModel(tiny_export) as model:
        for name, sig in model.signature_defs.items():
            for alias, info in sig.inputs.items():
                dims = info.tensor_shape.dim
                assert len(dims) >= 1 and dims[0].size == -1, (name, alias)


def _with_item_item(model_dir: str, scores: np.ndarray, history: np.ndarray) -> np.ndarray:
    """Catalog ``scores`` ``[Q, N]`` plus the model's item-item term of ``history`` ``[Q, H]``:
    what ``serving_default`` serves (:mod:`trainer.item_item`), recomputed outside the graph."""
    from trainer import item_item
    from trainer.model_dir import load_trained

    model, config = load_trained(model_dir)
    ids = records.load_catalog(config.data.data, config.data.split)["item_id"]
    index, weights = item_item.catalog_weights(model.assets.item_ids, model.item_item, ids)
    e = item_item.ease_scores(history, index, weights)
    return item_item.blend_full(scores, e, float(model.item_item_weight.numpy()))


def _mixed_text_queries(tiny_data_dir: str) -> dict[str, np.ndarray]:
    """Three known users (profile, typed titles, history all seen in training), then a row of
    free text with a profile nobody has (every text a miss), then a known profile beside an
    unseen typed title: a batch of hits and misses."""
    queries = {k: v.numpy() for k, v in _queries(tiny_data_dir, 3).items()}
    free = {
        "user_id": "", "user_age": "37", "user_gender": "X", "user_occupation": "astronaut",
        "query_text": "a dark story of the city at night", "history": None,
    }  # fmt: skip
    unseen_title = {
        **{k: queries[k][0] for k in ("user_id", "user_age", "user_gender", "user_occupation")},
        "query_text": "Liked: Toy Story Of The Night (2031).",
        "history": None,
    }
    out = {}
    for key in QUERY_KEYS:
        if key == "history":
            empty = np.full_like(queries[key][:1], "")
            out[key] = np.concatenate([queries[key], empty, queries[key][:1]])
        else:
            extra = np.array([free[key], unseen_title[key]], object)
            out[key] = np.concatenate([queries[key].astype(object), extra])
    return out


def _bert_ops_ran(model, signature: str, inputs: dict[str, np.ndarray]) -> bool:
    """Whether one traced Session.run of ``signature`` executed any op of a BERT backbone."""
    sig = model.signature_defs[signature]
    options = tf.compat.v1.RunOptions(trace_level=tf.compat.v1.RunOptions.FULL_TRACE)
    metadata = tf.compat.v1.RunMetadata()
    model.session.run(
        [sig.outputs[name].name for name in sorted(sig.outputs)],
        feed_dict={sig.inputs[name].name: value for name, value in inputs.items()},
        options=options,
        run_metadata=metadata,
    )
    # The backbone's variable handles are fed to the graph on every run; its math only when
    # a text missed the tables.
    return any(
        "bert_backbone" in n.node_name and "VarHandleOp" not in n.timeline_label
        for d in metadata.step_stats.dev_stats
        for n in d.node_stats
    )


def test_known_texts_skip_bert_and_answer_as_live_bert(
    tiny_model_dir, brute_force_export, tiny_data_dir
):
    """A frozen-BERT export answers known texts from its in-graph tables and sends only the
    misses of a batch through the tokenizer and BERT; through TF Serving's loader it gives
    exactly what running BERT on every text gives (same ids, vectors within 1e-5)."""
    from serving.session_runner import SessionModel
    from trainer.inference import ModelScorer
    from trainer.model_dir import load_trained

    model, config = load_trained(tiny_model_dir)
    assert config.model.freeze_bert and model.uses_titles and model.profile_cache is not None
    model.set_text_mode("live")
    model._live_uses_caches = False  # the reference: BERT reads every text
    queries = _mixed_text_queries(tiny_data_dir)
    want = model.query_embeddings({k: tf.constant(v.astype(str)) for k, v in queries.items()})
    want = want.numpy()
    catalog = records.load_catalog(tiny_data_dir, "p2")
    items = ModelScorer(model, catalog).retrieval_vectors()
    served = _with_item_item(tiny_model_dir, want @ items.T, queries[contract.HISTORY])
    want_ids = np.asarray(catalog["item_id"]).astype(str)[np.argsort(-served, axis=1)]

    batch = len(queries["query_text"])
    retrieve = {
        **queries,
        "k": np.full([batch], 5, np.int32),
        "exclude_item_ids": np.array([[""]] * batch, object),
        "diversity": np.zeros([batch], np.float32),
    }
    with SessionModel(brute_force_export) as served:
        got = served.run("query_embedding", queries)["embeddings"]
        np.testing.assert_allclose(got, want, atol=1e-5)
        ids = served.run("serving_default", retrieve)["item_ids"].astype(str)
        assert ids.tolist() == want_ids[:, :5].tolist()
        # Known texts only: BERT does not run; one miss in the batch: it does.
        known = {k: v[:3] for k, v in retrieve.items()}
        assert not _bert_ops_ran(served, "serving_default", known)
        assert _bert_ops_ran(served, "serving_default", retrieve)
        np.testing.assert_array_equal(
            served.run("serving_default", known)["item_ids"].astype(str), ids[:3]
        )


def test_a_fine_tuned_export_serves_its_own_final_vectors(tiny_model_dir, tiny_data_dir):
    """serve_from_caches recomputes stale tables with the encoders as they are, so cached
    answers equal BERT's on every text (the history's item table is a table in both)."""
    from trainer.model_dir import load_trained

    model, _ = load_trained(tiny_model_dir)
    model.set_text_mode("live")
    rng = np.random.default_rng(0)
    for encoder in (model.query_encoder, model.candidate_encoder):  # as if BERT trained on
        for variable in encoder.backbone.weights:
            variable.assign(variable + rng.normal(0, 0.2, variable.shape).astype(np.float32))
    queries = {k: tf.constant(v.astype(str)) for k, v in _mixed_text_queries(tiny_data_dir).items()}
    stale = model.query_embeddings(queries).numpy()  # tables from before the weights moved
    model._live_uses_caches = False  # a fine-tuned model's export starts like this
    model.serve_from_caches()
    got = model.query_embeddings(queries).numpy()
    model._live_uses_caches = False
    want = model.query_embeddings(queries).numpy()
    np.testing.assert_allclose(got, want, atol=1e-5)
    assert not np.allclose(stale, want, atol=1e-3)
