"""convert.py: released MGM / LLaVA-1.5 checkpoints in, transformers' Llava out.

The sources are written here the way MGM's and LLaVA's training code writes them (an `MGM*ForCausalLM` /
`Llava*ForCausalLM` state dict: the LLM's keys, `model.mm_projector.*`, `model.vlm_uni_*_projector.*`, optionally the
towers as `model.vision_tower.vision_tower.*` / `model.vision_tower_aux.vision_{stem,stages}.*`; config.json = the
LLM's config + the mm_* fields; the stage-1 `mm_projector.bin` as MGM's substring match collects it), from a tiny
model of ours: converting back must give that model again, logits identical.
"""
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from cli import UserError
from convert import MODEL_ZOO, from_source, hub_id
from model import MiniGemini
from tests.tiny_models import build, tiny_batch

MGM_CLASSES = {"llama": ("mgm", "MGMLlamaForCausalLM"), "gemma": ("mgm_gemma", "MGMGemmaForCausalLM"),
               "mixtral": ("mgm_mixtral", "MGMMixtralForCausalLM")}
TO_SOURCE = {"projector.": "model.mm_projector.", "mining.query.": "model.vlm_uni_query_projector.",
             "mining.key.": "model.vlm_uni_aux_projector.", "mining.value.": "model.vlm_uni_val_projector.",
             "vision_tower.model.": "model.vision_tower.vision_tower.",
             "vision_tower_aux.stem.": "model.vision_tower_aux.vision_stem.",
             "vision_tower_aux.stages.": "model.vision_tower_aux.vision_stages."}


def source_key(ours: str) -> str:
    prefix = next(p for p in TO_SOURCE if ours.startswith(p))
    rest = ours[len(prefix):]
    if prefix == "vision_tower.model." and not rest.startswith("vision_model."):
        rest = "vision_model." + rest        # CLIP checkpoints keep this level; transformers 5's modules drop it
    return TO_SOURCE[prefix] + rest


def mm_config(model, *, model_type, architecture, aspect="pad") -> dict:
    """config.json as MGM / LLaVA write it: the LLM's config with their class and the mm_* fields."""
    c = model.config
    config = dict(model.llm.config.to_dict(), model_type=model_type, architectures=[architecture],
                  _name_or_path="model_zoo/LLM/vicuna/7B-V1.5", torch_dtype="float32",
                  mm_vision_tower=c.vision_tower, mm_projector_type=c.projector,
                  mm_hidden_size=model.vision_tower.hidden_size, mm_vision_select_layer=c.mm_vision_select_layer,
                  mm_vision_select_feature=c.mm_vision_select_feature, mm_use_im_start_end=c.mm_use_im_start_end,
                  mm_use_im_patch_token=False, use_mm_proj=True, tune_mm_mlp_adapter=False,
                  image_aspect_ratio=aspect, image_grid_pinpoints=None, tokenizer_padding_side="right")
    if model.vision_tower_aux is not None:
        config.update(mm_vision_tower_aux=c.vision_tower_aux, mm_hidden_size_aux=model.vision_tower_aux.channels,
                      image_size_aux=c.image_size_aux, image_grid=c.image_grid, image_global=c.image_global,
                      optimize_vision_tower=False, optimize_vision_tower_aux=False)
    return config


