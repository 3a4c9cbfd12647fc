"""The one typed settings object, built once at the edge and passed down.

Precedence, lowest first: built-in defaults (the local services that ``make run`` starts),
then one configuration file, then ``MAILER_*`` environment variables (nested keys with
``__``, e.g. ``MAILER_BEANSTALKD__PORT``). The file is the first of: the path given to
``load_settings`` (``--config``), ``MAILER_CONFIG``, ``./mailer.toml``. The name is our own
because the producer runs inside other applications, whose working directory may well hold
a ``config.toml`` that is theirs. Nothing else in the package reads the environment.
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from types import MappingProxyType, NoneType
from typing import Annotated, Any, Literal, get_args

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
)
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict, SettingsError

from mailer.errors import ConfigError

DEFAULT_CONFIG_FILE = "mailer.toml"
SAMPLE_CONFIG_FILE = "mailer.sample.toml"
ENVIRONMENTS = ("development", "test", "production")
MONGODB_SCHEMES = ("mongodb://", "mongodb+srv://")


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class BeanstalkdSettings(_Section):
    host: str = "127.0.0.1"
    port: int = Field(11300, ge=1, le=65535)
    tube: str = Field("mailer", pattern=r"^[A-Za-z0-9+/;.$_()][A-Za-z0-9+/;.$_()-]{0,199}$")
    # Also the length of a consumer's claim on a mail (its lease): when a consumer dies the
    # job comes back after TTR and the claim has run out with it, so the next consumer can
    # take the mail over. Long deliveries touch the job and extend the lease together.
    ttr_s: int = Field(120, ge=2, le=86400)
    connect_timeout_s: float = Field(5.0, gt=0)
    # Bound on any single command's reply (reserve-with-timeout adds its own timeout).
    command_timeout_s: float = Field(10.0, gt=0)
    # Several servers, "HOST:PORT" each (mailer.fleet spreads the mails over them); empty: the
    # one server host/port. Append new servers at the end: a stored job id names its server by
    # its place in this list.
    servers: tuple[str, ...] = ()

    @field_validator("servers")
    @classmethod
    def _server_addresses(cls, servers: tuple[str, ...]) -> tuple[str, ...]:
        for entry in servers:
            _split_address(entry)
        if len(set(servers)) != len(servers):
            raise ValueError("a server is listed twice: list each HOST:PORT once")
        return servers

    def addresses(self) -> list[tuple[str, int]]:
        """Every server as (host, port): ``servers``, else the one ``host``/``port``."""
        return [_split_address(s) for s in self.servers] or [(self.host, self.port)]


def _split_address(entry: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[::1]:11300`` for IPv6) as (host, port); a ValueError names the entry."""
    host, sep, port = entry.strip().rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ValueError(f'{entry!r} is not HOST:PORT with a port 1-65535 (e.g. "10.0.0.2:11300")')
    return host, int(port)


class MongoSettings(_Section):
    # A URI may embed a password, so it is a secret like any key.
    uri: SecretStr = SecretStr("mongodb://127.0.0.1:27017/mailer")
    database: str | None = None  # default: the URI's database, else "mailer"
    collection: str = Field("mails", pattern=r"^[a-z_0-9]{1,100}$")
    vendor_status_collection: str = Field("vendor_status", pattern=r"^[a-z_0-9]{1,100}$")
    timeout_ms: int = Field(5000, ge=100)
    # Every write's write concern: "majority" or a number of members (at least 1: an
    # unacknowledged write could be lost unseen). Unset: a w= of the URI, else "majority" on a
    # replica set or a mongos and 1 on a standalone. journal: wait for the journal (j=true).
    write_concern: Literal["majority"] | Annotated[int, Field(ge=1)] | None = None
    journal: bool | None = None

    @field_validator("uri")
    @classmethod
    def _known_scheme(cls, uri: SecretStr) -> SecretStr:
        # Checked here so a typo stops start-up with the key's name; the value is never echoed.
        if not uri.get_secret_value().strip().startswith(MONGODB_SCHEMES):
            raise ValueError(
                "not a MongoDB URI: it must start with mongodb:// or mongodb+srv:// "
                "(e.g. mongodb://USER:PASSWORD@HOST:27017/mailer)"
            )
        return uri


