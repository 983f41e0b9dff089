"""Preference tuning: the pair records of every published form with exact masks, our DPO loss against TRL's
DPOTrainer on the same tiny Llava, the references, and the dpo stage of train.py."""
import io
import json
import re
from pathlib import Path

import datasets
import pytest
import torch
from PIL import Image

import dpo
from bench import pair_batch, trl_inputs
from data import (IGNORE_INDEX, IMAGE_TOKEN_INDEX, DataArguments, build_dataset, check, collate_pairs,
                  tokenize_pair)


def png(color=(200, 30, 40), size=(40, 30)) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, color).save(out, format="PNG")
    return out.getvalue()


def supervised_text(row, tokenizer) -> str:
    return tokenizer.decode(row["input_ids"][row["labels"] != IGNORE_INDEX])


# ---- Records: every form, exact masks ------------------------------------------------------------------------------

def write_forms(tmp_path):
    """The same multi-turn, image pair in each published form (plus a text-only pair in ours), as files."""
    (tmp_path / "img.png").write_bytes(png())
    history = [{"from": "human", "value": "<image>\nWhat color is the shape?"}, {"from": "gpt", "value": "Red."},
               {"from": "human", "value": "What shape is this?"}]
    forms = {}
    forms["ours.jsonl"] = [{"id": "ours", "image": "img.png", "conversations": history, "chosen": "A circle.",
                            "rejected": "A star."},
                           {"id": "text", "conversations": [{"from": "human", "value": "Is a star round?"}],
                            "chosen": "No.", "rejected": "Yes."}]
    forms["povid.json"] = [{"id": "povid", "image": "img.png",
                            "conversations": [*history, {"from": "gpt", "value": "A circle."}],
                            "rejected_conversations": [*history, {"from": "gpt", "value": "A star."}]}]
    forms["human_preference.json"] = [{"id": "hp", "image": "img.png", "conversations": history,
                                       "output_1": {"from": "llava", "value": "A star."},
                                       "output_2": {"from": "llava", "value": "A circle."}, "preference": 2}]
    for name, records in forms.items():
        text = "\n".join(json.dumps(r) for r in records) if name.endswith(".jsonl") else json.dumps(records)
        (tmp_path / name).write_text(text)
    # RLAIF-V: one turn (its records have no history), the image as parquet bytes
    rlaif = datasets.Dataset.from_dict(
        {"idx": ["rlaif"], "image": [{"bytes": png(), "path": None}], "question": ["What shape is this?"],
         "chosen": ["A circle."], "rejected": ["A star."], "ds_name": ["demo"]},
        features=datasets.Features({"idx": datasets.Value("string"), "image": datasets.Image(),
                                    "question": datasets.Value("string"), "chosen": datasets.Value("string"),
                                    "rejected": datasets.Value("string"), "ds_name": datasets.Value("string")}))
    rlaif.to_parquet(str(tmp_path / "rlaif_v.parquet"))
    # rlaif-v_formatted (TRL's conversational form): images list, prompt / chosen / rejected as messages with parts
    part = lambda text: [{"type": "text", "text": text}]  # noqa: E731
    formatted = datasets.Dataset.from_list([{
        "images": [{"bytes": png(), "path": None}],
        "prompt": [{"role": "user", "content": [{"type": "image", "text": None}, *part("What color is the shape?")]},
                   {"role": "assistant", "content": [{"type": "text", "text": "Red."}]},
                   {"role": "user", "content": [{"type": "text", "text": "What shape is this?"}]}],
        "chosen": [{"role": "assistant", "content": part("A circle.")}],
        "rejected": [{"role": "assistant", "content": part("A star.")}]}])
    formatted = formatted.cast_column("images", datasets.List(datasets.Image()))
    formatted.save_to_disk(str(tmp_path / "formatted"))
    return ["ours.jsonl", "povid.json", "human_preference.json", "rlaif_v.parquet", "formatted"]


