"""The training losses of :class:`trainer.model.TwoTowerModel`, as functions on tensors.

The model embeds and preprocesses; these compute the softmaxes over what it hands them:

* :class:`Tasks`: TFRS's retrieval (in-batch softmax, logQ correction, accidental hits) and
  ranking (squared error) tasks.
* :func:`mixed_negatives`: uniformly sampled catalog items beside the batch's candidates, with
  the mixture's sampling correction (Yang et al. 2020).
* :func:`gather_local_first`: other replicas' candidates as extra negatives.
* :func:`full_softmax`: the whole catalog per query, one positive each.
* :func:`multinomial_softmax`: the whole catalog per user, every held-out target a positive
  (Mult-DAE's multinomial likelihood).
* :func:`distilled_softmax`: the same catalog softmax against a teacher's distribution (EASE).
* :func:`masked_history`: a query's known positives taken out of its catalog logits.
* :func:`in_batch_hits`: how many positives rank in the top k of the batch's candidates.
* :func:`event_losses` / :func:`user_losses`: one replica's whole loss, rated events or users
  (what :meth:`~trainer.model.TwoTowerModel.compute_losses` and
  :meth:`~trainer.model.TwoTowerModel.compute_user_losses` return).

Every loss here is a *sum* over examples; the model divides by the global batch size.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

import tensorflow as tf

import trainer  # noqa: F401  (TF_USE_LEGACY_KERAS before TFRS)
from trainer.config import ModelConfig

if TYPE_CHECKING:
    from trainer.model import TwoTowerModel

#: The logit of an item that must not compete in a softmax (known positive, untrained item).
MASKED_LOGIT = -1e9


class Tasks:
    """The TFRS tasks (Keras 2 layers, no weights), kept out of Keras 3's tracking.

    ``retrieval(query [b, D], candidates [C, D], ...)`` -> summed CE over the batch's rows;
    ``ranking(labels [b, 1], predictions [b, 1])`` -> summed squared error.
    """

    def __init__(self, config: ModelConfig):
        import tensorflow_recommenders as tfrs

        self.retrieval = tfrs.tasks.Retrieval(
            loss=tf.keras.losses.CategoricalCrossentropy(
                from_logits=True, reduction=tf.keras.losses.Reduction.SUM
            ),
            temperature=config.temperature,
            num_hard_negatives=config.num_hard_negatives or None,
            remove_accidental_hits=config.remove_accidental_hits,
        )
        self.ranking = tfrs.tasks.Ranking(
            loss=tf.keras.losses.MeanSquaredError(reduction=tf.keras.losses.Reduction.SUM)
        )


def mixed_negatives(
    candidates: tf.Tensor,
    ids: tf.Tensor,
    probs: tf.Tensor,
    items: tf.Tensor,
    item_ids: tf.Tensor,
    row_probability: Callable[[tf.Tensor], tf.Tensor],
    num_samples: int,
) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
    """The batch's candidates plus ``num_samples`` uniformly drawn catalog items.

    ``candidates`` ``[C, D]``, ``ids`` ``[C]`` (accidental-hit ids), ``probs`` ``[C]`` (each
    one's popularity share); ``items`` ``[N, D]`` and ``item_ids`` ``[N]``: the whole catalog;
    ``row_probability``: preprocessor rows ``[S]`` (catalog row + 2) -> their shares ``[S]``.
    Returns ``(candidates [C + S, D], ids [C + S], probs [C + S])``: every candidate's
    correction is its expected count under the mixture (batch size * popularity + samples /
    N), as an item can arrive either way.
    """
    count = tf.shape(items)[0]
    sampled = tf.random.uniform([num_samples], 0, count, dtype=tf.int32)
    sampled_ids = tf.gather(item_ids, sampled)
    in_batch = tf.cast(tf.shape(candidates)[0], tf.float32)
    uniform = float(num_samples) / tf.cast(count, tf.float32)
    probs = tf.concat(
        [
            in_batch * probs + uniform,
            in_batch * row_probability(sampled + 2) + uniform,
        ],
        axis=0,
    )
    candidates = tf.concat([candidates, tf.gather(items, sampled)], axis=0)
    ids = tf.concat([ids, sampled_ids], axis=0)
    return candidates, ids, probs


def gather_local_first(
    context: tf.distribute.ReplicaContext, tensors: tuple[tf.Tensor, ...]
) -> tuple[tf.Tensor, ...]:
    """All-gathers each tensor (``[b, ...]`` -> ``[R * b, ...]``) over replicas, rotated so this
    replica's rows come first.

    TFRS takes the positive of query ``i`` to be candidate ``i``; with this replica's block first
    that stays true and the other replicas' candidates become extra negatives.
    """
    replica = tf.cast(context.replica_id_in_sync_group, tf.int32)
    out = []
    for t in tensors:
        gathered = context.all_gather(t, axis=0)
        local = tf.shape(t)[0]
        out.append(tf.roll(gathered, shift=-replica * local, axis=0))
    return tuple(out)


def masked_history(logits: tf.Tensor, history_rows: tf.Tensor) -> tf.Tensor:
    """``logits`` ``[B, N]`` with each query's history items (preprocessor rows ``[B, H]``;
    catalog row = row - 2) set to -1e9: they are the user's known positives."""
    history = tf.cast(history_rows, tf.int32) - 2
    seen = tf.where(history >= 0)  # [M, 2]: (query, position)
    seen_pairs = tf.stack([tf.cast(seen[:, 0], tf.int32), tf.gather_nd(history, seen)], axis=1)
    return tf.tensor_scatter_nd_update(
        logits, seen_pairs, tf.fill([tf.shape(seen_pairs)[0]], MASKED_LOGIT)
    )


