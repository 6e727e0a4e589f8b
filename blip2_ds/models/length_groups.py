"""Length groups: a padded stage-2 batch cut into groups of similar caption length for the frozen LLM.

A batch of captions is padded to its longest, and the frozen LLM computes every pad position in
forward and backward (the original pads to the longest too). Stage 2's loss has no interaction
between samples, so the LLM can run on each group of rows padded only to that group's own
longest row: the same per-position results, fewer positions. With captions of 5 to 30 tokens
(uniformly) behind 32 soft-prompt tokens, a batch of 120 padded to its longest row spends ~20% of
the LLM's positions on padding; in two groups ~10%, in three ~7%, in four ~5%.

The grouping is planned in the data workers (:class:`~blip2_ds.models.stage2.LLMTextTokenizer`), off the
training step's critical path: rows sorted by length, cut into at most ``max_groups`` contiguous
runs at the points that minimise the padded positions (dynamic programming, exact). The model then
gathers its soft prompts and text rows in group order and slices each group
(:meth:`~blip2_ds.models.stage2.TextBatch.grouped`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch


@dataclass
class LengthGroups:
    """How one batch's rows are grouped: the row order and each group's size and widths (host-side ints)."""

    order: torch.Tensor
    """(B,) int64: the batch's rows, group after group (each group's rows shortest first)."""
    sizes: tuple[int, ...]
    """Rows per group, in ``order``."""
    input_widths: tuple[int, ...]
    """Per group, its longest row's input length (OPT: the whole text; T5: the encoder text)."""
    label_widths: tuple[int, ...]
    """Per group, its longest row's label length (OPT: the same as the input; T5: the decoder target)."""

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "LengthGroups":
        return LengthGroups(self.order.to(device, non_blocking=non_blocking), self.sizes, self.input_widths,
                            self.label_widths)

    def pin_memory(self) -> "LengthGroups":
        return LengthGroups(self.order.pin_memory(), self.sizes, self.input_widths, self.label_widths)

    def spans(self) -> list[tuple[int, int, int, int]]:
        """``(start, stop, input_width, label_width)`` of each group in the reordered batch."""
        stops = np.cumsum(self.sizes).tolist()
        starts = [0] + stops[:-1]
        return list(zip(starts, stops, self.input_widths, self.label_widths))


def padded_positions(input_lengths: Sequence[int], label_lengths: Sequence[int]) -> int:
    """What one padded group costs: rows x (longest input + longest label)."""
    return len(input_lengths) * (max(input_lengths) + max(label_lengths))


def plan_length_groups(input_lengths: Sequence[int], label_lengths: Sequence[int],
                       max_groups: int) -> LengthGroups | None:
    """At most ``max_groups`` groups that minimise the padded positions; None when one group is best.

    ``input_lengths`` / ``label_lengths``: each row's real tokens (the attention mask's sum; the labelled
    extent). Rows are sorted by their total length (ties by index), and the cut points are exact for
    that order: ``best[g][j]``, the fewest padded positions of the first ``j`` rows in ``g`` groups, is
    the minimum over ``i`` of ``best[g-1][i] + cost(i, j)``. The fewest groups that reach the minimum are
    kept (an extra group that saves nothing only costs launches).
    """
    if max_groups < 1:
        raise ValueError(f"max_groups must be at least 1, got {max_groups}.")
    inputs, labels = np.asarray(input_lengths, dtype=np.int64), np.asarray(label_lengths, dtype=np.int64)
    if inputs.shape != labels.shape or inputs.ndim != 1:
        raise ValueError(f"one input and one label length per row, got shapes {inputs.shape} and {labels.shape}.")
    rows = len(inputs)
    if rows < 2 or max_groups == 1:
        return None
    order = np.lexsort((np.arange(rows), inputs + labels))
    inputs, labels = inputs[order], labels[order]
    # cost[i, j - 1] = padded positions of the group of sorted rows i..j-1 (inf where j <= i)
    cost = np.full((rows, rows), np.inf)
    for i in range(rows):
        widths = np.maximum.accumulate(inputs[i:]) + np.maximum.accumulate(labels[i:])
        cost[i, i:] = widths * np.arange(1, rows - i + 1)
    best = [cost[0]]  # best[g - 1][j - 1]: the first j rows in g groups
    cuts = [np.zeros(rows, dtype=np.int64)]
    for _ in range(1, min(max_groups, rows)):
        # the last group starts at row i >= 1 and follows the best split of rows 0..i-1
        candidates = best[-1][:-1, None] + cost[1:]
        cuts.append(np.argmin(candidates, axis=0) + 1)
        best.append(candidates[cuts[-1] - 1, np.arange(rows)])
    totals = [b[-1] for b in best]
    groups = int(np.argmin(totals)) + 1  # argmin: the first (fewest groups) of equal minima
    if groups == 1:
        return None
    stops, stop = [], rows
    for g in range(groups - 1, -1, -1):
        stops.append(stop)
        stop = int(cuts[g][stop - 1]) if g else 0
    stops.reverse()
    starts = [0] + stops[:-1]
    return LengthGroups(torch.from_numpy(order), tuple(b - a for a, b in zip(starts, stops)),
                        tuple(int(inputs[a:b].max()) for a, b in zip(starts, stops)),
                        tuple(int(labels[a:b].max()) for a, b in zip(starts, stops)))
