"""Model cards: what a trained model or an export is, how it was measured, where it falls short.

Written as ``MODEL_CARD.md`` (for people) and ``model_card.json`` (the same facts, for tools):

* into every model dir, by ``trainer.task`` when training ends (validation figures) and again
  by ``trainer.evaluate --model-dir DIR --output FILE`` (test figures, beside every baseline
  report found in FILE's folder: the figures are stored in ``model_card.json`` and carried on);
* into every export version, under ``assets.extra/`` (TF Serving ignores that folder), by
  ``trainer.export``, from the model dir's card plus the index and its recall check.

Nothing here imports TensorFlow unless a path is remote (``gs://``).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping, Sequence
from typing import Any

from common import staging

CARD_MD = "MODEL_CARD.md"
CARD_JSON = "model_card.json"

PROTOCOLS = {
    "p1": "TFRS tutorials: a random 80/20 split of all ratings; every test rating is a query "
    "(built from the user's train ratings made before it); factorized top-k accuracy of its "
    "movie against the whole catalog, seen movies not removed; RMSE of the ranking head.",
    "p2": "RecBole's default: a random 80/10/10 split of each user's ratings; one query per "
    "user from the whole train part; every item ranked with the user's train (and, at test "
    "time, valid) items removed; every test rating relevant; per-user means.",
    "p3": "Cold-start items: 10% of movies and all their ratings kept out of training (their "
    "ratings split between valid and test); otherwise as p2.",
    "p4": "New users (strong generalisation): 10% of users kept out of training; each sends "
    "80% of their ratings as the query's history (fold-in) and is judged on the other 20%, "
    "with no user id.",
}

#: Figures shown in the card's tables, when the report has them.
CARD_METRICS = (
    "recall@10",
    "ndcg@10",
    "recall@20",
    "ndcg@20",
    "top_10_accuracy",
    "top_100_accuracy",
    "rmse",
    "cold_recall@10",
    "cold_share_of_top10",
    "coverage@10",
    "gini@10",
    "popularity_percentile@10",
)

INTENDED_USE = (
    "Candidate retrieval for movie recommendations: given a user's profile, typed text and the "
    "items they rated, return the top-k catalog items (TF Serving `serving_default`), to be "
    "re-ranked or filtered downstream. Trained and measured on MovieLens ratings only; not "
    "validated for other catalogs, for decisions about people, or as a rating predictor "
    "beyond the ranking head's RMSE shown here."
)


# --------------------------------------------------------------------------- files


def _is_remote(path: str) -> bool:
    return "://" in path


def _read_text(path: str) -> str | None:
    if _is_remote(path):
        import tensorflow as tf

        if not tf.io.gfile.exists(path):
            return None
        with tf.io.gfile.GFile(path) as f:
            return f.read()
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        return f.read()


def _read_json(path: str) -> Any:
    text = _read_text(path)
    if text is None:
        return None
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return None


# --------------------------------------------------------------------------- the facts


def _evaluation_row(report: Mapping[str, Any]) -> dict[str, Any]:
    metrics = report.get("metrics", {})
    row = {
        "scorer": report.get("scorer", "?"),
        "split": report.get("split"),
        "part": report.get("part", "test"),
        "metrics": {k: metrics[k] for k in CARD_METRICS if k in metrics},
    }
    config = report.get("scorer_config") or {}
    if "l2" in config:
        row["config"] = {"l2": config["l2"], "chosen_on": config.get("chosen_on")}
    exposure = report.get("exposure") or {}
    if exposure.get("popularity_deciles"):
        row["top_decile_share"] = exposure["popularity_deciles"][-1]
    return row


def _data_facts(data_dir: str, split: str) -> dict[str, Any]:
    manifest = _read_json(os.path.join(data_dir, "manifest.json")) if data_dir else None
    if not isinstance(manifest, dict):
        return {"data_dir": data_dir, "note": "manifest not readable from here"}
    entry = manifest.get("splits", {}).get(split, {})
    facts: dict[str, Any] = {
        "data_dir": data_dir,
        "dataset": manifest.get("dataset"),
        "seed": manifest.get("seed"),
        "counts": manifest.get("counts"),
        "parts": {p: v.get("examples") for p, v in entry.get("parts", {}).items()},
    }
    if entry.get("cold_items"):
        facts["cold_items"] = len(entry["cold_items"])
    if "heldout_users" in entry:
        facts["heldout_users"] = {k: len(v) for k, v in entry["heldout_users"].items()}
    return facts


def build_card(
    model_dir: str,
    evaluations: Sequence[Mapping[str, Any]] = (),
    export: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The card's facts from a model dir (``config.json``, ``metrics.json``, the data manifest).

    ``evaluations``: report rows (:func:`_evaluation_row`) of the model and its baselines;
    ``export``: the export's ``recall_check.json`` contents, for an export's card.
    """
    config = _read_json(os.path.join(model_dir, "config.json")) or {}
    trained = _read_json(os.path.join(model_dir, "metrics.json")) or {}
    model, data = config.get("model", {}), config.get("data", {})
    optim = config.get("optim", {})
    split = data.get("split", "?")
    best = trained.get("best") or {}
    prior = trained.get("popularity_prior") or {}
    card: dict[str, Any] = {
        "name": os.path.basename(os.path.normpath(model_dir)),
        "model_dir": model_dir,
        "written": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "model": {
            "kind": "two-tower retrieval (KerasHub BERT text encoder, TFRS tasks) + ranking head",
            **{
                k: model.get(k)
                for k in (
                    "preset",
                    "freeze_bert",
                    "cache_text",
                    "query_text",
                    "history",
                    "negatives",
                    "embedding_dim",
                    "use_text",
                    "use_side_features",
                    "use_id_embeddings",
                    "ranking_head",
                )
                if k in model
            },
        },
        "training": {
            "split": split,
            "protocol": PROTOCOLS.get(split, "unknown protocol"),
            "epochs_run": trained.get("epochs"),
            "epochs_max": optim.get("epochs"),
            "status": trained.get("status"),
            "seconds": trained.get("seconds"),
            "seed": optim.get("seed"),
            "best_epoch": best.get("epoch"),
            "valid": {k: best[k] for k in ("recall_at_10", "recall_at_50", "rmse") if k in best},
            "popularity_prior_weight": prior.get("weight"),
            "new_item_bias": prior.get("new_item_bias"),
            "content_prior": prior.get("content_prior"),
            "new_item_recall_share": (prior.get("new_item_recall_share") or {}).get("share"),
            "item_item_weight": (trained.get("item_item") or {}).get("weight"),
            "item_item_l2": (trained.get("item_item") or {}).get("l2"),
            "item_item_neighbours": (trained.get("item_item") or {}).get("new_item_neighbours"),
        },
        "data": _data_facts(data.get("data", ""), split),
        "evaluations": [dict(e) for e in evaluations],
        "intended_use": INTENDED_USE,
    }
    if export:
        card["export"] = dict(export)
    card["limits"] = known_limits(card)
    return card


