"""Export: a TF Serving SavedModel with in-graph tokenization, the query tower and an index.

``python -m trainer.export --model-dir DIR --export-base DIR --model-name NAME
[--index scann|brute_force] [--version N]``

The export is written to ``<export-base>/<model-name>/.tmp-<version>-<random>`` and renamed to
``<export-base>/<model-name>/<version>`` when complete (TF Serving ignores folders whose name is
not a number, so it never sees a partial version). An existing version is never overwritten.
Beside the SavedModel, ``assets.extra/`` holds TF Serving's warm-up requests (one per
signature), the index settings and recall check (``recall_check.json``) and the model card.

The signatures are those of :data:`common.contract.SIGNATURES`, served by
:class:`trainer.serving_module.RecommenderModule`.

Known texts skip BERT. Every text the model has encoded (catalog item texts, profile
sentences, the titles a query text may name) is looked up in an in-graph table; a batch sends
only its misses through the tokenizer and BERT (packed to its longest text) and merges them
back in order, so a frozen BERT's export answers exactly as running BERT on every text would,
and a fine-tuned one's tables are recomputed with its final weights at export. The set
encoder's per-catalog-row tables are stored filled, and a batch without diversity skips MMR.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import sys
import time
from collections.abc import Callable

import numpy as np
import tensorflow as tf

import trainer  # noqa: F401  (TF_USE_LEGACY_KERAS before TFRS)
from common import cli, contract, staging
from common.contract import RECALL_FILE, WARMUP_FILE
from trainer.data.movielens import DataError
from trainer.serving_module import SAVE_NAMESPACES, ExportError, IndexConfig, RecommenderModule

#: The inputs of every query signature: the query features ``[B]`` and ``history`` ``[B, H]``.
_QUERY_INPUTS = tuple(contract.SIGNATURES[contract.QUERY_EMBEDDING].inputs)

# ---------------------------------------------------------------------- writing an export


def next_version(model_base: str) -> int:
    """One more than the highest numeric version under ``model_base`` (1 when there is none)."""
    if not tf.io.gfile.isdir(model_base):
        return 1
    versions = [
        int(n.rstrip("/")) for n in tf.io.gfile.listdir(model_base) if re.fullmatch(r"\d+/?", n)
    ]
    return max(versions, default=0) + 1


def _stage(message: str) -> None:
    """One progress line of an export (minutes on a CPU), flushed at once."""
    print(f"{time.strftime('%H:%M:%S')} {message}", flush=True)


def check_target(export_base: str, model_name: str, version: int | None) -> tuple[str, int]:
    """``(model base, version)`` of a new export, or :class:`ExportError` naming the flag.

    Also removes the ``.tmp-*`` folders that killed exports left under the model base.
    """
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", model_name) or set(model_name) <= {"."}:
        raise ExportError(
            f"--model-name {model_name!r}: use letters, digits, _ . - (a folder name under "
            "--export-base; '.' and '..' are not names)"
        )
    model_base = os.path.join(export_base, model_name)
    if version is not None and version < 1:
        raise ExportError(f"--version must be a positive integer, got {version}")
    if tf.io.gfile.isdir(model_base):
        for path in staging.remove_stale(model_base, ".tmp-"):
            print(f"removed {path}, left by an export that was killed")
    version = next_version(model_base) if version is None else version
    final = os.path.join(model_base, str(version))
    if tf.io.gfile.exists(final):
        raise ExportError(f"{final} already exists; versions are never overwritten")
    return model_base, version


def recall_at_k(approx: np.ndarray, exact: np.ndarray) -> float:
    """Mean share of each row of ``exact`` ``[Q, k]`` found in the same row of ``approx``
    ``[Q, k]``: an approximate index's recall@k against exact search."""
    k = exact.shape[1]
    return float(np.mean([len(set(a) & set(e)) / k for a, e in zip(approx, exact, strict=True)]))


def exact_top_k(module: RecommenderModule, embeddings: tf.Tensor, k: int = 10) -> np.ndarray:
    """Rows ``[Q, k]`` of the exact top-k candidates of ``embeddings`` ``[Q, D]`` (brute force
    over all the module's candidate embeddings): what the index checks compare against."""
    scores = tf.matmul(embeddings, module.embeddings, transpose_b=True)
    return tf.math.top_k(scores, k=k).indices.numpy()


