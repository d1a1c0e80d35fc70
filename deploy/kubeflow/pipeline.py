"""KFP v2 pipeline: prepare -> train -> evaluate -> [quality gate] -> export -> deploy.

``python -m deploy.kubeflow.pipeline --output pipeline.yaml [--image IMAGE]`` compiles it to the
KFP IR YAML, which runs on Kubeflow Pipelines 2.x or Vertex AI Pipelines (``aiplatform.
PipelineJob(template_path="pipeline.yaml", ...)``).

Every step is a container component running the training image (trainer/Dockerfile) with the
project's own CLIs, so the pipeline holds no training logic of its own:

* prepare:  ``python -m trainer.data prepare --dataset D --output DATA``
* train:    ``python -m trainer.task --data DATA --split S --model-dir MODEL``
* evaluate: ``python -m trainer.evaluate --data DATA --split S --model-dir MODEL --output R.json``;
  every figure of the report (the protocol's recall@10, NDCG@10, ...) is logged to a
  ``dsl.Metrics`` artifact (shown by the KFP / Vertex AI Pipelines UI and lineage);
* gate:     reads ``gate_metric`` from that artifact and returns whether it is at least
  ``gate_threshold``; everything after runs under ``dsl.If(gate passed)``;
* export:   ``python -m trainer.export --model-dir MODEL --export-base EXPORT --model-name N
  --index brute_force|scann``; outputs the model base URI ``EXPORT/N`` (numbered versions);
* deploy, by the ``deploy_target`` parameter:
  ``vertex``: the model base is imported as an ``UnmanagedContainerModel`` served by the TF
  Serving image (``serving_image``: serving/docker/Dockerfile.tfserving for a brute-force export,
  Dockerfile.tfserving-scann for ScaNN), uploaded to the Vertex AI Model Registry
  (``ModelUploadOp``), and deployed to a new Endpoint (``EndpointCreateOp`` + ``ModelDeployOp``,
  google-cloud-pipeline-components); ``serving_path`` (open-source KFP): copies ``EXPORT/N/<v>``
  to ``<serving_base>/N/<w>/`` where ``w`` is above every version already served, so TF Serving
  (``latest`` policy, serving/k8s) picks it up and never sees a half-copied version; any other
  value fails the run.

The Python components (evaluate, gate) run in the training image with the kfp SDK already
installed there (trainer/Dockerfile), so no step installs packages at run time.

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
SERVING_IMAGE = "us-docker.pkg.dev/PROJECT_ID/recsys/movielens-tfserving:2.20.0"
TASK_NAMES = ("prepare", "train", "evaluate", "gate", "export")
VERTEX_TASKS = ("importer", "model-upload", "endpoint-create", "model-deploy")

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


# Writes EXPORT/<name> (the TF Serving model base Vertex AI serves from) to the output file.
_EXPORT_SCRIPT = """
set -eu
python -m trainer.export --model-dir "$1" --export-base "$2" --model-name "$3" --index "$4"
mkdir -p "$(dirname "$6")"
printf '%s/%s' "${5%/}" "$3" > "$6"
"""


def evaluate(
    split: str,
    extra_args: str,
    data: dsl.Input[dsl.Dataset],
    model: dsl.Input[dsl.Model],
    report: dsl.Output[dsl.Artifact],
    metrics: dsl.Output[dsl.Metrics],
):
    """Runs trainer.evaluate; logs every number of its report's ``metrics`` to ``metrics``."""
    import json
    import shlex
    import subprocess
    import sys

    command = [sys.executable, "-m", "trainer.evaluate", "--data", data.path, "--split", split,
               "--model-dir", model.path, "--output", report.path]  # fmt: skip
    subprocess.run([*command, *shlex.split(extra_args)], check=True)
    with open(report.path) as f:
        figures = json.load(f)["metrics"]
    for name, value in sorted(figures.items()):
        if isinstance(value, int | float) and not isinstance(value, bool):
            metrics.log_metric(name, float(value))


def gate(metrics: dsl.Input[dsl.Metrics], metric: str, threshold: float) -> bool:
    """Whether ``metric`` of the evaluation's Metrics artifact is at least ``threshold``."""
    if metric not in metrics.metadata:
        raise ValueError(f"the evaluation logged no {metric!r}; it has {sorted(metrics.metadata)}")
    value = float(metrics.metadata[metric])
    passed = value >= threshold
    print(f"{metric} = {value:.4f}, threshold {threshold}: {'deploy' if passed else 'stop'}")
    return passed


def reject_deploy_target(deploy_target: str):
    """Fails the run: ``deploy_target`` is neither ``vertex`` nor ``serving_path``."""
    raise ValueError(f"deploy_target {deploy_target!r}: use 'vertex' or 'serving_path'")


