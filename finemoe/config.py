"""Typed, self-validating configuration.

Every config in finemoe is a plain dataclass. ``from_dict`` builds one from YAML-like
data and checks every key and every type on the way, so that a mistake is reported
as one line naming the field::

    model.ffn.num_experts_per_tok: 9 is larger than model.ffn.num_experts (8)

A dataclass validates its own values in ``__post_init__`` by raising ``ConfigError``
with the field name; ``from_dict`` prefixes the path of the enclosing configs.

Polymorphic fields (an FFN config chosen by its ``kind``) are resolved through the
hook ``resolve_subclass(data, path)`` on the declared base class.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from finemoe.errors import InputError

__all__ = [
    "ConfigError",
    "check",
    "from_dict",
    "to_dict",
    "load_yaml",
    "apply_overrides",
    "parse_override_value",
]


class ConfigError(InputError):
    """A bad configuration value. ``field`` is the dotted path of the culprit."""

    def __init__(self, field: str, reason: str):
        self.field = field
        self.reason = reason
        super().__init__(f"{field}: {reason}" if field else reason)

    def under(self, prefix: str) -> "ConfigError":
        """The same error, seen from an enclosing config whose path is ``prefix``."""
        if not prefix:
            return self
        return ConfigError(f"{prefix}.{self.field}" if self.field else prefix, self.reason)


def check(condition: bool, field: str, reason: str) -> None:
    """Raise ``ConfigError(field, reason)`` unless ``condition`` holds."""
    if not condition:
        raise ConfigError(field, reason)


def _join(path: str, key: str | int) -> str:
    if isinstance(key, int):
        return f"{path}[{key}]"
    return f"{path}.{key}" if path else key


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is list:
        (inner,) = typing.get_args(tp) or (Any,)
        return f"list[{_type_name(inner)}]"
    if origin is dict:
        return "mapping"
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, path: str) -> Any:
    """Check ``value`` against the type hint ``tp``; return it, converted where lossless."""
    if tp is Any:
        return value
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None:
            if type(None) in args:
                return None
            raise ConfigError(path, f"must be {_type_name(tp)}, got null")
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, path)
            except ConfigError as err:
                errors.append(err)
        # One candidate type: its error is the most helpful one.
        if len(errors) == 1:
            raise errors[0]
        raise ConfigError(path, f"must be {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            raise ConfigError(path, f"must be one of {', '.join(repr(a) for a in allowed)}; got {value!r}")
        return value
    if origin is list:
        (inner,) = typing.get_args(tp) or (Any,)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(path, f"must be a list, got {value!r}")
        return [_coerce(v, inner, _join(path, i)) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(path, f"must be a mapping, got {value!r}")
        return dict(value)
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(path, f"must be a mapping of {tp.__name__} fields, got {value!r}")
        return from_dict(tp, value, path)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(path, f"must be true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(path, f"must be an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            # PyYAML reads "3e-4" (no dot) as a string; accept what float() accepts.
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(path, f"must be a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(path, f"must be a string, got {value!r}")
    raise TypeError(f"finemoe.config cannot check type {tp!r} (field {path})")


def from_dict(cls: type, data: dict[str, Any] | None, path: str = "") -> Any:
    """Build the dataclass ``cls`` from ``data``, checking keys, types and values."""
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise ConfigError(path, f"must be a mapping, got {data!r}")
    resolve = getattr(cls, "resolve_subclass", None)
    if resolve is not None:
        cls, data = resolve(data, path)
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    kwargs = {}
    for key, value in data.items():
        if key not in fields:
            close = difflib.get_close_matches(str(key), list(fields), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ConfigError(_join(path, key), f"unknown key for {cls.__name__}{hint}")
        kwargs[key] = _coerce(value, hints[key], _join(path, key))
    required = [name for name, f in fields.items()
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    for name in required:
        if name not in kwargs:
            raise ConfigError(_join(path, name), f"is required ({cls.__name__} needs {', '.join(required)})")
    try:
        return cls(**kwargs)
    except ConfigError as err:
        raise err.under(path) from None


def to_dict(config: Any) -> Any:
    """A plain, YAML-serialisable view of a config (polymorphic configs keep their ``kind``)."""
    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        out: dict[str, Any] = {}
        kind = getattr(type(config), "kind", None)
        if isinstance(kind, str):
            out["kind"] = kind
        for f in dataclasses.fields(config):
            if f.init:
                out[f.name] = to_dict(getattr(config, f.name))
        return out
    if isinstance(config, (list, tuple)):
        return [to_dict(v) for v in config]
    if isinstance(config, dict):
        return {k: to_dict(v) for k, v in config.items()}
    return config


def load_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError("", f"config file {str(path)!r} does not exist")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as err:
        raise ConfigError("", f"{path} is not a YAML text file (not UTF-8 at byte {err.start})") from None
    except yaml.YAMLError as err:
        raise ConfigError("", f"{path} is not valid YAML: {err}".replace("\n", " ")) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError("", f"{path} must hold a mapping at the top level")
    return data


def parse_override_value(text: str) -> Any:
    """``"8"`` → 8, ``"3e-4"`` → 3e-4, ``"[1, 3]"`` → [1, 3], ``"moe"`` → "moe"."""
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    if isinstance(value, str):
        try:
            return float(value) if any(c in value for c in ".eE") else int(value)
        except ValueError:
            return value
    return value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``a.b.c=value`` overrides to nested dict data (in place; also returned).

    A list element is addressed by its index: ``model.ffn_layers.0.ffn.kind=moe``.
    Changing a section's ``kind`` replaces the section (its old fields belong to the
    old kind), as a preset's ``base:`` does; ``kind`` overrides are applied first, so
    ``model.ffn.num_experts=4 model.ffn.kind=moe`` means the same in either order.
    """
    parsed = []
    for item in overrides:
        if "=" not in item:
            raise ConfigError(item, "an override must look like key.path=value")
        dotted, _, raw = item.partition("=")
        keys = dotted.strip().split(".")
        if not all(keys):
            raise ConfigError(dotted, "empty key in override path")
        parsed.append((dotted, keys, raw))
    parsed.sort(key=lambda entry: entry[1][-1] != "kind")  # stable: kinds first, otherwise as given
    for dotted, keys, raw in parsed:
        node: Any = data
        for depth, key in enumerate(keys[:-1]):
            where = ".".join(keys[: depth + 1])
            if isinstance(node, list):
                if not key.isdigit() or int(key) >= len(node):
                    raise ConfigError(where, f"no list element {key} (the list has {len(node)})")
                node = node[int(key)]
            else:
                node = node.setdefault(key, {})
                if not isinstance(node, (dict, list)):
                    raise ConfigError(where, f"is a value ({node!r}), not a section")
        last, value = keys[-1], parse_override_value(raw)
        if isinstance(node, list):
            if not last.isdigit() or int(last) >= len(node):
                raise ConfigError(dotted, f"no list element {last} (the list has {len(node)})")
            node[int(last)] = value
        else:
            if last == "kind" and node.get("kind", value) != value:
                node.clear()
            node[last] = value
    return data
