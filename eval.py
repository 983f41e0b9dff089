"""Evaluate an export on single-turn questions: batched greedy answers, normalized exact match.

examples:
  python eval.py --model runs/demo/finetune --data demo_data/test.jsonl --image_folder demo_data/images
  python eval.py --model runs/mgm-7b-yours-qlora/merged --data data/mine_test.json --image_folder data/images \\
      --limit 100

--data is any LLaVA-format JSON/JSONL: each record's first human turn is the question (with or without an <image>
tag), the gpt turn after it the reference answer. Answers and references are compared after normalization (case,
punctuation, articles, spaces). Writes one JSON line per answered question (--output) and ends with the line
`accuracy: <float> (n=<int>)`, n being the questions answered. chat.py and web.py load and answer with the same
code. For the standard benchmarks (TextVQA, MMBench, MME, ...) use lmms-eval with --model mini_gemini
(docs/evaluation.md).

    python eval.py --model runs/demo/dpo/export --pairs demo_data/pairs_test.jsonl --reference runs/demo/finetune \
        --image_folder demo_data/images

--pairs scores held-out preference pairs (any form records.py reads) instead: each reply's log-prob under the
model and under --reference (the model the preference tuning started from), the reward beta * (difference), and
ends with the line `reward accuracy: <float> margin: <float> (n=<int>)`: the share of pairs whose chosen reply has
the larger reward, and the mean reward margin.

A record that cannot be asked (a broken JSON line, no question/answer pair, an unreadable or missing image, <image>
tags that do not match its images) is skipped and named by id, with a count at the end; the predictions already made
are written even when the run stops early. The exit status is 1 when more than --max_skip_fraction of the records
(default 0: any) were skipped, so a script notices a partial evaluation; the accuracy line is printed either way.
"""
from __future__ import annotations

import json
import os
import re
import string
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import takewhile
from pathlib import Path

import torch
import yaml

from cli import ArgumentParser, UserError, check_path, fraction, int_at_least, run
from conversation import TEMPLATES, ConversationError
from data import BadSample, ImageProcessor, load_image, tokenize_prompt
from images import oriented_size

ARTICLES = re.compile(r"\b(a|an|the)\b")
END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>")   # stop tokens besides the tokenizer's eos


def main(argv: list[str] | None = None) -> float:
    parser = ArgumentParser(prog="eval.py", description=__doc__)
    parser.add_argument("--model", required=True, metavar="DIR", help="an export directory (full, pretrain or LoRA)")
    parser.add_argument("--data", default=None, help="LLaVA JSON/JSONL with single-turn questions and answers")
    parser.add_argument("--image_folder", default=".", help="image paths are relative to this (default: %(default)s)")
    parser.add_argument("--output", default=None, help="predictions JSONL (default: MODEL/predictions_<data>.jsonl)")
    parser.add_argument("--template", default=None, help=f"the chat template: {' | '.join(sorted(TEMPLATES))} "
                        "(default: the one the model was trained with)")
    parser.add_argument("--batch_size", type=int_at_least(1), default=32,
                        help="questions answered together (default: %(default)s)")
    parser.add_argument("--max_new_tokens", type=int_at_least(1), default=16,
                        help="answer length limit in tokens (default: %(default)s)")
    parser.add_argument("--limit", type=int_at_least(0), default=0,
                        help="evaluate only the first N questions (default: 0, all)")
    parser.add_argument("--max_skip_fraction", type=fraction, default=0.0,
                        help="exit with status 1 when more of the records than this were skipped as unusable "
                             "(default: %(default)s)")
    parser.add_argument("--pairs", default=None, help="preference pairs to score instead of --data: reward accuracy "
                        "and margin against --reference")
    parser.add_argument("--reference", default=None, help="--pairs: the export the preference tuning started from")
    parser.add_argument("--beta", type=float, default=0.1, help="--pairs: the reward scale (default: %(default)s)")
    a = parser.parse_args(argv)
    if a.pairs is not None:
        if a.reference is None:
            raise UserError("--pairs needs --reference, the export the preference tuning started from")
        check_path(a.pairs, "--pairs")
        check_path(a.image_folder, "--image_folder", "dir")
        result = score_pairs(a.model, a.reference, a.pairs, a.image_folder, beta=a.beta, template=a.template,
                             batch_size=a.batch_size, limit=a.limit)
        print(f"reward accuracy: {result['accuracy']:.4f} margin: {result['margin']:.4f} (n={result['n']})")
        return result["accuracy"]
    if a.data is None:
        raise UserError("--data (questions and answers) or --pairs (preference pairs) is needed")
    check_path(a.data, "--data")
    check_path(a.image_folder, "--image_folder", "dir")
    if a.output and os.path.isdir(a.output):
        raise UserError(f"--output: {a.output} is a directory; name the predictions file")
    from tqdm import tqdm

    skipped = []                                     # (record id, why)
    questions = load_questions(a.data, skipped)[: a.limit or None]
    answerer = Answerer(*load_for_inference(a.model, a.template))
    output = a.output or os.path.join(a.model, f"predictions_{Path(a.data).stem}.jsonl")
    answered, predictions = [], []
    try:
        with tqdm(total=len(questions), desc="eval", unit="q", file=sys.stderr) as bar:
            for i in range(0, len(questions), a.batch_size):
                ready, images = [], []
                for q in questions[i:i + a.batch_size]:
                    try:
                        images.append(answerer.check(q, a.image_folder))
                        ready.append(q)
                    except (BadSample, ConversationError) as e:
                        skipped.append((q.id, str(e)))
                if ready:
                    predictions += answerer([q.question for q in ready], images, max_new_tokens=a.max_new_tokens)
                    answered += ready
                bar.update(len(questions[i:i + a.batch_size]))
    finally:  # also when generation fails part way: the answers so far are kept
        accuracy = score(answered, predictions, output)
        for record_id, why in skipped:
            print(f"skipped record {record_id}: {why}", file=sys.stderr)
        total = len(answered) + len(skipped)
        if skipped:
            print(f"skipped: {len(skipped)} of {total} records")
        print(f"predictions: {output}")
    print(f"accuracy: {accuracy:.4f} (n={len(answered)})")
    if len(skipped) > a.max_skip_fraction * total:
        print(f"eval.py: {len(skipped)} of {total} records skipped, over --max_skip_fraction "
              f"{a.max_skip_fraction}", file=sys.stderr)
        raise SystemExit(1)
    return accuracy


