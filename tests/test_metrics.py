"""Training metrics: FLOP formulas vs FlopCounterMode on tiny real modules, throughput arithmetic,
TensorBoard tags, the plain progress line.

FlopCounterMode counts ``mm``/``addmm``/``bmm``/convolution and the CUDA SDPA kernels, but not the
CPU flash-attention kernel; the measurements therefore run with SDPA's math backend, which computes
attention with ``bmm`` (the same FLOPs, and counted).
"""
import io
import re

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from blip2_ds.config import QFormerConfig
from blip2_ds.train import metrics
from blip2_ds.train.metrics import MetricsLogger, Throughput, VisionDims
from tests.conftest import random_text, tiny_qformer_config

# Image tokens only matter to the Q-Former through their count and width: no ViT in the step tests.
NO_VIT = dict(width=24, depth=0, mlp_dim=1, tokens=17, patch=1, image_size=0)


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny ops under FlopCounterMode: threads only add contention (several times slower on a busy box)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def counted(fn):
    """(FLOPs FlopCounterMode counts while running ``fn``, its result)."""
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        result = fn()
    return counter.get_total_flops(), result


def assert_close(measured: float, analytic: float, rel: float = 0.01) -> None:
    assert analytic > 0 and abs(measured - analytic) <= rel * analytic, (measured, analytic, measured / analytic)


# ---- FLOP formulas ------------------------------------------------------------------------------
@pytest.mark.parametrize("overrides", [{}, dict(cross_attention_freq=1, num_query_tokens=6)])
def test_stage1_step_flops_match_flop_counter(overrides):
    from blip2_ds.models.stage1 import Stage1Model

    cfg = tiny_qformer_config(**overrides)
    torch.manual_seed(0)
    model = Stage1Model(cfg)
    batch, tokens, length = 4, NO_VIT["tokens"], 12
    ids, mask = random_text(batch, length, cfg.vocab_size, torch.Generator().manual_seed(0))
    image = torch.randn(batch, tokens, cfg.vision_width)
    forward, out = counted(lambda: model(image, ids, mask))
    backward, _ = counted(lambda: out.loss.backward())
    predicting = mask[:, 1:].sum().item() / batch
    flops = metrics.stage1_step_flops(cfg, dict(NO_VIT, width=cfg.vision_width), length, predicting,
                                      global_batch=batch)
    assert_close(forward / batch, flops["qformer_forward"])
    assert_close((forward + backward) / batch, flops["qformer_train"])
    assert flops["total"] == pytest.approx(flops["vit"] + 3 * sum(
        flops[k] for k in ("image_kv", "image_pass", "text_pass", "itm_pass", "itg_pass", "itc")))


def _tiny_tower(kind: str):
    from blip2_ds.models.vision import FrozenVisionTower

    if kind == "timm":  # EVA01 as timm builds it (BLIP-2's ViT-g), at test size
        import timm.models.eva

        encoder = timm.models.eva.eva_giant_patch14_224(pretrained=False, img_size=32, patch_size=8, embed_dim=32,
                                                        depth=3, num_heads=2, mlp_ratio=2.0)
    else:
        from open_clip.model import _build_vision_tower

        encoder = _build_vision_tower(16, dict(image_size=32, layers=3, width=32, head_width=16, patch_size=8))
        encoder.attn_pool = encoder.attn_pool_contrastive = None
    encoder.prune_intermediate_layers([1], prune_norm=True, prune_head=True)  # what build_vision_tower does
    return FrozenVisionTower(encoder, kind, f"tiny-{kind}", torch.float32)


