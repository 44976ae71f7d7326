"""The platform spec, `thaw.yaml`: one file that both the embedded plane and a Knative cluster run.

Field names follow the ecosystems they come from: Kubernetes camelCase for object fields
(`containerConcurrency`, `timeoutSeconds`), Knative's annotation names for scaling (`min-scale`,
`target-burst-capacity`, ...; the full `autoscaling.knative.dev/...` key is accepted too), vLLM's
engine argument names for the engine, and a KServe InferenceGraph `spec` for each graph, unchanged.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Iterable, Literal
from urllib.parse import urlsplit

import yaml
from pydantic import (AfterValidator, BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator,
                      model_validator)

from thaw.durations import GoDuration, parse_iso_duration
from thaw.graph_spec import GraphInvalid, parse_graph
from thaw.trigger_filters import check_filters

DNS1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
AUTOSCALING_PREFIX = "autoscaling.knative.dev/"
KPA_METRICS = ("concurrency", "rps")  # Knative's default autoscaler class; cpu and memory are the HPA class's


class SpecModel(BaseModel):
    """Base: unknown fields are errors (a typo must not silently fall back to a default)."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True, frozen=True)


def validate_traffic(targets: Iterable) -> None:
    """Raise ValueError as Knative's validation would for a traffic block."""
    targets = list(targets)
    total = sum(t.percent or 0 for t in targets)
    if total != 100:
        raise ValueError(f"traffic percents must sum to 100, got {total}")
    tags = [t.tag for t in targets if t.tag]
    dupes = sorted({t for t in tags if tags.count(t) > 1})
    if dupes:
        raise ValueError(f"traffic tags must be unique; repeated: {', '.join(dupes)}")


def _kebab(name: str) -> str:
    return name.replace("_", "-")


