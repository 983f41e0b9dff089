"""One training step's pieces, shared by train.py (the loop) and plan.py (its memory, measured on fake tensors):
the tokenizer, the model of a stage with exactly its trainables, the optimizer and its parameter groups, and the
forward / backward of one optimizer step's micro-batches with the loss normalized over the whole step.

Neither train.py nor plan.py is imported here, so both import this room and not each other (train.py hands --plan
over to plan.py).
"""
from __future__ import annotations

import math
from functools import partial

import torch
from transformers import AutoTokenizer

import data
import dpo
import model as mgm
from conversation import IGNORE_INDEX, IMAGE_TOKEN_INDEX
from images import anyres_tokens
from refs import check_model_ref
from settings import TrainArguments, parse_lr_multi

# Why a run stops early, in the order of the step's stop votes (train.StopRequests fills them).
STOP_REASONS = ("SIGTERM", "SIGUSR1", "SIGINT", "max_time")


# ---- The model of a stage ------------------------------------------------------------------------------------------

def load_tokenizer(path: str):
    """The tokenizer of the LLM (or of the export a run starts from), with a pad token."""
    check_model_ref(path, "llm", kind="tokenizer")
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:  # Llama/Vicuna ship none; padding is masked out of attention and loss anyway
        tokenizer.pad_token = tokenizer.unk_token or tokenizer.eos_token
    return tokenizer


def build(model_args, args: TrainArguments, tokenizer, device=None, upcast_trainables=True):
    """The model with exactly this run's parameters trainable (stage table, LoRA, switches), trainables in fp32
    (upcast_trainables): the optimizer updates fp32 weights, and compute precision is accelerate's business.
    FSDP2 upcasts trainables itself and DeepSpeed keeps its own fp32 master copy: there, upcasting here would only
    cost host memory (28 GB for a 7B LLM, per process)."""
    return set_trainables(mgm.build_model(model_args, tokenizer, device=device), args, upcast_trainables)


def set_trainables(model, args: TrainArguments, upcast_trainables=True):
    """LoRA / QLoRA adapters, the stage table, the switches, trainables in fp32 (see build)."""
    if args.tune in ("lora", "qlora"):
        model = mgm.apply_lora(model, r=args.lora_r, alpha=args.lora_alpha, dropout=args.lora_dropout)
    stage = "finetune" if args.stage == "dpo" else args.stage   # dpo: finetune's LLM, its vision side frozen
    mgm.set_stage(model, stage, tune_vision_tower=args.tune_vision_tower,
                  tune_vision_tower_aux=args.tune_vision_tower_aux, print_fn=None)
    apply_switches(model, args)
    if args.stage == "dpo":
        dpo.freeze_vision(model)
    for p in model.parameters() if upcast_trainables else []:
        if p.requires_grad and p.dtype in (torch.bfloat16, torch.float16):
            p.data = p.data.float()
    return model


def apply_switches(model, args: TrainArguments) -> None:
    """What trains beyond model.set_stage's table: the MGM / DeepSpeed-VisualChat switches."""
    if args.freeze_projector:
        model.projector.requires_grad_(False)
    if args.train_embeddings:  # the LLM's blocks stay frozen; its token embeddings and output head train
        model.llm.requires_grad_(False)
        for emb in (model.llm.get_input_embeddings(), model.llm.get_output_embeddings()):
            emb.weight.requires_grad_(True)
    if args.tune_vision_tower:  # the last half of the CLIP layers that feed the selected hidden state
        model.vision_tower.tune_last_layers()
    if args.tune_vision_tower_aux:  # the HR tower's last stage
        model.vision_tower_aux.tune_last_stage()


def make_optimizer(model, args: TrainArguments) -> torch.optim.Optimizer:
    return torch.optim.AdamW(param_groups(model, args), betas=(args.adam_beta1, args.adam_beta2))


def param_groups(model, args: TrainArguments) -> list[dict]:
    """AdamW groups: projector, mining and towers get their own lr; norms and biases no weight decay."""
    projector_lr = args.projector_lr or args.learning_rate
    own_lr = {}
    for module, lr in [(model.projector, projector_lr), (model.mining, args.mining_lr or projector_lr),
                       (model.vision_tower, args.vision_tower_lr), (model.vision_tower_aux, args.vision_tower_lr)]:
        for p in module.parameters() if module is not None and lr else []:
            own_lr[id(p)] = lr
    multipliers = parse_lr_multi(args.lr_multi)
    groups: dict[tuple[float, float], list] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        lr = own_lr.get(id(p), args.learning_rate)
        for key, factor in multipliers:
            lr *= factor if key in name else 1.0
        decay = 0.0 if p.ndim < 2 or "norm" in name.lower() else args.weight_decay
        groups.setdefault((lr, decay), []).append(p)
    return [{"params": ps, "lr": lr, "weight_decay": wd} for (lr, wd), ps in groups.items()]


# ---- One optimizer step ------------------------------------------------------------------------------------------

def collate_fn(tokenizer, pairs: bool = False):
    """The DataLoader's collate_fn: padded (or packed) samples, or preference pairs (the dpo stage)."""
    return partial(data.collate_pairs if pairs else data.collate, pad_token_id=tokenizer.pad_token_id)


