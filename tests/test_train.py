"""train.py end to end on CPU, through `accelerate launch` as a user runs it (and in-process for the cheap checks).

Tiny random checkpoints (tests/tiny_models.py), a small LLaVA JSON with Pillow images written here, a few steps each.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

COLORS = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220), "yellow": (230, 230, 20)}
SHAPES = ["circle", "square", "triangle", "star"]


def write_dataset(folder: Path, n: int = 24, text_only: int = 8) -> Path:
    """n image records (answers of different lengths) and text-only records, LLaVA JSON + PNG files."""
    folder.mkdir(parents=True, exist_ok=True)
    records = []
    names = list(COLORS)
    for i in range(n):
        color = names[i % len(names)]
        Image.new("RGB", (40 + 8 * (i % 3), 32), COLORS[color]).save(folder / f"img{i}.png")
        answer = " ".join([color] + SHAPES[: i % 4])   # 1 to 4 answer words
        records.append({"id": f"img{i}", "image": f"img{i}.png", "conversations": [
            {"from": "human", "value": "<image>\nwhat color is the shape ?"}, {"from": "gpt", "value": answer}]})
    for i in range(text_only):
        records.append({"id": f"txt{i}", "conversations": [
            {"from": "human", "value": "describe one shape"}, {"from": "gpt", "value": " ".join(SHAPES[: 1 + i % 4])}]})
    path = folder / "data.json"
    path.write_text(json.dumps(records))
    return path


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """Tiny checkpoints + dataset + a base recipe (dict) pointing at them."""
    from tests.tiny_models import save_tiny_checkpoints, save_tiny_tokenizer
    from transformers import AutoTokenizer
    root = tmp_path_factory.mktemp("tiny")
    tok = AutoTokenizer.from_pretrained(save_tiny_tokenizer(root / "tok"))
    model_args = save_tiny_checkpoints(root / "ckpt", family="llama", hr="timm", tokenizer=tok)
    data_path = write_dataset(root / "data")
    recipe = {k: v for k, v in dataclasses.asdict(model_args).items() if v is not None}
    recipe.update(data_path=str(data_path), image_folder=str(data_path.parent), template="plain", max_length=64,
                  per_device_batch_size=2, gradient_accumulation_steps=2, learning_rate=1e-2, warmup_ratio=0.25,
                  num_workers=0, report_to="none", logging_steps=1, save_steps=1000, seed=0, stage="pretrain",
                  lora_r=4, lora_alpha=8, lora_dropout=0.0)
    return {"root": root, "recipe": recipe}


def write_recipe(path: Path, recipe: dict, **overrides) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump({**recipe, **overrides}))
    return path


def run_in_process(argv: list[str]) -> str:
    """train.main in this process; accelerate's singletons are reset so runs do not leak settings."""
    import train
    from accelerate.state import AcceleratorState, GradientState
    torch.set_num_threads(1)
    environ = dict(os.environ)
    try:
        return train.main(argv)
    finally:
        AcceleratorState._reset_state(True)
        GradientState._reset_state()
        os.environ.clear()   # accelerate exports RANK=0, WORLD_SIZE=1, ...: a later launch would inherit them
        os.environ.update(environ)


def metrics(output_dir) -> list[dict]:
    return [json.loads(line) for line in open(Path(output_dir) / "metrics.jsonl") if '"loss"' in line]


