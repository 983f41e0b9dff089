"""Train Mini-Gemini with one hand-written Accelerate loop.

    accelerate launch --config_file accelerate_configs/multi_gpu.yaml train.py recipes/mgm_7b_pretrain.yaml
    accelerate launch --config_file accelerate_configs/single_gpu.yaml train.py recipes/mgm_7b_qlora_finetune.yaml \
        --output_dir runs/qlora --resume auto

The recipe (YAML) comes first; any field of ModelArguments (model.py), DataArguments (data.py) or TrainArguments
(settings.py, which reads and checks them all) can follow it on the command line and wins; `train.py --help` lists
them. Reading order: main (setup, then the loop), then its helpers: engine, model, data, stopping early, the step.
A run's files (output_dir, checkpoints, export) are checkpoint.py's; `--plan` hands over to plan.py.
Loss scaling: every micro-batch loss is (sum of its token losses) / (supervised tokens of the whole optimizer step,
all micro-batches and ranks), so accumulation and data parallelism give exactly the gradient of one big batch.
"""
from __future__ import annotations

import dataclasses
import math
import os
import resource
import signal
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial

import accelerate
import torch
from accelerate import Accelerator
from accelerate.utils import (DistributedDataParallelKwargs, DistributedType, InitProcessGroupKwargs,
                              gather_object, is_tensorboard_available, is_wandb_available,
                              parse_flag_from_env, set_seed)
from tqdm.auto import tqdm

import checkpoint
import data
import dpo
import model as mgm
from cli import UserError, run
from conversation import IGNORE_INDEX
from flops import Throughput, peak_flops
from settings import TrainArguments, check_args, check_paths, duration_seconds, parse_args, resolved_config
from step import (STOP_REASONS, apply_switches, build, collate_fn, forward_backward,  # noqa: F401 - train.X
                  image_load, load_tokenizer, make_optimizer, model_inputs, param_groups, sample_lengths,
                  set_trainables, supervised_tokens)


def main(argv: list[str] | None = None) -> str | None:
    """Run one training stage. Returns the export directory; "" after --plan (nothing trained); None when the run
    stopped early, by a signal or --max_time, with a checkpoint at its last step (or, before the first step, none):
    as a command it then exits with status STOPPED, and --resume auto continues it."""
    model_args, data_args, args = parse_args(argv)
    config = resolved_config(model_args, data_args, args)
    check_args(model_args, args, data_args)  # every setting, before anything is loaded
    if args.plan:  # rank 0 plans for the launched processes, the others leave at once: no process group, no files
        import plan
        plan.main(model_args, data_args, args)
        return ""
    check_paths(model_args, data_args, args)
    with StopRequests(max_time=duration_seconds(args.max_time)) as stop:
        try:
            return run_stage(model_args, data_args, args, config, stop)
        except Stopped as e:  # a signal before the first step: nothing trained, nothing to save
            if os.environ.get("LOCAL_RANK", "0") == "0":   # once per machine, as accelerator.print would
                print(f"stopped by {e.reason} before the first step: no checkpoint written; start the same command "
                      "again (with --resume auto it continues from the newest checkpoint, if any)", flush=True)
            return None
        finally:
            checkpoint.release_output_dir(args.output_dir)  # the kernel would at exit; in-process runs need it now


