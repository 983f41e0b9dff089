"""Convert checkpoints: released Mini-Gemini (MGM) and LLaVA-1.5 weights in, transformers' Llava out.

    python convert.py from-mgm SRC DST [--vision_tower ID] [--vision_tower_aux ID] [--llm ID] [--template NAME]
    python convert.py from-llava SRC DST [--vision_tower ID] [--llm ID] [--template NAME]
    python convert.py to-llava-hf SRC DST
    python convert.py from-llava-next SRC DST [--template NAME]
    python convert.py to-llava-next SRC DST

examples:
  hf download YanweiLi/MGM-7B --local-dir ckpt/MGM-7B
  python convert.py from-mgm ckpt/MGM-7B runs/mgm-7b                  # a full export
  python convert.py from-mgm ckpt/MGM-Pretrain/MGM-7B runs/mgm-7b-pretrain/export --llm lmsys/vicuna-7b-v1.5
  python convert.py from-llava ckpt/llava-v1.5-7b runs/llava-1.5-7b
  python convert.py to-llava-hf runs/llava-1.5-7b runs/llava-1.5-7b-hf
`python convert.py COMMAND --help` says more about each.

from-mgm / from-llava: SRC is either a full checkpoint directory (config.json with the `mm_*` fields; the LLM's
weights plus `model.mm_projector.*`, MGM's `model.vlm_uni_{query,aux,val}_projector.*` and, optionally, the towers'
weights) or a stage-1 directory holding `mm_projector.bin` (or that file itself). DST becomes a full export, or a
pretrain export (projector + mining only) that `pretrained_mm_path` can start a finetune from. Every tensor of the
source is used, or the conversion stops naming it; a summary says where each group of tensors went.
Pickles (`*.bin`) are read with torch.load(weights_only=True) only.

to-llava-hf: an export without an HR tower (plain LLaVA) becomes a directory that transformers'
AutoModelForImageTextToText / AutoProcessor (and vLLM / SGLang, which read the same layout) load (llava_hf.py).

from-llava-next / to-llava-next: transformers' LlavaNext directories (llava-hf/llava-v1.6-*: AnyRes tiles, an
image_newline) in and out; in, also the original llava-v1.6 layout (a LLaVA checkpoint with image_aspect_ratio
anyres, spatial_unpad; its pinpoints read as (h, w), as transformers reads them), the export is an AnyRes one
(image_aspect_ratio anyres) computing the same logits; out, an AnyRes export without an HR tower becomes a
LlavaNextForConditionalGeneration + LlavaNextProcessor directory.
"""
from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path

import torch
import yaml
from safetensors import safe_open
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
from transformers.utils import logging

from cli import ArgumentParser, UserError, check_new_dir, relative, run
from conversation import TEMPLATES
from images import CLIP_MEAN, CLIP_STD, LLAVA_NEXT_GRIDS
from llava_hf import to_llava_hf, to_llava_next
from model import CONFIG_NAME, IM_END, IM_START, MiniGemini, ModelArguments, TimmTrunkTower, VisionTower
from refs import check_model_ref

# MGM's released configs name towers and LLMs by local `model_zoo/...` paths; these are the checkpoints they hold.
MODEL_ZOO = {
    "OpenAI/clip-vit-large-patch14-336": "openai/clip-vit-large-patch14-336",
    "OpenAI/openclip-convnext-large-d-320-laion2B-s29B-b131K-ft-soup":
        "hf-hub:laion/CLIP-convnext_large_d_320.laion2B-s29B-b131K-ft-soup",
    "LLM/vicuna/7B-V1.5": "lmsys/vicuna-7b-v1.5",
    "LLM/vicuna/13B-V1.5": "lmsys/vicuna-13b-v1.5",
    "LLM/gemma/gemma-2b-it": "google/gemma-2b-it",
    "LLM/llama-3/Meta-Llama-3-8B-Instruct": "meta-llama/Meta-Llama-3-8B-Instruct",
    "LLM/llama-3/Meta-Llama-3-70B-Instruct": "meta-llama/Meta-Llama-3-70B-Instruct",
    "LLM/mixtral/Mixtral-8x7B-Instruct-v0.1": "mistralai/Mixtral-8x7B-Instruct-v0.1",
    "LLM/Nous-Hermes-2-Yi-34B": "NousResearch/Nous-Hermes-2-Yi-34B",
}
# The LLM family behind each MGM / LLaVA config class (their model_type), as transformers names it.
LLM_TYPES = {"mgm": "llama", "mgm_gemma": "gemma", "mgm_mixtral": "mixtral", "mgm_mistral": "mistral",
             "llava": "llama", "llava_llama": "llama", "llava_mistral": "mistral"}
