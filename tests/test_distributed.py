"""Two real processes (gloo) with local batch B == one process on the concatenated 2B batch."""
import contextlib
import dataclasses

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import random_text, tiny_qformer_config

from blip2_ds.models.stage1 import Stage1Model

WORLD, LOCAL_BATCH, TEXT_LEN, IMAGE_TOKENS, SEED = 2, 3, 10, 6, 1234
WEIGHTINGS = {"itc": (1.0, 0.0, 0.0), "itm": (0.0, 1.0, 0.0), "itg": (0.0, 0.0, 1.0), "all": (1.0, 1.0, 1.0)}
METRICS = ("loss", "loss_itc", "loss_itm", "loss_itg", "itm_accuracy")


def build():
    torch.manual_seed(0)
    cfg = tiny_qformer_config()
    model = Stage1Model(cfg).double()
    with torch.no_grad():  # a sharper temperature than 0.07 spreads the hard-negative draw less evenly
        model.temp.fill_(0.2)
    generator = torch.Generator().manual_seed(1)
    batch = WORLD * LOCAL_BATCH
    image = torch.randn(batch, IMAGE_TOKENS, cfg.vision_width, generator=generator, dtype=torch.float64)
    ids, mask = random_text(batch, TEXT_LEN, cfg.vocab_size, generator)
    return model, image, ids, mask


def run_all(model, image, ids, mask):
    """Loss metrics and gradients for each weighting of the objectives."""
    results = {}
    for name, (w_itc, w_itm, w_itg) in WEIGHTINGS.items():
        model.objectives = dataclasses.replace(model.objectives, itc_weight=w_itc, itm_weight=w_itm, itg_weight=w_itg)
        model.zero_grad(set_to_none=True)
        out = model(image, ids, mask, sample_seed=SEED)
        out.loss.backward()
        grads = {n: p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p)
                 for n, p in model.named_parameters()}
        results[name] = (torch.stack([getattr(out, m).detach().double() for m in METRICS]), grads)
    return results


@contextlib.contextmanager
def gloo_group(rank: int, init_file: str, world: int):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        yield
    finally:
        dist.destroy_process_group()


def _worker(rank: int, init_file: str, out_file: str) -> None:
    with gloo_group(rank, init_file, WORLD):
        model, image, ids, mask = build()
        local = slice(rank * LOCAL_BATCH, (rank + 1) * LOCAL_BATCH)
        results = run_all(model, image[local], ids[local], mask[local])
        averaged = {}
        for name, (metrics, grads) in results.items():
            dist.all_reduce(metrics)  # the data-parallel average of losses and gradients
            for grad in grads.values():
                dist.all_reduce(grad)
            averaged[name] = (metrics / WORLD, {n: g / WORLD for n, g in grads.items()})
        if rank == 0:
            torch.save(averaged, out_file)


@pytest.mark.multiprocess
def test_two_ranks_match_one_process_on_the_global_batch(tmp_path):
    out_file = tmp_path / "ranks.pt"
    mp.spawn(_worker, args=(str(tmp_path / "init"), str(out_file)), nprocs=WORLD, join=True)
    distributed = torch.load(out_file)
    reference = run_all(*build())
    for name in WEIGHTINGS:
        ref_metrics, ref_grads = reference[name]
        got_metrics, got_grads = distributed[name]
        torch.testing.assert_close(got_metrics, ref_metrics, rtol=1e-5, atol=0, msg=f"{name}: losses differ")
        nonzero = [n for n, g in ref_grads.items() if g.abs().max() > 0]
        assert len(nonzero) > 10, f"{name}: suspiciously few parameters receive gradient"
        for param, ref in ref_grads.items():
            torch.testing.assert_close(got_grads[param], ref, rtol=1e-5, atol=1e-12,
                                       msg=lambda m, p=param: f"{name}: gradient of {p} differs: {m}")
    # The temperature gets ITC gradient, and every loss is exercised.
    assert reference["itc"][1]["temp"].abs() > 0
    assert (reference["all"][0][1:4] > 0).all()


def _fetch_worker(rank: int, init_file: str, out_file: str) -> None:
    from blip2_ds.distributed import all_gather_no_grad, fetch_rows

    with gloo_group(rank, init_file, 3):
        local = torch.arange(4 * 2 * 3, dtype=torch.float64).view(4, 2, 3) + 1000 * rank  # 4 rows per rank
        g = torch.Generator().manual_seed(rank)
        cases = [torch.randint(0, 12, (5,), generator=g),  # random, duplicates likely
                 torch.full((5,), 4 * ((rank + 1) % 3)),  # all from one other rank, the same row
                 (torch.arange(5) + 4 * rank) % 12]  # own rows and the next rank's first
        for wanted in cases:
            expected = all_gather_no_grad(local)[wanted]
            assert torch.equal(fetch_rows(local, wanted), expected), (rank, wanted)
        if rank == 0:
            torch.save(True, out_file)


@pytest.mark.multiprocess
def test_fetch_rows_moves_only_the_requested_rows_and_equals_gather_then_index(tmp_path):
    out_file = tmp_path / "ok.pt"
    mp.spawn(_fetch_worker, args=(str(tmp_path / "init"), str(out_file)), nprocs=3, join=True)
    assert torch.load(out_file) is True


def _worst_rank_worker(rank: int, init_file: str, out_file: str) -> None:
    from blip2_ds.train.loop import _worst_over_ranks

    with gloo_group(rank, init_file, 3):
        window = {"data_wait_share": [0.1, 0.4, 0.2][rank], "gc_share": [0.03, 0.0, 0.01][rank], "mfu": 0.5}
        worst = _worst_over_ranks(window)
        torch.save(worst, f"{out_file}.{rank}")


@pytest.mark.multiprocess
def test_the_worst_ranks_shares_reach_every_rank(tmp_path):
    out_file = tmp_path / "worst"
    mp.spawn(_worst_rank_worker, args=(str(tmp_path / "init"), str(out_file)), nprocs=3, join=True)
    for rank in range(3):
        worst = torch.load(f"{out_file}.{rank}")
        assert worst == pytest.approx({"data_wait_share_worst_rank": 0.4, "gc_share_worst_rank": 0.03})
