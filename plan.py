"""Will it fit? The memory plan of one training step of a recipe, per device, without a GPU and without weights.

    accelerate launch --config_file accelerate_configs/deepspeed_zero2.yaml train.py recipes/mgm_7b_finetune.yaml --plan
    python train.py recipes/mgm_7b_qlora_finetune.yaml --plan --plan_config accelerate_configs/single_gpu.yaml \
        --device_memory_gb 24
    python train.py recipes/mgm_7b_finetune.yaml --plan --plan_config accelerate_configs/deepspeed_zero3.yaml \
        --plan_processes 4 --device_memory_gb 40

How the figures are obtained (each printed line says which way):
- traced: the model is built from its configs on the meta device (no weight is read), given fake tensors (torch's
  FakeTensorMode: shapes and dtypes, no storage) and set up by train.py's own code (step.set_trainables: LoRA /
  QLoRA, the stage, the switches, fp32 trainables). The batch is the recipe's worst case: per_device_batch_size rows
  of max_length positions, one image per sample (packed rows: as many one-image samples as fit), every text token
  supervised. The step runs in the state of a later step (Adam's state exists; with accumulation, so do the gradients
  of the earlier micro-batches): step.forward_backward under accelerate's autocast, gradient clipping, AdamW with
  foreach updates (as torch runs it on CUDA). StepMemory counts the bytes of every tensor storage by what holds it
  (parameters, gradients, optimizer state, the rest: activations and temporaries) and their peak. The model's
  decisions on token ids and masks (where the images go, how long a row is) are taken on the batch's real, small
  integer tensors: an operation whose inputs are all real and whose outputs are small integers runs for real,
  everything else on fake tensors. FSDP2 is traced too: accelerate's own FSDP2 preparation shards the model for rank
  0 of a fake process group of the launched size (collectives return at once, as in torchtitan's estimator).
- computed, not traced: what fake tensors cannot reach, from its layout: bitsandbytes' 4/8-bit weights (packed bytes
  and quantization state; the step is traced with those weights in bf16, plus one dequantized weight at a time),
  DDP's gradient buckets, DeepSpeed ZeRO-2/3 partitions (fp32 master weights, Adam's moments, gradient partitions,
  the reduce bucket, layers gathered under ZeRO-3); the activations stay traced.
- Fits: the planned peak is at most USABLE of the device's memory (the rest: CUDA context, cuBLAS workspaces,
  allocator fragmentation). When it does not fit, gradient checkpointing, smaller batches with more accumulation (the
  same global batch), ZeRO-3 and QLoRA are planned in turn, and the first that fits is suggested.

The launch: `accelerate launch` starts train.py in every process it launches. Rank 0 plans for the launched engine
and process count (ACCELERATE_USE_DEEPSPEED / ACCELERATE_DEEPSPEED_ZERO_STAGE / ACCELERATE_USE_FSDP, WORLD_SIZE,
ACCELERATE_MIXED_PRECISION); every other rank returns at once, before any process group exists. Without accelerate
launch, --plan_config names the accelerate config to plan for and --plan_processes the process count (default: the
config's num_processes). Nothing is written: no output_dir, no lock, no checkpoint.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import os
import time
import weakref
from contextlib import contextmanager
from dataclasses import dataclass, field
from types import SimpleNamespace

import torch
import yaml
from torch._subclasses.fake_tensor import (DataDependentOutputException, DynamicOutputShapeException, FakeTensor,
                                          FakeTensorMode)
from torch.distributed._tools.common_utils import get_untyped_storages
from torch.distributed.tensor import DTensor
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.weak import WeakIdKeyDictionary

import dpo
import step
from cli import UserError
from conversation import IGNORE_INDEX, IMAGE_TOKEN_INDEX
from images import worst_pinpoint

GiB = 2 ** 30
USABLE = 0.9                 # of a device's memory a plan may use
REAL_LIMIT = 1 << 22         # elements: integer outputs of all-real inputs up to this size are computed for real
KINDS = ("parameters", "gradients", "optimizer", "activations")
ENGINES = {"single": "one process", "ddp": "DDP", "zero2": "DeepSpeed ZeRO-2", "zero3": "DeepSpeed ZeRO-3",
           "fsdp2": "FSDP2"}
DEEPSPEED_BUCKET = int(5e8)  # elements: DeepSpeed's reduce_bucket_size when the config leaves it out (ours do)
DEEPSPEED_ALIGNMENT = 2      # ZeRO-1/2 pad each flat group to a multiple of 2 x processes elements


@dataclass
class Launch:
    """What the plan is for: the engine, the process count, mixed precision and one device's memory."""
    engine: str = "single"             # single | ddp | zero2 | zero3 | fsdp2
    processes: int = 1
    mixed_precision: str = "bf16"      # bf16 | fp16 | no
    device_memory: int = 0             # bytes of one device; 0: unknown
    device: str = ""                   # where device_memory comes from
    fsdp: dict = field(default_factory=dict)   # --plan_config's fsdp_config (launched: FSDP_* in the environment)

    def describe(self) -> str:
        where = "" if self.engine == "single" else f" on {self.processes} processes"
        return f"{ENGINES[self.engine]}{where}, mixed precision {self.mixed_precision}"


