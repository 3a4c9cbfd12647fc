"""Every exception mailer raises, in one place.

Each message says what went wrong *and* what to do about it, because these strings end
up in operators' logs and in application tracebacks where there is no one to ask.
Secrets are never interpolated into any of them.
"""

from __future__ import annotations


class MailerError(Exception):
    """Base class: catch this to handle anything mailer raises."""


# --- configuration ---------------------------------------------------------------------


class ConfigError(MailerError):
    """The configuration file or environment is unusable; start-up stops."""


# --- input -----------------------------------------------------------------------------


class EmailValidationError(MailerError, ValueError):
    """An e-mail given to the producer is invalid; nothing was stored or queued.

    ``errors`` holds ``(field, message)`` pairs so callers can map them to their own forms.
    """

    def __init__(self, errors: list[tuple[str, str]]) -> None:
        self.errors = errors
        lines = "; ".join(f"{field}: {msg}" for field, msg in errors[:10])
        if len(errors) > 10:  # e.g. 10,000 bad recipients: the first ten say enough
            lines += f"; and {len(errors) - 10} more"
        super().__init__(f"invalid e-mail, nothing was stored or queued: {lines}")


# --- beanstalkd ------------------------------------------------------------------------


class BeanstalkError(MailerError):
    """Base class for beanstalkd client errors."""


class BeanstalkConnectionError(BeanstalkError):
    """The connection to beanstalkd failed or was lost; reconnect and retry."""


class BeanstalkTimeoutError(BeanstalkError):
    """beanstalkd did not answer within the client's timeout; the connection is closed."""


class BeanstalkProtocolError(BeanstalkError):
    """The server sent a reply the client could not understand (a bug or a non-beanstalkd peer)."""


class BeanstalkServerError(BeanstalkError):
    """beanstalkd answered a command with an error reply."""

    reply = ""
    hint = ""

    def __init__(self, command: str, detail: str = "") -> None:
        self.command = command
        text = f"beanstalkd answered {self.reply} to {command!r}"
        if detail:
            text += f" ({detail})"
        if self.hint:
            text += f": {self.hint}"
        super().__init__(text)


class NotFound(BeanstalkServerError):
    reply = "NOT_FOUND"
    hint = "the job does not exist, is not reserved by this connection, or its TTR ran out"


class JobTooBig(BeanstalkServerError):
    reply = "JOB_TOO_BIG"
    hint = "the body is larger than beanstalkd's -z limit; put only ids on the tube"


class Draining(BeanstalkServerError):
    reply = "DRAINING"
    hint = "the server is in drain mode and takes no new jobs; use another server or wait"


class OutOfMemory(BeanstalkServerError):
    reply = "OUT_OF_MEMORY"
    # beanstalkd answers OUT_OF_MEMORY too when it cannot write its binlog (a full disk).
    hint = (
        "beanstalkd could not allocate memory or its binlog disk is full; free disk space "
        "under its -b directory, drain the queue, or give the server more memory"
    )


class InternalError(BeanstalkServerError):
    reply = "INTERNAL_ERROR"
    hint = "beanstalkd reported an internal bug; restart it"


class BadFormat(BeanstalkServerError):
    reply = "BAD_FORMAT"
    hint = "the command was malformed (a client bug); report it"


class UnknownCommand(BeanstalkServerError):
    reply = "UNKNOWN_COMMAND"
    hint = "the server does not know this command; upgrade beanstalkd"


class ExpectedCrlf(BeanstalkServerError):
    reply = "EXPECTED_CRLF"
    hint = "the job body was not followed by CRLF (a client bug); report it"


class DeadlineSoon(BeanstalkServerError):
    reply = "DEADLINE_SOON"
    hint = "a reserved job's TTR is about to run out; touch or finish it"


class TimedOut(BeanstalkServerError):
    reply = "TIMED_OUT"
    hint = "no job became ready within the reserve timeout"


class Buried(BeanstalkServerError):
    reply = "BURIED"
    hint = "the server ran out of memory growing its priority queue and buried the job"


class NotIgnored(BeanstalkServerError):
    reply = "NOT_IGNORED"
    hint = "a connection must watch at least one tube"


SERVER_ERRORS: dict[str, type[BeanstalkServerError]] = {
    cls.reply: cls
    for cls in (
        NotFound,
        JobTooBig,
        Draining,
        OutOfMemory,
        InternalError,
        BadFormat,
        UnknownCommand,
        ExpectedCrlf,
        DeadlineSoon,
        TimedOut,
        Buried,
        NotIgnored,
    )
}


# --- MongoDB ---------------------------------------------------------------------------


class StoreError(MailerError):
    """MongoDB could not be reached or refused an operation."""


class StoreUnavailable(StoreError, ConnectionError):
    """MongoDB cannot be reached (down, wrong host, network): waiting may help, unlike a
    refused configuration."""


