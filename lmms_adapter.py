"""Mini-Gemini exports in lmms-eval, the standard harness for multimodal benchmarks (TextVQA, MMBench, MME, MMMU, ...).

    pip install -r requirements-eval.txt && pip install --no-deps -e .      # `make test` does both
    python -m lmms_eval --model mini_gemini --model_args pretrained=runs/x/export --tasks textvqa_val,mme \\
        --batch_size 16 --log_samples --output_path results/

lmms-eval finds external models through the `lmms_eval.models` entry-point group; pyproject.toml declares this
module there, and the editable install is what makes that declaration visible (nothing else needs installing).
Every export kind loads (full, pretrain-only, LoRA; standard or HD) through eval.py's own loading and answering code:
the export's template, the image preprocessing it was trained with, batched greedy answers from model.generate.
model_args: pretrained=DIR (required), template=NAME (default: the export's), max_new_tokens=N (used when a task sets
none). Under `accelerate launch -m lmms_eval ...` each process takes the GPU of its LOCAL_RANK and a share of the
requests (lmms-eval splits and gathers them).
"""
from __future__ import annotations

import os
import sys

try:
    from lmms_eval.api.model import lmms
except ModuleNotFoundError as e:
    raise ModuleNotFoundError(f"lmms_adapter.py needs lmms-eval ({e}): pip install -r requirements-eval.txt "
                              "&& pip install --no-deps -e .") from e
import torch
from PIL import Image

MODEL_NAME = "mini_gemini"
IMAGE_TAG = "<image>"


def manifest():
    """The entry point (pyproject.toml): lmms-eval imports the class only when --model names it."""
    from lmms_eval.models.registry_v2 import ModelManifest  # not at the top: lmms_eval.models loads entry points
    return ModelManifest(model_id=MODEL_NAME, simple_class_path=f"{__name__}.MiniGeminiLMM")


