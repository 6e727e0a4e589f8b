"""train/profiling.py: the profiler around chosen steps, a stop inside the range, failures to write."""
import gzip
import json

import pytest
import torch

from blip2_ds.config import Config, ConfigError
from blip2_ds.train.profiling import StepProfiler


def _steps(profiler: StepProfiler, steps) -> None:
    for step in steps:
        profiler.step_begins(step)
        torch.randn(64, 64) @ torch.randn(64, 64)
        profiler.step_ends(step)


def _step_ranges(trace) -> set[str]:
    events = json.loads(gzip.decompress(trace.read_bytes()))["traceEvents"]
    return {e["name"] for e in events if str(e.get("name", "")).startswith("blip2_ds.step.")}


def test_only_the_chosen_steps_are_recorded(tmp_path, capsys):
    with StepProfiler((2, 3), tmp_path, 1, torch.device("cpu")) as profiler:
        _steps(profiler, range(1, 6))
    assert sorted(p.name for p in (tmp_path / "profile").iterdir()) == ["steps_2-3_rank1.json.gz", "steps_2-3_rank1.txt"]
    assert _step_ranges(tmp_path / "profile" / "steps_2-3_rank1.json.gz") == {"blip2_ds.step.2", "blip2_ds.step.3"}
    assert "aten::mm" in (tmp_path / "profile" / "steps_2-3_rank1.txt").read_text()
    assert "profiler trace of steps 2-3" in capsys.readouterr().out


def test_a_stop_inside_the_range_writes_the_steps_recorded(tmp_path):
    with StepProfiler((2, 10), tmp_path, 0, torch.device("cpu")) as profiler:
        _steps(profiler, range(1, 4))  # a stop signal after step 3
    assert _step_ranges(tmp_path / "profile" / "steps_2-3_rank0.json.gz") == {"blip2_ds.step.2", "blip2_ds.step.3"}


def test_off_or_resumed_past_the_range_records_nothing(tmp_path):
    for steps, run in ((None, range(1, 4)), ((2, 3), range(5, 8))):
        with StepProfiler(steps, tmp_path, 0, torch.device("cpu")) as profiler:
            _steps(profiler, run)
    assert not (tmp_path / "profile").exists()


def test_a_failed_write_does_not_hide_the_loops_own_error(tmp_path, capsys):
    (tmp_path / "profile").write_text("a file where the folder goes")
    with pytest.raises(RuntimeError, match="the loop's error"):
        with StepProfiler((1, 5), tmp_path, 0, torch.device("cpu")) as profiler:
            _steps(profiler, [1])
            raise RuntimeError("the loop's error")
    assert "profiler trace not written (FileExistsError" in capsys.readouterr().out
    with pytest.raises(FileExistsError):  # without an error of its own the loop gets the failure
        with StepProfiler((1, 1), tmp_path, 0, torch.device("cpu")) as profiler:
            _steps(profiler, [1])


@pytest.mark.parametrize("spec, expected", [("", None), (0, None), (7, (7, 7)), ("3-5", (3, 5)), (" 3-5 ", (3, 5))])
def test_profile_steps_parse(spec, expected):
    assert Config(profile_steps=spec, max_steps=10).profiled_steps() == expected


@pytest.mark.parametrize("spec", ["5-3", "0-2", "11", "2-11", "a", "1-2-3", "-1"])
def test_profile_steps_errors_name_the_field(spec):
    with pytest.raises(ConfigError, match="profile_steps"):
        Config(profile_steps=spec, max_steps=10).profiled_steps()