# Config fields MGM / LLaVA add to the LLM's config (the LLM's own config.json gets none of them).
MM_FIELDS = ("image_aspect_ratio", "image_grid", "image_grid_pinpoints", "image_global", "image_size_aux",
             "optimize_vision_tower", "optimize_vision_tower_aux", "tokenizer_model_max_length",
             "tokenizer_padding_side", "tune_mm_mlp_adapter", "freeze_mm_mlp_adapter", "use_mm_proj",
             "unfreeze_mm_vision_tower", "model_path", "architectures", "auto_map", "_name_or_path")
# Source key prefix -> ours (model.py's module names).
RENAMES = (
    ("model.mm_projector.", "projector."),
    ("model.vlm_uni_query_projector.", "mining.query."),      # Q: LayerNorm + Linear on the LR features
    ("model.vlm_uni_aux_projector.", "mining.key."),          # K: on the HR map
    ("model.vlm_uni_val_projector.", "mining.value."),        # V: on the HR map
    ("model.vision_tower.vision_tower.", "vision_tower.model."),      # CLIPVisionTower wraps a CLIPVisionModel
    ("model.vision_tower_aux.vision_stem.", "vision_tower_aux.stem."),
    ("model.vision_tower_aux.vision_stages.", "vision_tower_aux.stages."),
    ("model.image_newline", "image_newline"),                 # LLaVA-NeXT (anyres, spatial_unpad)
)
# Multimodal prefixes that nothing above maps: a source holding them is not one this script understands.
MM_PREFIXES = ("model.mm_projector", "model.vlm_uni", "model.vision_tower", "model.vision_resampler",
               "model.vision_fpn")
# Buffers older transformers saved that are recomputed from the config (never trained).
DERIVED = (".rotary_emb.inv_freq", "embeddings.position_ids")


# =============================================================================================================
# MGM / LLaVA-1.5 -> our export
# =============================================================================================================
def from_source(src, dst, *, source: str = "mgm", llm: str | None = None, vision_tower: str | None = None,
                vision_tower_aux: str | None = None, template: str | None = None) -> dict:
    """An MGM (source="mgm") or LLaVA-1.5 (source="llava") checkpoint -> our export at dst. Returns the summary:
    how many source tensors went where."""
    src_dir, config, pretrain = read_source_config(src)
    has_aux = bool(config.get("mm_vision_tower_aux"))
    if source == "mgm" and not has_aux:
        raise UserError(f"{src_dir / 'config.json'}: no mm_vision_tower_aux, so not a Mini-Gemini checkpoint "
                        "(a LLaVA one? use from-llava)")
    if source == "llava" and has_aux:
        raise UserError(f"{src_dir / 'config.json'}: mm_vision_tower_aux is set, a Mini-Gemini checkpoint: "
                        "use from-mgm")
    args = model_arguments(config, src_dir, vision_tower=vision_tower, vision_tower_aux=vision_tower_aux)
    for setting in ("vision_tower", "vision_tower_aux"):   # before any weights load
        check_model_ref(getattr(args, setting), setting)
    aspect = {"pad": "pad", "square": "crop", None: "crop", "anyres": "anyres"}.get(config.get("image_aspect_ratio"))
    if aspect is None:
        raise UserError(f"{src_dir / 'config.json'}: image_aspect_ratio {config['image_aspect_ratio']!r} is not "
                        "supported (pad, anyres, or square/absent for MGM's short-side resize and center crop)")
    if aspect == "anyres" and config.get("mm_patch_merge_type") != "spatial_unpad":
        raise UserError(f"{src_dir / 'config.json'}: image_aspect_ratio anyres with mm_patch_merge_type "
                        f"{config.get('mm_patch_merge_type')!r}: only LLaVA-NeXT's spatial_unpad is supported")
    files = weight_files(src_dir, pretrain)
    keys = source_keys(files)
    summary = {"source": str(src_dir), "export": "pretrain" if pretrain else "full"}
    with tempfile.TemporaryDirectory() as tmp:
        if pretrain:
            model, tokenizer, state = build_pretrain(src_dir, config, files, keys, args, llm, summary)
            weights = "pretrain"
        else:
            model, tokenizer = build_full(src_dir, config, files, keys, args, Path(tmp), summary)
            state, weights = None, "full"
        model.save_pretrained(dst, tokenizer, weights=weights, state_dict=state)
    template = template or default_template(config, tokenizer, pretrain)
    # What eval.py / chat.py read to prepare inputs as the source model was trained.
    Path(dst, "train_config.yaml").write_text(yaml.safe_dump({"template": template, "image_aspect_ratio": aspect}))
    summary.update(template=template, image_aspect_ratio=aspect)
    return summary


