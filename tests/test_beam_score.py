"""Tests of the Beam batch scorer (scoring/beam/) on the local runner.

The reference is :mod:`scoring.batch_score` (the one-machine scorer) on the same fake export
(``fake_export_base`` in conftest: the real export module and signatures around hash-embedding
towers): the Beam pipeline must give every user the same top-k, in the same order, with the
same scores.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("apache_beam")

from common import contract  # noqa: E402
from scoring import backends, shards  # noqa: E402
from scoring import batch_score as bs  # noqa: E402
from scoring import beam as beam_score  # noqa: E402
from trainer.data import records  # noqa: E402

SPLIT = "p2"
K = 5


@pytest.fixture(scope="module")
def users(tiny_data_dir: str) -> dict[str, np.ndarray]:
    return records.load_users(tiny_data_dir, SPLIT)


@pytest.fixture(scope="module")
def scorer(fake_export_base: str) -> backends.ExportScorer:
    return backends.ExportScorer(fake_export_base)


def top_lists(frame) -> dict[str, list[tuple[int, str]]]:
    """user -> [(rank, item_id), ...] in rank order."""
    frame = frame.sort_values(["user_id", "rank"])
    return {u: list(zip(g["rank"], g["item_id"], strict=True)) for u, g in frame.groupby("user_id")}


def assert_same_results(beam, reference) -> None:
    assert list(beam.columns) == list(shards.COLUMNS)
    assert top_lists(beam) == top_lists(reference)
    merged = beam.merge(reference, on=["user_id", "rank"], suffixes=("_beam", "_ref"))
    assert len(merged) == len(reference)
    np.testing.assert_allclose(merged["score_beam"], merged["score_ref"], rtol=1e-5, atol=1e-6)
    assert (merged["title_beam"] == merged["title_ref"]).all()


def test_tfrecord_input_matches_batch_score(
    fake_export_base: str, tiny_data_dir: str, users, scorer, tmp_path: Path
) -> None:
    out = tmp_path / "scores"
    argv = ["--export", fake_export_base, "--data", tiny_data_dir, "--split", SPLIT,
            "--output", str(out), "-k", str(K), "--exclude-seen", "--batch-size", "7",
            "--num-shards", "2"]  # fmt: skip
    assert beam_score.main(argv) == 0
    seen = bs.seen_items(tiny_data_dir, SPLIT)
    reference = bs.score_users(scorer, users, K, seen=seen, batch_size=64)
    beam = shards.read_results(str(out))
    assert_same_results(beam, reference)
    assert set(beam["user_id"]) == set(users["user_id"])
    # Seen items really were excluded (the comparison alone would pass if both ignored them).
    for user, group in beam.groupby("user_id"):
        assert not set(group["item_id"]) & set(seen.get(user, []))

    manifest = json.loads((out / shards.SUCCESS_FILE).read_text())
    assert manifest["num_users"] == len(users["user_id"])
    assert manifest["num_rows"] == len(beam)
    assert manifest["shards"] == ["part-00000.parquet", "part-00001.parquet"]
    assert manifest["settings"]["export"].endswith(os.path.join("movielens", "1"))
    # Only the published shards and the manifest; Beam's and this tool's temp folders are gone.
    published = [*manifest["shards"], shards.SUCCESS_FILE]
    assert sorted(p.name for p in out.iterdir()) == sorted(published)

    # A second run into the same folder must not mix into it.
    assert beam_score.main(argv) == 2


def test_parquet_input_with_exclusions_matches_batch_score(
    fake_export_base: str, users, scorer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    ids = [str(u) for u in users["user_id"]]
    # Histories as variable-length lists (padding stripped), exclusions for two users.
    history = [[h for h in row if h] for row in users["history"]]
    exclude = {ids[0]: list(history[0][:3]), ids[1]: ["no-such-item"]}
    table = {n: pa.array([str(v) for v in users[n]]) for n in contract.QUERY_FEATURES}
    table["history"] = pa.array(history, pa.list_(pa.string()))
    table["exclude_item_ids"] = pa.array([exclude.get(u, []) for u in ids], pa.list_(pa.string()))
    half = len(ids) // 2
    src = tmp_path / "users"
    src.mkdir()
    whole = pa.table(table)
    pq.write_table(whole.slice(0, half), src / "a.parquet")
    pq.write_table(whole.slice(half), src / "b.parquet")

    out = tmp_path / "scores"
    argv = ["--export", fake_export_base, "--split", SPLIT, "--input", "parquet",
            "--input-path", str(src / "*.parquet"), "--output", str(out), "-k", str(K)]  # fmt: skip
    assert beam_score.main(argv) == 0
    reference = bs.score_users(scorer, users, K, seen=exclude, batch_size=64)
    beam = shards.read_results(str(out))
    assert_same_results(beam, reference)
    assert not set(beam[beam["user_id"] == ids[0]]["item_id"]) & set(exclude[ids[0]])

    # --overwrite replaces the earlier run's shards (no stale shard left).
    assert beam_score.main([*argv, "--overwrite", "-k", "3"]) == 0
    assert (shards.read_results(str(out))["rank"] <= 3).all()
    capsys.readouterr()

    # A row without a required column fails on the worker: one error line, nothing published.
    pq.write_table(whole.drop_columns(["query_text"]), src / "a.parquet")
    bad_out = tmp_path / "bad"
    assert beam_score.main([*argv[:-4], "--output", str(bad_out)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: the pipeline failed:") and "query_text" in err
    assert not list(bad_out.glob("part-*")) and not (bad_out / shards.SUCCESS_FILE).exists()


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--output-table", "p:d.t"], "exactly one of --output"),
        (["--input", "parquet"], "--input parquet needs --input-path"),
        (["--input", "bigquery", "--input-table", "x"], "not PROJECT:DATASET.TABLE"),
        (["--diversity", "1.5"], "--diversity must be in [0, 1]"),
        (["--exclude-parts", "test,nope"], "the parts of p2"),
        (["-k", "50"], "max_k = 20"),
        (["--num_workrs=3"], "unknown option(s) --num_workrs"),
        (
            ["--runner", "DataflowRunner", "--project", "p", "--region", "us-central1"],
            "needs --temp_location",
        ),  # fmt: skip
        (
            [
                "--runner",
                "DataflowRunner",
                "--project",
                "p",
                "--region",
                "us-central1",
                "--temp_location",
                "gs://b/tmp",
            ],
            "cannot read local paths",
        ),  # fmt: skip
    ],
)
def test_bad_flags_exit_2(
    extra: list[str],
    message: str,
    fake_export_base: str,
    tiny_data_dir: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    argv = ["--export", fake_export_base, "--data", tiny_data_dir, "--split", SPLIT,
            "--output", str(tmp_path / "o"), *extra]  # fmt: skip
    assert beam_score.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err, err
    assert not (tmp_path / "o").exists()


def test_bigquery_output_needs_a_gcs_temp_location(
    fake_export_base: str, tiny_data_dir: str, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["--export", fake_export_base, "--data", tiny_data_dir, "--split", SPLIT,
            "--output-table", "proj:recs.top_k"]  # fmt: skip
    assert beam_score.main(argv) == 2
    assert "--temp_location gs://" in capsys.readouterr().err


def test_missing_export_or_data_exit_2(
    tiny_data_dir: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["--split", SPLIT, "--output", str(tmp_path / "o")]
    assert beam_score.main(["--export", str(tmp_path), "--data", tiny_data_dir, *argv]) == 2
    assert "neither a SavedModel" in capsys.readouterr().err
