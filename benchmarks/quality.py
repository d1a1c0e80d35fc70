"""Quality benchmark: the default model and the baselines on MovieLens-100K under p1-p4.

Every system is trained (where it trains) on the split's train part, chosen on its valid part,
and scored by ``trainer.evaluate`` on its test part: the same harness, the same protocol.

    python benchmarks/quality.py [--splits p1 p2 p3 p4] [--seeds 42 1 2]
                                 [--systems two_tower id_only popularity ease]
                                 [--work runs/quality] [--train-flags "--epochs 6"] [--name quality]

* Trained systems (``two_tower``, ``id_only``) are trained once per seed of ``--seeds``; their
  figures are the mean over seeds, with the standard deviation and the min-max printed.
* Baselines (``popularity``, ``ease``) do not depend on a training seed and run once; EASE's
  L2 weight is chosen on the valid part (``trainer.evaluate --baseline ease``).
* The data is prepared once with ``--data-seed`` (the split itself stays fixed across seeds).

Writes ``benchmarks/results/NAME.json`` and ``NAME.md`` (the README's table; ``--name quality``
by default, so a partial run can go to its own file), with every seed's report, each system's
configuration and the wall times; the last table checks issue 11's targets. On the per-user
protocols a paired table compares ours with every other system user by user (the mean
difference of recall@10 and NDCG@10, its standard error and 95% interval): whether a gap is
more than the users' spread explains (p4 has 47 test users).

``--reuse-models`` evaluates the model dirs a previous run left in ``--work`` instead of
training them again (same flags assumed; their training seconds come from their
``metrics.json``): to add figures the evaluation gained without hours of training.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shlex
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "benchmarks", "results")
sys.path.insert(0, ROOT)

SPLITS = ("p1", "p2", "p3", "p4")
#: Extra ``trainer.task`` flags of each trained system (on top of the defaults); ``None``: a
#: baseline of ``trainer.evaluate --baseline NAME`` (not trained, no seed).
SYSTEMS: dict[str, list[str] | None] = {
    "two_tower": [],  # the default: frozen MiniLM towers, history encoder, ids, DCN head
    # The same TFRS tasks over ids alone (user, item, history ids): no BERT, no side features.
    "id_only": ["--no-use-text", "--no-use-side-features"],
    "popularity": None,
    "ease": None,  # closed-form item-item model, L2 weight chosen on valid
}
#: The system the targets are about.
OURS = "two_tower"

#: Published figures on the same protocols (see the README for sources).
ANCHORS = {
    ("p1", "top_100_accuracy"): "TFRS basic 0.23, deep ~0.29",
    ("p1", "rmse"): "TFRS multitask 1.11, DCN 0.933; SVD 0.934, SVD++ 0.919",
    ("p2", "recall@10"): "RecBole BPR 0.247, ItemKNN 0.247, Pop 0.084",
    ("p2", "ndcg@10"): "RecBole BPR 0.293, ItemKNN 0.283, Pop 0.101",
    ("p3", "cold_recall@10"): "popularity, ID-only and EASE cannot see these movies",
    ("p4", "recall@10"): "EASE fold-in (Steck 2019: ML-20M strong generalisation)",
    ("p4", "ndcg@10"): "EASE fold-in",
}


@dataclasses.dataclass(frozen=True)
class Target:
    """One of issue 11's targets on ``OURS``'s mean test figure.

    ``floor``: at least this value (``ceiling``: at most); ``above``: strictly above this
    system's figure on the same split; ``ratio_of``: at least ``floor`` x this metric of the
    same system (p3: cold recall against warm recall).
    """

    split: str
    metric: str
    floor: float | None = None
    ceiling: float | None = None
    above: str | None = None
    ratio_of: str | None = None

    def check(self, rows: dict) -> tuple[str, bool]:
        """(target text, met) against ``rows`` = one split's ``{system: entry}``."""
        ours = _metric(rows, OURS, self.metric)
        texts, met = [], ours is not None
        if self.ratio_of is not None:
            base = _metric(rows, OURS, self.ratio_of)
            need = None if base is None else self.floor * base
            texts.append(f"≥ {self.floor:g} × {self.ratio_of} ({fmt(need)})")
            met = met and need is not None and ours >= need
        elif self.floor is not None:
            texts.append(f"≥ {self.floor:g}")
            met = met and ours >= self.floor
        if self.ceiling is not None:
            texts.append(f"≤ {self.ceiling:g}")
            met = met and ours <= self.ceiling
        if self.above is not None:
            other = _metric(rows, self.above, self.metric)
            texts.append(f"> {self.above} ({fmt(other)})")
            met = met and other is not None and ours > other
        return " and ".join(texts), bool(met)


