"""Atomic file writes: a killed process never leaves a half-written file behind.

Every write goes to a temporary file in the same directory, is flushed to disk, then renamed over
the target (rename is atomic on POSIX), so a failed write (disk full) leaves the old file as it
was; it is reported as one line naming the path and the space it needed. Safetensors and JSON
only: nothing here pickles.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from smdlm_cli.core.errors import UserError


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        _raise_if_full(e, path, len(data))
        raise


def _raise_if_full(e: BaseException, path: Path, size: int) -> None:
    """A full disk (or quota) as a UserError; safetensors reports it inside its own error text."""
    full = (isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT)) or \
        (type(e).__name__ == "SafetensorError" and "(os error 28)" in str(e))
    if not full:
        return
    try:
        free = shutil.disk_usage(path.parent).free
    except OSError:
        free = 0
    raise UserError(f"{path}: no space left on the device while writing it; it needs "
                    f"{size / 2**20:.1f} MiB and {free / 2**20:.1f} MiB are free (the previous "
                    f"version, if any, is untouched)") from None


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def atomic_save_tensors(path: str | os.PathLike, tensors: dict[str, torch.Tensor],
                        metadata: dict[str, str] | None = None) -> None:
    """safetensors.save_file through a temporary name; tensors are made contiguous CPU copies."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, tmp,
                  metadata=metadata)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        _raise_if_full(e, path, sum(v.numel() * v.element_size() for v in tensors.values()))
        raise


def load_tensors(path: str | os.PathLike, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    return load_file(str(path), device=str(device))


def read_json(path: str | os.PathLike):
    with open(path, encoding="utf-8") as f:
        return json.load(f)
