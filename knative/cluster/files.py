"""`thaw render`'s output folder: kustomize-ready YAML, the Knative feature flags, and Dockerfiles. The
folder is built beside the target and swapped in whole, so a crash never leaves half of it."""

from __future__ import annotations

import importlib.resources
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import yaml

from .render import needed_feature_flags

GROUPS = (  # file name, kinds it holds (apply order follows the kustomization's resource order)
    ("00-config.yaml", {"ConfigMap", "ServiceAccount", "Role", "RoleBinding"}),
    ("10-fluid.yaml", {"Dataset", "JuiceFSRuntime", "ThinRuntime", "DataLoad"}),
    ("20-serving.yaml", {"Service"}),
    ("30-eventing.yaml", {"Broker", "ApiServerSource", "Trigger"}),
)

# The images' Dockerfiles live beside the code they package; the output folder gets a copy of each.
DOCKERFILES = {"Dockerfile.function": ("thaw.functions", "Dockerfile"),
               "Dockerfile.cache-warmer": ("thaw.cache_warmer", "Dockerfile"),
               "Dockerfile.router": ("thaw.eventing", "Dockerfile.router")}


def dockerfile(name: str) -> str:
    package, filename = DOCKERFILES[name]
    return importlib.resources.files(package).joinpath(filename).read_text()


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
    for name in DOCKERFILES:
        (docker / name).write_text(dockerfile(name))
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