def forward_backward(accelerator, model, window: list[dict], num_items: torch.Tensor,
                     stop=None, metrics: list | None = None) -> tuple[float, int, int, str | None]:
    """Accumulate the gradient of one optimizer step over `window` (this rank's micro-batches). `stop`: train.py's
    StopRequests, whose votes() ride on the step's all-reduce (None: no votes, as in plan.py).

    Returns (loss of the step over all ranks, LLM tokens, samples, why the run stops after this step or None).
    Each micro-batch loss is its token-loss sum divided by the supervised tokens of the whole step on all ranks;
    `accelerator.backward` divides by G and DDP/FSDP average over ranks, so scaling by G * world size makes the
    gradient exactly that of one big batch. The step's totals and every rank's stop requests travel in one
    all-reduce, so a signal that reached one rank stops all of them after this same step, at no extra collective.
    `metrics`, a list, receives the step's sums of the model's own metrics (the dpo stage's dpo.METRICS), all ranks.
    """
    scale = accelerator.gradient_accumulation_steps * accelerator.num_processes
    inner = accelerator.unwrap_model(model)
    step_loss = torch.zeros((), device=accelerator.device)
    tokens = samples = 0
    extra = None
    for batch in window:
        with accelerator.accumulate(model):  # every rank runs every micro-batch: data.py never hands an empty
            # one, and the model runs its vision path on text-only batches too (DDP / FSDP stay in step)
            out = model(**model_inputs(batch, accelerator.device), num_items_in_batch=num_items)
            accelerator.backward(out.loss * scale)
        step_loss += out.loss.detach().float()
        if metrics is not None:
            extra = out.metrics.detach().double() + (0 if extra is None else extra)
        tokens += int(batch["attention_mask"].sum()) + int((image_load(inner, batch)[0] - 1).sum())
        samples += len(batch["ids"])  # packed rows hold several samples
    assert accelerator.sync_gradients, "an optimizer step must end on a gradient-synchronising micro-batch"
    # One all-reduce for the step's totals and every rank's stop votes (float64 holds these counts exactly).
    votes = stop.votes() if stop is not None else [0] * len(STOP_REASONS)
    local = torch.tensor([tokens, samples, *votes], dtype=torch.float64, device=accelerator.device)
    extra = [] if extra is None else [extra]
    loss, tokens, samples, *rest = accelerator.reduce(torch.cat([step_loss.double()[None], local, *extra]),
                                                      "sum").tolist()
    votes = rest[:len(STOP_REASONS)]
    if metrics is not None:
        metrics[:] = rest[len(STOP_REASONS):]
    reason = next((why for why, n in zip(STOP_REASONS, votes) if n), None)
    return loss, int(tokens), int(samples), reason


def supervised_tokens(accelerator, window: list[dict]) -> torch.Tensor:
    """Supervised tokens of one optimizer step, all micro-batches and ranks: the loss normalizer."""
    local = sum(int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in window)  # the LLM loss shifts by one
    return accelerator.reduce(torch.tensor(local, device=accelerator.device), reduction="sum")


def image_load(model, batch: dict) -> tuple[torch.Tensor, float]:
    """(LLM positions of each image placeholder of a batch, in order; the images' tower work in whole images of
    model.num_views views): tokens_per_image each, or for AnyRes (the batch carries image_sizes) each image's own
    count from its size, its views (1 + rows * cols) lying back to back in batch["images"]."""
    placeholders = int(batch["image_counts"].sum())
    if batch.get("image_sizes") is None or not getattr(model, "pinpoints", None):
        return torch.full((placeholders,), model.tokens_per_image), float(placeholders)
    tile, patches = model.vision_tower.image_size, math.isqrt(model.vision_tower.num_patches)
    counts = [anyres_tokens(tuple(size), model.pinpoints, tile, patches, model.config.anyres_max_tiles)
              for size in batch["image_sizes"].tolist()]
    if 2 * len(counts) == placeholders:   # a pair batch (data.collate_pairs): each image serves both rows of its pair
        counts = counts * 2
    return torch.tensor(counts, dtype=torch.long), batch["images"].shape[0] / model.num_views


def sample_lengths(batch: dict, tokens_per_image: int | torch.Tensor) -> torch.Tensor:
    """LLM positions of every sample of a batch after the splice (an image placeholder becomes tokens_per_image
    positions, or its own count: image_load's, in placeholder order): one sample per padded row; packed rows split
    where their position ids restart (the padding tail is a sample of length 0)."""
    ids, mask = batch["input_ids"], batch["attention_mask"]
    weight = mask.long().clone()
    placeholders = (ids == IMAGE_TOKEN_INDEX) & mask.bool()
    weight[placeholders] = tokens_per_image if isinstance(tokens_per_image, int) else tokens_per_image.to(ids.device)
    starts = batch["position_ids"] == 0 if "position_ids" in batch else torch.zeros_like(ids, dtype=torch.bool)
    starts[:, 0] = True
    sample = starts.flatten().cumsum(0) - 1
    return torch.zeros(int(sample[-1]) + 1, dtype=torch.long).index_add_(0, sample, weight.flatten())


def model_inputs(batch: dict, device) -> dict:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()
            if k not in ("ids", "skipped")}