def recall_against_brute_force(
    module: RecommenderModule, embeddings: tf.Tensor, exact: np.ndarray
) -> float:
    """Mean recall@k (k = ``exact``'s width) of the module's built index on ``embeddings``
    ``[Q, D]`` against their exact top-k rows ``exact`` ``[Q, k]``."""
    _, approx = module.candidate_pool(embeddings)
    return recall_at_k(approx[:, : exact.shape[1]].numpy(), exact)


def recall_at_leaves(
    module: RecommenderModule, embeddings: tf.Tensor, exact: np.ndarray, leaves: int
) -> float:
    """Recall@k (k = ``exact``'s width) of the module's ScaNN index searching ``leaves`` leaves,
    against the exact top-k rows ``exact`` ``[Q, k]`` of ``embeddings`` ``[Q, D]``.

    0 when any query's leaves hold fewer than ``num_reordering_candidates`` items: the serving
    graph needs ``pool`` of them for every query (ScaNN pads a short answer), and four times
    that on the checked queries leaves a margin for the others.

    The leaf count is a query-time argument of ScaNN's searcher, so this needs no rebuild. TFRS's
    layer hides its searcher (``_serialized_searcher``) and has no leaves argument at call time.
    """
    from scann.scann_ops.py import scann_ops

    searcher = scann_ops.searcher_from_module(module.scann._serialized_searcher)
    wanted = module.index_config.num_reordering_candidates
    found = searcher.search_batched(embeddings, final_num_neighbors=wanted, leaves_to_search=leaves)
    if found.indices.shape[1] < wanted or np.isnan(found.distances.numpy()).any():
        return 0.0
    k = exact.shape[1]
    approx = found.indices[:, :k].numpy()
    return recall_at_k(approx, exact)


def fewest_leaves(module: RecommenderModule, embeddings: tf.Tensor, exact: np.ndarray) -> int:
    """The fewest leaves ScaNN can search and still reach ``min_recall``: the module's count
    halved while recall@k on ``embeddings`` against ``exact`` (:func:`recall_at_leaves`) stays
    at or above it (halving, not bisecting, keeps a margin above the threshold for queries the
    check has not seen)."""
    config = module.index_config
    k = exact.shape[1]
    leaves = config.num_leaves_to_search
    while leaves > 1:
        fewer = leaves // 2
        recall = recall_at_leaves(module, embeddings, exact, fewer)
        would = (
            f"give recall@{k} {recall:.4f}"
            if recall > 0
            else f"hold fewer than {config.num_reordering_candidates} items for some query"
        )
        print(f"index scann: {fewer}/{config.num_leaves} leaves would {would}")
        if recall < config.min_recall:
            break
        leaves = fewer
    return leaves


def tuned_index(module: RecommenderModule, sample: dict[str, np.ndarray]) -> float:
    """Checks the module's ScaNN index against brute force, retuning it when its leaf count
    was derived (``auto_tune``), and returns the recall@10 of the index it leaves built.

    A derived count that falls short is doubled until it passes; one that passes at once is
    halved while it still would (:func:`fewest_leaves`): search time grows with the leaves,
    and how spread the trained embeddings are decides how many are enough. A pinned count is
    only checked. The sample's embeddings and their exact top-10 are computed once: neither
    depends on the index.
    """
    embeddings = module.query_embedding(**sample)["embeddings"]
    exact = exact_top_k(module, embeddings)

    def check() -> float:
        c = module.index_config
        recall = recall_against_brute_force(module, embeddings, exact)
        print(
            f"index scann ({c.num_leaves_to_search}/{c.num_leaves} leaves searched): "
            f"recall@10 against brute force = {recall:.4f} on {len(sample['query_text'])} queries"
        )
        return recall

    def rebuild(leaves: int) -> None:
        module.build_index(dataclasses.replace(module.index_config, num_leaves_to_search=leaves))

    recall = check()
    config = module.index_config
    if config.auto_tune and recall >= config.min_recall:
        fewer = fewest_leaves(module, embeddings, exact)
        if fewer < config.num_leaves_to_search:
            rebuild(fewer)
            recall = check()
    while recall < module.index_config.min_recall and module.index_config.auto_tune:
        config = module.index_config
        if config.num_leaves_to_search >= config.num_leaves:
            break
        rebuild(min(2 * config.num_leaves_to_search, config.num_leaves))
        recall = check()
    config = module.index_config
    if recall < config.min_recall:
        raise ExportError(
            f"{config.kind} recall@10 {recall:.4f} is below --min-recall "
            f"{config.min_recall}; raise --num-leaves-to-search or reordering"
        )
    return recall


