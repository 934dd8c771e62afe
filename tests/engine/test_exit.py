"""An interpreter exiting while a daemon thread generates: no abort (each case in its own interpreter)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

GENERATING_AT_EXIT = textwrap.dedent("""
    import sys, threading, time
    from edge_runtime.engine import Engine

    engine = Engine(sys.argv[1])
    running = threading.Event()

    def work():
        while True:
            running.set()
            engine.generate("Once upon a time", max_new_tokens=200)

    threading.Thread(target=work, daemon=True).start()
    running.wait()
    time.sleep(0.5)
    engine.close()  # lets the running generation finish: it is not what prevents the abort
    print("main done", flush=True)
""")


def test_exiting_while_a_daemon_thread_generates_does_not_abort(smollm2_int4: Path) -> None:
    # Python ends such a thread by unwinding it as it leaves onnxruntime; through onnxruntime's C++ frames that
    # was SIGABRT ("terminate called without an active exception"), 2 runs in 3 here with the real model
    for _ in range(2):
        done = subprocess.run([sys.executable, "-c", GENERATING_AT_EXIT, str(smollm2_int4)],
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr[-2000:]
        assert "main done" in done.stdout and "terminate called" not in done.stderr


def test_after_the_exit_hook_new_runs_are_refused(tiny_bundle: Path) -> None:
    script = textwrap.dedent("""
        import sys
        from edge_runtime import _exit
        from edge_runtime.engine import Engine
        from edge_runtime.errors import EdgeRuntimeError

        engine = Engine(sys.argv[1])
        assert _exit._wait_at_exit(1.0)  # nothing running: returns at once
        try:
            engine.generate("hi", max_new_tokens=2)
        except EdgeRuntimeError as err:
            print("refused:", err)
    """)
    done = subprocess.run([sys.executable, "-c", script, str(tiny_bundle)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "refused: the interpreter is exiting" in done.stdout


def test_the_readme_asyncio_recipe_stops_the_generation_it_cancels(smollm2_int4: Path) -> None:
    # cancelling the task alone left the thread generating: the next request waited for the only KV cache
    import asyncio
    import threading
    import time

    from edge_runtime.hybrid import HybridRuntime

    finished = []  # what the threads' calls returned (the cancelled task's result is dropped by asyncio)

    def chat(runtime, messages, **kwargs):
        result = runtime.chat(messages, **kwargs)
        finished.append(result)
        return result

    async def answer(runtime, messages, **sampling):  # the README's recipe
        cancel = threading.Event()
        try:
            return await asyncio.to_thread(chat, runtime, messages, cancel=cancel, **sampling)
        except asyncio.CancelledError:
            cancel.set()
            raise

    async def main(runtime) -> None:
        story = [{"role": "user", "content": "Tell me a very long story."}]
        task = asyncio.create_task(answer(runtime, story, max_new_tokens=2000, temperature=0.8, seed=1))
        await asyncio.sleep(0.5)
        task.cancel()
        result = await answer(runtime, [{"role": "user", "content": "Hi"}], max_new_tokens=1)
        assert result.route == "local"

    with HybridRuntime.from_config({"engine": {"bundle": str(smollm2_int4)}, "policy": {"type": "never"}}) as runtime:
        asyncio.run(main(runtime))
    deadline = time.monotonic() + 10
    while len(finished) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    story = next(r for r in finished if r.usage["local"]["completion_tokens"] != 1)
    # stopped where it was cancelled: uncancelled, it runs to its end (eos after ~300 tokens, or 2,000)
    assert story.finish_reason == "cancelled", (story.finish_reason, story.usage)


def test_a_forked_child_does_not_wait_for_its_parents_runs_at_exit() -> None:
    # a child forked while a parent's thread was inside onnxruntime inherited the count, and waited 5 s at exit
    script = textwrap.dedent("""
        import os, sys, threading, time
        from edge_runtime import _exit

        inside, done = threading.Event(), threading.Event()

        def run():  # a parent's thread inside onnxruntime when the fork happens
            with _exit.native_call():
                inside.set()
                done.wait()

        threading.Thread(target=run).start()
        inside.wait()
        pid = os.fork()
        if pid == 0:
            sys.exit(0)  # atexit runs here, as in a gunicorn worker
        started = time.monotonic()
        os.waitpid(pid, 0)
        print(f"child exited in {time.monotonic() - started:.2f} s")
        done.set()
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr[-2000:]
    assert float(done.stdout.split()[3]) < 2.0, done.stdout


def test_exiting_while_a_daemon_thread_loads_a_model_does_not_abort(smollm2_int4: Path) -> None:
    # the tokenizer's load (tokenizers' Rust frames) aborted as onnxruntime's runs did: 10 of 15 such exits here
    script = textwrap.dedent("""
        import sys, threading, time
        from edge_runtime.engine import Engine

        threading.Thread(target=lambda: Engine(sys.argv[1]), daemon=True).start()
        time.sleep(float(sys.argv[2]))  # a GUI closed right after it started loading
    """)
    for delay_s in ("0.05", "0.1", "0.15", "0.2"):
        done = subprocess.run([sys.executable, "-c", script, str(smollm2_int4), delay_s],
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, (delay_s, done.stderr[-2000:])


def test_exiting_while_a_daemon_thread_encodes_a_long_prompt_does_not_abort(smollm2_int4: Path) -> None:
    # a prompt over 16,384 characters is encoded with the GIL released, in tokenizers' Rust code: 10 of 10 aborted
    script = textwrap.dedent("""
        import sys, threading, time
        from edge_runtime.engine import Engine

        engine = Engine(sys.argv[1])
        text = "word " * 4000

        def work():
            while True:
                engine.count_tokens(text)

        threading.Thread(target=work, daemon=True).start()
        time.sleep(0.3)
    """)
    for _ in range(3):
        done = subprocess.run([sys.executable, "-c", script, str(smollm2_int4)], capture_output=True, text=True,
                              timeout=120)
        assert done.returncode == 0, done.stderr[-2000:]
