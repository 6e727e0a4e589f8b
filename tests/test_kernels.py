"""The Triton kernels against their plain-PyTorch references.

On CPU they run in Triton's interpreter (conftest sets TRITON_INTERPRET=1); with
BLIP2_DS_TEST_GPU=1 on a CUDA machine the same tests compile and run the real kernels.
Shapes are small and deliberately not multiples of the block sizes.
"""
import os

import pytest
import torch
import torch.nn.functional as F
from conftest import random_text, tiny_qformer_config

from blip2_ds import kernels
from blip2_ds.kernels import contrastive_triton
from blip2_ds.kernels.contrastive import (max_over_queries_reference, max_over_queries_similarity,
                                          routed_gradients_reference, triton_max_over_queries)
from blip2_ds.kernels.cross_attention import cross_attention, cross_attention_reference, triton_cross_attention
from blip2_ds.models.stage1 import Stage1Model
from blip2_ds.objectives import itc

ON_GPU = os.environ.get("BLIP2_DS_TEST_GPU") == "1" and torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"
# fp16 inputs: products exact in fp32, outputs rounded to fp16 (2^-11 relative).
TOLERANCE = {torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}


def assert_close(actual, expected, dtype, what=""):
    tol = TOLERANCE[dtype]
    torch.testing.assert_close(actual.double(), expected.double(), atol=tol, rtol=tol, msg=lambda m: f"{what}: {m}")


def head_split(batch, length, heads, dim, dtype, generator):
    """(B, H, L, d) as the model passes it: a transposed view of (B, L, H*d)."""
    flat = torch.randn(batch, length, heads * dim, generator=generator).to(DEVICE, dtype)
    return flat.view(batch, length, heads, dim).transpose(1, 2).requires_grad_()


def attention_case(batch, heads, lq, lk, dim, dtype, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [head_split(batch, length, heads, dim, dtype, generator) for length in (lq, lk, lk)]


def check_attention(q, k, v, key_mask=None, dropout_p=0.0, seed=None):
    out = triton_cross_attention(q, k, v, key_mask, dropout_p, seed)
    grad = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), grad)
    keep = None
    if dropout_p > 0:
        from blip2_ds.kernels.cross_attention_triton import dropout_keep_mask

        b, h, lq, _ = q.shape
        keep = dropout_keep_mask(b, h, lq, k.shape[2], dropout_p, seed, device=q.device)
    wide = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref = cross_attention_reference(*wide, key_mask, keep, dropout_p)
    ref_grads = torch.autograd.grad(ref, wide, grad.double())
    assert_close(out, ref, q.dtype, "out")
    for name, ours, theirs in zip(("dq", "dk", "dv"), grads, ref_grads):
        assert_close(ours, theirs, q.dtype, name)
    return out, grads


# ---- cross-attention ----------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape", [(2, 3, 5, 37, 24), (1, 2, 32, 130, 64), (3, 1, 17, 200, 8)],
                         ids=["odd", "B1-two-key-blocks", "d8-many-keys"])
def test_cross_attention_matches_reference(dtype, shape):
    check_attention(*attention_case(*shape, dtype))


@pytest.mark.parametrize("draw", range(3))
def test_cross_attention_random_shapes(draw):
    rng = torch.Generator().manual_seed(100 + draw)
    batch, heads, lq, lk, dim = (int(torch.randint(lo, hi, (), generator=rng))
                                 for lo, hi in ((1, 4), (1, 4), (1, 40), (1, 150), (4, 40)))
    q, k, v = attention_case(batch, heads, lq, lk, dim, torch.float32, seed=draw)
    key_mask = (torch.rand(batch, lk, generator=rng) > 0.2).to(DEVICE)
    check_attention(q, k, v, key_mask)