#: Issue 11, "Targets" (test parts, mean of the seeds).
TARGETS = (
    Target("p1", "top_100_accuracy", floor=0.65),
    Target("p1", "rmse", ceiling=0.89),
    Target("p2", "recall@10", floor=0.29, above="ease"),
    Target("p2", "ndcg@10", floor=0.34, above="ease"),
    Target("p3", "cold_recall@10", floor=0.5, ratio_of="recall@10"),
    Target("p4", "recall@10", above="ease"),
    Target("p4", "ndcg@10", above="ease"),
)

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
    "p4": ["recall@10", "ndcg@10", "mrr@10", "hit@10", "coverage@10"],
}
PROTOCOLS = {
    "p1": "TFRS: random 80/20, seen items kept",
    "p2": "RecBole: per-user 80/10/10, full ranking, seen removed",
    "p3": "cold start: 10% of movies held out of training",
    "p4": "new users: 10% of users held out of training, 80% of their ratings folded in",
}


def _metric(rows: dict, system: str, metric: str) -> float | None:
    value = rows.get(system, {}).get("metrics", {}).get(metric)
    return None if value is None or (isinstance(value, float) and np.isnan(value)) else value


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
            if " INFO " in line or line.startswith(("error", "|", "L2 weight")):
                print("   ", line.rstrip(), flush=True)
        if proc.wait() != 0:
            raise SystemExit(f"failed ({proc.returncode}): see {log_path}")
    return time.time() - start


def evaluate(
    work: str, data: str, split: str, tag: str, source: list[str], mmr: bool = True
) -> dict:
    """``trainer.evaluate`` on the test part; ``source``: ``--model-dir D`` or ``--baseline B``."""
    out = os.path.join(work, f"eval_{tag}_{split}.json")
    cmd = [sys.executable, "-m", "trainer.evaluate", "--data", data, "--split", split, *source]
    seconds = run([*cmd, *([] if mmr else ["--no-mmr"]), "--output", out], out + ".log")
    with open(out) as f:
        report = json.load(f)
    report["eval_seconds"] = round(seconds, 1)
    return report


def aggregate(per_seed: dict[int, dict]) -> dict:
    """Mean over seeds of every numeric figure, with its spread.

    ``per_seed``: seed -> evaluate report. Returns ``{"metrics": mean, "spread": {metric:
    {"std", "min", "max"}}, "seeds": [...], "per_seed": per_seed}`` (``std`` with ``ddof=1``;
    0 for a single seed).
    """
    if not per_seed:
        raise ValueError("no seed to aggregate")
    reports = list(per_seed.values())
    names = [k for k, v in reports[0]["metrics"].items() if isinstance(v, int | float)]
    mean, spread = {}, {}
    for name in names:
        values = np.array([r["metrics"][name] for r in reports if name in r["metrics"]], float)
        mean[name] = float(values.mean())
        spread[name] = {
            "std": float(values.std(ddof=1)) if len(values) > 1 else 0.0,
            "min": float(values.min()),
            "max": float(values.max()),
        }
    train = [r["train_seconds"] for r in reports if r.get("train_seconds") is not None]
    return {
        "metrics": mean,
        "spread": spread,
        "seeds": list(per_seed),
        "train_seconds": round(float(np.mean(train)), 1) if train else None,
        "per_seed": {str(s): r for s, r in per_seed.items()},
    }


def fmt(value: object) -> str:
    return f"{value:.4f}" if isinstance(value, float) else ("–" if value is None else str(value))


def _cell(entry: dict, metric: str) -> str:
    """``mean ± std`` for a system run over several seeds, the plain figure otherwise."""
    value = entry.get("metrics", {}).get(metric)
    spread = entry.get("spread", {}).get(metric)
    if value is None or spread is None or len(entry.get("seeds", [])) < 2:
        return fmt(value)
    return f"{value:.4f} ± {spread['std']:.4f}"


def _range(entry: dict, metric: str) -> str:
    spread = entry.get("spread", {}).get(metric)
    if spread is None or len(entry.get("seeds", [])) < 2:
        return ""
    return f" ({spread['min']:.4f}–{spread['max']:.4f})"