def run_stage(model_args, data_args, args: TrainArguments, config: dict, stop: StopRequests) -> str | None:
    """main, once the settings are checked: setup, the loop, the export."""
    accelerator = make_accelerator(args)
    if accelerator.gradient_accumulation_steps != args.gradient_accumulation_steps:  # an accelerate config's value wins
        raise UserError(f"the accelerate config sets gradient_accumulation_steps="
                        f"{accelerator.gradient_accumulation_steps}; set it in the recipe only")
    accelerator.print(f"distributed: {accelerator.distributed_type}{engine_detail(accelerator)}, "
                      f"{accelerator.num_processes} process(es), mixed precision: {accelerator.mixed_precision}")
    set_seed(args.seed)  # identical initialisation of new modules on every rank
    run, ckpt = checkpoint.start_run(accelerator, args, config)  # output_dir is this run's; the checkpoint to resume from

    # Model, trainable parameters, data.
    tokenizer = load_tokenizer(model_args.init_from or model_args.llm)  # an export holds its own tokenizer
    quantized = model_args.bits in (4, 8)  # each process loads its 4/8-bit LLM straight onto its own device
    sharded = accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED)
    with full_weights_at_build(accelerator):
        model = build(model_args, args, tokenizer, device=accelerator.device if quantized else None,
                      upcast_trainables=not sharded)
    accelerator.print(mgm.trainable_table(model))
    flops = mgm.train_flops(model)  # before prepare: ZeRO-3 / FSDP may shard what it reads
    pairs = args.stage == "dpo"     # preference pairs (dpo.py): the same loop, a pair model and pair batches
    with accelerator.main_process_first():
        dataset = data.build_dataset(data_args, tokenizer, model.image_settings(), model.tokens_per_image, pairs=pairs)
        eval_set = data.build_dataset(dataclasses.replace(data_args, data_path=args.eval_data_path), tokenizer,
                                      model.image_settings(), model.tokens_per_image,
                                      pairs=pairs) if args.eval_data_path else None
    if pairs and args.reference == "precomputed":   # one pass of the starting model, before anything trains
        for name, part, path in (("", dataset, data_args.data_path), ("eval_", eval_set, args.eval_data_path)):
            if part is not None:
                part.reference = dpo.precompute_reference(
                    accelerator, model if quantized else model.to(accelerator.device), part,
                    os.path.join(args.output_dir, name + dpo.REFERENCE_FILE),
                    dpo.fingerprint(model_args, dataclasses.replace(data_args, data_path=path), model),
                    batch_size=args.per_device_batch_size, say=accelerator.print)
    loader = train_loader(dataset, data_args, args, tokenizer, accelerator)
    G = args.gradient_accumulation_steps
    per_epoch = loader.batch_sampler.batches_per_epoch
    total_steps = args.max_steps if args.max_steps > 0 else int(args.num_epochs * per_epoch) // G
    if total_steps < 1:
        raise UserError(f"no optimizer step to take: {per_epoch} batches per rank per epoch, accumulation {G}")
    warmup = math.ceil(args.warmup_ratio * total_steps)

    optimizer = make_optimizer(model, args)
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
    if pairs:   # the policy and its reference; its forward returns the preference loss of a pair batch
        model = dpo.PreferenceModel(model, beta=args.beta, loss_type=args.loss_type, reference=args.reference)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    state = TrainState(num_processes=accelerator.num_processes)
    accelerator.register_for_checkpointing(state)
    checkpoint.checkpoint_trainables_only(accelerator)
    eval_loader = None if eval_set is None else accelerator.prepare(torch.utils.data.DataLoader(
        eval_set, batch_size=1, collate_fn=collate_fn(tokenizer, pairs), num_workers=args.num_workers,
        worker_init_fn=init_data_worker))
    # Resume: weights of the trainables, optimizer, scheduler, RNG, data position, step and counters.
    if ckpt:
        checkpoint.resume(accelerator, ckpt, scheduler, state)
        accelerator.print(f"resumed from {ckpt} at step {state.step} (epoch {state.epoch}, "
                          f"batch {state.batch_in_epoch})")
    metrics = checkpoint.MetricsFile(os.path.join(args.output_dir, "metrics.jsonl"), accelerator, after_step=state.step)
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
    inner = accelerator.unwrap_model(model)
    accelerator.print(f"model FLOPs for MFU: LLM {flops.llm_per_token / 1e9:.3g} GFLOP/position + "
                      f"{flops.llm_per_pair / 1e6:.3g} MFLOP/pair of positions in a sample, images "
                      f"{flops.per_image / 1e9:.3g} GFLOP each"
                      f"{'' if not pairs or inner.reference == 'precomputed' else ' (+ the reference forward)'}; "
                      f"peak per device: {f'{peak / 1e12:g} TFLOP/s' if peak else 'unknown (--peak_tflops)'}")
    meter = Throughput(peak, accelerator.num_processes)
    model.train()
    stop.training_begins(checkpoint_bytes=12 * sum(p.numel() for p in model.parameters() if p.requires_grad))
    stop_reason = None
    while state.step < total_steps:
        window = [next(batches) for _ in range(G)]
        count_skipped_samples(accelerator, state, window, say)
        check_skip_fraction(state, args.max_skip_fraction)
        num_items = dpo.step_normalizer(accelerator, window) if pairs else supervised_tokens(accelerator, window)
        if int(num_items.flatten()[0]) == 0:  # every rank agrees (a global count): nothing to learn, so no update
            # and no step (nor a stop vote: a stop request waits for the next step that trains); dpo: no pair
            say(f"step {state.step + 1}: no supervised token in this step's batches, skipped")
            empty_steps += 1
            if empty_steps * G >= per_epoch:  # a whole epoch of batches: the data cannot train anything
                raise UserError(f"{empty_steps * G} batches in a row held no supervised token (skipped samples: "
                                f"{state.skipped_samples}); check data_path / image_folder / template / max_length")
            continue
        empty_steps = 0
        sums = [] if pairs else None   # the dpo stage's metrics (dpo.METRICS), summed over the step
        loss, tokens, samples, stop_reason = forward_backward(accelerator, model, window, num_items, stop, sums)
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
        loads = [image_load(inner, b) for b in window]
        if pairs:   # each pair's prompt and images once, and the reference's forward
            work = [dpo.pair_flops(flops, b, n, inner) for b, (n, _) in zip(window, loads)]
            meter.add(tokens, samples, (sum(w[0] for w in work), sum(w[1] for w in work)))
        else:
            meter.add(tokens, samples, flops.of(torch.cat([sample_lengths(b, n) for b, (n, _) in zip(window, loads)]),
                                                sum(images for _, images in loads)))

        if state.step % args.logging_steps == 0 or state.step == total_steps:
            rates = meter.rates(lambda t: accelerator.reduce(t.to(accelerator.device), reduction="sum"))
            log = {"loss": loss, "lr": lr, "grad_norm": grad_norm, **rates, "peak_mem_gb": peak_memory_gb(),
                   "epoch": state.epoch, "skipped_steps": state.skipped_steps}
            rewards = ""
            if pairs:
                log.update(dpo.log_values(sums, int(num_items[0])))
                rewards = (f" | rewards chosen {log['rewards/chosen']:.4f} rejected {log['rewards/rejected']:.4f} "
                           f"accuracy {log['rewards/accuracies']:.3f} margin {log['rewards/margins']:.4f}")
            bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}")
            mfu = (f"MFU {log['mfu_llm']:.1%} LLM-only, {log['mfu_all']:.1%} all" if "mfu_llm" in log
                   else "MFU unknown (--peak_tflops)")
            say(f"step {state.step}/{total_steps} | loss {loss:.4f}{rewards} | lr {lr:.3e} | "
                f"grad norm {grad_norm or 0:.3f} | {log['tokens_per_s']:.0f} tok/s | "
                f"{log['samples_per_s']:.2f} samples/s | peak mem {log['peak_mem_gb']:.2f} GB | {mfu}")
            accelerator.log(log, step=state.step)
            metrics.write(state.step, log)
        if eval_loader is not None and (state.step == total_steps or
                                        args.eval_steps > 0 and state.step % args.eval_steps == 0):
            if pairs:   # held-out pairs: their loss, reward accuracy and margin
                scores = dpo.evaluate(accelerator, model, eval_loader)
                say(f"step {state.step} | " + (" | ".join(f"{k} {v:.4f}" for k, v in scores.items()) or
                                               f"eval skipped: no usable pair in {args.eval_data_path}"))
                accelerator.log(scores, step=state.step)
                metrics.write(state.step, scores)
            else:
                eval_loss, eval_skipped = evaluate(accelerator, model, eval_loader)
                note = f" ({eval_skipped} unusable eval records skipped)" if eval_skipped else ""
                if eval_loss is None:  # never a loss of 0 for a set that could not be evaluated
                    say(f"step {state.step} | eval skipped: no usable record in {args.eval_data_path}{note}")
                else:
                    say(f"step {state.step} | eval loss {eval_loss:.4f}{note}")
                    accelerator.log({"eval_loss": eval_loss}, step=state.step)
                    metrics.write(state.step, {"eval_loss": eval_loss})
        if state.step % args.save_steps == 0 or state.step == total_steps or stop_reason:
            with stop.timing_save():
                checkpoint.save_checkpoint(accelerator, args.output_dir, state.step, config, args.save_total_limit,
                                           run)
        if stop_reason and state.step < total_steps:
            break
    bar.close()
    if state.skipped_samples:
        accelerator.print(f"skipped samples by kind: {state.skipped_samples}")

    export_dir = None
    if state.step >= total_steps:   # done (a resumed run may have been shortened to before its checkpoint)
        export_dir = args.export_dir or os.path.join(args.output_dir, "export")
        checkpoint.export(accelerator, model, tokenizer, export_dir, config, model_args.dtype)
        accelerator.print(f"exported to {export_dir}")
    else:
        why = f"--max_time {args.max_time}" if stop_reason == "max_time" else stop_reason
        accelerator.print(f"stopped by {why} at step {state.step}: checkpoint-{state.step:06d} written; "
                          "continue with --resume auto")
    # Release the wrapped model (DDP reducer, DeepSpeed engine, FSDP hooks) before the process group goes: left to
    # interpreter exit, gloo's threads can be torn down mid-flight ("terminate called...", exit code -6).
    del model, optimizer, scheduler, eval_loader
    accelerator.free_memory()
    accelerator.end_training()  # trackers, then destroy_process_group
    return export_dir


