"""The HTTP API, ``mailer-api``: a client of the core, like the CLI.

Every mail goes through the SDK's own ``Producer`` (one per app), so validation, storage and
queueing are exactly the SDK's. Nothing in the core imports this package; it needs the
``api`` extra (``pip install 'mailer[api]'``).
"""

from __future__ import annotations

from mailer.service.app import create_app

__all__ = ["create_app"]