def score_pairs(model_dir: str, reference_dir: str, pairs: str, image_folder: str = ".", *, beta: float = 0.1,
                template: str | None = None, batch_size: int = 8, limit: int = 0) -> dict:
    """Held-out preference pairs: {"accuracy": share of pairs with reward(chosen) > reward(rejected), "margin": mean
    reward(chosen) - reward(rejected), "n": pairs scored, "skipped": [(id, why)]}, reward = beta * (log-prob of the
    reply under the model - under the reference). Each pair's images are encoded once per model."""
    import dpo
    from data import DataArguments, PreferenceDataset, collate_pairs
    from records import load_records
    model, tokenizer, processor, template = load_for_inference(model_dir, template)
    reference = load_for_inference(reference_dir, template)[0]
    args = DataArguments(pairs, image_folder=image_folder, template=template, max_length=10**9)
    dataset = PreferenceDataset(load_records(pairs), tokenizer, args, processor, model.tokens_per_image)
    indices = list(range(len(dataset)))[: limit or None]
    device = next(model.parameters()).device
    margins, skipped = [], []
    for i in range(0, len(indices), batch_size):
        samples = [dataset[j] for j in indices[i:i + batch_size]]
        skipped += [(s["id"], s["skipped"]) for s in samples if "skipped" in s]
        if all("skipped" in s for s in samples):
            continue
        batch = {k: v.to(device) if torch.is_tensor(v) else v
                 for k, v in collate_pairs(samples, tokenizer.pad_token_id or 0).items()}
        rewards = beta * (dpo.reply_logps(model, **batch) - dpo.reply_logps(reference, **batch)).double().cpu()
        b = len(rewards) // 2
        margins += (rewards[:b] - rewards[b:]).tolist()
    for record_id, why in skipped:
        print(f"skipped record {record_id}: {why}", file=sys.stderr)
    n = len(margins)
    return {"accuracy": sum(m > 0 for m in margins) / max(n, 1), "margin": sum(margins) / max(n, 1), "n": n,
            "skipped": skipped}


@dataclass
class Question:
    id: str
    question: str
    answer: str
    images: list[str]


