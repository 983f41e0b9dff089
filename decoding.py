"""Decoding helpers behind MiniGemini.generate / stream (model.py) and chat.py / web.py: the next token from the
logits (greedy, or sampled with temperature, top-k, top-p), token ids as text while they stream, and the keyword an
LLM takes its KV cache by.
"""
from __future__ import annotations

import inspect
from collections.abc import Iterable, Iterator

import torch


def cache_keyword(llm) -> str:
    """The keyword an LLM's forward takes its KV cache by: transformers 5.24 renamed `past_key_values` to `cache` in
    every model family (the old name warns, and stops working in 5.40); earlier 5.x versions know only the old one."""
    base = llm.get_base_model() if hasattr(llm, "get_base_model") else llm     # PEFT passes keywords through
    return "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"


def sample_next(logits, do_sample, temperature=1.0, top_k=0, top_p=1.0, generator=None):
    if not do_sample:
        return logits.argmax(-1)
    logits = logits / max(temperature, 1e-5)
    if top_k:
        kth = logits.topk(min(top_k, logits.shape[-1])).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, idx = logits.sort(-1, descending=True)
        drop = sorted_logits.softmax(-1).cumsum(-1) - sorted_logits.softmax(-1) > top_p   # keep the first over p
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(1, idx, drop), float("-inf"))
    return torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(1)


def stream_text(tokenizer, tokens: Iterable[int]) -> Iterator[str]:
    """Token ids as they come -> the text they add, never half a character: the ids so far are decoded whole and
    only the new text is handed out; text ending in U+FFFD (a character whose bytes have not all come yet, as with
    byte-fallback tokens) is held back until it completes, or until the tokens end."""
    ids, text, shown = [], "", ""
    for token in tokens:
        ids.append(token)
        text = tokenizer.decode(ids, skip_special_tokens=True)
        if not text.endswith("\ufffd") and len(text) > len(shown):
            yield text[len(shown):]
            shown = text
    if len(text) > len(shown):
        yield text[len(shown):]
