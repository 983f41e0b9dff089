"""make demo: a tiny Mini-Gemini trained end to end on CPU, through the same commands as a real run.

examples:
  make demo                  # the same as python demo.py, in .venv (made and filled on first use)
  python demo.py             # data -> tokenizer + tiny base models -> stage 0 -> pretrain -> finetune -> eval -> chat
  python demo.py --seed 1    # another draw of everything: data, initial weights, training order

1. A synthetic visual question answering set drawn with Pillow: one shape (circle, square, triangle, star) in one
   colour (red, green, blue, yellow, purple, orange) on a light background, images of varied size and aspect ratio.
   Pretrain records are captions ("a red circle"); finetune records ask "What color is the shape?" or
   "What shape is this?", answered with one lowercase word, and half of them ask the other question as a follow-up
   (so the model also answers a second question in a conversation). A held-out split is kept for eval.py.
2. A word-level tokenizer trained on that corpus with `tokenizers` (a normal Hugging Face tokenizer directory with
   special tokens and a chat template) and tiny random Llama and CLIP ViT checkpoints saved as normal checkpoint
   directories, so the real loading code runs.
3. Stage 0: the tiny timm ConvNeXt (the HR tower) trained as an ordinary image classifier (colour + shape) on images
   of its own, then saved as the base ConvNeXt checkpoint. Real Mini-Gemini's towers come pretrained; this one is
   pretrained here, since nothing is downloaded. The recipes keep it frozen, as real MGM does.
4. `accelerate launch train.py recipes/demo_pretrain.yaml`, then recipes/demo_finetune.yaml, then eval.py on the
   held-out split, then one chat.py answer. The finetuned export is left in runs/demo/finetune/; the last lines
   give the commands to talk to it (chat.py in the terminal, `make web` for the web page), written with the Python
   that ran the demo (.venv/bin/python under make demo), so that they run as printed in a fresh shell.
Everything generated goes under demo_data/ and runs/ (both ignored by git). Everything random follows --seed.
"""
from __future__ import annotations

import json
import math
import os
import random
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import cli

REPO = Path(__file__).resolve().parent
COLORS = {"red": (220, 30, 30), "green": (40, 160, 50), "blue": (30, 70, 220), "yellow": (235, 205, 30),
          "purple": (135, 50, 175), "orange": (245, 135, 25)}
SHAPES = ("circle", "square", "triangle", "star")
QUESTIONS = {"color": "What color is the shape?", "shape": "What shape is this?"}
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>", "<|im_start|>", "<|im_end|>"]   # ids 0-5
CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


@dataclass
class DemoArguments:
    data_dir: str = "demo_data"        # images, records and the tiny base checkpoints
    output_dir: str = "runs/demo"      # pretrain/ and finetune/ exports (+ their training runs)
    pretrain_images: int = 3000        # stage-1 images, one caption each
    finetune_images: int = 6000        # stage-2 images, one question each, or both (a follow-up) in half of them
    test_images: int = 200             # held-out images for eval.py, both questions each
    stage0_images: int = 6000          # stage 0: the ConvNeXt's own classifier images (drawn apart from the splits)
    stage0_steps: int = 2000           # stage 0: steps of 64 images (0: the high-res tower stays random)
    seed: int = 0                      # data, initial weights, stage 0 and both train.py stages
    pretrain_overrides: str = ""       # extra "--field value" options for train.py's stage 1 (the test shortens it)
    finetune_overrides: str = ""       # the same for stage 2