def load_questions(path: str, skipped: list | None = None) -> list[Question]:
    """LLaVA JSON (array) or JSONL -> questions: the first human turn and the gpt turn after it. A record that has
    none (or a JSONL line that is not JSON) is an error naming it, or, given a `skipped` list, is appended there as
    (id, why) and left out. Ids default to <file>:<index> (JSON) or <file>:<line> (JSONL)."""
    name = os.path.basename(path)
    with open(path, encoding="utf-8") as f:
        text = f.read()
    if text.lstrip().startswith("["):
        try:
            records = [(f"{name}:{i}", r) for i, r in enumerate(json.loads(text))]
        except json.JSONDecodeError as e:
            raise UserError(f"{path}: not valid JSON ({e})") from None
    else:
        records = [(f"{name}:{n}", line) for n, line in enumerate(text.splitlines(), 1) if line.strip()]
    if not records:
        raise UserError(f"{path}: holds no records")
    questions = []
    for fallback_id, r in records:
        try:
            questions.append(_question(json.loads(r) if isinstance(r, str) else r, fallback_id))
        except (ValueError, TypeError, AttributeError) as e:
            why = f"invalid JSON ({e})" if isinstance(e, json.JSONDecodeError) else str(e)
            if skipped is None:
                raise UserError(f"{path}: record {fallback_id}: {why}") from None
            skipped.append((fallback_id, why))
    return questions


def _question(r: dict, fallback_id: str) -> Question:
    record_id = str(r.get("id", fallback_id))
    turns = r.get("conversations") or r.get("messages") or []
    roles = [t.get("from", t.get("role")) for t in turns]
    values = [t.get("value", t.get("content")) for t in turns]
    user = next((k for k, role in enumerate(roles) if role in ("human", "user")), None)
    if user is None or user + 1 >= len(turns) or roles[user + 1] not in ("gpt", "assistant"):
        raise ValueError(f"record {record_id} has no question followed by an answer")
    image = r.get("image", r.get("images")) or []
    return Question(record_id, values[user], values[user + 1], image if isinstance(image, list) else [image])


def normalize_answer(text: str) -> str:
    """Lowercase, drop punctuation and the articles a/an/the, collapse spaces: "The Red." -> "red"."""
    text = text.lower().translate(str.maketrans("", "", string.punctuation))
    return " ".join(ARTICLES.sub(" ", text).split())


def score(questions: list[Question], predictions: list[str], output: str | None = None) -> float:
    """Normalized exact match; writes one JSON line per question to `output`."""
    rows = [dict(id=q.id, question=q.question, answer=q.answer, prediction=p,
                 correct=normalize_answer(p) == normalize_answer(q.answer)) for q, p in zip(questions, predictions)]
    if output:
        os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
        with open(output, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(row) + "\n" for row in rows)
    return sum(row["correct"] for row in rows) / max(1, len(rows))


# ---- Loading an export and answering (shared with chat.py) ---------------------------------------------------------

def load_for_inference(model_dir: str, template: str | None = None, device: str | None = None):
    """An export -> (model, tokenizer, image processor, template name). The template and the image aspect-ratio mode
    come from the train_config.yaml that train.py writes into every export; the image sizes, mean and std from the
    model itself (model.image_settings()), so the input is prepared exactly as in training."""
    from transformers import AutoTokenizer

    from model import MiniGemini
    from refs import check_export, check_model_ref
    check_export(model_dir, "--model")
    check_model_ref(model_dir, "--model", kind="tokenizer")
    if template is not None and template not in TEMPLATES:
        raise UserError(f"--template: {template!r} is none of {' | '.join(sorted(TEMPLATES))}")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    config_path = Path(model_dir, "train_config.yaml")
    config = yaml.safe_load(config_path.read_text()) if config_path.exists() else {}
    dtype = None if device != "cpu" else "float32"     # half precision is slow (or unsupported) on CPU
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    template = template or config.get("template") or ("auto" if tokenizer.chat_template else None)
    if template is None:  # a wrong template answers badly without any error: never guess one
        raise UserError(f"--model: {model_dir} names no template (no train_config.yaml with a template, no chat "
                        "template in its tokenizer): pass --template with the one it was trained with (e.g. plain, "
                        "vicuna_v1)")
    model = MiniGemini.from_pretrained(model_dir, dtype=dtype, device=device if device != "cpu" else None)
    model.to(device).eval()
    processor = ImageProcessor(**model.image_settings(), aspect_ratio=config.get("image_aspect_ratio", "pad"))
    return model, tokenizer, processor, template


