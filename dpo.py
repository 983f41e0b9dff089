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

Reading order: the losses, the model wrapper train.py prepares (PreferenceModel), the precomputed reference. The
pairs come from records.py (every published preference form) and data.py (PreferenceDataset, tokenize_pair,
collate_pairs).
"""
from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import os
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from cli import UserError
from conversation import IGNORE_INDEX
from model import splice

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
            # in the model's dtype: the starting weights, exactly (set_trainables upcast the trainable ones to fp32)
            self.reference_llm = copy.deepcopy(policy.llm).requires_grad_(False).eval()
            for p in self.reference_llm.parameters():
                p.data = p.data.to(getattr(torch, policy.config.dtype))

    def __getattr__(self, name):
        """What train.py, plan.py and checkpoint.py read from the model they train (tokens_per_image, llm,
        projector, image_settings, ...) is the policy's."""
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("policy"), name)

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
                ref_logps=None, num_items_in_batch=None, image_sizes=None, **ignored) -> PreferenceOutput:
        """num_items_in_batch: (pairs, chosen reply tokens) of the whole optimizer step, or None (this batch's)."""
        policy = self.policy
        with torch.no_grad():   # the vision side is frozen: one encoding serves chosen, rejected and reference
            if images is not None:
                feats = both_rows(policy.encode_images(images, images_aux, image_sizes))
            else:
                feats = None
                if self.training:   # every rank runs the same modules (ZeRO-3 / FSDP gather collectives)
                    policy.encode_images(*policy.dummy_images(input_ids.device))
        logps, counts = self.row_logps(policy.llm, input_ids, attention_mask, labels, feats)
        if self.reference == "precomputed":
            if ref_logps is None and bool(counts.any()):   # (a padding pair of skipped records has none)
                raise ValueError("reference 'precomputed': the batch has no ref_logps (precompute_reference)")
            ref = torch.zeros_like(logps) if ref_logps is None else ref_logps.to(logps)
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

    @torch.no_grad()
    def start_logps(self, input_ids, attention_mask, labels, images=None, images_aux=None, image_sizes=None,
                    **ignored):
        """The starting model's reply log-prob sums per row [2B]: the policy before its first step (under LoRA
        with the adapter disabled), the reference precompute_reference stores."""
        policy = self.policy
        feats = None if images is None else both_rows(policy.encode_images(images, images_aux, image_sizes))
        lora = hasattr(policy.llm, "disable_adapter") and hasattr(policy.llm, "peft_config")
        with policy.llm.disable_adapter() if lora else contextlib.nullcontext():
            return self.row_logps(policy.llm, input_ids, attention_mask, labels, feats)[0]

    def row_logps(self, llm, input_ids, attention_mask, labels, feats):
        return row_logps(self.policy, llm, input_ids, attention_mask, labels, feats)


def row_logps(policy, llm, input_ids, attention_mask, labels, feats, *, shared_prompt: bool = True):
    """(reply log-prob sums, reply tokens) per row of `llm` (the policy's or a reference's), the image features
    spliced in at the placeholders as the policy does. shared_prompt: each pair's prompt (its image positions
    included) runs through the LLM once, its two replies after it (shared_prompt_logps); else every row whole."""
    text = llm.get_input_embeddings()(input_ids.clamp(min=0))
    if feats is not None:
        feats = feats.to(text.dtype) if torch.is_tensor(feats) else [f.to(text.dtype) for f in feats]
    out = splice(input_ids, text, feats, attention_mask, labels)
    if shared_prompt and policy.config.attention != "mmca":
        return shared_prompt_logps(llm, out["inputs_embeds"], out["attention_mask"], out["labels"])
    inputs = dict(inputs_embeds=out["inputs_embeds"], attention_mask=out["attention_mask"],
                  position_ids=out["position_ids"], use_cache=False)
    if policy.config.attention == "mmca":
        inputs["mm_image_mask"] = out["image_mask"]
    return completion_logps(llm(**inputs).logits, out["labels"])


