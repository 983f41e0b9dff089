"""Mini-Gemini: vision towers + patch info mining + projector in front of any Hugging Face causal LM.

    images [N, V, 3, S, S] --LR tower (CLIP/SigLIP, layer -2, CLS dropped)--> [N*V, P, d]
    images_aux [N, 3, A, A] --HR tower (ConvNeXt, 4 stages -> stage-0 res)--> [N, C, A/4, A/4]
    mining: each LR token attends over its own MxM window of HR positions, output added   (skipped without HR)
    projector -> [N, tokens_per_image, hidden] -> spliced at IMAGE_TOKEN_INDEX placeholders -> AutoModelForCausalLM

No class per LLM family: the LLM is whatever `AutoModelForCausalLM` builds from its config. The optional MMCA
attention (DeepSpeed-VisualChat) is registered with transformers' AttentionInterface under the name "mmca".

Public entry points first (ModelArguments, build_model, MiniGemini, set_stage, apply_lora, merge_lora,
merge_lora_export); building blocks below; `python model.py merge SRC DST` merges a LoRA export.
"""
from __future__ import annotations

import inspect
import json
import math
import os
import re
import sys
from contextlib import nullcontext
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch.utils.checkpoint import checkpoint
from transformers import (AttentionInterface, AutoConfig, AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig,
                          DynamicCache)
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.models.auto.modeling_auto import MODEL_MAPPING

from data import IGNORE_INDEX, IMAGE_TOKEN_INDEX

IM_START, IM_END = "<im_start>", "<im_end>"
CONFIG_NAME = "mgm_config.json"
MM_WEIGHTS = "mm_weights.safetensors"      # pretrain / LoRA exports: projector, mining, other non-LLM trainables
FULL_WEIGHTS = "model.safetensors"         # full exports: towers, mining, projector (the LLM lives in llm/)


@dataclass
class ModelArguments:
    llm: str = "lmsys/vicuna-7b-v1.5"                    # any causal LM: local dir or hub name
    vision_tower: str = "openai/clip-vit-large-patch14-336"  # transformers CLIP or SigLIP checkpoint
    vision_tower_aux: str | None = "hf-hub:laion/CLIP-convnext_large_d_320.laion2B-s29B-b131K-ft-soup"
    # ^ OpenCLIP ConvNeXt (dir with open_clip_config.json, or hf-hub:) or timm ConvNeXt (dir with config.json,
    #   or hf-hub:timm/...); None = plain LLaVA (no HR tower, no mining)
    random_init: bool = False            # build every part from its config only (tests, benchmarks)
    projector: str = "mlp2x_gelu"        # linear | mlp{N}x_gelu | perceiver | vit
    perceiver_queries: int = 64          # perceiver: image tokens per view
    projector_heads: int = 8             # perceiver / vit attention heads
    mm_vision_select_layer: int = -2
    mm_vision_select_feature: str = "patch"   # patch | cls_patch
    mm_use_im_start_end: bool = False    # wrap each image's features in <im_start> ... <im_end>
    image_size_aux: int = 768            # HR input side (1536 for HD)
    image_grid: int = 1                  # 2 for HD: 2x2 LR crops
    image_global: bool = False           # HD: add the whole image as a global view, first
    attention: str = "sdpa"              # sdpa | eager | mmca
    bits: int = 16                       # 16 | 8 | 4: the LLM alone is quantized (QLoRA)
    dtype: str = "bfloat16"
    gradient_checkpointing: bool = False
    pretrained_mm_path: str | None = None    # a pretrain export to take projector + mining from


def build_model(args: ModelArguments, tokenizer=None, *, device=None) -> MiniGemini:
    """Build from checkpoints (local dirs or hub names) or, with args.random_init, from their configs alone.
    The tokenizer is needed only for mm_use_im_start_end (the two tokens are added to it)."""
    for setting in (*REF_SETTINGS, "pretrained_mm_path"):
        check_model_ref(getattr(args, setting), setting)
    dtype = getattr(torch, args.dtype)
    # Loading a transformers checkpoint must not move the random numbers the new modules (added token rows,
    # mining, projector) are drawn from: inside DeepSpeed's zero.Init, or for weights missing from a checkpoint,
    # from_pretrained draws some, so the same seed would give other new weights on another engine.
    with nullcontext() if args.random_init else torch.random.fork_rng(devices=[]):
        llm = load_llm(args.llm, dtype=dtype, bits=args.bits, attention=args.attention,
                       random_init=args.random_init, device=device)
        vision_tower = VisionTower.load(args.vision_tower, dtype=dtype, select_layer=args.mm_vision_select_layer,
                                        select_feature=args.mm_vision_select_feature, random_init=args.random_init)
    vision_tower_aux = None
    if args.vision_tower_aux:
        vision_tower_aux = ConvNeXtTower.load(args.vision_tower_aux, dtype=dtype, random_init=args.random_init)
        if not (_close(vision_tower_aux.mean, vision_tower.mean) and _close(vision_tower_aux.std, vision_tower.std)):
            raise ValueError(f"LR and HR towers normalize differently ({vision_tower.mean}/{vision_tower.std} vs "
                             f"{vision_tower_aux.mean}/{vision_tower_aux.std}); data.py feeds both one tensor")
    im_start_end_ids = None
    if args.mm_use_im_start_end:
        if tokenizer is None:
            raise ValueError("mm_use_im_start_end needs the tokenizer (the two tokens are added to it)")
        im_start_end_ids = add_image_tokens(llm, tokenizer)
    model = MiniGemini(args, llm, vision_tower, vision_tower_aux, im_start_end_ids=im_start_end_ids)
    if args.pretrained_mm_path:
        model.load_mm_weights(args.pretrained_mm_path)
    if args.gradient_checkpointing:
        enable_checkpointing(model.llm)
    return model