# ---- Engine: the accelerate config decides -------------------------------------------------------------------------

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
        raise UserError(f"the accelerate config asks for {wanted.name}, but accelerate set up {running.name} "
                        f"on {accelerator.device}: {why}. Use a config for the engine this machine can run "
                        "(multi_gpu.yaml runs DDP, also on CPU).")
    ds_plugin = accelerator.state.deepspeed_plugin
    if ds_plugin is not None and ds_plugin.zero3_init_flag:
        raise UserError("zero3_init_flag: true is not supported: model.py builds the model with full weights (new "
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


def trackers(report_to: str) -> list[str]:
    wanted = [t.strip() for t in report_to.split(",") if t.strip() and t.strip() != "none"]
    available = {"tensorboard": is_tensorboard_available(), "wandb": is_wandb_available()}
    missing = [t for t in wanted if not available.get(t, True)]  # unknown names: let accelerate complain
    if missing:
        raise UserError(f"report_to asks for {missing}, not installed: pip install {' '.join(missing)} "
                        "or set report_to: none")
    return wanted or None


def flat_scalars(config: dict) -> dict:
    """Trackers (tensorboard hparams) accept only scalars."""
    return {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in config.items()}


# ---- Schedule ------------------------------------------------------------------------------------------------------

def lr_at(step: int, *, peak: float, warmup: int, total: int) -> float:
    """Linear warmup, then cosine decay to zero."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * peak * (1 + math.cos(math.pi * progress))


# ---- Data ----------------------------------------------------------------------------------------------------------

def train_loader(dataset, data_args, args: TrainArguments, tokenizer, accelerator) -> torch.utils.data.DataLoader:
    """This rank's batches. data.py's sampler is rank-aware (so accelerate must not shard it again) and each epoch's
    order is a pure function of (seed, epoch); resume starts it at a batch index without loading what it skips.
    The loader's own generator keeps the global RNG untouched, so resuming does not shift dropout masks."""
    sampler = data.build_sampler(dataset, data_args, args.per_device_batch_size, seed=args.seed,
                                 num_replicas=accelerator.num_processes, rank=accelerator.process_index)
    if args.num_workers == 0:           # this process decodes the images itself
        data.reuse_freed_memory()
    return torch.utils.data.DataLoader(
        dataset, batch_sampler=sampler, collate_fn=collate_fn(tokenizer, args.stage == "dpo"),
        num_workers=args.num_workers,
        pin_memory=torch.cuda.is_available(), generator=torch.Generator().manual_seed(args.seed),
        worker_init_fn=init_data_worker)


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


# ---- Stopping early: signals and --max_time ------------------------------------------------------------------------

# The exit status of a run that stopped early with a checkpoint (a signal, --max_time): "resume me", distinct from
# 0 (done), 1 (a crash) and 2 (a settings error). 75 is EX_TEMPFAIL of sysexits.h: a temporary failure, retry later.
STOPPED = 75
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)


