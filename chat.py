"""Ask an exported model about an image.

    python chat.py --model runs/demo/finetune --image demo_data/images/test_00000.png "What shape is this?"
    python chat.py --model runs/demo/finetune --image photo.png      # then type questions, one per line

Works for full, pretrain-only (it captions: the `plain` template has no question) and LoRA exports. Each question is
answered on its own about the image, with the template the model was trained with (greedy decoding).
"""
from __future__ import annotations

import argparse
import sys

from data import load_image
from eval import Answerer, load_for_inference


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="an export directory (full, pretrain or LoRA)")
    parser.add_argument("--image", default=None, help="an image file (omit for text-only questions)")
    parser.add_argument("--template", default=None, help="default: the template the model was trained with")
    parser.add_argument("--max_new_tokens", type=int, default=64)
    parser.add_argument("question", nargs="?", help="answer this once and exit; without it, read questions from stdin")
    a = parser.parse_args(argv)

    answer = Answerer(*load_for_inference(a.model, a.template))
    images = [load_image({"path": a.image})] if a.image else []
    if a.question is not None:
        print(answer([a.question], [images], max_new_tokens=a.max_new_tokens)[0])
        return
    interactive = sys.stdin.isatty()
    while True:
        try:
            question = input("you> " if interactive else "")
        except EOFError:
            break
        if question.strip():
            reply = answer([question], [images], max_new_tokens=a.max_new_tokens)[0]
            print(f"model> {reply}" if interactive else reply, flush=True)


if __name__ == "__main__":
    main()
