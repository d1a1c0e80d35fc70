"""Validate and submit a Vertex AI CustomJob spec (the YAML files next to this module).

``python -m deploy.vertex.submit --spec deploy/vertex/custom_job_1gpu.yaml --project P --region R
[--staging-bucket gs://B] [--tensorboard ID] [--display-name NAME] [--dry-run] [--wait]``

A spec is a ``CustomJobSpec`` in the REST shape (camelCase, as read by ``gcloud ai custom-jobs
create --config``). The placeholders ``PROJECT_ID`` and ``gs://BUCKET`` in it are replaced by
``--project`` and ``--staging-bucket``; in the ``tensorboard`` resource name ``REGION`` and
``TENSORBOARD_ID`` are replaced by ``--region`` and ``--tensorboard``. The job is submitted
with ``google.cloud.aiplatform`` when that package is importable and Application Default
Credentials exist; otherwise (and always with ``--dry-run``) the exact ``CustomJob`` request
body is printed as JSON on stdout and the reason it was not submitted on stderr.

Exit codes: 0 submitted or dry run; 1 not submitted (no SDK / no credentials / API error);
2 invalid arguments or spec (one ``error:`` line per problem).
"""

from __future__ import annotations

import argparse
import copy
import json
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

PROJECT_PLACEHOLDER = "PROJECT_ID"
BUCKET_PLACEHOLDER = "gs://BUCKET"
REGION_PLACEHOLDER = "/locations/REGION/"
TENSORBOARD_PLACEHOLDER = "TENSORBOARD_ID"
PLACEHOLDERS = (
    PROJECT_PLACEHOLDER,
    BUCKET_PLACEHOLDER,
    REGION_PLACEHOLDER,
    TENSORBOARD_PLACEHOLDER,
)
TENSORBOARD_RE = re.compile(r"^projects/[^/]+/locations/[^/]+/tensorboards/[^/]+$")

# CustomJobSpec fields (REST names). gcloud rejects unknown keys, so this module does too.
SPEC_FIELDS = frozenset(
    {
        "workerPoolSpecs",
        "baseOutputDirectory",
        "scheduling",
        "serviceAccount",
        "network",
        "reservedIpRanges",
        "enableWebAccess",
        "enableDashboardAccess",
        "tensorboard",
        "experiment",
        "experimentRun",
        "models",
        "persistentResourceId",
        "protectedArtifactLocationId",
        "pscInterfaceConfig",
    }
)
POOL_FIELDS = frozenset(
    {"machineSpec", "replicaCount", "diskSpec", "nfsMounts", "containerSpec", "pythonPackageSpec"}
)
# Vertex pool order: 0 chief/primary, 1 workers, 2 parameter servers, 3 evaluators.
MAX_POOLS = 4
ACCELERATOR_RE = re.compile(r"^(NVIDIA_[A-Z0-9_]+|TPU_[A-Z0-9_]+)$")
REGION_RE = re.compile(r"^[a-z]+-[a-z]+[0-9]+$")
DURATION_RE = re.compile(r"^([0-9]+)(\.[0-9]+)?s$")


class SpecError(ValueError):
    """A spec that Vertex AI would reject (or that would not run this project's trainer)."""

    def __init__(self, problems: Sequence[str]) -> None:
        super().__init__("; ".join(problems))
        self.problems = list(problems)


