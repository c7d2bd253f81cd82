"""``overlay bench``: the UDP loss-free search on a fake channel, the codec micro-benchmarks
and a quick real run."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from bench import codec_micro, report, status_hold
from bench.measure import UdpTrial, percentile


def _channel(capacity_bps: float, sender_bps: float) -> list[float]:
    """A fake path: lossless up to ``capacity_bps``, the sender tops out at ``sender_bps``."""
    asked: list[float] = []

    def trial(rate: float) -> UdpTrial:
        asked.append(rate)
        offered = rate or sender_bps
        received = min(offered, capacity_bps)
        return UdpTrial(
            size=1400,
            offered_bps=offered,
            unlimited=not rate,
            sent_bps=offered,
            received_bps=received,
            received_pps=received / 11200,
            loss_pct=100 * (offered - received) / offered,
        )

    trial.asked = asked  # type: ignore[attr-defined]
    return trial  # type: ignore[return-value]


def test_search_stops_at_once_when_the_sender_is_the_limit() -> None:
    trial = _channel(capacity_bps=5e9, sender_bps=1e9)
    best, trials, sender_limited = report.loss_free_search(trial, steps=5)  # type: ignore[arg-type]
    assert sender_limited and best is not None and best.offered_bps == 1e9
    assert len(trials) == 1


@pytest.mark.parametrize("capacity", [0.2e9, 0.45e9, 0.9e9, 1.1e9])
def test_search_finds_a_passing_rate_close_below_the_capacity(capacity: float) -> None:
    trial = _channel(capacity_bps=capacity, sender_bps=3e9)
    best, trials, sender_limited = report.loss_free_search(trial, steps=6)  # type: ignore[arg-type]
    assert not sender_limited and len(trials) == 6
    assert best is not None and best.loss_pct < report.MAX_LOSS_PCT
    assert 0.8 * capacity <= best.offered_bps <= capacity
    assert all(t.offered_bps <= 3e9 for t in trials)


def test_percentile_interpolates() -> None:
    assert percentile([5.0], 99) == 5.0
    assert percentile([1.0, 2.0, 3.0, 4.0, 5.0], 50) == 3.0
    assert percentile([float(i) for i in range(101)], 99) == pytest.approx(99.0)


def test_only_rejects_unknown_paths(capsys: pytest.CaptureFixture[str]) -> None:
    assert report.main(["--only", "udp,quic"]) == 2
    err = capsys.readouterr().err
    assert "unknown path" in err and "quic" in err


@pytest.mark.netns
def test_quick_bench_of_the_udp_and_c_proxy_rows_writes_md_json_png(tmp_path: Path) -> None:
    code = report.main(
        ["--quick", "--only", "udp,c-proxy", "--out", "smoke", "--results-dir", str(tmp_path)]
    )
    assert code == 0
    for ext in ("md", "json", "png"):
        assert (tmp_path / f"smoke.{ext}").stat().st_size > 0
    data = json.loads((tmp_path / "smoke.json").read_text())
    udp, proxy = data["paths"]
    for path in (udp, proxy):
        assert path["error"] is None, path["error"]
        assert path["tcp1_gbits"]["median"] > 0
        assert path["tcp4_gbits"]["median"] > 0
        for udp_row in ("udp1400_gbits", "udp64_pps"):
            # Every search ran and its trials moved traffic. The answer may be 0 for the C
            # proxy: its default-sized socket drops bursts, and the 3 quick trials (full
            # speed, 0.9x, then 4x lower) need not reach a rate it carries loss-free.
            (search,) = path[udp_row]["runs"]
            assert search["trials"] and all(t["received_bps"] > 0 for t in search["trials"])
            if path is udp:
                assert path[udp_row]["median"] > 0
        assert path["ping_us"]["p50"] > 0 and path["ping_us"]["received"] > 0
        assert path["daemon_cpu_pct_tcp1"]["n1"]["median"] > 0  # the C proxy's, for its row
        assert path["daemon_cpu_s_per_gb_tcp1"]["n2"]["median"] > 0
    assert (udp["key"], proxy["key"]) == ("udp", "c-proxy")
    assert set(data["micro"]) == set(codec_micro.OPERATIONS)
    assert all(m["mean_ns"] > 0 for m in data["micro"].values())
    text = (tmp_path / "smoke.md").read_text()
    assert "| our udp backend |" in text and "| C proxy (flanneld's udp loop) |" in text
    assert "ping RTT avg, udp backend <= the C proxy's" in text


def test_codec_micro_quick_measures_every_operation() -> None:
    # The real thing, as `overlay bench --quick` runs it: pyperf in a subprocess (this
    # test's own argv must not reach pyperf's Runner), a few seconds.
    results = codec_micro.run(quick=True, timeout=120)
    assert list(results) == codec_micro.OPERATIONS
    for name, r in results.items():
        assert math.isfinite(r["mean_ns"]) and r["mean_ns"] > 0, name
        assert math.isfinite(r["stdev_ns"]) and r["stdev_ns"] >= 0, name
        assert r["values"] >= 2, name
    assert "gso.plan_tun_writes" in codec_micro.format_table(results)


def test_search_steps_down_fast_until_a_rate_passes() -> None:
    # 0.9x of what got through still loses (a path well below its burst rate): the next
    # trials must reach a passing rate rather than bisecting towards 0 in small steps.
    trial = _channel(capacity_bps=0.25e9, sender_bps=3e9)
    trial_fn = trial

    def lossy_first(rate: float) -> UdpTrial:
        t = trial_fn(rate)  # type: ignore[operator]
        if not rate:  # the unlimited burst gets through at 1 Gbit/s, then loses
            return UdpTrial(1400, 3e9, True, 3e9, 1e9, 1e9 / 11200, 66.7)
        return t

    best, trials, _ = report.loss_free_search(lossy_first, steps=3)
    assert best is not None and best.offered_bps <= 0.25e9  # halving: 0.9, 0.45 -> none


@pytest.mark.netns
def test_c_proxy_forwards_like_flanneld(prefix: str) -> None:
    """The reference row is a real flannel-format proxy: pods ping through it, and each
    proxy decrements the TTL as flanneld's does."""
    from overlay.lab.testbed import Testbed

    with Testbed(prefix, nodes=2, pods_per_node=1, registry="file") as bed:
        bed.up()
        pids, controls = report._swap_in_c_proxy(bed)
        try:
            assert set(pids) == {"n1", "n2"}
            argv = ["ping", "-c", "3", "-i", "0.2", "-W", "2", bed.pod_ip("n2-p1")]
            out = bed.exec("n1-p1", argv, capture_output=True, text=True).stdout
            assert " 0% packet loss" in out, out
            # Linux pings with TTL 64; the reply crosses n2's bridge hop, both proxies
            # and n1's hop: 64 - 4 (our daemon, which leaves the TTL alone, gives 62).
            assert "ttl=60" in out, out
        finally:
            for control in controls:
                control.close()


def test_status_hold_compares_the_kept_rows_with_the_dict_rows(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The bench checks both ways answer the same rows; at a few hundred peers it runs in
    a moment (no figure is checked here)."""
    assert status_hold.main(["--peers", "300", "--active", "0.1"]) == 0
    assert "rows kept" in capsys.readouterr().out
