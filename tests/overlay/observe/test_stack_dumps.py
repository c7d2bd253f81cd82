"""SIGUSR1/SIGQUIT stack dumps (overlay.observe.log.install_stack_dumps) in a child process: they
must never take the process down, also while threads start and end (faulthandler's
all-thread dump from the signal handler crashed with SIGSEGV within milliseconds of
this), and the thread stacks still print while a callback keeps the event loop busy."""

from __future__ import annotations

import subprocess
import sys
import textwrap

CHILD = textwrap.dedent(
    """
    import asyncio, os, signal, sys, threading, time
    from overlay.node import lifecycle
    from overlay.observe import log

    def churn(stop):  # a thread pool growing and shrinking, as fast as it can
        while not stop.is_set():
            t = threading.Thread(target=sum, args=(range(100),))
            t.start()
            t.join()

    def signaller(count):
        for _ in range(count):
            os.kill(os.getpid(), signal.SIGUSR1)
            time.sleep(0.001)
        os.kill(os.getpid(), signal.SIGQUIT)

    def busy_callback(seconds):  # keeps the loop from its next turn
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            pass

    async def main(mode):
        loop = asyncio.get_running_loop()
        quit = asyncio.Event()
        log.install_stack_dumps(loop, quit.set)
        stop = threading.Event()
        churners = [threading.Thread(target=churn, args=(stop,)) for _ in range(2)]
        if mode == "churn":
            for t in churners:
                t.start()
            threading.Thread(target=signaller, args=(int(sys.argv[2]),)).start()
        else:
            loop.call_soon(busy_callback, 1.0)
            threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGQUIT)).start()
        await asyncio.wait_for(quit.wait(), 60)
        stop.set()
        for t in churners:
            if t.is_alive():
                t.join()
        log.remove_stack_dumps(loop)
        print("survived", flush=True)

    lifecycle.run(main(sys.argv[1]))  # uvloop, as the daemon runs
    """
)


def run_child(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", CHILD, *args], capture_output=True, text=True, timeout=60
    )


def test_dumps_while_threads_start_and_end_do_not_crash() -> None:
    done = run_child("churn", "1000")
    assert done.returncode == 0, f"status {done.returncode}: {done.stderr[-2000:]}"
    assert done.stdout.strip() == "survived"
    dumps = done.stderr.count("--- SIGUSR1: thread stacks")
    assert dumps >= 1 and "--- end of SIGQUIT dump" in done.stderr
    assert "Current thread 0x" in done.stderr and "(most recent call first)" in done.stderr
    assert " in churn" in done.stderr  # the other threads' stacks are there
    print(f"{dumps} thread dumps while threads started and ended, no crash")


def test_thread_stacks_print_while_a_callback_holds_the_loop() -> None:
    done = run_child("busy")
    assert done.returncode == 0, done.stderr[-2000:]
    threads, _, tasks = done.stderr.partition("--- SIGQUIT: thread stacks")[2].partition("---")
    assert " in busy_callback" in threads  # caught in the act, not after it returned
    assert "asyncio tasks; threads:" in tasks and "--- end of SIGQUIT dump" in done.stderr