@pytest.mark.parametrize("kind", ["timm", "open_clip"])
def test_vit_forward_flops_match_flop_counter(kind):
    torch.manual_seed(0)
    tower = _tiny_tower(kind)
    dims = VisionDims.from_tower(tower)
    assert (dims.width, dims.depth, dims.tokens, dims.patch, dims.image_size) == (32, 2, 17, 8, 32)
    pixels = torch.randn(2, 3, 32, 32)
    # nn.MultiheadAttention's fused inference path (open_clip towers) is invisible to FlopCounterMode.
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        measured, out = counted(lambda: tower(pixels))
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
    assert out.shape == (2, 17, 32)
    analytic = metrics.vit_forward_flops(dims.width, dims.depth, dims.mlp_dim, dims.tokens, dims.patch,
                                         dims.image_size)
    assert_close(measured / 2, analytic)


class _StubTokenizer:
    eos_token_id, pad_token_id, bos_token_id = 2, 1, 2

    def __call__(self, text, add_special_tokens=False):
        return type("Encoded", (), {"input_ids": [5]})()


def test_stage2_step_flops_match_flop_counter():
    from transformers import OPTConfig, OPTForCausalLM

    from blip2_ds.config import LanguageConfig
    from blip2_ds.models.language import FrozenLanguageModel
    from blip2_ds.models.stage2 import Stage2Model, TextBatch

    torch.manual_seed(0)
    opt = OPTConfig(vocab_size=97, hidden_size=32, word_embed_proj_dim=32, num_hidden_layers=2, ffn_dim=64,
                    num_attention_heads=4, max_position_embeddings=64, pad_token_id=1, bos_token_id=2, eos_token_id=2)
    llm = FrozenLanguageModel(OPTForCausalLM(opt), _StubTokenizer(), LanguageConfig(kind="opt", dtype="fp32"))
    cfg = tiny_qformer_config()
    model = Stage2Model(cfg, llm)
    batch, length = 3, 10
    ids, mask = random_text(batch, length, opt.vocab_size, torch.Generator().manual_seed(0))
    text = TextBatch(ids, mask, ids.masked_fill(mask == 0, -100))
    image = torch.randn(batch, NO_VIT["tokens"], cfg.vision_width)
    forward, loss = counted(lambda: model(image, text))
    backward, _ = counted(lambda: loss.backward())
    flops = metrics.stage2_step_flops(cfg, dict(NO_VIT, width=cfg.vision_width), metrics.LLMDims.from_hf_config(opt),
                                      length)
    assert_close(forward / batch, flops["qformer_forward"] + flops["llm_forward"])
    assert_close(backward / batch, 2 * flops["qformer_forward"] + flops["llm_backward"])
    assert_close((forward + backward) / batch, flops["total"] - flops["vit"])


def test_real_size_numbers_are_plausible():
    vit = metrics.vit_forward_flops(1408, 39, 6144, 257, 14, 224)
    # ~2 FLOPs per parameter per token (39 blocks of ~24.9M weights) plus attention and patch embedding.
    block_params = 4 * 1408 ** 2 + 2 * 1408 * 6144
    assert 2 * 39 * block_params * 257 < vit < 1.06 * 2 * 39 * block_params * 257
    step = metrics.stage1_step_flops(QFormerConfig(), metrics.EVA_VIT_G, text_len=32, predicting_tokens=12)
    assert step["vit"] == vit
    assert 0.6e12 < step["total"] < 0.8e12 and step["qformer_train"] == 3 * step["qformer_forward"]
    stage2 = metrics.stage2_step_flops(QFormerConfig(), metrics.EVA_VIT_G, metrics.OPT_2_7B, text_len=32)
    assert stage2["llm_backward"] > stage2["llm_forward"]  # activations only, but attention backward is 2x


def test_measure_matmul_tflops_on_cpu_is_quick():
    import time

    start = time.perf_counter()
    tflops = metrics.measure_matmul_tflops("cpu")
    assert time.perf_counter() - start < 1.0
    assert tflops > 0


