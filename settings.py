"""What a training run is told: a recipe (YAML) and the command line become the three settings dataclasses,
checked before anything loads.

    model_args, data_args, args = parse_args(["recipes/mgm_7b_finetune.yaml", "--learning_rate", "1e-5"])
    check_args(model_args, args, data_args)     # every setting in its range, no impossible combination
    check_paths(model_args, data_args, args)    # every file and checkpoint it names is there and is what it must be

ModelArguments live in model.py, DataArguments in data.py, TrainArguments here. `train.py --help` shows every
field, grouped by dataclass: its help is the comment beside the field (cli.add_settings), then its default and the
range setting_ranges allows, so the two are one text. A mistake is a UserError: one line naming the setting.
"""
from __future__ import annotations

import dataclasses
import os
import sys
from dataclasses import dataclass

import yaml
from transformers import AttentionInterface

import cli
import conversation
import data
import dpo
import images
import model as mgm
import vision
from cli import UserError
from refs import check_export, check_model_ref, portable_refs

@dataclass
class TrainArguments:
    output_dir: str = "runs/mgm"         # this run's checkpoints, metrics.jsonl, tracker logs and (by default) export
    overwrite_output_dir: bool = False   # delete another run's files in output_dir first (else: refuse to start)
    export_dir: str = ""                 # the final export; "": <output_dir>/export
    stage: str = "finetune"              # pretrain: projector + mining train (LLM, towers frozen); finetune: LLM too;
    #                                      dpo: preference pairs, the LLM alone trains (dpo.py)
    tune: str = "full"                   # finetune / dpo train the LLM (full) or LoRA adapters on it (lora; qlora: 4/8 bits)
    lora_r: int = 64                     # LoRA rank
    lora_alpha: int = 16                 # LoRA scale numerator: adapters are scaled by lora_alpha / lora_r
    lora_dropout: float = 0.05           # dropout on the LoRA adapters' input
    # Switches on top of the stage (MGM / DeepSpeed-VisualChat): what else trains, what does not.
    freeze_projector: bool = False       # keep the projector as loaded (pretrained_mm_path); mining still trains
    train_embeddings: bool = False       # freeze the LLM but train its token embeddings and lm_head (DS-VisualChat)
    tune_vision_tower: bool = False      # train the last half of the CLIP layers that feed the selected layer
    tune_vision_tower_aux: bool = False  # train the HR tower's last stage
    # Preference tuning (stage dpo; data_path holds preference pairs, dpo.py).
    beta: float = 0.1                    # how far from the reference the policy may move (DPO's beta)
    loss_type: str = "sigmoid"           # sigmoid | ipo | hinge | bco_pair | sft, or a mixture "name:weight,...";
    #                                      mpo = sigmoid:0.8,bco_pair:0.2,sft:1.0
    reference: str = "auto"              # adapter: the policy with its LoRA disabled; copy: a frozen copy of the
    #                                      starting LLM; precomputed: log-probs of one pass before training (kept in
    #                                      output_dir); auto: adapter under LoRA / QLoRA, else copy
    # Optimizer and schedule: AdamW, linear warmup then cosine to zero, stepped once per optimizer step.
    learning_rate: float = 2e-5          # peak learning rate
    projector_lr: float | None = None    # the projector's peak learning rate; none: learning_rate
    mining_lr: float | None = None       # patch info mining's peak learning rate; none: projector_lr
    vision_tower_lr: float | None = None  # the towers' peak learning rate when tuned; none: learning_rate
    lr_multi: str = ""                   # "name:factor,...": lr *= factor for parameters whose name contains name
    weight_decay: float = 0.0            # AdamW weight decay, never applied to norms and biases
    adam_beta1: float = 0.9              # AdamW beta1
    adam_beta2: float = 0.999            # AdamW beta2
    warmup_ratio: float = 0.03           # fraction of the optimizer steps spent warming the learning rate up
    max_grad_norm: float = 1.0           # gradient clipping; <= 0: no clipping (the norm is still logged)
    per_device_batch_size: int = 4       # samples (packed rows with packing) per micro-batch per process
    gradient_accumulation_steps: int = 1  # micro-batches per optimizer step
    num_epochs: float = 1.0              # passes over the data (fractions allowed)
    max_steps: int = -1                  # optimizer steps; -1: as many as num_epochs takes
    seed: int = 42                       # initial weights of new modules, data order, dropout
    num_workers: int = 4                 # dataloader processes per training process (0: load in the main one)
    # Logging, evaluation, checkpoints.
    logging_steps: int = 1               # a log line (and metrics.jsonl / tracker entry) every this many steps
    peak_tflops: float = 0.0             # one device's dense bf16 peak for MFU; 0: known by the GPU's name (A100, H100,
    #   H200, L40S, A10, RTX 4090 / 3090, ...; a CPU or another GPU: MFU unknown)
    report_to: str = "tensorboard"       # comma list of accelerate trackers (tensorboard, wandb), or "none"
    eval_data_path: str = ""             # held-out records (same format as data_path): eval loss every eval_steps
    eval_steps: int = 0                  # evaluate every this many steps; 0: only at the end
    save_steps: int = 500                # a resume checkpoint every this many steps (and at the end)
    save_total_limit: int = 2            # resume checkpoints kept; older ones of this run are deleted
    resume: str = ""                     # "auto": newest complete checkpoint in output_dir; or a checkpoint dir.
    #   A resumed run may change only how long it runs and what it reports or saves (max_steps, num_epochs,
    #   logging / eval / save steps, max_time, ...); any other setting must match.
    max_bad_steps: int = 3               # stop after this many non-finite steps in a row
    max_skip_fraction: float = 0.1       # stop when more of the records seen so far were unusable (checked from 50)
    max_time: str = ""                   # stop with a checkpoint before this much time since start has passed:
    #   seconds or [D-]HH:MM:SS as SLURM writes it (23:30:00 in a 24-hour job); "" = no limit. Stops as SIGTERM
    #   does: exit status 75, continue with --resume auto.
    ddp_find_unused_parameters: bool = True  # text-only batches leave projector and mining without gradients
    # Memory plan (plan.py): one worst-case step traced on fake tensors, per device, then exit; nothing is written.
    plan: bool = False                   # print the memory plan of this recipe under its launch instead of training
    device_memory_gb: float = 0.0        # --plan: one device's memory in GiB; 0: the CUDA device's
    plan_config: str = ""                # --plan without accelerate launch: the accelerate config to plan for
    plan_processes: int = 0              # --plan: processes (GPUs) to plan for; 0: the launch's / plan_config's