class MiniGemini(nn.Module):
    def __init__(self, config: ModelArguments, llm, vision_tower, vision_tower_aux=None, *, im_start_end_ids=None):
        super().__init__()
        self.config = config
        self.llm, self.vision_tower, self.vision_tower_aux = llm, vision_tower, vision_tower_aux
        self.im_start_end_ids = im_start_end_ids
        dtype = getattr(torch, config.dtype)
        d = vision_tower.hidden_size
        self.mining = PatchInfoMining(d, vision_tower_aux.channels).to(dtype) if vision_tower_aux else None
        self.projector = build_projector(config.projector, d, llm.config.get_text_config().hidden_size,
                                         heads=config.projector_heads, queries=config.perceiver_queries).to(dtype)
        self.stage = None
        self.tune_towers = (False, False)
        self._row_hook = None

    # ---- what data.py and train.py read ------------------------------------------------------------------------
    @property
    def num_views(self) -> int:
        g = self.config.image_grid
        return 1 if g == 1 else g * g + int(self.config.image_global)

    @property
    def tokens_per_image(self) -> int:
        per_view = (self.config.perceiver_queries if self.config.projector == "perceiver"
                    else self.vision_tower.num_tokens)
        return self.num_views * per_view + (2 if self.im_start_end_ids else 0)

    def image_settings(self) -> dict:
        aux = self.config.image_size_aux if self.vision_tower_aux is not None else None   # plain LLaVA: no HR input
        return dict(image_size=self.vision_tower.image_size, image_size_aux=aux,
                    image_mean=list(self.vision_tower.mean), image_std=list(self.vision_tower.std),
                    image_grid=self.config.image_grid, image_global=self.config.image_global)

    @property
    def _no_split_modules(self) -> list[str]:
        """Blocks FSDP wraps one by one (accelerate's TRANSFORMER_BASED_WRAP reads this): the LLM's decoder layers,
        the LR tower's encoder layers, the ConvNeXt stages. Only classes this model contains: accelerate stops on a
        listed class it cannot find, and CLIPVisionModel's own list names CLIP's text-model classes too."""
        names = set()
        for module in (self.llm, self.vision_tower.model):
            base = module.get_base_model() if _is_peft(module) else module
            names.update(getattr(base, "_no_split_modules", None) or [])
            names.update(type(layer).__name__ for layer in _repeated_blocks(base))
        if self.vision_tower_aux is not None:
            names.add(type(self.vision_tower_aux.stages[0]).__name__)
        present = {type(m).__name__ for m in self.modules()}
        return sorted(names & present)

    # ---- forward --------------------------------------------------------------------------------------------
    def forward(self, input_ids, attention_mask=None, labels=None, images=None, images_aux=None, image_counts=None,
                position_ids=None, num_items_in_batch=None, ids=None, **kw) -> CausalLMOutputWithPast:
        """Loss = summed token cross-entropy / num_items_in_batch when given (train.py passes the supervised-token
        count of the whole optimizer step), else the mean. position_ids given = packed rows (restart per sample):
        the LLM then isolates the samples itself (transformers detects packing from position ids).
        `ids` (the batch's record ids) is accepted and ignored, so a collated batch can be passed as **batch."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        pad_left = bool((attention_mask[:, 0] == 0).any())
        inputs = self.prepare_inputs(input_ids, attention_mask, labels, images, images_aux, image_counts,
                                     position_ids=position_ids, pad_left=pad_left)
        kw.setdefault("use_cache", False)     # a cache here would also hide packing from transformers' mask code
        return self.llm(**inputs, num_items_in_batch=num_items_in_batch, **kw)

    def encode_images(self, images, images_aux=None) -> torch.Tensor:
        """[N, V, 3, S, S] (+ [N, 3, A, A]) -> [N, tokens_per_image, hidden]."""
        n, v = images.shape[:2]
        feats = self.vision_tower(images.flatten(0, 1))                              # [N*V, P(+1), d]
        if self.vision_tower_aux is not None:
            if images_aux is None:
                raise ValueError("this model has an HR tower: pass images_aux")
            maps = self.vision_tower_aux.stage_maps(images_aux)                      # 4 x [N, c_s, H_s, W_s]
            cls = feats.shape[1] - self.vision_tower.num_patches                     # mining works on the patch grid
            mined = self.mining(feats[:, cls:], maps, grid=self.config.image_grid,
                                image_global=self.config.image_global)
            feats = torch.cat([feats[:, :cls].to(mined.dtype), mined], 1)
        feats = self.projector(feats.to(_dtype(self.projector)))                     # [N*V, T, hidden]
        feats = feats.reshape(n, -1, feats.shape[-1])
        if self.im_start_end_ids:
            marks = self.llm.get_input_embeddings()(torch.tensor(self.im_start_end_ids, device=feats.device))
            marks = marks.to(feats.dtype)
            feats = torch.cat([marks[0].expand(n, 1, -1), feats, marks[1].expand(n, 1, -1)], 1)
        return feats

    def prepare_inputs(self, input_ids, attention_mask, labels=None, images=None, images_aux=None, image_counts=None,
                       *, position_ids=None, pad_left=False) -> dict:
        """Token ids with placeholders -> the keyword arguments of the LLM's forward (inputs_embeds, mask, ...)."""
        embed = self.llm.get_input_embeddings()
        text = embed(input_ids.clamp(min=0))
        feats = None
        if images is not None:
            feats = self.encode_images(images, images_aux).to(text.dtype)
        elif self.training:
            text = text + 0 * self.encode_images(*self.dummy_images(text.device)).sum().to(text.dtype)
        if image_counts is not None and int(image_counts.sum()) != int((input_ids == IMAGE_TOKEN_INDEX).sum()):
            raise ValueError("image_counts disagree with the number of image placeholders in input_ids")
        out = splice(input_ids, text, feats, attention_mask, labels, position_ids=position_ids, pad_left=pad_left)
        inputs = dict(inputs_embeds=out["inputs_embeds"], attention_mask=out["attention_mask"],
                      position_ids=out["position_ids"], labels=out["labels"])
        if position_ids is not None:             # packed rows: no attention across samples
            inputs["attention_mask"] = None
            inputs.update(packed_attention_kwargs(out["position_ids"], self.llm.config._attn_implementation))
        if self.config.attention == "mmca":
            inputs["mm_image_mask"] = out["image_mask"]
        return inputs

    def dummy_images(self, device):
        """One black image: a text-only training batch still runs the vision path (its output times 0), so every
        rank runs the same modules (FSDP/ZeRO-3 gather collectives) and the image modules get zero gradients (DDP)."""
        s = self.image_settings()
        images = torch.zeros(1, self.num_views, 3, s["image_size"], s["image_size"], device=device)
        aux = None
        if self.vision_tower_aux is not None:
            aux = torch.zeros(1, 3, s["image_size_aux"], s["image_size_aux"], device=device)
        return images, aux

    # ---- generation -----------------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, input_ids, attention_mask=None, images=None, images_aux=None, image_counts=None,
                 max_new_tokens=64, do_sample=False, temperature=1.0, top_k=0, top_p=1.0, eos_token_id=None,
                 pad_token_id=None, generator=None) -> torch.LongTensor:
        """Batched generation with a KV cache; any padding is moved to the left first.
        Returns only the new tokens [B, <= max_new_tokens]; rows that finished early are filled with pad."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        order = torch.sort(attention_mask, dim=1, stable=True).indices          # zeros first = left padding
        input_ids, attention_mask = input_ids.gather(1, order), attention_mask.gather(1, order)
        inputs = self.prepare_inputs(input_ids, attention_mask, None, images, images_aux, image_counts, pad_left=True)
        inputs.pop("labels")
        if eos_token_id is None:     # generation_config may list several (Llama-3: <|eot_id|> and <|end_of_text|>)
            gen = getattr(self.llm, "generation_config", None)
            eos_token_id = getattr(gen, "eos_token_id", None) or self.llm.config.get_text_config().eos_token_id
        eos = eos_token_id
        eos = torch.tensor([eos] if isinstance(eos, int) else list(eos or []), device=input_ids.device)
        pad = pad_token_id if pad_token_id is not None else (int(eos[0]) if len(eos) else 0)
        mask, pos = inputs["attention_mask"], inputs["position_ids"]
        image_mask = inputs.get("mm_image_mask")
        cache = {cache_keyword(self.llm): DynamicCache(config=self.llm.config)}
        done = torch.zeros(len(mask), dtype=torch.bool, device=mask.device)
        new = []
        for _ in range(max_new_tokens):
            logits = self.llm(**inputs, **cache, use_cache=True).logits[:, -1].float()
            token = sample_next(logits, do_sample, temperature, top_k, top_p, generator)
            token = torch.where(done, torch.full_like(token, pad), token)
            new.append(token)
            done |= torch.isin(token, eos)
            if done.all():
                break
            mask = torch.cat([mask, mask.new_ones(len(mask), 1)], 1)
            pos = pos[:, -1:] + 1
            inputs = dict(inputs_embeds=self.llm.get_input_embeddings()(token[:, None]), attention_mask=mask,
                          position_ids=pos)
            if image_mask is not None:
                image_mask = torch.cat([image_mask, image_mask.new_zeros(len(mask), 1)], 1)
                inputs["mm_image_mask"] = image_mask
        return torch.stack(new, 1)

    # ---- freezing: frozen towers stay in eval mode (no dropout / drop path) ------------------------------------
    def train(self, mode: bool = True):
        super().train(mode)
        for tower, tuned in zip((self.vision_tower, self.vision_tower_aux), self.tune_towers):
            if tower is not None and not tuned:
                tower.eval()
        return self

    # ---- export / load --------------------------------------------------------------------------------------
    def save_pretrained(self, path, tokenizer=None, weights: str = "auto", state_dict=None):
        """Write an export directory. weights: "full" (self-contained), "pretrain" (projector + mining only, plus
        references to the base checkpoints), "lora" (adapters + non-LLM trainables + base references), or "auto":
        pretrain after set_stage(..., "pretrain"), lora when LoRA is applied, else full.
        state_dict: an already gathered full state dict (FSDP / ZeRO-3), used instead of this module's own."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        lora = _is_peft(self.llm)
        kind = weights if weights != "auto" else "pretrain" if self.stage == "pretrain" else "lora" if lora else "full"
        state = state_dict if state_dict is not None else self.state_dict()
        llm_state = {k.removeprefix("llm."): v for k, v in state.items() if k.startswith("llm.")}
        meta = dict(format="mini-gemini", export=kind, args=portable_refs(asdict(self.config)),
                    image_settings=self.image_settings(),
                    llm_config=self.llm.config.to_dict(), vision_config=self.vision_tower.model.config.to_dict(),
                    vision_aux_config=self.vision_tower_aux.spec if self.vision_tower_aux else None,
                    im_start_end_ids=self.im_start_end_ids, lora_config=None)
        if kind == "full":
            if lora:
                raise ValueError("merge_lora(model) before a full export, or export weights='lora'")
            self.llm.save_pretrained(path / "llm", state_dict=llm_state)
            save_file(_contiguous({k: v for k, v in state.items() if not k.startswith("llm.")}), path / FULL_WEIGHTS)
        else:
            save_file(_contiguous(self.mm_state_dict(state)), path / MM_WEIGHTS)
            if kind == "lora":
                self.llm.save_pretrained(path / "adapter", state_dict=llm_state)
                meta["lora_config"] = self.llm.peft_config["default"].to_dict()
        (path / CONFIG_NAME).write_text(json.dumps(meta, indent=2, default=_jsonable))
        if tokenizer is not None:
            tokenizer.save_pretrained(path)

    @classmethod
    def from_pretrained(cls, path, *, bits=None, dtype=None, attention=None, device=None, trainable=False):
        """Load an export. Full exports need nothing else; pretrain / LoRA exports also load their base
        checkpoints (recorded in mgm_config.json). bits/dtype/attention override the saved settings."""
        path = Path(path)
        if not (path / CONFIG_NAME).exists():
            raise FileNotFoundError(f"{path} is not a Mini-Gemini export (no {CONFIG_NAME})")
        meta = json.loads((path / CONFIG_NAME).read_text())
        if meta["export"] != "full":  # the base checkpoints a pretrain / LoRA export builds on must be reachable
            for setting in ("llm", "vision_tower", "vision_tower_aux"):
                check_model_ref(meta["args"].get(setting), setting, f"{path / CONFIG_NAME} refers to it: ")
        known = {f.name for f in fields(ModelArguments)}
        args = ModelArguments(**{k: v for k, v in meta["args"].items() if k in known})
        args.bits, args.dtype = bits or args.bits, dtype or args.dtype
        args.attention, args.pretrained_mm_path, args.gradient_checkpointing = attention or args.attention, None, False
        if meta["export"] == "full":
            torch_dtype = getattr(torch, args.dtype)
            llm = load_llm(str(path / "llm"), dtype=torch_dtype, bits=args.bits, attention=args.attention, device=device)
            vt = VisionTower.from_config(meta["vision_config"], meta["image_settings"], dtype=torch_dtype,
                                         select_layer=args.mm_vision_select_layer,
                                         select_feature=args.mm_vision_select_feature)
            aux = ConvNeXtTower.from_spec(meta["vision_aux_config"], dtype=torch_dtype) \
                if meta["vision_aux_config"] else None
            model = cls(args, llm, vt, aux, im_start_end_ids=meta["im_start_end_ids"])
            missing, unexpected = model.load_state_dict(load_file(path / FULL_WEIGHTS), strict=False)
            if unexpected or any(not k.startswith("llm.") for k in missing):
                raise ValueError(f"{path}: weights do not match the config ({missing=}, {unexpected=})")
        else:
            tokenizer = AutoTokenizer.from_pretrained(path) if meta["im_start_end_ids"] else None
            model = build_model(args, tokenizer, device=device)
            if meta["export"] == "lora":
                from peft import PeftModel, prepare_model_for_kbit_training
                if trainable and args.bits < 16:
                    model.llm = prepare_model_for_kbit_training(model.llm, use_gradient_checkpointing=False)
                model.llm = PeftModel.from_pretrained(model.llm, path / "adapter", is_trainable=trainable)
            model.load_mm_weights(path)
        return model.eval()

    def mm_state_dict(self, state=None) -> dict:
        """Projector + mining + any other trainable non-LLM weights (+ the rows of added image tokens):
        what pretrain and LoRA exports hold besides adapters."""
        state = state if state is not None else self.state_dict()
        tuned = {n for n, p in self.named_parameters() if p.requires_grad and n.startswith("vision_tower")}
        out = {k: v for k, v in state.items() if k.startswith(("projector.", "mining.")) or k in tuned}
        if self.im_start_end_ids:
            embed_name = next(n for n, p in self.named_parameters()
                              if p is self.llm.get_input_embeddings().weight)
            out["llm_image_token_rows"] = state[embed_name][self.im_start_end_ids]
        return out

    def load_mm_weights(self, path):
        path = Path(path)
        state = load_file(path / MM_WEIGHTS if path.is_dir() else path)
        rows = state.pop("llm_image_token_rows", None)
        missing, unexpected = self.load_state_dict(state, strict=False)
        missing = [k for k in missing if k.startswith(("projector.", "mining."))]
        if missing or unexpected:
            raise ValueError(f"{path}: projector/mining weights do not fit this model ({missing=}, {unexpected=})")
        if rows is not None and self.im_start_end_ids:
            with torch.no_grad():
                weight = self.llm.get_input_embeddings().weight
                weight[self.im_start_end_ids] = rows.to(weight.dtype)


