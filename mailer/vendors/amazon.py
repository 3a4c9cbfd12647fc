"""Amazon SES (API v2) adapter over one long-lived aioboto3 ``sesv2`` client.

botocore's own retries are switched off (one attempt, explicit connect/read timeouts): the
router's failover and circuit breaker are the retry policy, and a hidden 4-attempt loop
would both hide an outage from them and multiply an ambiguous send.

Content goes as ``Simple`` when SES can express the mail that way, so SES builds the MIME
itself; it falls back to ``Raw`` (bytes from :mod:`mailer.vendors.mime`) when a header
does not fit SES's rules for ``Simple`` headers (at most 15, printable ASCII values of at
most 870 characters) or when the installed botocore predates ``Simple`` attachments.

Deadline: botocore's connect/read timeouts are per read, so ``send_email`` runs under
:func:`~mailer.vendors.base.bounded_send` as well. aiobotocore shows no event between "about to
send" (botocore's ``before-send``) and the bytes going out, so a deadline that passes after
``before-send`` counts as ambiguous, even when the connection was still being made; one that
passes before it (credential resolution, signing) does not.

Secrets: the key id, secret key and session token go through the adapter's
:class:`~mailer.redact.Redactor` before any SES or botocore text becomes an error. Keep
botocore's loggers at INFO (:func:`mailer.logs.setup_logging`): at DEBUG they print both.
"""

from __future__ import annotations

import re
import socket
from contextlib import AsyncExitStack
from email.utils import formataddr
from typing import TYPE_CHECKING, Any

import aioboto3
import aiohttp
from aiobotocore.config import AioConfig
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    ConnectionClosedError,
    ConnectTimeoutError,
    CredentialRetrievalError,
    EndpointConnectionError,
    HTTPClientError,
    NoCredentialsError,
    NoRegionError,
    ParamValidationError,
    PartialCredentialsError,
    ProxyConnectionError,
    ReadTimeoutError,
    SSLError,
)

from mailer import capabilities
from mailer.config import AmazonSettings
from mailer.errors import (
    PermanentVendorError,
    TransientVendorError,
    VendorAuthError,
    VendorConfigError,
    VendorError,
    VendorThrottled,
)
from mailer.lifecycle import AsyncResource
from mailer.models import MAIL_ID_HEADER, METADATA_HEADER, Address, Email
from mailer.redact import Redactor
from mailer.vendors.base import SendProgress, SendResult, bounded_send, current_progress
from mailer.vendors.mime import (
    ascii_addr_spec,
    build_message,
    message_bytes,
    metadata_headers,
)

if TYPE_CHECKING:
    from types_aiobotocore_sesv2 import SESV2Client
    from types_aiobotocore_sesv2.type_defs import (
        AttachmentTypeDef,
        BodyTypeDef,
        DestinationTypeDef,
        EmailContentTypeDef,
        MessageTagTypeDef,
        MessageTypeDef,
        SendEmailRequestTypeDef,
    )

__all__ = ["METADATA_HEADER", "AmazonVendor"]

# Metadata that cannot become an SES tag still travels with the mail, in METADATA_HEADER.

# SES limits (service model and SES quotas).
_MAX_SIMPLE_HEADERS = 15
_MAX_SIMPLE_HEADER_VALUE = 870
_SIMPLE_HEADER_VALUE = re.compile(r"[ -~]+")
_SIMPLE_HEADER_NAME = re.compile(r"[!-9;-@A-~]{1,126}")
_TAG_TEXT = re.compile(r"[A-Za-z0-9_-]{1,256}")
_MAX_TAGS = 50
_MAX_ATTACHMENT_CONTENT_TYPE = 78

