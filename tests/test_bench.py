"""The step benchmark (launch/bench.py): its baseline computes the same losses, its plan arithmetic, its table.

Only correctness here: speed ratios come from running the benchmark (BENCHMARKS.md), never from a
timed test.
"""
import json
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from conftest import ROOT, random_text, subprocess_env, tiny_qformer_config

from blip2_ds.bench import plan as planner
from blip2_ds.bench.original_step import (eager_attention, eager_llm_attention, original_stage1_loss,
                                          original_stage2_loss, plain_attention)
from blip2_ds.config import ObjectiveConfig
from blip2_ds.models.qformer import KeyValue
from blip2_ds.models.stage1 import Stage1Model


@pytest.mark.parametrize("mask_kind", ["none", "full", "keys"])
def test_plain_attention_equals_sdpa(mask_kind):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(3, 4, n, 8, generator=g, dtype=torch.float64) for n in (5, 7, 7))
    mask = {"none": None, "full": torch.rand(3, 1, 5, 7, generator=g) > 0.3,
            "keys": torch.rand(3, 7, generator=g) > 0.3}[mask_kind]
    if mask is not None:
        mask[..., 0] = True  # every row sees a key
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=None if mask is None else (
        mask if mask.dim() == 4 else mask[:, None, None, :]))
    torch.testing.assert_close(plain_attention(q, KeyValue(k, v), mask, 0.0), expected, rtol=1e-12, atol=1e-12)