@dataclass
class Term:
    bytes: int
    how: str                           # "traced", or "computed, not traced: <what>"


@dataclass
class Plan:
    launch: Launch
    batch: str                         # the batch traced, in words
    batch_size: int
    terms: dict[str, Term]             # parameters, gradients, optimizer, activations: per device
    peak: Term
    seconds: float = 0.0

    @property
    def fits(self) -> bool:
        return self.peak.bytes <= USABLE * self.launch.device_memory


# ---- Entry points ---------------------------------------------------------------------------------------------------

def main(model_args, data_args, args) -> None:
    """train.py --plan: print the plan of this launch on rank 0, and a suggestion that fits when it does not."""
    if int(os.environ.get("RANK", "0")) != 0:
        return                         # rank 0 plans for all of them
    launch = launch_for(args)
    result = plan(model_args, data_args, args, launch)
    print(report(result), flush=True)
    if not result.fits:
        found = suggest(model_args, data_args, args, launch, result)
        if found is None:
            print("suggestion: none of smaller batches, gradient checkpointing, ZeRO-3 or QLoRA fits this device")
        else:
            options, planned = found
            print(f"suggestion: {options} (planned peak {gib(planned.peak.bytes)} per device: fits)")


def launch_for(args) -> Launch:
    """The launch to plan for: --plan_config's accelerate config, else the one `accelerate launch` exported; the
    process count from --plan_processes, else the launch's; the device's memory from --device_memory_gb, else CUDA."""
    env = os.environ
    if args.plan_config:
        if not os.path.isfile(args.plan_config):
            raise UserError(f"plan_config: {args.plan_config} is not a file (an accelerate config, e.g. "
                            "accelerate_configs/deepspeed_zero2.yaml)")
        with open(args.plan_config) as f:
            config = yaml.safe_load(f) or {}
        kind = str(config.get("distributed_type", "NO")).upper()
        deepspeed, fsdp = config.get("deepspeed_config") or {}, config.get("fsdp_config") or {}
        stage = int(deepspeed.get("zero_stage", 2))
        processes = int(config.get("num_processes", 1))
        mixed_precision = str(config.get("mixed_precision", "no"))
        offload = [k for k in ("offload_optimizer_device", "offload_param_device") if deepspeed.get(k, "none") != "none"]
        offload += ["fsdp_offload_params"] if str(fsdp.get("fsdp_offload_params", False)).lower() == "true" else []
    else:
        kind = "DEEPSPEED" if env.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true" else \
            "FSDP" if env.get("ACCELERATE_USE_FSDP", "").lower() == "true" else "MULTI_GPU"
        stage = int(env.get("ACCELERATE_DEEPSPEED_ZERO_STAGE", "2"))
        processes = int(env.get("WORLD_SIZE", "1"))
        mixed_precision = env.get("ACCELERATE_MIXED_PRECISION", "no")
        fsdp = {}                      # accelerate's FSDP plugin reads FSDP_* from the environment
        offload = [k for k in ("ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE", "ACCELERATE_DEEPSPEED_OFFLOAD_PARAM_DEVICE")
                   if env.get(k, "none") != "none"] + [k for k in ("FSDP_OFFLOAD_PARAMS",) if env.get(k) == "true"]
    if offload:
        raise UserError(f"the plan does not model CPU offload ({', '.join(offload)}): plan the config without it")
    processes = args.plan_processes or processes
    if kind == "DEEPSPEED":
        if stage not in (2, 3):
            raise UserError(f"the plan knows DeepSpeed ZeRO stages 2 and 3, not {stage}")
        engine = f"zero{stage}"
    elif kind == "FSDP":
        engine = "fsdp2"
    else:
        engine = "ddp" if processes > 1 else "single"
    memory, device = int(args.device_memory_gb * GiB), "--device_memory_gb"
    if not memory and torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        memory, device = props.total_memory, props.name
    if not memory:
        raise UserError("--plan needs one device's memory: no CUDA device here, so pass --device_memory_gb "
                        "(e.g. 24 for an RTX 4090, 80 for an A100/H100 80GB)")
    return Launch(engine, processes, mixed_precision, memory, device, fsdp)


