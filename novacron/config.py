"""Layered configuration: dataclass schema <- TOML file <- environment <- flags.

Every daemon and the CLI describe their settings as (nested) dataclasses. A
bad value anywhere produces one :class:`ConfigError` line that names the
source (file, environment variable or flag), the key and the problem.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import tomllib
import types
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")

DEFAULTS = "settings"  # the source named for a value nobody set


class ConfigError(Exception):
    """A configuration value is missing, unknown or of the wrong type."""

    def __init__(self, source: str, key: str, problem: str) -> None:
        self.source, self.key, self.problem = source, key, problem
        super().__init__(f"{source}: key '{key}': {problem}")


class Invalid(ValueError):
    """Raised by a settings check: the value of ``key`` (dotted) cannot work.

    ``load`` turns it into a :class:`ConfigError` naming where that value came from.
    """

    def __init__(self, key: str, problem: str) -> None:
        self.key, self.problem = key, problem
        super().__init__(f"{key}: {problem}")


MIN_SECRET_LENGTH = 16  # tokens and shared secrets: shorter ones can be guessed


def check_secret(cfg: object, key: str, *, required: str = "") -> None:
    """A settings check: ``cfg.<key>`` is a token or secret of at least MIN_SECRET_LENGTH characters.

    ``required`` is the hint shown when it is empty (it may then be left unset when '').
    """
    value = getattr(cfg, key)
    if not value:
        if required:
            raise Invalid(key, f"required ({required})")
        return
    if len(value) < MIN_SECRET_LENGTH:
        raise Invalid(key, f"too short: at least {MIN_SECRET_LENGTH} characters, got {len(value)} "
                           "(e.g. from `openssl rand -hex 16`)")


def check_port(cfg: object, key: str) -> None:
    """A settings check: ``cfg.<key>`` is a TCP port, 0 meaning any free one."""
    if not 0 <= getattr(cfg, key) <= 65535:
        raise Invalid(key, "expected a port number 0..65535")


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _is_section(tp: Any) -> bool:
    return dataclasses.is_dataclass(tp) and isinstance(tp, type)


def _coerce(tp: Any, value: Any, *, from_text: bool) -> Any:
    """Convert ``value`` to ``tp``; raise ValueError with a readable reason."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        optional = len(args) != len(typing.get_args(tp))
        if optional and (value is None or (from_text and value == "")):
            return None
        return _coerce(args[0], value, from_text=from_text)
    if origin is list:
        (item,) = typing.get_args(tp) or (str,)
        if from_text and isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list):
            raise ValueError(f"expected a list, got {value!r}")
        return [_coerce(item, v, from_text=from_text) for v in value]
    if tp is Any:  # checked by the setting's own check (e.g. an inner table of options)
        if from_text:
            raise ValueError(f"expected JSON, got {value!r}")
        return value
    if origin is dict:  # a [section] of name = value pairs, or "a=x,b=y" as text
        key_tp, value_tp = typing.get_args(tp) or (str, str)
        if from_text and isinstance(value, str) and value.lstrip().startswith("{"):
            try:  # nested tables come as JSON in the environment and flags
                value = json.loads(value)
            except json.JSONDecodeError as exc:
                raise ValueError(f"invalid JSON: {exc}") from None
            from_text = False
        if from_text and isinstance(value, str):
            pairs = [p.partition("=") for p in value.split(",") if p.strip()]
            if any(not sep for _k, sep, _v in pairs):
                raise ValueError(f"expected name=value pairs separated by ',', got {value!r}")
            value = {k.strip(): v.strip() for k, _sep, v in pairs}
        if not isinstance(value, dict):
            raise ValueError(f"expected a table of name = value, got {value!r}")
        return {_coerce(key_tp, k, from_text=from_text): _coerce(value_tp, v, from_text=from_text)
                for k, v in value.items()}
    if origin is typing.Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ValueError(f"expected one of {', '.join(map(repr, choices))}, got {value!r}")
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        if from_text and isinstance(value, str):
            low = value.strip().lower()
            if low in ("1", "true", "yes", "on"):
                return True
            if low in ("0", "false", "no", "off"):
                return False
        raise ValueError(f"expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ValueError(f"expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if from_text and isinstance(value, str):
            try:
                return int(value.strip(), 0)
            except ValueError:
                pass
        raise ValueError(f"expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if from_text and isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ValueError(f"expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ValueError(f"expected a string, got {value!r}")
    if tp is Path:
        if isinstance(value, (str, Path)) and str(value):
            return Path(value).expanduser()
        raise ValueError(f"expected a path, got {value!r}")
    raise ValueError(f"unsupported setting type {tp!r}")


def _leaves(cls: type, prefix: tuple[str, ...] = ()) -> typing.Iterator[tuple[tuple[str, ...], Any]]:
    for name, tp in _field_types(cls).items():
        if _is_section(tp):
            yield from _leaves(tp, (*prefix, name))
        else:
            yield (*prefix, name), tp


def _build(cls: type[T], values: dict[str, Any]) -> T:
    kwargs = {}
    for name, tp in _field_types(cls).items():
        if _is_section(tp):
            kwargs[name] = _build(tp, values.get(name, {}))
        elif name in values:
            kwargs[name] = values[name]
    return cls(**kwargs)


def _set(tree: dict[str, Any], path: tuple[str, ...], value: Any) -> None:
    for part in path[:-1]:
        tree = tree.setdefault(part, {})
    tree[path[-1]] = value


def _from_file(cls: type, path: Path, sources: dict[str, str]) -> dict[str, Any]:
    source = str(path)
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(source, "-", "file not found") from None
    except OSError as exc:
        raise ConfigError(source, "-", f"cannot read: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(source, "-", "not UTF-8 text") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(source, "-", f"invalid TOML: {exc}") from None
    out: dict[str, Any] = {}

    def walk(section_cls: type, data: dict[str, Any], prefix: tuple[str, ...]) -> None:
        hints = _field_types(section_cls)
        for key, value in data.items():
            dotted = ".".join((*prefix, key))
            if key not in hints:
                known = ", ".join(sorted(hints))
                raise ConfigError(source, dotted, f"unknown key (known here: {known})")
            tp = hints[key]
            if _is_section(tp):
                if not isinstance(value, dict):
                    raise ConfigError(source, dotted, "expected a [section] table")
                walk(tp, value, (*prefix, key))
                continue
            try:
                _set(out, (*prefix, key), _coerce(tp, value, from_text=False))
            except ValueError as exc:
                raise ConfigError(source, dotted, str(exc)) from None
            sources[dotted] = source

    walk(cls, raw, ())
    return out


def env_name(prefix: str, path: tuple[str, ...]) -> str:
    return "_".join((prefix, *path)).upper().replace("-", "_")


def flag_name(path: tuple[str, ...]) -> str:
    return "--" + "-".join(path).replace("_", "-")


def setting(default: Any = dataclasses.MISSING, *, help: str,
            factory: Callable[[], Any] | None = None) -> Any:
    """A settings field with its description (shown by ``--help``); ``help`` names the unit.

    ``factory`` instead of ``default`` for mutable values (lists, sections).
    """
    meta = {"help": help}
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def describe(cls: type) -> dict[tuple[str, ...], tuple[str, Any]]:
    """Every setting's path -> (description, default); the description is '' if none was given."""
    out: dict[tuple[str, ...], tuple[str, Any]] = {}

    def walk(section: type, instance: Any, prefix: tuple[str, ...]) -> None:
        hints = _field_types(section)
        for f in dataclasses.fields(section):
            value = getattr(instance, f.name)
            if _is_section(hints[f.name]):
                walk(hints[f.name], value, (*prefix, f.name))
            else:
                out[(*prefix, f.name)] = (str(f.metadata.get("help", "")), value)

    walk(cls, cls(), ())
    return out


def show_default(value: Any) -> str:
    """A default as it would be written in a flag: lists comma-separated, '' as (empty)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return ",".join(map(str, value)) or "none"
    if isinstance(value, dict):
        return json.dumps(value) if value else "none"
    if value is None or value == "":
        return "none"
    return str(value)


def metavar(name: str, tp: Any) -> str:
    """What a flag takes, from its type and the unit its name ends in."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        tp = next(a for a in typing.get_args(tp) if a is not type(None))
        origin = typing.get_origin(tp)
    if origin is typing.Literal:
        return "{" + ",".join(map(str, typing.get_args(tp))) + "}"
    if origin is list:
        return "A,B,..."
    if origin is dict:
        return "JSON" if typing.get_args(tp)[1:] != (str,) else "NAME=VALUE,..."
    if tp is bool:
        return "{true,false}"
    for suffix, unit in (("log_level", "LEVEL"), ("host", "ADDRESS"), ("_ms", "MS"), ("_s", "SECONDS"), ("_bytes", "BYTES"), ("port", "PORT"),
                         ("token", "TOKEN"), ("secret", "SECRET"), ("url", "URL")):
        if name.endswith(suffix):
            return unit
    if tp is Path:
        return "PATH"
    if tp in (int, float):
        return "N"
    return "TEXT"


def add_flags(parser: argparse.ArgumentParser, cls: type) -> None:
    """Add one ``--section-key`` flag per setting; unset flags stay ``None``.

    The help is the field's description (``setting(help=...)``) and its default.
    """
    group = parser.add_argument_group("settings (override the config file and environment)")
    docs = describe(cls)
    for path, tp in _leaves(cls):
        dest = "cfg__" + "__".join(path)
        text, default = docs[path]
        shown = show_default(default)
        if not (shown == "none" and "(empty:" in text):  # the text already says what empty means
            text = f"{text} (default: {shown})"
        extra: dict[str, Any] = {}
        if tp is bool:  # "--insecure" alone means true; "--insecure false" still works
            extra = {"nargs": "?", "const": "true"}
        group.add_argument(flag_name(path), dest=dest, default=None, metavar=metavar(path[-1], tp),
                           help=text.replace("%", "%%"), **extra)


def load(
    cls: type[T],
    *,
    path: Path | None = None,
    env_prefix: str,
    args: argparse.Namespace | None = None,
    environ: typing.Mapping[str, str] | None = None,
    check: Callable[[T], None] | None = None,
) -> T:
    """Build ``cls`` from defaults, then the TOML file, environment and flags.

    ``check`` sees the result and raises :class:`Invalid` for a value that
    parses but cannot work; the error names the layer that set that value.
    """
    environ = os.environ if environ is None else environ
    sources: dict[str, str] = {}  # dotted key -> the layer its value came from
    values: dict[str, Any] = _from_file(cls, path, sources) if path is not None else {}
    for leaf, tp in _leaves(cls):
        dotted = ".".join(leaf)
        name = env_name(env_prefix, leaf)
        if name in environ:
            try:
                _set(values, leaf, _coerce(tp, environ[name], from_text=True))
            except ValueError as exc:
                raise ConfigError(f"environment {name}", dotted, str(exc)) from None
            sources[dotted] = f"environment {name}"
        if args is not None:
            raw = getattr(args, "cfg__" + "__".join(leaf), None)
            if raw is not None:
                try:
                    _set(values, leaf, _coerce(tp, raw, from_text=True))
                except ValueError as exc:
                    raise ConfigError(f"flag {flag_name(leaf)}", dotted, str(exc)) from None
                sources[dotted] = f"flag {flag_name(leaf)}"
    try:
        cfg = _build(cls, values)
    except (TypeError, ValueError) as exc:
        raise ConfigError(str(path or DEFAULTS), "-", str(exc)) from None
    if check is not None:
        try:
            check(cfg)
        except Invalid as exc:
            raise ConfigError(_source_of(sources, exc.key), exc.key, exc.problem) from None
    return cfg


def _source_of(sources: dict[str, str], key: str) -> str:
    """The layer that set ``key`` or the table holding it (``a.b.c`` inside the setting ``a``)."""
    parts = key.split(".")
    while parts:
        found = sources.get(".".join(parts))
        if found is not None:
            return found
        parts.pop()
    return DEFAULTS


def config_path(args: argparse.Namespace, env_prefix: str, default: Path | None = None) -> Path | None:
    """The config file: ``--config``, else ``$PREFIX_CONFIG``, else ``default`` if it exists."""
    if getattr(args, "config", None):
        return Path(args.config)
    env = os.environ.get(f"{env_prefix.upper()}_CONFIG")
    if env:
        return Path(env)
    if default is not None and default.exists():
        return default
    return None


def load_or_exit(
    cls: type[T],
    args: argparse.Namespace,
    *,
    prog: str,
    env_prefix: str,
    default_path: Path | None = None,
    check: Callable[[T], None] | None = None,
) -> T:
    """``load`` for entry points: a bad config prints one line and exits with status 1."""
    try:
        return load(cls, path=config_path(args, env_prefix, default_path), env_prefix=env_prefix,
                    args=args, check=check)
    except ConfigError as exc:
        raise SystemExit(f"{prog}: config error: {exc}") from None