def _tensor_proto(value: np.ndarray) -> tf.compat.v1.TensorProto:
    return tf.make_tensor_proto(value)


def write_warmup(path: str, requests: dict[str, dict[str, np.ndarray]], model_name: str) -> int:
    """Writes TF Serving's warm-up file: one PredictionLog per signature; returns how many."""
    from tensorflow_serving.apis import model_pb2, predict_pb2, prediction_log_pb2

    with staging.staged_file(path) as tmp, tf.io.TFRecordWriter(tmp) as writer:
        for signature, inputs in requests.items():
            request = predict_pb2.PredictRequest(
                model_spec=model_pb2.ModelSpec(name=model_name, signature_name=signature)
            )
            for name, value in inputs.items():
                request.inputs[name].CopyFrom(_tensor_proto(value))
            log = prediction_log_pb2.PredictionLog(
                predict_log=prediction_log_pb2.PredictLog(request=request)
            )
            writer.write(log.SerializeToString())
    return len(requests)


def sample_requests(
    queries: dict[str, np.ndarray], catalog: dict[str, np.ndarray], module_max_k: int = 10
) -> dict:
    """One small request per signature of the contract, from real queries and catalog items.

    Args:
      queries: the users table (query features ``[U]``, ``history`` ``[U, H]``).
      catalog: the catalog table (candidate features ``[N]``).
      module_max_k: the export's largest ``k``.

    Returns:
      ``{signature name: {input name: array with a batch of 2}}``, in the contract's order.
    """
    values = {
        **{n: np.asarray(queries[n][:2]).astype(object) for n in _QUERY_INPUTS},
        **{n: np.asarray(catalog[n][:2]).astype(object) for n in contract.CANDIDATE_FEATURES},
    }
    batch = len(values[contract.QUERY_FEATURES[0]])
    values.update(
        {
            contract.K: np.full([batch], min(10, module_max_k), np.int32),
            contract.EXCLUDE_ITEM_IDS: np.array([[""]] * batch, dtype=object),
            contract.DIVERSITY: np.zeros([batch], np.float32),
            contract.CANDIDATE_ITEM_IDS: np.array(
                [list(catalog["item_id"][:3])] * batch, dtype=object
            ),
        }
    )
    return {
        name: {n: values[n] for n in signature.inputs}
        for name, signature in contract.SIGNATURES.items()
    }


def save_export(
    module: RecommenderModule,
    export_base: str,
    model_name: str,
    version: int | None,
    queries: dict[str, np.ndarray],
    catalog: dict[str, np.ndarray],
    extra_info: dict | None = None,
) -> str:
    """Checks recall, saves, writes warm-up and metadata, then renames into place.

    Returns the version directory. Raises :class:`ExportError` if the version exists or the
    index's recall@10 against brute force is below ``module.index_config.min_recall``.
    """
    model_base, version = check_target(export_base, model_name, version)
    final = os.path.join(model_base, str(version))
    config = module.index_config
    sample = {
        name: np.asarray(queries[name][: config.recall_queries]).astype(object)
        for name in _QUERY_INPUTS
    }
    recall = tuned_index(module, sample) if config.kind == "scann" else 1.0
    config = module.index_config
    requests = sample_requests(queries, catalog, config.max_k)
    _stage(f"tracing the {len(requests)} signatures")
    for signature, inputs in requests.items():  # the concrete functions run once before saving
        module.signatures()[signature](**{k: tf.constant(v) for k, v in inputs.items()})
    module.track_variables()
    try:
        with staging.staged_dir(final, prefix=f".tmp-{version}-") as tmp:
            _stage(f"saving the SavedModel to {tmp}")
            tf.saved_model.save(
                module,
                tmp,
                signatures=module.signatures(),
                options=tf.saved_model.SaveOptions(namespace_whitelist=SAVE_NAMESPACES),
            )
            info = {
                "index": dataclasses.asdict(config),
                "recall_at_10_vs_brute_force": recall,
                "num_items": int(module.embeddings.shape[0]),
                "version": version,
                "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                **(extra_info or {}),
            }
            _write_extras(os.path.join(tmp, "assets.extra"), requests, model_name, info)
    except FileExistsError:  # staged_dir never renames onto a version that appeared meanwhile
        raise ExportError(f"{final} appeared while exporting; not overwriting it") from None
    return final


