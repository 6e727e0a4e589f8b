"""Compile every Triton kernel for an NVIDIA GPU on a machine without one.

Triton's interpreter (the CPU tests) checks what the kernels compute, not that they compile: a
``tl.dot`` shape or type the backend rejects, a tile too big for shared memory, registers that
spill to local memory only show on a GPU, and GPU time is rare here. This runs the launch
wrappers of :mod:`.cross_attention_triton` and :mod:`.contrastive_triton` on meta tensors at the
model's real shapes, records each launch (arguments, constexprs, warps, stages) instead of running
it, compiles it ahead of time with ``triton.compile`` for ``sm_<arch>`` (the passes of a real
launch, ptxas included) and reads the cubin's registers, spills and shared memory with the
``cuobjdump`` that Triton ships.

    python -m blip2_ds.kernels.compile_check [--arch 90 80]

Exit status 1 if a kernel does not compile or needs more shared memory than the architecture
has (either would fail at launch); a spill to local memory (slow, not wrong) is listed as
``warn``. Not covered: a launch's integer specialisation (the JIT also compiles variants for
arguments equal to 1 or divisible by 16; the generic variant compiled here is what they refine).
Run it without ``TRITON_INTERPRET=1`` (the kernels must be real ``triton.jit`` functions).
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

SHARED_MEMORY_LIMIT = {80: 166912, 90: 232448}
"""Bytes of shared memory one block may use (A100 / H100-H200 with the opt-in Triton performs)."""

POINTER_TYPES = {torch.float32: "*fp32", torch.float16: "*fp16", torch.bfloat16: "*bf16", torch.int8: "*i8",
                 torch.int32: "*i32", torch.int64: "*i64", torch.bool: "*i1"}


@dataclass
class Launch:
    """One recorded kernel launch."""

    kernel: object  # the triton.jit function
    args: tuple
    kwargs: dict

    def constexprs(self) -> dict:
        return {p.name: self.kwargs[p.name] for p in self.kernel.params if p.is_constexpr}

    def signature(self) -> dict[str, str]:
        """Triton's type string per argument, from the values the wrapper passed."""
        values = dict(zip(self.kernel.arg_names, self.args))
        constexprs = self.constexprs()
        signature = {}
        for name in self.kernel.arg_names:
            value = values.get(name)
            if name in constexprs:
                signature[name] = "constexpr"
            elif isinstance(value, torch.Tensor):
                signature[name] = POINTER_TYPES[value.dtype]
            elif isinstance(value, bool):
                signature[name] = "i1"
            elif isinstance(value, int):
                signature[name] = "i32" if -2**31 <= value < 2**31 else "i64"
            else:
                signature[name] = "fp32"
        return signature


class _Recorder:
    """Stands in for a ``triton.jit`` function: ``kernel[grid](*args, **kwargs)`` is recorded, not run."""

    def __init__(self, kernel, launches: list[Launch]):
        self.kernel, self.launches = kernel, launches

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.launches.append(Launch(self.kernel, args, kwargs))


def record_launches(module, kernel_names: tuple[str, ...], run: Callable[[], object]) -> list[Launch]:
    """The launches ``run()`` makes of ``module``'s kernels (patched for the call, restored after)."""
    launches: list[Launch] = []
    originals = {name: getattr(module, name) for name in kernel_names}
    try:
        for name, kernel in originals.items():
            setattr(module, name, _Recorder(kernel, launches))
        run()
    finally:
        for name, kernel in originals.items():
            setattr(module, name, kernel)
    return launches


