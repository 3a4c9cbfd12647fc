"""Vendor adapters behind one protocol (see ``base``), and the factory that picks them.

Only ``MAILER_ENV=production`` builds real adapters; anything else builds a simulated
stand-in for every vendor name, so nothing is ever sent by accident from a laptop or CI.
"""

from __future__ import annotations

from mailer.config import Settings
from mailer.errors import VendorConfigError
from mailer.vendors.base import SendResult, Vendor

__all__ = ["SendResult", "Vendor", "build_vendors"]


def build_vendors(settings: Settings) -> list[Vendor]:
    """The vendors in round-robin order (not yet connected)."""
    names = settings.vendor_order()
    if not settings.production:
        from mailer.vendors.simulated import SimulatedVendor

        sim = settings.simulation
        return [SimulatedVendor(n, latency_ms=sim.latency_ms, failure_rate=sim.failure_rate) for n in names]
    vendors: list[Vendor] = []
    for name in names:
        section = getattr(settings.vendors, name, None)
        if section is None:
            raise VendorConfigError(
                f"vendor {name!r} is in vendors.order but has no [vendors.{name}] section with credentials"
            )
        vendors.append(_real(name, section))
    if not vendors:
        raise VendorConfigError(
            "MAILER_ENV=production but no vendor is configured: add a [vendors.*] section"
        )
    return vendors


def _real(name: str, section: object) -> Vendor:
    # Imported here so a simulated run never loads aioboto3 and friends.
    if name == "amazon":
        from mailer.vendors.amazon import AmazonVendor

        return AmazonVendor(section, name=name)  # type: ignore[arg-type]
    if name == "mailgun":
        from mailer.vendors.mailgun import MailgunVendor

        return MailgunVendor(section, name=name)  # type: ignore[arg-type]
    if name == "sendinblue":
        from mailer.vendors.sendinblue import SendinblueVendor

        return SendinblueVendor(section, name=name)  # type: ignore[arg-type]
    if name == "sparkpost":
        from mailer.vendors.sparkpost import SparkpostVendor

        return SparkpostVendor(section, name=name)  # type: ignore[arg-type]
    if name == "smtp":
        from mailer.vendors.smtp import SmtpVendor

        return SmtpVendor(section, name=name)  # type: ignore[arg-type]
    raise VendorConfigError(f"unknown vendor {name!r}; known: amazon, mailgun, sendinblue, sparkpost, smtp")
