"""KServe's manifests as thaw's spec (thaw/kserve.py): InferenceService, ServingRuntime, ClusterServingRuntime and
InferenceGraph documents load with the meaning KServe gives them, or are refused naming the document, the field
and why; `thaw render` of them gives what the equivalent thaw spec gives."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from conftest import thaw_cli
from thaw.knative.cluster.render import render
from thaw.spec import SpecError, parse_spec, spec_warnings

EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "kserve"


def stream(*docs: dict | str) -> str:
    return "\n---\n".join(d if isinstance(d, str) else yaml.safe_dump(d) for d in docs)


def isvc(name: str = "m", predictor: dict | None = None, **meta) -> dict:
    model = {"modelFormat": {"name": "huggingface"}, "storageUri": "s3://models/m"}
    return {"apiVersion": "serving.kserve.io/v1beta1", "kind": "InferenceService",
            "metadata": {"name": name, **meta}, "spec": {"predictor": predictor or {"model": model}}}


def predictor(**model) -> dict:
    return {"model": {"modelFormat": {"name": "huggingface"}, "storageUri": "s3://models/m", **model}}


def test_the_examples_load_with_kserves_meaning():
    text = stream(*(p.read_text() for p in sorted(EXAMPLES.glob("*.yaml"))))
    spec = parse_spec(text, "kserve.yaml")
    llama, minilm = (spec.model(n) for n in ("llama-31-8b-instruct", "minilm"))
    # the runtime's args first, the model's after; its resources where the model names none
    assert llama.servedName == "llama-31-8b-instruct" and llama.engine.max_model_len == 8192
    assert llama.engine.gpu_memory_utilization == 0.9 and llama.park  # --enable-sleep-mode: thaw parks it
    assert llama.source == "s3://models/meta-llama--Meta-Llama-3.1-8B-Instruct"
    assert (llama.resources.cpu, llama.resources.memory, llama.resources.gpu) == ("8", "48Gi", 1)
    assert (llama.scaling.min_scale, llama.scaling.max_scale, llama.scaling.window) == (0, 2, "120s")
    assert llama.containerConcurrency == 16 and llama.timeoutSeconds == 300
    assert minilm.source == "hf://sentence-transformers/all-MiniLM-L6-v2" and minilm.engine.runner == "pooling"
    assert minilm.resources.cpu == "2" and minilm.canaryTrafficPercent == 10
    assert minilm.logger.url == "http://message-dumper.default.svc.cluster.local" and minilm.logger.mode == "all"
    assert spec.platform.namespace == "default"


def test_render_of_kserve_documents_is_the_equivalent_thaw_specs():
    kserve = stream((EXAMPLES / "runtime.yaml").read_text(), (EXAMPLES / "llama.yaml").read_text())
    thaw_spec = {"platform": {"namespace": "default"}, "models": [{
        "name": "llama-31-8b-instruct", "servedName": "llama-31-8b-instruct",
        "source": "s3://models/meta-llama--Meta-Llama-3.1-8B-Instruct", "park": True,
        "engine": {"max_model_len": 8192, "gpu_memory_utilization": 0.9},
        "scaling": {"min-scale": 0, "max-scale": 2, "window": "120s"}, "containerConcurrency": 16,
        "timeoutSeconds": 300, "resources": {"cpu": "8", "memory": "48Gi", "gpu": 1}}]}
    assert render(parse_spec(kserve)) == render(parse_spec(yaml.safe_dump(thaw_spec)))


def test_kserve_documents_beside_thaws_own_spec(tiny_model):
    own = {"platform": {"gateway": {"port": 9999}}, "models": [{"name": "tiny", "source": str(tiny_model)}]}
    graph = {"apiVersion": "serving.kserve.io/v1alpha1", "kind": "InferenceGraph", "metadata": {"name": "chain"},
             "spec": {"nodes": {"root": {"routerType": "Sequence", "steps": [
                 {"serviceName": "tiny"}, {"serviceName": "m", "data": "$response"}]}}}}
    spec = parse_spec(stream(own, isvc(), graph))
    assert [m.name for m in spec.models] == ["tiny", "m"] and spec.platform.gateway.port == 9999
    assert spec.graphs["chain"]["nodes"]["root"]["steps"][1]["serviceName"] == "m"


@pytest.mark.parametrize("doc, field, why", [
    ({**isvc(), "kind": "Predictor"}, "kind", "thaw reads InferenceService"),
    ({**isvc(), "apiVersion": "serving.kserve.io/v1alpha2"}, "apiVersion", "at serving.kserve.io/v1beta1"),
    (isvc(predictor={"containers": [{"image": "x"}]}), "spec.predictor", "not a custom container"),
    ({**isvc(), "spec": {"predictor": predictor(), "transformer": {}}}, "spec.transformer", "InferenceGraph"),
    (isvc(predictor={"model": {"modelFormat": {"name": "sklearn"}, "storageUri": "s3://m/x"}}),
     "spec.predictor.model.modelFormat.name", "'sklearn'"),
    (isvc(predictor=predictor(args=["--frobnicate=1"])), "spec.predictor.model.args[0]", "'--frobnicate=1'"),
    (isvc(predictor=predictor(args=["--max-model-len=lots"])), "spec.predictor.model.args[0]", "not a valid value"),
    (isvc(predictor=predictor(args=["--task=fill_mask"])), "spec.predictor.model.args[0]", "text_embedding"),
    (isvc(predictor=predictor(storageUri="gs://b/m")), "spec.predictor.model.storageUri", "gs:// storage"),
    (isvc(predictor={"model": {"modelFormat": {"name": "huggingface"}}}), "spec.predictor.model", "no weights"),
    (isvc(predictor={**predictor(), "scaleMetric": "cpu", "scaleTarget": 80}), "spec.predictor.scaleMetric",
     "concurrency or rps"),
    (isvc(annotations={"serving.kserve.io/deploymentMode": "ModelMesh"}),
     "metadata.annotations.serving.kserve.io/deploymentMode", "ModelMesh"),
    (isvc(predictor=predictor(runtime="mine")), "spec.predictor.model.runtime", "'mine' is not in the stream"),
    (isvc(predictor={**predictor(), "logger": {"mode": "all", "url": "http://x", "storage": {}}}),
     "spec.predictor.logger", "storage"),
    (isvc(predictor={**predictor(), "batcher": {"maxBatchSize": 8}}), "spec.predictor.batcher", "not something"),
])
def test_what_thaw_cannot_honour_is_refused_naming_the_document_and_field(doc, field, why):
    with pytest.raises(SpecError) as exc:
        parse_spec(stream(isvc("first"), doc), "kserve.yaml")
    problem = next(p for p in exc.value.problems if f": {field}:" in p)
    assert problem.startswith("kserve.yaml:") and "document 2 (" in problem and why in problem, problem


@pytest.mark.parametrize("doc, field", [
    (isvc(annotations={"sidecar.istio.io/inject": "false", "example.com/team": "a"}), "example.com/team"),
    (isvc(predictor=predictor(args=["--disable-log-stats"])), "--disable-log-stats"),
    (isvc(predictor=predictor(args=["--backend=huggingface"])), "--backend=huggingface"),
    (isvc(predictor=predictor(env=[{"name": "HF_TOKEN", "value": "x"}])), "HF_TOKEN"),
    (isvc(predictor={**predictor(), "serviceAccountName": "s3sa"}), "serviceAccountName"),
    (isvc(annotations={"serving.kserve.io/deploymentMode": "RawDeployment"}), "RawDeployment"),
])
def test_what_is_safe_to_leave_aside_is_a_warning_and_the_rest_loads(doc, field):
    spec = parse_spec(stream(doc), "kserve.yaml")
    warnings = spec_warnings(spec, "kserve.yaml")
    assert any(field in w and "document 1 (InferenceService m)" in w for w in warnings), warnings
    assert spec.model("m").source == "s3://models/m"
    assert not any("sidecar.istio.io" in w for w in warnings)  # istio's own are not even worth a warning


@pytest.mark.parametrize("fields, metric, target", [
    ({}, "concurrency", None),
    ({"scaleTarget": 4}, "concurrency", 4),
    ({"scaleMetric": "rps"}, "rps", None),
    ({"scaleMetric": "rps", "scaleTarget": 5}, "rps", 5),
])
def test_scale_metric_and_target_are_knatives_metric_and_target(fields, metric, target):
    scaling = parse_spec(stream(isvc(predictor={**predictor(), **fields}))).model("m").scaling
    assert (scaling.metric, scaling.target) == (metric, target)
    assert scaling.annotations()["autoscaling.knative.dev/metric"] == metric


@pytest.mark.parametrize("model, source, served", [
    ({"args": ["--model_id=acme/llm"]}, "hf://acme/llm", "m"),
    ({"args": ["--model_id=acme/llm", "--model_revision=abc123"]}, "hf://acme/llm:abc123", "m"),
    ({"args": ["--model_name", "chat"], "storageUri": "pvc://models/llm"}, "pvc://models/llm", "chat"),
    ({"storageUri": "file:///srv/llm"}, "/srv/llm", "m"),
    ({"storageUri": "/srv/llm"}, "/srv/llm", "m"),
])
def test_storage_and_the_huggingface_servers_flags(model, source, served):
    body = {"modelFormat": {"name": "huggingface"}, **model}
    spec = parse_spec(stream(isvc(predictor={"model": body})))
    assert spec.model("m").source == source and spec.model("m").served_name == served


def test_a_runtime_is_chosen_as_kserve_chooses_it():
    def runtime(kind: str, name: str, priority: int, auto: bool = True) -> dict:
        return {"apiVersion": "serving.kserve.io/v1alpha1", "kind": kind, "metadata": {"name": name},
                "spec": {"supportedModelFormats": [{"name": "huggingface", "autoSelect": auto, "priority": priority}],
                         "containers": [{"name": "kserve-container", "args": [f"--max-model-len={priority}00"]}]}}

    def chosen(*runtimes, **model) -> int:
        return parse_spec(stream(*runtimes, isvc(predictor=predictor(**model)))).model("m").engine.max_model_len

    assert chosen(runtime("ClusterServingRuntime", "a", 1), runtime("ClusterServingRuntime", "b", 3)) == 300
    assert chosen(runtime("ClusterServingRuntime", "a", 2), runtime("ServingRuntime", "b", 2)) == 200  # namespaced
    assert chosen(runtime("ClusterServingRuntime", "a", 9, auto=False)) is None  # not auto-selected: the built-in
    assert chosen(runtime("ClusterServingRuntime", "a", 9, auto=False), runtime="a") == 900  # named


def test_canary_traffic_follows_kserves_rollout():
    from thaw.knative.embedded.control.traffic import model_traffic

    model = parse_spec(stream(isvc(predictor={**predictor(), "canaryTrafficPercent": 20}))).model("m")
    assert model_traffic(model, ["m-00001"]) == []  # the first revision takes it all
    split = model_traffic(model, ["m-00001", "m-00002"])
    assert [(t.latestRevision, t.revisionName, t.percent) for t in split] == [(True, None, 20), (None, "m-00001", 80)]
    changed = model.model_copy(update={"canaryTrafficPercent": 50})
    assert changed.revision_template() == model.revision_template()  # a new split is not a new revision


def test_a_pvc_source_is_a_claim_on_a_cluster_and_a_folder_here(tmp_path):
    from thaw.knative.embedded.control.plane import local_path

    spec = parse_spec(stream({"platform": {"persistentVolumeClaims": {"models": str(tmp_path)}}},
                             isvc(predictor=predictor(storageUri="pvc://models/llm"))))
    assert local_path("pvc://models/llm", spec) == str(tmp_path / "llm")
    service = next(o for o in render(spec) if o["kind"] == "Service" and o["metadata"]["name"] == "m")
    pod = service["spec"]["template"]["spec"]
    assert {"name": "weights", "persistentVolumeClaim": {"claimName": "models", "readOnly": True}} in pod["volumes"]
    args = pod["containers"][0]["args"]
    assert args[args.index("--model-dir") + 1] == "/mnt/pvc/models/llm"


def test_thaw_validate_and_render_take_a_kserve_stream(tmp_path):
    path = tmp_path / "kserve.yaml"
    path.write_text(stream(*(p.read_text() for p in sorted(EXAMPLES.glob("*.yaml")))))
    out = thaw_cli("validate", "-f", str(path))
    assert out.returncode == 0 and "2 models" in out.stdout, out.stdout + out.stderr
    assert "image and command are not run" in out.stderr
    out = thaw_cli("render", "-f", str(path), "-o", str(tmp_path / "out"))
    assert out.returncode == 0, out.stderr
    bad = tmp_path / "bad.yaml"
    bad.write_text(stream(isvc(predictor=predictor(args=["--frobnicate"]))))
    out = thaw_cli("validate", "-f", str(bad))
    assert out.returncode == 1 and "document 1 (InferenceService m): spec.predictor.model.args[0]" in out.stderr
    assert "Traceback" not in out.stderr


def test_a_runtime_that_wraps_the_server_in_a_script_gives_it_the_arguments_after_the_separator():
    """KServe's Fluid guide wraps the server in `bash -c '<warm the page cache>' -- <the server's args>`: the
    script is not run (thaw reads the weights into the page cache itself); the server's arguments are kept."""
    runtime = {"apiVersion": "serving.kserve.io/v1alpha1", "kind": "ClusterServingRuntime",
               "metadata": {"name": "wrapped"},
               "spec": {"supportedModelFormats": [{"name": "huggingface", "autoSelect": True}],
                        "containers": [{"name": "kserve-container", "image": "x", "command": ["/bin/bash"],
                                        "args": ["-c", "dd if=/mnt/models/x of=/dev/null; exec server \"$@\"", "--",
                                                 "--model_name={{.Name}}-served", "--max-model-len=512"]}]}}
    spec = parse_spec(stream(runtime, isvc(predictor=predictor(runtime="wrapped", storageUri="pvc://data/llm"))))
    model = spec.model("m")
    assert model.served_name == "m-served" and model.engine.max_model_len == 512 and model.source == "pvc://data/llm"
    assert any("image and command are not run" in w for w in spec_warnings(spec))