def plan(model_args, data_args, args, launch: Launch) -> Plan:
    """One worst-case step of this recipe on this launch, per device (see the module docstring)."""
    start = time.perf_counter()
    plain = launch.engine in ("single", "ddp")      # accelerate's autocast over fp32 trainables
    fake = PlanFakeMode()
    model = build_fake(model_args, args, fake, upcast_trainables=plain)
    if launch.engine in ("zero2", "zero3") and launch.mixed_precision != "no":   # DeepSpeed casts the parameters
        low = torch.float16 if launch.mixed_precision == "fp16" else torch.bfloat16
        for p in model.parameters():
            p.data = p.data.to(low)
    batch = worst_case_batch(model, data_args, args.per_device_batch_size, fake)
    if args.stage == "dpo":   # pairs: 2B rows sharing B images; the reference (a copy, or none) inside the model
        batch = dpo.pair_rows(worst_case_batch(model, data_args, 2 * args.per_device_batch_size, fake))
        model = dpo.PreferenceModel(model, beta=args.beta, loss_type=args.loss_type, reference=args.reference)
        if model.reference == "precomputed":   # read from the data: two numbers per pair
            batch["ref_logps"] = torch.zeros(len(batch["input_ids"]), dtype=torch.float64)
    with fsdp2_sharded(model, launch) as model:
        tracker = step_memory(model, args, batch, mixed_precision=launch.mixed_precision if plain else "no",
                              fake=fake)
    how = "traced" if launch.engine != "fsdp2" else f"traced (FSDP2 on a fake process group of {launch.processes})"
    terms = {"parameters": Term(tracker.steady["parameters"], how),
             "gradients": Term(tracker.steady["gradients"], how),
             "optimizer": Term(tracker.steady["optimizer"], how),
             "activations": Term(tracker.peak_activations, how + ": the most activations and temporaries held")}
    peak = Term(tracker.peak, how)
    quantized = model.quantized_weights
    if quantized:
        traced = sum(p.nbytes for p in quantized)
        packed = sum(quantized_bytes(p.numel(), p.shape[0], model_args.bits) for p in quantized)
        dequantized = max(p.nbytes for p in quantized)   # bitsandbytes dequantizes one weight per matmul
        terms["parameters"] = Term(terms["parameters"].bytes - traced + packed,
                                   f"traced, with {len(quantized)} {model_args.bits}-bit LLM weights computed, not "
                                   "traced (bitsandbytes' layout)")
        terms["activations"] = Term(terms["activations"].bytes + dequantized, terms["activations"].how +
                                    ", + one dequantized weight (computed, not traced)")
        peak = Term(peak.bytes - traced + packed + dequantized, "traced + computed")
    if launch.engine == "ddp":
        buckets = sum(p.nbytes for p in model.parameters() if p.requires_grad)
        terms["gradients"] = Term(terms["gradients"].bytes + buckets, "traced + DDP's gradient buckets (a copy "
                                  "of the gradients; computed, not traced)")
        peak = Term(peak.bytes + buckets, "traced + computed")
    if launch.engine in ("zero2", "zero3"):
        layout = deepspeed_layout(model, args, launch)
        terms.update(parameters=layout["parameters"], gradients=layout["gradients"], optimizer=layout["optimizer"],
                     activations=Term(tracker.backward_activations, "traced: the most activations and temporaries "
                                      "of forward and backward (DeepSpeed's update: computed, below)"))
        transient = max(terms["activations"].bytes + layout["gathered"].bytes, layout["step"].bytes)
        peak = Term(sum(terms[k].bytes for k in ("parameters", "gradients", "optimizer")) + transient,
                    f"computed: parameters + gradients + optimizer state + the larger of the activations "
                    f"({layout['gathered'].how}) and the optimizer step's {layout['step'].how}")
    images = "one image" if not data_args.packing else f"{int(batch['image_counts'][0])} one-image samples"
    words = (f"{args.per_device_batch_size} x {data_args.max_length} positions per device ({images} per row, "
             f"{model.tokens_per_image} positions each), gradient checkpointing "
             f"{'on' if model_args.gradient_checkpointing else 'off'}")
    del model, tracker, batch
    return Plan(launch, words, args.per_device_batch_size, terms, peak, time.perf_counter() - start)


def report(result: Plan) -> str:
    """The plan as printed: one line per term, the peak against the device, the verdict."""
    launch = result.launch
    lines = [f"plan: {launch.describe()}; batch {result.batch} (planned in {result.seconds:.0f} s, fake tensors)",
             "per device:"]
    names = {"parameters": "parameters", "gradients": "gradients", "optimizer": "optimizer state",
             "activations": "activations"}
    for key, name in names.items():
        term = result.terms[key]
        lines.append(f"  {name:16} {gib(term.bytes):>10}  {term.how}")
    lines.append(f"  {'peak':16} {gib(result.peak.bytes):>10}  {result.peak.how}")
    share = result.peak.bytes / launch.device_memory
    usable = gib(USABLE * launch.device_memory)
    lines.append(f"device: {gib(launch.device_memory)} ({launch.device}), of which {usable} usable "
                 f"({USABLE:.0%}: CUDA context, workspaces, fragmentation)")
    verdict = "fits" if result.fits else "does not fit"
    lines.append(f"verdict: {verdict}: planned peak {gib(result.peak.bytes)} per device = {share:.0%} of "
                 f"{gib(launch.device_memory)}")
    return "\n".join(lines)


