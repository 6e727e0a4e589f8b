"""The embedded demo's assets: created locally, idempotent, deterministic, loadable by the user code path."""
import json
import tarfile
from pathlib import Path

import pytest
import torch

from blip2_ds.config import DataConfig, LanguageConfig, VisionConfig, load_config
from blip2_ds.demo_assets import MARKER, DemoAssets, ensure_demo_assets, read_captions
from blip2_ds.models.language import build_language_model
from blip2_ds.models.pretrained import load_tokenizer
from blip2_ds.models.vision import build_vision_tower, check_matches_qformer

ROOT = Path(__file__).resolve().parents[1]
SMALL = dict(num_train=64, num_val=16, samples_per_shard=8, llm_steps=3, llm_batch=8)


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> DemoAssets:
    return ensure_demo_assets(tmp_path_factory.mktemp("demo") / "assets", seed=0, **SMALL)


def _files(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in sorted(root.rglob("*")) if p.is_file()}


def test_layout_and_marker(assets):
    root = assets.root
    assert (root / MARKER).is_file()
    assert len(sorted((root / "data" / "train").glob("demo-*.tar"))) == 8
    assert len(sorted((root / "data" / "val").glob("demo-*.tar"))) == 2
    assert assets.train_pattern.endswith("demo-{00000..00007}.tar")
    info = json.loads((root / MARKER).read_text())
    assert info["params"]["num_train"] == 64 and info["qformer_vocab_size"] == assets.vocab_size
    assert info["vision_tokens"] == 65


def test_second_call_rewrites_nothing(assets):
    before = _files(assets.root)
    again = ensure_demo_assets(assets.root, seed=0, **SMALL)
    assert again == assets
    assert _files(assets.root) == before


def test_a_copied_asset_folder_reads_its_own_shards(assets, tmp_path):
    """Another checkout, or the GPU machine the folder is carried to: nothing points back at the original."""
    import shutil

    copy = shutil.copytree(assets.root, tmp_path / "elsewhere")
    before = _files(copy)
    moved = ensure_demo_assets(copy, seed=0, **SMALL)
    assert _files(copy) == before  # found complete, not rebuilt
    assert moved.train_pattern == str(copy / "data" / "train" / "demo-{00000..00007}.tar")
    assert moved.val_pattern == str(copy / "data" / "val" / "demo-{00000..00001}.tar")


def test_interrupted_creation_is_redone(tmp_path):
    root = tmp_path / "assets"
    first = ensure_demo_assets(root, seed=0, **dict(SMALL, llm_steps=0))
    (root / MARKER).unlink()  # as if killed before the marker was written
    (root / "llm" / "config.json").unlink()
    second = ensure_demo_assets(root, seed=0, **dict(SMALL, llm_steps=0))
    assert (root / MARKER).is_file() and (root / "llm" / "config.json").is_file()
    assert second.train_pattern == first.train_pattern


