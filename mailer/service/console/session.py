"""Console sessions and CSRF tokens: signed values, no server-side state.

The cookie is ``sid.authed.issued.signature`` (HMAC-SHA256 under a secret drawn when the app
starts, so a restart signs everyone out and no secret lives in a file). Every visitor has a
session, signed in or not, because the login form's POST needs a CSRF token too; signing in
issues a new ``sid``, so a session id planted before the login is worth nothing after it.
The CSRF token is the HMAC of the ``sid``: forms carry it, the cookie is HttpOnly and
SameSite=Strict, and a POST without the right token changes nothing.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass

COOKIE = "mailer_console"
MAX_AGE_S = 12 * 3600


@dataclass(frozen=True, slots=True)
class Session:
    sid: str
    authed: bool
    issued: float


class Sessions:
    """Issues and checks session cookies and CSRF tokens."""

    def __init__(
        self,
        *,
        secret: bytes | None = None,
        max_age_s: float = MAX_AGE_S,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._secret = secret or secrets.token_bytes(32)
        self.max_age_s = max_age_s
        self._clock = clock

    def __repr__(self) -> str:
        return "<Sessions>"

    def _sign(self, purpose: str, payload: str) -> str:
        return hmac.new(self._secret, f"{purpose}:{payload}".encode(), hashlib.sha256).hexdigest()

    def new(self, *, authed: bool) -> Session:
        return Session(secrets.token_urlsafe(18), authed, float(int(self._clock())))

    def cookie(self, session: Session) -> str:
        payload = f"{session.sid}.{int(session.authed)}.{int(session.issued)}"
        return f"{payload}.{self._sign('session', payload)}"

    def read(self, value: str | None) -> Session | None:
        """The session a cookie stands for; None when absent, forged, malformed or expired."""
        if not value or value.count(".") != 3:
            return None
        payload, _, signature = value.rpartition(".")
        if not hmac.compare_digest(signature, self._sign("session", payload)):
            return None
        sid, authed, issued = payload.split(".")
        if authed not in ("0", "1") or not issued.isdigit():
            return None
        if self._clock() - int(issued) > self.max_age_s:
            return None
        return Session(sid, authed == "1", float(issued))

    def csrf(self, session: Session) -> str:
        return self._sign("csrf", session.sid)

    def csrf_ok(self, session: Session, token: str | None) -> bool:
        return token is not None and hmac.compare_digest(token, self.csrf(session))
