"""Training throughput of the two-tower model: examples/s of the real distributed train step.

``python benchmarks/train_throughput.py [--quick] [--preset minilm] [--data DIR --split p1]``

For each text mode, sequence length and batch size it builds the model exactly as the trainer
does (:func:`trainer.train_step.build_for_training`,
:func:`trainer.train_step.make_train_step`), runs a few warm-up steps (tracing), then times
steps on real batches:

* ``cached``: frozen BERT, text vectors precomputed once (the CPU default); the one-off cost of
  encoding every catalog/profile text is reported as ``cache_seconds``.
* ``frozen``: frozen BERT run live on every step (what ``cached`` saves).
* ``finetune``: BERT trained end to end, ``query_text`` as the query text (the GPU default).

Writes ``benchmarks/results/train_throughput.json`` and ``.md``. Without ``--data`` it uses a
small synthetic data set (texts are packed to the sequence length, so the cost per example does
not depend on the texts).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import trainer  # noqa: E402,F401  (TF_USE_LEGACY_KERAS before TensorFlow)
from common import staging  # noqa: E402

MODES = {
    "cached": {"freeze_bert": True, "cache_text": True, "query_text": "profile"},
    "frozen": {"freeze_bert": True, "cache_text": False, "query_text": "query_text"},
    "finetune": {"freeze_bert": False, "cache_text": False, "query_text": "query_text"},
}


def measure(args, mode: str, sequence_length: int, batch_size: int, data_dir: str) -> dict:
    import keras
    import tensorflow as tf

    from trainer import env as env_lib
    from trainer.config import TrainConfig
    from trainer.data import records
    from trainer.input_pipeline import plan_data
    from trainer.train_step import build_for_training, make_train_step

    keras.backend.clear_session()
    config = TrainConfig()
    config.data.data, config.data.split = data_dir, args.split
    config.model.preset = args.preset
    config.model.sequence_length = sequence_length
    for name, value in MODES[mode].items():
        setattr(config.model, name, value)
    config.optim.batch_size = batch_size
    has_gpu = env_lib.gpu_count() > 0
    config = config.resolve(has_gpu=has_gpu)
    strategy = tf.distribute.get_strategy()
    precision = env_lib.configure_precision(config.runtime.mixed_precision)
    plan = plan_data(config)
    started = time.time()
    model, optimizers, var_lists = build_for_training(
        config, plan.assets, strategy, total_steps=1000, precision=precision
    )
    build_seconds = time.time() - started
    step = make_train_step(model, config, strategy, optimizers, var_lists, precision)
    ds = records.make_dataset(data_dir, args.split, "train", batch_size, shuffle=True, seed=0,
                              repeat=True, drop_remainder=True)  # fmt: skip
    batches = iter(strategy.experimental_distribute_dataset(ds))
    stop = tf.constant(0.0)
    for _ in range(args.warmup):
        float(step(next(batches), stop)["loss"])
    started = time.time()
    for _ in range(args.steps):
        out = step(next(batches), stop)
    float(out["loss"])  # wait for the last step
    elapsed = time.time() - started
    texts = len(model.item_text_cache.keys) + (
        len(model.profile_cache.keys) if model.profile_cache is not None else 0
    )
    return {
        "mode": mode,
        "sequence_length": sequence_length,
        "batch_size": batch_size,
        "examples_per_second": round(batch_size * args.steps / elapsed, 1),
        "step_ms": round(1000 * elapsed / args.steps, 1),
        "cached_texts": texts if mode == "cached" else 0,
        "build_and_cache_seconds": round(build_seconds, 1),
        "precision": precision,
        "trainable_weights": int(
            sum(int(v.shape.num_elements()) for v in model.trainable_variables)
        ),  # fmt: skip
    }


def to_markdown(report: dict) -> str:
    lines = [
        f"# Training throughput ({report['device']}, preset {report['preset']})",
        "",
        f"{report['steps']} timed steps after {report['warmup']} warm-up steps; "
        f"data: {report['data']}; TensorFlow {report['tensorflow']}.",
        "",
        "| mode | seq len | batch | examples/s | ms/step | build+cache s | trainable weights |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in report["results"]:
        lines.append(
            f"| {r['mode']} | {r['sequence_length']} | {r['batch_size']} | "
            f"{r['examples_per_second']:,.0f} | {r['step_ms']:,.0f} | "
            f"{r['build_and_cache_seconds']} | {r['trainable_weights']:,} |"
        )
    lines += [
        "",
        "`cached`: frozen BERT, vectors precomputed (the step never runs BERT; "
        "`build+cache` includes encoding every catalog and profile text once). "
        "`frozen`: the same BERT run live on every step. `finetune`: BERT trains.",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a short CPU run")
    parser.add_argument("--preset", default="minilm")
    parser.add_argument("--data", help="prepared data dir (default: small synthetic data)")
    parser.add_argument("--split", default="p1")
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--sequence-lengths", default="32,64")
    parser.add_argument("--batch-sizes", help="default: 32,128 (--quick) or 64,256,1024")
    parser.add_argument("--live-batch-sizes", help="batches for frozen/finetune (default: same; "
                        "--quick: 32)")  # fmt: skip
    parser.add_argument("--steps", type=int, help="timed steps (default 3 quick, 20)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--output", default=os.path.join(REPO, "benchmarks", "results",
                                                         "train_throughput"))  # fmt: skip
    args = parser.parse_args(argv)
    args.steps = args.steps or (3 if args.quick else 20)
    if args.quick:
        args.warmup = min(args.warmup, 1)
    batches = [int(b) for b in (args.batch_sizes or ("32,128" if args.quick else
                                                     "64,256,1024")).split(",")]  # fmt: skip
    live_batches = [int(b) for b in args.live_batch_sizes.split(",")] if args.live_batch_sizes \
        else ([32] if args.quick else batches)  # fmt: skip
    lengths = [int(n) for n in args.sequence_lengths.split(",")]
    modes = args.modes.split(",")

    import tensorflow as tf

    from trainer import env as env_lib

    with tempfile.TemporaryDirectory() as tmp:
        data_dir = args.data
        if not data_dir:
            from trainer.data.prepare import prepare_synthetic

            data_dir = os.path.join(tmp, "data")
            prepare_synthetic(data_dir, num_users=200, num_items=300, num_ratings=20_000, seed=0)
        results = []
        for mode in modes:
            for length in lengths:
                for batch in batches if mode == "cached" else live_batches:
                    row = measure(args, mode, length, batch, data_dir)
                    print(json.dumps(row), flush=True)
                    results.append(row)
    gpus = tf.config.list_physical_devices("GPU")
    device = f"{len(gpus)} GPU(s)" if gpus else f"CPU, {os.cpu_count()} cores"
    report = {
        "device": device,
        "platform": platform.platform(),
        "tensorflow": tf.__version__,
        "preset": args.preset,
        "data": args.data or "synthetic (200 users, 300 items, 20,000 ratings)",
        "steps": args.steps,
        "warmup": args.warmup,
        "gpu_count": env_lib.gpu_count(),
        "results": results,
    }
    for ext, text in ((".json", json.dumps(report, indent=2)), (".md", to_markdown(report))):
        staging.write_text(args.output + ext, text)
    print(to_markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
