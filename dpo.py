"""Preference tuning (DPO and its relatives) on the training loop train.py already has.

    rows = [chosen x B ; rejected x B], each row prompt + reply, labels only on the reply
    logps(row) = sum of the reply's token log-probs;   D_c = pi_c - ref_c,  D_r = pi_r - ref_r,  D = D_c - D_r
    sigmoid  -logsigmoid(beta D)          ipo  ((D_c/|y_c| - D_r/|y_r|) - 1/(2 beta))^2
    hinge    relu(1 - beta D)             bco_pair  -logsigmoid(beta D_c) - logsigmoid(-beta D_r)
    sft      mean NLL of the chosen replies' tokens;  a mixture "sigmoid:0.8,bco_pair:0.2,sft:1" (= "mpo") sums them

These are TRL's DPOTrainer losses and metrics (rewards/chosen = beta D_c, ...), tested equal to it. What differs
is the cost: a pair's images are encoded once, and the chosen rows, the rejected rows and the reference forward all
read those features (the vision side is frozen in this stage, so the reference's towers and projector are the
policy's). The reference is the policy with its LoRA adapter disabled, a frozen copy of the starting LLM, or
log-probs computed in one pass over the data before training (precompute_reference).

Reading order: the losses, the model wrapper train.py prepares (PreferenceModel), the data (pairs from preference
records, collation), the precomputed reference.
"""
from __future__ import annotations

import copy
import hashlib
import json
import os
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from cli import UserError
from conversation import ConversationError
from data import IGNORE_INDEX, BadSample, tokenize_conversation, tokenize_prompt

LOSSES = ("sigmoid", "ipo", "hinge", "bco_pair", "sft")
MIXTURES = {"mpo": "sigmoid:0.8,bco_pair:0.2,sft:1.0"}   # InternVL2.5's Mixed Preference Optimization
METRICS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
           "logps/rejected")
REFERENCES = ("auto", "adapter", "copy", "precomputed")


# ---- The losses ------------------------------------------------------------------------------------------------------

def parse_loss_type(text: str) -> tuple[tuple[str, float], ...]:
    """"sigmoid" | "mpo" | "sigmoid:0.8,bco_pair:0.2,sft:1.0" -> ((name, weight), ...); a UserError otherwise."""
    text = MIXTURES.get(text.strip(), text)
    terms = []
    for part in (p.strip() for p in text.split(",") if p.strip()):
        name, _, weight = part.partition(":")
        try:
            value = float(weight) if weight else 1.0
        except ValueError:
            value = None
        if name not in LOSSES or value is None or value < 0:
            raise UserError(f"loss_type {text!r}: each term is one of {', '.join(LOSSES)} with an optional "
                            f"non-negative weight (name:weight), or a mixture name ({', '.join(MIXTURES)})")
        terms.append((name, value))
    if not terms:
        raise UserError(f"loss_type is empty: one of {', '.join(LOSSES)}, a mixture, or name:weight,...")
    return tuple(terms)


@dataclass
class PairScores:
    """Per pair [B]: the policy's and the reference's reply log-prob sums, and the replies' token counts."""
    chosen: torch.Tensor
    rejected: torch.Tensor
    ref_chosen: torch.Tensor
    ref_rejected: torch.Tensor
    chosen_tokens: torch.Tensor
    rejected_tokens: torch.Tensor


def pair_losses(s: PairScores, beta: float, terms) -> torch.Tensor:
    """The weighted per-pair loss [B] of every term but sft (a token mean over the batch, see preference_loss);
    pairs without a reply token (padding pairs) count 0."""
    d_c, d_r = s.chosen - s.ref_chosen, s.rejected - s.ref_rejected
    out = torch.zeros_like(d_c)
    for name, weight in terms:
        if name == "sigmoid":
            loss = -F.logsigmoid(beta * (d_c - d_r))
        elif name == "hinge":
            loss = torch.relu(1 - beta * (d_c - d_r))
        elif name == "ipo":   # per-token averages, as TRL (and the IPO authors) normalise the sums
            loss = (d_c / s.chosen_tokens.clamp(min=1) - d_r / s.rejected_tokens.clamp(min=1) - 1 / (2 * beta)) ** 2
        elif name == "bco_pair":
            loss = -F.logsigmoid(beta * d_c) - F.logsigmoid(-beta * d_r)
        else:
            continue
        out = out + weight * loss
    return out * (s.chosen_tokens > 0)


