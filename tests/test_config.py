import ast
import dataclasses
import inspect

import pytest

from blip2_ds import config as config_module
from blip2_ds.config import Config, ConfigError, load_config


def test_defaults_are_blip2_sizes():
    cfg = load_config()
    assert cfg.model.hidden_size == 768 and cfg.model.vocab_size == 30523
    assert cfg.model.cross_attention_freq == 2 and cfg.model.num_query_tokens == 32
    assert cfg.objectives.label_smoothing == 0.1 and cfg.objectives.temperature_init == 0.07


def test_yaml_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  num_layers: 6\n  hidden_dropout: 0\nseed: 7\n")
    cfg = load_config(path, ["model.num_heads=6", "objectives.itg_weight=0.5", "output_dir=/tmp/x"])
    assert (cfg.model.num_layers, cfg.model.num_heads, cfg.seed) == (6, 6, 7)
    assert cfg.model.hidden_dropout == 0.0 and isinstance(cfg.model.hidden_dropout, float)
    assert cfg.objectives.itg_weight == 0.5 and cfg.output_dir == "/tmp/x"


@pytest.mark.parametrize("text, expected", [
    ("model:\n  num_layer: 6\n", ["model.num_layer", "did you mean model.num_layers"]),
    ("modle:\n  num_layers: 6\n", ["modle", "did you mean model"]),
    ("model:\n  num_layers: six\n", ["model.num_layers", "integer"]),
    ("model:\n  hidden_size: 30\n", ["hidden_size=30", "num_heads=12"]),
    ("- 1\n", ["top level must be a mapping"]),
])
def test_bad_files_name_the_field(tmp_path, text, expected):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    for fragment in expected:
        assert fragment in str(err.value)


def test_bad_overrides_name_the_key():
    with pytest.raises(ConfigError, match="objectives.itc_wieght"):
        load_config(None, ["objectives.itc_wieght=1"])
    with pytest.raises(ConfigError, match="key=value"):
        load_config(None, ["seed"])
    with pytest.raises(ConfigError, match="temperature_min"):
        load_config(None, ["objectives.temperature_init=0.9"])


def test_string_fields_take_the_text_as_written(tmp_path):
    """YAML 1.1 would read off/yes as booleans and 2024-01-05 as a date; a string field keeps the text."""
    cfg = load_config(None, ["vision.compile=off", "language.prompt=Question: {} Answer:", "output_dir=2024-01-05",
                             "pretrained.bert_path=null", "data.prompt=yes"])
    assert (cfg.vision.compile, cfg.language.prompt, cfg.output_dir) == ("off", "Question: {} Answer:", "2024-01-05")
    assert cfg.pretrained.bert_path is None and cfg.data.prompt == "yes"
    path = tmp_path / "c.yaml"
    path.write_text("vision:\n  compile: off\nlanguage:\n  prompt: yes\ndata:\n  # batch_size: 4\n")
    cfg = load_config(path, ["data.num_workers=3"])  # into a section whose keys are all commented out
    assert (cfg.vision.compile, cfg.language.prompt, cfg.data.num_workers) == ("off", "yes", 3)
    with pytest.raises(ConfigError, match="must be true or false"):
        load_config(None, ["apex=yes"])  # a boolean field takes true / false only
    path.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match=r"c\.yaml: not valid YAML"):
        load_config(path)


@pytest.mark.parametrize("override, expected", [
    ("optim.betas=[0.9]", "must have 2 values"),
    ("data.crop_scale=[0.5, 0.9, 1.0]", "must have 2 values"),
    ("optim.lr=nan", "must be finite"),
    ("optim.grad_clip=inf", "must be finite"),
    ("optim.eps=-1", "eps > 0"),
    ("optim.warmup_start_lr=0.01", "warmup_start_lr <= lr"),
    ("model.num_heads=0", "num_heads=0"),
    ("generation.num_captions=3", "exceeds num_beams=1"),
    ("generation.top_p=2", "0 < top_p <= 1"),
    ("data.prefetch_batches=0", "prefetch_batches must be positive"),
    ("vision.image_size=364", "vision.image_size=364 and data.image_size=224 differ"),
])
def test_values_that_would_fail_later_are_errors_now(override, expected):
    extra = ["generation.num_beams=1"] if override.startswith("generation.num_captions") else []
    with pytest.raises(ConfigError, match=expected.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        load_config(None, [override, *extra])


def test_a_stage_2_prompt_in_the_data_section_is_refused():
    """It would be trained on as part of every caption; BLIP-2's stage-2 prompt gets no loss."""
    with pytest.raises(ConfigError, match="data.prompt='a photo of' in stage 2 .* language.prompt"):
        load_config(None, ["stage=2", "data.prompt=a photo of"])
    assert load_config(None, ["stage=2", "language.prompt=a photo of"]).language.prompt == "a photo of"
    assert load_config(None, ["data.prompt=a photo of"]).data.prompt == "a photo of"  # stage 1: the Q-Former's text


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")


def _documented_fields(cls) -> set[str]:
    """Fields followed by a string literal in the class body (attribute docstrings)."""
    tree = ast.parse(inspect.getsource(cls))
    body = tree.body[0].body
    documented = set()
    for node, following in zip(body, body[1:]):
        if (isinstance(node, ast.AnnAssign) and isinstance(following, ast.Expr)
                and isinstance(following.value, ast.Constant) and isinstance(following.value.value, str)):
            documented.add(node.target.id)
    return documented


def test_every_config_field_is_documented():
    classes = [c for _, c in inspect.getmembers(config_module, inspect.isclass)
               if dataclasses.is_dataclass(c) and c.__module__ == config_module.__name__]
    assert Config in classes and len(classes) >= 4
    for cls in classes:
        missing = {f.name for f in dataclasses.fields(cls)} - _documented_fields(cls)
        assert not missing, f"{cls.__name__}: fields without a docstring: {sorted(missing)}"