def _prior_note(
    weight: float | None,
    bias: float | None = None,
    content: bool = False,
    cold_share: float | None = None,
) -> str:
    if weight is None:
        return ""
    note = f"; popularity prior weight {_fmt(weight)}"
    if bias:
        note += f", new-item bias {_fmt(bias)}"
    if content:
        note += ", unrated items' log counts guessed from genres and year"
    if cold_share:
        floor = f"new-item recall@10 at least {_fmt(cold_share)} x recall@10"
        return note + f" (chosen on valid recall@10, {floor})"
    return note + " (chosen on valid recall@10)"


def _item_item_note(weight: float | None, l2: float | None, neighbours: int | None) -> str:
    if weight is None:
        return ""
    if not weight:
        return "; item-item (EASE) term weight 0 (off)"
    fit = f"L2 {l2:g}" if l2 is not None else "not fit: no valid events"
    fill = f", unrated items from {neighbours} text neighbours" if neighbours else ""
    return f"; item-item (EASE, {fit}{fill}) term weight {_fmt(weight)}"


def known_limits(card: Mapping[str, Any]) -> list[str]:
    """Plain statements of where the model falls short, from the card's own figures."""
    limits = []
    evaluations = card.get("evaluations") or []
    model_rows = [e for e in evaluations if e.get("scorer") not in ("popularity", "ease")]
    baseline_rows = [e for e in evaluations if e.get("scorer") in ("popularity", "ease")]
    mine = model_rows[0] if model_rows else None
    if mine:
        m = mine["metrics"]
        key = "recall@10" if "recall@10" in m else "top_10_accuracy"
        for base in baseline_rows:
            theirs = base["metrics"].get(key)
            if theirs is not None and key in m and theirs > m[key]:
                limits.append(
                    f"The {base['scorer']} baseline beats this model on {mine['split']} "
                    f"{mine['part']} {key}: {theirs:.4f} against {m[key]:.4f}."
                )
        if "popularity_percentile@10" in m:
            share = mine.get("top_decile_share")
            text = (
                f"Popularity bias: the mean recommended item sits at the "
                f"{m['popularity_percentile@10']:.0f}th popularity percentile of the catalog"
            )
            if share is not None:
                text += f", and {share:.0%} of the top-10 slots go to the most-rated tenth"
            if "coverage@10" in m:
                text += f"; the top-10 lists cover {m['coverage@10']:.0%} of the catalog"
            limits.append(text + ".")
        if "cold_share_of_top10" in m:
            limits.append(
                f"Cold start (items nobody rated in training): {m['cold_share_of_top10']:.1%} "
                f"of top-10 slots go to them, cold recall@10 {m.get('cold_recall@10', 0):.4f}; "
                "only the text towers can place them at all."
            )
    if not any("Cold start" in x for x in limits):
        limits.append(
            "Cold start: items and users unseen in training are placed by their text, side "
            "features and history alone; measure them with the p3 (new items) and p4 (new "
            "users) protocols before relying on it."
        )
    if not evaluations:
        limits.append(
            "No test-set evaluation recorded yet: run `python -m trainer.evaluate --model-dir "
            "DIR --output FILE.json` (with the baselines in the same folder) to add one."
        )
    limits.append(
        "MovieLens users and tastes only (US, 1990s for ML-100K). The figures are from one seed: "
        "on ML-100K p2, three seeds of one configuration spread over 0.244-0.252 test "
        "recall@10, as large as many gaps between settings."
    )
    return limits


