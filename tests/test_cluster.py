"""Cluster mode: rendering, validation, parity with the embedded plane, and deploy/status against a
recording stand-in API server (k8s_standin.py: these machines have no Kubernetes API server)."""

from __future__ import annotations

import copy
import json
import subprocess
from pathlib import Path

import pytest
import yaml

from conftest import poll, thaw_cli
from k8s_standin import StandIn, write_kubeconfig
from loop_servers import LoopThread
from thaw.knative.cluster.render import render
from thaw.knative.cluster.validate import validate_objects
from thaw.knative.embedded.control import lifecycle
from thaw.knative.embedded.control.plane import replica_weights
from thaw.knative.embedded.control.supervisor import replica_command
from thaw.spec import load_spec, parse_spec

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples/thaw.yaml"

RICH = """
platform:
  namespace: llm
  cache: {path: /tmp/thaw-cache, capacity: 200Gi}
  origin: {s3: {endpointUrl: "http://minio.storage:9000", region: eu-west-1, bandwidthMbps: 800}}
  cluster:
    cacheVolume: {hostPath: /mnt/nvme/thaw}
models:
  - name: llama
    source: s3://models/llama-3.1-8b
    engine: {dtype: bfloat16, max_model_len: 8192, gpu_memory_utilization: 0.85}
    scaling: {min-scale: 0, max-scale: 4, target: 4, window: 120s, scale-down-delay: 5m, initial-scale: 0}
    containerConcurrency: 8
    timeoutSeconds: 600
    resources: {cpu: "8", memory: 48Gi, gpu: 1}
    cache: {pin: true, prewarm: true, tier: dram}
    nodeSelector: {nvidia.com/gpu.product: NVIDIA-A100-SXM4-80GB}
    tolerations: [{key: nvidia.com/gpu, operator: Exists, effect: NoSchedule}]
    traffic:
      - {latestRevision: true, percent: 90}
      - {revisionName: llama-00001, percent: 10, tag: previous}
  - name: small
    source: /srv/models/smollm2
    servedName: smollm2
    scaling: {max-scale: 2}
graphs:
  chat:
    nodes:
      root:
        routerType: Sequence
        steps:
          - {name: guard, serviceUrl: "http://guard.llm.svc.cluster.local/v1/models/guard:predict"}
          - {name: answer, serviceName: llama, data: $request}
triggers:
  - name: answers
    filter: {attributes: {type: dev.thaw.inference.response}}
    subscriber: {ref: {kind: Graph, name: chat}}
    delivery: {retry: 3, backoffDelay: PT1S, deadLetterSink: {uri: "http://dlq.llm.svc.cluster.local"}}
"""


def thaw(*args, **kw) -> subprocess.CompletedProcess:
    return thaw_cli(*args, timeout=120, **kw)


def by_kind(objects: list[dict], kind: str) -> dict[str, dict]:
    return {o["metadata"]["name"]: o for o in objects if o["kind"] == kind}


def test_rendered_example_validates_and_is_kustomize_ready(tmp_path):
    out = tmp_path / "out"
    r = thaw("render", "-f", str(EXAMPLE), "-o", str(out))
    assert r.returncode == 0, r.stderr
    assert "all validate" in r.stdout
    assert "allow-zero-initial-scale" in r.stdout  # the example's model starts at zero
    assert yaml.safe_load((out / "knative-config-autoscaler.yaml").read_text())["data"] == {
        "allow-zero-initial-scale": "true"}
    kustomization = yaml.safe_load((out / "kustomization.yaml").read_text())
    objects = [doc for f in kustomization["resources"] for doc in yaml.safe_load_all((out / f).read_text())]
    assert validate_objects(objects) == []
    assert {"Service", "Broker", "Trigger", "ApiServerSource", "ConfigMap", "Role"} <= {o["kind"] for o in objects}
    assert sorted(p.name for p in (out / "docker").iterdir()) == ["Dockerfile.cache-warmer", "Dockerfile.function",
                                                                 "Dockerfile.router"]
    # the function's image is built on the vLLM that the engine adapter runs against on GPU nodes
    from thaw.vllm_platform import VLLM_CUDA_VERSION
    assert f"ARG VLLM_VERSION={VLLM_CUDA_VERSION}\n" in (out / "docker/Dockerfile.function").read_text()
    assert (out / "docker/Dockerfile.router").read_text() == (ROOT / "eventing/Dockerfile.router").read_text()
    spec_cm = by_kind(objects, "ConfigMap")["thaw-spec"]
    assert parse_spec(spec_cm["data"]["thaw.yaml"]).models == load_spec(EXAMPLE).models


