"""The namespace helpers a testbed builds with: a whole stage through one ``ip -batch``,
and the processes of many namespaces found in one walk of /proc."""

from __future__ import annotations

import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from overlay.lab.netns import (
    create_netns_all,
    ip_batch,
    list_netns,
    netns_pids_all,
    pid_alive,
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


def test_a_process_whose_main_thread_exited_first_is_alive_until_its_last_thread() -> None:
    """After a SIGKILL the main thread can be a zombie while the other threads still exit
    (holding the process's files): alive until the last one is gone."""
    code = (
        "import ctypes, threading, time\n"
        "threading.Thread(target=time.sleep, args=(1.5,)).start()\n"
        "print('ready', flush=True)\n"
        "ctypes.CDLL(None).syscall(60, 0)  # SYS_exit: only the main thread\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline() == "ready\n"
        deadline = time.monotonic() + 1.0
        while not Path(f"/proc/{proc.pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
            assert time.monotonic() < deadline, "the main thread did not exit alone"
            time.sleep(0.01)
        assert pid_alive(proc.pid)  # its other thread still runs
        assert proc.wait(timeout=10) == 0
    finally:
        proc.kill()
        proc.wait()
