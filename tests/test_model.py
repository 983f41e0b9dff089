"""model.py on CPU with tiny random checkpoints (tests/tiny_models.py), loaded through the real loading code."""
import dataclasses
import json
import math
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import REPO
from safetensors.torch import load_file

from cli import UserError
from data import CLIP_MEAN, CLIP_STD, IGNORE_INDEX, IMAGE_TOKEN_INDEX
from model import (
    CONFIG_NAME,
    MM_WEIGHTS,
    MiniGemini,
    PatchInfoMining,
    apply_lora,
    build_model,
    check_tokenizer_dir,
    hr_views,
    merge_lora,
    merge_lora_export,
    mmca_attention,
    portable_refs,
    set_stage,
    splice,
    stream_text,
    train_flops,
)
from tests.tiny_models import FAMILIES, build, save_tiny_checkpoints, tiny_batch

IMG = IMAGE_TOKEN_INDEX




# ---- references written as plain loops --------------------------------------------------------------------------
def mining_loop(mining, lr, hr):
    """Each LR token (i, j) against the HR positions of its own window, one at a time."""
    n, p, d = lr.shape
    g = math.isqrt(p)
    m = hr.shape[-1] // g
    out = lr.clone()
    for b in range(n):
        for i in range(g):
            for j in range(g):
                window = hr[b, :, i * m:(i + 1) * m, j * m:(j + 1) * m].flatten(1).T        # [M*M, C]
                q, k, v = mining.query(lr[b, i * g + j]), mining.key(window), mining.value(window)
                weights = torch.softmax(k @ q / math.sqrt(d), 0)
                out[b, i * g + j] = lr[b, i * g + j] + weights @ v
    return out


def splice_loop(ids, embeds, feats, mask, labels, pad_left):
    """Per-sample, per-token reference of the splice. Right padding: each row's real tokens, padded to the longest
    row (as LLaVA's loop does); left padding: every token kept."""
    rows, n = [], 0
    for b in range(len(ids)):
        e, am, lab, im = [], [], [], []
        for t in range(ids.shape[1]):
            if not pad_left and mask[b, t] == 0:
                continue
            if ids[b, t] == IMG:
                k = len(feats[n])
                e += list(feats[n]); am += [int(mask[b, t])] * k; lab += [IGNORE_INDEX] * k; im += [True] * k
                n += 1
            else:
                e.append(embeds[b, t]); am.append(int(mask[b, t])); lab.append(int(labels[b, t])); im.append(False)
        rows.append((e, am, lab, im))
    length = max(len(r[0]) for r in rows)
    out = {"inputs_embeds": [], "attention_mask": [], "labels": [], "image_mask": []}
    for e, am, lab, im in rows:
        pad = length - len(e)
        z = torch.zeros_like(e[0])

        def padded(x, fill):
            return [fill] * pad + x if pad_left else x + [fill] * pad
        out["inputs_embeds"].append(torch.stack(padded(e, z)))
        out["attention_mask"].append(torch.tensor(padded(am, 0)))
        out["labels"].append(torch.tensor(padded(lab, IGNORE_INDEX)))
        out["image_mask"].append(torch.tensor(padded(im, False)))
    out = {k: torch.stack(v) for k, v in out.items()}
    out["position_ids"] = (out["attention_mask"].cumsum(1) - 1).clamp(min=0)
    return out


def mmca_loop(q, k, v, image, pad):
    """DeepSpeed-VisualChat MMCA by hand, one head: per query, softmax over allowed image keys + softmax over
    allowed text keys. image/pad: per-position flags (pad = padding, never attended)."""
    t, d = q.shape
    out = torch.zeros(t, v.shape[1])
    for i in range(t):
        img_keys = [j for j in range(i + 1) if image[j] and not pad[j] and (not image[i] or j == i)]
        txt_keys = [j for j in range(i + 1) if not image[j] and not pad[j]]
        for keys in (img_keys, txt_keys):
            if keys:
                w = torch.softmax(torch.stack([q[i] @ k[j] / math.sqrt(d) for j in keys]), 0)
                out[i] += sum(wj * v[j] for wj, j in zip(w, keys))
    return out


# ---- mining, HD ordering, splice, MMCA ------------------------------------------------------------------------
def test_mining_equals_loop_over_windows():
    torch.manual_seed(0)
    mining = PatchInfoMining(16, 24)
    lr, hr = torch.randn(2, 9, 16), torch.randn(2, 24, 12, 12)       # 3x3 LR grid, 4x4 windows
    torch.testing.assert_close(mining(lr, hr), mining_loop(mining, lr, hr))


