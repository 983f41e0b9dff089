"""Tiny random checkpoints, saved the way the real ones are, for tests and the demo (no pytest needed).

    from tests.tiny_models import save_tiny_checkpoints
    args = save_tiny_checkpoints("/tmp/ckpt", family="llama", tokenizer=tok)   # -> model.ModelArguments
    model = build_model(args, tok)

Sizes: CLIP 28px / patch 14 (2x2 grid, width 32), ConvNeXt at 32px (stage-0 map 8x8, so 4x4 mining windows),
LLM width 32 with 2 layers. HD (image_grid=2): LR 56 -> four 28 crops + global, HR 64.
"""
from __future__ import annotations

import json
import os

import torch

from data import CLIP_MEAN, CLIP_STD

FAMILIES = ("llama", "mistral", "mixtral", "gemma", "qwen2")
WORDS = ("what color is the shape ? this a it . , : user assistant system yes no red green blue yellow purple "
         "orange circle square triangle star image picture describe answer one word").split()


def save_tiny_tokenizer(path) -> str:
    """A word-level fast tokenizer (specials <unk> <s> </s> <pad> are ids 0-3)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    vocab = {w: i for i, w in enumerate(["<unk>", "<s>", "</s>", "<pad>", *WORDS])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>")
    fast.save_pretrained(path)
    return str(path)


def save_tiny_llm(path, family="llama", *, tokenizer=None, vocab_size=None, hidden=32, layers=2, seed=0) -> str:
    """A random causal LM of `family` (any transformers model_type with the usual config fields)."""
    from transformers import AutoConfig, AutoModelForCausalLM
    vocab_size = vocab_size or (len(tokenizer) if tokenizer is not None else 64)
    special = {}
    if tokenizer is not None:
        special = dict(pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                       eos_token_id=tokenizer.eos_token_id)
    extra = {"mixtral": dict(num_local_experts=2, num_experts_per_tok=1), "gemma": dict(head_dim=8)}.get(family, {})
    config = AutoConfig.for_model(family, vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden,
                                  num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                                  max_position_embeddings=512, tie_word_embeddings=False, **special, **extra)
    torch.manual_seed(seed)
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    if tokenizer is not None:
        tokenizer.save_pretrained(path)
    return str(path)


def save_tiny_clip(path, *, image_size=28, patch_size=14, hidden=32, layers=2, seed=0) -> str:
    """A random CLIPVisionModel plus the CLIP image processor config (mean/std/size are read from it)."""
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel
    config = CLIPVisionConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                              num_attention_heads=2, image_size=image_size, patch_size=patch_size, projection_dim=hidden)
    torch.manual_seed(seed)
    CLIPVisionModel(config).save_pretrained(path)
    CLIPImageProcessor(size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size},
                       image_mean=CLIP_MEAN, image_std=CLIP_STD).save_pretrained(path)
    return str(path)


def save_tiny_timm_convnext(path, *, dims=(8, 16, 32, 64), depths=(1, 1, 1, 1), seed=0) -> str:
    """A random timm ConvNeXt in timm's hub layout (config.json with model_args + model.safetensors),
    normalized with CLIP mean/std like OpenCLIP's ConvNeXt."""
    import timm
    from timm.models import save_for_hf
    torch.manual_seed(seed)
    args = dict(dims=list(dims), depths=list(depths))
    model = timm.create_model("convnext_atto", pretrained=False, **args)
    model.pretrained_cfg = dict(model.pretrained_cfg, mean=tuple(CLIP_MEAN), std=tuple(CLIP_STD))
    save_for_hf(model, path, model_args=args, safe_serialization=True)
    return str(path)


def save_tiny_timm_trunk(path, architecture, *, mean, std, seed=0, **model_args) -> str:
    """A random timm model of any architecture (narrow through model_args) in timm's hub layout, whose
    pretrained_cfg records this mean/std (ImageNet's, say: then it differs from the CLIP LR tower's)."""
    import timm
    from timm.models import save_for_hf
    torch.manual_seed(seed)
    model = timm.create_model(architecture, pretrained=False, **model_args)
    model.pretrained_cfg = dict(model.pretrained_cfg, mean=tuple(mean), std=tuple(std))
    save_for_hf(model, path, model_args=model_args, safe_serialization=True)
    return str(path)