class MiniGeminiLMM(lmms):
    """lmms-eval's model interface ("simple" form: a task's prompt text plus its doc's images) over eval.Answerer."""

    def __init__(self, pretrained: str, template: str | None = None, device: str | None = None,
                 batch_size: int | str = 1, max_batch_size=None, max_new_tokens: int | str = 128):
        # batch_size, max_batch_size and device come from lmms-eval's own options (max_batch_size is unused)
        super().__init__()
        here = os.path.dirname(os.path.abspath(__file__))   # model.py, eval.py, data.py live next to this file
        if here not in sys.path:                            # (the editable install maps only this module)
            sys.path.insert(0, here)
        from eval import Answerer, load_for_inference
        if device is None:    # one process per GPU under `accelerate launch`: bind to this process's own
            device = f"cuda:{os.environ.get('LOCAL_RANK', '0')}" if torch.cuda.is_available() else "cpu"
        if str(batch_size).startswith("auto"):
            raise ValueError("--batch_size auto is not supported: give a number")
        self.answerer = Answerer(*load_for_inference(pretrained, template, device=device))
        self.batch_size, self.max_new_tokens = int(batch_size), int(max_new_tokens)
        self.device = torch.device(device)

    def prompt_and_images(self, context: str, doc_to_visual, doc) -> tuple[str, list[Image.Image]]:
        """A task's prompt text and its doc's images. Tasks rarely write image tags themselves (MMMU's
        "<image 1>" is plain text); then one "<image>" line per image goes first, as in LLaVA-style training data."""
        visuals = doc_to_visual(doc) if doc_to_visual is not None else []
        visuals = [] if visuals is None else visuals if isinstance(visuals, (list, tuple)) else [visuals]
        images = [v for v in visuals if v is not None]
        if not all(isinstance(v, Image.Image) for v in images):
            kinds = sorted({type(v).__name__ for v in images if not isinstance(v, Image.Image)})
            raise NotImplementedError(f"{MODEL_NAME} answers about images only; this task also gives {kinds}")
        if images and IMAGE_TAG not in context:
            context = (IMAGE_TAG + "\n") * len(images) + context
        return context, images

    def generate_until(self, requests) -> list[str]:
        """Greedy answers in batches of --batch_size, cut at the task's `until` strings. Always greedy: a task's
        temperature, top_p or num_beams are not used (MGM's and LLaVA's benchmarks ask for greedy anyway)."""
        from tqdm import tqdm
        answers: list[str] = [""] * len(requests)
        by_length: dict[int, list[int]] = {}      # one max_new_tokens per generate call
        for i, request in enumerate(requests):
            by_length.setdefault(int(request.args[1].get("max_new_tokens", self.max_new_tokens)), []).append(i)
        with tqdm(total=len(requests), desc=MODEL_NAME, disable=self.rank != 0) as bar:
            for max_new_tokens, indices in by_length.items():
                for start in range(0, len(indices), self.batch_size):
                    batch = indices[start:start + self.batch_size]
                    prompts, images = [], []
                    for i in batch:
                        context, _, doc_to_visual, doc_id, task, split = requests[i].args
                        doc = self.task_dict[task][split][doc_id]
                        prompt, imgs = self.prompt_and_images(context, doc_to_visual, doc)
                        prompts.append(prompt)
                        images.append(imgs)
                    for i, text in zip(batch, self.answerer(prompts, images, max_new_tokens=max_new_tokens)):
                        answers[i] = cut_at(text, requests[i].args[1].get("until"))
                    bar.update(len(batch))
        return answers

    @torch.no_grad()
    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        """(log P(continuation | prompt), whether greedy decoding gives the continuation) for each request: the
        continuation is scored as the assistant's answer after the same prompt that generate_until uses."""
        from conversation import Segment, get_template
        from data import IGNORE_INDEX, encode_segments
        model, tokenizer = self.answerer.model, self.answerer.tokenizer
        template = get_template(self.answerer.template)
        results = []
        for start in range(0, len(requests), self.batch_size):
            rows, images = [], []
            for request in requests[start:start + self.batch_size]:
                context, target, doc_to_visual, doc_id, task, split = request.args
                doc = self.task_dict[task][split][doc_id]
                continuation = target if isinstance(target, str) else str(target(doc))
                prompt, imgs = self.prompt_and_images(context, doc_to_visual, doc)
                segments = template.prompt_segments([{"role": "user", "content": prompt}], tokenizer)
                answer = Segment(continuation, trainable=True, literal=True)     # labels mark exactly its tokens
                rows.append(encode_segments(segments + [answer], tokenizer))
                images.append(imgs)
            width = max(len(ids) for ids, _ in rows)
            input_ids = torch.full((len(rows), width), self.answerer.pad, dtype=torch.long)
            labels = torch.full_like(input_ids, IGNORE_INDEX)
            mask = torch.zeros_like(input_ids)
            for r, (ids, labs) in enumerate(rows):
                input_ids[r, :len(ids)], labels[r, :len(ids)] = torch.tensor(ids), torch.tensor(labs)
                mask[r, :len(ids)] = 1
            inputs = model.prepare_inputs(input_ids.to(self.device), mask.to(self.device), labels.to(self.device),
                                          **self.answerer.image_inputs(images))
            labels = inputs.pop("labels")[:, 1:]          # spliced: image placeholders expanded to their features
            logprobs = model.llm(**inputs, use_cache=False).logits[:, :-1].float().log_softmax(-1)
            scored = labels != IGNORE_INDEX
            token_logprobs = logprobs.gather(-1, labels.clamp(min=0)[..., None])[..., 0]
            greedy = (logprobs.argmax(-1) == labels) | ~scored
            results += [(float(lp), bool(g)) for lp, g in zip((token_logprobs * scored).sum(1), greedy.all(1))]
        return results

    def generate_until_multi_round(self, requests) -> list[str]:
        raise NotImplementedError(f"{MODEL_NAME} does not run multi-round tasks")


def cut_at(text: str, until) -> str:
    """The text before the first of the task's stop strings."""
    for stop in [until] if isinstance(until, str) else until or []:
        if stop:
            text = text.split(stop)[0]
    return text
