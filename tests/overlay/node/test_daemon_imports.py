"""What a daemon loads: the memory of an idle daemon is mostly the modules it imported
(README, "Memory of a daemon"), so what it does not need must stay out. Each check runs in
a fresh interpreter, as `overlay run` starts."""

from __future__ import annotations

from tests.helpers.modules import loaded_after

# Loaded by nothing a daemon on the file registry without --healthz-port needs.
NOT_LOADED = (
    "grpc",  # not even with --etcd-endpoints: our own client (control/grpc_channel.py)
    "aetcd",
    "google.protobuf",
    "h2",  # the etcd client's HTTP/2: only with --etcd-endpoints
    "control.etcd_registry",
    "prometheus_client",  # /metrics: only with --healthz-port, as the server starts
    "http.server",
    "pyroute2.ndb",  # what `import pyroute2` would add to rtnetlink (tun.rtnl)
    "pyroute2.ipdb",
    "pyroute2.nftables",
    "sqlite3",
    "psutil",
    "importlib.metadata",  # the version: only when asked
    "statistics",  # (with decimal, fractions) a normal-distributed jitter only
    "decimal",
    "overlay.impair.model",  # the impairment models: only once a dataplane is impaired
    "overlay.impair.links",
    "unittest",  # what pyroute2's iprsocket imports for IPRSocket, which we never use
    "unittest.mock",
    "overlay.observe.trace",  # `overlay trace`'s filter compiler and pcapng writer: only at
    "overlay.observe.trace_filter",  # the first trace or the drop log's first sample
    "encap.pcapng",
)


def test_a_file_registry_daemon_loads_no_etcd_metrics_or_whole_pyroute2() -> None:
    loaded = loaded_after(
        "from overlay.cli.run import options_from, parse_run_args\n"
        "import overlay.node.daemon\n"
        "from overlay.node.registry import open_registry\n"
        "options = options_from(parse_run_args(['--registry-file', '/nonexistent/r.json']))\n"
        "open_registry(options.registry)"
    )
    assert "overlay.node.daemon" in loaded and "pyroute2.iproute.linux" in loaded
    assert sorted(m for m in NOT_LOADED if m in loaded) == []


# grpcio's C core, its threads and protobuf were ~14 MiB of an idle etcd daemon.
def test_an_etcd_daemon_loads_our_etcd_client_and_not_grpc() -> None:
    loaded = loaded_after(
        "from overlay.cli.run import options_from, parse_run_args\n"
        "import overlay.node.daemon\n"
        "from overlay.node.registry import open_registry\n"
        "options = options_from(parse_run_args(['--etcd-endpoints', 'http://192.0.2.254:2379']))\n"
        "open_registry(options.registry)"
    )
    assert {"control.etcd_registry", "control.grpc_channel", "h2.connection"} <= loaded
    assert sorted(m for m in loaded if m.split(".")[0] in {"grpc", "aetcd", "google"}) == []


def test_the_first_scrape_loads_the_metrics_module() -> None:
    loaded = loaded_after("import overlay.node.view\nimport overlay.observe.metrics")
    assert "prometheus_client" in loaded


def test_the_testbeds_start_server_loads_the_daemon_and_nothing_it_must_not() -> None:
    """What the start server imports, every daemon it forks holds: the daemon's modules,
    and none of those a file-registry daemon leaves out."""
    loaded = loaded_after("import overlay.start_server")
    assert {"overlay.node.daemon", "control.file_registry", "encap._native"} <= loaded
    assert sorted(m for m in NOT_LOADED if m in loaded) == []