def main(argv: list[str] | None = None) -> None:
    parser = cli.ArgumentParser(prog="demo.py", description=__doc__)
    cli.add_settings(parser, DemoArguments, "demo")
    args = cli.settings_from(parser.parse_args(argv), DemoArguments)
    check_args(args)
    quiet_deepspeed()
    data_dir, out = Path(args.data_dir), Path(args.output_dir)
    start = time.time()

    step(1, "synthetic shapes: images and LLaVA records")
    make_dataset(data_dir, args)
    step(2, "tokenizer trained on the corpus + tiny random Llama / CLIP ViT checkpoints")
    make_base_models(data_dir, seed=args.seed)
    step(3, "stage 0: pretrain the ConvNeXt (HR tower) as a colour + shape classifier")
    pretrain_convnext(data_dir, args)
    step(4, "stage 1: pretrain (projector + mining)")
    launch("recipes/demo_pretrain.yaml", paths(args, "pretrain") + seed(args) + args.pretrain_overrides.split())
    step(5, "stage 2: finetune (LLM + projector + mining)")
    launch("recipes/demo_finetune.yaml", paths(args, "finetune") + seed(args) + args.finetune_overrides.split())
    step(6, "eval.py on the held-out questions")
    run([sys.executable, "eval.py", "--model", str(out / "finetune"), "--data", str(data_dir / "test.jsonl"),
         "--image_folder", str(data_dir / "images"), "--output", str(out / "finetune" / "predictions.jsonl")])
    step(7, "chat.py: one answer")
    image = data_dir / "images" / "test_00000.png"
    run([sys.executable, "chat.py", "--model", str(out / "finetune"), "--image", str(image), QUESTIONS["shape"]])
    print(f"(held-out answer in {data_dir / 'test.jsonl'}: {held_out_answer(data_dir, 'test-0-shape')})")
    web = "make web" + ("" if out / "finetune" == Path("runs/demo/finetune") else f" WEB_MODEL={out / 'finetune'}")
    print(f"\ndemo done in {time.time() - start:.0f} s; the finetuned model is in {out / 'finetune'}/\n"
          f"  {python_shown()} chat.py --model {out / 'finetune'} --image {image}     # a conversation\n"
          f"  {web}     # the web chat: open http://127.0.0.1:7860 (installs requirements-web.txt)")


def python_shown() -> str:
    """The Python running the demo, as a command typed in the repository reaches it (.venv/bin/python under make
    demo): the printed commands run in a fresh shell, without activating the virtual environment first."""
    exe = os.path.abspath(sys.executable)
    return os.path.relpath(exe, REPO) if exe.startswith(str(REPO) + os.sep) else shlex.quote(exe)


def held_out_answer(data_dir: Path, record_id: str) -> str:
    """The answer test.jsonl holds for one record, shown beside chat.py's so that a miss reads as one."""
    with open(data_dir / "test.jsonl") as f:
        records = (json.loads(line) for line in f)
        return next(r["conversations"][-1]["value"] for r in records if r["id"] == record_id)


def check_args(args: DemoArguments) -> None:
    """What would otherwise stop the demo minutes in: counts, directories that are files, train.py overrides."""
    for name, low in (("pretrain_images", 1), ("finetune_images", 1), ("test_images", 1), ("stage0_images", 1),
                      ("stage0_steps", 0)):   # 0 steps: the high-res tower stays random
        if getattr(args, name) < low:
            raise cli.UserError(f"--{name}: {getattr(args, name)} is out of range, allowed: >= {low}")
    for name in ("data_dir", "output_dir"):
        if os.path.isfile(getattr(args, name)):
            raise cli.UserError(f"--{name}: {getattr(args, name)} is a file; name a directory")
    for stage in ("pretrain", "finetune"):
        overrides = getattr(args, f"{stage}_overrides").split()
        if overrides:   # checked the way train.py checks them, before stage 0's minutes
            import settings
            try:
                recipe = str(REPO / "recipes" / f"demo_{stage}.yaml")
                model_args, data_args, train_args = settings.parse_args([recipe, *overrides])
                settings.check_args(model_args, train_args, data_args)
            except cli.UserError as e:
                raise cli.UserError(f"--{stage}_overrides: {e}") from None


# ---- 1. Data ---------------------------------------------------------------------------------------------------------

