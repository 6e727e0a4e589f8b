"""Reading samples out of tar shards: local files or ``pipe:`` commands, damage-tolerant.

A sample is a run of consecutive members sharing a key (the member's path up to the first dot
of its file name): ``000123.jpg``, ``000123.txt``, ``000123.json`` -> key ``000123`` with fields
``jpg``, ``txt``, ``json``. Damage never raises out of :func:`iter_samples`: a shard that cannot
be opened, a truncated tar or a repeated key is counted in ``counts`` and reading goes on.
"""
from __future__ import annotations

import collections
import os
import subprocess
import tarfile
import zlib
from collections.abc import Iterator
from typing import BinaryIO

PIPE_PREFIX = "pipe:"


def split_key(member_name: str) -> tuple[str, str]:
    directory, _, base = member_name.rpartition("/")
    stem, _, extension = base.partition(".")
    return (f"{directory}/{stem}" if directory else stem), extension.lower()


_END_MARKER = bytes(1024)  # a tar archive ends with (at least) two zero blocks


class _Source:
    """An opened shard: a file, or a pipe whose process is reaped (and killed if still running) on close.

    It remembers the last bytes read: tarfile takes a file cut at a member boundary for a
    complete archive, so truncation is detected by the missing end-of-archive marker.
    """

    def __init__(self, url: str):
        self.process: subprocess.Popen | None = None
        if url.startswith(PIPE_PREFIX):
            self.process = subprocess.Popen(url[len(PIPE_PREFIX):], shell=True, stdout=subprocess.PIPE,
                                            stderr=subprocess.DEVNULL)
            self.stream: BinaryIO = self.process.stdout  # type: ignore[assignment]
        else:
            self.stream = open(url.removeprefix("file:"), "rb")
        self.tail = b""

    def read(self, size: int = -1) -> bytes:
        data = self.stream.read(size)
        keep = len(_END_MARKER)
        self.tail = data[-keep:] if len(data) >= keep else (self.tail + data)[-keep:]
        return data

    def ended_cleanly(self) -> bool:
        """Read to the end (record padding); True if the archive ended with its end-of-archive marker."""
        while self.read(1 << 16):
            pass
        return self.tail == _END_MARKER

    def close(self) -> bool:
        """Close; returns False when a pipe command failed (its output may be incomplete)."""
        self.stream.close()
        if self.process is None:
            return True
        try:
            code = self.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.process.kill()
            code = self.process.wait()
        return code == 0


def iter_samples(url: str, counts: collections.Counter,
                 skip: int = 0) -> Iterator[tuple[int, str, dict[str, bytes]]]:
    """Yield (position, key, {extension: bytes}) for each sample of shard ``url``.

    ``position`` counts the samples read so far in the shard, this one included (duplicates
    too), so that ``skip=position`` later resumes right after it. The first ``skip`` samples
    are read past without being returned or decoded.
    """
    try:
        source = _Source(url)
    except OSError:
        counts["unopenable_shard"] += 1
        return
    seen: set[str] = set()
    key, fields = None, {}
    index = 0

    def finish():
        nonlocal index
        done_key, done_fields = key, fields
        index += 1
        if done_key in seen:
            counts["duplicate_key"] += 1
            return None
        seen.add(done_key)
        return (index, done_key, done_fields) if index > skip else None

    try:
        with tarfile.open(fileobj=source, mode="r|*") as archive:
            for member in archive:
                if not member.isfile():
                    continue
                member_key, extension = split_key(member.name)
                if member_key != key:
                    if key is not None and (sample := finish()) is not None:
                        yield sample
                    key, fields = member_key, {}
                data = b""
                if index >= skip:
                    data = archive.extractfile(member).read()
                    if len(data) != member.size:  # the file ends inside this member
                        raise EOFError(f"{member.name}: {len(data)} of {member.size} bytes")
                if extension in fields:
                    counts["duplicate_field"] += 1
                fields[extension] = data
            if not source.ended_cleanly():
                raise EOFError("no end-of-archive marker")
        if key is not None and (sample := finish()) is not None:
            yield sample
    except (tarfile.TarError, EOFError, OSError, zlib.error):
        counts["truncated_tar"] += 1  # the partial last sample is dropped
    finally:
        if not source.close():
            counts["pipe_failed"] += 1


def count_samples(path: str) -> int:
    """Distinct sample keys in a local tar, reading headers only (data is seeked over).

    A damaged tar counts the samples before the damage, which is what the reader will get.
    """
    keys: set[str] = set()
    last = None
    try:
        with tarfile.open(path, mode="r:*") as archive:
            for member in archive:
                if member.isfile():
                    last = split_key(member.name)[0]
                    keys.add(last)
    except (tarfile.TarError, EOFError, OSError, zlib.error):
        keys.discard(last)  # the sample being read when the damage hit is incomplete
    return len(keys)


def is_local(url: str) -> bool:
    return not url.startswith(PIPE_PREFIX) and os.path.exists(url.removeprefix("file:"))