class Stopped(SystemExit):
    """A stop signal before the first step: there is nothing to finish or save, so it ends the process at once
    (a SystemExit, so no library's `except Exception` swallows it)."""

    def __init__(self, reason: str):
        super().__init__(STOPPED)
        self.reason = reason


class StopRequests:
    """SIGTERM, SIGUSR1 (SLURM's warning before a time limit, spot preemption) and a first Ctrl-C end the run after
    the optimizer step under way, with a checkpoint at that step; so does --max_time, before the next step and a
    checkpoint write would cross it. A second Ctrl-C ends the process at once (the last complete checkpoint stays).

    During training a signal only records itself: the step and any checkpoint write under way finish, and
    forward_backward sends this process's votes() with the step's all-reduce of totals, so every rank learns of a
    signal that reached one of them and all stop after the same step. Before training a signal raises Stopped at once.
    --max_time counts from the start of main(); a step is estimated as the longest so far, a checkpoint write as the
    longest so far (before the first: 1 s plus its size at 100 MB/s)."""

    REASONS = STOP_REASONS
    WRITE_RATE = 100e6   # bytes/s assumed for a checkpoint write before one has been timed
    SAME_CTRL_C = 1.0    # seconds: a SIGINT this soon after the first is the same Ctrl-C, delivered twice

    def __init__(self, max_time: float = 0.0):
        self.deadline = time.monotonic() + max_time if max_time > 0 else None
        self.received: list[str] = []      # signal names, in order of arrival
        self.training = False
        self.longest_step = self.longest_save = 0.0
        self.last_vote = self.first_interrupt = 0.0

    def __enter__(self) -> StopRequests:
        in_main_thread = threading.current_thread() is threading.main_thread()   # where Python runs handlers
        self.previous = {sig: signal.signal(sig, self._on_signal) for sig in STOP_SIGNALS if in_main_thread}
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def _on_signal(self, signum, frame) -> None:
        name, now = signal.Signals(signum).name, time.monotonic()
        if name == "SIGINT" and "SIGINT" in self.received:
            if now - self.first_interrupt < self.SAME_CTRL_C:
                return                # the same Ctrl-C: the terminal and a forwarding launcher each deliver it
            raise KeyboardInterrupt   # a second Ctrl-C
        if name == "SIGINT":
            self.first_interrupt = now
        self.received.append(name)
        if not self.training:
            raise Stopped(name)

    def training_begins(self, checkpoint_bytes: int) -> None:
        """From here on a signal waits for the end of the step; checkpoint_bytes sizes the first write's estimate."""
        self.training, self.last_vote = True, time.monotonic()
        self.longest_save = 1.0 + checkpoint_bytes / self.WRITE_RATE

    def votes(self) -> list[int]:
        """This process's stop requests, one count per reason (REASONS), for the step's all-reduce."""
        now = time.monotonic()
        self.longest_step, self.last_vote = max(self.longest_step, now - self.last_vote), now
        out_of_time = self.deadline is not None and now + self.longest_step + self.longest_save > self.deadline
        return [int(why in self.received) for why in self.REASONS[:-1]] + [int(out_of_time)]

    @contextmanager
    def timing_save(self):
        """Measure a checkpoint write (for --max_time); a signal arriving meanwhile lets it finish."""
        start = time.monotonic()
        yield
        self.longest_save = max(self.longest_save, time.monotonic() - start)