def shared_prompt_logps(llm, embeds, mask, labels):
    """completion_logps of the 2B rows [chosen; rejected] (spliced, right-padded), with each pair's prompt computed
    once: pair i becomes one sequence [prompt + chosen reply, rejected reply] in which the rejected reply attends to
    the prompt and to itself but not to the chosen reply, and takes the positions the chosen reply has (a 4D
    attention mask and explicit position ids; the same attention as two separate rows). Its first token is
    predicted, like the chosen reply's, by the prompt's last position. A prompt (with its image tokens) is most of a
    pair's positions, so the LLM runs on about half of them; the values are those of the rows (tested)."""
    b = len(embeds) // 2
    supervised = labels != IGNORE_INDEX
    first = torch.minimum((~supervised).cumprod(1).sum(1), mask.sum(1))   # where each reply starts (integer ops:
    #                                                                         --plan keeps them real)
    p, n_c, n_r = first[:b], mask[:b].sum(1), mask[b:].sum(1)                             # prompt, row lengths
    if not torch.equal(first[b:], p):
        raise ValueError("a pair's chosen and rejected rows do not share their prompt")
    total = n_c + n_r - p
    width = int(total.max())
    j = torch.arange(width, device=embeds.device)[None]                                  # packed position
    in_chosen, in_rejected = j < n_c[:, None], (j >= n_c[:, None]) & (j < total[:, None])
    rows = torch.arange(b, device=embeds.device)[:, None]
    src_row = torch.where(in_chosen, rows, rows + b)
    src_col = torch.where(in_chosen, j, (j - n_c[:, None] + p[:, None]).clamp(max=embeds.shape[1] - 1))
    src_col = torch.where(in_chosen | in_rejected, src_col, 0)
    packed = embeds[src_row, src_col] * (in_chosen | in_rejected)[..., None]
    position = torch.where(in_chosen | in_rejected, src_col, 0)
    # segments: 0 prompt, 1 chosen reply, 2 rejected reply, 3 padding; a query sees earlier keys of its own segment
    # and the prompt (padding sees earlier padding, so no row of the mask is empty)
    segment = torch.where(j < p[:, None], 0, torch.where(in_chosen, 1, torch.where(in_rejected, 2, 3)))
    causal = j[:, :, None] >= j[:, None, :]
    allowed = causal & ((segment[:, None, :] == 0) | (segment[:, None, :] == segment[:, :, None]))
    bias = torch.zeros(allowed.shape, dtype=embeds.dtype, device=embeds.device)
    bias = bias.masked_fill(~allowed, torch.finfo(embeds.dtype).min)[:, None]
    logits = llm(inputs_embeds=packed, attention_mask=bias, position_ids=position, use_cache=False).logits
    # each reply token's target and the packed position that predicts it
    target = labels[src_row, src_col].masked_fill(~(in_chosen | in_rejected), IGNORE_INDEX)
    predictor = torch.where(in_rejected & (src_col == p[:, None]), p[:, None] - 1, j - 1).clamp(min=0)
    logp = torch.log_softmax(logits.float(), -1)
    picked = logp[rows, predictor].gather(-1, target.clamp(min=0)[..., None]).squeeze(-1)
    keep = target != IGNORE_INDEX
    sums, counts = picked * keep, keep.long()
    chosen = (sums * in_chosen).sum(1), (counts * in_chosen).sum(1)
    rejected = (sums * in_rejected).sum(1), (counts * in_rejected).sum(1)
    return torch.cat([chosen[0], rejected[0]]), torch.cat([chosen[1], rejected[1]])


@torch.no_grad()
def reply_logps(model, input_ids, attention_mask, labels, images=None, images_aux=None, image_sizes=None,
                **ignored) -> torch.Tensor:
    """A MiniGemini's reply log-prob sums for the rows of a pair batch [2B] (each pair's images encoded once):
    what eval.py compares between a tuned export and its reference."""
    feats = None if images is None else both_rows(model.encode_images(images, images_aux, image_sizes))
    return row_logps(model, model.llm, input_ids, attention_mask, labels, feats)[0]


def both_rows(feats):
    """The features of a pair batch's images (in pair order) for its rows [chosen; rejected]: that order twice.
    [N, K, H] or, AnyRes, a list of N [K_i, H]."""
    return torch.cat([feats, feats]) if torch.is_tensor(feats) else feats + feats


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


