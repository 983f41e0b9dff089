"""Image preprocessing: one PIL image -> the tensors the towers take.

    square layouts (pad / resize / crop)   LR views [V, 3, S, S] (1 view, or MGM-HD's global + g*g crops) and the
                                           HR image [3, A, A] (LR = its bilinear downsample)
    anyres (LLaVA-NeXT)                    LR views [1 + rows*cols, 3, S, S]: the image squashed to S x S first,
                                           then the tiles of the image resized (aspect kept) and padded onto the
                                           best grid of pinpoints; with an HR tower the canvas is made at A per tile
                                           (HR, as A x A tiles) and the LR tiles are its bilinear downsample

AnyRes follows transformers' LlavaNext exactly (what the hub's llava-v1.6 checkpoints are served with): the grid
choice (select_best_resolution), the aspect-keeping resize (ceil, clipped), the centred black padding (the odd
pixel right / bottom), row-major tiles, and the token count of an image (anyres_tokens), which the data pipeline
decides before the model sees the image. Sizes are (height, width) throughout, as transformers writes them.
"""
from __future__ import annotations

import io
import math
import os
import re

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps
from transformers.image_utils import OPENAI_CLIP_MEAN as CLIP_MEAN, OPENAI_CLIP_STD as CLIP_STD

ASPECT_RATIOS = ("pad", "resize", "crop", "anyres")                # DataArguments.image_aspect_ratio
LLAVA_NEXT_GRIDS = ((1, 2), (2, 1), (2, 2), (3, 1), (1, 3))        # LLaVA-NeXT's pinpoints in tiles, (rows, cols)


class BadSample(ValueError):
    """A record that cannot be trained on. `kind` is what summaries count ("image not found", "too long", ...),
    `detail` says exactly what is wrong; str() is "record <id>: <kind>: <detail>" ("<kind>: <detail>" without an id),
    so a skip reason sent from a dataloader worker as a string still starts with its kind (see data.reason_kind)."""

    def __init__(self, kind: str, detail: str, record: str | None = None):
        super().__init__(kind, detail, record)
        self.kind, self.detail, self.record = kind, detail, record

    def __str__(self) -> str:
        reason = f"{self.kind}: {self.detail}"
        return reason if self.record is None else f"record {self.record}: {reason}"


