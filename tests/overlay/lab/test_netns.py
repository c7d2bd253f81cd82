"""The namespace helpers a testbed builds with: a whole stage through one ``ip -batch``,
and the processes of many namespaces found in one walk of /proc."""

from __future__ import annotations

import subprocess
import uuid

import pytest

from overlay.lab.netns import (
    create_netns_all,
    ip_batch,
    list_netns,
    netns_pids_all,
    remove_netns_all,
    terminate,
)


@pytest.mark.netns
def test_namespaces_made_in_one_batch_have_lo_up_and_go_in_one_call() -> None:
    names = [f"b{uuid.uuid4().hex[:6]}-{i}" for i in range(3)]
    try:
        create_netns_all(names)
        assert set(names) <= set(list_netns())
        for name in names:
            lo = subprocess.run(
                ["ip", "-n", name, "-o", "link", "show", "lo"], capture_output=True, text=True
            ).stdout
            assert "state UNKNOWN" in lo or ",UP" in lo, lo
        sleeper = subprocess.Popen(["ip", "netns", "exec", names[1], "sleep", "60"])
        try:
            for _ in range(100):
                if netns_pids_all(names) == [sleeper.pid]:
                    break
                subprocess.run(["sleep", "0.02"], check=True)
            assert netns_pids_all(names) == [sleeper.pid]
            assert netns_pids_all([names[0], names[2]]) == []
        finally:
            terminate([sleeper.pid], 1.0)
            sleeper.wait()
    finally:
        assert remove_netns_all(names) == []
    assert not set(names) & set(list_netns())
    assert netns_pids_all(names) == []


@pytest.mark.netns
def test_a_failing_batch_names_what_iproute2_said() -> None:
    name = f"b{uuid.uuid4().hex[:6]}"
    try:
        with pytest.raises(OSError, match=rf"ip -batch in netns {name}: .*nosuchlink"):
            create_netns_all([name])
            ip_batch(["link set lo up", "link set nosuchlink up"], netns=name)
    finally:
        remove_netns_all([name])
    assert name not in list_netns()
