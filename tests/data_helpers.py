"""Shards for data tests, written with the standard ``tar`` command or webdataset's own writer."""
from __future__ import annotations

import io
import subprocess
from pathlib import Path

import numpy as np
from PIL import Image


def jpeg_bytes(seed: int, size=(48, 40)) -> bytes:
    rng = np.random.default_rng(seed)
    small = Image.fromarray((rng.random((6, 6, 3)) * 255).astype(np.uint8))
    buffer = io.BytesIO()
    small.resize(size, Image.BICUBIC).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def caption_for(key: str) -> str:
    return f"A photo, number {key}!"


def write_with_tar_command(directory: Path, name: str, samples: list[tuple[str, dict[str, bytes]]]) -> Path:
    """One shard built by GNU tar from files on disk (members in key order)."""
    staging = directory / f"_staging_{name}"
    staging.mkdir(parents=True)
    members = []
    for key, fields in samples:
        for extension, data in fields.items():
            (staging / f"{key}.{extension}").write_bytes(data)
            members.append(f"{key}.{extension}")
    shard = directory / f"{name}.tar"
    subprocess.run(["tar", "-cf", str(shard), "-C", str(staging), *members], check=True)
    return shard


def write_with_webdataset(directory: Path, name: str, samples: list[tuple[str, dict[str, bytes]]]) -> Path:
    import webdataset

    shard = directory / f"{name}.tar"
    with webdataset.TarWriter(str(shard)) as writer:
        for key, fields in samples:
            writer.write({"__key__": key, **fields})
    return shard


def good_samples(first: int, count: int) -> list[tuple[str, dict[str, bytes]]]:
    return [(f"{k:06d}", {"jpg": jpeg_bytes(k), "txt": caption_for(f"{k:06d}").encode()})
            for k in range(first, first + count)]


def make_shards(directory: Path, num_shards: int, per_shard: int, writer=write_with_tar_command) -> str:
    """``num_shards`` shards of ``per_shard`` good samples; returns the brace pattern."""
    directory.mkdir(parents=True, exist_ok=True)
    for s in range(num_shards):
        writer(directory, f"shard-{s:05d}", good_samples(s * per_shard, per_shard))
    return str(directory / f"shard-{{00000..{num_shards - 1:05d}}}.tar")
