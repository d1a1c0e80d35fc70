"""KFP v2 pipeline: prepare -> train -> evaluate -> [recall@10 gate] -> export -> push.

``python -m deploy.kubeflow.pipeline --output pipeline.yaml [--image IMAGE]`` compiles it to the
KFP IR YAML, which runs on Kubeflow Pipelines 2.x or Vertex AI Pipelines (``aiplatform.
PipelineJob(template_path="pipeline.yaml", ...)``).

Every step is a container component running the training image (trainer/Dockerfile) with the
project's own CLIs, so the pipeline holds no training logic of its own:

* prepare:  ``python -m trainer.data prepare --dataset D --output DATA``
* train:    ``python -m trainer.task --data DATA --split S --model-dir MODEL``
* evaluate: ``python -m trainer.evaluate --data DATA --split S --model-dir MODEL --output R.json``;
  ``metrics["recall@10"]`` of the report becomes the float output ``recall_at_10``;
* gate:     ``dsl.If(recall_at_10 >= min_recall_at_10)``: export and push run only above it;
* export:   ``python -m trainer.export --model-dir MODEL --export-base EXPORT --model-name N
  --index scann|brute_force``;
* push:     copies ``EXPORT/N/<v>`` to ``<serving_base>/N/<w>/`` where ``w`` is above every
  version already served, so TF Serving (``latest`` policy) picks it up and never sees a
  half-copied version.

Data, model and export are KFP artifacts: on Vertex AI Pipelines their paths are GCS FUSE
mounts (``/gcs/<pipeline root bucket>/...``), on Kubeflow they are staged by the KFP launcher.
"""

# No `from __future__ import annotations`: KFP reads the component signatures' annotations as
# live objects (dsl.Output[dsl.Dataset], dsl.OutputPath(float)), not strings.
import argparse
import sys
from collections.abc import Callable, Sequence
from typing import Any

from kfp import compiler, dsl

PIPELINE_NAME = "bert-two-tower-train-and-deploy"
DEFAULT_IMAGE = "us-docker.pkg.dev/PROJECT_ID/recsys/bert-two-tower-trainer:0.1.0"
TASK_NAMES = ("prepare", "train", "evaluate", "export", "push")

# Reads metrics["recall@10"] from the evaluation report into the KFP output parameter file.
_EVALUATE_SCRIPT = """
set -eu
mkdir -p "$(dirname "$5")" "$(dirname "$6")"
python -m trainer.evaluate --data "$1" --split "$2" --model-dir "$3" --output "$5" $4
python - "$5" "$6" <<'PY'
import json, sys
report = json.load(open(sys.argv[1]))
value = float(report["metrics"]["recall@10"])
open(sys.argv[2], "w").write(repr(value))
print(f"recall@10 = {value:.4f}")
PY
"""

# Copies the newest export version to <serving_base>/<name>/<w>/ (w above all served versions).
# tf.io.gfile handles local paths and gs://. Files go to a non-numeric staging dir first (TF
# Serving ignores non-numeric dirs); locally the final rename is atomic. On GCS a rename is a
# copy, so the staging step is skipped and saved_model.pb is written last: TF Serving retries a
# load that found it missing.
PUSH_SCRIPT = """
import os, sys, uuid
import tensorflow as tf

export_base, name, serving_base, version_out = sys.argv[1:5]
gfile = tf.io.gfile

def versions(path):
    if not gfile.isdir(path):
        return []
    return sorted(int(e.strip("/")) for e in gfile.listdir(path) if e.strip("/").isdigit())

exported = versions(os.path.join(export_base, name))
if not exported:
    sys.exit(f"error: no numeric version under {os.path.join(export_base, name)}")
src = os.path.join(export_base, name, str(exported[-1]))
served = versions(os.path.join(serving_base, name))
version = max([exported[-1]] + [v + 1 for v in served])
dst = os.path.join(serving_base, name, str(version))
remote = "://" in serving_base
staging = f".tmp-{version}-{uuid.uuid4().hex[:8]}"
stage = dst if remote else os.path.join(serving_base, name, staging)
files = [os.path.join(d, f) for d, _, fs in gfile.walk(src) for f in fs]
files.sort(key=lambda p: os.path.basename(p) == "saved_model.pb")
for path in files:
    target = os.path.join(stage, os.path.relpath(path, src))
    gfile.makedirs(os.path.dirname(target))
    gfile.copy(path, target, overwrite=False)
if stage != dst:
    gfile.rename(stage, dst)
os.makedirs(os.path.dirname(version_out) or ".", exist_ok=True)
open(version_out, "w").write(str(version))
print(f"pushed {src} -> {dst}")
"""


def _if_group() -> Callable[..., Any]:
    """``dsl.If`` (KFP >= 2.5), else the older ``dsl.Condition``: same compiled condition."""
    return getattr(dsl, "If", None) or dsl.Condition


