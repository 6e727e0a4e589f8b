"""Length groups (models/length_groups.py): the planner is exact, and stage 2 trained in groups is stage 2.

The planner against brute force over every way to cut the sorted rows (and, for OPT-style lengths,
over every partition of the rows); the stage-2 loss and every trainable gradient in length groups
against one padded batch, for OPT and T5 with the tiny LLMs of ``tiny_llms`` read back like real ones.
"""
import dataclasses
import itertools
import random

import pytest
import torch
from conftest import tiny_qformer_config
from tiny_llms import tiny_llm_dirs  # noqa: F401  (session fixture)

from blip2_ds.config import Config, ConfigError, LanguageConfig
from blip2_ds.models.language import build_language_model
from blip2_ds.models.length_groups import padded_positions, plan_length_groups
from blip2_ds.models.stage2 import IGNORE, LLMTextTokenizer, Stage2Model

CAPTIONS = ["a dog", "a dog running on the grass next to a small red house", "three birds on a wire",
            "a cat", "a man riding a bicycle down a long and empty road at night in the rain",
            "two plates of food", "a bus", "children playing football in a park on a sunny afternoon"]


def cost(plan, inputs, labels) -> int:
    if plan is None:
        return padded_positions(inputs, labels)
    return sum(n * (a + b) for n, a, b in zip(plan.sizes, plan.input_widths, plan.label_widths))


def best_contiguous(inputs, labels, max_groups) -> int:
    order = sorted(range(len(inputs)), key=lambda i: (inputs[i] + labels[i], i))
    a, b = [inputs[i] for i in order], [labels[i] for i in order]
    best = padded_positions(a, b)
    for groups in range(2, min(max_groups, len(a)) + 1):
        for cuts in itertools.combinations(range(1, len(a)), groups - 1):
            bounds = (0, *cuts, len(a))
            best = min(best, sum(padded_positions(a[s:e], b[s:e]) for s, e in zip(bounds, bounds[1:])))
    return best


def partitions(items):
    if not items:
        yield []
        return
    first, rest = items[0], items[1:]
    for part in partitions(rest):
        yield [[first]] + part
        for i in range(len(part)):
            yield part[:i] + [[first] + part[i]] + part[i + 1:]


def test_plan_is_the_best_cut_of_the_sorted_rows():
    rng = random.Random(0)
    for _ in range(300):
        rows, max_groups = rng.randint(1, 9), rng.randint(1, 4)
        inputs = [rng.randint(1, 12) for _ in range(rows)]
        labels = [rng.randint(1, 12) for _ in range(rows)]
        plan = plan_length_groups(inputs, labels, max_groups)
        assert cost(plan, inputs, labels) == best_contiguous(inputs, labels, max_groups), (inputs, labels, max_groups)
        if plan is not None:
            order = plan.order.tolist()
            assert sorted(order) == list(range(rows)) and 1 < len(plan.sizes) <= max_groups
            for start, stop, width, label_width in plan.spans():  # each group's widths: its longest row's
                assert width == max(inputs[i] for i in order[start:stop])
                assert label_width == max(labels[i] for i in order[start:stop])


def test_plan_for_opt_lengths_is_the_best_of_all_partitions():
    """One length per row (OPT: labels span the text): no grouping of the rows, contiguous or not, pads less."""
    rng = random.Random(1)
    for _ in range(60):
        lengths = [rng.randint(1, 20) for _ in range(rng.randint(2, 7))]
        max_groups = rng.randint(2, 4)
        best = min(sum(padded_positions([lengths[i] for i in g], [lengths[i] for i in g]) for g in p)
                   for p in partitions(list(range(len(lengths)))) if len(p) <= max_groups)
        assert cost(plan_length_groups(lengths, lengths, max_groups), lengths, lengths) == best


def test_plan_keeps_the_fewest_groups_and_rejects_bad_input():
    assert plan_length_groups([7] * 10, [7] * 10, 4) is None  # nothing to save: one group
    assert plan_length_groups([3, 9], [3, 9], 1) is None and plan_length_groups([5], [5], 4) is None
    plan = plan_length_groups([5, 5, 5, 9, 9, 9], [5, 5, 5, 9, 9, 9], 4)  # two lengths: two groups are enough
    assert plan.sizes == (3, 3) and plan.input_widths == (5, 9)
    with pytest.raises(ValueError, match="max_groups must be at least 1"):
        plan_length_groups([1, 2], [1, 2], 0)
    with pytest.raises(ValueError, match="one input and one label length per row"):
        plan_length_groups([1, 2], [1], 2)


