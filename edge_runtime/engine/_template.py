"""Chat templates from the bundle manifest, rendered in a sandboxed Jinja2 environment.

The template is data that came with a model file; the immutable sandbox stops
it from reaching Python internals or mutating what it is given. Jinja's sandbox
does not bound time or memory, and a daemon renders the template on every
request, so a render also has a deadline, a cap on what it writes, and refuses
the cheap bombs (``"x" * 10**9``, ``2 ** 10**9``, a filter width of a billion)
before they allocate. Real templates take well under a millisecond and use
small numbers; the limits are far from them.
"""

from __future__ import annotations

import collections.abc
import contextvars
import datetime
import functools
import json
import re
import time
import types
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

from ..errors import BundleError, InvalidRequestError
from .types import short_repr

__all__ = ["ChatTemplate"]

RENDER_TIMEOUT_S = 2.0
MAX_RENDER_CHARS = 4_000_000  # plus four times the messages' own text
MAX_INT_ARGUMENT = 1_000_000  # widths, repeat counts and exponents a template may pass on
# the largest integer a template's arithmetic may take or make, in bits (real templates count messages): CPython's
# multiplication, division and power of big integers are each one C call, holding the GIL for seconds to hours, which
# the deadline cannot stop (x // y of 16M-bit and 2M-bit integers stopped every thread of a daemon for a minute)
MAX_INT_BITS = 65_536
# string methods a chat template has no use for, each able to grow a string past what any check foresees
_REFUSED_METHODS = frozenset({"str.translate", "str.encode", "str.format_map"})
_SIZED = (str, list, tuple)
# a printf conversion ("%-08.3f", "%(name)20s") or a str.format replacement field's spec ("{0:>20}")
_FORMAT_SPEC = re.compile(r"%(?:\([^)]*\))?[-#0 +]*[0-9*]*(?:\.[0-9*]*)?|\{[^{}]*:[^{}]*\}")
_DIGITS = re.compile(r"[0-9]+")


class _TemplateRaised(Exception):
    pass


class _TemplateLimit(Exception):
    pass


def _raise_exception(message: str) -> None:
    raise _TemplateRaised(message)


def _weight(value: Any, limit: int) -> int:
    """The characters ``value`` would take as text, at most: a string's length, a number's digits, a list's, tuple's
    or dict's items (keys too) counted through, so that ``[s] * 300`` weighs 300 strings, not 300 items. Stops
    counting past ``limit``."""
    if isinstance(value, str):
        return len(value)
    if isinstance(value, (list, tuple, dict)):
        total = len(value)
        for item in (*value.keys(), *value.values()) if isinstance(value, dict) else value:
            total += _weight(item, limit - total)
            if total > limit:
                break
        return total
    if isinstance(value, int):  # str() of [10 ** 4299] * 250000 is one C call that held the GIL for 86 s
        return value.bit_length() * 31 // 100 + 2
    if isinstance(value, (bytes, bytearray)):
        return 4 * len(value)  # as repr() writes them: \x00
    return 25  # a float, None, a jinja object: short as text


def _depth(value: Any, cap: int = 64) -> int:
    """How deeply lists, tuples and dicts nest in ``value`` (at most ``cap``): tojson indents each level."""
    if cap <= 0 or not isinstance(value, (list, tuple, dict)):
        return 0
    items = value.values() if isinstance(value, dict) else value
    return 1 + max((_depth(item, cap - 1) for item in items), default=0)


def _integer(value: Any, default: int) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else default


MAX_JSON_INDENT = 16  # real templates pass 2 or 4; a string or a huge indent multiplies every line


