"""The ``onnx`` backend: a model bundle run by this project's engine, in the bridge's process."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from typing import Any

from edge_runtime.errors import BackendError, BundleError, ConfigError, ContextLengthError, InvalidRequestError

from .._settings import OnnxModelSettings
from ._base import BackendChunk, BackendRequest, BackendResult, CancelToken, fit_to_window

__all__ = ["OnnxBackend"]

# the Engine's arguments that are this backend's settings, by the settings' names
_SETTING_OF_ARGUMENT = {"intra_op_threads": "intra_op_threads", "max_sessions": "workers"}


def _load_engine(settings: OnnxModelSettings) -> Any:
    from edge_runtime.engine import Engine  # heavy (onnxruntime): only when an onnx alias is served

    return Engine(settings.bundle, intra_op_threads=settings.intra_op_threads, max_sessions=settings.workers)


class OnnxBackend:
    kind = "onnx"

    def __init__(
        self, settings: OnnxModelSettings, *, engine_factory: Callable[[OnnxModelSettings], Any] = _load_engine
    ) -> None:
        self.settings = settings
        # the bridge's worker slots let at most `workers` requests in, and the engine gets as many sessions
        try:
            self.engine = engine_factory(settings)
        except BundleError as err:  # the bundle is a settings value: say which (the bridge adds the alias)
            raise ConfigError(str(err), field="bundle") from err
        except InvalidRequestError as err:
            # an argument the Engine refused is a setting of this alias: a ConfigError, which the bridge names
            # models.<alias>.<setting> (an error naming only the Engine's argument did not say which alias)
            setting_name = _SETTING_OF_ARGUMENT.get(err.field or "")
            if setting_name is None:
                raise
            raise ConfigError(str(err).removeprefix(f"{err.field}: "), field=setting_name) from err
        self.model = str(self.engine.model_name)
        self.context_length = int(self.engine.context_length or 0)
        # the files' hash, as bridges reported it before manifests were hashed: devices' cloud priors fitted
        # against them record it (a changed revision warns them to refit), and the whole bundle's hash beside it
        self.revision = str(getattr(self.engine, "legacy_bundle_hash", "") or "")
        self.bundle_revision = str(getattr(self.engine, "bundle_hash", "") or "")

    def _result(self, result: Any) -> BackendResult:
        return BackendResult(
            text=result.text,
            finish_reason=result.finish_reason,
            prompt_tokens=result.usage.prompt_tokens,
            completion_tokens=result.usage.completion_tokens,
            model=result.model or self.model,
            ttft_ms=result.timings.ttft_ms,
        )

    def _fitted(self, request: BackendRequest, err: ContextLengthError) -> BackendRequest:
        """``request`` with the bridge's default length cut to what the prompt leaves of the window, or the engine's
        context error named by the bridge's rule (the engine names ``messages`` also when the prompt fits and only
        max_new_tokens is too large). The prompt is counted again only on this rare path: the engine refuses a
        request too long for its window before any work."""
        try:
            return fit_to_window(request, len(self.engine.encode(messages=request.messages)), self.context_length)
        except ContextLengthError as named:
            raise named from err

    def generate(self, request: BackendRequest, cancel: CancelToken) -> BackendResult:
        try:
            try:
                result = self.engine.generate(messages=request.messages, params=request.params, cancel=cancel)
            except ContextLengthError as err:
                request = self._fitted(request, err)
                result = self.engine.generate(messages=request.messages, params=request.params, cancel=cancel)
        except InvalidRequestError:  # the caller's fault, not the engine's (ContextLengthError among them)
            raise
        except Exception as err:
            raise BackendError(f"engine failed: {type(err).__name__}: {err}", reason="ENGINE_FAILED") from err
        return self._result(result)

    def stream(self, request: BackendRequest, cancel: CancelToken) -> Iterator[BackendChunk]:
        try:
            try:  # the engine refuses a request too long for its window here, before any work
                chunks = self.engine.stream(messages=request.messages, params=request.params, cancel=cancel)
                first = next(chunks, None)
            except ContextLengthError as err:
                request = self._fitted(request, err)
                chunks = self.engine.stream(messages=request.messages, params=request.params, cancel=cancel)
                first = next(chunks, None)
            for chunk in itertools.chain(() if first is None else (first,), chunks):
                if chunk.result is not None:
                    yield BackendChunk(chunk.text, 1 if chunk.token is not None else 0, self._result(chunk.result))
                    return
                yield BackendChunk(chunk.text, 1 if chunk.token is not None else 0)
        except InvalidRequestError:
            raise
        except Exception as err:
            raise BackendError(f"engine failed: {type(err).__name__}: {err}", reason="ENGINE_FAILED") from err
        raise BackendError("engine stream ended without a result", reason="ENGINE_FAILED")

    def close(self) -> None:
        self.engine.close()
