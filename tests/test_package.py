"""The package's public face and weight: `from mailer import Producer, Email`, the version,
`--version`, a library that ignores another application's config.toml, vendor SDKs as extras
(and the message naming the extra), no loadtest in the wheel, the sample configuration."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import tomllib
from importlib import metadata
from pathlib import Path

import pytest
from helpers import ROOT
from setuptools import find_packages

import mailer
from mailer.config import KNOWN_VENDORS, SAMPLE_CONFIG_FILE, Settings, load_settings
from mailer.errors import VendorConfigError
from mailer.vendors import EXTRAS, build_vendors, vendor_names

BIN = Path(sys.executable).parent
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def python(code: str, *, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_public_face() -> None:
    from mailer import Email, Producer
    from mailer.models import Email as ModelEmail
    from mailer.producer import Producer as ProducerClass

    assert (Producer, Email) == (ProducerClass, ModelEmail)
    assert set(mailer.__all__) >= {"Producer", "Email", "__version__"}
    assert mailer.__version__ == metadata.version("mailer") == PYPROJECT["project"]["version"]
    with pytest.raises(AttributeError):
        _ = mailer.Consumer  # type: ignore[attr-defined]


def test_importing_mailer_stays_light(tmp_path: Path) -> None:
    done = python("import sys, mailer, mailer.errors; print('pymongo' in sys.modules)", cwd=tmp_path)
    assert done.stdout.strip() == "False", done.stderr


@pytest.mark.parametrize("script", ["mailer", "mailer-consumer"])
def test_version_on_every_console_script(script: str, tmp_path: Path) -> None:
    done = subprocess.run([str(BIN / script), "--version"], capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 0
    assert done.stdout.strip() == f"{script} {mailer.__version__}"


def test_producer_ignores_a_foreign_config_toml(settings: Settings, tmp_path: Path) -> None:
    """Another application's working directory, with its own config.toml: Producer() sends."""
    (tmp_path / "config.toml").write_text('[tool]\nname = "their app"\n[database]\nurl = "x"\n')
    b, m = settings.beanstalkd, settings.mongodb
    # This test's tube and collection, never the real ones.
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAILER_")}
    env.update(MAILER_BEANSTALKD__TUBE=b.tube, MAILER_MONGODB__COLLECTION=m.collection)
    done = python(
        """
        import asyncio
        from mailer import Producer

        async def main() -> None:
            async with Producer() as producer:
                mail_id = await producer.send({"from": "a@example.com", "to": "b@example.com",
                                               "subject": "s", "text": "t"})
                print(producer.settings.source, (await producer.status(mail_id)).status.value)

        asyncio.run(main())
        """,
        cwd=tmp_path,
        env=env,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "built-in defaults queued"


def test_producer_reads_mailer_toml(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "mailer.toml").write_text("[producer]\ndefault_priority = 7\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MAILER_CONFIG", raising=False)
    assert load_settings().producer.default_priority == 7


# --- extras -------------------------------------------------------------------------------------


def test_vendor_sdks_are_extras_and_dev_pulls_them_all() -> None:
    project = PYPROJECT["project"]
    core = " ".join(project["dependencies"])
    for sdk in ("aioboto3", "httpx", "aiosmtplib"):
        assert sdk not in core
    extras = project["optional-dependencies"]
    assert sorted(EXTRAS) == sorted(KNOWN_VENDORS)
    for extra in EXTRAS.values():
        assert extras[extra], extra
        assert extra in extras["all"][0]
    assert "mailer[all]" in extras["dev"]


def test_loadtest_is_not_in_the_wheel() -> None:
    include = PYPROJECT["tool"]["setuptools"]["packages"]["find"]["include"]
    packages = find_packages(where=str(ROOT), include=include)
    assert "mailer" in packages and "mailer.vendors" in packages
    assert not [p for p in packages if p.startswith(("loadtest", "tests"))]


MISSING_SDK = """
    import sys
    for sdk in ("aiosmtplib", "aioboto3", "httpx"):
        sys.modules[sdk] = None  # as if not installed
    from mailer.config import load_settings
    from mailer.errors import VendorConfigError
    from mailer.vendors import build_vendors
    for name in ("smtp", "amazon", "mailgun"):
        try:
            build_vendors(load_settings("%s.toml" % name))
        except VendorConfigError as exc:
            print(exc)
"""


def test_a_missing_vendor_sdk_names_the_extra(tmp_path: Path) -> None:
    (tmp_path / "smtp.toml").write_text('env = "production"\n[vendors.smtp]\nhost = "smtp.example.com"\n')
    (tmp_path / "amazon.toml").write_text('env = "production"\n[vendors.amazon]\nregion = "eu-west-1"\n')
    (tmp_path / "mailgun.toml").write_text(
        'env = "production"\n[vendors.mailgun]\ndomain = "mg.example.com"\napi_key = "k"\n'
    )
    done = python(MISSING_SDK, cwd=tmp_path)
    lines = done.stdout.splitlines()
    assert len(lines) == 3, (done.stdout, done.stderr)
    assert "pip install 'mailer[smtp]'" in lines[0]
    assert "pip install 'mailer[ses]'" in lines[1]
    assert "pip install 'mailer[mailgun]'" in lines[2]


def test_production_needs_a_vendor_section(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MAILER_ENV", "production")
    settings = load_settings()
    for call in (vendor_names, build_vendors):
        with pytest.raises(VendorConfigError, match=r"at least one \[vendors\.NAME\] section"):
            call(settings)
    monkeypatch.setenv("MAILER_ENV", "development")
    assert len(build_vendors(load_settings())) == 4  # simulated stand-ins, no section needed


def test_the_sample_configuration_is_valid_and_named_for_us() -> None:
    assert not (ROOT / "config.sample.toml").exists()
    settings = load_settings(ROOT / SAMPLE_CONFIG_FILE)
    assert settings.env == "development"
    assert "mailer.toml" in (ROOT / SAMPLE_CONFIG_FILE).read_text()


def test_no_pattern_of_the_package_anchors_with_a_dollar() -> None:
    """Python's ``$`` also matches just before a final newline, so ``re.match(r"^...$")``
    let a header name, tag or metadata key ending in ``\\n`` through. Every module-level
    pattern of the package is used with ``fullmatch`` instead and carries no ``$`` anchor."""
    import importlib
    import pkgutil
    import re

    anchored = []
    for info in pkgutil.walk_packages(mailer.__path__, "mailer."):
        if info.name.endswith(".__main__"):
            continue  # runs a command when imported
        module = importlib.import_module(info.name)
        for name, value in vars(module).items():
            text = value.pattern if isinstance(value, re.Pattern) else None
            if isinstance(text, str) and text.endswith("$") and not text.endswith("\\$"):
                anchored.append(f"{info.name}.{name}: {text!r}")
    assert not anchored, anchored