def make_dataset(root: Path, args: DemoArguments) -> None:
    """demo_data/images/*.png and pretrain.jsonl (captions), finetune.jsonl (one question per image, or both as a
    question and its follow-up) and test.jsonl (both questions per held-out image, each on its own), in LLaVA
    format. Deterministic in args.seed; reused when already there."""
    from tqdm import tqdm
    splits = {"pretrain": args.pretrain_images, "finetune": args.finetune_images, "test": args.test_images}
    stamp = root / "records.json"
    if stamp.exists() and json.loads(stamp.read_text()) == {**splits, "seed": args.seed, "follow_ups": True}:
        print(f"reusing {root}/")
        return
    (root / "images").mkdir(parents=True, exist_ok=True)
    for split, n in splits.items():
        rng = random.Random(f"{args.seed}-{split}")
        records = []
        for i in tqdm(range(n), desc=split, unit="img"):
            image, color, shape = draw_shape(rng)
            name = f"{split}_{i:05d}.png"
            image.save(root / "images" / name)
            answers = {"color": color, "shape": shape}
            if split == "pretrain":
                article = "an" if color[0] in "aeiou" else "a"
                records.append(record(f"{split}-{i}", name, [("Describe the image.", f"{article} {color} {shape}")]))
            elif split == "test":   # each question on its own, as eval.py asks them
                for kind in ("color", "shape"):
                    records.append(record(f"{split}-{i}-{kind}", name, [(QUESTIONS[kind], answers[kind])]))
            else:   # one question, or both in either order: the second turn teaches follow-ups (chat.py, web.py)
                kinds = rng.choice([["color"], ["shape"], ["color", "shape"], ["shape", "color"]])
                records.append(record(f"{split}-{i}-{'-'.join(kinds)}", name,
                                      [(QUESTIONS[kind], answers[kind]) for kind in kinds]))
        with open(root / f"{split}.jsonl", "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in records)
    stamp.write_text(json.dumps({**splits, "seed": args.seed, "follow_ups": True}))


def record(record_id: str, image: str, turns: list[tuple[str, str]]) -> dict:
    """A LLaVA record about one image: (question, answer) turns, the image tag before the first question."""
    conversations = []
    for k, (question, answer) in enumerate(turns):
        conversations += [{"from": "human", "value": ("<image>\n" if k == 0 else "") + question},
                          {"from": "gpt", "value": answer}]
    return {"id": record_id, "image": image, "conversations": conversations}


def draw_shape(rng: random.Random):
    """One shape, uniformly chosen colour and kind, at a random size and position on a light background.
    Returns (PIL image, colour name, shape name)."""
    from PIL import Image, ImageDraw
    color, shape = rng.choice(list(COLORS)), rng.choice(SHAPES)
    side, aspect = rng.uniform(64, 200), math.exp(rng.uniform(-0.7, 0.7))     # aspect ratio 1:2 .. 2:1
    w, h = round(side * math.sqrt(aspect)), round(side / math.sqrt(aspect))
    shade = rng.randint(200, 250)
    background = tuple(min(255, shade + rng.randint(-8, 8)) for _ in range(3))
    image = Image.new("RGB", (w, h), background)
    radius = rng.uniform(0.2, 0.42) * min(w, h)
    cx, cy = rng.uniform(radius, w - radius), rng.uniform(radius, h - radius)
    fill = tuple(max(0, min(255, c + rng.randint(-20, 20))) for c in COLORS[color])
    draw = ImageDraw.Draw(image)
    if shape == "circle":
        draw.ellipse([cx - radius, cy - radius, cx + radius, cy + radius], fill=fill)
    else:
        turn = rng.uniform(-12, 12)   # a slight tilt, so the model does not learn one exact outline
        corners = {"square": 4, "triangle": 3, "star": 5}[shape]
        start = {"square": 45, "triangle": -90, "star": -90}[shape] + turn
        if shape == "star":   # ten points alternating outer and inner radius
            inner = rng.uniform(0.38, 0.5)
            points = [polar(cx, cy, radius * (1 if k % 2 == 0 else inner), start + 36 * k) for k in range(10)]
        else:
            points = [polar(cx, cy, radius * (1.0 if shape == "triangle" else 0.9), start + 360 / corners * k)
                      for k in range(corners)]
        draw.polygon(points, fill=fill)
    return image, color, shape


def polar(cx: float, cy: float, r: float, degrees: float) -> tuple[float, float]:
    a = math.radians(degrees)
    return cx + r * math.cos(a), cy + r * math.sin(a)


# ---- 2. Tokenizer and base checkpoints -------------------------------------------------------------------------------

@dataclass
class BaseSizes:
    """The tiny base models. CLIP 56 px / patch 14 -> 4x4 LR tokens; the recipes set the ConvNeXt (HR) input side,
    image_size_aux = 64 -> a 16x16 stage-0 map, so each LR token mines a 4x4 window."""
    llm_hidden: int = 128
    llm_layers: int = 2
    llm_heads: int = 4
    clip_image_size: int = 56
    clip_patch: int = 14
    clip_hidden: int = 64
    clip_layers: int = 2
    convnext_dims: tuple = (32, 64, 128, 256)
    convnext_depths: tuple = (1, 1, 1, 2)
    convnext_ls_init: float = 1.0      # layer scale's start (timm's 1e-6 makes a new ConvNeXt almost linear)


def make_base_models(root: Path, sizes: BaseSizes = BaseSizes(), seed: int = 0) -> None:
    """root/base/{llm (+ tokenizer), clip} with random weights; reused when already there for this seed.
    The ConvNeXt is stage 0's (pretrain_convnext)."""
    base, stamp = root / "base", root / "base" / "done"
    if stamp.exists() and stamp.read_text() == json.dumps({"seed": seed}):
        print(f"reusing {base}/")
        return
    import torch
    corpus = [line for split in ("pretrain", "finetune") for line in corpus_lines(root / f"{split}.jsonl")]
    tokenizer = train_tokenizer(corpus)
    torch.manual_seed(seed)
    save_llm(base / "llm", tokenizer, sizes)
    save_clip(base / "clip", sizes)
    stamp.write_text(json.dumps({"seed": seed}))
    print(f"tokenizer: {len(tokenizer)} words; checkpoints in {base}/")


def corpus_lines(path: Path):
    """The text of every turn, plus the chat markup words of the templates (so vicuna_v1 and chatml both work)."""
    from conversation import VICUNA_SYSTEM
    yield f"{VICUNA_SYSTEM} USER: ASSISTANT: user assistant system"
    with open(path) as f:
        for line in f:
            for turn in json.loads(line)["conversations"]:
                yield turn["value"].replace("<image>", "")


def train_tokenizer(corpus):
    """A word-level tokenizer (words and punctuation) with Llama-style specials: <s> in front of every text."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast
    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(corpus, trainers.WordLevelTrainer(special_tokens=SPECIAL_TOKENS))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A $B",
                                                       special_tokens=[("<s>", tok.token_to_id("<s>"))])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>", extra_special_tokens=["<|im_start|>", "<|im_end|>"],
                                   chat_template=CHATML)


def save_llm(path: Path, tokenizer, sizes: BaseSizes) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=sizes.llm_hidden,
                         intermediate_size=3 * sizes.llm_hidden, num_hidden_layers=sizes.llm_layers,
                         num_attention_heads=sizes.llm_heads, num_key_value_heads=sizes.llm_heads,
                         max_position_embeddings=256, tie_word_embeddings=False,
                         bos_token_id=tokenizer.bos_token_id, pad_token_id=tokenizer.pad_token_id,
                         eos_token_id=[tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|im_end|>")])
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)


def save_clip(path: Path, sizes: BaseSizes) -> None:
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel
    config = CLIPVisionConfig(hidden_size=sizes.clip_hidden, intermediate_size=4 * sizes.clip_hidden,
                              num_hidden_layers=sizes.clip_layers, num_attention_heads=4,
                              image_size=sizes.clip_image_size, patch_size=sizes.clip_patch,
                              projection_dim=sizes.clip_hidden)
    CLIPVisionModel(config).save_pretrained(path)
    s = sizes.clip_image_size
    CLIPImageProcessor(size={"shortest_edge": s}, crop_size={"height": s, "width": s}).save_pretrained(path)


def new_convnext(sizes: BaseSizes, num_classes: int):
    """A random timm ConvNeXt of the demo's size with timm's standard classifier head (global average pool, norm,
    linear), normalized like CLIP (as OpenCLIP's ConvNeXt is), so both towers read one image tensor."""
    import timm
    from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
    model = timm.create_model("convnext_atto", pretrained=False, num_classes=num_classes, **convnext_args(sizes))
    model.pretrained_cfg = dict(model.pretrained_cfg, mean=tuple(OPENAI_CLIP_MEAN), std=tuple(OPENAI_CLIP_STD))
    return model


def convnext_args(sizes: BaseSizes) -> dict:
    return dict(dims=list(sizes.convnext_dims), depths=list(sizes.convnext_depths),
                ls_init_value=sizes.convnext_ls_init)


# ---- 3. Stage 0: a pretrained HR tower ------------------------------------------------------------------------------

@dataclass
class ClassifierTraining:
    """Stage 0's optimizer: AdamW, linear warmup then cosine decay to zero."""
    batch_size: int = 64
    lr: float = 2e-3
    weight_decay: float = 0.01
    warmup_steps: int = 20
    check_images: int = 400            # held out from stage 0's own training images


def pretrain_convnext(root: Path, args: DemoArguments, sizes: BaseSizes = BaseSizes(),
                      opt: ClassifierTraining = ClassifierTraining()) -> None:
    """Stage 0: train the tiny ConvNeXt as an ordinary classifier (6 colour + 4 shape outputs, one cross-entropy
    each) on images of its own, drawn by draw_shape under a seed apart from the demo's splits and preprocessed
    exactly like the HR input; then save it, head included (the HR tower keeps only stem and stages), in timm's hub
    layout as root/base/convnext. Reused when already there with these settings.

    Why: through an average-pooled head a ConvNeXt needs about 1,000 steps of 64 images before it tells shapes apart
    (it sits at chance for the first ~700), far more than the demo's finetune gives a tower; random, it hands the LLM
    colour but no shape."""
    import torch
    from tqdm import tqdm

    from train import lr_at
    path, stamp = root / "base" / "convnext", root / "base" / "convnext" / "stage0.json"
    settings = {"seed": args.seed, "images": args.stage0_images, "steps": args.stage0_steps,
                "sizes": repr(sizes), "training": repr(opt)}
    if stamp.exists() and json.loads(stamp.read_text())["settings"] == settings:
        print(f"reusing {path}/ (check accuracy {json.loads(stamp.read_text())['check']})")
        return
    hr_side = recipe_value("recipes/demo_finetune.yaml", "image_size_aux")
    images, labels = classifier_images(random.Random(f"{args.seed}-stage0"), args.stage0_images, hr_side, sizes)
    check_images, check_labels = classifier_images(random.Random(f"{args.seed}-stage0-check"), opt.check_images,
                                                   hr_side, sizes)
    torch.manual_seed(args.seed)
    model = new_convnext(sizes, num_classes=len(COLORS) + len(SHAPES))
    optimizer = torch.optim.AdamW(model.parameters(), lr=opt.lr, weight_decay=opt.weight_decay)
    order = torch.Generator().manual_seed(args.seed)
    model.train()
    bar = tqdm(range(args.stage0_steps), desc="stage 0", unit="step")
    for i in bar:
        for group in optimizer.param_groups:
            group["lr"] = lr_at(i, peak=opt.lr, warmup=opt.warmup_steps, total=args.stage0_steps)
        batch = torch.randint(len(images), (opt.batch_size,), generator=order)
        loss = classifier_loss(model(images[batch]), labels[batch])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if i % 10 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}")
    check = classifier_accuracy(model, check_images, check_labels)
    print(f"stage 0 check on {opt.check_images} held-out images: colour {check['colour']:.3f}, "
          f"shape {check['shape']:.3f}")
    save_convnext(path, model, sizes)
    stamp.write_text(json.dumps({"settings": settings, "check": check}))


def classifier_images(rng: random.Random, n: int, hr_side: int, sizes: BaseSizes):
    """n images from draw_shape as the HR tower sees them ([n, 3, hr_side, hr_side], data.py's ImageProcessor),
    with labels [n, 2]: (colour index, shape index)."""
    import torch
    from data import ImageProcessor
    processor = ImageProcessor(image_size=sizes.clip_image_size, image_size_aux=hr_side)
    images, labels = [], []
    for _ in range(n):
        image, color, shape = draw_shape(rng)
        images.append(processor(image)[1])
        labels.append((list(COLORS).index(color), SHAPES.index(shape)))
    return torch.stack(images), torch.tensor(labels)


def classifier_loss(logits, labels):
    import torch.nn.functional as F
    c = len(COLORS)
    return F.cross_entropy(logits[:, :c], labels[:, 0]) + F.cross_entropy(logits[:, c:], labels[:, 1])


def classifier_accuracy(model, images, labels) -> dict:
    import torch
    model.eval()
    with torch.no_grad():
        logits = torch.cat([model(images[i:i + 256]) for i in range(0, len(images), 256)])
    c = len(COLORS)
    return {"colour": round((logits[:, :c].argmax(1) == labels[:, 0]).float().mean().item(), 4),
            "shape": round((logits[:, c:].argmax(1) == labels[:, 1]).float().mean().item(), 4)}


def save_convnext(path: Path, model, sizes: BaseSizes) -> None:
    """timm's hub layout (config.json with model_args + weights), which model.build_model loads like any timm tower."""
    from timm.models import save_for_hf
    save_for_hf(model, str(path), model_args=convnext_args(sizes), safe_serialization=True)


def recipe_value(recipe: str, key: str):
    import yaml
    return yaml.safe_load((REPO / recipe).read_text())[key]


# ---- 4. Running the steps ------------------------------------------------------------------------------------------

def launch(recipe: str, overrides: list[str]) -> None:
    """accelerate launch train.py RECIPE as one CPU process (the flags keep accelerate from asking or warning)."""
    run([sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--num_machines", "1",
         "--mixed_precision", "no", "--dynamo_backend", "no", "train.py", recipe, *overrides])


def paths(args: DemoArguments, stage: str) -> list[str]:
    """Command-line options that move the recipe's paths when --data_dir / --output_dir are not the defaults."""
    options = []
    if args.data_dir != DemoArguments.data_dir:
        base, data = Path(args.data_dir, "base"), Path(args.data_dir)
        options += ["--llm", str(base / "llm"), "--vision_tower", str(base / "clip"), "--vision_tower_aux",
                    str(base / "convnext"), "--data_path", str(data / f"{stage}.jsonl"), "--image_folder",
                    str(data / "images")]
    if args.output_dir != DemoArguments.output_dir:
        out = Path(args.output_dir)
        options += ["--output_dir", str(out / f"{stage}-run"), "--export_dir", str(out / stage)]
        if stage == "finetune":
            options += ["--pretrained_mm_path", str(out / "pretrain")]
    return options


def quiet_deepspeed() -> None:
    """DeepSpeed (installed with the test extras, imported by transformers' save_pretrained) looks for an accelerator
    and warns when it settles on the CPU; on a machine without CUDA, say so up front (inherited by every step)."""
    import torch
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")


def seed(args: DemoArguments) -> list[str]:
    """The recipes' seed (0) is the default one."""
    return [] if args.seed == DemoArguments.seed else ["--seed", str(args.seed)]


def run(cmd: list[str]) -> None:
    """Run one step; a failed step ends the demo with one line (the step has said why, above)."""
    shown = shlex.join(["python", *map(str, cmd[1:])])
    print("$ " + shown, flush=True)
    status = subprocess.run(cmd, cwd=REPO).returncode
    if status:
        raise cli.UserError(f"this step failed (exit status {status}; its output is above): {shown}", status=1)


def step(n: int, title: str) -> None:
    print(f"\n==> [{n}/7] {title}", flush=True)


if __name__ == "__main__":
    cli.run(main, "demo.py")
