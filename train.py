"""Train Mini-Gemini with one hand-written Accelerate loop.

    accelerate launch --config_file accelerate_configs/multi_gpu.yaml train.py recipes/mgm_7b_pretrain.yaml
    accelerate launch --config_file accelerate_configs/single_gpu.yaml train.py recipes/mgm_7b_qlora_finetune.yaml \
        --output_dir runs/qlora --resume auto

The recipe (YAML) comes first; any field of ModelArguments (model.py), DataArguments (data.py) or TrainArguments
(below) can follow it on the command line and wins. Reading order: arguments, main (setup, then the loop), helpers.
Loss scaling: every micro-batch loss is (sum of its token losses) / (supervised tokens of the whole optimizer step,
all micro-batches and ranks), so accumulation and data parallelism give exactly the gradient of one big batch.
"""
from __future__ import annotations

import dataclasses
import fcntl
import json
import math
import os
import re
import resource
import shutil
import socket
import sys
import time
import uuid
import zipfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial

import accelerate
import torch
import yaml
from accelerate import Accelerator
from accelerate.utils import (DistributedDataParallelKwargs, DistributedType, InitProcessGroupKwargs,
                              broadcast_object_list, gather_object, is_tensorboard_available, is_wandb_available,
                              parse_flag_from_env, set_seed)
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm
from transformers import AutoTokenizer, HfArgumentParser

import conversation
import data
import model as mgm
import vision
from data import IGNORE_INDEX


@dataclass
class TrainArguments:
    output_dir: str = "runs/mgm"         # checkpoints, metrics.jsonl, tracker logs: one run's, see start_run
    overwrite_output_dir: bool = False   # delete another run's files in output_dir first (else: refuse to start)
    export_dir: str = ""                 # the final export; default: <output_dir>/export
    stage: str = "finetune"              # pretrain (projector + mining) | finetune (LLM too), see model.set_stage
    tune: str = "full"                   # full | lora | qlora (qlora needs bits 4 or 8 in the model arguments)
    lora_r: int = 64
    lora_alpha: int = 16
    lora_dropout: float = 0.05
    # Switches on top of the stage (MGM / DeepSpeed-VisualChat): what else trains, what does not.
    freeze_projector: bool = False       # keep the projector as loaded (pretrained_mm_path); mining still trains
    train_embeddings: bool = False       # freeze the LLM but train its token embeddings and lm_head (DS-VisualChat)
    tune_vision_tower: bool = False      # last half of the CLIP layers that feed the selected layer
    tune_vision_tower_aux: bool = False  # the HR tower's last stage
    # Optimizer and schedule: AdamW, linear warmup then cosine to zero, stepped once per optimizer step.
    learning_rate: float = 2e-5
    projector_lr: float | None = None    # default: learning_rate
    mining_lr: float | None = None       # default: projector_lr
    vision_tower_lr: float | None = None  # default: learning_rate
    lr_multi: str = ""                   # "name:factor,...": lr *= factor for parameters whose name contains name
    weight_decay: float = 0.0            # never applied to norms and biases
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    warmup_ratio: float = 0.03
    max_grad_norm: float = 1.0           # <= 0: no clipping (the norm is still logged)
    per_device_batch_size: int = 4
    gradient_accumulation_steps: int = 1
    num_epochs: float = 1.0
    max_steps: int = -1                  # > 0: overrides num_epochs
    seed: int = 42
    num_workers: int = 4
    # Logging, evaluation, checkpoints.
    logging_steps: int = 1
    peak_tflops: float = 0.0             # one device's peak (dense bf16) for MFU; 0: from PEAK_BF16_TFLOPS by GPU name
    report_to: str = "tensorboard"       # comma list of accelerate trackers (tensorboard, wandb), or "none"
    eval_data_path: str = ""             # held-out records (same format as data_path): eval loss every eval_steps
    eval_steps: int = 0                  # 0: only at the end
    save_steps: int = 500
    save_total_limit: int = 2
    resume: str = ""                     # "auto": newest complete checkpoint in output_dir; or a checkpoint dir.
    #   A resumed run may change only the settings in RESUMABLE (length, reporting, saving); the rest must match.
    max_bad_steps: int = 3               # stop after this many non-finite steps in a row
    max_skip_fraction: float = 0.1       # stop when more of the records seen so far were unusable (checked from 50)
    ddp_find_unused_parameters: bool = True  # text-only batches leave projector and mining without gradients