# ---- throughput ---------------------------------------------------------------------------------
class FakeClock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def test_throughput_arithmetic():
    tp = Throughput(flops_per_sample=2e12, world_size=4, peak_tflops=50.0, device="cpu")
    for _ in range(4):
        tp.record(step_time=0.5, data_wait=0.05, samples=8, gc_time=0.02)  # 4 steps, 2 s, 32 local samples
    out = tp.summary()
    assert out["samples_per_s_per_gpu"] == pytest.approx(16.0)
    assert out["samples_per_s"] == pytest.approx(64.0)
    assert out["data_wait_share"] == pytest.approx(0.1)
    assert out["gc_share"] == pytest.approx(0.04)
    assert out["step_time_s"] == pytest.approx(0.5)
    assert out["tflops_per_gpu"] == pytest.approx(32.0)  # 2 TFLOP x 16 samples/s
    assert out["mfu"] == pytest.approx(32.0 / 50.0)
    assert out["peak_memory_gb"] > 0.01  # this process's max RSS
    assert out["alloc_retries"] is None  # CUDA only
    assert tp.steps == 0 and tp.summary()["samples_per_s"] == 0.0  # the window was reset
    assert Throughput().summary()["tflops_per_gpu"] is None and Throughput(1.0).summary()["mfu"] is None


def test_throughput_timing_from_the_loop_hooks():
    clock = FakeClock()
    tp = Throughput(flops_per_sample=1e12, world_size=2, clock=clock)
    tp.start()
    for wait, compute in [(0.3, 0.7), (0.1, 0.9)]:
        clock.now += wait
        tp.data_ready()
        clock.now += compute
        tp.step_done(10)
    out = tp.summary(reset=False)
    assert tp.step_time == pytest.approx(2.0) and tp.data_wait == pytest.approx(0.4)
    assert out["data_wait_share"] == pytest.approx(0.2)
    assert out["samples_per_s_per_gpu"] == pytest.approx(10.0) and out["samples_per_s"] == pytest.approx(20.0)
    assert out["tflops_per_gpu"] == pytest.approx(10.0) and out["mfu"] is None


# ---- TensorBoard and progress -------------------------------------------------------------------
STAGE1_METRICS = {
    "loss": 3.21, "loss_itc": 1.02, "loss_itm": 0.55, "loss_itg": torch.tensor(1.64), "itm_accuracy": 0.7,
    "lr": 1e-4, "grad_norm": 2.5, "temperature": 0.07, "loss_scale": None, "skipped_steps": 0,
    "samples_per_s": 45.2, "samples_per_s_per_gpu": 11.3, "data_wait_share": 0.05, "tflops_per_gpu": 120.0,
    "mfu": 0.381, "peak_memory_gb": 40.5, "skipped_samples": {"decode_error": 3, "no_caption": 1},
}
EXPECTED_TAGS = {
    "loss/total", "loss/itc", "loss/itm", "loss/itg", "train/itm_accuracy", "train/lr", "train/grad_norm",
    "train/temperature", "train/loss_scale", "train/skipped_steps", "perf/samples_per_s",
    "perf/samples_per_s_per_gpu", "perf/data_wait_share", "perf/tflops_per_gpu", "perf/mfu", "perf/peak_memory_gb",
    "data/skipped/decode_error", "data/skipped/no_caption", "loss/lm",
}


