"""TOML recipes -> the settings dataclasses of core/config.py, checked, and back to TOML.

`load_recipe` reads a recipe file, applies `--set section.key=value` overrides and returns a
`Recipe`; every problem is a `UserError` whose one line names the file (or the override), the key
and what is expected. Types and ranges come from the field metadata of core/config.py, so a new
key needs no code here; only relations between keys (t_min < t_max, ...) are written out.
`dump_recipe` writes a resolved recipe back as commented TOML that `load_recipe` reads to an equal
`Recipe`; `recipe_docs` writes the Markdown reference of every key.

Relative paths in a recipe (data.source = "./corpus.jsonl") are relative to the current working
directory, not to the recipe file: the same value means the same file on the command line, in
`--set` and in the resolved recipe.toml a run directory keeps.

What this is not: the meaning of the values (the trainer, the data loaders, the models own that),
and it never touches the network: hub names are accepted as they are, only local paths are checked.
"""

from __future__ import annotations

import difflib
import functools
import math
import sys
import typing
from dataclasses import MISSING, fields
from pathlib import Path
from typing import Any, Iterable

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib

from smdlm_cli.core.config import SECTIONS, Recipe
from smdlm_cli.core.errors import UserError

# Keys whose value may name a local file or directory; checked for existence when they look like a
# path rather than a hub or preset name.
PATH_KEYS = {("model", "init"), ("data", "source"), ("data", "tokenizer")}
_PATH_PREFIXES = ("/", "./", "../", "~")
_PATH_SUFFIXES = (".txt", ".jsonl", ".parquet", ".json", ".safetensors")

# What each value type is called in messages ("expected an integer") and in the docs ("integer").
_NOUNS = {int: ("an", "integer"), float: ("a", "number"), bool: ("a", "boolean"),
          str: ("a", "string"), list: ("a", "list of numbers"), (list, str): ("a", "list of strings"),
          (list, int): ("a", "list of integers")}


class _Field(typing.NamedTuple):
    kind: type                   # int, float, bool, str or list
    meta: typing.Mapping[str, Any]
    default: Any
    item: type = float           # what a list holds: numbers (float), integers (int) or strings (str)

    @property
    def noun(self) -> tuple[str, str]:
        return _NOUNS[(list, self.item)] if self.kind is list and self.item in (str, int) \
            else _NOUNS[self.kind]


@functools.cache
def _fields(cls) -> dict[str, _Field]:
    """key -> (kind, metadata, default) of one settings dataclass, in declaration order."""
    hints = typing.get_type_hints(cls)  # config.py uses postponed annotations: resolve the strings
    out = {}
    for f in fields(cls):
        kind = typing.get_origin(hints[f.name]) or hints[f.name]
        if kind not in _NOUNS:
            raise TypeError(f"{cls.__name__}.{f.name}: recipe keys must be int, float, bool, str "
                            f"or list, not {hints[f.name]}")
        default = f.default if f.default_factory is MISSING else f.default_factory()
        args = typing.get_args(hints[f.name])
        out[f.name] = _Field(kind, f.metadata, default, args[0] if args else float)
    return out


# ---- reading -------------------------------------------------------------------------------------