def parse_args(argv: list[str] | None = None):
    """(model_args, data_args, train_args) from `recipe.yaml [--field value ...]`; the command line wins."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0].endswith((".yaml", ".yml")):
        with open(argv.pop(0)) as f:
            argv = recipe_to_argv(yaml.safe_load(f) or {}) + argv
    # "resolve": a field two of the dataclasses share would be one option that sets both.
    parser = HfArgumentParser((mgm.ModelArguments, data.DataArguments, TrainArguments), allow_abbrev=False)
    *arg_objects, unknown = parser.parse_args_into_dataclasses(args=argv, return_remaining_strings=True)
    if unknown:  # no prefix abbreviations either: --max_step is not --max_steps
        raise SettingsError(f"unknown setting(s) {' '.join(unknown)}: the fields are listed by train.py --help")
    return tuple(arg_objects)


def main(argv: list[str] | None = None) -> str:
    """Run one training stage; returns the export directory."""
    model_args, data_args, args = parse_args(argv)
    config = resolved_config(model_args, data_args, args)
    check_args(model_args, args, data_args)  # every setting, before anything is loaded
    check_paths(model_args, data_args, args)
    accelerator = make_accelerator(args)
    if accelerator.gradient_accumulation_steps != args.gradient_accumulation_steps:  # an accelerate config's value wins
        raise ValueError(f"the accelerate config sets gradient_accumulation_steps="
                         f"{accelerator.gradient_accumulation_steps}; set it in the recipe only")
    accelerator.print(f"distributed: {accelerator.distributed_type}{engine_detail(accelerator)}, "
                      f"{accelerator.num_processes} process(es), mixed precision: {accelerator.mixed_precision}")
    set_seed(args.seed)  # identical initialisation of new modules on every rank
    run, ckpt = start_run(accelerator, args, config)  # output_dir is this run's; the checkpoint to resume from

    # Model, trainable parameters, data.
    tokenizer = load_tokenizer(model_args.llm)
    quantized = model_args.bits in (4, 8)  # each process loads its 4/8-bit LLM straight onto its own device
    sharded = accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED)
    with full_weights_at_build(accelerator):
        model = build(model_args, args, tokenizer, device=accelerator.device if quantized else None,
                      upcast_trainables=not sharded)
    accelerator.print(mgm.trainable_table(model))
    flops = mgm.train_flops(model)  # before prepare: ZeRO-3 / FSDP may shard what it reads
    with accelerator.main_process_first():
        dataset = data.build_dataset(data_args, tokenizer, model.image_settings(), model.tokens_per_image)
        eval_set = data.build_dataset(dataclasses.replace(data_args, data_path=args.eval_data_path), tokenizer,
                                      model.image_settings(), model.tokens_per_image) if args.eval_data_path else None
    loader = train_loader(dataset, data_args, args, tokenizer, accelerator)
    G = args.gradient_accumulation_steps
    per_epoch = loader.batch_sampler.batches_per_epoch
    total_steps = args.max_steps if args.max_steps > 0 else int(args.num_epochs * per_epoch) // G
    if total_steps < 1:
        raise ValueError(f"no optimizer step to take: {per_epoch} batches per rank per epoch, accumulation {G}")
    warmup = math.ceil(args.warmup_ratio * total_steps)

    optimizer = torch.optim.AdamW(param_groups(model, args), betas=(args.adam_beta1, args.adam_beta2))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, partial(lr_at, peak=1.0, warmup=warmup, total=total_steps))
    ds_plugin = accelerator.state.deepspeed_plugin
    if ds_plugin is not None:  # DeepSpeed reads the batch from a prepared loader (ours is not one) and clips itself
        ds_plugin.deepspeed_config.update(train_micro_batch_size_per_gpu=args.per_device_batch_size,
                                          gradient_clipping=max(args.max_grad_norm, 0.0))
        # ZeRO-3 keeps parameters below this size whole on every rank. accelerate sets 10 x hidden size for a
        # transformers model, but cannot read a hidden size from ours; DeepSpeed's own default is 1e5 elements.
        zero = ds_plugin.deepspeed_config["zero_optimization"]
        if zero.get("stage3_param_persistence_threshold", "auto") == "auto":
            zero["stage3_param_persistence_threshold"] = 10 * model.llm.config.get_text_config().hidden_size
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    state = TrainState(num_processes=accelerator.num_processes)
    accelerator.register_for_checkpointing(state)
    checkpoint_trainables_only(accelerator)
    eval_loader = None if eval_set is None else accelerator.prepare(torch.utils.data.DataLoader(
        eval_set, batch_size=1, collate_fn=collate_fn(tokenizer), num_workers=args.num_workers,
        worker_init_fn=data.reuse_freed_memory))
    # Resume: weights of the trainables, optimizer, scheduler, RNG, data position, step and counters.
    if ckpt:
        accelerator.load_state(ckpt, **deepspeed_state_kwargs(accelerator, load=True))
        follow_schedule(scheduler)
        if state.num_processes != accelerator.num_processes:
            raise ValueError(f"{ckpt} was written by {state.num_processes} processes, this run has "
                             f"{accelerator.num_processes}: the data position would not carry over")
        accelerator.print(f"resumed from {ckpt} at step {state.step} (epoch {state.epoch}, "
                          f"batch {state.batch_in_epoch})")
    metrics = MetricsFile(os.path.join(args.output_dir, "metrics.jsonl"), accelerator, after_step=state.step)
    accelerator.init_trackers("mgm", config=flat_scalars(config))
    accelerator.print(f"{total_steps} optimizer steps of {args.per_device_batch_size} x {G} x "
                      f"{accelerator.num_processes} samples ({per_epoch} batches per rank per epoch), "
                      f"warmup {warmup}")

    # The loop: one iteration = one optimizer step over G micro-batches on every rank.
    batches = batch_stream(loader, state)
    empty_steps = 0  # optimizer steps in a row whose batches had nothing to learn
    bar = tqdm(total=total_steps, initial=state.step, disable=not accelerator.is_local_main_process, desc="train")
    say = bar.write if accelerator.is_local_main_process else (lambda message: None)
    peak = peak_flops(accelerator.device, args.peak_tflops)
    accelerator.print(f"model FLOPs for MFU: LLM {flops.llm_per_token / 1e9:.3g} GFLOP/position + "
                      f"{flops.llm_per_pair / 1e6:.3g} MFLOP/pair of positions in a sample, images "
                      f"{flops.per_image / 1e9:.3g} GFLOP each; peak per device: "
                      f"{f'{peak / 1e12:g} TFLOP/s' if peak else 'unknown (--peak_tflops)'}")
    meter = Throughput(peak, accelerator.num_processes)
    per_image = accelerator.unwrap_model(model).tokens_per_image
    model.train()
    while state.step < total_steps:
        window = [next(batches) for _ in range(G)]
        count_skipped_samples(accelerator, state, window, say)
        check_skip_fraction(state, args.max_skip_fraction)
        num_items = supervised_tokens(accelerator, window)
        if num_items == 0:  # every rank agrees (a global count): nothing to learn, so no update and no step
            say(f"step {state.step + 1}: no supervised token in this step's batches, skipped")
            empty_steps += 1
            if empty_steps * G >= per_epoch:  # a whole epoch of batches: the data cannot train anything
                raise RuntimeError(f"{empty_steps * G} batches in a row held no supervised token (skipped samples: "
                                   f"{state.skipped_samples}); check data_path / image_folder / template / max_length")
            continue
        empty_steps = 0
        loss, tokens, samples = forward_backward(accelerator, model, window, num_items)
        state.seen_samples += samples
        grad_norm = accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm if args.max_grad_norm > 0
                                                else float("inf"))  # None under DeepSpeed before its first step
        grad_norm = None if grad_norm is None else float(grad_norm)
        if is_bad(loss, grad_norm, accelerator):  # skip the update; the schedule stays a function of the step
            ids = gather_object([i for b in window for i in b["ids"]])
            if accelerator.distributed_type == DistributedType.DEEPSPEED:  # its engine stepped inside backward
                raise RuntimeError(f"step {state.step + 1}: non-finite loss {loss} / grad norm {grad_norm} under "
                                   f"DeepSpeed, which has already applied the update; sample ids: {ids}")
            state.skipped_steps, state.bad_in_a_row = state.skipped_steps + 1, state.bad_in_a_row + 1
            say(f"step {state.step + 1}: non-finite loss {loss} / grad norm {grad_norm}, update skipped; "
                f"samples: {ids}")
            if state.bad_in_a_row >= args.max_bad_steps:
                raise RuntimeError(f"{state.bad_in_a_row} non-finite steps in a row, the last at step "
                                   f"{state.step + 1}; sample ids of its batch: {ids}")
        else:
            optimizer.step()
            state.bad_in_a_row = 0
        lr = scheduler.get_last_lr()[0]  # the lr this step used (first parameter group)
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        state.step += 1
        bar.update(1)
        meter.add(tokens, samples, flops.of(torch.cat([sample_lengths(b, per_image) for b in window]),
                                            sum(int(b["image_counts"].sum()) for b in window)))

        if state.step % args.logging_steps == 0 or state.step == total_steps:
            rates = meter.rates(lambda t: accelerator.reduce(t.to(accelerator.device), reduction="sum"))
            log = {"loss": loss, "lr": lr, "grad_norm": grad_norm, **rates, "peak_mem_gb": peak_memory_gb(),
                   "epoch": state.epoch, "skipped_steps": state.skipped_steps}
            bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}")
            mfu = (f"MFU {log['mfu_llm']:.1%} LLM-only, {log['mfu_all']:.1%} all" if "mfu_llm" in log
                   else "MFU unknown (--peak_tflops)")
            say(f"step {state.step}/{total_steps} | loss {loss:.4f} | lr {lr:.3e} | grad norm {grad_norm or 0:.3f} | "
                f"{log['tokens_per_s']:.0f} tok/s | {log['samples_per_s']:.2f} samples/s | "
                f"peak mem {log['peak_mem_gb']:.2f} GB | {mfu}")
            accelerator.log(log, step=state.step)
            metrics.write(state.step, log)
        if eval_loader is not None and (state.step == total_steps or
                                        args.eval_steps > 0 and state.step % args.eval_steps == 0):
            eval_loss, eval_skipped = evaluate(accelerator, model, eval_loader)
            note = f" ({eval_skipped} unusable eval records skipped)" if eval_skipped else ""
            if eval_loss is None:  # never a loss of 0 for a set that could not be evaluated
                say(f"step {state.step} | eval skipped: no usable record in {args.eval_data_path}{note}")
            else:
                say(f"step {state.step} | eval loss {eval_loss:.4f}{note}")
                accelerator.log({"eval_loss": eval_loss}, step=state.step)
                metrics.write(state.step, {"eval_loss": eval_loss})
        if state.step % args.save_steps == 0 or state.step == total_steps:
            save_checkpoint(accelerator, args.output_dir, state.step, config, args.save_total_limit, run)
    bar.close()
    if state.skipped_samples:
        accelerator.print(f"skipped samples by kind: {state.skipped_samples}")

    export_dir = args.export_dir or os.path.join(args.output_dir, "export")
    export(accelerator, model, tokenizer, export_dir, config, model_args.dtype)
    accelerator.print(f"exported to {export_dir}")
    # Release the wrapped model (DDP reducer, DeepSpeed engine, FSDP hooks) before the process group goes: left to
    # interpreter exit, gloo's threads can be torn down mid-flight ("terminate called...", exit code -6).
    del model, optimizer, scheduler, eval_loader
    accelerator.free_memory()
    accelerator.end_training()  # trackers, then destroy_process_group
    release_output_dir(args.output_dir)
    return export_dir


# ---- Arguments -----------------------------------------------------------------------------------------------------

def recipe_to_argv(recipe: dict) -> list[str]:
    """A flat YAML mapping as command-line options (an unknown key is an argparse error, as on the command line)."""
    argv = []
    for key, value in recipe.items():
        if value is None:
            continue
        if isinstance(value, bool):
            value = str(value).lower()
        argv += [f"--{key}", *map(str, value)] if isinstance(value, list) else [f"--{key}", str(value)]
    return argv


def resolved_config(*arg_objects) -> dict:
    """One flat mapping of every field: a valid recipe, saved with every checkpoint and export."""
    config = {}
    for obj in arg_objects:
        config.update(dataclasses.asdict(obj))
    return config


class SettingsError(ValueError):
    """A setting, path or output_dir that cannot work: reported as one line (no traceback) before anything loads."""


def check_args(model_args, args: TrainArguments, data_args=None) -> None:
    """Every setting against its allowed range: the first one out of range is named, with the range. Pure (no
    file is read), so a recipe can be checked anywhere; check_paths looks at the files."""
    for name, value, ok, allowed in setting_ranges(model_args, args, data_args):
        if not ok:
            raise SettingsError(f"{name}: {value!r} is out of range, allowed: {allowed}")
    parse_lr_multi(args.lr_multi)
    bits = model_args.bits
    if (args.tune == "qlora") != (bits in (4, 8)):
        raise ValueError(f"tune={args.tune} with bits={bits}: qlora needs bits 4 or 8, and a quantized LLM "
                         "can only be trained through LoRA adapters")
    if args.train_embeddings and (args.stage, args.tune) != ("finetune", "full"):
        raise ValueError("train_embeddings needs stage=finetune, tune=full (only a full export holds embeddings)")
    if args.tune != "full" and args.stage != "finetune":
        raise ValueError("LoRA / QLoRA adapters are a finetune-stage option")


def setting_ranges(model_args, args: TrainArguments, data_args=None) -> list[tuple[str, object, bool, str]]:
    """(setting, value, in range?, the allowed range) for every setting with a range."""
    a, m = args, model_args
    optional_lr = "unset or > 0"
    rules = [
        ("stage", a.stage, a.stage in ("pretrain", "finetune"), "pretrain | finetune"),
        ("tune", a.tune, a.tune in ("full", "lora", "qlora"), "full | lora | qlora"),
        ("learning_rate", a.learning_rate, a.learning_rate > 0, "> 0"),
        ("projector_lr", a.projector_lr, a.projector_lr is None or a.projector_lr > 0, optional_lr),
        ("mining_lr", a.mining_lr, a.mining_lr is None or a.mining_lr > 0, optional_lr),
        ("vision_tower_lr", a.vision_tower_lr, a.vision_tower_lr is None or a.vision_tower_lr > 0, optional_lr),
        ("weight_decay", a.weight_decay, a.weight_decay >= 0, ">= 0"),
        ("adam_beta1", a.adam_beta1, 0 <= a.adam_beta1 < 1, "[0, 1)"),
        ("adam_beta2", a.adam_beta2, 0 <= a.adam_beta2 < 1, "[0, 1)"),
        ("warmup_ratio", a.warmup_ratio, 0 <= a.warmup_ratio <= 1, "[0, 1] (a fraction of the steps)"),
        ("per_device_batch_size", a.per_device_batch_size, a.per_device_batch_size >= 1, ">= 1"),
        ("gradient_accumulation_steps", a.gradient_accumulation_steps, a.gradient_accumulation_steps >= 1, ">= 1"),
        ("max_steps", a.max_steps, a.max_steps == -1 or a.max_steps >= 1, "-1 (use num_epochs) or >= 1"),
        ("num_epochs", a.num_epochs, a.max_steps >= 1 or a.num_epochs > 0, "> 0"),
        ("logging_steps", a.logging_steps, a.logging_steps >= 1, ">= 1"),
        ("eval_steps", a.eval_steps, a.eval_steps >= 0, ">= 0 (0: only at the end)"),
        ("save_steps", a.save_steps, a.save_steps >= 1, ">= 1"),
        ("save_total_limit", a.save_total_limit, a.save_total_limit >= 1, ">= 1 (the newest checkpoint is kept)"),
        ("max_bad_steps", a.max_bad_steps, a.max_bad_steps >= 1, ">= 1"),
        ("max_skip_fraction", a.max_skip_fraction, 0 <= a.max_skip_fraction < 1,
         "[0, 1) (1 would train on nothing when every record is bad)"),
        ("num_workers", a.num_workers, a.num_workers >= 0, ">= 0"),
        ("lora_r", a.lora_r, a.lora_r >= 1, ">= 1"),
        ("lora_alpha", a.lora_alpha, a.lora_alpha > 0, "> 0"),
        ("lora_dropout", a.lora_dropout, 0 <= a.lora_dropout < 1, "[0, 1)"),
        ("bits", m.bits, m.bits in (16, 8, 4), "16 | 8 | 4"),
        ("dtype", m.dtype, m.dtype in ("bfloat16", "float16", "float32"), "bfloat16 | float16 | float32"),
        ("projector", m.projector, vision.is_projector(m.projector),
         "linear | mlp<N>x_gelu | perceiver | vit, or pool2x_ before one"),
        ("mm_vision_select_feature", m.mm_vision_select_feature, m.mm_vision_select_feature in ("patch", "cls_patch"),
         "patch | cls_patch"),
        ("image_grid", m.image_grid, m.image_grid >= 1, ">= 1"),
        ("image_size_aux", m.image_size_aux, m.image_size_aux >= 1, ">= 1"),
        ("perceiver_queries", m.perceiver_queries, m.perceiver_queries >= 1, ">= 1"),
        ("projector_heads", m.projector_heads, m.projector_heads >= 1, ">= 1"),
    ]
    if data_args is not None:
        d = data_args
        templates = sorted(conversation.TEMPLATES) + ["auto"]
        rules += [
            ("template", d.template, d.template in templates, " | ".join(templates)),
            ("image_aspect_ratio", d.image_aspect_ratio, d.image_aspect_ratio in ("pad", "resize"), "pad | resize"),
            ("bad_sample", d.bad_sample, d.bad_sample in ("skip", "error"), "skip | error"),
            ("max_length", d.max_length, d.max_length >= 1, ">= 1"),
            ("num_frames", d.num_frames, d.num_frames >= 1, ">= 1"),
            ("max_image_pixels", d.max_image_pixels, d.max_image_pixels >= 1, ">= 1"),
            ("num_proc", d.num_proc, d.num_proc is None or d.num_proc >= 1, "unset or >= 1"),
        ]
    return rules


def parse_lr_multi(text: str) -> list[tuple[str, float]]:
    """lr_multi "name:factor,..." -> [(name, factor)]; a malformed item is named."""
    pairs = []
    for item in (i.strip() for i in text.split(",")):
        name, _, factor = item.partition(":")
        if not item:
            continue
        try:
            value = float(factor)
        except ValueError:
            value = None
        if not name.strip() or value is None or value <= 0:
            raise SettingsError(f"lr_multi: {item!r} is not name:factor with a factor > 0 (e.g. projector:0.1)")
        pairs.append((name.strip(), value))
    return pairs


def check_paths(model_args, data_args, args: TrainArguments) -> None:
    """The files a run reads exist, checked before anything is loaded (a hub name is left to the hub)."""
    for setting in ("llm", "vision_tower", "vision_tower_aux", "pretrained_mm_path"):
        try:
            mgm.check_model_ref(getattr(model_args, setting), setting)
        except FileNotFoundError as e:
            raise SettingsError(str(e)) from None
    for setting, value in (("data_path", data_args.data_path), ("eval_data_path", args.eval_data_path)):
        for path in (p.strip() for p in value.split(",")):
            if path and not os.path.exists(path):
                raise SettingsError(f"{setting}: {path} does not exist (relative to {os.getcwd()})")
    if not os.path.isdir(data_args.image_folder):
        raise SettingsError(f"image_folder: {data_args.image_folder} is not a directory")
    if args.resume not in ("", "auto") and not os.path.isdir(args.resume):
        raise SettingsError(f"resume: {args.resume} is not a checkpoint directory (or pass --resume auto)")
    export_dir = args.export_dir or os.path.join(args.output_dir, "export")
    if os.path.isdir(export_dir) and os.listdir(export_dir) and \
            not os.path.exists(os.path.join(export_dir, mgm.CONFIG_NAME)):
        raise SettingsError(f"export_dir: {export_dir} holds other files (no {mgm.CONFIG_NAME}); the export "
                            "replaces the directory, so choose an empty or new one")


def make_accelerator(args: TrainArguments) -> Accelerator:
    """The Accelerator for the engine the launched accelerate config names (`accelerate launch` exports it as
    ACCELERATE_USE_DEEPSPEED / ACCELERATE_USE_FSDP), or a clear error: never a silent fallback to another engine.
    Without an accelerator, accelerate 1.15 runs several CPU processes only with cpu=True, and DeepSpeed only with
    cpu=False; DeepSpeed on CPU then needs the gloo backend named, or each rank becomes a one-process run."""
    wanted = requested_engine()
    on_cpu = not has_accelerator()
    handlers = [DistributedDataParallelKwargs(find_unused_parameters=args.ddp_find_unused_parameters)]
    deepspeed_on_cpu = on_cpu and wanted == DistributedType.DEEPSPEED
    if deepspeed_on_cpu:
        handlers.append(InitProcessGroupKwargs(backend="gloo"))
    accelerator = Accelerator(
        cpu=on_cpu and not deepspeed_on_cpu,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        step_scheduler_with_optimizer=False,  # we step it once per optimizer step, not once per process
        log_with=trackers(args.report_to), project_dir=args.output_dir, kwargs_handlers=handlers,
    )
    running = accelerator.distributed_type
    if wanted is not None and running != wanted:
        why = (f"accelerate {accelerate.__version__} selects FSDP only on GPU-like devices, and this machine has "
               "none" if wanted == DistributedType.FSDP and on_cpu else "see accelerate's log above")
        raise RuntimeError(f"the accelerate config asks for {wanted.name}, but accelerate set up {running.name} "
                           f"on {accelerator.device}: {why}. Use a config for the engine this machine can run "
                           "(multi_gpu.yaml runs DDP, also on CPU).")
    ds_plugin = accelerator.state.deepspeed_plugin
    if ds_plugin is not None and ds_plugin.zero3_init_flag:
        raise ValueError("zero3_init_flag: true is not supported: model.py builds the model with full weights (new "
                         "image-token rows, stage freezing) and prepare() partitions them; set it to false")
    return accelerator


def requested_engine() -> DistributedType | None:
    """DEEPSPEED or FSDP when the launched accelerate config asks for it, else None (DDP or one process)."""
    if parse_flag_from_env("ACCELERATE_USE_DEEPSPEED"):
        return DistributedType.DEEPSPEED
    if parse_flag_from_env("ACCELERATE_USE_FSDP"):
        return DistributedType.FSDP
    return None


def engine_detail(accelerator) -> str:
    """" (ZeRO-2)" / " (FSDP2)" after the distributed type on the start-up line."""
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        return f" (ZeRO-{accelerator.state.deepspeed_plugin.zero_stage})"
    if accelerator.distributed_type == DistributedType.FSDP:
        return f" (FSDP{accelerator.state.fsdp_plugin.fsdp_version})"
    return ""


@contextmanager
def full_weights_at_build(accelerator):
    """Build the model with full, unpartitioned weights, as every engine does: accelerate registers a ZeRO-3 config
    with transformers even with zero3_init_flag false, and from_pretrained would then load inside
    deepspeed.zero.Init (partitioned weights; a different random-number stream for the new modules)."""
    ds_plugin = accelerator.state.deepspeed_plugin
    if ds_plugin is None:
        yield
        return
    from transformers.integrations import unset_hf_deepspeed_config
    unset_hf_deepspeed_config()
    try:
        yield
    finally:
        ds_plugin.set_deepspeed_weakref()  # back for prepare / save, as accelerate left it


def has_accelerator() -> bool:
    return torch.accelerator.is_available() if hasattr(torch, "accelerator") else torch.cuda.is_available()


def load_tokenizer(path: str):
    mgm.check_tokenizer_dir(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:  # Llama/Vicuna ship none; padding is masked out of attention and loss anyway
        tokenizer.pad_token = tokenizer.unk_token or tokenizer.eos_token
    return tokenizer


def trackers(report_to: str) -> list[str]:
    wanted = [t.strip() for t in report_to.split(",") if t.strip() and t.strip() != "none"]
    available = {"tensorboard": is_tensorboard_available(), "wandb": is_wandb_available()}
    missing = [t for t in wanted if not available.get(t, True)]  # unknown names: let accelerate complain
    if missing:
        raise ValueError(f"report_to asks for {missing}, not installed: pip install {' '.join(missing)} "
                         "or set report_to: none")
    return wanted or None


def flat_scalars(config: dict) -> dict:
    """Trackers (tensorboard hparams) accept only scalars."""
    return {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in config.items()}


# ---- Parameters and schedule ---------------------------------------------------------------------------------------

def lr_at(step: int, *, peak: float, warmup: int, total: int) -> float:
    """Linear warmup, then cosine decay to zero."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * peak * (1 + math.cos(math.pi * progress))