# SES asking us to slow down (its send rate): a short pause, not an outage.
_THROTTLE_CODES = frozenset(
    {
        "TooManyRequestsException",
        "Throttling",
        "ThrottlingException",
        "ThrottledException",
        "RequestThrottled",
        "RequestThrottledException",
        "RequestLimitExceeded",
        "SlowDown",
    }
)
_TRANSIENT_CODES = frozenset(
    {
        "LimitExceededException",
        "ServiceUnavailable",
        "ServiceUnavailableException",
        "InternalFailure",
        "InternalError",
        "InternalServerError",
        "InternalServerErrorException",
        "InternalServiceErrorException",
        "RequestTimeout",
        "RequestTimeoutException",
    }
)
_AUTH_CODES = frozenset(
    {
        "AccountSuspendedException",
        "SendingPausedException",
        "MailFromDomainNotVerifiedException",
        "NotFoundException",
        "UnrecognizedClientException",
        "InvalidClientTokenId",
        "InvalidAccessKeyId",
        "SignatureDoesNotMatch",
        "InvalidSignatureException",
        "IncompleteSignature",
        "IncompleteSignatureException",
        "MissingAuthenticationToken",
        "MissingAuthenticationTokenException",
        "ExpiredToken",
        "ExpiredTokenException",
        "RequestExpired",
        "AuthFailure",
        "OptInRequired",
        "NotAuthorized",
    }
)
_PERMANENT_CODES = frozenset(
    {"BadRequestException", "MessageRejected", "ValidationException", "InvalidParameterValue"}
)
# MessageRejected is overloaded: quota/rate refusals come through it too and pass with time.
_THROTTLE_TEXT = re.compile(
    r"throttl|rate exceeded|quota exceeded|sending quota|too many requests", re.IGNORECASE
)
# The daily quota (SES answers it with code Throttling too) is used up for hours: an outage
# of the vendor, not a pause of a second or two.
_QUOTA_TEXT = re.compile(r"quota exceeded|sending quota", re.IGNORECASE)
_MAX_REASON = 300


def _ses_address(addr: Address) -> str:
    """SES wants 7-bit addresses: punycode domains and RFC 2047 display names."""
    spec = ascii_addr_spec(addr.email)
    return formataddr((addr.name or "", spec), charset="utf-8")


def _tag_value(value: Any) -> str | None:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (str, int)) and _TAG_TEXT.fullmatch(str(value)):
        return str(value)
    return None


