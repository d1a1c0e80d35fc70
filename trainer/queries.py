"""Query rows of named users, read from prepared data: what a client sends for them.

    python -m trainer.queries --data runs/demo/data --split p2 --users 1 405 --output q.json
    python -m serving.client --server 127.0.0.1:8500 --model-name movielens --query-json q.json

Each row is one user's query features as the serving contract names them
(:data:`common.contract.QUERY_FEATURES`: profile and typed text; ``history``: the train
history, most recent first) plus ``exclude_item_ids``: the user's train items, which
``serving.client`` excludes from that row's top-k. Serving reads these rows as plain JSON, so
it never needs the trainer's data code.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

from common import contract
from common.cli import UsageError, run
from common.staging import write_json

#: The per-row field ``serving.client --query-json`` passes as the retrieve signature's input.
EXCLUDE = "exclude_item_ids"


def query_rows(data_dir: str, split: str, users: Sequence[str]) -> list[dict[str, Any]]:
    """Each user's query (profile + train history) and train items, from prepared data.

    Args:
      data_dir: a prepared data directory (``python -m trainer.data prepare``).
      split: the protocol whose train part builds the history (``p2``, ...).
      users: user ids, in the order the rows come back.

    Returns:
      One JSON-ready dict per user: the :data:`~common.contract.QUERY_FEATURES` (strings),
      ``history`` (a list, ``[""]`` when empty) and ``exclude_item_ids`` (the train items).

    Raises:
      UsageError: a user id that ``split`` does not have.
    """
    import trainer  # noqa: F401  (sets TF_USE_LEGACY_KERAS before TensorFlow loads)
    from trainer.data import records

    table = records.load_users(data_dir, split)
    row_of = {u: i for i, u in enumerate(table["user_id"])}
    missing = [u for u in users if u not in row_of]
    if missing:
        raise UsageError(f"unknown user id(s) in {data_dir}/{split}: {', '.join(missing)}")
    train = records.load_events(data_dir, split, "train")
    seen: dict[str, list[str]] = {}
    for user, item in zip(train["user_id"], train["item_id"], strict=True):
        seen.setdefault(user, []).append(item)
    rows = []
    for user in users:
        row: dict[str, Any] = {f: str(table[f][row_of[user]]) for f in contract.QUERY_FEATURES}
        # "" pads the prepared history; the signature wants at least one column.
        row[contract.HISTORY] = [str(h) for h in table[contract.HISTORY][row_of[user]] if h] or [""]
        row[EXCLUDE] = seen.get(user, [])
        rows.append(row)
    return rows


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m trainer.queries", description=__doc__.split("\n")[0]
    )
    p.add_argument("--data", required=True, help="prepared data directory")
    p.add_argument("--split", default="p2", help="protocol whose train history builds the query")
    p.add_argument("--users", nargs="+", required=True, help="user ids (one row each)")
    p.add_argument("--output", required=True, help="JSON file: a list of query rows")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point: writes the rows and prints each user's profile line."""
    args = build_parser().parse_args(argv)

    def body() -> None:
        rows = query_rows(args.data, args.split, args.users)
        write_json(args.output, rows)
        for row in rows:
            print(f"user {row['user_id']}: {row['query_text']}")

    return run(body, expected=(OSError,))


if __name__ == "__main__":
    sys.exit(main())
