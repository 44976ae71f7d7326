"""What the cold-start optimizer drives in a serving backend. The embedded plane (`knative/embedded/
plane.py`) implements it with its own replicas and warmer; a cluster backend implements the same
calls through Knative (min-scale, the cache warmer's Service, a request to wake a revision)."""

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