def _write_extras(extra: str, requests: dict, model_name: str, info: dict) -> None:
    """``assets.extra/``: warm-up requests, the index settings and recall check, the card."""
    tf.io.gfile.makedirs(extra)
    write_warmup(os.path.join(extra, WARMUP_FILE), requests, model_name)
    staging.write_json(os.path.join(extra, RECALL_FILE), info)
    from trainer import model_card  # what the export is, its figures and limits

    card = model_card.write_export_card(extra, info)
    _stage(f"wrote warm-up requests, {RECALL_FILE} and {os.path.basename(card)}")


# ---------------------------------------------------------------------- from a trained model


CatalogFn = Callable[[dict[str, np.ndarray], np.ndarray], tuple[dict[str, np.ndarray], np.ndarray]]


def build_module(
    model_dir: str,
    data_dir: str | None,
    index: IndexConfig,
    grow_catalog: CatalogFn | None = None,
) -> tuple[RecommenderModule, dict[str, np.ndarray], dict[str, np.ndarray], dict]:
    """Loads a trained model dir and builds the serving module over its catalog.

    The catalog and the real queries of the recall check come from the data dir the model was
    trained on (recorded in its config) unless ``data_dir`` names another prepared copy.
    ``grow_catalog``: ``(catalog, item embeddings [N, D]) -> (catalog, [N', D])``, what the
    index serves instead (benchmarks: a synthetic million-item catalog behind the real towers).

    Returns the module, the catalog table, the users table and a dict describing the export.
    """
    from trainer.data import records
    from trainer.inference import ModelScorer
    from trainer.model_dir import load_trained

    if not tf.io.gfile.exists(os.path.join(model_dir, "config.json")):
        raise ExportError(f"{model_dir} is not a trained model dir (no config.json)")
    model, config = load_trained(model_dir)
    data_dir = data_dir or config.data.data
    split = config.data.split
    try:
        catalog = records.load_catalog(data_dir, split)
        users = records.load_users(data_dir, split)
    except DataError as e:
        raise ExportError(f"{e} (pass --data: the prepared data the model was trained on)") from e
    # Every text the model has encoded (catalog item texts, profile sentences, titles) is
    # answered from its in-graph table; only the misses of a batch go through the tokenizer
    # and BERT (trainer.features.cached_or_encoded). A fine-tuned BERT's tables are recomputed
    # with its final weights first, so both paths give the same vectors.
    model.serve_from_caches()
    item_embeddings = ModelScorer(model, catalog).retrieval_vectors()
    if grow_catalog is not None:
        catalog, item_embeddings = grow_catalog(catalog, item_embeddings)
    model.set_text_mode("live")
    term = _item_item_term(model, catalog, item_embeddings[:, : config.model.embedding_dim])
    module = RecommenderModule(
        query_model=lambda f: model.query_embeddings(f),
        candidate_model=lambda f: model.candidate_embeddings(f),
        rating_fn=lambda q, c, u, i: _pairwise_ratings(model, q, c, u, i),
        catalog=catalog,
        item_embeddings=item_embeddings,
        index=index.resolved(len(catalog["item_id"])),
        history_length=model.assets.history_length,
        similarity_dim=config.model.embedding_dim,
        item_item=term,
    )
    module.keras_model = model  # tracked, so the SavedModel holds the towers' variables
    module.catalog_tables = _freeze_catalog_tables(model)
    info = {
        "model_dir": model_dir,
        "data_dir": data_dir,
        "split": split,
        "preset": config.model.preset,
        "sequence_length": config.model.sequence_length,
    }
    return module, catalog, users, info


def _item_item_term(
    model, catalog: dict[str, np.ndarray], vectors: np.ndarray
) -> tuple[np.ndarray, float] | None:
    """The model's item-item term over the served catalog (``B`` in its order, ``α``; the items
    it never had filled from their neighbours by ``vectors`` ``[N, D]`` when the model filled its
    own), or None when the model has none, chose ``α = 0``, or the catalog outgrew a dense ``B``
    (logged)."""
    from trainer import item_item

    if model.item_item_weight is None or not float(model.item_item_weight):
        return None
    size = len(catalog["item_id"])
    if size > item_item.MAX_ITEMS:
        _stage(
            f"the served catalog has {size} items, more than the item-item term's "
            f"{item_item.MAX_ITEMS}: serving the two-tower scores alone"
        )
        return None
    _, weights = item_item.served_weights(model, catalog["item_id"], vectors)
    return weights, float(model.item_item_weight)