def load_spec(path: str | Path) -> dict[str, Any]:
    """Reads a CustomJobSpec YAML file; raises SpecError if it is missing or not a mapping."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise SpecError([f"cannot read {path}: {exc.strerror or exc}"]) from exc
    except yaml.YAMLError as exc:
        raise SpecError([f"{path} is not valid YAML: {exc}"]) from exc
    if not isinstance(data, dict):
        raise SpecError(
            [f"{path}: expected a mapping (a CustomJobSpec), got {type(data).__name__}"]
        )
    return data


def fill_placeholders(
    spec: Any,
    project: str,
    bucket: str | None,
    region: str | None = None,
    tensorboard: str | None = None,
) -> Any:
    """Returns a copy of ``spec`` with PROJECT_ID and (when given) gs://BUCKET, the REGION and
    TENSORBOARD_ID of a Vertex TensorBoard resource name substituted."""
    if isinstance(spec, dict):
        return {
            k: fill_placeholders(v, project, bucket, region, tensorboard) for k, v in spec.items()
        }
    if isinstance(spec, list):
        return [fill_placeholders(v, project, bucket, region, tensorboard) for v in spec]
    if isinstance(spec, str):
        spec = spec.replace(PROJECT_PLACEHOLDER, project)
        if bucket:
            spec = spec.replace(BUCKET_PLACEHOLDER, bucket.rstrip("/"))
        if region:
            spec = spec.replace(REGION_PLACEHOLDER, f"/locations/{region}/")
        if tensorboard:
            spec = spec.replace(TENSORBOARD_PLACEHOLDER, tensorboard)
        return spec
    return copy.deepcopy(spec)


def find_placeholders(spec: Any, path: str = "") -> list[str]:
    """Paths of the strings that still contain a placeholder (they cannot be submitted)."""
    if isinstance(spec, dict):
        return [p for key, value in spec.items() for p in find_placeholders(value, f"{path}.{key}")]
    if isinstance(spec, list):
        return [p for i, value in enumerate(spec) for p in find_placeholders(value, f"{path}[{i}]")]
    if isinstance(spec, str) and any(p in spec for p in PLACEHOLDERS):
        return [path.lstrip(".")]
    return []


def _is_positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _check_machine(where: str, machine: Any) -> list[str]:
    if not isinstance(machine, dict):
        return [f"{where}.machineSpec is required (a mapping)"]
    problems = []
    if not isinstance(machine.get("machineType"), str) or not machine.get("machineType"):
        problems.append(f"{where}.machineSpec.machineType is required")
    accel_type = machine.get("acceleratorType")
    accel_count = machine.get("acceleratorCount")
    if (accel_type is None) != (accel_count is None):
        problems.append(f"{where}.machineSpec: give acceleratorType and acceleratorCount together")
    if accel_type is not None and (
        not isinstance(accel_type, str) or not ACCELERATOR_RE.match(accel_type)
    ):
        problems.append(
            f"{where}.machineSpec.acceleratorType {accel_type!r} is not an accelerator name "
            "(e.g. NVIDIA_TESLA_A100, NVIDIA_H100_80GB, NVIDIA_L4)"
        )
    if accel_count is not None and not _is_positive_int(accel_count):
        problems.append(f"{where}.machineSpec.acceleratorCount must be an integer >= 1")
    return problems


def _check_code(where: str, pool: dict[str, Any]) -> list[str]:
    container, package = pool.get("containerSpec"), pool.get("pythonPackageSpec")
    if (container is None) == (package is None):
        return [f"{where}: give exactly one of containerSpec and pythonPackageSpec"]
    problems = []
    if container is not None:
        if not isinstance(container, dict) or not container.get("imageUri"):
            return [f"{where}.containerSpec.imageUri is required"]
        for key in ("command", "args"):
            if key in container and not _is_str_list(container[key]):
                problems.append(f"{where}.containerSpec.{key} must be a list of strings")
        return problems
    if not isinstance(package, dict):
        return [f"{where}.pythonPackageSpec must be a mapping"]
    if not package.get("executorImageUri"):
        problems.append(f"{where}.pythonPackageSpec.executorImageUri is required")
    uris = package.get("packageUris")
    if not _is_str_list(uris) or not uris:
        problems.append(f"{where}.pythonPackageSpec.packageUris must be a non-empty list")
    elif bad := [u for u in uris if not u.startswith("gs://")]:
        problems.append(f"{where}.pythonPackageSpec.packageUris must be gs:// URIs: {bad}")
    if not package.get("pythonModule"):
        problems.append(f"{where}.pythonPackageSpec.pythonModule is required")
    if "args" in package and not _is_str_list(package["args"]):
        problems.append(f"{where}.pythonPackageSpec.args must be a list of strings")
    return problems


def _is_str_list(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) for v in value)


def validate_spec(spec: dict[str, Any], region: str | None = None) -> None:
    """Checks the structure Vertex AI requires; raises SpecError listing every problem.

    With ``region``, a TensorBoard resource name must be in that region (Vertex refuses one
    from another region)."""
    problems = [f"unknown CustomJobSpec field {key!r}" for key in spec if key not in SPEC_FIELDS]
    pools = spec.get("workerPoolSpecs")
    if not isinstance(pools, list) or not pools:
        problems.append("workerPoolSpecs must be a non-empty list")
        pools = []
    if len(pools) > MAX_POOLS:
        problems.append(f"workerPoolSpecs has {len(pools)} pools; Vertex AI allows {MAX_POOLS}")
    for index, pool in enumerate(pools):
        where = f"workerPoolSpecs[{index}]"
        if not isinstance(pool, dict):
            problems.append(f"{where} must be a mapping")
            continue
        # An empty pool ({}) is how the REST API skips a pool index (e.g. no parameter servers).
        if not pool and index > 0:
            continue
        problems += [f"{where}: unknown field {key!r}" for key in pool if key not in POOL_FIELDS]
        replicas = pool.get("replicaCount")
        if not _is_positive_int(replicas):
            problems.append(f"{where}.replicaCount must be an integer >= 1")
        elif index == 0 and replicas != 1:
            problems.append(f"{where} is the chief pool: replicaCount must be 1, not {replicas}")
        problems += _check_machine(where, pool.get("machineSpec"))
        problems += _check_code(where, pool)
    output = spec.get("baseOutputDirectory")
    prefix = output.get("outputUriPrefix") if isinstance(output, dict) else None
    if not isinstance(prefix, str) or not prefix.startswith("gs://"):
        problems.append(
            "baseOutputDirectory.outputUriPrefix must be a gs:// prefix "
            "(Vertex derives AIP_MODEL_DIR / AIP_CHECKPOINT_DIR / AIP_TENSORBOARD_LOG_DIR from it)"
        )
    tensorboard = spec.get("tensorboard")
    if tensorboard is not None:
        if not isinstance(tensorboard, str) or not TENSORBOARD_RE.match(tensorboard):
            problems.append(
                f"tensorboard {tensorboard!r} must be projects/P/locations/R/tensorboards/ID"
            )
        elif region and f"/locations/{region}/" not in tensorboard:
            problems.append(f"tensorboard {tensorboard!r} is not in the job's region {region}")
        if not spec.get("serviceAccount"):
            problems.append("tensorboard needs serviceAccount (Vertex AI requires one with it)")
    scheduling = spec.get("scheduling", {})
    if not isinstance(scheduling, dict):
        problems.append("scheduling must be a mapping")
    elif "timeout" in scheduling and not DURATION_RE.match(str(scheduling["timeout"])):
        problems.append(f"scheduling.timeout {scheduling['timeout']!r} must look like '86400s'")
    if problems:
        raise SpecError(problems)


def job_request(spec: dict[str, Any], display_name: str, project: str, region: str) -> dict:
    """The REST ``customJobs.create`` call this job amounts to: parent + CustomJob body."""
    return {
        "parent": f"projects/{project}/locations/{region}",
        "customJob": {"displayName": display_name, "jobSpec": spec},
    }


def submission_blocker() -> str | None:
    """Why the job cannot be submitted from here, or None when the SDK and credentials exist."""
    try:
        import google.auth
        from google.auth.exceptions import DefaultCredentialsError
        from google.cloud import aiplatform  # noqa: F401
    except ImportError as exc:
        return f"google-cloud-aiplatform is not importable ({exc})"
    try:
        google.auth.default()
    except DefaultCredentialsError as exc:
        return f"no Google Cloud credentials (google.auth.default() failed: {exc})"
    return None


def _seconds(duration: str) -> int:
    match = DURATION_RE.match(duration)
    assert match is not None  # validate_spec checked it
    return int(match.group(1))


def submit(
    spec: dict[str, Any],
    display_name: str,
    project: str,
    region: str,
    staging_bucket: str | None,
    wait: bool,
) -> str:
    """Creates the CustomJob with the Vertex AI SDK; returns its resource name."""
    from google.cloud import aiplatform
    from google.cloud.aiplatform import gapic

    unsupported = set(spec) - {
        "workerPoolSpecs",
        "baseOutputDirectory",
        "scheduling",
        "serviceAccount",
        "network",
        "enableWebAccess",
        "tensorboard",
        "persistentResourceId",
    }
    if unsupported:
        raise SpecError([f"field(s) {sorted(unsupported)} are not mapped to the SDK; use gcloud"])
    # from_json accepts the REST (camelCase) names and rejects unknown fields.
    pools = [gapic.WorkerPoolSpec.from_json(json.dumps(pool)) for pool in spec["workerPoolSpecs"]]
    bucket = staging_bucket or spec["baseOutputDirectory"]["outputUriPrefix"]
    aiplatform.init(project=project, location=region, staging_bucket=bucket)
    job = aiplatform.CustomJob(
        display_name=display_name,
        worker_pool_specs=pools,
        base_output_dir=spec["baseOutputDirectory"]["outputUriPrefix"],
        staging_bucket=bucket,
        persistent_resource_id=spec.get("persistentResourceId"),
    )
    scheduling = spec.get("scheduling", {})
    kwargs: dict[str, Any] = {
        "service_account": spec.get("serviceAccount"),
        "network": spec.get("network"),
        "enable_web_access": bool(spec.get("enableWebAccess", False)),
        "tensorboard": spec.get("tensorboard"),
        "restart_job_on_worker_restart": bool(scheduling.get("restartJobOnWorkerRestart", False)),
    }
    if "timeout" in scheduling:
        kwargs["timeout"] = _seconds(str(scheduling["timeout"]))
    if wait:
        job.run(sync=True, **kwargs)
    else:
        job.submit(**kwargs)
    return job.resource_name


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m deploy.vertex.submit",
        description="Validate a Vertex AI CustomJob spec and submit it (or print it).",
    )
    parser.add_argument("--spec", required=True, help="CustomJobSpec YAML (deploy/vertex/*.yaml)")
    parser.add_argument("--project", required=True, help="Google Cloud project id")
    parser.add_argument("--region", required=True, help="Vertex AI region, e.g. us-central1")
    parser.add_argument("--staging-bucket", help="gs:// bucket; replaces gs://BUCKET in the spec")
    parser.add_argument(
        "--tensorboard", help="Vertex AI TensorBoard id; replaces TENSORBOARD_ID in the spec"
    )
    parser.add_argument("--display-name", help="job name (default: bert-two-tower-<spec name>)")
    parser.add_argument("--dry-run", action="store_true", help="validate and print; submit nothing")
    parser.add_argument("--wait", action="store_true", help="block until the job finishes")
    return parser


def _check_args(args: argparse.Namespace) -> list[str]:
    problems = []
    if not REGION_RE.match(args.region):
        problems.append(f"--region {args.region!r} does not look like a region (us-central1)")
    if args.staging_bucket and not args.staging_bucket.startswith("gs://"):
        problems.append(f"--staging-bucket must start with gs://, got {args.staging_bucket!r}")
    if args.tensorboard and not re.match(r"^[0-9]+$", args.tensorboard):
        problems.append(
            f"--tensorboard must be a TensorBoard's numeric id, got {args.tensorboard!r}"
        )
    if not re.match(r"^[a-z][a-z0-9-]{4,28}[a-z0-9]$", args.project):
        problems.append(f"--project {args.project!r} is not a valid project id")
    return problems


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        problems = _check_args(args)
        if problems:
            raise SpecError(problems)
        spec = fill_placeholders(
            load_spec(args.spec), args.project, args.staging_bucket, args.region, args.tensorboard
        )
        validate_spec(spec, args.region)
    except SpecError as exc:
        for problem in exc.problems:
            print(f"error: {problem}", file=sys.stderr)
        return 2
    display_name = args.display_name or f"bert-two-tower-{Path(args.spec).stem.replace('_', '-')}"
    request = job_request(spec, display_name, args.project, args.region)

    blocker = "--dry-run given" if args.dry_run else None
    if blocker is None and (left := find_placeholders(spec)):
        blocker = (
            f"placeholders left in {left}; pass --staging-bucket / --tensorboard or edit the spec"
        )
    if blocker is None:
        blocker = submission_blocker()
    if blocker is not None:
        print(json.dumps(request, indent=2, sort_keys=False))
        print(f"not submitted: {blocker}", file=sys.stderr)
        return 0 if args.dry_run else 1
    try:
        name = submit(spec, display_name, args.project, args.region, args.staging_bucket, args.wait)
    except SpecError as exc:
        for problem in exc.problems:
            print(f"error: {problem}", file=sys.stderr)
        return 2
    except Exception as exc:  # API errors (permissions, quota): report, do not trace back
        print(json.dumps(request, indent=2))
        print(f"not submitted: Vertex AI refused the job: {exc}", file=sys.stderr)
        return 1
    print(f"submitted: {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
