"""The spec as Kubernetes objects for Knative Serving, Knative Eventing and (optionally) Fluid: pure
functions from the same Spec objects `thaw up` runs, so both modes carry the same settings.

Per model a Knative Service: the scaling annotations under Knative's names, containerConcurrency,
timeouts, a progress deadline long enough for a model start, resources (GPUs as `nvidia.com/gpu`),
nodeSelector and tolerations, a readinessProbe on /readyz, the cache tier volume, an init container that
stages the weights, and the traffic block. Eventing: Brokers, an ApiServerSource watching Revisions (with
its ServiceAccount, Role and RoleBinding), Triggers for the cache warmer, for inference requests and for
the spec's triggers; the cache warmer and each graph's router as Knative Services.
"""

from __future__ import annotations

from pathlib import PurePosixPath
from typing import Any

import yaml

from thaw.eventing import events
from thaw.launch import replica_boot, serve_args
from thaw.spec import Destination, Model, Spec, pvc_parts

PORT = 8080
DRAM_MOUNT = "/var/cache/thaw-dram"  # the DRAM tier in a pod: an emptyDir in memory
SPEC_MOUNT = "/etc/thaw"
SPEC_FILE = f"{SPEC_MOUNT}/thaw.yaml"
GRAPHS_MOUNT = "/etc/thaw-graphs"
MANAGED = {"app.kubernetes.io/managed-by": "thaw", "app.kubernetes.io/part-of": "thaw"}
SERVING = "serving.knative.dev/v1"
EVENTING = "eventing.knative.dev/v1"
WARMER = "thaw-cache-warmer"
REVISION_SOURCE = "thaw-revisions"
# Knative's config-features flags the rendered Services need, by what needs them.
FEATURE_FLAGS = {
    "kubernetes.podspec-init-containers": "the init container that stages weights",
    "kubernetes.podspec-persistent-volume-claim": "a PVC or Fluid cache tier",
    "kubernetes.podspec-persistent-volume-write": "the cache tier is written by the stager",
    "kubernetes.podspec-volumes-hostpath": "a hostPath cache tier or local model folders",
    "kubernetes.podspec-nodeselector": "models with nodeSelector",
    "kubernetes.podspec-tolerations": "models with tolerations",
}


def router_service_name(graph: str) -> str:
    return f"graph-{graph}"


def _meta(name: str, namespace: str, **labels: str) -> dict[str, Any]:
    return {"name": name, "namespace": namespace, "labels": {**MANAGED, **labels}}


def _cache_volume(spec: Spec) -> dict[str, Any] | None:
    volume = spec.platform.cluster.cacheVolume
    if volume.hostPath:
        return {"name": "cache", "hostPath": {"path": volume.hostPath, "type": "DirectoryOrCreate"}}
    if volume.persistentVolumeClaim:
        return {"name": "cache", "persistentVolumeClaim": {"claimName": volume.persistentVolumeClaim}}
    if volume.fluid is None:
        return {"name": "cache", "emptyDir": {}}
    return None  # Fluid: one PVC per model (the Dataset's), see _model_volumes


def _spec_and_cache(spec: Spec, cache: dict[str, Any] | None) -> tuple[list[dict], list[dict]]:
    """Volumes and mounts every thaw pod has: the spec's ConfigMap, and the cache tier if it has one."""
    volumes = [{"name": "spec", "configMap": {"name": "thaw-spec"}}]
    mounts = [{"name": "spec", "mountPath": SPEC_MOUNT, "readOnly": True}]
    if cache is not None:
        volumes.append(cache)
        mounts.append({"name": "cache", "mountPath": spec.platform.cluster.cacheMountPath})
    return volumes, mounts