class TestModeSettings(_Section):
    """Tube and collections used by ``--test`` and the test suite, never by production."""

    tube: str = "mailer_test"
    collection: str = Field("mails_test", pattern=r"^[a-z_0-9]{1,100}$")
    vendor_status_collection: str = Field("vendor_status_test", pattern=r"^[a-z_0-9]{1,100}$")


class ProducerSettings(_Section):
    max_email_bytes: int = Field(10 * 1024 * 1024, ge=1024)
    default_priority: int = Field(1024, ge=0, le=2**32 - 1)


class ConsumerSettings(_Section):
    concurrency: int = Field(50, ge=1, le=10000)
    vendor_cooldown_s: float = Field(600.0, ge=0)
    max_attempts: int = Field(5, ge=1)
    backoff_base_s: float = Field(30.0, ge=0)
    backoff_cap_s: float = Field(3600.0, ge=0)
    grace_s: float = Field(30.0, ge=0)
    registry_refresh_s: float = Field(5.0, gt=0)
    reserve_timeout_s: int = Field(1, ge=0)
    # Periodic requeue sweep of orphaned mails; 0 switches it off.
    requeue_interval_s: float = Field(300.0, ge=0)
    requeue_older_than_s: float = Field(600.0, ge=0)
    # Group commit: at most this many claims, or records, in one MongoDB write.
    commit_batch: int = Field(200, ge=1)
    # Prometheus /metrics and /healthz (mailer-consumer --metrics-port); 0 switches them off.
    metrics_port: int = Field(0, ge=0, le=65535)
    metrics_host: str = "127.0.0.1"
    # Each consumer upserts its heartbeat here this often; 'mailer check' counts as live the
    # ones seen within 3 intervals (and of its tube).
    heartbeat_s: float = Field(5.0, gt=0)
    heartbeat_collection: str = Field("consumers", pattern=r"^[a-z_0-9]{1,100}$")


class SimulationSettings(_Section):
    """The simulated vendors used whenever MAILER_ENV is not ``production``."""

    latency_ms: float = Field(0.0, ge=0)
    failure_rate: float = Field(0.0, ge=0, le=1)
    # Send-rate limits of the stand-ins, e.g. {mailgun = 50}: a load test can then show a
    # limit at work without real vendors. They win over the [vendors.NAME] sections' own.
    max_per_second: dict[str, Annotated[float, Field(gt=0)]] = {}
    # Stand-ins that throttle this share of their sends (e.g. {mailgun = 0.3}), answering
    # with a Retry-After of throttle_retry_after_s (none when 0): the throttle path at work.
    throttle_rate: dict[str, Annotated[float, Field(ge=0, le=1)]] = {}
    throttle_retry_after_s: float = Field(1.0, ge=0)
    # The development outbox: keep each simulated send's whole MIME message (the SMTP
    # vendor's rendering) for the console and `mailer outbox ID`, the newest keep_raw_max.
    keep_raw: bool = True
    keep_raw_max: int = Field(5000, ge=1)

    @field_validator("max_per_second", "throttle_rate")
    @classmethod
    def _known_names(cls, limits: dict[str, float]) -> dict[str, float]:
        unknown = sorted(set(limits) - set(KNOWN_VENDORS))
        if unknown:
            raise ValueError(f"unknown vendor {', '.join(unknown)}; known: {', '.join(KNOWN_VENDORS)}")
        return limits