def write_source(model, tokenizer, path, *, model_type="mgm", architecture="MGMLlamaForCausalLM",
                 towers_inside=False, shards=1, pickle=False) -> dict:
    """Our model -> a full MGM / LLaVA checkpoint directory. Returns its tensors by source key."""
    path.mkdir(parents=True)
    model.llm.save_pretrained(path / "llm_tmp")                     # the LLM's keys in its checkpoint layout
    tensors = load_file(path / "llm_tmp" / "model.safetensors")
    shutil.rmtree(path / "llm_tmp")
    parts = ("projector.", "mining.") + (("vision_tower.", "vision_tower_aux.") if towers_inside else ())
    tensors.update({source_key(k): v.clone() for k, v in model.state_dict().items() if k.startswith(parts)})
    if towers_inside:   # the frozen CLIP position ids buffer older transformers saved, and a rotary buffer
        tensors["model.vision_tower.vision_tower.vision_model.embeddings.position_ids"] = torch.arange(5)[None]
        tensors["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(4)
    names = sorted(tensors)
    chunks = [names[i::shards] for i in range(shards)]
    suffix = "bin" if pickle else "safetensors"
    stem = "pytorch_model" if pickle else "model"
    files = [f"{stem}-{i + 1:05d}-of-{shards:05d}.{suffix}" if shards > 1 else f"{stem}.{suffix}"
             for i in range(shards)]
    for chunk, name in zip(chunks, files):
        part = {k: tensors[k].contiguous() for k in chunk}
        torch.save(part, path / name) if pickle else save_file(part, path / name)
    if shards > 1:
        index = {"metadata": {}, "weight_map": {k: name for chunk, name in zip(chunks, files) for k in chunk}}
        (path / f"{stem}.{suffix}.index.json").write_text(json.dumps(index))
    (path / "config.json").write_text(json.dumps(mm_config(model, model_type=model_type, architecture=architecture)))
    tokenizer.save_pretrained(path)
    return tensors


def logits(model, batch):
    with torch.no_grad():
        return model.eval()(**batch).logits


def assert_export_holds_the_source(export, tensors, batch, want):
    """Key by key: the LLM's tensors are in llm/ under the same names, the rest in our modules; logits identical."""
    llm = load_file(export / "llm" / "model.safetensors")
    loaded = MiniGemini.from_pretrained(export)
    ours = loaded.state_dict()
    for key, tensor in tensors.items():
        if key.endswith(("inv_freq", "position_ids")):
            continue
        got = llm[key] if key in llm else ours[next(o for o in ours if source_key_or_none(o) == key)]
        assert torch.equal(got, tensor), key
    torch.testing.assert_close(logits(loaded, batch), want, rtol=0, atol=0)
    out = loaded.generate(batch["input_ids"], batch["attention_mask"], batch["images"], batch["images_aux"],
                          max_new_tokens=3, eos_token_id=-1)
    assert out.shape == (3, 3)
    return loaded


def source_key_or_none(ours):
    return source_key(ours) if ours.startswith(tuple(TO_SOURCE)) else None


# ---- from-mgm: full checkpoints ------------------------------------------------------------------------------------
@pytest.mark.parametrize("family,hr,hd,towers_inside,layout", [
    ("llama", "openclip", False, False, dict(shards=2)),   # MGM's OpenCLIP ConvNeXt; sharded safetensors + index
    ("gemma", "timm", True, True, {}),                     # HD (2x2 crops + global), towers inside
    ("mixtral", "timm", False, True, dict(shards=2, pickle=True)),   # older pytorch_model-*.bin shards (pickles)
])
def test_mgm_checkpoint_converts_to_the_same_model(tmp_path, root, tok, family, hr, hd, towers_inside, layout):
    """The round trip: our export -> MGM's layout -> from-mgm -> an export with the same weights and logits."""
    build(root, tok, family=family, hr=hr, hd=hd).save_pretrained(tmp_path / "ours", tok)
    model = MiniGemini.from_pretrained(tmp_path / "ours")
    batch = tiny_batch(model)
    want = logits(model, batch)
    model_type, architecture = MGM_CLASSES[family]
    tensors = write_source(model, tok, tmp_path / "mgm", model_type=model_type, architecture=architecture,
                           towers_inside=towers_inside, **layout)
    summary = from_source(tmp_path / "mgm", tmp_path / "export", source="mgm")
    assert summary["export"] == "full" and summary["projector"] == 4 and summary["mining"] == 12
    assert summary["tower_tensors_from_source"] == (len([k for k in tensors if "vision_tower" in k]) - 1
                                                    if towers_inside else 0)
    assert summary["derived_buffers_skipped"] == (2 if towers_inside else 0)
    loaded = assert_export_holds_the_source(tmp_path / "export", tensors, batch, want)
    assert loaded.image_settings() == model.image_settings()
    expected_template = {"llama": "vicuna_v1", "gemma": "gemma", "mixtral": "mistral"}[family]
    assert (tmp_path / "export" / "train_config.yaml").read_text() == \
        f"image_aspect_ratio: pad\ntemplate: {expected_template}\n"


def test_tower_weights_inside_the_checkpoint_win_over_the_tower_checkpoint(tmp_path, root, tok):
    """A tuned ConvNeXt stage (vision_stages) or CLIP layer lives only in the MGM checkpoint."""
    model = build(root, tok)
    with torch.no_grad():
        model.vision_tower_aux.stages[3].blocks[0].conv_dw.weight.add_(1.0)
        model.vision_tower.model.encoder.layers[1].mlp.fc1.weight.mul_(2.0)
    batch = tiny_batch(model)
    write_source(model, tok, tmp_path / "mgm", towers_inside=True)
    from_source(tmp_path / "mgm", tmp_path / "export")
    torch.testing.assert_close(logits(MiniGemini.from_pretrained(tmp_path / "export"), batch), logits(model, batch),
                               rtol=0, atol=0)


def test_image_start_end_tokens_keep_their_trained_rows(tmp_path, tok):
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(tok.name_or_path)       # a copy: <im_start>/<im_end> get added
    model = build(tmp_path / "ckpt", tokenizer, mm_use_im_start_end=True)
    with torch.no_grad():
        model.llm.get_input_embeddings().weight[model.im_start_end_ids] += 1.0     # "trained" rows
    batch = tiny_batch(model)
    write_source(model, tokenizer, tmp_path / "mgm")
    from_source(tmp_path / "mgm", tmp_path / "export")
    loaded = MiniGemini.from_pretrained(tmp_path / "export")
    assert loaded.im_start_end_ids == model.im_start_end_ids
    torch.testing.assert_close(logits(loaded, batch), logits(model, batch), rtol=0, atol=0)


def test_model_zoo_paths_map_to_hub_ids_and_can_be_overridden(tmp_path, root, tok):
    assert hub_id("model_zoo/OpenAI/clip-vit-large-patch14-336", "mm_vision_tower", "") == \
        "openai/clip-vit-large-patch14-336"
    assert hub_id("./model_zoo/OpenAI/openclip-convnext-large-d-320-laion2B-s29B-b131K-ft-soup", "", "") == \
        "hf-hub:laion/CLIP-convnext_large_d_320.laion2B-s29B-b131K-ft-soup"
    assert "LLM/vicuna/7B-V1.5" in MODEL_ZOO
    model = build(root, tok)
    batch = tiny_batch(model)
    write_source(model, tok, tmp_path / "mgm")
    config = json.loads((tmp_path / "mgm" / "config.json").read_text())
    towers = config["mm_vision_tower"], config["mm_vision_tower_aux"]
    config.update(mm_vision_tower="model_zoo/OpenAI/clip-vit-large-patch14-336",
                  mm_vision_tower_aux="model_zoo/my-own-convnext")
    (tmp_path / "mgm" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="mm_vision_tower_aux is the local path 'model_zoo/my-own-convnext'"):
        from_source(tmp_path / "mgm", tmp_path / "export")
    from_source(tmp_path / "mgm", tmp_path / "export", vision_tower=towers[0], vision_tower_aux=towers[1])
    torch.testing.assert_close(logits(MiniGemini.from_pretrained(tmp_path / "export"), batch), logits(model, batch),
                               rtol=0, atol=0)


# ---- from-mgm: the stage-1 mm_projector.bin --------------------------------------------------------------------
def write_mm_projector_bin(model, path) -> dict:
    """MGM's stage-1 save: named parameters matching 'mm_projector', 'vlm_uni', 'vision_tower', 'vision_stages'
    (the substring match also catches both frozen towers), keys as in MGMLlamaForCausalLM; config.json beside it
    names the base LLM by its path and has no image_aspect_ratio of the data (MGM's default, 'square')."""
    path.mkdir(parents=True)
    state = {source_key(k): v.clone() for k, v in model.state_dict().items()
             if k.startswith(("projector.", "mining.", "vision_tower.", "vision_tower_aux."))}
    torch.save(state, path / "mm_projector.bin")
    config = mm_config(model, model_type="mgm", architecture="MGMLlamaForCausalLM", aspect="square")
    config["_name_or_path"] = model.config.llm
    (path / "config.json").write_text(json.dumps(config))
    return state


def test_mm_projector_bin_becomes_a_pretrain_export(tmp_path, root, tok):
    model = build(root, tok)
    batch = tiny_batch(model)
    state = write_mm_projector_bin(model, tmp_path / "pretrain")
    config = json.loads((tmp_path / "pretrain" / "config.json").read_text())
    (tmp_path / "pretrain" / "config.json").write_text(json.dumps(dict(config, _name_or_path="./checkpoints/vicuna")))
    with pytest.raises(ValueError, match="the base LLM is './checkpoints/vicuna', not found here; pass --llm"):
        from_source(tmp_path / "pretrain", tmp_path / "export")
    summary = from_source(tmp_path / "pretrain" / "mm_projector.bin", tmp_path / "export", llm=model.config.llm)
    assert summary["export"] == "pretrain"
    assert summary["tower_tensors_equal_to_checkpoint"] == len([k for k in state if "vision_tower" in k])
    saved = load_file(tmp_path / "export" / "mm_weights.safetensors")
    assert saved.keys() == {k for k in model.state_dict() if k.startswith(("projector.", "mining."))}
    assert all(torch.equal(saved[k], state[source_key(k)]) for k in saved)
    assert (tmp_path / "export" / "train_config.yaml").read_text() == "image_aspect_ratio: crop\ntemplate: plain\n"
    torch.testing.assert_close(logits(MiniGemini.from_pretrained(tmp_path / "export"), batch), logits(model, batch),
                               rtol=0, atol=0)


def test_tower_weights_in_mm_projector_bin_must_match_the_towers(tmp_path, root, tok):
    model = build(root, tok)
    state = write_mm_projector_bin(model, tmp_path / "pretrain")
    key = "model.vision_tower_aux.vision_stem.0.weight"
    state[key] = state[key] + 1
    torch.save(state, tmp_path / "pretrain" / "mm_projector.bin")
    with pytest.raises(ValueError, match=f"{key} differs from the tower checkpoint"):
        from_source(tmp_path / "pretrain", tmp_path / "export")


# ---- from-llava ------------------------------------------------------------------------------------------------------
def test_llava_checkpoint_converts_to_the_same_model(tmp_path, root, tok):
    model = build(root, tok, hr=None)
    batch = tiny_batch(model)
    tensors = write_source(model, tok, tmp_path / "llava", model_type="llava", architecture="LlavaLlamaForCausalLM")
    with pytest.raises(ValueError, match="use from-llava"):
        from_source(tmp_path / "llava", tmp_path / "export", source="mgm")
    summary = from_source(tmp_path / "llava", tmp_path / "export", source="llava")
    assert summary["mining"] == 0 and summary["template"] == "vicuna_v1"
    loaded = assert_export_holds_the_source(tmp_path / "export", tensors, batch, logits(model, batch))
    assert loaded.vision_tower_aux is None


# ---- wrong sources: each error names the key or field -------------------------------------------------------------
def test_wrong_sources_are_refused_naming_the_problem(tmp_path, root, tok):
    model = build(root, tok)
    tensors = write_source(model, tok, tmp_path / "mgm")

    def variant(name, edit_tensors=None, edit_config=None):
        path = tmp_path / name
        shutil.copytree(tmp_path / "mgm", path)
        if edit_tensors:
            state = dict(tensors)
            edit_tensors(state)
            save_file(state, path / "model.safetensors")
        if edit_config:
            config = json.loads((path / "config.json").read_text())
            edit_config(config)
            (path / "config.json").write_text(json.dumps(config))
        return path

    missing = variant("missing", lambda s: s.pop("model.vlm_uni_val_projector.1.weight"))
    with pytest.raises(ValueError, match=r"model\.vlm_uni_val_projector\.1\.weight is missing"):
        from_source(missing, tmp_path / "out1")
    llm_missing = variant("llm_missing", lambda s: s.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(ValueError, match=r"LLM weight model\.layers\.1\.mlp\.up_proj\.weight is missing"):
        from_source(llm_missing, tmp_path / "out2")
    shape = variant("shape", lambda s: s.update({"model.mm_projector.0.weight": torch.zeros(32, 7)}))
    with pytest.raises(ValueError, match=r"model\.mm_projector\.0\.weight has shape \(32, 7\)"):
        from_source(shape, tmp_path / "out3")
    projector = variant("projector", edit_config=lambda c: c.update(mm_projector_type="resampler"))
    with pytest.raises(ValueError, match="mm_projector_type 'resampler' is not supported"):
        from_source(projector, tmp_path / "out4")
    unknown = variant("unknown", lambda s: s.update({"model.vision_resampler.query": torch.zeros(2)}))
    with pytest.raises(ValueError, match=r"unknown multimodal weight model\.vision_resampler\.query"):
        from_source(unknown, tmp_path / "out5")
    stray = variant("stray", lambda s: s.update({"model.extra_head.weight": torch.zeros(2)}))
    with pytest.raises(ValueError, match=r"model\.extra_head\.weight is neither a weight of the llama LLM"):
        from_source(stray, tmp_path / "out6")


# ---- to-llava-hf ---------------------------------------------------------------------------------------------------
def shapes_image():
    """A real, non-square photo-like image (padding to square matters)."""
    from PIL import Image, ImageDraw
    image = Image.new("RGB", (60, 36), (235, 230, 220))
    draw = ImageDraw.Draw(image)
    draw.ellipse((8, 6, 30, 28), fill=(200, 30, 40))
    draw.rectangle((34, 10, 54, 30), fill=(30, 60, 200))
    return image


@pytest.mark.parametrize("projector", ["mlp2x_gelu", "linear"])
def test_llava_hf_export_computes_what_ours_computes(tmp_path, llama_tokenizer, projector):
    """transformers' own classes load the directory; on the processor's inputs the logits equal ours, the prompt
    ids are ours with the image run in place of the placeholder, and the greedy answer is the same."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from data import IMAGE_TOKEN_INDEX, tokenize_prompt
    from eval import Answerer, load_for_inference
    model = build(tmp_path / "ckpt", llama_tokenizer, hr=None, projector=projector)
    model.save_pretrained(tmp_path / "export", llama_tokenizer)
    (tmp_path / "export" / "train_config.yaml").write_text("template: vicuna_v1\nimage_aspect_ratio: pad\n")
    summary = convert_main(["to-llava-hf", str(tmp_path / "export"), str(tmp_path / "hf")])
    assert "vision_feature_select_strategy: default" in summary

    hf = AutoModelForImageTextToText.from_pretrained(tmp_path / "hf").eval()
    processor = AutoProcessor.from_pretrained(tmp_path / "hf")
    assert type(hf).__name__ == "LlavaForConditionalGeneration"
    question, image = "What color is the shape?", shapes_image()
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(images=image, text=prompt, return_tensors="pt")

    ours = tokenize_prompt([{"role": "user", "content": question}], llama_tokenizer, "vicuna_v1", num_images=1)
    image_id = hf.config.image_token_id
    ids = inputs["input_ids"][0]
    first = int((ids == image_id).nonzero()[0])
    assert int((ids == image_id).sum()) == model.tokens_per_image == 4
    assert torch.cat([ids[:first], torch.tensor([IMAGE_TOKEN_INDEX]), ids[first + 4:]]).tolist() == ours.tolist()

    pixels = inputs["pixel_values"]
    loaded, tokenizer, image_processor, template = load_for_inference(str(tmp_path / "export"), device="cpu")
    views, _ = image_processor(image)
    assert (views - pixels).abs().max() < 1e-3          # padding, bicubic resize and normalization agree
    with torch.no_grad():
        theirs = hf(**inputs).logits[0]
        mine = loaded(ours[None], images=pixels[:, None]).logits[0]
    torch.testing.assert_close(theirs[:, :mine.shape[-1]], mine, atol=1e-4, rtol=1e-4)

    answer = Answerer(loaded, tokenizer, image_processor, template)([question], [[image]], max_new_tokens=6)[0]
    generated = hf.generate(**inputs, max_new_tokens=6, do_sample=False)[0, ids.shape[0]:]
    stop = generated.tolist().index(2) if 2 in generated.tolist() else len(generated)
    assert stop == 6 and processor.decode(generated[:stop], skip_special_tokens=True).strip() == answer


def test_llava_hf_refuses_what_llava_cannot_express(tmp_path, root, tok):
    build(root, tok).save_pretrained(tmp_path / "mgm", tok)
    with pytest.raises(ValueError, match="HR tower and patch info mining .* transformers has no Mini-Gemini class"):
        convert_main(["to-llava-hf", str(tmp_path / "mgm"), str(tmp_path / "hf")])
    build(root, tok, hr=None, projector="perceiver").save_pretrained(tmp_path / "perceiver", tok)
    with pytest.raises(ValueError, match="projector 'perceiver'"):
        convert_main(["to-llava-hf", str(tmp_path / "perceiver"), str(tmp_path / "hf")])
    with pytest.raises(UserError, match="no mgm_config.json"):
        convert_main(["to-llava-hf", str(tmp_path), str(tmp_path / "hf")])


def convert_main(argv) -> str:
    """Run the CLI in-process and return what it printed."""
    import contextlib
    import io

    from convert import main
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        main(argv)
    return out.getvalue()


@pytest.mark.parametrize("template", ["vicuna_v1", "llama_3", "chatml", "gemma", "mistral", "plain"])
def test_llava_hf_chat_templates_render_our_prompts(llama_tokenizer, template):
    """The Jinja template a Llava directory gets renders the text conversation.py renders for the same prompt."""
    from conversation import get_template
    from llava_hf import llava_chat_template
    from data import _place_image_tags, normalize_messages
    turns = [("What color is the shape?", "Red."), ("And what shape is it?", None)]
    if template == "plain":
        turns = [("", None)]
    for system in (None, "Answer in one word."):
        ours, theirs = [], []
        if system:
            ours.append({"role": "system", "content": system})
            theirs.append({"role": "system", "content": system})
        for i, (question, answer) in enumerate(turns):
            ours.append({"role": "user", "content": question})
            parts = [{"type": "image"}] if i == 0 else []
            text = [{"type": "text", "text": question}] if question else []
            theirs.append({"role": "user", "content": parts + text})
            if answer:
                ours.append({"role": "assistant", "content": answer})
                theirs.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
        segments = get_template(template).prompt_segments(
            _place_image_tags(normalize_messages(ours, for_prompt=True), 1), llama_tokenizer)
        rendered = llama_tokenizer.apply_chat_template(
            theirs, chat_template=llava_chat_template(template, llama_tokenizer, ""), tokenize=False,
            add_generation_prompt=True)
        assert rendered == "".join(s.text for s in segments), (template, system)
