"""The step benchmark behind ``python launch/bench.py``: this project's training step against a plain
eager step that does what the original BLIP-2 code does, measured in the same run.

- ``original_step.py``: the baseline, the original's stage-1 loss (and its precision and attention
  choices) written out over the same modules and weights;
- ``steps.py``: building the models at real (GPU) or tiny (CPU) shapes, timing a step phase by phase,
  FLOPs, MFU and memory, the table;
- ``plan.py``: ``--plan``, micro batch and accumulation for a GPU size and count.
"""
