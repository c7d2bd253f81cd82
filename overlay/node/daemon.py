"""`overlay run`: the node agent. It wires the registry, the lease, the peer table and the
backend together (``startup``), follows the registry (``events``, ``registry``), shows
what it knows (``view``, ``tracing``) and runs until a signal, undoing what it made.

SIGTERM and SIGINT are handled from the first moment the event loop runs: startup is a
task raced against them, so a daemon waiting for a config, retrying an unreachable
registry or blocked on a registry lock stops within a second, undoing what it had made
(``overlay.node.lifecycle`` keeps a blocked thread from holding the process).
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Awaitable
from typing import Any

import structlog

from control.kv import RegistryError
from control.subnet_manager import LeaseLost, SubnetManager
from overlay.backends.base import BackendError, Underlay
from overlay.kernel.reconcile import RESYNC_INTERVAL, KernelWatch
from overlay.node import lifecycle, systemd
from overlay.node.events import PeerEvents
from overlay.node.fatal import Fatal
from overlay.node.impairing import serve_impair
from overlay.node.iptables import IptablesKeeper
from overlay.node.mtu import MtuFollower
from overlay.node.options import NodeOptions
from overlay.node.registry import RegistryMonitor, open_registry
from overlay.node.startup import Startup, check_paths
from overlay.node.state import NodeState
from overlay.node.tracing import capture_hooks, serve_trace
from overlay.node.underlay import UnderlayError, select_underlay
from overlay.node.view import NodeView
from overlay.observe import health, health_server, status_socket
from overlay.observe import log as overlay_log
from overlay.observe.drop_log import DropLog

PROG = "overlay run"
STOP_BUDGET = 0.8  # seconds shutdown may take in all (SIGTERM -> exit within a second)
QUIT_EXIT = 2  # after SIGQUIT's stack dump, as a Go program exits


def _new_state(options: NodeOptions, underlay: Underlay) -> NodeState:
    """The node's state with its registry made (the registry's flags and TLS files are
    checked here, before anything else is)."""
    log = structlog.get_logger().bind(node=underlay.name)
    readiness = health.Readiness(registry_grace=options.registry.timeout)
    monitor = RegistryMonitor(options.registry, readiness, log)
    kv = open_registry(options.registry, monitor.notify)
    manager = SubnetManager(
        kv,
        public_ip=underlay.public_ip,
        public_ipv6=underlay.public_ipv6,
        prefix=options.registry.prefix,
        renew_margin=options.registry.renew_margin,
        notify=monitor.notify,
    )
    monitor.manager = manager
    return NodeState(
        options=options,
        underlay=underlay,
        log=log,
        readiness=readiness,
        monitor=monitor,
        kv=kv,
        manager=manager,
        iptables=IptablesKeeper(options.iptables, log),
    )


class Daemon:
    def __init__(self, options: NodeOptions, underlay: Underlay) -> None:
        self.node = node = _new_state(options, underlay)
        self.log = node.log
        self.view = NodeView(node)
        self.events = PeerEvents(node)
        self.exit_code = 0
        self._signals: list[str] = []

    # -- running -------------------------------------------------------------------------

    async def _watch_kernel(self) -> None:
        """Check (and repair) our kernel objects, and compare the underlay's MTU with ours
        (``overlay.node.mtu``), every RESYNC_INTERVAL seconds; the netlink watch asks for
        both sooner when the kernel announces a change."""
        backend = self.node.backend
        kernel = backend.kernel if backend is not None else None
        follower = MtuFollower(self.node)

        def changed() -> None:
            if kernel is not None:
                kernel.resync()
            follower.check_soon()

        watch = KernelWatch(changed, ipv6=kernel is not None and kernel.ipv6)
        try:
            watch.start(asyncio.get_running_loop())
        except OSError as e:
            self.log.warning("kernel_watch_unavailable", error=e.strerror or str(e))
        try:
            while True:
                follower.check_soon()
                if kernel is not None:
                    try:
                        await asyncio.wrap_future(kernel.resync())
                    except Exception:  # noqa: BLE001 - logged by the worker; tried again
                        pass
                await asyncio.sleep(RESYNC_INTERVAL)
        finally:
            watch.stop()
            follower.stop()

    def _on_signal(self, signum: signal.Signals) -> None:
        self._signals.append(signum.name)
        self.node.stopping.set()

    def _on_quit(self) -> None:
        """After SIGQUIT's stack dump: stop, with Go's exit status."""
        self._signals.append("SIGQUIT")
        self.exit_code = QUIT_EXIT
        self.node.stopping.set()

    async def _serve_status(self) -> status_socket.StatusServer:
        """Before anything else, so a second daemon on the same socket stops here, and
        `overlay status` and /healthz answer while we wait for the registry."""
        node = self.node

        async def trace(
            argument: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
        ) -> None:
            await serve_trace(node, argument, reader, writer)

        async def impair(
            argument: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
        ) -> None:
            await serve_impair(node, argument, reader, writer)

        handlers: dict[str, status_socket.Handler] = {"trace": trace, "impair": impair}
        try:
            return await status_socket.serve(
                node.options.status_socket, self.view.status_pieces, handlers
            )
        except status_socket.StatusSocketError as e:
            raise Fatal(str(e)) from None

    async def _serve_health(self) -> health_server.HealthServer | None:
        options = self.node.options
        port = options.healthz_port
        if not port:
            return None
        host = str(options.healthz_ip)
        try:
            server = await health_server.serve(host, port, self.view.routes())
        except OSError as e:
            raise Fatal(
                f"cannot serve health on --healthz-ip {host} --healthz-port {port}: "
                f"{e.strerror or e}"
            ) from None
        self.log.info("healthz_listening", address=f"{host}:{port}")
        self.view.health_server_stats = server.stats
        return server

    async def _started(self, stopping: asyncio.Task[Any]) -> bool:
        """Run startup raced against a stop signal: True when it finished (its error, if
        any, raised here), False when a signal came first (startup is cancelled)."""
        starting = asyncio.create_task(Startup(self.node).start())
        await asyncio.wait([starting, stopping], return_when=asyncio.FIRST_COMPLETED)
        if not starting.done():
            starting.cancel()
            await asyncio.wait([starting], timeout=STOP_BUDGET / 2)
            self.log.info("stopping", reason=self._signals[0], stage="startup")
            return False
        starting.result()  # a startup error ends here, with everything undone by main()
        return True

    def _tasks(self, loop: asyncio.AbstractEventLoop) -> list[asyncio.Task[Any]]:
        """What runs until the daemon stops: the watch, renewals, the kernel's and
        iptables' resyncs (the kernel's with the underlay's MTU), the registry probe and
        the drop log."""
        node = self.node
        assert node.lease is not None
        hooks = capture_hooks(node)
        drop_log = DropLog(
            self.log,
            self.view.drops,
            hooks[0] if hooks else None,
            hooks[1] if hooks else None,
        )
        # A new drop reason is noticed in the drain loop, handled after it.
        node.drops.on_new = lambda reason: drop_log.notice_soon(loop, reason)
        manager = node.manager
        return [
            asyncio.create_task(
                manager.watch(
                    node.lease, self.events.on_snapshot, self.events.on_events, config=node.config
                )
            ),
            asyncio.create_task(manager.keep_renewed(node.lease)),
            asyncio.create_task(self._watch_kernel()),
            asyncio.create_task(node.iptables.keep()),
            asyncio.create_task(node.monitor.probe(node.kv, manager.config_key)),
            asyncio.create_task(drop_log.run()),
        ]

    def _why_ended(self, done: set[asyncio.Task[Any]], stopping: asyncio.Task[Any]) -> None:
        """A long-running task ended: its error, or a fatal line if it ended otherwise
        (each runs until we stop: anything else is not a clean stop). Each task handles
        the failures it expects (a registry's, a log line that cannot be written); an
        OSError that still gets here is named with the task it ended, in one line."""
        for task in done:
            if task is stopping:
                continue
            error = None if task.cancelled() else task.exception()
            name = getattr(task.get_coro(), "__qualname__", task.get_name())
            if isinstance(error, LeaseLost):
                raise Fatal(f"{error}; exiting so a supervisor restarts us")
            if isinstance(error, OSError):
                raise Fatal(
                    f"{name} failed: {describe_os_error(error)}; exiting so a supervisor "
                    "restarts us"
                )
            if error is not None:
                raise error
            if stopping not in done:
                how = "was cancelled" if task.cancelled() else "returned"
                raise Fatal(f"{name} {how} unexpectedly; exiting so a supervisor restarts us")

    async def main(self) -> int:
        loop = asyncio.get_running_loop()
        stop = self.node.stopping
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self._on_signal, signum)
        server = await self._serve_status()
        stopping = asyncio.create_task(stop.wait())
        http_server: health_server.HealthServer | None = None
        tasks: list[asyncio.Task[Any]] = []
        overlay_log.install_stack_dumps(loop, self._on_quit)
        try:
            http_server = await self._serve_health()
            if not await self._started(stopping):
                return self.exit_code
            assert self.node.lease is not None
            systemd.notify(f"READY=1\nSTATUS=forwarding for {self.node.lease.name}")
            tasks = self._tasks(loop)
            done, _ = await asyncio.wait([*tasks, stopping], return_when=asyncio.FIRST_COMPLETED)
            self._why_ended(done, stopping)
            self.log.info("stopping", reason=self._signals[0] if self._signals else "signal")
            return self.exit_code
        finally:
            systemd.notify("STOPPING=1")
            stop.set()  # ends the traces still streaming
            self.events.peer_log.close()
            for task in [*tasks, stopping]:
                task.cancel()
            await asyncio.wait([*tasks, stopping], timeout=STOP_BUDGET / 4)
            await self._cleanup(server, http_server)
            overlay_log.remove_stack_dumps(loop)

    async def _cleanup(
        self, server: status_socket.StatusServer, http_server: health_server.HealthServer | None
    ) -> None:
        """Undo what startup made, each step bounded so the whole fits STOP_BUDGET."""

        async def step(what: str, call: Awaitable[Any], budget: float) -> None:
            try:
                await asyncio.wait_for(call, budget)
            except Exception as e:  # noqa: BLE001 - best effort (a timeout too)
                self.log.warning("cleanup_incomplete", step=what, error=str(e) or type(e).__name__)

        node = self.node
        if node.iptables.installed():
            # One transaction per rule set, ~0.1 s; given longer on a loaded machine, as
            # rules left behind would outlive us.
            await step("iptables rules", node.iptables.remove(), 2.0)
        if node.backend is not None:
            await step("backend", node.backend.stop(), 0.4)
        if http_server is not None:
            http_server.close()
        server.close()  # removes the socket only if it is still ours
        await step("registry", node.kv.close(), 0.1)


def describe_os_error(error: OSError) -> str:
    """Its reason, with the path it concerns when it has one."""
    reason = error.strerror or str(error)
    return f"{error.filename}: {reason}" if error.filename and error.strerror else reason


class Stopped(Exception):
    """SIGTERM before the event loop took over the signals."""


def _stopped(signum: int, frame: object) -> None:
    raise Stopped


def run(options: NodeOptions) -> int:
    signal.signal(signal.SIGTERM, _stopped)  # until Daemon.main installs the loop's
    fmt = options.log.format
    overlay_log.configure(fmt, options.log.verbosity)
    for flag in options.ignored_flags:
        structlog.get_logger().warning("flag_ignored", flag=flag, reason="a klog flag")
    public_ip = options.underlay.public_ip
    node = str(public_ip) if public_ip else None
    try:
        check_paths(options)
        underlay = select_underlay(options.underlay)
        node = underlay.name
        daemon = Daemon(options, underlay)  # the registry's flags and TLS files checked here
        return lifecycle.run(daemon.main())
    except (Fatal, RegistryError, UnderlayError, BackendError) as e:
        return overlay_log.fatal(PROG, str(e), fmt, node)
    except OSError as e:  # TunError, LinkError, KernelError, a socket that cannot be bound
        return overlay_log.fatal(PROG, describe_os_error(e), fmt, node)
    except (KeyboardInterrupt, Stopped):
        return 0  # flanneld exits 0 on SIGTERM and SIGINT
