"""KServe's manifests as thaw's spec: InferenceService (serving.kserve.io/v1beta1), ServingRuntime and
ClusterServingRuntime (v1alpha1) and InferenceGraph (v1alpha1), alone or beside thaw's own spec in one YAML
stream. Every field with a thaw meaning is mapped (docs/kserve.md lists each); a field thaw cannot honour is
an error that names the document, the field and why; one whose loss is harmless is a warning. Pure: plain
documents in, thaw's spec data and the warnings out (spec.py validates the result as it validates any spec).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

GROUP = "serving.kserve.io"
KINDS = {"InferenceService": "v1beta1", "ServingRuntime": "v1alpha1", "ClusterServingRuntime": "v1alpha1",
         "InferenceGraph": "v1alpha1"}
FORMATS = ("huggingface", "vllm")  # the model formats thaw serves (with vLLM)
# The runtime KServe picks for a huggingface model when the stream names none: kserve-huggingfaceserver.
BUILTIN_RUNTIME = {"metadata": {"name": "kserve-huggingfaceserver"},
                   "spec": {"supportedModelFormats": [{"name": "huggingface", "autoSelect": True, "priority": 1}],
                            "containers": [{"name": "kserve-container", "args": ["--model_name={{.Name}}"]}]}}
# vLLM's engine arguments thaw's spec takes (engine.<name>), as flags, and how each value is read
ENGINE_FLAGS = {"max-model-len": ("max_model_len", int), "max-length": ("max_model_len", int),
                "dtype": ("dtype", str), "gpu-memory-utilization": ("gpu_memory_utilization", float),
                "tensor-parallel-size": ("tensor_parallel_size", int), "max-num-seqs": ("max_num_seqs", int),
                "kv-cache-memory-bytes": ("kv_cache_memory_bytes", int), "seed": ("seed", int),
                "enforce-eager": ("enforce_eager", bool), "runner": ("runner", str)}
TASKS = {"text_generation": "generate", "text2text_generation": "generate", "text_embedding": "pooling"}
# Flags whose loss is harmless here: the function decides its ports and workers, keeps vLLM's stats on (its
# /metrics serves them), and logs requests its own way.
IGNORED_FLAGS = {"host", "port", "http-port", "grpc-port", "workers", "max-threads", "disable-log-stats",
                 "disable-log-requests", "enable-log-requests", "return-probabilities", "tokenizer-revision"}
SAFE_ANNOTATIONS = ("prometheus.", "sidecar.istio.io/", "traffic.sidecar.istio.io/", "serving.kserve.io/enable-")


class KServeInvalid(Exception):
    """KServe documents thaw cannot serve as they are; `problems` are (document, field, why) lines."""

    def __init__(self, problems: list[str]):
        super().__init__("\n".join(problems))
        self.problems = problems


@dataclass
class Converted:
    models: list[dict] = field(default_factory=list)
    graphs: dict[str, dict] = field(default_factory=dict)
    namespace: str | None = None
    warnings: list[str] = field(default_factory=list)


def is_kserve(doc: Any) -> bool:
    return isinstance(doc, dict) and str(doc.get("apiVersion", "")).startswith(GROUP + "/")


def _where(index: int, doc: dict) -> str:
    return f"document {index + 1} ({doc.get('kind')} {(doc.get('metadata') or {}).get('name', '?')})"


class _Document:
    """One KServe document being read: its problems and warnings name it and the field."""

    def __init__(self, index: int, doc: dict, out: Converted, problems: list[str]):
        self.index, self.doc, self.out, self.problems = index, doc, out, problems
        self.where = _where(index, doc)

    def error(self, path: str, why: str) -> None:
        self.problems.append(f"{self.where}: {path}: {why}")

    def warn(self, path: str, why: str) -> None:
        self.out.warnings.append(f"{self.where}: {path}: {why}")


def _flags(args: list[str]) -> list[tuple[str, str | None, int]]:
    """`--flag=value`, `--flag value` and bare `--flag`, normalised (`_` and `-` alike): (name, value, index)."""
    out, i = [], 0
    while i < len(args):
        arg = str(args[i])
        if not arg.startswith("--"):
            out.append(("", arg, i))
            i += 1
            continue
        name, eq, value = arg[2:].partition("=")
        name = name.replace("_", "-")
        if not eq and i + 1 < len(args) and not str(args[i + 1]).startswith("--"):
            value, eq = str(args[i + 1]), "="
            out.append((name, value, i))
            i += 2
            continue
        out.append((name, value if eq else None, i))
        i += 1
    return out


def _value(kind: type, value: str | None):
    if kind is bool:
        if value is None or value.lower() in ("true", "1", "yes"):
            return True
        if value.lower() in ("false", "0", "no"):
            return False
        raise ValueError("true or false")
    if value is None:
        raise ValueError("a value")
    return kind(value)


def _storage_source(d: _Document, uri: str) -> str | None:
    """A thaw source for a storageUri: s3:// and hf:// as they are, pvc:// as it is (resolved where it runs),
    a local path (or file://)."""
    if uri.startswith(("s3://", "hf://", "pvc://")):
        return uri
    if uri.startswith("file://"):
        return uri.removeprefix("file://")
    if "://" not in uri:
        return uri
    d.error("spec.predictor.model.storageUri", f"{uri.split('://')[0]}:// storage is not one thaw reads: use s3://, "
                                               "hf://, pvc:// or a local path")
    return None


def _resources(resources: dict) -> dict:
    """A container's requests (its limits where it sets no request, as Kubernetes reads them) as thaw's."""
    requests, limits = resources.get("requests") or {}, resources.get("limits") or {}
    pick = {**limits, **requests}
    out = {}
    if "cpu" in pick:
        out["cpu"] = str(pick["cpu"])
    if "memory" in pick:
        out["memory"] = str(pick["memory"])
    if "nvidia.com/gpu" in pick:
        out["gpu"] = int(pick["nvidia.com/gpu"])
    return out


def _runtime(d: _Document, name: str | None, fmt: str, runtimes: dict[str, dict]) -> dict | None:
    """The runtime a predictor runs: the one it names, else KServe's auto-selection among the stream's
    runtimes (supportedModelFormats with autoSelect, highest priority; a namespaced ServingRuntime before a
    ClusterServingRuntime), else kserve-huggingfaceserver's defaults."""
    if name:
        if name in runtimes:
            return runtimes[name]
        if name == BUILTIN_RUNTIME["metadata"]["name"]:
            return BUILTIN_RUNTIME
        d.error("spec.predictor.model.runtime", f"runtime {name!r} is not in the stream: add its ServingRuntime or "
                                               "ClusterServingRuntime document, or leave runtime out")
        return None
    candidates = []
    for runtime in runtimes.values():
        for f in (runtime.get("spec") or {}).get("supportedModelFormats") or []:
            if f.get("name") == fmt and f.get("autoSelect"):
                candidates.append((-(f.get("priority") or 0), runtime.get("kind") != "ServingRuntime",
                                   runtime["metadata"]["name"], runtime))
    return min(candidates, key=lambda c: c[:3])[3] if candidates else BUILTIN_RUNTIME


def _predictor(d: _Document, runtimes: dict[str, dict]) -> dict | None:
    meta, spec = d.doc.get("metadata") or {}, d.doc.get("spec") or {}
    name = meta.get("name")
    for component in ("transformer", "explainer"):
        if component in spec:
            d.error(f"spec.{component}", "thaw serves the predictor alone: chain models with an InferenceGraph")
    predictor = spec.get("predictor") or {}
    model = predictor.get("model")
    if model is None:
        d.error("spec.predictor", "thaw serves models with its own vLLM function: give spec.predictor.model "
                                  "(modelFormat huggingface), not a custom container or another framework")
        return None
    out: dict[str, Any] = {"name": name, "engine": {}, "scaling": {}}
    fmt = ((model.get("modelFormat") or {}).get("name") or "").lower()
    if fmt not in FORMATS:
        d.error("spec.predictor.model.modelFormat.name", f"{fmt or 'none'!r}: thaw serves LLMs with vLLM, modelFormat "
                                                         "huggingface")
        return None
    runtime = _runtime(d, model.get("runtime"), fmt, runtimes)
    if runtime is None:
        return None
    container = ((runtime.get("spec") or {}).get("containers") or [{}])[0]
    if container.get("image") or container.get("command"):
        d.warn("spec.predictor.model.runtime", f"runtime {runtime['metadata']['name']}'s image and command are not "
                                               "run: thaw runs its own vLLM function with the runtime's arguments")
    runtime_args = [str(a) for a in container.get("args") or []]
    if container.get("command"):
        # A command that wraps the server (`bash -c '<script>' -- <the server's args>`): its own arguments are
        # the script's; the server's come after `--` (thaw reads the weights into the page cache itself).
        runtime_args = runtime_args[runtime_args.index("--") + 1:] if "--" in runtime_args else []
    args = [a.replace("{{.Name}}", name or "").replace("{{.Namespace}}", meta.get("namespace") or "default")
            for a in runtime_args] + [str(a) for a in model.get("args") or []]
    _read_args(d, args, len(runtime_args), out)
    if model.get("storageUri"):
        source = _storage_source(d, str(model["storageUri"]))
        if source:
            if out.get("source", "").startswith("hf://"):
                d.warn("spec.predictor.model.args", "--model_id is not used: storageUri gives the weights")
            out["source"] = source
    if "source" not in out:
        d.error("spec.predictor.model", "no weights: give storageUri (s3://, hf://, pvc:// or a path) or "
                                        "--model_id=<org>/<name> in args")
    resources = _resources(model.get("resources") or {}) or _resources(container.get("resources") or {})
    if resources:
        out["resources"] = resources
    for env in model.get("env") or []:
        d.warn("spec.predictor.model.env", f"{env.get('name')} is not passed on: thaw sets what vLLM needs")
    _read_predictor(d, predictor, out)
    _read_annotations(d, meta.get("annotations") or {}, "metadata.annotations", out)
    _read_annotations(d, predictor.get("annotations") or {}, "spec.predictor.annotations", out)
    for key in ("engine", "scaling"):
        if not out[key]:
            del out[key]
    return out


def _read_args(d: _Document, args: list[str], from_runtime: int, out: dict) -> None:
    for flag, value, i in _flags(args):
        path = f"spec.predictor.model.args[{i - from_runtime}]" if i >= from_runtime else "the runtime's args"
        try:
            if flag == "model-name":
                out["servedName"] = _value(str, value)
            elif flag == "model-id":
                out["source"] = "hf://" + _value(str, value)
            elif flag == "model-dir":
                out["source"] = _value(str, value)
            elif flag == "model-revision":
                out["revision"] = _value(str, value)
            elif flag == "task":
                task = _value(str, value)
                if task not in TASKS:
                    d.error(path, f"--task={task}: thaw serves {', '.join(TASKS)} (vLLM's generate and pooling runners)")
                else:
                    out["engine"]["runner"] = TASKS[task]
            elif flag == "backend":
                if _value(str, value) == "huggingface":
                    d.warn(path, "--backend=huggingface: thaw serves every model with vLLM")
            elif flag == "enable-sleep-mode":
                out["park"] = _value(bool, value)
            elif flag in ENGINE_FLAGS:
                key, kind = ENGINE_FLAGS[flag]
                out["engine"][key] = _value(kind, value)
            elif flag in IGNORED_FLAGS:
                d.warn(path, f"--{flag} is not needed here: thaw's function decides it")
            else:
                known = ", ".join(f"--{f}" for f in ("model_name", "model_id", "task", "backend", *ENGINE_FLAGS))
                d.error(path, f"{args[i]!r} has no meaning in thaw: it takes {known}")
        except ValueError as exc:
            d.error(path, f"--{flag}: expected {exc}" if str(exc) in ("a value", "true or false")
                    else f"--{flag}={value}: not a valid value")
    if "revision" in out:
        revision = out.pop("revision")
        if out.get("source", "").startswith("hf://"):
            out["source"] += f":{revision}"


def _read_predictor(d: _Document, predictor: dict, out: dict) -> None:
    scaling = out["scaling"]
    if "minReplicas" in predictor:
        scaling["min-scale"] = predictor["minReplicas"]
    if "maxReplicas" in predictor:
        scaling["max-scale"] = predictor["maxReplicas"]
    metric = predictor.get("scaleMetric", "concurrency")
    # KServe's serverless mode: Knative's metric and target annotations (thaw.spec.KPA_METRICS; thaw.spec imports
    # this module, so the pair is spelled out here)
    if metric in ("concurrency", "rps"):
        scaling["metric"] = metric
        if "scaleTarget" in predictor:
            scaling["target"] = predictor["scaleTarget"]
    else:
        d.error("spec.predictor.scaleMetric", f"{metric}: thaw's autoscaler is Knative's KPA, which scales on "
                                              "concurrency or rps (KServe maps cpu and memory to the HPA class)")
    for key, thaw_key in (("containerConcurrency", "containerConcurrency"), ("timeout", "timeoutSeconds"),
                          ("canaryTrafficPercent", "canaryTrafficPercent"), ("nodeSelector", "nodeSelector"),
                          ("tolerations", "tolerations")):
        if key in predictor:
            out[thaw_key] = predictor[key]
    logger = predictor.get("logger")
    if logger is not None:
        if set(logger) - {"mode", "url"}:
            d.error("spec.predictor.logger", f"{sorted(set(logger) - {'mode', 'url'})}: thaw's logger takes mode "
                                             "and url (or thaw's broker: the spec's logger.broker)")
        out["logger"] = {k: v for k, v in logger.items() if k in ("mode", "url")}
    for key in ("batcher", "containers", "workerSpec"):
        if key in predictor:
            d.error(f"spec.predictor.{key}", "not something thaw serves: remove it")
    for key in ("serviceAccountName", "labels", "imagePullSecrets", "deploymentStrategy"):
        if key in predictor:
            d.warn(f"spec.predictor.{key}", "ignored: thaw's own pods carry what they need")


def _read_annotations(d: _Document, annotations: dict, path: str, out: dict) -> None:
    for key, value in annotations.items():
        if key.startswith("autoscaling.knative.dev/"):
            out["scaling"][key.removeprefix("autoscaling.knative.dev/")] = value
        elif key == "serving.kserve.io/deploymentMode":
            if value == "ModelMesh":
                d.error(f"{path}.{key}", "ModelMesh: thaw's plane packs many models on a node its own way "
                                         "(docs/serving.md); remove the annotation")
            elif value != "Serverless":
                d.warn(f"{path}.{key}", f"{value}: thaw serves every model the serverless way (Knative), scaling to "
                                        "zero unless minReplicas keeps replicas")
        elif not key.startswith(SAFE_ANNOTATIONS):
            d.warn(f"{path}.{key}", "ignored: not an annotation thaw acts on")


def _graph(d: _Document) -> tuple[str, dict]:
    return (d.doc.get("metadata") or {}).get("name"), d.doc.get("spec") or {}


def convert(docs: list[tuple[int, dict]]) -> Converted:
    """KServe's documents (with their indexes in the stream) as thaw's models and graphs; raises
    KServeInvalid with every problem found."""
    out, problems = Converted(), []
    runtimes: dict[str, dict] = {}
    readable = []
    for index, doc in docs:
        kind, version = doc.get("kind"), str(doc.get("apiVersion", "")).removeprefix(GROUP + "/")
        d = _Document(index, doc, out, problems)
        if kind not in KINDS:
            d.error("kind", f"thaw reads {', '.join(KINDS)}; not {kind}")
        elif version != KINDS[kind]:
            d.error("apiVersion", f"{GROUP}/{version}: thaw reads {kind} at {GROUP}/{KINDS[kind]}")
        elif not (doc.get("metadata") or {}).get("name"):
            d.error("metadata.name", "every document needs a name")
        else:
            readable.append((index, doc))
            if kind in ("ServingRuntime", "ClusterServingRuntime"):
                runtimes[doc["metadata"]["name"]] = doc
        namespace = (doc.get("metadata") or {}).get("namespace")
        if namespace and kind != "ClusterServingRuntime":
            if out.namespace not in (None, namespace):
                d.error("metadata.namespace", f"{namespace}: one thaw spec serves one namespace ({out.namespace})")
            out.namespace = out.namespace or namespace
    for index, doc in readable:
        d = _Document(index, doc, out, problems)
        if doc["kind"] == "InferenceService":
            model = _predictor(d, runtimes)
            if model is not None:
                out.models.append(model)
        elif doc["kind"] == "InferenceGraph":
            name, graph = _graph(d)
            out.graphs[name] = graph
    if problems:
        raise KServeInvalid(problems)
    return out
