"""The embedded demo: answer scoring, a shortened `python demo.py` end to end (data, stage 0, both stages through
`accelerate launch train.py`, export, eval.py, chat.py), and generalization to shapes drawn by independent code."""
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO
from PIL import Image

import eval as evaluation
from eval import Answerer, load_for_inference, load_questions, normalize_answer, score

# The demo's vocabulary, with colour values of our own (not demo.py's table).
RGB = {"red": (228, 38, 33), "green": (47, 168, 62), "blue": (38, 82, 228), "yellow": (242, 212, 44),
       "purple": (142, 58, 182), "orange": (250, 142, 35)}
SHAPES = ("circle", "square", "triangle", "star")


def test_answers_match_after_normalizing_case_punctuation_and_articles():
    assert normalize_answer("The Red.") == "red"
    assert normalize_answer("  a   STAR! ") == "star"
    assert normalize_answer("an orange") == "orange"
    assert normalize_answer("Square") == normalize_answer("square.")
    assert normalize_answer("red circle") != normalize_answer("red")


def test_score_writes_one_prediction_per_question(tmp_path):
    data = tmp_path / "q.json"
    data.write_text(json.dumps([
        {"id": "a", "image": "x.png", "conversations": [{"from": "human", "value": "<image>\nWhat color?"},
                                                        {"from": "gpt", "value": "red"}]},
        {"id": "b", "conversations": [{"role": "user", "content": "What shape?"},
                                      {"role": "assistant", "content": "A star."}]}]))
    questions = load_questions(str(data))
    assert [q.images for q in questions] == [["x.png"], []]
    assert score(questions, ["Red", "circle"], str(tmp_path / "p.jsonl")) == 0.5
    rows = [json.loads(line) for line in open(tmp_path / "p.jsonl")]
    assert [(r["id"], r["prediction"], r["correct"]) for r in rows] == [("a", "Red", True), ("b", "circle", False)]


@pytest.fixture(scope="module")
def short_demo(tmp_path_factory):
    """`python demo.py` with small data and few steps: (its stdout, its stderr, the finetuned export dir)."""
    root = tmp_path_factory.mktemp("demo")
    cmd = [sys.executable, "demo.py", "--data_dir", str(root / "data"), "--output_dir", str(root / "runs"),
           "--pretrain_images", "128", "--finetune_images", "2000", "--test_images", "60",
           "--stage0_images", "256", "--stage0_steps", "30",
           "--pretrain_overrides=--max_steps 4", "--finetune_overrides=--max_steps 150 --logging_steps 50"]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=540,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout, done.stderr, root / "runs" / "finetune"


def test_short_demo_runs_every_step_and_learns(short_demo):
    out, err, export = short_demo
    for step in range(1, 8):
        assert f"[{step}/7]" in out
    colour, shape = re.search(r"^stage 0 check on 400 held-out images: colour ([\d.]+), shape ([\d.]+)$", out,
                              re.M).groups()
    assert float(colour) > 1 / 6 + 0.1, out[-2000:]         # 30 steps already beat chance on colour
    assert not re.findall(r".*(?:Warning\b|\[WARNING\]).*", out + err)   # nothing the user cannot act on
    accuracy, n = re.findall(r"^accuracy: ([\d.]+) \(n=(\d+)\)$", out, re.M)[-1]
    assert int(n) == 120
    assert float(accuracy) >= 0.5, out[-2000:]          # chance is at most 0.25 (colour 1/6, shape 1/4)
    assert (export / "mgm_config.json").exists() and (export / "train_config.yaml").exists()
    lines = out.splitlines()
    answer_at = next(i for i, line in enumerate(lines) if line.startswith("$ python chat.py")) + 1
    chat_answer = lines[answer_at]
    assert normalize_answer(chat_answer) in SHAPES      # chat.py's one answer to "What shape is this?"
    test_records = export.parents[1] / "data" / "test.jsonl"    # the line after it shows the truth beside it
    truth = json.loads(test_records.read_text().splitlines()[1])
    assert truth["id"] == "test-0-shape"
    assert lines[answer_at + 1] == f"(held-out answer in {test_records}: {truth['conversations'][1]['value']})"


def test_short_demo_answers_colours_of_independently_drawn_images(short_demo, tmp_path):
    _, _, export = short_demo
    accuracy = evaluate_on_independent_images(export, tmp_path, n=48, kinds=("color",))
    assert accuracy >= 0.6                               # chance: 1/6