class Answerer:
    """Answers from an export: greedy answers for a batch of single questions (__call__), or one conversation's
    answer streamed as it is generated (stream). The prompt is data.tokenize_prompt, the ids training saw in front of
    an answer."""

    def __init__(self, model, tokenizer, processor, template: str):
        self.model, self.tokenizer, self.processor, self.template = model, tokenizer, processor, template
        vocab = tokenizer.get_vocab()
        self.stop = sorted({tokenizer.eos_token_id, *(vocab[t] for t in END_OF_TURN if t in vocab)} - {None})
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.stop[0]

    @torch.no_grad()
    def __call__(self, questions: list[str], images: list[list], max_new_tokens: int = 16) -> list[str]:
        device = next(self.model.parameters()).device
        prompts = [self.prompt([{"role": "user", "content": q}], len(imgs)) for q, imgs in zip(questions, images)]
        width = max(len(p) for p in prompts)
        input_ids = torch.full((len(prompts), width), self.pad, dtype=torch.long)
        attention_mask = torch.zeros_like(input_ids)
        for row, p in enumerate(prompts):
            input_ids[row, :len(p)], attention_mask[row, :len(p)] = p, 1
        out = self.model.generate(input_ids.to(device), attention_mask.to(device), max_new_tokens=max_new_tokens,
                                  do_sample=False, eos_token_id=self.stop, pad_token_id=self.pad,
                                  **self.image_inputs(images))
        return [self.decode(row) for row in out.tolist()]

    def stream(self, messages: list[dict], images: list, *, max_new_tokens: int = 64, temperature: float = 0.0,
               top_p: float = 1.0, top_k: int = 0, generator=None) -> Iterator[str]:
        """The answer to a conversation (chat-form messages ending with the user's question, <image> tags placed
        for `images`, the PIL images in tag order), as text pieces while it is generated: greedy at temperature 0,
        where the pieces join to __call__'s answer for a single question. Stop early by no longer iterating."""
        from model import stream_text
        device = next(self.model.parameters()).device
        tokens = self.model.stream(self.prompt(messages, len(images)).to(device), max_new_tokens=max_new_tokens,
                                   do_sample=temperature > 0, temperature=temperature, top_p=top_p, top_k=top_k,
                                   eos_token_id=self.stop, pad_token_id=self.pad, generator=generator,
                                   **self.image_inputs([images]))
        yield from stream_text(self.tokenizer, takewhile(lambda token: token not in self.stop, tokens))

    def prompt(self, messages: list[dict], num_images: int) -> torch.Tensor:
        """Prompt ids of a conversation ending with a user question: data.tokenize_prompt in the export's template
        (BadSample / ConversationError naming what is wrong with it)."""
        return tokenize_prompt(messages, self.tokenizer, self.template, num_images=num_images)

    def image_positions(self, image) -> int:
        """LLM positions a PIL image takes: model.tokens_per_image, or for AnyRes its own count, from its size."""
        if self.processor.aspect_ratio != "anyres":
            return self.model.tokens_per_image
        return self.processor.tokens(oriented_size(image))

    def image_inputs(self, images: list[list]) -> dict:
        """Each row's PIL images -> the model's images / images_aux / image_counts (AnyRes: image_sizes) arguments."""
        device = next(self.model.parameters()).device
        views, aux, sizes = [], [], []
        for image in (img for imgs in images for img in imgs):
            v, a, size = self.processor.process(image)
            views.append(v)
            aux.append(a)
            sizes.append(size)
        kw = dict(images=None, images_aux=None,
                  image_counts=torch.tensor([len(imgs) for imgs in images], device=device))
        anyres = self.processor.aspect_ratio == "anyres"    # views (and HR tiles) per image vary: back to back
        join = torch.cat if anyres else torch.stack
        if views:
            kw["images"] = join(views).to(device, next(self.model.vision_tower.parameters()).dtype)
            if self.model.vision_tower_aux is not None:
                kw["images_aux"] = join(aux).to(kw["images"])
            if anyres:
                kw["image_sizes"] = torch.tensor(sizes, device=device)
        return kw

    def check(self, question: Question, image_folder: str = ".") -> list:
        """The images of one question, once its prompt is known to build (BadSample naming the problem if not)."""
        images = [load_image({"path": p}, image_folder) for p in question.images]
        self.prompt([{"role": "user", "content": question.question}], len(images))
        return images

    def decode(self, ids: list[int]) -> str:
        for k, token in enumerate(ids):          # cut at the first stop token (later ones are padding)
            if token in self.stop:
                ids = ids[:k]
                break
        return self.tokenizer.decode(ids, skip_special_tokens=True).strip()


if __name__ == "__main__":
    run(main, "eval.py")
