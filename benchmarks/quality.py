"""Quality benchmark: the default model and the baselines on MovieLens-100K under p1, p2 and p3.

Every system is trained (where it trains) on the split's train part, chosen on its valid part,
and scored by ``trainer.evaluate`` on its test part: the same harness, the same protocol.

    python benchmarks/quality.py [--splits p1 p2 p3] [--systems two_tower id_only popularity]
                                 [--work runs/quality] [--train-flags "--epochs 6"]

Writes ``benchmarks/results/quality.json`` and ``quality.md`` (the README's table), with the
seed, each system's configuration and the wall times.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "benchmarks", "results")
sys.path.insert(0, ROOT)

#: Extra ``trainer.task`` flags of each trained system (on top of the defaults).
SYSTEMS = {
    "two_tower": [],  # the default: frozen MiniLM towers, history encoder, ids, DCN head
    # The same TFRS tasks over ids alone (user, item, history ids): no BERT, no side features.
    "id_only": ["--no-use-text", "--no-use-side-features"],
    "popularity": None,  # not trained
}

#: Published figures on the same protocols (see the README for sources).
ANCHORS = {
    ("p1", "top_100_accuracy"): ("TFRS basic 0.23, deep ~0.29", 0.32),
    ("p1", "rmse"): ("TFRS multitask 1.11, DCN 0.933; SVD 0.934, SVD++ 0.919", 0.91),
    ("p2", "recall@10"): ("RecBole BPR 0.247, ItemKNN 0.247, Pop 0.084", 0.26),
    ("p2", "ndcg@10"): ("RecBole BPR 0.293, ItemKNN 0.283, Pop 0.101", 0.31),
    ("p3", "cold_recall@10"): ("popularity and ID-only cannot see these movies", None),
}
COLUMNS = {
    "p1": [
        "top_10_accuracy",
        "top_50_accuracy",
        "top_100_accuracy",
        "rmse",
        "coverage@10",
        "gini@10",
        "popularity_percentile@10",
    ],
    "p2": [
        "recall@10",
        "ndcg@10",
        "mrr@10",
        "hit@10",
        "precision@10",
        "recall@20",
        "ndcg@20",
        "coverage@10",
        "gini@10",
        "intra_list_diversity@10",
        "popularity_percentile@10",
    ],
    "p3": [
        "recall@10",
        "ndcg@10",
        "cold_recall@10",
        "cold_ndcg@10",
        "cold_share_of_top10",
        "coverage@10",
        "intra_list_diversity@10",
    ],
}


def run(cmd: list[str], log_path: str) -> float:
    """Runs a command, teeing its output to ``log_path``; returns its wall time."""
    start = time.time()
    print("$", " ".join(shlex.quote(c) for c in cmd), flush=True)
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        for line in proc.stdout:
            log.write(line)
            if " INFO " in line or line.startswith(("error", "|")):
                print("   ", line.rstrip(), flush=True)
        if proc.wait() != 0:
            raise SystemExit(f"failed ({proc.returncode}): see {log_path}")
    return time.time() - start


def evaluate(work: str, data: str, split: str, system: str, model_dir: str | None) -> dict:
    out = os.path.join(work, f"eval_{system}_{split}.json")
    source = ["--baseline", "popularity"] if model_dir is None else ["--model-dir", model_dir]
    seconds = run(
        [
            sys.executable,
            "-m",
            "trainer.evaluate",
            "--data",
            data,
            "--split",
            split,
            *source,
            "--output",
            out,
        ],
        out + ".log",
    )
    with open(out) as f:
        report = json.load(f)
    report["eval_seconds"] = round(seconds, 1)
    return report


def fmt(value: object) -> str:
    return f"{value:.4f}" if isinstance(value, float) else ("–" if value is None else str(value))


def _seconds(value: float | None) -> str:
    return "–" if value is None else f"{value:.0f}"


def markdown(results: dict) -> str:
    lines = []
    for split, rows in results["splits"].items():
        columns = COLUMNS[split]
        lines.append(f"**{split}** ({results['protocols'][split]})\n")
        lines.append("| system | " + " | ".join(columns) + " | train s |")
        lines.append("|" + " --- |" * (len(columns) + 2))
        for system, report in rows.items():
            m = report["metrics"]
            lines.append(
                f"| {system} | "
                + " | ".join(fmt(m.get(c)) for c in columns)
                + f" | {_seconds(report.get('train_seconds'))} |"
            )
        lines.append("")
    lines.append("| protocol | figure | anchor | target | ours (two_tower) | met |")
    lines.append("| --- | --- | --- | --- | --- | --- |")
    for (split, metric), (anchor, target) in ANCHORS.items():
        rows = results["splits"].get(split, {})
        ours = rows.get("two_tower", {}).get("metrics", {}).get(metric)
        if target is None:
            others = [
                rows.get(s, {}).get("metrics", {}).get(metric) for s in ("popularity", "id_only")
            ]
            met = ours is not None and all(o is not None and ours > o for o in others)
            target_text = "above both: " + ", ".join(fmt(o) for o in others)
        else:
            lower_is_better = metric == "rmse"
            met = ours is not None and (ours <= target if lower_is_better else ours >= target)
            target_text = ("≤ " if lower_is_better else "≥ ") + str(target)
        lines.append(
            f"| {split} | {metric} | {anchor} | {target_text} | {fmt(ours)} | "
            f"{'yes' if met else 'no'} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--work", default=os.path.join(ROOT, "runs", "quality"))
    parser.add_argument("--splits", nargs="+", default=["p1", "p2", "p3"])
    parser.add_argument("--systems", nargs="+", default=list(SYSTEMS), choices=list(SYSTEMS))
    parser.add_argument("--train-flags", default="", help="extra trainer.task flags for all")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument(
        "--table-only", action="store_true", help="rewrite quality.md from quality.json"
    )
    args = parser.parse_args()
    if args.table_only:
        with open(os.path.join(RESULTS, "quality.json")) as f:
            table = markdown(json.load(f))
        with open(os.path.join(RESULTS, "quality.md"), "w") as f:
            f.write(table)
        print(table)
        return
    os.makedirs(args.work, exist_ok=True)
    data = os.path.join(args.work, "data")
    start = time.time()
    if not os.path.exists(os.path.join(data, "manifest.json")):
        run(
            [
                sys.executable,
                "-m",
                "trainer.data",
                "prepare",
                "--dataset",
                "ml-100k",
                "--output",
                data,
                "--seed",
                str(args.seed),
            ],
            os.path.join(args.work, "prepare.log"),
        )
    results: dict = {
        "dataset": "ml-100k",
        "seed": args.seed,
        "systems": {},
        "splits": {},
        "protocols": {
            "p1": "TFRS: random 80/20, seen items kept",
            "p2": "RecBole: per-user 80/10/10, full ranking, seen removed",
            "p3": "cold start: 10% of movies held out of training",
        },
    }
    for split in args.splits:
        results["splits"][split] = {}
        for system in args.systems:
            flags = SYSTEMS[system]
            model_dir, train_seconds = None, None
            if flags is not None:
                model_dir = os.path.join(args.work, f"{system}_{split}")
                subprocess.run(["rm", "-rf", model_dir, model_dir + "-checkpoints"], check=True)
                cmd = [
                    sys.executable,
                    "-m",
                    "trainer.task",
                    "--data",
                    data,
                    "--split",
                    split,
                    "--model-dir",
                    model_dir,
                    "--no-progress",
                    "--seed",
                    str(args.seed),
                    *flags,
                    *shlex.split(args.train_flags),
                ]
                train_seconds = round(run(cmd, model_dir + ".log"), 1)
                with open(os.path.join(model_dir, "config.json")) as f:
                    results["systems"][f"{system}/{split}"] = {
                        "flags": cmd[3:],
                        "config": json.load(f),
                    }
            report = evaluate(args.work, data, split, system, model_dir)
            report["train_seconds"] = train_seconds
            results["splits"][split][system] = report
            print(
                f"{split} {system}: "
                + ", ".join(f"{k} {fmt(report['metrics'].get(k))}" for k in COLUMNS[split][:4]),
                flush=True,
            )
    results["wall_seconds"] = round(time.time() - start, 1)
    results["cpu_cores"] = os.cpu_count()
    os.makedirs(RESULTS, exist_ok=True)
    with open(os.path.join(RESULTS, "quality.json"), "w") as f:
        json.dump(results, f, indent=2)
    table = markdown(results)
    with open(os.path.join(RESULTS, "quality.md"), "w") as f:
        f.write(table)
    print(table)


if __name__ == "__main__":
    main()