def build(model_args, args: TrainArguments, tokenizer, device=None, upcast_trainables=True):
    """The model with exactly this run's parameters trainable (stage table, LoRA, switches), trainables in fp32
    (upcast_trainables): the optimizer updates fp32 weights, and compute precision is accelerate's business.
    FSDP2 upcasts trainables itself and DeepSpeed keeps its own fp32 master copy: there, upcasting here would only
    cost host memory (28 GB for a 7B LLM, per process)."""
    model = mgm.build_model(model_args, tokenizer, device=device)
    if args.tune in ("lora", "qlora"):
        model = mgm.apply_lora(model, r=args.lora_r, alpha=args.lora_alpha, dropout=args.lora_dropout)
    mgm.set_stage(model, args.stage, tune_vision_tower=args.tune_vision_tower,
                  tune_vision_tower_aux=args.tune_vision_tower_aux, print_fn=None)
    apply_switches(model, args)
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


# ---- Data ----------------------------------------------------------------------------------------------------------

def collate_fn(tokenizer):
    return partial(data.collate, pad_token_id=tokenizer.pad_token_id)


def train_loader(dataset, data_args, args: TrainArguments, tokenizer, accelerator) -> torch.utils.data.DataLoader:
    """This rank's batches. data.py's sampler is rank-aware (so accelerate must not shard it again) and each epoch's
    order is a pure function of (seed, epoch); resume starts it at a batch index without loading what it skips.
    The loader's own generator keeps the global RNG untouched, so resuming does not shift dropout masks."""
    sampler = data.build_sampler(dataset, data_args, args.per_device_batch_size, seed=args.seed,
                                 num_replicas=accelerator.num_processes, rank=accelerator.process_index)
    if args.num_workers == 0:           # this process decodes the images itself
        data.reuse_freed_memory()
    return torch.utils.data.DataLoader(
        dataset, batch_sampler=sampler, collate_fn=collate_fn(tokenizer), num_workers=args.num_workers,
        pin_memory=torch.cuda.is_available(), generator=torch.Generator().manual_seed(args.seed),
        worker_init_fn=data.reuse_freed_memory)


