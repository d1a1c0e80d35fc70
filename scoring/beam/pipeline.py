"""The Beam transforms of :mod:`scoring.beam`: read users, join seen items, RunInference
over the export's retrieve signature, write rows (Parquet or BigQuery).

Elements between the steps are plain dicts: a user is the query features (``str`` each,
``history`` a list of item ids, most recent first) plus ``exclude`` (item ids never to return);
an output row has the columns of :data:`scoring.shards.COLUMNS`.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import numpy as np

from common import contract
from scoring import shards
from scoring.backends import ExportScorer
from trainer.data import records

NAMESPACE = "beam_score"  # of the counters and RunInference's metrics
BQ_SCHEMA = "user_id:STRING,rank:INTEGER,item_id:STRING,title:STRING,score:FLOAT"


@dataclasses.dataclass(frozen=True)
class BeamScoreConfig:
    """What one scoring run reads, computes and writes (every field a validated flag)."""

    export: str
    split: str
    data: str = ""
    output: str = ""
    output_table: str = ""
    input: str = "tfrecord"
    input_path: str = ""
    input_table: str = ""
    input_query: str = ""
    k: int = 10
    diversity: float = 0.0
    exclude_seen: bool = False
    exclude_parts: tuple[str, ...] = ("train",)
    batch_size: int = 256
    num_shards: int = 0
    signature: str = contract.RETRIEVE
    runner: str = "DirectRunner"
    overwrite: bool = False


# --------------------------------------------------------------------------- reading


def _strings(feature) -> list[str]:
    return [v.decode("utf-8", "replace") for v in feature.bytes_list.value]


def parse_user_example(record: bytes) -> dict[str, Any]:
    """A ``users.tfrecord`` Example -> query features (``str`` each, ``history`` a list)."""
    from tensorflow.core.example import example_pb2

    feature = example_pb2.Example.FromString(record).features.feature
    user = {n: (_strings(feature[n]) or [""])[0] for n in contract.QUERY_FEATURES}
    return {**user, contract.HISTORY: _strings(feature[contract.HISTORY]), "exclude": []}


def parse_event_example(record: bytes) -> tuple[str, str]:
    """A rating-event Example -> ``(user_id, item_id)``."""
    from tensorflow.core.example import example_pb2

    feature = example_pb2.Example.FromString(record).features.feature
    return _strings(feature["user_id"])[0], _strings(feature["item_id"])[0]


def user_from_row(row: dict[str, Any]) -> dict[str, Any]:
    """A Parquet / BigQuery row (the users.tfrecord columns, ``history`` a list of item ids,
    optional ``exclude_item_ids`` list) -> query features."""
    missing = [n for n in (*contract.QUERY_FEATURES, contract.HISTORY) if n not in row]
    if missing:
        raise ValueError(f"input row lacks column(s) {missing}: {sorted(row)}")
    user = {n: "" if row[n] is None else str(row[n]) for n in contract.QUERY_FEATURES}
    history = [str(v) for v in row[contract.HISTORY] or []]
    return {
        **user,
        contract.HISTORY: history,
        "exclude": [str(v) for v in row.get("exclude_item_ids") or []],
    }


def attach_seen(keyed: tuple[str, dict[str, list]]) -> Iterator[dict[str, Any]]:
    """CoGroupByKey output -> each user with the items they rated added to ``exclude``."""
    _, grouped = keyed
    seen = set(grouped["seen"])
    for user in grouped["user"]:  # users with events but no query row have nothing to score
        yield {**user, "exclude": sorted(seen.union(user["exclude"]))}


# --------------------------------------------------------------------------- scoring


def _padded(lists: Sequence[Sequence[str]]) -> np.ndarray:
    """Ragged string lists -> ``[B, max(1, longest)]`` object array padded with ``""``."""
    width = max([1, *map(len, lists)])
    out = np.full((len(lists), width), "", dtype=object)
    for i, values in enumerate(lists):
        out[i, : len(values)] = values
    return out


def _model_handler_class():
    from apache_beam.ml.inference.base import ModelHandler, PredictionResult

    class ExportModelHandler(ModelHandler):
        """RunInference over the export's retrieve signature.

        Why a ModelHandler of our own rather than Beam's TFModelHandlerTensor: that handler
        loads with ``tf.keras.models.load_model`` and feeds one stacked tensor, while the export
        is a ``tf.Module`` whose signature takes a dict of string tensors (and needs the TF Text
        and ScaNN ops registered first). RunInference still gives what a DoFn.setup would
        not: one model per worker *process* shared by its threads (Dataflow runs many), batching
        (``BatchElements``) and its latency / count metrics.
        """

        def __init__(self, export: str, signature: str, k: int, diversity: float, batch: int):
            super().__init__(min_batch_size=batch, max_batch_size=batch)
            self.export, self.signature, self.k, self.diversity = export, signature, k, diversity

        def load_model(self) -> ExportScorer:
            return ExportScorer(self.export, self.signature)

        def run_inference(self, batch, model, inference_args=None) -> Iterable[Any]:
            features = {
                n: np.array([u[n] for u in batch], dtype=object) for n in contract.QUERY_FEATURES
            }
            features[contract.HISTORY] = _padded([u[contract.HISTORY] for u in batch])
            exclude = _padded([u["exclude"] for u in batch])
            out = model.retrieve(features, self.k, exclude, self.diversity)
            titles = out.get("titles", np.full_like(out["item_ids"], "", dtype=object))
            for i, user in enumerate(batch):
                yield PredictionResult(
                    user["user_id"], (out["item_ids"][i], titles[i], out["scores"][i])
                )

        def get_metrics_namespace(self) -> str:
            return NAMESPACE

    return ExportModelHandler


def prediction_rows(result) -> Iterator[dict[str, Any]]:
    """One user's ``PredictionResult`` -> output rows, the export's ``""`` padding dropped."""
    item_ids, titles, scores = result.inference
    for rank, (item, title, score) in enumerate(zip(item_ids, titles, scores, strict=True), 1):
        if item != "":
            yield {
                "user_id": str(result.example),
                "rank": rank,
                "item_id": str(item),
                "title": str(title),
                "score": float(score),
            }


# --------------------------------------------------------------------------- pipeline


def _count(name: str):
    from apache_beam.metrics import Metrics

    counter = Metrics.counter(NAMESPACE, name)

    def inc(value):
        counter.inc()
        return value

    return inc


def build_pipeline(pipeline, config: BeamScoreConfig, export_dir: str, parquet_prefix: str):
    """Adds read -> [join seen items] -> RunInference -> write to ``pipeline``."""
    import apache_beam as beam
    from apache_beam.ml.inference.base import RunInference

    if config.input == "tfrecord":
        path = config.input_path or os.path.join(config.data, config.split, "users.tfrecord")
        users = (
            pipeline
            | "ReadUsers" >> beam.io.ReadFromTFRecord(path)
            | "ParseUsers" >> beam.Map(parse_user_example)
        )
    else:
        if config.input == "parquet":
            rows = pipeline | "ReadUsers" >> beam.io.ReadFromParquet(config.input_path)
        else:
            rows = pipeline | "ReadUsers" >> beam.io.ReadFromBigQuery(
                table=config.input_table or None,
                query=config.input_query or None,
                use_standard_sql=True,
                method=beam.io.ReadFromBigQuery.Method.DIRECT_READ,
            )
        users = rows | "ParseUsers" >> beam.Map(user_from_row)
    if config.exclude_seen:
        files = [
            f
            for part in config.exclude_parts
            for f in records.part_files(config.data, config.split, part)
        ]
        seen = (
            pipeline
            | "SeenFiles" >> beam.Create(files)
            | "ReadSeen" >> beam.io.ReadAllFromTFRecord()
            | "ParseSeen" >> beam.Map(parse_event_example)
        )
        keyed = users | "KeyUsers" >> beam.Map(lambda u: (u["user_id"], u))
        users = (
            {"user": keyed, "seen": seen}
            | "JoinSeen" >> beam.CoGroupByKey()
            | "AttachSeen" >> beam.FlatMap(attach_seen)
        )
    handler = _model_handler_class()(
        export_dir, config.signature, config.k, config.diversity, config.batch_size
    )
    rows = (
        users
        | "CountUsers" >> beam.Map(_count("users"))
        | "Score" >> RunInference(handler)
        | "ToRows" >> beam.FlatMap(prediction_rows)
        | "CountRows" >> beam.Map(_count("rows"))
    )
    if config.output_table:
        disposition = "WRITE_TRUNCATE" if config.overwrite else "WRITE_EMPTY"
        rows | "WriteBigQuery" >> beam.io.WriteToBigQuery(
            config.output_table,
            schema=BQ_SCHEMA,
            create_disposition=beam.io.BigQueryDisposition.CREATE_IF_NEEDED,
            write_disposition=getattr(beam.io.BigQueryDisposition, disposition),
            method=beam.io.WriteToBigQuery.Method.FILE_LOADS,
        )
    else:
        rows | "WriteParquet" >> beam.io.WriteToParquet(
            parquet_prefix,
            schema=shards.arrow_schema(),  # the shards of scoring.batch_score, the same columns
            codec="zstd",
            file_name_suffix=".parquet",
            num_shards=config.num_shards,
            shard_name_template="-SSSSS",
        )
    return pipeline
