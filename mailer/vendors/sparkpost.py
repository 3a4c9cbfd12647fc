"""SparkPost: ``POST {base_url}/api/v1/transmissions``, header ``Authorization: <key>`` (no scheme).

SparkPost has no cc/bcc fields: every reader is a recipient, and all of them carry the same
``header_to`` (the formatted To list) so the To header reads the same for everyone; cc
recipients are also listed in a ``Cc`` header, bcc recipients nowhere.

Tags: ``campaign_id`` is one string per transmission that SparkPost reports on as a campaign,
not a set of labels, so tags go into ``metadata["tags"]`` instead. When the mail's own metadata
already uses the key ``tags`` the mail is refused (UnsupportedByVendor: another vendor can carry
it) rather than one of the two silently lost.

A 200 with zero accepted recipients means every recipient was rejected: a failure of the mail.
"""

from __future__ import annotations

import base64
from typing import Any

from mailer import capabilities
from mailer.config import SparkpostSettings
from mailer.errors import (
    PermanentVendorError,
    VendorAuthError,
    VendorError,
    VendorThrottled,
)
from mailer.models import MAIL_ID_HEADER, Address, Email
from mailer.vendors._http import HttpVendor
from mailer.vendors.base import SendResult

UNVERIFIED_DOMAIN = "7001"


def _address(a: Address) -> dict[str, str]:
    return {"email": a.email, "name": a.name} if a.name else {"email": a.email}


def _errors(payload: Any) -> list[dict[str, Any]]:
    errors = payload.get("errors") if isinstance(payload, dict) else None
    return [e for e in errors if isinstance(e, dict)] if isinstance(errors, list) else []


class SparkpostVendor(HttpVendor):
    def __init__(self, settings: SparkpostSettings, name: str = "sparkpost") -> None:
        super().__init__(name, settings.base_url, settings.timeout_s)
        self._api_key = settings.api_key

    def auth_headers(self) -> dict[str, str]:
        return {"authorization": self._api_key.get_secret_value()}

    def error_detail(self, payload: Any, text: str) -> str:
        parts = []
        for err in _errors(payload)[:3]:
            part = str(err.get("message") or "")
            if err.get("code"):
                part += f" (code {err['code']})"
            if err.get("description"):
                part += f": {err['description']}"
            parts.append(part)
        return "; ".join(parts) or text

    def vendor_error(
        self, status: int, payload: Any, message: str, retry_after: float | None
    ) -> VendorError | None:
        if any(str(e.get("code")) == UNVERIFIED_DOMAIN for e in _errors(payload)):
            return VendorAuthError(self.name, f"{message} (verify the sending domain in SparkPost)")
        if status == 420:  # SparkPost's own "sending limit exceeded" (hourly, daily, sandbox)
            return VendorThrottled(self.name, message, retry_after=retry_after)
        return None

    def payload(self, email: Email, mail_id: str) -> dict[str, Any]:
        metadata: dict[str, Any] = dict(email.metadata)
        capabilities.enforce(capabilities.sparkpost, self.name, email)
        if email.tags:
            metadata["tags"] = list(email.tags)
        header_to = ", ".join(str(a) for a in email.to)
        recipients = [
            {"address": {**_address(a), "header_to": header_to}} for a in (*email.to, *email.cc, *email.bcc)
        ]
        headers = {**email.headers, MAIL_ID_HEADER: mail_id}
        if email.cc:
            headers["Cc"] = ", ".join(str(a) for a in email.cc)
        content: dict[str, Any] = {
            "from": _address(email.from_),
            "subject": email.subject,
            "headers": headers,
        }
        if email.text:
            content["text"] = email.text
        if email.html:
            content["html"] = email.html
        if email.reply_to:
            content["reply_to"] = ", ".join(str(a) for a in email.reply_to)
        if email.attachments:
            content["attachments"] = [
                {
                    "name": a.filename,
                    "type": a.content_type,
                    "data": base64.b64encode(a.content).decode("ascii"),
                }
                for a in email.attachments
            ]
        body: dict[str, Any] = {"recipients": recipients, "content": content}
        if metadata:
            body["metadata"] = metadata
        return body

    async def send(self, email: Email, mail_id: str) -> SendResult:
        answer = await self.post("/api/v1/transmissions", json_body=self.payload(email, mail_id))
        results = answer.get("results")
        results = results if isinstance(results, dict) else {}
        accepted = results.get("total_accepted_recipients")
        if accepted == 0:
            rejected = results.get("total_rejected_recipients")
            raise PermanentVendorError(
                self.name, f"SparkPost accepted none of the recipients ({rejected} rejected)"
            )
        return SendResult(self.accepted_id(results.get("id"), "SparkPost answered success"))
