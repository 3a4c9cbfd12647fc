"""The vendor table: one row per vendor, from which the configuration and the factory derive.

Adding a vendor used to take five edits in three places (two name lists, a ``Literal``, a
section field, an ``if`` chain with ``# type: ignore``); a name missing from one of them failed
only in production. Now the row (a ``[vendors.NAME]`` field carrying a :class:`VendorRow`) is
the only place a vendor is named, and these tests hold every row to what the factory needs.
"""

from __future__ import annotations

import inspect
import typing
from pathlib import Path
from typing import Annotated

import pytest
from pydantic import BaseModel, ConfigDict, SecretStr

import mailer
from mailer.config import (
    DEFAULT_VENDOR_ORDER,
    KNOWN_VENDORS,
    VENDORS,
    MailgunSettings,
    Settings,
    SmtpSettings,
    VendorRow,
    VendorsSettings,
    vendor_rows,
)
from mailer.errors import VendorConfigError
from mailer.models import Email
from mailer.vendors import EXTRAS, adapter_class, build_vendors, construct
from mailer.vendors.base import SendResult, Vendor

PACKAGE = Path(mailer.__file__).parent


class PostmarkSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    server_token: SecretStr


class PostmarkVendor:
    """A stand-in adapter: what a new vendor's module would hold."""

    def __init__(self, settings: PostmarkSettings, name: str = "postmark") -> None:
        self.name = name
        self.settings = settings

    async def connect(self) -> None:
        return None

    async def send(self, email: Email, mail_id: str) -> SendResult:
        return SendResult(f"pm-{mail_id}")

    async def close(self) -> None:
        return None


class NotAVendor:
    """Takes a section like an adapter, but cannot send."""

    def __init__(self, settings: PostmarkSettings, name: str = "bad") -> None:
        self.name = name


class WithPostmark(VendorsSettings):
    postmark: Annotated[
        PostmarkSettings | None,
        VendorRow(f"{__name__}:PostmarkVendor", extra="postmark", sdk_modules=("httpx",)),
    ] = None


def test_names_extras_and_default_order_derive_from_the_table() -> None:
    assert KNOWN_VENDORS == tuple(VENDORS) == ("amazon", "mailgun", "sendinblue", "sparkpost", "smtp")
    assert DEFAULT_VENDOR_ORDER == ("amazon", "mailgun", "sendinblue", "sparkpost")  # smtp needs a host
    assert {name: row.extra for name, row in VENDORS.items()} == EXTRAS
    assert VENDORS["mailgun"].section is MailgunSettings and VENDORS["smtp"].section is SmtpSettings
    assert all(row.name == name for name, row in VENDORS.items())


@pytest.mark.parametrize("name", list(VENDORS))
def test_every_row_names_an_adapter_that_takes_its_section(name: str) -> None:
    """What mypy cannot see through the row's "module:Class" string, checked here for each row."""
    row = VENDORS[name]
    adapter = adapter_class(row)
    assert inspect.isclass(adapter), row.adapter
    hints = typing.get_type_hints(adapter.__init__)
    params = list(inspect.signature(adapter.__init__).parameters)
    assert params[:2] == ["self", "settings"] and "name" in params, params
    assert hints["settings"] is row.section, (hints["settings"], row.section)
    assert set(row.sdk_modules) and row.extra


def test_a_new_vendor_is_one_row() -> None:
    """A subclass with one more annotated field is a table with one more vendor; the factory
    builds its adapter from the row alone."""
    rows = vendor_rows(WithPostmark)
    assert list(rows) == [*KNOWN_VENDORS, "postmark"]
    assert rows["postmark"].section is PostmarkSettings and rows["postmark"].extra == "postmark"
    vendor = construct(rows["postmark"], PostmarkSettings(server_token=SecretStr("t")), name="pm-1")
    assert isinstance(vendor, Vendor) and isinstance(vendor, PostmarkVendor) and vendor.name == "pm-1"


def test_the_factory_refuses_a_row_whose_adapter_is_not_a_vendor() -> None:
    row = VendorRow(f"{__name__}:NotAVendor", extra="x", sdk_modules=("httpx",), name="bad")
    with pytest.raises(VendorConfigError, match="does not build a vendor"):
        construct(row, PostmarkSettings(server_token=SecretStr("t")), name="bad")


def test_the_factory_names_a_row_whose_adapter_does_not_exist() -> None:
    row = VendorRow(f"{__name__}:Nowhere", extra="x", sdk_modules=("httpx",), name="bad")
    with pytest.raises(VendorConfigError, match="Nowhere does not exist"):
        construct(row, PostmarkSettings(server_token=SecretStr("t")), name="bad")


def test_the_factory_refuses_a_section_of_another_vendor() -> None:
    with pytest.raises(VendorConfigError, match="MailgunSettings"):
        construct(VENDORS["sparkpost"], MailgunSettings(domain="d", api_key=SecretStr("k")), name="x")


def test_production_builds_every_row_from_its_section() -> None:
    key = SecretStr("k")
    sections = {
        "amazon": {},
        "mailgun": {"domain": "mg.example.com", "api_key": key},
        "sendinblue": {"api_key": key},
        "sparkpost": {"api_key": key},
        "smtp": {"host": "smtp.example.com"},
    }
    settings = Settings(env="production", vendors=VendorsSettings.model_validate(sections))
    vendors = build_vendors(settings)
    assert [v.name for v in vendors] == list(KNOWN_VENDORS)
    for vendor, row in zip(vendors, VENDORS.values(), strict=True):
        assert type(vendor) is adapter_class(row)


def test_order_accepts_exactly_the_table_names() -> None:
    assert VendorsSettings(order=list(KNOWN_VENDORS)).order == list(KNOWN_VENDORS)
    with pytest.raises(ValueError, match="unknown vendor 'postmark'; known: amazon, mailgun"):
        VendorsSettings.model_validate({"order": ["mailgun", "postmark"]})


def test_no_type_ignore_in_the_vendors_package() -> None:
    offenders = [
        f"{path.name}:{n}"
        for path in sorted((PACKAGE / "vendors").glob("*.py"))
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
        if "type: ignore" in line
    ]
    assert offenders == []
