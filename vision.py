"""The swappable vision parts of Mini-Gemini, each behind a documented contract (model.py composes them):

    LR tower (VisionTower)       images [N*V, 3, S, S] -> [N*V, P(+1), d]: a transformers CLIP / SigLIP encoder
    HR tower (TimmTrunkTower)    images_aux [N, 3, A, A] -> stage maps, finest first [N, c_s, A/2^(s+2), ...]
    mining (PatchInfoMining)     each LR token attends over its own MxM window of the HR map, output added
    projector (build_projector)  [N*V, P, d] -> [N*V, projector_tokens(kind, P), hidden]

Nothing here imports model.py. To swap a part, change it here: a new projector is a branch of build_projector plus
its token count in projector_tokens; another HR trunk needs only a layout in _stem_and_stages when it has neither
.stem/.stages nor ResNet's layers.
"""
from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint
from transformers import AutoConfig
from transformers.models.auto.modeling_auto import MODEL_MAPPING

from images import anyres_feature_shape, anyres_grid, anyres_tokens, unpadded_box, worst_pinpoint


# =============================================================================================================
# Vision towers
# =============================================================================================================
class VisionTower(nn.Module):
    """LR tower: a transformers vision model (CLIP, SigLIP, ...); features of `select_layer`, CLS dropped
    for select_feature="patch".

    Contract: forward(pixels [N, 3, S, S]) -> [N, num_tokens, hidden_size], the patches row-major on a square grid
    of num_patches (after the CLS token when kept); mean/std/image_size: how data.py prepares pixels for both
    towers; tune_last_layers(): what tune_vision_tower trains; gradient_checkpointing(on)."""

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

    def tune_last_layers(self) -> None:
        """Train the last half of the encoder layers that feed the selected hidden state."""
        layers = getattr(self.model, "vision_model", self.model).encoder.layers     # CLIP / SigLIP
        used = len(layers) + 1 + self.select_layer if self.select_layer < 0 else self.select_layer
        self.requires_grad_(False)
        layers[used // 2: used].requires_grad_(True)

    def gradient_checkpointing(self, on=True):
        if on:
            enable_checkpointing(self.model)

    def forward(self, pixels):
        out = self.model(pixels.to(_dtype(self)), output_hidden_states=True)
        feats = out.hidden_states[self.select_layer]
        cls = feats.shape[1] - self.num_patches          # 1 for CLIP, 0 for SigLIP
        return feats[:, cls:] if self.select_feature == "patch" else feats


class TimmTrunkTower(nn.Module):
    """HR tower: the stem and stages of any timm trunk (OpenCLIP's ConvNeXt is `model.visual.trunk`): a trunk with
    `.stem` and `.stages` (ConvNeXt, ...), or ResNet's layout (conv1/bn1/act1/maxpool, layer1..layer4).

    Contract (what MiniGemini, set_stage and train.py read; nothing else reaches inside):
    - stage_maps(pixels): every stage output, finest first [N, c_s, H_s, W_s]; the first stage's side H/4 is the
      side mining windows are cut from. pixels arrive normalized with the LR tower's mean/std (data.py feeds both
      towers one tensor); a trunk trained with other mean/std (ImageNet's, say) renormalizes inside, exactly:
      x * (in_std / std) + (in_mean - mean) / std.
    - channels: the sum of the stage channels (what the concatenated map, and so the mining, holds).
    - fsdp_block_class: the block class FSDP wraps one by one (a stage, or a stage's blocks when the stage is a
      plain nn.Sequential, which would otherwise match every Sequential of the model).
    - tune_last_stage(): what tune_vision_tower_aux trains.
    - gradient_checkpointing(on): through the stages' own switch; an error where the trunk has none.
    - train(mode): BatchNorm stays in eval mode (running statistics), also when the tower is tuned: a batch of one
      small image would otherwise fail on a 1x1 map, and a few images would overwrite statistics learnt on many.
    - spec: what an export records to rebuild it (from_spec)."""

    def __init__(self, trunk, spec: dict, *, mean, std):
        super().__init__()
        self.stem, self.stages = _stem_and_stages(trunk)     # the pooling head is never used, so not kept
        self.mean, self.std = list(mean), list(std)
        self.spec = dict(spec, mean=self.mean, std=self.std)     # what an export needs to rebuild this tower
        self.channels = sum(info["num_chs"] for info in trunk.feature_info[-len(self.stages):])
        self.renormalize = None                                   # (scale, shift) per channel, or None
        self.train(self.training)                                 # BatchNorm in eval mode from the start

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

    def expect_input(self, mean, std) -> None:
        """Pixels will arrive normalized with this mean/std (the LR tower's): renormalize to the trunk's own."""
        if _close(mean, self.mean) and _close(std, self.std):
            self.renormalize = None           # the usual case (CLIP-trained ConvNeXt): pixels pass unchanged
        else:
            self.renormalize = ([s / t for s, t in zip(std, self.std)],
                                [(m - u) / t for m, u, t in zip(mean, self.mean, self.std)])

    @property
    def fsdp_block_class(self) -> type[nn.Module]:
        stage = self.stages[0]
        return type(stage[0]) if type(stage) is nn.Sequential else type(stage)

    def tune_last_stage(self) -> None:
        self.requires_grad_(False)
        self.stages[-1].requires_grad_(True)

    def gradient_checkpointing(self, on=True):
        if not all(hasattr(stage, "grad_checkpointing") for stage in self.stages):
            raise ValueError(f"the HR tower {self.spec['timm_model_name']} has no per-stage gradient checkpointing: "
                             "turn gradient_checkpointing off, or leave the HR tower frozen")
        for stage in self.stages:
            stage.grad_checkpointing = on

    def train(self, mode: bool = True):
        super().train(mode)
        for m in self.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()
        return self

    def forward(self, pixels):
        """The full concatenated map [N, C, H/4, W/4] (what PatchInfoMining.reference reads; the model itself
        passes stage_maps to the mining, which never builds this map)."""
        return upsample_concat(self.stage_maps(pixels))

    def stage_maps(self, pixels) -> list[torch.Tensor]:
        """The stage outputs at their own resolutions, finest first: [N, c_s, H/2^(s+2), W/2^(s+2)]."""
        if self.renormalize is not None:
            scale, shift = (torch.tensor(v, dtype=torch.float32, device=pixels.device)[:, None, None]
                            for v in self.renormalize)
            pixels = pixels.float() * scale + shift
        x = self.stem(pixels.to(_dtype(self)))
        outs = []
        for stage in self.stages:
            x = stage(x)
            outs.append(x)
        return outs


ConvNeXtTower = TimmTrunkTower      # its former name


def _stem_and_stages(trunk) -> tuple[nn.Module, nn.Module]:
    """A timm trunk's stem and stages as two modules (their state-dict prefixes are stem. and stages.)."""
    if hasattr(trunk, "stem") and hasattr(trunk, "stages"):
        return trunk.stem, trunk.stages
    if all(hasattr(trunk, n) for n in ("conv1", "bn1", "act1", "maxpool", "layer1", "layer4")):     # ResNet
        return (nn.Sequential(trunk.conv1, trunk.bn1, trunk.act1, trunk.maxpool),
                nn.Sequential(trunk.layer1, trunk.layer2, trunk.layer3, trunk.layer4))
    raise ValueError(f"{type(trunk).__name__} has neither .stem/.stages nor ResNet's layer1..layer4: "
                     "add its layout to vision._stem_and_stages")


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
# AnyRes (LLaVA-NeXT): every image's base view and tiles through the towers at once, packed as LlavaNext packs them
# =============================================================================================================
def encode_anyres(model, images, images_aux, image_sizes) -> list[torch.Tensor]:
    """images [sum V_i, 3, S, S] (each image's base view, then its tiles row-major), image_sizes [N, 2] (h, w);
    images_aux: the HR canvases' A x A tiles [sum (V_i - 1), 3, A, A] for a model with an HR tower -> N tensors
    [tokens of image i, hidden]. One LR tower call for the whole batch; the mining (with an HR tower) and the
    projector likewise; then pack_anyres. `model`: a MiniGemini (its towers, mining, projector, image_newline)."""
    tower = model.vision_tower
    sizes = [tuple(s) for s in image_sizes.tolist()]
    grids = [anyres_grid(s, model.pinpoints, tower.image_size) for s in sizes]
    if sum(1 + r * c for r, c in grids) != len(images):
        raise ValueError(f"{len(images)} views for images whose grids {grids} need {sum(1 + r * c for r, c in grids)}")
    feats = tower(images)                                                          # [sum V, P, d]
    if model.vision_tower_aux is not None:
        if images_aux is None:
            raise ValueError("this model has an HR tower: pass images_aux")
        feats = mine_anyres(model.mining, model.vision_tower_aux, feats, images_aux, grids, sizes)
    feats = model.projector(feats.to(_dtype(model.projector)))
    return pack_anyres(feats, sizes, grids, model.image_newline, model.config.anyres_max_tiles)


def mine_anyres(mining, tower_aux, feats, hr_tiles, grids, sizes) -> torch.Tensor:
    """Patch info mining on AnyRes: LR features [sum V_i, G*G, d] -> the same, mined. Each image's HR canvas is put
    back together from its A x A tiles [sum (V_i - 1), 3, A, A] and goes through the HR tower whole (the images of
    one grid shape in one call). The concatenated HR map of a canvas is a (rows, cols) grid of M x M blocks
    (M = A/4): the LR tokens of tile (i, j) mine block (i, j), each token its own window as in MGM; the base view's
    tokens mine the part of the map that holds the image (unpadded_box, the LR grid's rule) resized to M x M, as
    MGM-HD's global view mines the whole map downsampled. One mining call for every view of the batch."""
    a = hr_tiles.shape[-1]
    firsts = torch.tensor([0] + [r * c for r, c in grids]).cumsum(0).tolist()   # each image's first HR tile
    views: list = [None] * len(grids)
    for shape in sorted(set(grids)):
        rows, cols = shape
        which = [i for i, grid in enumerate(grids) if grid == shape]
        canvas = torch.stack([hr_tiles[firsts[i]:firsts[i] + rows * cols] for i in which])
        canvas = canvas.reshape(len(which), rows, cols, 3, a, a).permute(0, 3, 1, 4, 2, 5)
        hr = upsample_concat(tower_aux.stage_maps(canvas.reshape(len(which), 3, rows * a, cols * a)))
        n, c, m = len(which), hr.shape[1], hr.shape[-1] // cols
        blocks = hr.reshape(n, c, rows, m, cols, m).permute(0, 2, 4, 1, 3, 5).reshape(n, rows * cols, c, m, m)
        for k, i in enumerate(which):
            top, bottom, left, right = unpadded_box(sizes[i], rows * m, cols * m)
            whole = F.interpolate(hr[k:k + 1, :, top:bottom, left:right].float(), size=(m, m), mode="bilinear",
                                  align_corners=False).to(hr.dtype)
            views[i] = torch.cat([whole, blocks[k]])
    return mining(feats, torch.cat(views))


def pack_anyres(feats, sizes, grids, newline, max_tiles: int = 0) -> list[torch.Tensor]:
    """Projected features [sum V_i, G*G, D] -> per image [G*G + H' * (W' + 1), D]: the base view's tokens, then the
    tiles' laid on one (rows*G, cols*G) grid, cut to the rows / columns that hold the image (unpadded_box), shrunk
    to the OneVision budget when max_tiles is set, and `newline` after every row (transformers' pack_image_features)."""
    g = math.isqrt(feats.shape[1])
    out, start = [], 0
    for size, (rows, cols) in zip(sizes, grids):
        base, tiles = feats[start], feats[start + 1:start + 1 + rows * cols]
        start += 1 + rows * cols
        grid = tiles.reshape(rows, cols, g, g, -1).permute(0, 2, 1, 3, 4).reshape(rows * g, cols * g, -1)
        (top, bottom, left, right), (h, w) = anyres_feature_shape(size, (rows, cols), g, max_tiles)
        grid = grid[top:bottom, left:right]
        if grid.shape[:2] != (h, w):     # OneVision's budget: bilinear, on the (D, H, W) map as transformers does
            grid = F.interpolate(grid.permute(2, 0, 1)[None], size=(h, w), mode="bilinear")[0].permute(1, 2, 0)
        grid = torch.cat([grid, newline.to(grid.dtype).expand(h, 1, -1)], 1)
        out.append(torch.cat([base, grid.reshape(h * (w + 1), -1)]))
    return out


def anyres_newline(config, llm, im_start_end_ids, dtype) -> nn.Parameter:
    """An AnyRes model's image_newline (after checking the model fits AnyRes), drawn as LlavaNext draws it."""
    check_anyres(config, im_start_end_ids)
    h = llm.config.get_text_config().hidden_size
    return nn.Parameter(torch.randn(h, dtype=dtype) * h ** -0.5)


def anyres_image_settings(model) -> dict:
    """What an AnyRes model adds to image_settings (the data pipeline's ImageProcessor takes them), and its
    tokens_per_image: the most one image takes (the pinpoint with the most tokens); {} for another model."""
    if not model.pinpoints:
        return {}
    tile, patches = model.vision_tower.image_size, math.isqrt(model.vision_tower.num_patches)
    most = worst_pinpoint(model.pinpoints, tile, patches, model.config.anyres_max_tiles)
    return dict(image_grid_pinpoints=[list(p) for p in model.pinpoints], patch_size=tile // patches,
                anyres_max_tiles=model.config.anyres_max_tiles,
                tokens_per_image=anyres_tokens(most, model.pinpoints, tile, patches, model.config.anyres_max_tiles))


def anyres_dummy_images(settings: dict, pinpoints, device) -> tuple:
    """One black square image of one tile as an AnyRes batch (views, HR tiles or None, image_sizes): what a
    text-only training batch runs through the vision path (MiniGemini.dummy_images)."""
    side, aux = settings["image_size"], settings["image_size_aux"]
    tiles = math.prod(anyres_grid((side, side), pinpoints, side))
    hr = None if aux is None else torch.zeros(tiles, 3, aux, aux, device=device)
    return torch.zeros(1 + tiles, 3, side, side, device=device), hr, torch.tensor([[side, side]], device=device)


def check_anyres(config, im_start_end_ids) -> None:
    """What AnyRes (LLaVA-NeXT's layout) needs of the rest of the model: a ValueError naming what does not fit."""
    problems = []
    if projector_tokens(config.projector, 4 * 4) != 16:
        problems.append(f"projector {config.projector!r} changes the number of tokens (AnyRes lays the tokens on the "
                        "image's grid): linear, mlpNx_gelu or vit")
    if config.mm_vision_select_feature != "patch":
        problems.append("mm_vision_select_feature must be patch (a CLS token has no place on the grid)")
    if config.image_grid != 1 or config.image_global:
        problems.append("image_grid / image_global are MGM-HD's fixed grid: AnyRes chooses the grid per image")
    if im_start_end_ids:
        problems.append("mm_use_im_start_end is not part of LLaVA-NeXT's layout")
    if problems:
        raise ValueError("image_grid_pinpoints (AnyRes): " + "; ".join(problems))


# =============================================================================================================
# Projectors
# =============================================================================================================
def projector_tokens(kind: str, tokens: int, *, queries=64) -> int:
    """Tokens a projector of this kind makes from `tokens` input tokens per view (MiniGemini.tokens_per_image,
    and through it data.py's length budget, reads it): change it together with build_projector."""
    if kind.startswith("pool2x_"):
        return projector_tokens(kind.removeprefix("pool2x_"), GridPool2x.tokens(tokens), queries=queries)
    return queries if kind == "perceiver" else tokens


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
    if kind.startswith("pool2x_"):        # pool2x_<any kind above>: a quarter of the tokens go in
        return nn.Sequential(GridPool2x(), build_projector(kind.removeprefix("pool2x_"), in_dim, out_dim,
                                                           heads=heads, queries=queries))
    raise ValueError(f"unknown projector {kind!r}: linear, mlp{{N}}x_gelu, perceiver, vit, or pool2x_ before one")


def is_projector(kind: str) -> bool:
    """Whether build_projector knows this kind (train.py checks the setting up front)."""
    try:
        build_projector(kind, 8, 8, heads=1, queries=1)
    except ValueError:
        return False
    return True


class GridPool2x(nn.Module):
    """2x2 average pooling over the square token grid [B, G*G, d] -> [B, (G/2)^2, d] (row-major)."""

    @staticmethod
    def tokens(n: int) -> int:
        g = math.isqrt(n)
        if g * g != n or g % 2:
            raise ValueError(f"pool2x_ projectors need an even square grid of tokens, not {n} (select_feature=patch)")
        return n // 4

    def forward(self, x):
        b, n, d = x.shape
        g = math.isqrt(n)
        self.tokens(n)
        return x.reshape(b, g // 2, 2, g // 2, 2, d).mean((2, 4)).reshape(b, -1, d)


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
# Small helpers
# =============================================================================================================
def enable_checkpointing(model):
    """Activation (gradient) checkpointing of a transformers model, non-reentrant (works with frozen inputs)."""
    if hasattr(model, "activation_checkpointing_enable"):     # transformers >= 5.x names it so
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def _dtype(module) -> torch.dtype:
    return next(module.parameters()).dtype


def _close(a, b) -> bool:
    return all(abs(x - y) < 1e-4 for x, y in zip(a, b))


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
