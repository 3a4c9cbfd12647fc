"""Vendor adapters behind one protocol (see ``base``), and the factory that picks them.

Only ``MAILER_ENV=production`` builds real adapters; anything else builds a simulated
stand-in for every vendor name, so nothing is ever sent by accident from a laptop or CI.

Each vendor's SDK is an extra of the package (``mailer[ses]``, ``mailer[smtp]``, ...), so a
producer-only application installs none of them; the factory imports an adapter only when
production configures it, and names the extra when its SDK is missing.
"""

from __future__ import annotations

from mailer.config import KNOWN_VENDORS, Settings, VendorsSettings
from mailer.errors import VendorConfigError
from mailer.vendors.base import SendResult, Vendor

__all__ = ["EXTRAS", "SendResult", "Vendor", "build_vendors", "vendor_names"]

# The pip extra that brings each vendor's SDK, and the top-level modules of that SDK.
EXTRAS = {
    "amazon": "ses",
    "mailgun": "mailgun",
    "sendinblue": "sendinblue",
    "sparkpost": "sparkpost",
    "smtp": "smtp",
}
_SDK_MODULES = {
    "amazon": ("aioboto3", "aiobotocore", "botocore", "boto3", "aiohttp"),
    "mailgun": ("httpx",),
    "sendinblue": ("httpx",),
    "sparkpost": ("httpx",),
    "smtp": ("aiosmtplib",),
}


def vendor_names(settings: Settings) -> list[str]:
    """The vendors in round-robin order; in production, checked against their sections.

    Shared by the consumer and ``mailer vendors`` so both tell the same story: without it
    production showed four default vendors as available while the consumer refused to start.
    """
    if not settings.production:
        return settings.vendor_order()
    if not settings.vendors.configured():
        raise VendorConfigError(
            "MAILER_ENV=production needs at least one [vendors.NAME] section "
            f"(NAME: {', '.join(KNOWN_VENDORS)}) and the configuration ({settings.source}) has none: "
            "add one with its credentials (see mailer.sample.toml), or unset MAILER_ENV to send simulated"
        )
    names = settings.vendor_order()
    for name in names:
        if getattr(settings.vendors, name, None) is None:
            raise VendorConfigError(
                f"vendor {name!r} is in vendors.order but has no [vendors.{name}] section with credentials"
            )
    return names


def build_vendors(settings: Settings) -> list[Vendor]:
    """The vendors in round-robin order (not yet connected)."""
    names = vendor_names(settings)
    if not settings.production:
        from mailer.vendors.simulated import SimulatedVendor

        sim = settings.simulation
        return [SimulatedVendor(n, latency_ms=sim.latency_ms, failure_rate=sim.failure_rate) for n in names]
    return [_real(name, settings.vendors) for name in names]


def _real(name: str, sections: VendorsSettings) -> Vendor:
    """The real adapter, or a VendorConfigError naming the extra when its SDK is missing."""
    try:
        return _construct(name, sections)
    except ModuleNotFoundError as exc:
        missing = (exc.name or "").partition(".")[0]
        if missing not in _SDK_MODULES.get(name, ()):
            raise
        raise VendorConfigError(
            f"vendor {name!r} is configured but its SDK ({missing}) is not installed: "
            f"pip install 'mailer[{EXTRAS[name]}]' (or 'mailer[all]' for every vendor)"
        ) from None


def _construct(name: str, sections: VendorsSettings) -> Vendor:
    # Imported here so a simulated run, or a producer, never loads aioboto3 and friends.
    if name == "amazon" and sections.amazon is not None:
        from mailer.vendors.amazon import AmazonVendor

        return AmazonVendor(sections.amazon, name=name)
    if name == "mailgun" and sections.mailgun is not None:
        from mailer.vendors.mailgun import MailgunVendor

        return MailgunVendor(sections.mailgun, name=name)
    if name == "sendinblue" and sections.sendinblue is not None:
        from mailer.vendors.sendinblue import SendinblueVendor

        return SendinblueVendor(sections.sendinblue, name=name)
    if name == "sparkpost" and sections.sparkpost is not None:
        from mailer.vendors.sparkpost import SparkpostVendor

        return SparkpostVendor(sections.sparkpost, name=name)
    if name == "smtp" and sections.smtp is not None:
        from mailer.vendors.smtp import SmtpVendor

        return SmtpVendor(sections.smtp, name=name)
    raise VendorConfigError(f"unknown vendor {name!r}; known: {', '.join(KNOWN_VENDORS)}")
