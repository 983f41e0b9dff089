"""lmms-eval scores an export through its own entry point (`python -m lmms_eval --model mini_gemini`), offline, on a
tiny local task in its task format (images on disk, questions and answers in JSONL, lmms-eval's exact-match scoring):
its answers and score equal eval.py's on the same questions. The adapter's other paths (pretrain-only and LoRA
exports, `until` stop strings, loglikelihood) run on lmms-eval's own request objects."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO
from PIL import Image

COLOURS = {"red": (220, 30, 30), "green": (30, 170, 60), "blue": (40, 80, 220), "yellow": (240, 210, 40)}
MISS = "zebra"          # a reference no prediction can equal (not in the tiny vocabulary)

TASK = """\
task: mgm_tiny_vqa
dataset_path: json
dataset_kwargs:
  data_files: {data}
test_split: train
output_type: generate_until
doc_to_visual: !function tiny_utils.doc_to_visual
doc_to_text: !function tiny_utils.doc_to_text
doc_to_target: !function tiny_utils.doc_to_target
generation_kwargs:
  max_new_tokens: 6
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
    ignore_case: true
    ignore_punctuation: true
"""
UTILS = '''\
from pathlib import Path

from PIL import Image

HERE = Path(__file__).parent


def doc_to_visual(doc):
    return [Image.open(HERE / "images" / name).convert("RGB") for name in doc["image"]]


def doc_to_text(doc):          # benchmark prompts carry no image tags: the model adds its own
    return doc["conversations"][0]["value"].replace("<image>\\n", "")


def doc_to_target(doc):
    return doc["conversations"][1]["value"]
'''


def write_task(folder: Path, references: list[str] | None = None) -> Path:
    """The task folder: images, questions.jsonl (LLaVA records, which eval.py reads too), the task YAML and its
    functions. A record has one image, two images, or none. References default to MISS."""
    (folder / "images").mkdir(parents=True, exist_ok=True)
    for name, rgb in COLOURS.items():
        Image.new("RGB", (40, 30), rgb).save(folder / "images" / f"{name}.png")
        Image.new("RGB", (18, 24), rgb).save(folder / "images" / f"{name}_tall.png")
    images = [["red.png"], ["blue_tall.png"], ["green.png", "yellow_tall.png"], [], ["yellow.png"],
              ["red_tall.png", "blue.png"], ["green_tall.png"], []]
    records = []
    for i, imgs in enumerate(images):
        question = "<image>\n" * len(imgs) + ("What color is the shape?" if imgs else "What shape is a circle?")
        records.append({"id": f"q{i}", "image": imgs, "conversations": [
            {"from": "human", "value": question}, {"from": "gpt", "value": references[i] if references else MISS}]})
    data = folder / "questions.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    (folder / "mgm_tiny_vqa.yaml").write_text(TASK.format(data=data))
    (folder / "tiny_utils.py").write_text(UTILS)
    return data


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny HD (2x2 crops + global view) full export, the task folder, and eval.py's greedy answers there."""
    from transformers import AutoTokenizer

    import eval as eval_py
    from tests.tiny_models import build, save_tiny_tokenizer
    root = tmp_path_factory.mktemp("lmms")
    tok = AutoTokenizer.from_pretrained(save_tiny_tokenizer(root / "tokenizer"))
    build(root, tok, hd=True).save_pretrained(root / "export", tok)
    record_template(root / "export")
    data = write_task(root / "task")
    eval_py.main(["--model", str(root / "export"), "--data", str(data), "--image_folder", str(root / "task/images"),
                  "--output", str(root / "greedy.jsonl"), "--max_new_tokens", "6", "--batch_size", "4"])
    greedy = [json.loads(line)["prediction"] for line in (root / "greedy.jsonl").read_text().splitlines()]
    return root / "export", root / "task", greedy


def record_template(export: Path, template: str = "vicuna_v1") -> None:
    """What train.py writes into every export: eval.py and the adapter answer in the export's own template."""
    (export / "train_config.yaml").write_text(f"template: {template}\n")