def read_source_config(src) -> tuple[Path, dict, bool]:
    """(directory, config.json, is a stage-1 mm_projector.bin)."""
    src = Path(src)
    if not src.exists():
        raise UserError(f"src: {src}: no such file or directory{relative(str(src))}")
    src_dir = src.parent if src.is_file() else src
    if (src_dir / CONFIG_NAME).exists():
        raise UserError(f"src: {src_dir} is an export of this repo already ({CONFIG_NAME}): eval.py, chat.py and "
                        "train.py take it as it is; to-llava-hf makes a transformers Llava model of it")
    if not (src_dir / "config.json").exists():
        raise UserError(f"{src_dir}: no config.json (an MGM / LLaVA checkpoint directory has one)")
    config = json.loads((src_dir / "config.json").read_text())
    if not config.get("mm_vision_tower"):
        raise UserError(f"{src_dir / 'config.json'}: no mm_vision_tower, not a multimodal checkpoint")
    pretrain = src.name == "mm_projector.bin" or not _full_weight_files(src_dir)
    if pretrain and not (src_dir / "mm_projector.bin").exists():
        raise UserError(f"{src_dir}: neither model weights (*.safetensors, pytorch_model*.bin) nor "
                        "mm_projector.bin")
    return src_dir, config, pretrain


def model_arguments(config: dict, src_dir: Path, *, vision_tower=None, vision_tower_aux=None) -> ModelArguments:
    """The source's mm_* settings as ours; towers named by hub id (model_zoo/... paths mapped, overrides win)."""
    where = src_dir / "config.json"
    projector = config.get("mm_projector_type", "linear")
    if not (projector == "linear" or re.fullmatch(r"mlp\d+x_gelu", projector)):
        raise UserError(f"{where}: mm_projector_type {projector!r} is not supported (linear or mlpNx_gelu)")
    aux = config.get("mm_vision_tower_aux")
    aux_ref = vision_tower_aux or (hub_id(aux, "mm_vision_tower_aux", where) if aux else None)
    if aux_ref and not (config.get("image_size_aux") and config.get("mm_hidden_size_aux")):
        raise UserError(f"{where}: mm_vision_tower_aux is set but image_size_aux / mm_hidden_size_aux are missing")
    image_grid, image_global = int(config.get("image_grid", 1)), bool(config.get("image_global", False))
    pins = config.get("image_grid_pinpoints") if config.get("image_aspect_ratio") == "anyres" else None
    return ModelArguments(
        llm="", vision_tower=vision_tower or hub_id(config["mm_vision_tower"], "mm_vision_tower", where),
        vision_tower_aux=aux_ref, projector=projector,
        mm_vision_select_layer=int(config.get("mm_vision_select_layer", -2)),
        mm_vision_select_feature=config.get("mm_vision_select_feature", "patch"),
        mm_use_im_start_end=bool(config.get("mm_use_im_start_end", False)),
        image_size_aux=int(config.get("image_size_aux") or 768), image_grid=image_grid,
        image_global=image_global and image_grid > 1,
        image_grid_pinpoints=",".join(f"{h}x{w}" for h, w in pins or []),   # read as (h, w), as transformers does
        dtype=str(config.get("torch_dtype") or config.get("dtype") or "float16").removeprefix("torch."))


def hub_id(path: str, field: str, where) -> str:
    """A `model_zoo/...` path as the hub id of the checkpoint it holds; anything else (hub id, dir) as is."""
    if "model_zoo/" not in path:
        return path
    name = path.split("model_zoo/", 1)[1].strip("/")
    if name not in MODEL_ZOO:
        raise UserError(f"{where}: {field} is the local path {path!r}, which maps to no known checkpoint; "
                        f"pass --{field.removeprefix('mm_')} with its hub id or directory")
    return MODEL_ZOO[name]


def build_full(src_dir, config, files, keys, args, tmp: Path, summary):
    """Full checkpoint: the LLM through transformers' own loading (so its checkpoint conversions apply), the
    multimodal tensors by name, the towers from their checkpoints with any tensors the source holds on top."""
    mm, llm_keys, derived = classify(keys, src_dir)
    dtype = getattr(torch, args.dtype)
    args.llm = str(src_dir)              # a full export needs no base LLM: this only records where it came from
    tokenizer = AutoTokenizer.from_pretrained(src_dir)
    llm = load_source_llm(src_dir, config, files, set(mm.values()) | set(derived), dtype, tmp)
    im_ids = add_im_tokens(tokenizer, llm, args, src_dir)
    model = assemble(args, llm, mm, files, dtype, im_ids, src_dir, summary)
    summary.update(llm=len(llm_keys), derived_buffers_skipped=len(derived))
    return model, tokenizer