def test_cross_attention_bf16_operands():
    # The interpreter upcasts bf16 after each load (its bf16 arithmetic is broken) and truncates
    # on store; on a GPU this is the tensor-core path. Either way: within bf16 rounding.
    check_attention(*attention_case(2, 2, 9, 70, 32, torch.bfloat16))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_cross_attention_key_padding_mask_and_fully_masked_rows(dtype):
    q, k, v = attention_case(3, 2, 6, 45, 16, dtype, seed=1)
    key_mask = torch.rand(3, 45, generator=torch.Generator().manual_seed(2)) > 0.4
    key_mask[1] = False  # sample 1 attends to nothing
    key_mask[2, :44] = False  # sample 2 to exactly one key (the last, in the last partial block)
    key_mask = key_mask.to(DEVICE)
    out, (dq, dk, dv) = check_attention(q, k, v, key_mask)
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    for grad in (dq[1], dk[1], dv[1]):
        assert torch.equal(grad, torch.zeros_like(grad))
    assert torch.equal(dk[0][:, ~key_mask[0]], torch.zeros_like(dk[0][:, ~key_mask[0]]))
    # one visible key: the output is that key's value exactly
    torch.testing.assert_close(out[2], v[2, :, 44:45].expand_as(out[2]).detach(), atol=TOLERANCE[dtype], rtol=0)


def test_cross_attention_dropout_mask_is_the_kernels_and_regenerated_in_backward():
    from blip2_ds.kernels.cross_attention_triton import dropout_keep_mask

    q, k, v = attention_case(2, 3, 7, 50, 16, torch.float32, seed=3)
    check_attention(q, k, v, dropout_p=0.3, seed=1234)  # forward and all gradients use the same mask
    keep = dropout_keep_mask(4, 4, 32, 257, 0.1, seed=7, device=DEVICE)
    assert abs(keep.float().mean().item() - 0.9) < 0.01
    assert torch.equal(keep, dropout_keep_mask(4, 4, 32, 257, 0.1, seed=7, device=DEVICE))
    assert not torch.equal(keep, dropout_keep_mask(4, 4, 32, 257, 0.1, seed=8, device=DEVICE))
    assert not torch.equal(keep[0, 0], keep[0, 1])  # heads get different masks


def test_cross_attention_dispatch():
    q, k, v = attention_case(2, 2, 4, 20, 16, torch.float32, seed=4)
    expected = cross_attention_reference(q, k, v)
    for backend in ("torch", "triton", "auto"):
        assert_close(cross_attention(q, k, v, backend=backend), expected, torch.float32, backend)
    if not ON_GPU:
        assert not kernels.use_triton("auto", "cross_attention", q)  # auto on CPU: SDPA
    with pytest.raises(ValueError, match="not one of"):
        cross_attention(q, k, v, backend="fast")


def test_triton_on_cpu_without_interpreter_is_a_clear_error(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(kernels.KernelUnavailable, match="TRITON_INTERPRET=1"):
        kernels.check_triton_inputs("cross_attention", torch.zeros(1))
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with pytest.raises(kernels.KernelUnavailable, match="float64"):
        kernels.check_triton_inputs("contrastive", torch.zeros(1, dtype=torch.float64).to(DEVICE))


# ---- contrastive ------------------------------------------------------------------------------
def feature_case(ni, nq, nt, dim, dtype, seed=0):
    generator = torch.Generator().manual_seed(seed)
    query = F.normalize(torch.randn(ni, nq, dim, generator=generator), dim=-1)
    text = F.normalize(torch.randn(nt, dim, generator=generator), dim=-1)
    return query.to(DEVICE, dtype).requires_grad_(), text.to(DEVICE, dtype).requires_grad_()


def check_max_sim(query, text):
    sims = triton_max_over_queries(query, text)
    assert sims.dtype == torch.float32 and sims.shape == (query.shape[0], text.shape[0])
    grad = torch.randn_like(sims)
    grads = torch.autograd.grad(sims, (query, text), grad)
    wide = [t.detach().double().requires_grad_() for t in (query, text)]
    ref = max_over_queries_reference(*wide)
    ref_grads = torch.autograd.grad(ref, wide, grad.double())
    assert_close(sims, ref, query.dtype, "similarity")
    for name, ours, theirs in zip(("d_query", "d_text"), grads, ref_grads):
        assert_close(ours, theirs, query.dtype, name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(5, 3, 7, 24), (1, 4, 70, 16), (70, 6, 9, 40)], ids=["odd", "B1", "rows>block"])
def test_max_over_queries_matches_reference(dtype, shape):
    check_max_sim(*feature_case(*shape, dtype))