def load_recipe(path: str | Path, overrides: Iterable[str] = ()) -> Recipe:
    """Read, check and return the recipe at `path`, with `--set section.key=value` overrides.

    Keys a recipe leaves out take their defaults. Overrides are applied in order, after the file,
    and checked the same way; relations between keys are checked once everything is applied, and
    the error names the file or the override that set the offending key last.
    """
    path = Path(path)
    origin = str(path)
    values: dict[str, dict[str, Any]] = {name: {} for name in SECTIONS}
    # Who set each key: index into `sources`; 0 (the file) for keys left at their default.
    sources = [origin]
    setter: dict[tuple[str, str], int] = {}

    for name, table in read_toml(path).items():
        if not isinstance(table, dict):
            if name in SECTIONS:
                raise UserError(f"{origin}: {name} = {_show(table)}, expected a table [{name}]")
            raise UserError(f"{origin}: key {name} is outside any table; keys belong in a table "
                            f"(known: {', '.join(SECTIONS)})")
        if name not in SECTIONS:
            raise UserError(f"{origin}: {_unknown('table', name, SECTIONS)}")
        for key, value in table.items():
            values[name][key] = _check(origin, name, key, value)
            setter[(name, key)] = 0

    for item in overrides:
        # repr keeps a pasted newline or tab from splitting the one-line message
        source = f"--set {item if item.isprintable() else repr(item)}"
        name, key, value = _parse_override(source, item)
        values[name][key] = _check(source, name, key, value)
        sources.append(source)
        setter[(name, key)] = len(sources) - 1

    recipe = Recipe(**{name: cls(**values[name]) for name, cls in SECTIONS.items()})

    def blame(*keys: str) -> str:
        return sources[max(setter.get(tuple(k.split(".")), 0) for k in keys)]

    _check_relations(recipe, blame)
    return recipe


