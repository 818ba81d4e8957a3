"""`smdlm inspect-lambda`: the learned omega and lambda(p): table, curve plot, lambda in decoding.

Not built yet: `run` says so as a UserError (exit 2, one line) instead of pretending to work. The
issue that builds the lambda inspector replaces this module and the command's options in app.py.
"""

from __future__ import annotations

from typing import NoReturn

from smdlm_cli.core.errors import UserError


def run() -> NoReturn:
    raise UserError("smdlm inspect-lambda: not available yet in this version")
