"""AnyRes (LLaVA-NeXT) end to end: a tiny random transformers LlavaNext converted to our export computes
transformers' logits; our export goes back to a LlavaNext directory; the data pipeline counts each image's true
tokens (label masks, packing, truncation); Mini-Gemini's mining runs on AnyRes tiles."""
import functools
import json

import pytest
import torch
from PIL import Image

import step
from convert import from_llava_next, to_llava_next
from data import IGNORE_INDEX, IMAGE_TOKEN_INDEX, DataArguments, build_dataset, build_sampler, collate
from images import anyres_grid, anyres_tokens
from model import MiniGemini
from tests.tiny_models import save_tiny_tokenizer

SIDE = 42                                                           # CLIP 42 px, patch 14: 3x3 patches per tile
PINPOINTS = [[SIDE * r, SIDE * c] for r, c in ((1, 2), (2, 1), (2, 2), (3, 1), (1, 3))]
# (h, w) -> the grid transformers chooses: wide, tall, square, two extreme, smaller than a tile
SIZES = {(30, 60): (1, 2), (60, 30): (2, 1), (80, 80): (2, 2), (100, 40): (3, 1), (40, 100): (1, 3),
         (20, 20): (1, 2), (57, 131): (1, 3), (45, 47): (2, 2)}