class MailNotFound(StoreError):
    """No stored mail has the given id."""


# --- producer --------------------------------------------------------------------------


class EnqueueError(MailerError):
    """The mail is stored in MongoDB but its job could not be put on the tube.

    The document stays ``queued``; ``mailer requeue`` (or the consumer's periodic sweep)
    puts it on the tube later, so the mail is not lost. ``mail_ids`` lists the affected ids.
    """

    def __init__(
        self, mail_ids: list[str], cause: BaseException, *, all_ids: list[str] | None = None
    ) -> None:
        self.mail_ids = mail_ids
        # For send_many: every mail's id in input order, queued or not.
        self.all_ids = all_ids if all_ids is not None else list(mail_ids)
        shown = ", ".join(mail_ids[:5]) + (" ..." if len(mail_ids) > 5 else "")
        super().__init__(
            f"{len(mail_ids)} mail(s) stored but not queued ({shown}): {cause}. "
            "They stay 'queued' in MongoDB and will be requeued by 'mailer requeue' or the "
            "consumer's sweep; check that beanstalkd is running."
        )


class ProducerClosedError(MailerError):
    """The producer is not connected; call ``await producer.connect()`` or use ``async with``."""


# --- vendors ---------------------------------------------------------------------------


class VendorError(MailerError):
    """Base class for a failed vendor send. ``vendor`` names the adapter."""

    def __init__(self, vendor: str, message: str) -> None:
        self.vendor = vendor
        self.reason = message
        super().__init__(f"{vendor}: {message}")


class TransientVendorError(VendorError):
    """The vendor could not take the mail now (timeout, 5xx, 429, throttling).

    The vendor is marked unavailable and the mail fails over. ``retry_after`` (seconds) is
    the vendor's own hint and becomes the minimum unavailability. ``ambiguous`` is true when
    the request may have been accepted (read timeout after sending): a failover may duplicate.
    """

    def __init__(
        self,
        vendor: str,
        message: str,
        *,
        retry_after: float | None = None,
        ambiguous: bool = False,
    ) -> None:
        super().__init__(vendor, message)
        self.retry_after = retry_after
        self.ambiguous = ambiguous


class VendorThrottled(TransientVendorError):
    """The vendor asked us to slow down (HTTP 429, SparkPost 420, SES ``Throttling`` /
    "Maximum sending rate exceeded", an SMTP 421/451 rate reply).

    Not an outage: the vendor stays in rotation, paused only for its ``Retry-After`` (or a
    short default that grows on repeats) while its send rate is lowered for a while. A
    subclass, so code that handles every transient error keeps working unchanged.
    """


class PermanentVendorError(VendorError):
    """The vendor refused this message (bad recipient, bad content): the mail fails, the vendor stays."""


class VendorAuthError(VendorError):
    """The vendor refused our credentials or account (401/403, paused): fix the config."""


class UnsupportedByVendor(VendorError):
    """This vendor cannot carry this mail as it is (more tags than it takes, several reply-to
    addresses, a reserved metadata key), found before any request was made.

    Neither the mail's fault nor the vendor's (cf. django-anymail's
    ``AnymailUnsupportedFeature``): delivery moves on to the next vendor without marking this
    one, and fails the mail only when no enabled vendor can carry it.
    """


class VendorConfigError(MailerError):
    """A vendor section in the configuration is incomplete or a vendor name is unknown."""


# --- delivery events and suppression ----------------------------------------------------


class RecipientSuppressed(EmailValidationError):
    """Recipients are on the suppression list and ``[suppression] mode`` is ``refuse``: nothing
    was stored or queued. ``by_field`` maps where (``to``, or ``[3].to`` in a batch) to the
    suppressed addresses; ``addresses`` lists them all; ``by_index`` (a batch) maps each
    refused mail's position to its suppressed addresses."""

    def __init__(
        self, by_field: dict[str, list[str]], *, by_index: dict[int, list[str]] | None = None
    ) -> None:
        self.by_field = by_field
        self.by_index = by_index or {}
        self.addresses = list(dict.fromkeys(a for found in by_field.values() for a in found))
        super().__init__(
            [
                (
                    field,
                    f"suppressed recipient(s) {', '.join(found)} (hard bounce, complaint or added by "
                    "hand): remove them from the mail, or take them off the list with 'mailer suppress "
                    "remove ADDRESS' if they may receive mail again",
                )
                for field, found in by_field.items()
            ]
        )


class WebhookRefused(MailerError):
    """A webhook request failed its vendor's authenticity check (HTTP 401); nothing was stored."""


class WebhookMalformed(MailerError):
    """A webhook request is not in the vendor's documented shape (HTTP 400); nothing was stored."""


class WebhookUnavailable(MailerError):
    """A webhook could not be verified for now (the signing certificate could not be fetched):
    the vendor retries (HTTP 503)."""