class ApiSettings(_Section):
    """``mailer-api``: where it listens, who may call it, and how much one request may carry."""

    host: str = "127.0.0.1"
    port: int = Field(8025, ge=1, le=65535)
    # API keys, each the key itself or ``sha256:<64 hex>`` of it (so the file need not hold
    # the key). Production refuses to start without one; without any, the API serves
    # loopback only.
    keys: list[SecretStr] = []
    max_batch: int = Field(1000, ge=1, le=10000)
    # A request body larger than this is refused (413) before it is read.
    max_body_bytes: int = Field(10 * 1024 * 1024, ge=1024)
    # Retry-After (seconds) sent with a 503 when MongoDB is unavailable.
    retry_after_s: int = Field(5, ge=1)

    @field_validator("keys")
    @classmethod
    def _usable_keys(cls, keys: list[SecretStr]) -> list[SecretStr]:
        # The messages name the position only: the value is a secret.
        for i, key in enumerate(keys):
            value = key.get_secret_value()
            if value.startswith("sha256:"):
                if not re.fullmatch(r"[0-9a-fA-F]{64}", value.removeprefix("sha256:")):
                    raise ValueError(
                        f"key [{i}]: after 'sha256:' give the 64 hex digits of the key's SHA-256"
                    )
            elif len(value) < 16 or not value.isprintable() or value != value.strip():
                raise ValueError(
                    f"key [{i}]: use at least 16 printable characters without surrounding spaces "
                    "(e.g. python -c 'import secrets; print(secrets.token_urlsafe(32))')"
                )
        return keys


# --- delivery events and suppression (mailer.events, mailer/service/webhooks) ---

# Where SNS signing certificates may come from: the documented SNS hosts (sns.REGION.amazonaws.com,
# and .amazonaws.com.cn in China), over HTTPS; each entry is a regex matched against the whole
# "scheme://host[:port]" of SigningCertURL (and of SubscribeURL).
SNS_CERT_ORIGINS = (
    r"https://sns\.[a-z0-9-]+\.amazonaws\.com",
    r"https://sns\.[a-z0-9-]+\.amazonaws\.com\.cn",
)


class MailgunWebhookSettings(_Section):
    """Mailgun signs each webhook with the account's HTTP webhook signing key."""

    signing_key: SecretStr | None = None
    # A signature older (or newer) than this is refused, and its token remembered this long.
    max_age_s: float = Field(300.0, gt=0)


class SnsWebhookSettings(_Section):
    """SES events arrive through SNS, signed by Amazon; only these topics are accepted."""

    topic_arns: list[str] = []
    cert_origins: list[str] = list(SNS_CERT_ORIGINS)
    # Visit the SubscribeURL of a SubscriptionConfirmation from an accepted topic.
    confirm_subscriptions: bool = True
    timeout_s: float = Field(10.0, gt=0)

    @field_validator("cert_origins")
    @classmethod
    def _patterns(cls, origins: list[str]) -> list[str]:
        for i, pattern in enumerate(origins):
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ValueError(f"entry [{i}] is not a regular expression ({exc})") from None
        return origins


class WebhookCredentials(_Section):
    """Basic auth (username and password) and/or a bearer token, as set on the vendor's side."""

    username: str | None = None
    password: SecretStr | None = None
    token: SecretStr | None = None


class WebhooksSettings(_Section):
    """``POST /v1/webhooks/{vendor}``: each vendor's secret (a vendor without one is refused)."""

    amazon: SnsWebhookSettings = SnsWebhookSettings()
    mailgun: MailgunWebhookSettings = MailgunWebhookSettings()
    sendinblue: WebhookCredentials = WebhookCredentials()
    sparkpost: WebhookCredentials = WebhookCredentials()


class SuppressionSettings(_Section):
    """At send time: ``refuse`` a mail to a suppressed address (nothing stored), or ``drop``
    those recipients (recorded on the mail; a mail left with none is stored ``suppressed``)."""

    mode: Literal["refuse", "drop"] = "refuse"
    # How long a process trusts its copy of the list after reading that it is current; a
    # change to the list is acknowledged only this long after it is written, so a send that
    # starts after it always sees it. 0: no copy, one query per write. Processes may differ:
    # a change waits out the longest lease any sending process announced.
    lease_s: float = Field(0.5, ge=0, le=10)
    # The delivery events that add their recipient to the list by themselves.
    add_on: list[Literal["bounced_hard", "bounced_soft", "complained", "rejected", "unsubscribed"]] = [
        "bounced_hard",
        "complained",
    ]


