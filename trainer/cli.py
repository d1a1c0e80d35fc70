"""Command-line parsers of the CLIs whose modules load TensorFlow at import, and early ``--help``.

``trainer.export`` and ``trainer.batch_score`` import TensorFlow at their top (their classes
derive from ``tf.Module`` and use TF types), which takes seconds to tens of seconds. Their
parsers live here, TensorFlow-free; the modules' ``build_parser`` return these. When Python runs
``python -m trainer.export --help``, the package ``trainer`` is imported first and calls
:func:`answer_help_early`, which prints the help and exits before the module itself loads.

Console scripts (``setup.cfg``): ``bt-prepare``, ``bt-train``, ``bt-evaluate``, ``bt-export``,
``bt-batch-score``, ``bt-plots``; each is the module's ``main``.
"""

from __future__ import annotations

import argparse
import ast
import os
import sys
from collections.abc import Callable, Sequence

#: ``trainer.export.IndexConfig``'s defaults (tests/test_ux.py checks they agree).
INDEX_DEFAULTS = {"kind": "scann", "max_k": 100, "min_recall": 0.95}
#: ``trainer.batch_score.RETRIEVE_SIGNATURE`` and ``trainer.data.schema.PROTOCOLS``.
RETRIEVE_SIGNATURE = "serving_default"
PROTOCOLS = ("p1", "p2", "p3", "p4")


def _module_doc(module: str) -> str:
    """A module's docstring, read from its source without importing it."""
    path = os.path.join(os.path.dirname(__file__), *module.split(".")[1:]) + ".py"
    try:
        with open(path, encoding="utf-8") as f:
            return ast.get_docstring(ast.parse(f.read())) or ""
    except (OSError, SyntaxError):
        return ""


def export_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m trainer.export",
        description=_module_doc("trainer.export"),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model-dir", required=True, help="trained model dir (python -m trainer.task)")
    p.add_argument("--export-base", required=True, help="TF Serving base folder (local or gs://)")
    p.add_argument(
        "--model-name",
        required=True,
        help="model name: the export goes to <export-base>/<name>/<version>; letters, digits, "
        "_ . - only, not '.' or '..'",
    )
    p.add_argument(
        "--index",
        default=INDEX_DEFAULTS["kind"],
        choices=["scann", "brute_force"],
        help="scann (needs a TF Serving built with ScaNN's ops) or brute_force (stock TF "
        "Serving; fine up to about a million items). Default: %(default)s",
    )
    p.add_argument(
        "--version",
        type=int,
        help="version number (default: the highest present + 1); an existing version is refused "
        "before the model loads",
    )
    p.add_argument("--data", help="prepared data dir (default: the one the model was trained on)")
    p.add_argument(
        "--max-k",
        type=int,
        default=INDEX_DEFAULTS["max_k"],
        help="largest k a request may ask. Default: %(default)s",
    )
    p.add_argument(
        "--pool",
        type=int,
        default=0,
        help="candidates fetched before exclusions and MMR (0: 2 * max-k)",
    )
    p.add_argument("--num-leaves", type=int, default=0, help="ScaNN leaves (0: about sqrt(N))")
    p.add_argument(
        "--num-leaves-to-search",
        type=int,
        default=0,
        help="ScaNN leaves searched per query (0: about leaves / 16, at least 8, doubled until "
        "--min-recall is met)",
    )
    p.add_argument(
        "--num-reordering-candidates",
        type=int,
        default=0,
        help="ScaNN candidates re-scored exactly (0: max(4 * pool, 256))",
    )
    p.add_argument(
        "--min-recall",
        type=float,
        default=INDEX_DEFAULTS["min_recall"],
        help="fail when ScaNN recall@10 against brute force is below this. Default: %(default)s",
    )
    return p


def batch_score_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m trainer.batch_score",
        description=_module_doc("trainer.batch_score"),
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
        default=RETRIEVE_SIGNATURE,
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


EARLY_HELP: dict[str, Callable[[], argparse.ArgumentParser]] = {
    "trainer.export": export_parser,
    "trainer.batch_score": batch_score_parser,
}


#: Console scripts (setup.cfg) whose module loads TensorFlow at import.
SCRIPTS = {"bt-export": "trainer.export", "bt-batch-score": "trainer.batch_score"}


def _module_run(orig_argv: Sequence[str]) -> tuple[str | None, list[str]]:
    """``("trainer.export", [args...])`` for ``python [opts] -m trainer.export args...`` or
    ``bt-export args...``."""
    argv = list(orig_argv)
    for i, arg in enumerate(argv[:2]):  # the script itself, or python's first argument
        script = os.path.basename(arg)
        if script in SCRIPTS:
            return SCRIPTS[script], argv[i + 1 :]
    i = 1
    while i < len(argv):
        arg = argv[i]
        if arg == "-m" and i + 1 < len(argv):
            return argv[i + 1], argv[i + 2 :]
        if arg.startswith("-m") and len(arg) > 2:
            return arg[2:], argv[i + 1 :]
        if arg in ("-c", "-") or not arg.startswith("-"):
            break  # a script path, a -c program or stdin: not `-m`
        i += 2 if arg in ("-X", "-W", "--check-hash-based-pycs") else 1
    return None, []


def answer_help_early(orig_argv: Sequence[str] | None = None) -> None:
    """Prints the help of ``python -m trainer.<cli> --help`` and exits, before TF loads.

    Does nothing for any other command line (other modules, scripts, imports).
    """
    if orig_argv is None:
        orig_argv = getattr(sys, "orig_argv", [])
    module, args = _module_run(orig_argv)
    if module not in EARLY_HELP or not args:
        return
    if "-h" in args or "--help" in args:
        EARLY_HELP[module]().parse_args(["--help"])  # prints and exits 0