class ImageProcessor:
    """One PIL image -> (LR views [V, 3, S, S], HR tensor or None): step 2 of ARCHITECTURE.md's flow.

    Square layouts: the image is padded to a square with the mean colour ("pad"), stretched ("resize"), or its short
    side resized and the center cut out ("crop", what MGM's image processor does by default). With an HR tower
    (image_size_aux=A) the HR tensor is the normalized A x A image and the LR image is its bilinear downsample to
    image_grid * S; without one (plain LLaVA) the LR image is resized directly. With image_grid=g > 1 the LR image is
    cut into g*g tiles of S, row-major; image_global=True puts the LR image resized to S first:
    views = [global, crop(0,0), crop(0,1), ..., crop(g-1,g-1)].

    "anyres" (needs image_grid_pinpoints, [(h, w), ...] in pixels): LLaVA-NeXT's tiles (anyres_views); the number
    of views, and of LLM positions (tokens), depends on the image's size. process() also returns that size.
    The HR canvas comes as its A x A tiles, so that a batch of any grids is one tensor (the model puts each canvas
    back together before the HR tower)."""

    def __init__(self, image_size: int = 336, image_mean=CLIP_MEAN, image_std=CLIP_STD,
                 image_size_aux: int | None = None, image_grid: int = 1, image_global: bool = False,
                 image_mean_aux=None, image_std_aux=None, aspect_ratio: str = "pad", image_grid_pinpoints=None,
                 anyres_max_tiles: int = 0, patch_size: int | None = None):
        # Both towers see the same normalized tensor (LR is a downsample of HR), so their mean/std must agree.
        for name, mine, aux in (("mean", image_mean, image_mean_aux), ("std", image_std, image_std_aux)):
            if aux is not None and not np.allclose(mine, aux, atol=1e-4):
                raise ValueError(f"vision towers disagree on image {name}: {list(mine)} vs {list(aux)}")
        if aspect_ratio not in ASPECT_RATIOS:
            raise ValueError(f"image_aspect_ratio must be one of {ASPECT_RATIOS}, not {aspect_ratio!r}")
        if (aspect_ratio == "anyres") != bool(image_grid_pinpoints):
            raise ValueError("image_aspect_ratio anyres goes with an AnyRes model (image_grid_pinpoints set), and "
                             f"an AnyRes model with anyres; got {aspect_ratio!r} and {image_grid_pinpoints!r}")
        self.image_size, self.image_size_aux = image_size, image_size_aux
        self.grid, self.use_global, self.aspect_ratio = image_grid, image_global, aspect_ratio
        self.pinpoints = [tuple(p) for p in image_grid_pinpoints or []]
        self.max_tiles, self.patch_size = anyres_max_tiles, patch_size
        self.mean = torch.tensor(image_mean, dtype=torch.float32).view(3, 1, 1)
        self.std = torch.tensor(image_std, dtype=torch.float32).view(3, 1, 1)
        self.scale, self.shift = 1 / (255 * self.std), -self.mean / self.std
        self.background = tuple(int(m * 255) for m in image_mean)   # the pad colour, as LLaVA/MGM use it

    @property
    def views(self) -> int:
        """Views per image of the square layouts (AnyRes: 1 + the image's tiles, see anyres_grid)."""
        return self.grid * self.grid + (1 if self.use_global and self.grid > 1 else 0)

    def __call__(self, image: Image.Image) -> tuple[torch.Tensor, torch.Tensor | None]:
        views, aux, _ = self.process(image)
        return views, aux

    def process(self, image: Image.Image) -> tuple[torch.Tensor, torch.Tensor | None, tuple[int, int]]:
        """(LR views, HR tensor or None, the image's (height, width) after its EXIF orientation)."""
        image = to_rgb(image, self.background)
        size = (image.height, image.width)
        if self.aspect_ratio == "anyres":
            return (*self.anyres_views(image), size)
        if self.aspect_ratio == "pad":
            image = self.pad_to_square(image)
        lr_side = self.grid * self.image_size
        if self.aspect_ratio == "crop":
            image = self.center_crop(image, self.image_size_aux or lr_side)
        if self.image_size_aux:
            hr = self.resize_normalize(image, self.image_size_aux)
            return self.split_views(_bilinear(hr, lr_side)), hr, size
        return self.split_views(self.resize_normalize(image, lr_side)), None, size

    # ---- AnyRes ---------------------------------------------------------------------------------------------
    def anyres_grid(self, size: tuple[int, int]) -> tuple[int, int]:
        """(rows, cols) of tiles for an image of size (h, w)."""
        return anyres_grid(size, self.pinpoints, self.image_size)

    def tokens(self, size: tuple[int, int]) -> int:
        """LLM positions of one AnyRes image of size (h, w) (base + unpadded grid + one newline per row)."""
        return anyres_tokens(size, self.pinpoints, self.image_size, self.image_size // self.patch_size,
                             self.max_tiles)

    def anyres_views(self, image: Image.Image) -> tuple[torch.Tensor, torch.Tensor | None]:
        """RGB image -> ([base, tile(0,0), tile(0,1), ...] [1 + rows*cols, 3, S, S], the HR canvas
        [3, rows*A, cols*A] cut in tiles [rows*cols, 3, A, A], or None). The views are LlavaNextImageProcessor's
        pixel_values for this image (its torchvision backend's exactly, its PIL backend's within a level or two)."""
        s = self.image_size
        rows, cols = self.anyres_grid((image.height, image.width))
        base = self.resize_normalize(image, s)
        hr = None
        if self.image_size_aux:    # MGM: the canvas at A per tile for the HR tower, the LR tiles its bilinear downsample
            a = self.image_size_aux
            hr = self.normalize(self.anyres_canvas(image, rows * a, cols * a))
            lr = _bilinear(hr, (rows * s, cols * s))
        else:
            lr = self.normalize(self.anyres_canvas(image, rows * s, cols * s))     # LlavaNext's canvas
        return torch.cat([base[None], _tiles(lr, s)]), None if hr is None else _tiles(hr, self.image_size_aux)

    @staticmethod
    def anyres_canvas(image: Image.Image, height: int, width: int) -> torch.Tensor:
        """The image resized keeping its aspect (bicubic) and centred on a black height x width canvas, uint8."""
        nh, nw = anyres_resized_size((image.height, image.width), (height, width))
        pixels = _resize_uint8(_uint8(image), (nh, nw))
        canvas = torch.zeros(3, height, width, dtype=torch.uint8)
        top, left = (height - nh) // 2, (width - nw) // 2
        canvas[:, top:top + nh, left:left + nw] = pixels
        return canvas

    # ---- square layouts --------------------------------------------------------------------------------------
    def pad_to_square(self, image: Image.Image) -> Image.Image:
        w, h = image.size
        if w == h:
            return image
        canvas = Image.new("RGB", (max(w, h),) * 2, self.background)
        canvas.paste(image, ((max(w, h) - w) // 2, (max(w, h) - h) // 2))
        return canvas

    @staticmethod
    def center_crop(image: Image.Image, side: int) -> Image.Image:
        """The short side resized to `side` (PIL bicubic), then the central side x side square: CLIP's image
        processor (resize shortest_edge + center_crop), which MGM applies when no image_aspect_ratio is given."""
        w, h = image.size
        size = (side, int(side * h / w)) if w <= h else (int(side * w / h), side)
        if size != image.size:
            image = image.resize(size, Image.BICUBIC)
        left, top = (size[0] - side) // 2, (size[1] - side) // 2
        return image.crop((left, top, left + side, top + side))

    def resize_normalize(self, image: Image.Image, side: int) -> torch.Tensor:
        """RGB image -> normalized float [3, side, side] (a non-square image is stretched). The resize is torch's
        antialiased bicubic on uint8, which equals PIL's BICUBIC to within 1/255 and is 2.5x faster; the normalize is
        one fused pass ((x/255 - mean)/std = x*scale + shift). Together 3.5x faster than PIL resize + normalize."""
        return self.normalize(_resize_uint8(_uint8(image), (side, side)))

    def normalize(self, pixels: torch.Tensor) -> torch.Tensor:
        """uint8 [3, H, W] -> normalized float32 [3, H, W]."""
        return pixels.to(torch.float32, memory_format=torch.contiguous_format).mul_(self.scale).add_(self.shift)

    def split_views(self, lr: torch.Tensor) -> torch.Tensor:
        g, s = self.grid, self.image_size
        if g == 1:
            return lr[None]
        crops = lr.reshape(3, g, s, g, s).permute(1, 3, 0, 2, 4).reshape(g * g, 3, s, s)   # row-major tiles
        if self.use_global:
            crops = torch.cat([_bilinear(lr, s)[None], crops])
        return crops


# ---- AnyRes arithmetic (pure; transformers' LlavaNext semantics) ---------------------------------------------

def select_best_resolution(size: tuple[int, int], pinpoints) -> tuple[int, int]:
    """The pinpoint (h, w) that keeps most of the image's pixels when it is resized into it keeping its aspect;
    among equals, the one that wastes least. First in list order wins a full tie."""
    oh, ow = size
    best, best_eff, best_waste = None, 0, float("inf")
    for h, w in pinpoints:
        scale = min(w / ow, h / oh)
        eff = min(int(ow * scale) * int(oh * scale), ow * oh)
        waste = h * w - eff
        if eff > best_eff or (eff == best_eff and waste < best_waste):
            best, best_eff, best_waste = (h, w), eff, waste
    return best


def anyres_grid(size: tuple[int, int], pinpoints, tile: int) -> tuple[int, int]:
    """(rows, cols) of tile x tile views for an image of size (h, w)."""
    h, w = select_best_resolution(size, pinpoints)
    return h // tile, w // tile


def anyres_resized_size(size: tuple[int, int], target: tuple[int, int]) -> tuple[int, int]:
    """The image's (h, w) once resized into target (h, w) keeping its aspect: one side fills, the other is
    ceil()ed and clipped (transformers' get_patch_output_size)."""
    (oh, ow), (th, tw) = size, target
    if tw / ow < th / oh:
        return min(math.ceil(oh * (tw / ow)), th), tw
    return th, min(math.ceil(ow * (th / oh)), tw)


def unpadded_box(size: tuple[int, int], height: int, width: int) -> tuple[int, int, int, int]:
    """Rows and columns (top, bottom, left, right) of a height x width feature grid that hold the image of size
    (h, w) rather than padding: transformers' unpad_image, rounding with int(round(x, 7)); an odd remainder keeps
    one more row (or column) than the image needs, as there."""
    oh, ow = size
    if ow / oh > width / height:
        new = int(round(oh * (width / ow), 7))
        pad = (height - new) // 2
        return pad, height - pad, 0, width
    new = int(round(ow * (height / oh), 7))
    pad = (width - new) // 2
    return 0, height, pad, width - pad


def anyres_feature_shape(size: tuple[int, int], grid: tuple[int, int], patches: int,
                         max_tiles: int = 0) -> tuple[tuple[int, int, int, int], tuple[int, int]]:
    """For an image of size (h, w) on a grid of (rows, cols) tiles of patches x patches features: the unpadded box
    of the grid's feature map (unpadded_box), and the final (rows, cols) of features, after the optional OneVision
    budget (when the unpadded grid holds more than 1.1^2 * max_tiles tiles' worth, it is bilinearly shrunk)."""
    box = unpadded_box(size, grid[0] * patches, grid[1] * patches)
    h, w = box[1] - box[0], box[3] - box[2]
    if max_tiles:
        ratio = math.sqrt(h * w / (max_tiles * patches ** 2))
        if ratio > 1.1:
            h, w = int(h // ratio), int(w // ratio)
    return box, (h, w)


def anyres_tokens(size: tuple[int, int], pinpoints, tile: int, patches: int, max_tiles: int = 0) -> int:
    """LLM positions of one AnyRes image: patches^2 (the base view) + H' * (W' + 1) (the unpadded grid, a newline
    after every row). 576 + H' * (W' + 1) for CLIP-L/336: 2,340 for 480x640, 1,948 for 1080x1920."""
    _, (h, w) = anyres_feature_shape(size, anyres_grid(size, pinpoints, tile), patches, max_tiles)
    return patches * patches + h * (w + 1)


def parse_pinpoints(value, image_size: int) -> list[tuple[int, int]]:
    """image_grid_pinpoints as a setting -> [(h, w), ...] in pixels. "default": LLaVA-NeXT's five grids for a tower
    of image_size; else "HxW,HxW,..." or what a YAML list of [h, w] pairs becomes ("[336, 672],[672, 336]"), or
    the list itself. Every side must be a multiple of image_size (the tiles)."""
    if value in (None, ""):
        return []
    if value == "default":
        return [(r * image_size, c * image_size) for r, c in LLAVA_NEXT_GRIDS]
    numbers = [int(n) for n in re.findall(r"\d+", str(value))] if not isinstance(value, list) else \
        [int(n) for pair in value for n in pair]
    if not numbers or len(numbers) % 2:
        raise ValueError(f"image_grid_pinpoints {value!r}: pairs of height and width, e.g. 336x672,672x336")
    pairs = list(zip(numbers[::2], numbers[1::2]))
    if any(h % image_size or w % image_size or not h or not w for h, w in pairs):
        raise ValueError(f"image_grid_pinpoints {value!r}: every side must be a positive multiple of the tower's "
                         f"image size {image_size}")
    return pairs


def worst_pinpoint(pinpoints, tile: int, patches: int, max_tiles: int = 0) -> tuple[int, int]:
    """The image size (h, w) with the most tokens: a pinpoint itself (nothing unpadded, every tile used)."""
    return max(pinpoints, key=lambda p: anyres_tokens(p, pinpoints, tile, patches, max_tiles))


# ---- Decoding -----------------------------------------------------------------------------------------------

def to_rgb(image: Image.Image, background=(0, 0, 0)) -> Image.Image:
    """Apply the EXIF orientation and convert any mode to RGB; transparency is composited on `background`."""
    image = ImageOps.exif_transpose(image)
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        image = image.convert("RGBA")
        canvas = Image.new("RGB", image.size, background)
        canvas.paste(image, mask=image.getchannel("A"))
        return canvas
    return image.convert("RGB")


def load_image(source: dict, image_folder: str = ".", max_pixels: int = 89_478_485) -> Image.Image:
    """{"path" | "bytes"} -> a fully decoded PIL image; every way it can fail becomes BadSample naming the file."""
    return _open(source, image_folder, max_pixels, decode=True)[0]


def image_size(source: dict, image_folder: str = ".", max_pixels: int = 89_478_485) -> tuple[int, int]:
    """(height, width) of an image as the model will see it (EXIF orientation applied), from its header only:
    what AnyRes token counts need before any pixel is decoded. Fails as load_image does (BadSample)."""
    return oriented_size(_open(source, image_folder, max_pixels, decode=False)[0])


def oriented_size(image: Image.Image) -> tuple[int, int]:
    """(height, width) of a PIL image once its EXIF orientation is applied (as to_rgb applies it)."""
    w, h = image.size
    orientation = image.getexif().get(0x0112, 1)    # 5..8: rotated by 90 degrees, so exif_transpose swaps sides
    return (w, h) if orientation in (5, 6, 7, 8) else (h, w)


def _open(source: dict, image_folder: str, max_pixels: int, decode: bool):
    name = source.get("path") or "<image bytes>"
    try:
        fp = io.BytesIO(source["bytes"]) if source.get("bytes") else os.path.join(image_folder, source["path"])
        image = Image.open(fp)
        w, h = image.size
        too_big = w * h > max_pixels
        if decode and not too_big:
            image.load()   # decode now, so truncated and corrupt files fail here and not inside the model step
    except FileNotFoundError:
        raise BadSample("image not found", name) from None
    except Image.DecompressionBombError:
        raise BadSample("image too large", f"{name} (decompression bomb)") from None
    except Exception as e:   # PIL raises many types (OSError, SyntaxError, ValueError, struct.error...) for bad files
        raise BadSample("image unreadable", f"{name} ({type(e).__name__}: {e})") from None
    if too_big:
        raise BadSample("image too large", f"{name} is {w}x{h}, over max_image_pixels={max_pixels}")
    if w == 0 or h == 0:
        raise BadSample("image unreadable", f"{name} is {w}x{h}")
    return image, (w, h)


def _tiles(canvas: torch.Tensor, side: int) -> torch.Tensor:
    """[3, rows*side, cols*side] -> its side x side tiles, row-major [rows*cols, 3, side, side]."""
    rows, cols = canvas.shape[1] // side, canvas.shape[2] // side
    return canvas.reshape(3, rows, side, cols, side).permute(1, 3, 0, 2, 4).reshape(rows * cols, 3, side, side)


def _uint8(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1)


def _resize_uint8(pixels: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """uint8 [3, H, W] -> uint8 [3, h, w], torch's antialiased bicubic (torchvision's, so transformers' torchvision
    backend's; PIL's BICUBIC within one level)."""
    if tuple(pixels.shape[-2:]) == tuple(size):
        return pixels
    return F.interpolate(pixels[None], size=size, mode="bicubic", antialias=True)[0]


def _bilinear(image: torch.Tensor, size: int | tuple[int, int]) -> torch.Tensor:
    """[3, H, W] -> [3, h, w] (a side, or (h, w)), bilinear (align_corners=False, as MGM). Channels-last in and out
    of the kernel: 2.4x faster on CPU than the planar layout at 768 -> 336."""
    size = (size, size) if isinstance(size, int) else size
    x = image[None].contiguous(memory_format=torch.channels_last)
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)[0].contiguous()