def test_every_preference_form_masks_all_but_the_reply(tmp_path, llama_tokenizer):
    """Prompt and earlier turns (the assistant's "Red." included) are masked in both rows; only the chosen /
    rejected reply and its end of turn are supervised; the pair's image comes once; text-only pairs work."""
    names = write_forms(tmp_path)
    args = DataArguments(",".join(str(tmp_path / n) for n in names), image_folder=str(tmp_path),
                         template="vicuna_v1", bad_sample="error", cache_dir=str(tmp_path / "cache"))
    settings = dict(image_size=28, image_mean=[0.5] * 3, image_std=[0.5] * 3)
    dataset = build_dataset(args, llama_tokenizer, settings, pairs=True)
    samples = [dataset[i] for i in range(len(dataset))]
    assert [s["id"] for s in samples] == ["ours", "text", "povid", "hp", "rlaif", "formatted:0"]
    for s in samples:
        assert supervised_text(s["chosen"], llama_tokenizer) == ("No.</s>" if s["id"] == "text" else "A circle.</s>")
        assert supervised_text(s["rejected"], llama_tokenizer) == ("Yes.</s>" if s["id"] == "text" else "A star.</s>")
        images = int((s["chosen"]["input_ids"] == IMAGE_TOKEN_INDEX).sum())
        assert images == int((s["rejected"]["input_ids"] == IMAGE_TOKEN_INDEX).sum())
        assert (s["images"] is None) == (images == 0) and (s["images"] is None or len(s["images"]) == images == 1)
        prompt = len(s["chosen"]["input_ids"]) - int((s["chosen"]["labels"] != IGNORE_INDEX).sum())
        assert torch.equal(s["chosen"]["input_ids"][:prompt], s["rejected"]["input_ids"][:prompt])
    multi_turn = [s for s in samples if s["id"] in ("ours", "povid", "hp", "formatted:0")]
    first = multi_turn[0]["chosen"]["input_ids"]
    assert all(torch.equal(s["chosen"]["input_ids"], first) for s in multi_turn)   # one pair, four forms, same ids
    assert "Red." in llama_tokenizer.decode(first[first != IMAGE_TOKEN_INDEX])

    batch = collate_pairs(samples[:2], llama_tokenizer.pad_token_id or 0)
    assert batch["input_ids"].shape[0] == 4 and batch["images"].shape[0] == 1      # one image, rows c0 c1 r0 r1
    assert batch["image_counts"].tolist() == [1, 0, 1, 0]


def test_unusable_pairs_are_named(tmp_path, llama_tokenizer):
    records = [{"id": "no-rejected", "conversations": [{"from": "human", "value": "Hi?"}, {"from": "gpt",
                                                                                          "value": "Yes."}]},
               {"id": "ends-with-reply", "conversations": [{"from": "human", "value": "Hi?"},
                                                           {"from": "gpt", "value": "Yes."}],
                "chosen": "Yes.", "rejected": "No."},
               {"id": "empty-rejected", "conversations": [{"from": "human", "value": "Hi?"}], "chosen": "Yes.",
                "rejected": " "},
               {"id": "povid-differs", "conversations": [{"from": "human", "value": "A?"}, {"from": "gpt", "value": "B"}],
                "rejected_conversations": [{"from": "human", "value": "C?"}, {"from": "gpt", "value": "D"}]},
               {"id": "good", "conversations": [{"from": "human", "value": "Hi?"}], "chosen": "Yes.", "rejected": "No."}]
    path = tmp_path / "pairs.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in records))
    out = io.StringIO()
    status = check(str(path), llama_tokenizer, "vicuna_v1", cache_dir=str(tmp_path / "cache"), num_workers=0, out=out)
    lines = out.getvalue().splitlines()
    assert status == 1 and "records: 5  usable: 1  bad: 4" in lines
    assert any(line.startswith("no-rejected: not a pair") for line in lines)
    assert any(line.startswith("ends-with-reply: roles out of order") for line in lines)
    assert any(line.startswith("empty-rejected: malformed record") for line in lines)
    assert any(line.startswith("povid-differs: malformed record: rejected_conversations") for line in lines)


def test_a_reply_cut_off_by_max_length_is_unusable(llama_tokenizer):
    prompt = [{"from": "human", "value": "What color is the shape? " * 3}]
    with pytest.raises(Exception, match="too long"):
        tokenize_pair(prompt, "Red.", "Blue.", llama_tokenizer, "vicuna_v1", max_length=20)
    pair = tokenize_pair(prompt, "Red.", "A blue square.", llama_tokenizer, "vicuna_v1")
    assert supervised_text(pair["rejected"], llama_tokenizer) == "A blue square.</s>"


# ---- The losses against TRL ------------------------------------------------------------------------------------------

PAIRS = [("what color is the shape ?", "red .", "blue ."),
         ("what shape is this ?", "a circle .", "a square , it is a star ."),
         ("describe the image .", "a red circle .", "green")]


