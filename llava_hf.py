"""Our exports as transformers' Llava and LlavaNext (convert.py to-llava-hf / to-llava-next): the weights under
transformers' names, the tokenizer with an `<image>` token, the image processor that prepares images as images.py
does, and a Jinja chat template rendering what conversation.py's template renders. What those classes cannot
express (an HR tower with patch info mining, HD grids, other projectors, <im_start>/<im_end>, mmca) is refused with
the reason before anything is loaded. vLLM and SGLang read the same layout."""
from __future__ import annotations

from pathlib import Path

import torch
import yaml
from transformers import AutoTokenizer

from cli import UserError
from conversation import VICUNA_SYSTEM
from model import MiniGemini, merge_lora
from refs import check_export

IMAGE_TOKEN = "<image>"


def to_llava_hf(src, dst) -> dict:
    """A plain-LLaVA export (no HR tower) -> a LlavaForConditionalGeneration + LlavaProcessor directory.

    The `<image>` token is added to the tokenizer (its embedding row is the mean of the others and is never read:
    image features replace it; its output row is zero and generation_config suppresses it). A `linear` projector
    becomes Llava's linear_1 with an identity linear_2 and no activation between them."""
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    src, dst = Path(src), Path(dst)
    model, tokenizer, image_id, settings, template, chat_template = ours_for_transformers(src, anyres=False)
    llm, vt = model.llm, model.vision_tower
    cls = _num_cls(vt)
    strategy = "default" if (vt.select_feature == "patch" and cls) else "full"   # "default" drops one CLS token
    linear = model.config.projector == "linear"
    config = LlavaConfig(vision_config=vt.model.config.to_dict(), text_config=llm.config.to_dict(),
                         image_token_index=image_id, image_seq_length=model.tokens_per_image,
                         vision_feature_layer=vt.select_layer, vision_feature_select_strategy=strategy,
                         projector_hidden_act="linear" if linear else "gelu", multimodal_projector_bias=True,
                         tie_word_embeddings=bool(llm.config.get_text_config().tie_word_embeddings))
    save_transformers_model(LlavaForConditionalGeneration, config, llava_state_dict(model), model, image_id, src, dst)
    llava_processor(model, tokenizer, settings.get("image_aspect_ratio", "pad"), strategy, cls,
                    chat_template).save_pretrained(dst)
    return {"source": str(src), "template": template, "image_token_id": image_id,
            "image_seq_length": model.tokens_per_image, "vision_feature_select_strategy": strategy,
            "projector": model.config.projector}


def to_llava_next(src, dst) -> dict:
    """An AnyRes export without an HR tower -> a LlavaNextForConditionalGeneration + LlavaNextProcessor directory
    (the <image> token added as to-llava-hf adds it; image_newline and the pinpoints carried over)."""
    from transformers import LlavaNextConfig, LlavaNextForConditionalGeneration

    src, dst = Path(src), Path(dst)
    model, tokenizer, image_id, settings, template, chat_template = ours_for_transformers(src, anyres=True)
    llm, vt = model.llm, model.vision_tower
    cls = _num_cls(vt)
    config = LlavaNextConfig(vision_config=vt.model.config.to_dict(), text_config=llm.config.to_dict(),
                             image_token_index=image_id, image_grid_pinpoints=[list(p) for p in model.pinpoints],
                             image_seq_length=vt.num_patches, vision_feature_layer=vt.select_layer,
                             vision_feature_select_strategy="default", projector_hidden_act="gelu",
                             multimodal_projector_bias=True,
                             tie_word_embeddings=bool(llm.config.get_text_config().tie_word_embeddings))
    state = {**llava_state_dict(model), "model.image_newline": model.image_newline.detach()}
    save_transformers_model(LlavaNextForConditionalGeneration, config, state, model, image_id, src, dst)
    llava_next_processor(model, tokenizer, cls, chat_template).save_pretrained(dst)
    return {"source": str(src), "template": template, "image_token_id": image_id,
            "image_grid_pinpoints": [list(p) for p in model.pinpoints], "tokens_per_image_max": model.tokens_per_image}