@dataclass
class TrainState:
    """Everything about the run's progress that is not a tensor; saved with every checkpoint."""
    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0      # batches of this epoch already consumed (by every rank)
    skipped_steps: int = 0       # non-finite steps whose update was skipped
    bad_in_a_row: int = 0
    skipped_samples: dict = field(default_factory=dict)  # unusable records dropped by data.py, by kind
    seen_samples: int = 0        # usable samples trained on
    num_processes: int = 1       # the data position is per rank: a resume needs the same process count

    def state_dict(self) -> dict:
        return dataclasses.asdict(self)

    def load_state_dict(self, d: dict) -> None:
        for k, v in d.items():
            setattr(self, k, v)


def batch_stream(loader, state: TrainState):
    """Batches forever, epoch after epoch, from the position in `state`; the position advances as batches are
    handed out, so between two optimizer steps it is exactly what a checkpoint must record."""
    while True:
        loader.batch_sampler.set_epoch(state.epoch, start_batch=state.batch_in_epoch)
        for batch in loader:
            state.batch_in_epoch += 1
            yield batch
        state.epoch, state.batch_in_epoch = state.epoch + 1, 0


# ---- One optimizer step --------------------------------------------------------------------------------------------

def forward_backward(accelerator, model, window: list[dict], num_items: torch.Tensor) -> tuple[float, int, int]:
    """Accumulate the gradient of one optimizer step over `window` (this rank's micro-batches).

    Returns (loss of the step over all ranks, LLM tokens, samples). Each micro-batch loss is its token-loss sum
    divided by the supervised tokens of the whole step on all ranks; `accelerator.backward` divides by G and DDP/FSDP
    average over ranks, so scaling by G * world size makes the gradient exactly that of one big batch.
    """
    scale = accelerator.gradient_accumulation_steps * accelerator.num_processes
    per_image = accelerator.unwrap_model(model).tokens_per_image
    step_loss = torch.zeros((), device=accelerator.device)
    tokens = samples = 0
    for batch in window:
        with accelerator.accumulate(model):  # every rank runs every micro-batch: data.py never hands an empty
            # one, and the model runs its vision path on text-only batches too (DDP / FSDP stay in step)
            loss = model(**model_inputs(batch, accelerator.device), num_items_in_batch=num_items).loss
            accelerator.backward(loss * scale)
        step_loss += loss.detach().float()
        tokens += int(batch["attention_mask"].sum()) + int(batch["image_counts"].sum()) * (per_image - 1)
        samples += len(batch["ids"])  # packed rows hold several samples
    assert accelerator.sync_gradients, "an optimizer step must end on a gradient-synchronising micro-batch"
    loss = accelerator.reduce(step_loss, reduction="sum").item()
    counts = accelerator.reduce(torch.tensor([tokens, samples], device=accelerator.device), reduction="sum")
    return loss, int(counts[0]), int(counts[1])