def _seconds(value: float | None) -> str:
    return "–" if value is None else f"{value:.0f}"


def markdown(results: dict) -> str:
    """The README's tables: one per protocol, then the targets."""
    seeds = results.get("seeds", [results.get("seed")])
    lines = [
        f"Test parts; trained systems: mean ± std over seeds {', '.join(map(str, seeds))} "
        "(min–max in the targets table); baselines are deterministic (one run).\n"
    ]
    for split, rows in results["splits"].items():
        columns = COLUMNS[split]
        lines.append(f"**{split}** ({results['protocols'][split]})\n")
        lines.append("| system | " + " | ".join(columns) + " | train s |")
        lines.append("|" + " --- |" * (len(columns) + 2))
        for system, entry in rows.items():
            note = ""
            if entry.get("scorer_config", {}).get("l2") is not None:
                note = f" (λ {entry['scorer_config']['l2']:g})"
            weights = _prior_weights(entry)
            if weights:
                note = f" (prior weight {weights})"
            lines.append(
                f"| {system}{note} | "
                + " | ".join(_cell(entry, c) for c in columns)
                + f" | {_seconds(entry.get('train_seconds'))} |"
            )
        lines.append("")
        paired = results.get("paired", {}).get(split)
        if paired:
            metrics = [m for m in paired[0] if m != "system"]
            lines.append(
                f"Paired, {OURS} − each system on the users both scored (mean ± standard "
                "error, 95% interval):\n"
            )
            lines.append("| against | users | " + " | ".join(metrics) + " |")
            lines.append("|" + " --- |" * (len(metrics) + 2))
            for row in paired:
                cells = " | ".join(_paired_cell(row[m]) for m in metrics)
                lines.append(f"| {row['system']} | {row[metrics[0]]['n']} | {cells} |")
            lines.append("")
    lines.append(f"| protocol | figure | anchor | target | ours ({OURS}) | met |")
    lines.append("| --- | --- | --- | --- | --- | --- |")
    for target in TARGETS:
        rows = results["splits"].get(target.split)
        if rows is None:
            continue
        text, met = target.check(rows)
        ours = rows.get(OURS, {})
        lines.append(
            f"| {target.split} | {target.metric} | "
            f"{ANCHORS.get((target.split, target.metric), '')} | {text} | "
            f"{_cell(ours, target.metric)}{_range(ours, target.metric)} | "
            f"{'yes' if met else ('–' if not ours else 'no')} |"
        )
    return "\n".join(lines) + "\n"


def _prior_weights(entry: dict) -> str:
    """The popularity-prior weight each seed chose on valid, ``"0.05 / 0.04"``, with the
    new-item bias where one was chosen, "content" where the unrated items' log counts are
    the genres-and-year guess and the valid new-item share under ``--new-item-recall-share``
    (``"0.02, b 0.05, content, new-item share 0.52 / ..."``), or ``""``."""
    chosen = [
        report.get("train", {}).get("popularity_prior") or {}
        for report in entry.get("per_seed", {}).values()
    ]
    return " / ".join(
        f"{c['weight']:g}"
        + (f", b {c['new_item_bias']:g}" if c.get("new_item_bias") else "")
        + (", content" if c.get("content_prior") else "")
        + _share_note(c.get("new_item_recall_share"))
        for c in chosen
        if c.get("weight") is not None
    )


def _share_note(policy: dict | None) -> str:
    if not policy:
        return ""
    return f", new-item share {policy['valid_ratio']:.2f}" + ("" if policy["met"] else " (short)")


def _needs_prepare(data: str, splits: list[str]) -> bool:
    """No data yet, or data prepared before some requested protocol existed."""
    path = os.path.join(data, "manifest.json")
    if not os.path.exists(path):
        return True
    with open(path) as f:
        prepared = json.load(f).get("splits", {})
    return any(s not in prepared for s in splits) or (
        "p4" in splits and "heldout_users" not in prepared["p4"]
    )


def prepare(work: str, data: str, seed: int, overwrite: bool) -> None:
    cmd = [sys.executable, "-m", "trainer.data", "prepare", "--dataset", "ml-100k"]
    cmd += ["--output", data, "--seed", str(seed), *(["--overwrite"] if overwrite else [])]
    run(cmd, os.path.join(work, "prepare.log"))


