"""A strict loader for dataclass schemas: unknown keys, wrong types and bad values are errors.

Used for train.json (utils/run/config.py) and optimizer.json (optimizer/config.py). A field is declared with
`doc(default, help, ...)`; the help text feeds `--help` and the generated doc/CONFIG.md.

null: EveryDream2's shipped train.json writes null for "not set" (e.g. "ema_device": null), so a null for a key
whose type has no null takes that key's default. Where the type includes null, null keeps its own meaning (the
field's `null` text, shown in the generated docs). Floats must be finite: Python's json module reads NaN and
Infinity, and such a value would only fail once the model is loaded.
"""
from __future__ import annotations

import codecs
import dataclasses
import difflib
import json
import math
import types
import typing
from pathlib import Path
from typing import Any, Literal, Union


class ConfigError(Exception):
    """A problem in the user's configuration; the message names the key or file and the fix."""


def doc(default: Any, help: str, *, minimum: float | None = None, maximum: float | None = None,
        null: str | None = None, allow_infinity: bool = False, alias_of: str | None = None) -> Any:
    """A dataclass field with its help text and optional numeric bounds (inclusive). `null`: what a null means,
    for a field whose type includes None. `allow_infinity`: a float field where Infinity means "unlimited"."""
    meta = {"help": help, "minimum": minimum, "maximum": maximum, "null": null, "allow_infinity": allow_infinity}
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda d=default: json.loads(json.dumps(d)), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def did_you_mean(name: str, candidates: typing.Iterable[str]) -> str:
    close = difflib.get_close_matches(name, list(candidates), n=1, cutoff=0.6)
    return f" (did you mean {close[0]}?)" if close else ""