def _freeze_catalog_tables(model) -> list[tf.Variable]:
    """Serves the set encoder's per-catalog-row tables from variables filled once.

    The whole-history query tower reads every catalog row's text vector and id embedding on
    each call and projects both (a gather of ``[R, T]`` floats, an id lookup of ``R`` rows and
    two ``[R, .] x [., d]`` matmuls: most of a known-text query); at serving time all of it is
    constant, so their sum, the projected ``[R, d]`` item table, is stored (the set encoder's
    inference path reads one table: :meth:`trainer.history.SetEncoder._pool_projected`).
    Returns the variables (the module tracks them, so they are saved).
    """
    from trainer.history import SetEncoder

    tower = model.query_tower
    tables = getattr(tower, "catalog_tables", None)
    if tables is None or not isinstance(getattr(tower, "history", None), SetEncoder):
        return []  # only the set encoder reads them
    projected = [t for t in tower.history.project(*tables()) if t is not None]
    item_table = tf.Variable(
        tf.convert_to_tensor(tf.add_n(projected)), trainable=False, name="catalog_item_table"
    )
    tower.catalog_tables = lambda: (item_table.read_value(), None)
    tower.catalog_tables_projected = True
    return [item_table]


def _pairwise_ratings(
    model, queries: tf.Tensor, candidates: tf.Tensor, user_ids: tf.Tensor, item_ids: tf.Tensor
) -> tf.Tensor:
    """Ranking head over every (query, candidate) pair: ``[B, D]``, ``[B, M, D]`` (with user ids
    ``[B]`` and candidate item ids ``[B, M]``) -> ``[B, M]``."""
    shape = tf.shape(candidates)
    dim = candidates.shape[-1]
    tiled = tf.repeat(queries, shape[1], axis=0)  # [B * M, D]
    flat = tf.reshape(candidates, [-1, dim])
    users = tf.repeat(user_ids, shape[1], axis=0)
    items = tf.reshape(item_ids, [-1])
    return tf.reshape(model.predict_rating(tiled, flat, users, items), shape[:2])


def export(
    model_dir: str,
    export_base: str,
    model_name: str,
    index: IndexConfig,
    version: int | None = None,
    data_dir: str | None = None,
) -> str:
    """Builds and writes one export version; returns its directory."""
    start = time.time()
    _stage(f"loading {model_dir} and embedding its catalog")
    module, catalog, users, info = build_module(model_dir, data_dir, index)
    _stage(
        f"built the serving module: {len(catalog['item_id']):,} items, "
        f"{len(users['user_id']):,} users for the checks, index {module.index_config.kind} "
        f"({time.time() - start:.1f}s)"
    )
    path = save_export(module, export_base, model_name, version, users, catalog, info)
    print(
        f"exported {path} ({module.index_config.kind}, {len(catalog['item_id'])} items) "
        f"in {time.time() - start:.1f}s"
    )
    return path


def build_parser() -> argparse.ArgumentParser:
    from trainer.cli import export_parser  # TF-free, so that --help answers before TF loads

    return export_parser()


def run(args: argparse.Namespace) -> None:
    """Checks the flags (cheap checks first: the model takes minutes to load), then exports."""
    index = IndexConfig(
        kind=args.index,
        max_k=args.max_k,
        pool=args.pool,
        num_leaves=args.num_leaves,
        num_leaves_to_search=args.num_leaves_to_search,
        num_reordering_candidates=args.num_reordering_candidates,
        min_recall=args.min_recall,
    )
    check_target(args.export_base, args.model_name, args.version)
    if not tf.io.gfile.exists(os.path.join(args.model_dir, "config.json")):
        raise ExportError(
            f"--model-dir {args.model_dir} is not a trained model dir (no config.json)"
        )
    export(args.model_dir, args.export_base, args.model_name, index, args.version, args.data)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # ExportError, DataError and ConfigError are usage errors: one line on stderr, exit 2.
    return cli.run(lambda: run(args))


if __name__ == "__main__":
    sys.exit(main())
