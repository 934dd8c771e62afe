"""Errors in the words the user typed: a setting's API name (``limit``) said as the flag that set it (``--limit``)."""

from __future__ import annotations

import argparse
import functools
from collections.abc import Callable, Mapping

from ..errors import ConfigError, InvalidRequestError

Command = Callable[[argparse.Namespace], int]


def naming_flags(flags: Mapping[str, str]) -> Callable[[Command], Command]:
    """Decorate a command: a ConfigError or InvalidRequestError whose ``field`` is a key of ``flags`` is raised
    again, of the same class, naming the flag instead. Other errors go on as they are."""

    def decorate(command: Command) -> Command:
        @functools.wraps(command)
        def run(args: argparse.Namespace) -> int:
            try:
                return command(args)
            except (ConfigError, InvalidRequestError) as err:
                if err.field not in flags:
                    raise
                message = str(err).removeprefix(f"{err.field}: ")  # the error puts its field in front
                raise type(err)(message, field=flags[err.field]) from err

        return run

    return decorate
