"""Brevo (formerly Sendinblue): ``POST {base_url}/v3/smtp/email`` with an ``api-key`` header.

Brevo has no per-message metadata field, so metadata travels in the ``X-Mailer-Metadata``
header (:func:`mailer.vendors.mime.metadata_headers`, the same JSON SMTP and SES raw write; the
model bounds it to one header line); it then reaches the recipient's headers and Brevo's logs
like any custom header. Brevo takes a single ``replyTo``: several reply-to addresses are
refused as UnsupportedByVendor (another vendor can carry them), not silently dropped. Names
are omitted, not sent as null, when an address has no display name.

Brevo answers some account problems as 400/403 with a ``code`` (``permission_denied``,
``not_enough_credits``...): those are configuration, not a bad mail.
"""

from __future__ import annotations

import base64
from typing import Any

from mailer import capabilities
from mailer.config import SendinblueSettings
from mailer.errors import VendorAuthError, VendorError
from mailer.models import MAIL_ID_HEADER, METADATA_HEADER, Address, Email
from mailer.vendors._http import HttpVendor
from mailer.vendors.base import SendResult
from mailer.vendors.mime import metadata_headers

__all__ = ["METADATA_HEADER", "SendinblueVendor"]
AUTH_CODES = frozenset(
    {"unauthorized", "permission_denied", "not_enough_credits", "account_under_validation"}
)


def _address(a: Address) -> dict[str, str]:
    return {"email": a.email, "name": a.name} if a.name else {"email": a.email}


class SendinblueVendor(HttpVendor):
    def __init__(self, settings: SendinblueSettings, name: str = "sendinblue") -> None:
        super().__init__(name, settings.base_url, settings.timeout_s)
        self._api_key = settings.api_key

    def auth_headers(self) -> dict[str, str]:
        return {"api-key": self._api_key.get_secret_value()}

    def error_detail(self, payload: Any, text: str) -> str:
        if isinstance(payload, dict) and payload.get("message"):
            code = payload.get("code")
            return f"{code}: {payload['message']}" if code else str(payload["message"])
        return text

    def vendor_error(
        self, status: int, payload: Any, message: str, retry_after: float | None
    ) -> VendorError | None:
        code = payload.get("code") if isinstance(payload, dict) else None
        if 400 <= status < 500 and code in AUTH_CODES:
            return VendorAuthError(self.name, f"{message} (check the Brevo API key and account)")
        return None

    def payload(self, email: Email, mail_id: str) -> dict[str, Any]:
        capabilities.enforce(capabilities.sendinblue, self.name, email)
        headers = {**email.headers, MAIL_ID_HEADER: mail_id, **metadata_headers(email.metadata)}
        body: dict[str, Any] = {
            "sender": _address(email.from_),
            "to": [_address(a) for a in email.to],
            "subject": email.subject,
            "headers": headers,
        }
        if email.cc:
            body["cc"] = [_address(a) for a in email.cc]
        if email.bcc:
            body["bcc"] = [_address(a) for a in email.bcc]
        if email.reply_to:
            body["replyTo"] = _address(email.reply_to[0])
        if email.html:
            body["htmlContent"] = email.html
        if email.text:
            body["textContent"] = email.text
        if email.tags:
            body["tags"] = list(email.tags)
        if email.attachments:
            body["attachment"] = [
                {"name": a.filename, "content": base64.b64encode(a.content).decode("ascii")}
                for a in email.attachments
            ]
        return body

    async def send(self, email: Email, mail_id: str) -> SendResult:
        answer = await self.post("/v3/smtp/email", json_body=self.payload(email, mail_id))
        return SendResult(self.accepted_id(answer.get("messageId"), "Brevo answered success"))
