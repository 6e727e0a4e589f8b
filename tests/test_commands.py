"""The documented commands, run as users run them."""
import re
import subprocess
import sys

import torch
from conftest import ROOT, subprocess_env

from blip2_ds.config import QFormerConfig
from blip2_ds.models.stage1 import Stage1Model


def test_stage1_trainable_parameter_count_is_blip2s():
    with torch.device("meta"):
        model = Stage1Model(QFormerConfig())
    assert sum(p.numel() for p in model.parameters()) == 186_705_470
    assert all(p.requires_grad for p in model.parameters())


def _run(*args, timeout=600):
    return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, env=subprocess_env(),
                          capture_output=True, text=True, timeout=timeout)


def test_info_command_prints_trainable_and_frozen_counts():
    run = _run("blip2_ds.info")
    assert run.returncode == 0, run.stderr
    assert re.search(r"total\s+186,705,470", run.stdout)
    assert re.search(r"vision tower EVA01-g-14 .*\s985,894,528", run.stdout)
    bad = _run("blip2_ds.info", "model.hiden_size=3")
    assert bad.returncode == 2 and "model.hiden_size" in bad.stderr and "did you mean model.hidden_size" in bad.stderr