def suggest(model_args, data_args, args, launch: Launch, result: Plan):
    """(options, plan) of the first candidate that fits, checked by planning it; None when none does.
    Candidates (see candidates): gradient checkpointing; smaller batches with more accumulation (the same global
    batch); ZeRO-3 instead of DDP / ZeRO-2 / FSDP2 on several processes; QLoRA instead of a full or LoRA finetune. A smaller
    batch of a setup already planned is skipped while its predicted peak (activations in proportion to the batch)
    is still too large."""
    planned = {(model_args.gradient_checkpointing, launch.engine, args.tune): result}
    for options, m, a, engine in candidates(model_args, args, launch):
        setup = (m.gradient_checkpointing, engine, a.tune)
        if setup in planned and predicted_peak(planned[setup], a.per_device_batch_size) > USABLE * \
                launch.device_memory:
            continue
        planned[setup] = plan(m, data_args, a, dataclasses.replace(launch, engine=engine))
        if planned[setup].fits:
            return options, planned[setup]
    return None


def predicted_peak(result: Plan, batch: int) -> float:
    """The peak of the same setup at another batch size, activations in proportion to it."""
    per_sample = result.terms["activations"].bytes / result.batch_size
    return result.peak.bytes + (batch - result.batch_size) * per_sample


def candidates(model_args, args, launch: Launch) -> list[tuple[str, object, object, str]]:
    """(the changes as typed, model_args, args, engine) to try, cheapest change first: gradient checkpointing on,
    then halving the batch (keeping the global batch), then ZeRO-3 on several processes, then QLoRA (one process or
    DDP, as bitsandbytes' weights are not sharded here)."""
    engines = [launch.engine] + (["zero3"] if launch.processes > 1 and launch.engine != "zero3" else [])
    qlora = args.stage == "finetune" and args.tune != "qlora" and launch.engine in ("single", "ddp")
    tunes = [(args.tune, model_args.bits)] + ([("qlora", 4)] if qlora else [])
    global_batch = args.per_device_batch_size * args.gradient_accumulation_steps
    found = []
    for tune, bits in tunes:
        for engine in engines:
            batch = args.per_device_batch_size
            while batch >= 1:
                words = [] if model_args.gradient_checkpointing else ["--gradient_checkpointing true"]
                if engine != launch.engine:
                    words.insert(0, "accelerate launch --config_file accelerate_configs/deepspeed_zero3.yaml ...")
                if tune != args.tune:
                    words.append(f"--tune {tune} --bits {bits}")
                if batch != args.per_device_batch_size:
                    words.append(f"--per_device_batch_size {batch} --gradient_accumulation_steps "
                                 f"{global_batch // batch}")
                if words:
                    found.append((" ".join(words),
                                  dataclasses.replace(model_args, gradient_checkpointing=True, bits=bits),
                                  dataclasses.replace(args, tune=tune, per_device_batch_size=batch,
                                                      gradient_accumulation_steps=global_batch // batch), engine))
                batch = next((b for b in range(batch // 2, 0, -1) if global_batch % b == 0), 0)
    return found


def largest_batch(model_args, data_args, args, launch: Launch, known: dict | None = None) -> int:
    """The largest per_device_batch_size whose plan fits (0: not even 1), found by planning: from the plans of batch
    1 and the recipe's batch, a fitting and a too large batch are bracketed (doubling), then the bracket is narrowed
    at the batch where the peak, interpolated between its ends, reaches the usable memory, until the two are adjacent.
    known: plans by batch size already made for this setup (shared between device sizes)."""
    known = {} if known is None else known
    usable = USABLE * launch.device_memory

    def peak(batch: int) -> int:
        if batch not in known:
            known[batch] = plan(model_args, data_args, dataclasses.replace(args, per_device_batch_size=batch),
                                dataclasses.replace(launch, device_memory=0))
        return known[batch].peak.bytes

    if peak(1) > usable:
        return 0
    peak(args.per_device_batch_size)
    low = max(b for b in known if known[b].peak.bytes <= usable)
    high = min((b for b in known if known[b].peak.bytes > usable), default=None)
    while high is None:
        if low >= 4096:
            return low
        high = low * 2 if peak(low * 2) > usable else None
        low = low if high else low * 2
    while high - low > 1:
        slope = (peak(high) - peak(low)) / (high - low)
        guess = low + int((usable - peak(low)) / slope) if slope > 0 else (low + high) // 2
        guess = min(max(guess, low + 1), high - 1)
        low, high = (guess, high) if peak(guess) <= usable else (low, guess)
    return low


def gib(n: float) -> str:
    """Bytes in GiB (what `nvidia-smi` and --device_memory_gb mean by GB), MiB or KiB below one."""
    for unit, size in (("GiB", GiB), ("MiB", 2 ** 20)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n / 1024:.1f} KiB"


# ---- The traced step ------------------------------------------------------------------------------------------------

class PlanFakeMode(FakeTensorMode):
    """FakeTensorMode that asks whether CUDA is there once, not at every entry (twice per operation: a third of a
    plan's time)."""

    def __init__(self):
        super().__init__(allow_non_fake_inputs=True)

    @functools.cached_property
    def avoid_device_init(self) -> bool:
        return FakeTensorMode.avoid_device_init.fget(self)


class StepMemory(TorchDispatchMode):
    """Bytes of every tensor storage alive during a training step, by what holds them: parameters (and buffers),
    gradients, optimizer state, activations (everything else: saved activations, temporaries, the batch), and the
    peak of their sum. Counts real tensors, or fake ones (pass fake: the FakeTensorMode they belong to); a storage is
    counted once however many views share it, at its size in bytes (no allocator rounding).

    With `fake`, an operation whose tensor inputs are all real and whose outputs are small (REAL_LIMIT elements) runs
    for real: those are the model's decisions on token ids, masks and positions, which Python code reads (bool(),
    int()). Everything else runs on fake tensors. A float read from a fake tensor (the loss for the log) is 0.0."""

    def __init__(self, fake: FakeTensorMode | None = None):
        super().__init__()
        self.fake = fake
        self.held = WeakIdKeyDictionary()          # storage -> [bytes, kind, weakref]
        self.now = dict.fromkeys(KINDS, 0)
        self.steady = dict.fromkeys(KINDS, 0)      # the most each kind held
        self.peak = 0
        self.peak_activations = 0
        self.backward_activations = 0              # the most up to the end of the backward pass

    def hold(self, tensors, kind: str, relabel: bool = True) -> None:
        """Count these tensors' storages as `kind`; a storage already counted changes kind if `relabel` (a new
        gradient, optimizer state), else keeps its own (an operation's output that is a view of a parameter)."""
        for t in tensors:
            for storage in get_untyped_storages(t):
                self._hold_storage(storage, kind, relabel)

    def _hold_storage(self, storage, kind: str, relabel: bool = False) -> None:
        entry = self.held.get(storage)
        if entry is None:
            entry = [storage.nbytes(), kind, None]
            entry[2] = weakref.ref(storage, lambda _, entry=entry: self._free(entry))
            self.held[storage] = entry
            self._add(entry[1], entry[0])
        elif entry[0] != storage.nbytes():          # resized in place (FSDP2's gathered parameters)
            self._add(entry[1], storage.nbytes() - entry[0])
            entry[0] = storage.nbytes()
        elif relabel and entry[1] != kind:
            self._add(entry[1], -entry[0])
            entry[1] = kind
            self._add(kind, entry[0])

    def hold_model(self, model) -> None:
        self.hold(list(model.parameters()) + list(model.buffers()), "parameters")
        for p in model.parameters():
            if p.requires_grad:
                p.register_post_accumulate_grad_hook(lambda p: self.hold([p.grad], "gradients"))

    def hold_optimizer(self, optimizer) -> None:
        self.hold([t for state in optimizer.state.values() for t in state.values() if torch.is_tensor(t)],
                  "optimizer")

    def _add(self, kind: str, n: int) -> None:
        self.now[kind] += n
        self.steady[kind] = max(self.steady[kind], self.now[kind])
        self.peak = max(self.peak, sum(self.now.values()))
        self.peak_activations = max(self.peak_activations, self.now["activations"])

    def _free(self, entry) -> None:
        self._add(entry[1], -entry[0])

    def __enter__(self):
        """FSDP2 frees a gathered parameter by resizing its storage to 0 bytes, which no dispatch mode sees."""
        resize, tracker = torch.UntypedStorage.resize_, self

        def tracked_resize(storage, size):
            out = resize(storage, size)
            tracker._hold_storage(storage, "activations")
            return out
        self._resize, torch.UntypedStorage.resize_ = resize, tracked_resize
        return super().__enter__()

    def __exit__(self, *exc):
        torch.UntypedStorage.resize_ = self._resize
        return super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if any(issubclass(t, DTensor) for t in types):
            return NotImplemented      # DTensor (FSDP2) runs first and comes back with its local tensors
        out = self._run(func, args, kwargs or {})
        self.hold([t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)], "activations", relabel=False)
        return out

    def _run(self, func, args, kwargs):
        if self.fake is None:
            return func(*args, **kwargs)
        leaves = tree_flatten((args, kwargs))[0]
        if any(isinstance(t, FakeTensor) for t in leaves):
            if func in INDEXING and any(_real_mask(i) for i in args[1]):   # x[mask]: where the mask holds is known
                args = (args[0], [j for i in args[1] for j in (i.nonzero().unbind(1) if _real_mask(i) else [i])],
                        *args[2:])
            if func is torch.ops.aten._local_scalar_dense.default and args[0].is_floating_point():
                return 0.0             # a value for a log line; no decision of the model reads a float
            written = [a for a, s in zip(args, func._schema.arguments) if s.alias_info and s.alias_info.is_write]
            if any(isinstance(a, torch.Tensor) and not isinstance(a, FakeTensor) for a in written):
                raise RuntimeError(f"plan: {func} would write fake values into a real tensor of shape "
                                   f"{[tuple(a.shape) for a in written]}: create that tensor from a fake one")
            with self.fake:
                return func(*args, **kwargs)
        if func._schema.is_mutable or func.is_view:
            return func(*args, **kwargs)
        try:                           # the output's size first, on fake tensors
            with self.fake:
                out = func(*args, **kwargs)
        except (DataDependentOutputException, DynamicOutputShapeException):
            return func(*args, **kwargs)   # item(), nonzero(): sizes that only the values tell, of small tensors
        outputs = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
        # integers and booleans are positions, masks and counts; float64 is the model's exact CPU-side geometry
        # (mining's interpolation matrices); fp32 / bf16 values are data, and stay fake
        if all(t.numel() <= REAL_LIMIT and (not t.is_floating_point() or t.dtype == torch.float64) for t in outputs):
            return func(*args, **kwargs)
        return out


INDEXING = {torch.ops.aten.index.Tensor, torch.ops.aten.index_put.default, torch.ops.aten.index_put_.default,
            torch.ops.aten._index_put_impl_.default}


def _real_mask(index) -> bool:
    return isinstance(index, torch.Tensor) and not isinstance(index, FakeTensor) and index.dtype == torch.bool


def step_memory(model, args, batch: dict, *, mixed_precision: str, fake=None) -> StepMemory:
    """The memory of a later training step of train.py, real tensors or fake ones: the optimizer state exists (an
    update has been made) and, with gradient accumulation, so do the gradients of the earlier micro-batches; then the
    last micro-batch of a step runs through step.forward_backward, gradient clipping and AdamW under StepMemory.
    AdamW is step.make_optimizer's with foreach updates, as torch runs it on CUDA (all temporaries at once)."""
    optimizer = step.make_optimizer(model, args)
    for group in optimizer.param_groups:
        group["foreach"] = True
    trainable = [p for p in model.parameters() if p.requires_grad]
    for p in trainable:                # an earlier update: Adam's state as after any step
        p.grad = torch.zeros_like(p)
    optimizer.step()
    if args.gradient_accumulation_steps == 1:
        optimizer.zero_grad(set_to_none=True)
    tracker = StepMemory(fake)
    with planning_accelerator(mixed_precision) as accelerator:
        prepared = accelerator.prepare_model(model, device_placement=False)   # fake tensors stay where they are
        tracker.hold_model(model)
        tracker.hold([p.grad for p in trainable if p.grad is not None], "gradients")
        tracker.hold_optimizer(optimizer)
        tracker.hold([t for t in batch.values() if torch.is_tensor(t)], "activations")
        with tracker:
            prepared.train()
            window = [batch]
            pairs = isinstance(model, dpo.PreferenceModel)
            normalizer = dpo.step_normalizer if pairs else step.supervised_tokens
            step.forward_backward(accelerator, prepared, window, normalizer(accelerator, window))
            tracker.backward_activations = tracker.peak_activations   # before the update's temporaries
            accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm if args.max_grad_norm > 0 else
                                        float("inf"))
            optimizer.step()
            tracker.hold_optimizer(optimizer)
            optimizer.zero_grad(set_to_none=True)
        del prepared
    return tracker


@contextmanager
def planning_accelerator(mixed_precision: str):
    """A one-process CPU Accelerator whatever was launched: train.py's autocast, accumulation and backward without a
    process group (the launch's other ranks have left). Accelerate's singletons are reset before and after."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState
    saved = dict(os.environ)
    for key in list(os.environ):
        if key.startswith(("ACCELERATE_", "FSDP_")) or key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE",
                                                               "MASTER_ADDR", "MASTER_PORT"):
            del os.environ[key]
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    try:
        yield Accelerator(cpu=True, mixed_precision="bf16" if mixed_precision == "fp16" else mixed_precision,
)
    finally:
        AcceleratorState._reset_state(True)
        GradientState._reset_state()
        os.environ.clear()
        os.environ.update(saved)


# ---- The model and the batch on fake tensors ------------------------------------------------------------------------

def build_fake(model_args, args, fake: FakeTensorMode, upcast_trainables: bool = True):
    """The model of this recipe on fake tensors, set up by step.set_trainables. Configs only: random_init, no
    pretrained_mm_path (the same shapes). A 4/8-bit LLM is traced with its quantized weights in the recipe's dtype
    (listed in model.quantized_weights; the plan replaces their bytes by bitsandbytes' layout)."""
    import model as mgm
    tokenizer = step.load_tokenizer(model_args.init_from or model_args.llm) if model_args.mm_use_im_start_end else None
    unquantized = dataclasses.replace(model_args, random_init=True, pretrained_mm_path=None, bits=16)
    with torch.device("meta"):
        model = mgm.build_model(unquantized, tokenizer)
    with fake:
        model.to_empty(device="cpu")
    model.config.bits = model_args.bits
    quantized = []
    if model_args.bits < 16:           # bitsandbytes quantizes every Linear of the LLM but its output head
        head = model.llm.get_output_embeddings()
        quantized = [m.weight for m in model.llm.modules() if isinstance(m, torch.nn.Linear) and m is not head]
        for weight in quantized:       # fp32 for a moment: peft's prepare_model_for_kbit_training then leaves them
            weight.data = weight.data.float()   # alone, as it leaves bitsandbytes' packed weights
    model = step.set_trainables(model, args, upcast_trainables)
    for module in model.modules():     # what set_trainables added (LoRA adapters) is real: make it fake too
        for name, p in module.named_parameters(recurse=False):
            if not isinstance(p, FakeTensor):
                module._parameters[name] = torch.nn.Parameter(fake.from_tensor(p), requires_grad=p.requires_grad)
    for weight in quantized:
        weight.data = weight.data.to(getattr(torch, model_args.dtype))
    model.quantized_weights = quantized
    return model


def worst_case_batch(model, data_args, batch_size: int, fake: FakeTensorMode) -> dict:
    """A collated batch of the longest rows max_length allows: each sample one image and text up to max_length
    positions (packed: as many one-image samples per row as fit, at least 2 text positions each), every text token
    supervised. Token ids, masks and counts are real (small); the images are fake. AnyRes: every image has the
    size with the most tokens (a pinpoint itself: every tile used, nothing unpadded)."""
    length, per_image = data_args.max_length, model.tokens_per_image
    if length < per_image + 1:
        raise UserError(f"max_length {length} leaves no text next to one image ({per_image} positions)")
    samples = max(1, length // (per_image + 2)) if data_args.packing else 1
    text = (length - samples * per_image) // samples           # text tokens per sample, the image's one included
    row = []
    for _ in range(samples):
        row += [1, IMAGE_TOKEN_INDEX] + [5] * (text - 1)
    ids = torch.tensor(row).repeat(batch_size, 1)
    labels = ids.masked_fill(ids == IMAGE_TOKEN_INDEX, IGNORE_INDEX)
    s = model.image_settings()
    images, side, aux_side = batch_size * samples, s["image_size"], s["image_size_aux"]
    pins = s.get("image_grid_pinpoints")
    worst = worst_pinpoint(pins, side, side // s["patch_size"], s["anyres_max_tiles"]) if pins else None
    tiles = worst[0] // side * (worst[1] // side) if pins else 0
    with fake:
        if pins:     # views and HR tiles of every image back to back, as data.collate gives them
            pixels = torch.empty(images * (1 + tiles), 3, side, side)
            aux = torch.empty(images * tiles, 3, aux_side, aux_side) if aux_side else None
        else:
            pixels = torch.empty(images, model.num_views, 3, side, side)
            aux = torch.empty(images, 3, aux_side, aux_side) if aux_side else None
    batch = dict(input_ids=ids, labels=labels, attention_mask=torch.ones_like(ids), images=pixels, images_aux=aux,
                 image_counts=torch.full((batch_size,), samples), ids=[f"plan{i}" for i in range(images)], skipped=[])
    if pins:
        batch["image_sizes"] = torch.tensor([list(worst)] * images)
    if data_args.packing:
        batch["position_ids"] = torch.arange(text + 1).repeat(samples).repeat(batch_size, 1)   # restart per sample
    return batch


# ---- Computed, not traced: bitsandbytes and the sharding engines ----------------------------------------------------

def quantized_bytes(numel: int, rows: int, bits: int) -> int:
    """Bytes of one bitsandbytes weight as model.load_llm quantizes it. 4-bit NF4 with double quantization
    (blocks of 64): packed values (2 per byte), one uint8 absmax per block, one float32 absmax per 256 blocks, the NF4
    code (16 floats), the nested code (256 floats) and offset (1 float). 8-bit (LLM.int8): int8 values and one
    float32 scale per row."""
    if bits == 8:
        return numel + 4 * rows
    blocks = math.ceil(numel / 64)
    return math.ceil(numel / 2) + blocks + 4 * math.ceil(blocks / 256) + 4 * (16 + 256 + 1)


def deepspeed_layout(model, args, launch: Launch) -> dict[str, Term]:
    """Per-rank parameters, gradients and optimizer state of rank 0 (the largest share) under ZeRO-2/3, computed from
    DeepSpeed's layout, plus what a rank holds only for a while: `gathered` (parameters gathered for compute, next
    to the activations) and `step` (the optimizer step's temporaries)."""
    n = launch.processes
    low = 2 if launch.mixed_precision in ("bf16", "fp16") else 4       # bytes of the compute dtype
    params = list(model.parameters())
    trainable = [p for p in params if p.requires_grad]
    groups = [[p for p in g["params"]] for g in step.param_groups(model, args)]
    buffers = sum(b.nbytes for b in model.buffers())         # DeepSpeed leaves them in their own dtype
    if launch.engine == "zero2":
        def partition(group):       # each flat group padded to a multiple of 2 x processes, split evenly
            total = sum(p.numel() for p in group)
            return math.ceil(total / (DEEPSPEED_ALIGNMENT * n)) * DEEPSPEED_ALIGNMENT
        parts = [partition(g) for g in groups]
        padding = sum(p * n - sum(x.numel() for x in g) for p, g in zip(parts, groups))
        bucket = DEEPSPEED_BUCKET    # allocated whole, whatever the model's size
        return dict(
            parameters=Term(sum(p.numel() * low for p in params) + padding * low + buffers,
                            "computed, not traced: every parameter on every rank (DeepSpeed casts them to "
                            f"{'bf16' if low == 2 else 'fp32'}), trainables in one padded flat buffer per group"),
            gradients=Term((sum(parts) + bucket) * low,
                           f"computed, not traced: this rank's 1/{n} of the gradients + the reduce bucket"),
            optimizer=Term(sum(parts) * 12 + 4 * len(parts),
                           f"computed, not traced: this rank's 1/{n} of fp32 master weights and Adam's two moments"),
            gathered=Term(0, "parameters all held"),
            step=Term(sum(parts) * (4 + 4), "fp32 gradient partition and foreach temporaries"))
    if launch.engine == "zero3":
        threshold = 10 * model.llm.config.get_text_config().hidden_size   # as train.py sets it
        held = sum(math.ceil(p.numel() / n) + (p.numel() if p.numel() <= threshold else 0) for p in params)
        parts = sum(math.ceil(p.numel() / n) for p in trainable)
        layer = max((sum(q.numel() for q in block.parameters()) for block in blocks(model)), default=0)
        bucket = DEEPSPEED_BUCKET    # allocated whole, whatever the model's size
        return dict(
            parameters=Term(held * low + buffers, f"computed, not traced: this rank's 1/{n} of each parameter (those of "
                            f"{threshold:,} elements or fewer whole)"),
            gradients=Term((parts + bucket) * low,
                           f"computed, not traced: this rank's 1/{n} of the gradients + the reduce bucket"),
            optimizer=Term(parts * 12 + 4 * len(groups),
                           f"computed, not traced: this rank's 1/{n} of fp32 master weights and Adam's two moments"),
            gathered=Term(2 * layer * low, "with two layers gathered"),
            step=Term(parts * 8, "fp32 gradient partition and foreach temporaries"))


@contextmanager
def fsdp2_sharded(model, launch: Launch):
    """The model as accelerate's FSDP2 preparation shards it for rank 0 of launch.processes, on a fake process
    group (collectives return at once; torchtitan's memory estimator does the same), or the model as it is for the
    other engines. The FSDP plugin comes from the launched environment (FSDP_*) or from --plan_config."""
    if launch.engine != "fsdp2":
        yield model
        return
    import torch.distributed as dist
    from accelerate.utils import FullyShardedDataParallelPlugin
    from accelerate.utils.fsdp_utils import fsdp2_prepare_model
    from torch.testing._internal.distributed.fake_pg import FakeStore
    plugin = FullyShardedDataParallelPlugin(**{FSDP_SETTINGS[k]: v for k, v in launch.fsdp.items() if k in FSDP_SETTINGS})
    if launch.mixed_precision != "no":
        plugin.set_mixed_precision(launch.mixed_precision)
    accelerator = SimpleNamespace(state=SimpleNamespace(fsdp_plugin=plugin), mixed_precision=launch.mixed_precision,
                                  is_main_process=True, torch_device_mesh=None, device=torch.device("cpu"))
    dist.init_process_group("fake", rank=0, world_size=launch.processes, store=FakeStore())
    try:
        yield fsdp2_prepare_model(accelerator, model)
    finally:
        dist.destroy_process_group()


FSDP_SETTINGS = {"fsdp_version": "fsdp_version", "fsdp_auto_wrap_policy": "auto_wrap_policy",  # config -> plugin
                 "fsdp_transformer_layer_cls_to_wrap": "transformer_cls_names_to_wrap",
                 "fsdp_reshard_after_forward": "reshard_after_forward", "fsdp_state_dict_type": "state_dict_type"}


def blocks(model) -> list:
    """The repeated blocks engines gather one at a time: the LLM's decoder layers and the LR tower's layers."""
    from model import _repeated_blocks
    return [b for part in (model.llm, model.vision_tower.model) for b in _repeated_blocks(part)]
