"""A run's files on disk: who owns output_dir, its checkpoints, its metrics and its export.

    output_dir/
        run.json               the run's id and defining settings (each checkpoint carries a copy)
        train.lock             held by the running process (flock, released by the kernel however it ends)
        checkpoint-000500/     accelerator.save_state: trainable weights, optimizer, scheduler, RNG, data position
        metrics.jsonl          one JSON line per log line
        export/                the final, self-contained export (model.py decides what a stage holds)

train.py calls start_run (take output_dir, pick the checkpoint to resume from), checkpoint_trainables_only (what a
checkpoint holds), resume, MetricsFile, save_checkpoint and export; everything else here serves those. A checkpoint is written into checkpoint-N.tmp and renamed into place, so a crash
never leaves a torn one under a final name; resume falls back past one that does not load completely.
"""
from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import socket
import uuid
import zipfile

import torch
import yaml
from accelerate.utils import DistributedType, broadcast_object_list
from safetensors.torch import load_file, save_file

from cli import UserError

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
             "ddp_find_unused_parameters", "max_time", "plan", "device_memory_gb", "plan_config", "plan_processes")
PATH_SETTINGS = ("llm", "vision_tower", "vision_tower_aux", "pretrained_mm_path", "init_from", "data_path",
                 "image_folder")
_LOCKS: dict = {}   # lock files this process holds, by path (kept open: the lock lasts as long as the process)


def start_run(accelerator, args, config: dict) -> tuple[dict, str | None]:
    """The main process takes output_dir for this run (claim_output_dir); every rank gets (run, checkpoint)."""
    answer = list(claim_output_dir(args, config, say=accelerator.print)) if accelerator.is_main_process else [0, 0]
    accelerator.wait_for_everyone()
    run, ckpt = broadcast_object_list(answer)
    return run, ckpt


def claim_output_dir(args, config: dict, say=print) -> tuple[dict, str | None]:
    """Lock output_dir, check it holds no other run, pick the checkpoint to resume from; returns (run, checkpoint).
    run = {"id", "settings"}: the defining settings, compared on every resume. Nothing is written there before the
    checks pass: a refused start leaves the directory as it found it."""
    out = args.output_dir
    refuse_other_run(out, args)
    os.makedirs(out, exist_ok=True)
    lock_output_dir(out)
    if args.overwrite_output_dir:
        removed = clear_run_files(out)
        if removed:
            say(f"overwrite_output_dir: deleted {', '.join(removed)} from {out}")
    refuse_other_run(out, args)  # again under the lock: another run may have started there in between
    settings = run_settings(config)
    recorded = read_json(os.path.join(out, RUN_FILE))
    if recorded and args.resume:
        refuse_changed_settings(recorded["settings"], settings, f"the run in {out}")
    ckpt = resume_checkpoint(args.resume, out, settings, say) if args.resume else None
    for stale in list_checkpoints(out, complete=False):  # left by a crash in the middle of a save
        shutil.rmtree(stale, ignore_errors=True)
    ckpt_run = read_json(os.path.join(ckpt, RUN_FILE)) if ckpt else None
    run_id = (recorded or ckpt_run or {}).get("id") or uuid.uuid4().hex[:12]
    run = {"id": run_id, "settings": settings}
    write_json(os.path.join(out, RUN_FILE), run)
    record_owner(out)
    return run, ckpt


def refuse_other_run(output_dir: str, args) -> None:
    """A new run (neither --resume nor --overwrite_output_dir) refuses a directory that holds another run's work,
    naming the process when that run is still going. A run.json alone is a start that stopped before saving
    anything (a wrong path, say): nothing there to protect."""
    if args.resume or args.overwrite_output_dir:
        return
    found = [name for name in run_files(output_dir) if name != RUN_FILE]
    if found:
        owner = lock_holder(output_dir)
        if owner:
            raise in_use(output_dir, owner)
        raise UserError(f"output_dir {output_dir} holds another run ({', '.join(found[:3])}"
                        f"{', ...' if len(found) > 3 else ''}): pass --resume auto to continue it, "
                        "--overwrite_output_dir true to delete it first, or choose another output_dir")


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
        raise UserError(f"cannot resume {what}: its defining settings differ: {diffs}. Only "
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
            raise UserError(f"resume: {ckpt} cannot be loaded: {problem}")
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
    """An exclusive lock on output_dir/train.lock. The kernel drops it when the owner exits, however it ends
    (kill -9 included), so the next run takes it over; a run still going keeps everyone out. The file names its
    owner (record_owner) once the run has passed its checks."""
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
        raise in_use(output_dir, owner) from None
    _LOCKS[path] = f


def record_owner(output_dir: str) -> None:
    """Write this process into the train.lock it holds: who a refused second run is told is using the directory."""
    f = _LOCKS[os.path.realpath(os.path.join(output_dir, LOCK_FILE))]
    f.seek(0)
    f.truncate()
    f.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
    f.flush()


def lock_holder(output_dir: str) -> str | None:
    """The owner train.lock names while a live process holds it, else None; reading only (a shared lock, tried
    and released)."""
    path = os.path.realpath(os.path.join(output_dir, LOCK_FILE))
    if path in _LOCKS or not os.path.isfile(path):
        return None
    with open(path) as f:
        try:
            fcntl.flock(f, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError:
            return f.read().strip() or "another process"
    return None


def in_use(output_dir: str, owner: str) -> UserError:
    return UserError(f"output_dir {output_dir} is in use by another run ({owner}, "
                     f"{os.path.join(output_dir, LOCK_FILE)}); wait for it to end or choose another output_dir")


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


def resume(accelerator, ckpt: str, scheduler, state) -> None:
    """Load a checkpoint into the prepared run: trainable weights, optimizer, scheduler, RNG states and the
    registered train state (step, data position, counters); the lr then follows this run's schedule."""
    accelerator.load_state(ckpt, **deepspeed_state_kwargs(accelerator, load=True))
    follow_schedule(scheduler)
    if state.num_processes != accelerator.num_processes:
        raise UserError(f"{ckpt} was written by {state.num_processes} processes, this run has "
                        f"{accelerator.num_processes}: the data position would not carry over; launch "
                        f"{state.num_processes} processes or start a new run")


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
