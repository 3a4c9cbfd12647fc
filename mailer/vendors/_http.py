"""What the HTTP vendor adapters share: one pooled client each, and one map from failures to errors.

Failover depends on *which* error class a failure becomes and on ``ambiguous`` being right, so
the map lives here once; an adapter only overrides :meth:`HttpVendor.vendor_error` for the codes
its vendor documents differently.

Secrets: the key is read only in :meth:`HttpVendor.auth_headers`, when ``connect`` builds the
client and the adapter's :class:`~mailer.redact.Redactor`. Messages carry the HTTP status and the
vendor's own words, never request headers; since a vendor or a proxy may echo our headers in those
words, every error of :meth:`HttpVendor.post` is redacted. ``repr`` shows the endpoint, not the
settings.

Deadline: ``timeout_s`` bounds the whole request (pool wait, connect, write, answer and body),
not each read, through :func:`~mailer.vendors.base.bounded_send`; httpcore's trace tells it
whether the request headers had started to go out, which decides ``ambiguous``.
"""

from __future__ import annotations

import datetime as dt
import json
import math
from email.utils import parsedate_to_datetime
from typing import Any

import httpx

from mailer.errors import (
    PermanentVendorError,
    TransientVendorError,
    VendorAuthError,
    VendorError,
    VendorThrottled,
)
from mailer.lifecycle import AsyncResource
from mailer.redact import Redactor
from mailer.vendors.base import SendProgress, bounded_send

MAX_DETAIL = 300

# Raised before a byte of the request reached the vendor: failing over cannot duplicate.
_NOT_SENT: tuple[type[Exception], ...] = (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout)


def short(text: str, limit: int = MAX_DETAIL) -> str:
    """One line of at most ``limit`` characters: vendor bodies can be whole HTML error pages."""
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"


