"""One reader for everything that may come from the Hugging Face hub, with narrow errors.

Tokenizers, weights and datasets are named either as local paths or as hub names (then read from
the local cache, or downloaded when online). When one cannot be had, the message must say why:
a local path that is missing or incomplete says so; a hub name that is neither cached nor
reachable says "offline?"; anything else (a corrupt file, a bad split name) shows its own message.

Not here: what is loaded (tokenizer.py, models/, data.py, sft.py, evals/).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, TypeVar

from smdlm_cli.core.errors import UserError

T = TypeVar("T")


def offline() -> bool:
    """True when the environment asks for no hub traffic (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE)."""
    return any(os.environ.get(k, "").lower() in ("1", "true", "yes")
               for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"))


def _unreachable(e: BaseException) -> bool:
    """Errors that mean "not in the cache and the hub could not be asked" (or does not have it)."""
    names = {c.__name__ for c in type(e).__mro__}
    return bool(names & {"LocalEntryNotFoundError", "OfflineModeIsEnabled", "ConnectionError",
                         "RepositoryNotFoundError", "GatedRepoError", "EntryNotFoundError",
                         "DatasetNotFoundError", "HFValidationError", "Timeout", "ConnectTimeout"})


def _reason(e: BaseException) -> str:
    text = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def fetch(what: str, name: str, load: Callable[[], T], expected: str) -> T:
    """load(), with its failure as one UserError line: `what` names the setting, `name` the value.

    `expected` says what would work, e.g. "a local tokenizer directory or a cached hub name".
    """
    try:
        return load()
    except UserError:
        raise
    except Exception as e:
        if Path(name).exists():
            why = f"cannot be read ({_reason(e)})"
        elif name.startswith((".", "/", "~")):
            why = "no such file or directory"
        elif _unreachable(e) or (offline() and isinstance(e, OSError)):
            why = f"not found locally and the hub is unreachable (offline?) ({type(e).__name__})"
        else:
            why = f"failed to load ({_reason(e)})"
        raise UserError(f"{what} {name!r}: {why}; expected {expected}") from None


def load_dataset(what: str, name: str, *args, expected: str, **kwargs):
    """datasets.load_dataset with fetch's errors."""
    import datasets

    return fetch(what, name, lambda: datasets.load_dataset(name, *args, **kwargs), expected)
