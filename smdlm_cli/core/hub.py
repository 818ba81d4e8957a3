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


def _hub_name(name: str) -> bool:
    """A name that can only come from the hub: not an existing path, not written as a path."""
    return bool(name) and not Path(name).exists() and not name.startswith((".", "/", "~"))


def reachable(timeout: float = 2.0) -> bool:
    """False when offline mode is asked for, or the hub's host does not answer within `timeout`."""
    if offline():
        return False
    import socket
    from urllib.parse import urlparse

    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    try:
        socket.create_connection((url.hostname, url.port or 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def go_offline() -> None:
    """Make every hub client of this process fail at once instead of retrying a dead network."""
    import sys

    for key in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        os.environ[key] = "1"  # read by the clients when they are imported
    import huggingface_hub.constants

    huggingface_hub.constants.HF_HUB_OFFLINE = True
    if "datasets.config" in sys.modules:  # imported already: its constant was read
        sys.modules["datasets.config"].HF_HUB_OFFLINE = True


def _cached(kind: str, name: str) -> bool:
    """Whether the local caches hold `name`. For datasets a cache folder of that name is taken as
    enough (importing `datasets` to ask it costs seconds); its loader says what else is wrong."""
    from huggingface_hub import constants, snapshot_download

    if kind == "dataset":
        home = Path(os.environ.get("HF_DATASETS_CACHE", Path(constants.HF_HOME) / "datasets"))
        repo = Path(constants.HF_HUB_CACHE) / f"datasets--{name.replace('/', '--')}"
        return (home / name.replace("/", "___")).is_dir() or repo.is_dir()
    try:
        snapshot_download(name, local_files_only=True,
                          allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model"])
        return True
    except Exception:  # any failure here means "not usable offline"; the loader will say why
        return False


_CHECKED: set[tuple] = set()  # preflight runs once per process for the same needs


def preflight(needs: list[tuple[str, str, str]]) -> None:
    """Before any work: when the hub cannot be reached, check that every hub name a recipe needs
    is in the local cache, and name all that are not in one error. `needs` holds (setting, name,
    kind) with kind "tokenizer", "weights" or "dataset"; local paths and built-in sources are not
    checked here (their loaders say what is wrong with them). Offline, every hub client of the
    process is then told so, so nothing waits on retries."""
    remote = tuple(n for n in needs if _hub_name(n[1]))
    if not remote or remote in _CHECKED:
        return
    if reachable():
        _CHECKED.add(remote)
        return
    go_offline()
    missing = [f"{what} {name!r}" for what, name, kind in remote if not _cached(kind, name)]
    if missing:
        raise UserError(f"the hub is unreachable (offline?) and these are not in the local cache: "
                        f"{', '.join(missing)}; expected them downloaded on a connected machine "
                        f"(HF_HOME) or local paths in the recipe")
    _CHECKED.add(remote)


BUILTIN_SOURCES = ("python-stdlib", "python-functions", "sudoku")
BUILTIN_BASES = ("tiny-dream", "tiny-llada")


def recipe_needs(recipe) -> list[tuple[str, str, str]]:
    """What a recipe would read from the hub: (setting, name, kind) for preflight."""
    m, d = recipe.model, recipe.data
    needs = []
    if m.init and m.init not in BUILTIN_BASES:
        needs.append(("model.init", m.init, "weights"))
    if d.tokenizer != "bpe":
        needs.append(("data.tokenizer", d.tokenizer, "tokenizer"))
    if d.source not in BUILTIN_SOURCES:
        needs.append(("data.source", d.source, "dataset"))
    return needs