def model_launches() -> list[tuple[str, Launch]]:
    """Every launch the model makes at real shapes: cross-attention of 32 queries (12 heads of 64) into
    ViT-g's 257 and 677 image tokens with and without key mask and dropout, in bf16 (training) and fp32;
    the ITC maximum over 32 queries (256-wide features) for a 1680-sample gathered batch, both directions."""
    from blip2_ds.kernels import contrastive_triton, cross_attention_triton

    meta = torch.device("meta")
    described = []
    for dtype in (torch.bfloat16, torch.float32):
        for keys in (257, 677):
            for masked in (False, True):
                for dropout in (0.0, 0.1):
                    if dtype == torch.float32 and not (masked and dropout):
                        continue  # fp32: one variant (tests, fp32 runs); bf16 is the training path
                    q = torch.empty(8, 12, 32, 64, dtype=dtype, device=meta)
                    k = v = torch.empty(8, 12, keys, 64, dtype=dtype, device=meta)
                    mask = torch.empty(8, keys, dtype=torch.bool, device=meta) if masked else None

                    def both(q=q, k=k, v=v, mask=mask, dropout=dropout):
                        out, lse = cross_attention_triton.forward(q, k, v, mask, dropout, 1234)
                        cross_attention_triton.backward(torch.empty_like(out), q, k, v, mask, out, lse, dropout, 1234)

                    name = f"cross_attention {str(dtype)[6:]} keys={keys} mask={masked} dropout={dropout}"
                    described += [(name, launch) for launch in record_launches(
                        cross_attention_triton, ("_cross_attention_fwd", "_cross_attention_bwd"), both)]
        for images, texts in ((1680, 105), (105, 1680)):  # i2t and t2i of one rank's rows against the gathered batch
            feats = torch.empty(images, 32, 256, dtype=dtype, device=meta)
            text = torch.empty(texts, 256, dtype=dtype, device=meta)

            def both(feats=feats, text=text):
                sims, winners = contrastive_triton.forward(feats, text)
                contrastive_triton.backward(torch.empty_like(sims), winners, feats, text)

            name = f"max_over_queries {str(dtype)[6:]} {images}x{texts}"
            described += [(name, launch) for launch in record_launches(
                contrastive_triton, ("_max_sim_fwd", "_max_sim_bwd_queries", "_max_sim_bwd_texts"), both)]
    return described


@dataclass
class Compiled:
    registers: int
    spilled_bytes: int
    shared_bytes: int
    seconds: float


def compile_launch(launch: Launch, arch: int) -> Compiled:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    constexprs = launch.constexprs()
    source = ASTSource(launch.kernel, launch.signature(), constexprs)
    options = {key: launch.kwargs[key] for key in ("num_warps", "num_stages") if key in launch.kwargs}
    start = time.perf_counter()
    binary = triton.compile(source, target=GPUTarget("cuda", arch, 32), options=options)
    seconds = time.perf_counter() - start
    usage = _resource_usage(binary.asm["cubin"])
    return Compiled(usage["REG"], usage["LOCAL"] + usage["STACK"], binary.metadata.shared, seconds)


def _resource_usage(cubin: bytes) -> dict[str, int]:
    import triton

    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as file:
        file.write(cubin)
        file.flush()
        report = subprocess.run([str(tool), "--dump-resource-usage", file.name], capture_output=True, text=True,
                                check=True).stdout
    function = report[report.index("Function"):]
    return {key: int(value) for key, value in re.findall(r"(REG|STACK|LOCAL):(\d+)", function)}


def check(launches: list[tuple[str, Launch]], arch: int) -> list[str]:
    """One line per launch, starting with ``ok``, ``warn`` (spills) or ``FAIL`` (no cubin, or too much shared memory)."""
    lines = []
    for name, launch in launches:
        label = f"sm_{arch} {launch.kernel.__name__:<22} {name}"
        try:
            result = compile_launch(launch, arch)
        except Exception as err:  # a compile error of any kind is the finding
            lines.append(f"FAIL {label}: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}")
            continue
        too_much_shared = result.shared_bytes > SHARED_MEMORY_LIMIT[arch]
        status = "FAIL" if too_much_shared else "warn" if result.spilled_bytes else "ok"
        notes = ([f"shared memory over the {SHARED_MEMORY_LIMIT[arch]} B limit"] if too_much_shared else []) + \
            ([f"spills {result.spilled_bytes} B"] if result.spilled_bytes else [])
        lines.append(f"{status:<4} {label}: {result.registers} registers, {result.shared_bytes} B shared, "
                     f"{result.seconds:.1f} s" + (f" ({'; '.join(notes)})" if notes else ""))
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, nargs="+", default=[90], choices=sorted(SHARED_MEMORY_LIMIT),
                        help="compute capability x10: 90 = H100/H200, 80 = A100")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("error: unset TRITON_INTERPRET (the interpreter replaces the kernels this compiles)", file=sys.stderr)
        return 2
    launches = model_launches()
    lines = [line for arch in args.arch for line in check(launches, arch)]
    print("\n".join(lines))
    failed = sum(line.startswith("FAIL") for line in lines)
    spilling = sum(line.startswith("warn") for line in lines)
    print(f"{len(lines) - failed} of {len(lines)} kernel launches compile within the limits ({spilling} spill)")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