def read_events(log_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    return acc


def test_tensorboard_tags_and_config(tmp_path):
    config = {"model": {"hidden_size": 768}, "optim": {"betas": (0.9, 0.999), "lr": 1e-4}, "stage": 1}
    log = MetricsLogger(tmp_path, rank=0, total_steps=1000, config_dict=config, stream=io.StringIO())
    log.log(50, STAGE1_METRICS)
    log.log(100, dict(STAGE1_METRICS, loss_scale=65536.0, loss=3.0))
    log.log(100, {"loss_lm": 2.5})  # stage 2's loss
    log.close()
    acc = read_events(tmp_path)
    assert EXPECTED_TAGS <= set(acc.Tags()["scalars"])
    assert [(e.step, e.value) for e in acc.Scalars("loss/total")] == [(50, pytest.approx(3.21)), (100, 3.0)]
    assert [e.step for e in acc.Scalars("train/loss_scale")] == [100]  # None is skipped
    assert acc.Scalars("data/skipped/decode_error")[0].value == 3
    text_tag = next(t for t in acc.Tags()["tensors"] if t.startswith("config"))
    text = acc.Tensors(text_tag)[0].tensor_proto.string_val[0].decode()
    assert text.startswith("```yaml\n") and text.endswith("```")
    assert "hidden_size: 768" in text and "- 0.999" in text


def test_a_checkpoint_save_is_logged_with_its_cost(tmp_path):
    stream = io.StringIO()
    log = MetricsLogger(tmp_path, rank=0, total_steps=1000, config_dict=None, stream=stream)
    line = log.log_checkpoint(500, seconds=9.25, size_bytes=3_712_000_000, time_share=0.0123)
    assert line == ("checkpoint at step 500: 3.71 GB in 9.25 s (1.2% of the time since the previous save "
                    "or the start)")
    log.close()
    assert stream.getvalue().splitlines() == [line]
    acc = read_events(tmp_path)
    assert {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in
            ("checkpoint/save_seconds", "checkpoint/size_gb", "checkpoint/time_share")} == {
        "checkpoint/save_seconds": [(500, 9.25)], "checkpoint/size_gb": [(500, pytest.approx(3.712))],
        "checkpoint/time_share": [(500, pytest.approx(0.0123))]}
    quiet = MetricsLogger(tmp_path / "rank1", rank=1, total_steps=10, config_dict=None, stream=stream)
    assert quiet.log_checkpoint(5, 1.0, 10, 0.5) is None and stream.getvalue().splitlines() == [line]


def test_other_ranks_write_and_print_nothing(tmp_path):
    stream = io.StringIO()
    log = MetricsLogger(tmp_path / "tb", rank=1, total_steps=10, config_dict={"a": 1}, stream=stream)
    assert log.log(5, STAGE1_METRICS) is None
    log.close()
    assert not (tmp_path / "tb").exists() and stream.getvalue() == ""


def test_plain_log_line(tmp_path):
    clock, stream = FakeClock(), io.StringIO()
    log = MetricsLogger(tmp_path, rank=0, total_steps=1000, config_dict=None, enabled_tensorboard=False,
                        stream=stream, clock=clock)
    clock.now += 60.0
    first = log.log(100, STAGE1_METRICS)  # 100 steps in 60 s since construction: 900 left -> 9 min
    assert first == ("step 100/1000 | loss 3.21 | itc 1.02 | itm 0.55 | itg 1.64 | lr 1.00e-04 "
                     "| 45.2 samples/s | mfu 38.1% | eta 0:09:00")
    clock.now += 30.0
    line = log.log(120, {"loss": 3.2, "loss_lm": 1.5, "samples_per_s": 40})  # rate since step 100: 1.5 s/step
    assert line == "step 120/1000 | loss 3.2 | lm 1.5 | 40.0 samples/s | eta 0:22:00"
    log.close()
    assert stream.getvalue().splitlines() == [first, line]
    assert not list(tmp_path.iterdir())  # TensorBoard disabled: no files
    assert re.fullmatch(r"step \d+/\d+( \| [^|]+)* \| eta (\d+:\d\d:\d\d|\?)", line)


def test_tty_gets_a_progress_bar(tmp_path):
    class Tty(io.StringIO):
        def isatty(self):
            return True

    stream = Tty()
    log = MetricsLogger(tmp_path, rank=0, total_steps=200, config_dict=None, enabled_tensorboard=False, stream=stream)
    assert log.bar is not None
    log.log(50, {"loss": 2.0})
    assert log.bar.n == 50
    log.close()
    assert "50/200" in stream.getvalue() and "loss 2" in stream.getvalue()