def _model_volumes(model: Model, spec: Spec) -> tuple[list[dict], list[dict]]:
    """The pod's volumes and the function container's mounts: the spec, the cache tier, a local folder."""
    cache = _cache_volume(spec)
    if cache is None and model.source.startswith("s3://"):
        cache = {"name": "cache", "persistentVolumeClaim": {"claimName": fluid_dataset_name(model)}}
    volumes, mounts = _spec_and_cache(spec, cache)
    if model.cache.tier == "dram":
        volumes.append({"name": "dram", "emptyDir": {"medium": "Memory"}})
        mounts.append({"name": "dram", "mountPath": DRAM_MOUNT})
    if model.source.startswith("pvc://"):  # KServe's pvc:// storage: the claim, read-only, where the pod reads it
        claim, _ = pvc_parts(model.source)
        volumes.append({"name": "weights", "persistentVolumeClaim": {"claimName": claim, "readOnly": True}})
        mounts.append({"name": "weights", "mountPath": f"{PVC_MOUNT}/{claim}", "readOnly": True})
    elif "://" not in model.source and PurePosixPath(model.source).is_absolute():
        # An absolute folder is a folder on the node; a relative one is in the image (built from the
        # project folder, whose WORKDIR keeps relative paths as they are here).
        volumes.append({"name": "weights", "hostPath": {"path": model.source, "type": "Directory"}})
        mounts.append({"name": "weights", "mountPath": model.source, "readOnly": True})
    return volumes, mounts


# Knative Eventing's multi-tenant broker ingress: where a payload logger with `broker:` sends on a cluster.
BROKER_INGRESS = "http://broker-ingress.knative-eventing.svc.cluster.local"


PVC_MOUNT = "/mnt/pvc"  # where a pvc:// source's claim is mounted in the pod


def _pod_path(source: str) -> str:
    """Where the pod reads a folder source: a claim's path under its mount; any other path as the spec has it
    (a hostPath mounted there, or the image's folder)."""
    if source.startswith("pvc://"):
        claim, path = pvc_parts(source)
        return f"{PVC_MOUNT}/{claim}/{path}".rstrip("/")
    return source


def fluid_dataset_name(model: Model) -> str:
    return f"thaw-{model.name}"[:63]


def function_container_args(model: Model, spec: Spec) -> list[str]:
    """`thaw function serve` as the pod runs it: the same builder as a replica in `thaw up`."""
    # local folders keep the spec's path: a hostPath mounted there, or the image's folder (_model_volumes)
    boot = replica_boot(model, spec, spec.platform.cluster.cacheMountPath, DRAM_MOUNT, local=_pod_path,
                        broker_url=lambda broker: f"{BROKER_INGRESS}/{spec.platform.namespace}/{broker}")
    return serve_args(None, model.served_name, PORT, model.replica_engine().model_dump(exclude_none=True), boot.flags(),
                      host="0.0.0.0")


def _resources(model: Model) -> dict[str, Any]:
    r = model.resources
    limits = {k: v for k, v in (("cpu", r.cpu), ("memory", r.memory)) if v}
    if r.gpu:
        limits["nvidia.com/gpu"] = str(r.gpu)
    requests = {k: v for k, v in limits.items() if k != "nvidia.com/gpu"}
    return {k: v for k, v in (("limits", limits), ("requests", requests)) if v}


