"""onnxruntime session and an in-place KV cache bound through IO binding.

The bundle's graph (see ``quantize.graph``) uses GroupQueryAttention with the
past and present KV tensors sharing one buffer of fixed capacity. Each
:class:`KVCache` owns those buffers and an IO binding that binds every layer's
buffer as both input and output once; a decode step then only rewrites four
tiny input arrays in place (token ids, position, total length, logits index)
and runs. Nothing the size of the cache is copied per token. A step may feed
a few tokens (the next one and prompt-lookup drafts); each row count has its
own arrays, bound when the count changes.
"""

from __future__ import annotations

import logging
import mmap
import numbers
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from ..bundle import Manifest
from ..config import MAX_THREADS
from ..errors import BundleError, EdgeRuntimeError, InvalidRequestError, OutOfMemoryError
from .._exit import native_call

__all__ = ["OrtModel", "KVCache", "check_onnxruntime", "default_threads", "session_options"]

log = logging.getLogger(__name__)

SUPPORTED_IO_SCHEMAS = ("edge-runtime-gqa-v1",)


def _out_of_memory(err: BaseException) -> bool:
    """An onnxruntime error that is a failed allocation (C++'s ``std::bad_alloc``), not a problem of the model."""
    return isinstance(err, MemoryError) or "bad_alloc" in str(err)


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split())[:300] or type(err).__name__


# onnxruntime 1.23-1.26 load quantized bundles and compute their 4-bit embedding lookup (GatherBlockQuantized with
# zero points) wrongly: garbage answers with confident log-probabilities. 1.20-1.22 refuse the graph.
MIN_ONNXRUNTIME_QUANTIZED = (1, 27)


def check_onnxruntime(version: str, precision: str) -> None:
    """Refuse a quantized bundle under an onnxruntime that computes it wrongly (setup.py's floor, for forced installs)."""
    if precision == "fp32":
        return
    try:
        found = tuple(int(part) for part in version.split(".")[:2])
    except ValueError:  # a development build ("1.28.0.dev...") has numbers first; anything else is not judged
        return
    if found < MIN_ONNXRUNTIME_QUANTIZED:
        need = ".".join(map(str, MIN_ONNXRUNTIME_QUANTIZED))
        raise BundleError(f"this {precision} bundle needs onnxruntime >= {need}, and {version} is installed: versions "
                          f"before {need} compute its 4-bit embedding lookup wrongly "
                          f"(pip install --upgrade 'onnxruntime>={need}')")


def default_threads() -> int:
    """Physical cores (hyper-threads share the FPU and only add contention for matmuls), fewer when the
    process's CPU affinity or cgroup quota allows fewer CPUs (see ``edge_runtime._cpus``)."""
    from .._cpus import cpu_limits

    limits = cpu_limits()
    if limits.usable < limits.physical:
        log.info("%d intra-op thread(s), not one per core (%d): the process is held to %s",
                 limits.usable, limits.physical, " and ".join(limits.held_by()))
    return limits.usable


def check_providers(providers: str | Sequence[str | tuple[str, Mapping[str, Any]]] | None) -> list[Any]:
    """The provider list for onnxruntime (CPU alone by default), each entry a name or (name, options), all of them
    in this onnxruntime build; else InvalidRequestError naming ``providers``. Without a model: ``serve --check``
    asks it too (a daemon started with a provider it lacked failed once it was listening)."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    if isinstance(providers, str):  # one name, not a list of one-letter names
        providers = [providers]
    wanted = list(providers) if providers else ["CPUExecutionProvider"]
    for i, p in enumerate(wanted):  # a name, or (name, {option: value}): onnxruntime ignores anything else unsaid
        if not (isinstance(p, str) or (isinstance(p, tuple) and len(p) == 2 and isinstance(p[0], str)
                                       and isinstance(p[1], Mapping))):
            raise InvalidRequestError(f"must be a provider name or (name, {{option: value}}), got {p!r:.60}",
                                      field=f"providers[{i}]")
    names = [p if isinstance(p, str) else p[0] for p in wanted]
    missing = [n for n in names if n not in available]
    if missing:
        raise InvalidRequestError(
            f"execution provider(s) {', '.join(missing)} not available in this onnxruntime build (available: {', '.join(available)})",
            field="providers",
        )
    return wanted


def session_options(threads: int, session_config: Mapping[str, str] | None = None) -> Any:
    """The engine's onnxruntime session options (also used by ``benchmarks/decode_step.py``)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    # the graph is already fused by the bundle builder; extended optimizations only add load time
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    so.log_severity_level = 3
    # Memory patterns (one planned block per run, per input shape) raised peak RSS by 5 MB
    # with 128-token prompt chunks and 22 MB with 512-token ones; decoding was no faster with them.
    so.enable_mem_pattern = False
    for key, value in (session_config or {}).items():
        so.add_session_config_entry(str(key), str(value))
    return so