def test_original_stage1_step_computes_the_projects_itc_and_itg_losses():
    torch.manual_seed(0)
    cfg = tiny_qformer_config()
    model = Stage1Model(cfg, ObjectiveConfig()).double().eval()  # dropout off: the passes are deterministic
    g = torch.Generator().manual_seed(1)
    images = torch.randn(6, 9, cfg.vision_width, generator=g, dtype=torch.float64)
    ids, mask = random_text(6, 12, cfg.vocab_size, g)
    ours = model(images, ids, mask, sample_seed=0)
    with eager_attention():
        theirs = original_stage1_loss(model, images, ids, mask, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(theirs["loss_itc"], ours.loss_itc, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(theirs["loss_itg"], ours.loss_itg, rtol=1e-6, atol=1e-7)
    # ITM: the same loss on a different draw of the same negative distribution; near ln 2 at init
    assert torch.isfinite(theirs["loss_itm"]) and abs(theirs["loss_itm"].item() - ours.loss_itm.item()) < 0.2
    theirs["loss"].backward()
    assert all(p.grad is not None for p in model.parameters())
    # With two samples each row has one possible negative: ITM and the total are then equal too.
    ours = model(images[:2], ids[:2], mask[:2], sample_seed=0)
    with eager_attention():
        theirs = original_stage1_loss(model, images[:2], ids[:2], mask[:2])
    torch.testing.assert_close(theirs["loss_itm"], ours.loss_itm, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(theirs["loss"], ours.loss, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("vocab_size", [101, 30523], ids=["tiny", "real"])
def test_the_baselines_in_step_tokens_are_the_workers_tokens_of_the_projects_step(tmp_path, vocab_size):
    from blip2_ds.bench.original_step import original_text_tokens
    from blip2_ds.bench.steps import TEXT_LEN, qformer_tokenizer, synthetic_batch, synthetic_captions

    tokenizer, words = qformer_tokenizer(vocab_size, tmp_path)
    assert len(tokenizer) == vocab_size and tokenizer.convert_tokens_to_ids("[DEC]") == vocab_size - 1
    g = torch.Generator().manual_seed(0)
    captions = synthetic_captions(40, words, g)
    batch = synthetic_batch(40, 16, captions, tokenizer, g)
    ids, mask = original_text_tokens(tokenizer, captions, TEXT_LEN, torch.device("cpu"))
    assert torch.equal(ids, batch["text_ids"]) and torch.equal(mask, batch["text_mask"])
    # one token per word, [CLS] and [SEP] around: 8 to 32 tokens, the longest truncated
    lengths = mask.sum(1)
    assert lengths.tolist() == [min(len(c.split()) + 2, TEXT_LEN) for c in captions]
    assert lengths.min() >= 8 and lengths.max() == TEXT_LEN and (ids != tokenizer.unk_token_id).all()


def test_a_bench_removes_its_working_folder_when_it_goes():
    import gc

    from blip2_ds.bench.steps import Bench

    bench = Bench(1, "tiny", 2, torch.device("cpu"), "fp32")
    workdir = bench.workdir
    assert (workdir / "qformer_tokenizer").is_dir()
    del bench
    gc.collect()
    assert not workdir.exists()  # every benchmark run used to leave one in /tmp


def test_original_stage2_loss_equals_the_projects(tmp_path):
    from blip2_ds.bench.original_step import original_opt_text
    from blip2_ds.bench.steps import build_llm, qformer_tokenizer, synthetic_captions
    from blip2_ds.models.stage2 import Stage2Model

    torch.manual_seed(0)
    captions = synthetic_captions(4, qformer_tokenizer(101, tmp_path)[1], torch.Generator().manual_seed(0))
    llm = build_llm("tiny", torch.device("cpu"), torch.float32, captions)
    cfg = tiny_qformer_config()
    model = Stage2Model(cfg, llm).eval()
    text = original_opt_text(llm.tokenizer, captions, llm.cfg.max_text_len, torch.device("cpu"))
    ours = model.tokenize(captions)  # what the training stream's workers hand the project's step
    for name in ("input_ids", "attention_mask", "labels"):
        assert torch.equal(getattr(text, name), getattr(ours, name)), name
    images = torch.randn(4, 9, cfg.vision_width)
    with eager_attention(), eager_llm_attention(llm.model):
        theirs = original_stage2_loss(model, images, text)
    assert llm.model.config._attn_implementation != "eager"  # restored
    torch.testing.assert_close(theirs, model(images, ours), rtol=1e-5, atol=1e-6)


def test_plan_picks_the_fewest_accumulation_steps_that_fit():
    model = planner.MemoryModel(fixed_bytes=10 * planner.GIB, bytes_per_sample=0.5 * planner.GIB,
                                seconds_per_sample=0.01, seconds_fixed=0.1, source="measured")
    # 1680 / 16 = 105 per GPU; (80 * 0.9 - 10) / 0.5 = 124 fit -> 105, no accumulation
    fits = planner.plan(model, 16, 80, 1680)
    assert (fits.micro_batch, fits.accumulation) == (105, 1)
    assert fits.step_seconds == pytest.approx(0.1 + 105 * 0.01)
    # 40 GiB: (36 - 10) / 0.5 = 52 fit -> the largest divisor of 105 below: 35, 3 accumulation steps
    small = planner.plan(model, 16, 40, 1680)
    assert (small.micro_batch, small.accumulation) == (35, 3)
    assert "micro batch 35 x 16 GPUs x 3 accumulation" in small.describe()
    with pytest.raises(ValueError, match="not a multiple of 16 GPUs; use 1664 or 1680"):
        planner.plan(model, 16, 80, 1670)
    with pytest.raises(ValueError, match="one sample does not fit"):
        planner.plan(model, 16, 10, 1680)
    measured = planner.from_measurements(1 * planner.GIB, [(8, 5 * planner.GIB, 0.2), (16, 9 * planner.GIB, 0.3)])
    assert measured.bytes_per_sample == pytest.approx(0.5 * planner.GIB)
    assert measured.fixed_bytes == pytest.approx(1 * planner.GIB)
    assert measured.seconds_per_sample == pytest.approx(0.0125) and measured.seconds_fixed == pytest.approx(0.1)


@pytest.mark.slow
def test_bench_runs_at_tiny_size_and_prints_its_table(tmp_path):
    out = tmp_path / "bench.json"
    run = subprocess.run([sys.executable, str(ROOT / "launch" / "bench.py"), "--steps", "2", "--warmup", "1",
                          "--plan", "--compile-vit", "default", "--compare-length-groups", "--length-groups", "3", "--json", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=900,
                         env={**subprocess_env(), "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stderr[-3000:]
    for line in ("stage1 project", "stage1 baseline", "stage2 project", "stage2 baseline",
                 "stage 1: project / baseline =", "stage 2: project / baseline =", "without the DeepSpeed engine",
                 "plan, stage 1 (real shapes): 16 GPUs", "stage 2: with the frozen tower compiled / eager tower =",
                 "stage2 one-batch-llm", "stage 2: length groups / one padded batch =",
                 "stage 2: frozen-LLM positions per step"):
        assert line in run.stdout, run.stdout
    assert "garbage collection after setup: a full collection" in run.stdout, run.stdout
    report = json.loads(out.read_text())
    assert report["software"]["torch"].startswith(torch.__version__.split("+")[0])
    assert report["software"]["deepspeed"] != "absent" and "software: python " in run.stdout
    collection = report["garbage_collection"]
    assert collection["objects"] > 100_000 and collection["frozen_seconds"] < collection["seconds"]
    assert {r["name"] for r in report["results"]} == {f"stage{s} {w}" for s in (1, 2)
                                                      for w in ("project", "compiled-vit", "no-engine", "baseline")
                                                      } | {"stage2 one-batch-llm"}
    padded, grouped = report["llm_positions"]
    assert 0 < grouped < padded  # the synthetic captions vary in length: the groups drop pad positions
    for result in report["results"]:
        assert result["samples_per_s"] > 0 and result["flops_per_sample"] > 0
        assert set(result["phases"]) == {"input", "vit", "forward", "losses", "backward", "optimizer", "comm"}
        assert 0 < result["phases"]["losses"] < result["phases"]["forward"]  # the loss ranges were profiled
        assert all(torch.isfinite(torch.tensor(v)) for v in result["losses"].values())


@pytest.mark.parametrize("kind", ["open_clip", "eva"])
def test_baselines_written_out_vision_attention_equals_the_fused_tower(tmp_path, kind):
    """The baseline's ViT (attention written out, as the original's) computes the project's tokens."""
    from test_vision import tower_cfg

    from torch.overrides import TorchFunctionMode

    from blip2_ds.bench.original_step import eager_vision_attention
    from blip2_ds.models.vision import build_vision_tower

    torch.manual_seed(0)
    tower = build_vision_tower(tower_cfg(tmp_path, kind, dtype="fp32"))
    with torch.no_grad():
        for p in tower.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    pixels = torch.randn(3, 3, tower.image_size, tower.image_size, generator=torch.Generator().manual_seed(1))
    fused = tower(pixels)
    calls = []

    class Watch(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            calls.append(getattr(func, "__name__", str(func)))
            return func(*args, **(kwargs or {}))

    with eager_vision_attention(tower), torch.no_grad(), Watch():
        written_out = tower.encode(pixels)
    assert "scaled_dot_product_attention" not in calls and "softmax" in calls
    torch.testing.assert_close(written_out, fused, rtol=1e-5, atol=1e-5)
    # and the context restores the fused path
    assert tower(pixels).equal(fused)