class EngineArgs(SpecModel):
    """vLLM engine arguments, under vLLM's own names."""

    model_config = ConfigDict(extra="forbid", frozen=True, protected_namespaces=())

    dtype: Literal["auto", "bfloat16", "float16", "half", "float32", "float"] = "auto"
    max_model_len: int | None = Field(None, ge=16)
    enforce_eager: bool = True
    gpu_memory_utilization: float = Field(0.9, gt=0, le=1)
    tensor_parallel_size: int = Field(1, ge=1)
    max_num_seqs: int | None = Field(None, ge=1)
    # The KV cache's size on a GPU. None: thaw sizes it for max_num_seqs sequences of max_model_len tokens
    # when both are known and it fits, else vLLM profiles and takes gpu_memory_utilization's share.
    kv_cache_memory_bytes: int | None = Field(None, ge=1)
    seed: int | None = None
    # CPU builds size the KV cache from VLLM_CPU_KVCACHE_SPACE (GiB); without it vLLM takes far too much.
    kv_cache_gib: int = Field(1, ge=1)
    # Where vLLM's engine core runs. "inproc": in the serving process; "mp": a separate process,
    # overlapping HTTP work with model execution. None: the platform's choice, made by measurement
    # (thaw/vllm_platform.py; docs/function.md, docs/gpu.md).
    engine_core: Literal["inproc", "mp"] | None = None
    # vLLM's sleep mode; a model with `park: true` gets it from its first start (see Model.replica_engine).
    enable_sleep_mode: bool = False
    # vLLM's runner: "pooling" serves embeddings (/v1/embeddings), "generate" text; None: vLLM's "auto", by the
    # model's architecture (a BertModel pools, a LlamaForCausalLM generates).
    runner: Literal["auto", "generate", "pooling"] | None = None

    def vllm_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for vllm.EngineArgs (thaw-only settings left out)."""
        return self.model_dump(exclude={"kv_cache_gib", "engine_core"}, exclude_none=True)

    def config_id(self, vllm_version: str) -> str:
        """Names this engine configuration's compile cache: vLLM keys torch.compile artifacts by the
        engine's configuration, so each configuration keeps its own folder in the cache tier."""
        import hashlib
        import json

        text = json.dumps({"vllm": vllm_version, **self.vllm_kwargs()}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


class Scaling(SpecModel):
    """Knative autoscaling annotations, by their names, with Knative's defaults (config-autoscaler)."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True, frozen=True, alias_generator=_kebab)

    metric: str = Field("concurrency", description="the KPA's metric: concurrency or rps")
    min_scale: int = Field(0, ge=0)
    max_scale: int = Field(0, ge=0, description="0 means unbounded")
    initial_scale: int = Field(0, ge=0, description="thaw starts every model at zero unless told")
    target: float | None = Field(None, ge=0.01, description="None: containerConcurrency, else 100 (rps: 200)")
    target_utilization_percentage: float = Field(70, ge=1, le=100)
    window: GoDuration(6, 3600) = "60s"
    panic_window_percentage: float = Field(10, ge=1, le=100)
    panic_threshold_percentage: float = Field(200, ge=110, le=1000)
    scale_down_delay: GoDuration(0, 3600) = "0s"
    scale_to_zero_pod_retention_period: GoDuration(0, 3600) = "0s"
    activation_scale: int = Field(1, ge=1)
    # Deliberately not Knative's 211: with 211 a revision whose pods take few concurrent requests (a GPU
    # LLM) never has spare capacity above it, so the activator stays in every request's path. 0 keeps the
    # activator out once a pod is up, and in the path only at zero (docs/cluster.md).
    target_burst_capacity: float = Field(0, ge=-1)

    @model_validator(mode="before")
    @classmethod
    def _strip_annotation_prefix(cls, data: Any) -> Any:
        if isinstance(data, dict):
            return {k.removeprefix(AUTOSCALING_PREFIX): v for k, v in data.items()}
        return data

    @field_validator("metric")
    @classmethod
    def _kpa_metric(cls, metric: str) -> str:
        if metric not in KPA_METRICS:
            raise ValueError(f"{metric!r}: thaw's autoscaler is Knative's KPA, which scales on concurrency or rps "
                             "(cpu, memory and custom metrics need the HPA class)")
        return metric

    @model_validator(mode="after")
    def _bounds(self) -> "Scaling":
        if self.max_scale and self.min_scale > self.max_scale:
            raise ValueError(f"min-scale ({self.min_scale}) must not exceed max-scale ({self.max_scale})")
        if self.max_scale and self.initial_scale > self.max_scale:
            raise ValueError(f"initial-scale ({self.initial_scale}) must not exceed max-scale ({self.max_scale})")
        return self

    def annotations(self) -> dict[str, str]:
        """The Knative annotations, values as strings (what a Revision template carries)."""
        values = self.model_dump(by_alias=True, exclude_none=True)
        return {AUTOSCALING_PREFIX + k: _annotation_value(v) for k, v in values.items()}


def _annotation_value(value: Any) -> str:
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def quantity_value(text: str):
    """A Kubernetes quantity's value (a Decimal); ValueError for anything Kubernetes refuses."""
    from kubernetes.utils import parse_quantity  # slow to import: only when a quantity is read

    try:
        return parse_quantity(text)
    except ValueError:
        raise ValueError(f"{text!r} is not a Kubernetes quantity such as '2', '500m' or '8Gi'") from None


def quantity_bytes(text: str) -> int:
    return int(quantity_value(text))


def _check_quantity(text: str) -> str:
    quantity_value(text)
    return text


# The spec's one typed field for Kubernetes quantities ("8Gi", "500m"), kept as written.
Quantity = Annotated[str, AfterValidator(_check_quantity)]


class Resources(SpecModel):
    """A replica's requests, as a pod's: it starts only where they fit (knative/embedded/control/node.py)."""

    cpu: Quantity | None = None
    memory: Quantity | None = None
    gpu: int = Field(0, ge=0)


class NodeResources(SpecModel):
    """What the embedded plane may allocate to replicas, as a node's allocatable; left out: the machine's
    (the cores this process may run on, its RAM, its GPUs)."""

    cpu: Quantity | None = None  # whole cores, the first of those this process may use
    memory: Quantity | None = None
    gpus: int | None = Field(None, ge=0)
    # Host RAM kept free for the system, as the kubelet's systemReserved: a quantity or a share of the node's
    # memory. Replicas' requests and pinned host copies never take the node below it.
    systemReserved: str = "10%"

    @field_validator("systemReserved")
    @classmethod
    def _reserved(cls, value: str) -> str:
        if value.endswith("%"):
            try:
                share = float(value[:-1])
            except ValueError:
                share = -1
            if not 0 <= share < 100:
                raise ValueError(f"a share of the node's memory from 0% to 99%, or a quantity like 8Gi, not {value!r}")
            return value
        return _check_quantity(value)


class CachePolicy(SpecModel):
    pin: bool = False
    prewarm: bool = True
    tier: Literal["disk", "dram"] = "disk"
    # Stage through the cache tier? None: s3:// sources yes, local folders are served in place.
    stage: bool | None = None


class TrafficTarget(SpecModel):
    """One entry of a Knative traffic block."""

    revisionName: str | None = None
    latestRevision: bool | None = None
    percent: int | None = Field(None, ge=0, le=100)
    tag: str | None = None

    @model_validator(mode="after")
    def _target(self) -> "TrafficTarget":
        if self.latestRevision and self.revisionName:
            raise ValueError("set either revisionName or latestRevision: true, not both")
        if not self.latestRevision and not self.revisionName:
            raise ValueError("a traffic target needs revisionName or latestRevision: true")
        if self.tag is not None and not DNS1123_LABEL.match(self.tag):
            raise ValueError(f"tag {self.tag!r} is not a DNS-1123 label")
        return self


class Toleration(SpecModel):
    """A Kubernetes toleration (cluster mode: GPU nodes are usually tainted)."""

    key: str | None = None
    operator: Literal["Exists", "Equal"] = "Equal"
    value: str | None = None
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = None
    tolerationSeconds: int | None = None


class PayloadLogging(SpecModel):
    """KServe's `logger`: each request to the model and its response as CloudEvents (KServe's types and
    attributes, one id for both; a stream logged once whole) to a sink URL, or to thaw's broker of that name
    (so triggers route them). It never delays or fails a request (functions/payload_log.py)."""

    mode: Literal["all", "request", "response"] = "all"
    url: str | None = None
    broker: str | None = None
    maxBodySize: Quantity = "1Mi"  # a larger body is cut (the event says its full size)
    metadataHeaders: list[str] = []  # request headers to log (KServe's); credentials never are

    @model_validator(mode="after")
    def _one_sink(self):
        if (self.url is None) == (self.broker is None):
            raise ValueError("give exactly one of url (any CloudEvents sink) and broker (thaw's broker of that name)")
        if self.url is not None and not re.match(r"^https?://[^/\s]+", self.url):
            raise ValueError(f"url must be an absolute http(s) URL, not {self.url!r}")
        return self


class Model(SpecModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True, frozen=True, protected_namespaces=())

    name: str
    source: str
    servedName: str | None = None
    engine: EngineArgs = EngineArgs()
    scaling: Scaling = Scaling()
    containerConcurrency: int = Field(0, ge=0, le=1000, description="0 means unlimited")
    timeoutSeconds: int = Field(300, ge=1, le=3600)
    resources: Resources = Resources()
    cache: CachePolicy = CachePolicy()
    standby: bool = True
    # Where Knative would take the revision to zero, keep its last replica parked instead: vLLM's sleep
    # mode level 1 (weights in host RAM, GPU memory released), woken by the next request in well under a
    # second. Needs vLLM's CUDA build; elsewhere the replica is stopped as usual (`thaw validate` says so).
    park: bool = False
    # Knative's traffic block; empty means all traffic to the latest revision.
    traffic: list[TrafficTarget] = []
    # Cluster mode: where the model's pods may run (ignored embedded).
    nodeSelector: dict[str, str] = {}
    tolerations: list[Toleration] = []
    # Payload logging (KServe's spec.predictor.logger).
    logger: PayloadLogging | None = None
    # KServe's canary rollout: the newest revision gets this share of the traffic, the one serving before it
    # the rest (100 once it is the only one); `traffic` then stays empty.
    canaryTrafficPercent: int | None = Field(None, ge=0, le=100)

    @field_validator("name")
    @classmethod
    def _dns_label(cls, v: str) -> str:
        if len(v) > 63 or not DNS1123_LABEL.match(v):
            raise ValueError(
                f"{v!r} is not a DNS-1123 label: use at most 63 lowercase letters, digits and '-', "
                "starting and ending with a letter or digit"
            )
        return v

    @field_validator("source")
    @classmethod
    def _source(cls, v: str) -> str:
        if "://" in v and not v.startswith(("s3://", "hf://", "pvc://")):
            raise ValueError(f"{v!r}: a source is s3://bucket/prefix, hf://org/name[:revision], "
                             "pvc://claim/path or a local path")
        if v.startswith("s3://") and not re.match(r"^s3://[a-z0-9][a-z0-9.-]{1,61}[a-z0-9](/.*)?$", v):
            raise ValueError(f"{v!r} is not s3://bucket/prefix with a valid bucket name")
        if v.startswith("hf://") and not re.match(r"^hf://[\w.-]+/[\w.-]+(:[\w./-]+)?$", v):
            raise ValueError(f"{v!r} is not hf://org/name, or hf://org/name:revision")
        if v.startswith("pvc://") and not re.match(r"^pvc://[a-z0-9][a-z0-9.-]*(/.*)?$", v):
            raise ValueError(f"{v!r} is not pvc://claim/path")
        return v

    @model_validator(mode="after")
    def _traffic(self) -> "Model":
        if self.traffic:
            validate_traffic(self.traffic)
            if self.canaryTrafficPercent is not None:
                raise ValueError("give either traffic (Knative's) or canaryTrafficPercent (KServe's), not both")
        return self

    @property
    def served_name(self) -> str:
        return self.servedName or self.name

    @property
    def stages_through_tier(self) -> bool:
        """s3:// and hf:// sources always go through the cache tier; local folders (and claims) only when
        `cache.stage` says so."""
        return self.source.startswith(("s3://", "hf://")) or bool(self.cache.stage)

    def replica_engine(self) -> EngineArgs:
        """The engine a replica runs. A parking model's engine has sleep mode on from its first start, so
        the revision's engine configuration (and vLLM's compile cache key) never changes. A replica never
        gets more than containerConcurrency requests at once, so its engine batches no more sequences
        (unless the spec says otherwise): vLLM then captures CUDA graphs only up to twice that batch, and
        a GPU engine sizes its KV cache for it (functions/engine_plan.py)."""
        update: dict[str, Any] = {}
        if self.park:
            update["enable_sleep_mode"] = True
        if self.containerConcurrency and self.engine.max_num_seqs is None:
            update["max_num_seqs"] = self.containerConcurrency
        return self.engine.model_copy(update=update)

    def revision_template(self) -> dict[str, Any]:
        """What makes a revision: every setting but the name and the traffic split."""
        return self.model_dump(mode="json", exclude={"name", "traffic", "canaryTrafficPercent"})


class Gateway(SpecModel):
    host: str = "127.0.0.1"
    port: int = Field(8080, ge=1, le=65535)
    # The largest request body the gateway, the broker, graphs and each replica take (a quantity); more is a 413.
    maxBodySize: Quantity = "32Mi"
    # A connection with no complete request (idle, or its headers or body arriving slower) is closed after this.
    idleTimeout: GoDuration(1, 3600) = "60s"
    # KServe's host-style URLs: `Host: <model>.<namespace>.<domain>` (or `<model>-predictor...`) reaches that
    # model on any of the gateway's model routes, as an InferenceService's URL does. Knative's default domain.
    domain: str = "example.com"

    @property
    def max_body_bytes(self) -> int:
        return quantity_bytes(self.maxBodySize)

    @property
    def local_url(self) -> str:
        """Where clients on this machine reach the gateway (a wildcard bind is reached on loopback)."""
        host = "127.0.0.1" if self.host in ("0.0.0.0", "") else self.host
        return f"http://{host}:{self.port}"


class CacheTier(SpecModel):
    path: str = ".thaw/cache"
    capacity: Quantity = "50Gi"
    dramPath: str = "/dev/shm/thaw-cache"  # the DRAM tier, for models with cache.tier: dram

    @property
    def capacity_bytes(self) -> int:
        return quantity_bytes(self.capacity)


class S3Origin(SpecModel):
    endpointUrl: str | None = None
    region: str | None = None
    profile: str | None = None
    # Cap on the link to the origin per stager (to reproduce a shared link), in megabits per second.
    bandwidthMbps: float | None = Field(None, gt=0)


class Origin(SpecModel):
    s3: S3Origin = S3Origin()


class Autoscaler(SpecModel):
    """config-autoscaler: Knative's cluster-wide settings and defaults, by their names."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True, frozen=True, alias_generator=_kebab)

    tick_interval: GoDuration(0.01, 3600) = "2s"
    scale_to_zero_grace_period: GoDuration(0.01, 3600) = "30s"
    max_scale_up_rate: float = Field(1000, gt=1)
    max_scale_down_rate: float = Field(2, gt=1)
    enable_scale_to_zero: bool = True
    container_concurrency_target_default: float = Field(100, ge=0.01)
    requests_per_second_target_default: float = Field(200, ge=0.01)


class Activator(SpecModel):
    # Requests a revision may hold while it has no ready replica with room; more get 503.
    queueDepth: int = Field(256, ge=1)
    # How long a draining replica's SIGTERM may take before SIGKILL.
    terminationGracePeriodSeconds: int = Field(10, ge=0)


class Parking(SpecModel):
    """What sleeping replicas may hold. A replica parks with a host copy of its weights in pinned host RAM
    (hostMemory bounds all host copies together, awake replicas' included: they are built ahead of a sleep);
    one without a copy hibernates. Each sleeper holds a process and a CUDA context (about 1 GiB of GPU
    memory): gpuContexts bounds how many sleep at all. The most recently used hold copies, the least
    recently used sleepers stop (knative/embedded/control/parking.py)."""

    hostMemory: Quantity = "64Gi"
    gpuContexts: int = Field(8, ge=0)
    # Built engines kept waiting, per shape (models that share architecture, tokenizer, engine arguments and
    # resources), for a model at zero to adopt: its start is then a wake with its own weights
    # (knative/embedded/control/engine_pool.py). Each holds a process, a context and its host buffers, and
    # counts against gpuContexts before the sleepers do.
    enginePool: int = Field(0, ge=0)

    @property
    def host_memory_bytes(self) -> int:
        return quantity_bytes(self.hostMemory)


class Auth(SpecModel):
    """Bearer tokens for the gateway. A file (YAML list of {token, models}) and/or an environment
    variable ("tok" or "tok=model1|model2", comma-separated); no source means no auth."""

    tokensFile: str | None = None
    tokensEnv: str | None = None


class Optimizer(SpecModel):
    """The cold-start optimizer's budget: what it may keep warm for models likely to be called soon."""

    memoryBudget: Quantity = "0"  # weights kept prewarmed in memory
    replicaBudget: int = Field(0, ge=0)  # idle replicas kept up (0: every model may go to zero)
    window: GoDuration(1, 86400) = "600s"  # request history the call rate is measured over
    horizon: GoDuration(1, 86400) = "300s"  # "soon"
    interval: GoDuration(1, 86400) = "10s"


class FluidCache(SpecModel):
    """A Fluid Dataset per s3:// model, cached by a JuiceFS runtime, preloaded by a DataLoad."""

    runtime: Literal["JuiceFSRuntime", "ThinRuntime"] = "JuiceFSRuntime"
    mediumType: Literal["MEM", "SSD", "HDD"] = "SSD"
    quota: Quantity = "100Gi"
    cachePath: str = "/var/cache/fluid"
    profileName: str | None = None  # ThinRuntime: the ThinRuntimeProfile to use


class ClusterCacheVolume(SpecModel):
    """What backs the cache tier on a cluster: a node-local hostPath, a (RWX) PVC, or Fluid."""

    hostPath: str | None = None
    persistentVolumeClaim: str | None = None
    fluid: FluidCache | None = None

    @model_validator(mode="after")
    def _one(self) -> "ClusterCacheVolume":
        if sum(x is not None for x in (self.hostPath, self.persistentVolumeClaim, self.fluid)) > 1:
            raise ValueError("give one of hostPath, persistentVolumeClaim and fluid")
        return self


class Images(SpecModel):
    function: str = "ghcr.io/thaw-dev/thaw-function:latest"
    cacheWarmer: str = "ghcr.io/thaw-dev/thaw-cache-warmer:latest"
    router: str = "ghcr.io/thaw-dev/thaw-router:latest"


class Cluster(SpecModel):
    """Cluster mode only (`thaw render` / `thaw deploy`)."""

    images: Images = Images()
    cacheVolume: ClusterCacheVolume = ClusterCacheVolume()
    cacheMountPath: str = "/var/cache/thaw"  # where pods see the cache tier
    progressDeadline: GoDuration(1, 86400) = "1800s"  # serving.knative.dev/progress-deadline: a model start may be long


class Platform(SpecModel):
    namespace: str = "default"
    gateway: Gateway = Gateway()
    stateDir: str = ".thaw"
    cache: CacheTier = CacheTier()
    origin: Origin = Origin()
    autoscaler: Autoscaler = Autoscaler()
    activator: Activator = Activator()
    auth: Auth = Auth()
    optimizer: Optimizer = Optimizer()
    parking: Parking = Parking()
    node: NodeResources = NodeResources()
    # Embedded: the folder that holds each PersistentVolumeClaim a pvc:// source names (on a cluster, the
    # claim itself is mounted).
    persistentVolumeClaims: dict[str, str] = {}
    # Where the serving plane sends revision lifecycle CloudEvents (ApiServerSource format).
    eventSink: str | None = None
    cluster: Cluster = Cluster()


class SubscriberRef(SpecModel):
    kind: Literal["Model", "Graph", "Service"]
    name: str
    apiVersion: str | None = None


class Destination(SpecModel):
    """A Knative Destination: a URI, a reference, or both (the URI is then relative to the ref)."""

    uri: str | None = None
    ref: SubscriberRef | None = None

    @model_validator(mode="after")
    def _one(self) -> "Destination":
        # Knative's Destination.Validate, rule by rule (pkg/apis/duck/v1/destination.go)
        if self.uri is None and self.ref is None:
            raise ValueError("a destination needs a uri or a ref")
        if self.uri is not None:
            url = urlsplit(self.uri)
            if self.ref is not None and url.scheme:
                raise ValueError("an absolute uri is not allowed with a ref (give a path relative to it)")
            if self.ref is None and not (url.scheme and url.hostname):
                raise ValueError(f"uri {self.uri!r} is relative: without a ref it must be absolute, with a host "
                                 "(such as http://host:port/path)")
        return self


class Delivery(SpecModel):
    retry: int | None = Field(None, ge=0)
    backoffPolicy: Literal["linear", "exponential"] = "exponential"
    backoffDelay: str | None = None
    timeout: str | None = None
    deadLetterSink: Destination | None = None

    @field_validator("backoffDelay", "timeout")
    @classmethod
    def _iso_duration(cls, v: str | None, info) -> str | None:
        if v is not None:
            parse_iso_duration(v, info.field_name)
        return v


class TriggerFilter(SpecModel):
    attributes: dict[str, str] = {}


class Trigger(SpecModel):
    name: str
    broker: str = "default"
    filter: TriggerFilter | None = None
    filters: list[dict[str, Any]] = []
    subscriber: Destination
    delivery: Delivery | None = None

    @field_validator("name")
    @classmethod
    def _dns_label(cls, v: str) -> str:
        return Model._dns_label(v)

    @field_validator("filters")
    @classmethod
    def _filters(cls, v: list[dict[str, Any]]) -> list[dict[str, Any]]:
        check_filters(v)
        return v

    def destinations(self) -> list[Destination]:
        return [self.subscriber] + ([self.delivery.deadLetterSink] if self.delivery and self.delivery.deadLetterSink else [])


class Spec(SpecModel):
    _notes: list[str] = PrivateAttr(default_factory=list)  # what KServe's documents said that thaw leaves aside
    platform: Platform = Platform()
    models: list[Model] = []
    # name -> the `spec` of a KServe InferenceGraph, kept as written.
    graphs: dict[str, dict[str, Any]] = {}
    triggers: list[Trigger] = []

    @model_validator(mode="after")
    def _names_are_unique(self) -> "Spec":
        for what, names in (("model", [m.name for m in self.models]), ("trigger", [t.name for t in self.triggers])):
            dupes = sorted({n for n in names if names.count(n) > 1})
            if dupes:
                raise ValueError(f"{what} names must be unique; repeated: {', '.join(dupes)}")
        served = [m.served_name for m in self.models]
        dupes = sorted({n for n in served if served.count(n) > 1})
        if dupes:
            raise ValueError(f"served names must be unique; repeated: {', '.join(dupes)}")
        return self

    @model_validator(mode="after")
    def _references_resolve(self) -> "Spec":
        """Graph steps name models of this spec; trigger refs name its models and graphs."""
        known = {m.name for m in self.models} | {m.served_name for m in self.models}
        for name, graph in self.graphs.items():
            try:
                parsed = parse_graph(name, graph)
            except GraphInvalid as exc:
                raise ValueError(f"graph {name!r}: {exc}") from None
            for node in parsed.nodes.values():
                for step in node.steps:
                    if step.serviceName and step.serviceName not in known:
                        raise ValueError(f"graph {name!r}: step serviceName {step.serviceName!r} is not a model "
                                         "of this spec (use serviceUrl for anything else)")
        for trigger in self.triggers:
            for dest in trigger.destinations():
                if dest.ref is None:
                    continue
                names = ({m.name for m in self.models} if dest.ref.kind == "Model"
                         else set(self.graphs) if dest.ref.kind == "Graph" else None)
                if names is not None and dest.ref.name not in names:
                    raise ValueError(f"trigger {trigger.name!r}: no {dest.ref.kind.lower()} named {dest.ref.name!r}")
        return self

    def model(self, name: str) -> Model:
        for m in self.models:
            if m.name == name or m.served_name == name:
                return m
        raise KeyError(name)


def pvc_parts(source: str) -> tuple[str, str]:
    """pvc://claim/path as (claim, path in the claim)."""
    claim, _, path = source.removeprefix("pvc://").partition("/")
    return claim, path.strip("/")


class SpecError(Exception):
    """A spec that cannot be used; `problems` holds one readable line per error."""

    def __init__(self, path: str, problems: list[str]):
        self.path = path
        self.problems = problems
        super().__init__("\n".join(problems))


def _line_index(node: yaml.Node, path: tuple = ()) -> dict[tuple, int]:
    """Map each path in the YAML document (keys and list indexes) to its 1-based line."""
    index = {path: node.start_mark.line + 1}
    if isinstance(node, yaml.MappingNode):
        for key, value in node.value:
            child = path + (key.value,)
            index[child] = key.start_mark.line + 1
            index.update({k: v for k, v in _line_index(value, child).items() if k != child})
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            index.update(_line_index(item, path + (i,)))
    return index


def _format_loc(loc: tuple) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(top level)"


def _explain(error: dict) -> str:
    kind, msg = error["type"], error["msg"]
    if kind == "extra_forbidden":
        return "unknown field: remove it or check its spelling"
    if kind == "missing":
        return "required field is missing: add it"
    if kind == "value_error":
        return msg.removeprefix("Value error, ")
    value = error.get("input")
    shown = f" (got {value!r})" if not isinstance(value, (dict, list)) else ""
    return f"{msg}{shown}"


def _with_kserve(documents: list, nodes: list, path: str) -> tuple[Any, dict, list[str]]:
    """A YAML stream as one spec: thaw's own document (at most one) with KServe's documents converted into it
    (thaw/kserve.py). The stream's line index is the thaw document's; KServe's problems name their document."""
    from thaw.kserve import KServeInvalid, convert, is_kserve

    own = [(i, d) for i, d in enumerate(documents) if d is not None and not is_kserve(d)]
    kserve = [(i, d) for i, d in enumerate(documents) if is_kserve(d)]
    if len(own) > 1:
        raise SpecError(path, [f"{path}:{nodes[own[1][0]].start_mark.line + 1}: (top level): one thaw spec per file, "
                               "beside any number of KServe documents"])
    data = own[0][1] if own else {}
    lines = _line_index(nodes[own[0][0]]) if own else {}
    if not kserve:
        return data, lines, []
    if not isinstance(data, dict):
        return data, lines, []
    try:
        converted = convert(kserve)
    except KServeInvalid as exc:
        raise SpecError(path, [f"{path}:{nodes[int(p.split()[1]) - 1].start_mark.line + 1}: {p}" for p in exc.problems]) from None
    data = {**data, "models": [*data.get("models", []), *converted.models],
            "graphs": {**data.get("graphs", {}), **converted.graphs}}
    if converted.namespace:
        platform = data.get("platform") or {}
        if platform.get("namespace", converted.namespace) != converted.namespace:
            raise SpecError(path, [f"{path}:1: platform.namespace: {platform['namespace']} here, {converted.namespace} "
                                   "in the KServe documents: one spec serves one namespace"])
        data["platform"] = {**platform, "namespace": converted.namespace}
    return data, lines, converted.warnings


def parse_spec(text: str, path: str = "thaw.yaml") -> Spec:
    """Parse and validate spec text (thaw's spec, KServe's documents, or both in one YAML stream); raise
    SpecError naming file, line, field path and the fix."""
    try:
        nodes = list(yaml.compose_all(text))
        documents = list(yaml.safe_load_all(text))
        data, lines, notes = _with_kserve(documents, nodes, path)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else f"{path}:1"
        raise SpecError(path, [f"{where}: (top level): not valid YAML: {getattr(exc, 'problem', exc)}"]) from None
    except RecursionError:  # PyYAML's composer recurses once per level
        raise SpecError(path, [f"{path}:1: (top level): nested too deeply to be a spec: flatten it"]) from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise SpecError(path, [f"{path}:1: (top level): the spec must be a mapping with platform, models, graphs, "
                               "triggers"])
    try:
        spec = Spec.model_validate(data)
        spec._notes = notes
        return spec
    except RecursionError:
        raise SpecError(path, [f"{path}:1: (top level): nested too deeply to be a spec: flatten it"]) from None
    except ValidationError as exc:
        problems = []
        for error in exc.errors():
            loc = tuple(error["loc"])
            known = next((loc[:n] for n in range(len(loc), -1, -1) if loc[:n] in lines), ())
            line = lines.get(known, 1)
            problems.append(f"{path}:{line}: {_format_loc(loc)}: {_explain(error)}")
        raise SpecError(path, problems) from None


def spec_warnings(spec: Spec, path: str = "thaw.yaml") -> list[str]:
    """What the spec asks for that this machine will not do, and what happens instead; and what KServe's
    documents said that thaw leaves aside."""
    from thaw.vllm_platform import detect

    problem = detect().park_problem()
    return [f"{path}: models[{i}].park: {problem}" for i, m in enumerate(spec.models) if m.park and problem] + [
        f"{path}: {note}" for note in spec._notes]


def load_spec(path: str | Path) -> Spec:
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise SpecError(str(path), [f"{path}:1: (top level): cannot read: {exc.strerror}"]) from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[:exc.start].count(b"\n") + 1
        raise SpecError(str(path), [f"{path}:{line}: (top level): byte {raw[exc.start]:#04x} is not UTF-8: save the "
                                    "file as UTF-8"]) from None
    return parse_spec(text, str(path))
