"""What the cold-start optimizer drives in a serving backend: `knative/embedded/control/backend.py` implements it
with the embedded plane's own revisions and the local broker; `knative/cluster/backend.py` through
Knative (min-scale by server-side apply, the cache warmer's Service, a request through a model's route)."""

from __future__ import annotations

from typing import Protocol

from thaw.cache_warmer.optimizer import Demand


class ServingBackend(Protocol):
    def demands(self) -> list[Demand]:
        """Each routable model: its recent request times and the bytes its weights occupy."""

    def keep_replicas(self, models: frozenset[str]) -> None:
        """Keep one idle replica of each of these models (on its main revision), none for the others."""

    async def warm(self, model: str) -> bool:
        """Stage and prewarm the model's weights now; False if it could not be asked."""

    def start_ahead(self, models: list[str]) -> list[str]:
        """Start these models if nothing of theirs runs or starts; the ones started."""