class _VendorSection(_Section):
    # Sends per second through this vendor, held by all consumer processes together (may be
    # fractional, e.g. 0.5); None: no limit of ours (the vendor's throttling still slows us).
    max_per_second: float | None = Field(None, gt=0)


class AmazonSettings(_VendorSection):
    region: str = "us-east-1"
    access_key_id: SecretStr | None = None
    secret_access_key: SecretStr | None = None
    session_token: SecretStr | None = None
    endpoint_url: str | None = None
    configuration_set: str | None = None
    timeout_s: float = Field(10.0, gt=0)


class MailgunSettings(_VendorSection):
    domain: str
    api_key: SecretStr
    # The account's HTTP webhook signing key, for POST /v1/webhooks/mailgun (the same as
    # [webhooks.mailgun] signing_key, which wins when both are set).
    webhook_signing_key: SecretStr | None = None
    base_url: str = "https://api.mailgun.net"
    timeout_s: float = Field(10.0, gt=0)


class SendinblueSettings(_VendorSection):
    api_key: SecretStr
    base_url: str = "https://api.brevo.com"
    timeout_s: float = Field(10.0, gt=0)


class SparkpostSettings(_VendorSection):
    api_key: SecretStr
    base_url: str = "https://api.sparkpost.com"
    timeout_s: float = Field(10.0, gt=0)


class SmtpSettings(_VendorSection):
    host: str
    port: int = Field(587, ge=1, le=65535)
    username: str | None = None
    password: SecretStr | None = None
    starttls: bool = True
    use_tls: bool = False
    # PEM file of the CA certificates to trust for this relay instead of the system's (a
    # relay with a certificate from a private CA); None: the system's store.
    ca_file: str | None = None
    timeout_s: float = Field(10.0, gt=0)


@dataclass(frozen=True, slots=True)
class VendorRow:
    """One vendor's row of the table, carried by its ``[vendors.NAME]`` field (see
    :class:`VendorsSettings`); ``name`` and ``section`` are filled in from that field.

    ``adapter`` is ``"module:Class"``, imported by :mod:`mailer.vendors` only when production
    configures the vendor: a string, because config imports nothing of ours and a producer must
    not load the vendors' SDKs. ``tests/vendors/test_registry_table.py`` checks every row's
    class takes its section, which mypy cannot see through the string.
    """

    adapter: str
    extra: str  # the pip extra that brings the SDK: pip install 'mailer[EXTRA]'
    sdk_modules: tuple[str, ...]  # top-level modules of that SDK, to name the extra when missing
    default_order: bool = True  # a simulated stand-in when no vendor is configured
    name: str = ""
    section: type[BaseModel] = BaseModel


def _known_vendor(name: str) -> str:
    if name not in VENDORS:
        raise ValueError(f"unknown vendor {name!r}; known: {', '.join(VENDORS)}")
    return name


_HTTPX = ("httpx",)


class VendorsSettings(_Section):
    """The vendor table: each ``NAME: Annotated[Section | None, VendorRow(...)]`` field is one
    vendor (its ``[vendors.NAME]`` section, adapter, extra and SDK); the names, the default
    order and the factory (:func:`mailer.vendors.build_vendors`) all derive from these fields,
    so adding a vendor is its adapter module, its section class and one field here."""

    # Round-robin order; empty means "the order of the vendor sections in the file",
    # or the default vendors when none is configured.
    order: list[Annotated[str, AfterValidator(_known_vendor)]] = []
    amazon: Annotated[
        AmazonSettings | None,
        VendorRow(
            "mailer.vendors.amazon:AmazonVendor",
            extra="ses",
            sdk_modules=("aioboto3", "aiobotocore", "botocore", "boto3", "aiohttp"),
        ),
    ] = None
    mailgun: Annotated[
        MailgunSettings | None,
        VendorRow("mailer.vendors.mailgun:MailgunVendor", extra="mailgun", sdk_modules=_HTTPX),
    ] = None
    sendinblue: Annotated[
        SendinblueSettings | None,
        VendorRow("mailer.vendors.sendinblue:SendinblueVendor", extra="sendinblue", sdk_modules=_HTTPX),
    ] = None
    sparkpost: Annotated[
        SparkpostSettings | None,
        VendorRow("mailer.vendors.sparkpost:SparkpostVendor", extra="sparkpost", sdk_modules=_HTTPX),
    ] = None
    # Not a default stand-in: a relay needs a host, so SMTP is used only when configured.
    smtp: Annotated[
        SmtpSettings | None,
        VendorRow(
            "mailer.vendors.smtp:SmtpVendor", extra="smtp", sdk_modules=("aiosmtplib",), default_order=False
        ),
    ] = None

    def section(self, name: str) -> BaseModel | None:
        """The ``[vendors.NAME]`` section, or None when it is not configured (or not a vendor)."""
        if name not in VENDORS:
            return None
        section: object = getattr(self, name)
        return section if isinstance(section, BaseModel) else None

    def configured(self) -> list[str]:
        return [name for name in VENDORS if self.section(name) is not None]

    def rate_limits(self) -> dict[str, float]:
        """``{name: max_per_second}`` of the configured vendors that have a limit."""
        sections = {name: getattr(self, name) for name in self.configured()}
        return {n: s.max_per_second for n, s in sections.items() if s.max_per_second is not None}