@pytest.fixture(scope="module")
def llava_pair(tmp_path_factory, tok):
    """Our tiny plain-LLaVA policy and reference (the policy's LLM moved off the reference by a seeded step of
    noise), each also converted to transformers' LlavaForConditionalGeneration. The LLM's vocabulary has one spare
    row, as padded vocabularies do, which the converter gives the <image> token: otherwise it would add a row and
    transformers' softmax would run over one more token than ours."""
    from transformers import AutoModelForImageTextToText

    from convert import main as convert
    from model import build_model
    from tests.tiny_models import save_tiny_checkpoints, save_tiny_llm
    root = tmp_path_factory.mktemp("llava_pair")
    llm = save_tiny_llm(root / "llm-spare", tokenizer=tok, vocab_size=len(tok) + 1)
    torch.manual_seed(0)
    policy = build_model(save_tiny_checkpoints(root, tokenizer=tok, hr=None, llm=llm), tok).eval()
    reference = dpo.PreferenceModel(policy, reference="copy").reference_llm
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in policy.llm.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    hf = {}
    for name, llm_weights in (("policy", policy.llm), ("reference", reference)):
        saved = policy.llm
        policy.llm = llm_weights
        policy.save_pretrained(root / name, tok)
        policy.llm = saved
        (root / name / "train_config.yaml").write_text("template: vicuna_v1\nimage_aspect_ratio: pad\n")
        convert(["to-llava-hf", str(root / name), str(root / f"{name}-hf")])
        hf[name] = AutoModelForImageTextToText.from_pretrained(root / f"{name}-hf")
    return policy, reference, hf, root


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "mpo"])
def test_loss_rewards_and_logps_equal_trl(llava_pair, tok, tmp_path, loss_type):
    from transformers import AutoProcessor
    from trl import DPOConfig, DPOTrainer
    policy, reference, hf, root = llava_pair
    terms = dpo.parse_loss_type(loss_type)
    config = DPOConfig(output_dir=str(tmp_path / "trl"), beta=0.1, loss_type=[n for n, _ in terms],
                       loss_weights=[w for _, w in terms], report_to="none", use_cpu=True, bf16=False,
                       per_device_train_batch_size=len(PAIRS))
    rows = datasets.Dataset.from_dict({"prompt": [p for p, _, _ in PAIRS], "chosen": [c for _, c, _ in PAIRS],
                                       "rejected": [r for *_, r in PAIRS]})
    trainer = DPOTrainer(model=hf["policy"], ref_model=hf["reference"], args=config, train_dataset=rows,
                         processing_class=AutoProcessor.from_pretrained(root / "policy-hf"))
    batch = pair_batch(policy, tok, PAIRS)
    trainer.model.train()   # a training step's loss (TRL logs it under "train")
    theirs = trainer.compute_loss(trainer.model, trl_inputs(batch, hf["policy"].config.image_token_id,
                                                            policy.tokens_per_image))
    logged = {k: v[-1] for k, v in trainer._metrics["train"].items()}

    model = dpo.PreferenceModel(policy, loss_type=loss_type, reference="copy")
    model.reference_llm = reference
    ours = model(**batch)
    assert abs(ours.loss.item() - theirs.item()) < 1e-5
    for name, value in zip(dpo.METRICS, (ours.metrics / len(PAIRS)).tolist()):
        assert abs(value - logged[name]) < 1e-5 * max(1.0, abs(value)), name
    assert logged["rewards/margins"] != 0 and 0 < logged["rewards/accuracies"] < 1   # the two models differ