def preference_loss(s: PairScores, beta: float, terms, *, pairs=None, chosen_tokens=None) -> torch.Tensor:
    """The loss of a batch: per-pair terms summed and divided by `pairs`, sft's chosen-token NLL summed and divided
    by `chosen_tokens`. Left None they are this batch's own counts (TRL's loss of the batch); train.py passes the
    whole optimizer step's (all micro-batches and ranks), so accumulation gives the gradient of one big batch."""
    pairs = (s.chosen_tokens > 0).sum() if pairs is None else pairs
    loss = pair_losses(s, beta, terms).sum() / max(float(pairs), 1.0)
    sft = sum(w for name, w in terms if name == "sft")
    if sft:
        tokens = s.chosen_tokens.sum() if chosen_tokens is None else chosen_tokens
        loss = loss + sft * -s.chosen.sum() / max(float(tokens), 1.0)
    return loss


def metric_sums(s: PairScores, beta: float) -> torch.Tensor:
    """METRICS summed over the batch's real pairs [6] (train.py divides the step's sums by its pairs)."""
    real = (s.chosen_tokens > 0).to(s.chosen.dtype)
    r_c, r_r = beta * (s.chosen - s.ref_chosen).detach(), beta * (s.rejected - s.ref_rejected).detach()
    values = torch.stack([r_c, r_r, (r_c > r_r).to(r_c.dtype), r_c - r_r, s.chosen.detach(), s.rejected.detach()])
    return (values * real).sum(1)


