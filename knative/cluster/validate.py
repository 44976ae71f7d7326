"""Rendered objects checked before anything is written or applied: custom resources against their CRDs'
openAPIV3Schema (`schemas/`, copied from Knative, KServe and Fluid), core objects against Kubernetes'
schemas (kubernetes-validate), and what Knative's webhooks enforce that a schema cannot."""

from __future__ import annotations

import functools
import re
from pathlib import Path
from typing import Any

import jsonschema
import yaml

from thaw.durations import parse_duration
from thaw.spec import KPA_METRICS

SCHEMAS = Path(__file__).parent / "schemas"
KUBERNETES_VERSION = "1.30"
RESERVED_PORTS = {8012, 8013, 8022, 9090, 9091}  # Knative's queue-proxy and activator
DNS1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
MAX_REVISION_TIMEOUT = 600  # Knative's config-defaults max-revision-timeout-seconds
AUTOSCALING = "autoscaling.knative.dev/"
# Template annotations Knative's webhooks range-check: (parse, low, high, unit); high None: no upper bound.
ANNOTATION_RANGES = {
    AUTOSCALING + "min-scale": (float, 0, None, ""),
    AUTOSCALING + "max-scale": (float, 0, None, ""),
    AUTOSCALING + "initial-scale": (float, 0, None, ""),
    AUTOSCALING + "activation-scale": (float, 1, None, ""),
    AUTOSCALING + "target": (float, 0.01, None, ""),
    AUTOSCALING + "target-utilization-percentage": (float, 1, 100, ""),
    AUTOSCALING + "panic-window-percentage": (float, 1, 100, ""),
    AUTOSCALING + "panic-threshold-percentage": (float, 110, 1000, ""),
    AUTOSCALING + "target-burst-capacity": (float, -1, None, ""),
    AUTOSCALING + "window": (parse_duration, 6, 3600, "s"),
    AUTOSCALING + "scale-down-delay": (parse_duration, 0, 3600, "s"),
    AUTOSCALING + "scale-to-zero-pod-retention-period": (parse_duration, 0, 3600, "s"),
    "serving.knative.dev/progress-deadline": (parse_duration, 0, None, "s"),
}


@functools.cache
def crd_schemas() -> dict[tuple[str, str], dict]:
    """(apiVersion, kind) -> openAPIV3Schema, for every CRD file under schemas/."""
    out = {}
    for path in sorted(SCHEMAS.glob("*/*.yaml")):
        crd = yaml.safe_load(path.read_text())
        group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
        for version in crd["spec"]["versions"]:
            out[(f"{group}/{version['name']}", kind)] = version["schema"]["openAPIV3Schema"]
    return out


def _where(obj: dict) -> str:
    return f"{obj.get('kind')}/{obj.get('metadata', {}).get('name')}"


def schema_problems(obj: dict) -> list[str]:
    key = (obj.get("apiVersion"), obj.get("kind"))
    schema = crd_schemas().get(key)
    if schema is not None:
        validator = jsonschema.Draft7Validator(schema)
        return [f"{_where(obj)}: {'.'.join(map(str, e.absolute_path)) or '(object)'}: {e.message}"
                for e in sorted(validator.iter_errors(obj), key=lambda e: list(map(str, e.absolute_path)))]
    if "." not in obj.get("apiVersion", "").split("/")[0] or obj["apiVersion"].startswith("rbac.authorization.k8s.io"):
        import kubernetes_validate

        try:
            kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            return [f"{_where(obj)}: {'.'.join(map(str, exc.path)) or '(object)'}: {exc.message}"]
        return []
    return [f"{_where(obj)}: no schema for {obj.get('apiVersion')} {obj.get('kind')}"]