def test_a_shared_prompt_gives_the_log_probs_and_gradients_of_whole_rows(tok, tmp_path):
    """Each pair's prompt run once with both replies after it (a 4D mask): the log-probs and the LLM's gradients
    of running the 2B rows whole; prompts and replies of different lengths, a text-only pair among image pairs."""
    from tests.tiny_models import build
    model = build(tmp_path, tok, hr=None)
    rows = [("what color is the shape ?", "red .", "blue , it is a star ."),
            ("what shape is this ? describe the image .", "a circle .", "a star ."), ("is it round ?", "yes", "no")]
    batch = pair_batch(model, tok, rows)
    batch["images"] = batch["images"][:2]
    ids = batch["input_ids"]
    ids[[2, 5]] = torch.where(ids[[2, 5]] == IMAGE_TOKEN_INDEX, 0, ids[[2, 5]])   # the third pair: text only
    results = []
    for shared in (False, True):
        model.zero_grad()
        feats = torch.cat([model.encode_images(batch["images"])] * 2)
        logps, counts = dpo.row_logps(model, model.llm, ids, batch["attention_mask"], batch["labels"], feats,
                                      shared_prompt=shared)
        (logps * torch.arange(1.0, 7.0)).sum().backward()
        results.append((logps.detach(), counts, [p.grad.clone() for p in model.llm.parameters()]))
    (whole, n_whole, g_whole), (shared, n_shared, g_shared) = results
    torch.testing.assert_close(shared, whole, rtol=1e-5, atol=1e-5)
    assert torch.equal(n_shared, n_whole) and n_whole.tolist() == [3, 4, 2, 8, 4, 2]   # replies + end of turn
    for a, b in zip(g_shared, g_whole):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


# ---- The dpo stage of train.py ---------------------------------------------------------------------------------------

from tests.test_train import (COLORS, SHAPES, assert_same_run, metrics, run_in_process,  # noqa: E402
                              tiny, write_recipe)

__all__ = ["tiny"]   # the session fixture of tests/test_train.py, shared


