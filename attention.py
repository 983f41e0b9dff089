"""How the LLM attends, beyond what transformers gives: packed rows kept apart (each sample attends only to itself)
and MMCA, DeepSpeed-VisualChat's multi-modal causal attention, registered with transformers' AttentionInterface
under the name "mmca" (so `attention: mmca` in a recipe selects it like sdpa or eager).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask


def packed_attention_kwargs(position_ids, attn_implementation: str) -> dict:
    """Packed rows: position ids restart at 0 for each sample. With no attention mask, transformers builds a
    per-sample (block-diagonal) causal mask for sdpa / eager / mmca / flex from the position ids. Flash-attention
    gets the sample boundaries explicitly (transformers 5 finds them itself only at batch size 1). Any other
    implementation might silently attend across samples: refuse it."""
    if "flash" in attn_implementation:
        pos = position_ids.flatten()
        starts = (pos == 0).nonzero().flatten()
        cu = torch.cat([starts, starts.new_tensor([pos.numel()])]).int()
        longest = int(cu.diff().max())
        return dict(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=longest, max_length_k=longest)
    if attn_implementation not in ("sdpa", "eager", "mmca", "flex_attention"):
        raise ValueError(f"packed rows need an attention that isolates samples; {attn_implementation!r} is not "
                         "known to: use sdpa, eager, mmca, flex_attention or flash_attention_2")
    return {}


def mmca_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, mm_image_mask=None, **kw):
    """Two softmaxes per query, one over image keys and one over text keys, their weights summed.
    An image query sees only itself among image keys (and earlier text); a text query sees all earlier tokens.
    query [B, h, q, d], key/value [B, h_kv, k, d]; attention_mask: bool [B, 1, q, k] (True = may attend), which
    carries causality, padding, sliding windows and packing; mm_image_mask [B, k]: True at image positions."""
    groups = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(groups, 1), value.repeat_interleave(groups, 1)
    q_len, k_len = query.shape[2], key.shape[2]
    scaling = scaling if scaling is not None else query.shape[-1] ** -0.5
    scores = (query.float() @ key.float().transpose(-1, -2)) * scaling
    if attention_mask is None:
        attention_mask = torch.ones(q_len, k_len, dtype=torch.bool, device=query.device).tril(k_len - q_len)
    elif attention_mask.dtype != torch.bool:
        attention_mask = attention_mask == 0
    attention_mask = attention_mask.to(scores.device)
    if mm_image_mask is None:
        mm_image_mask = torch.zeros(query.shape[0], k_len, dtype=torch.bool, device=query.device)
    key_img = mm_image_mask[:, None, None, -k_len:]
    query_img = mm_image_mask[:, None, -q_len:, None]
    itself = torch.arange(k_len, device=query.device) == torch.arange(k_len - q_len, k_len, device=query.device)[:, None]
    image_keys = attention_mask & key_img & (~query_img | itself)
    text_keys = attention_mask & ~key_img
    weights = _masked_softmax(scores, image_keys) + _masked_softmax(scores, text_keys)
    weights = F.dropout(weights, p=dropout, training=module.training).to(value.dtype)
    return (weights @ value).transpose(1, 2).contiguous(), weights


def _masked_softmax(scores, allowed):
    """Softmax over the allowed keys; rows with none allowed give zeros (not NaN)."""
    return scores.masked_fill(~allowed, torch.finfo(scores.dtype).min).softmax(-1) * allowed


def _mmca_mask(*args, **kw):
    """Boolean mask (True = may attend), never skipped: mmca always needs it."""
    return sdpa_mask(*args, **{**kw, "allow_is_causal_skip": False, "allow_is_bidirectional_skip": False})


AttentionInterface.register("mmca", mmca_attention)
AttentionMaskInterface.register("mmca", _mmca_mask)