def completion_logps(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of the supervised tokens' log-probs per row [R], supervised tokens per row [R]); token t is predicted
    by position t-1. Computed in float32 whatever the logits' dtype."""
    targets = labels[:, 1:]
    mask = targets != IGNORE_INDEX
    logp = torch.log_softmax(logits[:, :-1].float(), -1)
    picked = logp.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (picked * mask).sum(1), mask.sum(1)


# ---- The model train.py prepares in this stage -----------------------------------------------------------------------

@dataclass
class PreferenceOutput:
    loss: torch.Tensor          # preference_loss of the batch (with the step's normalizers when given)
    metrics: torch.Tensor       # metric_sums [6]
    logps: torch.Tensor         # the policy's reply log-prob sums [2B]: chosen rows, then rejected rows
    ref_logps: torch.Tensor     # the reference's [2B]


class PreferenceModel(nn.Module):
    """The policy (a MiniGemini) and its reference, with a forward that returns the preference loss of a pair batch
    (collate_pairs). Its vision side (towers, mining, projector) is frozen (freeze_vision), so the images of a
    batch are encoded once, without a graph, and the chosen rows, the rejected rows and the reference read the same
    features. reference: "adapter" (the policy with its LoRA adapter disabled), "copy" (a frozen copy of the
    starting LLM, made here: call before training) or "precomputed" (the batch carries ref_logps)."""

    def __init__(self, policy, *, beta: float = 0.1, loss_type: str = "sigmoid", reference: str = "auto"):
        super().__init__()
        self.policy, self.beta, self.terms = policy, beta, parse_loss_type(loss_type)
        self.reference = resolve_reference(reference, policy)
        self.reference_llm = None
        if self.reference == "copy":
            self.reference_llm = copy.deepcopy(policy.llm).requires_grad_(False).eval()

    # What train.py, plan.py and checkpoint.py read from the model they train.
    @property
    def llm(self):
        return self.policy.llm

    @property
    def tokens_per_image(self) -> int:
        return self.policy.tokens_per_image

    @property
    def config(self):
        return self.policy.config

    @property
    def _no_split_modules(self) -> list[str]:
        return self.policy._no_split_modules

    def image_settings(self) -> dict:
        return self.policy.image_settings()

    def train(self, mode: bool = True):
        super().train(mode)
        if self.reference_llm is not None:
            self.reference_llm.eval()      # a frozen reference never drops out
        return self

    def save_pretrained(self, path, tokenizer=None, weights: str = "auto", state_dict=None):
        """The policy's export (the reference copy is not part of it)."""
        if state_dict is not None:
            state_dict = {k.removeprefix("policy."): v for k, v in state_dict.items() if k.startswith("policy.")}
        self.policy.save_pretrained(path, tokenizer, weights=weights, state_dict=state_dict)

    def forward(self, input_ids, attention_mask, labels, images=None, images_aux=None, image_counts=None,
                ref_logps=None, num_items_in_batch=None, **ignored) -> PreferenceOutput:
        """num_items_in_batch: (pairs, chosen reply tokens) of the whole optimizer step, or None (this batch's)."""
        policy = self.policy
        with torch.no_grad():   # the vision side is frozen: one encoding serves chosen, rejected and reference
            if images is not None:
                feats = policy.encode_images(images, images_aux)
                feats = torch.cat([feats, feats])     # rows are [chosen; rejected]: the images in that order twice
            else:
                feats = None
                if self.training:   # every rank runs the same modules (ZeRO-3 / FSDP gather collectives)
                    policy.encode_images(*policy.dummy_images(input_ids.device))
        logps, counts = self.row_logps(policy.llm, input_ids, attention_mask, labels, feats)
        if self.reference == "precomputed":
            if ref_logps is None:
                raise ValueError("reference 'precomputed': the batch has no ref_logps (precompute_reference)")
            ref = ref_logps.to(logps)
        else:
            with torch.no_grad():
                if self.reference == "adapter":
                    with policy.llm.disable_adapter():
                        ref, _ = self.row_logps(policy.llm, input_ids, attention_mask, labels, feats)
                else:
                    ref, _ = self.row_logps(self.reference_llm, input_ids, attention_mask, labels, feats)
        b = len(logps) // 2
        scores = PairScores(logps[:b], logps[b:], ref[:b], ref[b:], counts[:b], counts[b:])
        pairs, tokens = (None, None) if num_items_in_batch is None else num_items_in_batch
        loss = preference_loss(scores, self.beta, self.terms, pairs=pairs, chosen_tokens=tokens)
        return PreferenceOutput(loss, metric_sums(scores, self.beta), logps.detach(), ref.detach())

    def row_logps(self, llm, input_ids, attention_mask, labels, feats):
        """(reply log-prob sums, reply tokens) per row, the image features spliced in at the placeholders."""
        from model import splice
        text = llm.get_input_embeddings()(input_ids.clamp(min=0))
        out = splice(input_ids, text, None if feats is None else feats.to(text.dtype), attention_mask, labels)
        inputs = dict(inputs_embeds=out["inputs_embeds"], attention_mask=out["attention_mask"],
                      position_ids=out["position_ids"], use_cache=False)
        if self.policy.config.attention == "mmca":
            inputs["mm_image_mask"] = out["image_mask"]
        return completion_logps(llm(**inputs).logits, out["labels"])


def resolve_reference(reference: str, policy) -> str:
    """"auto": the disabled adapter under LoRA / QLoRA, else a frozen copy."""
    lora = hasattr(policy.llm, "disable_adapter") and hasattr(policy.llm, "peft_config")
    if reference not in REFERENCES:
        raise UserError(f"reference must be one of {', '.join(REFERENCES)}, not {reference!r}")
    if reference == "auto":
        return "adapter" if lora else "copy"
    if reference == "adapter" and not lora:
        raise UserError("reference 'adapter' needs LoRA adapters (tune: lora or qlora); with tune: full use "
                        "reference copy or precomputed")
    return reference


def freeze_vision(model) -> None:
    """The dpo stage trains the LLM (all of it, or its LoRA adapters) only: towers, mining and projector stay as
    the starting model has them, so their output is the reference's too and one encoding serves all rows."""
    for module in (model.vision_tower, model.vision_tower_aux, model.mining, model.projector):
        if module is not None:
            module.requires_grad_(False)


def step_normalizer(window: list[dict]) -> torch.Tensor:
    """(real pairs, chosen reply tokens) of this rank's micro-batches; train.py sums it over ranks."""
    pairs = tokens = 0
    for batch in window:
        b = len(batch["input_ids"]) // 2
        chosen = (batch["labels"][:b, 1:] != IGNORE_INDEX).sum(1)
        pairs, tokens = pairs + int((chosen > 0).sum()), tokens + int(chosen.sum())
    return torch.tensor([pairs, tokens])


# ---- Data: pairs from preference records ---------------------------------------------------------------------------

def tokenize_pair(prompt: list[dict], chosen: str, rejected: str, tokenizer, template, max_length=None, *,
                  image_token_len: int = 1, num_images: int | None = None) -> dict:
    """prompt turns (ending with the user's) + each reply -> {"chosen": {input_ids, labels}, "rejected": ...}:
    tokenized as data.tokenize_conversation does (same ids as supervised training and as inference), then every
    position before the reply masked, so earlier assistant turns of a multi-turn prompt do not count. The prompt's
    ids are the inference prompt's (data.tokenize_prompt), a prefix of both rows by construction; checked."""
    try:
        prompt_ids = tokenize_prompt(prompt, tokenizer, template, num_images=num_images).tolist()
    except ConversationError as e:
        raise BadSample(e.kind, str(e)) from None
    out = {}
    for name, reply in (("chosen", chosen), ("rejected", rejected)):
        row = tokenize_conversation([*prompt, {"from": "gpt", "value": reply}], tokenizer, template, max_length,
                                    image_token_len=image_token_len, num_images=num_images)
        n = len(prompt_ids)
        if row["input_ids"][:n].tolist() != prompt_ids:
            raise BadSample("tokenization mismatch", f"the {name} row does not start with the prompt's ids")
        row["labels"][:n] = IGNORE_INDEX
        if not (row["labels"] != IGNORE_INDEX).any():
            raise BadSample("too long", f"the {name} reply is cut off entirely by max_length={max_length}")
        out[name] = row
    return out


def collate_pairs(samples: list[dict], pad_token_id: int) -> dict:
    """Pair samples -> one batch of 2B right-padded rows, [chosen x B ; rejected x B], and each pair's images ONCE
    (images [N, V, 3, S, S]: pair order, as data.collate): PreferenceModel uses them for both rows. image_counts
    is per row (2B), so the placeholders of all rows add up to it. ids: the B pair ids; ref_logps [2B] when the
    samples carry precomputed reference log-probs; skipped: [(id, reason)] as data.collate."""
    skipped = [(s["id"], s["skipped"]) for s in samples if "skipped" in s]
    kept = [s for s in samples if "skipped" not in s]
    if not kept:   # every pair was unusable: one padding pair with nothing to learn keeps the ranks in step
        pad = {"input_ids": torch.tensor([pad_token_id]), "labels": torch.tensor([IGNORE_INDEX])}
        kept = [{"id": None, "chosen": pad, "rejected": pad, "images": None, "images_aux": None}]
    rows = [s["chosen"] for s in kept] + [s["rejected"] for s in kept]
    width = max(len(r["input_ids"]) for r in rows)
    input_ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        n = len(r["input_ids"])
        input_ids[i, :n], labels[i, :n], mask[i, :n] = r["input_ids"], r["labels"], 1
    images = [s["images"] for s in kept if s["images"] is not None]
    aux = [s["images_aux"] for s in kept if s.get("images_aux") is not None]
    counts = torch.tensor([0 if s["images"] is None else len(s["images"]) for s in kept], dtype=torch.long)
    batch = {"input_ids": input_ids, "labels": labels, "attention_mask": mask,
             "images": torch.cat(images) if images else None, "images_aux": torch.cat(aux) if aux else None,
             "image_counts": torch.cat([counts, counts]), "ids": [s["id"] for s in kept if s["id"] is not None],
             "skipped": skipped}
    if "ref_logps" in kept[0]:
        batch["ref_logps"] = torch.cat([torch.stack([s["ref_logps"][0] for s in kept]),
                                        torch.stack([s["ref_logps"][1] for s in kept])])
    return batch