def write_pairs(folder, n: int = 12, text_only: int = 4):
    """Image pairs whose rejected answer names a wrong colour, and text-only pairs, in our JSONL form."""
    folder.mkdir(parents=True, exist_ok=True)
    names, records = list(COLORS), []
    for i in range(n):
        color, wrong = names[i % len(names)], names[(i + 1 + i // 4) % len(names)]
        Image.new("RGB", (40, 32), COLORS[color]).save(folder / f"img{i}.png")
        records.append({"id": f"img{i}", "image": f"img{i}.png",
                        "conversations": [{"from": "human", "value": "<image>\nwhat color is the shape ?"}],
                        "chosen": color, "rejected": f"{wrong} {SHAPES[i % 4]}"})
    for i in range(text_only):
        records.append({"id": f"txt{i}", "conversations": [{"from": "human", "value": "describe one shape"}],
                        "chosen": SHAPES[i % 4], "rejected": "yes no"})
    path = folder / "pairs.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in records))
    return path


@pytest.fixture(scope="module")
def dpo_recipe(tiny, tmp_path_factory):
    pairs = write_pairs(tmp_path_factory.mktemp("pairs"))
    return {**tiny["recipe"], "stage": "dpo", "tune": "lora", "template": "vicuna_v1", "data_path": str(pairs),
            "image_folder": str(pairs.parent), "learning_rate": 5e-3, "warmup_ratio": 0.0, "beta": 0.1}


def test_dpo_stage_trains_logs_and_exports(dpo_recipe, tmp_path, capsys):
    """LoRA, the disabled adapter as reference: the first step's loss is log 2 (policy == reference), the log
    line and metrics.jsonl carry the rewards, held-out pairs are scored, and the export is the policy's."""
    from model import MiniGemini
    recipe = write_recipe(tmp_path / "r.yaml", dpo_recipe, max_steps=6, eval_data_path=dpo_recipe["data_path"])
    export = run_in_process([str(recipe), "--output_dir", str(tmp_path / "run")])
    logged = metrics(tmp_path / "run")
    assert abs(logged[0]["loss"] - 0.6931472) < 1e-5 and logged[0]["rewards/margins"] == 0
    assert all(set(dpo.METRICS) <= set(m) for m in logged)
    assert logged[-1]["rewards/margins"] > 0 and logged[-1]["loss"] < logged[0]["loss"]
    out = capsys.readouterr().out
    assert re.search(r"step 6/6 \| loss [\d.]+ \| rewards chosen -?[\d.]+ rejected -?[\d.]+ accuracy [\d.]+ margin", out)
    assert re.search(r"step 6 \| eval_loss [\d.]+ \| eval_rewards/chosen", out)
    loaded = MiniGemini.from_pretrained(export)
    assert loaded.llm.peft_config["default"].r == 4 and not hasattr(loaded, "reference_llm")


def recipe_pairs(model, recipe, tokenizer, n=4):
    from data import DataArguments, build_dataset
    args = DataArguments(recipe["data_path"], image_folder=recipe["image_folder"], template="vicuna_v1")
    dataset = build_dataset(args, tokenizer, model.image_settings(), model.tokens_per_image, pairs=True)
    return collate_pairs([dataset[i] for i in range(n)], tokenizer.pad_token_id)


def test_disabled_adapter_reference_equals_a_frozen_copy(dpo_recipe):
    """The policy with trained (non-zero) LoRA adapters: its reference through the disabled adapter gives the log-
    probs of a frozen copy of the starting model, and the policy's own differ."""
    import settings
    import step
    model_args, _, args = settings.parse_args(["--data_path", dpo_recipe["data_path"], *sum(
        ([f"--{k}", str(v)] for k, v in dpo_recipe.items() if k not in ("data_path",)), [])])
    tokenizer = step.load_tokenizer(model_args.llm)
    torch.manual_seed(0)
    policy = step.build(model_args, args, tokenizer)
    torch.manual_seed(0)
    start = step.build(model_args, settings.dataclasses.replace(args, tune="full"), tokenizer)
    with torch.no_grad():
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    assert not any(p.requires_grad for m in (policy.projector, policy.vision_tower) for p in m.parameters())
    batch = recipe_pairs(policy, dpo_recipe, tokenizer)
    adapter = dpo.PreferenceModel(policy, reference="adapter")(**batch)
    copy = dpo.PreferenceModel(start, reference="copy")(**batch)
    torch.testing.assert_close(adapter.ref_logps, copy.ref_logps, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(copy.logps, copy.ref_logps, rtol=1e-6, atol=1e-6)
    assert (adapter.logps - adapter.ref_logps).abs().min() > 1e-3


def test_mfu_counts_the_positions_and_images_a_pair_step_computes(dpo_recipe):
    """The log line's model FLOPs of a pair batch (image pairs and a text-only one): the positions the LLM really
    runs (each prompt once, both replies; again for the reference forward unless precomputed), the attention pairs
    its mask allows (counted as a row of n counts n^2), and each pair's images once; mmca: the whole rows."""
    import dataclasses

    import settings
    import step
    from data import DataArguments, build_dataset
    from flops import TrainFlops
    model_args, _, args = settings.parse_args(["--data_path", dpo_recipe["data_path"], *sum(
        ([f"--{k}", str(v)] for k, v in dpo_recipe.items() if k not in ("data_path",)), [])])
    tokenizer = step.load_tokenizer(model_args.llm)
    policy = step.build(model_args, args, tokenizer)
    data = DataArguments(dpo_recipe["data_path"], image_folder=dpo_recipe["image_folder"], template="vicuna_v1")
    dataset = build_dataset(data, tokenizer, policy.image_settings(), policy.tokens_per_image, pairs=True)
    batch = collate_pairs([dataset[i] for i in (0, 1, 2, 12)], tokenizer.pad_token_id)    # 12: text only
    seen = []                           # (real positions, allowed (query, key) pairs among them) of every LLM forward
    def record(module, args, kw):
        real = kw["inputs_embeds"].abs().sum(-1) > 0
        allowed = (kw["attention_mask"][:, 0] == 0) & real[:, :, None] & real[:, None, :]
        seen.append((int(real.sum()), int(allowed.sum())))
    hook = policy.llm.get_base_model().register_forward_pre_hook(record, with_kwargs=True)
    model = dpo.PreferenceModel(policy, reference="adapter")
    with torch.no_grad():
        model(**batch)
    hook.remove()
    (positions, allowed), reference = seen
    assert reference == (positions, allowed)
    placeholders = step.image_load(model, batch)[0]
    assert positions < sum(step.sample_lengths(batch, placeholders))          # fewer than the two rows whole
    per_position = TrainFlops(1.0, 0.0, 0.0, llm_forward_per_token=1.0)
    assert dpo.pair_flops(per_position, batch, placeholders, model) == (2 * positions,) * 2
    per_pair = TrainFlops(0.0, 1.0, 0.0)
    assert dpo.pair_flops(per_pair, batch, placeholders, model)[0] == 2 * allowed - positions
    per_image = TrainFlops(0.0, 0.0, 1.0)
    assert dpo.pair_flops(per_image, batch, placeholders, model)[1] == len(batch["images"]) == 3
    precomputed = dpo.PreferenceModel(policy, reference="precomputed")
    assert dpo.pair_flops(per_position, batch, placeholders, precomputed) == (positions,) * 2
    policy.config = dataclasses.replace(policy.config, attention="mmca")     # mmca runs the rows whole
    rows = TrainFlops(1.0, 1.0, 0.0)
    assert dpo.pair_flops(rows, batch, placeholders, precomputed) == \
        rows.of(step.sample_lengths(batch, placeholders), images=3)


def test_precomputed_reference_gives_the_run_of_the_on_the_fly_one(dpo_recipe, tmp_path):
    """reference precomputed: one pass before training, kept in output_dir; the run's losses and rewards equal those
    of the disabled-adapter reference. The file is refused for other data and resumes a pass cut short."""
    runs = {}
    for reference in ("adapter", "precomputed"):
        recipe = write_recipe(tmp_path / f"{reference}.yaml", dpo_recipe, max_steps=4, reference=reference,
                              eval_data_path=dpo_recipe["data_path"])
        runs[reference] = tmp_path / reference
        run_in_process([str(recipe), "--output_dir", str(runs[reference])])
    a, b = metrics(runs["adapter"]), metrics(runs["precomputed"])
    for key in ("loss", *dpo.METRICS):
        torch.testing.assert_close(torch.tensor([m[key] for m in b]), torch.tensor([m[key] for m in a]),
                                   rtol=1e-5, atol=1e-6, msg=key)
    evals = [[m for m in map(json.loads, open(run / "metrics.jsonl")) if "eval_loss" in m] for run in runs.values()]
    assert evals[0][0]["eval_rewards/accuracies"] == evals[1][0]["eval_rewards/accuracies"]

    path = str(runs["precomputed"] / dpo.REFERENCE_FILE)
    saved = torch.load(path, weights_only=True)
    assert saved["done"].all() and torch.isfinite(saved["values"]).all() and len(saved["values"]) == 16

    class Dataset(list):
        tokenizer = None
    with pytest.raises(dpo.UserError, match="holds reference log-probs of another data"):
        dpo.precompute_reference(None, None, Dataset(), path, {**saved["fingerprint"], "data": "other"}, batch_size=2)
    # a pass cut short (a signal, a crash) continues: only the missing pairs are computed, to the same values
    import settings
    import step
    from accelerate import Accelerator
    from data import build_dataset
    model_args, data_args, args = settings.parse_args([str(tmp_path / "precomputed.yaml")])
    tokenizer = step.load_tokenizer(model_args.llm)
    torch.manual_seed(0)
    policy = step.build(model_args, args, tokenizer)
    dataset = build_dataset(data_args, tokenizer, policy.image_settings(), policy.tokens_per_image, pairs=True)
    full = saved["values"].clone()
    saved["done"][5:], saved["values"][5:] = False, 0
    torch.save(saved, path)
    lines = []
    again = dpo.precompute_reference(Accelerator(cpu=True), policy, dataset, path,
                                     dpo.fingerprint(model_args, data_args, policy), batch_size=2, say=lines.append)
    assert lines[0] == "reference log-probs: 5 of 16 pairs done, computing the rest"
    torch.testing.assert_close(again, full, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("tune,reference", [("lora", "adapter"), ("full", "copy")])
def test_resume_in_the_middle_gives_the_uninterrupted_run(dpo_recipe, tmp_path, tune, reference):
    """6 steps; then checkpoint-6 and the export deleted and the run resumed from checkpoint-3: steps 4-6 again,
    the same losses, rewards and weights (the frozen copy is rebuilt from the starting model, not the checkpoint)."""
    import shutil
    recipe = write_recipe(tmp_path / "r.yaml", dpo_recipe, tune=tune, reference=reference, max_steps=6, save_steps=3,
                          save_total_limit=2, lora_dropout=0.1, learning_rate=2e-3)
    run = tmp_path / "run"
    run_in_process([str(recipe), "--output_dir", str(run)])
    shutil.copytree(run, tmp_path / "ref")
    for step_6 in (run / "checkpoint-000006", run / "export"):
        shutil.rmtree(step_6)
    run_in_process([str(recipe), "--output_dir", str(run), "--resume", "auto"])
    assert_same_run(tmp_path / "ref", run, step=6)
    for key in dpo.METRICS:
        assert [m[key] for m in metrics(run)] == pytest.approx([m[key] for m in metrics(tmp_path / "ref")], abs=1e-6)


@pytest.mark.parametrize("config,tune,reference", [("deepspeed_zero2.yaml", "lora", "adapter"),
                                                   ("deepspeed_zero3.yaml", "full", "copy")])
def test_engines_give_the_losses_of_one_process(dpo_recipe, tmp_path, config, tune, reference):
    """ZeRO-2 and ZeRO-3 (whose frozen reference copy is partitioned too) on 2 CPU processes of 2 pairs: the per-step
    losses and rewards of one process of 4 pairs (accumulation 2 in both), which DDP gives too (multi_gpu.yaml
    runs the same all-reduce of the step's pair count as every engine; ~1 min a launch, so not repeated here)."""
    from tests.test_engines import launch as launch_engine
    recipe = write_recipe(tmp_path / "r.yaml", dpo_recipe, tune=tune, reference=reference, max_steps=3)
    run_in_process([str(recipe), "--output_dir", str(tmp_path / "one"), "--per_device_batch_size", "4"])
    out = launch_engine(config, "tests/launch_train.py", recipe, "--output_dir", tmp_path / "two")
    assert "2 process(es)" in out
    one, two = metrics(tmp_path / "one"), metrics(tmp_path / "two")
    for key in ("loss", *dpo.METRICS):
        torch.testing.assert_close(torch.tensor([m[key] for m in two]), torch.tensor([m[key] for m in one]),
                                   rtol=1e-5, atol=1e-5, msg=key)


@pytest.mark.parametrize("tune,reference", [("full", "copy"), ("lora", "adapter"), ("lora", "precomputed")])
def test_plan_of_a_dpo_step_is_the_real_step(tok, tmp_path, tune, reference):
    """--plan traces the dpo step (2B rows sharing B images, the reference inside the model): its parameters
    (the frozen copy included) and peak are those of the same step on real tensors."""
    import dataclasses

    import plan
    import settings
    import train
    from tests.tiny_models import save_tiny_checkpoints
    model_args = save_tiny_checkpoints(tmp_path, tokenizer=tok)
    data_args = DataArguments(data_path="-", max_length=40)
    args = settings.TrainArguments(stage="dpo", tune=tune, reference=reference, per_device_batch_size=2, lora_r=4,
                                   lora_dropout=0.0)
    planned = plan.plan(model_args, data_args, args, plan.Launch("single", 1, "no", plan.GiB))
    torch.manual_seed(0)
    policy = train.build(dataclasses.replace(model_args, random_init=True), args, None)
    batch = dpo.pair_rows(plan.worst_case_batch(policy, data_args, 4, plan.PlanFakeMode()))
    batch["images"], batch["images_aux"] = torch.randn(batch["images"].shape), torch.randn(batch["images_aux"].shape)
    if reference == "precomputed":
        batch["ref_logps"] = torch.zeros(4, dtype=torch.float64)
    model = dpo.PreferenceModel(policy, reference=reference)
    assert planned.terms["parameters"].bytes == sum(t.nbytes for t in [*model.parameters(), *model.buffers()])
    real = plan.step_memory(model, args, batch, mixed_precision="no")
    assert planned.peak.bytes == pytest.approx(real.peak, rel=0.05)


def test_eval_scores_held_out_pairs(tiny, dpo_recipe, tmp_path, capsys):
    """eval.py --pairs: a dpo export against the export it started from (here a pretrain export, whose projector
    the dpo run loads through pretrained_mm_path); the tuned model prefers the chosen replies."""
    import eval as evaluation
    recipe = write_recipe(tmp_path / "pt.yaml", tiny["recipe"], max_steps=1)
    start = run_in_process([str(recipe), "--output_dir", str(tmp_path / "pt")])
    recipe = write_recipe(tmp_path / "dpo.yaml", dpo_recipe, max_steps=8, pretrained_mm_path=start)
    export = run_in_process([str(recipe), "--output_dir", str(tmp_path / "dpo")])
    (Path(start) / "train_config.yaml").write_text("template: vicuna_v1\n")   # asked the dpo run's questions
    capsys.readouterr()
    accuracy = evaluation.main(["--model", export, "--reference", start, "--pairs", dpo_recipe["data_path"],
                                "--image_folder", dpo_recipe["image_folder"]])
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert re.fullmatch(r"reward accuracy: [\d.]+ margin: -?[\d.]+ \(n=16\)", last), last
    assert accuracy > 0.5 and float(last.split()[4]) > 0
    same = evaluation.score_pairs(start, start, dpo_recipe["data_path"], dpo_recipe["image_folder"])
    assert same["accuracy"] == 0 and same["margin"] == 0 and same["n"] == 16