@pytest.mark.parametrize("draw", range(3))
def test_max_over_queries_random_shapes(draw):
    rng = torch.Generator().manual_seed(200 + draw)
    shape = [int(torch.randint(lo, hi, (), generator=rng)) for lo, hi in ((1, 90), (1, 9), (1, 90), (2, 70))]
    check_max_sim(*feature_case(*shape, torch.float32, seed=draw))


def test_max_over_queries_non_contiguous_inputs_and_gradient():
    query, text = feature_case(12, 5, 20, 32, torch.float32, seed=5)
    # t2i direction: the kernel's output is transposed before the loss, so its gradient arrives strided
    sims = triton_max_over_queries(query, text).t()
    grad = torch.randn(sims.shape, device=DEVICE)
    ours = torch.autograd.grad(sims, (query, text), grad)
    theirs = torch.autograd.grad(max_over_queries_reference(query, text).t(), (query, text), grad)
    for a, b in zip(ours, theirs):
        assert_close(a, b, torch.float32)
    strided = query.detach().transpose(0, 1).contiguous().transpose(0, 1).requires_grad_()  # same values, other strides
    check_max_sim(strided, text)


def test_max_over_queries_ties_go_to_the_first_query_and_nan_propagates():
    query, text = feature_case(3, 4, 5, 16, torch.float32, seed=6)
    query = query.detach().clone()
    query[:, 2] = query[:, 1]  # queries 1 and 2 identical: every pair where they win is a tie
    sims, winners = contrastive_triton.forward(query, text.detach())
    assert not (winners == 2).any()
    query[0, 3, 0] = float("nan")
    assert torch.isnan(triton_max_over_queries(query, text.detach())[0]).all()
    assert torch.isnan(max_over_queries_reference(query, text.detach())[0]).all()  # same as amax


def test_routed_gradient_reference_equals_autograd_through_amax():
    query, text = feature_case(4, 3, 6, 8, torch.float64, seed=7)
    sims = max_over_queries_reference(query, text)
    grad = torch.randn_like(sims)
    winners = torch.einsum("iqd,td->iqt", query, text).argmax(dim=1)
    expected = torch.autograd.grad(sims, (query, text), grad)
    for ours, theirs in zip(routed_gradients_reference(grad, winners, query.detach(), text.detach()), expected):
        torch.testing.assert_close(ours, theirs, atol=1e-12, rtol=1e-12)


def test_gradcheck_of_the_float64_references():
    q, k, v = [torch.randn(1, 2, n, 4, dtype=torch.float64, requires_grad=True) for n in (3, 5, 5)]
    mask = torch.tensor([[True, False, True, True, False]])
    keep = torch.rand(1, 2, 3, 5, generator=torch.Generator().manual_seed(0)) > 0.3
    assert torch.autograd.gradcheck(lambda *t: cross_attention_reference(*t, mask, keep, 0.3), (q, k, v))
    query, text = feature_case(3, 4, 5, 6, torch.float64, seed=8)
    assert torch.autograd.gradcheck(max_over_queries_reference, (query.cpu(), text.cpu()))


@pytest.mark.parametrize("temperature", [0.001, 0.07, 0.5])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_itc_loss_triton_equals_torch_path(temperature, dtype):
    query, text = feature_case(6, 4, 6, 32, dtype, seed=9)
    temp = torch.tensor(temperature, device=DEVICE, requires_grad=True)
    results = {}
    for backend in ("torch", "triton"):
        # the reference runs in fp32; the kernel takes the fp16 features and accumulates in fp32
        inputs = [(t.float() if backend == "torch" else t).detach().requires_grad_() for t in (query, text)]
        result = itc.itc_loss(*inputs, temp, label_smoothing=0.1, kernels=backend)
        grads = torch.autograd.grad(result.loss, [*inputs, temp])
        results[backend] = (result, grads)
    (ref, ref_grads), (ours, grads) = results["torch"], results["triton"]
    scale = 1.0 / temperature  # logits are similarities / T: compare at the logits' scale
    tol = TOLERANCE[dtype] * scale
    torch.testing.assert_close(ours.logits_i2t.double(), ref.logits_i2t.double(), atol=tol, rtol=TOLERANCE[dtype])
    torch.testing.assert_close(ours.logits_t2i.double(), ref.logits_t2i.double(), atol=tol, rtol=TOLERANCE[dtype])
    torch.testing.assert_close(ours.loss.double(), ref.loss.double(), atol=tol, rtol=TOLERANCE[dtype])
    for ours_grad, ref_grad in zip(grads, ref_grads):
        torch.testing.assert_close(ours_grad.double(), ref_grad.double(), atol=tol * scale, rtol=TOLERANCE[dtype])