def supervised_tokens(accelerator, window: list[dict]) -> torch.Tensor:
    """Supervised tokens of one optimizer step, all micro-batches and ranks: the loss normalizer."""
    local = sum(int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in window)  # the LLM loss shifts by one
    return accelerator.reduce(torch.tensor(local, device=accelerator.device), reduction="sum")


def check_skip_fraction(state: TrainState, limit: float) -> None:
    """A wrong image_folder or template makes every record unusable: stop instead of training on nothing."""
    skipped = sum(state.skipped_samples.values())
    seen = skipped + state.seen_samples
    if seen >= 50 and skipped > limit * seen:
        raise RuntimeError(f"{skipped} of the {seen} records seen so far were unusable ({state.skipped_samples}); "
                           "check data_path / image_folder / template, or raise max_skip_fraction")


def is_bad(loss: float, grad_norm: float | None, accelerator) -> bool:
    """A non-finite loss, or non-finite gradients (under fp16 those are the grad scaler's business: it skips)."""
    if not math.isfinite(loss):
        return True
    return grad_norm is not None and not math.isfinite(grad_norm) and accelerator.mixed_precision != "fp16"


def count_skipped_samples(accelerator, state: TrainState, window: list[dict], say) -> None:
    """Records data.py dropped (bad_sample="skip"), gathered from every rank so the counters in the checkpoint
    are global."""
    for record_id, reason in gather_object([s for b in window for s in b["skipped"]]):
        kind = data.reason_kind(reason)
        state.skipped_samples[kind] = state.skipped_samples.get(kind, 0) + 1
        say(f"skipped record {record_id}: {reason}")


class Throughput:
    """Tokens (LLM positions, images expanded), samples and model FLOPs per second since the last log line, and
    MFU = model FLOPs / (seconds x peak FLOP/s of all devices), for the LLM alone (what published MFU figures of
    vision-language finetunes count) and for all parts. Tokens and samples arrive as counts over all processes,
    FLOPs as this process's own: they are summed over processes once per log line rather than once per step."""

    def __init__(self, peak_flops: float | None = None, num_processes: int = 1):  # peak of one device, or None
        self.peak, self.num_processes = peak_flops, num_processes
        self.reset()

    def reset(self) -> None:
        self.start, self.tokens, self.samples = time.time(), 0, 0
        self.flops = [0.0, 0.0]   # this process's model FLOPs: LLM, all parts

    def add(self, tokens: int, samples: int, flops: tuple[float, float] = (0.0, 0.0)) -> None:
        self.tokens, self.samples = self.tokens + tokens, self.samples + samples
        self.flops = [self.flops[0] + flops[0], self.flops[1] + flops[1]]

    def rates(self, sum_over_processes=lambda t: t) -> dict:
        seconds = max(time.time() - self.start, 1e-9)
        llm, every = sum_over_processes(torch.tensor(self.flops, dtype=torch.float32)).tolist()
        per_device = seconds * self.num_processes
        rates = {"tokens_per_s": self.tokens / seconds, "samples_per_s": self.samples / seconds,
                 "model_tflops_per_device": every / per_device / 1e12}
        if self.peak:   # unknown peak (CPU, an unlisted GPU): no MFU rather than a made-up one
            rates.update(mfu_llm=llm / per_device / self.peak, mfu_all=every / per_device / self.peak)
        self.reset()
        return rates


