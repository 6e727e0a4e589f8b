"""Image transforms split between the CPU workers and the training device.

The CPU side does only what needs the encoded image: decode (JPEGs at reduced scale in the DCT
domain when the crop allows) and crop, handing over uint8 pixels. Everything else (bicubic resize
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
import simplejpeg
import torch
import torch.nn.functional as F
from PIL import Image

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


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


def train_crop(rng: random.Random, width: int, height: int, scale: tuple[float, float], hflip: bool = True) -> CropBox:
    top, left, h, w = random_resized_crop_box(rng, width, height, scale)
    flip = rng.random() < 0.5  # drawn either way: the crop sequence does not depend on hflip
    return CropBox(top, left, h, w, flip=flip and hflip)


def eval_crop(width: int, height: int) -> CropBox:
    """The centre square: resizing it to ``size`` equals resize-shorter-side + centre-crop."""
    side = min(width, height)
    return CropBox((height - side) // 2, (width - side) // 2, side, side)


def decode_and_crop(data: bytes, choose_box, size: int, reduced_decode: bool = True) -> tuple[np.ndarray, bool]:
    """Decode ``data`` and crop the box ``choose_box(width, height)`` picks: ((h, w, 3) uint8, flip).

    JPEGs (nearly all web data) are decoded by libjpeg-turbo straight into a numpy array
    (simplejpeg), so the crop is a view and costs nothing; with ``reduced_decode`` the decoder
    scales down in the DCT domain (1/2 or less) whenever the crop still covers ``size`` pixels
    each way. Other formats go through Pillow. The flip is left to the device (it commutes with
    the resize there and would cost a copy here).
    """
    try:
        height, width, _, _ = simplejpeg.decode_jpeg_header(data)
    except ValueError:
        return _decode_and_crop_other(data, choose_box, size)
    box = choose_box(width, height)
    decoded_height, decoded_width = height, width
    if reduced_decode:
        min_height, min_width = math.ceil(height * size / box.height), math.ceil(width * size / box.width)
        scaled_height, scaled_width, _, _ = simplejpeg.decode_jpeg_header(data, min_height=min_height,
                                                                          min_width=min_width)
        if 2 * scaled_width <= width:  # smaller factors decode slower than full scale
            decoded_height, decoded_width = scaled_height, scaled_width
    try:
        image = simplejpeg.decode_jpeg(data, colorspace="RGB", min_height=decoded_height, min_width=decoded_width)
    except ValueError:
        if decoded_width != width:
            raise
        return _decode_and_crop_other(data, lambda w, h: box, size)  # e.g. CMYK JPEGs
    sx, sy = image.shape[1] / width, image.shape[0] / height
    return cap_downscale(_crop(image, box, sx, sy), size), box.flip


MAX_DEVICE_DOWNSCALE = 16
"""The device resize gets crops under this many times its output size per side (see :func:`cap_downscale`)."""


def cap_downscale(crop: np.ndarray, size: int) -> np.ndarray:
    """``crop``, with any side of ``MAX_DEVICE_DOWNSCALE`` x ``size`` or more resized (antialiased bicubic, here)
    to half that, ``MAX_DEVICE_DOWNSCALE / 2`` x ``size``.

    CUDA's antialiased bicubic resize keeps its filter taps in shared memory and refuses large
    downscales (pytorch/pytorch#103589); JPEGs are decoded at 1/8 scale where that suffices, but a
    huge PNG or WebP crop (web data has them) would otherwise stop the run. The two-step resize is
    within a fraction of a level of the direct one (tested).
    """
    height, width = crop.shape[:2]
    limit = MAX_DEVICE_DOWNSCALE * size
    if height < limit and width < limit:
        return crop
    target = (width if width < limit else limit // 2, height if height < limit else limit // 2)
    return np.asarray(Image.fromarray(np.ascontiguousarray(crop)).resize(target, Image.BICUBIC, reducing_gap=None))


def _crop(image: np.ndarray, box: CropBox, sx: float, sy: float) -> np.ndarray:
    left, top = round(box.left * sx), round(box.top * sy)
    right = max(left + 1, round((box.left + box.width) * sx))
    bottom = max(top + 1, round((box.top + box.height) * sy))
    return image[top:bottom, left:right]


def _decode_and_crop_other(data: bytes, choose_box, size: int) -> tuple[np.ndarray, bool]:
    image = Image.open(io.BytesIO(data))
    box = choose_box(*image.size)
    if image.mode != "RGB":
        image = image.convert("RGB")
    left, top = box.left, box.top
    return cap_downscale(np.asarray(image.crop((left, top, left + box.width, top + box.height))), size), box.flip


def pack_images(images: list[np.ndarray], shared: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Variable-size (h, w, 3) uint8 images (views allowed) -> one flat buffer and their (h, w).

    One copy per image, straight into the buffer that becomes the single host-to-device transfer.
    ``shared`` allocates it in shared memory, so that a DataLoader worker hands it to the main
    process without the extra copy it otherwise makes.
    """
    shapes = torch.tensor([image.shape[:2] for image in images], dtype=torch.int64)
    buffer = torch.empty(sum(image.size for image in images), dtype=torch.uint8)
    if shared:
        buffer.share_memory_()
    flat = buffer.numpy()
    offset = 0
    for image in images:
        flat[offset:offset + image.size].reshape(image.shape)[...] = image
        offset += image.size
    return buffer, shapes


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
