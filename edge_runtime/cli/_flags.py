"""Errors in the words the user typed: a setting's API name (``limit``) said as the flag that set it (``--limit``)."""

from __future__ import annotations

import argparse
import functools
from collections.abc import Callable, Mapping

from ..errors import ConfigError, InvalidRequestError

Command = Callable[[argparse.Namespace], int]


def flag_of(flags: Mapping[str, str], field: str) -> str | None:
    """The flag that set ``field`` ("stop[1]" -> "--stop[1]" when ``flags`` has "stop"), or None for a field no
    flag sets."""
    if field in flags:
        return flags[field]
    name, bracket, index = field.partition("[")
    return flags[name] + bracket + index if bracket and name in flags else None


def naming_flags(flags: Mapping[str, str]) -> Callable[[Command], Command]:
    """Decorate a command: a ConfigError or InvalidRequestError whose ``field`` a flag of ``flags`` sets (see
    :func:`flag_of`) is raised again, of the same class, naming the flag instead. Other errors go on as they are."""

    def decorate(command: Command) -> Command:
        @functools.wraps(command)
        def run(args: argparse.Namespace) -> int:
            try:
                return command(args)
            except (ConfigError, InvalidRequestError) as err:
                flag = flag_of(flags, err.field or "")
                if flag is None:
                    raise
                message = str(err).removeprefix(f"{err.field}: ")  # the error puts its field in front
                raise type(err)(message, field=flag) from err

        return run

    return decorate