def run_lmms_eval(export: Path, task_dir: Path, out: Path, tasks: str) -> tuple[str, dict, dict]:
    """`python -m lmms_eval` from outside the repository, offline -> (stdout, results JSON, {task: samples})."""
    cmd = [sys.executable, "-m", "lmms_eval", "--model", "mini_gemini", "--model_args", f"pretrained={export}",
           "--tasks", tasks, "--include_path", str(task_dir), "--batch_size", "3", "--log_samples",
           "--output_path", str(out)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "HF_DATASETS_CACHE": str(out / "hf_datasets"), "WANDB_MODE": "disabled"}
    done = subprocess.run(cmd, cwd=out, env=env, capture_output=True, text=True, timeout=300)
    log = done.stdout + done.stderr
    # lmms-eval exits 0 even when the evaluation failed (it only logs the error): read its results, not its code.
    results = sorted(out.rglob("*_results.json"))
    assert done.returncode == 0 and results, log[-4000:]
    samples = {}
    for path in out.rglob("*_samples_*.jsonl"):
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        samples[path.stem.split("_samples_")[1]] = sorted(rows, key=lambda r: r["doc_id"])
    return done.stdout, json.loads(results[-1].read_text()), samples


def table_value(stdout: str, task: str, metric: str) -> float:
    """The value in lmms-eval's printed results table: |Tasks|Filter|n-shot|Metric|↑|Value|±|Stderr|..."""
    for line in stdout.splitlines():
        cells = [c.strip() for c in line.split("|")]
        if task in cells and metric in cells:
            return float(next(c for c in cells[cells.index(metric) + 1:] if re.fullmatch(r"[\d.]+", c)))
    raise AssertionError(f"no {task}/{metric} row in the printed table:\n{stdout[-3000:]}")


def adapter_requests(task_dir: Path, request_type: str, args: list[tuple]) -> tuple[list, list[dict]]:
    """lmms-eval request objects over the task's docs: args are (doc index, the request's second argument)."""
    import importlib.util

    from lmms_eval.api.instance import Instance
    spec = importlib.util.spec_from_file_location("tiny_utils", task_dir / "tiny_utils.py")
    task = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(task)
    docs = [json.loads(line) for line in (task_dir / "questions.jsonl").read_text().splitlines()]
    return [Instance(request_type, (task.doc_to_text(docs[i]), second, task.doc_to_visual, i, "tiny", "train"),
                     idx=0, metadata={"task": "tiny", "doc_id": i, "repeats": 1}) for i, second in args], docs


def test_lmms_eval_scores_an_export_as_eval_py_does(tiny, tmp_path):
    """Every even question's reference is eval.py's own answer, every odd one MISS: both scorers must find 0.5, and
    lmms-eval's answers must be eval.py's word for word (same prompt, images, template and greedy decoding)."""
    import eval as eval_py
    export, task_dir, greedy = tiny
    data = write_task(task_dir, [g if i % 2 == 0 else MISS for i, g in enumerate(greedy)])
    expected = eval_py.main(["--model", str(export), "--data", str(data), "--image_folder", str(task_dir / "images"),
                             "--output", str(tmp_path / "eval.jsonl"), "--max_new_tokens", "6"])
    assert expected == 0.5

    stdout, results, samples = run_lmms_eval(export, task_dir, tmp_path, "mgm_tiny_vqa")
    print(stdout)
    assert results["results"]["mgm_tiny_vqa"]["exact_match,none"] == pytest.approx(expected)
    assert table_value(stdout, "mgm_tiny_vqa", "exact_match") == pytest.approx(expected, abs=1e-4)
    assert [s["filtered_resps"] for s in samples["mgm_tiny_vqa"]] == greedy


def test_loglikelihood_ranks_the_greedy_first_word_highest(tiny):
    """lmms-eval's loglikelihood requests (multiple-choice tasks) through the adapter: after each question, the first
    word greedy decoding chose has the highest log-probability of the four candidates and is the only greedy one."""
    from lmms_adapter import MiniGeminiLMM
    export, task_dir, greedy = tiny
    args, firsts = [], []
    for i, answer in enumerate(greedy):
        if answer.split():                 # (an empty answer: the model stopped at once, no first word)
            firsts.append(answer.split()[0])
            args += [(i, " " + word) for word in [firsts[-1]] + [w for w in COLOURS if w != firsts[-1]][:3]]
    assert firsts, greedy
    requests, docs = adapter_requests(task_dir, "loglikelihood", args)
    lm = MiniGeminiLMM(pretrained=str(export), batch_size=5, device="cpu")
    lm.task_dict = {"tiny": {"train": docs}}
    results = lm.loglikelihood(requests)
    for k in range(len(firsts)):
        scores = results[4 * k:4 * k + 4]
        assert max(range(4), key=lambda j: scores[j][0]) == 0, scores
        assert [g for _, g in scores] == [True, False, False, False], scores
        assert all(lp < 0 for lp, _ in scores)
    # The images reach the model: the same question and word score differently after a red and a yellow image.
    red, yellow = lm.loglikelihood(adapter_requests(task_dir, "loglikelihood", [(0, " red"), (4, " red")])[0])
    assert red[0] != pytest.approx(yellow[0], abs=1e-6)