def train(
    work: str,
    data: str,
    split: str,
    system: str,
    seed: int,
    extra: list[str],
    reuse: bool = False,
) -> dict:
    """Trains ``system`` on ``split`` with ``seed`` (``reuse``: takes the finished model dir a
    previous run left, if any); returns its test report with the config."""
    model_dir = os.path.join(work, f"{system}_{split}_s{seed}")
    cmd = [sys.executable, "-m", "trainer.task", "--data", data, "--split", split]
    cmd += ["--model-dir", model_dir, "--no-progress", "--seed", str(seed)]
    cmd += [*SYSTEMS[system], *extra]
    trained = _finished(model_dir) if reuse else None
    if trained is None:
        subprocess.run(["rm", "-rf", model_dir, model_dir + "-checkpoints"], check=True)
        train_seconds = round(run(cmd, model_dir + ".log"), 1)
    else:
        print(f"reusing {model_dir} (trained in {trained.get('seconds')} s)", flush=True)
        train_seconds = trained.get("seconds")
    report = evaluate(work, data, split, f"{system}_s{seed}", ["--model-dir", model_dir])
    report["train_seconds"] = train_seconds
    with open(os.path.join(model_dir, "config.json")) as f:
        report["train"] = {"flags": cmd[3:], "config": json.load(f), "reused": trained is not None}
    with open(os.path.join(model_dir, "metrics.json")) as f:
        trained = json.load(f)
    # The valid figures the model was chosen on: best epoch, and the prior's weight curve.
    report["train"]["best"] = trained.get("best")
    report["train"]["popularity_prior"] = trained.get("popularity_prior")
    return report


def _finished(model_dir: str) -> dict | None:
    """The ``metrics.json`` of a model dir whose training ended as its flags said (all epochs,
    early stopping or ``--max-steps``; not an interrupted run), else None."""
    try:
        with open(os.path.join(model_dir, "metrics.json")) as f:
            trained = json.load(f)
    except (OSError, json.JSONDecodeError):
        return None
    return trained if trained.get("status") in _DONE else None


#: ``metrics.json`` statuses of a training that ran to its end (:mod:`trainer.loop`).
_DONE = ("finished", "early_stopped", "max_steps")


def _user_figures(entry: dict, metric: str) -> dict[str, float]:
    """User id -> ``metric`` of one system's entry, the mean over its seeds' reports."""
    reports = list(entry.get("per_seed", {}).values()) or [entry]
    sums: dict[str, list[float]] = {}
    for report in reports:
        per_user = report.get("per_user") or {}
        for user, value in zip(per_user.get("user_id", []), per_user.get(metric, []), strict=True):
            sums.setdefault(user, []).append(value)
    return {u: float(np.mean(v)) for u, v in sums.items() if len(v) == len(reports)}


def paired_rows(rows: dict) -> list[dict]:
    """Ours against every other system of one split, user by user: per metric the mean of
    ``ours - other`` over the users both scored, its standard error and 95% interval
    (:func:`trainer.metrics.paired_difference`; a trained system's figure is its seeds' mean).
    A system without per-user figures (a report written before they existed) is left out;
    ``[]`` when none has them (p1)."""
    from trainer.evaluate import PAIRED_METRICS
    from trainer.metrics import paired_difference

    if OURS not in rows:
        return []
    out = []
    for system, entry in rows.items():
        if system == OURS:
            continue
        row: dict = {"system": system}
        for metric in PAIRED_METRICS:
            ours, other = _user_figures(rows[OURS], metric), _user_figures(entry, metric)
            users = sorted(set(ours) & set(other))
            row[metric] = paired_difference([ours[u] for u in users], [other[u] for u in users])
        if row[PAIRED_METRICS[0]]["n"]:
            out.append(row)
    return out


def _drop_per_user(rows: dict) -> None:
    """Leaves the per-user lists out of the stored reports (the paired rows keep what they
    say; the lists are in each ``eval_*.json`` of ``--work``)."""
    for entry in rows.values():
        for report in [entry, *entry.get("per_seed", {}).values()]:
            report.pop("per_user", None)