def test_max_over_queries_dispatch():
    query, text = feature_case(3, 2, 4, 16, torch.float32)
    expected = max_over_queries_reference(query, text)
    for backend in ("torch", "triton", "auto"):
        assert_close(max_over_queries_similarity(query, text, backend), expected, torch.float32, backend)


# ---- the model ---------------------------------------------------------------------------------
def test_stage1_losses_and_gradients_equal_with_triton_and_torch_kernels():
    cfg = tiny_qformer_config()
    generator = torch.Generator().manual_seed(10)
    image = torch.randn(3, 19, cfg.vision_width, generator=generator).to(DEVICE)
    ids, mask = random_text(3, 9, cfg.vocab_size, generator)
    ids, mask = ids.to(DEVICE), mask.to(DEVICE)
    outputs = {}
    for backend in ("torch", "triton"):
        torch.manual_seed(0)
        model = Stage1Model(cfg, kernels=backend).to(DEVICE)
        out = model(image, ids, mask, sample_seed=3)
        out.loss.backward()
        outputs[backend] = (out, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    (ref, ref_grads), (ours, grads) = outputs["torch"], outputs["triton"]
    for name in ("loss", "loss_itc", "loss_itm", "loss_itg", "itm_accuracy"):
        torch.testing.assert_close(getattr(ours, name), getattr(ref, name), atol=1e-5, rtol=1e-5, msg=name)
    assert grads.keys() == ref_grads.keys()
    for name in ref_grads:
        torch.testing.assert_close(grads[name], ref_grads[name], atol=1e-5, rtol=1e-4, msg=name)


def test_stage1_training_mode_with_attention_dropout_runs_the_kernel_dropout():
    cfg = tiny_qformer_config(attention_dropout=0.5)
    generator = torch.Generator().manual_seed(11)
    image = torch.randn(2, 19, cfg.vision_width, generator=generator).to(DEVICE)
    model = Stage1Model(cfg, kernels="triton").to(DEVICE)
    torch.manual_seed(1)
    first = model.encode_image(image)
    torch.manual_seed(2)
    second = model.encode_image(image)
    assert not torch.allclose(first, second)  # dropout active and re-drawn per call
    model.eval()
    assert torch.equal(model.encode_image(image), model.encode_image(image))


def test_itc_rank_offset_targets_equal_with_triton_and_torch():
    """Rank 1 of 2: local rows are global rows 4..7 of the gathered batch."""
    query_all, text_all = feature_case(8, 3, 8, 16, torch.float32, seed=12)
    temp = torch.tensor(0.05, device=DEVICE)
    results = []
    for backend in ("torch", "triton"):
        leaves = [t.detach().requires_grad_() for t in (query_all, text_all)]
        result = itc.itc_loss_gathered(leaves[0][4:], leaves[1][4:], *leaves, temp, 0.1, backend, target_offset=4)
        results.append((result.loss, *torch.autograd.grad(result.loss, leaves)))
    for ours, theirs in zip(results[1], results[0]):
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


# ---- apex (optional) ---------------------------------------------------------------------------
class _OtherLayerNorm(torch.nn.LayerNorm):
    """A LayerNorm-compatible class (apex's FusedLayerNorm has this constructor and these parameters)."""


def test_layer_norm_replacement_keeps_parameters_keys_and_outputs():
    from blip2_ds.kernels.apex import replace_layer_norms

    cfg = tiny_qformer_config()
    model = Stage1Model(cfg).eval()
    before = {n: p for n, p in model.named_parameters()}
    image = torch.randn(2, 7, cfg.vision_width)
    expected = model.encode_image(image)
    replaced = replace_layer_norms(model, _OtherLayerNorm)
    assert replaced == sum(1 for m in model.modules() if isinstance(m, _OtherLayerNorm)) > 0
    assert not any(type(m) is torch.nn.LayerNorm for m in model.modules())
    after = dict(model.named_parameters())
    assert after.keys() == before.keys() and all(after[n] is before[n] for n in before)  # same objects, same keys
    torch.testing.assert_close(model.encode_image(image), expected, atol=0, rtol=0)


def test_apex_asked_for_but_missing_warns_and_keeps_torch():
    from blip2_ds.kernels import apex

    if apex.fused_layer_norm_class() is not None:
        pytest.skip("NVIDIA apex is installed here")
    model = Stage1Model(tiny_qformer_config())
    with pytest.warns(RuntimeWarning, match="apex"):
        assert apex.use_fused_layer_norms(model.qformer) == 0
    with pytest.warns(RuntimeWarning, match="apex"):
        assert apex.fused_adamw([{"params": list(model.parameters())}], 1e-4, (0.9, 0.999), 1e-8) is None
    assert any(type(m) is torch.nn.LayerNorm for m in model.qformer.modules())


@pytest.mark.parametrize("splits", [2, 3])
def test_max_over_queries_text_gradient_split_over_rows(splits):
    """The GPU splits the text gradient's sum over rows when there are few texts; same result."""
    query, text = feature_case(150, 3, 10, 16, torch.float32, seed=13)
    sims, winners = contrastive_triton.forward(query.detach(), text.detach())
    grad = torch.randn_like(sims)
    whole = contrastive_triton.backward(grad, winners, query.detach(), text.detach(), row_splits=1)
    split = contrastive_triton.backward(grad, winners, query.detach(), text.detach(), row_splits=splits)
    torch.testing.assert_close(split[0], whole[0], atol=0, rtol=0)
    torch.testing.assert_close(split[1], whole[1], atol=1e-6, rtol=1e-6)
    expected = routed_gradients_reference(grad, winners, query.detach(), text.detach())
    torch.testing.assert_close(split[1], expected[1].float(), atol=1e-5, rtol=1e-5)


def test_auto_first_use_check_leaves_the_random_state_as_it_was(monkeypatch):
    """A resumed run checks again (verdicts are not checkpointed): the check must not move the dropout RNG."""
    monkeypatch.setattr(kernels, "_auto_eligible", lambda kernel, *tensors: True)
    monkeypatch.setattr(kernels, "_auto_verdicts", {})
    torch.manual_seed(0)
    assert kernels.use_triton("auto", "contrastive", torch.zeros(3, 4), self_check=lambda: torch.randn(10))
    after_a_check = torch.rand(4)
    torch.manual_seed(0)
    assert kernels.use_triton("auto", "contrastive", torch.zeros(3, 4), self_check=lambda: torch.randn(10))
    assert torch.equal(torch.rand(4), after_a_check)  # cached verdict, no check: the same next draw


def test_contrastive_first_use_check_takes_bounded_slices_of_a_large_call(monkeypatch):
    from blip2_ds.kernels import contrastive, contrastive_triton

    seen = []
    monkeypatch.setattr(contrastive_triton, "forward", lambda q, t: seen.append((len(q), len(t))) or 1 / 0)
    with pytest.raises(ZeroDivisionError):
        contrastive._first_use_check(torch.zeros(5000, 2, 4), torch.zeros(25000, 4))
    assert seen == [(512 + 5000 % 128, 512 + 25000 % 128)]


def test_auto_first_use_check_verdicts_are_cached_and_a_failure_keeps_torch(monkeypatch):
    """The auto policy's bookkeeping (on a CPU, where auto is never eligible by itself, eligibility is forced)."""
    monkeypatch.setattr(kernels, "_auto_eligible", lambda kernel, *tensors: True)
    monkeypatch.setattr(kernels, "_auto_verdicts", {})
    calls = []

    def failing():
        calls.append("fail")
        raise AssertionError("mismatch")

    x = torch.zeros(3, 4)
    with pytest.warns(RuntimeWarning, match="keeps the torch path for contrastive"):
        assert not kernels.use_triton("auto", "contrastive", x, self_check=failing)
    assert not kernels.use_triton("auto", "contrastive", x, self_check=failing)  # cached: no second check
    assert calls == ["fail"]
    with torch.no_grad():  # the check may differentiate even when the call does not
        assert kernels.use_triton("auto", "contrastive", torch.zeros(5, 4),
                                  self_check=lambda: torch.autograd.grad((x.requires_grad_() * 2).sum(), x))