def build_pretrain(src_dir, config, files, keys, args, llm_ref, summary):
    """Stage-1 mm_projector.bin on a base LLM: projector + mining (and the rows of added image tokens) are kept;
    the frozen towers MGM's substring match also saved must equal the tower checkpoints (a pretrain export
    references those, it does not store them)."""
    from accelerate import init_empty_weights
    base = llm_ref or hub_id(config.get("_name_or_path", ""), "llm", src_dir / "config.json")
    if not base or (base.startswith((".", "/")) and not os.path.isdir(base)):
        raise UserError(f"{src_dir / 'config.json'}: the base LLM is {base or 'not named'!r}, not found here; "
                        "pass --llm (the hub id or directory of the LLM mm_projector.bin was trained on)")
    for kind in ("llm", "tokenizer"):
        check_model_ref(base, "llm", f"the base LLM of {src_dir} (--llm): ", kind=kind)
    args.llm = base
    mm, llm_keys, derived = classify(keys, src_dir)
    embed = [k for k in llm_keys if k.endswith("embed_tokens.weight")]
    others = sorted(set(llm_keys) - set(embed))
    if others:
        raise UserError(f"{files[0]}: holds LLM weights besides the embeddings ({others[0]}, ...): not a stage-1 "
                        "projector file")
    dtype = getattr(torch, args.dtype)
    tokenizer = AutoTokenizer.from_pretrained(base)
    with init_empty_weights():           # the LLM is only referenced by a pretrain export: no need for its weights
        llm = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(base), dtype=dtype)
    im_ids = add_im_tokens(tokenizer, llm, args, src_dir)
    model = assemble(args, llm, mm, files, dtype, im_ids, src_dir, summary, towers_must_match=True)
    model.requires_grad_(False)          # nothing is "tuned" in the tower sense: the export keeps projector + mining
    state = model.state_dict()
    if im_ids:
        if not embed:
            raise UserError(f"{files[0]}: mm_use_im_start_end is set but model.embed_tokens.weight (the rows of "
                            "<im_start>/<im_end>) is missing")
        rows = load_tensors(files, embed)[embed[0]]
        if rows.shape[0] <= max(im_ids):
            raise UserError(f"{files[0]}: {embed[0]} has {rows.shape[0]} rows, fewer than the tokenizer with "
                            f"<im_start>/<im_end> needs ({max(im_ids) + 1})")
        embed_name = next(n for n, p in model.named_parameters() if p is llm.get_input_embeddings().weight)
        state[embed_name] = rows.to(dtype)
        summary["embed_tokens"] = "rows of <im_start>/<im_end> kept; the other (frozen) rows are the base LLM's"
    elif embed:
        raise UserError(f"{files[0]}: holds {embed[0]} but mm_use_im_start_end is off: unexpected for stage 1")
    summary.update(derived_buffers_skipped=len(derived))
    return model, tokenizer, state


def assemble(args, llm, mm: dict, files, dtype, im_ids, src_dir, summary, towers_must_match=False) -> MiniGemini:
    """Towers from their checkpoints, then the source's multimodal tensors (ours -> source key) put in place; every
    projector and mining weight must come from the source."""
    vt = VisionTower.load(args.vision_tower, dtype=dtype, select_layer=args.mm_vision_select_layer,
                          select_feature=args.mm_vision_select_feature)
    aux = TimmTrunkTower.load(args.vision_tower_aux, dtype=dtype) if args.vision_tower_aux else None
    model = MiniGemini(args, llm, vt, aux, im_start_end_ids=im_ids)
    tensors = load_tensors(files, list(mm.values()))
    own = {k: v for k, v in model.state_dict().items() if not k.startswith("llm.")}
    new, towers_from_source, towers_equal = {}, 0, 0
    for ours, key in mm.items():
        ours = _in_model(ours, own)
        if ours not in own:
            raise UserError(f"{src_dir}: {key} has no place in this model (no {ours}; check mm_projector_type, "
                            "the towers and the config)")
        tensor = tensors[key]
        if tensor.shape != own[ours].shape:
            raise UserError(f"{src_dir}: {key} has shape {tuple(tensor.shape)}, the model built from config.json "
                            f"and the towers expects {tuple(own[ours].shape)}")
        if ours.startswith("vision_tower"):
            if towers_must_match:
                if not torch.equal(tensor, own[ours].to(tensor.dtype)):
                    raise UserError(f"{src_dir}: {key} differs from the tower checkpoint; pass the tower these "
                                    "weights were trained with (--vision_tower / --vision_tower_aux)")
                towers_equal += 1
                continue
            towers_from_source += 1
        new[ours] = tensor.to(dtype)
    missing = [k for k in own if k.startswith(("projector.", "mining.", "image_newline")) and k not in new]
    if missing:
        raise UserError(f"{src_dir}: {source_name(missing[0])} is missing (needed for {missing[0]})")
    model.load_state_dict(new, strict=False)
    summary.update(projector=sum(k.startswith("projector.") for k in new),
                   mining=sum(k.startswith("mining.") for k in new), tower_tensors_from_source=towers_from_source,
                   tower_tensors_equal_to_checkpoint=towers_equal,
                   towers=[args.vision_tower] + ([args.vision_tower_aux] if args.vision_tower_aux else []))
    return model