# --------------------------------------------------------------------------- Markdown


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4f}"
    return "–" if value is None else str(value)


def _seconds(value: Any) -> str:
    return f"{value:.0f} s" if isinstance(value, int | float) else "– s"


def render_markdown(card: Mapping[str, Any]) -> str:
    training, data, model = card["training"], card["data"], card["model"]
    lines = [
        f"# Model card: {card['name']}",
        "",
        f"Written {card['written']} from `{card['model_dir']}`.",
        "",
        "## Model",
        "",
        *(f"- {k}: `{_fmt(v)}`" for k, v in model.items()),
        "",
        "## Data and protocol",
        "",
        f"- data: `{data.get('data_dir') or '?'}` ({data.get('dataset', '?')}, seed "
        f"{data.get('seed', '?')}, counts {data.get('counts', '?')})",
        f"- split `{training['split']}`: {training['protocol']}",
    ]
    if data.get("parts"):
        lines.append("- parts: " + ", ".join(f"{p} {n:,}" for p, n in data["parts"].items()))
    if data.get("cold_items"):
        lines.append(f"- cold items held out of training: {data['cold_items']}")
    if data.get("heldout_users"):
        lines.append(f"- new users held out of training: {data['heldout_users']}")
    lines += [
        f"- training: {_fmt(training.get('epochs_run'))} of at most "
        f"{_fmt(training.get('epochs_max'))} epochs ({_fmt(training.get('status'))}, "
        f"{_seconds(training.get('seconds'))}, seed {_fmt(training.get('seed'))}); best valid "
        f"epoch {_fmt(training.get('best_epoch'))}: "
        + (", ".join(f"{k} {_fmt(v)}" for k, v in training.get("valid", {}).items()) or "–")
        + _prior_note(
            training.get("popularity_prior_weight"),
            training.get("new_item_bias"),
            bool(training.get("content_prior")),
            training.get("new_item_recall_share"),
        )
        + _item_item_note(
            training.get("item_item_weight"),
            training.get("item_item_l2"),
            training.get("item_item_neighbours"),
        ),
        "",
        "## Figures",
        "",
    ]
    evaluations = card.get("evaluations") or []
    if evaluations:
        columns = [k for k in CARD_METRICS if any(k in e["metrics"] for e in evaluations)]
        lines.append("| system | split, part | " + " | ".join(columns) + " |")
        lines.append("| --- | --- |" + " --- |" * len(columns))
        for e in evaluations:
            name = e["scorer"] + (f" (λ {e['config']['l2']:g})" if e.get("config") else "")
            cells = [_fmt(e["metrics"].get(k)) for k in columns]
            lines.append(f"| {name} | {e['split']} {e['part']} | " + " | ".join(cells) + " |")
    else:
        lines.append("No test-set evaluation recorded yet (validation figures above).")
    if card.get("export"):
        export = card["export"]
        index = export.get("index", {})
        lines += [
            "",
            "## Export",
            "",
            f"- version {_fmt(export.get('version'))}, {_fmt(export.get('num_items'))} items, "
            f"index `{index.get('kind', '?')}` (max k {index.get('max_k', '?')}), recall@10 "
            f"against brute force {_fmt(export.get('recall_at_10_vs_brute_force'))}",
            "- signatures: `serving_default` (retrieve top-k), `rank`, `query_embedding`, "
            "`candidate_embedding`; inputs are raw strings (tokenised in the graph)",
        ]
    lines += ["", "## Intended use", "", card["intended_use"], "", "## Known limits", ""]
    lines += [f"- {x}" for x in card["limits"]]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- writers