def pair_rows(batch: dict) -> dict:
    """A collated batch of 2B one-image rows, all images of one layout -> the pair batch of those rows (chosen = the
    first B, rejected = the rest) with the first B images (AnyRes: the first half of the views, HR tiles and
    sizes): what --plan traces for the dpo stage."""
    b = len(batch["input_ids"]) // 2
    images = {k: None if batch.get(k) is None else batch[k][:len(batch[k]) // 2]
              for k in ("images", "images_aux", "image_sizes")}
    return {**batch, **images, "ids": batch["ids"][:b]}


def freeze_vision(model) -> None:
    """The dpo stage trains the LLM (all of it, or its LoRA adapters) only: towers, mining and projector stay as
    the starting model has them, so their output is the reference's too and one encoding serves all rows."""
    for module in (model.vision_tower, model.vision_tower_aux, model.mining, model.projector):
        if module is not None:
            module.requires_grad_(False)


def step_normalizer(accelerator, window: list[dict]) -> torch.Tensor:
    """(real pairs, chosen reply tokens) of one optimizer step, all micro-batches and ranks: the loss normalizers
    (train.py's supervised_tokens in this stage)."""
    pairs = tokens = 0
    for batch in window:
        b = len(batch["input_ids"]) // 2
        chosen = (batch["labels"][:b, 1:] != IGNORE_INDEX).sum(1)
        pairs, tokens = pairs + int((chosen > 0).sum()), tokens + int(chosen.sum())
    return accelerator.reduce(torch.tensor([pairs, tokens], device=accelerator.device), reduction="sum")


def pair_flops(flops, batch: dict, placeholder_positions: torch.Tensor, model) -> tuple[float, float]:
    """flops.of_pairs of one pair batch, as PreferenceModel computes it: lengths after the splice (each image
    placeholder of a row becomes placeholder_positions, step.image_load's), the prompt once per pair unless mmca runs
    whole rows, the pair's images once, the reference forward unless precomputed."""
    b = len(batch["input_ids"]) // 2
    mask, labels = batch["attention_mask"].cpu(), batch["labels"].cpu()
    first = torch.minimum((labels == IGNORE_INDEX).cumprod(1).sum(1), mask.sum(1))    # where each reply starts
    row = torch.repeat_interleave(torch.arange(len(mask)), batch["image_counts"].cpu())
    extra = torch.zeros(len(mask), dtype=torch.long).index_add_(0, row, placeholder_positions.cpu().long() - 1)
    prompt, reply = first + extra, mask.sum(1) - first        # the images are the prompt's
    if model.config.attention == "mmca":                      # whole rows: no prompt shared
        prompt, reply = torch.zeros_like(prompt), prompt + reply
    images = int(batch["image_counts"][:b].sum())
    return flops.of_pairs(prompt[:b], reply[:b], reply[b:], images, model.reference != "precomputed")


def log_values(sums: list[float], pairs: int) -> dict:
    """The step's METRICS, from forward_backward's summed metric_sums and the step's pairs."""
    return {name: value / max(pairs, 1) for name, value in zip(METRICS, sums)}


def check_settings(args, data_args=None) -> None:
    """The dpo stage's settings, before anything loads (settings.check_args calls this)."""
    parse_loss_type(args.loss_type)
    if args.reference == "adapter" and args.tune == "full":
        raise UserError("reference adapter with tune full: the disabled adapter is the reference only under "
                        "tune lora / qlora; use reference copy or precomputed")
    if args.reference == "copy" and args.tune == "qlora":
        raise UserError("reference copy with tune qlora: a quantized LLM is not copied; use reference adapter "
                        "(the default) or precomputed")
    for switch in ("tune_vision_tower", "tune_vision_tower_aux", "train_embeddings"):
        if getattr(args, switch):
            raise UserError(f"{switch} with stage dpo: the dpo stage trains the LLM alone (its vision side is the "
                            "reference's, encoded once per pair); set it to false")
    if data_args is not None and data_args.packing:
        raise UserError("packing with stage dpo: pairs are padded rows (a pair's two rows share its images); "
                        "set packing: false")


# ---- The precomputed reference -------------------------------------------------------------------------------------

REFERENCE_FILE = "reference_logps.pt"


def precompute_reference(accelerator, policy, dataset, path: str, fingerprint: dict, *, batch_size: int,
                         say=print, chunk_batches: int = 16) -> torch.Tensor:
    """The reference log-probs of every pair, [len(dataset), 2] (chosen, rejected; float64; NaN for an unusable
    record), computed in one pass with the starting model (the policy before its first step; under LoRA with the
    adapter disabled), each pair's images encoded once. Every rank computes its share of each chunk; the main
    process writes the file after each chunk, so an interrupted pass resumes where it stopped. A file made for
    other data or another model is refused, naming what differs."""
    n = len(dataset)
    values, done = torch.full((n, 2), float("nan"), dtype=torch.float64), torch.zeros(n, dtype=torch.bool)
    if os.path.exists(path):
        saved = torch.load(path, weights_only=True)
        changed = [k for k in sorted(set(fingerprint) | set(saved["fingerprint"]))
                   if fingerprint.get(k) != saved["fingerprint"].get(k)]
        if changed:
            raise UserError(f"{path} holds reference log-probs of another {' and '.join(changed)}; delete it (or "
                            "use another output_dir) to compute them again")
        values, done = saved["values"], saved["done"]
    todo = (~done).nonzero().flatten().tolist()
    if not todo:
        return values
    say(f"reference log-probs: {n - len(todo)} of {n} pairs done, computing the rest")
    from data import collate_pairs
    pad = getattr(dataset.tokenizer, "pad_token_id", 0) or 0
    scorer = PreferenceModel(policy, reference="precomputed").eval()
    world, rank = accelerator.num_processes, accelerator.process_index
    step = batch_size * world * chunk_batches
    for start in range(0, len(todo), step):
        mine = todo[start:start + step][rank::world]
        found = []
        for i in range(0, len(mine), batch_size):
            indices = mine[i:i + batch_size]
            samples = [dataset[j] for j in indices]
            kept = [j for j, s in zip(indices, samples) if "skipped" not in s]
            if kept:
                batch = collate_pairs([s for s in samples if "skipped" not in s], pad)
                rows = scorer.start_logps(**{k: v.to(accelerator.device) if torch.is_tensor(v) else v
                                             for k, v in batch.items()}).double().cpu()
                found += [(j, float(c), float(r)) for j, c, r in zip(kept, rows[:len(kept)], rows[len(kept):])]
            found += [(j, float("nan"), float("nan")) for j, s in zip(indices, samples) if "skipped" in s]
        from accelerate.utils import gather_object
        for j, c, r in gather_object(found) if world > 1 else found:
            values[j] = torch.tensor([c, r], dtype=torch.float64)
        done[todo[start:start + step]] = True
        if accelerator.is_main_process:
            tmp = path + ".tmp"
            torch.save({"fingerprint": fingerprint, "values": values, "done": done}, tmp)
            os.replace(tmp, path)
        accelerator.wait_for_everyone()
    say(f"reference log-probs of {n} pairs written to {path}")
    return values


def fingerprint(model_args, data_args, policy) -> dict:
    """What the precomputed reference depends on: the data (each source's path, size and mtime, the record
    converter, template, length and image settings) and the starting model (its settings and a checksum of every
    weight, read before training)."""
    from records import converter_fingerprint
    sources = []
    for path in (p.strip() for p in data_args.data_path.split(",") if p.strip()):
        stat = os.stat(path)
        sources.append([os.path.abspath(path), stat.st_size, stat.st_mtime_ns])
    data = dict(sources=sources, converter=converter_fingerprint(), template=data_args.template,
                max_length=data_args.max_length, image_aspect_ratio=data_args.image_aspect_ratio,
                image_settings=policy.image_settings())
    digest = hashlib.sha256()
    with torch.no_grad():
        for name, p in policy.named_parameters():
            if "lora_" not in name:   # fresh adapters are not part of the starting model (disabled anyway)
                digest.update(name.encode())
                digest.update(repr([float(p.double().sum()), float(p.double().abs().sum())]).encode())
    settings = {k: v for k, v in vars(model_args).items() if k != "gradient_checkpointing"}
    return {"data": hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest(),
            "model": hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()
                                    + digest.digest()).hexdigest()}


# ---- Held-out pairs ------------------------------------------------------------------------------------------------

@torch.no_grad()
def evaluate(accelerator, model, loader) -> dict:
    """Preference metrics of held-out pairs (one pair per forward, so even sharding's duplicates drop out):
    eval_loss (the mean per-pair loss), eval_rewards/accuracies, eval_rewards/margins, ...; {} when no pair was
    usable."""
    model.eval()
    rows = []
    for batch in loader:
        batch = {k: v for k, v in batch.items() if k not in ("ids", "skipped")}
        out = model(**batch)
        real = float((batch["labels"][0, 1:] != IGNORE_INDEX).any())
        rows.append(torch.cat([torch.tensor([out.loss.item() * real, real]), out.metrics.cpu().float()])[None])
    model.train()
    sums = accelerator.gather_for_metrics(torch.cat(rows).to(accelerator.device)).sum(0).tolist()
    pairs = sums[1]
    if not pairs:
        return {}
    return {"eval_loss": sums[0] / pairs, **{f"eval_{k}": v for k, v in log_values(sums[2:], int(pairs)).items()}}