def full_softmax(
    logits: tf.Tensor,
    target_rows: tf.Tensor,
    weights: tf.Tensor,
    history_rows: tf.Tensor | None = None,
) -> tuple[tf.Tensor, tf.Tensor]:
    """Softmax over every catalog item: ``(sum of CE over positives, hits at 10)``.

    ``logits`` ``[B, N]``; ``target_rows`` ``[B]``: each query's positive as a preprocessor row
    (catalog row + 2; unknown items weigh 0); ``weights`` ``[B]``; ``history_rows`` ``[B, H]``:
    known positives to mask out (None: none), the target itself excepted.
    """
    # Catalog rows are preprocessor rows - 2 (0 = padding, 1 = unknown item).
    target = tf.cast(target_rows, tf.int32) - 2
    batch = tf.range(tf.shape(target)[0])
    known = target >= 0
    target = tf.maximum(target, 0)
    pairs = tf.stack([batch, target], axis=1)
    positive = tf.gather_nd(logits, pairs)
    if history_rows is not None:
        logits = masked_history(logits, history_rows)
    logits = tf.tensor_scatter_nd_update(logits, pairs, positive)  # the target stays
    weights = weights * tf.cast(known, tf.float32)
    loss = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=target, logits=logits)
    rank = tf.reduce_sum(tf.cast(logits > positive[:, None], tf.int32), axis=1)
    hits = tf.reduce_sum(tf.cast(rank < 10, tf.float32) * weights)
    return tf.reduce_sum(loss * weights), hits


def multinomial_softmax(
    logits: tf.Tensor, rows: tf.Tensor, weights: tf.Tensor
) -> tuple[tf.Tensor, tf.Tensor]:
    """One softmax per user over the catalog, every target a positive: ``(sum over targets of
    their CE, targets in the top 10)``, the multinomial likelihood of Mult-DAE.

    ``logits`` ``[B, N]`` (known positives already masked); ``rows`` ``[B, H]``: the targets'
    catalog rows (any row where the weight is 0); ``weights`` ``[B, H]``.
    """
    target_logits = tf.gather(logits, rows, batch_dims=1)  # [B, H]
    normaliser = tf.reduce_logsumexp(logits, axis=1, keepdims=True)
    loss = tf.reduce_sum((normaliser - target_logits) * weights)
    tenth = tf.math.top_k(logits, k=min(10, int(logits.shape[-1] or 10))).values[:, -1:]
    hits = tf.reduce_sum(tf.cast(target_logits >= tenth, tf.float32) * weights)
    return loss, hits


def distilled_softmax(logits: tf.Tensor, teacher: tf.Tensor, weights: tf.Tensor) -> tf.Tensor:
    """The cross-entropy of each user's catalog softmax against a teacher's, counted once per
    target (as :func:`multinomial_softmax` counts its CE), summed over users.

    ``logits`` ``[B, N]`` (known positives and untrained items masked); ``teacher`` ``[B, N]``
    teacher logits (masked where ``logits`` are, so no mass falls on what the student may
    not rank); ``weights`` ``[B, H]``: the targets, whose count scales each user's term.
    """
    masked = logits <= MASKED_LOGIT / 2
    teacher = tf.where(masked, tf.constant(MASKED_LOGIT, teacher.dtype), teacher)
    target = tf.stop_gradient(tf.nn.softmax(teacher, axis=1))
    log_p = tf.nn.log_softmax(logits, axis=1)
    # 0 * log_p where the target has no mass: masked entries hold -1e9, never -inf, so no NaN.
    per_user = -tf.reduce_sum(target * log_p, axis=1)
    return tf.reduce_sum(per_user * tf.reduce_sum(weights, axis=1))


