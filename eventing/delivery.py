"""Knative delivery semantics as pure functions: what is retried, when, and what a dead letter carries."""

from __future__ import annotations

import base64
from dataclasses import dataclass

# Knative retries these, and "no response" (connection error, timeout).
RETRYABLE_4XX = frozenset({404, 408, 409, 429})
ERROR_DATA_LIMIT = 1024  # Knative keeps at most this much of the failing response body
DEFAULT_BACKOFF_DELAY = 0.2
DEFAULT_TIMEOUT = 60.0

@dataclass(frozen=True)
class DeliveryPolicy:
    retry: int = 0
    backoff_policy: str = "exponential"
    backoff_delay: float = DEFAULT_BACKOFF_DELAY
    timeout: float = DEFAULT_TIMEOUT
    dead_letter: str | None = None  # resolved URL


def should_retry(status: int | None) -> bool:
    """Knative: retry on no response, 5xx, 404, 408, 409 and 429."""
    return status is None or status >= 500 or status in RETRYABLE_4XX


def backoff(policy: DeliveryPolicy, retry_number: int) -> float:
    """Delay before retry `retry_number` (1-based): linear delay*n, exponential delay*2^n."""
    if policy.backoff_policy == "linear":
        return policy.backoff_delay * retry_number
    return policy.backoff_delay * (2 ** retry_number)


def next_step(policy: DeliveryPolicy, status: int | None, attempts_made: int) -> str:
    """After attempt number `attempts_made` (1-based) answered `status`: 'done', 'retry', 'dead-letter' or 'drop'."""
    if status is not None and 200 <= status <= 299:
        return "done"
    if should_retry(status) and attempts_made <= policy.retry:
        return "retry"
    return "dead-letter" if policy.dead_letter else "drop"


def dead_letter_extensions(destination: str, status: int | None, body: bytes) -> dict[str, str]:
    """The extensions Knative adds to an event sent to a dead-letter sink."""
    ext = {"knativeerrordest": destination}
    if status is not None:
        ext["knativeerrorcode"] = str(status)
    if body:
        ext["knativeerrordata"] = base64.b64encode(body[:ERROR_DATA_LIMIT]).decode()
    return ext
