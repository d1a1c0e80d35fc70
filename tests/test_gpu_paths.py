"""The GPU code paths, proven on the CPU through the loop's own step (tiny BERT, tiny data).

What a GPU run resolves to (``TrainConfig.resolve(has_gpu=True)``: BERT fine-tuned, live text,
mixed precision, XLA) is run here piece by piece: ``mixed_bfloat16`` against float32, XLA against
no XLA, two replicas (two logical CPU devices, in a fresh process) against one, and a whole
fine-tuning run. Dropout is switched off where two runs are compared, so that they draw no masks.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys

import numpy as np
import pytest

import trainer  # noqa: F401  (TF_USE_LEGACY_KERAS before TensorFlow)

tf = pytest.importorskip("tensorflow")

import keras  # noqa: E402

from tests.conftest import REPO  # noqa: E402
from trainer import env as env_lib  # noqa: E402
from trainer import input_pipeline, train_step  # noqa: E402
from trainer.config import TrainConfig  # noqa: E402

#: |bf16 loss - fp32 loss| / fp32 loss allowed on one batch: bfloat16 keeps 8 bits of mantissa
#: (relative rounding 2^-9 per op), and BERT, the towers and the softmax add up a few hundred
#: such roundings; a float16 or unscaled-cast mistake moves the loss far more.
BF16_LOSS_RTOL = 2e-2


def gpu_config(data_dir: str, *, batch_size: int = 32, **model) -> TrainConfig:
    """What a GPU machine resolves to (BERT fine-tuned, live text, ``query_text``), on p2 with
    in-batch negatives (the path ``--gather-candidates`` applies to), no dropout anywhere."""
    config = TrainConfig()
    config.data.data, config.data.split = data_dir, "p2"
    config.data.train_queries = "events"
    config.model.preset = "tiny"
    config.model.negatives = "in_batch"
    config.model.dropout = config.model.id_dropout = config.model.history_id_dropout = 0.0
    config.optim.batch_size = batch_size
    for name, value in model.items():
        setattr(config.model, name, value)
    config = config.resolve(has_gpu=True)
    config.runtime.mixed_precision, config.runtime.xla = "off", "off"
    config.validate()
    assert config.model.freeze_bert is False and config.model.cache_text is False
    return config


def without_dropout(model: keras.Model) -> None:
    """Sets every Dropout inside the model (BERT's included) to rate 0."""
    for layer in model._flatten_layers():
        if isinstance(layer, keras.layers.Dropout):
            layer.rate = 0.0


def build(config: TrainConfig, strategy, precision: str = "float32", steps: int = 10):
    """``(plan, model, optimizers, var_lists)`` as the loop builds them, dropout off."""
    plan = input_pipeline.plan_data(config)
    model, optimizers, var_lists = train_step.build_for_training(
        config, plan.assets, strategy, steps, precision
    )
    without_dropout(model)
    return plan, model, optimizers, var_lists


def copy_weights(source: keras.Model, target: keras.Model) -> None:
    assert len(source.weights) == len(target.weights)
    for a, b in zip(source.weights, target.weights, strict=True):
        assert tuple(a.shape) == tuple(b.shape), (a.path, b.path)
        b.assign(a)


def first_batches(plan, config: TrainConfig, steps: int) -> list[dict]:
    return list(input_pipeline.train_dataset(plan, config, 0, 0, steps).take(steps))


def run_steps(step, batches) -> list[dict[str, float]]:
    return [{k: float(v) for k, v in step(batch, tf.constant(0.0)).items()} for batch in batches]


@pytest.fixture
def float32_policy():
    """Restores Keras's global dtype policy after a test that sets another one."""
    yield
    keras.mixed_precision.set_global_policy("float32")


# ----------------------------------------------------------------------------- mixed precision


def test_mixed_bfloat16_gives_the_float32_loss(tiny_data_dir, float32_policy):
    config = gpu_config(tiny_data_dir)
    strategy = tf.distribute.get_strategy()
    plan, reference, ref_opts, ref_vars = build(config, strategy)
    batch = first_batches(plan, config, 1)[0]

    precision = env_lib.configure_precision("bfloat16")  # what the loop uses on an Ampere+ GPU
    assert precision == "mixed_bfloat16"
    _, mixed, opts, var_lists = build(config, strategy, precision)
    copy_weights(reference, mixed)
    assert mixed.query_encoder.backbone.compute_dtype == "bfloat16"
    assert all(v.dtype == "float32" for v in mixed.trainable_variables)  # master weights

    query_inputs = mixed.preprocess_query(batch)
    candidate_inputs = mixed.preprocess_candidate(batch)
    q, c, rating = mixed.forward_numeric(query_inputs, candidate_inputs, True)
    # The TFRS task gets float32 (its constants are float32), whatever BERT computed in.
    assert q.dtype == c.dtype == rating.dtype == tf.float32

    step = train_step.make_train_step(mixed, config, strategy, opts, var_lists, precision)
    got = run_steps(step, [batch])[0]
    keras.mixed_precision.set_global_policy("float32")
    step = train_step.make_train_step(reference, config, strategy, ref_opts, ref_vars, "float32")
    ref = run_steps(step, [batch])[0]
    assert got["loss"] != ref["loss"]  # bfloat16 really ran
    assert abs(got["loss"] - ref["loss"]) <= BF16_LOSS_RTOL * abs(ref["loss"]), (got, ref)
    assert got["retrieval_loss"] == pytest.approx(ref["retrieval_loss"], rel=BF16_LOSS_RTOL)
    for v in mixed.trainable_variables:  # the update applied is finite
        assert np.isfinite(np.asarray(v)).all(), v.path


# ----------------------------------------------------------------------------- XLA


def _sgd_step(model, config: TrainConfig, var_lists, batch) -> tuple[dict, list[np.ndarray]]:
    """One loop step with SGD at rate 1 in place of AdamW: what it subtracts is the gradient."""
    strategy = tf.distribute.get_strategy()
    optimizers = [keras.optimizers.SGD(learning_rate=1.0) for _ in var_lists]
    for opt, variables in zip(optimizers, var_lists, strict=True):
        opt.build(variables)
    step = train_step.make_train_step(model, config, strategy, optimizers, var_lists, "float32")
    variables = [v for group in var_lists for v in group]
    before = [np.array(v) for v in variables]
    out = run_steps(step, [batch])[0]
    grads = [b - np.asarray(v) for b, v in zip(before, variables, strict=True)]
    return {"out": out, "step": step, "grads": grads, "names": [v.path for v in variables]}


def _compiled_calls(step, batch) -> int:
    """How many function calls in the traced step carry XLA's must-compile attribute."""
    graph = step.get_concrete_function(batch, tf.constant(0.0)).graph
    found = 0
    for op in graph.get_operations():
        with contextlib.suppress(ValueError):  # ops without the attribute
            found += bool(op.get_attr("_XlaMustCompile"))
    return found


def test_xla_step_gives_the_same_loss_and_gradients(tiny_data_dir):
    config = gpu_config(tiny_data_dir)
    strategy = tf.distribute.get_strategy()
    plan, plain, _, var_lists = build(config, strategy)
    batch = first_batches(plan, config, 1)[0]
    xla_config = TrainConfig.from_dict(config.to_dict())
    xla_config.runtime.xla = "on"
    _, compiled, _, xla_var_lists = build(xla_config, strategy)
    copy_weights(plain, compiled)

    ref = _sgd_step(plain, config, var_lists, batch)
    got = _sgd_step(compiled, xla_config, xla_var_lists, batch)
    assert _compiled_calls(got["step"], batch) >= 1  # the towers really went through XLA
    assert _compiled_calls(ref["step"], batch) == 0
    for key in ("loss", "retrieval_loss", "squared_error", "hits_at_10"):
        assert got["out"][key] == pytest.approx(ref["out"][key], rel=1e-5, abs=1e-6), key
    scale = max(float(np.abs(g).max()) for g in ref["grads"])
    assert scale > 0
    moved = 0
    for name, g, h in zip(ref["names"], ref["grads"], got["grads"], strict=True):
        np.testing.assert_allclose(h, g, rtol=1e-3, atol=1e-5 * scale, err_msg=name)
        moved += bool(np.abs(g).max() > 0)
    assert moved > len(ref["grads"]) // 2  # BERT's weights among them: it is fine-tuned


# ----------------------------------------------------------------------------- two replicas

TWO_REPLICA_STEPS = 3
#: A clip norm far under the gradients' norm, so that clipping acts at every step.
TIGHT_CLIPNORM = 0.01


def _sgd(strategy, var_lists, clipnorm: float | None) -> list:
    """SGD in place of AdamW, one per variable list. Adam's first updates are about
    ``lr * sign(g)``, which turns float noise in near-zero gradients into whole steps of ``lr``;
    SGD's update is the gradient itself, so two runs compare well-conditioned."""
    with strategy.scope():
        optimizers = [keras.optimizers.SGD(0.1, global_clipnorm=clipnorm) for _ in var_lists]
        for opt, variables in zip(optimizers, var_lists, strict=True):
            opt.build(variables)
    return optimizers


def two_replica_run(data_dir: str, out_path: str) -> None:
    """In a fresh process: the loop's step on one device and on two logical CPU devices under
    MirroredStrategy (with and without ``gather_candidates``; without clipping and with a clip
    norm that always acts), from the same weights over the same global batches. Writes each
    run's per-step outputs and how far its weights are from the one-device run's, as JSON."""
    cpu = tf.config.list_physical_devices("CPU")[0]
    # Must come before TensorFlow initialises its devices (before the first op).
    tf.config.set_logical_device_configuration(
        cpu, [tf.config.LogicalDeviceConfiguration(), tf.config.LogicalDeviceConfiguration()]
    )
    devices = [d.name for d in tf.config.list_logical_devices("CPU")]
    config = gpu_config(data_dir, batch_size=32)
    local_config = TrainConfig.from_dict(config.to_dict())
    local_config.model.gather_candidates = False
    single = tf.distribute.get_strategy()
    mirrored = tf.distribute.MirroredStrategy(devices)
    plan, one, _, one_lists = build(config, single, steps=TWO_REPLICA_STEPS)
    _, two, _, two_lists = build(config, mirrored, steps=TWO_REPLICA_STEPS)
    start = [np.array(v) for v in one.weights]
    trainable = [i for i, v in enumerate(one.weights) if v.trainable]

    def run(model, strategy, cfg, var_lists, clipnorm, steps):
        for v, value in zip(model.weights, start, strict=True):
            v.assign(value)
        optimizers = _sgd(strategy, var_lists, clipnorm)
        step = train_step.make_train_step(model, cfg, strategy, optimizers, var_lists, "float32")
        dataset = input_pipeline.train_dataset(plan, cfg, 0, 0, TWO_REPLICA_STEPS).take(steps)
        outputs = run_steps(step, strategy.experimental_distribute_dataset(dataset))
        return outputs, [np.array(model.weights[i]) for i in trainable]

    results = {"devices": devices, "replicas": mirrored.num_replicas_in_sync}
    for name, clipnorm in (("free", None), ("clipped", TIGHT_CLIPNORM)):
        ref_out, ref_weights = run(one, single, config, one_lists, clipnorm, TWO_REPLICA_STEPS)
        out, weights = run(two, mirrored, config, two_lists, clipnorm, TWO_REPLICA_STEPS)
        moved = [r - start[i] for r, i in zip(ref_weights, trainable, strict=True)]
        diffs = [w - r for w, r in zip(weights, ref_weights, strict=True)]
        norm = lambda arrays: float(np.sqrt(sum(float(np.sum(a * a)) for a in arrays)))  # noqa: E731
        results[name] = {
            "single": ref_out,
            "two": out,
            "update_norm": norm(moved),
            "update_error": norm(diffs) / max(norm(moved), 1e-30),
        }
    results["local"] = run(two, mirrored, local_config, two_lists, None, 1)[0]
    with open(out_path, "w") as f:
        json.dump(results, f)


def test_two_replicas_gather_negatives_and_match_one_replica(tiny_data_dir, tmp_path):
    out = tmp_path / "two_replicas.json"
    code = (
        "import sys; from tests.test_gpu_paths import two_replica_run; "
        "two_replica_run(sys.argv[1], sys.argv[2])"
    )
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": REPO}
    done = subprocess.run(
        [sys.executable, "-c", code, tiny_data_dir, str(out)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    r = json.loads(out.read_text())
    assert r["replicas"] == 2 and len(r["devices"]) == 2
    free, clipped, local = r["free"], r["clipped"], r["local"]
    # Step 1 runs on the same weights: with the other replica's candidates gathered, each
    # query's softmax is over the whole global batch, as on one device...
    for key in ("loss", "retrieval_loss", "hits_at_10", "examples"):
        assert free["two"][0][key] == pytest.approx(free["single"][0][key], rel=1e-5), key
    # ...and without, over its own half only: fewer negatives, a lower loss.
    assert local[0]["retrieval_loss"] < free["single"][0]["retrieval_loss"] * 0.99
    assert local[0]["examples"] == free["single"][0]["examples"]
    # After N steps (gradients all-reduced over the replicas; clipped by the norm of their
    # sum, as on one device) the two runs have made the same updates.
    for run in (free, clipped):
        assert run["update_norm"] > 0
        assert run["update_error"] < 1e-3, run
        for a, b in zip(run["two"], run["single"], strict=True):
            assert a["loss"] == pytest.approx(b["loss"], rel=1e-4)
    # The clip acted (its bound is loose: the id embeddings' sparse gradients repeat rows).
    assert clipped["update_norm"] < 0.1 * free["update_norm"]


# ----------------------------------------------------------------------------- fine-tuning


@pytest.mark.parametrize(
    "flags",
    [
        # The p2 default on a GPU: batches of users, full-catalog softmax, float32 here.
        ("--user-batch-size", "16", "--user-passes", "1"),
        # Events with in-batch negatives through the XLA-compiled towers, in bfloat16.
        ("--train-queries", "events", "--negatives", "in_batch", "--batch-size", "256",
         "--xla", "on", "--mixed-precision", "bfloat16"),
    ],
    ids=["users-fp32", "events-xla-bf16"],
)  # fmt: skip
def test_fine_tuning_runs_end_to_end_and_refreshes_the_text_caches(
    flags, tiny_data_dir, tmp_path, monkeypatch, float32_policy
):
    from trainer import model as M
    from trainer import task
    from trainer.model_dir import load_trained

    refreshed = []  # the catalog's text table after each refresh
    refresh = M.TwoTowerModel.refresh_text_caches

    def recording(self, *args, **kwargs):
        refresh(self, *args, **kwargs)
        refreshed.append(np.array(self.item_text_cache.vectors)[1:])

    monkeypatch.setattr(M.TwoTowerModel, "refresh_text_caches", recording)
    model_dir = str(tmp_path / "model")
    argv = [
        "--data", tiny_data_dir, "--split", "p2", "--model-dir", model_dir, "--preset", "tiny",
        "--no-freeze-bert", "--bert-learning-rate", "1e-3", "--epochs", "2",
        "--early-stopping-patience", "0", "--no-restore-best", "--no-progress", *flags,
    ]  # fmt: skip
    assert task.main(argv) == 0
    with open(os.path.join(model_dir, "metrics.json")) as f:
        metrics = json.load(f)
    assert metrics["status"] == "finished" and metrics["epochs"] == 2
    assert all(np.isfinite(h["train_retrieval_loss"]) for h in metrics["history"])
    # At the start, then after every epoch, each time from a BERT that has trained further.
    assert len(refreshed) >= 1 + 2
    later = refreshed[1:]
    assert all(np.abs(later[i + 1] - later[i]).max() > 1e-3 for i in range(len(later) - 1))

    model, config = load_trained(model_dir)
    assert config.model.freeze_bert is False and config.model.cache_text is False
    cache = model.item_text_cache
    saved = np.asarray(cache.vectors)[1:]
    live = np.asarray(model.candidate_encoder.encode_strings(tf.constant(cache.keys)))
    bf16 = "bfloat16" in flags
    # The history's item table is what the BERT being trained gives (refreshed after the last
    # epoch), not what it gave at the start.
    np.testing.assert_allclose(saved, live, atol=3e-2 if bf16 else 1e-5)
    np.testing.assert_allclose(saved, refreshed[-1], atol=1e-6)
    assert np.abs(saved - refreshed[0]).max() > 0.1


# ----------------------------------------------------------------------------- the benchmark


def _benchmark_module():
    import importlib.util

    path = os.path.join(REPO, "benchmarks", "gpu_towers.py")
    spec = importlib.util.spec_from_file_location("gpu_towers", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_towers"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_benchmark_flops_count_minilm_by_hand():
    bench = _benchmark_module()
    assert bench.matmul_params(bench.MINILM) == 6 * (4 * 384**2 + 2 * 384 * 1536)
    flops = bench.step_flops(bench.MINILM, batch=1024, length=64)
    tokens = 2 * 1024 * 64
    expected = 6 * 10_616_832 * tokens + 12 * 6 * 2048 * 64**2 * 384 + 6 * 1024**2 * 384
    assert flops == pytest.approx(expected)
    peak, note = bench.peak_for("gpu: NVIDIA H200", "bf16", "default", 0.0)
    assert peak == 989.0 and "bf16" in note
    assert bench.peak_for("cpu: x86_64", "fp32", "default", 0.0)[0] is None


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--lengths", "2"], "--lengths"),
        (["--batches", "1"], "--batches"),
        (["--precisions", "fp8"], "--precisions"),
        (["--weights", "/no/such/dir"], "config.json"),
    ],
)
def test_benchmark_bad_flags_exit_2(argv, message, capsys):
    bench = _benchmark_module()
    assert bench.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and "Traceback" not in err


def test_benchmark_smoke_writes_its_tables(tmp_path):
    import importlib.util

    backend = "jax" if importlib.util.find_spec("jax") else "tensorflow"
    out = tmp_path / "smoke"
    env = {**os.environ, "KERAS_BACKEND": backend, "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run(
        [sys.executable, os.path.join(REPO, "benchmarks", "gpu_towers.py"), "--smoke",
         "--out", str(out)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((tmp_path / "smoke.json").read_text())
    assert report["smoke"] is True and report["backend"] == backend
    assert "not the TensorFlow training loop" in report["label"]
    rows = report["results"]
    assert [(r["precision"], r["status"]) for r in rows] == [("bf16", "ok"), ("fp32", "ok")]
    for r in rows:
        assert r["examples_per_s"] > 0 and np.isfinite(r["last_loss"])
        assert r["tflops_per_step"] * 1e12 == pytest.approx(
            6 * r["batch"] * r["length"] * 2 * 2 * (4 * 32**2 + 2 * 32 * 64)
            + 12 * 2 * 2 * r["batch"] * r["length"] ** 2 * 32
            + 6 * r["batch"] ** 2 * 32
        )
    table = (tmp_path / "smoke.md").read_text()
    assert "SMOKE RUN" in table and table.count("| ok |") == 2