# The settings, grouped as --help shows them: model (model.py), data (data.py), training (above).
SETTINGS = (("model: the LLM, the two vision towers, the projector", mgm.ModelArguments),
            ("data: records, images, chat template", data.DataArguments),
            ("training: stage, what trains, optimizer, checkpoints, --plan", TrainArguments))


# train.py --help: what it does, then (after the settings) examples and the exit statuses.
TRAIN_HELP = """\
Train one Mini-Gemini stage (pretrain or finetune), on one process or under accelerate launch (one GPU, DDP,
DeepSpeed, FSDP: the accelerate config decides). The recipe (YAML: `setting: value` lines) comes first; every
setting below can follow it and wins. Booleans take true / false, optional settings none."""
TRAIN_EXAMPLES = """\
examples:
  accelerate launch --config_file accelerate_configs/single_gpu.yaml train.py \\
      recipes/mgm_7b_finetune_yours_qlora.yaml --data_path data/mine.json --image_folder data/images
  accelerate launch --config_file accelerate_configs/deepspeed_zero3.yaml train.py recipes/mgm_7b_finetune_yours.yaml \\
      --init_from runs/mgm-7b-yours/export --data_path data/more.json --output_dir runs/round-2   # from any export
  python train.py recipes/demo_finetune.yaml --max_steps 20 --learning_rate 1e-4   # one process, a few steps
  python train.py recipes/mgm_7b_finetune.yaml --plan --plan_config accelerate_configs/deepspeed_zero3.yaml \\
      --plan_processes 8 --device_memory_gb 80       # will it fit? memory of one step, nothing trained
  accelerate launch ... train.py RECIPE --resume auto   # continue a stopped run from its newest checkpoint

exit status of train.py: 0 done; 75 stopped early by SIGTERM / SIGUSR1 / Ctrl-C / --max_time with a checkpoint
(continue with --resume auto; accelerate launch turns it into 1, slurm/train.sbatch reads the 75); 2 a settings or
path mistake (one line says which); 1 a crash; 130 a second Ctrl-C.
The export lands in <output_dir>/export: eval.py, chat.py and web.py take it as --model."""


