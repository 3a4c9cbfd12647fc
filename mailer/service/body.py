"""Reading a request body under the size cap, and parsing it as JSON.

The cap is enforced before the body is read whole: a declared Content-Length over it is
refused at once, and a chunked body is counted while it streams, so a client cannot make
the server buffer more than the cap (the 413 closes the connection; the rest is never read).
"""

from __future__ import annotations

import json
from typing import Any

from fastapi import Request

from mailer.service.problems import ApiError

_CLOSE = {"Connection": "close"}


def _too_large(cap: int, what: str) -> ApiError:
    return ApiError(
        413,
        "(body)",
        f"the request body is {what}; the limit is {cap} bytes ([api] max_body_bytes): send smaller "
        "mails, or fewer per batch",
        headers=_CLOSE,
    )


async def read_capped(request: Request, cap: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise ApiError(400, "Content-Length", "not a byte count", headers=_CLOSE)
        if int(declared) > cap:
            raise _too_large(cap, f"{int(declared)} bytes")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > cap:
            raise _too_large(cap, "larger than that")
        chunks.append(chunk)
    return b"".join(chunks)


def parse_json(raw: bytes) -> Any:
    """The body as JSON. Undecodable bytes are kept (as lone surrogates) so the mail's own
    validation names the field that holds them, exactly as the SDK does for bytes."""
    if not raw.strip():
        raise ApiError(422, "(body)", "the body is empty: send the mail as a JSON object")
    try:
        return json.loads(raw.decode("utf-8", "surrogateescape"))
    except RecursionError:
        raise ApiError(422, "(body)", "the JSON is nested too deeply; no field of a mail nests so") from None
    except ValueError as exc:
        raise ApiError(422, "(body)", f"not valid JSON ({exc}); send the mail as a JSON object") from None
