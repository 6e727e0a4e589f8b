"""The data benchmark (`python -m blip2_ds.data.bench`): its three worker loops over the same shards."""
import re

import torch

from blip2_ds.data import bench
from blip2_ds.data.shards import expand_urls
from blip2_ds.data.text import clean_caption
from blip2_ds.data.transforms import CLIP_MEAN, CLIP_STD


def test_original_worker_pipeline_makes_what_the_original_feeds_its_model(tmp_path):
    urls = expand_urls(bench.write_bench_shards(tmp_path, images=20, width=120, height=90))
    batches = list(bench.original_worker_pipeline(urls, image_size=64, batch_size=8))
    assert [len(images) for images, _ in batches] == [8, 8, 4]
    images = torch.cat([images for images, _ in batches])
    assert images.dtype == torch.float32 and images.shape == (20, 3, 64, 64)
    # Normalised [0, 1] pixels: each channel within (0 - mean) / std .. (1 - mean) / std, not uint8 levels.
    low = (-torch.tensor(CLIP_MEAN) / torch.tensor(CLIP_STD)).view(1, 3, 1, 1)
    high = ((1 - torch.tensor(CLIP_MEAN)) / torch.tensor(CLIP_STD)).view(1, 3, 1, 1)
    assert (images >= low - 1e-5).all() and (images <= high + 1e-5).all() and images.min() < -1 and images.max() > 1.5
    captions = [caption for _, texts in batches for caption in texts]
    assert sorted(captions) == sorted(clean_caption(f"A photo of thing number {k}, taken outdoors!")
                                      for k in range(20))


def test_data_bench_prints_every_rate_its_ratios_and_the_workers_per_gpu(capsys):
    assert bench.main(["--images", "16", "--size", "160x120", "--image-size", "64", "--batch-size", "4",
                       "--rounds", "1", "--device", "cpu", "--samples-per-gpu", "100000"]) == 0
    out = capsys.readouterr().out
    rates = {name: float(value) for name, value in re.findall(
        r"^(bare|pipeline|original's worker)[^\d]*?\s([\d.]+) images/s per process", out, re.M)}
    assert set(rates) == {"bare", "pipeline", "original's worker"} and all(r > 0 for r in rates.values()), out
    ratio = float(re.search(r"ratio pipeline / original's worker\s+([\d.]+)", out).group(1))
    assert abs(ratio - rates["pipeline"] / rates["original's worker"]) < 0.01
    workers = re.search(r"workers to feed 100000 samples/s per GPU: pipeline (\d+), original (\d+)", out)
    for count, rate in zip(map(int, workers.groups()), (rates["pipeline"], rates["original's worker"])):
        assert (count - 1) * rate < 100000 * 1.001 and count * rate > 100000 * 0.999, out  # the fewest that keep up