def model_service(model: Model, spec: Spec) -> dict[str, Any]:
    cluster, ns = spec.platform.cluster, spec.platform.namespace
    volumes, mounts = _model_volumes(model, spec)
    env = [{"name": "VLLM_CPU_KVCACHE_SPACE", "value": str(model.engine.kv_cache_gib)},
           {"name": "HF_HUB_OFFLINE", "value": "1"}]
    container = {
        "name": "function", "image": cluster.images.function, "args": function_container_args(model, spec),
        "ports": [{"name": "http1", "containerPort": PORT}], "env": env, "volumeMounts": mounts,
        # periodSeconds left unset: queue-proxy then probes a starting container every 50 ms itself
        "readinessProbe": {"httpGet": {"path": "/readyz", "port": PORT}, "failureThreshold": 3},
    }
    resources = _resources(model)
    if resources:
        container["resources"] = resources
    pod: dict[str, Any] = {
        "containerConcurrency": model.containerConcurrency,
        "timeoutSeconds": model.timeoutSeconds,
        # the first byte of an answer may wait for a whole cold start
        "responseStartTimeoutSeconds": model.timeoutSeconds,
        "containers": [container],
        "volumes": volumes,
    }
    if model.stages_through_tier:
        pod["initContainers"] = [{
            "name": "stage-weights", "image": cluster.images.function,
            "args": ["warm", model.name, "-f", SPEC_FILE] + (["--pin"] if model.cache.pin else []),
            "volumeMounts": [m for m in mounts if m["name"] in ("spec", "cache", "weights")],
        }]
    if model.nodeSelector:
        pod["nodeSelector"] = dict(model.nodeSelector)
    if model.tolerations:
        pod["tolerations"] = [t.model_dump(exclude_none=True) for t in model.tolerations]
    annotations = {**model.scaling.annotations(),
                   "serving.knative.dev/progress-deadline": cluster.progressDeadline}
    traffic = [t.model_dump(exclude_none=True) for t in model.traffic] or [{"latestRevision": True, "percent": 100}]
    return {
        "apiVersion": SERVING, "kind": "Service",
        "metadata": _meta(model.name, ns, **{"thaw.dev/model": model.name}),
        "spec": {
            "template": {"metadata": {"labels": {**MANAGED, "thaw.dev/model": model.name},
                                      "annotations": annotations},
                         "spec": pod},
            "traffic": traffic,
        },
    }


def warmer_service(spec: Spec) -> dict[str, Any]:
    cluster, ns = spec.platform.cluster, spec.platform.namespace
    volumes, mounts = _spec_and_cache(spec, _cache_volume(spec))
    return {
        "apiVersion": SERVING, "kind": "Service", "metadata": _meta(WARMER, ns, **{"thaw.dev/role": "cache-warmer"}),
        "spec": {"template": {
            # always up: it must hear of a revision before that revision's pods start
            "metadata": {"annotations": {"autoscaling.knative.dev/min-scale": "1"}},
            "spec": {"containers": [{
                "name": "cache-warmer", "image": cluster.images.cacheWarmer,
                "args": ["cache-warmer", "-f", SPEC_FILE, "--host", "0.0.0.0", "--port", str(PORT)],
                "ports": [{"name": "http1", "containerPort": PORT}], "volumeMounts": mounts}],
                "volumes": volumes}}},
    }


def router_service(name: str, spec: Spec) -> dict[str, Any]:
    ns = spec.platform.namespace
    return {
        "apiVersion": SERVING, "kind": "Service",
        "metadata": _meta(router_service_name(name), ns, **{"thaw.dev/graph": name}),
        "spec": {"template": {"spec": {
            "containers": [{
                "name": "router", "image": spec.platform.cluster.images.router,
                "args": ["router", "--graph", f"{GRAPHS_MOUNT}/{name}.yaml", "--host", "0.0.0.0", "--port", str(PORT),
                         "--gateway", f"http://{{model}}.{ns}.svc.cluster.local"],
                "ports": [{"name": "http1", "containerPort": PORT}],
                "readinessProbe": {"httpGet": {"path": "/readyz", "port": PORT}},
                "volumeMounts": [{"name": "graphs", "mountPath": GRAPHS_MOUNT, "readOnly": True}]}],
            "volumes": [{"name": "graphs", "configMap": {"name": "thaw-graphs"}}]}}},
    }


def inference_graph(name: str, spec: Spec) -> dict[str, Any]:
    """A graph as a full KServe InferenceGraph manifest (what `thaw router --graph` reads)."""
    return {"apiVersion": "serving.kserve.io/v1alpha1", "kind": "InferenceGraph",
            "metadata": {"name": name, "namespace": spec.platform.namespace}, "spec": spec.graphs[name]}


def _service_ref(name: str, spec: Spec, api_version: str = SERVING) -> dict[str, Any]:
    return {"ref": {"apiVersion": api_version, "kind": "Service", "name": name, "namespace": spec.platform.namespace}}


def _destination(dest: Destination, spec: Spec) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if dest.ref is not None:
        kind = dest.ref.kind
        name = router_service_name(dest.ref.name) if kind == "Graph" else dest.ref.name
        out.update(_service_ref(name, spec, dest.ref.apiVersion or SERVING))
    if dest.uri is not None:
        out["uri"] = dest.uri
    return out


