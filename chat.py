"""Talk to an exported model in the terminal: a conversation about images, each answer streamed as it is generated.

examples:
  python chat.py --model runs/demo/finetune --image demo_data/images/test_00000.png "What shape is this?"
  python chat.py --model runs/demo/finetune --image demo_data/images/test_00000.png     # a conversation
  python chat.py --model runs/mgm-7b-yours-qlora/merged --temperature 0.7 --top_p 0.9 --seed 1   # sampled, repeatable

With a question on the command line it answers once and exits. Without one it holds a conversation: type a
question per line, or a command:
  /image PATH   attach an image to the next question (several allowed; --image attaches to the first question)
  /clear        start a new conversation
  /exit         quit (so does the end of the input; Ctrl-C stops an answer that is being written)
Each question is asked with the whole conversation so far, rendered by the chat template the model was trained
with: the prompt is exactly the tokens training saw for those turns. Answers are greedy unless --temperature is
above 0 (then sampled within --top_p, repeatable with --seed); a single question's greedy answer is eval.py's.

The model's length is the LLM's max_position_embeddings (or --max_length), each image counting the positions its
features take. Before a question whose prompt would leave no room for --max_new_tokens, the oldest turns are dropped
with a notice; a question that leaves no room even on its own is refused. Answers go to stdout, notices and errors
to stderr. Works for full, pretrain-only and LoRA exports; a pretrain-only export (template plain) only captions,
so there each question is answered on its own, about its images or, without any, those of the question before.
web.py holds the same conversations on a web page.
"""
from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

import cli
from cli import UserError, run
from conversation import TEMPLATES, ConversationError
from data import IMAGE_TAG, BadSample, load_image
from eval import Answerer, load_for_inference


def main(argv: list[str] | None = None) -> None:
    parser = cli.ArgumentParser(prog="chat.py", description=__doc__)
    add_model_arguments(parser)
    parser.add_argument("--image", action="append", default=[],
                        help="an image file for the (first) question; repeat for several")
    add_sampling_arguments(parser)
    parser.add_argument("--seed", type=int, default=None,
                        help="makes sampled answers repeatable (default: none, a new draw each time)")
    parser.add_argument("question", nargs="?", help="answer this once and exit; without it, hold a conversation")
    a = parser.parse_args(argv)
    check_sampling(a.temperature, a.top_p, a.max_new_tokens)
    images = []
    for path in a.image:
        try:
            images.append(load_image({"path": os.path.expanduser(path)}))
        except BadSample as e:
            raise UserError(f"--image: {e}") from None
    conversation = Conversation(load_answerer(a.model, a.template), max_length=a.max_length, seed=a.seed)
    sampling = dict(max_new_tokens=a.max_new_tokens, temperature=a.temperature, top_p=a.top_p)
    if a.question is not None:
        try:
            say(conversation, a.question, images, sampling)
        except (TooLong, BadSample, ConversationError) as e:
            raise UserError(str(e)) from None
        return
    if conversation.answerer.template == "plain":
        note("template plain (a pretrain-only export) captions images: each question is answered on its own")
    converse(conversation, read_lines(interactive=sys.stdin.isatty()), images, sampling,
             prefix="model> " if sys.stdin.isatty() else "")


# ---- The conversation (shared with web.py) --------------------------------------------------------------------

@dataclass
class Turn:
    question: str
    images: list = field(default_factory=list)    # PIL images attached to this question
    answer: str = ""                               # as far as it was generated (a stopped answer keeps its start)


class TooLong(ValueError):
    """A question that leaves no room for an answer within the model's length, even as a conversation's only turn."""


