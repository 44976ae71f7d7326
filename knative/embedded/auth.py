"""Bearer-token auth for the gateway: tokens from a file and/or an environment variable, each allowed
all models or a list of them. Tokens are compared in constant time and never logged."""

from __future__ import annotations

import hmac
import os
from dataclasses import dataclass
from pathlib import Path

import yaml


@dataclass(frozen=True)
class Token:
    secret: str
    models: frozenset[str] | None  # None: every model

    def __repr__(self) -> str:  # keeps the secret out of logs and tracebacks
        return f"Token(models={sorted(self.models) if self.models else '*'})"


class AuthError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def _parse_env(value: str) -> list[Token]:
    """'tok' or 'tok=model1|model2', comma-separated."""
    tokens = []
    for item in filter(None, (x.strip() for x in value.split(","))):
        secret, _, models = item.partition("=")
        allowed = frozenset(m for m in models.split("|") if m) if models and models != "*" else None
        tokens.append(Token(secret, allowed))
    return tokens


def _parse_file(path: Path) -> list[Token]:
    """A YAML list of {token: ..., models: [...]} (models omitted or ["*"]: every model)."""
    entries = yaml.safe_load(path.read_text()) or []
    tokens = []
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict) or not isinstance(entry.get("token"), str) or not entry["token"]:
            raise ValueError(f"{path}: entry {i} needs a non-empty 'token'")
        models = entry.get("models")
        tokens.append(Token(entry["token"], None if not models or models == ["*"] else frozenset(models)))
    return tokens


class Authenticator:
    def __init__(self, tokens: list[Token], internal: Token | None = None):
        self.tokens = tokens  # the spec's: they alone turn auth on
        self.internal = internal  # thaw up's own, for the broker's deliveries; never in a spec
        # thaw up's replicas', for their payload logs to its broker: it may publish events and reach no model
        self.publisher: Token | None = None

    def reload(self, auth) -> None:
        """The spec's tokens again (a spec reload): added ones work and removed ones stop at once. Raises
        (OSError, ValueError) on an unreadable tokens file, leaving the tokens as they were."""
        self.tokens = Authenticator.from_spec(auth).tokens

    @classmethod
    def from_spec(cls, auth) -> "Authenticator":
        tokens: list[Token] = []
        if auth.tokensFile:
            tokens += _parse_file(Path(auth.tokensFile))
        if auth.tokensEnv:
            tokens += _parse_env(os.environ.get(auth.tokensEnv, ""))
            if not tokens:
                raise ValueError(f"auth.tokensEnv names {auth.tokensEnv}, which holds no token")
        return cls(tokens)

    @property
    def enabled(self) -> bool:
        return bool(self.tokens)

    def _match(self, header: str | None) -> Token:
        scheme, _, presented = (header or "").partition(" ")
        if scheme.lower() != "bearer" or not presented:
            raise AuthError(401, "Missing bearer token: send 'Authorization: Bearer <token>'")
        try:
            presented_bytes = presented.encode()
        except UnicodeEncodeError:  # header bytes that are not UTF-8 (aiohttp passes them on as surrogates)
            raise AuthError(401, "Incorrect API token provided") from None
        found = None
        own = [t for t in (self.internal, self.publisher) if t is not None]
        for token in [*self.tokens, *own]:  # each compared, matched or not
            if hmac.compare_digest(token.secret.encode(), presented_bytes):
                found = token
        if found is None:
            raise AuthError(401, "Incorrect API token provided")
        return found

    def check(self, header: str | None, model: str | None = None) -> None:
        if not self.enabled:
            return
        token = self._match(header)
        if model is not None and token.models is not None and model not in token.models:
            raise AuthError(403, f"This token is not allowed to use the model '{model}'")

    def models_of(self, header: str | None) -> frozenset[str] | None:
        """The models a request's token may use (None: every model, or auth off). Call after `check`."""
        if not self.enabled:
            return None
        return self._match(header).models

    def allowed(self, header: str | None, model: str) -> bool:
        try:
            self.check(header, model)
            return True
        except AuthError:
            return False


def eventing_gate(auth: Authenticator):
    """For the broker and graph routes: any valid token passes (models check their own allow lists); with
    auth off (now: a reload may turn it on or off), everything passes."""

    def authorize(header: str | None) -> tuple[int, str] | None:
        if not auth.enabled:
            return None
        try:
            auth._match(header)
        except AuthError as exc:
            return exc.status, str(exc)
        return None

    return authorize
