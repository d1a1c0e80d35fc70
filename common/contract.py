"""The serving boundary: every signature of an export, its inputs, outputs, dtypes and shapes.

One definition, imported by the export (which builds ``tf.TensorSpec`` from it), the gRPC client,
batch scoring and the server tests. Dtypes are TensorFlow's names (``"string"``, ``"int32"``,
``"float32"``); a shape is a tuple whose ``None`` entries take any size (``B`` the batch, the
same for every input of one request; ``H``, ``E``, ``M`` per request). TensorFlow-free.

``serving_default`` (retrieve)
    query features ``[B]`` + ``history`` ``[B, H]`` + ``k`` ``[B]`` + ``exclude_item_ids``
    ``[B, E]`` + ``diversity`` ``[B]`` -> ``item_ids``, ``scores``, ``titles`` ``[B, K]``.
``rank``
    query features + ``history`` + ``candidate_item_ids`` ``[B, M]`` -> ``ratings`` ``[B, M]``.
``query_embedding``
    query features + ``history`` -> ``embeddings`` ``[B, D]`` (L2-normalised), or ``[B, D + 1]``.
``candidate_embedding``
    candidate features ``[B]`` -> ``embeddings`` ``[B, D]``, or ``[B, D + 1]``.

Retrieval scores are inner products of the two embeddings. A model with a popularity prior adds
one column to both (the query's holds 1, the candidate's the prior's weight times its log
train count), so the leading ``D`` columns are unit vectors and a row can be longer than 1:
:func:`similarity_vectors` gives what item-item similarity should compare. A model with an
item-item term (``trainer.item_item``) adds to each retrieved item's score its EASE score over
the request's whole ``history``, standardised per query and weighed as chosen on valid: the
``scores`` of ``serving_default`` are then no longer the embeddings' inner products alone (a
client that scores with ``query_embedding`` and ``candidate_embedding`` gets the two-tower part).
"""

from __future__ import annotations

import dataclasses

import numpy as np

#: What a request says about the user (all string ``[B]``; ``""`` = unknown).
QUERY_FEATURES = ("user_id", "user_age", "user_gender", "user_occupation", "query_text")
#: The user's items (string ``[B, H]``, most recent first, ``""`` = padding, any ``H``).
HISTORY = "history"
#: What the catalog says about an item (all string ``[B]``).
CANDIDATE_FEATURES = ("item_id", "item_title", "item_year", "item_genres", "item_text")

RETRIEVE = "serving_default"
RANK = "rank"
QUERY_EMBEDDING = "query_embedding"
CANDIDATE_EMBEDDING = "candidate_embedding"


@dataclasses.dataclass(frozen=True)
class Tensor:
    """One input or output: dtype name and shape (``None`` = any size)."""

    dtype: str
    shape: tuple[int | None, ...]


@dataclasses.dataclass(frozen=True)
class Signature:
    """Inputs and outputs of one signature, in the order the export's function takes them."""

    inputs: dict[str, Tensor]
    outputs: dict[str, Tensor]


_BATCH_STRING = Tensor("string", (None,))
_QUERY_INPUTS = {
    **{name: _BATCH_STRING for name in QUERY_FEATURES},
    HISTORY: Tensor("string", (None, None)),
}

SIGNATURES: dict[str, Signature] = {
    RETRIEVE: Signature(
        inputs={
            **_QUERY_INPUTS,
            "k": Tensor("int32", (None,)),
            "exclude_item_ids": Tensor("string", (None, None)),
            "diversity": Tensor("float32", (None,)),
        },
        outputs={
            "item_ids": Tensor("string", (None, None)),
            "scores": Tensor("float32", (None, None)),
            "titles": Tensor("string", (None, None)),
        },
    ),
    RANK: Signature(
        inputs={**_QUERY_INPUTS, "candidate_item_ids": Tensor("string", (None, None))},
        outputs={"ratings": Tensor("float32", (None, None))},
    ),
    QUERY_EMBEDDING: Signature(
        inputs=dict(_QUERY_INPUTS),
        outputs={"embeddings": Tensor("float32", (None, None))},
    ),
    CANDIDATE_EMBEDDING: Signature(
        inputs={name: _BATCH_STRING for name in CANDIDATE_FEATURES},
        outputs={"embeddings": Tensor("float32", (None, None))},
    ),
}

#: Warm-up requests TF Serving replays before a version turns AVAILABLE.
WARMUP_FILE = "tf_serving_warmup_requests"
#: Where an export's index settings and recall check are written (under ``assets.extra``).
RECALL_FILE = "recall_check.json"

#: The retrieve signature's per-query controls and the rank signature's candidates: the input
#: names beyond the query features, for code that fills them by name (clients, REST tests).
K = "k"
EXCLUDE_ITEM_IDS = "exclude_item_ids"
DIVERSITY = "diversity"
CANDIDATE_ITEM_IDS = "candidate_item_ids"
assert {K, EXCLUDE_ITEM_IDS, DIVERSITY} <= set(SIGNATURES[RETRIEVE].inputs)
assert CANDIDATE_ITEM_IDS in SIGNATURES[RANK].inputs


def similarity_vectors(embeddings: np.ndarray, atol: float = 1e-3) -> np.ndarray:
    """The unit vectors of ``embeddings`` ``[N, E]`` from an embedding signature: all ``E``
    columns when every row is unit-length, else the leading ``E - 1`` (a prior column
    follows them). Either way cosine similarities between the rows are what they should be:
    with an all-zero prior column both readings agree."""
    embeddings = np.asarray(embeddings, dtype=np.float32)
    if not embeddings.size:
        return embeddings
    norms = np.linalg.norm(embeddings, axis=-1)
    if np.allclose(norms, 1.0, atol=atol):
        return embeddings
    return embeddings[..., :-1]