class Conversation:
    """The turns so far and how they become the model's prompt: every question with one <image> line per attached
    image in front of it (as in training data), every answer after it, rendered by the export's template
    (Answerer.prompt). Lengths count each image as the model does (Answerer.image_positions)."""

    def __init__(self, answerer: Answerer, max_length: int | None = None, seed: int | None = None):
        self.answerer = answerer
        self.max_length = max_length or model_length(answerer.model)
        self.turns: list[Turn] = []
        self.generator = torch.Generator(next(answerer.model.parameters()).device)
        if seed is None:
            self.generator.seed()         # a fresh draw each run
        else:
            self.generator.manual_seed(seed)

    def ask(self, question: str, images: list = (), max_new_tokens: int = 64) -> list[Turn]:
        """Add a question with its images, first dropping the oldest turns while the prompt would leave no room for
        max_new_tokens. Returns the dropped turns. The question is not added (and nothing dropped) when its prompt
        cannot be built (BadSample / ConversationError naming why) or leaves no room on its own (TooLong)."""
        question = question.strip()
        if not question:
            raise ConversationError("empty question", "type a question (images alone are not a question)")
        previous = [t for t in self.turns if t.answer]     # a turn stopped before any text has nothing to show
        if self.answerer.template == "plain":              # a captioning template renders no conversation
            images = list(images) or (previous[-1].images if previous else [])
            previous = []
        turn = Turn(question, list(images))
        alone = self.length([turn])
        if alone >= self.max_length:
            images_take = sum(map(self.answerer.image_positions, turn.images))
            raise TooLong(f"this question takes {alone} positions (its images {images_take}), the model's length "
                          f"is {self.max_length}: no room for an answer; ask a shorter question or attach fewer images")
        dropped = 0
        while dropped < len(previous) and self.length(previous[dropped:] + [turn]) + max_new_tokens > self.max_length:
            dropped += 1
        self.turns = previous[dropped:] + [turn]
        return previous[:dropped]

    def reply(self, *, max_new_tokens: int = 64, temperature: float = 0.0, top_p: float = 1.0) -> Iterator[str]:
        """The answer to the last question as text pieces while it is generated, also written into the last turn as
        it grows. At most max_new_tokens, and no further than the model's length."""
        turn = self.turns[-1]
        turn.answer = ""
        messages, images = self.messages(self.turns)
        room = min(max_new_tokens, self.max_length - self.length(self.turns))
        for piece in self.answerer.stream(messages, images, max_new_tokens=room, temperature=temperature,
                                          top_p=top_p, generator=self.generator):
            piece = piece if turn.answer else piece.lstrip()
            if piece:
                turn.answer += piece
                yield piece
        turn.answer = turn.answer.rstrip()

    def messages(self, turns: list[Turn]) -> tuple[list[dict], list]:
        """Chat-form messages of the turns (the last one's question unanswered) and their images in order."""
        messages, images = [], []
        for k, turn in enumerate(turns):
            messages.append({"role": "user", "content": (IMAGE_TAG + "\n") * len(turn.images) + turn.question})
            if k < len(turns) - 1:
                messages.append({"role": "assistant", "content": turn.answer})
            images += turn.images
        return messages, images

    def length(self, turns: list[Turn]) -> int:
        """Positions the prompt of these turns takes in the model."""
        messages, images = self.messages(turns)
        return len(self.answerer.prompt(messages, len(images))) + sum(
            self.answerer.image_positions(image) - 1 for image in images)


def model_length(model) -> int:
    """The LLM's max_position_embeddings: positions past it have no meaning to the model."""
    length = getattr(model.llm.config.get_text_config(), "max_position_embeddings", None)
    if not length:
        raise UserError("the LLM's config has no max_position_embeddings: pass --max_length")
    return length


def dropped_notice(dropped: list[Turn], max_length: int) -> str:
    images = sum(len(t.images) for t in dropped)
    with_images = f" (with {images} image{'s' * (images != 1)})" if images else ""
    return (f"the conversation outgrew the model's length ({max_length} positions): dropped the oldest "
            f"{len(dropped)} turn{'s' * (len(dropped) != 1)}{with_images}; /clear starts a new one")