def parse_retry_after(value: str | None, now: dt.datetime | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header (delta-seconds or HTTP date); None if absent or junk."""
    if not value or not value.strip():
        return None
    try:
        seconds = float(value.strip())
    except ValueError:
        try:
            when = parsedate_to_datetime(value.strip())
        except (TypeError, ValueError, IndexError):
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=dt.UTC)
        seconds = (when - (now or dt.datetime.now(dt.UTC))).total_seconds()
    return max(0.0, seconds) if math.isfinite(seconds) else None


def transport_error(vendor: str, exc: httpx.RequestError) -> VendorError:
    """Classify a failure that produced no HTTP answer at all."""
    kind = type(exc).__name__
    what = f" ({short(str(exc), 120)})" if str(exc) else ""
    if isinstance(exc, httpx.UnsupportedProtocol):
        return VendorAuthError(vendor, f"{kind}{what}: base_url must start with https:// (or http://)")
    if isinstance(exc, _NOT_SENT):
        return TransientVendorError(vendor, f"{kind}{what}: the request was not sent", ambiguous=False)
    return TransientVendorError(
        vendor, f"{kind}{what} after sending: the vendor may have accepted the mail", ambiguous=True
    )


def default_error(vendor: str, status: int, message: str, retry_after: float | None) -> VendorError:
    """The classification every vendor shares unless it documents otherwise.

    404/405 on a fixed API path mean a wrong ``base_url`` (or region), and a 3xx means the same
    (redirects are not followed), so they are configuration errors: treating them as a refusal
    of the message would fail every mail while keeping the vendor in rotation. A 504 is a proxy
    that gave up waiting, which leaves the vendor's outcome as unknown as our own read timeout.
    A 429 is the vendor asking us to slow down, not an outage: :class:`VendorThrottled`.
    """
    if status == 429:
        return VendorThrottled(vendor, message, retry_after=retry_after)
    if status >= 500:
        return TransientVendorError(vendor, message, retry_after=retry_after, ambiguous=status == 504)
    if status in (401, 403):
        return VendorAuthError(vendor, f"{message} (check the API key and account)")
    if status in (404, 405) or 300 <= status < 400:
        return VendorAuthError(vendor, f"{message} (check base_url)")
    if 400 <= status < 500:
        return PermanentVendorError(vendor, message)
    return TransientVendorError(vendor, f"{message} (unexpected answer)", ambiguous=True)


def _json_or_none(response: httpx.Response) -> Any:
    try:
        return response.json()
    except ValueError:
        return None


class HttpVendor(AsyncResource):
    """Base for an adapter over one long-lived ``httpx.AsyncClient``.

    One client per adapter keeps TLS connections alive across sends (a new client per mail
    would pay a handshake each time). ``trust_env`` is off because configuration comes only
    from :mod:`mailer.config`, never from proxy or certificate environment variables.
    """

    name: str
    #: Upper bound on simultaneous requests; above the consumer's usual concurrency so that a
    #: wait for a free connection (PoolTimeout, which marks the vendor down) stays exceptional.
    max_connections = 100

    def __init__(self, name: str, base_url: str, timeout_s: float) -> None:
        self.name = name
        self.base_url = base_url.rstrip("/")
        self.timeout_s = timeout_s
        self._client: httpx.AsyncClient | None = None
        self._redactor = Redactor(())

    def __repr__(self) -> str:
        state = "connected" if self._client is not None else "closed"
        return f"{type(self).__name__}(name={self.name!r}, base_url={self.base_url!r}, {state})"

    # --- overridden per vendor ---------------------------------------------------------

    def auth_headers(self) -> dict[str, str]:
        """Headers that authenticate every request; the only place the key is read."""
        raise NotImplementedError

    def error_detail(self, payload: Any, text: str) -> str:
        """The vendor's own words about a failure, from its parsed JSON body or raw text."""
        if isinstance(payload, dict) and isinstance(payload.get("message"), str):
            return str(payload["message"])
        return text

    def vendor_error(
        self, status: int, payload: Any, message: str, retry_after: float | None
    ) -> VendorError | None:
        """A vendor-specific classification, or None to use :func:`default_error`."""
        return None

    # --- lifecycle ---------------------------------------------------------------------

    async def connect(self) -> None:
        if self._client is not None:
            return
        auth = self.auth_headers()
        self._redactor = Redactor(auth.values())
        self._client = httpx.AsyncClient(
            base_url=self.base_url,
            headers={"accept": "application/json", **auth},
            timeout=httpx.Timeout(self.timeout_s),
            limits=httpx.Limits(
                max_connections=self.max_connections, max_keepalive_connections=self.max_connections
            ),
            follow_redirects=False,
            trust_env=False,
        )

    async def close(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            await client.aclose()

    # --- requests ----------------------------------------------------------------------

    def encode_json(self, payload: dict[str, Any]) -> bytes:
        """JSON body as UTF-8 (Unicode unescaped); NaN/infinity in metadata is the mail's fault."""
        try:
            return json.dumps(payload, ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode()
        except ValueError as exc:
            raise PermanentVendorError(self.name, f"the mail cannot be encoded as JSON: {exc}") from None

    async def post(self, path: str, *, json_body: dict[str, Any] | None = None, files: Any = None) -> Any:
        """POST and return the parsed JSON of a 2xx answer; raise the mapped error otherwise.

        The whole exchange runs under one deadline of ``timeout_s`` and every error leaves
        redacted (see the module docstring).
        """
        client = self._client
        if client is None:
            raise RuntimeError(f"{self!r} is not connected: await connect() first or use 'async with'")
        content = self.encode_json(json_body) if json_body is not None else None
        headers = {"content-type": "application/json"} if content is not None else None

        async def exchange(progress: SendProgress) -> Any:
            async def trace(event: str, info: dict[str, Any]) -> None:
                # "http11.send_request_headers.started" / "http2...": from here on bytes leave.
                if event.endswith("send_request_headers.started"):
                    progress.sent()

            try:
                response = await client.post(
                    path, content=content, files=files, headers=headers, extensions={"trace": trace}
                )
            except httpx.RequestError as exc:
                raise transport_error(self.name, exc) from exc
            return self.answer(response)

        return await bounded_send(self.name, self.timeout_s, self._redactor, exchange)

    def answer(self, response: httpx.Response) -> Any:
        if not response.is_success:
            raise self.classify(response)
        payload = _json_or_none(response)
        if not isinstance(payload, dict):
            # A 2xx we cannot read (a proxy or a wrong base_url answering HTML) is not proof of
            # acceptance, nor of refusal: say so rather than record the mail as sent.
            raise TransientVendorError(
                self.name,
                f"HTTP {response.status_code} without a JSON object: "
                f"{short(self._redactor.text(response.text), 120)!r}",
                ambiguous=True,
            )
        return payload

    def classify(self, response: httpx.Response) -> VendorError:
        status = response.status_code
        payload = _json_or_none(response)
        # Redact before shortening: a cut could leave part of an echoed key behind.
        detail = self._redactor.text(self.error_detail(payload, response.text) or response.reason_phrase)
        message = f"HTTP {status}: {short(detail)}"
        retry_after = parse_retry_after(response.headers.get("retry-after"))
        specific = self.vendor_error(status, payload, message, retry_after)
        return specific or default_error(self.name, status, message, retry_after)

    def accepted_id(self, value: Any, status_hint: str) -> str:
        """The vendor's message id from a success body; without one, acceptance is unproven."""
        if isinstance(value, (str, int)) and str(value):
            return str(value)
        raise TransientVendorError(
            self.name, f"{status_hint} but no message id in the answer", ambiguous=True
        )
