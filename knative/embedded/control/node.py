"""The machine as one Kubernetes node: what it can allocate and where a replica fits (pure; the reconciler
does the I/O and table tests in tests/test_node.py check each rule).

The KPA decides how many replicas a revision wants, as Knative does; placement decides which of them run,
as Kubernetes' scheduler and the kubelet would on a single node:
- a replica fits when its CPU, memory and GPU requests fit what the node has left after the other
  replicas' requests; a request left out asks for none of that resource (and always fits it);
- CPU: a replica that requests CPU gets whole cores of its own (the kubelet's static CPU manager policy;
  a fractional request rounds up, a deliberate difference: two CPU vLLM engines on one core fall from
  200+ to 5 tokens/s); replicas without a CPU request share the cores nobody holds;
- memory: requests, plus the host RAM that host copies of weights hold pinned (the kernel cannot page it
  out), within the node's memory less what it keeps for the system (`systemReserved`, as the kubelet's);
- GPUs: a request for `nvidia.com/gpu` binds the replica to that many devices for its life, the least
  claimed first, and it has them to itself while it is awake; asleep it holds only its CUDA context, so
  replicas that ask for whole GPUs share devices through sleep (parking.py's plan_gpu_room puts the
  others to sleep before one wakes or starts, or waits while they are busy). A Kubernetes node never
  shares a requested device; a sleeper is the difference. Replicas without a GPU request share the first
  device by memory (gpu_memory_utilization). Only asking for more devices than the node has is Pending.
A replica that does not fit is Pending, with the scheduler's own message, e.g.
"0/1 nodes are available: 1 Insufficient cpu."
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass


@dataclass(frozen=True)
class Node:
    cores: tuple[int, ...]  # CPU ids this plane may hand out
    memory: int  # bytes
    gpus: tuple[int, ...] = ()  # device indices


@dataclass(frozen=True)
class Request:
    cpu_millis: int = 0
    memory: int = 0
    gpus: int = 0


@dataclass(frozen=True)
class Claim:
    """What one replica holds: its own cores and devices, and its memory request."""

    cores: tuple[int, ...] = ()
    memory: int = 0
    gpus: tuple[int, ...] = ()


def request_of(resources, tensor_parallel: int = 1) -> Request:
    """A spec's `resources` as a request (CPU in millicores, memory in bytes, whole GPUs). An engine sharded over
    `tensor_parallel` GPUs asks for that many devices of one node at least, as its pod would
    (`nvidia.com/gpu: N`)."""
    from thaw.spec import quantity_bytes, quantity_value

    gpus = max(resources.gpu, tensor_parallel) if tensor_parallel > 1 else resources.gpu
    return Request(math.ceil(quantity_value(resources.cpu) * 1000) if resources.cpu else 0,
                   quantity_bytes(resources.memory) if resources.memory else 0, gpus)


def node_of(spec_node, cores: tuple[int, ...], memory: int, gpus: int) -> Node:
    """The node from the machine's figures, each overridden where the spec's `platform.node` sets it."""
    from thaw.spec import quantity_bytes, quantity_value

    if spec_node.cpu is not None:
        cores = cores[:max(1, math.floor(quantity_value(spec_node.cpu)))]
    if spec_node.memory is not None:
        memory = quantity_bytes(spec_node.memory)
    memory -= system_floor(memory, spec_node.systemReserved)
    return Node(tuple(cores), memory, tuple(range(gpus if spec_node.gpus is None else spec_node.gpus)))


def system_floor(total: int, reserved: str) -> int:
    """Host RAM the node keeps for the system: a quantity ("8Gi") or a share of its memory ("10%")."""
    from thaw.spec import quantity_bytes

    if reserved.endswith("%"):
        return int(total * float(reserved[:-1]) / 100)
    return quantity_bytes(reserved)


def place(request: Request, node: Node, claims: list[Claim], held_memory: int = 0) -> Claim | str:
    """Where a replica with `request` runs, or why it cannot now (the scheduler's message). `held_memory`
    is host RAM held outside requests (host copies' pinned weights)."""
    taken_cores = {c for claim in claims for c in claim.cores}
    free_cores = [c for c in node.cores if c not in taken_cores]
    bound = Counter(g for claim in claims for g in claim.gpus)
    cores = math.ceil(request.cpu_millis / 1000)
    short = []
    if cores > len(free_cores):
        short.append("cpu")
    if request.memory and request.memory > node.memory - held_memory - sum(c.memory for c in claims):
        short.append("memory")
    if request.gpus > len(node.gpus):
        short.append("nvidia.com/gpu")
    if short:
        return "0/1 nodes are available: " + ", ".join(f"1 Insufficient {s}" for s in sorted(short)) + "."
    gpus = sorted(node.gpus, key=lambda g: (bound[g], g))[:request.gpus]
    return Claim(tuple(free_cores[:cores]), request.memory, tuple(sorted(gpus)))


def never_fits(request: Request, node: Node) -> str | None:
    """Why a replica with `request` can never run on this node, whatever else stops (None: it could). On a
    cluster such a pod waits for a bigger node; here none will come, so it is said at once."""
    short = [name for name, asked, has in (("cpu", math.ceil(request.cpu_millis / 1000), len(node.cores)),
                                           ("memory", request.memory, node.memory),
                                           ("nvidia.com/gpu", request.gpus, len(node.gpus))) if asked > has]
    if not short:
        return None
    return ("its requests exceed the whole node: " + ", ".join(f"1 Insufficient {s}" for s in short) +
            f" (the node has {len(node.cores)} cores, {node.memory / 2**30:.1f} GiB allocatable, "
            f"{len(node.gpus)} GPUs; see platform.node and the model's resources)")


def shared_cores(node: Node, claims: list[Claim]) -> tuple[int, ...]:
    """The cores a replica without a CPU request runs on: those no replica holds (all, if every one is)."""
    taken = {c for claim in claims for c in claim.cores}
    return tuple(c for c in node.cores if c not in taken) or node.cores
