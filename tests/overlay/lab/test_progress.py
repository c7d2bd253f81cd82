"""overlay.lab.progress: a rewritten line on a terminal, silence in a pipe."""

from __future__ import annotations

import io

from overlay.lab.progress import Progress


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_on_a_terminal_one_line_is_rewritten_and_cleared() -> None:
    out = Terminal()
    progress = Progress("overlay testbed up t1", total=3, stream=out)
    progress.step("underlay bridge")
    progress.step("n1: namespace and eth0")
    progress.sub("up udp").step("n1: daemon up")  # a part: shown, not counted
    progress.note("overlay bench: udp: testbed: failed")
    progress.step("pod n1-p1: CNI ADD")
    progress.done()
    text = out.getvalue()
    assert "\n" not in text.replace("overlay bench: udp: testbed: failed\n", "")
    assert "\r\033[Koverlay testbed up t1 [1/3] underlay bridge (0 s)" in text
    assert "[2/3] n1: namespace and eth0" in text
    assert "[2/3] up udp: n1: daemon up" in text
    assert "[3/3] pod n1-p1: CNI ADD" in text
    assert text.endswith("\r\033[K")  # nothing of the line is left behind


def test_in_a_pipe_only_notes_are_written() -> None:
    out = io.StringIO()
    progress = Progress("overlay bench", total=2, stream=out)
    progress.step("up: udp")
    progress.sub("up udp").step("n1: daemon up")
    progress.note("overlay bench: udp: run 1: boom")
    progress.done()
    assert out.getvalue() == "overlay bench: udp: run 1: boom\n"
    off = Progress.off()
    off.step("x")
    assert not off.enabled