def _trigger(name: str, broker: str, spec: Spec, subscriber: dict, attributes: dict | None = None,
             filters: list | None = None, delivery: dict | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {"broker": broker, "subscriber": subscriber}
    if attributes:
        body["filter"] = {"attributes": attributes}
    if filters:
        body["filters"] = filters
    if delivery:
        body["delivery"] = delivery
    return {"apiVersion": EVENTING, "kind": "Trigger", "metadata": _meta(name, spec.platform.namespace), "spec": body}


def eventing_infra(spec: Spec) -> list[dict[str, Any]]:
    """Brokers, the Revision source with its RBAC, and the cache warmer's triggers: all in place before
    any model's Service exists, so the warmer hears of its first revision."""
    ns = spec.platform.namespace
    brokers = sorted({"default"} | {t.broker for t in spec.triggers})
    out: list[dict[str, Any]] = [{"apiVersion": EVENTING, "kind": "Broker", "metadata": _meta(b, ns)} for b in brokers]
    out += [
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": _meta(REVISION_SOURCE, ns)},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role", "metadata": _meta(REVISION_SOURCE, ns),
         "rules": [{"apiGroups": ["serving.knative.dev"], "resources": ["revisions"],
                    "verbs": ["get", "list", "watch"]}]},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding", "metadata": _meta(REVISION_SOURCE, ns),
         "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": REVISION_SOURCE},
         "subjects": [{"kind": "ServiceAccount", "name": REVISION_SOURCE, "namespace": ns}]},
        {"apiVersion": "sources.knative.dev/v1", "kind": "ApiServerSource", "metadata": _meta(REVISION_SOURCE, ns),
         "spec": {"mode": "Resource", "serviceAccountName": REVISION_SOURCE,
                  "resources": [{"apiVersion": SERVING, "kind": "Revision",
                                 "selector": {"matchLabels": {"app.kubernetes.io/managed-by": "thaw"}}}],
                  "sink": {"ref": {"apiVersion": EVENTING, "kind": "Broker", "name": "default"}}}},
    ]
    warmer = _service_ref(WARMER, spec)
    for name, kind in events.WARMER_TRIGGERS.items():
        out.append(_trigger(name, "default", spec, warmer, {"type": kind}))
    return out


def eventing_triggers(spec: Spec) -> list[dict[str, Any]]:
    """Triggers to models and graphs: after their Services."""
    out = []
    for model in spec.models:  # thaw's built-in routing of inference requests, one trigger per model
        out.append(_trigger(f"thaw-inference-{model.name}"[:63], "default", spec,
                            _service_ref(model.name, spec),
                            {"type": events.INFERENCE_REQUEST, events.EXT_MODEL: model.name},
                            delivery={"retry": 2, "backoffPolicy": "exponential", "backoffDelay": "PT0.5S"}))
    for t in spec.triggers:
        delivery = None
        if t.delivery is not None:
            delivery = t.delivery.model_dump(exclude_none=True, exclude={"deadLetterSink"})
            if t.delivery.deadLetterSink is not None:
                delivery["deadLetterSink"] = _destination(t.delivery.deadLetterSink, spec)
        out.append(_trigger(t.name, t.broker, spec, _destination(t.subscriber, spec),
                            dict(t.filter.attributes) if t.filter else None, t.filters or None, delivery))
    return out


