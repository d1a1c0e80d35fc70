"""New users who only type liked titles (p4): the default against ``--user-titles-only``, and EASE.

    python benchmarks/typed_titles.py [--seeds 42 1 2] [--shares 0 0.2] [--work runs/exp]
                                      [--data runs/qp2/data]

Trains the two-tower on p4 once per (share, seed) (``WORK/p4_t<percent>_s<seed>``; a model dir
that exists is reused), then scores each model and EASE on the valid and the test part, with the
queries as prepared (profile, fold-in history, typed titles) and cut to what a new user types
(``trainer.evaluate --queries typed_titles``: the profile and the liked titles, no history).
Writes ``benchmarks/results/typed_titles_p4.{json,md}``: mean ± std over the seeds. A setting is
chosen on valid; test is what it is reported on. ``--data``: a directory prepared by
``trainer.data prepare`` (``benchmarks/quality.py`` prepares ``runs/qp2/data``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from quality import ROOT, run  # noqa: E402  (the same command runner and repo root)

PARTS = ("valid", "test")
QUERIES = ("prepared", "typed_titles")
FIGURES = ("recall@10", "ndcg@10", "hit@10", "coverage@10")
RESULTS = os.path.join(ROOT, "benchmarks", "results", "typed_titles_p4")


def evaluate(args: argparse.Namespace, tag: str, source: list[str]) -> dict:
    """``{part: {queries: metrics}}`` of one model dir or baseline (reports kept under WORK)."""
    out: dict = {}
    for part in PARTS:
        for queries in QUERIES:
            path = os.path.join(args.work, f"eval_p4_{tag}_{part}_{queries}.json")
            if not os.path.exists(path):
                cmd = [sys.executable, "-m", "trainer.evaluate", "--data", args.data]
                cmd += ["--split", "p4", "--part", part, "--queries", queries, "--no-mmr"]
                run([*cmd, *source, "--output", path], path + ".log")
            with open(path) as f:
                metrics = json.load(f)["metrics"]
            out.setdefault(part, {})[queries] = {k: metrics[k] for k in FIGURES}
    return out


def two_tower(args: argparse.Namespace, share: float, seed: int) -> dict:
    tag = f"t{round(share * 100)}_s{seed}"
    model_dir = os.path.join(args.work, f"p4_{tag}")
    if not os.path.exists(os.path.join(model_dir, "metrics.json")):
        cmd = [sys.executable, "-m", "trainer.task", "--data", args.data, "--split", "p4"]
        cmd += ["--seed", str(seed), "--model-dir", model_dir, "--no-progress"]
        run([*cmd, "--user-titles-only", str(share)], model_dir + ".train.log")
    with open(os.path.join(model_dir, "metrics.json")) as f:
        trained = json.load(f)
    report = evaluate(args, tag, ["--model-dir", model_dir])
    report["best_epoch"] = trained["best"]["epoch"]
    report["prior_weight"] = (trained.get("popularity_prior") or {}).get("weight")
    report["train_seconds"] = trained.get("seconds")
    return report


def mean_std(reports: list[dict], part: str, queries: str, figure: str) -> tuple[float, float]:
    values = [r[part][queries][figure] for r in reports]
    return float(np.mean(values)), float(np.std(values, ddof=1)) if len(values) > 1 else 0.0


def to_markdown(result: dict) -> str:
    lines = [
        "# p4: new users with their fold-in history, and new users who only type liked titles",
        "",
        f"Seeds {', '.join(map(str, result['seeds']))} (mean ± std; EASE is deterministic); "
        "the 47 valid and 47 test new users of p4, no user id. `prepared`: the query as "
        "prepared (profile, fold-in history, the query text's typed titles). `typed`: only the "
        "profile and the liked titles of the query text (the 10 most recent well-rated fold-in "
        "items; `trainer.evaluate --queries typed_titles`), no history; EASE folds in the items "
        "those titles name. The fold-in items are removed from the ranking either way.",
        "",
    ]
    for part in PARTS:
        lines += [
            f"**{part}**",
            "",
            "| system | prepared recall@10 | prepared NDCG@10 | typed recall@10 | typed NDCG@10 "
            "| typed coverage@10 |",
            "| --- | ---: | ---: | ---: | ---: | ---: |",
        ]
        for name, reports in result["systems"].items():
            cells = []
            for queries, figure in [("prepared", "recall@10"), ("prepared", "ndcg@10"),
                                    ("typed_titles", "recall@10"), ("typed_titles", "ndcg@10"),
                                    ("typed_titles", "coverage@10")]:  # fmt: skip
                mean, std = mean_std(reports, part, queries, figure)
                cells.append(f"{mean:.4f} ± {std:.4f}" if len(reports) > 1 else f"{mean:.4f}")
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        lines.append("")
    lines.append(f"Command: `python benchmarks/typed_titles.py {result['command']}`.")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[42, 1, 2])
    p.add_argument("--shares", type=float, nargs="+", default=[0.0, 0.2])
    p.add_argument("--work", default=os.path.join(ROOT, "runs", "exp"))
    p.add_argument("--data", default=os.path.join(ROOT, "runs", "qp2", "data"))
    args = p.parse_args(argv)
    if any(not 0.0 <= s < 1.0 for s in args.shares):
        p.error("--shares must be in [0, 1)")
    if not os.path.exists(os.path.join(args.data, "manifest.json")):
        p.error(f"--data {args.data}: not a prepared directory (python -m trainer.data prepare)")
    os.makedirs(args.work, exist_ok=True)
    systems: dict[str, list[dict]] = {}
    for share in args.shares:
        name = f"two_tower, --user-titles-only {share:g}" + (" (default)" if share == 0 else "")
        systems[name] = [two_tower(args, share, seed) for seed in args.seeds]
    systems["EASE fold-in (λ chosen on valid)"] = [evaluate(args, "ease", ["--baseline", "ease"])]
    result = {
        "seeds": args.seeds,
        "command": " ".join(sys.argv[1:] if argv is None else argv),
        "systems": systems,
    }
    with open(RESULTS + ".json", "w") as f:
        json.dump(result, f, indent=1)
    table = to_markdown(result)
    with open(RESULTS + ".md", "w") as f:
        f.write(table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