def init_data_worker(worker_id: int) -> None:
    """DataLoader workers: the stop signals are the main process's business (a worker ended by SIGTERM or Ctrl-C,
    which reach the whole process group, would make the main process fail before it can save)."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    data.reuse_freed_memory(worker_id)


# ---- Around the step: skips, bad steps, evaluation -----------------------------------------------------------------

def check_skip_fraction(state: TrainState, limit: float) -> None:
    """A wrong image_folder or template makes every record unusable: stop instead of training on nothing."""
    skipped = sum(state.skipped_samples.values())
    seen = skipped + state.seen_samples
    if seen >= 50 and skipped > limit * seen:
        raise UserError(f"{skipped} of the {seen} records seen so far were unusable ({state.skipped_samples}); "
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


@contextmanager
def exit_status_recorded(path: str | None):
    """Write this process's exit status to `path` (the main process only; MGM_EXIT_STATUS_FILE): accelerate launch
    reports any failure of its processes as status 1, so a job script reads STOPPED ("resume me") from here.

    With `path` set, a run that stopped early exits with 0 from every process, its STOPPED in the file alone: the
    launchers between it and the job script take any other status for a failure (torchrun's agent in accelerate
    launch raises its ChildFailedError traceback, srun logs an error), which a planned stop is not. Every rank
    stops after the same step (the stop votes travel in the step's all-reduce), so all of them exit with 0; before
    the first step each rank stops on its own signal, which SLURM sends to every process of the job step."""
    status = 1                                  # a crash, unless the run ends otherwise
    try:
        yield
        status = 0
    except SystemExit as e:                     # cli.run's: 2 a settings error, 130 Ctrl-C; STOPPED
        status = e.code if isinstance(e.code, int) else int(e.code is not None)
        if status == STOPPED and path:
            raise SystemExit(0) from None
        raise
    finally:
        if path and os.environ.get("RANK", "0") == "0":
            with open(path, "w") as f:
                f.write(f"{status}\n")


def command(argv: list[str] | None = None) -> None:
    """`python train.py ...`: exits with 0 (done), STOPPED (stopped early with a checkpoint: resume me), 2 (a settings
    error, one line), 130 (a second Ctrl-C) or 1 (a crash, with its traceback). With MGM_EXIT_STATUS_FILE set, a
    stop exits with 0 and the file says STOPPED (exit_status_recorded)."""
    with exit_status_recorded(os.environ.get("MGM_EXIT_STATUS_FILE")):
        sys.exit(STOPPED if run(main, "train.py", argv) is None else 0)


if __name__ == "__main__":
    command()