def vendor_rows(model: type[VendorsSettings] = VendorsSettings) -> dict[str, VendorRow]:
    """The table, read off the model's fields: each field with a VendorRow, in field order,
    with its name and its section class (the field's type without None)."""
    rows: dict[str, VendorRow] = {}
    for name, info in model.model_fields.items():
        for meta in info.metadata:
            if isinstance(meta, VendorRow):
                sections = [t for t in get_args(info.annotation) if isinstance(t, type) and t is not NoneType]
                if len(sections) != 1 or not issubclass(sections[0], BaseModel):
                    raise TypeError(f"vendors.{name}: declare it as 'SectionModel | None' with its VendorRow")
                rows[name] = replace(meta, name=name, section=sections[0])
    return rows


VENDORS: Mapping[str, VendorRow] = MappingProxyType(vendor_rows())
KNOWN_VENDORS = tuple(VENDORS)
DEFAULT_VENDOR_ORDER = tuple(name for name, row in VENDORS.items() if row.default_order)


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="MAILER_",
        env_nested_delimiter="__",
        extra="forbid",
        frozen=True,
    )

    # development (the default), test or production, in any case; only production sends.
    env: str = "development"
    measure_throughput: bool = False
    throughput_interval_s: float = Field(5.0, gt=0)
    beanstalkd: BeanstalkdSettings = BeanstalkdSettings()
    mongodb: MongoSettings = MongoSettings()
    test: TestModeSettings = TestModeSettings()
    producer: ProducerSettings = ProducerSettings()
    consumer: ConsumerSettings = ConsumerSettings()
    simulation: SimulationSettings = SimulationSettings()
    api: ApiSettings = ApiSettings()
    vendors: VendorsSettings = VendorsSettings()
    webhooks: WebhooksSettings = WebhooksSettings()
    suppression: SuppressionSettings = SuppressionSettings()
    # Where the values came from, for messages; not a key of the file.
    source: str = Field("built-in defaults", exclude=True)
    file_vendor_order: tuple[str, ...] = Field((), exclude=True)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # Environment beats the file (which arrives as init kwargs).
        return (env_settings, init_settings)

    @field_validator("env", mode="before")
    @classmethod
    def _known_env(cls, value: object) -> object:
        """Normalise the case; refuse anything else, because a typo such as ``prod`` used to
        run simulated while recording every mail as sent."""
        if not isinstance(value, str):
            return value
        env = value.strip().lower()
        if env not in ENVIRONMENTS:
            raise ValueError(f"MAILER_ENV={value!r} is not accepted")
        return env

    @property
    def production(self) -> bool:
        return self.env == "production"

    def vendor_order(self) -> list[str]:
        """Round-robin order of vendor names (real or simulated stand-ins)."""
        if self.vendors.order:
            return list(dict.fromkeys(self.vendors.order))
        configured = set(self.vendors.configured())
        from_file = [n for n in self.file_vendor_order if n in configured]
        rest = [n for n in self.vendors.configured() if n not in from_file]
        return from_file + rest or list(DEFAULT_VENDOR_ORDER)

    def rate_limits(self) -> dict[str, float]:
        """Send-rate limits by vendor name, for the vendors in the round-robin order. A
        simulated stand-in keeps its section's limit, so a development run paces like
        production; ``[simulation] max_per_second`` sets or overrides it there."""
        limits = self.vendors.rate_limits()
        if not self.production:
            limits |= self.simulation.max_per_second
        order = self.vendor_order()
        return {name: limits[name] for name in order if name in limits}

    def for_test(self, suffix: str = "") -> Settings:
        """The same settings pointed at the test tube and collections (``--test``)."""
        return self.model_copy(
            update={
                "beanstalkd": self.beanstalkd.model_copy(update={"tube": self.test.tube + suffix}),
                "mongodb": self.mongodb.model_copy(
                    update={
                        "collection": self.test.collection + suffix,
                        "vendor_status_collection": self.test.vendor_status_collection + suffix,
                    }
                ),
            }
        )