def build_pipeline(image: str = DEFAULT_IMAGE) -> Callable[..., Any]:
    """Returns the pipeline function; components are defined here so ``image`` is configurable."""

    @dsl.container_component
    def prepare(dataset: str, data: dsl.Output[dsl.Dataset]):
        """Downloads/reads MovieLens and writes the prepared data directory."""
        return dsl.ContainerSpec(
            image=image,
            command=["python", "-m", "trainer.data", "prepare"],
            args=["--dataset", dataset, "--output", data.path],
        )

    @dsl.container_component
    def train(split: str, data: dsl.Input[dsl.Dataset], model: dsl.Output[dsl.Model]):
        """Trains the two-tower model (strategy chosen by trainer.task from the devices seen)."""
        return dsl.ContainerSpec(
            image=image,
            command=["python", "-m", "trainer.task"],
            args=[
                "--data",
                data.path,
                "--split",
                split,
                "--model-dir",
                model.path,
                "--no-progress",
            ],
        )

    @dsl.container_component
    def evaluate(
        split: str,
        extra_args: str,
        data: dsl.Input[dsl.Dataset],
        model: dsl.Input[dsl.Model],
        report: dsl.Output[dsl.Artifact],
        recall_at_10: dsl.OutputPath(float),
    ):
        """Evaluates the model; outputs the JSON report and its recall@10 as a float."""
        return dsl.ContainerSpec(
            image=image,
            command=["sh", "-c", _EVALUATE_SCRIPT, "evaluate"],
            args=[data.path, split, model.path, extra_args, report.path, recall_at_10],
        )

    @dsl.container_component
    def export(
        model_name: str,
        index: str,
        model: dsl.Input[dsl.Model],
        export_base: dsl.Output[dsl.Artifact],
    ):
        """Writes the TF Serving SavedModel to <export_base>/<model_name>/<version>/."""
        return dsl.ContainerSpec(
            image=image,
            command=["python", "-m", "trainer.export"],
            args=[
                "--model-dir",
                model.path,
                "--export-base",
                export_base.path,
                "--model-name",
                model_name,
                "--index",
                index,
            ],
        )

    @dsl.container_component
    def push(
        model_name: str,
        serving_base: str,
        export_base: dsl.Input[dsl.Artifact],
        version: dsl.OutputPath(str),
    ):
        """Copies the export's newest version into the TF Serving model base folder."""
        return dsl.ContainerSpec(
            image=image,
            command=["python", "-c", PUSH_SCRIPT],
            args=[export_base.path, model_name, serving_base, version],
        )

    @dsl.pipeline(
        name=PIPELINE_NAME,
        description="Prepare MovieLens, train the two-tower BERT model, evaluate, and export + "
        "push to the TF Serving model base only if recall@10 passes the gate.",
    )
    def pipeline(
        serving_base: str,
        dataset: str = "ml-100k",
        split: str = "p2",
        model_name: str = "movielens",
        index: str = "scann",
        min_recall_at_10: float = 0.05,
        evaluate_args: str = "--no-mmr",
    ):
        prepare_task = prepare(dataset=dataset).set_display_name("prepare")
        train_task = train(split=split, data=prepare_task.outputs["data"])
        train_task.set_display_name("train")
        # One GPU; Kubeflow needs a GPU node pool, Vertex AI Pipelines provisions it.
        train_task.set_accelerator_type("NVIDIA_TESLA_A100").set_accelerator_limit(1)
        train_task.set_cpu_limit("8").set_memory_limit("48G")
        eval_task = evaluate(
            split=split,
            extra_args=evaluate_args,
            data=prepare_task.outputs["data"],
            model=train_task.outputs["model"],
        ).set_display_name("evaluate")
        with _if_group()(
            eval_task.outputs["recall_at_10"] >= min_recall_at_10, name="quality-gate"
        ):
            export_task = export(
                model_name=model_name, index=index, model=train_task.outputs["model"]
            ).set_display_name("export")
            push_task = push(
                model_name=model_name,
                serving_base=serving_base,
                export_base=export_task.outputs["export_base"],
            ).set_display_name("push")
            # Pushing is a side effect on the serving folder: never reuse a cached result.
            push_task.set_caching_options(False)

    return pipeline


def compile_pipeline(path: str, image: str = DEFAULT_IMAGE) -> str:
    """Compiles the pipeline to KFP IR YAML at ``path``; returns the path."""
    compiler.Compiler().compile(pipeline_func=build_pipeline(image), package_path=path)
    return path


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m deploy.kubeflow.pipeline", description="Compile the KFP pipeline."
    )
    parser.add_argument("--output", default="pipeline.yaml", help="IR YAML to write")
    parser.add_argument(
        "--image", default=DEFAULT_IMAGE, help="training image (trainer/Dockerfile)"
    )
    args = parser.parse_args(argv)
    print(f"wrote {compile_pipeline(args.output, args.image)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