def test_deterministic_given_the_seed(assets, tmp_path):
    other = ensure_demo_assets(tmp_path / "again", seed=0, **SMALL)
    for rel in ("data/train/demo-00000.tar", "data/val/demo-00001.tar", "tokenizer/vocab.txt",
                "vision/tiny_vit.json", "vision/tiny_vit.safetensors", "llm/tokenizer.json"):
        assert (assets.root / rel).read_bytes() == (other.root / rel).read_bytes(), rel
    from safetensors.torch import load_file

    a, b = load_file(assets.llm / "model.safetensors"), load_file(other.llm / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    changed = ensure_demo_assets(tmp_path / "seed1", seed=1, **dict(SMALL, llm_steps=0))
    assert (changed.root / "data/train/demo-00000.tar").read_bytes() != (
        assets.root / "data/train/demo-00000.tar").read_bytes()


def test_tokenizer_loads_with_dec(assets):
    tokenizer = load_tokenizer(assets.tokenizer, max_length=16)
    assert len(tokenizer) == assets.vocab_size
    assert tokenizer.pad_token_id == 0 and tokenizer.bos_token == "[DEC]"
    assert tokenizer.bos_token_id == len(tokenizer) - 1
    ids = tokenizer("A small RED circle above a large blue square").input_ids
    tokens = tokenizer.convert_ids_to_tokens(ids)
    assert tokens[0] == "[CLS]" and tokens[-1] == "[SEP]" and "[UNK]" not in tokens
    assert "red" in tokens and "circle" in tokens


def test_vision_tower_loads(assets):
    tower = build_vision_tower(VisionConfig(model_name="tiny_vit", model_config=str(assets.vision_config),
                                            checkpoint=str(assets.vision_checkpoint), image_size=64, dtype="fp32"))
    assert tower.load_report is not None and not tower.load_report.ignored
    out = tower(torch.randn(2, 3, 64, 64))
    assert out.shape == (2, 65, 128) and torch.isfinite(out).all()
    check_matches_qformer(tower, 128)


def test_language_model_loads(assets):
    llm = build_language_model(LanguageConfig(kind="opt", path=str(assets.llm), dtype="fp32", max_text_len=24))
    tokenizer = llm.tokenizer
    assert (tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id) == (1, 2, 2)
    assert llm.end_token_ids[0] == tokenizer("\n", add_special_tokens=False).input_ids[0]
    ids = tokenizer("a small red circle\n", add_special_tokens=False).input_ids
    assert tokenizer.unk_token_id not in ids
    assert llm.hidden_size == 128 and not any(p.requires_grad for p in llm.model.parameters())


def test_shards_read_by_the_stream(assets):
    from blip2_ds.data.stream import ShardStream

    captions = read_captions(sorted((assets.root / "data" / "train").glob("demo-*.tar")))
    assert len(captions) == 64 and all(c.startswith("a ") for c in captions)
    with tarfile.open(assets.root / "data" / "val" / "demo-00000.tar") as tar:
        assert any(m.name.endswith(".jpg") for m in tar)
    tokenizer = load_tokenizer(assets.tokenizer, max_length=16)
    cfg = DataConfig(train=assets.train_pattern, batch_size=4, num_workers=0, image_size=64)
    stream = ShardStream(cfg, tokenizer, 16, seed=0, rank=0, world=1)
    batch = next(iter(stream))
    assert batch["text_ids"].shape == (4, 16)
    assert int(batch["image_shapes"].shape[0]) == 4


def test_demo_config_matches_the_assets(assets):
    cfg = load_config(ROOT / "configs" / "demo.yaml")
    assert cfg.pretrained.bert_path is None
    assert cfg.pretrained.tokenizer_path == "demo_assets/tokenizer"
    assert cfg.model.vocab_size == assets.vocab_size  # WordPiece vocabulary + [DEC]
    assert cfg.model.vision_width == 128 and cfg.vision.image_size == cfg.data.image_size == 64
    assert cfg.vision.model_config == "demo_assets/vision/tiny_vit.json"
    assert cfg.vision.checkpoint == "demo_assets/vision/tiny_vit.safetensors"
    assert cfg.language.path == "demo_assets/llm" and cfg.language.kind == "opt"
    expected_train = ensure_demo_assets.__kwdefaults__
    shards = expected_train["num_train"] // expected_train["samples_per_shard"]
    assert cfg.data.train == f"demo_assets/data/train/demo-{{00000..{shards - 1:05d}}}.tar"
    assert shards >= 8
    assert cfg.pretrained.max_text_len <= cfg.model.max_position_embeddings
    stage2 = load_config(ROOT / "configs" / "demo.yaml", ["stage=2", "optim.lr=0.001"])
    assert stage2.stage == 2


def test_concurrent_callers_build_once(tmp_path):
    """Every rank of a launch may call it at once: the lock makes one build and the others reuse it."""
    from concurrent.futures import ThreadPoolExecutor

    root = tmp_path / "assets"
    logs: list[str] = []
    kwargs = dict(SMALL, llm_steps=0, log=logs.append)
    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(lambda _: ensure_demo_assets(root, seed=0, **kwargs), range(2)))
    assert results[0] == results[1]
    assert sum("demo assets ready" in line for line in logs) == 1
    assert (tmp_path / ".assets.lock").exists()