def parse_args(argv: list[str] | None = None):
    """(model_args, data_args, train_args) from `recipe.yaml [--field value ...]`; the command line wins."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0].endswith((".yaml", ".yml")):
        argv = recipe_to_argv(read_recipe(argv.pop(0))) + argv
    elif argv and not argv[0].startswith("-"):
        raise UserError(f"{argv[0]}: a recipe is a .yaml / .yml file; settings follow it as --setting value")
    namespace, unknown = settings_parser().parse_known_args(argv)
    if unknown:  # no prefix abbreviations either: --max_step is not --max_steps
        raise UserError(f"unknown setting(s) {' '.join(unknown)}: the fields are listed by train.py --help "
                        "(a recipe, a .yaml file, comes first)")
    model_args, data_args, args = (cli.settings_from(namespace, cls) for _, cls in SETTINGS)
    given = {a[2:].partition("=")[0] for a in argv if a.startswith("--")}
    start_from_export(model_args, data_args, given)
    return model_args, data_args, args


def start_from_export(model_args, data_args, given: set[str]) -> None:
    """init_from: every model setting that says what the model is (LLM, towers, projector, image sizes, ...) becomes
    the export's own, and so do its attention and the template / image_aspect_ratio it was trained with, unless the
    recipe names them (a pretrain export's `plain` template and its captioning crop are not taken: a finetune
    follows it). A recipe naming a different LLM, tower or shape is refused with one line instead of loading
    weights into the wrong model."""
    if not model_args.init_from:
        return
    if not os.path.isdir(model_args.init_from):
        raise UserError(f"init_from: {model_args.init_from}: no such directory{cli.relative(model_args.init_from)}; "
                        "an export is what train.py writes to <output_dir>/export, or what convert.py from-mgm / "
                        "from-llava / from-llava-next makes of released weights")
    meta = check_export(model_args.init_from, "init_from")
    export = model_args.init_from.rstrip("/")
    if model_args.pretrained_mm_path:
        raise UserError(f"init_from and pretrained_mm_path both name weights to start from: {export} already holds "
                        "its projector and mining; drop pretrained_mm_path")
    if meta["export"] == "lora" and model_args.bits < 16:
        raise UserError(f"init_from: {export} is a LoRA export, and a {model_args.bits}-bit LLM cannot take its "
                        f"adapters merged in: merge it first (python model.py merge {export} {export}-merged) "
                        "and start from the merged export")
    saved = meta["args"]
    for f in dataclasses.fields(model_args):
        if f.name not in saved or (f.name in mgm.RUNTIME_SETTINGS and f.name != "attention"):
            continue
        ours, theirs = getattr(model_args, f.name), saved[f.name]
        if f.name == "attention" and (f.name in given and ours != theirs and "mmca" not in (ours, theirs)):
            continue   # sdpa, eager, flash...: the same function, computed another way
        if f.name in given and portable_refs({f.name: ours}) != portable_refs({f.name: theirs}):
            raise UserError(f"init_from: {export} was built with {f.name}: {theirs}, but this run says "
                            f"{f.name}: {ours}; drop {f.name} from the recipe and the command line (init_from "
                            "brings the export's own), or start from another export")
        setattr(model_args, f.name, theirs)
    train_config = os.path.join(export, "train_config.yaml")
    trained = (yaml.safe_load(open(train_config)) or {}) if os.path.exists(train_config) else {}
    for name in ("template", "image_aspect_ratio"):
        if name not in given and trained.get(name) and meta["export"] != "pretrain":
            setattr(data_args, name, trained[name])


def settings_parser() -> cli.ArgumentParser:
    """One option per field of the settings dataclasses, grouped by them; the comment beside each field is its
    help, followed by its default and the range check_args allows."""
    parser = cli.ArgumentParser(
        prog="train.py", allow_abbrev=False, usage="accelerate launch [--config_file CONFIG] train.py "
        "[RECIPE.yaml] [--setting VALUE ...]", description=TRAIN_HELP, epilog=TRAIN_EXAMPLES)
    allowed = {name: rule for name, _, _, rule in setting_ranges(mgm.ModelArguments(), TrainArguments(),
                                                                 data.DataArguments(data_path=""))}
    for title, cls in SETTINGS:
        cli.add_settings(parser, cls, title, allowed)
    return parser


def read_recipe(path: str) -> dict:
    """A recipe: a YAML file of `setting: value` lines."""
    cli.check_path(path, "recipe")
    with open(path) as f:
        try:
            recipe = yaml.safe_load(f) or {}
        except yaml.YAMLError as e:
            raise UserError(f"recipe {path} is not valid YAML: {' '.join(str(e).split())}") from None
    if not isinstance(recipe, dict):
        raise UserError(f"recipe {path} is not a mapping of settings (setting: value lines)")
    return recipe


def recipe_to_argv(recipe: dict) -> list[str]:
    """A flat YAML mapping as command-line options (an unknown key is refused, as on the command line): null is
    none, a list is joined by "," (data_path's form for several sources)."""
    argv = []
    for key, value in recipe.items():
        if value is None or isinstance(value, bool):
            value = str(value).lower()
        argv += [f"--{key}", ",".join(map(str, value)) if isinstance(value, list) else str(value)]
    return argv


def resolved_config(*arg_objects) -> dict:
    """One flat mapping of every field: a valid recipe, saved with every checkpoint and export."""
    config = {}
    for obj in arg_objects:
        config.update(dataclasses.asdict(obj))
    return config


def check_args(model_args, args: TrainArguments, data_args=None) -> None:
    """Every setting against its allowed range: the first one out of range is named, with the range. Pure (no
    file is read), so a recipe can be checked anywhere; check_paths looks at the files."""
    for name, value, ok, allowed in setting_ranges(model_args, args, data_args):
        if not ok:
            raise UserError(f"{name}: {value!r} is out of range, allowed: {allowed}")
    parse_lr_multi(args.lr_multi)
    bits = model_args.bits
    if (args.tune == "qlora") != (bits in (4, 8)):
        raise UserError(f"tune {args.tune} with bits {bits}: qlora needs bits 4 or 8, and a quantized LLM "
                        "can only be trained through LoRA adapters (tune: qlora)")
    if model_args.random_init and bits != 16:
        raise UserError(f"random_init with bits {bits}: random_init builds an unquantized LLM from its config; "
                        "use bits 16, or quantize a saved checkpoint (random_init: false)")
    if args.train_embeddings and (args.stage, args.tune) != ("finetune", "full"):
        raise UserError(f"train_embeddings with stage {args.stage}, tune {args.tune}: it needs stage finetune and "
                        "tune full (only a full export holds embeddings)")
    check_anyres_settings(model_args, data_args)
    if args.tune != "full" and args.stage == "pretrain":
        raise UserError(f"tune {args.tune} with stage {args.stage}: LoRA / QLoRA adapters are a finetune / dpo "
                        "stage option (stage: finetune, or tune: full)")
    if args.stage == "dpo":
        dpo.check_settings(args, data_args)


def check_anyres_settings(model_args, data_args=None) -> None:
    """AnyRes is a model setting (image_grid_pinpoints: the model gets image_newline) and a data one
    (image_aspect_ratio anyres): both or neither; and the rest of the model must fit LLaVA-NeXT's layout."""
    pinpoints = model_args.image_grid_pinpoints
    if data_args is not None and (data_args.image_aspect_ratio == "anyres") != bool(pinpoints):
        raise UserError("image_aspect_ratio anyres goes with image_grid_pinpoints (default: LLaVA-NeXT's grids), and "
                        f"image_grid_pinpoints with image_aspect_ratio anyres; got {data_args.image_aspect_ratio!r} "
                        f"and {pinpoints!r}")
    if not pinpoints:
        return
    try:
        images.parse_pinpoints(pinpoints, 1)      # the form only: sides are checked against the tower at build
        vision.check_anyres(model_args, model_args.mm_use_im_start_end)
    except ValueError as e:
        raise UserError(str(e)) from None


def setting_ranges(model_args, args: TrainArguments, data_args=None) -> list[tuple[str, object, bool, str]]:
    """(setting, value, in range?, the allowed range) for every setting with a range."""
    a, m = args, model_args
    # transformers' own (its paged "a|b" variants are for serving) and mmca, which model.py registers
    attentions = sorted({"eager", *(k for k in AttentionInterface().valid_keys() if "|" not in k)})
    optional_lr = "none or > 0"
    rules = [
        ("stage", a.stage, a.stage in ("pretrain", "finetune", "dpo"), "pretrain | finetune | dpo"),
        ("beta", a.beta, a.beta > 0, "> 0"),
        ("reference", a.reference, a.reference in dpo.REFERENCES, " | ".join(dpo.REFERENCES)),
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
        ("max_time", a.max_time, _is_duration(a.max_time), 'seconds or [D-]HH:MM:SS (e.g. 23:30:00), or "" for none'),
        ("device_memory_gb", a.device_memory_gb, a.device_memory_gb >= 0, ">= 0 (0: the CUDA device's)"),
        ("plan_processes", a.plan_processes, a.plan_processes >= 0, ">= 0 (0: the launch's)"),
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
        ("anyres_max_tiles", m.anyres_max_tiles, m.anyres_max_tiles >= 0, ">= 0 (0: no limit)"),
        ("image_size_aux", m.image_size_aux, m.image_size_aux >= 1, ">= 1"),
        ("perceiver_queries", m.perceiver_queries, m.perceiver_queries >= 1, ">= 1"),
        ("projector_heads", m.projector_heads, m.projector_heads >= 1, ">= 1"),
        ("attention", m.attention, m.attention in attentions, " | ".join(attentions)),
    ]
    if data_args is not None:
        d = data_args
        templates = sorted(conversation.TEMPLATES)   # "auto" included
        rules += [
            ("template", d.template, d.template in templates, " | ".join(templates)),
            ("image_aspect_ratio", d.image_aspect_ratio, d.image_aspect_ratio in data.ASPECT_RATIOS,
             " | ".join(data.ASPECT_RATIOS)),
            ("bad_sample", d.bad_sample, d.bad_sample in ("skip", "error"), "skip | error"),
            ("max_length", d.max_length, d.max_length >= 1, ">= 1"),
            ("num_frames", d.num_frames, d.num_frames >= 1, ">= 1"),
            ("max_image_pixels", d.max_image_pixels, d.max_image_pixels >= 1, ">= 1"),
            ("num_proc", d.num_proc, d.num_proc is None or d.num_proc >= 1, "none or >= 1"),
        ]
    return rules


def _is_duration(text: str) -> bool:
    try:
        return duration_seconds(text) >= 0
    except ValueError:
        return False


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
            raise UserError(f"lr_multi: {item!r} is not name:factor with a factor > 0 (e.g. projector:0.1)")
        pairs.append((name.strip(), value))
    return pairs


def check_paths(model_args, data_args, args: TrainArguments) -> None:
    """The files a run reads exist and are what they are meant to be, checked before anything is loaded; a hub
    name must be in the cache when offline (refs.check_model_ref)."""
    if model_args.init_from:   # the export's own base checkpoints, if it has any, are checked as it loads
        check_model_ref(model_args.init_from, "init_from", kind="tokenizer")   # the export's tokenizer
    else:
        for setting in ("llm", "vision_tower", "vision_tower_aux", "pretrained_mm_path"):
            check_model_ref(getattr(model_args, setting), setting)
        check_model_ref(model_args.llm, "llm", kind="tokenizer")   # the tokenizer comes with the LLM
    data.check_data_path(data_args.data_path, "data_path")
    if args.eval_data_path:
        data.check_data_path(args.eval_data_path, "eval_data_path")
    cli.check_path(data_args.image_folder, "image_folder", "dir")
    if args.resume not in ("", "auto") and not os.path.isdir(args.resume):
        raise UserError(f"resume: {args.resume} is not a checkpoint directory (or pass --resume auto)")
    if os.path.isfile(args.output_dir):
        raise UserError(f"output_dir: {args.output_dir} is a file; name a directory")
    export_dir = args.export_dir or os.path.join(args.output_dir, "export")
    if os.path.isdir(export_dir) and os.listdir(export_dir) and \
            not os.path.exists(os.path.join(export_dir, mgm.CONFIG_NAME)):
        raise UserError(f"export_dir: {export_dir} holds other files (no {mgm.CONFIG_NAME}); the export "
                        "replaces the directory, so choose an empty or new one")
    if model_args.init_from and os.path.realpath(model_args.init_from) == os.path.realpath(export_dir):
        raise UserError(f"init_from: {model_args.init_from} is where this run writes its own export (and what "
                        "--overwrite_output_dir deletes); start from a copy of it, or set output_dir / export_dir "
                        "elsewhere")


def duration_seconds(text: str) -> float:
    """--max_time: "" (no limit, 0), seconds ("5400", "90.5"), or [D-]HH:MM:SS / MM:SS as SLURM writes a time limit.
    Raises ValueError for anything else."""
    text = text.strip()
    if not text:
        return 0.0
    days, _, clock = text.rpartition("-") if "-" in text else ("0", "", text)
    parts = clock.split(":")
    if len(parts) > 3 or not days.isdigit() or not all(p.replace(".", "", 1).isdigit() for p in parts):
        raise ValueError(f"{text!r} is not seconds or [D-]HH:MM:SS")
    seconds = sum(float(p) * 60 ** i for i, p in enumerate(reversed(parts)))
    return int(days) * 86400 + seconds
