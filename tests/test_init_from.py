"""Starting a run from an export (`init_from`): a released MGM checkpoint converted with convert.py, our own finetune
export, a LoRA export. The run takes the export's own model settings, weights, tokenizer and template; the stage's
trainables go on top (full, LoRA). Tiny random models, in-process runs of a few steps.
"""
from __future__ import annotations

import dataclasses
import json
import signal
from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoTokenizer

from tests.test_stopping import send_at
from tests.test_train import assert_same_run, metrics, run_in_process, tiny, write_dataset, write_recipe  # noqa: F401

# What a user's recipe for "finetune this export on my data" holds: data and training settings, no model settings
# but how to run it (init_from brings the rest).
RUNTIME = ("dtype", "attention", "bits", "gradient_checkpointing")


def user_recipe(tiny: dict, export: Path, data: Path, **overrides) -> dict:
    from model import ModelArguments
    model_fields = {f.name for f in dataclasses.fields(ModelArguments)}
    recipe = {k: v for k, v in tiny["recipe"].items() if k not in model_fields or k in RUNTIME}
    recipe = {k: v for k, v in recipe.items() if k not in ("template", "data_path", "image_folder")}
    return {**recipe, "init_from": str(export), "data_path": str(data), "image_folder": str(data.parent),
            "stage": "finetune", "max_steps": 3, **overrides}


@pytest.fixture(scope="module")
def converted(tiny, tmp_path_factory) -> dict:
    """A tiny released-MGM-layout checkpoint (written as MGM's training code writes one) -> convert.py from-mgm,
    and four new records of the user's (one batch: three with an image, one text-only)."""
    from convert import from_source
    from model import build_model
    from tests.test_convert import write_source
    from tests.tiny_models import save_tiny_checkpoints

    out = tmp_path_factory.mktemp("from_mgm")
    tok = AutoTokenizer.from_pretrained(tiny["root"] / "tok")
    torch.manual_seed(7)   # projector and mining as a finished MGM training left them: not what a new build draws
    model = build_model(save_tiny_checkpoints(tiny["root"] / "ckpt", tokenizer=tok), tok)
    write_source(model, tok, out / "MGM-tiny")
    from_source(out / "MGM-tiny", out / "export", source="mgm")
    data = write_dataset(out / "mine", n=3, text_only=1)
    return {"export": out / "export", "data": data, "out": out}


def loss_of_first_batch(export: Path, data: Path, template: str) -> float:
    """The export's mean token loss on all records of `data` as one batch, computed outside train.py."""
    import data as data_py
    from model import MiniGemini
    from step import model_inputs
    model = MiniGemini.from_pretrained(export, dtype="float32")
    tok = AutoTokenizer.from_pretrained(export)
    args = data_py.DataArguments(data_path=str(data), image_folder=str(data.parent), template=template,
                                 max_length=64)
    dataset = data_py.build_dataset(args, tok, model.image_settings(), model.tokens_per_image)
    batch = data_py.collate([dataset[i] for i in range(len(dataset))], pad_token_id=tok.pad_token_id or 0)
    with torch.no_grad():
        supervised = (batch["labels"][:, 1:] != -100).sum()
        return model(**model_inputs(batch, "cpu"), num_items_in_batch=supervised).loss.item()


def test_a_converted_mgm_checkpoint_finetunes_on_new_records_exports_and_evaluates(tiny, converted, tmp_path, capsys):
    """The first step's loss is the converted model's own loss on that batch (its weights really loaded, its template
    vicuna_v1 taken from the export); the run trains, exports a full model, and eval.py answers with it."""
    import eval as eval_py
    recipe = write_recipe(tmp_path / "r.yaml", user_recipe(tiny, converted["export"], converted["data"],
                                                          per_device_batch_size=4, gradient_accumulation_steps=1,
                                                          group_by_modality_length=False, learning_rate=5e-3))
    export = run_in_process([str(recipe), "--output_dir", str(tmp_path / "run")])
    losses = [m["loss"] for m in metrics(tmp_path / "run")]
    assert losses[0] == pytest.approx(loss_of_first_batch(converted["export"], converted["data"], "vicuna_v1"),
                                      rel=1e-5)
    assert losses[-1] < losses[0]
    saved = yaml.safe_load(open(Path(export) / "train_config.yaml"))
    assert saved["template"] == "vicuna_v1" and saved["init_from"] == str(converted["export"])
    assert json.loads((Path(export) / "mgm_config.json").read_text())["export"] == "full"
    capsys.readouterr()
    eval_py.main(["--model", export, "--data", str(converted["data"]), "--image_folder",
                  str(converted["data"].parent), "--max_new_tokens", "2"])
    assert "accuracy: " in capsys.readouterr().out.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def own_export(tiny, converted, tmp_path_factory) -> Path:
    """Our own finetune export (a full one, from train.py) of the converted model."""
    out = tmp_path_factory.mktemp("own")
    recipe = write_recipe(out / "r.yaml", user_recipe(tiny, converted["export"], converted["data"], max_steps=2))
    return Path(run_in_process([str(recipe), "--output_dir", str(out / "run")]))