def _describe(errors: list[Any]) -> list[str]:
    out = []
    for err in errors:
        key = ".".join(str(p) for p in err["loc"]) or "(top level)"
        if key == "env":
            # Not a secret: naming the value is the point (a typo like 'prod').
            out.append(
                f"MAILER_ENV={err['input']!r} (key 'env') is not accepted: use one of "
                f"{', '.join(ENVIRONMENTS)} (any case; development is the default)"
            )
        elif err["type"] == "extra_forbidden":
            out.append(f"key '{key}': unknown key (see {SAMPLE_CONFIG_FILE} for the valid keys)")
        elif err["type"] == "missing":
            out.append(f"key '{key}': required but missing")
        else:
            # The message only, never the input: the input may be a secret.
            out.append(f"key '{key}': {err['msg'].removeprefix('Value error, ')}")
    return out


def _config_file(path: str | os.PathLike[str] | None) -> Path | None:
    """The one file to read: a named file must exist, the default one may be absent."""
    named = path if path is not None else os.environ.get("MAILER_CONFIG") or None
    if named is not None:
        if not Path(named).is_file():
            raise ConfigError(f"{named}: configuration file not found (named by --config or MAILER_CONFIG)")
        return Path(named)
    default = Path(DEFAULT_CONFIG_FILE)
    return default if default.is_file() else None


def load_settings(
    path: str | os.PathLike[str] | None = None,
    *,
    test: bool = False,
) -> Settings:
    """Build the settings once at start-up; raises ConfigError with one clear message.

    ``path`` (from ``--config``) or ``MAILER_CONFIG`` names a file that must exist;
    otherwise ``./mailer.toml`` is read when present.
    """
    file = _config_file(path)

    data: dict[str, Any] = {}
    if file is not None:
        try:
            data = tomllib.loads(file.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{file}: cannot read the configuration file: {exc}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{file}: not valid TOML: {exc}") from None
        for reserved in ("source", "file_vendor_order"):
            if reserved in data:
                raise ConfigError(f"{file}: key '{reserved}': unknown key (see {SAMPLE_CONFIG_FILE})")
        vendors = data.get("vendors")
        if isinstance(vendors, dict):
            data["file_vendor_order"] = tuple(k for k in vendors if k in KNOWN_VENDORS)
    where = str(file) if file is not None else "built-in defaults"
    data["source"] = where

    try:
        settings = Settings(**data)
    except ValidationError as exc:
        details = "; ".join(_describe(exc.errors()))
        raise ConfigError(f"{where} (with MAILER_* environment overrides): {details}") from None
    except SettingsError as exc:
        # A MAILER_* variable for a list or section that is not valid JSON. The message
        # names the field only; the value (maybe a secret) is never shown.
        raise ConfigError(
            f"{where}: a MAILER_* environment variable is unusable ({exc}); "
            "give lists and sections as JSON, e.g. MAILER_VENDORS__ORDER='[\"mailgun\"]'"
        ) from None
    return settings.for_test() if test else settings
