"""Image transforms split between the CPU workers and the training device.

The CPU side does only what needs the encoded image: decode (at reduced scale when the crop
allows: JPEG draft mode) and crop, handing over uint8 pixels. Everything else (bicubic resize
to 224/364 with antialiasing, flip, colour jitter, CLIP normalisation) runs batched on the
device, where it is nearly free. :func:`reference_train_transform` is the plain torchvision
pipeline the split version is tested against.
"""
from __future__ import annotations

import io
import math
import random
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
_DRAFT_FACTORS = (8, 4, 2)


@dataclass(frozen=True)
class CropBox:
    """A crop in the coordinates of the full-resolution image."""

    top: int
    left: int
    height: int
    width: int
    flip: bool = False


def random_resized_crop_box(rng: random.Random, width: int, height: int,
                            scale: tuple[float, float] = (0.5, 1.0),
                            ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> tuple[int, int, int, int]:
    """torchvision's RandomResizedCrop.get_params, driven by a per-sample ``random.Random``."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return rng.randint(0, height - h), rng.randint(0, width - w), h, w
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        h, w = height, int(round(height * ratio[1]))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def train_crop(rng: random.Random, width: int, height: int, scale: tuple[float, float]) -> CropBox:
    top, left, h, w = random_resized_crop_box(rng, width, height, scale)
    return CropBox(top, left, h, w, flip=rng.random() < 0.5)


def eval_crop(width: int, height: int) -> CropBox:
    """The centre square: resizing it to ``size`` equals resize-shorter-side + centre-crop."""
    side = min(width, height)
    return CropBox((height - side) // 2, (width - side) // 2, side, side)


def decode_and_crop(data: bytes, choose_box, size: int, reduced_decode: bool = True) -> tuple[np.ndarray, bool]:
    """Decode ``data`` and crop the box ``choose_box(width, height)`` picks: ((h, w, 3) uint8, flip).

    The flip is left to the device (it commutes with the resize there and costs a CPU copy here).

    With ``reduced_decode``, a JPEG is decoded at 1/2, 1/4 or 1/8 scale when the crop still
    covers at least ``size`` pixels each way at that scale: the decoder then does the
    downscaling (and most of the work) for free.
    """
    image = Image.open(io.BytesIO(data))
    width, height = image.size
    box = choose_box(width, height)
    if reduced_decode and image.format == "JPEG":
        factor = next((f for f in _DRAFT_FACTORS if box.width >= f * size and box.height >= f * size), 1)
        if factor > 1:
            image.draft("RGB", (math.ceil(width / factor), math.ceil(height / factor)))
    sx, sy = image.size[0] / width, image.size[1] / height
    if image.mode != "RGB":
        image = image.convert("RGB")  # (convert copies even when the mode already matches)
    left, top = round(box.left * sx), round(box.top * sy)
    right = max(left + 1, round((box.left + box.width) * sx))
    bottom = max(top + 1, round((box.top + box.height) * sy))
    return np.asarray(image.crop((left, top, right, bottom))), box.flip


def pack_images(images: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
    """Variable-size uint8 images -> one flat buffer (a single host-to-device copy) and their (h, w)."""
    shapes = torch.tensor([image.shape[:2] for image in images], dtype=torch.int64)
    flat = torch.from_numpy(np.concatenate([image.reshape(-1) for image in images]))
    return flat, shapes


def sample_jitter(rng: random.Random, strength: float) -> tuple[float, float, float]:
    """(brightness, contrast, saturation) factors, each uniform in [1 - strength, 1 + strength]."""
    return tuple(rng.uniform(max(0.0, 1 - strength), 1 + strength) for _ in range(3))  # type: ignore[return-value]


class DeviceTransform:
    """Packed uint8 crops -> normalised (B, 3, size, size) pixels, on the device they are on."""

    def __init__(self, size: int, mean=CLIP_MEAN, std=CLIP_STD, dtype: torch.dtype = torch.float32):
        self.size = size
        self.mean = torch.tensor(mean).view(1, 3, 1, 1)
        self.std = torch.tensor(std).view(1, 3, 1, 1)
        self.dtype = dtype

    def __call__(self, packed: torch.Tensor, shapes: torch.Tensor, flips: torch.Tensor | None = None,
                 jitter: torch.Tensor | None = None) -> torch.Tensor:
        device = packed.device
        resized = []
        offset = 0
        for h, w in shapes.tolist():  # shapes stay on the host: no device sync
            image = packed[offset:offset + h * w * 3].view(1, h, w, 3).permute(0, 3, 1, 2).float()
            offset += h * w * 3
            if (h, w) != (self.size, self.size):
                image = F.interpolate(image, size=(self.size, self.size), mode="bicubic", antialias=True,
                                      align_corners=False)
            resized.append(image)
        pixels = torch.cat(resized).clamp_(0, 255).div_(255)
        if flips is not None and bool(flips.any()):
            flips = flips.to(device).view(-1, 1, 1, 1)
            pixels = torch.where(flips, pixels.flip(-1), pixels)
        if jitter is not None:
            pixels = apply_jitter(pixels, jitter.to(device))
        pixels = (pixels - self.mean.to(device)) / self.std.to(device)
        return pixels.to(self.dtype)


def apply_jitter(pixels: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
    """Brightness, contrast, saturation (torchvision's formulas) with per-sample factors (B, 3)."""
    b, c, s = (factors[:, i].view(-1, 1, 1, 1) for i in range(3))
    weights = torch.tensor([0.299, 0.587, 0.114], device=pixels.device).view(1, 3, 1, 1)
    pixels = (pixels * b).clamp(0, 1)
    gray_mean = (pixels * weights).sum(1, keepdim=True).mean(dim=(2, 3), keepdim=True)
    pixels = ((pixels - gray_mean) * c + gray_mean).clamp(0, 1)
    gray = (pixels * weights).sum(1, keepdim=True)
    return ((pixels - gray) * s + gray).clamp(0, 1)


def reference_train_transform(image: Image.Image, box: CropBox, size: int) -> torch.Tensor:
    """The plain torchvision pipeline on a PIL image: resized crop (bicubic), flip, ToTensor, Normalize."""
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms import functional as TF

    out = TF.resized_crop(image.convert("RGB"), box.top, box.left, box.height, box.width, [size, size],
                          interpolation=InterpolationMode.BICUBIC)
    if box.flip:
        out = TF.hflip(out)
    return TF.normalize(TF.to_tensor(out), CLIP_MEAN, CLIP_STD)
