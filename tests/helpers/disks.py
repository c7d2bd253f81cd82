"""Real filesystems that fail, for the disk-fault tests (issue 18 item 1): a tmpfs of our
own that can be filled to its last block and remounted read-only and back, and an ext4
on a loop device whose backing file lives on a small tmpfs, so that filling that tmpfs
makes the ext4's next write-back fail with a real EIO. Everything is unmounted and
detached by ``close()`` (the ``disks`` fixture calls it, also when a test fails)."""

from __future__ import annotations

import errno
import os
import subprocess
import uuid
from pathlib import Path

CHUNK = 64 * 1024


def _sh(*cmd: str) -> str:
    return subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip()


def fill(directory: Path, name: str = ".fill") -> Path:
    """Write zeros into ``directory/name`` until the filesystem says ENOSPC."""
    path = directory / name
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        zeros = bytes(CHUNK)
        size = CHUNK
        while size:  # down to single bytes: the last page of the last file is used too
            try:
                os.write(fd, zeros[:size])
            except OSError as e:
                if e.errno != errno.ENOSPC:
                    raise
                size //= 2
    finally:
        os.close(fd)
    return path


class Tmpfs:
    """``mount -t tmpfs -o size=SIZE,mode=0755`` at ``path`` (root-owned, as /run is)."""

    def __init__(self, path: Path, size: str = "256k") -> None:
        self.path = path
        self.source = f"ovltest-{uuid.uuid4().hex[:8]}"
        path.mkdir(parents=True, exist_ok=True)
        _sh("mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", self.source, str(path))
        self.mounted = True
        self._filler: Path | None = None

    def fill(self) -> None:
        """Fill it to the last byte (a file of ours, ``.fill``)."""
        self._filler = fill(self.path)

    def free(self) -> None:
        if self._filler is not None:
            self._filler.unlink()
            self._filler = None

    def read_only(self) -> None:
        _sh("mount", "-o", "remount,ro", str(self.path))

    def read_write(self) -> None:
        _sh("mount", "-o", "remount,rw", str(self.path))

    def close(self) -> None:
        if self.mounted:
            subprocess.run(["umount", "-l", str(self.path)], check=False, capture_output=True)
            self.mounted = False


class FailingDisk:
    """An ext4 at ``path`` on a loop device whose sparse backing file sits on a 4 MiB
    tmpfs: ``fail()`` fills that tmpfs, and the ext4's next write-back (an fsync) gets
    EIO from the loop device, as from a dying disk."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.backing = Tmpfs(path.with_name(path.name + "-backing"), size="4m")
        self.loop: str | None = None
        self.mounted = False
        try:
            image = self.backing.path / "disk.img"
            with open(image, "wb") as f:
                f.truncate(64 * 1024 * 1024)
            _sh("mkfs.ext4", "-q", "-F", str(image))
            self.loop = _sh("losetup", "--find", "--show", str(image))
            path.mkdir(parents=True, exist_ok=True)
            _sh("mount", "-o", "errors=continue", self.loop, str(path))
            self.mounted = True
            os.chmod(path, 0o755)
        except BaseException:
            self.close()
            raise

    def fail(self) -> None:
        self.backing.fill()

    def close(self) -> None:
        if self.mounted:
            subprocess.run(["umount", "-l", str(self.path)], check=False, capture_output=True)
            self.mounted = False
        if self.loop is not None:
            subprocess.run(["losetup", "-d", self.loop], check=False, capture_output=True)
            self.loop = None
        self.backing.close()