def describe_type(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(json.dumps(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " | ".join(describe_type(a) for a in typing.get_args(tp))
    if origin is list:
        (inner,) = typing.get_args(tp)
        return f"list[{describe_type(inner)}]"
    if origin is dict:
        return "object"
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def check_value(value: Any, tp: Any) -> tuple[bool, Any]:
    """(ok, converted value). No silent coercion: 2.5 is not an int, 1 is not a bool; an int is a float."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return True, value
    if origin is Literal:
        return value in typing.get_args(tp), value
    if origin in (Union, types.UnionType):
        for arg in typing.get_args(tp):
            ok, conv = check_value(value, arg)
            if ok:
                return True, conv
        return False, value
    if origin is list:
        (inner,) = typing.get_args(tp)
        if not isinstance(value, list):
            return False, value
        out = []
        for v in value:
            ok, conv = check_value(v, inner)
            if not ok:
                return False, value
            out.append(conv)
        return True, out
    if origin is dict or tp is dict:
        return isinstance(value, dict), value
    if tp is type(None):
        return value is None, value
    if tp is bool:
        return isinstance(value, bool), value
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if tp is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        return ok, float(value) if ok else value
    if tp is str:
        return isinstance(value, str), value
    return isinstance(value, tp), value


def schema_fields(cls) -> dict[str, tuple[dataclasses.Field, Any]]:
    hints = typing.get_type_hints(cls, include_extras=True)
    return {f.name: (f, hints[f.name]) for f in dataclasses.fields(cls)}


def field_default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    return dataclasses.MISSING


def accepts_null(tp: Any) -> bool:
    """Whether null is a value of this type (and so has a meaning of its own for the key)."""
    return check_value(None, tp)[0]


def null_meaning(f: dataclasses.Field, tp: Any) -> str:
    """What a null does for this field, for the generated docs; a field whose type includes None must say."""
    if not accepts_null(tp):
        return "the default"
    if not f.metadata.get("null"):
        raise ValueError(f"field '{f.name}' accepts null but its doc() has no null= text saying what null means")
    return f.metadata["null"]


def check_fields(cls, raw: dict, source: str, *, ignore: typing.Container[str] = ()) -> tuple[dict, list[str]]:
    """Check raw values against cls's fields. Returns (converted values, problems); unknown keys are problems.
    A null for a key whose type has no null gives the key's default (see the module docstring)."""
    fields = schema_fields(cls)
    values, problems = {}, []
    for key, value in raw.items():
        if key in ignore or key.startswith("_comment"):
            continue
        if key not in fields:
            problems.append(f"{source}: unknown key '{key}'{did_you_mean(key, fields)}")
            continue
        f, tp = fields[key]
        if value is None and not accepts_null(tp):
            # set explicitly, not left out: a null on the command line must still override train.json's value
            values[key] = field_default(f)
            continue
        ok, conv = check_value(value, tp)
        if not ok:
            problems.append(f"{source}: '{key}' must be {describe_type(tp)}, got {json.dumps(value)}")
            continue
        lo, hi = f.metadata.get("minimum"), f.metadata.get("maximum")
        for v in (conv if isinstance(conv, list) else [conv]):
            if isinstance(v, float) and not math.isfinite(v):
                if math.isnan(v) or not f.metadata.get("allow_infinity"):
                    # NaN passes every bound check (all comparisons are false), so it is caught here
                    what = "a number or Infinity" if f.metadata.get("allow_infinity") else "a finite number"
                    problems.append(f"{source}: '{key}' must be {what}, got {json.dumps(v)}")
                    break
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                if (lo is not None and v < lo) or (hi is not None and v > hi):
                    rng = f"at least {lo}" if hi is None else f"at most {hi}" if lo is None else f"in [{lo}, {hi}]"
                    problems.append(f"{source}: '{key}' must be {rng}, got {json.dumps(v)}")
                    break
        values[key] = conv
    return values, problems


# Windows editors (PowerShell's Out-File and `>`, Notepad's "Unicode") write UTF-16 or UTF-32 with a byte-order
# mark; the mark says the encoding for certain, so such a file is read. UTF-32's marks first: they begin with
# UTF-16 LE's.
_BOMS = ((codecs.BOM_UTF32_LE, "utf-32"), (codecs.BOM_UTF32_BE, "utf-32"),
         (codecs.BOM_UTF16_LE, "utf-16"), (codecs.BOM_UTF16_BE, "utf-16"))


def decode_text(data: bytes, path: str | Path) -> str:
    """UTF-8 (with or without a BOM) or BOM-marked UTF-16/32; anything else is a ConfigError saying to save the
    file as UTF-8, with what the bytes look like."""
    encoding = next((enc for bom, enc in _BOMS if data.startswith(bom)), "utf-8-sig")
    # UTF-8 JSON never holds a NUL byte, while UTF-16 text without a mark is full of them (and its ASCII part
    # would even decode as UTF-8, NULs and all, into baffling JSON errors)
    if encoding == "utf-8-sig" and b"\x00" in data:
        raise ConfigError(f"{path}: not UTF-8 text (it looks like UTF-16 without a byte-order mark): save it as "
                          f"UTF-8")
    try:
        return data.decode(encoding)
    except UnicodeDecodeError as e:
        if encoding != "utf-8-sig":
            raise ConfigError(f"{path}: not valid {encoding.upper()} text despite its byte-order mark: save it as "
                              f"UTF-8") from None
        line = data.count(b"\n", 0, e.start) + 1
        column = e.start - (data.rfind(b"\n", 0, e.start) + 1) + 1
        raise ConfigError(f"{path}: not UTF-8 text (byte 0x{data[e.start]:02x} at line {line}, column {column}; "
                          f"perhaps Latin-1 / Windows-1252): save it as UTF-8") from None


def read_json(path: str | Path, what: str) -> dict:
    """Read a JSON object; a missing file, text that is not UTF-8 or malformed JSON is a ConfigError naming the
    file (with line and column where there is one)."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"{what} not found: {path}") from None
    except OSError as e:
        raise ConfigError(f"cannot read {what} {path}: {e.strerror}") from None
    text = decode_text(data, path)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: invalid JSON at line {e.lineno}, column {e.colno}: {e.msg}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a JSON object at the top level")
    return data


def to_jsonable(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj):
        return {f.name: to_jsonable(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_jsonable(v) for k, v in obj.items()}
    return obj
