"""Command-line parsers of the CLIs whose modules load TensorFlow at import, and early ``--help``.

``trainer.export`` imports TensorFlow at its top (its classes derive from ``tf.Module`` and
use TF types), which takes seconds to tens of seconds. Its parser lives here, TensorFlow-free;
the module's ``build_parser`` returns it. When Python runs
``python -m trainer.export --help``, the package ``trainer`` is imported first and calls
:func:`answer_help_early`, which prints the help and exits before the module itself loads.

Console scripts (``setup.cfg``): ``bt-prepare``, ``bt-train``, ``bt-evaluate``, ``bt-export``,
``bt-plots``; each is the module's ``main``.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence

from common import cli

#: ``trainer.serving_module.IndexConfig``'s defaults (tests/test_ux.py checks they agree).
INDEX_DEFAULTS = {"kind": "scann", "max_k": 100, "min_recall": 0.95}
#: ``trainer.data.schema.PROTOCOLS``.
PROTOCOLS = ("p1", "p2", "p3", "p4")


def export_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m trainer.export",
        description=cli.module_doc("trainer.export"),
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
        help="ScaNN leaves searched per query (0: tuned from about leaves / 16, at least 8: "
        "doubled until --min-recall is met, or halved while it still would be)",
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


#: TF-free parser of each trainer CLI module that loads TensorFlow at import.
PARSERS: dict[str, Callable[[], argparse.ArgumentParser]] = {"trainer.export": export_parser}
#: Console scripts (setup.cfg) whose module loads TensorFlow at import.
SCRIPTS = {"bt-export": "trainer.export"}


def answer_help_early(orig_argv: Sequence[str] | None = None) -> None:
    """Prints the help of ``python -m trainer.<cli> --help`` and exits, before TF loads.

    Does nothing for any other command line (other modules, scripts, imports).
    """
    cli.answer_help_early(PARSERS, SCRIPTS, orig_argv)
