"""The Triton kernels compile for the GPUs users train on, here without a GPU (``kernels.compile_check``).

The interpreter tests (test_kernels.py) check what the kernels compute; this checks that every
launch the wrappers make at the model's real shapes becomes a cubin for sm_90 (H100/H200) and sm_80
(A100) within the shared memory, and that the bf16 training path does not spill on sm_90 (the
first version of the contrastive kernel did: 255 registers and up to 1 KB of spills, found here).
Also: the GPU tile sizes give the reference results (run in the interpreter).
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
pytest.importorskip("triton")


def compiled_env() -> dict:
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(ROOT)
    return env


@pytest.mark.slow
def test_every_kernel_launch_compiles_for_sm90_and_sm80_and_bf16_does_not_spill_on_sm90():
    run = subprocess.run([sys.executable, "-m", "blip2_ds.kernels.compile_check", "--arch", "90", "80"],
                         cwd=ROOT, env=compiled_env(), capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    lines = run.stdout.splitlines()
    launches = [line for line in lines if line[:4] in ("ok  ", "warn", "FAIL")]
    assert len(launches) == 84, run.stdout[-2000:]  # 2 archs x (10 cross-attention variants x 3 + 4 ITC x 3)
    spilling = [line for line in launches if line.startswith("warn") and "sm_90" in line and "bfloat16" in line]
    assert not spilling, spilling


@pytest.mark.slow
def test_a_tile_too_big_for_shared_memory_is_a_failure():
    script = """
from blip2_ds.kernels.compile_check import Launch, check, model_launches
name, launch = next(item for item in model_launches() if item[1].kernel.__name__ == "_cross_attention_bwd")
huge = Launch(launch.kernel, launch.args, dict(launch.kwargs, BLOCK_M=256, BLOCK_N=512))
print(check([(name, huge)], 90)[0])
"""
    run = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=compiled_env(), capture_output=True, text=True,
                         timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.startswith("FAIL sm_90 _cross_attention_bwd"), run.stdout


@pytest.mark.slow
def test_gpu_tiles_give_the_reference_results(monkeypatch):
    """The GPU tile sizes (smaller than the interpreter's) over several tiles of keys, texts and features."""
    from test_kernels import attention_case, check_attention, check_max_sim, feature_case

    from blip2_ds.kernels import contrastive_triton, cross_attention_triton

    for module in (cross_attention_triton, contrastive_triton):
        gpu = module.gpu_tiles
        monkeypatch.setattr(module, "interpreter_tiles", lambda *args, gpu=gpu: {
            key: value for key, value in gpu(*args).items() if key.startswith("BLOCK_")})
    for dtype in (torch.float32, torch.bfloat16):
        q, k, v = attention_case(2, 2, 32, 150, 64, dtype)  # 3 key blocks of 64
        mask = torch.rand(2, 150, generator=torch.Generator().manual_seed(3)) > 0.3
        check_attention(q, k, v, mask, dropout_p=0.1, seed=7)
        check_max_sim(*feature_case(70, 5, 40, 72, dtype))  # 3 row blocks of 32, 2 text blocks, 3 feature blocks