def fluid_objects(spec: Spec) -> list[dict[str, Any]]:
    fluid = spec.platform.cluster.cacheVolume.fluid
    if fluid is None:
        return []
    ns, s3 = spec.platform.namespace, spec.platform.origin.s3
    out = []
    for model in (m for m in spec.models if m.source.startswith("s3://")):
        name = fluid_dataset_name(model)
        options = {k: v for k, v in (("endpoint", s3.endpointUrl), ("region", s3.region)) if v}
        out.append({"apiVersion": "data.fluid.io/v1alpha1", "kind": "Dataset", "metadata": _meta(name, ns),
                    "spec": {"mounts": [{"mountPoint": model.source, "name": model.name, **({"options": options} if options else {})}],
                             "accessModes": ["ReadWriteMany"]}})
        runtime: dict[str, Any] = {"replicas": 1, "tieredstore": {"levels": [
            {"mediumtype": fluid.mediumType, "path": fluid.cachePath, "quota": fluid.quota}]}}
        if fluid.runtime == "ThinRuntime" and fluid.profileName:
            runtime["profileName"] = fluid.profileName
        out.append({"apiVersion": "data.fluid.io/v1alpha1", "kind": fluid.runtime, "metadata": _meta(name, ns),
                    "spec": runtime})
        out.append({"apiVersion": "data.fluid.io/v1alpha1", "kind": "DataLoad", "metadata": _meta(f"{name}-load", ns),
                    "spec": {"dataset": {"name": name, "namespace": ns}, "loadMetadata": True,
                             "target": [{"path": "/", "replicas": 1}]}})
    return out


def cluster_spec_text(spec: Spec) -> str:
    """The spec as pods read it: the same settings, with the cache tier where the pods mount it."""
    data = spec.model_dump(mode="json", by_alias=True, exclude_defaults=True)
    data.setdefault("platform", {}).setdefault("cache", {})["path"] = spec.platform.cluster.cacheMountPath
    return yaml.safe_dump(data, sort_keys=False)


def config_maps(spec: Spec) -> list[dict[str, Any]]:
    ns = spec.platform.namespace
    graphs = {f"{name}.yaml": yaml.safe_dump(inference_graph(name, spec), sort_keys=False) for name in spec.graphs}
    return [{"apiVersion": "v1", "kind": "ConfigMap", "metadata": _meta("thaw-spec", ns),
             "data": {"thaw.yaml": cluster_spec_text(spec)}},
            {"apiVersion": "v1", "kind": "ConfigMap", "metadata": _meta("thaw-graphs", ns), "data": graphs}]


WAVE = "thaw.dev/deploy-wave"  # an annotation: `thaw deploy` waits for each wave to be Ready


def render(spec: Spec) -> list[dict[str, Any]]:
    """Every object, in the order `thaw deploy` applies them, each with its wave: (0) configuration,
    RBAC and Fluid; (1) the cache warmer and the eventing that feeds it; (2) models and graph routers;
    (3) the triggers that reach them."""
    waves = [config_maps(spec) + fluid_objects(spec),
             [warmer_service(spec)] + eventing_infra(spec),
             [model_service(m, spec) for m in spec.models] + [router_service(name, spec) for name in spec.graphs],
             eventing_triggers(spec)]
    out = []
    for wave, objects in enumerate(waves):
        for obj in objects:
            obj["metadata"].setdefault("annotations", {})[WAVE] = str(wave)
            out.append(obj)
    return out


def needed_feature_flags(objects: list[dict[str, Any]]) -> dict[str, str]:
    """The Knative config-features flags these Services use."""
    needed = {}
    for obj in objects:
        if obj["kind"] != "Service" or obj["apiVersion"] != SERVING:
            continue
        pod = obj["spec"]["template"]["spec"]
        if pod.get("initContainers"):
            needed["kubernetes.podspec-init-containers"] = FEATURE_FLAGS["kubernetes.podspec-init-containers"]
        for volume in pod.get("volumes", []):
            if "persistentVolumeClaim" in volume:
                for flag in ("kubernetes.podspec-persistent-volume-claim", "kubernetes.podspec-persistent-volume-write"):
                    needed[flag] = FEATURE_FLAGS[flag]
            if "hostPath" in volume:
                needed["kubernetes.podspec-volumes-hostpath"] = FEATURE_FLAGS["kubernetes.podspec-volumes-hostpath"]
        for key in ("nodeSelector", "tolerations"):
            if pod.get(key):
                flag = f"kubernetes.podspec-{key.lower()}"
                needed[flag] = FEATURE_FLAGS[flag]
    return dict(sorted(needed.items()))
