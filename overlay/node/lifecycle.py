"""Running the daemon's event loop so that SIGTERM and SIGINT end it at every stage.

A signal handler on the loop stops the daemon wherever it is waiting, as long as the
loop itself is not blocked and nothing keeps the process alive afterwards. Blocking
calls (a file registry behind a lock another process holds, a path that is a FIFO, an
etcd client's own threads) run on the loop's default executor; ``DaemonThreads`` makes
that executor's threads daemon threads, so a call still stuck when the daemon has
cleaned up cannot keep the interpreter from exiting (the stdlib's ThreadPoolExecutor
joins its threads at exit, forever if one never returns).
"""

from __future__ import annotations

import asyncio
import queue
import sys
import threading
from collections.abc import Callable, Coroutine
from concurrent.futures import Executor, Future
from typing import Any, TypeVar

import uvloop

T = TypeVar("T")
SHUTDOWN_GRACE = 0.5  # seconds the loop's leftover tasks get to finish after main returns
# The longest another thread (pyroute2's, an executor's) keeps the GIL once the loop thread
# wants it back (CPython's default: 5 ms). The loop thread lets go of the GIL at each
# socket call; a thread that took it then kept the drains waiting up to 5 ms.
SWITCH_INTERVAL = 0.0005


class DaemonThreads(Executor):
    """A thread pool whose threads never delay the process's exit."""

    def __init__(self, max_workers: int = 8, name: str = "blocking") -> None:
        self._max = max_workers
        self._name = name
        self._queue: queue.SimpleQueue[tuple[Future[Any], Callable[..., Any], Any, Any] | None]
        self._queue = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []
        self._idle = 0
        self._lock = threading.Lock()
        self._closed = False

    def submit(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> Future[T]:
        future: Future[T] = Future()
        with self._lock:
            if self._closed:
                raise RuntimeError("cannot schedule new futures after shutdown")
            self._queue.put((future, fn, args, kwargs))
            if self._idle == 0 and len(self._threads) < self._max:
                thread = threading.Thread(
                    target=self._work, name=f"{self._name}-{len(self._threads)}", daemon=True
                )
                self._threads.append(thread)
                thread.start()
            else:
                self._idle -= 1 if self._idle else 0
        return future

    def _work(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            future, fn, args, kwargs = item
            if future.set_running_or_notify_cancel():
                try:
                    result = fn(*args, **kwargs)
                except BaseException as e:  # noqa: BLE001 - handed to the waiter
                    future.set_exception(e)
                else:
                    future.set_result(result)
            with self._lock:
                self._idle += 1

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Stop taking work; threads that are idle end, a blocked one is left behind."""
        with self._lock:
            self._closed = True
            threads = list(self._threads)
        if cancel_futures:
            while True:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is not None:
                    item[0].cancel()
        for _ in threads:
            self._queue.put(None)
        if wait:
            for thread in threads:
                thread.join(SHUTDOWN_GRACE)


def run(main: Coroutine[Any, Any, T]) -> T:
    """``uvloop.run(main)``, but leftover tasks get a bounded grace period and the default
    executor is never waited for without limit."""
    sys.setswitchinterval(SWITCH_INTERVAL)
    loop = uvloop.new_event_loop()
    executor = DaemonThreads()
    loop.set_default_executor(executor)
    try:
        return loop.run_until_complete(main)
    finally:
        try:
            tasks = [t for t in asyncio.all_tasks(loop) if not t.done()]
            for task in tasks:
                task.cancel()
            if tasks:
                loop.run_until_complete(asyncio.wait(tasks, timeout=SHUTDOWN_GRACE))
            loop.run_until_complete(loop.shutdown_asyncgens())
        finally:
            executor.shutdown(wait=False, cancel_futures=True)
            loop.close()
