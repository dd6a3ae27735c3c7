"""gemma_varlen attention (gemma_qlora.varlen_attention) against SDPA on the block-causal mask of
packed rows. PyTorch's varlen kernel needs CUDA: here a reference kernel (causal SDPA on each
sequence alone) stands in for it, so that what this package writes (offsets from the position
ids, the reshapes, GQA, the fallback) is checked on CPU."""

import functools

import pytest
import torch
import torch.nn.functional as F

import gemma_qlora.varlen_attention as varlen


def reference_kernel(q, k, v, cu_q, cu_k, max_q, max_k, *, scale=None, window_size=(-1, 0), enable_gqa=False):
    """varlen_attn's contract, one sequence at a time: (T, H, D) in, (T, H, D) out."""
    out = torch.empty_like(q)
    bounds = cu_q.tolist()
    for start, end in zip(bounds, bounds[1:]):
        qs, ks, vs = (t[start:end].transpose(0, 1) for t in (q, k, v))
        out[start:end] = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=scale, enable_gqa=enable_gqa).transpose(0, 1)
    return out


def test_offsets_follow_the_position_ids_and_row_starts():
    positions = torch.tensor([[0, 1, 2, 0, 1, 0], [0, 1, 2, 3, 4, 5], [3, 4, 0, 1, 2, 3]])
    cu, longest = varlen.sequence_offsets(positions, 3, 6)
    assert cu.tolist() == [0, 3, 5, 6, 12, 14, 18] and cu.dtype == torch.int32 and longest == 6


@pytest.fixture
def packed(tiny_model):
    """The tiny Gemma 3 (sdpa) and a batch of two packed rows, as the package's row collator makes them."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from gemma_qlora.packing import make_collator

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32, attn_implementation="sdpa")
    texts = [["Quote: Be yourself.\nAuthor: Oscar Wilde", "Quote: Less is more."], ["Quote: Imagination is more important than knowledge."]]
    rows = []
    for bin_texts in texts:
        ids = [tokenizer(t)["input_ids"] for t in bin_texts]
        rows.append({"input_ids": sum(ids, []), "seq_lengths": [len(i) for i in ids]})
    batch = make_collator(tokenizer, max_length=64)(rows)
    return model, batch


def loss_and_grads(model, batch):
    model.zero_grad(set_to_none=True)
    loss = model(**batch, use_cache=False).loss  # as in training: the block mask needs no cache
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_varlen_path_equals_sdpa_on_the_block_mask(packed, monkeypatch):
    model, batch = packed
    ref_loss, ref_grads = loss_and_grads(model, batch)
    calls = []

    @functools.wraps(reference_kernel)  # keeps its signature, which the module reads
    def kernel(*args, **kwargs):
        calls.append(kwargs)
        return reference_kernel(*args, **kwargs)

    monkeypatch.setattr(varlen, "_varlen_attn", lambda: kernel)
    monkeypatch.setattr(varlen, "ON_CPU", True)
    assert varlen.use_varlen_attention(model) and model.config._attn_implementation == varlen.NAME
    loss, grads = loss_and_grads(model, batch)
    # both layers, with GQA (4 query heads, 1 KV head); Gemma 3's sliding layer passes its window
    assert len(calls) == 2 and all(c.get("enable_gqa") for c in calls)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    assert grads.keys() == ref_grads.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-4, atol=1e-6, msg=name)


def test_without_the_kernel_it_is_sdpa(packed, monkeypatch):
    model, batch = packed
    ref_loss, _ = loss_and_grads(model, batch)
    monkeypatch.setattr(varlen, "_varlen_attn", lambda: None)
    varlen.use_varlen_attention(model)
    loss, _ = loss_and_grads(model, batch)
    torch.testing.assert_close(loss, ref_loss)
