"""Settings machinery: one dataclass model feeds a TOML file, environment variables and CLI flags.

A settings model is a tree of frozen dataclasses. Each leaf field carries its
help text in ``metadata={"help": ...}``; the same text becomes the ``--flag``
help. Precedence, lowest to highest: field default < TOML file < environment
(``<PREFIX>_<SECTION>_<FIELD>``, upper case) < CLI flags (``--section-field``).

The TOML file is read in exactly one place, :func:`load_settings`; relative
paths in it are relative to its directory. Every bad value raises
:class:`~edge_runtime.errors.ConfigError` naming the dotted field.
"""

from __future__ import annotations

import argparse
import codecs
import dataclasses
import difflib
import json
import logging
import math
import os
import sys
import tomllib
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

from .errors import ConfigError, EdgeRuntimeError

__all__ = ["setting", "shown", "documented", "load_settings", "add_settings_arguments", "refuse_abbreviations", "settings_overrides_from_args",
           "settings_to_dict", "check_threads", "MAX_THREADS", "THREADS_HELP"]

T = TypeVar("T")

log = logging.getLogger(__name__)

# variables that share a settings prefix and are read elsewhere (the cache directory: edge_runtime.cache)
_NOT_SETTINGS = frozenset({"EDGE_RUNTIME_CACHE"})

# onnxruntime takes a thread count as a C int (2**31 was a TypeError traceback once the daemon listened), and far
# more threads than any machine has cores only cost memory
MAX_THREADS = 1024
# every --threads flag and engine.threads say the same of the default (see edge_runtime._cpus)
THREADS_HELP = "intra-op threads (default: physical cores, fewer under a CPU affinity mask or cgroup quota)"

def is_finite(value: int | float) -> bool:
    """``math.isfinite`` for a number read from TOML or JSON, where an integer may be past a float's range (10**400)."""
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


def check_threads(value: int | None, *, field: str) -> None:
    """Refuse a thread count outside 1..:data:`MAX_THREADS` (None: the engine's choice), naming ``field``."""
    if value is not None and not 1 <= value <= MAX_THREADS:
        raise ConfigError(f"must be from 1 to {MAX_THREADS}, got {value}", field=field)


def setting(default: Any = dataclasses.MISSING, *, help: str, factory: Any = dataclasses.MISSING, secret: bool = False,
            path: bool | str = False, private: bool | None = None) -> Any:
    """A settings field with help text. ``secret`` fields are never printed by :func:`settings_to_dict`.

    ``private`` (default: ``secret``): a config file holding a value of it must not be readable by others.
    Hashes of secrets are hidden from output but need no private file.

    ``Path`` fields written relative in a config file are relative to the file's directory (in the
    environment and on the command line, to the working directory). ``path="if_exists"`` does the
    same for a string field that may also name something else (a bundle directory or a model name):
    always for a value written as a path (``./b``, ``../b``, ``dir/b``), and for a bare name only when a
    bundle (a ``manifest.json``) is at the file-relative path; ``path="unix"``, for an address, to a
    ``unix:`` socket's relative path; ``path="policy"``, for a policy table, to its parts' ``state_file``.
    """
    meta = {"help": help, "secret": secret, "path": path, "private": secret if private is None else private}
    # a secret stays out of repr() (a debug log line or a traceback with locals would print it)
    if factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=factory, metadata=meta, repr=not secret)
    return dataclasses.field(default=default, metadata=meta, repr=not secret)


