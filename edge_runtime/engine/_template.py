"""Chat templates from the bundle manifest, rendered in a sandboxed Jinja2 environment.

The template is data that came with a model file; the immutable sandbox stops
it from reaching Python internals or mutating what it is given.
"""

from __future__ import annotations

import datetime
import json
from collections.abc import Sequence
from typing import Any

from ..errors import BundleError, InvalidRequestError

__all__ = ["ChatTemplate"]


class _TemplateRaised(Exception):
    pass


def _raise_exception(message: str) -> None:
    raise _TemplateRaised(message)


class ChatTemplate:
    def __init__(self, source: str | None, *, bos_token: str = "", eos_token: str = "") -> None:
        from jinja2 import TemplateSyntaxError
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        self.source = source
        self._bos, self._eos = bos_token, eos_token
        if not source:
            self._template = None
            return
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, autoescape=False)
        env.globals["raise_exception"] = _raise_exception
        env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
        env.filters["tojson"] = lambda x, indent=None, ensure_ascii=False, **_: json.dumps(x, indent=indent, ensure_ascii=ensure_ascii)
        try:
            self._template = env.from_string(source)
        except TemplateSyntaxError as err:
            raise BundleError(f"the bundle's chat template does not compile: {err}") from err

    @property
    def available(self) -> bool:
        return self._template is not None

    def render(self, messages: Sequence[dict[str, str]], *, add_generation_prompt: bool = True, **extra: Any) -> str:
        if self._template is None:
            raise InvalidRequestError("this bundle has no chat template; send a raw prompt instead", field="messages")
        from jinja2 import TemplateError

        try:
            return self._template.render(
                messages=list(messages), add_generation_prompt=add_generation_prompt,
                bos_token=self._bos, eos_token=self._eos, **extra,
            )
        except _TemplateRaised as err:
            raise InvalidRequestError(f"rejected by the model's chat template: {err}", field="messages") from err
        except TemplateError as err:
            raise InvalidRequestError(f"the chat template failed on these messages: {err}", field="messages") from err
        except (ArithmeticError, TypeError, ValueError, LookupError, RecursionError) as err:
            # a template is code that came with the model: its own bugs (1/0, 1 + 'a', endless recursion) are
            # this request's failure, said in one line, not a crash of the caller
            raise InvalidRequestError(f"the chat template failed on these messages: {type(err).__name__}: {err}",
                                      field="messages") from err
