"""mailer: an asyncio e-mail service (MongoDB first, beanstalkd queue, vendor failover).

The public face for applications: ``from mailer import Producer, Email``. Both are
imported on first use, so ``import mailer.errors`` (or a vendor adapter) stays light and
does not pull in pymongo and the beanstalkd client.
"""

from __future__ import annotations

from importlib import metadata
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from mailer.models import Email
    from mailer.producer import Producer

__all__ = ["Email", "Producer", "__version__"]


def _version() -> str:
    # From the installed distribution, so it cannot drift from pyproject.toml; a bare
    # checkout on sys.path (no install) still imports.
    try:
        return metadata.version("mailer")
    except metadata.PackageNotFoundError:
        return "0+unknown"


__version__ = _version()

_LAZY = {"Email": "mailer.models", "Producer": "mailer.producer"}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'mailer' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])