@pytest.mark.skipif(not (REPO / "runs/demo/finetune/mgm_config.json").exists(), reason="run `make demo` first")
def test_lmms_eval_scores_the_demo_export_as_eval_py_does(tmp_path):
    """The demo's finetuned export on the colour questions (true references): the same score and answers."""
    import eval as eval_py
    export, task_dir = REPO / "runs/demo/finetune", tmp_path / "task"
    questions = [json.loads(line) for line in write_task(task_dir).read_text().splitlines()]
    truth = [q["image"][0].split("_")[0].removesuffix(".png") if q["image"] else "circle" for q in questions]
    data = write_task(task_dir, truth)
    expected = eval_py.main(["--model", str(export), "--data", str(data), "--image_folder", str(task_dir / "images"),
                             "--output", str(tmp_path / "eval.jsonl"), "--max_new_tokens", "6"])
    greedy = [json.loads(line)["prediction"] for line in (tmp_path / "eval.jsonl").read_text().splitlines()]
    stdout, results, samples = run_lmms_eval(export, task_dir, tmp_path, "mgm_tiny_vqa")
    print(stdout)
    assert results["results"]["mgm_tiny_vqa"]["exact_match,none"] == pytest.approx(expected)
    assert [s["filtered_resps"] for s in samples["mgm_tiny_vqa"]] == greedy


@pytest.mark.parametrize("kind", ["pretrain", "lora"])
def test_adapter_answers_pretrain_and_lora_exports_as_eval_py_does(tiny, tmp_path, kind):
    """generate_until on lmms-eval's own request objects, for the other export kinds (standard resolution), cut at
    the task's `until` string: eval.py's answers, cut the same way."""
    from transformers import AutoTokenizer

    import eval as eval_py
    from lmms_adapter import MiniGeminiLMM
    from model import apply_lora, set_stage
    from tests.tiny_models import build
    export, task_dir, _ = tiny
    root = export.parent
    tok = AutoTokenizer.from_pretrained(root / "tokenizer")
    model = build(root, tok)
    if kind == "pretrain":
        set_stage(model, "pretrain", print_fn=None)
    else:
        model = apply_lora(model, r=4, alpha=8, dropout=0.0)
        for name, p in model.llm.named_parameters():       # LoRA B starts at zero: make the adapters matter
            if "lora_B" in name:
                p.data.normal_(0, 0.5)
    model.save_pretrained(tmp_path / kind, tok)
    record_template(tmp_path / kind)
    eval_py.main(["--model", str(tmp_path / kind), "--data", str(task_dir / "questions.jsonl"), "--image_folder",
                  str(task_dir / "images"), "--output", str(tmp_path / "eval.jsonl"), "--max_new_tokens", "5"])
    predictions = [json.loads(line)["prediction"] for line in (tmp_path / "eval.jsonl").read_text().splitlines()]

    requests, docs = adapter_requests(task_dir, "generate_until",
                                      [(i, {"max_new_tokens": 5, "until": [":"]}) for i in range(len(predictions))])
    lm = MiniGeminiLMM(pretrained=str(tmp_path / kind), batch_size=3, device="cpu")
    lm.task_dict = {"tiny": {"train": docs}}
    assert lm.generate_until(requests) == [p.split(":")[0] for p in predictions]


def test_adapter_without_lmms_eval_says_how_to_install_it():
    script = "import sys; sys.modules['lmms_eval'] = None; import lmms_adapter"     # as if not installed
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode != 0 and "pip install -r requirements-eval.txt" in done.stderr.splitlines()[-1]