def write_card(directory: str, card: Mapping[str, Any]) -> str:
    """Writes ``MODEL_CARD.md`` and ``model_card.json`` into ``directory``; returns the .md."""
    staging.write_json(os.path.join(directory, CARD_JSON), card)
    path = os.path.join(directory, CARD_MD)
    staging.write_text(path, render_markdown(card))
    return path


def stored_evaluations(directory: str) -> list[dict]:
    """The evaluation rows a previous card in ``directory`` recorded."""
    card = _read_json(os.path.join(directory, CARD_JSON))
    return list(card.get("evaluations") or []) if isinstance(card, dict) else []


def write_model_dir_card(model_dir: str) -> str:
    """The card of a freshly trained model dir (keeps evaluations a previous card recorded)."""
    return write_card(model_dir, build_card(model_dir, stored_evaluations(model_dir)))


def refresh_model_dir_card(model_dir: str, report_json: str) -> str:
    """Adds the report at ``report_json`` and the baselines beside it to the model dir's card.

    Rows of the same scorer, split and part replace older ones.
    """
    from trainer import plots

    report = plots.read_report(report_json)
    rows = [_evaluation_row(report)]
    rows += [_evaluation_row(r) for r in plots.sibling_reports(report_json, report)]
    fresh = {(r["scorer"], r["split"], r["part"]) for r in rows}
    kept = [
        r
        for r in stored_evaluations(model_dir)
        if (r.get("scorer"), r.get("split"), r.get("part")) not in fresh
    ]
    return write_card(model_dir, build_card(model_dir, [*rows, *kept]))


def write_export_card(extra_dir: str, export_info: Mapping[str, Any]) -> str:
    """The card of an export version, into its ``assets.extra`` folder.

    ``export_info``: what ``recall_check.json`` holds (``model_dir`` among it).
    """
    model_dir = str(export_info.get("model_dir") or "")
    card = build_card(model_dir, stored_evaluations(model_dir), export=export_info)
    return write_card(extra_dir, card)