def classify(keys: list[str], src_dir) -> tuple[dict, list, list]:
    """Source keys -> ({our multimodal name: source key}, LLM keys, derived buffers). Unknown multimodal keys
    stop the conversion: nothing is dropped silently."""
    mm, llm_keys, derived = {}, [], []
    for key in keys:
        if key.endswith(DERIVED):
            derived.append(key)
            continue
        for prefix, ours in RENAMES:
            if key.startswith(prefix):
                mm[ours + key[len(prefix):]] = key
                break
        else:
            if key.startswith(MM_PREFIXES):
                raise UserError(f"{src_dir}: unknown multimodal weight {key} (not a projector, mining or tower "
                                "weight this script knows)")
            llm_keys.append(key)
    return mm, llm_keys, derived


def _in_model(name: str, own) -> str:
    """transformers 5's CLIPVisionModel has no `vision_model.` level in its module names (its checkpoints, and
    those of MGM and LLaVA, keep it)."""
    wrapped = "vision_tower.model.vision_model."
    if name not in own and name.startswith(wrapped) and "vision_tower.model." + name[len(wrapped):] in own:
        return "vision_tower.model." + name[len(wrapped):]
    return name


def source_name(ours: str) -> str:
    for prefix, mine in RENAMES:
        if ours.startswith(mine):
            return prefix + ours[len(mine):]
    return ours


def load_source_llm(src_dir: Path, config: dict, files, not_llm: set, dtype, tmp: Path):
    """The LLM of an MGM / LLaVA checkpoint, loaded by transformers from a directory of links to the source weights
    and the LLM's own config (MGM's config class and mm_* fields removed). Every LLM weight must be in the source,
    and every source weight that is not multimodal must be the LLM's."""
    model_type = config.get("model_type")
    family = LLM_TYPES.get(model_type, model_type)
    llm_config = {k: v for k, v in config.items() if not k.startswith("mm_") and k not in MM_FIELDS}
    llm_config["model_type"] = family
    try:
        AutoConfig.for_model(family)
    except ValueError:
        raise UserError(f"{src_dir / 'config.json'}: model_type {model_type!r} is no LLM family transformers "
                        f"knows (MGM / LLaVA classes: {sorted(LLM_TYPES)})") from None
    for f in files + [p for p in src_dir.iterdir() if p.name.endswith(".index.json")]:
        os.symlink(f.resolve(), tmp / f.name)
    (tmp / "config.json").write_text(json.dumps(llm_config))
    verbosity = logging.get_verbosity()
    logging.set_verbosity_error()        # its load report lists the multimodal keys as unexpected: checked below
    try:
        llm, info = AutoModelForCausalLM.from_pretrained(tmp, dtype=dtype, output_loading_info=True)
    finally:
        logging.set_verbosity(verbosity)
    if info.get("mismatched_keys"):
        raise UserError(f"{src_dir}: {info['mismatched_keys'][0]} does not fit the LLM's config (shape mismatch)")
    if info["missing_keys"]:
        raise UserError(f"{src_dir}: the LLM weight {sorted(info['missing_keys'])[0]} is missing "
                        f"({len(info['missing_keys'])} missing)")
    extra = sorted(set(info["unexpected_keys"]) - not_llm)
    if extra:
        raise UserError(f"{src_dir}: {extra[0]} is neither a weight of the {family} LLM nor a multimodal weight")
    generation = src_dir / "generation_config.json"
    if generation.exists():
        from transformers import GenerationConfig
        llm.generation_config = GenerationConfig.from_pretrained(src_dir)
    return llm


