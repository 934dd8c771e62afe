"""``edge-runtime generate BUNDLE (--prompt TEXT | --chat TEXT | --input FILE.jsonl)``."""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
from typing import Any

from ..config import THREADS_HELP, say, stream_is_utf8
from ..engine import PROMPT_LOOKUP_TOKENS, SUGGESTED_PROMPT_LOOKUP_TOKENS
from ..engine.types import TRUNCATION_HINT
from ..errors import ContextLengthError
from ._flags import naming_flags

_SAMPLING_KEYS = ("max_new_tokens", "temperature", "top_p", "top_k", "seed", "stop", "top_logprobs", "truncate_prompt")
_LINE_KEYS = ("id", "prompt", "messages", *_SAMPLING_KEYS)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="generate text with a bundle")
    p.add_argument("bundle", help="bundle directory, or a known model name with a cached bundle")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="raw text, no chat template")
    src.add_argument("--chat", help="one user message, wrapped in the bundle's chat template")
    src.add_argument("--input", metavar="FILE.jsonl",
                     help='JSON lines ("-": standard input), each {"id": ..., "messages": [...]} or {"id": ..., "prompt": "..."}; '
                          'one output line per input line, in order (blank lines are skipped); exit status 1 '
                          'when any line failed (its output line holds the error)')
    p.add_argument("--max-new-tokens", type=int, default=256, help="at most this many new tokens (default 256)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 means greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default 1.0)")
    p.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens (0: all)")
    p.add_argument("--seed", type=int, help="seed for reproducible sampling")
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--truncate-prompt", action="store_true",
                   help="a prompt too long for the context window loses its beginning instead of failing (a chat keeps "
                        "its template and its message's end)")
    p.add_argument("--top-logprobs", type=int, default=0, help="with --json or --input: include this many alternatives per token")
    p.add_argument("--threads", type=int, help=THREADS_HELP)
    p.add_argument("--prompt-lookup", type=int, default=PROMPT_LOOKUP_TOKENS, metavar="N",
                   help=f"tokens drafted per step from earlier text, checked in the same run "
                        f"(default {PROMPT_LOOKUP_TOKENS}: off; {SUGGESTED_PROMPT_LOOKUP_TOKENS} is a good value)")
    p.add_argument("--provider", action="append", default=[], metavar="NAME",
                   help="onnxruntime execution provider, in order of preference (repeatable; default: CPUExecutionProvider)")
    p.add_argument("--provider-option", action="append", default=[], metavar="NAME:KEY=VALUE",
                   help="an option of one of the --provider providers (repeatable)")
    p.add_argument("--estimator", help="with --json or --input: confidence estimator JSON from `edge-runtime calibrate` "
                        "(default: the built-in generic one)")
    p.add_argument("--json", action="store_true", help="one JSON object per request instead of streamed text")
    p.set_defaults(func=_run)


_NO_ID = object()


def _result_json(result: Any, engine: Any, request_id: Any = _NO_ID, confidence: Any = None) -> dict[str, Any]:
    d = result.to_dict()
    out: dict[str, Any] = {}
    if request_id is not _NO_ID:
        out["id"] = request_id
    out.update({
        "text": d["text"],
        "finish_reason": d["finish_reason"],
        # the first text_tokens tokens made the text; the rest are an eos or a cut stop string's
        "text_tokens": d["text_tokens"],
        # bytes, as OpenAI's logprobs have them: a token holding part of a character has the text "\ufffd", and
        # only its bytes let a client rebuild the text
        "tokens": [{**{k: t[k] for k in ("id", "text", "logprob", "entropy", "margin")},
                    "bytes": engine.token_bytes(t["id"]),
                    **({"top_logprobs": t["top_logprobs"]} if "top_logprobs" in t else {})}
                   for t in d["tokens"]],
        "usage": {k: d["usage"][k] for k in ("prompt_tokens", "completion_tokens", "draft_tokens", "accepted_draft_tokens")},
        "timings": d["timings"],
        "energy": d["energy"],
        "model": d["model"],
    })
    if confidence is not None:
        out["confidence"] = confidence
    return out


def _providers(names: list[str], option_flags: list[str]) -> list[Any]:
    """``--provider`` names with their ``--provider-option NAME:KEY=VALUE`` flags."""
    from ..engine import provider_specs
    from ..errors import InvalidRequestError

    options: dict[str, dict[str, str]] = {}
    for flag in option_flags:
        name, sep, pair = flag.partition(":")
        key, eq, value = pair.partition("=")
        if not (sep and eq and name and key):
            raise InvalidRequestError(f"expected NAME:KEY=VALUE, got {flag!r}", field="--provider-option")
        options.setdefault(name, {})[key] = value
    if options and not names:  # options alone are for the default provider
        names = ["CPUExecutionProvider"]
    return provider_specs(names, options, field="--provider-option")


