"""Each objective against a plain formula, and the hard-negative draw's defined behaviour."""
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import random_text

from blip2_ds.models.stage1 import Stage1Model
from blip2_ds.objectives import itc, itg, itm


def test_itc_loss_matches_the_written_out_formula():
    generator = torch.Generator().manual_seed(0)
    image = F.normalize(torch.randn(5, 4, 8, generator=generator, dtype=torch.float64), dim=-1)
    text = F.normalize(torch.randn(5, 8, generator=generator, dtype=torch.float64), dim=-1)
    temp, eps = torch.tensor(0.07, dtype=torch.float64), 0.1
    result = itc.itc_loss(image, text, temp, label_smoothing=eps)
    sim = torch.tensor([[max(float(image[i, q] @ text[j]) for q in range(4)) for j in range(5)] for i in range(5)],
                       dtype=torch.float64) / temp

    def smoothed_ce(logits):  # (1 - eps) * NLL(target) + eps * mean(-log p)
        logp = logits.log_softmax(dim=1)
        return ((1 - eps) * -logp.diagonal() + eps * -logp.mean(dim=1)).mean()

    expected = (smoothed_ce(sim) + smoothed_ce(sim.t())) / 2
    torch.testing.assert_close(result.loss, expected, rtol=1e-12, atol=0)
    torch.testing.assert_close(result.logits_i2t, sim, rtol=1e-12, atol=0)
    torch.testing.assert_close(result.logits_t2i, sim.t(), rtol=1e-12, atol=0)


def test_itg_loss_matches_full_logits_reference():
    generator = torch.Generator().manual_seed(1)
    ids, mask = random_text(4, 9, 50, generator)
    decoder_ids, labels = itg.decoder_inputs(ids, mask, bos_token_id=49)
    assert (decoder_ids[:, 0] == 49).all() and torch.equal(decoder_ids[:, 1:], ids[:, 1:])
    assert (labels[mask == 0] == itg.IGNORE_INDEX).all() and torch.equal(labels[mask == 1], decoder_ids[mask == 1])
    logits = torch.randn(4, 9, 50, generator=generator, dtype=torch.float64)
    reference = F.cross_entropy(logits[:, :-1].reshape(-1, 50), labels[:, 1:].reshape(-1), ignore_index=-100,
                                label_smoothing=0.1)
    predicting, targets = itg.next_token_positions(labels)
    torch.testing.assert_close(itg.itg_loss(logits[:, :-1][predicting], targets, 0.1), reference,
                               rtol=1e-12, atol=0)


def _draw(logits, seed=0, offset=0):
    return itm.sample_hard_negatives(logits, logits, row_offset=offset, seed=seed)[0]


def test_hard_negatives_follow_the_softmax_and_never_pick_the_positive():
    logits = torch.tensor([[5.0, 0.0, 1.0, 2.0]] * 4)
    draws = torch.stack([_draw(logits, seed=s) for s in range(3000)])  # (3000, 4)
    assert not (draws == torch.arange(4)).any()
    probs = logits[0, 1:].softmax(0)  # row 0: positive (col 0) excluded
    freq = torch.bincount(draws[:, 0], minlength=4)[1:].double() / 3000
    assert (freq - probs.double()).abs().max() < 0.03, (freq, probs)


def test_hard_negatives_non_finite_rules():
    nan, inf = float("nan"), float("inf")
    logits = torch.tensor([
        [0.0, nan, 3.0, nan],        # NaN never chosen: only col 2 is selectable -> always 2
        [inf, 0.0, inf, 1.0],        # +inf entries share the mass; positive (col 1) excluded anyway
        [nan, nan, nan, nan],        # nothing selectable -> uniform over the others
        [-inf, -inf, -inf, 2.0],     # only the positive is finite -> uniform over the others
    ])
    draws = torch.stack([_draw(logits, seed=s) for s in range(400)])
    assert (draws[:, 0] == 2).all()
    assert set(draws[:, 1].tolist()) == {0, 2}
    assert set(draws[:, 2].tolist()) == {0, 1, 3}
    assert set(draws[:, 3].tolist()) == {0, 1, 2}
    half = torch.tensor([[1.0, 2.0], [2.0, 1.0]], dtype=torch.float16)
    assert _draw(half).tolist() == [1, 0]


def test_hard_negatives_do_not_depend_on_the_rank_split():
    generator = torch.Generator().manual_seed(3)
    logits = torch.randn(6, 6, generator=generator)
    whole = _draw(logits, seed=11)
    parts = torch.cat([_draw(logits[r * 3:(r + 1) * 3], seed=11, offset=r * 3) for r in range(2)])
    assert torch.equal(whole, parts)
    assert not torch.equal(whole, _draw(logits, seed=12)) or not torch.equal(whole, _draw(logits, seed=13))


def test_hard_negatives_need_two_samples():
    with pytest.raises(ValueError, match="at least 2"):
        _draw(torch.zeros(1, 1))


def test_itm_loss_and_accuracy():
    logits = torch.tensor([[0.0, 2.0], [3.0, 0.0], [0.0, 1.0]])  # pos right, neg right, neg wrong
    result = itm.itm_loss(logits)
    assert math.isclose(float(result.accuracy), 2 / 3, rel_tol=1e-6)
    torch.testing.assert_close(result.loss, F.cross_entropy(logits, torch.tensor([1, 0, 0])))


def test_stage1_forward_survives_non_finite_similarities(tiny_cfg):
    """A diverged temperature makes the ITC logits inf/NaN: the step still runs and reports it."""
    model = Stage1Model(tiny_cfg)
    generator = torch.Generator().manual_seed(0)
    ids, mask = random_text(4, 8, tiny_cfg.vocab_size, generator)
    image = torch.randn(4, 5, tiny_cfg.vision_width, generator=generator)
    image[1] = float("nan")
    out = model(image, ids, mask)
    assert torch.isnan(out.loss_itc)  # visible to the trainer's NaN guard, not a crash in sampling


def test_temperature_is_clamped(tiny_cfg):
    model = Stage1Model(tiny_cfg)
    with torch.no_grad():
        model.temp.fill_(1e-5)
    assert float(model.temperature().detach()) == pytest.approx(0.001)
    with torch.no_grad():
        model.temp.fill_(3.0)
    assert float(model.temperature().detach()) == pytest.approx(0.5)
    model.clamp_parameters_()
    assert float(model.temp.detach()) == pytest.approx(0.5)


def test_loss_weights_combine(tiny_cfg):
    import dataclasses

    model = Stage1Model(tiny_cfg)
    generator = torch.Generator().manual_seed(0)
    ids, mask = random_text(4, 8, tiny_cfg.vocab_size, generator)
    image = torch.randn(4, 5, tiny_cfg.vision_width, generator=generator)
    model.objectives = dataclasses.replace(model.objectives, itc_weight=0.5, itm_weight=2.0, itg_weight=0.25)
    out = model(image, ids, mask, sample_seed=3)
    torch.testing.assert_close(out.loss, 0.5 * out.loss_itc + 2.0 * out.loss_itm + 0.25 * out.loss_itg)