def add_im_tokens(tokenizer, llm, args, src_dir) -> list[int] | None:
    """<im_start>/<im_end>, as MGM / LLaVA add them at load (mm_use_im_start_end): the source's embeddings must
    already have their rows (added tokens without trained rows would be random)."""
    rows = llm.get_input_embeddings().weight.shape[0]
    if args.mm_use_im_start_end:
        tokenizer.add_tokens([IM_START, IM_END], special_tokens=True)
    if len(tokenizer) > rows:
        raise UserError(f"{src_dir}: the tokenizer has {len(tokenizer)} tokens but the embeddings only {rows} rows "
                        "(tokens without a trained row)")
    return tokenizer.convert_tokens_to_ids([IM_START, IM_END]) if args.mm_use_im_start_end else None


def default_template(config: dict, tokenizer, pretrain: bool) -> str:
    """The template MGM's training scripts use for this LLM family (vicuna_v1 for Vicuna and LLaVA-1.5); stage 1
    captions with `plain`, except MGM-2B (Gemma), whose stage 1 used its chat template too."""
    family = LLM_TYPES.get(config.get("model_type"), config.get("model_type"))
    vocab = tokenizer.get_vocab()
    if family == "gemma":
        return "gemma"
    if pretrain:
        return "plain"
    if family in ("mixtral", "mistral"):
        return "mistral"
    if "<|eot_id|>" in vocab:
        return "llama_3"
    if "<|im_start|>" in vocab:
        return "chatml"
    return "vicuna_v1"


# ---- reading weights --------------------------------------------------------------------------------------------
def _full_weight_files(src_dir: Path) -> list[Path]:
    safetensors = sorted(src_dir.glob("*.safetensors"))
    return safetensors or sorted(src_dir.glob("pytorch_model*.bin"))


def weight_files(src_dir: Path, pretrain: bool) -> list[Path]:
    return [src_dir / "mm_projector.bin"] if pretrain else _full_weight_files(src_dir)


def source_keys(files) -> list[str]:
    keys = []
    for f in files:
        if f.suffix == ".safetensors":
            with safe_open(f, "pt") as st:
                keys += list(st.keys())
        else:
            keys += list(_load_pickle(f))
    return keys


def load_tensors(files, keys) -> dict:
    """The named tensors, from whichever file holds them."""
    wanted, out = set(keys), {}
    for f in files:
        if f.suffix == ".safetensors":
            with safe_open(f, "pt") as st:
                out.update({k: st.get_tensor(k) for k in st.keys() if k in wanted})
        else:
            out.update({k: v for k, v in _load_pickle(f).items() if k in wanted})
    return out


def _load_pickle(path) -> dict:
    """A pickled state dict, read without running code (weights_only); MGM's may nest it under "model"."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise UserError(f"{path}: not a state dict of tensors")
    return state


# convert.py COMMAND --help: what each command reads, which kind of export it writes, and an example.
COMMAND_HELP = {
    "from-mgm": """\
A released Mini-Gemini checkpoint (MGM-2B/7B/13B/8B/8x7B/34B and their HD variants) -> a full export of this
repo: eval.py, chat.py and web.py take it as --model, train.py as --init_from (a finetune starting from it).
MGM's stage-1 weights (a directory holding mm_projector.bin, or the file) on their base LLM (--llm) -> a pretrain
export (projector + patch info mining only), for train.py's --pretrained_mm_path. The towers and LLM its config names
by MGM's local model_zoo/ paths are mapped to their hub names (--vision_tower, --vision_tower_aux, --llm override);
tower weights the checkpoint holds replace the tower checkpoint's. DST must be a new or empty directory.

examples:
  hf download YanweiLi/MGM-7B --local-dir ckpt/MGM-7B
  python convert.py from-mgm ckpt/MGM-7B runs/mgm-7b
  python convert.py from-mgm ckpt/MGM-Pretrain/MGM-7B runs/mgm-7b-pretrain/export --llm lmsys/vicuna-7b-v1.5""",
    "from-llava": """\
A released LLaVA-1.5 checkpoint (no high-res tower) -> a full export of this repo: eval.py, chat.py and web.py take
it as --model, train.py as --init_from, to-llava-hf turns it into transformers' Llava. Its stage-1 weights
(mm_projector.bin, with --llm) -> a pretrain export, for train.py's --pretrained_mm_path. DST must be a new or empty
directory.

examples:
  hf download liuhaotian/llava-v1.5-7b --local-dir ckpt/llava-v1.5-7b
  python convert.py from-llava ckpt/llava-v1.5-7b runs/llava-1.5-7b""",
    "to-llava-hf": """\