def sample_lengths(batch: dict, tokens_per_image: int) -> torch.Tensor:
    """LLM positions of every sample of a batch after the splice (an image placeholder becomes tokens_per_image
    positions): one sample per padded row; packed rows split where their position ids restart (the padding tail
    is a sample of length 0)."""
    ids, mask = batch["input_ids"], batch["attention_mask"]
    weight = (1 + (tokens_per_image - 1) * (ids == data.IMAGE_TOKEN_INDEX).long()) * mask
    starts = batch["position_ids"] == 0 if "position_ids" in batch else torch.zeros_like(ids, dtype=torch.bool)
    starts[:, 0] = True
    sample = starts.flatten().cumsum(0) - 1
    return torch.zeros(int(sample[-1]) + 1, dtype=torch.long).index_add_(0, sample, weight.flatten())


# Peak dense bf16 tensor-core FLOP/s of one device (vendors' data sheets: FP32 accumulate, no sparsity), matched
# against the CUDA device name in this order. --peak_tflops overrides it (an unlisted GPU, other precisions).
PEAK_BF16_TFLOPS = [(r"\bB200", 2250), (r"GH200", 989), (r"H200 NVL", 835), (r"\bH200", 989), (r"H100 NVL", 835),
                    (r"H[18]00 PCIe", 756), (r"\bH[18]00\b", 989), (r"\bA[18]00\b", 312), (r"\bL40S\b", 362),
                    (r"\bL40\b", 181), (r"\bL4\b", 121), (r"\bA10\b", 125), (r"RTX 4090", 165),
                    (r"RTX 3090(?! Ti)", 71), (r"MI300X", 1307)]


def peak_flops(device: torch.device, override_tflops: float = 0.0) -> float | None:
    """One device's peak FLOP/s: the override if given, else PEAK_BF16_TFLOPS by the GPU's name; None when
    unknown (a CPU, an unlisted GPU), and then MFU is not reported."""
    if override_tflops > 0:
        return override_tflops * 1e12
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((tflops * 1e12 for pattern, tflops in PEAK_BF16_TFLOPS if re.search(pattern, name)), None)


def model_inputs(batch: dict, device) -> dict:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()
            if k not in ("ids", "skipped")}


@torch.no_grad()
def evaluate(accelerator, model, eval_loader) -> tuple[float | None, int]:
    """(mean token loss over the held-out set, unusable records skipped); the loss is None when no record was
    usable. One sample per forward, so duplicates from even sharding drop out."""
    model.eval()
    totals = []
    for batch in eval_loader:
        out = model(**model_inputs(batch, accelerator.device), num_items_in_batch=1)  # the sum of token losses
        n = (batch["labels"][:, 1:] != IGNORE_INDEX).sum()
        totals.append(torch.tensor([[out.loss.float().item(), n.item(), len(batch["skipped"])]],
                                   device=accelerator.device))
    model.train()
    loss, tokens, skipped = accelerator.gather_for_metrics(torch.cat(totals)).sum(0).tolist()
    return (loss / tokens if tokens else None), int(skipped)


def peak_memory_gb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux: the process's peak RSS


class MetricsFile:
    """metrics.jsonl in the output dir, one line per log; on resume, lines after the checkpoint's step are dropped,
    and so is a torn last line (a crash in the middle of a write), with a note."""

    def __init__(self, path: str, accelerator, after_step: int):
        self.path, self.main = path, accelerator.is_main_process
        if self.main and os.path.exists(path):
            kept = kept_metrics(path, after_step, say=accelerator.print)
            with open(path, "w") as f:
                f.writelines(kept)

    def write(self, step: int, values: dict) -> None:
        if self.main:
            with open(self.path, "a") as f:
                f.write(json.dumps({"step": step, **values}) + "\n")


def kept_metrics(path: str, after_step: int, say=print) -> list[str]:
    """The lines of a metrics file up to `after_step`. Only the last line may be torn; any other bad line is an
    error naming the file and line."""
    with open(path) as f:
        lines = f.read().splitlines()
    kept = []
    for number, line in enumerate(lines, 1):
        try:
            step = json.loads(line)["step"]
        except (json.JSONDecodeError, KeyError, TypeError):
            if number == len(lines):
                say(f"{path}: dropped its torn last line {number} ({line[:40]!r}), left by a crash mid-write")
                continue
            raise ValueError(f"{path}, line {number}: not a metrics record ({line[:60]!r}); fix or delete it") from None
        if step <= after_step:
            kept.append(line + "\n")
    return kept


# ---- Run ownership: one run per output_dir -------------------------------------------------------------------------
# output_dir/run.json records the run's identity (an id and its defining settings); each checkpoint carries a copy.
# A new run refuses a directory holding another run's files (unless --overwrite_output_dir), --resume refuses
# changed defining settings, rotation deletes only this run's older checkpoints, and a lock keeps a second process out.

RUN_FILE = "run.json"
LOCK_FILE = "train.lock"
RUN_ENTRIES = (RUN_FILE, "metrics.jsonl", "export", "export.tmp", "mgm")  # besides checkpoints ("mgm": trackers)
# Settings a resumed run may change: how long it runs and what it reports or saves, not what it learns. An extended
# run (max_steps, num_epochs) follows the schedule of its new length, as if that had been set from the start.
RESUMABLE = ("output_dir", "export_dir", "overwrite_output_dir", "resume", "max_steps", "num_epochs", "logging_steps",
             "report_to", "eval_data_path", "eval_steps", "save_steps", "save_total_limit", "max_bad_steps",
             "max_skip_fraction", "num_workers", "cache_dir", "num_proc", "gradient_checkpointing",
             "ddp_find_unused_parameters")
PATH_SETTINGS = ("llm", "vision_tower", "vision_tower_aux", "pretrained_mm_path", "data_path", "image_folder")
_LOCKS: dict = {}   # lock files this process holds, by path (kept open: the lock lasts as long as the process)


def start_run(accelerator, args: TrainArguments, config: dict) -> tuple[dict, str | None]:
    """The main process takes output_dir for this run (claim_output_dir); every rank gets (run, checkpoint)."""
    answer = list(claim_output_dir(args, config, say=accelerator.print)) if accelerator.is_main_process else [0, 0]
    accelerator.wait_for_everyone()
    run, ckpt = broadcast_object_list(answer)
    return run, ckpt


