"""The DeepSpeed side of the trainer: schedule, parameter groups, ds-config filling, ZeRO-2 on CPU.

The multi-process tests spawn 2 real gloo ranks running DeepSpeed ZeRO-2 (``ds_configs/zero2.json``,
filled by ``fill_ds_config``) and compare them with ONE plain-PyTorch process (torch AdamW with the
same groups, schedule, clipping and temperature clamp) on the same global batch per step; see
``tests/engine_worker.py``. Measured with deepspeed 0.19.8 / torch 2.14 on CPU:

- fp32: per-step losses agree to ~1e-7 relative over 20 steps; first averaged gradient to ~4e-7.
- bf16: the reference is a bf16 model with fp32 master weights (what DeepSpeed's bf16 mode does).
  Step 0 agrees to ~1e-8 (same weights); over 20 steps the DeepSpeed losses are within 9.5e-3
  (relative) of the fp32 reference and 0.9e-2 / 3.6e-2 of the bf16 reference computed with 2 / 1
  intra-op threads. That spread is the bf16 noise floor, not a DeepSpeed effect: the SAME bf16
  reference run with 1 vs 2 threads differs by 3.2e-2 (bf16 unit roundoff 2**-8 ~ 3.9e-3, amplified
  by the trajectory; Adam turns even noise-level gradients into lr-sized updates). Tolerance: 5e-2.
  The first averaged gradient is the sharper check: per tensor within 5e-2 of the fp32 gradient
  (measured ~2.5e-2, the bf16 reference's own error is ~2.3e-2). A submodule-reuse bug (the
  Q-Former runs 3 times per step) would show up as O(1) errors there.
"""
import json
import math

import pytest
import torch
import torch.multiprocessing as mp
from conftest import tiny_qformer_config
from torch import nn

import engine_worker as worker
from blip2_ds.config import OptimConfig
from blip2_ds.models.stage1 import Stage1Model
from blip2_ds.train import engine as ds_engine
from blip2_ds.train import schedule

ZERO2_JSON = worker.ROOT / "ds_configs" / "zero2.json"
BF16_LOSS_RTOL = 5e-2  # see the module docstring: bf16 trajectories of this tiny model drift ~3e-2 in 20 steps


