"""Profiler traces of chosen training steps, on demand (``profile_steps=100-102``).

Every rank records its steps with torch's profiler (CPU, and CUDA kernels on a GPU) and writes, under
``output_dir/profile/``:

- ``steps_A-B_rankR.json.gz``: a Chrome trace (open it in https://ui.perfetto.dev, chrome://tracing, or
  TensorBoard's profile plugin); each step is a ``blip2_ds.step.N`` range, the loss computations
  are ``blip2_ds.loss.*`` ranges, data wait is the time in the DataLoader's ``__next__``;
- ``steps_A-B_rankR.txt``: the operators sorted by their own time (device time on a GPU), to read
  without a viewer.

The profiler only observes: the profiled run computes the same losses (tested bitwise against an
unprofiled run).
"""
from __future__ import annotations

from pathlib import Path

import torch


class StepProfiler:
    """Starts torch's profiler before step ``first`` and writes its trace after step ``last`` (see the module doc).

    The loop calls :meth:`step_begins` / :meth:`step_ends` with the number of the step (1-based).
    ``steps``: :meth:`Config.profiled_steps` (None: does nothing). A run resumed past ``first`` records nothing.
    """

    def __init__(self, steps: tuple[int, int] | None, output_dir: Path, rank: int, device: torch.device):
        self.steps, self.rank, self.device = steps, rank, device
        self.folder = Path(output_dir) / "profile"
        self._profiler = None
        self._step_range = None
        self._last_done: int | None = None

    def step_begins(self, step: int) -> None:
        if self.steps is None or not self.steps[0] <= step <= self.steps[1]:
            return
        if step == self.steps[0]:
            from torch.profiler import ProfilerActivity, profile

            activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.device.type == "cuda" else [])
            self._profiler = profile(activities=activities)
            self._profiler.start()
        if self._profiler is not None:
            self._step_range = torch.profiler.record_function(f"blip2_ds.step.{step}")
            self._step_range.__enter__()

    def step_ends(self, step: int) -> None:
        if self._profiler is None or self._step_range is None:
            return
        self._step_range.__exit__(None, None, None)
        self._step_range = None
        self._last_done = step
        if step == self.steps[1]:
            self._write()

    def __enter__(self) -> "StepProfiler":
        return self

    def __exit__(self, exc_type, exc, traceback) -> None:
        """The loop ended inside the range (a stop signal, an error): write the steps recorded so far.
        Under an exception, a failure to write (e.g. the CUDA error that ended the loop) is printed and
        the loop's own exception goes on."""
        if self._profiler is None:
            return
        try:
            if self._step_range is not None:
                self._step_range.__exit__(None, None, None)
                self._step_range = None
            if self._last_done is not None:
                self._write()
            else:
                self._profiler.stop()
        except Exception as err:
            if exc_type is None:
                raise
            print(f"[rank {self.rank}] profiler trace not written ({type(err).__name__}: {err})", flush=True)
        finally:
            self._profiler = None

    def _write(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self._profiler.stop()
        self.folder.mkdir(parents=True, exist_ok=True)
        name = f"steps_{self.steps[0]}-{self._last_done}_rank{self.rank}"
        self._profiler.export_chrome_trace(str(self.folder / f"{name}.json.gz"))
        sort_by = "self_device_time_total" if self.device.type == "cuda" else "self_cpu_time_total"
        table = self._profiler.key_averages().table(sort_by=sort_by, row_limit=40)
        (self.folder / f"{name}.txt").write_text(table + "\n")
        self._profiler = None
        print(f"[rank {self.rank}] profiler trace of steps {self.steps[0]}-{self._last_done}: "
              f"{self.folder / name}.json.gz", flush=True)