def set_stage(model: MiniGemini, stage: str, *, tune_vision_tower=False, tune_vision_tower_aux=False,
              print_fn=print) -> str:
    """Freeze/unfreeze per DESIGN.md's stage table; returns (and prints) a table of trainable parameters.
    pretrain: projector + mining (+ rows of added image tokens). finetune: + the LLM, or only its LoRA adapters
    when apply_lora was called. Towers train only when asked."""
    if stage not in ("pretrain", "finetune"):
        raise ValueError(f"unknown stage {stage!r}")
    model.requires_grad_(False)
    model.projector.requires_grad_(True)
    if model.mining is not None:
        model.mining.requires_grad_(True)
    if stage == "finetune":
        if model.config.bits < 16 and not _is_peft(model.llm):
            raise ValueError("a 4/8-bit LLM trains only through LoRA: apply_lora(model) before set_stage")
        for name, p in model.llm.named_parameters():
            p.requires_grad_(not _is_peft(model.llm) or "lora_" in name)
    if model._row_hook is not None:
        model._row_hook.remove()
        model._row_hook = None
    embedding = model.llm.get_input_embeddings().weight
    if model.im_start_end_ids and not embedding.requires_grad:   # train only the new rows of a frozen embedding
        embedding.requires_grad_(True)
        keep = torch.zeros(len(embedding), 1, dtype=embedding.dtype, device=embedding.device)
        keep[model.im_start_end_ids] = 1
        model._row_hook = embedding.register_hook(lambda grad: grad * keep.to(grad.dtype))
    for tower, tune in ((model.vision_tower, tune_vision_tower), (model.vision_tower_aux, tune_vision_tower_aux)):
        if tower is not None and tune:
            tower.requires_grad_(True)
            if model.config.gradient_checkpointing:
                tower.gradient_checkpointing(True)
    model.stage, model.tune_towers = stage, (tune_vision_tower, tune_vision_tower_aux)
    model.train(model.training)
    table = trainable_table(model)
    if print_fn:
        print_fn(table)
    return table