@pytest.mark.parametrize("grid,image_global", [(1, False), (2, True), (2, False), (3, True)])
@pytest.mark.parametrize("tile_elements", [1, 2 ** 25])           # one LR row per band / every row in one band
def test_memory_light_mining_equals_the_reference_on_the_full_map(grid, image_global, tile_elements):
    """forward builds the HR map band by band from the four stage maps; reference reads the concatenated,
    upsampled map cut into views by hr_views. Outputs and gradients (LR, every stage map, weights) agree."""
    torch.manual_seed(0)
    channels, side, n = (4, 6, 8, 10), 12 * grid, 2                # 3x3 LR grid, 4x4 windows per view
    views = grid * grid + int(image_global)
    mining = PatchInfoMining(16, sum(channels))
    mining.max_tile_elements = tile_elements
    lr = torch.randn(n * views, 9, 16, requires_grad=True)
    maps = [torch.randn(n, c, side >> s, side >> s, requires_grad=True) for s, c in enumerate(channels)]
    full = torch.cat([F.interpolate(x, size=(side, side), mode="bilinear") for x in maps], 1)
    want = mining.reference(lr, hr_views(full, grid, image_global, views).flatten(0, 1))
    got = mining(lr, maps, grid=grid, image_global=image_global)
    torch.testing.assert_close(got, want)
    weights = torch.randn_like(want)
    inputs = [lr, *maps, *mining.parameters()]
    want_grads = torch.autograd.grad((want * weights).sum(), inputs)
    got_grads = torch.autograd.grad((got * weights).sum(), inputs)
    for name, g, w in zip(["lr", *map(str, range(4)), *dict(mining.named_parameters())], got_grads, want_grads):
        scale = max(1.0, float(w.abs().max()))     # the same fp32 sums taken in another order
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5 * scale, msg=lambda m: f"{name}: {m}")


def test_hd_views_are_global_then_crops_each_mined_against_its_quadrant(root, tok):
    model = build(root, tok, hd=True).eval()
    batch = tiny_batch(model)
    images, aux = batch["images"][:2], batch["images_aux"][:2]
    with torch.no_grad():
        got = model.encode_images(images, aux)
        want = []
        for n in range(len(images)):
            hr = model.vision_tower_aux(aux[n:n + 1])
            h = hr.shape[-1] // 2
            maps = [F.interpolate(hr, size=(h, h), mode="bilinear")]                 # global first
            maps += [hr[..., i * h:(i + 1) * h, j * h:(j + 1) * h] for i in range(2) for j in range(2)]
            views = [model.projector(mining_loop(model.mining, model.vision_tower(images[n, v:v + 1]), m))
                     for v, m in enumerate(maps)]
            want.append(torch.cat(views, 1))
    assert got.shape == (2, model.tokens_per_image, 32) and model.tokens_per_image == 5 * 4
    torch.testing.assert_close(got, torch.cat(want))


@pytest.mark.parametrize("pad_left", [False, True])
def test_splice_equals_per_sample_loop(pad_left):
    torch.manual_seed(0)
    ids = torch.tensor([[1, IMG, 5, IMG, 7, 0], [1, 2, 3, 0, 0, 0], [IMG, 4, 5, 6, 0, 0], [1, 2, 3, 4, 5, 6]])
    mask = (torch.arange(6) < torch.tensor([[5], [3], [4], [6]])).long()
    if pad_left:   # same rows, padding moved to the left
        order = torch.sort(mask, dim=1, stable=True).indices
        ids, mask = ids.gather(1, order), mask.gather(1, order)
    labels = ids.masked_fill(mask == 0, IGNORE_INDEX)
    embeds, feats = torch.randn(4, 6, 8, requires_grad=True), torch.randn(3, 4, 8, requires_grad=True)
    got = splice(ids, embeds, feats, mask, labels, pad_left=pad_left)
    want = splice_loop(ids, embeds, feats, mask, labels, pad_left)
    for key, value in want.items():
        torch.testing.assert_close(got[key], value, msg=key)
    weights = torch.randn_like(want["inputs_embeds"])          # and the gradients reach the same rows
    got_grads = torch.autograd.grad((got["inputs_embeds"] * weights).sum(), (embeds, feats))
    want_grads = torch.autograd.grad((want["inputs_embeds"] * weights).sum(), (embeds, feats))
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g, w)


def test_splice_of_packed_rows_restarts_positions_per_sample():
    ids = torch.tensor([[1, IMG, 2, 1, 3, IMG, 4]])
    packed = torch.tensor([[0, 1, 2, 0, 1, 2, 3]])                     # two samples in one row
    out = splice(ids, torch.zeros(1, 7, 4), torch.zeros(2, 3, 4), torch.ones_like(ids), position_ids=packed)
    assert out["position_ids"].tolist() == [[0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 5]]


def test_mmca_equals_two_masked_softmaxes_by_hand():
    torch.manual_seed(0)
    image = [False, True, True, False, True, False]          # text, 2 image tokens, text, image, text
    pad = [True, False, False, False, False, False]         # left padding
    q, k, v = torch.randn(3, 6, 8).unbind(0)
    allowed = torch.ones(6, 6, dtype=torch.bool).tril() & ~torch.tensor(pad)
    module = torch.nn.Module().eval()
    out, _ = mmca_attention(module, q[None, None], k[None, None], v[None, None], allowed[None, None],
                            scaling=8 ** -0.5, mm_image_mask=torch.tensor([image]))
    want = mmca_loop(q, k, v, image, pad)
    torch.testing.assert_close(out[0, 1:, 0], want[1:])       # the padding query's output is unused


def test_mmca_without_images_is_ordinary_causal_attention(root, tok):
    batch = tiny_batch(build(root, tok))
    text = {k: batch[k][1:2, :4] for k in ("input_ids", "attention_mask", "labels")}
    logits = [build(root, tok, attention=a).eval()(**text).logits for a in ("eager", "mmca")]
    torch.testing.assert_close(logits[0], logits[1])


