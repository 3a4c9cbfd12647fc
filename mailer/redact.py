"""Blank out configured secrets in text that leaves an adapter (vendor errors, log lines).

Vendors and proxies echo what they were sent: an API key in a 401 body, the ``Authorization``
header in a debugging 400, an SMTP relay quoting the AUTH line. Those words become the
:class:`~mailer.errors.VendorError` reason, which is stored in the mail's attempts, logged at
ERROR and printed by ``mailer status``, so every adapter's errors pass through one
:class:`Redactor` built from its own secrets. It matches the forms a secret travels in too:
base64 (HTTP Basic ``user:secret``, SMTP AUTH PLAIN ``\\0user\\0secret`` and AUTH LOGIN), with
and without padding, URL-safe or not, and percent-encoded.
"""

from __future__ import annotations

import base64
from collections.abc import Iterable
from urllib.parse import quote

from pydantic import SecretStr

from mailer.errors import VendorError

__all__ = ["MASK", "Redactor"]

MASK = "***"
# The user names a secret is paired with in a base64 token: Mailgun's Basic auth is ``api:KEY``.
_DEFAULT_USERS = ("api",)
# How far down an exception chain a secret is looked for; chains are short, this bounds a cycle.
_MAX_CHAIN = 8


def _base64_forms(raw: str) -> set[str]:
    data = raw.encode()
    forms = {base64.b64encode(data).decode("ascii"), base64.urlsafe_b64encode(data).decode("ascii")}
    return forms | {f.rstrip("=") for f in forms}


def _basic_credentials(token: str) -> tuple[str, str] | None:
    """``(user, password)`` from a Basic token, so an auth header alone names the raw key too."""
    try:
        user, sep, password = base64.b64decode(token, validate=True).decode().partition(":")
    except (ValueError, UnicodeDecodeError):
        return None
    return (user, password) if sep and password else None


def _forms(secret: str, users: Iterable[str]) -> set[str]:
    forms = {secret, quote(secret, safe="")}
    scheme, _, token = secret.partition(" ")
    if token and scheme.isalpha():  # an auth header value ("Basic <token>"): the token alone too
        forms.add(token)
        credentials = _basic_credentials(token) if scheme.lower() == "basic" else None
        if credentials is not None:
            forms |= _forms(credentials[1], (*users, credentials[0]))
    for plain in (secret, *(f"{u}:{secret}" for u in users), *(f"\0{u}\0{secret}" for u in users)):
        forms |= _base64_forms(plain)
    return {f for f in forms if f}


class Redactor:
    """Replaces every form of the given secrets with ``***``; cheap to keep, one per adapter.

    Secrets of any length are matched: a short password makes error texts uglier, never leakier.
    """

    def __init__(self, secrets: Iterable[str | SecretStr | None], *, users: Iterable[str] = ()) -> None:
        plain = [s.get_secret_value() if isinstance(s, SecretStr) else s for s in secrets]
        names = (*_DEFAULT_USERS, *(u for u in users if u))
        found: set[str] = set()
        for secret in plain:
            if secret:
                found |= _forms(secret, names)
        # Longest first, so a form containing a shorter one is replaced whole.
        self._forms = sorted(found, key=len, reverse=True)

    def __repr__(self) -> str:
        return f"Redactor({len(self._forms)} forms)"

    def __bool__(self) -> bool:
        return bool(self._forms)

    def text(self, text: str) -> str:
        for form in self._forms:
            if form in text:
                text = text.replace(form, MASK)
        return text

    def leaks(self, text: str) -> bool:
        return any(form in text for form in self._forms)

    def error(self, exc: VendorError) -> VendorError:
        """Clean ``exc`` in place (reason, message) and cut any cause that would print a secret.

        The cause is kept when it is clean, because it is what an operator debugs with; when
        its text holds a secret it is dropped, since tracebacks print the whole chain.
        """
        exc.reason = self.text(exc.reason)
        exc.args = tuple(self.text(a) if isinstance(a, str) else a for a in exc.args)
        if self._chain_leaks(exc):
            exc.__cause__ = None
            exc.__context__ = None
            exc.__suppress_context__ = True
        return exc

    def _chain_leaks(self, exc: BaseException) -> bool:
        seen = exc.__cause__ or exc.__context__
        for _ in range(_MAX_CHAIN):
            if seen is None:
                return False
            if self.leaks(str(seen)) or self.leaks(repr(seen)):
                return True
            seen = seen.__cause__ or seen.__context__
        return True  # deeper than any real chain: do not print what was not checked