def documented(cls: type[T]) -> type[T]:
    """Class decorator: the settings' help texts and defaults in the class's docstring, for ``help()`` (they were
    only in the fields' metadata, which config files, the environment and ``--help`` read)."""
    lines = []
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        if f.default is not dataclasses.MISSING and not f.metadata.get("secret"):
            default = f" (default {f.default!r})"
        else:
            default = ""
        # a field without help text is a section (its own class documents it)
        lines.append(f"``{f.name}``{default}: {f.metadata.get('help') or 'the [' + f.name + '] table'}")
    head = (cls.__doc__ or "").strip() if cls.__doc__ and not cls.__doc__.startswith(f"{cls.__name__}(") else ""
    cls.__doc__ = "\n\n".join(filter(None, [head, "Fields:\n\n" + "\n".join(f"- {line}" for line in lines)]))
    return cls


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _is_section(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _inline_value(text: str, what: str, field: str) -> Any:
    """A table or array written in an environment variable or a flag: JSON, or TOML's inline form."""
    try:
        try:
            return json.loads(text)
        except json.JSONDecodeError:
            return tomllib.loads(f"value = {text}")["value"]
    except RecursionError:
        raise ConfigError(f"expected {what}: nested too deeply", field=field) from None
    except tomllib.TOMLDecodeError as err:
        example = '["a", "b"]' if what == "an array" else '{"a": {"b": 1}} or {a = {b = 1}}'
        raise ConfigError(f"expected {what} in JSON or TOML inline form, e.g. {example}: {err}", field=field) from None


# how much of a refused value an error quotes: a TOML integer may have 400 digits, a pasted string a page
_SHOWN_CHARS = 40


def shown(value: Any) -> str:
    """``repr(value)`` cut to a length a one-line error can hold."""
    text = repr(value)
    return text if len(text) <= _SHOWN_CHARS else text[:_SHOWN_CHARS] + "..."


def _coerce(value: Any, tp: Any, field: str) -> Any:
    """Convert a TOML/env/CLI value to the annotated type, or raise ConfigError naming ``field``."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.lower() in ("", "none", "null") and type(None) in typing.get_args(tp)):
            return None
        if isinstance(value, str) and value.lstrip().startswith("{") and any(
                a is dict or typing.get_origin(a) is dict for a in args):
            # written as a table: it must parse as one (its error says why), not pass as a plain string
            args = [a for a in args if a is dict or typing.get_origin(a) is dict]
        errors = []
        for arg in args:
            try:
                return _coerce(value, arg, field)
            except ConfigError as err:
                # each alternative's message names the field already: once is enough
                errors.append(str(err).removeprefix(f"{field}: ") if err.field == field else str(err))
        if len(errors) == 1:  # an optional field (float | None): its one type's message says it all
            raise ConfigError(errors[0], field=field)
        raise ConfigError(f"cannot use {shown(value)}: {'; '.join(errors)}", field=field)
    if origin is typing.Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ConfigError(f"must be one of {', '.join(map(repr, choices))}, got {shown(value)}", field=field)
        return value
    if origin in (list, tuple):
        (item_tp, *_) = typing.get_args(tp) or (str,)
        if isinstance(value, str) and value.lstrip().startswith("["):  # from the environment or a flag: an array
            value = _inline_value(value, "an array", field)
        elif isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"expected a list, got {shown(value)}", field=field)
        items = [_coerce(v, item_tp, f"{field}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict or tp is dict:
        if isinstance(value, str):  # from the environment or a flag
            value = _inline_value(value, "a table", field)
        if not isinstance(value, Mapping):
            raise ConfigError(f"expected a table, got {shown(value)}", field=field)
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("1", "true", "yes", "on"):
            return True
        if isinstance(value, str) and value.lower() in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"expected true or false, got {shown(value)}", field=field)
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"expected an integer, got {shown(value)}", field=field)
        try:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(value)
        except (TypeError, ValueError):
            raise ConfigError(f"expected an integer, got {shown(value)}", field=field) from None
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"expected a number, got {shown(value)}", field=field)
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"expected a number, got {shown(value)}", field=field) from None
        except OverflowError:  # an integer past a float's range (TOML and JSON allow 10**400)
            raise ConfigError(f"expected a finite number, got {shown(value)}", field=field) from None
        if not math.isfinite(number):  # nan passes every range check (nan <= 0 is false), inf most of them
            raise ConfigError(f"expected a finite number, got {shown(value)}", field=field)
        return number
    if tp is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(f"expected a string, got {shown(value)}", field=field)
        return str(value)
    if tp is Path:
        if not isinstance(value, (str, Path)):
            raise ConfigError(f"expected a path, got {shown(value)}", field=field)
        if isinstance(value, str) and not value.strip():  # Path("") is ".": the working directory, unsaid
            raise ConfigError("must name a path, got an empty string (write . for the working directory)",
                              field=field)
        return Path(os.path.expanduser(str(value)))
    if tp is Any:
        return value
    raise ConfigError(f"unsupported settings type {tp!r}", field=field)


def describe_type(tp: Any) -> str:
    if typing.get_origin(tp) is dict or tp is dict:
        return "a table"
    if typing.get_origin(tp) in (list, tuple):
        return "a list"
    return {str: "a string", int: "an integer", float: "a number", bool: "true or false"}.get(tp, "another type")


def _is_path(tp: Any) -> bool:
    return tp is Path or (typing.get_origin(tp) in (typing.Union, types.UnionType) and Path in typing.get_args(tp))


def _file_relative(cls: type, data: Mapping[str, Any], base: Path) -> dict[str, Any]:
    """``data`` (a config file's tables) with its relative paths joined to ``base``, the file's directory."""
    hints = _hints(cls)
    out = dict(data)
    for f in dataclasses.fields(cls):
        value = data.get(f.name)
        tp = hints[f.name]
        if _is_section(tp) and isinstance(value, Mapping):
            out[f.name] = _file_relative(tp, value, base)
            continue
        kind = f.metadata.get("path") or _is_path(tp)
        if kind == "policy":
            if isinstance(value, Mapping):
                out[f.name] = _policy_relative(value, base)
            continue
        if not kind or not isinstance(value, str) or not value:
            continue
        if kind == "unix":  # an address: host:port, or a Unix socket whose relative path follows the file
            rest = value[len("unix:"):] if value.startswith("unix:") and not value.startswith("unix://") else ""
            if rest:  # ~ expanded too (gRPC would take it literally); an absolute path stays as it is
                out[f.name] = f"unix:{base / os.path.expanduser(rest)}"
            continue
        relative = Path(os.path.expanduser(value))
        if relative.is_absolute():
            continue
        # "if_exists": a name (a cached bundle's, say) unless the file's directory holds a bundle of that name;
        # any other folder there (the checkout quantize read) would otherwise turn a model name into a bad path.
        # A value written as a path is one, beside the file: else it was looked for in the working directory,
        # and the same file loaded from a shell and failed under systemd (whose working directory is /)
        if kind != "if_exists" or _path_like(value) or (base / relative / "manifest.json").exists():
            out[f.name] = str(base / relative)
    return out


def _policy_relative(policy: Any, base: Path) -> Any:
    """A policy table (a chain's parts too) with a relative ``state_file`` joined to ``base``."""
    if not isinstance(policy, Mapping):
        return policy  # a policy's name, or a bad value the policy's own check names
    out = dict(policy)
    value = out.get("state_file")
    if isinstance(value, str) and value and not Path(os.path.expanduser(value)).is_absolute():
        out["state_file"] = str(base / value)
    for key in ("chain", "policies"):  # a chain's two spellings: [policy] chain = [...] or type = "chain", policies = [...]
        if isinstance(out.get(key), list):
            out[key] = [_policy_relative(part, base) for part in out[key]]
    return out


def _path_like(value: str) -> bool:
    """Whether a value that may be a name or a path is written as a path: ``./b``, ``../b``, ``~/b``, ``dir/b``."""
    return value.startswith((".", "~")) or os.sep in value or bool(os.altsep and os.altsep in value)


def _build(cls: type[T], layers: list[Mapping[str, Any]], prefix: str) -> T:
    hints = _hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for layer in layers:
        for key in layer:
            if key not in names:
                dotted = f"{prefix}{key}"
                raise ConfigError(f"unknown setting (known: {', '.join(sorted(names))})", field=dotted)
    kwargs: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        dotted = f"{prefix}{f.name}"
        if _is_section(tp):
            sub_layers = []
            for layer in layers:
                if f.name in layer:
                    sub = layer[f.name]
                    if not isinstance(sub, Mapping):
                        raise ConfigError("expected a table", field=dotted)
                    sub_layers.append(sub)
            kwargs[f.name] = _build(tp, sub_layers, dotted + ".")
            continue
        for layer in layers:
            if f.name in layer:
                try:
                    kwargs[f.name] = _coerce(layer[f.name], tp, dotted)
                except ConfigError:
                    if not f.metadata.get("secret"):
                        raise
                    # the messages quote the value they refuse: not for a secret
                    raise ConfigError(f"expected {describe_type(tp)} (the value is not shown: it is a secret)",
                                      field=dotted) from None
    try:
        obj = cls(**kwargs)
    except (TypeError, ValueError) as err:
        raise ConfigError(str(err), field=prefix.rstrip(".") or None) from err
    validate = getattr(obj, "validate", None)
    if callable(validate):
        validate()
    return obj


def _env_layer(cls: type, env: Mapping[str, str], env_prefix: str, *, root: bool = True) -> dict[str, Any]:
    out: dict[str, Any] = {}
    hints = _hints(cls)
    leaves: set[str] = set()
    sections: list[str] = []
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        name = f"{env_prefix}_{f.name.upper()}"
        if _is_section(tp):
            sections.append(name + "_")
            sub = _env_layer(tp, env, name, root=False)
            if sub:
                out[f.name] = sub
        else:
            leaves.add(name)
            if name in env:
                out[f.name] = env[name]
    # A misspelt variable inside a section (EDGE_RUNTIME_SERVER_PROT) is an error, as the same typo in the
    # file is. The root of a settings tree with sections is not checked: other variables share its prefix
    # (EDGE_RUNTIME_CACHE).
    if not (root and sections):
        for key in env:
            if key.startswith(env_prefix + "_") and key not in leaves and not key.startswith(tuple(sections)):
                known = ", ".join(sorted(leaves))
                raise ConfigError(f"unknown setting in the environment (known here: {known})", field=key)
    else:
        # a table-valued leaf of the root (EDGE_RUNTIME_POLICY) is set whole, never field by field
        for key in env:
            whole = next((leaf for leaf in leaves if key.startswith(leaf + "_")), None)
            if whole is not None:
                raise ConfigError(f"unknown setting in the environment: {whole} is set as a whole "
                                  f"(a table in JSON or TOML inline form)", field=key)
        _warn_about_near_misses(cls, env, env_prefix, leaves, sections)
    return out


def _warn_about_near_misses(cls: type, env: Mapping[str, str], env_prefix: str, leaves: set[str],
                            sections: list[str]) -> None:
    """Warn about a root-level variable that looks like a setting and is not one, which is otherwise ignored
    without a word: a field without its section (EDGE_RUNTIME_PORT), a misspelt section (EDGE_RUNTIME_CLOU_ADDRESS)
    or table-valued leaf (EDGE_RUNTIME_POLCY). Only names that close are: other variables may share the prefix
    (an API key's, say)."""
    section_names = [s[len(env_prefix) + 1:-1] for s in sections]
    whole_names = [leaf[len(env_prefix) + 1:] for leaf in leaves]
    in_sections = _env_names_by_field(cls, env_prefix)
    for key in sorted(env):
        if not key.startswith(env_prefix + "_") or key in leaves or key in _NOT_SETTINGS \
                or key.startswith(tuple(sections)):
            continue
        rest = key[len(env_prefix) + 1:]
        if rest in in_sections:
            log.warning("%s is not a setting and is ignored (did you mean %s?)", key, " or ".join(in_sections[rest]))
        elif close := difflib.get_close_matches(rest.split("_")[0], section_names, n=1, cutoff=0.75):
            log.warning("%s is not a setting and is ignored (did you mean section %s, %s_%s_...?)",
                        key, close[0], env_prefix, close[0])
        elif close := difflib.get_close_matches(rest, whole_names, n=1, cutoff=0.75):
            log.warning("%s is not a setting and is ignored (did you mean %s_%s?)", key, env_prefix, close[0])


def _env_name(env_prefix: str, path: tuple[str, ...]) -> str:
    """A setting's environment variable: ``EDGE_RUNTIME_SERVER_PORT`` for ``("server", "port")``."""
    return "_".join((env_prefix, *path)).upper()


def _env_names_by_field(cls: type, env_prefix: str) -> dict[str, list[str]]:
    """Each field name of a section, upper case, with the variables of the fields of that name (PORT ->
    [EDGE_RUNTIME_SERVER_PORT])."""
    out: dict[str, list[str]] = {}
    for path, _f, _tp in _leaf_fields(cls):
        if len(path) > 1:
            out.setdefault(path[-1].upper(), []).append(_env_name(env_prefix, path))
    return out


def load_settings(
    cls: type[T],
    *,
    config_file: str | os.PathLike[str] | None = None,
    data: Mapping[str, Any] | None = None,
    env: Mapping[str, str] | None = None,
    env_prefix: str = "EDGE_RUNTIME",
    overrides: Mapping[str, Any] | None = None,
    section: str = "",
) -> T:
    """Build ``cls`` from defaults, a TOML file (or an already-parsed ``data`` mapping), env and overrides.

    ``env=None`` reads ``os.environ``; pass ``{}`` to ignore the environment.
    ``overrides`` is a nested mapping, e.g. from :func:`settings_overrides_from_args`.
    ``section``: the name ``cls`` has as a section of a larger model when it is read on its own, so its errors
    name the field as a config file writes it (``power.idle_watts``, as its own checks do), not ``idle_watts``.
    """
    layers: list[Mapping[str, Any]] = []
    if config_file is not None:
        path = Path(config_file)
        layers.append(_file_relative(cls, _read_toml(path), path.resolve().parent))
        _check_secrets_are_private(cls, layers[-1], path)
    if data is not None:
        layers.append(data)
    layers.append(_env_layer(cls, os.environ if env is None else env, env_prefix))
    if overrides:
        layers.append(overrides)
    return _build(cls, layers, f"{section}." if section else "")


def _read_toml(path: Path) -> dict[str, Any]:
    """A config file's tables, or a ConfigError saying why the file cannot be read."""
    try:
        raw = path.read_bytes()
        # "UTF-8 with BOM" (Windows editors, PowerShell's Out-File): TOML has no BOM, and tomllib called it an
        # "Invalid statement" at 1:1, pointing at nothing the user can see
        content = raw.removeprefix(codecs.BOM_UTF8)
        return tomllib.loads(content.decode("utf-8"))
    except FileNotFoundError as err:
        raise ConfigError(f"config file not found: {path}") from err
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{path} is not valid TOML: {err}") from err
    except RecursionError as err:
        raise ConfigError(f"{path} is not valid TOML: nested too deeply") from err
    except UnicodeDecodeError as err:  # TOML is UTF-8; a UTF-16 file from a Windows editor is not
        start = err.start + len(raw) - len(content)  # counted in the file, as an editor or hexdump shows it
        raise ConfigError(f"{path} is not UTF-8 text (byte {start}): TOML files are UTF-8") from err
    except OSError as err:  # a directory, no permission
        raise ConfigError(f"cannot read the config file {path}: {err.strerror or err}") from err


def _check_secrets_are_private(cls: type, layer: Mapping[str, Any], path: Path) -> None:
    """A secret written in a config file others can read is refused, as a token file readable by others is."""
    try:
        shared = os.stat(path).st_mode & 0o077
    except OSError:
        return
    if not shared:
        return
    for names, f, _tp in _leaf_fields(cls):
        if not f.metadata.get("private"):
            continue
        value: Any = layer
        for name in names:
            value = value.get(name) if isinstance(value, Mapping) else None
        if value:
            raise ConfigError(f"is written in {path}, which others can read: chmod 600 that file, or keep the "
                              "secret in its own file (a *_file setting) or the environment", field=".".join(names))


def _leaf_fields(cls: type, prefix: tuple[str, ...] = ()) -> typing.Iterator[tuple[tuple[str, ...], dataclasses.Field[Any], Any]]:
    hints = _hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if _is_section(tp):
            yield from _leaf_fields(tp, prefix + (f.name,))
        else:
            yield prefix + (f.name,), f, tp


def add_settings_arguments(parser: argparse.ArgumentParser, cls: type, *, sections: typing.Iterable[str] | None = None,
                           env_prefix: str = "EDGE_RUNTIME") -> None:
    """Add ``--section-field`` flags for every leaf of ``cls`` (optionally only some sections).

    Flags default to ``None`` so that only the ones given override file and env. Each help ends with the
    setting's environment variable and default (``[env EDGE_RUNTIME_SERVER_PORT; default 8080]``): an
    operator writing an EnvironmentFile should not derive the names by hand.
    """
    wanted = set(sections) if sections is not None else None
    for path, f, tp in _leaf_fields(cls):
        if wanted is not None and path[0] not in wanted:
            continue
        if f.metadata.get("secret"):  # a command line is visible to every user of the machine (ps)
            continue
        flag = "--" + "-".join(p.replace("_", "-") for p in path)
        dest = "settings__" + "__".join(path)
        where = f"[env {_env_name(env_prefix, path)}; default {_shown_default(f)}]"
        help_text = f"{f.metadata.get('help', '')} {where.replace('%', '%%')}"  # argparse formats help with %
        if tp is bool:
            parser.add_argument(flag, dest=dest, default=None, action=argparse.BooleanOptionalAction, help=help_text)
        else:
            parser.add_argument(flag, dest=dest, default=None, metavar=path[-1].upper(), help=help_text)


def _shown_default(f: dataclasses.Field[Any]) -> str:
    """A field's default as it would be written in the environment (never called for a secret: no flag)."""
    value = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
    if value is None:
        return "unset"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (dict, list, tuple)):
        return json.dumps(value)
    return str(value) if str(value) else '""'


def refuse_abbreviations(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Turn off argparse's prefix matching in ``parser`` and all its subcommands.

    With it, a mistyped or removed flag silently becomes a longer one: ``--cloud-token X``
    (there is no such flag: a secret has none) would be read as ``--cloud-token-file X``.
    """
    parser.allow_abbrev = False
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in action.choices.values():
                refuse_abbreviations(child)
    return parser


def stdout_reader_gone() -> bool:
    """Whether stdout is a pipe whose reader has gone (``... | head``), not some other connection that broke."""
    try:
        import select

        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLOUT)
        # Linux says POLLERR for a pipe whose reader closed, macOS (XNU) POLLHUP
        return any(events & (select.POLLERR | select.POLLHUP) for _, events in poller.poll(0))
    except (OSError, ValueError, AttributeError):  # no real stdout, or no poll() on this platform
        return False


def stream_is_utf8(stream: Any) -> bool:
    try:
        return codecs.lookup(getattr(stream, "encoding", None) or "utf-8").name == "utf-8"
    except (LookupError, TypeError):  # an unknown codec, or a stand-in stream whose encoding is no string
        return False


def run_command(prog: str, args: argparse.Namespace, *, say_interrupted: bool = True) -> int:
    """``args.func(args)`` behind the CLIs' one error boundary: the project's errors and OS errors as one
    line (``-vv`` re-raises them), a reader that went away as quiet, Ctrl-C as 130."""
    for stream in (sys.stdout, sys.stderr):
        # a terminal or pipe that is not UTF-8 (PYTHONIOENCODING=ascii, a Latin-1 locale): "caf\xe9" rather than a
        # traceback (eval's table printed an em dash, and calibrate exited 1 after writing its estimator)
        if stream is not None and not stream_is_utf8(stream) and hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")
    try:
        return int(args.func(args) or 0)
    except EdgeRuntimeError as err:
        # one clear line, never a traceback as the only explanation
        say(f"{prog} {args.command}: error: {err}")
        if args.verbose >= 2:
            raise
        return 1
    except MemoryError:  # one the engine did not translate (reading a suite, a tokenizer, a large file)
        say(f"{prog} {args.command}: error: out of memory")
        if args.verbose >= 2:
            raise
        return 1
    except BrokenPipeError as err:
        if stdout_reader_gone():
            return stdout_closed()
        say(f"{prog} {args.command}: error: {err.strerror or err}")
        return 1
    except OSError as err:
        # a file the user named that cannot be read or written (a directory, a missing parent, no permission);
        # the commands translate the ones they expect, this is the boundary for the rest
        where = f": {err.filename}" if err.filename else ""
        say(f"{prog} {args.command}: error: {err.strerror or err}{where}")
        if args.verbose >= 2:
            raise
        return 1
    except KeyboardInterrupt:
        if say_interrupted:
            say(f"{prog} {args.command}: interrupted")
        return 130


def say(line: str) -> None:
    """A line on stderr, or nowhere when stderr is closed (``2>&-``): ``print(file=None)`` would write it to stdout,
    into the results a script reads."""
    if sys.stderr is not None:
        print(line, file=sys.stderr)


def stdout_closed() -> int:
    """The exit status of a command whose reader went away (``... | head``): quiet, as other tools are.

    Python would otherwise report the broken pipe, or print a traceback when it
    flushes stdout at exit; stdout is pointed at /dev/null so that flush is silent.
    """
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):  # stdout is not a real file (a test's capture)
        pass
    return 141  # 128 + SIGPIPE, what a shell reports for a program the pipe killed


def settings_overrides_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """Collect the flags added by :func:`add_settings_arguments` into a nested override mapping."""
    out: dict[str, Any] = {}
    for key, value in vars(args).items():
        if not key.startswith("settings__") or value is None:
            continue
        path = key[len("settings__"):].split("__")
        node = out
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = value
    return out


def settings_to_dict(obj: Any, *, redact: bool = True) -> dict[str, Any]:
    """A JSON-able view of a settings object; secret fields are shown as ``"***"``."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            out[f.name] = settings_to_dict(value, redact=redact)
        elif redact and f.metadata.get("secret") and value:
            out[f.name] = "***"
        elif isinstance(value, Path):
            out[f.name] = str(value)
        else:
            out[f.name] = value
    return out
