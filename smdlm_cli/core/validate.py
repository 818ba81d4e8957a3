"""Checks every loader runs on what it read before using it: shape, type, range, encoding.

A file written by hand, cut short by a full disk or by another tool must end in one `UserError`
line naming the file, the key and what was expected, never in a traceback from deep inside torch.
These helpers are small so each loader states its own expectations where it reads them.
Not here: recipe validation (recipe.py reads config.py's metadata), or what the values mean.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import fields
from pathlib import Path

from smdlm_cli.core.errors import UserError

# Annotations are strings (postponed evaluation): the plain JSON types a config field may hold.
_KINDS = {"int": (int,), "float": (int, float), "bool": (bool,), "str": (str,)}


def read_text(path: str | os.PathLike, what: str) -> str:
    """A UTF-8 text file; `what` names it in errors (e.g. "--prompt-file x.txt")."""
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        raise UserError(f"{what}: no such file") from None
    except IsADirectoryError:
        raise UserError(f"{what}: is a directory; expected a text file") from None
    except OSError as e:
        raise UserError(f"{what}: cannot be read ({e.strerror})") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{what}: not UTF-8 text (byte 0x{data[e.start]:02x} at offset "
                        f"{e.start}); expected a UTF-8 file") from None


def read_json(path: str | os.PathLike, what: str | None = None, kind: type = dict):
    """A JSON file whose top level is `kind` (an object by default), with one-line errors."""
    what = what or str(path)
    text = read_text(path, what)
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise UserError(f"{what}: not valid JSON ({e.msg} at line {e.lineno})") from None
    if not isinstance(value, kind):
        raise UserError(f"{what}: a JSON {_json_name(type(value))}; expected a JSON "
                        f"{_json_name(kind)}")
    return value


def _json_name(kind: type) -> str:
    return {dict: "object", list: "array", str: "string", int: "number", float: "number",
            bool: "boolean", type(None): "null"}.get(kind, kind.__name__)


def check_fields(cls, d, where: str, positive: tuple[str, ...] = (),
                 non_negative: tuple[str, ...] = ()) -> None:
    """Fields of dataclass `cls` present in `d` have their annotated JSON type and range."""
    if not isinstance(d, dict):
        raise UserError(f"{where}: a JSON {_json_name(type(d))}; expected a JSON object")
    for f in fields(cls):
        if f.name not in d:
            continue
        value, kinds = d[f.name], _KINDS.get(str(f.type).replace(" | None", ""))
        if kinds is None or (value is None and "None" in str(f.type)):
            continue
        if not isinstance(value, kinds) or (bool not in kinds and isinstance(value, bool)):
            raise UserError(f"{where}: {f.name} = {value!r}; expected {_expected(f.type)}")
        if isinstance(value, float) and not math.isfinite(value):
            raise UserError(f"{where}: {f.name} = {value!r}; expected a finite number")
        if f.name in positive and value <= 0:
            raise UserError(f"{where}: {f.name} = {value!r}; expected a positive number")
        if f.name in non_negative and value < 0:
            raise UserError(f"{where}: {f.name} = {value!r}; expected a number >= 0")


def _expected(annotation) -> str:
    name = str(annotation).replace(" | None", "")
    return {"int": "an integer", "float": "a number", "bool": "true or false",
            "str": "a string"}.get(name, name)


def number(value, flag: str, lo: float | None = None, hi: float | None = None,
           lo_open: bool = False) -> float:
    """A finite command-line number within [lo, hi] (lo exclusive when lo_open)."""
    if not math.isfinite(value) or (lo is not None and (value <= lo if lo_open else value < lo)) \
            or (hi is not None and value > hi):
        low = "" if lo is None else f"{'>' if lo_open else '>='} {lo:g}"
        high = "" if hi is None else f"<= {hi:g}"
        bounds = " and ".join(filter(None, (low, high)))
        raise UserError(f"{flag} {value}: expected a finite number {bounds}".rstrip())
    return value


SEED_MAX = 2**63 - 1  # torch generators take a signed 64-bit seed


def seed(value: int, flag: str = "--seed", rows: int = 1) -> int:
    """A seed that every row's seed (value + row) keeps within torch's range."""
    if not 0 <= value <= SEED_MAX - rows:
        raise UserError(f"{flag} {value}: expected an integer from 0 to {SEED_MAX - rows}")
    return value


PICKLED = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def refuse_pickled(directory: str | os.PathLike, what: str, needed: str = "*.safetensors") -> None:
    """A UserError when `directory` holds weights only in a pickle-based format.

    torch.load unpickles, and unpickling runs whatever code the file names, so smdlm never reads
    .bin/.pt/.pth files (peft and transformers would, when no safetensors file is beside them).
    `needed` is the glob of the safetensors file(s) that must be there instead.
    """
    directory = Path(directory)
    if not directory.is_dir() or any(directory.glob(needed)):
        return
    pickled = sorted(p.name for p in directory.iterdir() if p.suffix in PICKLED)
    if pickled:
        raise UserError(
            f"{what} {directory}: holds {pickled[0]}, a pickled weights file, and no "
            f"{needed}; smdlm reads safetensors only (unpickling can run code). Convert it "
            f"outside smdlm, where you trust the file: python -c \"import torch; from "
            f"safetensors.torch import save_file; save_file(torch.load('{pickled[0]}', "
            f"weights_only=True), '{Path(pickled[0]).stem}.safetensors')\"")
