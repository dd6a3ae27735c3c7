"""Packed rows through PyTorch's variable-length flash attention (`torch.nn.attention.varlen`).

Why: the package keeps packed examples apart (each bin a row, position ids restarting at 0 for
every example). With SDPA, transformers turns those position ids into a dense block-causal mask
per row, and a masked SDPA call cannot use the flash kernel: on Gemma's head_dim 256 it falls to
a slower masked kernel. Flash attention over variable-length sequences keeps the examples apart
without a mask, from the offsets of the examples in the flattened batch (`cu_seqlens`), which are
read off the same position ids. PyTorch ships the kernel (`varlen_attn`, flash attention 2, with
its backward); transformers has no attention implementation that calls it, so this module
registers one, `gemma_varlen`, whose mask function is SDPA's: where the kernel does not apply
(CPU, no position ids, soft-capping, dropout, a cache, torch without `varlen_attn`) the layer
runs SDPA on that mask, as before.
"""

from __future__ import annotations

import inspect

import torch

NAME = "gemma_varlen"
_cache: dict = {}
ON_CPU = False  # tests: take the varlen path on CPU too (with a reference kernel in place of PyTorch's CUDA one)


def _varlen_attn():
    try:
        from torch.nn.attention.varlen import varlen_attn

        return varlen_attn
    except ImportError:
        return None


def sequence_offsets(position_ids: torch.Tensor, rows: int, length: int) -> tuple[torch.Tensor, int]:
    """(cu_seqlens as int32, longest sequence) of the examples in a (rows, length) batch whose
    position ids restart at 0 at every example; every row also starts a sequence. Cached for the
    tensor it was computed from, so the layers of one forward (and its recomputation) share it."""
    hit = _cache.get("key")
    if hit is not None and hit[0] is position_ids and hit[1] == (rows, length):
        return _cache["value"]
    pos = position_ids.expand(rows, length).reshape(-1)
    starts = pos == 0
    starts = starts.reshape(rows, length).clone()
    starts[:, 0] = True
    index = starts.reshape(-1).nonzero().flatten()
    total = torch.tensor([rows * length], device=index.device, dtype=index.dtype)
    cu = torch.cat([index, total]).to(torch.int32)
    longest = int((cu[1:] - cu[:-1]).max().item())
    _cache["key"], _cache["value"] = (position_ids, (rows, length)), (cu, longest)
    return cu, longest


def varlen_attention_forward(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None,
                             sliding_window=None, softcap=None, position_ids=None, **kwargs):
    """transformers' attention signature: query (b, h, s, d), key/value (b, h_kv, s, d); returns
    ((b, s, h, d), None)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    kernel = _varlen_attn()
    rows, heads, length, dim = query.shape
    window = sliding_window or getattr(module, "sliding_window", None)
    accepts = inspect.signature(kernel).parameters if kernel is not None else {}
    usable = (
        kernel is not None and (query.is_cuda or ON_CPU) and position_ids is not None and not softcap and not dropout
        and key.shape[2] == length and not kwargs.get("output_attentions", False) and (not window or "window_size" in accepts)
    )
    if not usable:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      softcap=softcap, **kwargs)
    cu, longest = sequence_offsets(position_ids, rows, length)
    q = query.transpose(1, 2).reshape(rows * length, heads, dim)
    kv_heads = key.shape[1]
    extra = {}
    if kv_heads != heads:
        if "enable_gqa" in accepts:
            extra["enable_gqa"] = True
        else:
            key = key.repeat_interleave(heads // kv_heads, dim=1)
            value = value.repeat_interleave(heads // kv_heads, dim=1)
            kv_heads = heads
    k = key.transpose(1, 2).reshape(rows * length, kv_heads, dim)
    v = value.transpose(1, 2).reshape(rows * length, kv_heads, dim)
    if window:
        extra["window_size"] = (window - 1, 0)
    elif "window_size" in accepts:
        extra["window_size"] = (-1, 0)  # causal
    if "is_causal" in accepts:  # the first releases' spelling
        extra["is_causal"] = True
    if scaling is not None and "scale" in accepts:
        extra["scale"] = scaling
    elif scaling is not None and abs(scaling - dim**-0.5) > 1e-9:
        q = q * (scaling * dim**0.5)  # a kernel that only knows 1/sqrt(dim)
    out = kernel(q, k, v, cu, cu, longest, longest, **extra)
    return out.reshape(rows, length, heads, dim), None


def register() -> str:
    """Make `gemma_varlen` an attention implementation transformers knows (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    AttentionInterface.register(NAME, varlen_attention_forward)
    AttentionMaskInterface.register(NAME, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])
    return NAME


def use_varlen_attention(model) -> bool:
    """Switch a model on SDPA to `gemma_varlen`; True if switched. A model on another
    implementation (eager for Gemma 2's soft-capping, flex) keeps it."""
    config = getattr(model, "config", None)
    if config is None or config._attn_implementation != "sdpa":
        return False
    register()
    model.set_attn_implementation(NAME)
    return True
