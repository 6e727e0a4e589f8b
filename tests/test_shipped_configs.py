"""Every config file the project ships loads, validates, and means what its name says."""
import json

import pytest
from conftest import ROOT

from blip2_ds.config import load_config
from blip2_ds.train.build import vision_width_problems

CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))
DS_CONFIGS = sorted((ROOT / "ds_configs").glob("*.json"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_yaml_configs_load(path):
    cfg = load_config(path)
    expected_width = {"vitg": 1408, "vitl": 1024}
    for tag, width in expected_width.items():
        if tag in path.stem:
            assert cfg.model.vision_width == width
    assert vision_width_problems(cfg) == []  # the tower it names, built on the meta device, has that width


@pytest.mark.parametrize("path", DS_CONFIGS, ids=lambda p: p.name)
def test_deepspeed_configs_are_valid_zero_configs(path):
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

    ds = json.loads(path.read_text())
    DeepSpeedZeroConfig(**ds["zero_optimization"])  # rejects unknown or mistyped keys
    # Keys the YAML owns are filled in from it, never duplicated here.
    for key in ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
                "gradient_clipping"):
        assert ds.get(key, "auto") == "auto", key


def test_something_is_shipped():
    assert CONFIGS and DS_CONFIGS
