"""Activation checkpointing of the Q-Former (``activation_checkpointing: true``): the same losses and
gradients, dropout included, with far fewer activations kept for backward."""
import copy

import torch
from conftest import random_text, tiny_qformer_config

from blip2_ds.config import ObjectiveConfig
from blip2_ds.models.stage1 import Stage1Model


def _batch():
    g = torch.Generator().manual_seed(3)
    cfg = tiny_qformer_config(hidden_dropout=0.1, attention_dropout=0.1)
    images = torch.randn(4, 9, cfg.vision_width, generator=g, dtype=torch.float64)
    ids, mask = random_text(4, 12, cfg.vocab_size, g)
    return cfg, images, ids, mask


def _saved_bytes_and_grads(model, images, ids, mask):
    saved = []

    def pack(tensor):
        saved.append(tensor.numel() * tensor.element_size())
        return tensor

    torch.manual_seed(7)  # the dropout masks
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        out = model(images, ids, mask, sample_seed=0)
    out.loss.backward()
    return out, sum(saved), {n: p.grad for n, p in model.named_parameters()}


def test_checkpointed_layers_give_the_same_losses_and_gradients_with_dropout_on():
    cfg, images, ids, mask = _batch()
    torch.manual_seed(0)
    plain = Stage1Model(cfg, ObjectiveConfig()).double().train()
    recomputed = copy.deepcopy(plain)
    recomputed.qformer.checkpoint_layers = True
    out_a, bytes_a, grads_a = _saved_bytes_and_grads(plain, images, ids, mask)
    out_b, bytes_b, grads_b = _saved_bytes_and_grads(recomputed, images, ids, mask)
    for name in ("loss", "loss_itc", "loss_itm", "loss_itg"):
        assert torch.equal(getattr(out_a, name), getattr(out_b, name)), name  # dropout replayed exactly
    for name, grad in grads_a.items():
        torch.testing.assert_close(grads_b[name], grad, rtol=1e-12, atol=1e-14, msg=name)
    # Only each layer's inputs stay saved (plus the once-per-step image K/V and the heads' inputs).
    assert bytes_b < 0.5 * bytes_a, (bytes_a, bytes_b)


def test_checkpointing_is_off_in_eval_and_without_grad():
    cfg, images, ids, mask = _batch()
    model = Stage1Model(cfg, ObjectiveConfig()).double().eval()
    model.qformer.checkpoint_layers = True
    with torch.no_grad():
        a = model.encode_image(images)
    model.qformer.checkpoint_layers = False
    with torch.no_grad():
        assert torch.equal(model.encode_image(images), a)
