"""YAML -> typed dataclasses, with unknown keys and wrong types rejected by name.

Used by every config that a user writes (dataset settings, recipes). An error names the file, the
dotted key, what was found and the fix, e.g.::

    recipe.yaml: experts.high_noise.lora.rnak is not a known key; did you mean 'rank'?
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")

# YAML 1.1 (PyYAML) readings a user does not expect, and what to write instead: exponent numbers without a dot
# ('1e-4', '5E3') are text (its floats need a dot and a signed exponent: 1.0e-4, 5.0E+3); unquoted yes / no /
# on / off are booleans; and the word none is text, not null.
_EXPONENT_TEXT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")
_BOOLEAN_HINT = "; YAML reads an unquoted yes / no / on / off / true / false as a boolean: write the value in quotes"
_NULL_WORDS = ("none", "no", "off")


def _exponent_hint(text: str, whole: bool) -> str:
    """'' unless `text` is an exponent number YAML read as text; then its spelling that YAML reads as a number."""
    if not _EXPONENT_TEXT.fullmatch(text):
        return ""
    if whole:
        value = float(text)
        if not value.is_integer():
            return ""
        spelled = str(int(value))
    else:  # the user's digits: 1e-4 -> 1.0e-4, 5E3 -> 5.0E+3
        mantissa, mark, exponent = re.split(r"([eE])", text)
        mantissa = mantissa if "." in mantissa else mantissa + ".0"
        mantissa = re.sub(r"^([-+]?)\.", r"\g<1>0.", mantissa)
        spelled = f"{mantissa}{mark}{exponent if exponent[0] in '+-' else '+' + exponent}"
    return f"; YAML reads {text} as text (its exponent numbers need a dot and a signed exponent): write {spelled}"


class ConfigError(ValueError):
    """A user config is wrong; the message says where and how to fix it."""


def load_yaml(path: str | Path) -> dict:
    """Read a YAML mapping; a syntax error or a non-mapping top level is a ConfigError naming the file."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: file not found") from None
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(err, "problem", None) or str(err)
        raise ConfigError(f"{path}:{where} invalid YAML: {problem}") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of keys, found {type(raw).__name__}")
    return raw


def from_dict(cls: type[T], raw: Any, where: str = "") -> T:
    """Build dataclass `cls` from a mapping, recursively; `where` prefixes error messages ('recipe.yaml: model')."""
    return _convert(cls, raw, where)


def _convert(tp: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp):
        return _convert_dataclass(tp, value, where)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(arg, value, where)
            except ConfigError as err:
                errors.append(str(err))
        message = errors[0] if len(errors) == 1 else f"{where}: {value!r} matches none of {_name(tp)}"
        if type(None) in args and (value is False or str(value).strip().lower() in _NULL_WORDS):
            message += "; for no value write null (or leave the key out)"
        raise ConfigError(message)
    if origin is typing.Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            raise ConfigError(f"{where}: {value!r} is not allowed; choose one of {', '.join(map(repr, allowed))}"
                              + (_BOOLEAN_HINT if isinstance(value, bool) else ""))
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list ({_name(tp)}), found {type(value).__name__} {value!r}")
        args = typing.get_args(tp)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise ConfigError(f"{where}: expected {len(args)} items ({_name(tp)}), found {len(value)}")
            return tuple(_convert(a, v, f"{where}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
        item = args[0] if args else Any
        items = [_convert(item, v, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, found {type(value).__name__} {value!r}")
        kt, vt = typing.get_args(tp) or (Any, Any)
        return {_convert(kt, k, f"{where}"): _convert(vt, v, f"{where}.{k}") for k, v in value.items()}
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            hint = _exponent_hint(value, whole=False) if isinstance(value, str) else ""
            raise ConfigError(f"{where}: expected a number, found {type(value).__name__} {value!r}{hint}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            hint = _exponent_hint(value, whole=True) if isinstance(value, str) else ""
            raise ConfigError(f"{where}: expected a whole number, found {type(value).__name__} {value!r}{hint}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, found {type(value).__name__} {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            hint = (_BOOLEAN_HINT if isinstance(value, bool) else
                    "; write the value in quotes to keep it as text" if isinstance(value, (int, float)) else "")
            raise ConfigError(f"{where}: expected text, found {type(value).__name__} {value!r}{hint}")
        return value
    if tp is Path:
        if not isinstance(value, (str, Path)):
            raise ConfigError(f"{where}: expected a path, found {type(value).__name__} {value!r}")
        return Path(value)
    raise TypeError(f"{where}: typed_config cannot convert to {tp!r}")


def _convert_dataclass(cls: type, value: Any, where: str) -> Any:
    if isinstance(value, cls):
        return value
    if value is None:
        value = {}
    if not isinstance(value, dict):
        raise ConfigError(f"{where or cls.__name__}: expected a mapping of keys, found {type(value).__name__} {value!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = [k for k in value if k not in fields]
    if unknown:
        key = unknown[0]
        close = difflib.get_close_matches(str(key), list(fields), n=1, cutoff=0.5)
        hint = f"did you mean {close[0]!r}?" if close else f"valid keys: {', '.join(fields)}"
        raise ConfigError(f"{_join(where, key)} is not a known key; {hint}")
    kwargs = {name: _convert(hints[name], value[name], _join(where, name)) for name in fields if name in value}
    missing = [n for n, f in fields.items() if n not in kwargs
               and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:
        raise ConfigError(f"{_join(where, missing[0])} is required (type {_name(hints[missing[0]])})")
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as err:
        if isinstance(err, ConfigError):
            raise
        raise ConfigError(f"{where or cls.__name__}: {err}") from None


def _join(where: str, key: str) -> str:
    if not where:
        return str(key)
    if where.endswith((".yaml", ".yml", ".json")):
        return f"{where}: {key}"
    return f"{where}.{key}"


def _name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")