def save_tiny_openclip_convnext(path, *, image_size=32, seed=0) -> str:
    """A random OpenCLIP model with a timm ConvNeXt image tower (convnext_atto, the smallest timm ConvNeXt) in
    OpenCLIP's hub layout: open_clip_config.json + open_clip_model.safetensors."""
    import open_clip
    from safetensors.torch import save_file
    os.makedirs(path, exist_ok=True)
    config = {"model_cfg": {"embed_dim": 32,
                            "vision_cfg": {"timm_model_name": "convnext_atto", "timm_model_pretrained": False,
                                           "timm_pool": "", "timm_proj": "mlp", "image_size": image_size},
                            "text_cfg": {"context_length": 16, "vocab_size": 64, "width": 32, "heads": 2,
                                         "layers": 1}},
              "preprocess_cfg": {"mean": CLIP_MEAN, "std": CLIP_STD}}
    with open(os.path.join(path, "open_clip_config.json"), "w") as f:
        json.dump(config, f)
    torch.manual_seed(seed)
    model = open_clip.create_model("local-dir:" + str(path))   # no weights yet: random init
    save_file({k: v.contiguous() for k, v in model.state_dict().items()},
              os.path.join(path, "open_clip_model.safetensors"))
    return str(path)


def save_tiny_checkpoints(root, *, family="llama", hr="timm", tokenizer=None, hd=False, **overrides):
    """Save a tiny LLM, CLIP tower and HR tower ("timm", "openclip" or None) under root (reused when present)
    and return model.ModelArguments pointing at them. hd=True: image_grid=2, image_global=True, LR 56, HR 64."""
    from model import ModelArguments
    root = str(root)
    llm = os.path.join(root, f"llm-{family}")
    clip = os.path.join(root, "clip")
    if not os.path.exists(llm):
        save_tiny_llm(llm, family, tokenizer=tokenizer)
    if not os.path.exists(clip):
        save_tiny_clip(clip)
    aux = None
    if hr == "timm":
        aux = os.path.join(root, "convnext-timm")
        if not os.path.exists(aux):
            save_tiny_timm_convnext(aux)
    elif hr == "openclip":
        aux = os.path.join(root, "convnext-openclip")
        if not os.path.exists(aux):
            save_tiny_openclip_convnext(aux)
    settings = dict(image_size_aux=64, image_grid=2, image_global=True) if hd else dict(image_size_aux=32)
    return ModelArguments(**{**dict(llm=llm, vision_tower=clip, vision_tower_aux=aux, dtype="float32",
                                    projector_heads=2, perceiver_queries=3), **settings, **overrides})


def build(root, tokenizer, **kw):
    """save_tiny_checkpoints + model.build_model, seeded: the same tiny model for the same arguments."""
    from model import build_model
    torch.manual_seed(0)
    return build_model(save_tiny_checkpoints(root, tokenizer=tokenizer, **kw), tokenizer)


def tiny_batch(model, tokenizer=None, *, seed=0):
    """A right-padded batch in data.collate's format: row 0 has two images, row 1 is text-only, row 2 one image."""
    from data import IGNORE_INDEX, IMAGE_TOKEN_INDEX
    g = torch.Generator().manual_seed(seed)
    vocab = model.llm.get_input_embeddings().weight.shape[0] - (2 if model.im_start_end_ids else 0)
    img = IMAGE_TOKEN_INDEX
    rows = [[1, img, 5, 6, img, 7, 8, 9], [1, 10, 11, 12], [1, 13, img, 14, 15]]
    t = max(map(len, rows))
    ids = torch.full((len(rows), t), 3)
    labels = torch.full((len(rows), t), IGNORE_INDEX)
    mask = torch.zeros(len(rows), t, dtype=torch.long)
    for i, r in enumerate(rows):
        r = torch.tensor([x if x == img else x % vocab for x in r])
        ids[i, :len(r)], mask[i, :len(r)] = r, 1
        labels[i, 2:len(r)] = r[2:].masked_fill(r[2:] == img, IGNORE_INDEX)
    s = model.image_settings()
    n, v = 3, model.num_views
    images = torch.randn(n, v, 3, s["image_size"], s["image_size"], generator=g)
    aux = torch.randn(n, 3, s["image_size_aux"], s["image_size_aux"], generator=g) if model.vision_tower_aux else None
    return dict(input_ids=ids, labels=labels, attention_mask=mask, images=images, images_aux=aux,
                image_counts=torch.tensor([2, 0, 1]), ids=["a", "b", "c"])
