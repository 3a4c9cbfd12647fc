"""API keys: ``Authorization: Bearer <key>`` against ``[api] keys``.

Only SHA-256 digests are kept in memory, whether the file gave a key or ``sha256:<hex>``;
the presented key is hashed and compared with every digest by ``hmac.compare_digest`` (no
early exit), so neither the comparison nor the position of a match leaks through timing.
No key, presented or configured, ever reaches a log, a repr or an error.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
from collections.abc import Sequence
from typing import Annotated

from fastapi import Request, Security
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import SecretStr

from mailer.service.problems import ApiError

HASH_PREFIX = "sha256:"

bearer = HTTPBearer(
    auto_error=False,
    description="an [api] keys entry (or the key whose SHA-256 is there) as 'Authorization: Bearer KEY'",
)


def digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).digest()


class KeyRing:
    """The configured keys as digests; empty means the API is open to loopback only."""

    def __init__(self, keys: Sequence[SecretStr]) -> None:
        self._digests = [self._digest_of(k.get_secret_value()) for k in keys]

    @staticmethod
    def _digest_of(configured: str) -> bytes:
        if configured.startswith(HASH_PREFIX):
            return bytes.fromhex(configured.removeprefix(HASH_PREFIX))
        return digest(configured)

    def __repr__(self) -> str:
        return f"<KeyRing {len(self._digests)} key(s)>"

    @property
    def open(self) -> bool:
        return not self._digests

    def accepts(self, presented: str) -> bool:
        wanted = digest(presented)
        found = False
        for known in self._digests:
            found |= hmac.compare_digest(known, wanted)
        return found


def is_loopback(host: str | None) -> bool:
    if host is None:
        return False
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


async def authorize(
    request: Request, credentials: Annotated[HTTPAuthorizationCredentials | None, Security(bearer)]
) -> None:
    """The dependency of every /v1/emails route."""
    check_key(request, credentials)


def check_key(request: Request, credentials: HTTPAuthorizationCredentials | None) -> None:
    """Raise the refusal (401, or 403 for a non-loopback client of a keyless API), or return."""
    ring: KeyRing = request.app.state.keys
    if ring.open:
        # No keys: only this machine may call (the server binds loopback too; this holds
        # behind a local reverse proxy that forwards from elsewhere).
        client = request.client.host if request.client is not None else None
        if not is_loopback(client):
            raise ApiError(
                403, "Authorization", "no [api] keys are configured, so only loopback clients are served"
            )
        return
    if credentials is None:
        raise ApiError(
            401,
            "Authorization",
            "send 'Authorization: Bearer <key>' with one of the keys in [api] keys",
            headers={"WWW-Authenticate": "Bearer"},
        )
    if not ring.accepts(credentials.credentials):
        raise ApiError(
            401,
            "Authorization",
            "the key is not one of [api] keys; check it (keys are compared whole, case-sensitive)",
            headers={"WWW-Authenticate": 'Bearer error="invalid_token"'},
        )
