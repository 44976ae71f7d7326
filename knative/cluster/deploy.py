"""`thaw deploy` and `thaw status --cluster`: server-side apply (field manager `thaw`) in waves, waiting for
Ready conditions between waves, pruning what thaw applied before and the spec no longer has."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from rich.console import Console
from rich.progress import Progress

from .render import MANAGED, WAVE

FIELD_MANAGER = "thaw"
# What thaw may have applied, so what pruning looks at (apiVersion, kind).
PRUNABLE = [("v1", "ConfigMap"), ("v1", "ServiceAccount"), ("rbac.authorization.k8s.io/v1", "Role"),
            ("rbac.authorization.k8s.io/v1", "RoleBinding"), ("serving.knative.dev/v1", "Service"),
            ("eventing.knative.dev/v1", "Broker"), ("eventing.knative.dev/v1", "Trigger"),
            ("sources.knative.dev/v1", "ApiServerSource"), ("data.fluid.io/v1alpha1", "Dataset"),
            ("data.fluid.io/v1alpha1", "JuiceFSRuntime"), ("data.fluid.io/v1alpha1", "ThinRuntime"),
            ("data.fluid.io/v1alpha1", "DataLoad")]
SELECTOR = ",".join(f"{k}={v}" for k, v in MANAGED.items())


def readiness(obj: dict[str, Any]) -> tuple[bool, str]:
    """Is an applied object ready, and if not, why (Knative's Ready condition; Fluid's phase)."""
    kind, status = obj.get("kind"), obj.get("status") or {}
    if kind in ("Dataset",):
        return status.get("phase") == "Bound", status.get("phase", "no phase yet")
    if kind == "DataLoad":
        return status.get("phase") == "Complete", status.get("phase", "no phase yet")
    if kind in ("Service", "Broker", "Trigger", "ApiServerSource") and obj.get("apiVersion", "").endswith("knative.dev/v1"):
        generation = obj.get("metadata", {}).get("generation")
        if generation is not None and status.get("observedGeneration", generation) < generation:
            return False, "not yet observed"
        ready = next((c for c in status.get("conditions", []) if c.get("type") == "Ready"), None)
        if ready is None:
            return False, "no Ready condition yet"
        return ready.get("status") == "True", ready.get("message") or ready.get("reason") or ready.get("status")
    return True, "applied"


class ClusterClient:
    """The calls thaw makes, through the official client's DynamicClient: kubeconfig, auth and TLS, and
    the API server's own discovery for where each kind lives (Knative's, Fluid's, any CRD)."""

    def __init__(self, context: str | None = None, kubeconfig: str | None = None):
        from kubernetes import client, config, dynamic

        configuration = client.Configuration()
        config.load_kube_config(config_file=kubeconfig, context=context, client_configuration=configuration)
        self.dynamic = dynamic.DynamicClient(client.ApiClient(configuration))

    def _resource(self, api_version: str, kind: str):
        return self.dynamic.resources.get(api_version=api_version, kind=kind)

    def apply(self, obj: dict[str, Any], dry_run: bool = False, field_manager: str = FIELD_MANAGER) -> dict[str, Any]:
        """Server-side apply: the fields `obj` names become `field_manager`'s, conflicts forced."""
        return self.dynamic.server_side_apply(
            self._resource(obj["apiVersion"], obj["kind"]), body=obj, namespace=obj["metadata"]["namespace"],
            field_manager=field_manager, force_conflicts=True, **({"dry_run": "All"} if dry_run else {})).to_dict()

    def get(self, api_version: str, kind: str, namespace: str, name: str) -> dict[str, Any]:
        return self._resource(api_version, kind).get(name=name, namespace=namespace).to_dict()

    def list(self, api_version: str, kind: str, namespace: str, selector: str) -> list[dict[str, Any]]:
        """Objects of a kind with these labels; [] when the cluster does not have that kind's API."""
        from kubernetes.dynamic.exceptions import ResourceNotFoundError

        try:
            resource = self._resource(api_version, kind)
        except ResourceNotFoundError:
            return []
        return resource.get(namespace=namespace, label_selector=selector).to_dict().get("items", [])

    def delete(self, api_version: str, kind: str, namespace: str, name: str, dry_run: bool) -> None:
        self._resource(api_version, kind).delete(name=name, namespace=namespace,
                                                 **({"dry_run": "All"} if dry_run else {}))


