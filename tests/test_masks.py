"""The three attention masks, proven by perturbation on a real Q-Former."""
import pytest
import torch
from conftest import random_text

from blip2_ds.models import masks
from blip2_ds.models.qformer import QFormer, init_weights
from blip2_ds.models.stage1 import Stage1Model

BATCH, TEXT_LEN, IMAGE_TOKENS = 3, 9, 7


@pytest.fixture
def setup(tiny_cfg):
    torch.manual_seed(0)
    qformer = QFormer(tiny_cfg).eval().double()  # float64: "unchanged" means unchanged to 1e-10
    init_weights(qformer, 0.2)
    generator = torch.Generator().manual_seed(1)
    queries = torch.randn(BATCH, tiny_cfg.num_query_tokens, tiny_cfg.hidden_size, generator=generator).double()
    image = torch.randn(BATCH, IMAGE_TOKENS, tiny_cfg.vision_width, generator=generator).double()
    ids, mask = random_text(BATCH, TEXT_LEN, tiny_cfg.vocab_size, generator, min_len=TEXT_LEN)
    return qformer, queries, image, ids, mask, tiny_cfg.num_query_tokens


def changed_rows(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(B, L) bool: rows whose hidden state changed."""
    return (a - b).abs().amax(dim=-1) > 1e-9


def perturb_text(ids: torch.Tensor, positions: slice, vocab: int) -> torch.Tensor:
    out = ids.clone()
    out[:, positions] = (out[:, positions] + 17) % (vocab - 2) + 2
    return out


@torch.no_grad()
def test_itg_mask_queries_never_see_text_and_text_is_causal(setup):
    qformer, queries, image, ids, mask, nq = setup
    kv = qformer.image_kv(image)
    itg_mask = masks.multimodal_causal_mask(mask, nq)

    def run(text_ids, query_embeds=queries, kv=kv):
        return qformer(query_embeds=query_embeds, text_ids=text_ids, self_mask=itg_mask, image_kv=kv)[0]

    base = run(ids)
    # No query output depends on any text token.
    assert not changed_rows(base, run(perturb_text(ids, slice(None), qformer.cfg.vocab_size)))[:, :nq].any()
    # Text position t depends on no text position > t; it does depend on position t.
    for t in range(TEXT_LEN):
        after = changed_rows(base, run(perturb_text(ids, slice(t, None), qformer.cfg.vocab_size)))
        assert not after[:, :nq + t].any(), f"a row before text position {t} saw position >= {t}"
        assert after[:, nq + t:].all(), "perturbing text must reach its own and later positions"
    # Every text position sees the queries (and through them the image).
    other_image = run(ids, kv=qformer.image_kv(image * 1.5))
    assert changed_rows(base, other_image).all()


@torch.no_grad()
def test_itg_cached_pass_equals_full_pass(setup):
    """The training path reuses the image pass's query keys/values: same text rows as the full pass."""
    qformer, queries, image, ids, mask, nq = setup
    kv = qformer.image_kv(image)
    full = qformer(query_embeds=queries, text_ids=ids, self_mask=masks.multimodal_causal_mask(mask, nq),
                   image_kv=kv)[0]
    query_only, cache = qformer(query_embeds=queries, image_kv=kv, return_query_cache=True)
    text_only = qformer(text_ids=ids, self_mask=masks.multimodal_causal_mask(mask, nq, query_rows=False),
                        query_cache=cache)[0]
    torch.testing.assert_close(query_only, full[:, :nq], rtol=0, atol=1e-10)
    torch.testing.assert_close(text_only, full[:, nq:], rtol=0, atol=1e-10)


@torch.no_grad()
def test_itm_mask_everything_sees_everything(setup):
    qformer, queries, image, ids, mask, nq = setup
    kv = qformer.image_kv(image)
    itm_mask = masks.bidirectional_mask(mask, nq)

    def run(text_ids=ids, query_embeds=queries, kv=kv):
        return qformer(query_embeds=query_embeds, text_ids=text_ids, self_mask=itm_mask, image_kv=kv)[0]

    base = run()
    last_token = perturb_text(ids, slice(TEXT_LEN - 1, None), qformer.cfg.vocab_size)
    assert changed_rows(base, run(text_ids=last_token)).all(), "every row must see the last text token"
    assert changed_rows(base, run(kv=qformer.image_kv(image * 1.5))).all(), "every row must see the image"
    one_query = queries.clone()
    one_query[:, -1] += torch.linspace(-1.0, 1.0, one_query.shape[-1], dtype=one_query.dtype)  # not LN-invariant
    assert changed_rows(base, run(query_embeds=one_query)).all(), "every row must see every query"


@torch.no_grad()
def test_itc_text_pass_sees_no_queries_or_image_and_ignores_padding(tiny_cfg):
    torch.manual_seed(0)
    model = Stage1Model(tiny_cfg).eval()
    generator = torch.Generator().manual_seed(2)
    ids, mask = random_text(BATCH, TEXT_LEN, tiny_cfg.vocab_size, generator)
    mask[:, -2:] = 0
    base = model.encode_text(ids, mask)
    model.query_tokens.add_(torch.randn(model.query_tokens.shape, generator=generator))
    model.qformer.layers[0].cross_attn.key.weight.add_(torch.randn(model.qformer.layers[0].cross_attn.key.weight.shape, generator=generator))
    torch.testing.assert_close(model.encode_text(ids, mask), base, rtol=0, atol=0)
    other_padding = ids.clone()
    other_padding[:, -2:] = 5
    torch.testing.assert_close(model.encode_text(other_padding, mask), base, rtol=0, atol=1e-6)
    assert changed_rows(base[:, None], model.encode_text(perturb_text(ids, slice(1, 2), tiny_cfg.vocab_size),
                                                         mask)[:, None]).all()


def test_padding_keys_are_hidden_in_every_mask():
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    assert masks.unimodal_text_mask(mask)[0, 0, 0].tolist() == [True, True, False]
    assert masks.bidirectional_mask(mask, 2)[0, 0, 0].tolist() == [True, True, True, True, False]
    itg = masks.multimodal_causal_mask(mask, 2)
    assert itg.shape == (2, 1, 5, 5)
    assert itg[0, 0].int().tolist() == [
        [1, 1, 0, 0, 0],
        [1, 1, 0, 0, 0],
        [1, 1, 1, 0, 0],
        [1, 1, 1, 1, 0],
        [1, 1, 1, 1, 0],
    ]
    assert torch.equal(masks.multimodal_causal_mask(mask, 2, query_rows=False), itg[:, :, 2:])
