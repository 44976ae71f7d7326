"""`thaw render`'s output folder: kustomize-ready YAML, the Knative feature flags, and Dockerfiles. The
folder is built beside the target and swapped in whole, so a crash never leaves half of it."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import yaml

from thaw.vllm_platform import VLLM_CUDA_VERSION

from .render import needed_feature_flags

GROUPS = (  # file name, kinds it holds (apply order follows the kustomization's resource order)
    ("00-config.yaml", {"ConfigMap", "ServiceAccount", "Role", "RoleBinding"}),
    ("10-fluid.yaml", {"Dataset", "JuiceFSRuntime", "ThinRuntime", "DataLoad"}),
    ("20-serving.yaml", {"Service"}),
    ("30-eventing.yaml", {"Broker", "ApiServerSource", "Trigger"}),
)

DOCKERFILES = {
    "Dockerfile.function": f"""\
# The function: vLLM's CUDA build, the version thaw's engine adapter runs against on GPU nodes (docs/gpu.md),
# plus thaw with its own dependencies; `thaw function serve` is the container's args.
FROM vllm/vllm-openai:v{VLLM_CUDA_VERSION}
WORKDIR /src
COPY . /src
RUN pip install --no-cache-dir "/src[gpu]"
ENV HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
ENTRYPOINT ["thaw"]
""",
    "Dockerfile.cache-warmer": """\
# The cache warmer: no vLLM, only the stager and its CloudEvents service.
FROM python:3.11-slim
WORKDIR /src
COPY . /src
RUN pip install --no-cache-dir --no-deps /src && pip install --no-cache-dir \\
      flask gunicorn pydantic typer rich boto3 cloudevents prometheus_client pyyaml aiohttp psutil kubernetes
ENV PYTHONUNBUFFERED=1
ENTRYPOINT ["thaw"]
""",
    "Dockerfile.router": """\
# The inference-graph router: aiohttp, no model.
FROM python:3.11-slim
WORKDIR /src
COPY . /src
RUN pip install --no-cache-dir --no-deps /src && pip install --no-cache-dir \\
      aiohttp uvloop pydantic typer rich cloudevents pyyaml
ENV PYTHONUNBUFFERED=1
ENTRYPOINT ["thaw"]
""",
}


def _dump_all(objects: list[dict[str, Any]]) -> str:
    return yaml.safe_dump_all(objects, sort_keys=False)


def write_output(objects: list[dict[str, Any]], out: Path) -> dict[str, str]:
    """Write the folder; returns the feature flags the output needs."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    staging.chmod(0o755)
    resources = []
    for filename, kinds in GROUPS:
        chosen = [o for o in objects if o["kind"] in kinds]
        if chosen:
            (staging / filename).write_text(_dump_all(chosen))
            resources.append(filename)
    (staging / "kustomization.yaml").write_text(yaml.safe_dump(
        {"apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization", "resources": resources},
        sort_keys=False))
    flags = needed_feature_flags(objects)
    patch = {"apiVersion": "v1", "kind": "ConfigMap",
             "metadata": {"name": "config-features", "namespace": "knative-serving"},
             "data": {flag: "enabled" for flag in flags}}
    (staging / "knative-config-features.yaml").write_text(
        "# Apply once per cluster (Knative Serving's feature flags this output needs):\n"
        + "".join(f"#   {flag}: {why}\n" for flag, why in flags.items())
        + "# kubectl patch -n knative-serving configmap/config-features --type merge --patch-file this-file\n"
        + yaml.safe_dump(patch, sort_keys=False))
    if any(o["kind"] == "Service" and o["spec"]["template"].get("metadata", {}).get("annotations", {}).get(
            "autoscaling.knative.dev/initial-scale") == "0" for o in objects):
        autoscaler = {"apiVersion": "v1", "kind": "ConfigMap",
                      "metadata": {"name": "config-autoscaler", "namespace": "knative-serving"},
                      "data": {"allow-zero-initial-scale": "true"}}
        (staging / "knative-config-autoscaler.yaml").write_text(
            "# Apply once per cluster: models start at zero (initial-scale 0), which Knative allows only with this.\n"
            "# kubectl patch -n knative-serving configmap/config-autoscaler --type merge --patch-file this-file\n"
            + yaml.safe_dump(autoscaler, sort_keys=False))
    docker = staging / "docker"
    docker.mkdir()
    for name, text in DOCKERFILES.items():
        (docker / name).write_text(text)
    for path in staging.rglob("*"):
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())
    old = out.with_name(f".{out.name}.old")
    if out.exists():
        shutil.rmtree(old, ignore_errors=True)
        out.rename(old)
    staging.rename(out)
    shutil.rmtree(old, ignore_errors=True)
    return flags