# ---- schedule --------------------------------------------------------------------------------
def test_schedule_values():
    peak, warmup, total, min_lr = 1e-4, 2000, 250_000, 1e-5
    lr = lambda t: schedule.lr_at(t, peak, warmup, total, min_lr)  # noqa: E731
    assert lr(0) == 0.0
    assert math.isclose(lr(warmup // 2), peak / 2)
    assert math.isclose(lr(warmup), peak)
    assert math.isclose(lr(warmup + (total - warmup) // 2), (peak + min_lr) / 2)
    assert math.isclose(lr(total), min_lr)
    assert lr(total + 10) == min_lr
    # From a small start (the original warms up from 1e-6).
    assert math.isclose(schedule.lr_at(0, peak, warmup, total, min_lr, warmup_start=1e-6), 1e-6)
    assert math.isclose(schedule.lr_at(warmup // 2, peak, warmup, total, min_lr, warmup_start=1e-6), (peak + 1e-6) / 2)
    values = [lr(t) for t in range(0, total + 1, 500)]
    warm = [v for t, v in zip(range(0, total + 1, 500), values) if t <= warmup]
    decay = [v for t, v in zip(range(0, total + 1, 500), values) if t >= warmup]
    assert all(a < b for a, b in zip(warm, warm[1:]))
    assert all(a > b for a, b in zip(decay, decay[1:]))  # strictly decreasing per step, not a staircase
    assert schedule.lr_at(3, 1.0, 0, 10) < 1.0  # no warmup: cosine from step 0


def test_schedule_lambda_lr_drives_the_optimizer():
    peak, warmup, total, min_lr = 2e-3, 4, 12, 1e-4
    params = [nn.Parameter(torch.zeros(2)), nn.Parameter(torch.zeros(()))]
    optimizer = torch.optim.AdamW([{"params": params[:1]}, {"params": params[1:], "weight_decay": 0.0}], lr=peak)
    scheduler = schedule.build_scheduler(optimizer, peak, warmup, total, min_lr)
    for step in range(total + 3):
        for group in optimizer.param_groups:
            assert math.isclose(group["lr"], schedule.lr_at(step, peak, warmup, total, min_lr), rel_tol=1e-12)
        optimizer.step()
        scheduler.step()


@pytest.mark.parametrize("args", [(1e-4, 10, 10, 0.0), (1e-4, -1, 10, 0.0), (1e-4, 1, 10, 2e-4), (0.0, 1, 10, 0.0)])
def test_schedule_rejects_bad_settings(args):
    with pytest.raises(ValueError):
        schedule.lr_at(0, *args)


# ---- parameter groups ------------------------------------------------------------------------
class _WithFrozen(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.stage1 = Stage1Model(tiny_qformer_config())
        self.frozen = nn.Linear(4, 4).requires_grad_(False)
        self.gain = nn.Parameter(torch.ones(3))  # 1-D, neither bias nor norm


def test_param_groups_decay_only_matrices():
    model = _WithFrozen()
    decay, no_decay = ds_engine.decay_split(model)
    groups = ds_engine.param_groups(model, 0.05)
    assert [g["weight_decay"] for g in groups] == [0.05, 0.0]
    named = dict(model.named_parameters())
    assert [id(p) for p in groups[0]["params"]] == [id(named[n]) for n in decay]
    assert [id(p) for p in groups[1]["params"]] == [id(named[n]) for n in no_decay]

    assert "stage1.temp" in no_decay  # the original BLIP-2 decays it
    assert "gain" in no_decay
    assert "stage1.ln_vision.weight" in no_decay and "stage1.ln_vision.bias" in no_decay
    assert all(n in no_decay for n in named if n.endswith("bias") and named[n].requires_grad)
    norm_weights = [f"{m}.weight" for m, mod in model.named_modules() if isinstance(mod, nn.LayerNorm)]
    assert norm_weights and all(n in no_decay for n in norm_weights)
    assert all(named[n].ndim >= 2 for n in decay)
    assert "stage1.query_tokens" in decay and "stage1.vision_proj.weight" in decay

    # Frozen parameters are in no group; every trainable parameter is in exactly one.
    grouped = [id(p) for g in groups for p in g["params"]]
    assert len(grouped) == len(set(grouped))
    assert set(grouped) == {id(p) for p in model.parameters() if p.requires_grad}
    assert id(model.frozen.weight) not in grouped and id(model.frozen.bias) not in grouped


def test_param_groups_drop_empty_groups():
    model = nn.LayerNorm(4)
    assert [g["weight_decay"] for g in ds_engine.param_groups(model, 0.05)] == [0.0]


# ---- ds config and batch arithmetic ------------------------------------------------------------
def _zero2() -> dict:
    return json.loads(ZERO2_JSON.read_text())


def test_fill_ds_config_fills_auto_keys():
    raw = _zero2()
    filled = ds_engine.fill_ds_config(raw, micro_batch=35, grad_accum=3, world_size=16, grad_clip=1.0, precision="bf16")
    assert filled["train_micro_batch_size_per_gpu"] == 35
    assert filled["gradient_accumulation_steps"] == 3
    assert filled["train_batch_size"] == 1680
    assert filled["gradient_clipping"] == 1.0
    assert filled["bf16"]["enabled"] is True and filled["fp16"]["enabled"] is False
    assert filled["zero_optimization"]["stage"] == 2
    assert raw["train_batch_size"] == "auto"  # the input is not modified
    fp32 = ds_engine.fill_ds_config(raw, micro_batch=2, grad_accum=1, world_size=1, grad_clip=0.0, precision="fp32")
    assert fp32["bf16"]["enabled"] is False and fp32["fp16"]["enabled"] is False and fp32["gradient_clipping"] == 0.0
    # Absent keys are filled too (DeepSpeed's silent defaults would otherwise win over the YAML).
    bare = ds_engine.fill_ds_config({"zero_optimization": {"stage": 2}}, micro_batch=4, grad_accum=2, world_size=2,
                                    grad_clip=1.0, precision="bf16")
    assert bare["train_batch_size"] == 16 and bare["bf16"] == {"enabled": True}


def test_fill_ds_config_accepts_agreeing_explicit_values():
    raw = dict(_zero2(), train_micro_batch_size_per_gpu=8, gradient_clipping=1.0, bf16={"enabled": True})
    filled = ds_engine.fill_ds_config(raw, micro_batch=8, grad_accum=2, world_size=4, grad_clip=1.0, precision="bf16")
    assert filled["train_batch_size"] == 64


def test_fill_ds_config_contradiction_names_both_sides():
    raw = dict(_zero2(), train_micro_batch_size_per_gpu=32)
    with pytest.raises(ValueError) as error:
        ds_engine.fill_ds_config(raw, micro_batch=64, grad_accum=1, world_size=2, grad_clip=1.0, precision="bf16",
                                 ds_source="ds_configs/zero2.json", yaml_source="configs/stage1.yaml")
    message = str(error.value)
    for part in ("ds_configs/zero2.json", "train_micro_batch_size_per_gpu=32", "configs/stage1.yaml",
                 "data.batch_size=64"):
        assert part in message, message
    with pytest.raises(ValueError, match=r"gradient_clipping=0\.5.*optim\.grad_clip=1\.0"):
        ds_engine.fill_ds_config(dict(_zero2(), gradient_clipping=0.5), micro_batch=1, grad_accum=1, world_size=1,
                                 grad_clip=1.0, precision="bf16")
    with pytest.raises(ValueError, match=r"bf16\.enabled=True.*contradicts precision='fp32'"):
        ds_engine.fill_ds_config(dict(_zero2(), bf16={"enabled": True}), micro_batch=1, grad_accum=1, world_size=1,
                                 grad_clip=1.0, precision="fp32")
    with pytest.raises(ValueError, match=r"train_batch_size=100.*data\.batch_size=4 x the accumulation "
                                         r"\(optim\.global_batch / \(data\.batch_size x ranks\)\)=2"):
        ds_engine.fill_ds_config(dict(_zero2(), train_batch_size=100), micro_batch=4, grad_accum=2, world_size=8,
                                 grad_clip=1.0, precision="bf16")


def test_fill_ds_config_rejects_optimizer_sections_and_unfilled_auto():
    with pytest.raises(ValueError, match="optimizer"):
        ds_engine.fill_ds_config(dict(_zero2(), optimizer={"type": "AdamW"}), micro_batch=1, grad_accum=1,
                                 world_size=1, grad_clip=1.0, precision="bf16")
    raw = _zero2()
    raw["zero_optimization"]["reduce_bucket_size"] = "auto"
    with pytest.raises(ValueError, match=r"zero_optimization\.reduce_bucket_size"):
        ds_engine.fill_ds_config(raw, micro_batch=1, grad_accum=1, world_size=1, grad_clip=1.0, precision="bf16")


def test_fill_ds_config_refuses_zero3_and_the_legacy_bfloat16_section():
    raw = _zero2()
    raw["zero_optimization"]["stage"] = 3
    with pytest.raises(ValueError, match=r"my\.json: zero_optimization\.stage=3.*use 2"):
        ds_engine.fill_ds_config(raw, micro_batch=1, grad_accum=1, world_size=1, grad_clip=1.0, precision="bf16",
                                 ds_source="my.json")
    # DeepSpeed would honour "bfloat16" while precision=fp32 filled "bf16": enabled=false beside it.
    with pytest.raises(ValueError, match=r"legacy 'bfloat16' section to 'bf16'"):
        ds_engine.fill_ds_config(dict(_zero2(), bfloat16={"enabled": True}), micro_batch=1, grad_accum=1,
                                 world_size=1, grad_clip=1.0, precision="fp32")


@pytest.mark.parametrize("section", [{"checkpoint": {"writer": {"type": "fast", "decoupled": True}}},
                                     {"datastates_ckpt": {"host_cache_size": 16}}], ids=["decoupled", "datastates"])
def test_fill_ds_config_refuses_asynchronous_checkpoint_writers(section):
    with pytest.raises(ValueError, match="asynchronous checkpoint writers"):
        ds_engine.fill_ds_config({**_zero2(), **section}, micro_batch=1, grad_accum=1, world_size=1, grad_clip=1.0,
                                 precision="fp32")


def test_decompose_batch():
    assert ds_engine.decompose_batch(1680, 16, 64) == (35, 3)  # BLIP-2 stage 1, ViT-g
    assert ds_engine.decompose_batch(2320, 16, 100) == (29, 5)
    assert ds_engine.decompose_batch(1024, 16, 64) == (64, 1)
    assert ds_engine.decompose_batch(8, 2, 2) == (2, 2)
    for global_batch, world, max_micro in [(1680, 16, 64), (1520, 8, 48), (7, 1, 3)]:
        micro, accum = ds_engine.decompose_batch(global_batch, world, max_micro)
        assert micro * accum * world == global_batch and micro <= max_micro


def test_decompose_batch_impossible_suggests_valid_batches():
    with pytest.raises(ValueError) as error:
        ds_engine.decompose_batch(1000, 16, 64)
    message = str(error.value)
    assert "1000" in message and "16" in message
    for suggestion in ("992", "1008", "1024 (micro 64 x accum 1 x 16 ranks)"):
        assert suggestion in message, message
    with pytest.raises(ValueError):
        ds_engine.decompose_batch(0, 2, 4)


def test_build_engine_checks_config_before_starting_anything():
    model = nn.Linear(2, 2)
    filled = ds_engine.fill_ds_config(_zero2(), micro_batch=1, grad_accum=1, world_size=1, grad_clip=1.0,
                                      precision="fp32")
    with pytest.raises(ValueError, match="grad_clip"):
        ds_engine.build_engine(model, filled, OptimConfig(grad_clip=0.5), precision="fp32")
    with pytest.raises(ValueError, match="precision"):
        ds_engine.build_engine(model, filled, OptimConfig(grad_clip=1.0), precision="bf16")
    with pytest.raises(ValueError, match="auto"):
        ds_engine.build_engine(model, _zero2(), OptimConfig(), precision="fp32")


# ---- ZeRO-2 on 2 real ranks vs one plain-PyTorch process ----------------------------------------
@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """DeepSpeed results (rank 0's view plus every rank's info) and the plain-PyTorch references."""
    tmp = tmp_path_factory.mktemp("zero2")
    out_file = tmp / "ranks.pt"
    mp.spawn(worker.worker, args=(str(tmp / "init"), str(out_file)), nprocs=worker.WORLD, join=True)
    deepspeed_runs = torch.load(out_file, weights_only=False)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # on a busy 2-core machine, spinning intra-op threads make this ~30x slower
    try:
        references = {precision: worker.train_reference(precision) for precision in worker.PRECISIONS}
    finally:
        torch.set_num_threads(threads)
    return deepspeed_runs, references


def _max_rel(got, ref):
    return max(abs(a - b) / abs(b) for a, b in zip(got, ref))


def _check_gradients(got: dict, ref: dict, rtol: float, atol_fraction: float) -> float:
    """Per tensor: ||got - ref|| <= rtol ||ref|| + atol_fraction ||ref_all||; returns the max relative error.

    The absolute term covers tensors whose exact gradient is 0 or nearly so (attention key biases:
    softmax ignores them; query/key weights at init), where a relative error is noise.
    """
    total = torch.cat([g.flatten() for g in ref.values()]).norm()
    worst = 0.0
    for name, expected in ref.items():
        diff = (got[name].double() - expected.double()).norm()
        assert diff <= rtol * expected.norm() + atol_fraction * total, \
            f"{name}: gradient off by {float(diff / expected.norm()):.3g} (relative)"
        if expected.norm() > 1e-4 * total:
            worst = max(worst, float(diff / expected.norm()))
    return worst


@pytest.mark.multiprocess
def test_zero2_fp32_two_ranks_match_one_process(runs):
    deepspeed_runs, references = runs
    got, ref = deepspeed_runs["fp32"], references["fp32"]
    assert len(got["losses"]) == worker.STEPS
    # The run exercises clipping both on and off, and a real learning-rate schedule.
    clip = worker.optim_config().grad_clip
    assert any(n > clip for n in ref["grad_norms"]) and any(n < clip for n in ref["grad_norms"])
    assert got["lrs"] == pytest.approx(ref["lrs"], rel=1e-12)
    assert _max_rel(got["losses"], ref["losses"]) < 1e-4, (got["losses"], ref["losses"])
    _check_gradients(got["first_grads"], ref["first_grads"], rtol=1e-4, atol_fraction=1e-6)
    for name, expected in ref["masters"].items():
        torch.testing.assert_close(got["masters"][name], expected, rtol=1e-3, atol=1e-4, msg=lambda m: f"{name}: {m}")


@pytest.mark.multiprocess
def test_zero2_bf16_two_ranks_match_one_process_within_bf16_tolerance(runs):
    deepspeed_runs, references = runs
    got = deepspeed_runs["bf16"]
    assert got["info"][0]["module_dtype"] == "torch.bfloat16"
    assert got["lrs"] == pytest.approx(references["bf16"]["lrs"], rel=1e-12)
    assert _max_rel(got["losses"], references["bf16"]["losses"]) < BF16_LOSS_RTOL
    assert _max_rel(got["losses"], references["fp32"]["losses"]) < BF16_LOSS_RTOL
    assert abs(got["losses"][0] - references["bf16"]["losses"][0]) < 1e-4 * got["losses"][0]  # same weights at step 0
    _check_gradients(got["first_grads"], references["fp32"]["first_grads"], rtol=5e-2, atol_fraction=1e-3)
    _check_gradients(got["first_grads"], references["bf16"]["first_grads"], rtol=5e-2, atol_fraction=1e-3)


@pytest.mark.multiprocess
@pytest.mark.parametrize("precision", worker.PRECISIONS)
def test_zero2_partitions_optimizer_state_and_skips_frozen(runs, precision):
    infos = runs[0][precision]["info"]
    assert len(infos) == worker.WORLD
    trainable = infos[0]["trainable_numel"]
    for info in infos:
        local = sum(info["partition_numel"])
        assert abs(local - trainable / worker.WORLD) <= 0.01 * trainable, (local, trainable)
        assert info["state_numel"] == local  # Adam moments only for this rank's partition
        assert info["trainable_in_groups"]
        assert not info["frozen_in_groups"] and not info["frozen_hp_linked"] and not info["frozen_in_client_groups"]
        assert info["tower_unchanged"]
    assert sum(sum(info["partition_numel"]) for info in infos) >= trainable


@pytest.mark.multiprocess
@pytest.mark.parametrize("precision", worker.PRECISIONS)
def test_temperature_clamp_reaches_zero_master_copy(runs, precision):
    for info in runs[0][precision]["info"]:
        assert info["temp_master_after_clamp"] == pytest.approx(info["temp_max"], rel=1e-6)
        assert info["temp_module_after_clamp"] == pytest.approx(info["temp_max"], rel=1e-2)
        assert info["constrain_collectives"] == 0  # the 0-dim master lies whole on its owner: clamped there


@pytest.mark.multiprocess
def test_a_checkpoint_is_on_disk_before_it_is_marked_complete(tmp_path):
    """Each rank flushes the files it wrote (DeepSpeed's included: on a shared filesystem only the writing
    node can), then the folder, before COMPLETE; then the renames of COMPLETE and ``latest``."""
    run = tmp_path / "run"
    mp.spawn(worker.save_worker, args=(str(tmp_path / "init"), str(run)), nprocs=worker.WORLD, join=True)
    synced = [json.loads((run / f"fsynced_by_rank_{rank}.json").read_text()) for rank in range(worker.WORLD)]
    root, folder = (run / "checkpoints").resolve(), (run / "checkpoints" / "step_00000001").resolve()
    for rank in range(worker.WORLD):
        assert str(folder / f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt") in synced[rank]
    everyone = {path for paths in synced for path in paths}
    unsynced = [p.name for p in folder.iterdir() if str(p) not in everyone and f"{p}.tmp" not in everyone]
    assert unsynced == [], f"never flushed to disk: {unsynced}"
    marked = synced[0].index(str(folder / "COMPLETE.tmp"))
    before_the_barrier = [synced[0][:marked], *synced[1:]]
    assert [paths[-1] for paths in before_the_barrier] == [str(folder)] * worker.WORLD, before_the_barrier
    assert synced[0][marked + 1:] == [str(folder), str(root / "latest.tmp"), str(root)], synced[0][marked:]