LAUNCH = [sys.executable, "-m", "accelerate.commands.launch"]
DIST_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def free_port() -> int:
    """Concurrent test runs must not collide on accelerate's default port 29500."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch(config: str, recipe: Path, *args, processes: int = 1, env=None, wait=True):
    """`accelerate launch --config_file accelerate_configs/<config> train.py recipe ...`, as a user runs it (fp32 on
    CPU). Not `--cpu`: with it, accelerate 1.15 runs a multi-GPU config as one plain process."""
    cmd = [*LAUNCH, "--config_file", str(ROOT / "accelerate_configs" / config), "--mixed_precision", "no",
           "--num_processes", str(processes), "--main_process_port", str(free_port()),
           str(ROOT / "train.py"), str(recipe), *map(str, args)]
    env = {**{k: v for k, v in os.environ.items() if k not in DIST_VARS}, "OMP_NUM_THREADS": "1", **(env or {})}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if not wait:
        return proc
    out, _ = proc.communicate(timeout=180)
    assert proc.returncode == 0, out[-4000:]
    return out


def trainables(output_dir, step: int) -> dict:
    from safetensors.torch import load_file
    return load_file(Path(output_dir) / f"checkpoint-{step:06d}" / "trainable_0.safetensors")


def assert_same_run(a: Path, b: Path, step: int, atol=1e-6):
    """Same per-step losses and grad norms, same trainable weights at `step`."""
    ma, mb = metrics(a), metrics(b)
    assert [m["step"] for m in ma] == [m["step"] for m in mb] == list(range(1, step + 1))
    torch.testing.assert_close(torch.tensor([m["loss"] for m in mb]), torch.tensor([m["loss"] for m in ma]),
                               rtol=1e-5, atol=atol)
    torch.testing.assert_close(torch.tensor([m["grad_norm"] for m in mb]),
                               torch.tensor([m["grad_norm"] for m in ma]), rtol=1e-4, atol=atol)
    wa, wb = trainables(a, step), trainables(b, step)
    assert wa.keys() == wb.keys() and wa
    for k in wa:
        # mining.key biases have a true gradient of exactly 0 (softmax ignores a shift shared by all keys); Adam
        # turns float noise there into moves of ~1e-6, whatever the process count: hence atol 1e-5 on weights.
        torch.testing.assert_close(wb[k], wa[k], rtol=1e-4, atol=max(atol, 1e-5),
                                   msg=lambda m, k=k: f"{k}: {m}")


# ---- the tests -----------------------------------------------------------------------------------------------------

def test_loss_goes_down_on_a_small_fixed_batch(tiny, tmp_path):
    """12 epochs of one batch of 4 (so also: epochs instead of max_steps), eval loss and tensorboard on."""
    data_path = write_dataset(tmp_path / "few", n=4, text_only=0)
    recipe = write_recipe(tmp_path / "r.yaml", tiny["recipe"], stage="finetune", template="vicuna_v1",
                          data_path=str(data_path), image_folder=str(data_path.parent), per_device_batch_size=4,
                          gradient_accumulation_steps=1, learning_rate=2e-2, warmup_ratio=0.0, num_epochs=12,
                          eval_data_path=str(data_path), eval_steps=6, report_to="tensorboard")
    out = tmp_path / "run"
    export = run_in_process([str(recipe), "--output_dir", str(out)])
    losses = [m["loss"] for m in metrics(out)]
    assert len(losses) == 12 and losses[-1] < 0.5 * losses[0], losses
    evals = [m["eval_loss"] for m in map(json.loads, open(out / "metrics.jsonl")) if "eval_loss" in m]
    assert len(evals) == 2 and evals[1] < evals[0]
    assert list(out.glob("**/events.out.tfevents*")), "the tensorboard tracker wrote nothing"
    saved = yaml.safe_load(open(Path(export) / "train_config.yaml"))   # the resolved config, a valid recipe
    assert saved["num_epochs"] == 12 and saved["stage"] == "finetune" and saved["llm"] == tiny["recipe"]["llm"]


def test_packed_rows_train_and_export(tiny, tmp_path):
    """packing=True: rows hold several whole samples (data.PackedBatchSampler), counted as samples in the log."""
    recipe = write_recipe(tmp_path / "r.yaml", tiny["recipe"], stage="finetune", template="vicuna_v1",
                          packing=True, max_length=96, max_steps=3)
    out = tmp_path / "run"
    export = run_in_process([str(recipe), "--output_dir", str(out)])
    logs = metrics(out)
    assert len(logs) == 3 and all(torch.isfinite(torch.tensor(m["loss"])) for m in logs)
    assert all(m["samples_per_s"] > 0 for m in logs) and (Path(export) / "mgm_config.json").exists()


@pytest.mark.parametrize("name", sorted(p.name for p in (ROOT / "recipes").glob("mgm_*.yaml")))
def test_recipes_parse_and_the_command_line_wins(name):
    import train
    recipe = yaml.safe_load(open(ROOT / "recipes" / name))
    model_args, data_args, args = train.parse_args([str(ROOT / "recipes" / name), "--per_device_batch_size", "3"])
    train.check_args(model_args, args)
    assert recipe["per_device_batch_size"] != 3 and args.per_device_batch_size == 3
    assert (model_args.llm, data_args.data_path, args.stage) == (recipe["llm"], recipe["data_path"], recipe["stage"])


def test_switches_and_parameter_groups(tiny):
    """Tower tuning trains the last half of the CLIP layers that feed the selected layer and the last ConvNeXt
    stage; norms and biases get no weight decay; projector / mining / lr_multi set their own lr."""
    import train
    recipe = str(write_recipe(tiny["root"] / "sw.yaml", tiny["recipe"]))

    def build(*overrides):
        model_args, _, args = train.parse_args([recipe, "--stage", "finetune", *overrides])
        train.check_args(model_args, args)
        return train.build(model_args, args, train.load_tokenizer(model_args.llm)), args

    model, args = build("--tune_vision_tower", "true", "--tune_vision_tower_aux", "true", "--weight_decay", "0.1",
                        "--mining_lr", "1e-3", "--lr_multi", "vision_tower_aux:0.5")
    trains = {n for n, p in model.named_parameters() if p.requires_grad}
    clip = {n for n in trains if n.startswith("vision_tower.")}
    assert clip and all(".encoder.layers.0." in n for n in clip)  # 1 of 2
    aux = {n for n in trains if n.startswith("vision_tower_aux.")}
    assert aux and all(n.startswith("vision_tower_aux.stages.3.") for n in aux)
    lr_of = {id(p): (g["lr"], g["weight_decay"]) for g in train.param_groups(model, args) for p in g["params"]}
    named = dict(model.named_parameters())
    assert lr_of[id(named["mining.query.1.weight"])] == (1e-3, 0.1)       # a Linear after a LayerNorm
    assert lr_of[id(named["mining.query.0.weight"])] == (1e-3, 0.0)       # the LayerNorm
    assert all(lr_of[id(named[n])][0] == pytest.approx(0.5e-2) for n in aux)
    assert all(lr_of[id(named[n])][1] == 0.0 for n in trains if n.endswith("bias") or "norm" in n)
    assert lr_of[id(named["llm.model.layers.0.mlp.up_proj.weight"])] == (1e-2, 0.1)

    model, _ = build("--train_embeddings", "true")
    assert {n for n, p in model.named_parameters() if p.requires_grad and n.startswith("llm.")} == \
        {"llm.model.embed_tokens.weight", "llm.lm_head.weight"}
    model, _ = build("--freeze_projector", "true")
    assert not any(p.requires_grad for p in model.projector.parameters())
    assert all(p.requires_grad for p in model.mining.parameters())


def test_gradient_accumulation_weights_every_supervised_token_equally(tiny):
    """One micro-batch of 4 and four micro-batches of 1 (answers of 1 to 4 words) give the same gradient; the
    naive mean of per-micro-batch means does not."""
    import data
    import train
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState
    model_args, data_args, args = train.parse_args([str(write_recipe(tiny["root"] / "ga.yaml", tiny["recipe"])),
                                                    "--stage", "finetune", "--template", "vicuna_v1"])
    tokenizer = train.load_tokenizer(model_args.llm)
    model = train.build(model_args, args, tokenizer)
    dataset = data.build_dataset(data_args, tokenizer, model.image_settings(), model.tokens_per_image)
    samples = [dataset[i] for i in range(4)]
    lengths = {int((s["labels"] != data.IGNORE_INDEX).sum()) for s in samples}
    assert len(lengths) == 4, "the four answers must have different lengths"
    collate = train.collate_fn(tokenizer)

    def grads(window, accumulation):
        accelerator = Accelerator(gradient_accumulation_steps=accumulation, cpu=True)
        model.zero_grad(set_to_none=True)
        train.forward_backward(accelerator, model, window, train.supervised_tokens(accelerator, window))
        AcceleratorState._reset_state(True)
        GradientState._reset_state()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    model.train()
    one = grads([collate(samples)], 1)
    four = grads([collate([s]) for s in samples], 4)
    for name in one:
        torch.testing.assert_close(four[name], one[name], rtol=1e-4, atol=1e-7, msg=name)
    model.zero_grad(set_to_none=True)
    for s in samples:   # what a per-micro-batch mean loss would do
        (model(**train.model_inputs(collate([s]), "cpu")).loss / 4).backward()
    naive = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert not torch.allclose(naive["projector.0.weight"], one["projector.0.weight"], rtol=1e-3)


def test_dropped_samples_are_counted_and_an_emptied_micro_batch_still_steps(tiny, tmp_path):
    """Two image records whose files are missing form one micro-batch (the sampler never mixes modalities), which
    data.py empties; the step still runs on the text-only micro-batch and the counters reach the checkpoint."""
    folder = tmp_path / "data"
    records = [{"id": f"bad{i}", "image": f"missing{i}.png", "conversations": [
        {"from": "human", "value": "<image>\nwhat color is the shape ?"}, {"from": "gpt", "value": "red"}]}
        for i in range(2)]
    records += [{"id": f"txt{i}", "conversations": [
        {"from": "human", "value": "describe one shape"}, {"from": "gpt", "value": "circle square"}]} for i in range(2)]
    folder.mkdir()
    (folder / "data.json").write_text(json.dumps(records))
    recipe = write_recipe(tmp_path / "r.yaml", tiny["recipe"], stage="finetune", template="vicuna_v1",
                          data_path=str(folder / "data.json"), image_folder=str(folder), max_steps=1, save_steps=1)
    run_in_process([str(recipe), "--output_dir", str(tmp_path / "run")])
    assert 0 < metrics(tmp_path / "run")[0]["loss"] < 100
    state = torch.load(tmp_path / "run" / "checkpoint-000001" / "custom_checkpoint_0.pkl", weights_only=False)
    assert sum(state["skipped_samples"].values()) == 2, state


@pytest.mark.parametrize("stage", ["finetune", "pretrain"])
def test_two_processes_give_the_update_of_one_big_batch(tiny, tmp_path, stage):
    """One epoch (4 steps), text-only steps included: in pretrain those reach no trainable through the text, and
    the model's zero-weighted vision pass keeps DDP's gradient sync in step."""
    recipe = write_recipe(tmp_path / "r.yaml", tiny["recipe"], stage=stage, template="vicuna_v1",
                          max_steps=4, save_steps=4)
    one, two = tmp_path / "one", tmp_path / "two"
    run_in_process([str(recipe), "--output_dir", str(one), "--per_device_batch_size", "4"])
    out = launch("multi_gpu.yaml", recipe, "--output_dir", two, "--per_device_batch_size", "2", processes=2)
    # Some CPU launch variants start two independent single processes: make sure this one is really distributed.
    assert "distributed: DistributedType.MULTI_CPU, 2 process(es)" in out, out[-3000:]
    assert_same_run(one, two, step=4)


def test_non_finite_steps_are_skipped_then_stop_the_run(tiny, tmp_path, monkeypatch):
    import train
    real = train.forward_backward
    monkeypatch.setattr(train, "forward_backward", lambda *a: (float("nan"), *real(*a)[1:]))
    recipe = write_recipe(tmp_path / "r.yaml", tiny["recipe"], max_steps=10, max_bad_steps=3)
    with pytest.raises(RuntimeError, match=r"3 non-finite steps in a row, the last at step 3; sample ids .*'(img|txt)"):
        run_in_process([str(recipe), "--output_dir", str(tmp_path / "run")])


def test_qlora_on_two_processes_trains_exports_and_the_merged_model_loads(tiny, tmp_path):
    import model as mgm
    recipe = write_recipe(tmp_path / "r.yaml", tiny["recipe"], stage="finetune", tune="qlora", bits=4,
                          template="vicuna_v1", max_steps=3, learning_rate=1e-3, gradient_checkpointing=True)
    out = launch("multi_gpu.yaml", recipe, "--output_dir", tmp_path / "run", processes=2)   # distributed QLoRA
    assert "distributed: DistributedType.MULTI_CPU, 2 process(es)" in out, out[-3000:]
    assert len(metrics(tmp_path / "run")) == 3
    export = tmp_path / "run" / "export"
    assert json.loads((Path(export) / "mgm_config.json").read_text())["export"] == "lora"
    assert (Path(export) / "adapter").is_dir()
    merged = mgm.merge_lora_export(export, tmp_path / "merged")
    model = mgm.MiniGemini.from_pretrained(merged)
    ids = torch.tensor([[1, 5, 6]])
    assert model(input_ids=ids).logits.shape[:2] == (1, 3)


@pytest.mark.parametrize("stage,tune", [("pretrain", "full"), ("finetune", "lora")])
def test_resume_after_kill_9_matches_an_uninterrupted_run(tiny, tmp_path, stage, tune):
    """6 steps uninterrupted == 3 steps, kill -9 while checkpoint-6 is being written, resume from checkpoint-3,
    3 more steps. The killed save leaves checkpoint-3 whole; RNG matters (LoRA dropout)."""
    recipe = write_recipe(tmp_path / "r.yaml", tiny["recipe"], stage=stage, tune=tune, max_steps=6, save_steps=3,
                          save_total_limit=1, lora_dropout=0.1, resume="auto",
                          template="plain" if stage == "pretrain" else "vicuna_v1")
    ref, run = tmp_path / "ref", tmp_path / "run"
    run_in_process([str(recipe), "--output_dir", str(ref)])

    proc = launch("single_gpu.yaml", recipe, "--output_dir", run, env={"MGM_DEBUG_HANG": "save:6"}, wait=False)
    lines = []
    for line in proc.stdout:
        lines.append(line)
        hang = re.search(r"MGM_DEBUG_HANG pid=(\d+) at save:6", line)
        if hang:
            os.kill(int(hang.group(1)), signal.SIGKILL)   # the training process itself
            break
    proc.communicate(timeout=60)
    assert proc.returncode != 0, "".join(lines[-50:])
    assert sorted(p.name for p in run.iterdir() if p.name.startswith("checkpoint")) == \
        ["checkpoint-000003", "checkpoint-000006.tmp"]

    out = launch("single_gpu.yaml", recipe, "--output_dir", run)
    assert "resumed from" in out and "checkpoint-000003 at step 3 (epoch 0, batch 6)" in out, out[-3000:]
    assert sorted(p.name for p in run.iterdir() if p.name.startswith("checkpoint")) == ["checkpoint-000006"]
    assert_same_run(ref, run, step=6)
    saved = yaml.safe_load(open(run / "checkpoint-000006" / "train_config.yaml"))
    assert saved["stage"] == stage and saved["tune"] == tune


def test_a_run_whose_records_are_mostly_unusable_stops_early(tiny, tmp_path):
    """A wrong image_folder makes every image record "image not found": the run stops, naming the kinds."""
    recipe = write_recipe(tmp_path / "r.yaml", tiny["recipe"], image_folder=str(tmp_path / "nowhere"),
                          per_device_batch_size=8, max_steps=20)
    with pytest.raises(RuntimeError, match=r"records seen so far were unusable .*image not found"):
        run_in_process([str(recipe), "--output_dir", str(tmp_path / "run")])
