"""`smdlm finetune`: DoRA/LoRA fine-tuning of a large MDLM (Dream-7B, Dream-Coder-7B) with SM.

Not built yet: `run` says so as a UserError (exit 2, one line) instead of pretending to work. The
issue that builds fine-tuning replaces this module and the command's options in app.py.
"""

from __future__ import annotations

from typing import NoReturn

from smdlm_cli.core.errors import UserError


def run() -> NoReturn:
    raise UserError("smdlm finetune: not available yet in this version")
