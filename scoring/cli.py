"""The parsers of ``python -m scoring.batch_score`` and ``python -m scoring.beam``, TF-free.

Both modules import TensorFlow at their top (seconds); ``scoring/__init__.py`` answers
``--help`` from these parsers before they load. The modules' ``build_parser`` return them.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from common import cli, contract
from trainer.cli import PROTOCOLS

#: Beam runners ``python -m scoring.beam`` accepts.
RUNNERS = ("DirectRunner", "DataflowRunner", "FlinkRunner", "SparkRunner", "PrismRunner")
#: Where ``python -m scoring.beam`` reads its users from.
INPUTS = ("tfrecord", "parquet", "bigquery")


def batch_score_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m scoring.batch_score",
        description=cli.module_doc("scoring.batch_score"),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    source = p.add_argument_group("model (exactly one)")
    source.add_argument("--export", help="export version dir, or model base (highest version)")
    source.add_argument("--server", help="HOST:PORT of TF Serving / serving.server (gRPC)")
    p.add_argument(
        "--model-name",
        "--model",
        dest="model_name",
        default="movielens",
        help="model name on --server (--model: the same, as serving.client spells it). "
        "Default: %(default)s",
    )
    p.add_argument(
        "--signature",
        default=contract.RETRIEVE,
        help="retrieve signature. Default: %(default)s",
    )
    p.add_argument("--data", required=True, help="prepared data directory")
    p.add_argument("--split", required=True, choices=PROTOCOLS, help="whose users to score")
    p.add_argument("--output", required=True, help="output directory (local or gs://)")
    p.add_argument(
        "-k", "--k", type=int, default=10, help="recommendations per user. Default: %(default)s"
    )
    p.add_argument(
        "--batch-size", type=int, default=256, help="users per request. Default: %(default)s"
    )
    p.add_argument(
        "--shard-size",
        type=int,
        default=5000,
        help="users per Parquet shard. Default: %(default)s",
    )
    p.add_argument(
        "--exclude-seen",
        action="store_true",
        help="never recommend items the user rated in --exclude-parts",
    )
    p.add_argument(
        "--exclude-parts",
        default="train",
        help="comma-separated parts whose items --exclude-seen removes. Default: %(default)s",
    )
    p.add_argument("--diversity", type=float, default=0.0, help="MMR λ in [0, 1]. Default: 0")
    p.add_argument(
        "--timeout",
        type=float,
        default=60.0,
        help="per-request deadline in seconds (--server). Default: %(default)s",
    )
    p.add_argument("--overwrite", action="store_true", help="replace shards of other settings")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def beam_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m scoring.beam",
        description=cli.module_doc("scoring.beam"),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,  # so a Beam option is never taken for a prefix of ours
    )
    p.add_argument("--export", required=True, help="export version dir or model base")
    p.add_argument("--signature", default=contract.RETRIEVE, help="retrieve signature")
    p.add_argument("--data", default="", help="prepared data dir (tfrecord input, --exclude-seen)")
    p.add_argument("--split", required=True, choices=PROTOCOLS)
    p.add_argument("--input", default="tfrecord", choices=INPUTS, help="where the users come from")
    p.add_argument("--input-path", default="", help="TFRecord or Parquet file pattern")
    p.add_argument("--input-table", default="", help="BigQuery table PROJECT:DATASET.TABLE")
    p.add_argument("--input-query", default="", help="BigQuery standard SQL query")
    p.add_argument("--output", default="", help="Parquet output dir (local, gs://, ...)")
    p.add_argument("--output-table", default="", help="BigQuery output PROJECT:DATASET.TABLE")
    p.add_argument("-k", "--k", type=int, default=10, help="recommendations per user")
    p.add_argument("--diversity", type=float, default=0.0, help="MMR λ in [0, 1]")
    p.add_argument("--exclude-seen", action="store_true", help="drop items of --exclude-parts")
    p.add_argument("--exclude-parts", default="train", help="comma-separated parts")
    p.add_argument("--batch-size", type=int, default=256, help="users per signature call")
    p.add_argument("--num-shards", type=int, default=0, help="Parquet shards (0: runner decides)")
    p.add_argument("--runner", default="DirectRunner", choices=RUNNERS)
    p.add_argument("--overwrite", action="store_true", help="replace an earlier run's output")
    return p


#: TF-free parser of each scoring CLI module.
PARSERS = {"scoring.batch_score": batch_score_parser, "scoring.beam": beam_parser}
#: Console scripts (setup.cfg) of the scoring CLIs.
SCRIPTS = {"bt-batch-score": "scoring.batch_score"}


def answer_help_early(orig_argv: Sequence[str] | None = None) -> None:
    """Prints the help of ``python -m scoring.<cli> --help`` and exits, before TF loads."""
    cli.answer_help_early(PARSERS, SCRIPTS, orig_argv)