An export of this repo without a high-res tower (plain LLaVA: vision_tower_aux none, e.g. from from-llava) -> a
transformers Llava directory (not an export of this repo): LlavaForConditionalGeneration weights, the tokenizer with
an <image> token, the image processor and a chat template, which AutoModelForImageTextToText / AutoProcessor load
(vLLM and SGLang read the same layout). Exports it cannot express are refused with the reason: a high-res tower with
patch info mining, HD grids, perceiver / vit / mlp3x_gelu projectors, <im_start>/<im_end>, mmca attention.

example:
  python convert.py to-llava-hf runs/llava-1.5-7b runs/llava-1.5-7b-hf""",
    "from-llava-next": """\
A transformers LlavaNext directory (llava-hf/llava-v1.6-*: LlavaNextForConditionalGeneration), or an original
llava-v1.6 checkpoint (liuhaotian/llava-v1.6-*: image_aspect_ratio anyres, spatial_unpad) -> a full AnyRes
export of this repo (image_grid_pinpoints and image_newline kept, image_aspect_ratio anyres recorded), computing
transformers' logits: eval.py, chat.py and web.py take it as --model, train.py as --init_from. DST must be a new or
empty directory.

example:
  hf download llava-hf/llava-v1.6-vicuna-7b-hf --local-dir ckpt/llava-v1.6-vicuna-7b-hf
  python convert.py from-llava-next ckpt/llava-v1.6-vicuna-7b-hf runs/llava-next-7b""",
    "to-llava-next": """\
An AnyRes export of this repo without a high-res tower (image_grid_pinpoints set, projector mlp2x_gelu) -> a
transformers LlavaNext directory: LlavaNextForConditionalGeneration weights with image_newline, the tokenizer with an
<image> token, a LlavaNextProcessor (pinpoints, bicubic, mean/std) and a chat template.