class AmazonVendor(AsyncResource):
    """Sends through SES v2 ``SendEmail``; create once, ``connect`` once, reuse for every mail."""

    def __init__(self, settings: AmazonSettings, name: str = "amazon") -> None:
        if (settings.access_key_id is None) != (settings.secret_access_key is None):
            raise VendorConfigError(
                f"vendor {name!r}: give both access_key_id and secret_access_key, or neither "
                "(to use the standard AWS credential chain)"
            )
        self.name = name
        self._settings = settings
        self._stack: AsyncExitStack | None = None
        self._client: SESV2Client | None = None
        self._simple_attachments = False
        self._redactor = Redactor(
            (settings.access_key_id, settings.secret_access_key, settings.session_token)
        )

    def __repr__(self) -> str:
        endpoint = f", endpoint_url={self._settings.endpoint_url!r}" if self._settings.endpoint_url else ""
        return f"AmazonVendor(name={self.name!r}, region={self._settings.region!r}{endpoint})"

    async def connect(self) -> None:
        """Create the one SES client (no network traffic; credentials resolve here)."""
        if self._client is not None:
            return
        s = self._settings
        session = aioboto3.Session(
            aws_access_key_id=s.access_key_id.get_secret_value() if s.access_key_id else None,
            aws_secret_access_key=s.secret_access_key.get_secret_value() if s.secret_access_key else None,
            aws_session_token=s.session_token.get_secret_value() if s.session_token else None,
            region_name=s.region,
        )
        # AioConfig is botocore's Config plus aiohttp connector options; the stubs insist on it.
        config = AioConfig(
            retries={"total_max_attempts": 1, "mode": "standard"},
            connect_timeout=s.timeout_s,
            read_timeout=s.timeout_s,
        )
        stack = AsyncExitStack()
        try:
            client = await stack.enter_async_context(
                session.client("sesv2", endpoint_url=s.endpoint_url, config=config)
            )
        except BotoCoreError as exc:
            await stack.aclose()
            reason = self._clean(str(exc))
            raise VendorAuthError(self.name, f"cannot create the SES client: {reason}") from None
        except BaseException:
            await stack.aclose()
            raise
        client.meta.events.register("before-send.sesv2.SendEmail", _handed_over)
        self._stack, self._client = stack, client
        message_shape = client.meta.service_model.shape_for("Message")
        self._simple_attachments = "Attachments" in getattr(message_shape, "members", {})

    async def close(self) -> None:
        stack, self._stack, self._client = self._stack, None, None
        if stack is not None:
            await stack.aclose()

    async def send(self, email: Email, mail_id: str) -> SendResult:
        if self._client is None:
            await self.connect()
        client = self._client
        assert client is not None
        try:
            request = self._request(email, mail_id)
        except ValueError as exc:
            raise PermanentVendorError(self.name, f"SES cannot carry this mail: {exc}") from None

        async def call(progress: SendProgress) -> str:
            try:
                response = await client.send_email(**request)
            except ClientError as exc:
                raise self._from_client_error(exc) from exc
            except BotoCoreError as exc:
                raise self._from_botocore_error(exc) from exc
            return response["MessageId"]

        message_id = await bounded_send(self.name, self._settings.timeout_s, self._redactor, call)
        return SendResult(message_id=message_id)

    # --- request -------------------------------------------------------------------------

    def _request(self, email: Email, mail_id: str) -> SendEmailRequestTypeDef:
        capabilities.enforce(capabilities.amazon, self.name, email)
        tags, leftover = self._tags(email)
        extra = metadata_headers(leftover)
        headers: dict[str, str] = {MAIL_ID_HEADER: mail_id, **email.headers, **extra}

        if self._fits_simple(email, headers):
            content: EmailContentTypeDef = {"Simple": self._simple(email, headers)}
        else:
            msg = build_message(email, mail_id, extra_headers=extra)
            content = {"Raw": {"Data": message_bytes(msg)}}

        destination: DestinationTypeDef = {"ToAddresses": [_ses_address(a) for a in email.to]}
        if email.cc:
            destination["CcAddresses"] = [_ses_address(a) for a in email.cc]
        if email.bcc:
            destination["BccAddresses"] = [_ses_address(a) for a in email.bcc]
        request: SendEmailRequestTypeDef = {
            "FromEmailAddress": _ses_address(email.from_),
            "Destination": destination,
            "Content": content,
        }
        if email.reply_to:
            request["ReplyToAddresses"] = [_ses_address(a) for a in email.reply_to]
        if tags:
            request["EmailTags"] = tags
        if self._settings.configuration_set:
            request["ConfigurationSetName"] = self._settings.configuration_set
        return request

    @staticmethod
    def _tags(email: Email) -> tuple[list[MessageTagTypeDef], dict[str, Any]]:
        """Our tags and tag-shaped metadata as SES tags; the metadata that does not fit comes back."""
        tags: list[MessageTagTypeDef] = [{"Name": t, "Value": "1"} for t in dict.fromkeys(email.tags)]
        names = {t["Name"] for t in tags}
        leftover: dict[str, Any] = {}
        for key, value in email.metadata.items():
            text = _tag_value(value)
            if text is None or key in names or len(tags) >= _MAX_TAGS or not _TAG_TEXT.fullmatch(key):
                leftover[key] = value
            else:
                tags.append({"Name": key, "Value": text})
                names.add(key)
        return tags, leftover

    def _fits_simple(self, email: Email, headers: dict[str, str]) -> bool:
        if len(headers) > _MAX_SIMPLE_HEADERS:
            return False
        for name, value in headers.items():
            if not _SIMPLE_HEADER_NAME.fullmatch(name) or len(value) > _MAX_SIMPLE_HEADER_VALUE:
                return False
            if not _SIMPLE_HEADER_VALUE.fullmatch(value):
                return False
        if email.attachments and not self._simple_attachments:
            return False
        return all(len(a.content_type) <= _MAX_ATTACHMENT_CONTENT_TYPE for a in email.attachments)

    @staticmethod
    def _simple(email: Email, headers: dict[str, str]) -> MessageTypeDef:
        body: BodyTypeDef = {}
        if email.text is not None:
            body["Text"] = {"Data": email.text, "Charset": "UTF-8"}
        if email.html is not None:
            body["Html"] = {"Data": email.html, "Charset": "UTF-8"}
        message: MessageTypeDef = {
            "Subject": {"Data": email.subject, "Charset": "UTF-8"},
            "Body": body,
            "Headers": [{"Name": k, "Value": v} for k, v in headers.items()],
        }
        if email.attachments:
            attachments: list[AttachmentTypeDef] = [
                {
                    "RawContent": a.content,
                    "FileName": a.filename,
                    "ContentType": a.content_type,
                    "ContentDisposition": "ATTACHMENT",
                    "ContentTransferEncoding": "BASE64",
                }
                for a in email.attachments
            ]
            message["Attachments"] = attachments
        return message

    # --- errors --------------------------------------------------------------------------

    def _clean(self, text: str) -> str:
        """Blank out our secrets, then trim: trimming first could leave half a key behind."""
        text = self._redactor.text(text)
        return text if len(text) <= _MAX_REASON else text[: _MAX_REASON - 3] + "..."

    def _from_client_error(self, exc: ClientError) -> VendorError:
        error = exc.response.get("Error", {})
        code = str(error.get("Code") or "")
        message = self._clean(str(error.get("Message") or ""))
        meta = exc.response.get("ResponseMetadata", {})
        status = int(meta.get("HTTPStatusCode") or 0)
        headers = meta.get("HTTPHeaders") or {}
        what = f"SES {status} {code}: {message}" if message else f"SES {status} {code}"

        rejected_for_rate = code == "MessageRejected" and _THROTTLE_TEXT.search(message)
        if code in _THROTTLE_CODES or status == 429 or rejected_for_rate:
            if _QUOTA_TEXT.search(message):
                return TransientVendorError(self.name, f"{what} (the daily sending quota is used up)")
            return VendorThrottled(self.name, what, retry_after=_retry_after(headers.get("retry-after")))
        if code in _TRANSIENT_CODES or status >= 500:
            retry_after = _retry_after(headers.get("retry-after"))
            # A gateway timeout means SES may have taken the mail behind the gateway.
            return TransientVendorError(self.name, what, retry_after=retry_after, ambiguous=status == 504)
        if code in _AUTH_CODES or code.startswith("AccessDenied") or status in (401, 403, 404):
            return VendorAuthError(self.name, f"{what} (check the SES account, identities and credentials)")
        if code in _PERMANENT_CODES or 400 <= status < 500:
            return PermanentVendorError(self.name, what)
        return TransientVendorError(self.name, what)

    def _from_botocore_error(self, exc: BotoCoreError) -> VendorError:
        text = self._clean(str(exc))
        if isinstance(exc, (NoCredentialsError, PartialCredentialsError, CredentialRetrievalError)):
            return VendorAuthError(self.name, f"no usable AWS credentials: {text}")
        if isinstance(exc, NoRegionError):
            return VendorAuthError(self.name, text)
        if isinstance(exc, ParamValidationError):
            return PermanentVendorError(self.name, f"SES would not accept this request: {text}")
        # Order matters: ConnectTimeoutError and EndpointConnectionError are both
        # ConnectionErrors, ReadTimeoutError and ConnectionClosedError are HTTPClientErrors.
        if isinstance(exc, (ConnectTimeoutError, ProxyConnectionError, SSLError)):
            return TransientVendorError(self.name, f"cannot reach SES: {text}")
        if isinstance(exc, EndpointConnectionError):
            # aiobotocore files every aiohttp connection error here, including a reset after
            # the request went out; only a failure to connect proves nothing was sent.
            cause = exc.kwargs.get("error")
            sent = not isinstance(cause, (aiohttp.ClientConnectorError, socket.gaierror))
            return TransientVendorError(self.name, f"cannot reach SES: {text}", ambiguous=sent)
        if isinstance(exc, ReadTimeoutError):
            return TransientVendorError(self.name, f"SES did not answer in time: {text}", ambiguous=True)
        if isinstance(exc, (ConnectionClosedError, HTTPClientError)):
            return TransientVendorError(self.name, f"SES connection broke mid-way: {text}", ambiguous=True)
        return TransientVendorError(self.name, f"SES request failed: {text}", ambiguous=True)


def _handed_over(**kwargs: Any) -> None:
    """botocore's ``before-send``: from here on the request may reach SES (see the module doc)."""
    current_progress().handed_over()


def _retry_after(value: Any) -> float | None:
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        return None
    return seconds if seconds >= 0 else None
