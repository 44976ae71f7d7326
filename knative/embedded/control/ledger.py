"""One ledger of the node's memory: what moves in flight were granted, counted from the moment each was
decided, not from when it ends (so moves decided together count against each other, as Kubernetes' scheduler
counts a pod it assumed onto a node before the kubelet runs it). No I/O: the caller reads the kernel's and
NVML's figures and asks the ledger what is left of them.

- Host RAM: a host copy granted to a replica (parking.py) counts in full until the replica says it is built;
  what is left for new grants is what the kernel can still hand out above the node's floor
  (platform.node.systemReserved, node.py's system_floor), less those grants.
- GPU memory: a start or a wake in flight needs its share (a start: gpu_memory_utilization of the device; a
  wake: what the replica held awake); what it does not hold yet is not free for the next move.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable


@dataclass
class NodeLedger:
    copies: dict[str, int] = field(default_factory=dict)  # replica id -> host copy bytes granted, not yet built
    gpu_moves: dict[str, int] = field(default_factory=dict)  # move id -> GPU bytes it needs

    def grant_copy(self, replica_id: str, size: int) -> None:
        self.copies[replica_id] = size

    def copy_settled(self, replica_id: str) -> None:
        """Built (its bytes are in what the kernel reports as used now), dropped, or its replica gone."""
        self.copies.pop(replica_id, None)

    def host_grantable(self, available: int, floor: int) -> int:
        """Host RAM new grants may take: negative when the node is below its floor already."""
        return available - floor - sum(self.copies.values())

    def begin_gpu(self, move_id: str, need: int) -> None:
        self.gpu_moves[move_id] = need

    def end_gpu(self, move_id: str) -> None:
        self.gpu_moves.pop(move_id, None)

    def gpu_free(self, free: int, held: Callable[[str], int], excluding: str | None = None) -> int:
        """The GPU's free memory as the next move may count on it: less what the moves in flight (but
        `excluding`) still have to take. `held(move_id)` is what a move's process holds already."""
        return free - sum(max(0, need - held(move_id)) for move_id, need in self.gpu_moves.items()
                          if move_id != excluding)
