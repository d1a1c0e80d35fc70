"""Tests of batch scoring (scoring/): backends, CLI, resumable shards, server path, analysis.

The model is a *fake export*: the real :class:`trainer.serving_module.RecommenderModule` (so the
signatures, exclusions, MMR and padding are the real contract) around hash-embedding towers
instead of BERT, saved with :func:`trainer.export.save_export` and a brute-force index
(conftest's ``fake_export_base``). It builds in a few seconds and needs no trained model.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from common import cli
from scoring import ScoringError, analysis, backends, shards
from scoring import batch_score as bs
from scoring import cli as scoring_cli
from tests.conftest import FAKE_DIM
from trainer.data import records

REPO = Path(__file__).resolve().parents[1]
SPLIT = "p2"


@pytest.fixture(scope="module")
def users(tiny_data_dir: str) -> dict[str, np.ndarray]:
    return records.load_users(tiny_data_dir, SPLIT)


@pytest.fixture(scope="module")
def scorer(fake_export_base: str) -> backends.ExportScorer:
    return backends.ExportScorer(fake_export_base)


def run_cli(*args: str) -> int:
    return bs.main([*map(str, args), "--no-progress"])


# --------------------------------------------------------------------------- export dirs


def test_resolve_export_dir_picks_highest_numeric_version(fake_export_base: str, tmp_path: Path):
    base = tmp_path / "m"
    for name in ("2", "10", ".tmp-11-abc", "notes"):
        (base / name).mkdir(parents=True)
    for name in ("2", "10"):
        (base / name / "saved_model.pb").write_bytes(b"")
    (base / ".tmp-11-abc" / "saved_model.pb").write_bytes(b"")
    assert backends.resolve_export_dir(str(base)) == str(base / "10")
    assert backends.resolve_export_dir(str(base / "2")) == str(base / "2")
    assert backends.resolve_export_dir(fake_export_base).endswith(os.path.join("movielens", "1"))
    with pytest.raises(ScoringError, match="no such directory"):
        backends.resolve_export_dir(str(tmp_path / "missing"))
    with pytest.raises(ScoringError, match="neither a SavedModel"):
        backends.resolve_export_dir(str(base / "notes"))


# --------------------------------------------------------------------------- library


def test_score_users_matches_the_signature(
    scorer: backends.ExportScorer, users, tiny_data_dir: str
):
    """Batched tf.data scoring gives exactly what one direct call gives, per user and rank."""
    table = bs.score_users(scorer, users, 5, batch_size=7)
    assert list(table.columns) == list(shards.COLUMNS)
    assert len(table) == 5 * len(users["user_id"])
    direct = scorer.retrieve(
        {n: users[n] for n in backends.QUERY_INPUTS},
        5,
        np.full((len(users["user_id"]), 1), "", dtype=object),
        0.0,
    )
    np.testing.assert_array_equal(table["item_id"].to_numpy().reshape(-1, 5), direct["item_ids"])
    np.testing.assert_array_equal(table["title"].to_numpy().reshape(-1, 5), direct["titles"])
    np.testing.assert_allclose(
        table["score"].to_numpy().reshape(-1, 5), direct["scores"], rtol=1e-5
    )
    assert table.groupby("user_id")["rank"].apply(lambda r: list(r) == [1, 2, 3, 4, 5]).all()
    # Scores are descending within each user's list.
    assert (np.diff(table["score"].to_numpy().reshape(-1, 5), axis=1) <= 1e-6).all()


def test_exclude_seen_removes_train_items(scorer: backends.ExportScorer, users, tiny_data_dir: str):
    seen = bs.seen_items(tiny_data_dir, SPLIT)
    plain = bs.score_users(scorer, users, 10)
    table = bs.score_users(scorer, users, 10, seen=seen)
    hits = sum(
        item in seen.get(u, ()) for u, item in zip(plain.user_id, plain.item_id, strict=True)
    )
    assert hits > 0, "the fake model should recommend some seen items without exclusion"
    assert not any(
        item in seen.get(u, ()) for u, item in zip(table.user_id, table.item_id, strict=True)
    )


def test_exclusions_that_empty_the_pool_drop_padding_rows(scorer, users, tiny_data_dir: str):
    """A user who has seen almost everything gets fewer rows, never the "" padding."""
    catalog = records.load_catalog(tiny_data_dir, SPLIT)
    first = str(users["user_id"][0])
    seen = {first: [str(i) for i in catalog["item_id"][:-3]]}
    table = bs.score_users(scorer, {k: v[:2] for k, v in users.items()}, 10, seen=seen)
    mine = table[table.user_id == first]
    assert len(mine) <= 3 and (mine.item_id != "").all()
    assert len(table[table.user_id != first]) == 10


def test_k_above_export_max_k_is_a_clear_error(scorer, users):
    assert scorer.max_k == 20
    with pytest.raises(ScoringError, match="max_k = 20"):
        bs.score_users(scorer, users, 21)


# --------------------------------------------------------------------------- CLI and shards


def test_cli_writes_shards_and_manifest(fake_export_base, tiny_data_dir, tmp_path, users, capsys):
    out = tmp_path / "scores"
    rc = run_cli(
        "--export",
        fake_export_base,
        "--data",
        tiny_data_dir,
        "--split",
        SPLIT,
        "--output",
        out,
        "-k",
        4,
        "--shard-size",
        16,
        "--batch-size",
        5,
        "--exclude-seen",
    )
    assert rc == 0, capsys.readouterr().err
    num_users = len(users["user_id"])
    names = sorted(p.name for p in out.glob("part-*.parquet"))
    assert names == [f"part-{i:05d}.parquet" for i in range(-(-num_users // 16))]
    manifest = json.loads((out / "_SUCCESS").read_text())
    assert manifest["num_users"] == num_users and manifest["num_rows"] == 4 * num_users
    assert manifest["settings"]["k"] == 4 and manifest["settings"]["exclude_seen"]
    assert manifest["settings"]["model"]["export"].endswith(os.path.join("movielens", "1"))
    assert manifest["skipped_shards"] == 0 and manifest["seconds_this_run"] >= 0
    results = shards.read_results(str(out))
    assert sorted(set(results.user_id)) == sorted(users["user_id"])
    assert not [p for p in os.listdir(out) if p.startswith(".")], "temp files left behind"


class FlakyScorer:
    """Wraps a scorer; raises KeyboardInterrupt on the n-th call (a killed job)."""

    def __init__(self, inner: backends.ExportScorer, fail_at: int | None):
        self.inner, self.fail_at, self.calls = inner, fail_at, 0
        self.max_k = inner.max_k

    def retrieve(self, *args, **kwargs):
        self.calls += 1
        if self.fail_at is not None and self.calls == self.fail_at:
            raise KeyboardInterrupt
        return self.inner.retrieve(*args, **kwargs)

    def candidate_embeddings(self, *args, **kwargs):
        return self.inner.candidate_embeddings(*args, **kwargs)

    def describe(self):
        return self.inner.describe()


def test_resume_keeps_whole_shards_and_gives_the_same_result(
    scorer, users, tiny_data_dir, tmp_path
):
    config = bs.ScoreConfig(
        data=tiny_data_dir,
        split=SPLIT,
        output=str(tmp_path / "a"),
        k=5,
        shard_size=10,
        batch_size=5,
        progress=False,
    )
    reference = bs.score_to_shards(
        scorer, users, bs.ScoreConfig(**{**vars(config), "output": str(tmp_path / "ref")})
    )
    flaky = FlakyScorer(scorer, fail_at=6)  # 2 batches per shard: dies inside shard 2
    with pytest.raises(KeyboardInterrupt):
        bs.score_to_shards(flaky, users, config)
    out = Path(config.output)
    assert sorted(p.name for p in out.glob("part-*")) == [
        "part-00000.parquet",
        "part-00001.parquet",
    ]
    assert not (out / "_SUCCESS").exists()
    # A temp file a killed writer could leave behind is cleaned up on resume.
    (out / ".tmp-0000dead-part-00002.parquet").write_bytes(b"partial")
    again = FlakyScorer(scorer, fail_at=None)
    manifest = bs.score_to_shards(again, users, config)
    assert manifest["skipped_shards"] == 2
    assert again.calls == 2 * (reference["num_shards"] - 2)
    assert manifest["num_rows"] == reference["num_rows"]
    assert not [p for p in os.listdir(out) if p.startswith(".")]
    got, want = shards.read_results(config.output), shards.read_results(str(tmp_path / "ref"))
    assert got.equals(want)
    # A finished run is not redone.
    done = FlakyScorer(scorer, fail_at=1)
    assert bs.score_to_shards(done, users, config) == manifest and done.calls == 0


def test_other_settings_refuse_to_resume_unless_overwrite(
    fake_export_base, tiny_data_dir, tmp_path, capsys
):
    out = tmp_path / "o"
    common = [
        "--export",
        fake_export_base,
        "--data",
        tiny_data_dir,
        "--split",
        SPLIT,
        "--output",
        out,
    ]
    assert run_cli(*common, "-k", 3) == 0
    assert run_cli(*common, "-k", 4) == 2
    err = capsys.readouterr().err
    assert "other settings" in err and "k" in err and "Traceback" not in err
    assert run_cli(*common, "-k", 4, "--overwrite") == 0
    assert shards.read_results(str(out))["rank"].max() == 4
    # --overwrite with unchanged settings keeps the finished run.
    before = (out / "part-00000.parquet").stat().st_mtime_ns
    assert run_cli(*common, "-k", 4, "--overwrite") == 0
    assert (out / "part-00000.parquet").stat().st_mtime_ns == before


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--split", SPLIT], "exactly one of --export"),
        (["--split", SPLIT, "--export", "X", "--server", "h:1"], "exactly one of --export"),
        (["--split", SPLIT, "--export", "X", "-k", "0"], "-k must be at least 1"),
        (["--split", SPLIT, "--export", "X", "--diversity", "1.5"], "--diversity must be in"),
        (["--split", SPLIT, "--export", "X", "--shard-size", "0"], "--shard-size must be"),
        (["--split", "p9", "--export", "X"], "invalid choice"),
        (
            ["--split", "p1", "--export", "X", "--exclude-seen", "--exclude-parts", "valid"],
            "--exclude-parts must name parts of p1",
        ),
    ],
)
def test_flag_errors_exit_2(args, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        bs.main(["--data", str(tmp_path), "--output", str(tmp_path / "o"), *args])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_runtime_errors_exit_2_without_traceback(fake_export_base, tiny_data_dir, tmp_path, capsys):
    out = str(tmp_path / "o")
    cases = [
        (
            ["--export", fake_export_base, "--data", str(tmp_path / "nodata"), "--split", SPLIT],
            "not a prepared data directory",
        ),
        (
            ["--export", str(tmp_path / "nope"), "--data", tiny_data_dir, "--split", SPLIT],
            "no such directory",
        ),
        (
            ["--export", fake_export_base, "--data", tiny_data_dir, "--split", SPLIT, "-k", "50"],
            "max_k = 20",
        ),
        (
            [
                "--export",
                fake_export_base,
                "--data",
                tiny_data_dir,
                "--split",
                SPLIT,
                "--signature",
                "nope",
            ],
            "no signature 'nope'",
        ),
        (
            [
                "--server",
                f"127.0.0.1:{free_port()}",
                "--data",
                tiny_data_dir,
                "--split",
                SPLIT,
                "--timeout",
                "5",
            ],
            "cannot reach a model server",
        ),
        (
            ["--server", "no-port-here", "--data", tiny_data_dir, "--split", SPLIT],
            "must be HOST:PORT",
        ),
    ]
    for args, message in cases:
        assert run_cli(*args, "--output", out) == 2, args
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, (args, err)


@pytest.mark.parametrize(
    ("orig_argv", "module"),
    [
        (["python", "-m", "scoring.batch_score", "--help"], "scoring.batch_score"),
        (["python", "-X", "importtime", "-mscoring.beam", "-h"], "scoring.beam"),
        (["/venv/bin/bt-batch-score", "--help"], "scoring.batch_score"),
    ],
)
def test_early_help_finds_the_scoring_module_being_run(orig_argv, module):
    found, args = cli.module_run(orig_argv, scoring_cli.SCRIPTS)
    assert found == module and found in scoring_cli.PARSERS and args[-1] in ("-h", "--help")


def test_scoring_console_scripts_are_declared():
    import configparser

    config = configparser.ConfigParser()
    config.read(REPO / "setup.cfg")
    scripts = dict(
        line.split(" = ")
        for line in config["options.entry_points"]["console_scripts"].strip().splitlines()
    )
    for name, module in scoring_cli.SCRIPTS.items():
        assert scripts[name] == f"{module}:main", name


def test_module_entry_point(fake_export_base, tiny_data_dir, tmp_path):
    """``python -m scoring.batch_score`` as a user runs it (progress bar on stderr)."""
    out = tmp_path / "cli"
    cmd = [
        sys.executable,
        "-m",
        "scoring.batch_score",
        "--export",
        fake_export_base,
        "--data",
        tiny_data_dir,
        "--split",
        SPLIT,
        "--output",
        str(out),
        "-k",
        "3",
    ]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "users" in proc.stdout and "scoring p2" in proc.stderr
    assert (out / "_SUCCESS").exists()


# --------------------------------------------------------------------------- server path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_server_scorer_matches_export_scorer(
    fake_export_base, scorer, users, tiny_data_dir, tmp_path
):
    from serving.flags import ServerConfig
    from serving.model_config import ModelConfig
    from serving.server import ModelServer

    server = ModelServer(
        ServerConfig(
            models=[ModelConfig("movielens", fake_export_base)],
            port=0,
            file_system_poll_wait_seconds=0,
        )
    )
    server.start()
    try:
        target = f"127.0.0.1:{server.grpc_port}"
        remote = backends.ServerScorer(target, "movielens")
        assert remote.describe()["versions"] == [1]
        seen = bs.seen_items(tiny_data_dir, SPLIT)
        got = bs.score_users(remote, users, 6, seen=seen, diversity=0.3, batch_size=16)
        want = bs.score_users(scorer, users, 6, seen=seen, diversity=0.3, batch_size=16)
        assert got[["user_id", "rank", "item_id", "title"]].equals(
            want[["user_id", "rank", "item_id", "title"]]
        )
        np.testing.assert_allclose(got.score, want.score, rtol=1e-5)
        catalog = records.load_catalog(tiny_data_dir, SPLIT)
        np.testing.assert_allclose(
            remote.candidate_embeddings(catalog, batch_size=25),
            scorer.candidate_embeddings(catalog),
            rtol=1e-5,
        )
        with pytest.raises(ScoringError, match="NOT_FOUND"):
            backends.ServerScorer(target, "other-model")
        remote.close()
        # The CLI through the server.
        out = tmp_path / "srv"
        assert (
            run_cli(
                "--server",
                target,
                "--data",
                tiny_data_dir,
                "--split",
                SPLIT,
                "--output",
                out,
                "-k",
                6,
                "--exclude-seen",
                "--diversity",
                0.3,
            )
            == 0
        )
        assert shards.read_results(str(out))[["user_id", "item_id"]].equals(
            got[["user_id", "item_id"]]
        )
    finally:
        server.stop(grace_s=0)


# --------------------------------------------------------------------------- analysis


def test_evaluate_results_matches_ranking_metrics(scorer, users, tiny_data_dir):
    from trainer import metrics

    catalog = records.load_catalog(tiny_data_dir, SPLIT)
    table = bs.score_users(scorer, users, 10, seen=bs.seen_items(tiny_data_dir, SPLIT))
    emb = scorer.candidate_embeddings(catalog)
    assert emb.shape == (len(catalog["item_id"]), FAKE_DIM)
    result = analysis.evaluate_results(
        table, tiny_data_dir, SPLIT, catalog=catalog, item_embeddings=emb
    )
    index = {item: i for i, item in enumerate(catalog["item_id"])}
    ids = list(users["user_id"])
    top = np.array([[index[i] for i in table[table.user_id == u].item_id] for u in ids])
    truth = analysis.truth_lists(tiny_data_dir, SPLIT, ids, catalog)
    want = metrics.ranking_metrics(top, truth, ks=(10,))
    assert result["recall@10"] == pytest.approx(want["recall@10"])
    assert result["num_users"] == want["num_users"] > 0
    assert 0 < result["coverage@10"] <= 1 and 0 <= result["intra_list_diversity@10"] <= 2


def test_lorenz_genre_mix_and_explain(scorer, users, tiny_data_dir):
    catalog = records.load_catalog(tiny_data_dir, SPLIT)
    table = bs.score_users(scorer, users, 5)
    x, y = analysis.lorenz_curve(table, len(catalog["item_id"]))
    assert x[0] == y[0] == 0 and y[-1] == pytest.approx(1) and (np.diff(y) >= 0).all()
    assert (y <= x + 1e-12).all()  # below the diagonal: least-exposed items first
    mix = analysis.genre_mix(table.item_id, catalog)
    assert sum(mix.values()) == pytest.approx(1) and all(v > 0 for v in mix.values())
    assert analysis.genre_mix([], catalog) == {}
    emb = scorer.candidate_embeddings(catalog)
    rows = analysis.explain(table, users, catalog, emb, list(users["user_id"][:2]), top=2)
    assert len(rows) == 4
    for row in rows:
        cosines = [c for _, c in row["because"]]
        assert cosines == sorted(cosines, reverse=True) and -1 - 1e-6 <= cosines[0] <= 1 + 1e-6


def test_diversity_tradeoff_raises_diversity(scorer, users, tiny_data_dir):
    rows = analysis.diversity_tradeoff(scorer, users, tiny_data_dir, SPLIT, lambdas=(0.0, 0.9), k=5)
    assert [r["lambda"] for r in rows] == [0.0, 0.9]
    assert rows[1]["intra_list_diversity@5"] > rows[0]["intra_list_diversity@5"]
    assert all(0 <= r["recall@5"] <= 1 for r in rows)


def test_read_results_errors(tmp_path):
    with pytest.raises(ScoringError, match="no such directory"):
        shards.read_results(str(tmp_path / "missing"))
    with pytest.raises(ScoringError, match="no part-"):
        shards.read_results(str(tmp_path))
    shutil.rmtree(tmp_path)
