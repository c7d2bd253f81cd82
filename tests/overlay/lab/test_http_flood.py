"""overlay.lab.http_flood against real servers on 127.0.0.1 (the standard library's
http.server in a thread): the rate it offers, what it counts as answered and as failed,
so the flood test's numbers can be trusted."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from overlay.lab.http_flood import Flood, FloodReport, command, main, parse_report


class _Handler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        status = 200 if self.path == "/ok" else 503
        body = b"hello\n"
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


@contextmanager
def server() -> Iterator[int]:
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield httpd.server_address[1]
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_every_request_on_its_own_connection_is_answered_at_the_offered_rate() -> None:
    with server() as port:
        report = Flood("127.0.0.1", port, "/ok", 200, 100, 2.0).run(0.5)
    assert 95 <= report.started <= 102 and report.answered == report.started, report.summary()
    assert not report.failed and not report.skipped
    assert len(report.latencies_ms) == report.answered and report.percentile(100) < 2000


def test_a_status_other_than_200_and_a_refused_connection_are_failures() -> None:
    with server() as port:
        report = Flood("127.0.0.1", port, "/other", 100, 100, 2.0).run(0.2)
    assert report.answered == 0 and report.failed == {"status 503": report.started}
    with socket.socket() as unused:  # a port nobody listens on
        unused.bind(("127.0.0.1", 0))
        closed_port = unused.getsockname()[1]
    report = Flood("127.0.0.1", closed_port, "/ok", 100, 100, 2.0).run(0.2)
    assert report.answered == 0 and report.failed == {"ECONNREFUSED": report.started}


def test_held_requests_time_out_and_the_cap_skips_the_rest() -> None:
    with socket.socket() as listener:  # accepts (the kernel's backlog) but never answers
        listener.bind(("127.0.0.1", 0))
        listener.listen(64)
        port = listener.getsockname()[1]
        report = Flood("127.0.0.1", port, "/ok", 100, 5, 0.3, partial=True).run(0.2)
    assert report.started == 5 and report.skipped >= 10, report.summary()
    assert report.failed == {"timeout": 5} and report.answered == 0


def test_the_command_line_prints_a_report_and_reports_add_up(
    capsys: pytest.CaptureFixture[str],
) -> None:
    argv = command("http://h:1/x", 5, 2, in_flight=3, partial=True)
    assert argv[3:] == ["http://h:1/x", "--rate", "5", "--seconds", "2"] + [
        "--in-flight",
        "3",
        "--partial",
    ]
    with server() as port:
        assert main([f"http://127.0.0.1:{port}/ok", "--rate", "50", "--seconds", "0.2"]) == 0
    out = capsys.readouterr().out
    report = parse_report(out)
    assert report.answered == report.started >= 9
    total = FloodReport()
    total.add(report)
    total.add(report)
    assert total.answered == 2 * report.answered and total.summary()["p50_ms"] > 0