def test_lora_on_top_of_the_demo_model_starts_from_what_it_learned(short_demo, tmp_path, capsys):
    """init_from the demo's finetune export (its own model, tokenizer and template, chatml): the first LoRA step's
    loss is already low (the weights are the trained ones; a new model starts near ln(vocab)), and the LoRA export
    answers as well as the demo model did."""
    from tests.test_train import metrics, run_in_process, write_recipe
    _, _, export = short_demo
    data = export.parents[1] / "data"
    recipe = write_recipe(tmp_path / "r.yaml", dict(
        init_from=str(export), dtype="float32", data_path=str(data / "finetune.jsonl"),
        image_folder=str(data / "images"), stage="finetune", tune="lora", lora_r=4, lora_alpha=8, learning_rate=1e-4, max_steps=2,
        per_device_batch_size=8, max_length=64, num_workers=0, report_to="none", output_dir=str(tmp_path / "run")))
    lora = run_in_process([str(recipe)])
    first = metrics(tmp_path / "run")[0]["loss"]
    assert first < 1.0, first
    capsys.readouterr()
    evaluation.main(["--model", lora, "--data", str(data / "test.jsonl"), "--image_folder", str(data / "images"),
                     "--limit", "40"])
    accuracy = float(re.search(r"^accuracy: ([\d.]+) \(n=40\)$", capsys.readouterr().out, re.M).group(1))
    assert accuracy >= 0.5


@pytest.fixture
def tiny_export(tmp_path):
    """A full export of a tiny random model (tests/tiny_models.py) trained with the plain template."""
    from transformers import AutoTokenizer

    from tests.tiny_models import build, save_tiny_tokenizer
    tok = AutoTokenizer.from_pretrained(save_tiny_tokenizer(tmp_path / "tok"))
    build(tmp_path / "base", tok).save_pretrained(tmp_path / "export", tok)
    (tmp_path / "export" / "train_config.yaml").write_text("template: plain\n")
    return tmp_path / "export"


