"""Mini-Gemini: the vision parts of vision.py in front of any Hugging Face causal LM.

    images [N, V, 3, S, S] --LR tower (CLIP/SigLIP, layer -2, CLS dropped)--> [N*V, P, d]
    images_aux [N, 3, A, A] --HR tower (a timm trunk: stage maps, the finest at A/4)--> mining windows
    mining: each LR token attends over its own MxM window of HR positions, output added   (skipped without HR)
    projector -> [N, tokens_per_image, hidden] -> spliced at IMAGE_TOKEN_INDEX placeholders -> AutoModelForCausalLM

This file is the composition: MiniGemini (encode, splice, forward, generate, export/load), set_stage and LoRA.
The parts and their contracts live in vision.py, the attention extras (packed rows, MMCA) in attention.py, model
FLOPs in flops.py (their names are importable from here too); ARCHITECTURE.md says where to change what. No class
per LLM family: the LLM is whatever `AutoModelForCausalLM` builds from its config.

Public entry points first (ModelArguments, build_model, MiniGemini, set_stage, apply_lora, merge_lora,
merge_lora_export); building blocks below; `python model.py merge SRC DST` merges a LoRA export.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import sys
from collections.abc import Iterator
from contextlib import nullcontext
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file
from transformers import (AutoConfig, AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig,
                          DynamicCache)
from transformers.modeling_outputs import CausalLMOutputWithPast

from attention import _masked_softmax, mmca_attention, packed_attention_kwargs  # noqa: F401 - registers mmca
from cli import ArgumentParser, UserError, check_new_dir, run
from conversation import IGNORE_INDEX, IMAGE_TOKEN_INDEX
from decoding import cache_keyword, sample_next, stream_text  # noqa: F401 - re-exported
from flops import (TrainFlops, conv_forward_flops, llm_forward_flops, mining_forward_flops,  # noqa: F401
                   projector_forward_flops, train_flops, vit_forward_flops)
from images import parse_pinpoints
from refs import (CHECKPOINT_KINDS, CONFIG_NAME, MM_WEIGHTS, REF_SETTINGS,  # noqa: F401 - re-exported
                  TOKENIZER_VOCABULARY, check_export, check_model_ref, check_tokenizer_dir, hub_problem, in_hub_cache,
                  is_local_path, portable_refs)
from vision import (ConvNeXtTower, GridPool2x, PatchInfoMining, PerceiverProjector, TimmTrunkTower,  # noqa: F401
                    ViTProjector, VisionTower, _aux_kind, _close, _dtype, _interpolate_band, _open_clip_config,
                    anyres_dummy_images, anyres_image_settings, anyres_newline, encode_anyres,
                    _resize_matrix, _support, _timm_model_args, build_projector, enable_checkpointing, hr_views,
                    hr_windows, projector_tokens, upsample_concat, view_matrices)

IM_START, IM_END = "<im_start>", "<im_end>"
FULL_WEIGHTS = "model.safetensors"         # full exports: towers, mining, projector (the LLM lives in llm/)
MM_PARTS = ("projector.", "mining.", "image_newline")   # what a pretrain export always holds


@dataclass
class ModelArguments:
    llm: str = "lmsys/vicuna-7b-v1.5"    # the language model: any causal LM, a local directory or a hub name
    vision_tower: str = "openai/clip-vit-large-patch14-336"  # low-res tower: a transformers CLIP or SigLIP checkpoint
    vision_tower_aux: str | None = "hf-hub:laion/CLIP-convnext_large_d_320.laion2B-s29B-b131K-ft-soup"
    #   high-res tower: an OpenCLIP ConvNeXt (a directory with open_clip_config.json, or hf-hub:) or any timm trunk
    #   with stem + stages or ResNet's layers (a directory with config.json, or hf-hub:timm/...); none: plain LLaVA
    #   (no high-res tower, no patch info mining)
    random_init: bool = False            # build every part from its config alone, no weights (tests, benchmarks)
    projector: str = "mlp2x_gelu"        # maps image features to the LLM's width (mlp2x_gelu: MGM's and LLaVA-1.5's)
    perceiver_queries: int = 64          # perceiver projector: image tokens per view
    projector_heads: int = 8             # perceiver / vit projector: attention heads
    mm_vision_select_layer: int = -2     # the low-res tower's hidden layer that feeds the projector
    mm_vision_select_feature: str = "patch"   # patch: drop the CLS token; cls_patch: keep it
    mm_use_im_start_end: bool = False    # wrap each image's features in <im_start> ... <im_end> tokens
    image_size_aux: int = 768            # high-res input side in pixels (1536 for HD)
    image_grid: int = 1                  # low-res crops per side: 2 for HD (2x2 crops)
    image_global: bool = False           # HD: add the whole image as a global view, first
    image_grid_pinpoints: str = ""       # AnyRes (LLaVA-NeXT) grids HxW,...; default: its five for the tower's size;
    #   "": no AnyRes. The data then needs image_aspect_ratio anyres
    anyres_max_tiles: int = 0            # AnyRes: shrink an image's grid to ~this many tiles (OneVision); 0: no limit
    attention: str = "sdpa"              # the LLM's attention kernel, one of those allowed below (flash_*: needs the
    #   flash-attn package; mmca: DeepSpeed-VisualChat's multi-modal causal attention)
    bits: int = 16                       # 8 or 4: the LLM alone is loaded quantized (QLoRA, needs tune: qlora)
    dtype: str = "bfloat16"              # the dtype the weights are loaded in (trainable ones train in float32)
    gradient_checkpointing: bool = False  # recompute activations in the backward pass: less memory, more time
    pretrained_mm_path: str | None = None    # a pretrain export to take projector + mining weights from
    init_from: str | None = None         # start from an export (full, LoRA, converted MGM / LLaVA): its own model
    #   settings, weights, tokenizer and template; a LoRA export is merged into its base first


# How a model runs, not what it is: what a run may set when it starts from an export (init_from).
RUNTIME_SETTINGS = ("init_from", "random_init", "attention", "bits", "dtype", "gradient_checkpointing",
                    "pretrained_mm_path")


def build_model(args: ModelArguments, tokenizer=None, *, device=None) -> MiniGemini:
    """Build from checkpoints (local dirs or hub names) or, with args.random_init, from their configs alone.
    The tokenizer is needed only for mm_use_im_start_end (the two tokens are added to it). With args.init_from the
    model is that export (settings.py has already made args its settings), a LoRA export merged into its base."""
    if args.init_from:
        if args.pretrained_mm_path:
            raise ValueError("init_from and pretrained_mm_path both name weights to start from: keep one")
        model = MiniGemini.from_pretrained(args.init_from, bits=args.bits, dtype=args.dtype, attention=args.attention,
                                           device=device, random_init=args.random_init)
        model = merge_lora(model) if _is_peft(model.llm) else model
        # What the model is stays the export's; how it runs is this run's (settings.start_from_export did the same)
        model.config = dataclasses.replace(model.config, **{k: getattr(args, k) for k in RUNTIME_SETTINGS})
        if args.gradient_checkpointing:
            enable_checkpointing(model.llm)
        return model.train()
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
        vision_tower_aux = TimmTrunkTower.load(args.vision_tower_aux, dtype=dtype, random_init=args.random_init)
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
        if vision_tower_aux is not None:       # data.py normalizes both towers' pixels as the LR tower wants
            vision_tower_aux.expect_input(vision_tower.mean, vision_tower.std)
        self.projector = build_projector(config.projector, d, llm.config.get_text_config().hidden_size,
                                         heads=config.projector_heads, queries=config.perceiver_queries).to(dtype)
        self.pinpoints = parse_pinpoints(config.image_grid_pinpoints, vision_tower.image_size)
        if self.pinpoints:       # LLaVA-NeXT's row end: a learned LLM-space vector after every row of grid features
            self.image_newline = anyres_newline(config, llm, im_start_end_ids, dtype)
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
        """LLM positions of one image; AnyRes: the most any image takes (the data counts each by its size)."""
        if self.pinpoints:
            return anyres_image_settings(self)["tokens_per_image"]
        per_view = projector_tokens(self.config.projector, self.vision_tower.num_tokens,
                                    queries=self.config.perceiver_queries)
        return self.num_views * per_view + (2 if self.im_start_end_ids else 0)

    def image_settings(self) -> dict:
        aux = self.config.image_size_aux if self.vision_tower_aux is not None else None   # plain LLaVA: no HR input
        anyres = {k: v for k, v in anyres_image_settings(self).items() if k != "tokens_per_image"}
        return dict(image_size=self.vision_tower.image_size, image_size_aux=aux,
                    image_mean=list(self.vision_tower.mean), image_std=list(self.vision_tower.std),
                    image_grid=self.config.image_grid, image_global=self.config.image_global, **anyres)

    @property
    def _no_split_modules(self) -> list[str]:
        """Blocks FSDP wraps one by one (accelerate's TRANSFORMER_BASED_WRAP reads this): the LLM's decoder layers,
        the LR tower's encoder layers, the HR tower's blocks (its fsdp_block_class). Only classes this model contains:
        accelerate stops on a listed class it cannot find, and CLIPVisionModel's own list names CLIP's text-model
        classes too."""
        names = set()
        for module in (self.llm, self.vision_tower.model):
            base = module.get_base_model() if _is_peft(module) else module
            names.update(getattr(base, "_no_split_modules", None) or [])
            names.update(type(layer).__name__ for layer in _repeated_blocks(base))
        if self.vision_tower_aux is not None:
            names.add(self.vision_tower_aux.fsdp_block_class.__name__)
        present = {type(m).__name__ for m in self.modules()}
        return sorted(names & present)

    # ---- forward --------------------------------------------------------------------------------------------
    def forward(self, input_ids, attention_mask=None, labels=None, images=None, images_aux=None, image_counts=None,
                position_ids=None, num_items_in_batch=None, ids=None, image_sizes=None,
                **kw) -> CausalLMOutputWithPast:
        """Loss = summed token cross-entropy / num_items_in_batch when given (train.py passes the supervised-token
        count of the whole optimizer step), else the mean. position_ids given = packed rows (restart per sample):
        the LLM then isolates the samples itself (transformers detects packing from position ids).
        `ids` (the batch's record ids) is accepted and ignored, so a collated batch can be passed as **batch."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        pad_left = bool((attention_mask[:, 0] == 0).any())
        inputs = self.prepare_inputs(input_ids, attention_mask, labels, images, images_aux, image_counts,
                                     position_ids=position_ids, pad_left=pad_left, image_sizes=image_sizes)
        kw.setdefault("use_cache", False)     # a cache here would also hide packing from transformers' mask code
        return self.llm(**inputs, num_items_in_batch=num_items_in_batch, **kw)

    def encode_images(self, images, images_aux=None, image_sizes=None) -> torch.Tensor | list[torch.Tensor]:
        """[N, V, 3, S, S] (+ [N, 3, A, A]) -> [N, tokens_per_image, hidden]. AnyRes (image_sizes [N, 2]): views
        back to back [sum V_i, 3, S, S] (+ HR tiles) -> a list of [tokens of image i, hidden] (vision.encode_anyres)."""
        if image_sizes is not None:
            return encode_anyres(self, images, images_aux, image_sizes)
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
                       *, position_ids=None, pad_left=False, image_sizes=None) -> dict:
        """Token ids with placeholders -> the keyword arguments of the LLM's forward (inputs_embeds, mask, ...)."""
        embed = self.llm.get_input_embeddings()
        text = embed(input_ids.clamp(min=0))
        feats = None
        if images is not None:
            feats = self.encode_images(images, images_aux, image_sizes)
        elif self.training:
            dummy = self.encode_images(*self.dummy_images(text.device))
            text = text + 0 * sum(f.sum() for f in dummy).to(text.dtype)
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
        if self.pinpoints:
            return anyres_dummy_images(s, self.pinpoints, device)
        images = torch.zeros(1, self.num_views, 3, s["image_size"], s["image_size"], device=device)
        aux = None
        if self.vision_tower_aux is not None:
            aux = torch.zeros(1, 3, s["image_size_aux"], s["image_size_aux"], device=device)
        return images, aux

    # ---- generation -----------------------------------------------------------------------------------------
    def generate(self, input_ids, attention_mask=None, images=None, images_aux=None, image_counts=None,
                 max_new_tokens=64, do_sample=False, temperature=1.0, top_k=0, top_p=1.0, eos_token_id=None,
                 pad_token_id=None, generator=None, image_sizes=None) -> torch.LongTensor:
        """Batched generation with a KV cache; any padding is moved to the left first.
        Returns only the new tokens [B, <= max_new_tokens]; rows that finished early are filled with pad."""
        return torch.stack(list(self.generate_steps(
            input_ids, attention_mask, images, images_aux, image_counts, max_new_tokens=max_new_tokens,
            do_sample=do_sample, temperature=temperature, top_k=top_k, top_p=top_p, eos_token_id=eos_token_id,
            pad_token_id=pad_token_id, generator=generator, image_sizes=image_sizes)), 1)

    def stream(self, input_ids, images=None, images_aux=None, image_counts=None, **generation) -> Iterator[int]:
        """One conversation's new tokens, each handed out as soon as it is produced: the tokens of generate()'s
        row for the same inputs, up to and including the stop token. `generation`: generate()'s settings.
        A caller stops early by no longer iterating; the cache goes with the generator, the model keeps no state."""
        input_ids = input_ids if input_ids.dim() == 2 else input_ids[None]
        if len(input_ids) != 1:
            raise ValueError(f"stream generates for one conversation; got a batch of {len(input_ids)} (use generate)")
        for token in self.generate_steps(input_ids, None, images, images_aux, image_counts, **generation):
            yield int(token[0])

    @torch.no_grad()
    def generate_steps(self, input_ids, attention_mask=None, images=None, images_aux=None, image_counts=None, *,
                       max_new_tokens=64, do_sample=False, temperature=1.0, top_k=0, top_p=1.0, eos_token_id=None,
                       pad_token_id=None, generator=None, image_sizes=None) -> Iterator[torch.LongTensor]:
        """The decoding loop generate() and stream() share: yields each step's new tokens [B] until every row has
        produced a stop token or max_new_tokens are out; a finished row gets pad."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        order = torch.sort(attention_mask, dim=1, stable=True).indices          # zeros first = left padding
        input_ids, attention_mask = input_ids.gather(1, order), attention_mask.gather(1, order)
        inputs = self.prepare_inputs(input_ids, attention_mask, None, images, images_aux, image_counts, pad_left=True,
                                     image_sizes=image_sizes)
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
        for _ in range(max_new_tokens):
            logits = self.llm(**inputs, **cache, use_cache=True).logits[:, -1].float()
            token = sample_next(logits, do_sample, temperature, top_k, top_p, generator)
            token = torch.where(done, torch.full_like(token, pad), token)
            yield token
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
    def from_pretrained(cls, path, *, bits=None, dtype=None, attention=None, device=None, trainable=False,
                        random_init=False):
        """Load an export. Full exports need nothing else; pretrain / LoRA exports also load their base
        checkpoints (recorded in mgm_config.json). bits/dtype/attention override the saved settings; random_init
        builds the same model from the configs alone, no weights (--plan)."""
        path = Path(path)
        meta = check_export(path)
        if meta["export"] != "full":  # the base checkpoints a pretrain / LoRA export builds on must be reachable
            if meta["args"].get("init_from"):   # an export built on another export: that one is its base
                check_export(meta["args"]["init_from"], f"{path / CONFIG_NAME} refers to it: init_from")
            for setting in ("llm", "vision_tower", "vision_tower_aux") if not meta["args"].get("init_from") else ():
                check_model_ref(meta["args"].get(setting), setting, f"{path / CONFIG_NAME} refers to it: ")
        known = {f.name for f in fields(ModelArguments)}
        args = ModelArguments(**{k: v for k, v in meta["args"].items() if k in known})
        args.bits, args.dtype = bits or args.bits, dtype or args.dtype
        args.attention, args.pretrained_mm_path, args.gradient_checkpointing = attention or args.attention, None, False
        args.random_init = random_init
        if meta["export"] == "full":
            torch_dtype = getattr(torch, args.dtype)
            llm = load_llm(str(path / "llm"), dtype=torch_dtype, bits=args.bits, attention=args.attention,
                           random_init=random_init, device=device)
            vt = VisionTower.from_config(meta["vision_config"], meta["image_settings"], dtype=torch_dtype,
                                         select_layer=args.mm_vision_select_layer,
                                         select_feature=args.mm_vision_select_feature)
            aux = TimmTrunkTower.from_spec(meta["vision_aux_config"], dtype=torch_dtype) \
                if meta["vision_aux_config"] else None
            model = cls(args, llm, vt, aux, im_start_end_ids=meta["im_start_end_ids"])
            missing, unexpected = model.load_state_dict(load_file(path / FULL_WEIGHTS), strict=False) \
                if not random_init else ([], [])
            if unexpected or any(not k.startswith("llm.") for k in missing):
                raise ValueError(f"{path}: weights do not match the config ({missing=}, {unexpected=})")
        else:
            tokenizer = AutoTokenizer.from_pretrained(path) if meta["im_start_end_ids"] else None
            model = build_model(args, tokenizer, device=device)
            if random_init:
                return model.eval()
            if meta["export"] == "lora":
                PeftModel, prepare_model_for_kbit_training = _peft("PeftModel", "prepare_model_for_kbit_training",
                                                                   bits=args.bits)
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
        out = {k: v for k, v in state.items() if k.startswith(MM_PARTS) or k in tuned}
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
        missing = [k for k in missing if k.startswith(("projector.", "mining."))]   # image_newline may start new
        if missing or unexpected:
            raise ValueError(f"{path}: projector/mining weights do not fit this model ({missing=}, {unexpected=})")
        if rows is not None and self.im_start_end_ids:
            with torch.no_grad():
                weight = self.llm.get_input_embeddings().weight
                weight[self.im_start_end_ids] = rows.to(weight.dtype)


def set_stage(model: MiniGemini, stage: str, *, tune_vision_tower=False, tune_vision_tower_aux=False,
              print_fn=print) -> str:
    """Freeze/unfreeze for a training stage; returns (and prints) a table of trainable parameters.
    pretrain: projector + mining (+ rows of added image tokens). finetune: + the LLM, or only its LoRA adapters
    when apply_lora was called. Towers train only when asked."""
    if stage not in ("pretrain", "finetune"):
        raise ValueError(f"unknown stage {stage!r}")
    for name, p in model.named_parameters():    # projector, mining, AnyRes' image_newline (LLaVA-NeXT trains it)
        p.requires_grad_(name.startswith(MM_PARTS))
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
    LoraConfig, get_peft_model, prepare_model_for_kbit_training = _peft(
        "LoraConfig", "get_peft_model", "prepare_model_for_kbit_training", bits=model.config.bits)
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
    if Path(src, "train_config.yaml").exists():   # its template and image handling, for eval / chat / init_from
        shutil.copyfile(Path(src, "train_config.yaml"), Path(dst, "train_config.yaml"))
    return dst


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
# Splice
# =============================================================================================================
def splice(input_ids, text_embeds, image_features, attention_mask, labels=None, *, position_ids=None,
           pad_left=False) -> dict:
    """Replace each IMAGE_TOKEN_INDEX position by its image's K rows, for the whole batch at once (no sample loop).

    input_ids [B, T]; text_embeds [B, T, H] (rows at placeholders unused); image_features [N, K, H] in placeholder
    order (row-major), a list of N [K_i, H] (AnyRes: each image its own K), or None. Rows grow by (K-1) per image;
    shorter rows are padded at the right, or at the left with pad_left. Returns inputs_embeds, attention_mask,
    labels (IGNORE_INDEX at image and pad positions), image_mask (True at image positions) and position_ids (from
    the mask, or restarted per packed sample when position_ids are given)."""
    b, dev = len(input_ids), input_ids.device
    is_img = input_ids == IMAGE_TOKEN_INDEX
    n_img = int(is_img.sum())
    feats = [] if image_features is None else image_features
    if n_img != len(feats):
        raise ValueError(f"{n_img} image placeholders but {len(feats)} images")
    fixed = torch.is_tensor(feats)      # [N, K, H]; else AnyRes' list of [K_i, H]
    k = torch.tensor([len(f) for f in feats] if not fixed else [feats.shape[1]] * n_img, dtype=torch.long,
                     device=dev)        # positions of each image
    width = torch.ones_like(input_ids).masked_scatter(is_img, k)   # positions each token occupies after the splice
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
    if fixed:        # [N, K] index grids: broadcasting, no per-position gather
        owner, offset, image_rows = None, torch.arange(feats.shape[1] if n_img else 0, device=dev), feats
    else:            # flat: each position knows its image
        owner = torch.repeat_interleave(torch.arange(n_img, device=dev), k)
        offset = torch.arange(len(owner), device=dev) - (k.cumsum(0) - k)[owner]
        image_rows = torch.cat(list(feats)) if n_img else None

    def spread(per_image):
        """A value per image -> one per image position."""
        return per_image[:, None] if owner is None else per_image[owner]

    img_rows, img_cols = spread(img_row), spread(start[img_row, img_col]) + offset

    def place(per_token, fill, rows=None):
        """[B, T, ...] -> [B, length, ...]; positions no token reaches (padding) hold `fill`."""
        out = torch.full((b, length, *per_token.shape[2:]), fill, dtype=per_token.dtype, device=dev)
        out[text_rows, text_cols] = per_token[is_text]
        if n_img:
            out[img_rows, img_cols] = spread(per_token[img_row, img_col]) if rows is None else rows.to(out.dtype)
        return out

    out = dict(inputs_embeds=place(text_embeds, 0, image_rows), attention_mask=place(attention_mask, 0),
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
# Small helpers
# =============================================================================================================
def trainable_table(model: MiniGemini) -> str:
    rows = [("component", "trainable", "total")]
    parts = [("llm", model.llm), ("vision_tower", model.vision_tower), ("vision_tower_aux", model.vision_tower_aux),
             ("mining", model.mining), ("projector", model.projector),
             ("image_newline", getattr(model, "image_newline", None))]     # AnyRes' row end: one vector
    total_train = total_all = 0
    for name, module in parts:
        if module is None:
            continue
        params = [module] if isinstance(module, nn.Parameter) else list(module.parameters())
        train = sum(_numel(p) for p in params if p.requires_grad)
        every = sum(_numel(p) for p in params)
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


def _peft(*names: str, bits: int) -> tuple:
    """Names from peft. peft imports bitsandbytes whenever it is installed, and bitsandbytes' import fetches its CPU
    4-bit kernel through the `kernels` package, both logging warnings when it fails (on a CPU with AVX512-BF16:
    "Failed to load CPU gemm_4bit_forward from kernels-community ..."); they concern 4/8-bit weights alone, so a
    16-bit LLM imports peft without them."""
    quiet = bits >= 16 and "bitsandbytes" not in sys.modules
    loggers = [logging.getLogger(name) for name in ("bitsandbytes", "kernels")] if quiet else []
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        import peft
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)
    return tuple(getattr(peft, name) for name in names)


def _contiguous(state: dict) -> dict:
    return {k: v.detach().contiguous() for k, v in state.items()}


def _jsonable(obj):
    if isinstance(obj, (set, tuple)):
        return list(obj)
    if isinstance(obj, torch.dtype):
        return str(obj).removeprefix("torch.")
    return str(obj)


def _main(argv: list[str] | None = None) -> None:
    parser = ArgumentParser(prog="model.py", description="Tools for exports. One command: merge.\n\nexample:\n"
                            "  python model.py merge runs/mgm-7b-yours-qlora/export runs/mgm-7b-yours-qlora/merged")
    commands = parser.add_subparsers(dest="command", required=True)
    merge = commands.add_parser(
        "merge", help="fold a LoRA export's adapters into its LLM: a plain full export",
        description="Fold a LoRA or QLoRA export's adapters into its base LLM, loaded unquantized (after QLoRA the\n"
                    "merged model is close to, not equal to, the 4-bit one the adapters trained on). The result is a\n"
                    "full export: eval.py, chat.py, web.py and train.py --init_from take it as it is.\n\n"
                    "example:\n  python model.py merge runs/mgm-7b-yours-qlora/export runs/mgm-7b-yours-qlora/merged")
    merge.add_argument("src", help="a LoRA export (train.py with tune: lora or qlora)")
    merge.add_argument("dst", help="a new (or empty) directory for the full export")
    a = parser.parse_args(argv)
    kind = check_export(a.src, "src")["export"]
    if kind != "lora":
        raise UserError(f"src: {a.src} is a {kind} export, not a LoRA one: it has no adapters to merge")
    check_new_dir(a.dst, "dst")
    print(merge_lora_export(a.src, a.dst))


if __name__ == "__main__":
    run(_main, "model.py")
