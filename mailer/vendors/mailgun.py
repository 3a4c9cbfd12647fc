"""Mailgun: ``POST {base_url}/v3/{domain}/messages`` as a multipart form, basic auth ``api:<key>``.

The form is always multipart, attachments or not, so Mailgun sees one wire format and Unicode
bodies travel as raw UTF-8 rather than percent-encoded. Mailgun's API reference allows at most
three ``o:tag`` per message (its help centre has mentioned ten; extra tags are reported to be
dropped silently), so a mail with more is refused here as UnsupportedByVendor, before any
request, rather than sent with tags missing: another vendor can carry it (the limit is declared
in :mod:`mailer.capabilities`, which the producer checks too). Mailgun documents
SMTPUTF8 addresses and converts IDN domains itself, so addresses go as the model holds them.
404 means an unknown domain or the wrong region (US vs EU ``base_url``) and 402 an account that
cannot pay: configuration, not a bad mail.
"""

from __future__ import annotations

import base64
import json
from typing import Any

from mailer import capabilities
from mailer.config import MailgunSettings
from mailer.errors import VendorAuthError, VendorError
from mailer.models import MAIL_ID_HEADER, Email
from mailer.vendors._http import HttpVendor
from mailer.vendors.base import SendResult

MAX_TAGS = capabilities.MAILGUN_MAX_TAGS
FormPart = tuple[str | None, bytes] | tuple[str, bytes, str]


def form_fields(email: Email, mail_id: str) -> list[tuple[str, str]]:
    """The mail as Mailgun's (repeatable) form fields, in a stable order."""
    fields = [("from", str(email.from_))]
    for kind, addresses in (("to", email.to), ("cc", email.cc), ("bcc", email.bcc)):
        fields += [(kind, str(a)) for a in addresses]
    fields.append(("subject", email.subject))
    if email.text:
        fields.append(("text", email.text))
    if email.html:
        fields.append(("html", email.html))
    if email.reply_to:
        fields.append(("h:Reply-To", ", ".join(str(a) for a in email.reply_to)))
    fields += [(f"h:{name}", value) for name, value in email.headers.items()]
    fields.append((f"h:{MAIL_ID_HEADER}", mail_id))
    # Mailgun hands v: values back verbatim in events; JSON keeps numbers and booleans typed.
    fields += [(f"v:{k}", v if isinstance(v, str) else json.dumps(v)) for k, v in email.metadata.items()]
    fields += [("o:tag", tag) for tag in email.tags]
    return fields


class MailgunVendor(HttpVendor):
    def __init__(self, settings: MailgunSettings, name: str = "mailgun") -> None:
        super().__init__(name, settings.base_url, settings.timeout_s)
        self.domain = settings.domain
        self._api_key = settings.api_key

    def __repr__(self) -> str:
        return f"{super().__repr__()[:-1]}, domain={self.domain!r})"

    def auth_headers(self) -> dict[str, str]:
        token = base64.b64encode(f"api:{self._api_key.get_secret_value()}".encode()).decode("ascii")
        return {"authorization": f"Basic {token}"}

    def vendor_error(
        self, status: int, payload: Any, message: str, retry_after: float | None
    ) -> VendorError | None:
        if status == 402:
            return VendorAuthError(self.name, f"{message} (the Mailgun account cannot send: billing)")
        if status == 404:
            return VendorAuthError(self.name, f"{message} (check the domain and the region's base_url)")
        return None

    def request_parts(self, email: Email, mail_id: str) -> list[tuple[str, FormPart]]:
        """The multipart request body, or UnsupportedByVendor for what Mailgun cannot carry."""
        capabilities.enforce(capabilities.mailgun, self.name, email)
        # (None, bytes) parts are plain form fields; passing them as "files" keeps httpx on
        # multipart even when there is no attachment.
        parts: list[tuple[str, FormPart]] = [
            (name, (None, value.encode())) for name, value in form_fields(email, mail_id)
        ]
        parts += [("attachment", (a.filename, a.content, a.content_type)) for a in email.attachments]
        return parts

    async def send(self, email: Email, mail_id: str) -> SendResult:
        parts = self.request_parts(email, mail_id)
        payload = await self.post(f"/v3/{self.domain}/messages", files=parts)
        return SendResult(self.accepted_id(payload.get("id"), "Mailgun answered success"))
