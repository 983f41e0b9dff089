"""Model FLOPs of a training step, for the MFU on train.py's log line and bench.py train: counted from the
configs and layer shapes of a model.MiniGemini's parts, never from parameter tensors (ZeRO-3 may have partitioned
them). model.py re-exports these names. Below them, what train.py measures with them: Throughput (tokens, samples
and MFU per second) and each GPU's peak FLOP/s."""
from __future__ import annotations

import math
import re
import time
from typing import NamedTuple

import torch
import torch.nn as nn

from vision import GridPool2x, PerceiverProjector


class TrainFlops(NamedTuple):
    """Model FLOPs of training, by unit of work. A sample of n LLM positions (after the splice) costs
    n * llm_per_token + n^2 * llm_per_pair; every image costs per_image (towers, mining, projector, all views)."""
    llm_per_token: float     # the LLM's weight matmuls: 6N for a trained LLM, 4N for a frozen one, + LoRA
    llm_per_pair: float      # its attention scores (QK^T, AV): 12 * layers * heads * head_dim when backpropagated
    per_image: float
    llm_forward_per_token: float = 0.0   # a forward alone of the LLM's base (2N): a DPO reference
    llm_forward_per_pair: float = 0.0

    def of(self, lengths: torch.Tensor, images: int) -> tuple[float, float]:
        """(LLM FLOPs, all FLOPs) of samples with these LLM lengths, holding `images` images."""
        n = lengths.double()
        llm = self.llm_per_token * float(n.sum()) + self.llm_per_pair * float((n * n).sum())
        return llm, llm + self.per_image * images

    def of_pairs(self, prompt: torch.Tensor, chosen: torch.Tensor, rejected: torch.Tensor, images: float,
                 reference: bool) -> tuple[float, float]:
        """(LLM FLOPs, all FLOPs) of preference pairs as stage dpo computes them: each pair's prompt once with both
        replies after it (a reply attends to the prompt and itself), its images once (the frozen vision side), and
        with `reference` the same positions again through a forward of the LLM's base (not precomputed). Attention
        pairs as `of` counts them for a row of n (n^2: twice the causal pairs, less the diagonal): twice the
        (query, key) pairs the pair's mask allows, less its positions, so p^2 + c^2 + r^2 + 2p(c + r)."""
        p, c, r = (t.double() for t in (prompt, chosen, rejected))
        positions, attended = float((p + c + r).sum()), float((p * p + c * c + r * r + 2 * p * (c + r)).sum())
        llm = self.llm_per_token * positions + self.llm_per_pair * attended
        if reference:
            llm += self.llm_forward_per_token * positions + self.llm_forward_per_pair * attended
        return llm, llm + self.per_image * images


def train_flops(model) -> TrainFlops:
    """Model FLOPs of one training step's work of a model.MiniGemini, from the configs and layer shapes (never from
    parameter tensors, which ZeRO-3 may have partitioned), and from which parameters train (call after set_stage).

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
    return TrainFlops(llm_per_token, per_pair * (3 if backpropagated else 1), image, per_token, per_pair)


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
    """Forward FLOPs of each block of a convolutional trunk (the HR tower's stem and stages) on one square image of
    side `side`, and the feature-map side after each: every Conv2d and Linear (applied per position). Modules run in
    the order they are registered (a strided convolution or a pooling shrinks the map), except a residual shortcut:
    a `downsample` registered after its block's main path (ResNet's) reads the block's input."""
    flops, sides = [], []
    for block in blocks:
        total, side = _conv_flops(block, side)
        flops.append(total)
        sides.append(side)
    return flops, sides


