"""images.py: AnyRes equals transformers' LlavaNext (grid choice, resize/pad, tiles, base squash, token count)."""
import random

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import LlavaNextImageProcessor, LlavaNextProcessor

from images import (CLIP_MEAN, CLIP_STD, ImageProcessor, anyres_grid, anyres_tokens, image_size, parse_pinpoints,
                    select_best_resolution, worst_pinpoint)

PINPOINTS = [(336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008)]


def llava_next_processor(tokenizer, pinpoints=PINPOINTS, side=336, patch=14):
    images = LlavaNextImageProcessor(image_grid_pinpoints=[list(p) for p in pinpoints], size={"shortest_edge": side},
                                     crop_size={"height": side, "width": side}, image_mean=CLIP_MEAN,
                                     image_std=CLIP_STD)
    return LlavaNextProcessor(image_processor=images, tokenizer=tokenizer, patch_size=patch,
                              vision_feature_select_strategy="default", num_additional_image_tokens=1)


def transformers_tokens(processor, h, w, side=336):
    return processor._get_number_of_features(h, w, side, side) - 1     # "default": the CLS token is dropped


def test_token_counts_equal_transformers_for_2000_random_sizes(llama_tokenizer):
    processor = llava_next_processor(llama_tokenizer)
    rng = random.Random(0)
    sizes = [(rng.randint(1, 2000), rng.randint(1, 2000)) for _ in range(1500)]
    sizes += [(rng.randint(1, 60), rng.randint(100, 3000)) for _ in range(250)]          # extreme aspect ratios
    sizes += [(rng.randint(100, 3000), rng.randint(1, 60)) for _ in range(250)]
    for h, w in sizes:
        assert anyres_tokens((h, w), PINPOINTS, 336, 24) == transformers_tokens(processor, h, w), (h, w)


def test_token_counts_known_values():
    assert anyres_tokens((480, 640), PINPOINTS, 336, 24) == 2340
    assert anyres_tokens((1080, 1920), PINPOINTS, 336, 24) == 1948
    assert anyres_tokens((336, 336), PINPOINTS, 336, 24) == 1176
    assert worst_pinpoint(PINPOINTS, 336, 24) == (672, 672)          # 2x2: 576 + 48 * 49 = 2928
    assert anyres_tokens((672, 672), PINPOINTS, 336, 24) == 576 + 48 * 49


def test_grid_choice_ties_and_order():
    assert select_best_resolution((100, 1000), PINPOINTS) == (336, 1008)
    assert select_best_resolution((1000, 100), PINPOINTS) == (1008, 336)
    assert select_best_resolution((10, 10), PINPOINTS) == (336, 672)       # all keep 100 px: least waste, first
    assert anyres_grid((480, 640), PINPOINTS, 336) == (2, 2)


def test_onevision_budget_shrinks_big_grids():
    pins = [(336 * r, 336 * c) for r in range(1, 7) for c in range(1, 7)]
    full = anyres_tokens((2000, 2000), pins, 336, 24)
    capped = anyres_tokens((2000, 2000), pins, 336, 24, max_tiles=9)
    assert full == 576 + 144 * 145
    ratio = (144 * 144 / (9 * 576)) ** 0.5
    assert capped == 576 + int(144 // ratio) * (int(144 // ratio) + 1)


def test_pinpoints_setting_forms():
    assert parse_pinpoints("default", 42) == [(42, 84), (84, 42), (84, 84), (126, 42), (42, 126)]
    assert parse_pinpoints("[336, 672],[672, 336]", 336) == [(336, 672), (672, 336)]
    assert parse_pinpoints("336x672,672x672", 336) == [(336, 672), (672, 672)]
    assert parse_pinpoints("", 336) == []
    with pytest.raises(ValueError, match="multiple"):
        parse_pinpoints("300x600", 336)


@pytest.mark.parametrize("size", [(480, 640), (200, 900), (900, 200), (300, 300), (50, 70), (701, 333)])
def test_pixel_values_equal_transformers(size):
    h, w = size
    rng = np.random.default_rng(h * w)
    image = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
    theirs = LlavaNextImageProcessor(image_grid_pinpoints=[list(p) for p in PINPOINTS], image_mean=CLIP_MEAN,
                                     image_std=CLIP_STD, size={"shortest_edge": 336},
                                     crop_size={"height": 336, "width": 336})(image, return_tensors="pt")
    ours = ImageProcessor(336, aspect_ratio="anyres", image_grid_pinpoints=PINPOINTS, patch_size=14)
    views, aux, got_size = ours.process(image)
    assert aux is None and got_size == size
    assert tuple(theirs["image_sizes"][0].tolist()) == size
    expected = theirs["pixel_values"][0]
    assert views.shape == expected.shape
    level = float(max(s for s in CLIP_STD)) ** -1 / 255 + 1e-4        # one uint8 level, normalized
    assert (views - expected).abs().max() <= level


def test_hr_canvas_with_an_hr_tower():
    image = Image.new("RGB", (640, 480), (200, 30, 60))
    p = ImageProcessor(42, image_size_aux=96, aspect_ratio="anyres", image_grid_pinpoints=parse_pinpoints(
        "default", 42), patch_size=14)
    views, hr, _ = p.process(image)
    assert p.anyres_grid((480, 640)) == (2, 2)
    assert views.shape == (5, 3, 42, 42) and hr.shape == (4, 3, 96, 96)
    canvas = hr.reshape(2, 2, 3, 96, 96).permute(2, 0, 3, 1, 4).reshape(3, 192, 192)     # the tiles put back
    lr = torch.nn.functional.interpolate(canvas[None], size=(84, 84), mode="bilinear", align_corners=False)[0]
    torch.testing.assert_close(views[1:], lr.reshape(3, 2, 42, 2, 42).permute(1, 3, 0, 2, 4).reshape(4, 3, 42, 42))


def test_image_size_reads_the_header_with_exif_orientation(tmp_path):
    image = Image.new("RGB", (64, 32))
    exif = image.getexif()
    exif[0x0112] = 6                                                   # rotated 90 degrees
    image.save(tmp_path / "r.jpg", exif=exif)
    assert image_size({"path": "r.jpg"}, str(tmp_path)) == (64, 32)
    views, _, size = ImageProcessor(aspect_ratio="pad").process(Image.open(tmp_path / "r.jpg"))
    assert size == (64, 32)
    assert torch.is_tensor(views)
