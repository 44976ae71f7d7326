"""Revisions and traffic, the Knative way.

A revision is an immutable snapshot of a model's serving settings, named `<model>-00001`, `-00002`...
A change of any setting but the traffic block makes a new one. The traffic block is validated as
Knative's webhook does (percents sum to 100, tags unique, targets exist) and splits requests by percent;
tags give each target a route of its own.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable


def revision_name(model: str, number: int) -> str:
    return f"{model}-{number:05d}"


@dataclass(frozen=True)
class Route:
    revision: str
    percent: int
    tag: str | None


def model_traffic(model, revision_names: list[str]) -> list:
    """A model's traffic block as Knative would route it: its own (Knative's `traffic`), or KServe's canary
    rollout (`canaryTrafficPercent`): the newest revision gets that share and the one before it the rest, all
    of it while the newest is the only one."""
    from thaw.spec import TrafficTarget

    percent = model.canaryTrafficPercent
    if percent is None or len(revision_names) < 2:
        return list(model.traffic)
    return [TrafficTarget(latestRevision=True, percent=percent),
            TrafficTarget(revisionName=revision_names[-2], percent=100 - percent)]


def resolve_traffic(targets: list, latest: str, known: set[str]) -> list[Route]:
    """The routes of a traffic block; no block means 100 % to the latest revision."""
    if not targets:
        return [Route(latest, 100, None)]
    routes = []
    for t in targets:
        name = latest if t.latestRevision else t.revisionName
        if name not in known:
            raise ValueError(f"traffic targets revision {name!r}, which does not exist (known: {sorted(known)})")
        routes.append(Route(name, t.percent or 0, t.tag))
    return routes


def pick_revision(routes: list[Route], draw: float) -> str:
    """The revision for an untagged request; `draw` is uniform in [0, 100)."""
    cumulative = 0
    weighted = [r for r in routes if r.percent > 0]
    for route in weighted:
        cumulative += route.percent
        if draw < cumulative:
            return route.revision
    return weighted[-1].revision


def tagged_revision(routes: list[Route], tag: str) -> str | None:
    return next((r.revision for r in routes if r.tag == tag), None)


class SpecRefused(Exception):
    """A spec that cannot apply whole; nothing of it was applied."""

    def __init__(self, problems: list[str]):
        super().__init__("; ".join(problems))
        self.problems = problems


def traffic_problems(models: Iterable, history: "RevisionHistory") -> list[str]:
    """Traffic targets naming revisions that will not exist once the models are applied (the history's,
    plus the one a changed template makes)."""
    problems = []
    for i, model in enumerate(models):
        if model.traffic:
            known = history.names_after_sync(model.name, model.revision_template())
            problems += [f"models[{i}].traffic[{j}].revisionName: {t.revisionName!r} is not a revision of "
                         f"{model.name} (it has {', '.join(sorted(known))})"
                         for j, t in enumerate(model.traffic) if t.revisionName and t.revisionName not in known]
    return problems


class RevisionHistory:
    """Every revision ever made, per model, kept in the state dir so numbering survives restarts."""

    @classmethod
    def of_state_dir(cls, state_dir: str | Path) -> "RevisionHistory":
        return cls(Path(state_dir) / "revisions.json")

    def __init__(self, path: Path):
        self.path = Path(path)
        self.data: dict[str, list[dict[str, Any]]] = json.loads(self.path.read_text()) if self.path.exists() else {}

    def names_after_sync(self, model: str, template: dict[str, Any]) -> set[str]:
        """The model's revision names as `sync` would leave them, without changing anything."""
        revisions = self.data.get(model, [])
        names = {r["name"] for r in revisions}
        if not revisions or revisions[-1]["template"] != template:
            names.add(revision_name(model, len(revisions) + 1))
        return names

    def sync(self, model: str, template: dict[str, Any]) -> tuple[list[dict[str, Any]], bool]:
        """The model's revisions, with a new one appended if its template changed; and whether it did."""
        revisions = self.data.setdefault(model, [])
        if revisions and revisions[-1]["template"] == template:
            return revisions, False
        revisions.append({"name": revision_name(model, len(revisions) + 1), "template": template,
                          "created": time.time()})
        self._save()
        return revisions, True

    def _save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=1))
        os.replace(tmp, self.path)