def test_lora_on_top_of_our_own_finetune_export_and_a_lora_export_as_the_next_start(tiny, converted, own_export,
                                                                                        tmp_path):
    """LoRA adapters on a full export of ours: they train and export as a LoRA export whose base is that export;
    that LoRA export is itself a start: merged into its base, the same model (logits) as loading it."""
    import model as mgm
    from model import MiniGemini, ModelArguments, build_model
    from settings import parse_args
    from tests.tiny_models import tiny_batch
    recipe = write_recipe(tmp_path / "r.yaml", user_recipe(tiny, own_export, converted["data"], tune="lora"))
    lora = Path(run_in_process([str(recipe), "--output_dir", str(tmp_path / "run")]))
    assert len(metrics(tmp_path / "run")) == 3
    from safetensors.torch import load_file
    adapters = load_file(lora / "adapter" / "adapter_model.safetensors")
    assert any("lora_B" in k and v.abs().sum() > 0 for k, v in adapters.items())   # B starts at zero: it trained
    meta = json.loads((lora / "mgm_config.json").read_text())
    assert meta["export"] == "lora" and meta["args"]["init_from"] == str(own_export.resolve())

    merged = mgm.merge_lora_export(lora, tmp_path / "merged")   # keeps the template and image handling it trained with
    assert (merged / "train_config.yaml").read_text() == (lora / "train_config.yaml").read_text()

    loaded = MiniGemini.from_pretrained(lora)
    model_args, _, _ = parse_args([str(write_recipe(tmp_path / "next.yaml", user_recipe(tiny, lora,
                                                                                      converted["data"])))])
    restarted = build_model(model_args).eval()
    assert not any("lora_" in n for n, _ in restarted.named_parameters())   # merged
    bare = build_model(ModelArguments(init_from=str(lora), dtype="float32"))   # from Python, settings unresolved
    assert bare.config.llm == restarted.config.llm and bare.tokens_per_image == loaded.tokens_per_image
    batch = tiny_batch(loaded)
    with torch.no_grad():
        torch.testing.assert_close(restarted(**batch).logits, loaded(**batch).logits, rtol=1e-5, atol=1e-5)


def test_a_recipe_naming_another_model_than_the_export_is_refused_with_one_line(tiny, converted, own_export):
    from cli import UserError
    from settings import check_paths, parse_args
    base = ["--init_from", str(own_export), "--data_path", str(converted["data"])]
    with pytest.raises(UserError, match=r"^init_from: .* was built with llm: .*, but this run says llm: "
                                        r"lmsys/vicuna-7b-v1.5; drop llm from the recipe"):
        parse_args([*base, "--llm", "lmsys/vicuna-7b-v1.5"])
    with pytest.raises(UserError, match=r"^init_from: .* was built with image_size_aux: 32, but this run says "
                                        r"image_size_aux: 768"):
        parse_args([*base, "--image_size_aux", "768"])
    with pytest.raises(UserError, match=r"init_from and pretrained_mm_path both name weights"):
        parse_args([*base, "--pretrained_mm_path", str(own_export)])
    with pytest.raises(UserError, match=r"^init_from: .*nope: no such directory"):
        parse_args(["--init_from", str(own_export) + "-nope", "--data_path", str(converted["data"])])
    with pytest.raises(UserError, match=r"^init_from: .* was built with attention: sdpa, but this run says "
                                        r"attention: mmca"):
        parse_args([*base, "--attention", "mmca"])
    assert parse_args([*base, "--attention", "eager"])[0].attention == "eager"   # the same function
    model_args, data_args, args = parse_args([*base, "--output_dir", str(own_export.parent)])
    with pytest.raises(UserError, match=r"^init_from: .* is where this run writes its own export"):
        check_paths(model_args, data_args, args)
    model_args, data_args, _ = parse_args([*base, "--llm", json.loads(
        (own_export / "mgm_config.json").read_text())["args"]["llm"], "--dtype", "float32"])   # the same: fine
    assert model_args.image_size_aux == 32 and data_args.template == "vicuna_v1" and model_args.dtype == "float32"


def test_a_run_from_an_export_stops_on_a_signal_and_resumes_the_same_losses(tiny, converted, own_export, tmp_path,
                                                                           monkeypatch):
    recipe = write_recipe(tmp_path / "r.yaml", user_recipe(tiny, own_export, converted["data"], tune="lora",
                                                          max_steps=4, resume="auto", lora_dropout=0.1))
    run_in_process([str(recipe), "--output_dir", str(tmp_path / "ref")])
    with monkeypatch.context() as patch:
        send_at(patch, "step:2", signal.SIGTERM)
        assert run_in_process([str(recipe), "--output_dir", str(tmp_path / "run")]) is None
    run_in_process([str(recipe), "--output_dir", str(tmp_path / "run")])
    assert_same_run(tmp_path / "ref", tmp_path / "run", step=4)


def test_the_plan_of_a_run_from_an_export(tiny, converted, own_export, tmp_path, capsys):
    recipe = write_recipe(tmp_path / "r.yaml", user_recipe(tiny, own_export, converted["data"], tune="lora"))
    assert run_in_process([str(recipe), "--plan", "--device_memory_gb", "1", "--plan_config",
                           "accelerate_configs/single_gpu.yaml", "--output_dir", str(tmp_path / "run")]) == ""
    out = capsys.readouterr().out
    assert "fits" in out, out
    assert not (tmp_path / "run").exists()
