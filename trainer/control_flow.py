"""``tf.cond`` that stays a functional ``If`` in the saved graph.

TensorFlow lowers a v2 ``If`` to ``Switch``/``Merge`` when a graph runs (the
``LowerFunctionalOpsPass``), so the untaken branch's nodes are still scheduled, as dead ones:
every variable the branch reads gets its own ``VarHandleOp`` and ``Switch``. The export's
rare-path branches (BERT on the texts no table holds, the MMR loop) read hundreds of variables,
and on a known-text request the dead nodes were about half of the 1,000 the executor ran.
A functional ``If`` runs only the branch its predicate picks. ``tf.cond`` has no public switch
for this, so the op's ``_lower_using_switch_merge`` attribute (the one the lowering pass
reads, and what ``cond_v2``'s own ``prevent_lowering`` sets) is set after it is built.
"""

from __future__ import annotations

from collections.abc import Callable

import tensorflow as tf
from tensorflow.core.framework import attr_value_pb2


def unlowered_cond(pred: tf.Tensor, true_fn: Callable, false_fn: Callable):
    """``tf.cond(pred, true_fn, false_fn)``; in a graph, its ``If`` op is never lowered.

    Eagerly it is plain ``tf.cond`` (only one branch runs anyway).
    """
    out = tf.cond(pred, true_fn, false_fn)
    if tf.executing_eagerly():
        return out
    for op in {t.op for t in tf.nest.flatten(out)}:
        while op.type == "Identity":  # cond_v2 returns identities of the If op's outputs
            op = op.inputs[0].op
        if op.type in ("If", "StatelessIf"):
            op._set_attr("_lower_using_switch_merge", attr_value_pb2.AttrValue(b=False))  # noqa: SLF001
    return out