def in_batch_hits(
    query: tf.Tensor,
    candidates: tf.Tensor,
    ids: tf.Tensor,
    candidate_ids: tf.Tensor,
    weights: tf.Tensor,
    k: int,
) -> tf.Tensor:
    """Weighted count of queries whose positive (candidate ``i``) ranks in the top ``k`` of the
    batch's candidates, other copies of the same item ignored. ``query`` ``[b, D]``,
    ``candidates`` ``[C, D]`` (C >= b), ``ids`` ``[b]``, ``candidate_ids`` ``[C]``."""
    scores = tf.matmul(query, candidates, transpose_b=True)
    positive = tf.linalg.diag_part(scores[:, : tf.shape(query)[0]])
    other = tf.not_equal(ids[:, None], candidate_ids[None, :])
    better = tf.logical_and(scores > positive[:, None], other)
    rank = tf.reduce_sum(tf.cast(better, tf.int32), axis=1)
    return tf.reduce_sum(tf.cast(rank < k, tf.float32) * weights)


# ----------------------------------------------------------------------------- one replica's losses


def event_losses(
    model: TwoTowerModel,
    features: Mapping[str, tf.Tensor],
    *,
    global_batch_size: int,
    training: bool = True,
    gather_candidates: bool = False,
    forward: Callable | None = None,
) -> tuple[tf.Tensor, dict[str, tf.Tensor]]:
    """Weighted retrieval + ranking loss of one replica's batch of rated events (raw features
    ``[b]``, ``history`` ``[b, H]``, ``rating`` ``[b]``), scaled by the *global* batch.

    Call in a replica context (inside ``strategy.run``) within a ``tf.function``.
    ``forward``: optional (e.g. XLA-compiled) ``(query_inputs, candidate_inputs, training)
    -> (query [b, D], candidate [b, D], rating [b])`` over the numeric inputs.

    The retrieval softmax runs over ``config.negatives``: the batch's candidates (TFRS,
    logQ-corrected), those plus uniformly sampled catalog items ("mixed"), or the whole
    catalog ("full", the query's history items masked out: they are the user's known
    positives, and evaluation removes them too).

    Returns ``(loss, sums)``: ``sums`` are per-replica totals to SUM-reduce: ``examples``,
    ``positives``, ``retrieval_loss`` (sum of CE over positives), ``squared_error``,
    ``hits_at_10`` (positives whose item is in the top 10 of the softmax's candidates).
    """
    config = model.model_config
    query_inputs = model.preprocess_query(features)
    candidate_inputs = model.preprocess_candidate(features)
    forward = forward or model.forward_numeric
    query, candidate, rating = forward(query_inputs, candidate_inputs, training)
    labels = tf.cast(features["rating"], tf.float32)
    weights = tf.cast(labels >= config.positive_threshold, tf.float32)
    if config.negatives == "full":
        _, logits = model.catalog_logits(query, training)
        history = query_inputs["history_rows"] if config.mask_history else None
        retrieval_loss, hits = full_softmax(logits, candidate_inputs["row"], weights, history)
    else:
        retrieval_loss, hits = _sampled_softmax(
            model, query, candidate, candidate_inputs, weights, training, gather_candidates
        )
    # [B, 1]: Keras' MSE averages over the last axis, so [B] ratings would come back as the
    # batch *mean* (1/batch of the weight the flags give it) instead of a per-example sum.
    ranking_loss = model.tasks.ranking(labels=labels[:, None], predictions=rating[:, None])
    if config.rating_l2:
        penalty = model.ranking_head.id_penalty(
            query_inputs["user_id"], candidate_inputs["item_id"]
        )
        ranking_loss += config.rating_l2 * tf.reduce_sum(penalty)
    total = config.retrieval_weight * retrieval_loss + config.ranking_weight * ranking_loss
    sums = {
        "examples": tf.cast(tf.size(labels), tf.float32),
        "positives": tf.reduce_sum(weights),
        "retrieval_loss": retrieval_loss,
        "squared_error": tf.reduce_sum(tf.square(rating - labels)),
        "hits_at_10": hits,
    }
    return total / float(global_batch_size), sums