def save_tiny_llava_next(path):
    """A random LlavaNextForConditionalGeneration + LlavaNextProcessor, saved as the hub's llava-v1.6 are."""
    from transformers import (AutoTokenizer, CLIPVisionConfig, LlamaConfig, LlavaNextConfig,
                              LlavaNextForConditionalGeneration, LlavaNextImageProcessor, LlavaNextProcessor)
    from images import CLIP_MEAN, CLIP_STD
    save_tiny_tokenizer(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.add_tokens(["<image>"], special_tokens=True)
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    text = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                       pad_token_id=tokenizer.pad_token_id, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    vision = CLIPVisionConfig(hidden_size=24, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2,
                              image_size=SIDE, patch_size=14, projection_dim=24)
    config = LlavaNextConfig(vision_config=vision, text_config=text, image_grid_pinpoints=PINPOINTS,
                             image_token_index=image_id, vision_feature_layer=-2,
                             vision_feature_select_strategy="default", image_seq_length=9)
    torch.manual_seed(0)
    model = LlavaNextForConditionalGeneration(config).eval()
    with torch.no_grad():      # transformers initialises image_newline at random already; make it clearly nonzero
        model.model.image_newline.copy_(torch.randn(32))
    model.save_pretrained(path)
    images = LlavaNextImageProcessor(image_grid_pinpoints=PINPOINTS, size={"shortest_edge": SIDE},
                                     crop_size={"height": SIDE, "width": SIDE}, image_mean=CLIP_MEAN,
                                     image_std=CLIP_STD)
    LlavaNextProcessor(image_processor=images, tokenizer=tokenizer, patch_size=14,
                       vision_feature_select_strategy="default", num_additional_image_tokens=1).save_pretrained(path)
    return path


def image(h, w, seed=0):
    g = torch.Generator().manual_seed(seed)
    return Image.fromarray(torch.randint(0, 256, (h, w, 3), generator=g, dtype=torch.uint8).numpy())


@pytest.fixture(scope="module")
def llava_next(tmp_path_factory):
    return save_tiny_llava_next(tmp_path_factory.mktemp("llava_next"))


@pytest.fixture(scope="module")
def converted(llava_next, tmp_path_factory):
    out = tmp_path_factory.mktemp("ours") / "export"
    summary = from_llava_next(llava_next, out)
    assert summary["image_grid_pinpoints"] == "default"
    return out


def hf_and_our_batch(processor, texts, images_per_text, image_id):
    """transformers' processor inputs, and ours from them: each run of image tokens one placeholder, the same
    pixel_values (without the batch padding of views) and image_sizes."""
    flat = [im for ims in images_per_text for im in ims]
    inputs = processor(text=texts, images=flat, return_tensors="pt", padding=True)
    counts = iter([anyres_tokens(tuple(size.tolist()), PINPOINTS, SIDE, 3) for size in inputs["image_sizes"]])
    rows = []
    for ids, mask in zip(inputs["input_ids"], inputs["attention_mask"]):
        ids, row, j = ids[mask.bool()].tolist(), [], 0
        while j < len(ids):          # each image's run of tokens (runs of adjacent images touch) -> one placeholder
            if ids[j] == image_id:
                n = next(counts)
                assert ids[j:j + n] == [image_id] * n
                row.append(IMAGE_TOKEN_INDEX)
                j += n
            else:
                row.append(ids[j])
                j += 1
        rows.append(row)
    width = max(map(len, rows))
    input_ids = torch.full((len(rows), width), processor.tokenizer.pad_token_id)
    attention = torch.zeros(len(rows), width, dtype=torch.long)
    for i, row in enumerate(rows):
        input_ids[i, :len(row)], attention[i, :len(row)] = torch.tensor(row), 1
    sizes = inputs["image_sizes"]
    views = [1 + r * c for r, c in (anyres_grid(tuple(s.tolist()), PINPOINTS, SIDE) for s in sizes)]
    images = torch.cat([pv[:v] for pv, v in zip(inputs["pixel_values"], views)])
    return inputs, dict(input_ids=input_ids, attention_mask=attention, images=images, image_sizes=sizes,
                        image_counts=torch.tensor([len(ims) for ims in images_per_text]))


def real_logits(logits, mask):
    return [row[m.bool()] for row, m in zip(logits, mask)]


def test_converted_llava_next_gives_transformers_logits_on_mixed_aspect_ratios(llava_next, converted):
    from transformers import LlavaNextForConditionalGeneration, LlavaNextProcessor
    hf = LlavaNextForConditionalGeneration.from_pretrained(llava_next).eval()
    processor = LlavaNextProcessor.from_pretrained(llava_next)
    ours = MiniGemini.from_pretrained(converted)
    assert torch.equal(ours.image_newline, hf.model.image_newline)
    sizes = list(SIZES)
    texts = ["what color is <image> the shape ?", "<image> <image> describe the image", "this image <image> ?",
             "<image> is it red <image> or blue <image> ? answer one word"]
    counts = [1, 2, 1, 3]
    images, k = [], 0
    for n in counts:
        images.append([image(*sizes[(k + j) % len(sizes)], seed=k + j) for j in range(n)])
        k += n
    assert {anyres_grid(s, PINPOINTS, SIDE) for s in sizes} == {(1, 2), (2, 1), (2, 2), (3, 1), (1, 3)}
    assert all(anyres_grid(s, PINPOINTS, SIDE) == grid for s, grid in SIZES.items())
    inputs, batch = hf_and_our_batch(processor, texts, images, hf.config.image_token_id)
    with torch.no_grad():
        theirs = hf(**inputs).logits
        mine = ours(**batch).logits
    spliced = ours.prepare_inputs(batch["input_ids"], batch["attention_mask"], None, batch["images"], None,
                                  batch["image_counts"], image_sizes=batch["image_sizes"])["attention_mask"]
    diffs = []
    for t, m in zip(real_logits(theirs, inputs["attention_mask"]), real_logits(mine, spliced)):
        assert t.shape == m.shape                                   # the same token count for every image
        diffs.append(float((t - m).abs().max()))
        torch.testing.assert_close(m, t, atol=1e-4, rtol=1e-4)
    print(f"largest logits difference against transformers: {max(diffs):.2e}")


def test_our_preprocessing_gives_the_processors_pixel_values_and_token_counts(llava_next, converted):
    from transformers import LlavaNextProcessor

    from eval import load_for_inference
    processor = LlavaNextProcessor.from_pretrained(llava_next)
    model, _, ours, _ = load_for_inference(str(converted), device="cpu")
    image_id = processor.tokenizer.convert_tokens_to_ids("<image>")
    for (h, w), grid in SIZES.items():
        im = image(h, w, seed=h)
        theirs = processor(text="<image>", images=[im], return_tensors="pt")
        views, _, size = ours.process(im)
        assert size == (h, w) and views.shape[0] == 1 + grid[0] * grid[1]
        assert (views - theirs["pixel_values"][0]).abs().max() < 1e-5
        assert ours.tokens((h, w)) == int((theirs["input_ids"] == image_id).sum())


def test_to_llava_next_round_trips(llava_next, converted, tmp_path):
    from transformers import LlavaNextForConditionalGeneration, LlavaNextProcessor
    to_llava_next(converted, tmp_path / "back")
    hf = LlavaNextForConditionalGeneration.from_pretrained(llava_next).eval()
    back = LlavaNextForConditionalGeneration.from_pretrained(tmp_path / "back").eval()
    processor = LlavaNextProcessor.from_pretrained(tmp_path / "back")
    assert processor.image_processor.image_grid_pinpoints == PINPOINTS
    images = [image(60, 30, 1), image(40, 100, 2)]
    inputs = processor(text=["<image> what color", "this <image> ?"], images=images, return_tensors="pt",
                       padding=True)
    with torch.no_grad():
        again = back(**inputs).logits
        first = hf(**{**inputs, "input_ids": inputs["input_ids"].masked_fill(
            inputs["input_ids"] == back.config.image_token_id, hf.config.image_token_id)}).logits
    mask = inputs["attention_mask"].bool()
    torch.testing.assert_close(again[mask][:, :first.shape[-1]], first[mask], atol=1e-5, rtol=1e-5)


# ---- the data pipeline: each image's true count --------------------------------------------------------------------
@pytest.fixture(scope="module")
def anyres_data(tmp_path_factory, converted):
    folder = tmp_path_factory.mktemp("anyres_data")
    for j, (h, w) in enumerate(SIZES):
        image(h, w, seed=j).save(folder / f"{j}.png")
    records = []
    for i in range(24):
        n = i % 3
        names = [f"{(i + j) % len(SIZES)}.png" for j in range(n)]
        q = " ".join(["<image>"] * n) + " what color is the shape " + "? " * (i % 5)
        record = {"id": f"r{i}", "conversations": [{"from": "human", "value": q},
                                                   {"from": "gpt", "value": "red " * (1 + i % 4)}]}
        if names:
            record["image"] = names
        records.append(record)
    (folder / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return folder


def anyres_dataset(folder, converted, **overrides):
    from transformers import AutoTokenizer
    model = MiniGemini.from_pretrained(converted)
    tokenizer = AutoTokenizer.from_pretrained(converted)
    args = DataArguments(str(folder / "data.jsonl"), image_folder=str(folder), template="vicuna_v1",
                         image_aspect_ratio="anyres", cache_dir=str(folder / "cache"),
                         **{"max_length": 1024, **overrides})
    return model, tokenizer, build_dataset(args, tokenizer, model.image_settings(), model.tokens_per_image)


@pytest.mark.parametrize("packing", [False, True])
def test_masks_and_lengths_use_each_images_true_count(anyres_data, converted, packing):
    model, tokenizer, dataset = anyres_dataset(anyres_data, converted, packing=packing)
    lengths = dataset.lengths()
    samples = [dataset[i] for i in range(len(dataset))]
    for s, length in zip(samples, lengths):
        sizes = s.get("image_sizes")
        tokens = [] if sizes is None else [dataset.processor.tokens(tuple(size)) for size in sizes.tolist()]
        assert length == len(s["input_ids"]) + sum(tokens) - len(tokens)           # measured = what the model splices
    sampler = build_sampler(dataset, dataset.args, 3, seed=0)
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler,
                                         collate_fn=functools.partial(collate, pad_token_id=tokenizer.pad_token_id))
    model.train()
    for batch in loader:
        inputs = model.prepare_inputs(batch["input_ids"], batch["attention_mask"], batch["labels"], batch["images"],
                                      None, batch["image_counts"], position_ids=batch.get("position_ids"),
                                      image_sizes=batch.get("image_sizes"))
        labels = inputs["labels"]
        # the supervised tokens are exactly the collated ones, in order; image positions are never supervised
        assert torch.equal(labels[labels != IGNORE_INDEX], batch["labels"][batch["labels"] != IGNORE_INDEX])
        per_image = [dataset.processor.tokens(tuple(s)) for s in batch.get("image_sizes", torch.zeros(0, 2)).tolist()]
        real = int(batch["attention_mask"].sum()) + sum(per_image) - len(per_image)
        assert int((inputs["inputs_embeds"].abs().sum(-1) != 0).sum()) == real
        if packing:
            assert inputs["position_ids"].shape[1] <= dataset.args.max_length
        # train.py's tokens/s and MFU count the same positions (step.image_load, step.sample_lengths)
        counts, views = step.image_load(model, batch)
        assert counts.tolist() == per_image and views == (0 if batch["images"] is None else batch["images"].shape[0])
        lengths_here = step.sample_lengths(batch, counts)
        assert int(lengths_here.sum()) == real
        assert sorted(lengths_here[lengths_here > 0].tolist()) == \
            sorted(int(lengths[dataset.records["id"].index(i)]) for i in batch["ids"])
        out = model(**{k: v for k, v in batch.items() if k not in ("ids", "skipped")})
        assert torch.isfinite(out.loss)


def test_truncation_never_cuts_an_anyres_image(anyres_data, converted):
    _, _, dataset = anyres_dataset(anyres_data, converted, max_length=60, bad_sample="skip")
    kept = [dataset[i] for i in range(len(dataset))]
    assert any("skipped" in s and "an image would be cut" in s["skipped"] for s in kept)
    assert all("skipped" in s or s["images"] is None or
               len(s["input_ids"]) + sum(dataset.processor.tokens(tuple(x)) - 1 for x in s["image_sizes"].tolist())
               <= 60 for s in kept)


def test_a_converted_llava_next_is_a_start_for_train_py(anyres_data, converted, tmp_path):
    """init_from a from-llava-next export: its AnyRes settings, template and image mode come with it (the recipe
    names none of them); LoRA trains on top and the run exports an AnyRes model that loads."""
    from tests.test_train import metrics, run_in_process, write_recipe
    recipe = write_recipe(tmp_path / "r.yaml", dict(
        init_from=str(converted), dtype="float32", data_path=str(anyres_data / "data.jsonl"),
        image_folder=str(anyres_data), cache_dir=str(tmp_path / "cache"), max_length=1024, stage="finetune",
        tune="lora", lora_r=4, lora_alpha=8, lora_dropout=0.0, learning_rate=1e-3, max_steps=2,
        per_device_batch_size=2, num_workers=0, report_to="none", output_dir=str(tmp_path / "run")))
    export = run_in_process([str(recipe)])
    assert len(metrics(tmp_path / "run")) == 2
    loaded = MiniGemini.from_pretrained(export)
    assert loaded.pinpoints == MiniGemini.from_pretrained(converted).pinpoints and loaded.pinpoints


# ---- preference pairs on AnyRes images (stage dpo) -----------------------------------------------------------------
@pytest.fixture(scope="module")
def anyres_pairs(anyres_data):
    """Pairs over the AnyRes images of anyres_data (0, 1 or 2 of them, every grid), rejected = a wrong colour."""
    records = []
    for i in range(8):
        names = [f"{(i + j) % len(SIZES)}.png" for j in range(i % 3)]
        question = "<image> " * len(names) + "what color ?"
        record = {"id": f"p{i}", "conversations": [{"from": "human", "value": question}],
                  "chosen": "red " * (1 + i % 2), "rejected": "blue and green " * (1 + i % 3)}
        if names:
            record["image"] = names
        records.append(record)
    path = anyres_data / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_anyres_pairs_give_the_log_probs_of_whole_rows(anyres_data, anyres_pairs, converted):
    """A pair batch holds each pair's AnyRes images once (views back to back, image_sizes); the dpo model's
    log-probs (prompt shared, images encoded once) equal the plain model's on the 2B whole rows, each row with its
    own copy of its images."""
    import dpo
    from data import collate_pairs
    model, tokenizer, _ = anyres_dataset(anyres_data, converted)
    args = DataArguments(str(anyres_pairs), image_folder=str(anyres_data), template="vicuna_v1",
                         image_aspect_ratio="anyres", cache_dir=str(anyres_data / "cache_pairs"), max_length=1024)
    dataset = build_dataset(args, tokenizer, model.image_settings(), model.tokens_per_image, pairs=True)
    batch = collate_pairs([dataset[i] for i in range(len(dataset))], tokenizer.pad_token_id)
    assert batch["image_sizes"].tolist() == [list(list(SIZES)[(i + j) % len(SIZES)]) for i in range(8)
                                             for j in range(i % 3)]
    with torch.no_grad():
        ours = dpo.PreferenceModel(model, reference="copy")(**batch).logps
        twice = {"images": torch.cat([batch["images"]] * 2), "image_sizes": torch.cat([batch["image_sizes"]] * 2)}
        inputs = model.prepare_inputs(batch["input_ids"], batch["attention_mask"], batch["labels"],
                                      image_counts=batch["image_counts"], **twice)
        labels = inputs.pop("labels")
        whole, _ = dpo.completion_logps(model.llm(**inputs).logits, labels)
    torch.testing.assert_close(ours, whole, rtol=1e-5, atol=1e-5)
    positions = step.image_load(model, batch)[0]
    assert len(positions) == int(batch["image_counts"].sum()) == 2 * len(batch["image_sizes"])
    rows = step.sample_lengths(batch, positions)                      # each row's length, its images expanded
    assert dataset.lengths().tolist() == torch.maximum(rows[:8], rows[8:]).tolist()   # a pair: its longer row


def test_stage_dpo_from_a_converted_llava_next_on_anyres_pairs(anyres_data, anyres_pairs, converted, tmp_path,
                                                                capsys):
    """train.py stage dpo, init_from the converted LLaVA-NeXT (AnyRes comes with it), LoRA with the disabled adapter
    as reference: the first loss is log 2, the run exports, merged it goes back to transformers' LlavaNext
    (recipes/llava_next_7b_dpo_lora.yaml's way); --plan traces the same step."""
    from transformers import LlavaNextForConditionalGeneration

    from model import merge_lora_export
    from tests.test_train import metrics, run_in_process, write_recipe
    recipe = write_recipe(tmp_path / "r.yaml", dict(
        init_from=str(converted), dtype="float32", data_path=str(anyres_pairs), image_folder=str(anyres_data),
        cache_dir=str(tmp_path / "cache"), max_length=1024, stage="dpo", tune="lora", lora_r=4, lora_alpha=8,
        lora_dropout=0.0, learning_rate=1e-3, max_steps=2, per_device_batch_size=2, num_workers=0,
        report_to="none", output_dir=str(tmp_path / "run")))
    export = run_in_process([str(recipe)])
    logged = metrics(tmp_path / "run")
    assert len(logged) == 2 and abs(logged[0]["loss"] - 0.6931472) < 1e-5
    merge_lora_export(export, tmp_path / "merged")
    to_llava_next(tmp_path / "merged", tmp_path / "hf")
    assert LlavaNextForConditionalGeneration.from_pretrained(tmp_path / "hf").config.image_grid_pinpoints == PINPOINTS
    capsys.readouterr()
    run_in_process([str(recipe), "--plan", "--device_memory_gb", "24", "--output_dir", str(tmp_path / "plan")])
    assert "verdict: fits" in capsys.readouterr().out


# ---- Mini-Gemini on AnyRes: the HR canvas at the grid's aspect, mined tile by tile ---------------------------------
def test_mgm_anyres_trains_with_both_towers_and_exports(tmp_path, root, tok):
    """CLIP 28 px (2x2 patches per tile) + a timm ConvNeXt at 32 px per tile (8x8 map per tile: 4x4 windows)."""
    from model import set_stage, trainable_table
    from tests.tiny_models import build
    model = build(root, tok, hr="timm", image_size_aux=32, image_grid_pinpoints="default")
    assert model.pinpoints == [(28, 56), (56, 28), (56, 56), (84, 28), (28, 84)]
    assert model.tokens_per_image == 4 + 4 * 5                           # the worst grid, 2x2: 4 + 4 * (4 + 1)
    folder = tmp_path / "images"
    folder.mkdir()
    sizes = [(30, 60), (60, 30), (80, 80), (100, 40), (40, 100), (20, 20)]
    for j, (h, w) in enumerate(sizes):
        image(h, w, seed=j).save(folder / f"{j}.png")
    records = [{"id": f"r{i}", "image": [f"{i % 6}.png"] + ([f"{(i + 1) % 6}.png"] if i % 2 else []),
                "conversations": [{"from": "human", "value": "<image> " * (1 + i % 2) + "what color is it ?"},
                                  {"from": "gpt", "value": "red ."}]} for i in range(6)]
    (folder / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    args = DataArguments(str(folder / "data.jsonl"), image_folder=str(folder), template="vicuna_v1",
                         image_aspect_ratio="anyres", cache_dir=str(tmp_path / "cache"), max_length=256)
    dataset = build_dataset(args, tok, model.image_settings(), model.tokens_per_image)
    batch = collate([dataset[i] for i in range(6)], pad_token_id=tok.pad_token_id)
    grids = [anyres_grid(tuple(s), model.pinpoints, 28) for s in batch["image_sizes"].tolist()]
    assert len(batch["images"]) == sum(1 + r * c for r, c in grids)
    assert batch["images_aux"].shape == (sum(r * c for r, c in grids), 3, 32, 32)   # HR canvases as A x A tiles
    set_stage(model, "finetune", tune_vision_tower=True, tune_vision_tower_aux=True, print_fn=None)
    hidden = model.image_newline.numel()
    table = {row.split()[0]: row.split()[1:] for row in trainable_table(model).splitlines()[2:]}
    assert table["image_newline"] == [f"{hidden:,}", f"{hidden:,}"]       # the startup table lists what trains
    assert table["total"][0] == f"{sum(p.numel() for p in model.parameters() if p.requires_grad):,}"
    model.train()
    inputs = {k: v for k, v in batch.items() if k not in ("ids", "skipped")}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    losses = []
    for _ in range(4):
        loss = model(**inputs).loss
        loss.backward()
        for name in ("image_newline", "mining.key.1.weight", "projector.0.weight"):
            assert dict(model.named_parameters())[name].grad.abs().sum() > 0, name
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.vision_tower_aux.parameters())
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    model.eval()
    model.save_pretrained(tmp_path / "export", tok, weights="full")
    loaded = MiniGemini.from_pretrained(tmp_path / "export")
    with torch.no_grad():
        torch.testing.assert_close(loaded(**inputs).logits, model(**inputs).logits)
    model.stage = "pretrain"
    model.save_pretrained(tmp_path / "pretrain", tok)             # projector + mining + image_newline
    assert torch.equal(MiniGemini.from_pretrained(tmp_path / "pretrain").image_newline, model.image_newline)


def test_anyres_tiles_mine_as_mgm_hd_crops(root, tok):
    """An image exactly on the 2x2 grid (no padding): tile (i, j)'s tokens mine HR block (i, j) exactly as MGM-HD's
    crop (i, j) mines its quadrant, the same weights and pixels."""
    from tests.tiny_models import build
    from vision import mine_anyres
    anyres = build(root, tok, hr="timm", image_size_aux=32, image_grid_pinpoints="default")
    hd = build(root, tok, hr="timm", image_size_aux=64, image_grid=2, image_global=True)
    hd.load_state_dict(anyres.state_dict(), strict=False)
    hd.mining.load_state_dict(anyres.mining.state_dict())
    g = torch.Generator().manual_seed(0)
    canvas = torch.randn(3, 64, 64, generator=g)
    tiles = canvas.reshape(3, 2, 32, 2, 32).permute(1, 3, 0, 2, 4).reshape(4, 3, 32, 32)
    lr = torch.randn(5, 4, 32, generator=g)                           # [base, 4 tiles] x 2x2 patches x width 32
    with torch.no_grad():
        ours = mine_anyres(anyres.mining, anyres.vision_tower_aux, lr, tiles, [(2, 2)], [(56, 56)])
        theirs = hd.mining(lr, hd.vision_tower_aux.stage_maps(canvas[None]), grid=2, image_global=True)
    torch.testing.assert_close(ours[1:], theirs[1:])
    assert not torch.allclose(ours[0], lr[0])                         # the base view mines the whole image too


def test_plan_takes_the_pinpoint_with_the_most_tokens(root, tok):
    """--plan: every image of the worst-case batch has the size of the worst pinpoint (2x2: 4 + 4 * 5 tokens)."""
    import dataclasses

    import plan
    import settings
    from tests.tiny_models import save_tiny_checkpoints
    model_args = dataclasses.replace(save_tiny_checkpoints(root, tokenizer=tok), image_size_aux=32,
                                     image_grid_pinpoints="default")
    data_args = DataArguments(data_path="-", max_length=64, image_aspect_ratio="anyres")
    args = settings.TrainArguments(per_device_batch_size=2)
    settings.check_args(model_args, args, data_args)
    result = plan.plan(model_args, data_args, args, plan.Launch("single", 1, "no", plan.GiB))
    assert "24 positions each" in result.batch and result.peak.bytes > 0
    fake = plan.PlanFakeMode()
    built = plan.build_fake(model_args, args, fake)
    batch = plan.worst_case_batch(built, data_args, 2, fake)
    assert batch["image_sizes"].tolist() == [[56, 56], [56, 56]]
    assert batch["images"].shape[0] == 2 * 5 and batch["images_aux"].shape[0] == 2 * 4


def test_eval_answers_from_an_anyres_export_as_transformers_generates(llava_next, converted):
    """eval.py / chat.py's Answerer on the converted export: its greedy tokens are LlavaNext's generate() on the same
    prompt ids (the placeholder expanded to the image's tokens) and pixels."""
    from transformers import LlavaNextForConditionalGeneration, LlavaNextProcessor

    from eval import Answerer, load_for_inference
    hf = LlavaNextForConditionalGeneration.from_pretrained(llava_next).eval()
    processor = LlavaNextProcessor.from_pretrained(llava_next)
    model, tokenizer, image_processor, template = load_for_inference(str(converted), device="cpu")
    answerer = Answerer(model, tokenizer, image_processor, template)
    question, picture = "what color is the shape ?", image(57, 131, seed=3)
    prompt = answerer.prompt([{"role": "user", "content": question}], 1)
    n = image_processor.tokens((57, 131))
    at = int((prompt == IMAGE_TOKEN_INDEX).nonzero()[0])
    ids = torch.cat([prompt[:at], torch.full((n,), hf.config.image_token_id), prompt[at + 1:]])[None]
    pixels = processor.image_processor(picture, return_tensors="pt")
    with torch.no_grad():
        theirs = hf.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=5, do_sample=False,
                             min_new_tokens=5, **pixels)[0, ids.shape[1]:].tolist()
        kw = answerer.image_inputs([[picture]])
        ours = model.generate(prompt[None], max_new_tokens=5, do_sample=False, eos_token_id=[], **kw)[0].tolist()
    assert kw["image_sizes"].tolist() == [[57, 131]] and ours == theirs
    assert isinstance(answerer([question], [[picture]], max_new_tokens=3)[0], str)