def refuse_for_llava(meta: dict, src: Path, anyres: bool = False) -> None:
    """What transformers' Llava (anyres: LlavaNext) cannot express, refused before anything is loaded."""
    args = meta["args"]
    reasons = []
    if anyres != bool(args.get("image_grid_pinpoints")):
        reasons.append("it is an AnyRes export (image_grid_pinpoints): use to-llava-next" if not anyres else
                       "it is not an AnyRes export (no image_grid_pinpoints): use to-llava-hf")
    if meta.get("vision_aux_config"):
        reasons.append("it has an HR tower and patch info mining (vision_tower_aux); transformers has no "
                       "Mini-Gemini class: only plain-LLaVA exports (vision_tower_aux: null) convert")
    if args["projector"] not in (("mlp2x_gelu",) if anyres else ("linear", "mlp2x_gelu")):
        reasons.append(f"projector {args['projector']!r}: Llava's projector is linear -> act -> linear "
                       "(linear or mlp2x_gelu)")
    if args.get("image_grid", 1) != 1:
        reasons.append("image_grid > 1: Llava takes one view per image")
    if args.get("mm_use_im_start_end"):
        reasons.append("mm_use_im_start_end: Llava does not wrap image features in <im_start>/<im_end>")
    if args.get("attention") == "mmca":
        reasons.append("attention 'mmca': transformers' LLMs use ordinary causal attention")
    if reasons:
        raise UserError(f"{src} cannot become a transformers Llava model: " + "; ".join(reasons))


def add_image_token(tokenizer, llm) -> int:
    tokenizer.add_tokens([IMAGE_TOKEN], special_tokens=True)
    image_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    rows = llm.get_input_embeddings().weight.shape[0]
    if image_id >= rows:
        llm.resize_token_embeddings(image_id + 1, mean_resizing=False)
        with torch.no_grad():
            embed = llm.get_input_embeddings().weight
            embed[rows:] = embed[:rows].mean(0)
            head = llm.get_output_embeddings()
            if head is not None and head.weight is not embed:
                head.weight[rows:] = 0
    return image_id


def ours_for_transformers(src: Path, anyres: bool) -> tuple:
    """An export of ours about to become transformers' Llava (anyres False) / LlavaNext (True): refused with the
    reason where that class cannot express it; else (model, LoRA merged and unquantized; tokenizer with an <image>
    token; that token's id; the export's recorded settings; its template; the Jinja chat template rendering it)."""
    refuse_for_llava(check_export(src, "src"), src, anyres=anyres)
    model = merge_lora(MiniGemini.from_pretrained(src, bits=16))
    settings = yaml.safe_load((src / "train_config.yaml").read_text()) if (src / "train_config.yaml").exists() else {}
    tokenizer = AutoTokenizer.from_pretrained(src)
    template = settings.get("template") or ("auto" if tokenizer.chat_template else "vicuna_v1")
    chat_template = llava_chat_template(template, tokenizer, src)
    return model, tokenizer, add_image_token(tokenizer, model.llm), settings, template, chat_template


def save_transformers_model(cls, config, state: dict, model: MiniGemini, image_id: int, src, dst) -> None:
    """transformers' `cls` (Llava / LlavaNext) built from `config` and holding `state` (every weight, checked), in
    our model's dtype, the image token never generated, saved to dst."""
    from accelerate import init_empty_weights
    with init_empty_weights():
        hf = cls(config)
    missing, unexpected = hf.load_state_dict(state, strict=False, assign=True)
    if config.tie_word_embeddings:
        hf.tie_weights()
        missing = [k for k in missing if k != "lm_head.weight"]
    if missing or unexpected:
        raise ValueError(f"{src}: the weights do not map onto transformers' {cls.__name__} ({missing=}, "
                         f"{unexpected=})")
    hf.to(_model_dtype(model))
    hf.generation_config = model.llm.generation_config
    hf.generation_config.suppress_tokens = sorted({*(hf.generation_config.suppress_tokens or []), image_id})
    hf.save_pretrained(dst)