def webhook_problems(obj: dict) -> list[str]:
    """What Knative's admission webhooks refuse and a schema does not catch."""
    problems = []
    name = obj.get("metadata", {}).get("name", "")
    if len(name) > 63 or not DNS1123_LABEL.match(name):
        problems.append(f"{_where(obj)}: name {name!r} must be a DNS-1123 label of at most 63 characters")
    if obj.get("apiVersion") != "serving.knative.dev/v1" or obj.get("kind") != "Service":
        return problems
    if len(name) + len("-00001") > 63:
        problems.append(f"{_where(obj)}: name {name!r} leaves no room for revision names (<name>-00001) within 63 characters")
    template = obj["spec"]["template"]
    pod = template["spec"]
    for key, value in template.get("metadata", {}).get("annotations", {}).items():
        problems += _annotation_problems(obj, key, value)
    for container in pod.get("containers", []) + pod.get("initContainers", []):
        for port in container.get("ports", []):
            if port.get("containerPort") in RESERVED_PORTS:
                problems.append(f"{_where(obj)}: container {container['name']} uses port {port['containerPort']}, "
                                f"reserved by Knative ({', '.join(map(str, sorted(RESERVED_PORTS)))})")
    if len([c for c in pod.get("containers", []) if c.get("ports")]) > 1:
        problems.append(f"{_where(obj)}: only one container may expose a port")
    timeout = pod.get("timeoutSeconds", 300)
    if timeout > MAX_REVISION_TIMEOUT:
        problems.append(f"{_where(obj)}: timeoutSeconds {timeout} exceeds Knative's max-revision-timeout-seconds "
                        f"({MAX_REVISION_TIMEOUT}); lower it or raise that setting in config-defaults")
    if pod.get("responseStartTimeoutSeconds", 0) > timeout:
        problems.append(f"{_where(obj)}: responseStartTimeoutSeconds must not exceed timeoutSeconds")
    if not 0 <= pod.get("containerConcurrency", 0) <= 1000:
        problems.append(f"{_where(obj)}: containerConcurrency must be between 0 and 1000")
    problems += _traffic_problems(obj, obj["spec"].get("traffic", []))
    return problems


def _annotation_problems(obj: dict, key: str, value: str) -> list[str]:
    if key == AUTOSCALING + "metric" and value not in KPA_METRICS:
        return [f"{_where(obj)}: {key}: {value!r} is not a metric of the KPA class ({', '.join(KPA_METRICS)})"]
    if key not in ANNOTATION_RANGES:
        return []
    parse, low, high, unit = ANNOTATION_RANGES[key]
    try:
        number = parse(value)
    except ValueError:
        return [f"{_where(obj)}: {key}: {value!r} is not a {'duration' if unit else 'number'}"]
    if number < low or (high is not None and number > high):
        return [f"{_where(obj)}: {key}: {value} is outside {low}{unit}..{high if high is not None else '∞'}{unit}"]
    if key == AUTOSCALING + "min-scale":
        top = float(obj["spec"]["template"]["metadata"]["annotations"].get(AUTOSCALING + "max-scale", "0"))
        if top and number > top:
            return [f"{_where(obj)}: min-scale ({value}) exceeds max-scale ({top:g})"]
    return []


def _traffic_problems(obj: dict, traffic: list[dict]) -> list[str]:
    problems = []
    percents = [t.get("percent") for t in traffic if t.get("percent") is not None]
    if percents and sum(percents) != 100:
        problems.append(f"{_where(obj)}: traffic percents sum to {sum(percents)}, not 100")
    tags = [t["tag"] for t in traffic if t.get("tag")]
    if len(tags) != len(set(tags)):
        problems.append(f"{_where(obj)}: traffic tags must be unique")
    for t in traffic:
        if bool(t.get("latestRevision")) == bool(t.get("revisionName")):
            problems.append(f"{_where(obj)}: each traffic target needs exactly one of revisionName and latestRevision: true")
    return problems


def validate_objects(objects: list[dict[str, Any]]) -> list[str]:
    """Every problem with the rendered objects (empty when all is well)."""
    problems = []
    seen = set()
    for obj in objects:
        key = (obj.get("apiVersion"), obj.get("kind"), obj.get("metadata", {}).get("name"))
        if key in seen:
            problems.append(f"{_where(obj)}: rendered twice")
        seen.add(key)
        structural = schema_problems(obj)
        # the webhook checks assume a well-typed object: only once the schema passes
        problems += structural or webhook_problems(obj)
    return problems