def test_eval_skips_and_names_bad_records_and_keeps_the_predictions_it_has(tiny_export, tmp_path, capsys):
    """A missing image, an <image> tag without an image and a broken JSONL line are skipped by id (the line's file and
    number), counted, and make the exit status 1 past --max_skip_fraction; the answers are written either way."""
    export = tiny_export
    paint("circle", RGB["red"], np.random.default_rng(0)).save(tmp_path / "red.png")
    ask = [{"from": "human", "value": "<image>\nWhat color is the shape?"}, {"from": "gpt", "value": "red"}]
    lines = [json.dumps({"id": "good", "image": "red.png", "conversations": ask}),
             json.dumps({"id": "no_file", "image": "gone.png", "conversations": ask}),
             json.dumps({"id": "no_image", "conversations": ask}),
             '{"id": "torn", "conversations": [',
             json.dumps({"id": "good2", "image": "red.png", "conversations": ask})]
    (tmp_path / "q.jsonl").write_text("\n".join(lines) + "\n")
    argv = ["--model", str(export), "--data", str(tmp_path / "q.jsonl"), "--image_folder", str(tmp_path),
            "--output", str(tmp_path / "p.jsonl"), "--batch_size", "2"]
    with pytest.raises(SystemExit) as stop:
        evaluation.main(argv)
    assert stop.value.code == 1
    out, err = capsys.readouterr()
    assert "skipped record q.jsonl:4: invalid JSON" in err
    assert "skipped record no_file: image not found: gone.png" in err
    assert "skipped record no_image: image/tag mismatch: 1 <image> tags but 0 images" in err
    assert "skipped: 3 of 5 records" in out and re.search(r"^accuracy: [\d.]+ \(n=2\)$", out, re.M)
    assert [json.loads(line)["id"] for line in open(tmp_path / "p.jsonl")] == ["good", "good2"]
    assert evaluation.main(argv + ["--max_skip_fraction", "0.6"]) >= 0.0
    with pytest.raises(ValueError, match=r"q.jsonl: record q.jsonl:4: invalid JSON"):   # without a skipped list
        load_questions(str(tmp_path / "q.jsonl"))
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(ValueError, match=r"empty.jsonl: holds no records"):
        load_questions(str(tmp_path / "empty.jsonl"))

    bare = tmp_path / "bare"   # an export that lost its train_config.yaml and its chat template
    shutil.copytree(export, bare)
    (bare / "train_config.yaml").unlink()
    (bare / "chat_template.jinja").unlink(missing_ok=True)
    config = json.loads((bare / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (bare / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"names no template .*: pass --template"):
        load_for_inference(str(bare))


@pytest.mark.skipif(not (REPO / "runs/demo/finetune/mgm_config.json").exists(), reason="run `make demo` first")
def test_demo_model_generalizes_to_independently_drawn_images(tmp_path):
    accuracy = evaluate_on_independent_images(REPO / "runs/demo/finetune", tmp_path, n=200)
    assert accuracy >= 0.9                               # colour and shape; chance is at most 0.25


# ---- an independent drawing of the same vocabulary: numpy masks, other sizes, shapes' proportions, backgrounds ----

def evaluate_on_independent_images(export, folder: Path, n: int, kinds=("color", "shape"), seed=1234) -> float:
    rng = np.random.default_rng(seed)
    records = []
    for i in range(n):
        color, shape = RGB_NAMES[rng.integers(len(RGB_NAMES))], SHAPES[rng.integers(len(SHAPES))]
        image = paint(shape, RGB[color], rng)
        image.save(folder / f"{i}.png")
        for kind in kinds:
            question, answer = ("What color is the shape?", color) if kind == "color" else ("What shape is this?", shape)
            records.append({"id": f"{i}-{kind}", "image": f"{i}.png", "conversations": [
                {"from": "human", "value": "<image>\n" + question}, {"from": "gpt", "value": answer}]})
    (folder / "questions.json").write_text(json.dumps(records))
    questions = load_questions(str(folder / "questions.json"))
    answer = Answerer(*load_for_inference(str(export)))
    predictions = []
    for i in range(0, len(questions), 50):
        batch = questions[i:i + 50]
        predictions += answer([q.question for q in batch], [[Image.open(folder / q.images[0])] for q in batch])
    return score(questions, predictions)


RGB_NAMES = tuple(RGB)


def paint(shape: str, rgb, rng) -> Image.Image:
    """A filled shape rasterized from its equations on a light background of random shade and tint."""
    w, h = int(rng.integers(72, 240)), int(rng.integers(72, 240))
    if max(w, h) > 1.8 * min(w, h):
        h = int(min(h, 1.8 * w)) if h > w else h
        w = int(min(w, 1.8 * h)) if w > h else w
    base = rng.uniform(195, 252)
    background = np.clip(base + rng.uniform(-10, 10, size=3), 0, 255)
    half = rng.uniform(0.22, 0.4) * min(w, h)                     # half the shape's extent
    cx, cy = rng.uniform(half, w - half), rng.uniform(half, h - half)
    y, x = np.mgrid[0:h, 0:w].astype(float) + 0.5
    dx, dy = (x - cx) / half, (y - cy) / half                       # the shape's own coordinates, extent [-1, 1]
    if shape == "circle":
        mask = dx ** 2 + dy ** 2 <= 1
    elif shape == "square":
        mask = (np.abs(dx) <= 0.8) & (np.abs(dy) <= 0.8)
    elif shape == "triangle":                                       # apex up, base at the bottom
        mask = (dy <= 0.7) & (dy >= -1 + 2 * np.abs(dx) * 1.15)
    else:                                                           # five points, one up
        angles = np.pi / 2 + np.arange(10) * np.pi / 5
        radii = np.where(np.arange(10) % 2 == 0, 1.0, 0.42)
        mask = inside_polygon(dx, -dy, radii * np.cos(angles), radii * np.sin(angles))
    pixels = np.where(mask[..., None], np.array(rgb, dtype=float), background)
    return Image.fromarray(pixels.astype(np.uint8))


def inside_polygon(px, py, xs, ys):
    """Even-odd rule, vectorized over pixels."""
    inside = np.zeros(px.shape, dtype=bool)
    for i in range(len(xs)):
        x0, y0, x1, y1 = xs[i - 1], ys[i - 1], xs[i], ys[i]
        crosses = (y0 > py) != (y1 > py)
        with np.errstate(divide="ignore", invalid="ignore"):
            at = x0 + (py - y0) * (x1 - x0) / (y1 - y0)
        inside ^= crosses & (px < at)
    return inside


def test_preference_tuning_of_the_demo_model_prefers_the_right_answers(short_demo, capfd):
    """demo.py --dpo_steps: pairs whose rejected answer names a wrong colour or shape, stage dpo from the demo's
    finetune export (init_from), then eval.py --pairs: held-out reward accuracy well above its start (0: the policy
    is its reference there), and the held-out answers still right."""
    import demo
    _, _, export = short_demo
    root = export.parents[1]
    args = demo.DemoArguments(data_dir=str(root / "data"), output_dir=str(root / "runs"), dpo_steps=60)
    capfd.readouterr()
    demo.preference_tuning(args, root / "data", root / "runs")
    out = capfd.readouterr().out
    reward, margin, n = re.search(r"^reward accuracy: ([\d.]+) margin: (-?[\d.]+) \(n=(\d+)\)$", out, re.M).groups()
    assert int(n) == 120 and float(reward) > 0.6 and float(margin) > 0, out[-2000:]
    accuracy = re.findall(r"^accuracy: ([\d.]+) \(n=120\)$", out, re.M)[-1]
    assert float(accuracy) >= 0.5, out[-2000:]