def read_toml(path: Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise UserError(f"recipe not found: {path}{_nearby_recipes(path)}") from None
    except IsADirectoryError:
        raise UserError(f"{path}: is a directory, expected a TOML recipe file") from None
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 text (byte {e.start})") from None
    except OSError as e:
        raise UserError(f"{path}: cannot read: {e.strerror}") from None
    except tomllib.TOMLDecodeError as e:
        raise UserError(f"{path}: {_syntax_error(str(e))}") from None


def _nearby_recipes(path: Path) -> str:
    """'; recipes in DIR: a.toml, b.toml' for the folder the user meant (or ./recipes)."""
    for folder in (path.parent, Path("recipes")):
        found = sorted(p.name for p in folder.glob("*.toml")) if folder.is_dir() else []
        if found:
            return f"; recipes in {folder}/: {', '.join(found)}"
    return ""


def _syntax_error(message: str) -> str:
    """tomllib's 'Invalid value (at line 3, column 7)' -> 'TOML syntax error at line 3, ...'."""
    text, sep, where = message.rpartition(" (at ")
    if not sep:
        return f"TOML syntax error: {message}"
    return f"TOML syntax error at {where.rstrip(')')}: {text}"


def _parse_override(source: str, item: str) -> tuple[str, str, Any]:
    """'train.lr=1e-3' -> ('train', 'lr', 0.001); a value that is not TOML is a bare string."""
    dotted, eq, raw = item.partition("=")
    name, dot, key = dotted.strip().partition(".")
    if not eq or not dot or not name or not key:
        raise UserError(f"{source}: expected section.key=value, for example train.steps=100 "
                        f"(tables: {', '.join(SECTIONS)})")
    if name not in SECTIONS:
        raise UserError(f"{source}: {_unknown('table', name, SECTIONS)}")
    raw = raw.strip()
    try:
        parsed = tomllib.loads(f"v = {raw}")
    except tomllib.TOMLDecodeError:
        return name, key, raw
    # "1\nx = 2" parses to two keys: that is text, not one value.
    if list(parsed) != ["v"]:
        return name, key, raw
    value = parsed["v"]
    # A string key only takes strings, so a value that parsed as something else (a date, a number:
    # data.subset=20231101) was meant as the text typed.
    field = _fields(SECTIONS[name]).get(key)  # an unknown key is reported by _check
    if field and field.kind is str and not isinstance(value, str):
        return name, key, raw
    return name, key, value


def _unknown(what: str, name: str, known: Iterable[str]) -> str:
    known = list(known)
    short = name.rpartition(".")[2]
    msg = (f"unknown {what} [{name}]" if what == "table" else f"unknown {what} {name}")
    msg += f" (known: {', '.join(known)})"
    close = difflib.get_close_matches(short, known, n=1)
    if close:
        prefix = name.rpartition(".")[0]
        suggestion = f"{prefix}.{close[0]}" if prefix else close[0]
        msg += f"; did you mean {suggestion}?"
    return msg


def load_table(path: str | Path, name: str, cls):
    """A TOML file holding the one table [name], checked against the dataclass `cls` like a recipe
    table (types, ranges, unknown keys); keys it leaves out take their defaults."""
    origin = str(path)
    data = read_toml(Path(path))
    extra = [key for key in data if key != name]
    if extra or not isinstance(data.get(name, {}), dict):
        raise UserError(f"{origin}: unexpected {extra[0] if extra else name + ' value'}; expected "
                        f"only the table [{name}]")
    return cls(**{key: _check(origin, name, key, value, cls)
                  for key, value in data.get(name, {}).items()})


def _check(source: str, name: str, key: str, value: Any, cls=None) -> Any:
    """One value against the type and range of its field; returns it converted (int -> float)."""
    known = _fields(cls or SECTIONS[name])
    if key not in known:
        raise UserError(f"{source}: {_unknown('key', f'{name}.{key}', known)}")
    f = known[key]
    converted = _convert(f.kind, value, f.item)
    if converted is None or not _in_range(f, converted):
        raise UserError(f"{source}: {name}.{key} = {_show(value)}, expected {_expected(f)}")
    if (name, key) in PATH_KEYS and _looks_like_path(converted):
        if not Path(converted).expanduser().exists():
            raise UserError(f"{source}: {name}.{key} = {_show(value)}: no such file or directory")
    return converted


def _convert(kind: type, value: Any, item: type = float) -> Any:
    """The value as `kind`, or None when TOML gave the wrong type (bools are not numbers)."""
    if kind is bool or kind is str:
        return value if isinstance(value, kind) else None
    if kind is int:
        return value if isinstance(value, int) and not isinstance(value, bool) else None
    if kind is float:
        return _number(value)
    if not isinstance(value, list):
        return None
    if item is str:
        return value if all(isinstance(v, str) for v in value) else None
    if item is int:
        return value if all(_convert(int, v) is not None for v in value) else None
    numbers = [_number(v) for v in value]
    return None if any(v is None for v in numbers) else numbers


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    try:
        x = float(value)
    except OverflowError:  # a TOML integer beyond float range
        return None
    return x if math.isfinite(x) else None


def _in_range(f: _Field, value: Any) -> bool:
    choices = f.meta.get("choices")
    if choices and f.kind is list:  # a list of strings, each one of the choices
        return all(v in choices for v in value)
    if choices and value not in choices:
        return False
    if f.kind is list:
        return f.item is str or all(_number_in_range(f.meta, x) for x in value)
    if f.kind in (int, float):
        return _number_in_range(f.meta, value)
    return True


def _number_in_range(meta: typing.Mapping[str, Any], x: float) -> bool:
    lo, hi = meta.get("lo"), meta.get("hi")
    if lo is not None and (x <= lo if meta.get("lo_open") else x < lo):
        return False
    return hi is None or x <= hi


def _expected(f: _Field, article: bool = True) -> str:
    """What a key accepts, in words: 'an integer >= 1', 'a number in (0, 1]', 'one of "a", "b"'."""
    choices = f.meta.get("choices")
    if choices:
        each = "a list of strings, each " if f.kind is list else ""
        return f"{each}one of " + ", ".join(_toml_value(c) for c in choices)
    a, noun = f.noun
    text = f"{a} {noun}" if article else noun
    lo, hi = f.meta.get("lo"), f.meta.get("hi")
    if lo is not None and hi is not None:
        return f"{text} in {'(' if f.meta.get('lo_open') else '['}{lo:g}, {hi:g}]"
    if lo is not None:
        return f"{text} {'>' if f.meta.get('lo_open') else '>='} {lo:g}"
    if hi is not None:
        return f"{text} <= {hi:g}"
    return text


def _looks_like_path(value: str) -> bool:
    return value.startswith(_PATH_PREFIXES) or value.endswith(_PATH_SUFFIXES)


def _check_relations(recipe: Recipe, blame) -> None:
    """The checks one key's metadata cannot express."""
    t = recipe.train
    if not t.t_min < t.t_max:
        raise UserError(f"{blame('train.t_min', 'train.t_max')}: train.t_min = {t.t_min!r}, "
                        f"expected a number < train.t_max ({t.t_max!r})")
    if len(t.betas) != 2 or not all(0.0 <= b < 1.0 for b in t.betas):
        raise UserError(f"{blame('train.betas')}: train.betas = {_show(t.betas)}, "
                        f"expected 2 numbers in [0, 1)")
    if recipe.model.causal and recipe.softmask.enabled:
        raise UserError(f"{blame('model.causal', 'softmask.enabled')}: model.causal = true trains an "
                        f"AR model, which has no masks to soften; expected softmask.enabled = false")
    # Whether it divides the per-rank batch depends on the world size: the trainer checks that.
    if t.micro_batch_size > t.batch_size:
        raise UserError(f"{blame('train.micro_batch_size', 'train.batch_size')}: "
                        f"train.micro_batch_size = {t.micro_batch_size}, expected 0 or an integer "
                        f"<= train.batch_size ({t.batch_size})")


# ---- writing -------------------------------------------------------------------------------------

def dump_recipe(recipe: Recipe, header: str = "") -> str:
    """The whole recipe as TOML: every table and key, each key under a '# doc' comment line.

    `header` (plain text, may span lines) is written first as comment lines, for example the
    command that runs the recipe. `load_recipe` reads the text back to an equal `Recipe`.
    """
    lines = [f"# {line}".rstrip() for line in header.splitlines()]
    for name, cls in SECTIONS.items():
        if lines:
            lines.append("")
        lines.append(f"[{name}]")
        section = getattr(recipe, name)
        for key, f in _fields(cls).items():
            lines.extend(f"# {line}" for line in f.meta.get("doc", "").splitlines())
            lines.append(f"{key} = {_toml_value(getattr(section, key))}")
    return "\n".join(lines) + "\n"


def recipe_docs() -> str:
    """docs/recipes.md: the Markdown reference of every table and key (type and range, default, doc).

    Regenerate the file with `python -c "import smdlm_cli.recipe as r; print(r.recipe_docs(), end='')" > docs/recipes.md`.
    """
    out = ["# Recipe reference", "",
           "Every key a recipe may set, with its type or allowed values and its default. Generated from",
           "the settings dataclasses in `smdlm_cli/core/config.py` by `smdlm_cli.recipe.recipe_docs`; a",
           "test fails when this file and the code disagree.", ""]
    for name, cls in SECTIONS.items():
        out += [f"### [{name}]", "", "| key | type | default | description |", "|---|---|---|---|"]
        for key, f in _fields(cls).items():
            cells = (f"`{key}`", _expected(f, article=False), f"`{_toml_value(f.default)}`",
                     f.meta.get("doc", ""))
            out.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
        out.append("")
    return "\n".join(out)


_ESCAPES = {'"': '\\"', "\\": "\\\\", "\b": "\\b", "\t": "\\t", "\n": "\\n", "\f": "\\f",
            "\r": "\\r"}


def _toml_value(value: Any) -> str:
    """A Python value as a TOML value: bool, int, float (repr, exact), str, list of those."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)  # shortest text that reads back to the same float; always has . or e
    if isinstance(value, str):
        chars = (_ESCAPES.get(c) or (f"\\u{ord(c):04x}" if ord(c) < 0x20 or ord(c) == 0x7F else c)
                 for c in value)
        return '"' + "".join(chars) + '"'
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {type(value).__name__} as a TOML value: {value!r}")


def _show(value: Any) -> str:
    """A value as the user wrote it, for messages; TOML values outside _toml_value (dates, tables)
    fall back to str."""
    try:
        return _toml_value(value)
    except TypeError:
        return str(value)
