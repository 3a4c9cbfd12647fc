"""Vendor adapters behind one protocol (see ``base``), and the factory that picks them.

Only ``MAILER_ENV=production`` builds real adapters; anything else builds a simulated
stand-in for every vendor name, so nothing is ever sent by accident from a laptop or CI.

The factory has no list of vendors of its own: it reads the table in
:class:`mailer.config.VendorsSettings` (each ``[vendors.NAME]`` field carries its adapter's
``"module:Class"``, pip extra and SDK modules). Each SDK is an extra of the package
(``mailer[ses]``, ``mailer[smtp]``, ...), so a producer-only application installs none of
them; an adapter module is imported only when production configures it, and a missing SDK
is named with its extra.
"""

from __future__ import annotations

import importlib

from pydantic import BaseModel

from mailer.config import KNOWN_VENDORS, VENDORS, Settings, VendorRow
from mailer.errors import VendorConfigError
from mailer.vendors.base import SendResult, Vendor

__all__ = ["EXTRAS", "SendResult", "Vendor", "adapter_class", "build_vendors", "construct", "vendor_names"]

# The pip extra that brings each vendor's SDK (for messages and the packaging test).
EXTRAS = {name: row.extra for name, row in VENDORS.items()}


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
        if settings.vendors.section(name) is None:
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
        return [
            SimulatedVendor(
                n,
                latency_ms=sim.latency_ms,
                failure_rate=sim.failure_rate,
                throttle_rate=sim.throttle_rate.get(n, 0.0),
                throttle_retry_after_s=sim.throttle_retry_after_s,
                keep_raw=sim.keep_raw,
            )
            for n in names
        ]
    return [_real(name, settings) for name in names]


def _real(name: str, settings: Settings) -> Vendor:
    """The real adapter, or a VendorConfigError naming the extra when its SDK is missing."""
    row, section = VENDORS.get(name), settings.vendors.section(name)
    if row is None or section is None:
        raise VendorConfigError(f"unknown vendor {name!r}; known: {', '.join(KNOWN_VENDORS)}")
    try:
        return construct(row, section, name=name)
    except ModuleNotFoundError as exc:
        missing = (exc.name or "").partition(".")[0]
        if missing not in row.sdk_modules:
            raise
        raise VendorConfigError(
            f"vendor {name!r} is configured but its SDK ({missing}) is not installed: "
            f"pip install 'mailer[{row.extra}]' (or 'mailer[all]' for every vendor)"
        ) from None


def adapter_class(row: VendorRow) -> object:
    """The row's adapter class, imported now (and with it the vendor's SDK)."""
    module, _, attr = row.adapter.partition(":")
    found: object = getattr(importlib.import_module(module), attr, None)
    if found is None:
        raise VendorConfigError(f"vendor {row.name!r}: {row.adapter} does not exist; fix its VendorRow")
    return found


def construct(row: VendorRow, section: BaseModel, *, name: str) -> Vendor:
    """The adapter of ``row`` built from its section: ``Class(section, name=name)``.

    The row names its class by string (config imports nothing of ours), so what mypy would
    check is checked here instead: the section is the row's own, the result is a Vendor.
    """
    if not isinstance(section, row.section):
        raise VendorConfigError(
            f"vendor {row.name!r} takes a {row.section.__name__}, not a {type(section).__name__}"
        )
    factory = adapter_class(row)
    vendor = factory(section, name=name) if callable(factory) else None
    if not isinstance(vendor, Vendor):
        raise VendorConfigError(
            f"vendor {row.name!r}: {row.adapter} does not build a vendor "
            "(name, connect, send, close); fix its VendorRow"
        )
    return vendor