@dataclass
class DeployReport:
    applied: list[str] = field(default_factory=list)
    pruned: list[str] = field(default_factory=list)
    not_ready: list[str] = field(default_factory=list)


def _wave(obj: dict) -> int:
    return int(obj["metadata"].get("annotations", {}).get(WAVE, "0"))


def _name(obj: dict) -> str:
    return f"{obj['kind']}/{obj['metadata']['name']}"


def deploy(objects: list[dict[str, Any]], client: ClusterClient, namespace: str, console: Console,
           dry_run: bool = False, timeout: float = 1800, poll: float = 2.0) -> DeployReport:
    """Apply wave by wave; wait for each wave to be Ready (not on a dry run); then prune."""
    from kubernetes.client import ApiException

    report = DeployReport()
    waves = sorted({_wave(o) for o in objects})
    with Progress(console=console, transient=False) as progress:
        for wave in waves:
            batch = [o for o in objects if _wave(o) == wave]
            task = progress.add_task(f"wave {wave}: apply {len(batch)}", total=len(batch))
            for obj in batch:
                client.apply(obj, dry_run)
                report.applied.append(_name(obj))
                progress.advance(task)
            if dry_run:
                continue
            pending = {_name(o): o for o in batch}
            ready_task = progress.add_task(f"wave {wave}: Ready", total=len(pending))
            deadline = time.monotonic() + timeout
            while pending:
                for name, obj in list(pending.items()):
                    try:
                        live = client.get(obj["apiVersion"], obj["kind"], namespace, obj["metadata"]["name"])
                    except ApiException:
                        continue
                    ok, why = readiness(live)
                    if ok:
                        del pending[name]
                        progress.advance(ready_task)
                    else:
                        progress.update(ready_task, description=f"wave {wave}: Ready ({name}: {why})")
                if pending and time.monotonic() > deadline:
                    report.not_ready = sorted(pending)
                    return report
                if pending:
                    time.sleep(poll)
            progress.update(ready_task, description=f"wave {wave}: Ready")
    wanted = {(o["apiVersion"], o["kind"], o["metadata"]["name"]) for o in objects}
    for api_version, kind in PRUNABLE:  # an API the cluster lacks (Fluid, say) lists nothing
        for item in client.list(api_version, kind, namespace, SELECTOR):
            if (api_version, kind, item["metadata"]["name"]) not in wanted:
                client.delete(api_version, kind, namespace, item["metadata"]["name"], dry_run)
                report.pruned.append(f"{kind}/{item['metadata']['name']}")
    return report


def cluster_status(client: ClusterClient, namespace: str) -> list[dict[str, Any]]:
    """Per thaw Service: URL, latest ready revision, its actual replicas, Ready."""
    rows = []
    for svc in client.list("serving.knative.dev/v1", "Service", namespace, SELECTOR):
        status = svc.get("status") or {}
        latest = status.get("latestReadyRevisionName")
        replicas = None
        if latest:
            try:
                rev = client.get("serving.knative.dev/v1", "Revision", namespace, latest)
                replicas = (rev.get("status") or {}).get("actualReplicas", 0)
            except Exception:  # noqa: BLE001 - shown as unknown
                replicas = None
        ok, why = readiness(svc)
        rows.append({"name": svc["metadata"]["name"], "url": status.get("url"), "latestReadyRevision": latest,
                     "actualReplicas": replicas, "ready": ok, "reason": None if ok else why})
    return rows