def test_chat_counts_each_image_by_its_size(converted):
    """chat.py / web.py's length rule: a question's positions are those the model really takes, each AnyRes image
    by its own grid (a small image takes far fewer than the worst case, model.tokens_per_image)."""
    import chat
    from eval import Answerer, load_for_inference
    conversation = chat.Conversation(Answerer(*load_for_inference(str(converted), device="cpu")))
    model, image_positions = conversation.answerer.model, set()
    for h, w in [(57, 131), (20, 20), (100, 40)]:
        turn = chat.Turn("what color is the shape ?", [image(h, w, seed=h)])
        messages, images = conversation.messages([turn])
        ids = conversation.answerer.prompt(messages, len(images))[None]
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=torch.ones_like(ids),
                           **conversation.answerer.image_inputs([images])).logits
        assert conversation.length([turn]) == logits.shape[1]
        image_positions.add(logits.shape[1] - (ids.shape[1] - 1))
    assert len(image_positions) == 3 and min(image_positions) < model.tokens_per_image


def test_original_llava_v1_6_layout_converts_to_the_same_model(tmp_path, root, tok):
    """liuhaotian/llava-v1.6-*'s layout (a LLaVA checkpoint with image_aspect_ratio anyres, spatial_unpad and
    model.image_newline) -> the same AnyRes model."""
    from safetensors.torch import load_file, save_file

    from images import ImageProcessor
    from tests.test_convert import write_source
    from tests.tiny_models import build
    model = build(root, tok, hr=None, image_grid_pinpoints="default").eval()
    with torch.no_grad():
        model.image_newline.normal_()
    src = tmp_path / "llava-v1.6"
    write_source(model, tok, src, model_type="llava_llama", architecture="LlavaLlamaForCausalLM")
    tensors = load_file(src / "model.safetensors")
    save_file({**tensors, "model.image_newline": model.image_newline.detach().clone()}, src / "model.safetensors")
    config = json.loads((src / "config.json").read_text())
    config.update(image_aspect_ratio="anyres", mm_patch_merge_type="spatial_unpad",
                  image_grid_pinpoints=[list(p) for p in model.pinpoints])
    (src / "config.json").write_text(json.dumps(config))
    summary = from_llava_next(src, tmp_path / "export")
    assert summary["image_aspect_ratio"] == "anyres"
    loaded = MiniGemini.from_pretrained(tmp_path / "export")
    processor = ImageProcessor(**model.image_settings(), aspect_ratio="anyres")
    views, _, size = processor.process(image(40, 100, seed=1))
    ids = torch.tensor([[1, 5, IMAGE_TOKEN_INDEX, 6, 7]])
    batch = dict(input_ids=ids, images=views, image_sizes=torch.tensor([size]))
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, model(**batch).logits, rtol=0, atol=0)


def test_each_llava_direction_refuses_the_other_kind_of_export(converted, tiny_export, tmp_path):
    from cli import UserError
    from convert import to_llava_hf
    with pytest.raises(UserError, match="AnyRes export .*use to-llava-next"):
        to_llava_hf(converted, tmp_path / "a")
    with pytest.raises(UserError, match="not an AnyRes export .*use to-llava-hf"):
        to_llava_next(tiny_export, tmp_path / "b")
    with pytest.raises(UserError, match="neither a transformers LlavaNext directory"):
        from_llava_next(tiny_export, tmp_path / "c")