# the flags that set the request's and the engine's arguments: an error names the flag typed, not the API's name
_FLAG_OF_FIELD = {
    "max_new_tokens": "--max-new-tokens", "temperature": "--temperature", "top_p": "--top-p", "top_k": "--top-k",
    "seed": "--seed", "stop": "--stop", "top_logprobs": "--top-logprobs", "intra_op_threads": "--threads",
    "prompt_lookup": "--prompt-lookup", "prompt": "--prompt", "messages[0].content": "--chat", "providers": "--provider",
}


@naming_flags(_FLAG_OF_FIELD)  # an --input line's own errors are reported in its output line, not there
def _run(args: argparse.Namespace) -> int:
    from ..engine import Engine, SamplingParams
    from ..errors import InvalidRequestError
    from ..models import resolve_bundle

    _check_standard_streams(args)
    if not args.json and args.input is None:
        # streamed text has no place for them: refused rather than silently dropped
        for flag, given in (("--top-logprobs", args.top_logprobs), ("--estimator", args.estimator)):
            if given:
                raise InvalidRequestError("is shown only in JSON output: add --json (or use --input)", field=flag)
    params = SamplingParams(
        max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
        seed=args.seed, stop=tuple(args.stop), top_logprobs=args.top_logprobs, truncate_prompt=args.truncate_prompt,
    )
    with contextlib.ExitStack() as stack:
        lines = None
        if args.input is not None:
            # opened before the model loads, so a wrong path is reported at once; read as
            # bytes, line by line, so a line that is not UTF-8 is one bad line, not a crash
            try:
                lines = sys.stdin.buffer if args.input == "-" else stack.enter_context(open(args.input, "rb"))
            except OSError as err:
                raise InvalidRequestError(f"cannot read {args.input}: {err.strerror or err}", field="--input") from err
        engine = Engine(resolve_bundle(args.bundle), intra_op_threads=args.threads, prompt_lookup=args.prompt_lookup,
                        providers=_providers(args.provider, args.provider_option) or None)
        stack.callback(engine.close)
        estimator = _load_estimator(args.estimator, engine, shown=args.json or args.input is not None)
        return _generate(args, engine, estimator, params, lines)


def _generate(args: argparse.Namespace, engine: Any, estimator: Any, params: Any, lines: Any) -> int:
    """One request from the flags, or one per line of the ``--input`` file (``lines``)."""
    if lines is None:
        messages = [{"role": "user", "content": args.chat}] if args.chat is not None else None
        prompt = args.prompt if args.chat is None else None
        try:
            if args.json:
                result = engine.generate(prompt, messages=messages, params=params, prompt_nll=estimator.needs_prompt_nll)
                print(_json_line(_result_json(result, engine, confidence=_confidence(estimator, engine, result, messages, prompt))))
            else:
                for chunk in engine.stream(prompt, messages=messages, params=params):
                    sys.stdout.write(chunk.text)
                    sys.stdout.flush()
                sys.stdout.write("\n")
        except ContextLengthError as err:  # the advice in the flags' words (the API's names meant nothing here)
            flag = "--chat" if args.chat is not None else "--prompt"
            text = str(err).split(": ", 1)[-1].replace(TRUNCATION_HINT, ", or add --truncate-prompt to keep its end")
            raise ContextLengthError(text.replace("max_new_tokens", "--max-new-tokens"),
                                     field="--max-new-tokens" if err.field == "max_new_tokens" else flag) from err
        return 0
    failures = answered = 0
    for lineno, raw in enumerate(lines, 1):
        if not raw.strip():
            continue
        out, ok = _answer_line(engine, estimator, params, raw, lineno)
        failures += not ok
        answered += 1
        print(_json_line(out), flush=True)
    if failures:  # the exit status alone reads like a command that stopped; this one wrote every line
        say(f"edge-runtime generate: {failures} of {answered} input lines failed (see the \"error\" in their output lines)")
    return 1 if failures else 0


def _check_standard_streams(args: argparse.Namespace) -> None:
    """Refuse before the model loads what would lose the answer or crash after it: a closed stdout (``>&-``; Python
    then prints nothing, silently), a closed stdin for ``--input -``. Escape what a non-UTF-8 stdout cannot encode."""
    from ..errors import InvalidRequestError

    if sys.stdout is None:
        raise InvalidRequestError("standard output is closed: the answer would be lost", field="stdout")
    if args.input == "-" and sys.stdin is None:
        raise InvalidRequestError("standard input is closed", field="--input")


def _stdout_is_utf8() -> bool:
    return stream_is_utf8(sys.stdout)


def _json_line(obj: Any) -> str:
    """One JSON line, UTF-8 as it is; escaped when it holds what UTF-8 cannot (a lone surrogate in an input id)
    or standard output is not UTF-8 (``PYTHONIOENCODING=ascii``, a Latin-1 locale): JSON either way."""
    line = json.dumps(obj, ensure_ascii=False)
    try:
        line.encode("utf-8")
    except UnicodeEncodeError:
        return json.dumps(obj, ensure_ascii=True)
    return line if _stdout_is_utf8() else json.dumps(obj, ensure_ascii=True)


