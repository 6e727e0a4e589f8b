"""Benchmark of the fused kernels against the eager torch path, torch.compile and SDPA, in one run.

    python kernels/bench.py                    # on a GPU: BLIP-2 shapes, bf16
    python kernels/bench.py --sizes tiny       # on a CPU (kernels in Triton's interpreter: timings say nothing)
    python kernels/bench.py --json out.json    # also write the rows as JSON

Each row: forward + backward time (median over --iters after --warmup) and peak memory above the
inputs (CUDA only), with ratios against the eager baseline measured in the same run; for
cross-attention also against the best SDPA backend, and which path ``kernels: auto`` should take.

Shapes (``--sizes blip2``): contrastive B=210 local rows, BW=1680 gathered columns (8 ranks), Q=32,
D=256; cross-attention B=210, 12 heads of 64, Lq=32 queries, Lk=257 (224 px) and 677 (364 px).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SIZES = {
    "blip2": dict(contrastive=[(210, 1680, 32, 256)], cross_attention=[(210, 12, 32, 257, 64), (210, 12, 32, 677, 64)]),
    "tiny": dict(contrastive=[(8, 32, 4, 32)], cross_attention=[(2, 2, 8, 40, 16)]),
}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", choices=sorted(SIZES), default=None, help="default: blip2 on CUDA, tiny on CPU")
    parser.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default=None, help="default: bf16 on CUDA, fp32 on CPU")
    parser.add_argument("--iters", type=int, default=None, help="timed repetitions (default: 50 on CUDA, 2 on CPU)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed repetitions first (default: 10 / 1)")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile baselines")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    cuda = torch.cuda.is_available()
    if not cuda:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before any kernel module is imported
    device = "cuda" if cuda else "cpu"
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype or ("bf16" if cuda else "fp32")]
    sizes = SIZES[args.sizes or ("blip2" if cuda else "tiny")]
    timer = Timer(device, args.iters or (50 if cuda else 2), args.warmup or (10 if cuda else 1))
    name = torch.cuda.get_device_name() if cuda else "CPU (Triton interpreter: kernel timings are not meaningful)"
    print(f"device: {name}; dtype {dtype}; torch {torch.__version__}")
    rows = []
    for shape in sizes["contrastive"]:
        rows += bench_contrastive(timer, *shape, dtype=dtype, compile_=not args.no_compile)
    for shape in sizes["cross_attention"]:
        rows += bench_cross_attention(timer, *shape, dtype=dtype, compile_=not args.no_compile)
    if args.json:
        args.json.write_text(json.dumps({"device": name, "dtype": str(dtype), "rows": rows}, indent=1))
    return 0


class Timer:
    def __init__(self, device: str, iters: int, warmup: int):
        self.device, self.iters, self.warmup = device, iters, warmup

    def measure(self, step: Callable[[], None]) -> tuple[float, float | None]:
        """(median ms, peak MB above what was allocated before) of ``step``; None if it failed."""
        import torch

        for _ in range(self.warmup):
            step()
        cuda = self.device == "cuda"
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        times = []
        for _ in range(self.iters):
            if cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                step()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end))
            else:
                t0 = time.perf_counter()
                step()
                times.append(1e3 * (time.perf_counter() - t0))
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20 if cuda else None
        return statistics.median(times), peak


def fwd_bwd(fn: Callable, inputs: list) -> Callable[[], None]:
    import torch

    def step():
        for t in inputs:
            t.grad = None
        out = fn(*inputs)
        loss = out if out.dim() == 0 else out.float().square().mean()  # a scalar that depends on every output
        torch.autograd.backward(loss)
    return step


def report(title: str, results: dict[str, tuple[float, float | None]], baseline: str, also: str | None = None):
    print(f"\n{title}")
    header = f"  {'path':<28} {'fwd+bwd ms':>11} {'peak MB':>9} {'x vs ' + baseline:>14}"
    if also:
        header += f" {'x vs ' + also:>16}"
    print(header)
    rows = []
    base_ms = results[baseline][0]
    also_ms = results[also][0] if also else None
    for path, (ms, peak) in results.items():
        line = f"  {path:<28} {ms:>11.3f} {('n/a' if peak is None else f'{peak:.1f}'):>9} {base_ms / ms:>14.2f}"
        if also:
            line += f" {also_ms / ms:>16.2f}"
        print(line)
        rows.append(dict(benchmark=title, path=path, ms=ms, peak_mb=peak, speedup_vs_baseline=base_ms / ms))
    return rows


def bench_contrastive(timer: Timer, batch: int, global_batch: int, queries: int, dim: int, dtype, compile_: bool):
    import torch
    import torch.nn.functional as F

    from blip2_ds.objectives.itc import itc_loss_gathered

    device = timer.device
    generator = torch.Generator(device=device).manual_seed(0)

    def features(*shape):
        return F.normalize(torch.randn(*shape, device=device, generator=generator), dim=-1).to(dtype).requires_grad_()

    inputs = [features(batch, queries, dim), features(batch, dim), features(global_batch, queries, dim),
              features(global_batch, dim), torch.tensor(0.07, device=device, requires_grad=True)]

    def loss_with(backend):
        return lambda i, t, ia, ta, temp: itc_loss_gathered(i, t, ia, ta, temp, 0.1, backend, target_offset=0).loss

    paths = {"eager torch (einsum+amax)": loss_with("torch")}
    if compile_:
        paths["torch.compile(eager)"] = torch.compile(loss_with("torch"))
    paths["triton kernel"] = loss_with("triton")
    results = {}
    for path, fn in paths.items():
        try:
            results[path] = timer.measure(fwd_bwd(fn, inputs))
        except Exception as err:  # a baseline that cannot run here is reported, not fatal
            print(f"  {path}: failed ({type(err).__name__}: {str(err)[:200]})")
    title = f"contrastive ITC loss, B={batch} BW={global_batch} Q={queries} D={dim}"
    rows = report(title, results, "eager torch (einsum+amax)")
    eager, ours = results.get("eager torch (einsum+amax)"), results.get("triton kernel")
    if eager and ours and eager[1] and ours[1]:
        print(f"  peak memory triton / eager: {ours[1] / eager[1]:.3f} (target <= 0.25); "
              f"speed {eager[0] / ours[0]:.2f}x (target >= 2)")
    return rows


def bench_cross_attention(timer: Timer, batch: int, heads: int, lq: int, lk: int, dim: int, dtype, compile_: bool):
    import torch
    import torch.nn.functional as F

    from blip2_ds.kernels.cross_attention import triton_cross_attention

    device = timer.device
    generator = torch.Generator(device=device).manual_seed(0)
    inputs = [torch.randn(batch, heads, n, dim, device=device, generator=generator, dtype=torch.float32)
              .to(dtype).requires_grad_() for n in (lq, lk, lk)]

    def eager(q, k, v):  # what the original does: matmul, softmax, matmul (dropout off for comparability)
        scores = torch.matmul(q, k.transpose(-1, -2)) / dim ** 0.5
        return torch.matmul(scores.softmax(dim=-1), v)

    paths: dict[str, Callable] = {"eager (matmul+softmax)": eager}
    if compile_:
        paths["torch.compile(eager)"] = torch.compile(eager)
    paths["SDPA (default choice)"] = F.scaled_dot_product_attention
    sdpa_backends = []
    if device == "cuda":
        from torch.nn.attention import SDPBackend, sdpa_kernel

        for backend in (SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION):
            def forced(q, k, v, backend=backend):
                with sdpa_kernel([backend]):
                    return F.scaled_dot_product_attention(q, k, v)
            paths[f"SDPA {backend.name.lower()}"] = forced
            sdpa_backends.append(f"SDPA {backend.name.lower()}")
    paths["triton kernel"] = triton_cross_attention
    results = {}
    for path, fn in paths.items():
        try:
            results[path] = timer.measure(fwd_bwd(fn, inputs))
        except Exception as err:
            print(f"  {path}: failed ({type(err).__name__}: {str(err)[:200]})")
    sdpa = [p for p in ["SDPA (default choice)", *sdpa_backends] if p in results]
    best_sdpa = min(sdpa, key=lambda p: results[p][0])
    title = f"cross-attention, B={batch} H={heads} Lq={lq} Lk={lk} d={dim}"
    rows = report(title, results, "eager (matmul+softmax)", also=best_sdpa)
    if "triton kernel" in results:
        faster = results["triton kernel"][0] < results[best_sdpa][0]
        print(f"  best SDPA: {best_sdpa}; triton / best SDPA time {results['triton kernel'][0] / results[best_sdpa][0]:.2f}"
              f" -> kernels: auto should pick {'triton' if faster else 'SDPA'} for cross-attention "
              f"(blip2_ds/kernels/__init__.py AUTO_PICKS_TRITON)")
    return rows


if __name__ == "__main__":
    sys.exit(main())