def _conv_flops(module: nn.Module, side: int) -> tuple[int, int]:
    """(forward FLOPs, output side) of one module on a square map of side `side`."""
    if isinstance(module, nn.Conv2d):
        k, stride = module.kernel_size[0], module.stride[0]
        pad = module.padding[0] if not isinstance(module.padding, str) else (k - 1) // 2 if module.padding == "same" \
            else 0
        side = (side + 2 * pad - module.dilation[0] * (k - 1) - 1) // stride + 1
        return 2 * side * side * module.out_channels * (module.in_channels // module.groups) * k * \
            module.kernel_size[1], side
    if isinstance(module, (nn.MaxPool2d, nn.AvgPool2d)):
        k, stride, pad = (v if isinstance(v, int) else v[0]
                          for v in (module.kernel_size, module.stride, module.padding))
        return 0, (side + 2 * pad - k) // stride + 1
    if isinstance(module, nn.Linear):
        return 2 * side * side * module.in_features * module.out_features, side
    total, entry, seen_main_path = 0, side, False
    for name, child in module.named_children():
        if name == "downsample" and seen_main_path:          # a shortcut beside the main path
            total += _conv_flops(child, entry)[0]
            continue
        flops, side = _conv_flops(child, side)
        total += flops
        seen_main_path = seen_main_path or flops > 0
    return total, side


def mining_forward_flops(queries: int, dim: int, channels: int, window: int) -> int:
    """Forward FLOPs of patch info mining on one view, in the form PatchInfoMining.forward computes: the query
    projection, the key weight folded into the query (W_k^T q), scores and weighted sum over the window's HR
    channels, the value projection of the sum. (`reference` projects every HR position to keys and values: the
    same function with M*M times the projection work, which is not counted as model work.)"""
    positions = window * window
    return 2 * queries * (dim * dim + dim * channels + 2 * positions * channels + channels * dim)


def projector_forward_flops(projector: nn.Module, tokens: int) -> int:
    """Forward FLOPs of the projector on one view of `tokens` image tokens."""
    if isinstance(projector, nn.Sequential) and isinstance(projector[0], GridPool2x):   # pool2x_: pooling is free
        return projector_forward_flops(projector[1], GridPool2x.tokens(tokens))
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


# ---- Measuring a run: throughput and MFU (train.py's log line) ---------------------------------------------------

class Throughput:
    """Tokens (LLM positions, images expanded), samples and model FLOPs per second since the last log line, and
    MFU = model FLOPs / (seconds x peak FLOP/s of all devices), for the LLM alone (what published MFU figures of
    vision-language finetunes count) and for all parts. Tokens and samples arrive as counts over all processes,
    FLOPs as this process's own: they are summed over processes once per log line rather than once per step."""

    def __init__(self, peak_flops: float | None = None, num_processes: int = 1):  # peak of one device, or None
        self.peak, self.num_processes = peak_flops, num_processes
        self.reset()

    def reset(self) -> None:
        self.start, self.tokens, self.samples = time.time(), 0, 0
        self.flops = [0.0, 0.0]   # this process's model FLOPs: LLM, all parts

    def add(self, tokens: int, samples: int, flops: tuple[float, float] = (0.0, 0.0)) -> None:
        self.tokens, self.samples = self.tokens + tokens, self.samples + samples
        self.flops = [self.flops[0] + flops[0], self.flops[1] + flops[1]]

    def rates(self, sum_over_processes=lambda t: t) -> dict:
        seconds = max(time.time() - self.start, 1e-9)
        llm, every = sum_over_processes(torch.tensor(self.flops, dtype=torch.float32)).tolist()
        per_device = seconds * self.num_processes
        rates = {"tokens_per_s": self.tokens / seconds, "samples_per_s": self.samples / seconds,
                 "model_tflops_per_device": every / per_device / 1e12}
        if self.peak:   # unknown peak (CPU, an unlisted GPU): no MFU rather than a made-up one
            rates.update(mfu_llm=llm / per_device / self.peak, mfu_all=every / per_device / self.peak)
        self.reset()
        return rates


# Peak dense bf16 tensor-core FLOP/s of one device (vendors' data sheets: FP32 accumulate, no sparsity), matched
# against the CUDA device name in this order. --peak_tflops overrides it (an unlisted GPU, other precisions).
PEAK_BF16_TFLOPS = [(r"\bB200", 2250), (r"GH200", 989), (r"H200 NVL", 835), (r"\bH200", 989), (r"H100 NVL", 835),
                    (r"H[18]00 PCIe", 756), (r"\bH[18]00\b", 989), (r"\bA[18]00\b", 312), (r"\bL40S\b", 362),
                    (r"\bL40\b", 181), (r"\bL4\b", 121), (r"\bA10\b", 125), (r"RTX 4090", 165),
                    (r"RTX 3090(?! Ti)", 71), (r"MI300X", 1307)]


def peak_flops(device: torch.device, override_tflops: float = 0.0) -> float | None:
    """One device's peak FLOP/s: the override if given, else PEAK_BF16_TFLOPS by the GPU's name; None when
    unknown (a CPU, an unlisted GPU), and then MFU is not reported."""
    if override_tflops > 0:
        return override_tflops * 1e12
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((tflops * 1e12 for pattern, tflops in PEAK_BF16_TFLOPS if re.search(pattern, name)), None)