class OrtModel:
    """One inference session for a bundle; thread-safe (each KVCache has its own binding)."""

    def __init__(
        self,
        manifest: Manifest,
        *,
        providers: Sequence[str | tuple[str, Mapping[str, Any]]] | None = None,
        intra_op_threads: int | None = None,
        session_config: Mapping[str, str] | None = None,
    ) -> None:
        import onnxruntime as ort

        if manifest.io_schema not in SUPPORTED_IO_SCHEMAS:
            raise BundleError(f"bundle graph contract {manifest.io_schema!r} is not supported by this runtime (supported: {', '.join(SUPPORTED_IO_SCHEMAS)})")
        check_onnxruntime(ort.__version__, manifest.precision)
        self.manifest = manifest
        m = manifest.model
        self.num_layers = int(m["num_layers"])
        self.num_kv_heads = int(m["num_kv_heads"])
        self.head_dim = int(m["head_dim"])
        self.vocab_size = int(m["vocab_size"])
        self.context_length = int(m["context_length"])
        if intra_op_threads is not None and (isinstance(intra_op_threads, bool)
                                             or not isinstance(intra_op_threads, numbers.Integral)
                                             or not 1 <= intra_op_threads <= MAX_THREADS):
            raise InvalidRequestError(f"must be an integer from 1 to {MAX_THREADS}, got {intra_op_threads!r}",
                                      field="intra_op_threads")
        self.threads = int(intra_op_threads) if intra_op_threads is not None else default_threads()

        if os.environ.get("ORT_DISABLE_TELEMETRY") == "1":
            # onnxruntime loaded before edge_runtime (the application imported it first) missed the variable;
            # this at least stops its events from here on
            ort.disable_telemetry_events()
        so = session_options(self.threads, session_config)
        wanted = check_providers(providers)
        try:
            with native_call():
                self.session = ort.InferenceSession(str(manifest.model_file), so, providers=wanted)
        except EdgeRuntimeError:
            raise
        except Exception as err:  # onnxruntime raises its own Fail/InvalidGraph types
            if _out_of_memory(err):
                raise OutOfMemoryError(f"not enough memory to load {manifest.model_file} "
                                       f"(onnxruntime: {_one_line(err)})") from err
            raise BundleError(f"onnxruntime cannot load {manifest.model_file}: {err}") from err
        self.providers = self.session.get_providers()
        self._ort = ort
        self._check_graph(manifest)

    def _check_graph(self, manifest: Manifest) -> None:
        """The manifest's dimensions must be the graph's: else every request would fail deep in onnxruntime."""
        inputs = {i.name: i.shape for i in self.session.get_inputs()}
        layers = sum(1 for name in inputs if name.startswith("past_key_values.") and name.endswith(".key"))
        first = inputs.get("past_key_values.0.key") or []
        logits = next((o.shape for o in self.session.get_outputs() if o.name == "logits"), None) or []
        for field, stated, actual in (("model.num_layers", self.num_layers, layers),
                                      ("model.num_kv_heads", self.num_kv_heads, first[1] if len(first) == 4 else None),
                                      ("model.head_dim", self.head_dim, first[3] if len(first) == 4 else None),
                                      ("model.vocab_size", self.vocab_size, logits[-1] if logits else None)):
            if isinstance(actual, int) and actual != stated:  # a symbolic dimension cannot be checked
                raise BundleError(f"{manifest.bundle_dir}: manifest field {field!r} is {stated}, but "
                                  f"{manifest.model_file.name} has {actual}")

    def new_cache(self, capacity: int) -> KVCache:
        return KVCache(self, capacity)