def test_length_groups_config_is_validated():
    cfg = Config(stage=2)
    cfg.language.length_groups = 0
    with pytest.raises(ConfigError, match="language.length_groups must be a whole number >= 1"):
        cfg.language.validate()


def model_and_tokenizers(dirs, kind):
    llm = build_language_model(LanguageConfig(kind=kind, path=str(dirs[kind]), dtype="fp32", prompt="a photo of"))
    llm.model.double()  # float64: the two runs differ only in summation order, so compare tightly
    torch.manual_seed(0)
    model = Stage2Model(tiny_qformer_config(), llm).double().eval()  # no dropout: the same soft prompt twice
    make = {groups: LLMTextTokenizer(llm.tokenizer, dataclasses.replace(llm.cfg, length_groups=groups))
            for groups in (1, 3)}
    return model, make


@pytest.mark.parametrize("kind", ["opt", "t5"])
def test_grouped_text_is_the_padded_batch_reordered_and_cut_to_its_rows(tiny_llm_dirs, kind):
    model, make = model_and_tokenizers(tiny_llm_dirs, kind)
    padded, grouped = make[1](CAPTIONS, random.Random(5)), make[3](CAPTIONS, random.Random(5))
    assert padded.groups is None and len(grouped.groups.sizes) == 3
    for name in ("input_ids", "attention_mask", "labels"):  # the rows stay in the captions' order
        assert torch.equal(getattr(padded, name), getattr(grouped, name)), name
    order = grouped.groups.order
    positions = 0
    for rows, part in grouped.grouped():
        for name in ("input_ids", "attention_mask", "labels"):
            full = getattr(padded, name).index_select(0, order)[rows]
            width = getattr(part, name).shape[1]
            assert torch.equal(getattr(part, name), full[:, :width])  # the same rows and tokens
        assert (part.attention_mask[:, -1] == 1).any() and (part.labels[:, -1] != IGNORE).any()  # no all-pad column
        assert (padded.attention_mask.index_select(0, order)[rows][:, part.attention_mask.shape[1]:] == 0).all()
        assert (padded.labels.index_select(0, order)[rows][:, part.labels.shape[1]:] == IGNORE).all()
        positions += part.input_ids.numel() + part.labels.numel()
    assert positions < padded.input_ids.numel() + padded.labels.numel()
    # the pad share the trainer logs (perf/llm_pad_share), counted here position by position
    soft, decoder = model.cfg.num_query_tokens, kind == "t5"
    for text in (padded, grouped):
        computed = real = 0
        for _, part in text.grouped():
            rows = part.input_ids.shape[0]
            computed += rows * soft + part.attention_mask.numel() + (part.labels.numel() if decoder else 0)
            real += rows * soft + int(part.attention_mask.sum()) + (int((part.labels != IGNORE).sum()) if decoder else 0)
        assert model.llm_pad_share(text) == pytest.approx(1 - real / computed, rel=1e-12)
    assert 0 <= model.llm_pad_share(grouped) < model.llm_pad_share(padded)


@pytest.mark.parametrize("kind", ["opt", "t5"])
def test_stage2_in_length_groups_gives_the_padded_batchs_loss_and_gradients(tiny_llm_dirs, kind):
    model, make = model_and_tokenizers(tiny_llm_dirs, kind)
    images = torch.randn(len(CAPTIONS), 5, tiny_qformer_config().vision_width,
                         generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    results = {}
    for groups, tokenizer in make.items():
        model.zero_grad(set_to_none=True)
        loss = model(images, tokenizer(CAPTIONS, random.Random(5)))
        loss.backward()
        results[groups] = loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}
    (loss_padded, grads_padded), (loss_grouped, grads_grouped) = results[1], results[3]
    assert torch.isfinite(loss_padded)
    # HF's T5LayerNorm takes its variance in float32, also in a float64 model: hidden states that the two
    # batch shapes leave 1e-16 apart can round to neighbouring float32 values there (seen with torch 2.11:
    # 8e-8 relative), so T5's loss is held to float32's precision. Rows paired with another row's soft
    # prompts would be off by far more.
    torch.testing.assert_close(loss_grouped, loss_padded, rtol=1e-10 if kind == "opt" else 1e-6, atol=0)
    assert grads_grouped.keys() == grads_padded.keys()
    for name, grad in grads_padded.items():
        torch.testing.assert_close(grads_grouped[name], grad, rtol=1e-9, atol=1e-12, msg=name)