def llava_state_dict(model: MiniGemini) -> dict:
    """Our module names -> LlavaForConditionalGeneration's."""
    state = {f"model.vision_tower.{k}": v for k, v in model.vision_tower.model.state_dict().items()}
    proj = model.projector.state_dict()
    if model.config.projector == "linear":
        hidden = proj["weight"].shape[0]
        state.update({"model.multi_modal_projector.linear_1.weight": proj["weight"],
                      "model.multi_modal_projector.linear_1.bias": proj["bias"],
                      "model.multi_modal_projector.linear_2.weight": torch.eye(hidden, dtype=proj["weight"].dtype),
                      "model.multi_modal_projector.linear_2.bias": torch.zeros_like(proj["bias"])})
    else:
        for ours, theirs in (("0", "linear_1"), ("2", "linear_2")):
            for p in ("weight", "bias"):
                state[f"model.multi_modal_projector.{theirs}.{p}"] = proj[f"{ours}.{p}"]
    prefix = model.llm.base_model_prefix + "."
    for k, v in model.llm.state_dict().items():
        state[f"model.language_model.{k[len(prefix):]}" if k.startswith(prefix) else k] = v
    return state


def llava_processor(model, tokenizer, aspect: str, strategy: str, cls: int, chat_template: str):
    """LlavaProcessor preparing images as data.ImageProcessor does: pad = pad to square with the mean colour, then
    resize; crop = short side resized, center crop; resize = stretched."""
    from transformers import LlavaImageProcessor, LlavaProcessor
    s = model.image_settings()
    side = s["image_size"]
    kw = dict(image_mean=s["image_mean"], image_std=s["image_std"], resample=3)   # 3: bicubic
    if aspect in ("pad", "crop"):
        images = LlavaImageProcessor(size={"shortest_edge": side}, crop_size={"height": side, "width": side},
                                     do_pad=aspect == "pad", do_center_crop=True, **kw)
    elif aspect == "resize":
        images = LlavaImageProcessor(size={"height": side, "width": side}, do_center_crop=False, do_pad=False, **kw)
    else:
        raise UserError(f"image_aspect_ratio {aspect!r}: pad, crop or resize")
    return LlavaProcessor(image_processor=images, tokenizer=tokenizer,
                          patch_size=model.vision_tower.model.config.patch_size,
                          vision_feature_select_strategy=strategy, num_additional_image_tokens=cls,
                          chat_template=chat_template, image_token=IMAGE_TOKEN)


def llava_next_processor(model, tokenizer, cls: int, chat_template: str):
    """LlavaNextProcessor preparing images as images.ImageProcessor's anyres does (bicubic, pinpoints, CLIP-style
    shortest-edge resize and crop of each S x S view, which leave them as they are)."""
    from transformers import LlavaNextImageProcessor, LlavaNextProcessor
    s = model.image_settings()
    side = s["image_size"]
    images = LlavaNextImageProcessor(image_grid_pinpoints=s["image_grid_pinpoints"], size={"shortest_edge": side},
                                     crop_size={"height": side, "width": side}, image_mean=s["image_mean"],
                                     image_std=s["image_std"], resample=3)
    return LlavaNextProcessor(image_processor=images, tokenizer=tokenizer, patch_size=s["patch_size"],
                              vision_feature_select_strategy="default", num_additional_image_tokens=cls,
                              chat_template=chat_template, image_token=IMAGE_TOKEN)