# ---- forward / backward / stages -------------------------------------------------------------------------------
def grads(model):
    parts = ("llm", "vision_tower", "vision_tower_aux", "mining", "projector")
    got = {p: False for p in parts}
    for name, param in model.named_parameters():
        if param.grad is not None and param.grad.abs().sum() > 0:
            got[name.split(".")[0]] = True
    return {p for p, v in got.items() if v}


@pytest.mark.parametrize("family", FAMILIES)
def test_forward_backward_each_family(root, tok, family):
    model = build(root, tok, family=family)
    set_stage(model, "finetune", print_fn=None)
    batch = tiny_batch(model)
    out = model(**batch)
    supervised = int((batch["labels"] != IGNORE_INDEX).sum())
    assert out.logits.shape[:2] == (3, 8 + 2 * (model.tokens_per_image - 1))
    summed = model(**batch, num_items_in_batch=torch.tensor(1)).loss
    torch.testing.assert_close(summed, out.loss * supervised)            # loss = sum / num_items_in_batch
    out.loss.backward()
    assert grads(model) == {"llm", "mining", "projector"}
    assert {"CLIPEncoderLayer", "ConvNeXtStage"} < set(model._no_split_modules)       # FSDP wrap units
    assert any(name.endswith("DecoderLayer") for name in model._no_split_modules)
    assert set(model._no_split_modules) <= {type(m).__name__ for m in model.modules()}  # accelerate stops on others
    with torch.no_grad():       # the image mask reaches this family's attention layers: MMCA changes the output
        mmca = build(root, tok, family=family, attention="mmca")(**batch).logits
    assert not torch.allclose(mmca, out.logits, atol=1e-4)


