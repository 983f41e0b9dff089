"""Data pipeline: records from every source, Mini-Gemini image tensors, batches, the sampler, bad records, `check`."""
import base64
import functools
import io
import json
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from conftest import REPO
from PIL import Image

from data import (IGNORE_INDEX, IMAGE_TOKEN_INDEX, BadSample, DataArguments, GroupedBatchSampler, ImageProcessor,
                  PackedBatchSampler, build_dataset, build_sampler, check, collate, load_records, reason_kind,
                  reuse_freed_memory)

SMALL = dict(image_size=28, image_size_aux=64)                                  # LR 28, HR 64
HD = dict(image_size=28, image_size_aux=128, image_grid=2, image_global=True)   # LR 56 -> 4 crops + global
RED, GREEN, BLUE, YELLOW = (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0)


def colour(processor, rgb) -> torch.Tensor:
    """The normalized value of one RGB colour, [3]."""
    return processor.resize_normalize(Image.new("RGB", (1, 1), rgb), 1)[:, 0, 0]


def turns(question="What color is the shape?", answer="Red."):
    return [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def make_llava_jsonl(path: Path, n_records: int, image_folder: Path, n_files: int = 20) -> Path:
    """A LLaVA JSONL file of n_records (2/3 with one image, 1/3 text-only) over n_files small images."""
    image_folder.mkdir(parents=True, exist_ok=True)
    for k in range(n_files):
        Image.new("RGB", (32 + k, 24), (k * 12 % 256, 90, 200)).save(image_folder / f"{k}.jpg")
    with open(path, "w") as f:
        for i in range(n_records):
            record = {"id": f"r{i}", "conversations": turns(f"Question {i} about the picture, please?",
                                                            "An answer " + "word " * (i % 40))}
            if i % 3:
                record["image"] = f"{i % n_files}.jpg"
                record["conversations"][0]["value"] = "<image>\n" + record["conversations"][0]["value"]
            f.write(json.dumps(record) + "\n")
    return path


def dataset_for(tmp_path, records, tokenizer, image_settings=SMALL, **overrides):
    args = DataArguments(str(write_jsonl(tmp_path / "data.jsonl", records)), image_folder=str(tmp_path),
                         template="llama_3", cache_dir=str(tmp_path / "cache"), **overrides)
    return build_dataset(args, tokenizer, image_settings, tokens_per_image=4)


@pytest.fixture
def pad_id(llama3_tokenizer):
    return llama3_tokenizer.eos_token_id   # the Llama-3 tokenizer has no pad token


# ---- images -----------------------------------------------------------------------------------------------------

def test_wide_image_is_padded_to_square_with_the_mean_colour():
    processor = ImageProcessor(**SMALL)
    views, hr = processor(Image.new("RGB", (100, 50), RED))   # rows 0-24 and 75-99 of the square are padding
    assert views.shape == (1, 3, 28, 28) and hr.shape == (3, 64, 64)
    assert processor.background == (122, 116, 104)            # int(CLIP mean * 255), as LLaVA pads
    pad = colour(processor, processor.background)[:, None, None]
    assert torch.allclose(hr[:, :14], pad, atol=1e-4) and torch.allclose(hr[:, -14:], pad, atol=1e-4)
    assert torch.allclose(hr[:, 24:40], colour(processor, RED)[:, None, None], atol=1e-3)
    # LR is the bilinear downsample of the normalized HR tensor, not a second resize of the image
    lr = torch.nn.functional.interpolate(hr[None], size=(28, 28), mode="bilinear", align_corners=False)
    assert torch.equal(views, lr)


def test_resize_stretches_instead_of_padding():
    processor = ImageProcessor(**SMALL, aspect_ratio="resize")
    _, hr = processor(Image.new("RGB", (100, 50), RED))
    assert torch.allclose(hr, colour(processor, RED)[:, None, None].expand_as(hr), atol=1e-3)


@pytest.mark.parametrize("size", [(100, 50), (45, 130)])
def test_crop_is_clip_short_side_resize_and_center_crop(size):
    """MGM's default ('square'): what CLIP's image processor does, short side to the HR side, then the center."""
    from transformers import CLIPImageProcessorPil
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
    processor = ImageProcessor(**SMALL, aspect_ratio="crop")
    views, hr = processor(image)
    clip = CLIPImageProcessorPil(size={"shortest_edge": 64}, crop_size={"height": 64, "width": 64},
                                 image_mean=processor.mean.flatten().tolist(), image_std=processor.std.flatten().tolist())
    reference = clip(image, return_tensors="pt")["pixel_values"][0]
    assert hr.shape == reference.shape == (3, 64, 64)
    torch.testing.assert_close(hr, reference, atol=1e-5, rtol=0)
    assert views.shape == (1, 3, 28, 28)


@pytest.mark.parametrize("size,side", [((97, 61), 64), ((300, 200), 128), ((40, 40), 64), ((64, 64), 64)])
def test_fast_resize_matches_pil_bicubic_and_the_plain_normalize(size, side):
    """The fast path (torch's antialiased bicubic on uint8, fused normalize) against the plain reference: PIL's
    BICUBIC resize, then (x / 255 - mean) / std. Downscaling, upscaling and no resize, on a photo-like image."""
    rng = np.random.default_rng(0)
    w, h = size
    coarse = Image.fromarray(rng.integers(0, 256, (h // 8 + 1, w // 8 + 1, 3), dtype=np.uint8)).resize(size)
    image = Image.fromarray(np.clip(np.asarray(coarse) + rng.integers(-20, 20, (h, w, 3)), 0, 255).astype(np.uint8))
    processor = ImageProcessor(**SMALL)
    ours = processor.resize_normalize(image, side)
    pixels = torch.from_numpy(np.asarray(image.resize((side, side), Image.BICUBIC), dtype=np.float32)).permute(2, 0, 1)
    reference = (pixels / 255 - processor.mean) / processor.std
    levels = (ours - reference) * processor.std * 255                  # the difference in 0-255 pixel levels
    assert ours.shape == (3, side, side) and ours.is_contiguous()
    assert levels.abs().max() <= 1.0 + 1e-3                             # rounding of one level at most
    assert levels.abs().mean() < 0.05                                   # and rarely even that


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_workers_keep_freed_image_memory_for_the_next_sample():
    """train.py's loaders pass it as worker_init_fn; glibc accepts both thresholds (it refuses out-of-range ones)."""
    assert reuse_freed_memory(0) is True


def quadrants(side=100) -> Image.Image:
    image = Image.new("RGB", (side, side))
    for (x, y), rgb in zip([(0, 0), (1, 0), (0, 1), (1, 1)], [RED, GREEN, BLUE, YELLOW]):
        image.paste(rgb, (x * side // 2, y * side // 2, (x + 1) * side // 2, (y + 1) * side // 2))
    return image


def test_hd_views_are_global_then_row_major_crops():
    processor = ImageProcessor(**HD)
    views, hr = processor(quadrants())
    assert views.shape == (5, 3, 28, 28) and hr.shape == (3, 128, 128)
    for view, rgb in zip(views[1:], [RED, GREEN, BLUE, YELLOW]):   # crop(0,0) top-left, crop(0,1) top-right, ...
        assert torch.allclose(view[:, 14, 14], colour(processor, rgb), atol=1e-3)
    lr = torch.nn.functional.interpolate(hr[None], size=(56, 56), mode="bilinear", align_corners=False)[0]
    assert torch.equal(views[2], lr[:, :28, 28:]) and torch.equal(views[3], lr[:, 28:, :28])
    glob = torch.nn.functional.interpolate(lr[None], size=(28, 28), mode="bilinear", align_corners=False)[0]
    assert torch.equal(views[0], glob)   # the global view: the whole LR image at 28


def test_mini_gemini_sizes_and_lr_only_mode():
    image = Image.new("RGB", (500, 300), GREEN)
    views, hr = ImageProcessor(image_size=336, image_size_aux=768)(image)
    assert views.shape == (1, 3, 336, 336) and hr.shape == (3, 768, 768)
    views, hr = ImageProcessor(image_size=336, image_size_aux=1536, image_grid=2, image_global=True)(image)
    assert views.shape == (5, 3, 336, 336) and hr.shape == (3, 1536, 1536)
    views, hr = ImageProcessor(image_size=336)(image)   # plain LLaVA: no HR tower
    assert views.shape == (1, 3, 336, 336) and hr is None


def test_towers_with_different_mean_or_std_are_an_error():
    with pytest.raises(ValueError, match="disagree on image mean"):
        ImageProcessor(**SMALL, image_mean_aux=(0.5, 0.5, 0.5))
    ImageProcessor(**SMALL, image_mean_aux=(0.48145466, 0.4578275, 0.40821073))   # equal is fine


def test_image_modes_and_exif_rotation(tmp_path, llama3_tokenizer):
    grey = Image.new("L", (40, 20), 200)
    rgba = Image.new("RGBA", (40, 40), RED + (255,))
    rgba.paste((0, 0, 0, 0), (0, 0, 20, 40))                           # left half transparent
    palette = Image.new("RGB", (30, 30), BLUE).convert("P")
    wide = Image.new("RGB", (60, 30), RED)
    wide.paste(BLUE, (30, 0, 60, 30))                                   # stored: red left, blue right
    exif = Image.Exif()
    exif[0x0112] = 6                                                    # display rotated 90 degrees clockwise
    grey.save(tmp_path / "grey.png"), rgba.save(tmp_path / "rgba.png"), palette.save(tmp_path / "palette.png")
    wide.save(tmp_path / "rotated.jpg", exif=exif, quality=95)
    records = [{"id": name, "image": f"{name}.{ext}", "conversations": turns("<image>\nColour?")}
               for name, ext in [("grey", "png"), ("rgba", "png"), ("palette", "png"), ("rotated", "jpg")]]
    dataset = dataset_for(tmp_path, records, llama3_tokenizer)
    p = dataset.processor
    hr = {r["id"]: dataset[i]["images_aux"][0] for i, r in enumerate(records)}
    assert torch.allclose(hr["grey"][:, 32, 32], colour(p, (200, 200, 200)), atol=1e-3)
    assert torch.allclose(hr["rgba"][:, 32, 8], colour(p, p.background), atol=1e-3)   # transparent -> pad colour
    assert torch.allclose(hr["rgba"][:, 32, 56], colour(p, RED), atol=1e-3)
    assert torch.allclose(hr["palette"][:, 32, 32], colour(p, BLUE), atol=1e-2)
    # upright the image is tall (30x60): red on top, blue below, padding left and right
    rot = hr["rotated"]
    assert torch.allclose(rot[:, :, :10], colour(p, p.background)[:, None, None], atol=1e-3)
    assert torch.allclose(rot[:, 12, 32], colour(p, RED), atol=0.1)
    assert torch.allclose(rot[:, 52, 32], colour(p, BLUE), atol=0.1)


# ---- records and batches ------------------------------------------------------------------------------------------

def test_records_load_alike_from_json_jsonl_parquet_and_a_datasets_dir(tmp_path, llama3_tokenizer):
    Image.new("RGB", (40, 30), RED).save(tmp_path / "red.png")
    records = [
        {"id": "img", "image": "red.png", "conversations": turns("<image>\nColour?")},
        {"id": "txt", "conversations": turns()},
    ]
    (tmp_path / "a.json").write_text(json.dumps(records))
    write_jsonl(tmp_path / "b.jsonl", records)
    png = (tmp_path / "red.png").read_bytes()   # parquet with the image bytes inside (an HF Image column)
    features = datasets.Features({"id": datasets.Value("string"), "image": datasets.Image(),
                                  "conversations": datasets.List({"from": datasets.Value("string"),
                                                                  "value": datasets.Value("string")})})
    datasets.Dataset.from_dict({"id": ["img", "txt"], "image": [{"bytes": png, "path": None}, None],
                                "conversations": [r["conversations"] for r in records]},
                               features=features).to_parquet(str(tmp_path / "c.parquet"))
    datasets.Dataset.from_list([{**r, "image": [r["image"]] if "image" in r else []} for r in records]) \
        .save_to_disk(str(tmp_path / "d"))
    sources = ",".join(str(tmp_path / name) for name in ["a.json", "b.jsonl", "c.parquet", "d"])
    args = DataArguments(sources, image_folder=str(tmp_path), template="llama_3", cache_dir=str(tmp_path / "cache"))
    dataset = build_dataset(args, llama3_tokenizer, SMALL, tokens_per_image=4)
    assert list(dataset.records["id"]) == ["img", "txt"] * 4
    assert all(f["filename"].endswith(".arrow") for f in dataset.records.cache_files)   # memory-mapped, on disk
    first = dataset[0]
    for i in (2, 4, 6):
        assert torch.equal(dataset[i]["images_aux"], first["images_aux"])
        assert torch.equal(dataset[i]["input_ids"], first["input_ids"])
        assert dataset[i + 1]["images"] is None and dataset[i + 1]["images_aux"] is None   # text-only: no tensors
    assert list(dataset.is_multimodal()) == [True, False] * 4
    assert list(dataset.lengths()[:2]) == [1 + 4 + 2, 5 + 1]   # words + images * tokens_per_image


def test_an_edited_file_is_reloaded_not_served_from_the_cache(tmp_path):
    path = write_jsonl(tmp_path / "data.jsonl", [{"id": "old", "conversations": turns()}])
    assert list(load_records(str(path), cache_dir=str(tmp_path / "cache"))["id"]) == ["old"]
    write_jsonl(path, [{"id": "new", "conversations": turns()}, {"id": "more", "conversations": turns()}])
    assert list(load_records(str(path), cache_dir=str(tmp_path / "cache"))["id"]) == ["new", "more"]


def test_a_changed_converter_is_not_served_the_old_cache(tmp_path, monkeypatch):
    import records
    path = write_jsonl(tmp_path / "data.jsonl", [{"id": "a", "conversations": turns()}])
    datasets.Dataset.from_list([{"id": "a", "conversations": turns()}]).to_parquet(str(tmp_path / "data.parquet"))
    sources = f"{path},{tmp_path / 'data.parquet'}"
    assert list(load_records(sources, cache_dir=str(tmp_path / "cache"))["id"]) == ["a", "a"]
    original = records._normalize_record

    def renamed(record, fallback_id):     # a fork's edit of the converter; the files stay unchanged
        return {**original(record, fallback_id), "id": "converted again"}
    monkeypatch.setattr(records, "_normalize_record", renamed)
    assert list(load_records(sources, cache_dir=str(tmp_path / "cache"))["id"]) == ["converted again"] * 2
    monkeypatch.undo()
    assert list(load_records(sources, cache_dir=str(tmp_path / "cache"))["id"]) == ["a", "a"]


def test_content_given_as_parts_is_joined_and_each_image_part_is_one_image(tmp_path):
    png = b"\x89PNG fake"
    record = {"id": "parts", "images": ["first.jpg"], "messages": [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Same as"},
                                     {"type": "image_url", "image_url": {"url": "second.png"}},
                                     {"type": "image_url", "image_url": {"url": "data:image/png;base64,"
                                                                         + base64.b64encode(png).decode()}},
                                     {"type": "text", "text": "?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "Yes."}]}]}
    bad = {"id": "bad", "messages": [{"role": "user", "content": [{"type": "audio"}]}]}
    rows = load_records(str(write_jsonl(tmp_path / "d.jsonl", [record, bad])), cache_dir=str(tmp_path / "cache"))
    assert rows[0]["conversations"] == [{"from": "user", "value": "<image>\nSame as\n<image>\n<image>\n?"},
                                        {"from": "assistant", "value": "Yes."}]
    assert [(i["path"], i["bytes"]) for i in rows[0]["images"]] == [("first.jpg", None), ("second.png", None),
                                                                    (None, png)]
    assert rows[0]["n_images"] == 3 and rows[0]["problem"] == ""
    assert rows[1]["problem"].startswith("malformed record: a content part needs type text or image")


def test_unusable_json_files_are_named_with_the_problem(tmp_path):
    """A file that is not a JSON array, or holds no record, fails naming the file (not a datasets error); a broken
    JSONL line is one malformed record, named <file>:<line>."""
    cases = {"broken.json": '[{"id": "a",', "empty.json": "[]", "blank.jsonl": "\n\n", "nothing.json": ""}
    for name, text in cases.items():
        (tmp_path / name).write_text(text)
    with pytest.raises(ValueError, match=r"broken.json: not a valid JSON array of records \(Expecting"):
        load_records(str(tmp_path / "broken.json"), cache_dir=str(tmp_path / "cache"))
    for name in ("empty.json", "blank.jsonl", "nothing.json"):
        with pytest.raises(ValueError, match=rf"{name}: holds no records"):
            load_records(str(tmp_path / name), cache_dir=str(tmp_path / "cache"))
    good = {"id": "a", "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]}
    (tmp_path / "torn.jsonl").write_text(json.dumps(good) + "\n\n" + '{"id": "b", "conv' + "\n")
    records = load_records(str(tmp_path / "torn.jsonl"), cache_dir=str(tmp_path / "cache"))
    assert records["id"] == ["a", "torn.jsonl:3"] and records["problem"][1].startswith("malformed record: invalid JSON")


def test_batch_mixes_text_only_single_and_multi_image_samples(tmp_path, llama3_tokenizer, pad_id):
    Image.new("RGB", (40, 30), RED).save(tmp_path / "a.png")
    Image.new("RGB", (30, 40), BLUE).save(tmp_path / "b.png")
    records = [
        {"id": "one", "image": "a.png", "conversations": turns("<image>\nColour?")},
        {"id": "text", "conversations": turns("A question with no picture at all, and a long one?", "Yes.")},
        {"id": "two", "image": ["a.png", "b.png"], "conversations": turns("<image> and <image>: same?", "No.")},
    ]
    dataset = dataset_for(tmp_path, records, llama3_tokenizer, HD)
    samples = [dataset[i] for i in range(3)]
    batch = collate(samples, pad_token_id=pad_id)
    assert batch["ids"] == ["one", "text", "two"] and batch["skipped"] == []
    assert batch["images"].shape == (3, 5, 3, 28, 28) and batch["images_aux"].shape == (3, 3, 128, 128)
    assert batch["image_counts"].tolist() == [1, 0, 2]
    assert (batch["input_ids"] == IMAGE_TOKEN_INDEX).sum(1).tolist() == [1, 0, 2]
    lengths = [len(s["input_ids"]) for s in samples]
    assert batch["attention_mask"].sum(1).tolist() == lengths
    for row, n in enumerate(lengths):   # right padding: pad ids and ignored labels after each sample
        assert torch.equal(batch["input_ids"][row, :n], samples[row]["input_ids"])
        assert (batch["input_ids"][row, n:] == pad_id).all() and (batch["labels"][row, n:] == IGNORE_INDEX).all()
    assert torch.equal(batch["images_aux"][1], samples[2]["images_aux"][0])   # sample order, then image order
    text_only = collate([samples[1]], pad_token_id=pad_id)
    assert text_only["images"] is None and text_only["images_aux"] is None and text_only["image_counts"].tolist() == [0]


def test_video_frames_are_sampled_uniformly_and_fed_as_images(tmp_path, llama3_tokenizer, pad_id):
    (tmp_path / "clip").mkdir()
    for k in range(1, 11):   # frame_1 ... frame_10: natural order, not "frame_10" after "frame_1"
        Image.new("RGB", (32, 24), (k * 20, k * 20, k * 20)).save(tmp_path / "clip" / f"frame_{k}.png")
    records = [{"id": "folder", "video": "clip", "conversations": turns("<video>\nWhat happens?", "It brightens.")},
               {"id": "list", "video": [f"clip/frame_{k}.png" for k in (2, 4, 6)],
                "conversations": turns("<video> What happens?", "It brightens.")}]
    dataset = dataset_for(tmp_path, records, llama3_tokenizer, num_frames=4)
    folder, listed = dataset[0], dataset[1]
    assert folder["images"].shape == (4, 1, 3, 28, 28) and listed["images"].shape == (3, 1, 3, 28, 28)
    greys = [round(float(hr[0, 32, 32] * 0.26862954 + 0.48145466) * 255) for hr in folder["images_aux"]]
    assert greys == [20, 80, 140, 200]   # frames 1, 4, 7, 10
    assert (folder["input_ids"] == IMAGE_TOKEN_INDEX).sum() == 4
    assert collate([folder, listed], pad_id)["image_counts"].tolist() == [4, 3]
    assert list(dataset.lengths()) == [3 + 2 + 4 * 4, 3 + 2 + 4 * 4]   # a video counts num_frames images


# ---- bad records --------------------------------------------------------------------------------------------------

def bad_records(tmp_path: Path) -> tuple[list, dict]:
    """Two good records and one of every bad kind; returns (JSONL lines, {bad id: expected reason kind})."""
    Image.new("RGB", (40, 30), RED).save(tmp_path / "good.png")
    jpeg = io.BytesIO()
    Image.effect_noise((200, 200), 64).convert("RGB").save(jpeg, "JPEG")
    (tmp_path / "truncated.jpg").write_bytes(jpeg.getvalue()[: len(jpeg.getvalue()) // 2])
    (tmp_path / "corrupt.jpg").write_bytes(b"\xff\xd8 this is not really a jpeg" * 10)
    Image.new("1", (3000, 3000)).save(tmp_path / "bomb.png")   # tiny file, 9M pixels (the test limit is 1M)
    image_q = "<image>\nColour?"
    lines = [
        {"id": "good-image", "image": "good.png", "conversations": turns(image_q)},
        {"id": "good-text", "conversations": turns()},
        {"id": "missing", "image": "nope.png", "conversations": turns(image_q)},
        {"id": "truncated", "image": "truncated.jpg", "conversations": turns(image_q)},
        {"id": "corrupt", "image": "corrupt.jpg", "conversations": turns(image_q)},
        {"id": "bomb", "image": "bomb.png", "conversations": turns(image_q)},
        {"id": "tags", "image": ["good.png"], "conversations": turns("<image> <image> Colours?")},
        {"id": "role", "conversations": [{"from": "bot", "value": "Hi"}, {"from": "gpt", "value": "Red."}]},
        {"id": "order", "conversations": [{"from": "human", "value": "Hi"}, {"from": "human", "value": "Red."}]},
        {"id": "empty", "conversations": turns("Colour?", " ")},
        {"id": "long", "image": "good.png", "conversations": turns("<image>\n" + "very " * 300 + "long?")},
        {"id": "noconv", "image": "good.png"},
        '{"id": "broken", "conversations": [',
    ]
    expected = {"missing": "image not found", "truncated": "image unreadable", "corrupt": "image unreadable",
                "bomb": "image too large", "tags": "image/tag mismatch", "role": "unknown role",
                "order": "roles out of order", "empty": "empty reply", "long": "too long",
                "noconv": "malformed record", "data.jsonl:13": "malformed record"}
    return lines, expected


def test_check_reports_every_bad_record_by_id_and_reason(tmp_path, llama3_tokenizer):
    lines, expected = bad_records(tmp_path)
    out = io.StringIO()
    code = check(str(write_jsonl(tmp_path / "data.jsonl", lines)), llama3_tokenizer, "llama_3",
                 image_folder=str(tmp_path), max_length=128, tokens_per_image=4, max_image_pixels=1_000_000,
                 num_workers=0, cache_dir=str(tmp_path / "cache"), out=out)
    report = out.getvalue().splitlines()
    assert code == 1
    problems = {line.split(": ", 1)[0]: line.split(": ", 1)[1] for line in report if not line.startswith(
        ("records:", "images:", "tokens", "bad:"))}
    assert {k: v.split(":")[0] for k, v in problems.items()} == expected
    assert "records: 13  usable: 2  bad: 11" in report and "images: 1" in report
    assert "bad: image unreadable: 2" in report


def test_check_counts_each_anyres_image_by_its_size(tmp_path, llama3_tokenizer):
    """With an AnyRes model's settings, `data.py check` counts every image as training does (base view + its own
    unpadded grid + newlines), not as a fixed tokens_per_image."""
    from images import anyres_tokens, parse_pinpoints
    sizes = [(60, 80), (150, 50), (42, 42)]                       # (h, w): grids 2x2, 3x1, 1x2 of 42 px tiles
    for i, (h, w) in enumerate(sizes):
        Image.new("RGB", (w, h), (200, 40, 40)).save(tmp_path / f"{i}.png")
    data = write_jsonl(tmp_path / "data.jsonl", [
        {"id": str(i), "image": f"{i}.png", "conversations": [{"from": "human", "value": "<image>\nwhat ?"},
                                                               {"from": "gpt", "value": "red"}]}
        for i in range(len(sizes))])
    anyres = dict(image_size=42, image_grid_pinpoints=parse_pinpoints("default", 42), patch_size=14,
                  anyres_max_tiles=0)

    def token_lengths(**kw) -> list[int]:
        out = io.StringIO()
        assert check(str(data), llama3_tokenizer, "llama_3", image_folder=str(tmp_path), max_length=512,
                     tokens_per_image=1, num_workers=0, cache_dir=str(tmp_path / "cache"), out=out, **kw) == 0
        line = next(line for line in out.getvalue().splitlines() if line.startswith("tokens"))
        return [int(n) for n in re.findall(r"(?:p50|p90|p99|max) (\d+)", line)]
    text = token_lengths()[-1] - 1                                # every record: the same text + one image position
    per_image = sorted(anyres_tokens(size, anyres["image_grid_pinpoints"], 42, 3) for size in sizes)
    assert len(set(per_image)) == 3
    p50, _, _, longest = token_lengths(anyres=anyres)
    assert (p50, longest) == (text + per_image[1], text + per_image[-1])


def test_bad_samples_are_skipped_and_counted_or_stop_the_run(tmp_path, llama3_tokenizer, pad_id):
    lines, expected = bad_records(tmp_path)
    dataset = dataset_for(tmp_path, lines, llama3_tokenizer, max_length=128, max_image_pixels=1_000_000)
    loader = torch.utils.data.DataLoader(dataset, batch_size=4, num_workers=2,
                                         collate_fn=functools.partial(collate, pad_token_id=pad_id))
    by_kind, seen = Counter(), []
    for batch in loader:   # workers are other processes: the skips travel inside the batch
        by_kind.update(reason_kind(reason) for _, reason in batch["skipped"])
        seen += batch["ids"]
    assert seen == ["good-image", "good-text"]
    assert sum(by_kind.values()) == len(expected) and by_kind["image unreadable"] == 2
    dataset.args.bad_sample = "error"   # every bad record stops the run, naming the record and the problem
    for i, record_id in enumerate(dataset.records["id"]):
        if record_id in expected:
            with pytest.raises(BadSample, match=f"^record {re.escape(record_id)}: {expected[record_id]}: "):
                dataset[i]
    assert dataset[0]["id"] == "good-image"


def test_check_cli_on_a_few_thousand_records(tmp_path, llama3_tokenizer):
    from conftest import llama3_tokenizer_path
    data = make_llava_jsonl(tmp_path / "big.jsonl", 3000, tmp_path / "images")
    result = subprocess.run(
        [sys.executable, str(REPO / "data.py"), "check", str(data), "--image_folder", str(tmp_path / "images"),
         "--tokenizer", str(llama3_tokenizer_path()), "--template", "llama_3", "--cache_dir", str(tmp_path / "c")],
        capture_output=True, text=True, cwd=REPO, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "check: 100%" in result.stderr and "3000/3000" in result.stderr   # the tqdm bar
    assert "records: 3000  usable: 3000  bad: 0" in result.stdout and "images: 2000" in result.stdout
    assert "tokens (images expanded): p50" in result.stdout


# ---- sampler ------------------------------------------------------------------------------------------------------

def sampler_inputs(n=203, seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(5, 500, n), rng.random(n) < 0.6   # lengths, is_multimodal


def rank_batches(world, epoch=0, batch_size=4, **kw):
    lengths, mm = sampler_inputs()
    out = []
    for rank in range(world):
        sampler = GroupedBatchSampler(lengths, mm, batch_size, num_replicas=world, rank=rank, seed=7, **kw)
        sampler.set_epoch(epoch)
        out.append(list(sampler))
    return out


def test_sampler_ranks_get_different_samples_and_cover_the_dataset():
    per_rank = rank_batches(world=3)
    assert len({len(batches) for batches in per_rank}) == 1   # same number of steps on every rank
    flat = [i for batches in per_rank for batch in batches for i in batch]
    assert set(flat) == set(range(203))
    assert len(flat) - 203 < 3 * 2   # only the last step of each modality is topped up (< world each)
    for step in zip(*per_rank):      # within a step the ranks' batches are disjoint
        assert len(set(step[0]) | set(step[1]) | set(step[2])) == sum(map(len, step))
    assert sum(len(step[0]) == 4 for step in zip(*per_rank)) == len(per_rank[0]) - 2   # all full but 2 last steps


def test_sampler_groups_by_modality_and_length():
    lengths, mm = sampler_inputs()
    (batches,) = rank_batches(world=1)
    assert all(len(set(mm[b])) == 1 for b in batches)   # never mixes image and text-only samples
    (random_batches,) = rank_batches(world=1, group_by_modality_length=False)

    def spread(bs):
        return sum(np.ptp(lengths[b]) for b in bs)
    assert spread(batches) < spread(random_batches) / 5   # similar lengths share a batch


def test_sampler_reshuffles_every_epoch_by_seed_and_resumes_mid_epoch():
    lengths, mm = sampler_inputs()
    sampler = GroupedBatchSampler(lengths, mm, 4, num_replicas=2, rank=1, seed=7)
    assert rank_batches(world=2, epoch=3)[1] == rank_batches(world=2, epoch=3)[1]   # deterministic
    assert rank_batches(world=2, epoch=3)[1] != rank_batches(world=2, epoch=4)[1]   # reshuffled
    sampler.set_epoch(3)
    full = list(sampler)
    assert len(full) == len(sampler) == sampler.batches_per_epoch
    resumed = GroupedBatchSampler(lengths, mm, 4, num_replicas=2, rank=1, seed=7)
    resumed.set_epoch(3, start_batch=10)
    assert len(resumed) == len(full) - 10 and list(resumed) == full[10:]


# ---- packing ------------------------------------------------------------------------------------------------------

def test_packing_measures_exact_lengths_once_without_opening_images(tmp_path, llama3_tokenizer):
    lines, expected = bad_records(tmp_path)
    dataset = dataset_for(tmp_path, lines, llama3_tokenizer, max_length=128, packing=True)
    lengths = dataset.lengths()
    for i, record_id in enumerate(dataset.records["id"]):
        s = dataset[i]
        if "skipped" not in s:      # what the model computes: input ids, each image widened to tokens_per_image (4)
            assert lengths[i] == len(s["input_ids"]) + 3 * len(s["images"] if s["images"] is not None else [])
        elif expected[record_id] in ("image not found", "image unreadable", "image too large"):
            assert lengths[i] > 0   # images are not opened: the record still needs its room; dropped at collate
        else:
            assert lengths[i] == 0  # rejected by tokenization: takes no room
    arrow_files = set((tmp_path / "cache").rglob("*.arrow"))
    again = build_dataset(dataset.args, llama3_tokenizer, SMALL, tokens_per_image=4)   # read from the cache
    assert set((tmp_path / "cache").rglob("*.arrow")) == arrow_files and np.array_equal(again.lengths(), lengths)


def test_packed_loader_yields_every_sample_once_in_rows_within_max_length(tmp_path, llama3_tokenizer, pad_id):
    path = make_llava_jsonl(tmp_path / "data.jsonl", 60, tmp_path / "images")
    args = DataArguments(str(path), image_folder=str(tmp_path / "images"), template="llama_3", max_length=80,
                         cache_dir=str(tmp_path / "cache"), packing=True)
    dataset = build_dataset(args, llama3_tokenizer, SMALL, tokens_per_image=4)
    sampler = build_sampler(dataset, args, 3, seed=0)
    assert isinstance(sampler, PackedBatchSampler)
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler, num_workers=2,
                                         collate_fn=functools.partial(collate, pad_token_id=pad_id))
    seen, rows, used = [], 0, 0
    for batch in loader:
        seen += batch["ids"]
        positions = batch["attention_mask"].sum(1) + 3 * batch["image_counts"]   # after the splice
        assert (positions <= 80).all()
        starts = ((batch["position_ids"] == 0) & (batch["attention_mask"] == 1)).sum()
        assert starts == len(batch["ids"]) and batch["images"].shape[0] == batch["image_counts"].sum()
        rows, used = rows + len(batch["input_ids"]), used + int(positions.sum())
    assert sorted(seen) == sorted(dataset.records["id"])
    assert used / (80 * rows) > 0.8, (used, rows)                                 # rows are nearly full


def test_a_micro_batch_whose_samples_were_all_skipped_is_one_padding_row(pad_id):
    """Every rank must still run forward/backward (DDP, FSDP collectives): the batch is one row, nothing supervised."""
    batch = collate([{"id": "a", "skipped": "image not found: a.png"}], pad_token_id=pad_id)
    assert batch["input_ids"].tolist() == [[pad_id]] and batch["labels"].tolist() == [[IGNORE_INDEX]]
    assert batch["ids"] == [] and batch["skipped"] == [("a", "image not found: a.png")]
    assert batch["images"] is None and batch["image_counts"].tolist() == [0]
    packed = collate([[{"id": "b", "skipped": "too long: ..."}]], pad_token_id=pad_id)
    assert packed["input_ids"].tolist() == [[pad_id]] and packed["position_ids"].tolist() == [[0]]
