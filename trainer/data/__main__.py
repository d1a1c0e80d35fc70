"""``python -m trainer.data prepare ...``: builds a prepared data directory and prints its table."""

from __future__ import annotations

import argparse
import logging
import sys
import time

import trainer  # noqa: F401  (TF_USE_LEGACY_KERAS before TensorFlow loads)
from common.cli import run
from trainer import lazy_import

# TensorFlow loads when preparing starts, not for --help or a bad flag.
prepare_lib = lazy_import("trainer.data.prepare")

# PrepareConfig's defaults, repeated here so that --help needs no TensorFlow; a test checks them.
DEFAULTS = {
    "seed": 42,
    "history_length": 50,
    "user_history_length": 256,
    "liked_threshold": 4.0,
    "query_titles": 10,
    "cold_fraction": 0.1,
    "train_shards": 4,
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m trainer.data", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser(
        "prepare",
        help="load MovieLens, build text features, split, write",
        description="Loads MovieLens (or synthetic data), builds the text features, splits the "
        "ratings under the protocols p1-p4 and writes TFRecords and a manifest. Stages and counts "
        "go to stderr as they happen; the summary table to stdout at the end.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "--dataset",
        default="ml-100k",
        choices=["ml-100k", "ml-1m", "ml-20m", "ml-25m", "synthetic"],
        help="built-in ml-100k (offline copy) or synthetic; others need --source",
    )
    p.add_argument(
        "--source",
        help="directory with GroupLens files (u.data / *.dat / *.csv) or "
        "RecBole's ml-100k.{inter,item,user}",
    )
    p.add_argument("--output", required=True, help="prepared data directory (local or gs://)")
    p.add_argument(
        "--cache-dir", help="where downloaded raw data is cached (default ~/.cache/bert-two-tower)"
    )
    defaults = DEFAULTS
    p.add_argument(
        "--seed", type=int, default=defaults["seed"], help="fixes all four protocols' splits"
    )
    p.add_argument(
        "--history-length",
        type=int,
        default=defaults["history_length"],
        help="history items stored per p1 event (its earlier ratings, most recent first)",
    )
    p.add_argument(
        "--user-history-length",
        type=int,
        default=defaults["user_history_length"],
        help="history items stored per user (the whole-history query; longer ones are cut)",
    )
    p.add_argument(
        "--liked-threshold",
        type=float,
        default=defaults["liked_threshold"],
        help="ratings at or above this make a movie 'liked': its title goes into the query text",
    )
    p.add_argument(
        "--query-titles",
        type=int,
        default=defaults["query_titles"],
        help="liked titles written into each query text (most recent first)",
    )
    p.add_argument(
        "--cold-fraction",
        type=float,
        default=defaults["cold_fraction"],
        help="share of movies held out of training in p3 (cold-start items), in (0, 1)",
    )
    p.add_argument(
        "--train-shards",
        type=int,
        default=defaults["train_shards"],
        help="TFRecord shards of each train part",
    )
    p.add_argument(
        "--overwrite", action="store_true", help="replace existing prepared data (atomically)"
    )
    return parser


def summary_table(manifest: dict) -> str:
    counts = manifest["counts"]
    lines = [
        f"dataset {manifest['dataset']}  seed {manifest['seed']}",
        f"{'ratings':>10} {'users':>7} {'items':>7}",
        f"{counts['ratings']:>10,} {counts['users']:>7,} {counts['items']:>7,}",
        "",
        f"{'split':<6}{'part':<7}{'examples':>10}{'positives':>11}{'users':>7}{'items':>7}",
    ]
    for name, split in manifest["splits"].items():
        for part, info in split["parts"].items():
            lines.append(
                f"{name:<6}{part:<7}{info['examples']:>10,}{info['positives']:>11,}"
                f"{info['users']:>7,}{info['items']:>7,}"
            )
        if split.get("cold_items"):
            lines.append(f"{name:<6}cold items held out of training: {len(split['cold_items'])}")
        if "heldout_users" in split:
            held = split["heldout_users"]
            lines.append(
                f"{name:<6}new users held out of training: {len(held['valid'])} valid, "
                f"{len(held['test'])} test (fold-in history + targets)"
            )
    return "\n".join(lines)


def _log_to_stderr() -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
    logger = logging.getLogger("trainer.data")
    logger.handlers[:] = [handler]
    logger.setLevel(logging.INFO)
    logger.propagate = False


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _log_to_stderr()
    return run(lambda: _prepare(args))


def _prepare(args: argparse.Namespace) -> int:
    config = prepare_lib.PrepareConfig(
        output=args.output,
        dataset=args.dataset,
        source=args.source,
        cache_dir=args.cache_dir,
        seed=args.seed,
        history_length=args.history_length,
        user_history_length=args.user_history_length,
        liked_threshold=args.liked_threshold,
        query_titles=args.query_titles,
        cold_fraction=args.cold_fraction,
        train_shards=args.train_shards,
        overwrite=args.overwrite,
    )
    start = time.time()
    manifest = prepare_lib.prepare(config)  # DataError: one error line, exit 2
    print(summary_table(manifest))
    print(f"\nwrote {args.output} in {time.time() - start:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
