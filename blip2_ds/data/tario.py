"""Reading samples out of tar shards: local files or ``pipe:`` commands, damage-tolerant.

A sample is a run of consecutive members sharing a key (the member's path up to the first dot
of its file name): ``000123.jpg``, ``000123.txt``, ``000123.json`` -> key ``000123`` with fields
``jpg``, ``txt``, ``json``. Damage never raises out of :func:`iter_samples`: a shard that cannot
be opened, a truncated tar or a repeated key is counted in ``counts`` (and reported) and reading
goes on. Shards may be gzip, bzip2 or xz compressed (``.tar.gz`` ...): recognised by their first bytes.
"""
from __future__ import annotations

import bz2
import collections
import contextlib
import gzip
import lzma
import os
import subprocess
import tarfile
import zlib
from collections.abc import Callable, Iterator
from typing import BinaryIO

PIPE_PREFIX = "pipe:"


def split_key(member_name: str) -> tuple[str, str]:
    directory, _, base = member_name.rpartition("/")
    stem, _, extension = base.partition(".")
    return (f"{directory}/{stem}" if directory else stem), extension.lower()


_END_MARKER = bytes(1024)  # a tar archive ends with (at least) two zero blocks
_COMPRESSED = ((b"\x1f\x8b", lambda raw: gzip.GzipFile(fileobj=raw, mode="rb")), (b"BZh", bz2.BZ2File),
               (b"\xfd7zXZ\x00", lzma.LZMAFile))
_DAMAGE = (tarfile.TarError, EOFError, OSError, zlib.error, lzma.LZMAError)


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
            self.raw: BinaryIO = self.process.stdout  # type: ignore[assignment]
        else:
            self.raw = open(url.removeprefix("file:"), "rb")
        self.stream = self.raw
        start = self.raw.peek(6)[:6]  # type: ignore[attr-defined]  (buffered: nothing is consumed)
        for magic, decompressor in _COMPRESSED:
            if start.startswith(magic):  # the end marker is checked on the tar itself, not its compressed form
                self.stream = decompressor(self.raw)
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

    def close(self, stopped_early: bool = False) -> bool:
        """Close; returns False when a pipe command failed (its output may be incomplete). A pipe left
        ``stopped_early`` (the reader had what it wanted) is killed, and its exit status means nothing."""
        for stream in (self.stream, self.raw) if self.stream is not self.raw else (self.raw,):
            with contextlib.suppress(*_DAMAGE):  # a decompressor may complain about a cut stream
                stream.close()
        if self.process is None:
            return True
        if stopped_early:
            self.process.kill()
            self.process.wait()
            return True
        try:
            code = self.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.process.kill()
            code = self.process.wait()
        return code == 0


def iter_samples(url: str, counts: collections.Counter, skip: int = 0,
                 report: Callable[[str, str], None] | None = None) -> Iterator[tuple[int, str, dict[str, bytes]]]:
    """Yield (position, key, {extension: bytes}) for each sample of shard ``url``.

    ``position`` counts the samples read so far in the shard, this one included (duplicates
    too), so that ``skip=position`` later resumes right after it. The first ``skip`` samples
    are read past without being returned, decoded or counted again. ``report(reason, detail)`` is
    called with each damage counted.
    """
    def damage(reason: str, detail: str) -> None:
        counts[reason] += 1
        if report is not None:
            report(reason, f"{detail} in {url}")

    try:
        source = _Source(url)
    except OSError as err:
        damage("unopenable_shard", str(err))
        return
    seen: set[str] = set()
    key, fields = None, {}
    index = 0
    read_to_the_end = False

    def finish():
        nonlocal index
        done_key, done_fields = key, fields
        index += 1
        if done_key in seen:
            if index > skip:
                damage("duplicate_key", f"sample {done_key!r} again")
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
                if extension in fields and index >= skip:
                    damage("duplicate_field", f"{member.name} again")
                fields[extension] = data
            if not source.ended_cleanly():
                raise EOFError("no end-of-archive marker")
        if key is not None and (sample := finish()) is not None:
            yield sample
        read_to_the_end = True
    except _DAMAGE as err:
        read_to_the_end = True
        damage("truncated_tar", f"{type(err).__name__}: {err}")  # the partial last sample is dropped
    finally:
        if not source.close(stopped_early=not read_to_the_end):
            damage("pipe_failed", "the command exited with an error")


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
    except _DAMAGE:
        keys.discard(last)  # the sample being read when the damage hit is incomplete
    return len(keys)


def is_local(url: str) -> bool:
    return not url.startswith(PIPE_PREFIX) and os.path.exists(url.removeprefix("file:"))
