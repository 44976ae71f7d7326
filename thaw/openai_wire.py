"""What both ends of a hop to a replica agree on: OpenAI's error object, and the header a replica whose engine
is still loading answers its 503 with. The replica (functions/) writes them and the gateway (knative/) reads
and writes them too, so they live on the ground floor both stand on."""

from __future__ import annotations

from typing import Any

# On a 503 of an engine still loading (a new replica, or a gunicorn worker restarted in a ready one): the
# gateway then takes the replica out of rotation until its readiness probe passes, and requeues the request.
LOADING_HEADER = "X-Thaw-Engine-Loading"


def error_body(message: str, type: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    """OpenAI's error object."""
    return {"error": {"message": message, "type": type, "param": param, "code": code}}