def _paired_cell(figure: dict) -> str:
    """``+0.0020 ± 0.0040 (−0.0058 … +0.0098), level``: above / below when the 95% interval
    leaves out 0."""
    verdict = "above" if figure["low"] > 0 else "below" if figure["high"] < 0 else "level"
    return (
        f"{figure['mean']:+.4f} ± {figure['se']:.4f} "
        f"({figure['low']:+.4f} … {figure['high']:+.4f}), {verdict}"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--work", default=os.path.join(ROOT, "runs", "quality"))
    parser.add_argument("--splits", nargs="+", default=list(SPLITS), choices=list(SPLITS))
    parser.add_argument("--systems", nargs="+", default=list(SYSTEMS), choices=list(SYSTEMS))
    parser.add_argument("--train-flags", default="", help="extra trainer.task flags for all")
    parser.add_argument(
        "--seeds", nargs="+", type=int, default=[42, 1, 2], help="training seeds (mean, spread)"
    )
    parser.add_argument("--data-seed", type=int, default=42, help="seed of the prepared splits")
    parser.add_argument(
        "--reprepare", action="store_true", help="prepare the data again even if present"
    )
    parser.add_argument(
        "--name", default="quality", help="results file stem under benchmarks/results/"
    )
    parser.add_argument("--table-only", action="store_true", help="rewrite NAME.md from NAME.json")
    parser.add_argument(
        "--reuse-models",
        action="store_true",
        help="evaluate the finished model dirs already in --work instead of training them",
    )
    return parser


def _write(name: str, results: dict) -> str:
    os.makedirs(RESULTS, exist_ok=True)
    table = markdown(results)
    with open(os.path.join(RESULTS, f"{name}.json"), "w") as f:
        json.dump(results, f, indent=2)
    with open(os.path.join(RESULTS, f"{name}.md"), "w") as f:
        f.write(table)
    return table


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if not args.name or os.sep in args.name or args.name.startswith("."):
        raise SystemExit(f"--name must be a plain file stem, got {args.name!r}")
    if len(set(args.seeds)) != len(args.seeds):
        raise SystemExit(f"--seeds must be distinct, got {args.seeds}")
    if args.table_only:
        with open(os.path.join(RESULTS, f"{args.name}.json")) as f:
            results = json.load(f)
        print(_write(args.name, results))
        return
    os.makedirs(args.work, exist_ok=True)
    data = os.path.join(args.work, "data")
    start = time.time()
    if args.reprepare or _needs_prepare(data, args.splits):
        prepare(args.work, data, args.data_seed, overwrite=os.path.exists(data))
    with open(os.path.join(data, "manifest.json")) as f:
        manifest = json.load(f)
    results: dict = {
        "dataset": "ml-100k",
        "data_seed": args.data_seed,
        "data_created": manifest.get("created"),
        "seeds": args.seeds,
        "systems": {},
        "splits": {},
        "protocols": {s: PROTOCOLS[s] for s in args.splits},
    }
    extra = shlex.split(args.train_flags)
    for split in args.splits:
        results["splits"][split] = {}
        for system in args.systems:
            if SYSTEMS[system] is None:
                entry = evaluate(args.work, data, split, system, ["--baseline", system])
                entry["train_seconds"] = None
            else:
                per_seed = {
                    s: train(args.work, data, split, system, s, extra, args.reuse_models)
                    for s in args.seeds
                }
                entry = aggregate(per_seed)
                results["systems"][f"{system}/{split}"] = per_seed[args.seeds[0]]["train"]
            results["splits"][split][system] = entry
            print(
                f"{split} {system}: "
                + ", ".join(f"{k} {_cell(entry, k)}" for k in COLUMNS[split][:4]),
                flush=True,
            )
        paired = paired_rows(results["splits"][split])
        if paired:
            results.setdefault("paired", {})[split] = paired
        _drop_per_user(results["splits"][split])
    results["wall_seconds"] = round(time.time() - start, 1)
    results["cpu_cores"] = os.cpu_count()
    print(_write(args.name, results))
    for path in _write_figures(args.work, args.name, args.splits):
        print(f"wrote {path}")


def _write_figures(work: str, name: str, splits: list[str]) -> list[str]:
    """The figures as pictures too: recall/NDCG@k and exposure of every system, per protocol
    (``benchmarks/results/<name>_<split>.{ranking,exposure}.png``), from the reports in ``work``."""
    from trainer import plots

    paths = []
    for split in splits:
        names = sorted(
            f for f in os.listdir(work) if f.startswith("eval_") and f.endswith(f"_{split}.json")
        )
        reports = [plots.read_report(os.path.join(work, f)) for f in names]
        if reports:
            target = os.path.join(RESULTS, f"{name}_{split}.json")
            paths += plots.write_report_plots(reports[0], target, others=reports[1:])
    return paths


if __name__ == "__main__":
    main()