def claim_output_dir(args: TrainArguments, config: dict, say=print) -> tuple[dict, str | None]:
    """Lock output_dir, check it holds no other run, pick the checkpoint to resume from; returns (run, checkpoint).
    run = {"id", "settings"}: the defining settings, compared on every resume."""
    out = args.output_dir
    os.makedirs(out, exist_ok=True)
    lock_output_dir(out)
    if args.overwrite_output_dir:
        removed = clear_run_files(out)
        if removed:
            say(f"overwrite_output_dir: deleted {', '.join(removed)} from {out}")
    for stale in list_checkpoints(out, complete=False):  # left by a crash in the middle of a save
        shutil.rmtree(stale, ignore_errors=True)
    settings = run_settings(config)
    found = run_files(out)
    if found and not args.resume:
        raise SettingsError(f"output_dir {out} holds another run ({', '.join(found[:3])}"
                            f"{', ...' if len(found) > 3 else ''}): pass --resume auto to continue it, "
                            "--overwrite_output_dir true to delete it first, or choose another output_dir")
    recorded = read_json(os.path.join(out, RUN_FILE))
    if recorded and args.resume:
        refuse_changed_settings(recorded["settings"], settings, f"the run in {out}")
    ckpt = resume_checkpoint(args.resume, out, settings, say) if args.resume else None
    ckpt_run = read_json(os.path.join(ckpt, RUN_FILE)) if ckpt else None
    run_id = (recorded or ckpt_run or {}).get("id") or uuid.uuid4().hex[:12]
    run = {"id": run_id, "settings": settings}
    write_json(os.path.join(out, RUN_FILE), run)
    return run, ckpt


def run_settings(config: dict) -> dict:
    """The settings that define a run: all but RESUMABLE, local paths made absolute (a hub name stays as it is)."""
    settings = {k: v for k, v in config.items() if k not in RESUMABLE}
    for key in PATH_SETTINGS:
        if isinstance(settings.get(key), str):
            settings[key] = ",".join(os.path.abspath(p) if os.path.exists(p) else p
                                     for p in (p.strip() for p in settings[key].split(",")))
    return settings


def changed_settings(before: dict, now: dict) -> list[str]:
    """Defining settings whose values differ (a setting one side does not know, e.g. a newer field, is skipped)."""
    return [k for k in before if k in now and k not in RESUMABLE and before[k] != now[k]]


def refuse_changed_settings(before: dict, now: dict, what: str) -> None:
    changed = changed_settings(before, now)
    if changed:
        diffs = ", ".join(f"{k} ({before[k]!r} -> {now[k]!r})" for k in changed)
        raise SettingsError(f"cannot resume {what}: its defining settings differ: {diffs}. Only "
                            "length, logging, eval and save settings may change; start a new run in another "
                            "output_dir (or --overwrite_output_dir true)")


def resume_checkpoint(resume: str, output_dir: str, settings: dict, say=print) -> str | None:
    """--resume auto: the newest checkpoint that loads completely (each skipped one is named, with why), or None
    to start from step 0; --resume DIR: that checkpoint, or an error. Either way its settings must match."""
    candidates = list_checkpoints(output_dir)[::-1] if resume == "auto" else [resume.rstrip("/")]
    for ckpt in candidates:
        problem = checkpoint_problem(ckpt)
        if problem is None:
            refuse_changed_settings(checkpoint_settings(ckpt), settings, ckpt)
            return ckpt
        if resume != "auto":
            raise SettingsError(f"resume: {ckpt} cannot be loaded: {problem}")
        say(f"resume: skipping {ckpt}: {problem}")
    if candidates:
        say(f"resume: no complete checkpoint in {output_dir}, starting from step 0")
    return None


def checkpoint_settings(ckpt: str) -> dict:
    """The defining settings a checkpoint was written with (its run.json; older checkpoints: train_config.yaml)."""
    recorded = read_json(os.path.join(ckpt, RUN_FILE))
    if recorded:
        return recorded["settings"]
    with open(os.path.join(ckpt, "train_config.yaml")) as f:
        return run_settings(yaml.safe_load(f))


def checkpoint_problem(ckpt: str) -> str | None:
    """Why a checkpoint would not load completely, or None. Every file is checked: required ones exist (the train
    state, the config, the RNG state of every process that wrote it), none is truncated or corrupt."""
    if not os.path.isdir(ckpt):
        return "not a directory"
    files = sorted(os.path.relpath(os.path.join(d, n), ckpt) for d, _, names in os.walk(ckpt) for n in names)
    if not files:
        return "empty directory"
    for name in files:
        problem = file_problem(os.path.join(ckpt, name))
        if problem:
            return f"{name}: {problem}"
    required = ["train_config.yaml", "custom_checkpoint_0.pkl"]
    if "custom_checkpoint_0.pkl" in files:
        try:
            state = torch.load(os.path.join(ckpt, "custom_checkpoint_0.pkl"), weights_only=False)
        except Exception as e:  # noqa: BLE001
            return f"custom_checkpoint_0.pkl: unreadable ({type(e).__name__}: {e})"
        required += [f"random_states_{i}.pkl" for i in range(state.get("num_processes", 1))]
    missing = [name for name in required if name not in files]
    return f"{', '.join(missing)} missing" if missing else None


def file_problem(path: str) -> str | None:
    """A truncated or corrupt file, found cheaply: safetensors by their header's sizes, torch zips by their
    directory (small ones by every CRC too), YAML / JSON by parsing."""
    try:
        if path.endswith(".safetensors"):
            size = os.path.getsize(path)
            with open(path, "rb") as f:
                n = int.from_bytes(f.read(8), "little")
                if 8 + n > size:
                    return f"truncated ({size} bytes, the header alone says {8 + n})"
                header = json.loads(f.read(n))
            end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
            return None if size == 8 + n + end else f"truncated ({size} bytes, the header says {8 + n + end})"
        if path.endswith((".bin", ".pkl", ".pt", ".pth")):
            if not zipfile.is_zipfile(path):
                return "truncated or not a torch.save file"
            with zipfile.ZipFile(path) as z:
                bad = z.testzip() if os.path.getsize(path) < 2**26 else None
            return f"corrupt ({bad})" if bad else None
        if path.endswith((".yaml", ".json")):
            with open(path) as f:
                yaml.safe_load(f) if path.endswith(".yaml") else json.load(f)
    except Exception as e:  # noqa: BLE001 - any failure to read is the answer
        return f"unreadable ({type(e).__name__}: {e})"
    return None


def run_files(output_dir: str) -> list[str]:
    """What a run left in output_dir (checkpoints, metrics, export, run.json), oldest checkpoint first."""
    names = set(os.listdir(output_dir)) if os.path.isdir(output_dir) else set()
    return [os.path.basename(c) for c in list_checkpoints(output_dir)] + sorted(names & set(RUN_ENTRIES))


def clear_run_files(output_dir: str) -> list[str]:
    """Delete what a run writes (never other files in the directory); returns the names deleted."""
    names = run_files(output_dir) + [os.path.basename(t) for t in list_checkpoints(output_dir, complete=False)]
    for name in names:
        path = os.path.join(output_dir, name)
        shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
    return names