def test_rich_spec_renders_every_part(tmp_path):
    spec = parse_spec(RICH)
    objects = render(spec)
    assert validate_objects(objects) == []
    llama = by_kind(objects, "Service")["llama"]
    pod = llama["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert pod["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-A100-SXM4-80GB"}
    assert pod["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert "periodSeconds" not in container["readinessProbe"]  # queue-proxy's 50 ms probing stays on
    assert pod["initContainers"][0]["args"] == ["warm", "llama", "-f", "/etc/thaw/thaw.yaml", "--pin"]
    assert {"name": "cache", "hostPath": {"path": "/mnt/nvme/thaw", "type": "DirectoryOrCreate"}} in pod["volumes"]
    assert llama["spec"]["traffic"] == [{"latestRevision": True, "percent": 90},
                                        {"revisionName": "llama-00001", "percent": 10, "tag": "previous"}]
    annotations = llama["spec"]["template"]["metadata"]["annotations"]
    assert annotations["serving.knative.dev/progress-deadline"] == "1800s"
    assert annotations["autoscaling.knative.dev/target-burst-capacity"] == "0"
    source = by_kind(objects, "ApiServerSource")["thaw-revisions"]["spec"]
    assert source["resources"][0]["kind"] == "Revision" and source["serviceAccountName"] == "thaw-revisions"
    triggers = by_kind(objects, "Trigger")
    assert triggers["thaw-cache-warmer-add"]["spec"]["filter"]["attributes"]["type"] == "dev.knative.apiserver.resource.add"
    assert triggers["answers"]["spec"]["subscriber"]["ref"]["name"] == "graph-chat"
    assert triggers["answers"]["spec"]["delivery"]["deadLetterSink"] == {"uri": "http://dlq.llm.svc.cluster.local"}
    assert triggers["thaw-inference-llama"]["spec"]["filter"]["attributes"] == {
        "type": "dev.thaw.inference.request", "thawmodel": "llama"}
    router = by_kind(objects, "Service")["graph-chat"]["spec"]["template"]["spec"]["containers"][0]
    assert "http://{model}.llm.svc.cluster.local" in router["args"]
    graphs = by_kind(objects, "ConfigMap")["thaw-graphs"]["data"]
    assert yaml.safe_load(graphs["chat.yaml"])["kind"] == "InferenceGraph"
    waves = [int(o["metadata"]["annotations"]["thaw.dev/deploy-wave"]) for o in objects]
    assert waves == sorted(waves)  # the warmer and its eventing (1) come before any model (2)


def test_fluid_cache_tier(tmp_path):
    spec = parse_spec(RICH.replace("cacheVolume: {hostPath: /mnt/nvme/thaw}", "cacheVolume: {fluid: {quota: 500Gi}}"))
    objects = render(spec)
    assert validate_objects(objects) == []
    assert by_kind(objects, "Dataset")["thaw-llama"]["spec"]["mounts"][0]["mountPoint"] == "s3://models/llama-3.1-8b"
    assert by_kind(objects, "DataLoad")["thaw-llama-load"]["spec"]["dataset"]["name"] == "thaw-llama"
    assert by_kind(objects, "JuiceFSRuntime")["thaw-llama"]["spec"]["tieredstore"]["levels"][0]["quota"] == "500Gi"
    pod = by_kind(objects, "Service")["llama"]["spec"]["template"]["spec"]
    assert {"name": "cache", "persistentVolumeClaim": {"claimName": "thaw-llama"}} in pod["volumes"]


def _service(objects, name="smollm2"):
    return copy.deepcopy(by_kind(objects, "Service")[name])


@pytest.mark.parametrize("mutate, message", [
    (lambda s: s["spec"]["template"]["spec"]["containers"][0]["ports"][0].update(containerPort=8012),
     "reserved by Knative"),
    (lambda s: s["spec"].update(traffic=[{"latestRevision": True, "percent": 90}]), "sum to 90, not 100"),
    (lambda s: s["spec"]["template"]["metadata"]["annotations"].update(
        {"autoscaling.knative.dev/min-scale": "5", "autoscaling.knative.dev/max-scale": "2"}), "min-scale (5) exceeds max-scale"),
    (lambda s: s["spec"]["template"]["metadata"]["annotations"].update({"autoscaling.knative.dev/window": "2s"}),
     "outside 6s..3600s"),
    (lambda s: s["spec"]["template"]["metadata"]["annotations"].update(
        {"autoscaling.knative.dev/panic-threshold-percentage": "50"}), "outside 110..1000"),
    (lambda s: s["spec"]["template"]["metadata"]["annotations"].update({"autoscaling.knative.dev/metric": "cpu"}),
     "not a metric of the KPA class"),
    (lambda s: s["metadata"].update(name="m" * 60), "leaves no room for revision names"),
    (lambda s: s["spec"]["template"]["spec"].update(timeoutSeconds=900), "max-revision-timeout-seconds"),
    (lambda s: s["spec"]["template"]["spec"].update(containerConcurrency="lots"), "containerConcurrency: 'lots' is not of type 'integer'"),
])
def test_validation_catches_what_knative_would_refuse(mutate, message):
    service = _service(render(load_spec(EXAMPLE)))
    mutate(service)
    assert any(message in p for p in validate_objects([service])), validate_objects([service])


def test_core_objects_are_checked_against_kubernetes_schemas():
    config = copy.deepcopy(by_kind(render(load_spec(EXAMPLE)), "ConfigMap")["thaw-spec"])
    config["data"] = {"thaw.yaml": 42}
    assert any("ConfigMap/thaw-spec: data.thaw.yaml" in p for p in validate_objects([config]))


def test_render_refuses_to_write_invalid_output(tmp_path):
    bad = tmp_path / "thaw.yaml"
    bad.write_text(EXAMPLE.read_text().replace("timeoutSeconds: 300", "timeoutSeconds: 900"))
    r = thaw("render", "-f", str(bad), "-o", str(tmp_path / "out"))
    assert r.returncode == 1 and "max-revision-timeout-seconds" in r.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("text", [EXAMPLE.read_text(), RICH])
def test_parity_embedded_and_cluster_come_from_the_same_settings(text):
    spec = parse_spec(text)
    services = by_kind(render(spec), "Service")
    for model in spec.models:
        # the embedded side: the Revision the plane reports and the command its replica runs
        revision = lifecycle.revision_object(f"{model.name}-00001", model.name, spec.platform.namespace,
                                             model.revision_template(), 1, {}, "uid")
        embedded_cmd = replica_command(model, replica_weights(model, spec), port=8080)
        embedded_args = embedded_cmd[embedded_cmd.index("thaw.cli") + 1:]
        # the cluster side
        template = services[model.name]["spec"]["template"]
        cluster_args = template["spec"]["containers"][0]["args"]
        scaling = {k: v for k, v in revision["metadata"]["annotations"].items() if k.startswith("autoscaling.")}
        assert scaling == {k: v for k, v in template["metadata"]["annotations"].items() if k.startswith("autoscaling.")}
        assert revision["spec"]["containerConcurrency"] == template["spec"]["containerConcurrency"]
        assert revision["spec"]["timeoutSeconds"] == template["spec"]["timeoutSeconds"]
        assert _settings(embedded_args) == _settings(cluster_args)


def _settings(args: list[str]) -> dict:
    """A replica's arguments without what is machine-specific (paths, port, host)."""
    pairs, flags, engine = {}, set(), {}
    i = 0
    while i < len(args):
        arg = args[i]
        if arg == "--engine-arg":
            key, _, value = args[i + 1].partition("=")
            engine[key] = value
            i += 2
        elif arg.startswith("--") and i + 1 < len(args) and not args[i + 1].startswith("--"):
            pairs[arg] = args[i + 1]
            i += 2
        else:
            flags.add(arg)
            i += 1
    for machine_specific in ("--model-dir", "--cache-root", "--dram-root", "--port", "--host"):
        pairs.pop(machine_specific, None)
    if "--source" in pairs and not pairs["--source"].startswith("s3://"):
        pairs.pop("--source")
    return {"pairs": pairs, "flags": flags, "engine": engine}


# ---- deploy against the stand-in API server --------------------------------------------------------


@pytest.fixture
def standin(tmp_path):
    loop = LoopThread()
    server = StandIn()
    url = loop.serve(server.app())
    server.kubeconfig = write_kubeconfig(tmp_path / "kubeconfig", url)
    yield server
    loop.close()


def test_deploy_applies_in_waves_waits_for_ready_and_prunes(standin, tmp_path):
    spec_path = tmp_path / "thaw.yaml"
    spec_path.write_text(RICH)
    r = thaw("deploy", "-f", str(spec_path), "--kubeconfig", str(standin.kubeconfig))
    assert r.returncode == 0, r.stderr + r.stdout
    applied = standin.applied()
    assert all(q.authorization == "Bearer standin-token" for q in standin.requests)  # the kubeconfig's user
    assert all(p.query == {"fieldManager": "thaw", "force": "true"} for p in applied)
    assert all(p.content_type.startswith("application/apply-patch+yaml") for p in applied)
    order = [p.path.rsplit("/", 2)[-2:] for p in applied]
    assert order.index(["services", "thaw-cache-warmer"]) < order.index(["apiserversources", "thaw-revisions"]) \
        < order.index(["services", "llama"]) < order.index(["triggers", "thaw-inference-llama"])
    # each wave was read back (Ready) before the next was applied
    first_model = next(i for i, q in enumerate(standin.requests) if q.path.endswith("/services/llama"))
    assert any(q.method == "GET" and q.path.endswith("/apiserversources/thaw-revisions")
               for q in standin.requests[:first_model])
    # a model removed from the spec is pruned with what was rendered for it
    spec_path.write_text(RICH.replace("  - name: small\n    source: /srv/models/smollm2\n    servedName: smollm2\n"
                                      "    scaling: {max-scale: 2}\n", ""))
    standin.requests.clear()
    r = thaw("deploy", "-f", str(spec_path), "--kubeconfig", str(standin.kubeconfig))
    assert r.returncode == 0, r.stderr + r.stdout
    deleted = sorted(q.path.rsplit("/", 2)[-2] + "/" + q.path.rsplit("/", 1)[-1]
                     for q in standin.requests if q.method == "DELETE")
    assert deleted == ["services/small", "triggers/thaw-inference-small"]


def test_deploy_server_dry_run_persists_nothing(standin, tmp_path):
    r = thaw("deploy", "-f", str(EXAMPLE), "--kubeconfig", str(standin.kubeconfig), "--dry-run", "server")
    assert r.returncode == 0, r.stderr + r.stdout
    assert standin.applied() and all(p.query.get("dryRun") == "All" for p in standin.applied())
    assert standin.objects == {}


def test_deploy_reports_what_does_not_become_ready(standin, tmp_path):
    standin.never_ready.add("thaw-cache-warmer")
    r = thaw("deploy", "-f", str(EXAMPLE), "--kubeconfig", str(standin.kubeconfig), "--timeout", "1")
    assert r.returncode == 1 and "Service/thaw-cache-warmer" in r.stderr
    assert not any(p.path.endswith("/services/smollm2") for p in standin.applied())  # later waves wait


def test_status_cluster_reads_knatives_status(standin, tmp_path):
    assert thaw("deploy", "-f", str(EXAMPLE), "--kubeconfig", str(standin.kubeconfig)).returncode == 0
    r = thaw("status", "-f", str(EXAMPLE), "--cluster", "--json", env={**__import__("os").environ,
                                                                      "KUBECONFIG": str(standin.kubeconfig)})
    assert r.returncode == 0, r.stderr
    rows = {row["name"]: row for row in json.loads(r.stdout)}
    assert rows["smollm2"]["url"] == "http://smollm2.default.example.com"
    assert rows["smollm2"]["latestReadyRevision"] == "smollm2-00001" and rows["smollm2"]["actualReplicas"] == 1


def test_the_optimizer_drives_a_cluster_through_knative(standin, tmp_path):
    """The keep-warm loop and graph look-ahead that drive thaw up drive a cluster through ClusterBackend:
    min-scale through server-side apply under its own field manager, a warm request as a CloudEvent to the
    warmer's Service, a start-ahead request through the model's route. The Services' routes are a loopback
    recorder here (Knative's routes need a cluster)."""
    import asyncio

    from thaw.cache_warmer.optimizer.loop import graph_look_ahead, keep_warm_loop
    from thaw.graph_spec import parse_graph
    from thaw.knative.cluster.backend import ClusterBackend
    from thaw.knative.cluster.deploy import ClusterClient
    from loop_servers import Upstreams

    routes = Upstreams()
    loop = LoopThread()
    routes.base = loop.serve(routes.app())
    routes.reply("thaw-cache-warmer", {})
    routes.reply("smollm2/healthz", {"status": "alive"})
    standin.url_base = routes.base
    assert thaw("deploy", "-f", str(EXAMPLE), "--kubeconfig", str(standin.kubeconfig)).returncode == 0
    raw = yaml.safe_load(EXAMPLE.read_text())
    raw["platform"]["optimizer"] = {"replicaBudget": 1, "interval": "1s"}
    raw["models"] = [m for m in raw["models"] if m["name"] == "smollm2"]  # the one the stand-in's routes answer for
    spec = parse_spec(yaml.safe_dump(raw))
    backend = ClusterBackend(spec, ClusterClient(kubeconfig=str(standin.kubeconfig)))
    standin.requests.clear()

    async def run_until_kept():
        task = asyncio.create_task(keep_warm_loop(backend, lambda: spec.platform.optimizer))
        try:
            for _ in range(100):
                if any(p.query.get("fieldManager") == "thaw-optimizer" and p.path.endswith("/services/smollm2")
                       for p in standin.applied()):
                    return
                await asyncio.sleep(0.1)
        finally:
            task.cancel()

    asyncio.run(run_until_kept())
    # smollm2 had a replica at each look (the stand-in's Revision reports one): called, so kept warm
    patch = next(p for p in standin.applied() if p.query.get("fieldManager") == "thaw-optimizer"
                 and p.path.endswith("/services/smollm2"))
    assert patch.query.get("force") == "true"
    assert patch.body["spec"]["template"]["metadata"]["annotations"] == {"autoscaling.knative.dev/min-scale": "1"}
    assert set(patch.body["spec"]) == {"template"}  # only the field it owns
    live = standin.objects[patch.path]
    assert live["spec"]["template"]["spec"]["containers"]  # the rest of the Service is still deploy's
    warm = routes.seen["thaw-cache-warmer"][0]
    assert warm.headers["ce-type"] == "dev.thaw.cache.warm" and warm.body == {"model": "smollm2"}
    # look-ahead: a graph's later model at zero gets a request through its route; one with a replica does not
    standin.actual_replicas["smollm2-00001"] = 0
    graph = parse_graph("g", {"nodes": {"root": {"routerType": "Sequence", "steps": [
        {"name": "a", "serviceName": "smollm2"}]}}})
    graph_look_ahead(backend)("g", graph)
    poll(lambda: routes.seen.get("smollm2/healthz"), 10, what="start-ahead request")
    standin.actual_replicas["smollm2-00001"] = 1
    assert backend.start_ahead(["smollm2"]) == []
    loop.close()
