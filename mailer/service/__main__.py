"""``python -m mailer.service``: the same as ``mailer-api``."""

import sys

from mailer.service.server import main

sys.exit(main())