def _finite_float(text: str) -> float:
    # 1e400 is valid JSON but no double: echoed back (an id) it would print as Infinity, which is not JSON
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"the number {text} is outside a double's range")
    return value


def _not_json(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")  # Python's json reads NaN and Infinity unless told not to


def _answer_line(engine: Any, estimator: Any, params: Any, raw: bytes, lineno: int) -> tuple[dict[str, Any], bool]:
    """One ``--input`` line's output object, and whether it succeeded.

    A bad line is reported in place (the batch goes on): its ``id`` when it has
    one, else the line number, and the error naming the field.
    """
    from ..engine.types import has_half_character, well_formed
    from ..errors import EdgeRuntimeError, InvalidRequestError

    request_id: Any = lineno
    try:
        try:
            # a BOM may open the first line of a file saved by a Windows editor
            line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
        except UnicodeDecodeError as err:
            raise InvalidRequestError(f"line {lineno} is not valid UTF-8 (byte {err.start})", field="line") from err
        try:
            item = json.loads(line, parse_float=_finite_float, parse_constant=_not_json)
        except json.JSONDecodeError as err:  # (its msg for a control character ends in "at", the column left out)
            raise InvalidRequestError(f"line {lineno} is not valid JSON: {err.msg.removesuffix(' at')} at column "
                                      f"{err.colno}", field="line") from err
        except ValueError as err:  # an integer past Python's 4,300-digit limit, a number past a double's range
            raise InvalidRequestError(f"line {lineno} is not usable JSON: {err}", field="line") from err
        except RecursionError as err:
            raise InvalidRequestError(f"line {lineno} is nested too deeply", field="line") from err
        if not isinstance(item, dict):
            raise InvalidRequestError(f"line {lineno} must be a JSON object", field="line")
        request_id = item.get("id", lineno)
        if has_half_character(request_id):  # half a character ("\ud800"): echoed, strict JSON readers refuse the line
            request_id = lineno
            raise InvalidRequestError(f"line {lineno}: the id is not valid UTF-8 (surrogates not allowed)", field="id")
        unknown = sorted(set(item) - set(_LINE_KEYS))
        if unknown:
            raise InvalidRequestError(f"line {lineno}: unknown key(s) {', '.join(unknown)} (known: {', '.join(_LINE_KEYS)})",
                                      field=unknown[0])
        if ("messages" in item) == ("prompt" in item):
            raise InvalidRequestError(f"line {lineno} needs exactly one of messages or prompt", field="messages")
        # null means "the default", as OpenAI clients send it
        overrides = {k: (tuple(item[k]) if k == "stop" and isinstance(item[k], list) else item[k])
                     for k in _SAMPLING_KEYS if item.get(k) is not None}
        p = params.replace(**overrides) if overrides else params
        result = engine.generate(item.get("prompt"), messages=item.get("messages"), params=p, prompt_nll=estimator.needs_prompt_nll)
        return _result_json(result, engine, request_id, _confidence(estimator, engine, result, item.get("messages"), item.get("prompt"))), True
    except EdgeRuntimeError as err:
        # "line" too: a line with no readable id is reported under its line number. A message or param may echo an
        # unknown key with half a character in it: not echoed as such (strict JSON readers refuse the line)
        field = getattr(err, "field", None)
        return {"id": request_id, "line": lineno,
                "error": {"message": well_formed(str(err)), "type": type(err).__name__,
                          "param": well_formed(field) if isinstance(field, str) else field}}, False


def _load_estimator(path: str | None, engine: Any, *, shown: bool = True) -> Any:
    """The confidence estimator (``--estimator`` or the built-in default), checked against the bundle; when its
    p_correct is ``shown``, a warning if it was fitted on another model."""
    import logging

    from ..confidence import fitted_on_another_model, load_estimator

    estimator = load_estimator(path, bundle_hash=engine.bundle_hash, legacy_hash=engine.legacy_bundle_hash)
    if shown and (elsewhere := fitted_on_another_model(estimator, engine.model_name)):
        logging.getLogger("edge_runtime.generate").warning("%s", elsewhere)
    return estimator


def _confidence(estimator: Any, engine: Any, result: Any, messages: Any, prompt: Any) -> dict[str, Any]:
    from ..confidence import no_answer, signals_from_result

    if no_answer(result.text):  # as the daemon reports it: no answer is not a confident one
        return {"p_correct": 0.0, "estimator": estimator.name}
    signals = signals_from_result(result, messages=messages, prompt=prompt)
    p = estimator.p_correct(signals, engine=engine, messages=messages)
    return {"p_correct": round(float(p), 4), "estimator": estimator.name}