@pytest.mark.parametrize("attention", ["sdpa", "mmca"])
def test_left_and_right_padding_give_the_same_logits(root, tok, attention):
    model = build(root, tok, attention=attention).eval()
    batch = tiny_batch(model)
    order = torch.sort(batch["attention_mask"], dim=1, stable=True).indices
    left = dict(batch, input_ids=batch["input_ids"].gather(1, order),
                attention_mask=batch["attention_mask"].gather(1, order), labels=batch["labels"].gather(1, order))
    right_logits, left_logits = model(**batch).logits, model(**left).logits
    for row, n in enumerate((8 + 2 * 3, 4, 5 + 3)):                         # real positions after the splice
        torch.testing.assert_close(right_logits[row, :n], left_logits[row, -n:], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("attention", ["sdpa", "mmca"])
def test_packed_rows_attend_only_within_their_sample(root, tok, attention):
    model = build(root, tok, attention=attention).eval()
    batch = tiny_batch(model)
    first, second = batch["input_ids"][2, :5], batch["input_ids"][1, :4]        # one image + text-only
    packed = torch.cat([first, second])[None]
    position_ids = torch.cat([torch.arange(5), torch.arange(4)])[None]
    images, aux = batch["images"][2:3], batch["images_aux"][2:3]
    with torch.no_grad():
        got = model(packed, images=images, images_aux=aux, position_ids=position_ids).logits[0]
        alone = [model(first[None], images=images, images_aux=aux).logits[0], model(second[None]).logits[0]]
    torch.testing.assert_close(got, torch.cat(alone), atol=1e-5, rtol=1e-4)


def test_text_only_batch_and_pretrain_stage_gradients(root, tok):
    model = build(root, tok)
    table = set_stage(model, "pretrain", print_fn=None)
    assert "projector" in table and "mining" in table
    batch = tiny_batch(model)
    model(**batch).loss.backward()
    assert grads(model) == {"mining", "projector"}
    text = {k: batch[k][1:2] for k in ("input_ids", "attention_mask", "labels")}
    assert torch.isfinite(model(**text, images=None).loss)


def test_tuned_tower_gets_gradients_with_checkpointing(root, tok):
    model = build(root, tok, gradient_checkpointing=True)
    set_stage(model, "finetune", tune_vision_tower=True, print_fn=None)
    model.train()
    model(**tiny_batch(model)).loss.backward()
    assert grads(model) == {"llm", "vision_tower", "mining", "projector"}
    assert not model.vision_tower_aux.training                            # frozen towers stay in eval mode


def test_gradient_checkpointing_gives_the_same_gradients(root, tok):
    results = []
    for gc in (False, True):
        model = build(root, tok, gradient_checkpointing=gc)
        set_stage(model, "finetune", print_fn=None)
        model(**tiny_batch(model)).loss.backward()
        results.append(model.projector[0].weight.grad)
    torch.testing.assert_close(results[0], results[1])


# The tiny model (tests/tiny_models.py) counted by hand, in multiply-accumulates (MACs); FLOPs = 2 x MACs.
# LLM: width 32, 2 layers, 4 heads of 8 (q, o: 32x32), 2 key/value heads (k, v: 32x16), MLP 64 (gate, up, down),
# vocabulary len(tok) = 37 (output head 32x37; the input embedding is a lookup).
LLM_MACS = 2 * (32 * 32 + 32 * 16 + 32 * 16 + 32 * 32 + 3 * 32 * 64) + 32 * 37      # 19,616 per position
PAIR_MACS = 2 * (4 * 8 + 4 * 8)                              # QK^T and AV, 2 layers: 128 per pair of positions
# CLIP 28px, patch 14: 4 patches + CLS = 5 tokens, width 32, MLP 64; layer -2 of 2 = 1 layer runs for the model.
LR_MACS = 4 * (3 * 14 * 14) * 32 + 5 * (4 * 32 * 32 + 2 * 32 * 64) + 5 * 5 * 32 * 2         # 117,824
# ConvNeXt at 32px, dims 8/16/32/64, one block per stage (7x7 depthwise conv, MLP x4), 2x2 stride-2 downsampling.
STEM = 8 * 8 * 8 * (3 * 4 * 4)                                                       # 4x4 stride 4: 8x8 map
def BLOCK(side, c): return side * side * (c * 49 + 2 * c * 4 * c)                   # noqa: E704
HR_STAGE_MACS = [STEM + BLOCK(8, 8), 4 * 4 * 16 * (8 * 4) + BLOCK(4, 16), 2 * 2 * 32 * (16 * 4) + BLOCK(2, 32),
                 1 * 1 * 64 * (32 * 4) + BLOCK(1, 64)]
# Mining: 4 LR queries of width 32, HR channels 8+16+32+64 = 120, window 4x4 (8x8 stage-0 map / 2x2 LR grid):
# query projection, W_k^T q, scores and weighted sum over 16 positions x 120 channels, value projection.
MINING_MACS = 4 * (32 * 32 + 32 * 120 + 2 * 16 * 120 + 120 * 32)                    # 50,176
PROJECTOR_MACS = 4 * (32 * 32 + 32 * 32)                                             # mlp2x_gelu on 4 tokens


def test_train_flops_equal_a_hand_count(root, tok):
    """Trained parts count 6 FLOPs per MAC (3x the forward), frozen parts the gradient passes through 4, frozen
    parts before every trained part 2 (forward only)."""
    model = build(root, tok)
    image = 2 * LR_MACS + 2 * sum(HR_STAGE_MACS) + 6 * MINING_MACS + 6 * PROJECTOR_MACS     # towers frozen
    set_stage(model, "finetune", print_fn=None)
    assert train_flops(model)[:3] == (6 * LLM_MACS, 6 * PAIR_MACS, image) == (117_696, 768, 1_040_384)
    assert train_flops(model)[3:] == (2 * LLM_MACS, 2 * PAIR_MACS)     # a forward alone (a DPO reference)
    set_stage(model, "pretrain", print_fn=None)                      # frozen LLM: the gradient passes through
    assert train_flops(model)[:3] == (4 * LLM_MACS, 6 * PAIR_MACS, image)
    model.vision_tower_aux.stages[-1].requires_grad_(True)          # train.py's tune_vision_tower_aux
    assert train_flops(model).per_image == (2 * LR_MACS + 2 * sum(HR_STAGE_MACS[:3]) + 6 * HR_STAGE_MACS[3]
                                            + 6 * MINING_MACS + 6 * PROJECTOR_MACS)
    # LoRA r=4 on q, k, v, o, gate, up, down: r x (in + out) MACs each; the frozen base (and head) pass gradients.
    lora = apply_lora(model, r=4, alpha=8)
    set_stage(lora, "finetune", print_fn=None)                       # towers frozen again
    adapters = 2 * 4 * ((32 + 32) + (32 + 16) + (32 + 16) + (32 + 32) + 3 * (32 + 64))
    assert train_flops(lora).llm_per_token == 4 * LLM_MACS + 6 * adapters
    # HD: 5 LR views (global + 4 crops) each mined (window 16/2/2 = 4) and projected; the HR tower runs once at
    # 64px, where every feature map has 4x the positions.
    hd = build(root, tok, hd=True)
    set_stage(hd, "finetune", print_fn=None)
    assert train_flops(hd).per_image == 5 * (2 * LR_MACS + 6 * MINING_MACS + 6 * PROJECTOR_MACS) \
        + 4 * 2 * sum(HR_STAGE_MACS)


def test_mixture_of_experts_counts_the_routed_experts():
    from transformers import MixtralConfig

    from model import llm_forward_flops
    config = MixtralConfig(vocab_size=37, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2)
    attention, two_experts, router = 32 * 32 + 2 * 32 * 16 + 32 * 32, 2 * 3 * 32 * 64, 32 * 4
    assert llm_forward_flops(config) == (2 * (2 * (attention + two_experts + router) + 32 * 37), 2 * PAIR_MACS)


@pytest.mark.parametrize("kind,macs", [
    ("linear", 4 * 32 * 32),
    ("mlp2x_gelu", PROJECTOR_MACS),
    # 3 queries: q and out-projections, and the output Linear, on 3 rows; k, v on the 4 tokens; QK^T and AV
    ("perceiver", 3 * 32 * 32 + 2 * 4 * 32 * 32 + 2 * 3 * 4 * 32 + 3 * 32 * 32 + 3 * 32 * 32),
    # one pre-norm layer on 4 tokens (q, k, v, o; MLP 32 -> 128 -> 32; QK^T and AV), then the output Linear
    ("vit", 4 * (4 * 32 * 32 + 2 * 32 * 128) + 2 * 4 * 4 * 32 + 4 * 32 * 32)])
def test_projector_flops_equal_a_hand_count(kind, macs):
    from model import build_projector, projector_forward_flops
    assert projector_forward_flops(build_projector(kind, 32, 32, heads=2, queries=3), tokens=4) == 2 * macs


def test_train_flops_of_samples_count_attention_per_sample():
    """A sample of n positions: n x per-token + n^2 x per-pair, so packed samples are counted apart."""
    from model import TrainFlops
    flops = TrainFlops(llm_per_token=10.0, llm_per_pair=1.0, per_image=100.0)
    assert flops.of(torch.tensor([3, 4]), images=2) == (10 * 7 + 9 + 16, 10 * 7 + 9 + 16 + 200)


def test_train_flops_of_preference_pairs_count_the_prompt_once():
    """A pair of prompt p and replies c, r (stage dpo): p + c + r positions; the prompt attends to itself, each reply
    to the prompt and itself (counted as `of` counts a row: p^2 + c^2 + r^2 + 2p(c + r), a row of p + c being
    (p + c)^2); the images once; a reference forward over the same positions unless precomputed."""
    from model import TrainFlops
    flops = TrainFlops(llm_per_token=10.0, llm_per_pair=1.0, per_image=100.0, llm_forward_per_token=3.0,
                       llm_forward_per_pair=0.5)
    p, c, r = torch.tensor([5, 2]), torch.tensor([2, 1]), torch.tensor([3, 1])
    positions, attended = 7 + 3 + 4, (25 + 4 + 9 + 2 * 5 * 5) + (4 + 1 + 1 + 2 * 2 * 2)
    llm = 10 * positions + attended
    assert flops.of_pairs(p, c, r, images=1, reference=False) == (llm, llm + 100)
    with_reference = llm + 3 * positions + 0.5 * attended
    assert flops.of_pairs(p, c, r, images=1, reference=True) == (with_reference, with_reference + 100)
    whole_rows = flops.of(torch.tensor([7, 8, 3, 3]), images=1)      # no prompt shared: the rows as samples
    assert flops.of_pairs(torch.zeros(2), p + c, p + r, images=1, reference=False) == whole_rows


@pytest.mark.parametrize("projector,per_view", [("linear", 4), ("mlp3x_gelu", 4), ("perceiver", 3), ("vit", 4)])
def test_projectors(root, tok, projector, per_view):
    model = build(root, tok, projector=projector)
    batch = tiny_batch(model)
    assert model.tokens_per_image == per_view
    assert model.encode_images(batch["images"], batch["images_aux"]).shape == (3, per_view, 32)
    assert torch.isfinite(model(**batch).loss)


def test_plain_llava_cls_patch_and_image_start_end_tokens(root, tok):
    model = build(root, tok, hr=None, mm_vision_select_feature="cls_patch", mm_use_im_start_end=True)
    assert model.mining is None and model.tokens_per_image == 4 + 1 + 2
    assert tok.convert_tokens_to_ids(["<im_start>", "<im_end>"]) == model.im_start_end_ids
    set_stage(model, "pretrain", print_fn=None)
    model(**tiny_batch(model)).loss.backward()
    grad = model.llm.get_input_embeddings().weight.grad
    changed = grad.abs().sum(1).nonzero().flatten().tolist()
    assert changed == model.im_start_end_ids                              # only the new rows train


def test_new_modules_start_the_same_however_the_llm_loads(root, tok, monkeypatch):
    """A load that draws random numbers (inside DeepSpeed's zero.Init, or for weights a checkpoint lacks) leaves the
    projector and mining as the seed makes them: the same recipe and seed start the same on every engine."""
    import model as mgm
    first = build(root, tok)
    load_llm = mgm.load_llm
    monkeypatch.setattr(mgm, "load_llm", lambda *args, **kw: (torch.rand(100), load_llm(*args, **kw))[1])
    second = build(root, tok)
    a, b = ({k: v for k, v in m.state_dict().items() if k.startswith(("projector.", "mining."))}
            for m in (first, second))
    assert a and a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_random_init_from_configs_alone_and_bf16(root, tok):
    args = save_tiny_checkpoints(root, tokenizer=tok, random_init=True, dtype="bfloat16")
    model = build_model(args, tok)
    assert model.projector[0].weight.dtype == model.vision_tower_aux.stem[0].weight.dtype == torch.bfloat16
    loaded = build(root, tok)
    assert [p.shape for p in model.parameters()] == [p.shape for p in loaded.parameters()]
    assert torch.isfinite(model(**tiny_batch(model)).loss)


def test_image_settings_come_from_the_checkpoints(root, tok):
    settings = build(root, tok, hd=True).image_settings()
    assert settings == dict(image_size=28, image_size_aux=64, image_mean=CLIP_MEAN, image_std=CLIP_STD,
                            image_grid=2, image_global=True)


def test_openclip_convnext_tower_loads_its_trunk(root, tok):
    model = build(root, tok, hr="openclip")
    saved = load_file(root / "convnext-openclip" / "open_clip_model.safetensors")
    torch.testing.assert_close(model.vision_tower_aux.stem[0].weight, saved["visual.trunk.stem.0.weight"])
    assert model.vision_tower_aux.channels == 40 + 80 + 160 + 320
    assert torch.isfinite(model(**tiny_batch(model)).loss)


HUB_LOAD = """
import sys, torch
from model import ModelArguments, build_model
hub, local = ModelArguments(**eval(sys.argv[1])), ModelArguments(**eval(sys.argv[2]))
torch.manual_seed(0); from_hub = build_model(hub)
torch.manual_seed(0); from_dirs = build_model(local)
a, b = from_hub.state_dict(), from_dirs.state_dict()
assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), "hub and local weights differ"
assert from_hub.image_settings() == from_dirs.image_settings()
print("loaded", type(from_hub.vision_tower_aux.stages[0]).__name__)
"""


@pytest.mark.parametrize("hr", ["timm", "openclip"])
def test_hub_names_load_from_the_cache_offline(tmp_path, root, hr):
    """Real runs name checkpoints by hub id ("openai/clip-vit-large-patch14-336", "hf-hub:laion/CLIP-convnext...")
    and clusters often run with HF_HUB_OFFLINE=1 on a filled cache: the same tiny checkpoints are put in a cache in
    the hub's layout and must load by name, offline, to the same weights as from their directories."""
    local = save_tiny_checkpoints(root, hr=hr)
    cache = tmp_path / "hub"
    names = {"llm": "test-org/llm", "vision_tower": "test-org/clip", "vision_tower_aux": f"test-org/convnext-{hr}"}
    for field, repo in names.items():
        repo_dir = cache / ("models--" + repo.replace("/", "--"))
        shutil.copytree(getattr(local, field), repo_dir / "snapshots" / ("0" * 40))
        (repo_dir / "refs").mkdir()
        (repo_dir / "refs" / "main").write_text("0" * 40)
    names["vision_tower_aux"] = "hf-hub:" + names["vision_tower_aux"]     # OpenCLIP's and timm's hub prefix
    fields = dict(dtype="float32", image_size_aux=local.image_size_aux)
    env = dict(os.environ, HF_HUB_CACHE=str(cache), HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO))
    result = subprocess.run([sys.executable, "-c", HUB_LOAD, repr({**names, **fields}),
                             repr({field: getattr(local, field) for field in names} | fields)],
                            capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "loaded" in result.stdout


def test_an_uncached_hub_name_is_asked_of_the_hub_once_before_loading(monkeypatch):
    """Online, a name that is not in the cache is asked of the hub before anything loads: an unknown name or a
    machine that cannot reach the hub is one line naming the setting, not a loader's traceback; a known name passes.
    A local stand-in answers as the hub's API does (404 with X-Error-Code: RepoNotFound for an unknown repo)."""
    import http.server
    import threading

    import huggingface_hub.constants

    import refs

    class Hub(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            known = self.path.startswith("/api/models/test-org/known")
            body = json.dumps({"id": "test-org/known"} if known else {"error": "Repository not found"}).encode()
            self.send_response(200 if known else 404)
            self.send_header("Content-Type", "application/json")
            if not known:
                self.send_header("X-Error-Code", "RepoNotFound")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Hub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setattr(refs, "is_offline_mode", lambda: False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    try:
        monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", f"http://127.0.0.1:{server.server_port}")
        refs.hub_problem.cache_clear()
        refs.check_model_ref("test-org/known", "llm")
        with pytest.raises(refs.UserError, match=r"^llm: runs/nope: no such directory \(relative to .*\), and no "
                                                r"model of that name on the Hugging Face hub"):
            refs.check_model_ref("runs/nope", "llm")
    finally:
        server.shutdown()
        server.server_close()
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", f"http://127.0.0.1:{server.server_port}")   # closed
    refs.hub_problem.cache_clear()
    with pytest.raises(refs.UserError, match=r"^vision_tower_aux: hf-hub:test-org/known: no such directory .*, and "
                                            r"the Hugging Face hub cannot be reached to download it"):
        refs.check_model_ref("hf-hub:test-org/known", "vision_tower_aux")
    refs.hub_problem.cache_clear()


# ---- export / load / merge -------------------------------------------------------------------------------------
def logits(model, batch):
    with torch.no_grad():
        return model.eval()(**batch).logits


def test_full_export_loads_without_the_source_checkpoints(tmp_path, tok):
    model = build(tmp_path / "src", tok, hd=True, mm_use_im_start_end=True)
    batch = tiny_batch(model)
    model.save_pretrained(tmp_path / "export", tok)
    shutil.rmtree(tmp_path / "src")
    loaded = MiniGemini.from_pretrained(tmp_path / "export")
    torch.testing.assert_close(logits(loaded, batch), logits(model, batch), rtol=0, atol=0)
    assert loaded.image_settings() == model.image_settings()


def test_pretrain_export_holds_only_projector_and_mining(tmp_path, root, tok):
    model = build(root, tok)
    set_stage(model, "pretrain", print_fn=None)
    batch = tiny_batch(model)
    model.save_pretrained(tmp_path / "pretrain", tok)
    keys = load_file(tmp_path / "pretrain" / MM_WEIGHTS).keys()
    assert keys and all(k.startswith(("projector.", "mining.")) for k in keys)
    torch.testing.assert_close(logits(MiniGemini.from_pretrained(tmp_path / "pretrain"), batch), logits(model, batch))
    args = save_tiny_checkpoints(root, tokenizer=tok, pretrained_mm_path=str(tmp_path / "pretrain"))
    torch.testing.assert_close(logits(build_model(args, tok), batch), logits(model, batch))


def test_exports_refer_to_local_bases_by_absolute_path_and_load_from_any_directory(tmp_path, root, tok,
                                                                                   monkeypatch):
    """A pretrain export made from relative base paths records them absolute (hub names unchanged), so chat.py /
    eval.py load it from another working directory; a base that is gone is named as a missing path."""
    args = save_tiny_checkpoints(root, tokenizer=tok)
    monkeypatch.chdir(root)
    relative = dataclasses.replace(args, llm=os.path.relpath(args.llm), vision_tower=os.path.relpath(args.vision_tower),
                                   vision_tower_aux=os.path.relpath(args.vision_tower_aux))
    assert not os.path.isabs(relative.llm)
    model = build_model(relative, tok)
    set_stage(model, "pretrain", print_fn=None)
    model.save_pretrained(tmp_path / "pretrain", tok)
    recorded = json.loads((tmp_path / "pretrain" / CONFIG_NAME).read_text())["args"]
    assert recorded["llm"] == str(Path(args.llm).resolve())
    assert portable_refs({"llm": "org/name", "vision_tower_aux": "hf-hub:timm/x"}) == \
        {"llm": "org/name", "vision_tower_aux": "hf-hub:timm/x"}
    monkeypatch.chdir(tmp_path)
    batch = tiny_batch(model)
    torch.testing.assert_close(logits(MiniGemini.from_pretrained("pretrain"), batch), logits(model, batch))

    recorded["llm"] = str(tmp_path / "gone" / "llm")
    (tmp_path / "pretrain" / CONFIG_NAME).write_text(json.dumps({**json.loads(
        (tmp_path / "pretrain" / CONFIG_NAME).read_text()), "args": recorded}))
    with pytest.raises(UserError, match=r"mgm_config.json refers to it: llm: .*gone/llm: no such directory$"):
        MiniGemini.from_pretrained("pretrain")
    with pytest.raises(UserError, match=r"llm: demo_data/base/llm: no such directory \(relative to "):
        build_model(dataclasses.replace(args, llm="demo_data/base/llm"), tok)
    (tmp_path / "no_tokenizer").mkdir()
    (tmp_path / "no_tokenizer" / "tokenizer_config.json").write_text("{}")
    with pytest.raises(UserError, match=r"no_tokenizer holds no tokenizer.json / tokenizer.model / vocab.json, so "
                                        r"it is not a tokenizer"):
        check_tokenizer_dir(tmp_path / "no_tokenizer")


def test_lora_export_load_and_merge(tmp_path, root, tok):
    model = apply_lora(build(root, tok), r=4, alpha=8, dropout=0.0)
    set_stage(model, "finetune", print_fn=None)
    with torch.no_grad():                                  # LoRA B starts at zero: make the adapters matter
        for name, p in model.llm.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    batch = tiny_batch(model)
    model(**batch).loss.backward()
    assert grads(model) == {"llm", "mining", "projector"}
    assert all("lora_" in n for n, p in model.llm.named_parameters() if p.requires_grad)
    want = logits(model, batch)
    model.save_pretrained(tmp_path / "lora", tok, state_dict=model.state_dict())   # as train.py does under FSDP
    assert (tmp_path / "lora" / "adapter" / "adapter_model.safetensors").exists()
    torch.testing.assert_close(logits(MiniGemini.from_pretrained(tmp_path / "lora"), batch), want)
    merge_lora_export(tmp_path / "lora", tmp_path / "merged")
    torch.testing.assert_close(logits(MiniGemini.from_pretrained(tmp_path / "merged"), batch), want,
                               atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(logits(merge_lora(model), batch), want, atol=1e-5, rtol=1e-4)


# ---- generation ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("attention", ["sdpa", "mmca"])
def test_greedy_generate_equals_argmax_of_full_forwards(root, tok, attention):
    model = build(root, tok, attention=attention).eval()
    batch = tiny_batch(model)
    got = model.generate(batch["input_ids"], batch["attention_mask"], batch["images"], batch["images_aux"],
                         max_new_tokens=5, eos_token_id=-1)
    for row, image_slice in enumerate([slice(0, 2), slice(0, 0), slice(2, 3)]):
        ids = batch["input_ids"][row, batch["attention_mask"][row] == 1][None]
        images = batch["images"][image_slice] if image_slice.stop > image_slice.start else None
        aux = batch["images_aux"][image_slice] if images is not None else None
        for _ in range(5):
            with torch.no_grad():
                step = model(ids, images=images, images_aux=aux).logits[0, -1].argmax()
            ids = torch.cat([ids, step.view(1, 1)], 1)
        assert got[row].tolist() == ids[0, -5:].tolist(), row


@pytest.mark.parametrize("family", FAMILIES)
def test_generate_passes_the_cache_under_the_name_the_llm_takes(root, tok, family):
    """No deprecation warning from any family's forward (transformers 5.24 renamed `past_key_values` to `cache`,
    and 5.40 drops the old name), bare or wrapped by PEFT."""
    bare = build(root, tok, family=family).eval()
    for model in (bare, apply_lora(build(root, tok, family=family), r=4, dropout=0.0).eval()):
        batch = tiny_batch(model)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            out = model.generate(batch["input_ids"], batch["attention_mask"], batch["images"], batch["images_aux"],
                                 max_new_tokens=3, eos_token_id=-1)
        assert out.shape == (3, 3)
        assert [str(w.message) for w in caught if issubclass(w.category, (FutureWarning, DeprecationWarning))] == []


def test_sampling_is_reproducible_with_a_generator(root, tok):
    model = build(root, tok).eval()
    batch = tiny_batch(model)
    runs = [model.generate(batch["input_ids"], batch["attention_mask"], batch["images"], batch["images_aux"],
                           max_new_tokens=4, do_sample=True, top_k=5, top_p=0.9, temperature=0.8, eos_token_id=-1,
                           generator=torch.Generator().manual_seed(1)) for _ in range(2)]
    assert runs[0].shape == (3, 4) and torch.equal(runs[0], runs[1])


def test_stream_hands_out_the_tokens_of_batched_greedy_generation(root, tok):
    model = build(root, tok).eval()
    batch = tiny_batch(model)
    args = (batch["input_ids"], batch["attention_mask"], batch["images"], batch["images_aux"], batch["image_counts"])
    stop = int(model.generate(*args, max_new_tokens=6, eos_token_id=-1)[0, 2])   # row 0 stops at its third token
    batched = model.generate(*args, max_new_tokens=6, eos_token_id=stop, pad_token_id=3).tolist()
    for row, images in enumerate([slice(0, 2), None, slice(2, 3)]):
        ids = batch["input_ids"][row, batch["attention_mask"][row] == 1]
        pixels = (batch["images"][images], batch["images_aux"][images]) if images else (None, None)
        streamed = list(model.stream(ids, *pixels, max_new_tokens=6, eos_token_id=stop, pad_token_id=3))
        n = len(streamed)
        assert streamed == batched[row][:n] and batched[row][n:] == [3] * (len(batched[row]) - n), row
        assert streamed[-1] == stop or n == 6
        assert n <= 3 or row > 0                    # the stream ends with the stop token


def test_sampled_stream_repeats_with_a_seed_and_stopping_early_leaves_the_model_usable(root, tok):
    model = build(root, tok).eval()
    batch = tiny_batch(model)
    ids, images, aux = batch["input_ids"][2, :5], batch["images"][2:], batch["images_aux"][2:]
    sampling = dict(max_new_tokens=8, do_sample=True, temperature=1.5, top_p=0.95, top_k=40, eos_token_id=-1)

    def sampled(seed):
        return list(model.stream(ids, images, aux, generator=torch.Generator().manual_seed(seed), **sampling))
    assert sampled(1) == sampled(1) != sampled(2)
    assert sampled(1) == model.generate(ids[None], None, images, aux, generator=torch.Generator().manual_seed(1),
                                        **sampling)[0].tolist()
    greedy = list(model.stream(ids, images, aux, max_new_tokens=8, eos_token_id=-1))
    for _ in zip(range(2), model.stream(ids, images, aux, max_new_tokens=8, eos_token_id=-1)):
        pass                                              # a caller that stops after two tokens
    assert torch.is_grad_enabled()
    assert list(model.stream(ids, images, aux, max_new_tokens=8, eos_token_id=-1)) == greedy


def test_streamed_text_never_shows_half_a_character(llama_tokenizer):
    text = "Über 日本語 ж€ 🙂 red"                  # ж € are not in the vocabulary: byte-fallback tokens
    ids = llama_tokenizer.encode(text, add_special_tokens=False)
    assert any(llama_tokenizer.decode(ids[:k]).endswith("\ufffd") for k in range(1, len(ids)))
    pieces = list(stream_text(llama_tokenizer, iter(ids)))
    assert "".join(pieces) == llama_tokenizer.decode(ids) == text
    assert all(piece and "\ufffd" not in piece for piece in pieces) and len(pieces) > 3


# ---- QLoRA ----------------------------------------------------------------------------------------------------
def test_4bit_llm_with_lora_trains_on_cpu(root, tok):
    pytest.importorskip("bitsandbytes")
    model = apply_lora(build(root, tok, bits=4, gradient_checkpointing=True), r=4, alpha=8)
    set_stage(model, "finetune", print_fn=None)
    assert type(model.llm.base_model.model.model.layers[0].self_attn.q_proj.base_layer).__name__ == "Linear4bit"
    model.train()
    model(**tiny_batch(model)).loss.backward()
    assert grads(model) == {"llm", "mining", "projector"}
    assert all("lora_" in n for n, p in model.llm.named_parameters() if p.requires_grad)
    assert {p.dtype for m in (model.vision_tower, model.vision_tower_aux) for p in m.parameters()} == {torch.float32}
