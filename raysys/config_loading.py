"""Reading configs: YAML with each key's line, `key=value` overrides, type checks.

Every error names where the value came from (file and line, or the override) and the key.
"""

from __future__ import annotations

import difflib
from pathlib import Path
import dataclasses
from dataclasses import fields
from typing import Any, get_args, get_origin, get_type_hints

import yaml

from raysys.errors import ConfigError


class Origins:
    """Where each dotted key was set: a line of the YAML file or a command-line override."""

    def __init__(self, source: str, lines: dict[str, int] | None = None):
        self.source = source
        self.lines = lines or {}
        self.overrides: dict[str, str] = {}

    def where(self, key: str) -> tuple[str, int | None]:
        parts = key.split(".")
        for n in range(len(parts), 0, -1):  # the key itself, else its nearest section
            prefix = ".".join(parts[:n])
            if prefix in self.overrides:
                return f"override {self.overrides[prefix]!r}", None
            if prefix in self.lines:
                return self.source, self.lines[prefix]
        return self.source, None


def read_yaml(path: Path) -> tuple[dict[str, Any], Origins]:
    hint_syntax = "fix the YAML syntax: indentation, ':' after keys, closed quotes and brackets"
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError("config file not found", file=str(path),
                          hint="check the --config path, e.g. configs/local.yaml") from None
    except UnicodeDecodeError as exc:
        data = path.read_bytes()
        line = data[:exc.start].count(b"\n") + 1
        column = exc.start - (data.rfind(b"\n", 0, exc.start) + 1) + 1
        raise ConfigError(f"not UTF-8: invalid byte 0x{data[exc.start]:02x} at column {column}", file=str(path),
                          line=line, hint="save the config as UTF-8") from None
    except OSError as exc:
        raise ConfigError(f"cannot read the config file: {exc.strerror}", file=str(path),
                          hint="--config must name a readable YAML file") from None
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        problem = getattr(exc, "problem", None) or str(exc)
        context = getattr(exc, "context", None)
        message = "not valid YAML" + (f" at column {mark.column + 1}" if mark is not None else "")
        message += ": " + (f"{problem}, {context}" if context else problem)
        raise ConfigError(message, file=str(path), line=mark.line + 1 if mark is not None else None,
                          hint=hint_syntax) from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"the top level is a {type(raw).__name__}, not a mapping of sections",
                          file=str(path), line=1, hint="write e.g. 'train:' then '  alpha: 0.5' on the next line")
    lines: dict[str, int] = {}
    if isinstance(node, yaml.MappingNode):
        key_lines(node, "", lines, str(path))
    return raw, Origins(str(path), lines)


def key_lines(node: yaml.MappingNode, prefix: str, lines: dict[str, int], file: str) -> None:
    """1-based line of every dotted key; a key repeated in one mapping is an error (YAML would
    silently keep the last one)."""
    for key_node, value_node in node.value:
        if not isinstance(key_node, yaml.ScalarNode):
            continue
        key = prefix + key_node.value
        line = key_node.start_mark.line + 1
        if key in lines:
            raise ConfigError(f"duplicate key (first on line {lines[key]})", file=file, line=line, field=key,
                              hint="keep one of them")
        lines[key] = line
        if isinstance(value_node, yaml.MappingNode):
            key_lines(value_node, key + ".", lines, file)


def build(cls, raw: dict[str, Any], origins: Origins, prefix: str):
    section = prefix.rstrip(".")
    if not isinstance(raw, dict):
        file, line = origins.where(section)
        raise ConfigError(f"expected a mapping of keys, got {type(raw).__name__} {raw!r:.40}", file=file, line=line,
                          field=section, hint=f"write '{section}:' then indented 'key: value' lines")
    hints = get_type_hints(cls)
    known = {f.name for f in fields(cls)}
    for name in raw:
        if name not in known:
            key = f"{prefix}{name}"
            file, line = origins.where(key)
            close = difflib.get_close_matches(str(name), sorted(known), n=1)
            hint = (f"did you mean '{prefix}{close[0]}'?" if close else
                    f"known keys{' in ' + repr(section) if section else ''}: {', '.join(sorted(known))}")
            raise ConfigError("unknown key", file=file, line=line, field=key, hint=hint)
    kwargs = {}
    for f in fields(cls):
        if f.name not in raw:
            continue
        value, hint = raw[f.name], hints[f.name]
        if dataclasses.is_dataclass(hint):
            kwargs[f.name] = build(hint, value, origins, prefix + f.name + ".")
        else:
            kwargs[f.name] = coerce(value, hint, prefix + f.name, origins)
    return cls(**kwargs)


def type_name(hint: Any) -> str:
    args = [a for a in get_args(hint) if a is not type(None)]
    target = args[0] if args else hint
    if get_origin(target) is list:
        return f"a list of {type_name(get_args(target)[0])}s"
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(target, str(target))


def coerce(value: Any, hint: Any, key: str, origins: Origins) -> Any:
    """Check (and gently convert) a YAML value against the dataclass field's type."""
    def wrong(expected: str, extra: str = "") -> ConfigError:
        file, line = origins.where(key)
        return ConfigError(f"expected {expected}, got {type(value).__name__} {value!r:.40}{extra}",
                           file=file, line=line, field=key, hint=f"set {key} to {type_name(hint)}")

    args = [a for a in get_args(hint) if a is not type(None)]
    if value is None:
        if type(None) in get_args(hint):
            return None
        file, line = origins.where(key)
        raise ConfigError("may not be null", file=file, line=line, field=key,
                          hint=f"set {key} to {type_name(hint)}, or delete the line for the default")
    if get_origin(hint) is list or (args and get_origin(args[0]) is list):
        inner = get_args(args[0] if args and get_origin(args[0]) is list else hint)[0]
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise wrong("a list")
        return [coerce(v, inner, key, origins) for v in value]
    target = args[0] if args else hint
    if target is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise wrong("true or false")
    if target in (int, float):
        if isinstance(value, bool) or isinstance(value, (list, dict)):
            raise wrong(type_name(target))
        try:
            number = float(value) if target is float else int(str(value))
        except (TypeError, ValueError):
            raise wrong(type_name(target)) from None
        return number
    if target is str:
        if isinstance(value, (list, dict)):
            raise wrong("a string")
        return str(value)
    return value


def apply_override(raw: dict[str, Any], item: str, origins: Origins | None = None) -> None:
    """Apply one `section.key=value` override; the value is parsed as YAML (so 0.5, true, [a,b])."""
    where = f"override {item!r}"
    if "=" not in item:
        raise ConfigError("expected section.key=value", file=where,
                          hint="write e.g. train.alpha=0.5, with no spaces around '='")
    key, text = item.split("=", 1)
    key = key.strip()
    parts = key.split(".")
    if not key or any(not part for part in parts):
        raise ConfigError("empty key", file=where, hint="write e.g. train.alpha=0.5")
    try:
        value = yaml.safe_load(text) if text else ""
    except yaml.YAMLError:
        value = text
    node = raw
    for depth, part in enumerate(parts[:-1]):
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError("is not a section", file=where, field=".".join(parts[:depth + 1]),
                              hint="overrides look like section.key=value")
    node[parts[-1]] = value
    if origins is not None:
        origins.overrides[key] = item