def llava_chat_template(template: str, tokenizer, src) -> str:
    """A Jinja chat template rendering what conversation.py's template renders for an inference prompt. Message
    content is a string or a list of {"type": "image"} / {"type": "text", "text"} parts (images first)."""
    if template == "auto":
        return tokenizer.chat_template
    if template not in CHAT_TEMPLATES:
        raise UserError(f"{src}: no Jinja chat template for {template!r} yet ({sorted(CHAT_TEMPLATES)} or auto)")
    return CONTENT_MACRO + CHAT_TEMPLATES[template]


def _num_cls(vt) -> int:
    """Tokens besides the patches the tower outputs (1: CLIP's CLS; 0: SigLIP)."""
    inner = getattr(vt.model, "vision_model", vt.model)
    return inner.embeddings.num_positions - vt.num_patches


def _model_dtype(model) -> torch.dtype:
    return next(model.projector.parameters()).dtype


# The content of one message; a single image without an <image> tag goes in front, as data.tokenize_prompt does.
CONTENT_MACRO = (
    "{%- macro content(m) -%}"
    "{%- if m['content'] is string -%}{{- m['content'] | trim -}}"
    "{%- else -%}{%- for p in m['content'] if p['type'] == 'image' -%}{{- '<image>\\n' -}}{%- endfor -%}"
    "{{- (m['content'] | selectattr('type', 'equalto', 'text') | map(attribute='text') | join(' ')) | trim -}}"
    "{%- endif -%}{%- endmacro -%}")
CHAT_TEMPLATES = {
    "vicuna_v1": (
        "{%- if messages[0]['role'] == 'system' -%}{%- set system = messages[0]['content'] -%}"
        "{%- set turns = messages[1:] -%}{%- else -%}{%- set system = '" + VICUNA_SYSTEM.replace("'", "\\'") + "' -%}"
        "{%- set turns = messages -%}{%- endif -%}{{- system -}}"
        "{%- for m in turns -%}{%- if m['role'] == 'user' -%}"
        "{{- (' ' if (loop.first and system) else '') + 'USER: ' + content(m) + ' ASSISTANT:' -}}"
        "{%- else -%}{{- ' ' + content(m) + eos_token -}}{%- endif -%}{%- endfor -%}"),
    "plain": (   # captioning: the first user turn's images are the whole prompt
        "{%- set m = messages | selectattr('role', 'equalto', 'user') | first -%}"
        "{%- if m['content'] is string -%}{{- '<image>' * m['content'].count('<image>') -}}"
        "{%- else -%}{%- for p in m['content'] if p['type'] == 'image' -%}{{- '<image>' -}}{%- endfor -%}"
        "{%- endif -%}"),
    "llama_3": (
        "{%- for m in messages -%}{{- '<|start_header_id|>' + m['role'] + '<|end_header_id|>\\n\\n' + content(m)"
        " + '<|eot_id|>' -}}{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}{%- endif -%}"),
    "chatml": (
        "{%- for m in messages -%}{{- '<|im_start|>' + m['role'] + '\\n' + content(m) + '<|im_end|>\\n' -}}"
        "{%- endfor -%}{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"),
    "gemma": (
        "{%- set system = messages[0]['content'] + '\\n\\n' if messages[0]['role'] == 'system' else '' -%}"
        "{%- for m in messages if m['role'] != 'system' -%}{%- if m['role'] == 'user' -%}"
        "{{- '<start_of_turn>user\\n' + (system if loop.first else '') + content(m)"
        " + '<end_of_turn>\\n<start_of_turn>model\\n' -}}"
        "{%- else -%}{{- content(m) + '<end_of_turn>\\n' -}}{%- endif -%}{%- endfor -%}"),
    "mistral": (
        "{%- set system = messages[0]['content'] + '\\n\\n' if messages[0]['role'] == 'system' else '' -%}"
        "{%- for m in messages if m['role'] != 'system' -%}{%- if m['role'] == 'user' -%}"
        "{{- '[INST] ' + (system if loop.first else '') + content(m) + ' [/INST]' -}}"
        "{%- else -%}{{- ' ' + content(m) + eos_token -}}{%- endif -%}{%- endfor -%}"),
}
