import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# The Triton kernels run in Triton's interpreter on CPU; the variable is read when a kernel module
# is first imported, so it must be set before anything imports one (../shared/notes/triton_on_cpu.md).
# On a GPU machine, `BLIP2_DS_TEST_GPU=1` leaves it unset so the same tests compile real kernels.
if os.environ.get("BLIP2_DS_TEST_GPU") != "1":
    os.environ.setdefault("TRITON_INTERPRET", "1")

from blip2_ds.config import QFormerConfig  # noqa: E402


def tiny_qformer_config(**overrides) -> QFormerConfig:
    """A Q-Former small enough for CPU tests but with every structural feature of the real one."""
    fields = dict(vocab_size=101, hidden_size=32, num_layers=4, num_heads=4, intermediate_size=48,
                  max_position_embeddings=40, num_query_tokens=4, vision_width=24, embed_dim=16,
                  hidden_dropout=0.0, attention_dropout=0.0)
    fields.update(overrides)
    return QFormerConfig(**fields)


@pytest.fixture
def tiny_cfg() -> QFormerConfig:
    return tiny_qformer_config()


def random_text(batch: int, length: int, vocab: int, generator: torch.Generator, min_len: int = 3):
    """Token ids with [CLS]-like first token, random lengths, padding (id 0) after the end."""
    ids = torch.randint(2, vocab - 1, (batch, length), generator=generator)
    lengths = torch.randint(min_len, length + 1, (batch,), generator=generator)
    mask = (torch.arange(length)[None] < lengths[:, None]).long()
    return ids * mask, mask


def subprocess_env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


# ---- training runs shared by test_train.py, test_slurm.py and test_multinode.py -----------------
@pytest.fixture(scope="session")
def assets(tmp_path_factory):
    from blip2_ds.demo_assets import ensure_demo_assets

    return ensure_demo_assets(tmp_path_factory.mktemp("assets"), num_train=320, num_val=32, samples_per_shard=40,
                              llm_steps=10)


@pytest.fixture(scope="session")
def reference_run(assets, tmp_path_factory):
    """30 uninterrupted steps on 2 ranks (ZeRO-2 through the deepspeed launcher)."""
    from train_runs import finish, launch, overrides

    output = tmp_path_factory.mktemp("reference")
    code, text = finish(launch(overrides(assets, output)))
    assert code == 0, text[-3000:]
    return output
