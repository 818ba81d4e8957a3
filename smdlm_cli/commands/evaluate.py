"""`smdlm evaluate`: evaluation tasks: humaneval, mbpp, elbo, genppl, mauve, sweep.

Not built yet: `run` says so as a UserError (exit 2, one line) instead of pretending to work. The
issue that builds evaluation replaces this module and the command's options in app.py.
"""

from __future__ import annotations

from typing import NoReturn

from smdlm_cli.core.errors import UserError


def run() -> NoReturn:
    raise UserError("smdlm evaluate: not available yet in this version")
