"""A recording stand-in for a Kubernetes API server (there is none on these machines): it answers
discovery (/version, /api, /apis and each group version's resource list, for the kinds thaw uses), takes
server-side apply PATCHes, GETs, label-selected LISTs and DELETEs on namespaced objects, keeps the
objects in memory (an apply merges into what is there, as server-side apply does for fields the patch
names), marks Knative objects Ready, and records every request for the tests to check.
It is a test double for the API server only; the client side (kubernetes' ApiClient, kubeconfig
loading, thaw's deploy logic) is the real code."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from aiohttp import web


# The kinds this stand-in serves: (apiVersion, kind) -> plural, as each API group's discovery lists them.
KINDS = {("v1", "ConfigMap"): "configmaps", ("v1", "ServiceAccount"): "serviceaccounts",
         ("rbac.authorization.k8s.io/v1", "Role"): "roles", ("rbac.authorization.k8s.io/v1", "RoleBinding"): "rolebindings",
         ("serving.knative.dev/v1", "Service"): "services", ("serving.knative.dev/v1", "Revision"): "revisions",
         ("eventing.knative.dev/v1", "Broker"): "brokers", ("eventing.knative.dev/v1", "Trigger"): "triggers",
         ("sources.knative.dev/v1", "ApiServerSource"): "apiserversources",
         ("data.fluid.io/v1alpha1", "Dataset"): "datasets", ("data.fluid.io/v1alpha1", "JuiceFSRuntime"): "juicefsruntimes",
         ("data.fluid.io/v1alpha1", "ThinRuntime"): "thinruntimes", ("data.fluid.io/v1alpha1", "DataLoad"): "dataloads"}


def discovery(path: str) -> dict | None:
    """What an API server answers to a discovery request, or None if `path` is not one."""
    if path == "/version":
        return {"major": "1", "minor": "31", "gitVersion": "v1.31.0"}
    if path == "/api":
        return {"kind": "APIVersions", "versions": ["v1"]}
    group_versions = sorted({gv for gv, _ in KINDS if "/" in gv})
    if path == "/apis":
        return {"kind": "APIGroupList", "apiVersion": "v1", "groups": [
            {"name": gv.split("/")[0], "versions": [{"groupVersion": gv, "version": gv.split("/")[1]}],
             "preferredVersion": {"groupVersion": gv, "version": gv.split("/")[1]}} for gv in group_versions]}
    gv = path.removeprefix("/api/").removeprefix("/apis/")
    if gv == "v1" or gv in group_versions:
        return {"kind": "APIResourceList", "groupVersion": gv, "resources": [
            {"name": plural, "singularName": kind.lower(), "namespaced": True, "kind": kind,
             "verbs": ["get", "list", "patch", "delete"]} for (v, kind), plural in KINDS.items() if v == gv]}
    return None


@dataclass
class Recorded:
    method: str
    path: str
    query: dict[str, str]
    content_type: str
    body: dict | None
    authorization: str = ""


@dataclass
class StandIn:
    objects: dict[str, dict] = field(default_factory=dict)  # path -> object
    requests: list[Recorded] = field(default_factory=list)
    never_ready: set[str] = field(default_factory=set)  # names whose Ready stays False
    url_base: str = ""  # Services' status.url: http://<name>.<ns>.example.com, or <url_base>/<name>
    actual_replicas: dict[str, int] = field(default_factory=dict)  # revision -> status.actualReplicas (else 1)

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self.handle)
        return app

    async def handle(self, request: web.Request) -> web.Response:
        if request.method == "GET" and discovery(request.path) is not None:
            return web.json_response(discovery(request.path))
        raw = await request.read()
        body = json.loads(raw) if raw else None
        self.requests.append(Recorded(request.method, request.path, dict(request.query),
                                      request.headers.get("Content-Type", ""), body,
                                      request.headers.get("Authorization", "")))
        parts = request.path.strip("/").split("/")
        # /api/v1/namespaces/ns/plural[/name] or /apis/group/version/namespaces/ns/plural[/name]
        named = len(parts) == (6 if parts[0] == "api" else 7)
        if request.method == "PATCH":
            obj = _merge(self.objects.get(request.path, {}), body)
            if request.query.get("dryRun") != "All":
                obj["metadata"] = {**obj["metadata"], "generation": 1}
                obj["status"] = self._status(obj)
                self.objects[request.path] = obj
            return web.json_response(obj)
        if request.method == "GET" and named:
            if "/revisions/" in request.path:
                actual = self.actual_replicas.get(parts[-1], 1)
                return web.json_response({"kind": "Revision", "status": {"actualReplicas": actual}})
            if request.path not in self.objects:
                return web.json_response({"kind": "Status", "code": 404, "reason": "NotFound"}, status=404)
            return web.json_response(self.objects[request.path])
        if request.method == "GET":
            wanted = dict(kv.split("=") for kv in request.query.get("labelSelector", "").split(",") if kv)
            items = [o for p, o in self.objects.items() if p.rsplit("/", 1)[0] == request.path
                     and all(o["metadata"].get("labels", {}).get(k) == v for k, v in wanted.items())]
            return web.json_response({"kind": "List", "items": items})
        if request.method == "DELETE":
            if request.query.get("dryRun") != "All":
                self.objects.pop(request.path, None)
            return web.json_response({"kind": "Status", "status": "Success"})
        return web.json_response({"kind": "Status", "code": 405}, status=405)

    def _status(self, obj: dict) -> dict:
        if not obj["apiVersion"].endswith("knative.dev/v1"):
            return {}
        name = obj["metadata"]["name"]
        ready = "False" if name in self.never_ready else "True"
        status = {"observedGeneration": 1, "conditions": [{"type": "Ready", "status": ready,
                                                           **({"reason": "RevisionFailed"} if ready == "False" else {})}]}
        if obj["kind"] == "Service":
            status.update(url=f"{self.url_base}/{name}" if self.url_base
                          else f"http://{name}.{obj['metadata']['namespace']}.example.com",
                          latestReadyRevisionName=f"{name}-00001")
        return status

    def applied(self) -> list[Recorded]:
        return [r for r in self.requests if r.method == "PATCH"]


def _merge(old: dict, new: dict) -> dict:
    out = dict(old)
    for key, value in new.items():
        out[key] = _merge(old[key], value) if isinstance(value, dict) and isinstance(old.get(key), dict) else value
    return out


def write_kubeconfig(path: Path, server: str) -> Path:
    path.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "standin",
        "clusters": [{"name": "standin", "cluster": {"server": server}}],
        "users": [{"name": "tester", "user": {"token": "standin-token"}}],
        "contexts": [{"name": "standin", "context": {"cluster": "standin", "user": "tester", "namespace": "default"}}],
    }))
    return path
