"""The trainer: flags and errors, loss going down, kill-and-resume, multi-worker (tiny BERT)."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from tests.conftest import REPO
from trainer import task
from trainer.config import ConfigError, TrainConfig
from trainer.flags import parse_args
from trainer.model_dir import load_trained
from trainer.validation import PRIOR_WEIGHTS

# Deterministic kernels, so a resumed run can be compared with an uninterrupted one exactly.
ENV = {
    **os.environ,
    "TF_DETERMINISTIC_OPS": "1",
    "TF_CPP_MIN_LOG_LEVEL": "2",
    "CUDA_VISIBLE_DEVICES": "",
}
# p2 of the tiny data: 1,228 train examples -> 38 steps of 32 per epoch (event batches); two
# epochs, so a kill near step 10 resumes mid-epoch and then crosses an epoch boundary.
RESUME_EPOCHS = 2
RESUME_STEPS = RESUME_EPOCHS * 38
# No popularity prior: its weight is an argmax over near-tied valid recalls on this tiny data,
# so weights equal within 1e-5 can pick different grid points (0.06 against 0.15 seen).
RESUME_FLAGS = shlex.split(
    f"--preset tiny --split p2 --train-queries events --batch-size 32 --epochs {RESUME_EPOCHS} "
    "--checkpoint-every 5 --no-popularity-prior "
    "--early-stopping-patience 0 --no-progress --log-every 1000"
)


def _read_json(path: str) -> dict:
    with open(path) as f:
        return json.load(f)


def _train_cmd(data_dir: str, model_dir: str, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "trainer.task",
        "--data",
        data_dir,
        "--model-dir",
        model_dir,
        *RESUME_FLAGS,
        *extra,
    ]


def _weights(model_dir: str) -> list[np.ndarray]:
    model, _ = load_trained(model_dir)
    return [np.asarray(w) for w in model.weights]


def _assert_same_weights(a: str, b: str, atol: float = 1e-5) -> None:
    wa, wb = _weights(a), _weights(b)
    assert len(wa) == len(wb)
    for x, y in zip(wa, wb, strict=True):
        np.testing.assert_allclose(x, y, atol=atol)


def _checkpoint_step(checkpoint_dir: str) -> int:
    import tensorflow as tf

    latest = tf.train.latest_checkpoint(checkpoint_dir)
    return int(tf.train.load_checkpoint(latest).get_tensor("step/.ATTRIBUTES/VARIABLE_VALUE"))


def _latest_step(checkpoint_dir: str) -> int:
    """The step of the checkpoint the state file names (0 when none yet).

    The state file is written after a checkpoint's own files, atomically, so a run killed at any
    moment resumes from the step it names, not from the newest ``ckpt-N.index`` on disk.
    """
    import tensorflow as tf

    latest = tf.train.latest_checkpoint(checkpoint_dir)
    return int(latest.rsplit("-", 1)[1]) if latest else 0


def _wait_for_checkpoint(checkpoint_dir: str, step: int, process: subprocess.Popen,
                         timeout: float = 120) -> None:  # fmt: skip
    deadline = time.time() + timeout
    while time.time() < deadline:
        if _latest_step(checkpoint_dir) >= step:
            return
        if process.poll() is not None:
            raise AssertionError(
                f"trainer exited early ({process.returncode}): {process.stderr.read()}"
            )
        time.sleep(0.02)
    process.kill()
    raise AssertionError(f"no checkpoint at step {step} in {checkpoint_dir} after {timeout}s")


# ----------------------------------------------------------------------------- configuration


def test_flags_override_the_config_file(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(
        json.dumps({"model": {"embedding_dim": 32, "temperature": 0.1}, "batch_size": 256})
    )
    config = parse_args(["--config", str(path), "--temperature", "0.07", "--no-logq-correction"])
    assert config.model.embedding_dim == 32
    assert config.model.temperature == 0.07
    assert config.optim.batch_size == 256
    assert config.model.logq_correction is False
    yaml_path = tmp_path / "c.yaml"
    yaml_path.write_text("optim:\n  epochs: 7\nranking_layers: [64, 32]\n")
    config = parse_args(["--config", str(yaml_path)])
    assert config.optim.epochs == 7 and config.model.ranking_layers == (64, 32)
    assert TrainConfig.from_dict(config.to_dict()) == config


def test_resolve_picks_cpu_and_gpu_defaults():
    cpu = TrainConfig().resolve(has_gpu=False)
    assert cpu.model.freeze_bert and cpu.model.cache_text and cpu.model.query_text == "profile"
    assert cpu.runtime.xla == "off" and cpu.runtime.mixed_precision == "off"
    gpu = TrainConfig().resolve(has_gpu=True)
    assert not gpu.model.freeze_bert and not gpu.model.cache_text
    assert gpu.model.query_text == "query_text" and gpu.runtime.xla == "on"
    # Ordered recent past for p1's event queries, the whole-history bag on the per-user
    # protocols (with the user's own history out of the full softmax); an explicit choice is kept.
    for split, history, mask in (
        ("p1", "attention", False),
        ("p2", "set", True),
        ("p3", "set", True),
        ("p4", "set", True),
    ):
        config = TrainConfig()
        config.data.split = split
        resolved = config.resolve(has_gpu=False).model
        assert (resolved.history, resolved.mask_history) == (history, mask)
    config = parse_args(["--split", "p2", "--history", "transformer"])
    assert config.resolve(has_gpu=False).model.history == "transformer"


def test_batch_must_split_over_replicas():
    with pytest.raises(ConfigError, match="not divisible by the 3 replicas"):
        TrainConfig().validate(num_replicas=3)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--learning-rate", "-0.1"], "--learning-rate must be positive"),
        (["--train-top-layers", "2", "--freeze-bert"], "give one of them"),
        (["--batch-size", "0"], "--batch-size must be at least 1"),
        (["--temperature", "abc"], "cannot read 'abc' as float"),
        (["--no-such-flag", "1"], "unrecognized arguments"),
        (["--cache-text", "--no-freeze-bert"], "--cache-text needs a frozen BERT"),
        (["--split", "p9"], "--split must be one of"),
        (["--history-dim", "30", "--history-heads", "4"], "must be divisible"),
        (["--config", "/no/such/file.json"], "no such file"),
        (["--preset", "no-such-preset"], "no-such-preset"),
    ],
)
def test_bad_flags_exit_2_with_a_message(argv, message, tiny_data_dir, tmp_path, capsys):
    code = task.main(["--data", tiny_data_dir, "--model-dir", str(tmp_path / "m"), *argv])
    err = capsys.readouterr().err
    assert code == 2
    assert message in err and "Traceback" not in err


def _manifest_without(data_dir: str, tmp_path, split: str) -> str:
    copy = str(tmp_path / "data")
    shutil.copytree(data_dir, copy)
    manifest = _read_json(os.path.join(copy, "manifest.json"))
    del manifest["splits"][split]
    with open(os.path.join(copy, "manifest.json"), "w") as f:
        json.dump(manifest, f)
    return copy


@pytest.mark.parametrize("case", ["missing_dir", "missing_split", "missing_shard", "no_data"])
def test_bad_data_exits_2_with_a_message(case, tiny_data_dir, tmp_path, capsys):
    data, split, message = tiny_data_dir, "p2", ""
    if case == "missing_dir":
        data, message = str(tmp_path / "nothing"), "no manifest.json"
    elif case == "missing_split":
        data, message = _manifest_without(tiny_data_dir, tmp_path, "p3"), "'p3' was not prepared"
        split = "p3"
    elif case == "missing_shard":
        data = str(tmp_path / "data")
        shutil.copytree(tiny_data_dir, data)
        os.remove(os.path.join(data, "p2", "train-00001-of-00004.tfrecord"))
        message = "expected 4 shards"
    argv = ["--split", split, "--model-dir", str(tmp_path / "m"), "--preset", "tiny"]
    if case == "no_data":
        message = "--data is required"
    else:
        argv += ["--data", data]
    assert task.main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_process_exit_code_and_no_traceback(tmp_path):
    cmd = [sys.executable, "-m", "trainer.task", "--data", str(tmp_path), "--model-dir",
           str(tmp_path / "m"), "--epochs", "-1"]  # fmt: skip
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=ENV, timeout=120)
    assert result.returncode == 2
    assert "error: --epochs must be at least 1" in result.stderr
    assert "Traceback" not in result.stderr


# ----------------------------------------------------------------------------- training


def test_training_lowers_the_loss_and_writes_the_model_dir(tiny_data_dir, tmp_path):
    model_dir = str(tmp_path / "model")
    flags = "--preset tiny --epochs 4 --batch-size 64 --early-stopping-patience 0 --no-progress"
    argv = ["--data", tiny_data_dir, "--split", "p1", "--model-dir", model_dir,
            "--learning-rate", "0.003", *shlex.split(flags)]  # fmt: skip
    assert task.main(argv) == 0
    metrics = _read_json(os.path.join(model_dir, "metrics.json"))
    history = metrics["history"]
    assert [h["epoch"] for h in history] == [1, 2, 3, 4]
    assert history[-1]["train_retrieval_loss"] < history[0]["train_retrieval_loss"] - 0.05
    assert history[-1]["train_rmse"] < history[0]["train_rmse"]
    assert "recall_at_10" in history[0] and "rmse" in history[0]
    # The popularity prior's weight: the best of the grid on valid recall@10, saved with it.
    prior = metrics["popularity_prior"]
    curve = {float(w): r for w, r in prior["valid_recall_at_10"].items()}
    assert sorted(curve) == sorted(PRIOR_WEIGHTS)
    assert curve[prior["weight"]] == max(curve.values())
    model, _ = load_trained(model_dir)
    assert float(model.prior_weight.numpy()) == pytest.approx(prior["weight"])
    for name in ("config.json", "assets.json", "encoders.json", "model.weights.h5"):
        assert os.path.isfile(os.path.join(model_dir, name)), name
    assert os.listdir(model_dir + "-logs"), "TensorBoard events"
    assert [p for p in os.listdir(tmp_path) if p.startswith(".")] == []


def _grid_against_served(model, plan, config, monkeypatch) -> tuple[dict, list, list]:
    """``(choice, settings, scores)``: what choose_prior_weight picked, the (w, b, content)
    settings it scored and the scores of each, checked against what the served embeddings
    score."""
    from trainer import validation
    from trainer.content_prior import predicted_log_counts
    from trainer.model import log_popularity_by_row

    scored: list[np.ndarray] = []
    recall = validation._recall

    def recording(scores, *args):
        scored.append(np.array(scores))
        return recall(scores, *args)

    monkeypatch.setattr(validation, "_recall", recording)
    chosen = validation.choose_prior_weight(model, plan, config)
    grid = list(scored)
    a = model.assets
    tables = {False: log_popularity_by_row(a.popularity)}
    untrained = (np.asarray(plan.catalog["popularity"]) <= 0).any()
    if untrained:
        guess = predicted_log_counts(a.popularity, a.item_genres, a.item_years)
        tables[True] = log_popularity_by_row(a.popularity, guess[0])
        assert chosen["content_fit"] == guess[1]
    biases = validation.NEW_ITEM_BIASES if untrained else (0.0,)
    settings = [(w, b, c) for c in tables for w in PRIOR_WEIGHTS for b in biases]
    choice = (chosen["weight"], chosen["new_item_bias"], chosen["content_prior"])
    assert len(grid) == len(settings) and choice in settings
    assert float(model.prior_weight.numpy()) == pytest.approx(chosen["weight"])
    assert float(model.new_item_bias.numpy()) == pytest.approx(chosen["new_item_bias"])
    np.testing.assert_allclose(model.prior_log_count.numpy(), tables[choice[2]], atol=1e-6)
    for i in sorted({0, 1, len(settings) // 2 + 1, len(settings) - 1}):
        model.prior_weight.assign(settings[i][0])
        model.new_item_bias.assign(settings[i][1])
        model.prior_log_count.assign(tables[settings[i][2]])
        scored.clear()
        validation.evaluate_validation(model, plan, config, rmse=False)
        np.testing.assert_allclose(grid[i], scored[0], atol=1e-5)
    assert np.abs(grid[-1] - grid[0]).max() > 1e-3  # the weight moves the scores
    return chosen, settings, grid


def test_the_prior_grid_scores_what_the_served_embeddings_score(
    tiny_model_dir, tiny_data_dir, monkeypatch
):
    """The grid is scored from one pass (cosine + w * log count + b * untrained); every
    setting's scores equal the inner products of the embeddings the model serves with it.
    p2's tiny catalog has no unrated item (w alone is chosen); p3's cold items add b and the
    content guess of their log counts."""
    from trainer import validation
    from trainer.input_pipeline import plan_data
    from trainer.model import build_model

    model, config = load_trained(tiny_model_dir)
    _, settings, _ = _grid_against_served(model, plan_data(config), config, monkeypatch)
    assert len(settings) == len(PRIOR_WEIGHTS)

    config.data.split = "p3"
    plan = plan_data(config)
    cold = build_model(config.model, plan.assets, seed=3)
    _, settings, grid = _grid_against_served(cold, plan, config, monkeypatch)
    assert len(settings) == 2 * len(PRIOR_WEIGHTS) * len(validation.NEW_ITEM_BIASES)
    assert np.abs(grid[1] - grid[0]).max() > 1e-3  # the bias moves the scores too
    half = len(settings) // 2  # the same (w 0.15, b) with the guess: only cold items move
    moved = np.abs(grid[2 * half - 1] - grid[half - 1]).max(axis=0) > 1e-6
    cold_items = np.asarray(plan.catalog["popularity"]) <= 0
    assert moved.any() and not moved[~cold_items].any()
    # A fixed --new-item-bias is kept: only the weight (and the guess) are chosen.
    config.model.new_item_bias = 0.07
    fixed = validation.choose_prior_weight(cold, plan, config)
    assert fixed["new_item_bias"] == 0.07 and list(fixed["new_item_bias_valid_recall_at_10"]) == [
        "0.07"
    ]
    assert float(cold.new_item_bias.numpy()) == pytest.approx(0.07)
    # --new-item-recall-share: the chosen setting's own valid figures, measured afresh, are
    # those it reports, and meet the floor exactly when it says they do.
    config.model.new_item_bias = None
    config.model.new_item_recall_share = 0.5
    policy = validation.choose_prior_weight(cold, plan, config)["new_item_recall_share"]
    measured = validation.evaluate_validation(cold, plan, config, rmse=False)
    assert measured["recall_at_10"] == pytest.approx(policy["valid_recall_at_10"])
    assert measured["new_item_recall_at_10"] == pytest.approx(policy["valid_new_item_recall_at_10"])
    ratio = measured["new_item_recall_at_10"] / measured["recall_at_10"]
    assert policy["met"] == (ratio >= 0.5)
    w, b, _ = policy["chosen"]
    assert float(cold.prior_weight.numpy()) == pytest.approx(w)
    assert float(cold.new_item_bias.numpy()) == pytest.approx(b)
    unrated = np.flatnonzero(np.asarray(plan.catalog["popularity"]) <= 0)
    holders = [t for t in plan.ranking.truth if np.isin(t, unrated).any()]
    assert policy["valid_users"] == len(holders) > 0


def test_the_new_item_recall_share_picks_the_best_setting_that_meets_it():
    """Hand-made grids: the floor rules out the best unconstrained setting; ties go to the
    smaller w and b; with no setting reaching the floor, the nearest ratio wins."""
    from trainer.validation import _new_item_share_choice

    def f(recall, cold):
        return {"recall_at_10": recall, "new_item_recall_at_10": cold}

    grid = {
        (0.0, 0.0, False): f(0.30, 0.03),  # best recall, ratio 0.1
        (0.0, 0.1, False): f(0.28, 0.14),  # ratio 0.5: meets it
        (0.05, 0.1, False): f(0.28, 0.15),  # the same recall, a larger w
        (0.0, 0.2, True): f(0.20, 0.18),  # ratio 0.9, worse recall
    }
    chosen = _new_item_share_choice(grid, 0.5)
    assert chosen["met"] and chosen["chosen"] == (0.0, 0.1, False)
    assert chosen["valid_ratio"] == pytest.approx(0.5)
    assert _new_item_share_choice(grid, 0.8)["chosen"] == (0.0, 0.2, True)
    unreachable = _new_item_share_choice(grid, 0.95)
    assert not unreachable["met"] and unreachable["chosen"] == (0.0, 0.2, True)
    assert _new_item_share_choice(grid, 0.05)["chosen"] == (0.0, 0.0, False)


def test_a_new_item_share_over_few_users_is_logged_as_noise(caplog):
    from trainer import progress

    policy = {"share": 0.5, "met": True, "valid_ratio": 0.6, "valid_recall_at_10": 0.2,
              "valid_new_item_recall_at_10": 0.12, "valid_users": 9}  # fmt: skip
    prior = {"weight": 0.04, "valid_recall_at_10": {"0.04": 0.25, "0.0": 0.24},
             "new_item_recall_share": policy}  # fmt: skip
    with caplog.at_level("INFO", logger=progress.log.name):
        progress.log_prior(prior)
    assert "over the 9 valid users" in caplog.text and "rests on 9 valid users" in caplog.text
    caplog.clear()
    with caplog.at_level("INFO", logger=progress.log.name):
        progress.log_prior({**prior, "new_item_recall_share": {**policy, "valid_users": 881}})
    assert "over the 881 valid users" in caplog.text and "rests on" not in caplog.text


def test_the_new_item_recall_share_is_checked():
    for value in ("0", "1.5", "-0.1"):
        with pytest.raises(ConfigError, match="--new-item-recall-share must be in"):
            TrainConfig.from_dict({"model": {"new_item_recall_share": float(value)}}).validate()
    off = {"model": {"new_item_recall_share": 0.5, "popularity_prior": False}}
    with pytest.raises(ConfigError, match="needs --popularity-prior"):
        TrainConfig.from_dict(off).validate()


def _run_training(data_dir: str, model_dir: str) -> subprocess.CompletedProcess:
    """The resume tests' training command, run to its end."""
    return subprocess.run(
        _train_cmd(data_dir, model_dir),
        cwd=REPO,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.fixture(scope="module")
def reference_run(tiny_data_dir, tmp_path_factory) -> str:
    """The resume tests' run, uninterrupted."""
    model_dir = str(tmp_path_factory.mktemp("reference") / "model")
    result = _run_training(tiny_data_dir, model_dir)
    assert result.returncode == 0, result.stderr
    return model_dir


@pytest.mark.parametrize("how", [signal.SIGKILL, signal.SIGTERM])
def test_killed_run_resumes_with_the_same_weights(how, reference_run, tiny_data_dir, tmp_path):
    model_dir = str(tmp_path / "model")
    checkpoints = model_dir + "-checkpoints"
    process = subprocess.Popen(
        _train_cmd(tiny_data_dir, model_dir),
        cwd=REPO,
        env=ENV,
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
    )
    _wait_for_checkpoint(checkpoints, 10, process)
    process.send_signal(how)
    _, stderr = process.communicate(timeout=120)
    if how == signal.SIGTERM:
        assert process.returncode == 128 + signal.SIGTERM, stderr
        stopped = int(re.search(r"interrupted at step (\d+)", stderr).group(1))
        assert _checkpoint_step(checkpoints) == stopped  # saved exactly where it stopped
    else:
        assert process.returncode == -signal.SIGKILL
        stopped = _checkpoint_step(checkpoints)
    assert 10 <= stopped < RESUME_STEPS, "the kill must land mid-run"
    assert not os.path.exists(model_dir)

    resumed = _run_training(tiny_data_dir, model_dir)
    assert resumed.returncode == 0, resumed.stderr
    assert re.search(rf"resumed from .*ckpt-{stopped}: step {stopped},", resumed.stderr)
    _assert_same_weights(model_dir, reference_run)
    ours = _read_json(os.path.join(model_dir, "metrics.json"))
    theirs = _read_json(os.path.join(reference_run, "metrics.json"))
    assert ours["steps"] == theirs["steps"] == RESUME_STEPS
    assert [h["recall_at_10"] for h in ours["history"]] == pytest.approx(
        [h["recall_at_10"] for h in theirs["history"]], abs=1e-4
    )


def _free_ports(n: int) -> list[int]:
    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("localhost", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def test_two_workers_end_with_identical_weights(tiny_data_dir, tmp_path):
    ports = _free_ports(2)
    cluster = {"worker": [f"localhost:{p}" for p in ports]}
    model_dir = str(tmp_path / "model")
    processes = []
    for index in range(2):
        env = {
            **ENV,
            "TF_CONFIG": json.dumps(
                {"cluster": cluster, "task": {"type": "worker", "index": index}}
            ),
        }
        flags = (
            "--preset tiny --batch-size 64 --user-batch-size 16 --epochs 1 --max-steps 8 "
            "--worker-model-copy"
        )
        cmd = [sys.executable, "-m", "trainer.task", "--data", tiny_data_dir, "--split", "p2",
               "--model-dir", model_dir, "--no-progress", *shlex.split(flags)]  # fmt: skip
        processes.append(
            subprocess.Popen(
                cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
            )
        )
    errors = []
    for process in processes:
        try:
            _, err = process.communicate(timeout=300)
        except subprocess.TimeoutExpired:
            for p in processes:
                p.kill()
            raise
        errors.append(err)
        assert process.returncode == 0, err
    assert re.search(r"worker:0, \w+ with 2 replica\(s\)", errors[0]), errors[0]
    worker_copy = model_dir + "-worker-1"
    assert os.path.isfile(os.path.join(model_dir, "model.weights.h5"))
    _assert_same_weights(model_dir, worker_copy, atol=0)
    metrics = _read_json(os.path.join(model_dir, "metrics.json"))
    assert metrics["replicas"] == 2 and metrics["steps"] == 8
    # Only the chief keeps checkpoints; the worker's temporary saves are gone.
    assert not [d for d in os.listdir(model_dir + "-checkpoints") if d.startswith("workertemp")]


def _old_warmup_decay(step, peak, total_steps, warmup_steps, decay, min_ratio):
    """The loop's schedule before Keras's decays replaced it, typed out (float32, as it ran)."""
    f = np.float32
    total_steps, warmup_steps = max(total_steps, 1), max(warmup_steps, 0)
    step = f(step)
    if step < warmup_steps:
        return f(peak) * (step + f(1.0)) / f(max(warmup_steps, 1))
    span = float(max(total_steps - warmup_steps, 1))
    progress = np.clip((step - f(warmup_steps)) / f(span), f(0.0), f(1.0))
    if decay == "cosine":
        factor = f(0.5) * (f(1.0) + np.cos(f(np.pi) * progress))
    elif decay == "linear":
        factor = f(1.0) - progress
    else:
        factor = f(1.0)
    return f(peak) * (f(min_ratio) + f(1.0 - min_ratio) * factor)


@pytest.mark.parametrize("decay", ["cosine", "linear", "constant"])
@pytest.mark.parametrize(
    "total,warmup,min_ratio", [(1000, 50, 0.05), (10, 0, 0.0), (7, 3, 0.2), (5, 5, 0.1)]
)
def test_learning_rate_schedule_keeps_the_old_values(decay, total, warmup, min_ratio):
    """Warm-up from peak / W at step 0, then Keras's cosine / linear decay to peak * min_ratio
    at the last step, constant after it: the values of the hand-written schedule it replaced."""
    import tensorflow as tf

    from trainer.train_step import learning_rate_schedule

    schedule = learning_rate_schedule(1e-2, total, warmup, decay, min_ratio)
    steps = np.arange(total + 20)
    got = np.array([float(schedule(tf.constant(s, tf.int64))) for s in steps])
    want = np.array([_old_warmup_decay(s, 1e-2, total, warmup, decay, min_ratio) for s in steps])
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=0)  # float32: a few ulp (np.cos)
    assert got[0] == pytest.approx(1e-2 / warmup if warmup else 1e-2)
    assert got[-1] == pytest.approx(1e-2 * (1.0 if decay == "constant" else min_ratio))
    restored = type(schedule).from_config(schedule.get_config())
    assert float(restored(tf.constant(total // 2))) == float(schedule(tf.constant(total // 2)))


# ----------------------------------------------------------------------------- environment


def test_cluster_roles_from_tf_config_and_vertex_cluster_spec():
    from trainer import env

    assert env.cluster_info({}).is_chief and not env.cluster_info({}).is_multi_worker
    workers = {"worker": ["a:1", "b:2"]}
    tf_config = lambda task: {"TF_CONFIG": json.dumps({"cluster": workers, "task": task})}
    first = env.cluster_info(tf_config({"type": "worker", "index": 0}))
    second = env.cluster_info(tf_config({"type": "worker", "index": 1}))
    assert first.is_chief and not second.is_chief and second.num_workers == 2
    vertex = {
        "CLUSTER_SPEC": json.dumps(
            {
                "cluster": {"workerpool0": ["c:1"], "workerpool1": ["w:1", "w:2"]},
                "task": {"type": "workerpool1", "index": 1},
            }
        )
    }
    info = env.cluster_info(vertex)
    assert info.task_type == "worker" and info.task_id == 1 and not info.is_chief
    assert info.num_workers == 3
    with pytest.raises(ConfigError, match="not valid JSON"):
        env.cluster_info({"TF_CONFIG": "{"})
    with pytest.raises(ConfigError, match="out of range"):
        env.cluster_info(tf_config({"type": "worker", "index": 5}))
    evaluator = {"cluster": {**workers, "evaluator": ["e:1"]}, "task": {"type": "evaluator"}}
    with pytest.raises(ConfigError, match="not supported"):
        env.cluster_info({"TF_CONFIG": json.dumps(evaluator)})
    bad_cluster = {"TF_CONFIG": json.dumps({"cluster": {"worker": 3}, "task": {"type": "worker"}})}
    with pytest.raises(ConfigError, match="not a cluster"):
        env.cluster_info(bad_cluster)
    assert "TF_CONFIG" not in os.environ or os.environ["TF_CONFIG"] != bad_cluster["TF_CONFIG"]


def test_output_dirs_follow_vertex_and_keep_workers_apart():
    from trainer import env
    from trainer.config import RuntimeConfig

    vertex = {
        "AIP_MODEL_DIR": "gs://b/model",
        "AIP_CHECKPOINT_DIR": "gs://b/ckpt",
        "AIP_TENSORBOARD_LOG_DIR": "gs://b/tb",
    }
    chief = env.output_dirs(RuntimeConfig(), env.ClusterInfo({}, None, 0), vertex)
    assert (chief.model_dir, chief.checkpoint_dir, chief.tensorboard_dir) == (
        "gs://b/model",
        "gs://b/ckpt",
        "gs://b/tb",
    )
    worker = env.output_dirs(
        RuntimeConfig(model_dir="/m"), env.ClusterInfo({"worker": ["a", "b"]}, "worker", 1), {}
    )
    assert worker.checkpoint_dir == "/m-checkpoints"
    assert worker.save_checkpoint_dir.startswith("/m-checkpoints/workertemp_")
    assert worker.tensorboard_dir is None
    with pytest.raises(ConfigError, match="--model-dir is required"):
        env.output_dirs(RuntimeConfig(), env.ClusterInfo({}, None, 0), {})


def test_best_epoch_checkpoint_restores_every_weight(tiny_data_dir, tmp_path):
    """The restore-best checkpoint must hold every weight, including those of layers kept in
    lists and dicts (MLP blocks, field embeddings), which the model object alone misses."""
    import tensorflow as tf

    from trainer import loop
    from trainer.data import records
    from trainer.features import ModelAssets
    from trainer.model import build_model

    config = TrainConfig()
    config.model.preset = "tiny"
    config = config.resolve(has_gpu=False)
    assets = ModelAssets.from_tables(
        records.load_catalog(tiny_data_dir, "p2"), records.load_users(tiny_data_dir, "p2"), 20
    )
    model = build_model(config.model, assets, seed=0)
    floats = [v for v in model.weights if "float" in str(v.dtype)]
    saved = [v.numpy().copy() for v in floats]
    checkpoint = tf.train.Checkpoint(model=model, weights=loop.model_weights(model))
    path = checkpoint.save(str(tmp_path / "best"))
    for v in floats:
        v.assign(np.full(v.shape, 7.0, dtype=v.dtype))
    checkpoint.restore(path).assert_existing_objects_matched()
    for v, before in zip(floats, saved, strict=True):
        np.testing.assert_array_equal(v.numpy(), before, err_msg=v.path)