def _growth(name: str, target: Any, args: Sequence[Any], kwargs: dict[str, Any], limit: int) -> int:
    """An upper bound of what the string method (``str.NAME``, ``target`` its string) or filter (``NAME``,
    ``target`` the filtered value) builds, known before it runs, for those whose result can be far larger than what
    they are given (0: no bound is needed). Iterables a join reads are lists by now (see ``_materialized``)."""
    def arg(i: int, key: str, default: Any) -> Any:
        return args[i] if len(args) > i else kwargs.get(key, default)

    def text(value: Any) -> int:
        return _weight(value, limit)

    if name in ("str.expandtabs",):
        return len(target) * max(_integer(arg(0, "tabsize", 8), 8), 1)
    if name == "indent":
        width = arg(0, "width", 4)
        width = len(width) if isinstance(width, str) else max(_integer(width, 4), 0)
        lines = target.count("\n") + 1 if isinstance(target, str) else text(target)
        return text(target) + lines * width
    if name in ("str.replace", "replace"):
        old, new = str(arg(0, "old", "")), str(arg(1, "new", ""))
        if len(new) > len(old):
            return text(target) + (text(target) // len(old) if old else text(target) + 1) * (len(new) - len(old))
        return text(target)
    if name == "str.join":  # "sep".join(items)
        items = arg(0, "iterable", ())
        return text(items) + len(target) * len(items) if isinstance(items, (list, tuple)) else 0
    if name == "join":  # items|join(sep): each item's text, a separator between two
        sep = str(arg(0, "d", ""))
        size = len(target) if isinstance(target, (str, list, tuple, dict)) else 0
        return text(target) + len(sep) * size
    if name == "wordwrap":
        width, wrap = max(_integer(arg(0, "width", 79), 79), 1), arg(2, "wrapstring", None)
        return text(target) * 2 + (text(target) // width + 1) * len(str(wrap or "\n"))
    if name in ("str.format", "format") and isinstance(target, str):  # a field may repeat: "{0}" * 10**6
        return len(target) + target.count("{" if name == "str.format" else "%") * text([*args, *kwargs.values()])
    if name == "tojson":  # each item and key may get an indent per level and the separators
        indent = _integer(arg(0, "indent", 0) or 0, 0)
        separators = arg(2, "separators", None)
        per_item = (indent * _depth(target) if indent else 0) + (text(separators) if separators is not None else 0)
        return text(target) * (1 + per_item)  # depth only when it counts
    return 0


def _materialized(name: str, target: Any, args: list[Any]) -> tuple[Any, list[Any]]:
    """A join's items as a list, so that they can be weighed before the join (a range, a map or a select result
    is read once); what the call then gets."""
    def listed(value: Any) -> Any:
        if isinstance(value, (str, list, tuple, dict)) or not isinstance(value, collections.abc.Iterable):
            return value
        return list(value)

    if name == "join":
        return listed(target), args
    if name == "str.join" and args:
        return target, [listed(args[0]), *args[1:]]
    return target, args


def _refused_arguments(name: str, args: Sequence[Any], kwargs: dict[str, Any]) -> str | None:
    """Why a call is refused outright (None: it is not)."""
    if name == "tojson":
        indent = args[0] if args else kwargs.get("indent")
        if indent is not None and not (isinstance(indent, int) and not isinstance(indent, bool)
                                       and 0 <= indent <= MAX_JSON_INDENT):
            return f"passed tojson an indent of {short_repr(indent, 40)} (an integer up to {MAX_JSON_INDENT})"
    if name == "sum":  # sum(start=[]) concatenates lists one by one: quadratic, in one call the deadline cannot stop
        start = args[1] if len(args) > 1 else kwargs.get("start", 0)
        if not isinstance(start, (int, float)):
            return f"passed sum a start of {type(start).__name__}: only numbers are summed"
    return None


class _Budget:
    """One render's limits (a ContextVar holds it: renders may run on several threads at once)."""

    def __init__(self, max_chars: int) -> None:
        self.deadline = time.monotonic() + RENDER_TIMEOUT_S
        self.max_chars = max_chars

    def tick(self) -> None:
        if time.monotonic() > self.deadline:
            raise _TemplateLimit(f"took longer than {RENDER_TIMEOUT_S:g} s")

    def size(self, n: int) -> None:
        if n > self.max_chars:
            raise _TemplateLimit(f"would build a value of {n:,} characters (at most {self.max_chars:,})")

    def weigh(self, value: Any) -> None:
        """Refuse ``value`` if, as text, it would pass the cap (checked before a join or an output builds it)."""
        self.size(_weight(value, self.max_chars))

    def grows(self, name: str, target: Any, args: Sequence[Any], kwargs: dict[str, Any]) -> None:
        """Refuse a call whose result would pass the cap, before it is built (after is too late: 'x\\t' * 10**6
        expanded to tabs of 999,999 builds a gigabyte before its size can be seen), or whose arguments are refused."""
        refused = _refused_arguments(name, args, kwargs)
        if refused is not None:
            raise _TemplateLimit(refused)
        self.size(_growth(name, target, args, kwargs, self.max_chars))

    def argument(self, value: Any) -> None:
        if isinstance(value, int) and not isinstance(value, bool) and abs(value) > MAX_INT_ARGUMENT:
            # (str() of a number past 4,300 digits is itself an error)
            shown = str(value) if value.bit_length() < 64 else f"of {value.bit_length():,} bits"
            raise _TemplateLimit(f"passed the number {shown} on (at most {MAX_INT_ARGUMENT:,})")

    def call(self, func: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """``func(*args, **kwargs)`` within this render's limits: its numbers checked before, its result's size
        after."""
        self.tick()
        for value in (*args, *kwargs.values()):
            self.argument(value)
        result = func(*args, **kwargs)
        if isinstance(result, _SIZED):
            self.weigh(result)
        return result

    def format_string(self, fmt: str) -> None:
        """Widths and precisions written in a format string ("%200000000s", "{:200000000}") allocate as a
        passed number would."""
        for match in _FORMAT_SPEC.finditer(fmt):
            for digits in _DIGITS.findall(match.group(0)):
                if len(digits) > 7 or int(digits) > MAX_INT_ARGUMENT:
                    raise _TemplateLimit(f"formats with a width of {digits[:20]} (at most {MAX_INT_ARGUMENT:,})")


def _check_int_arithmetic(operator: str, left: int, right: int) -> None:
    """Refuse integer arithmetic on or towards numbers past :data:`MAX_INT_BITS`, before it is computed."""
    if operator == "**":
        bits = right * max(abs(left).bit_length() - 1, 0) if right > 0 else 0  # 999999 ** 1000000
    elif operator == "*":
        bits = left.bit_length() + right.bit_length()
    else:  # + - / // %: no larger than the operands (plus one bit)
        bits = max(left.bit_length(), right.bit_length())
    if bits > MAX_INT_BITS:
        raise _TemplateLimit(f"would compute with a number of {bits:,} bits (at most {MAX_INT_BITS:,})")


_budget: contextvars.ContextVar[_Budget | None] = contextvars.ContextVar("edge_runtime_template_budget", default=None)


class _TimedRange(collections.abc.Sequence):
    """A ``range`` (len, indexing, slicing, reversed work as on one) whose iteration checks the render's
    deadline: nested loops over ranges do nothing but iterate, and no other hook sees them."""

    def __init__(self, rng: range) -> None:
        self._range = rng

    def __len__(self) -> int:
        return len(self._range)

    def __getitem__(self, index: Any) -> Any:
        item = self._range[index]
        return _TimedRange(item) if isinstance(item, range) else item

    def __iter__(self) -> Iterator[int]:
        return _ticking(iter(self._range))

    def __reversed__(self) -> Iterator[int]:
        return _ticking(reversed(self._range))

    def __contains__(self, value: object) -> bool:
        return value in self._range

    def __repr__(self) -> str:
        return repr(self._range)


def _ticking(values: Iterator[int]) -> Iterator[int]:
    budget = _budget.get()
    for i, value in enumerate(values):
        if budget is not None and not i & 1023:
            budget.tick()
        yield value


def _limited_range(*args: int) -> _TimedRange:
    from jinja2.sandbox import safe_range

    return _TimedRange(safe_range(*args))  # safe_range refuses more than 100,000 items


def _limited_filter(func: Callable[..., Any], name: str) -> Callable[..., Any]:
    from jinja2 import Environment
    from jinja2.nodes import EvalContext
    from jinja2.runtime import Context

    @functools.wraps(func)  # keeps jinja's pass_context / pass_environment marks
    def checked(*args: Any, **kwargs: Any) -> Any:
        budget = _budget.get()
        if budget is None:
            # jinja folds a filter of constants while compiling, outside any render's limits; failing here
            # makes it leave the call to the render
            raise _TemplateLimit("a filter runs only inside a render")
        # the filtered value, after what jinja passes first to some filters (its context or environment)
        lead = 0
        while lead < len(args) and isinstance(args[lead], (EvalContext, Context, Environment)):
            lead += 1
        if lead < len(args):
            target, rest = _materialized(name, args[lead], list(args[lead + 1:]))
            args = (*args[:lead], target, *rest)
            budget.grows(name, target, rest, kwargs)
            if name == "format" and isinstance(target, str):  # "%200000000s"|format(x)
                budget.format_string(target)
        return budget.call(func, *args, **kwargs)

    return checked


def _checked_join(parts: Iterable[Any]) -> str:
    """``"".join`` of a template's pieces with the result's size checked before it is built: ``a ~ b`` and the
    buffers of set blocks, macros and filter blocks are joined here, and a loop that doubles a string through them
    reached gigabytes between two deadline checks."""
    return "".join(p if isinstance(p, str) else str(p) for p in _weighed(parts))


def _weighed(parts: Iterable[Any]) -> list[Any]:
    """``parts`` as a list, weighed against the render's cap before any of them is turned into text."""
    parts = list(parts)
    budget = _budget.get()
    if budget is not None:
        budget.tick()
        budget.weigh(parts)
    return parts


def _checked_output(value: Any) -> Any:
    """What ``{{ value }}`` writes, weighed before jinja turns it into text (a list's text is built whole)."""
    budget = _budget.get()
    if budget is not None and isinstance(value, (list, tuple, dict)):
        budget.weigh(value)
    return value


def _checked_markup_join(parts: Iterable[Any]) -> str:
    """jinja's ``markup_join`` (``~`` inside ``{% autoescape true %}``), with the same size check."""
    from jinja2.runtime import markup_join

    return markup_join(_weighed(parts))


def _generation_blocks() -> Any:
    """The ``{% generation %}`` ... ``{% endgeneration %}`` tag of transformers' chat templates, which marks the
    assistant's text for training on it alone (TRL writes it into a fine-tune's template): rendered as its body, in
    a block of its own as transformers renders it (a ``set`` inside stays inside)."""
    from jinja2 import nodes
    from jinja2.ext import Extension

    class GenerationBlocks(Extension):
        tags = {"generation"}

        def parse(self, parser: Any) -> Any:
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller: Callable[[], str]) -> str:
            return caller()

    return GenerationBlocks


def _environment() -> Any:
    from jinja2.compiler import CodeGenerator
    from jinja2.exceptions import SecurityError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class LimitedCodeGenerator(CodeGenerator):
        def visit_Concat(self, node: Any, frame: Any) -> None:
            # jinja compiles ``~`` to its own str_join or markup_join, which no sandbox hook sees
            if frame.eval_ctx.volatile:
                self.write("(environment.checked_markup_join if context.eval_ctx.volatile else "
                           "environment.checked_join)((")
            elif frame.eval_ctx.autoescape:
                self.write("environment.checked_markup_join((")
            else:
                self.write("environment.checked_join((")
            for arg in node.nodes:
                self.visit(arg, frame)
                self.write(", ")
            self.write("))")

    class LimitedSandbox(ImmutableSandboxedEnvironment):
        intercepted_binops = frozenset({"+", "-", "*", "/", "//", "%", "**"})
        code_generator_class = LimitedCodeGenerator
        checked_join = staticmethod(_checked_join)
        checked_markup_join = staticmethod(_checked_markup_join)
        concat = staticmethod(_checked_join)  # the generated code's ``concat`` for captured output

        def call(__self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:  # noqa: N805 (jinja's)
            if (isinstance(__obj, (types.MethodType, types.BuiltinMethodType))
                    and getattr(__obj, "__name__", "") in ("format", "format_map")
                    and isinstance(getattr(__obj, "__self__", None), str)):
                # a string's format method reached here unwrapped by jinja's sandboxed formatter (jinja2 3.1.5's
                # |attr handed it so, CVE-2025-27516): its fields read any attribute ("{0.__globals__[os]}", the
                # process's environment and its keys), so it is refused whatever jinja version is installed
                raise SecurityError("a string's format method reached the chat template outside the sandbox")
            budget = _budget.get()
            if budget is None:
                return super().call(__context, __obj, *args, **kwargs)
            # a string method: "...".replace(a, b), .expandtabs(n), .join(items); jinja hands "...".format over
            # wrapped in its own sandboxed formatter
            method = getattr(__obj, "__wrapped__", __obj)
            owner = getattr(method, "__self__", None)
            if isinstance(owner, str):
                name = f"str.{getattr(method, '__name__', '')}"
                if name in _REFUSED_METHODS:
                    raise _TemplateLimit(f"called {name}, which chat templates have no use for and can blow up")
                owner, rest = _materialized(name, owner, list(args))
                budget.grows(name, owner, rest, kwargs)
                args = tuple(rest)
            return budget.call(super().call, __context, __obj, *args, **kwargs)

        def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
            budget = _budget.get()
            if budget is not None:
                budget.tick()
                # by weight: [s] * 300 is 300 copies of s once it is joined or written out
                if operator == "+" and isinstance(left, _SIZED) and isinstance(right, _SIZED):
                    budget.size(_weight(left, budget.max_chars) + _weight(right, budget.max_chars))
                elif operator == "*" and isinstance(left, _SIZED) and isinstance(right, int):
                    budget.size(_weight(left, budget.max_chars) * right)
                elif operator == "*" and isinstance(right, _SIZED) and isinstance(left, int):
                    budget.size(_weight(right, budget.max_chars) * left)
                elif operator == "**" or (operator == "%" and isinstance(left, str)):
                    for value in right if isinstance(right, tuple) else (right,):
                        budget.argument(value)  # 2 ** 10**9 never ends; "%*s" % (10**9, x) allocates a GB
                    if operator == "%":
                        # a mapping's field may repeat: "%(a)s" * 700000 % {"a": s} (checked first: it is cheap)
                        budget.size(len(left) + left.count("%") * _weight(right, budget.max_chars))
                        budget.format_string(left)
                if isinstance(left, int) and isinstance(right, int):
                    _check_int_arithmetic(operator, left, right)
            result = super().call_binop(context, operator, left, right)
            if budget is not None and isinstance(result, _SIZED):
                budget.weigh(result)  # "%s%s" % (s, s) doubles s: at most a few times the limit is ever built
            return result

        def wrap_str_format(self, value: Any) -> Any:
            # jinja sandboxes "...".format when it is looked up, so its string is seen here, not in call()
            budget = _budget.get()
            if budget is not None and getattr(value, "__name__", None) in ("format", "format_map") \
                    and isinstance(getattr(value, "__self__", None), str):
                budget.format_string(value.__self__)
            return super().wrap_str_format(value)

    # loop controls and generation blocks as transformers' chat templates have them ({% break %}, {% continue %},
    # {% generation %}): a template using them failed to compile, refused after a whole bundle build
    env = LimitedSandbox(trim_blocks=True, lstrip_blocks=True, autoescape=False, finalize=_checked_output,
                         extensions=["jinja2.ext.loopcontrols", _generation_blocks()])
    env.filters = {name: _limited_filter(f, name) for name, f in env.filters.items()}
    env.globals["range"] = _limited_range
    # lipsum(n, html, min, max) writes n paragraphs of up to max words in one call the deadline cannot stop (its
    # result weighed only after hundreds of megabytes were built); no chat template uses it
    del env.globals["lipsum"]
    return env


class ChatTemplate:
    def __init__(self, source: str | None, *, bos_token: str = "", eos_token: str = "") -> None:
        from jinja2 import TemplateSyntaxError

        self.source = source
        self._bos, self._eos = bos_token, eos_token
        if not source:
            self._template = None
            return
        env = _environment()
        env.globals["raise_exception"] = _raise_exception
        env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
        # transformers' arguments (separators and sort_keys were taken and ignored: Kimi's compact tools JSON read
        # ", " and ": " where transformers writes "," and ":"), not jinja's HTML escaping
        env.filters["tojson"] = _limited_filter(
            lambda x, indent=None, ensure_ascii=False, separators=None, sort_keys=False, **_: json.dumps(
                x, indent=indent, ensure_ascii=ensure_ascii, separators=separators, sort_keys=sort_keys), "tojson")
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

        messages = list(messages)
        own_chars = sum(len(str(m.get("content") or "")) for m in messages if isinstance(m, dict))
        budget = _Budget(MAX_RENDER_CHARS + 4 * own_chars)
        token = _budget.set(budget)
        try:
            parts, written = [], 0
            # tools and documents are None unless given, as transformers passes them: undefined, "tools is not none"
            # was true and a template wrote its tool section into every prompt
            for part in self._template.generate(
                messages=messages, add_generation_prompt=add_generation_prompt,
                bos_token=self._bos, eos_token=self._eos, **{"tools": None, "documents": None, **extra},
            ):
                written += len(part)
                budget.size(written)
                budget.tick()
                parts.append(part)
            return "".join(parts)
        except _TemplateRaised as err:
            raise InvalidRequestError(f"rejected by the model's chat template: {err}", field="messages") from err
        except _TemplateLimit as err:
            # a template is code that came with the model: one that runs away fails this request, not the process
            raise InvalidRequestError(f"the chat template was stopped: it {err}", field="messages") from err
        except TemplateError as err:
            raise InvalidRequestError(f"the chat template failed on these messages: {err}", field="messages") from err
        except MemoryError as err:
            # what the size checks do not foresee: the allocation that failed is given back as the error unwinds
            raise InvalidRequestError("the chat template was stopped: it ran out of memory", field="messages") from err
        except (ArithmeticError, AttributeError, TypeError, ValueError, LookupError, RecursionError) as err:
            # a template is code that came with the model: its own bugs (1/0, 1 + 'a', endless recursion) are
            # this request's failure, said in one line, not a crash of the caller
            raise InvalidRequestError(f"the chat template failed on these messages: {type(err).__name__}: {err}",
                                      field="messages") from err
        finally:
            _budget.reset(token)
