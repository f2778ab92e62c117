"""One config loader for every command: a YAML or TOML file, ``--set key=value`` flags on top, each
value checked against its dataclass field (nanoGPT's ``configurator.py``: unknown keys refused, an
override must have its field's type).

Used by ``featcache extract`` (the file), ``featcache train`` and ``featcache featsharp train``.

``--set`` takes a dotted key (``optim.lr``; a flat config has no dots) and a value read as a TOML
literal (``3e-4``, ``[0.5, 1.0]``, ``"base"``, ``{name="a", low="a@64"}``), else as JSON (``null``, and
the JSON values ``featsharp train --set`` took before), else as the bare text (a string: ``device=cuda``).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import tomllib
import typing

from featcache.errors import UsageError
from featcache.typecheck import describe, fits


def read(path: str) -> dict:
    """The mapping in config file ``path`` (``.toml``, ``.yaml`` or ``.yml``), refused in one line when
    it is missing, of another kind, or not valid."""
    path = str(path)
    if not os.path.isfile(path):
        raise UsageError(f"no such config file: {path}")
    with open(path, "rb") as f:
        raw = f.read()
    try:
        if path.endswith(".toml"):
            return tomllib.loads(raw.decode())
        if path.endswith((".yaml", ".yml")):
            import yaml

            data = yaml.safe_load(raw)
            return {} if data is None else data
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise UsageError(f"{path} is not valid TOML: {e}") from None
    except Exception as e:  # yaml.YAMLError and its subclasses
        if type(e).__module__.startswith("yaml"):
            raise UsageError(f"{path} is not valid YAML: {str(e).splitlines()[0]}") from None
        raise
    raise UsageError(f"{path}: config files are .toml, .yaml or .yml")


def parse_value(text: str):
    """A ``--set`` value: a TOML literal, else JSON, else the text itself (a bare word is a string)."""
    text = text.strip()
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        pass
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def apply_overrides(d: dict, items: list[str]) -> dict:
    """``d`` with each ``key=value`` of ``items`` set in it (a dotted key goes into its table)."""
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise UsageError(f"--set {item!r}: expected key=value, e.g. optim.lr=3e-4")
        *path, last = key.strip().split(".")
        node = d
        for part in path:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise UsageError(f"--set {item!r}: {part} is not a section")
        node[last] = parse_value(text)
    return d


def check_keys(cls, value, where: str) -> None:
    """Refuse a ``value`` that is not a mapping, has a key that is no field of dataclass ``cls`` (the
    known ones listed) or lacks a field without a default."""
    if not isinstance(value, dict):
        raise UsageError(f"{where} must be a table, not {type(value).__name__}")
    fields = dataclasses.fields(cls)
    unknown = sorted(set(value) - {f.name for f in fields})
    if unknown:
        raise UsageError(f"{where}: unknown key(s) {', '.join(unknown)}; known: "
                         f"{', '.join(sorted(f.name for f in fields))}")
    missing = [f.name for f in fields if f.name not in value and f.default is dataclasses.MISSING
               and f.default_factory is dataclasses.MISSING]
    if missing:
        raise UsageError(f"{where}: missing key(s) {', '.join(missing)}")


def typed(cls, name: str, value, where: str):
    """``value`` when it has the type of field ``name`` of dataclass ``cls``, else a UsageError naming
    the key, the value and the type."""
    hint = typing.get_type_hints(cls)[name]
    if not fits(value, hint):
        raise UsageError(f"{where}: {misfit_text(name, value, hint)}")
    return value


def misfit(obj) -> str | None:
    """The first field of dataclass instance ``obj`` whose value is not of its type, worded as
    :func:`typed` words it; None when every one fits."""
    for name, hint in typing.get_type_hints(type(obj)).items():
        if not fits(getattr(obj, name), hint):
            return misfit_text(name, getattr(obj, name), hint)
    return None


def misfit_text(name: str, value, hint) -> str:
    """``steps = 'five' is not an int``: the key, the value and the type it should have."""
    shown = str(value) if isinstance(value, float) and not math.isfinite(value) else repr(value)
    return f"{name} = {shown} is not {describe(hint)}"


def build(cls, value, where: str):
    """An instance of dataclass ``cls`` from a mapping, its keys and the type of each value checked."""
    check_keys(cls, value, where)
    value = {k: typed(cls, k, v, where) for k, v in value.items()}
    try:
        return cls(**value)
    except (TypeError, ValueError) as e:
        raise UsageError(f"{where}: {e}") from None


def plain(x):
    """``x`` as TOML can hold it: tuples as lists, None values (absent: the default) left out."""
    if isinstance(x, tuple):
        return [plain(v) for v in x]
    if isinstance(x, list):
        return [plain(v) for v in x]
    if isinstance(x, dict):
        return {k: plain(v) for k, v in x.items() if v is not None}
    return x


def to_toml(d: dict) -> str:
    """TOML text of a config dict (scalars, lists, tables, arrays of tables: all a config holds; None
    values left out, so that they read back as their default)."""
    d = plain(d)
    lines = [f"{k} = {_value(v)}" for k, v in d.items() if not isinstance(v, (dict, list)) or
             (isinstance(v, list) and not (v and isinstance(v[0], dict)))]
    for k, v in d.items():
        if isinstance(v, dict):
            lines += ["", f"[{k}]"] + [f"{kk} = {_value(vv)}" for kk, vv in v.items()]
        elif isinstance(v, list) and v and isinstance(v[0], dict):
            for item in v:
                lines += ["", f"[[{k}]]"] + [f"{kk} = {_value(vv)}" for kk, vv in item.items()]
    return "\n".join(lines) + "\n"


def _value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(v, list):
        return "[" + ", ".join(_value(x) for x in v) + "]"
    if isinstance(v, dict):  # an inline table, as train's loss.terms = {"tv" = 0.1}
        return "{" + ", ".join(f"{_value(str(k))} = {_value(x)}" for k, x in v.items()) + "}"
    raise TypeError(f"cannot write {type(v).__name__} to TOML")
