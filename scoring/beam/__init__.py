"""Batch scoring on Apache Beam: top-k for every user, from the export's own signatures.

``python -m scoring.beam --export DIR --data DIR --split p2 --output DIR [-k 10]
[--exclude-seen] [--input tfrecord|parquet|bigquery ...] [--output-table P:D.T]
[--runner DirectRunner|DataflowRunner|FlinkRunner|SparkRunner|PrismRunner] [Beam options]``

The distributed twin of :mod:`scoring.batch_score`: the same users (``users.tfrecord`` of the
split, or Parquet / BigQuery rows with the same columns), the same ``serving_default`` call
(:class:`scoring.backends.ExportScorer`, the signature TF Serving serves), the same output
columns ``user_id, rank, item_id, title, score``. Unknown ``--flags`` are Beam pipeline options
(``--project``, ``--region``, ``--temp_location``, ``--num_workers``, ``--sdk_container_image``,
``--flink_master`` ...); a misspelt one is an error, not a silent default.

Parquet output: the pipeline writes into ``OUTPUT/.tmp-<run>/``; only once it has finished are
the shards renamed to ``OUTPUT/part-NNNNN.parquet`` and ``_SUCCESS`` (manifest) written last, so
``scoring.shards.read_results`` reads either tool's output and a failed run leaves only a
hidden folder. BigQuery output (``--output-table``) goes through load jobs (``FILE_LOADS``),
which replace or fill the table in one step.

``--runner DirectRunner`` runs Beam's in-process portable runner (``FnApiRunner``): it is the
engine Beam 2.77's DirectRunner falls back to, without that runner's first attempt to download
the Prism binary from GitHub (nothing here fetches code at run time). ``--direct_num_workers N
--direct_running_mode multi_processing`` use N local processes.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import sys
import time
import uuid
from collections.abc import Sequence
from typing import Any

from common import cli, staging
from common.cli import UsageError
from scoring import backends, shards
from scoring.beam.pipeline import NAMESPACE, BeamScoreConfig, build_pipeline
from scoring.cli import beam_parser
from trainer.data import records, schema

__all__ = ["BeamScoreConfig", "build_pipeline", "main", "parse_args", "run"]

TMP_PREFIX = ".tmp-"
BQ_TABLE_RE = re.compile(r"^(?:[\w.-]+[:.])?\w+\.[\w$-]+$")

# --------------------------------------------------------------------------- running


def pipeline_options(config: BeamScoreConfig, beam_flags: Sequence[str]):
    """Beam ``PipelineOptions`` from the passthrough flags; unknown ones are a UsageError."""
    from apache_beam.options.pipeline_options import GoogleCloudOptions, PipelineOptions

    flags = [f"--runner={config.runner}", *beam_flags]
    options = PipelineOptions(flags)
    known = options.get_all_options()
    unknown = sorted(set(options.get_all_options(retain_unknown_options=True)) - set(known))
    if unknown:
        raise UsageError(
            f"unknown option(s) --{', --'.join(unknown)} (neither this tool's nor Beam's)"
        )
    if config.runner == "DataflowRunner":
        cloud = options.view_as(GoogleCloudOptions)
        for name in ("project", "region", "temp_location"):
            if not getattr(cloud, name):
                raise UsageError(f"--runner DataflowRunner needs --{name}")
        remote = {
            "--export": config.export,
            "--data": config.data,
            "--output": config.output,
            "--input-path": config.input_path,
            "--temp_location": cloud.temp_location,
        }
        local = [f"{flag} {path}" for flag, path in remote.items() if path and "://" not in path]
        if local:
            raise UsageError(f"Dataflow workers cannot read local paths: {', '.join(local)}")
    if (config.input == "bigquery" or config.output_table) and config.runner != "DataflowRunner":
        # BigQuery export/load jobs stage files under --temp_location, which must be on GCS.
        location = options.view_as(GoogleCloudOptions).temp_location or ""
        if not location.startswith("gs://"):
            raise UsageError("BigQuery input or output needs --temp_location gs://...")
    return options


def _run_pipeline(config: BeamScoreConfig, options, export_dir: str, prefix: str):
    import apache_beam as beam

    runner = None
    if config.runner == "DirectRunner":
        from apache_beam.portability.api import beam_provision_api_pb2
        from apache_beam.runners.portability.fn_api_runner import fn_runner
        from apache_beam.runners.portability.portable_runner import JobServiceHandle

        # As DirectRunner builds it (the options reach multi_processing workers too).
        encoded = JobServiceHandle.encode_pipeline_options(options.get_all_options())
        info = beam_provision_api_pb2.ProvisionInfo(pipeline_options=encoded)
        runner = fn_runner.FnApiRunner(provision_info=fn_runner.ExtendedProvisionInfo(info))
    pipeline = beam.Pipeline(runner=runner, options=options)
    build_pipeline(pipeline, config, export_dir, prefix)
    result = pipeline.run()
    state = result.wait_until_finish()
    if str(state) not in ("DONE", "PipelineState.DONE"):
        raise RuntimeError(f"the pipeline ended in state {state}")
    return result


def _metrics(result) -> dict[str, Any]:
    """This tool's counters and RunInference's figures (namespace ``beam_score``)."""
    from apache_beam.metrics.metric import MetricsFilter

    found = result.metrics().query(MetricsFilter().with_namespace(NAMESPACE))
    out: dict[str, Any] = {}
    for counter in found["counters"]:
        value = counter.committed if counter.committed is not None else counter.attempted
        out[counter.key.metric.name] = out.get(counter.key.metric.name, 0) + int(value)
    for dist in found["distributions"]:
        value = dist.committed if dist.committed is not None else dist.attempted
        if value is not None and value.count:
            name = dist.key.metric.name
            out[f"{name}_mean"] = round(value.sum / value.count, 1)
            out[f"{name}_sum"], out[f"{name}_count"] = int(value.sum), int(value.count)
    return out


def _existing_run(output: str) -> list[str]:
    from apache_beam.io.filesystems import FileSystems

    if not FileSystems.exists(output):
        return []
    pattern = [
        FileSystems.join(output, "part-*.parquet"),
        FileSystems.join(output, shards.SUCCESS_FILE),
    ]
    return [m.path for r in FileSystems.match(pattern) for m in r.metadata_list]


def _publish(output: str, tmp_dir: str, replace: list[str]) -> list[str]:
    """Moves the finished shards from ``tmp_dir`` into ``output``; returns their names."""
    from apache_beam.io.filesystems import FileSystems

    if replace:
        FileSystems.delete(replace)
    (match,) = FileSystems.match([FileSystems.join(tmp_dir, "part-*.parquet")])
    sources = sorted(m.path for m in match.metadata_list)
    names = [s.rsplit("/", 1)[-1] for s in sources]
    FileSystems.rename(sources, [FileSystems.join(output, n) for n in names])
    # An object store deletes a folder by its prefix ("dir/"), a local disk by its path.
    FileSystems.delete([tmp_dir + "/" if "://" in tmp_dir else tmp_dir])
    return names


def run(config: BeamScoreConfig, beam_flags: Sequence[str] = ()) -> dict[str, Any]:
    """Scores every user; returns the manifest (for Parquet also written as ``_SUCCESS``)."""
    from apache_beam.io.filesystems import FileSystems

    options = pipeline_options(config, beam_flags)
    # One version for the whole run: a version exported mid-run must not mix into the shards.
    export_dir = backends.resolve_export_dir(config.export)
    backends.check_k(config.k, backends.export_max_k(export_dir))
    if config.input == "tfrecord" and not config.input_path:
        records.part_files(config.data, config.split, "train")  # a prepared data dir, or DataError
    previous = [] if config.output_table else _existing_run(config.output)
    if previous and not config.overwrite:
        raise UsageError(
            f"--output {config.output} already holds a scoring run; "
            "use a new --output or --overwrite"
        )
    tmp_dir = (
        FileSystems.join(config.output, f"{TMP_PREFIX}{uuid.uuid4().hex[:12]}")
        if (config.output)
        else ""
    )
    started = time.time()
    result = _run_pipeline(
        config, options, export_dir, FileSystems.join(tmp_dir, "part") if tmp_dir else ""
    )
    seconds = time.time() - started
    figures = _metrics(result)
    manifest = {
        "settings": {
            **{f.name: getattr(config, f.name) for f in dataclasses.fields(config)},
            "export": export_dir,
            "exclude_parts": list(config.exclude_parts),
        },
        "runner": config.runner,
        "num_users": figures.get("users", 0),
        "num_rows": figures.get("rows", 0),
        "seconds": round(seconds, 3),
        "users_per_second": round(figures.get("users", 0) / seconds, 1) if seconds else None,
        # RunInference's own figures: num_inferences, inference_batch_latency_micro_secs_mean,
        # load_model_latency_milli_secs_mean, ... (the per-user cost without start-up).
        "metrics": figures,
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
        "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    if tmp_dir:
        manifest["shards"] = _publish(config.output, tmp_dir, previous)
        manifest["num_shards"] = len(manifest["shards"])
        staging.write_json(FileSystems.join(config.output, shards.SUCCESS_FILE), manifest)
    return manifest


# --------------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    return beam_parser()


def parse_args(argv: Sequence[str] | None) -> tuple[BeamScoreConfig, list[str]]:
    """Flags -> (config, Beam passthrough flags); raises UsageError on a bad combination."""
    args, beam_flags = build_parser().parse_known_args(argv)
    if bool(args.output) == bool(args.output_table):
        raise UsageError("give exactly one of --output DIR (Parquet) or --output-table TABLE")
    if args.output_table and not BQ_TABLE_RE.match(args.output_table):
        raise UsageError(f"--output-table {args.output_table!r} is not PROJECT:DATASET.TABLE")
    sources = {
        "tfrecord": args.data or args.input_path,
        "parquet": args.input_path,
        "bigquery": bool(args.input_table) != bool(args.input_query),
    }
    if not sources[args.input]:
        need = {
            "tfrecord": "--data (or --input-path)",
            "parquet": "--input-path",
            "bigquery": "exactly one of --input-table or --input-query",
        }
        raise UsageError(f"--input {args.input} needs {need[args.input]}")
    if args.input_table and not BQ_TABLE_RE.match(args.input_table):
        raise UsageError(f"--input-table {args.input_table!r} is not PROJECT:DATASET.TABLE")
    if args.k < 1 or args.batch_size < 1 or args.num_shards < 0:
        raise UsageError("-k and --batch-size must be at least 1, --num-shards at least 0")
    if not 0.0 <= args.diversity <= 1.0:
        raise UsageError(f"--diversity must be in [0, 1], got {args.diversity}")
    parts = tuple(p.strip() for p in args.exclude_parts.split(",") if p.strip())
    if bad := [p for p in parts if p not in schema.PARTS[args.split]] or not parts:
        raise UsageError(
            f"--exclude-parts {bad or args.exclude_parts!r}: the parts of "
            f"{args.split} are {', '.join(schema.PARTS[args.split])}"
        )
    if args.exclude_seen and not args.data:
        raise UsageError("--exclude-seen reads the seen items from --data")
    fields = {f.name for f in dataclasses.fields(BeamScoreConfig)}
    values = {k: v for k, v in vars(args).items() if k in fields}
    return BeamScoreConfig(**{**values, "exclude_parts": parts}), beam_flags


def _score(argv: Sequence[str] | None) -> int:
    config, beam_flags = parse_args(argv)
    try:
        manifest = run(config, beam_flags)
    except UsageError:  # ScoringError, DataError: the user's to fix, cli.run prints it, exit 2
        raise
    except Exception as e:  # a worker's failure, re-raised by the runner: one line, exit 1
        line = (str(e).strip().splitlines() or [type(e).__name__])[-1]
        print(f"error: the pipeline failed: {line}", file=sys.stderr)
        return 1
    where = config.output or config.output_table
    print(
        f"{manifest['num_users']} users, {manifest['num_rows']} rows -> {where} "
        f"({manifest['seconds']}s, runner {config.runner})"
    )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return cli.run(lambda: _score(argv))