def _sampled_softmax(
    model: TwoTowerModel,
    query: tf.Tensor,
    candidate: tf.Tensor,
    candidate_inputs: dict,
    weights: tf.Tensor,
    training: bool,
    gather_candidates: bool,
) -> tuple[tf.Tensor, tf.Tensor]:
    """TFRS's retrieval task over in-batch (+ sampled) candidates: ``(loss, hits at 10)``."""
    config = model.model_config
    hit_ids = candidate_inputs["hit_id"]
    probs = model.sampling_probability(candidate_inputs["row"])
    all_candidates, all_ids, all_probs = candidate, hit_ids, probs
    context = tf.distribute.get_replica_context()
    if gather_candidates and context is not None and context.num_replicas_in_sync > 1:
        all_candidates, all_ids, all_probs = gather_local_first(
            context, (candidate, hit_ids, probs)
        )
    if config.negatives == "mixed":
        items, item_hit_ids = model.catalog_embeddings(training)
        all_candidates, all_ids, all_probs = mixed_negatives(
            all_candidates,
            all_ids,
            all_probs,
            items,
            item_hit_ids,
            model.sampling_probability,
            config.sampled_negatives,
        )
    loss = model.tasks.retrieval(
        query,
        all_candidates,
        sample_weight=weights,
        candidate_sampling_probability=all_probs if config.logq_correction else None,
        candidate_ids=all_ids if config.remove_accidental_hits else None,
        compute_metrics=False,
        compute_batch_metrics=False,
    )
    hits = in_batch_hits(query, all_candidates, hit_ids, all_ids, weights, 10)
    return loss, hits


def user_losses(
    model: TwoTowerModel, features: Mapping[str, tf.Tensor], *, global_batch_size: int
) -> tuple[tf.Tensor, dict[str, tf.Tensor]]:
    """The losses of a batch of users (:func:`trainer.train_queries.user_batches`).

    Each user's query reads the input items (``history`` ``[B, H]``); one softmax over the
    whole catalog (the kept items, ``seen``, masked out, as evaluation removes them)
    scores every held-out target (``targets`` ``[B, H]``): the retrieval loss is the sum of
    their cross-entropies, the multinomial likelihood of Mult-DAE. The ranking head is fit
    on the same (user, target) pairs and their ``target_ratings``. Training only; sums as in
    :func:`event_losses`, counted per target.
    """
    config = model.model_config
    query_inputs = model.preprocess_query(features)
    query = tf.cast(model.query_tower(query_inputs, training=True), tf.float32)  # [B, D]
    items, logits = model.catalog_logits(query, training=True)  # [N, D], [B, N]
    if config.mask_history:
        logits = masked_history(logits, model.preprocessor.item_rows(features["seen"]))
    target_ids = tf.convert_to_tensor(features["targets"])
    rows = tf.cast(model.preprocessor.item_rows(target_ids), tf.int32) - 2  # [B, H]
    labels = tf.cast(features["target_ratings"], tf.float32)
    known = rows >= 0
    rows = tf.maximum(rows, 0)
    weights = tf.cast(tf.logical_and(known, labels >= config.positive_threshold), tf.float32)
    retrieval_loss, hits = multinomial_softmax(logits, rows, weights)
    if config.distill_ease:
        retrieval_loss = (1.0 - config.distill_ease) * retrieval_loss + (
            config.distill_ease
            * distilled_softmax(logits, features["teacher"] / config.distill_temperature, weights)
        )

    user_ids = tf.convert_to_tensor(features["user_id"])
    rating = model.predict_rating(
        query, tf.gather(items, rows), user_ids, target_ids, training=True
    )  # [B, H]
    rated = tf.cast(known, tf.float32)
    errors = tf.square(rating - labels) * rated
    ranking_loss = model.tasks.ranking(
        labels=tf.boolean_mask(labels, known)[:, None],
        predictions=tf.boolean_mask(rating, known)[:, None],
    )
    if config.rating_l2:
        hash_ids = model.preprocessor.hash_ids
        user_terms = tf.broadcast_to(hash_ids(user_ids)[:, None], tf.shape(target_ids))
        penalty = model.ranking_head.id_penalty(user_terms, hash_ids(target_ids))
        ranking_loss += config.rating_l2 * tf.reduce_sum(penalty * rated)
    total = config.retrieval_weight * retrieval_loss + config.ranking_weight * ranking_loss
    sums = {
        "examples": tf.reduce_sum(rated),
        "positives": tf.reduce_sum(weights),
        "retrieval_loss": retrieval_loss,
        "squared_error": tf.reduce_sum(errors),
        "hits_at_10": hits,
    }
    return total / float(global_batch_size), sums