def lock_output_dir(output_dir: str) -> None:
    """An exclusive lock on output_dir/train.lock, which names its owner. The kernel drops it when the owner exits,
    however it ends (kill -9 included), so the next run takes it over; a run still going keeps everyone out."""
    path = os.path.realpath(os.path.join(output_dir, LOCK_FILE))
    if path in _LOCKS:  # this process already holds it (an earlier in-process run)
        return
    f = open(path, "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.seek(0)
        owner = f.read().strip() or "another process"
        f.close()
        raise SettingsError(f"output_dir {output_dir} is in use by another run ({owner}, {path}); wait for it "
                            "to end or choose another output_dir") from None
    f.seek(0)
    f.truncate()
    f.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
    f.flush()
    _LOCKS[path] = f


def release_output_dir(output_dir: str) -> None:
    f = _LOCKS.pop(os.path.realpath(os.path.join(output_dir, LOCK_FILE)), None)
    if f is not None:
        f.close()


def read_json(path: str) -> dict | None:
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def write_json(path: str, value: dict) -> None:
    with open(path + ".tmp", "w") as f:
        json.dump(value, f, indent=1)
    os.replace(path + ".tmp", path)


def follow_schedule(scheduler) -> None:
    """After load_state: the next step's lr from this run's schedule. The optimizer stored the lr its old schedule
    chose (0 at the end of a finished run); an extended run continues on the schedule of its new length."""
    inner = getattr(scheduler, "scheduler", scheduler)  # accelerate's wrapper around the LambdaLR
    lrs = [base * fn(inner.last_epoch) for base, fn in zip(inner.base_lrs, inner.lr_lambdas)]
    for group, lr in zip(inner.optimizer.param_groups, lrs):
        group["lr"] = lr
    inner._last_lr = lrs


# ---- Checkpoints and export ----------------------------------------------------------------------------------------

CHECKPOINT = re.compile(r"checkpoint-(\d+)$")


def save_checkpoint(accelerator, output_dir: str, step: int, config: dict, limit: int, run: dict) -> None:
    """accelerator.save_state into checkpoint-XXXXXX.tmp, then one rename: a crash mid-save leaves the previous
    checkpoint whole and this one absent. Rotation keeps this run's newest `limit` checkpoints up to this step."""
    final = os.path.join(output_dir, f"checkpoint-{step:06d}")
    tmp = final + ".tmp"
    try:
        accelerator.save_state(tmp, **deepspeed_state_kwargs(accelerator))
    except (OSError, RuntimeError) as e:  # torch reports a full disk as "enforce fail ... unexpected pos"
        raise RuntimeError(f"writing checkpoint {tmp} failed ({shutil.disk_usage(output_dir).free / 2**30:.2f} GB "
                           f"free there; a full disk?): {e}") from e
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        with open(os.path.join(tmp, "train_config.yaml"), "w") as f:
            yaml.safe_dump(config, f, sort_keys=False)
        write_json(os.path.join(tmp, RUN_FILE), {**run, "step": step})
        if os.path.exists(final):  # re-saving a step after resuming from an older checkpoint
            shutil.rmtree(final)
        os.replace(tmp, final)
        for old in rotated_checkpoints(output_dir, run["id"], step, limit):
            shutil.rmtree(old)
    accelerator.wait_for_everyone()


def rotated_checkpoints(output_dir: str, run_id: str, step: int, limit: int) -> list[str]:
    """This run's checkpoints up to `step` beyond the newest `limit`: others' (older versions, copies) and later
    ones (left by a resume from an earlier checkpoint, overwritten when reached) are never deleted."""
    ours = [c for c in list_checkpoints(output_dir) if int(CHECKPOINT.search(c)[1]) <= step
            and (read_json(os.path.join(c, RUN_FILE)) or {}).get("id") == run_id]
    return ours[:-limit]


def deepspeed_state_kwargs(accelerator, load=False) -> dict:
    """DeepSpeed saves every module weight by default: keep the frozen LLM / towers (rebuilt from the base
    checkpoints) out of each checkpoint."""
    if accelerator.distributed_type != DistributedType.DEEPSPEED:
        return {}
    return {"load_module_strict": False} if load else {"exclude_frozen_parameters": True}


def list_checkpoints(output_dir: str, complete: bool = True) -> list[str]:
    """Complete checkpoints oldest first, or (complete=False) the temp dirs of unfinished saves."""
    names = os.listdir(output_dir) if os.path.isdir(output_dir) else []
    if not complete:
        return [os.path.join(output_dir, n) for n in names if n.startswith("checkpoint-") and n.endswith(".tmp")]
    steps = sorted((int(CHECKPOINT.match(n)[1]), n) for n in names if CHECKPOINT.match(n))
    return [os.path.join(output_dir, n) for _, n in steps]


def checkpoint_trainables_only(accelerator) -> None:
    """save_state/load_state hooks: a checkpoint holds only the trainable weights (frozen towers and a frozen LLM
    come from the base checkpoints when the run is rebuilt), under the unwrapped model's names, so a checkpoint
    also loads into a run with another process count. FSDP and DeepSpeed save their own shards and pass no plain
    weights to these hooks."""
    def save(models, weights, output_dir):
        for i, m in enumerate(models[: len(weights)] if accelerator.is_main_process else []):
            save_file(trainable_state(accelerator.unwrap_model(m)), f"{output_dir}/trainable_{i}.safetensors")
        weights.clear()

    def load(models, input_dir):
        for i, m in enumerate(models):
            m = accelerator.unwrap_model(m)
            saved = load_file(f"{input_dir}/trainable_{i}.safetensors")
            missing = set(trainable_state(m)) - set(saved)
            if missing:
                raise ValueError(f"{input_dir} lacks trainable weights {sorted(missing)[:5]}...: another recipe?")
            m.load_state_dict(saved, strict=False)
        models.clear()

    accelerator.register_save_state_pre_hook(save)
    accelerator.register_load_state_pre_hook(load)


def trainable_state(model) -> dict:
    return {n: p.detach().contiguous() for n, p in model.named_parameters() if p.requires_grad}


def export(accelerator, model, tokenizer, export_dir: str, config: dict, dtype: str) -> None:
    """The final, self-contained export (model.py decides what a stage holds) plus the resolved config.
    FSDP / ZeRO-3 hold shards: their full state dict is gathered on rank 0. Trainables go back to the model dtype."""
    accelerator.wait_for_everyone()
    ds_config = getattr(accelerator.state.deepspeed_plugin, "deepspeed_config", None) or {}
    sharded = accelerator.distributed_type == DistributedType.FSDP or \
        ds_config.get("zero_optimization", {}).get("stage") == 3
    unwrapped = accelerator.unwrap_model(model)
    state_dict = accelerator.get_state_dict(model) if sharded else unwrapped.state_dict()  # a collective if sharded
    if accelerator.is_main_process:
        trainable = {n for n, p in unwrapped.named_parameters(remove_duplicate=False) if p.requires_grad}
        state_dict = {k: v.to(getattr(torch, dtype)) if k in trainable and v.dtype == torch.float32 else v
                      for k, v in state_dict.items()}
        tmp = export_dir.rstrip("/") + ".tmp"  # written whole, then swapped in: no file of an older export stays
        shutil.rmtree(tmp, ignore_errors=True)
        unwrapped.save_pretrained(tmp, tokenizer=tokenizer, state_dict=state_dict)
        with open(os.path.join(tmp, "train_config.yaml"), "w") as f:
            yaml.safe_dump(config, f, sort_keys=False)
        if os.path.exists(export_dir):
            shutil.rmtree(export_dir)  # an earlier export of this run (check_paths refused any other directory)
        os.replace(tmp, export_dir)
    accelerator.wait_for_everyone()


if __name__ == "__main__":
    try:
        main()
    except SettingsError as e:  # a setting or output_dir problem: one line, no traceback
        sys.exit(f"train.py: {e}")