def build_pipeline(image: str = DEFAULT_IMAGE) -> Callable[..., Any]:
    """Returns the pipeline function; components are defined here so ``image`` is configurable."""
    from google_cloud_pipeline_components.types import artifact_types
    from google_cloud_pipeline_components.v1.endpoint import EndpointCreateOp, ModelDeployOp
    from google_cloud_pipeline_components.v1.model import ModelUploadOp

    # The training image has the project and kfp installed: nothing is pip-installed at run time.
    python_component = dsl.component(base_image=image, install_kfp_package=False)
    evaluate_op = python_component(evaluate)
    gate_op = python_component(gate)
    reject_op = python_component(reject_deploy_target)

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
            args=["--data", data.path, "--split", split, "--model-dir", model.path,
                  "--no-progress"],
        )  # fmt: skip

    @dsl.container_component
    def export(
        model_name: str,
        index: str,
        model: dsl.Input[dsl.Model],
        export_base: dsl.Output[dsl.Artifact],
        model_uri: dsl.OutputPath(str),
    ):
        """Writes <export_base>/<model_name>/<version>/; outputs that model base's URI."""
        return dsl.ContainerSpec(
            image=image,
            command=["sh", "-c", _EXPORT_SCRIPT, "export"],
            args=[model.path, export_base.path, model_name, index, export_base.uri, model_uri],
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
        description="Prepare MovieLens, train the two-tower BERT model, evaluate into a Metrics "
        "artifact, and - if the gate passes - export and deploy to a Vertex AI Endpoint or a TF "
        "Serving model base.",
    )
    def pipeline(
        project: str = "PROJECT_ID",
        location: str = "us-central1",
        deploy_target: str = "vertex",
        serving_base: str = "",
        serving_image: str = SERVING_IMAGE,
        serving_machine_type: str = "n1-standard-4",
        dataset: str = "ml-100k",
        split: str = "p2",
        model_name: str = "movielens",
        index: str = "brute_force",
        gate_metric: str = "recall@10",
        gate_threshold: float = 0.05,
        evaluate_args: str = "--no-mmr",
    ):
        prepare_task = prepare(dataset=dataset).set_display_name("prepare")
        train_task = train(split=split, data=prepare_task.outputs["data"])
        train_task.set_display_name("train")
        # One GPU; Kubeflow needs a GPU node pool, Vertex AI Pipelines provisions it.
        train_task.set_accelerator_type("NVIDIA_TESLA_A100").set_accelerator_limit(1)
        train_task.set_cpu_limit("8").set_memory_limit("48G")
        eval_task = evaluate_op(
            split=split,
            extra_args=evaluate_args,
            data=prepare_task.outputs["data"],
            model=train_task.outputs["model"],
        ).set_display_name("evaluate")
        gate_task = gate_op(
            metrics=eval_task.outputs["metrics"], metric=gate_metric, threshold=gate_threshold
        ).set_display_name("gate")
        with dsl.If(gate_task.output == True, name="quality-gate"):  # noqa: E712 (a KFP condition)
            export_task = export(
                model_name=model_name, index=index, model=train_task.outputs["model"]
            ).set_display_name("export")
            with dsl.If(deploy_target == "vertex", name="deploy-vertex"):
                model_artifact = dsl.importer(
                    artifact_uri=export_task.outputs["model_uri"],
                    artifact_class=artifact_types.UnmanagedContainerModel,
                    # Vertex AI sets AIP_HTTP_PORT (8080: no ports given) and AIP_STORAGE_URI;
                    # the image's entrypoint maps them to --rest_api_port and the base path.
                    metadata={
                        "containerSpec": {
                            "imageUri": serving_image,
                            "predictRoute": "/v1/models/movielens:predict",
                            "healthRoute": "/v1/models/movielens",
                        }
                    },
                ).set_display_name("import-model")
                upload_task = ModelUploadOp(
                    project=project,
                    location=location,
                    display_name=model_name,
                    unmanaged_container_model=model_artifact.outputs["artifact"],
                ).set_display_name("model-upload")
                endpoint_task = EndpointCreateOp(
                    project=project, location=location, display_name=model_name
                ).set_display_name("endpoint-create")
                deploy_task = ModelDeployOp(
                    model=upload_task.outputs["model"],
                    endpoint=endpoint_task.outputs["endpoint"],
                    dedicated_resources_machine_type=serving_machine_type,
                    dedicated_resources_min_replica_count=1,
                    dedicated_resources_max_replica_count=3,
                    traffic_split={"0": 100},
                ).set_display_name("model-deploy")
                for task in (upload_task, endpoint_task, deploy_task):
                    task.set_caching_options(False)  # side effects on Vertex AI
            with dsl.Elif(deploy_target == "serving_path", name="deploy-serving-path"):
                push_task = push(
                    model_name=model_name,
                    serving_base=serving_base,
                    export_base=export_task.outputs["export_base"],
                ).set_display_name("push")
                # Pushing is a side effect on the serving folder: never reuse a cached result.
                push_task.set_caching_options(False)
            with dsl.Else(name="unknown-deploy-target"):
                reject_op(deploy_target=deploy_target).set_display_name("reject-deploy-target")

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