def apply_lora(model: MiniGemini, r=64, alpha=16, dropout=0.05, target_modules="all-linear") -> MiniGemini:
    """Wrap the LLM with LoRA adapters on its linear layers (peft's "all-linear" leaves out the output head).
    A 4/8-bit LLM first goes through peft's prepare_model_for_kbit_training, on the LLM alone, so the towers,
    mining and projector keep their dtype and stay as set_stage leaves them."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    if model.config.bits < 16:
        model.llm = prepare_model_for_kbit_training(
            model.llm, use_gradient_checkpointing=model.config.gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False})
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=target_modules,
                        task_type="CAUSAL_LM")
    model.llm = get_peft_model(model.llm, config)
    return model


def merge_lora(model: MiniGemini) -> MiniGemini:
    """Fold the adapters into the LLM weights; the model becomes a plain one (full export possible)."""
    if _is_peft(model.llm):
        model.llm = model.llm.merge_and_unload()
    return model


def merge_lora_export(src, dst, dtype=None):
    """LoRA export -> plain full export. The base LLM is loaded unquantized: for LoRA the merge is exact; QLoRA
    adapters were trained against the NF4-dequantized weights, so the merged model is close to, not equal to, the
    quantized one."""
    model = MiniGemini.from_pretrained(src, bits=16, dtype=dtype)
    model.stage = None
    merge_lora(model).save_pretrained(dst, AutoTokenizer.from_pretrained(src), weights="full")
    return dst


# =============================================================================================================
# Checkpoint references: local paths or hub names
# =============================================================================================================
REF_SETTINGS = ("llm", "vision_tower", "vision_tower_aux")   # the base checkpoints an export refers to
TOKENIZER_VOCABULARY = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model")


def is_local_path(ref: str) -> bool:
    """A reference that can only mean a local path: absolute, ./ ../ ~, or more than the one "/" of org/name."""
    return not ref.startswith("hf-hub:") and (ref.startswith(("/", ".", "~")) or ref.count("/") > 1)


def check_model_ref(ref: str | None, setting: str, context: str = "") -> None:
    """A missing local checkpoint is named as such, not reported by the hub client as a malformed repo id."""
    if ref and is_local_path(ref) and not os.path.exists(os.path.expanduser(ref)):
        raise FileNotFoundError(f"{context}{setting}: {ref} does not exist (a local path, relative to {os.getcwd()}; "
                                "a hub name has the form org/name)")


def portable_refs(args: dict) -> dict:
    """An export's base references as absolute paths where they are local, so it loads from any working
    directory; hub names stay as they are."""
    return {k: str(Path(v).expanduser().resolve()) if k in REF_SETTINGS and isinstance(v, str) and
            not v.startswith("hf-hub:") and os.path.exists(os.path.expanduser(v)) else v for k, v in args.items()}


def check_tokenizer_dir(path) -> None:
    """A local directory without tokenizer vocabulary fails naming it (transformers would ask for sentencepiece)."""
    if os.path.isdir(path) and not any(os.path.exists(os.path.join(path, n)) for n in TOKENIZER_VOCABULARY):
        raise FileNotFoundError(f"{path} has no tokenizer ({' / '.join(TOKENIZER_VOCABULARY[:3])}): copy the "
                                "tokenizer files of the base LLM there")


# =============================================================================================================
# LLM loading, image tokens
# =============================================================================================================
def load_llm(ref, *, dtype, bits=16, attention="sdpa", random_init=False, device=None):
    kw = dict(dtype=dtype, attn_implementation=attention)
    if bits in (4, 8):
        kw["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=bits == 4, load_in_8bit=bits == 8, bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype)
    elif bits != 16:
        raise ValueError(f"bits must be 16, 8 or 4, not {bits}")
    if device is not None:
        kw["device_map"] = {"": device}
    if random_init:
        if bits != 16:
            raise ValueError("random_init builds an unquantized LLM (quantize a saved checkpoint instead)")
        return AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(ref), dtype=dtype,
                                                attn_implementation=attention)
    return AutoModelForCausalLM.from_pretrained(ref, **kw)


def add_image_tokens(llm, tokenizer) -> list[int]:
    """Add <im_start>/<im_end> to the tokenizer and the embeddings; new rows start at the mean of the old ones.
    Also on weights DeepSpeed ZeRO-3 has already partitioned (loaded inside zero.Init): they are gathered here."""
    tokenizer.add_tokens([IM_START, IM_END], special_tokens=True)
    old = _full_shape(llm.get_input_embeddings().weight)[0]
    if len(tokenizer) > old:
        llm.resize_token_embeddings(len(tokenizer), mean_resizing=False)
        weights = [emb.weight for emb in (llm.get_input_embeddings(), llm.get_output_embeddings())
                   if emb is not None and _full_shape(emb.weight)[0] > old]
        with torch.no_grad(), _gathered(weights):
            for weight in weights:
                weight[old:] = weight[:old].mean(0, keepdim=True)
    return tokenizer.convert_tokens_to_ids([IM_START, IM_END])


def _full_shape(p: torch.Tensor) -> torch.Size:
    return getattr(p, "ds_shape", p.shape)   # a ZeRO-3 partitioned parameter is empty; ds_shape is its real shape


def _gathered(params: list):
    """Whole parameters to modify in place (rank 0's change is then partitioned again), or nothing to do."""
    if not any(hasattr(p, "ds_id") for p in params):
        return nullcontext()
    import deepspeed
    return deepspeed.zero.GatheredParameters(params, modifier_rank=0)


# =============================================================================================================
# Vision towers
# =============================================================================================================
class VisionTower(nn.Module):
    """LR tower: a transformers vision model (CLIP, SigLIP, ...); features of `select_layer`, CLS dropped
    for select_feature="patch"."""

    def __init__(self, model, *, mean, std, select_layer=-2, select_feature="patch"):
        super().__init__()
        if select_feature not in ("patch", "cls_patch"):
            raise ValueError(f"mm_vision_select_feature must be patch or cls_patch, not {select_feature!r}")
        self.model, self.mean, self.std = model, list(mean), list(std)
        self.select_layer, self.select_feature = select_layer, select_feature
        cfg = model.config
        self.image_size, self.hidden_size = cfg.image_size, cfg.hidden_size
        self.num_patches = (cfg.image_size // cfg.patch_size) ** 2

    @classmethod
    def load(cls, ref, *, dtype, random_init=False, **kw):
        from transformers.image_processing_base import ImageProcessingMixin
        config = AutoConfig.from_pretrained(ref)
        vision_config = getattr(config, "vision_config", config)     # a full CLIP/SigLIP checkpoint, or vision only
        model_cls = MODEL_MAPPING[type(vision_config)]                 # CLIPVisionModel, SiglipVisionModel, ...
        model = model_cls(vision_config) if random_init else model_cls.from_pretrained(ref, dtype=dtype)
        try:
            proc = ImageProcessingMixin.get_image_processor_dict(ref)[0]
        except OSError:
            proc = {}
        if "image_mean" not in proc or "image_std" not in proc:  # never guess: SigLIP uses 0.5, CLIP its own values
            raise ValueError(f"{ref} has no image processor config (preprocessor_config.json with image_mean / "
                             "image_std): the tower's normalization cannot be known")
        return cls(model.to(dtype), mean=proc["image_mean"], std=proc["image_std"], **kw)

    @classmethod
    def from_config(cls, config: dict, image_settings: dict, *, dtype, **kw):
        config = dict(config)
        vision_config = AutoConfig.for_model(config.pop("model_type"), **config)
        model = MODEL_MAPPING[type(vision_config)](vision_config).to(dtype)
        return cls(model, mean=image_settings["image_mean"], std=image_settings["image_std"], **kw)

    @property
    def num_tokens(self) -> int:
        return self.num_patches + (1 if self.select_feature == "cls_patch" else 0)

    def gradient_checkpointing(self, on=True):
        if on:
            enable_checkpointing(self.model)

    def forward(self, pixels):
        out = self.model(pixels.to(_dtype(self)), output_hidden_states=True)
        feats = out.hidden_states[self.select_layer]
        cls = feats.shape[1] - self.num_patches          # 1 for CLIP, 0 for SigLIP
        return feats[:, cls:] if self.select_feature == "patch" else feats


class ConvNeXtTower(nn.Module):
    """HR tower: the stem and four stages of a timm ConvNeXt (OpenCLIP's ConvNeXt is `model.visual.trunk`).
    Every stage output is upsampled (bilinear) to stage-0 resolution (input/4) and concatenated on channels."""

    def __init__(self, trunk, spec: dict, *, mean, std):
        super().__init__()
        self.stem, self.stages = trunk.stem, trunk.stages     # the pooling head is never used, so not kept
        self.mean, self.std = list(mean), list(std)
        self.spec = dict(spec, mean=self.mean, std=self.std)     # what an export needs to rebuild this tower
        self.channels = sum(info["num_chs"] for info in trunk.feature_info[-len(trunk.stages):])

    @classmethod
    def load(cls, ref, *, dtype, random_init=False):
        """ref: a dir with open_clip_config.json (OpenCLIP) or config.json (timm), "hf-hub:<repo>" of either kind,
        or, with random_init, an OpenCLIP or timm model name."""
        import open_clip
        import timm
        kind = _aux_kind(ref)
        if kind == "open_clip":
            if random_init:
                cfg = _open_clip_config(ref)
                trunk = timm.create_model(cfg["model_cfg"]["vision_cfg"]["timm_model_name"], pretrained=False)
                pp = cfg.get("preprocess_cfg", {})
                mean, std = pp.get("mean", open_clip.OPENAI_DATASET_MEAN), pp.get("std", open_clip.OPENAI_DATASET_STD)
            else:
                name = "local-dir:" + str(ref) if os.path.isdir(ref) else ref
                visual = open_clip.create_model(name).visual
                trunk, mean, std = visual.trunk, visual.preprocess_cfg["mean"], visual.preprocess_cfg["std"]
            spec = dict(timm_model_name=trunk.default_cfg["architecture"], timm_kwargs={})
        else:
            name = "local-dir:" + str(ref) if os.path.isdir(ref) else ref
            trunk = timm.create_model(name, pretrained=not random_init)
            kwargs = dict(getattr(trunk, "pretrained_cfg", {}).get("model_args", {}) or _timm_model_args(ref))
            spec = dict(timm_model_name=trunk.default_cfg["architecture"], timm_kwargs=kwargs)
            mean, std = trunk.pretrained_cfg["mean"], trunk.pretrained_cfg["std"]
        return cls(trunk, spec, mean=mean, std=std).to(dtype)

    @classmethod
    def from_spec(cls, spec: dict, *, dtype):
        """Rebuild from the spec an export recorded (random weights, filled by the export's state dict)."""
        import timm
        trunk = timm.create_model(spec["timm_model_name"], pretrained=False, **spec["timm_kwargs"])
        return cls(trunk, spec, mean=spec["mean"], std=spec["std"]).to(dtype)

    def gradient_checkpointing(self, on=True):
        for stage in self.stages:
            stage.grad_checkpointing = on

    def forward(self, pixels):
        """The full concatenated map [N, C, H/4, W/4] (what PatchInfoMining.reference reads; the model itself
        passes stage_maps to the mining, which never builds this map)."""
        return upsample_concat(self.stage_maps(pixels))

    def stage_maps(self, pixels) -> list[torch.Tensor]:
        """The four stage outputs at their own resolutions, finest first: [N, c_s, H/2^(s+2), W/2^(s+2)]."""
        x = self.stem(pixels.to(_dtype(self)))
        outs = []
        for stage in self.stages:
            x = stage(x)
            outs.append(x)
        return outs


def upsample_concat(maps: list[torch.Tensor]) -> torch.Tensor:
    """Stage maps, finest first -> each upsampled (bilinear) to the first one's size, concatenated on channels."""
    size = maps[0].shape[-2:]
    return torch.cat([F.interpolate(m.float(), size=size, mode="bilinear", align_corners=False).to(m.dtype)
                      for m in maps], 1)


def hr_views(hr, grid: int, image_global: bool, views: int) -> torch.Tensor:
    """HR map [N, C, H, W] -> one HR map per LR view [N, V, C, h, w], in the views' order [global, crops].
    Each crop (row-major) gets its own quadrant; the global view gets the map downsampled by the grid factor."""
    if grid == 1:
        return hr[:, None]
    n, c, h, w = hr.shape
    crops = hr.reshape(n, c, grid, h // grid, grid, w // grid).permute(0, 2, 4, 1, 3, 5)
    crops = crops.reshape(n, grid * grid, c, h // grid, w // grid)
    if image_global:
        small = F.interpolate(hr.float(), size=(h // grid, w // grid), mode="bilinear", align_corners=False)
        crops = torch.cat([small.to(hr.dtype)[:, None], crops], 1)
    if crops.shape[1] != views:
        raise ValueError(f"images carry {views} views but image_grid={grid}, image_global={image_global} "
                         f"make {crops.shape[1]}")
    return crops


# =============================================================================================================
# Patch info mining
# =============================================================================================================
class PatchInfoMining(nn.Module):
    """Each LR token (query) attends over its own MxM window of HR positions (keys, values); single head,
    softmax(QK^T / sqrt(d)); the result is added to the LR token. Q = Linear(LN(LR)), K, V = Linear(LN(HR)).

    forward is memory-light: the HR map (all stages upsampled to stage-0 resolution and concatenated, e.g. 2880
    channels at 384x384 for HD) is never materialized. It is built one band of LR rows at a time, straight from the
    stage maps, and under autograd each band is recomputed in backward instead of kept. K and V are never built
    either: the key projection is applied to the query and the value projection after the weighted sum.
    `reference` is the plain version on the full map (K and V of every position), kept for tests and benchmarks."""

    max_tile_elements = 2 ** 25     # HR values (views x channels x band positions) one band may hold: 64 MB in bf16

    def __init__(self, dim: int, aux_dim: int):
        super().__init__()
        self.query = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim))
        self.key = nn.Sequential(nn.LayerNorm(aux_dim), nn.Linear(aux_dim, dim))
        self.value = nn.Sequential(nn.LayerNorm(aux_dim), nn.Linear(aux_dim, dim))

    def forward(self, lr, hr, *, grid: int = 1, image_global: bool = False):
        """lr [N*V, G*G, d] (row-major grid; the V views of an image adjacent, ordered as hr_views orders them);
        hr: the HR tower's stage maps, finest first ([N, c_s, H_s, H_s], each upsampled to the first one's side H
        and concatenated on channels), or one already concatenated map [N, C, H, H]. Equals
        reference(lr, hr_views(concatenated map, grid, image_global, V).flatten(0, 1)) -> [N*V, G*G, d]."""
        lr = lr.to(_dtype(self))
        maps = [m.to(lr.dtype) for m in ([hr] if torch.is_tensor(hr) else hr)]
        side = maps[0].shape[-1]
        if any(m.shape[-1] != m.shape[-2] for m in maps):
            raise ValueError(f"HR maps must be square, got {[tuple(m.shape[-2:]) for m in maps]}")
        exact = [view_matrices(side, m.shape[-1], grid, image_global) for m in maps]   # float64, on the CPU
        mats = [mat.to(lr) for mat in exact]                                           # (rows, cols) per view
        views, h = mats[0].shape[1:3]
        g = math.isqrt(lr.shape[1])
        if len(lr) != len(maps[0]) * views:
            raise ValueError(f"{len(lr)} LR views for {len(maps[0])} HR images, but image_grid={grid}, "
                             f"image_global={image_global} make {views} views per image")
        if h % g:
            raise ValueError(f"HR map {h}x{h} per view is not a multiple of the LR grid {g}")
        m = h // g
        channels = sum(x.shape[1] for x in maps)
        rows = max(1, min(g, self.max_tile_elements // (len(lr) * channels * m * h)))   # LR rows per band
        q = self.query(lr)
        out = []
        for i in range(0, g, rows):
            r0, r1 = i * m, min(g, i + rows) * m
            spans = [[(*_support(mat[0, v, r0:r1]), *_support(mat[1, v])) for v in range(views)] for mat in exact]
            args = (q[:, i * g:(i + rows) * g], maps, mats, spans, r0, r1, m)
            out.append(checkpoint(self._band, *args, use_reentrant=False) if torch.is_grad_enabled()
                       else self._band(*args))
        return lr + torch.cat(out, 1)

    def _band(self, q, maps, mats, spans, r0: int, r1: int, m: int):
        """Queries of the LR rows whose windows cover HR rows [r0, r1) of every view -> their attention output."""
        views = mats[0].shape[1]
        band = torch.stack([torch.cat([_interpolate_band(x, mat[0, v, r0:r1], mat[1, v], span[v])
                                       for x, mat, span in zip(maps, mats, spans)], -1)
                            for v in range(views)], 1)                 # [N, V, r1-r0, h, C], channels last
        b, rows, cols, c = band.flatten(0, 1).shape
        windows = band.reshape(b, rows // m, m, cols // m, m, c).transpose(2, 3).reshape(b, -1, m * m, c)
        # One query per window, so both Linears move off the M*M positions: q.(W_k x + b_k) = (W_k^T q).x + q.b_k,
        # and sum_j p_j (W_v x_j + b_v) = W_v (sum_j p_j x_j) + b_v. Same math as reference; no position is ever
        # projected to d channels (the reference's two [.., M*M, C] x [C, d] matmuls are most of its FLOPs).
        key, value = self.key[1], self.value[1]
        scores = (self.key[0](windows) @ (q @ key.weight)[..., None]).squeeze(-1) + (q @ key.bias)[..., None]
        att = (scores / math.sqrt(q.shape[-1])).softmax(-1)                    # [N*V, rows*G, M*M]
        return value((att[:, :, None] @ self.value[0](windows)).squeeze(2))   # [N*V, rows*G, d]

    def reference(self, lr, hr):
        """Plain version: lr [N, G*G, d], hr [N, C, G*M, G*M]; materializes every window as [N, G*G, M*M, C]."""
        lr, hr = lr.to(_dtype(self)), hr.to(_dtype(self))
        windows = hr_windows(hr, math.isqrt(lr.shape[1]))
        q = self.query(lr)[:, :, None]                                   # [N, P, 1, d]
        k, v = self.key(windows), self.value(windows)                    # [N, P, M*M, d]
        att = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])         # [N, P, 1, M*M]
        return lr + (att.softmax(-1) @ v).squeeze(2)


def hr_windows(hr, grid: int) -> torch.Tensor:
    """[N, C, G*M, G*M] -> [N, G*G, M*M, C]: window (i, j) holds the HR positions under LR token (i, j)."""
    n, c, h, w = hr.shape
    if h != w or h % grid:
        raise ValueError(f"HR map {h}x{w} is not a multiple of the LR grid {grid}")
    m = h // grid
    x = hr.reshape(n, c, grid, m, grid, m).permute(0, 2, 4, 3, 5, 1)
    return x.reshape(n, grid * grid, m * m, c)


def view_matrices(side: int, src: int, grid: int, image_global: bool) -> torch.Tensor:
    """What hr_views does to a stage map of side `src` once upsampled (bilinear) to `side`, as matrices:
    view v of the map x is rows[v] @ x @ cols[v]^T. Returns [2 (rows, cols), V, side // grid, src], float64.
    Bilinear resizing is separable, so a crop takes a slice of the upsampling matrix and the global view the
    downsampling matrix times it: the same weights F.interpolate uses, applied to only the rows a band needs."""
    up = _resize_matrix(src, side)
    if grid == 1:
        return torch.stack([up[None], up[None]])
    h = side // grid
    tiles = [up[i * h:(i + 1) * h] for i in range(grid)]
    rows = [tiles[i] for i in range(grid) for _ in range(grid)]
    cols = [tiles[j] for _ in range(grid) for j in range(grid)]
    if image_global:
        small = _resize_matrix(side, h) @ up
        rows, cols = [small, *rows], [small, *cols]
    return torch.stack([torch.stack(rows), torch.stack(cols)])


def _resize_matrix(src: int, dst: int) -> torch.Tensor:
    """[dst, src]: F.interpolate(mode="bilinear", align_corners=False) along one axis, as a matrix."""
    eye = torch.eye(src, dtype=torch.float64)[:, None]                  # src one-hot signals of length src
    return F.interpolate(eye, size=dst, mode="linear", align_corners=False)[:, 0].T


def _interpolate_band(x, rows, cols, span) -> torch.Tensor:
    """rows @ x @ cols^T for x [N, c, H_s, W_s], channels last: [N, len(rows), len(cols), c]. Reads only the source
    rows and columns with a weight (span = top, bottom, left, right, found on the CPU so the GPU never waits); two
    plain matmuls with the channels innermost (transposing the result would cost as much as the rest)."""
    top, bottom, left, right = span
    x = x[:, :, top:bottom, left:right].permute(0, 2, 3, 1)              # [N, h', w', c]
    n, h, w, c = x.shape
    x = (rows[:, top:bottom] @ x.reshape(n, h, w * c)).reshape(-1, w, c)  # [N*r, w', c]
    return (cols[:, left:right] @ x).reshape(n, len(rows), len(cols), c)


def _support(matrix) -> tuple[int, int]:
    """The range of columns of `matrix` with a nonzero weight."""
    used = matrix.abs().sum(0).nonzero()
    return int(used.min()), int(used.max()) + 1


# =============================================================================================================
# Projectors
# =============================================================================================================
def build_projector(kind: str, in_dim: int, out_dim: int, *, heads=8, queries=64) -> nn.Module:
    if kind == "linear":
        return nn.Linear(in_dim, out_dim)
    if m := re.fullmatch(r"mlp(\d+)x_gelu", kind):
        layers = [nn.Linear(in_dim, out_dim)]
        for _ in range(int(m.group(1)) - 1):
            layers += [nn.GELU(), nn.Linear(out_dim, out_dim)]
        return nn.Sequential(*layers)
    if kind == "perceiver":
        return PerceiverProjector(in_dim, out_dim, queries, heads)
    if kind == "vit":
        return ViTProjector(in_dim, out_dim, heads)
    raise ValueError(f"unknown projector {kind!r}: linear, mlp{{N}}x_gelu, perceiver or vit")


class PerceiverProjector(nn.Module):
    """DeepSpeed-VisualChat's perceiver: learned queries cross-attend to the image tokens, then a linear map."""

    def __init__(self, in_dim, out_dim, num_queries, heads):
        super().__init__()
        self.queries = nn.Parameter(torch.randn(num_queries, in_dim) * in_dim ** -0.5)
        self.norm_q, self.norm_kv = nn.LayerNorm(in_dim), nn.LayerNorm(in_dim)
        self.attn = nn.MultiheadAttention(in_dim, heads, batch_first=True)
        self.out = nn.Sequential(nn.LayerNorm(in_dim), nn.Linear(in_dim, out_dim))

    def forward(self, x):
        q = self.norm_q(self.queries).expand(len(x), -1, -1)
        kv = self.norm_kv(x)
        return self.out(self.queries + self.attn(q, kv, kv, need_weights=False)[0])


class ViTProjector(nn.Module):
    """DeepSpeed-VisualChat's vit projector: one pre-norm transformer layer over the image tokens, then linear."""

    def __init__(self, in_dim, out_dim, heads):
        super().__init__()
        self.layer = nn.TransformerEncoderLayer(in_dim, heads, 4 * in_dim, dropout=0.0, activation="gelu",
                                                batch_first=True, norm_first=True)
        self.out = nn.Sequential(nn.LayerNorm(in_dim), nn.Linear(in_dim, out_dim))

    def forward(self, x):
        return self.out(self.layer(x))


# =============================================================================================================
# Splice
# =============================================================================================================
def splice(input_ids, text_embeds, image_features, attention_mask, labels=None, *, position_ids=None,
           pad_left=False) -> dict:
    """Replace each IMAGE_TOKEN_INDEX position by its image's K rows, for the whole batch at once (no sample loop).

    input_ids [B, T]; text_embeds [B, T, H] (rows at placeholders unused); image_features [N, K, H] in placeholder
    order (row-major) or None. Rows grow by (K-1) per image; shorter rows are padded at the right, or at the left
    with pad_left. Returns inputs_embeds, attention_mask, labels (IGNORE_INDEX at image and pad positions),
    image_mask (True at image positions) and position_ids (from the mask, or restarted per packed sample when
    position_ids are given)."""
    b, t = input_ids.shape
    is_img = input_ids == IMAGE_TOKEN_INDEX
    n_img = int(is_img.sum())
    k = 0 if image_features is None else image_features.shape[1]
    if n_img != (0 if image_features is None else len(image_features)):
        raise ValueError(f"{n_img} image placeholders but {0 if image_features is None else len(image_features)} "
                         f"images")
    width = torch.where(is_img, k, 1)                           # positions each token occupies after the splice
    if not pad_left:  # right padding takes no position: rows are as wide as the longest real row, so a row that
        width = width * (attention_mask != 0)   # grows by its images does not widen the batch by its padding too
    end = width.cumsum(1)
    length = int(end[:, -1].max())
    start = end - width + ((length - end[:, -1:]) if pad_left else 0)
    # Each text token goes to its one position, each image token's K positions get its image's K rows (or, for
    # the per-token tensors below, its own value K times). The embeddings, the only wide tensors, move once.
    is_text = ~is_img & (width > 0)
    text_rows, text_cols = is_text.nonzero(as_tuple=True)[0], start[is_text]
    img_row, img_col = is_img.nonzero(as_tuple=True)                          # row-major = image_features' order
    img_rows = img_row[:, None].expand(-1, k)
    img_cols = start[img_row, img_col][:, None] + torch.arange(k, device=input_ids.device)

    def place(per_token, fill, image_rows=None):
        """[B, T, ...] -> [B, length, ...]; positions no token reaches (padding) hold `fill`."""
        out = torch.full((b, length, *per_token.shape[2:]), fill, dtype=per_token.dtype, device=input_ids.device)
        out[text_rows, text_cols] = per_token[is_text]
        if n_img:
            out[img_rows, img_cols] = (per_token[img_row, img_col][:, None] if image_rows is None
                                       else image_rows.to(out.dtype))
        return out

    out = dict(inputs_embeds=place(text_embeds, 0, image_features), attention_mask=place(attention_mask, 0),
               image_mask=place(is_img, False), labels=None)
    if labels is not None:
        out["labels"] = place(labels.masked_fill(is_img, IGNORE_INDEX), IGNORE_INDEX)
    if position_ids is None:
        out["position_ids"] = (out["attention_mask"].long().cumsum(1) - 1).clamp(min=0)
    else:   # packed rows: a new sample starts where positions do not step by one (transformers' rule)
        seg = (torch.diff(position_ids, prepend=position_ids[:, :1] - 1) != 1).cumsum(1)
        seg = place(seg, -1)
        idx = torch.arange(length, device=seg.device).expand(b, -1)
        new = torch.ones_like(seg, dtype=torch.bool)
        new[:, 1:] = seg[:, 1:] != seg[:, :-1]
        out["position_ids"] = idx - torch.where(new, idx, 0).cummax(1).values
    return out


# =============================================================================================================
# MMCA attention (DeepSpeed-VisualChat), registered for every model that uses transformers' attention interface
# =============================================================================================================
def packed_attention_kwargs(position_ids, attn_implementation: str) -> dict:
    """Packed rows: position ids restart at 0 for each sample. With no attention mask, transformers builds a
    per-sample (block-diagonal) causal mask for sdpa / eager / mmca / flex from the position ids. Flash-attention
    gets the sample boundaries explicitly (transformers 5 finds them itself only at batch size 1). Any other
    implementation might silently attend across samples: refuse it."""
    if "flash" in attn_implementation:
        pos = position_ids.flatten()
        starts = (pos == 0).nonzero().flatten()
        cu = torch.cat([starts, starts.new_tensor([pos.numel()])]).int()
        longest = int(cu.diff().max())
        return dict(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=longest, max_length_k=longest)
    if attn_implementation not in ("sdpa", "eager", "mmca", "flex_attention"):
        raise ValueError(f"packed rows need an attention that isolates samples; {attn_implementation!r} is not "
                         "known to: use sdpa, eager, mmca, flex_attention or flash_attention_2")
    return {}


def mmca_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, mm_image_mask=None, **kw):
    """Two softmaxes per query, one over image keys and one over text keys, their weights summed.
    An image query sees only itself among image keys (and earlier text); a text query sees all earlier tokens.
    query [B, h, q, d], key/value [B, h_kv, k, d]; attention_mask: bool [B, 1, q, k] (True = may attend), which
    carries causality, padding, sliding windows and packing; mm_image_mask [B, k]: True at image positions."""
    groups = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(groups, 1), value.repeat_interleave(groups, 1)
    q_len, k_len = query.shape[2], key.shape[2]
    scaling = scaling if scaling is not None else query.shape[-1] ** -0.5
    scores = (query.float() @ key.float().transpose(-1, -2)) * scaling
    if attention_mask is None:
        attention_mask = torch.ones(q_len, k_len, dtype=torch.bool, device=query.device).tril(k_len - q_len)
    elif attention_mask.dtype != torch.bool:
        attention_mask = attention_mask == 0
    attention_mask = attention_mask.to(scores.device)
    if mm_image_mask is None:
        mm_image_mask = torch.zeros(query.shape[0], k_len, dtype=torch.bool, device=query.device)
    key_img = mm_image_mask[:, None, None, -k_len:]
    query_img = mm_image_mask[:, None, -q_len:, None]
    itself = torch.arange(k_len, device=query.device) == torch.arange(k_len - q_len, k_len, device=query.device)[:, None]
    image_keys = attention_mask & key_img & (~query_img | itself)
    text_keys = attention_mask & ~key_img
    weights = _masked_softmax(scores, image_keys) + _masked_softmax(scores, text_keys)
    weights = F.dropout(weights, p=dropout, training=module.training).to(value.dtype)
    return (weights @ value).transpose(1, 2).contiguous(), weights


def _masked_softmax(scores, allowed):
    """Softmax over the allowed keys; rows with none allowed give zeros (not NaN)."""
    return scores.masked_fill(~allowed, torch.finfo(scores.dtype).min).softmax(-1) * allowed


def _mmca_mask(*args, **kw):
    """Boolean mask (True = may attend), never skipped: mmca always needs it."""
    return sdpa_mask(*args, **{**kw, "allow_is_causal_skip": False, "allow_is_bidirectional_skip": False})


AttentionInterface.register("mmca", mmca_attention)
AttentionMaskInterface.register("mmca", _mmca_mask)


# =============================================================================================================
# Model FLOPs (MFU on train.py's log line, bench.py train)
# =============================================================================================================
class TrainFlops(NamedTuple):
    """Model FLOPs of training, by unit of work. A sample of n LLM positions (after the splice) costs
    n * llm_per_token + n^2 * llm_per_pair; every image costs per_image (towers, mining, projector, all views)."""
    llm_per_token: float     # the LLM's weight matmuls: 6N for a trained LLM, 4N for a frozen one, + LoRA
    llm_per_pair: float      # its attention scores (QK^T, AV): 12 * layers * heads * head_dim when backpropagated
    per_image: float

    def of(self, lengths: torch.Tensor, images: int) -> tuple[float, float]:
        """(LLM FLOPs, all FLOPs) of samples with these LLM lengths, holding `images` images."""
        n = lengths.double()
        llm = self.llm_per_token * float(n.sum()) + self.llm_per_pair * float((n * n).sum())
        return llm, llm + self.per_image * images


def train_flops(model: MiniGemini) -> TrainFlops:
    """Model FLOPs of one training step's work, from the configs and layer shapes (never from parameter tensors,
    which ZeRO-3 may have partitioned), and from which parameters train (call it after set_stage).

    Matmuls only, 2 FLOPs per multiply-accumulate: linear layers, convolutions, attention scores (norms,
    activations, softmax and resizing are left out). A part whose weights train costs 3x its forward (forward,
    gradient of the input, gradient of the weights: the 6N of 6N + 12LHT), a frozen part the gradient passes
    through on its way to an earlier trained part 2x (4N), a frozen part before every trained part 1x (2N, forward
    only, as the frozen towers). Attention scores have no weights: 3x once a gradient flows, like PaLM's 12LHT.
    Each position attends to every position of its sample (PaLM's count, not halved for causality). Gradient
    checkpointing's recomputation is hardware work, not model work: not counted (so this is MFU, not HFU)."""
    tower, aux, llm = model.vision_tower, model.vision_tower_aux, model.llm
    views = model.num_views
    # LR tower: patch embedding, then the encoder layers up to the selected hidden state.
    encoder = getattr(tower.model, "vision_model", tower.model)          # CLIP / SigLIP
    cfg = tower.model.config
    used = len(encoder.encoder.layers) + 1 + tower.select_layer if tower.select_layer < 0 else tower.select_layer
    tokens = tower.num_patches + int(getattr(encoder.embeddings, "class_embedding", None) is not None)
    embed, layer = vit_forward_flops(cfg, tokens)
    lr = _training_flops([(embed, _trains(encoder.embeddings))] +
                         [(layer, _trains(m)) for m in encoder.encoder.layers[:used]])
    lr_trains = _trains(encoder.embeddings) or any(_trains(m) for m in encoder.encoder.layers[:used])
    image = views * lr
    # HR tower (stem + 4 stages, once per image) and mining (per view).
    aux_trains = mining_trains = False
    if aux is not None:
        stages, sides = conv_forward_flops([aux.stem, *aux.stages], model.config.image_size_aux)
        image += _training_flops([(f, _trains(m)) for f, m in zip(stages, [aux.stem, *aux.stages])])
        aux_trains = any(_trains(m) for m in [aux.stem, *aux.stages])
        grid = math.isqrt(tower.num_patches)
        window = sides[1] // model.config.image_grid // grid           # M: HR positions per LR token, per side
        mining = mining_forward_flops(tower.num_patches, tower.hidden_size, aux.channels, window)
        mining_trains = _trains(model.mining)
        image += views * _training_flops([(mining, mining_trains)], upstream=lr_trains or aux_trains)
    projector = projector_forward_flops(model.projector, tower.num_tokens)
    image += views * _training_flops([(projector, _trains(model.projector))],
                                     upstream=lr_trains or aux_trains or mining_trains)
    image_trains = lr_trains or aux_trains or mining_trains or _trains(model.projector)
    # LLM: its token embeddings (a lookup: no FLOPs), LoRA adapters, base weights, output head.
    text = llm.config.get_text_config()
    per_token, per_pair = llm_forward_flops(text)
    embeddings, head = llm.get_input_embeddings(), llm.get_output_embeddings()
    head_flops = 2 * text.hidden_size * text.vocab_size
    base = [p.requires_grad for n, p in llm.named_parameters()
            if "lora_" not in n and p is not embeddings.weight and p is not head.weight]
    lora = sum(2 * m.in_features * m.out_features for n, m in llm.named_modules()
               if "lora_" in n and isinstance(m, nn.Linear))
    chain = [(0, embeddings.weight.requires_grad), (lora, lora > 0), (per_token - head_flops, any(base)),
             (head_flops, head.weight.requires_grad)]
    llm_per_token = _training_flops(chain, upstream=image_trains)
    backpropagated = image_trains or any(trains for _, trains in chain[:3])
    return TrainFlops(llm_per_token, per_pair * (3 if backpropagated else 1), image)


def llm_forward_flops(config) -> tuple[int, int]:
    """Forward FLOPs of a decoder LLM from its config: (per position: attention projections (grouped-query aware),
    gated MLP (Llama, Mistral, Gemma, Qwen2, ...; a mixture of experts counts the experts a token is routed to and
    the router), output head; the embedding lookup has none) and (per pair of positions: QK^T and AV)."""
    d, layers, heads = config.hidden_size, config.num_hidden_layers, config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or d // heads
    attention = d * head_dim * (2 * heads + 2 * kv_heads)                 # q, o; k, v
    routed = getattr(config, "num_experts_per_tok", None) or 0
    if routed:
        experts = getattr(config, "num_local_experts", None) or config.num_experts
        width = getattr(config, "moe_intermediate_size", None) or config.intermediate_size
        mlp = routed * 3 * d * width + d * experts
    else:
        mlp = 3 * d * config.intermediate_size                             # gate, up, down
    per_token = 2 * (layers * (attention + mlp) + d * config.vocab_size)
    return per_token, 2 * layers * 2 * heads * head_dim


def vit_forward_flops(config, tokens: int) -> tuple[int, int]:
    """Forward FLOPs of a CLIP / SigLIP vision encoder on one image of `tokens` positions (patches, + CLS):
    (patch embedding, one encoder layer: q, k, v, o projections, MLP, attention scores)."""
    d, patches = config.hidden_size, (config.image_size // config.patch_size) ** 2
    embed = 2 * patches * config.num_channels * config.patch_size ** 2 * d
    layer = 2 * tokens * (4 * d * d + 2 * d * config.intermediate_size) + 2 * 2 * tokens * tokens * d
    return embed, layer


def conv_forward_flops(blocks: list[nn.Module], side: int) -> tuple[list[int], list[int]]:
    """Forward FLOPs of each block of a convolutional trunk (ConvNeXt's stem and stages) on one square image of
    side `side`, and the feature-map side after each: every Conv2d and Linear (applied per position), in the order
    they are registered, which is the order they run in for ConvNeXt (a strided convolution shrinks the map)."""
    flops, sides = [], []
    for block in blocks:
        total = 0
        for m in block.modules():
            if isinstance(m, nn.Conv2d):
                k, stride = m.kernel_size[0], m.stride[0]
                pad = m.padding[0] if not isinstance(m.padding, str) else (k - 1) // 2 if m.padding == "same" else 0
                side = (side + 2 * pad - m.dilation[0] * (k - 1) - 1) // stride + 1
                total += 2 * side * side * m.out_channels * (m.in_channels // m.groups) * k * m.kernel_size[1]
            elif isinstance(m, nn.Linear):
                total += 2 * side * side * m.in_features * m.out_features
        flops.append(total)
        sides.append(side)
    return flops, sides


def mining_forward_flops(queries: int, dim: int, channels: int, window: int) -> int:
    """Forward FLOPs of patch info mining on one view, in the form PatchInfoMining.forward computes: the query
    projection, the key weight folded into the query (W_k^T q), scores and weighted sum over the window's HR
    channels, the value projection of the sum. (`reference` projects every HR position to keys and values: the
    same function with M*M times the projection work, which is not counted as model work.)"""
    positions = window * window
    return 2 * queries * (dim * dim + dim * channels + 2 * positions * channels + channels * dim)


def projector_forward_flops(projector: nn.Module, tokens: int) -> int:
    """Forward FLOPs of the projector on one view of `tokens` image tokens."""
    if isinstance(projector, PerceiverProjector):          # queries attend to the tokens, then project
        queries = projector.queries.shape[0]
        d, out = projector.attn.embed_dim, projector.out[1].out_features
        return 2 * (queries * d * d + 2 * tokens * d * d + 2 * queries * tokens * d + queries * d * d
                    + queries * d * out)
    flops = sum(2 * tokens * m.in_features * m.out_features for m in projector.modules() if isinstance(m, nn.Linear))
    for m in projector.modules():                           # vit: in-projection and attention scores
        if isinstance(m, nn.MultiheadAttention):
            flops += 2 * tokens * 3 * m.embed_dim ** 2 + 2 * 2 * tokens * tokens * m.embed_dim
    return flops


def _training_flops(chain: list[tuple[float, bool]], upstream: bool = False) -> float:
    """[(forward FLOPs, weights train)] in the order data flows -> training FLOPs: 3x for a trained part, 2x for a
    frozen part after a trained one (the gradient passes through), 1x for a frozen part before every trained one.
    upstream: a part before this chain trains."""
    total = 0.0
    for forward, trains in chain:
        total += forward * (3 if trains else 2 if upstream else 1)
        upstream = upstream or trains
    return total


def _trains(module) -> bool:
    return module is not None and any(p.requires_grad for p in module.parameters())


# =============================================================================================================
# Small helpers
# =============================================================================================================
def enable_checkpointing(model):
    """Activation (gradient) checkpointing of a transformers model, non-reentrant (works with frozen inputs)."""
    if hasattr(model, "activation_checkpointing_enable"):     # transformers >= 5.x names it so
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def cache_keyword(llm) -> str:
    """The keyword an LLM's forward takes its KV cache by: transformers 5.24 renamed `past_key_values` to `cache` in
    every model family (the old name warns, and stops working in 5.40); earlier 5.x versions know only the old one."""
    base = llm.get_base_model() if hasattr(llm, "get_base_model") else llm     # PEFT passes keywords through
    return "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"


def sample_next(logits, do_sample, temperature=1.0, top_k=0, top_p=1.0, generator=None):
    if not do_sample:
        return logits.argmax(-1)
    logits = logits / max(temperature, 1e-5)
    if top_k:
        kth = logits.topk(min(top_k, logits.shape[-1])).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, idx = logits.sort(-1, descending=True)
        drop = sorted_logits.softmax(-1).cumsum(-1) - sorted_logits.softmax(-1) > top_p   # keep the first over p
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(1, idx, drop), float("-inf"))
    return torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(1)


def trainable_table(model: MiniGemini) -> str:
    rows = [("component", "trainable", "total")]
    parts = [("llm", model.llm), ("vision_tower", model.vision_tower), ("vision_tower_aux", model.vision_tower_aux),
             ("mining", model.mining), ("projector", model.projector)]
    total_train = total_all = 0
    for name, module in parts:
        if module is None:
            continue
        train = sum(_numel(p) for p in module.parameters() if p.requires_grad)
        every = sum(_numel(p) for p in module.parameters())
        if name == "llm" and model._row_hook is not None:
            train = len(model.im_start_end_ids) * model.llm.get_input_embeddings().weight.shape[1]
        rows.append((name, f"{train:,}", f"{every:,}"))
        total_train, total_all = total_train + train, total_all + every
    rows.append(("total", f"{total_train:,}", f"{total_all:,}"))
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    lines = [f"{r[0]:<{widths[0]}}  {r[1]:>{widths[1]}}  {r[2]:>{widths[2]}}" for r in rows]
    return f"stage: {model.stage}\n" + "\n".join(lines)


def _numel(p) -> int:
    return p.numel() * 2 if type(p).__name__ == "Params4bit" else p.numel()   # two 4-bit values per stored byte


def _repeated_blocks(model: nn.Module) -> nn.ModuleList | list:
    """The outermost list of identical blocks (a causal LM's decoder layers, a ViT's encoder layers), found from
    the structure: a family whose _no_split_modules leaves its decoder layer out still gets it wrapped."""
    lists = [(name.count("."), m) for name, m in model.named_modules()
             if isinstance(m, nn.ModuleList) and len(m) > 0 and len({type(block) for block in m}) == 1]
    return min(lists, key=lambda depth_and_list: depth_and_list[0], default=(0, []))[1]


def _is_peft(module) -> bool:
    return hasattr(module, "peft_config")


def _dtype(module) -> torch.dtype:
    return next(module.parameters()).dtype


def _close(a, b) -> bool:
    return all(abs(x - y) < 1e-4 for x, y in zip(a, b))


def _contiguous(state: dict) -> dict:
    return {k: v.detach().contiguous() for k, v in state.items()}


def _jsonable(obj):
    if isinstance(obj, (set, tuple)):
        return list(obj)
    if isinstance(obj, torch.dtype):
        return str(obj).removeprefix("torch.")
    return str(obj)


def _aux_kind(ref: str) -> str:
    if os.path.isdir(ref):
        return "open_clip" if os.path.exists(os.path.join(ref, "open_clip_config.json")) else "timm"
    if ref.startswith("hf-hub:"):   # a download, not file_exists: a cached repo then resolves with HF_HUB_OFFLINE=1
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import EntryNotFoundError   # also raised offline when the file is not cached
        try:
            hf_hub_download(ref.removeprefix("hf-hub:"), "open_clip_config.json")
            return "open_clip"
        except EntryNotFoundError:
            return "timm"
    import open_clip
    return "open_clip" if ref in open_clip.list_models() else "timm"


def _open_clip_config(ref: str) -> dict:
    import open_clip
    if os.path.isdir(ref):
        return json.loads(Path(ref, "open_clip_config.json").read_text())
    if ref.startswith("hf-hub:"):
        from huggingface_hub import hf_hub_download
        return json.loads(Path(hf_hub_download(ref.removeprefix("hf-hub:"), "open_clip_config.json")).read_text())
    return {"model_cfg": open_clip.get_model_config(ref)}


def _timm_model_args(ref: str) -> dict:
    if os.path.isdir(ref):
        return json.loads(Path(ref, "config.json").read_text()).get("model_args", {})
    return {}


def _main(argv):
    if len(argv) != 3 or argv[0] != "merge":
        sys.exit("usage: python model.py merge LORA_EXPORT_DIR OUT_DIR")
    print(merge_lora_export(argv[1], argv[2]))


if __name__ == "__main__":
    _main(sys.argv[1:])