class KVCache:
    """Preallocated KV buffers for one sequence, bound once, grown by doubling when needed."""

    def __init__(self, model: OrtModel, capacity: int) -> None:
        self.model = model
        self.capacity = 0
        self.length = 0  # tokens whose keys/values are in the cache
        self.tokens: list[int] = []  # those tokens, for prefix reuse across chat turns
        # how many leading entries came from multi-row prefill runs (not one-row decode steps), whose
        # numbers a fresh prefill of the same tokens reproduces exactly (see Engine.run)
        self.prefilled = 0
        ort = model._ort
        self._ort = ort
        self.binding = model.session.io_binding()
        self._buffers: list[np.ndarray] = []
        self._values: list[Any] = []
        self._allocate(max(16, min(capacity, model.context_length)))
        # decode-step inputs and logits per row count (1, or 1 + drafted tokens), rewritten in place every step
        self._steps: dict[int, tuple[list[np.ndarray], list[Any]]] = {}
        self._bound_rows = 0  # the row count whose step arrays are bound (0: a prefill rebound the inputs)

    def _allocate(self, capacity: int) -> None:
        m = self.model
        old = self._buffers
        shape = (1, m.num_kv_heads, capacity, m.head_dim)
        per_buffer = int(np.prod(shape))
        # One anonymous mapping for all of them, not an allocation each: freed, it goes back to the system at
        # once. Freed malloc blocks of a few MB (one layer's buffer) stayed in the process's heap, so a cache
        # shrunk after a long request kept its memory (RSS 432 MB after a 3,000-token prompt, 295 MB before it).
        # Its pages are zero and take no memory until written, as calloc's.
        # private: a forked child (gunicorn's preload, multiprocessing) writing its cache must not write the
        # parent's, as a shared mapping (mmap's default) would
        private = {"flags": mmap.MAP_PRIVATE} if hasattr(mmap, "MAP_PRIVATE") else {}
        try:
            region = mmap.mmap(-1, max(1, 2 * m.num_layers * per_buffer * 4), **private)
        except OSError as err:  # ENOMEM, or an address-space limit (ulimit -v)
            raise MemoryError(f"cannot map {2 * m.num_layers * per_buffer * 4} bytes for the KV cache") from err
        flat = np.frombuffer(region, dtype=np.float32)
        buffers = []
        for i in range(2 * m.num_layers):
            buf = flat[i * per_buffer:(i + 1) * per_buffer].reshape(shape)
            if old:
                buf[:, :, : self.length] = old[i][:, :, : self.length]
            buffers.append(buf)
        values = [self._ort.OrtValue.ortvalue_from_numpy(b) for b in buffers]
        # kept only once every buffer exists: a failed allocation (out of memory) leaves the cache as it was
        self._buffers, self._values = buffers, values
        for layer in range(m.num_layers):
            for j, kind in enumerate(("key", "value")):
                value = self._values[2 * layer + j]
                self.binding.bind_ortvalue_input(f"past_key_values.{layer}.{kind}", value)
                self.binding.bind_ortvalue_output(f"present.{layer}.{kind}", value)
        self.capacity = capacity

    def reserve(self, total_tokens: int, *, exact: bool = False) -> None:
        """Make room for ``total_tokens`` (grows by doubling, never past the context window). ``exact``: a request
        that knows its whole length grows once, to that (rounded up to 64): doubling step by step held the old
        and the new buffers at once, and ended up to twice as large as needed (8192 places for 4,200 tokens)."""
        if total_tokens <= self.capacity:
            return
        limit = self.model.context_length
        if total_tokens > limit:
            raise InvalidRequestError(f"{total_tokens} tokens exceed the context window of {limit}", field="max_new_tokens")
        if exact:
            new = -(-total_tokens // 64) * 64
        else:
            new = self.capacity
            while new < total_tokens:
                new *= 2
        self._allocate(min(new, limit))

    def shrink(self, capacity: int) -> None:
        """Give back the memory past ``capacity`` tokens, keeping the first ones for prefix reuse."""
        capacity = max(16, min(capacity, self.model.context_length))
        if self.capacity <= capacity:
            return
        self.truncate(capacity)
        self._allocate(capacity)

    def truncate(self, length: int) -> None:
        """Forget everything after the first ``length`` tokens (their slots are simply overwritten later)."""
        self.length = max(0, min(self.length, length))
        self.prefilled = min(self.prefilled, self.length)
        del self.tokens[self.length:]

    @property
    def nbytes(self) -> int:
        return sum(b.nbytes for b in self._buffers)

    def prefill(self, ids: Sequence[int], *, all_logits: bool = False) -> np.ndarray:
        """Append ``ids`` to the cache; return logits [N, vocab] for the last position (or all of them)."""
        n = len(ids)
        if n == 0:
            raise InvalidRequestError("no tokens to process", field="prompt")
        self.reserve(self.length + n)
        total = self.length + n
        b = self.binding
        ids_arr = np.asarray(ids, dtype=np.int64).reshape(1, n)
        index = np.arange(n, dtype=np.int64) if all_logits else np.array([n - 1], np.int64)
        logits = np.empty((1, index.shape[0], self.model.vocab_size), np.float32)
        b.bind_cpu_input("input_ids", ids_arr)
        b.bind_cpu_input("seqlens_k", np.array([total - 1], np.int32))
        b.bind_cpu_input("total_sequence_length", np.array(total, np.int32))
        b.bind_cpu_input("logits_index", index)
        b.bind_ortvalue_output("logits", self._ort.OrtValue.ortvalue_from_numpy(logits))
        self._bound_rows = 0
        self._run()
        self._appended(ids)
        return logits[0]

    def step(self, token: int) -> np.ndarray:
        """Feed one token; return the next-token logits [vocab] (a view, valid until the next step)."""
        return self.step_many((token,))[0]

    def step_many(self, tokens: Sequence[int]) -> np.ndarray:
        """Feed a few tokens in one run; return the logits after each [n, vocab] (a view, valid until the next step).

        A decode step with drafted tokens (see ``Engine.run``). The step's arrays
        for each row count are allocated and bound once, so a step only writes
        the token ids and positions.
        """
        n = len(tokens)
        self.reserve(self.length + n)
        arrays, values = self._steps.get(n) or self._step_arrays(n)
        if self._bound_rows != n:
            b = self.binding
            for name, value in zip(("input_ids", "seqlens_k", "total_sequence_length", "logits_index"), values):
                b.bind_ortvalue_input(name, value)
            b.bind_ortvalue_output("logits", values[4])
            self._bound_rows = n
        ids, seqlens, total, _, logits = arrays
        ids[0, :] = tokens
        seqlens[0] = self.length + n - 1
        total[...] = self.length + n
        self._run()
        self._appended(tokens)
        return logits[0]

    def _appended(self, ids: Sequence[int]) -> None:
        """Account for ``ids`` just run into the cache."""
        n = len(ids)
        if n > 1 and self.prefilled == self.length:  # a multi-row run computes what a prefill does (see Engine.run)
            self.prefilled += n
        self.length += n
        self.tokens.extend(int(t) for t in ids)

    def _step_arrays(self, n: int) -> tuple[list[np.ndarray], list[Any]]:
        arrays = [np.zeros((1, n), np.int64), np.zeros((1,), np.int32), np.zeros((), np.int32),
                  np.arange(n, dtype=np.int64), np.zeros((1, n, self.model.vocab_size), np.float32)]
        entry = (arrays, [self._ort.OrtValue.ortvalue_from_numpy(a) for a in arrays])
        self._steps[n] = entry
        return entry

    def _run(self) -> None:
        try:
            with native_call():
                self.model.session.run_with_iobinding(self.binding)
        except EdgeRuntimeError:
            raise
        except Exception as err:  # translate onnxruntime's errors at the boundary
            if _out_of_memory(err):
                raise OutOfMemoryError(f"not enough memory to run the model (onnxruntime: {_one_line(err)})") from err
            raise EdgeRuntimeError(f"onnxruntime failed while running the model: {err}") from err