example:
  python convert.py to-llava-next runs/llava-next-7b-finetune/export runs/llava-next-7b-hf""",
}


# =============================================================================================================
# transformers' LlavaNext -> our AnyRes export (the way back, to-llava-next, is in llava_hf.py)
# =============================================================================================================
def from_llava_next(src, dst, *, template: str | None = None) -> dict:
    """A LlavaNextForConditionalGeneration directory -> our full AnyRes export at dst (same weights; the LLM is
    LlavaNext's language model with its head, the LR tower its vision tower, the projector mlp2x_gelu,
    image_newline kept)."""
    from transformers import LlavaNextForConditionalGeneration
    from transformers.image_processing_base import ImageProcessingMixin

    src = Path(src)
    config = json.loads((src / "config.json").read_text()) if (src / "config.json").exists() else None
    if config and config.get("mm_vision_tower") and config.get("image_aspect_ratio") == "anyres":
        return from_source(src, dst, source="llava", template=template)     # the original llava-v1.6 layout
    if not config or config.get("model_type") != "llava_next":
        raise UserError(f"src: {src} is neither a transformers LlavaNext directory (config.json with model_type "
                        "llava_next) nor an original llava-v1.6 one (mm_vision_tower, image_aspect_ratio anyres)")
    problems = []
    if config.get("vision_feature_select_strategy", "default") != "default":
        problems.append("vision_feature_select_strategy 'full' (the CLS token on the grid)")
    if not isinstance(config.get("vision_feature_layer", -2), int):
        problems.append("several vision_feature_layer")
    if config.get("projector_hidden_act", "gelu") != "gelu" or not config.get("multimodal_projector_bias", True):
        problems.append("a projector other than linear -> gelu -> linear with biases")
    if problems:
        raise UserError(f"{src / 'config.json'}: not supported: " + "; ".join(problems))
    proc = ImageProcessingMixin.get_image_processor_dict(str(src))[0]
    hf = LlavaNextForConditionalGeneration.from_pretrained(src)
    dtype = str(hf.config.text_config.dtype or "float32").removeprefix("torch.")
    side = hf.config.vision_config.image_size
    pins = "default" if [list(p) for p in hf.config.image_grid_pinpoints] == [
        [r * side, c * side] for r, c in LLAVA_NEXT_GRIDS] else ",".join(
        f"{h}x{w}" for h, w in hf.config.image_grid_pinpoints)
    args = ModelArguments(llm=str(src.resolve()), vision_tower=str(src.resolve()), vision_tower_aux=None,
                          projector="mlp2x_gelu", mm_vision_select_layer=hf.config.vision_feature_layer,
                          image_grid_pinpoints=pins, dtype=dtype)
    llm = AutoModelForCausalLM.from_config(hf.config.text_config)
    setattr(llm, llm.base_model_prefix, hf.model.language_model)
    llm.lm_head = hf.lm_head
    llm.generation_config = hf.generation_config
    vt = VisionTower(hf.model.vision_tower, mean=proc.get("image_mean", CLIP_MEAN), std=proc.get("image_std", CLIP_STD),
                     select_layer=args.mm_vision_select_layer)
    model = MiniGemini(args, llm, vt, None)
    with torch.no_grad():
        model.projector[0].load_state_dict(hf.model.multi_modal_projector.linear_1.state_dict())
        model.projector[2].load_state_dict(hf.model.multi_modal_projector.linear_2.state_dict())
        model.image_newline.copy_(hf.model.image_newline)
    tokenizer = AutoTokenizer.from_pretrained(src)
    model.save_pretrained(dst, tokenizer, weights="full")
    template = template or ("auto" if tokenizer.chat_template else "vicuna_v1")
    Path(dst, "train_config.yaml").write_text(yaml.safe_dump({"template": template, "image_aspect_ratio": "anyres"}))
    return {"source": str(src), "export": "full", "template": template, "image_aspect_ratio": "anyres",
            "image_grid_pinpoints": pins, "tokens_per_image_max": model.tokens_per_image}


# =============================================================================================================
def main(argv=None):
    parser = ArgumentParser(prog="convert.py", description="\n\n".join(__doc__.split("\n\n")[:3]))
    sub = parser.add_subparsers(dest="command", required=True)
    for name, help_text in (("from-mgm", "an MGM checkpoint -> a full export (mm_projector.bin: pretrain)"),
                            ("from-llava", "a LLaVA-1.5 checkpoint -> a full export (mm_projector.bin: pretrain)")):
        p = sub.add_parser(name, help=help_text, description=COMMAND_HELP[name])
        p.add_argument("src", help="the checkpoint directory (config.json + weights), or its mm_projector.bin")
        p.add_argument("dst", help="a new (or empty) directory for the export")
        p.add_argument("--vision_tower",
                       help="the low-res tower (hub name or directory); default: the one config.json names")
        if name == "from-mgm":
            p.add_argument("--vision_tower_aux",
                           help="the high-res tower (hf-hub:... or directory); default: the one config.json names")
        p.add_argument("--llm", help="the base LLM an mm_projector.bin was trained on (hub name or directory)")
        p.add_argument("--template", choices=sorted(TEMPLATES),
                       help="chat template recorded for eval/chat (default: the family's)")
    p = sub.add_parser("to-llava-hf", help="an export without an HR tower -> a transformers Llava directory",
                       description=COMMAND_HELP["to-llava-hf"])
    p.add_argument("src", help="an export of this repo without an HR tower (vision_tower_aux: null)")
    p.add_argument("dst", help="a new (or empty) directory for the Llava model")
    p = sub.add_parser("from-llava-next", help="a transformers LlavaNext directory -> an AnyRes full export",
                       description=COMMAND_HELP["from-llava-next"])
    p.add_argument("src", help="a LlavaNextForConditionalGeneration directory (llava-hf/llava-v1.6-*)")
    p.add_argument("dst", help="a new (or empty) directory for the export")
    p.add_argument("--template", choices=sorted(TEMPLATES),
                   help="chat template recorded for eval/chat (default: the tokenizer's own, else vicuna_v1)")
    p = sub.add_parser("to-llava-next", help="an AnyRes export without an HR tower -> a transformers LlavaNext "
                       "directory", description=COMMAND_HELP["to-llava-next"])
    p.add_argument("src", help="an AnyRes export of this repo without an HR tower, projector mlp2x_gelu")
    p.add_argument("dst", help="a new (or empty) directory for the LlavaNext model")
    a = parser.parse_args(argv)
    check_new_dir(a.dst, "dst")
    if a.command == "to-llava-hf":
        summary = to_llava_hf(a.src, a.dst)
    elif a.command == "to-llava-next":
        summary = to_llava_next(a.src, a.dst)
    elif a.command == "from-llava-next":
        summary = from_llava_next(a.src, a.dst, template=a.template)
    else:
        summary = from_source(a.src, a.dst, source=a.command.removeprefix("from-"), llm=a.llm,
                              vision_tower=a.vision_tower, vision_tower_aux=getattr(a, "vision_tower_aux", None),
                              template=a.template)
    for key, value in summary.items():
        print(f"{key}: {value}")


if __name__ == "__main__":
    run(main, "convert.py")