# ---- The terminal ----------------------------------------------------------------------------------------------

def converse(conversation: Conversation, lines: Iterable[str], images: list, sampling: dict, prefix: str = "") -> None:
    """Questions and commands, one per line, until /exit or the end of the lines."""
    attached = list(images)
    for line in lines:
        line = line.strip()
        command, _, rest = line.partition(" ")
        if not line:
            continue
        if command == "/exit":
            break
        if command == "/clear":
            conversation.turns, attached = [], []
            note("new conversation")
        elif command == "/image" and not rest.strip():
            note("/image: give the image's path: /image PATH")
        elif command == "/image":
            path = os.path.expanduser(rest.strip())
            try:
                attached.append(load_image({"path": path}))
                note(f"{Path(path).name} attached to the next question ({len(attached)} image"
                     f"{'s' * (len(attached) != 1)})")
            except BadSample as e:
                note(f"/image: {e}")
        elif command.startswith("/"):
            note(f"unknown command {command}: /image PATH, /clear or /exit")
        else:
            try:
                say(conversation, line, attached, sampling, prefix)
                attached = []
            except (TooLong, BadSample, ConversationError) as e:
                note(str(e))


def say(conversation: Conversation, question: str, images: list, sampling: dict, prefix: str = "") -> None:
    """Ask one question and stream its answer to stdout (Ctrl-C ends the answer where it is)."""
    dropped = conversation.ask(question, images, sampling["max_new_tokens"])
    if dropped:
        note(dropped_notice(dropped, conversation.max_length))
    print(prefix, end="", flush=True)
    try:
        for piece in conversation.reply(**sampling):
            print(piece, end="", flush=True)
    except KeyboardInterrupt:
        print(" [stopped]", end="")
    print(flush=True)


def read_lines(interactive: bool) -> Iterator[str]:
    """stdin's lines; at a terminal with a prompt and line editing."""
    if not interactive:
        yield from sys.stdin
        return
    while True:
        try:
            yield input("you> ")
        except (EOFError, KeyboardInterrupt):
            print()
            return


def note(message: str) -> None:
    print(f"({message})", file=sys.stderr, flush=True)


# ---- Options and loading (shared with web.py) -----------------------------------------------------------------

def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, metavar="DIR",
                        help="an export directory (full, pretrain or LoRA): train.py's <output_dir>/export, "
                             "model.py merge's or convert.py's output")
    parser.add_argument("--template", default=None, choices=sorted(TEMPLATES),
                        help="the chat template (default: the one the model was trained with)")
    parser.add_argument("--max_length", type=cli.int_at_least(1), default=None,
                        help="positions a conversation may take (default: the LLM's max_position_embeddings)")


def add_sampling_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--temperature", type=float, default=0.0,
                        help="0 = greedy; above 0 samples (default: %(default)s)")
    parser.add_argument("--top_p", type=float, default=1.0, help="sample among the likeliest tokens holding this "
                        "much probability (with --temperature above 0; default: %(default)s)")
    parser.add_argument("--max_new_tokens", type=int, default=64,
                        help="the longest answer, in tokens (default: %(default)s)")


def check_sampling(temperature: float, top_p: float, max_new_tokens: int) -> None:
    if temperature < 0:
        raise UserError(f"--temperature must be 0 (greedy) or more, not {temperature}")
    if not 0 < top_p <= 1:
        raise UserError(f"--top_p must be in (0, 1], not {top_p}")
    if max_new_tokens < 1:
        raise UserError(f"--max_new_tokens must be at least 1, not {max_new_tokens}")


def load_answerer(model_dir: str, template: str | None = None) -> Answerer:
    """The export in model_dir, ready to answer; a missing directory or one that is no export is a UserError
    (eval.load_for_inference checks it before anything loads)."""
    return Answerer(*load_for_inference(model_dir, template))


if __name__ == "__main__":
    run(main, "chat.py")
