"""A web page to talk to an exported model: one command, one process, no internet needed.

examples:
  make web                                         # the demo's model (installs requirements-web.txt first)
  python web.py --model runs/demo/finetune         # then open http://127.0.0.1:7860
  python web.py --model runs/mgm-7b-yours-qlora/merged --port 8080

Needs gradio (>= 6.17): pip install -r requirements-web.txt (make web does it). Listens on 127.0.0.1:7860 by
default, so only this machine reaches it. The page has no login: --host 0.0.0.0 opens it to everyone on your
network (or use an SSH tunnel: ssh -L 7860:127.0.0.1:7860 HOST). No share link is made, analytics are off, and
gradio serves the page's scripts, styles and fonts itself (HF_HUB_OFFLINE=1).

The model is loaded once and writes one answer at a time: other requests wait in a queue, and their page shows its
place in it. A question sent while an answer is still being written is answered after it. Each browser tab holds its
own conversation, kept as chat.py keeps one (the same prompts, the same length rule, greedy at temperature 0). The
page shows the export's name and template, the conversation with its images, a box for the question with image
upload (any number per question), Send (or Enter), Stop (ends the answer at once; what was written stays),
Regenerate (the last answer again, with the current settings), Clear (a new conversation), and sliders for
temperature, top-p and max new tokens. A question that cannot be asked (no text, an upload that is not a readable
image, a conversation past the model's length) gets a message in the conversation instead. For the demo's export the
demo's held-out images and questions are there as examples. gradio_client can call it too: /send, /regenerate,
/clear.
"""
from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")   # before gradio is imported: it reads this once
os.environ.setdefault("HF_HUB_OFFLINE", "1")

try:
    import gradio as gr
except ImportError:    # the web page's own requirement, not the trainer's
    print("web.py: gradio is not installed: pip install -r requirements-web.txt (or run `make web`)", file=sys.stderr)
    sys.exit(2)
import yaml            # noqa: E402

from chat import (Conversation, TooLong, add_model_arguments, check_sampling, dropped_notice,  # noqa: E402
                  load_answerer, model_length)
import cli    # noqa: E402
from cli import UserError, run    # noqa: E402
from conversation import ConversationError    # noqa: E402
from data import BadSample, load_image    # noqa: E402
from eval import Answerer    # noqa: E402

REPO = Path(__file__).resolve().parent


def main(argv: list[str] | None = None, *, block: bool = True) -> gr.Blocks:
    parser = cli.ArgumentParser(prog="web.py", description=__doc__)
    add_model_arguments(parser)
    parser.add_argument("--host", default="127.0.0.1", help="the address to listen on (default: %(default)s, "
                        "this machine only; 0.0.0.0: every interface, and the page has no login)")
    parser.add_argument("--port", type=cli.int_at_least(1), default=7860, help="the port to listen on (default: 7860)")
    a = parser.parse_args(argv)
    answerer = load_answerer(a.model, a.template)
    return serve(answerer, a.model, host=a.host, port=a.port, max_length=a.max_length, block=block)


def serve(answerer: Answerer, model_dir: str, *, host: str = "127.0.0.1", port: int = 7860,
          max_length: int | None = None, block: bool = True) -> gr.Blocks:
    """Build the page and serve it; block=False returns the running app (app.close() stops it)."""
    examples = demo_examples(model_dir)
    app = build_app(answerer, os.path.normpath(model_dir), max_length=max_length, examples=examples)
    app.queue(default_concurrency_limit=1)
    print(f"serving {model_dir} on http://{host}:{port}", flush=True)
    app.launch(server_name=host, server_port=port, share=False, prevent_thread_lock=not block, quiet=True,
               allowed_paths=sorted({str(Path(f).parent) for e in examples for f in e["files"]}))
    return app


@dataclass
class Session:
    """One browser tab: its conversation, and the chat it sees (the turns' messages plus notices)."""
    conversation: Conversation | None = None
    shown: list[dict] = field(default_factory=list)    # the Chatbot's messages
    answer_at: int | None = None                       # where in `shown` the last answer is


def build_app(answerer: Answerer, name: str, *, max_length: int | None = None,
              examples: list[dict] | None = None) -> gr.Blocks:
    limit = max_length or model_length(answerer.model)
    with gr.Blocks(title=f"{name} · Mini-Gemini", analytics_enabled=False) as app:
        takes = "takes up to" if answerer.processor.aspect_ratio == "anyres" else "takes"    # AnyRes: by its size
        gr.Markdown(f"### {name}\ntemplate `{answerer.template}` · length {limit} positions (an image {takes} "
                    f"{answerer.model.tokens_per_image})", elem_id="header")
        session = gr.State(Session())
        chatbot = gr.Chatbot(label="conversation", elem_id="conversation", height=460, feedback_options=None,
                             buttons=["copy"])
        question = gr.MultimodalTextbox(show_label=False, elem_id="question", file_count="multiple",
                                        sources=["upload"], submit_btn=False,
                                        placeholder="Ask about the image: attach it with the clip, type, Enter")
        with gr.Row():
            send_button = gr.Button("Send", variant="primary", elem_id="send")
            stop_button = gr.Button("Stop", elem_id="stop")
            regenerate_button = gr.Button("Regenerate", elem_id="regenerate")
            clear_button = gr.Button("Clear", elem_id="clear")
        with gr.Row():
            temperature = gr.Slider(0, 2, value=0, step=0.05, label="temperature (0: greedy)")
            top_p = gr.Slider(0.05, 1, value=1, step=0.05, label="top-p")
            max_new_tokens = gr.Slider(1, max(2, min(1024, limit - 1)), value=min(64, limit - 1), step=1,
                                       label="max new tokens")
        if examples:
            gr.Examples([[e] for e in examples], inputs=[question], label="demo examples")
        settings = [temperature, top_p, max_new_tokens]
        one_at_a_time = dict(concurrency_limit=1, concurrency_id="model", show_progress="minimal")   # one model

        def send(session: Session, message: dict | None, temperature: float, top_p: float, max_new_tokens: int):
            """Ask the question typed (with its uploads) and stream the answer: (chat, question box) updates."""
            message = message or {}
            text = (message.get("text") or "").strip()
            images, readable, problems = [], [], []
            for path in message.get("files") or []:
                try:
                    images.append(load_image({"path": path}))
                    readable.append(path)
                except BadSample as e:
                    problems.append(f"{Path(path).name} ({e.kind})")
            if problems:   # the question stays in the box, with the uploads that are images
                yield notice(session, f"Not an image I can read: {', '.join(problems)}. Attach a PNG, JPEG, WebP "
                             "or other image file."), {"text": message.get("text") or "", "files": readable}
                return
            session.conversation = session.conversation or Conversation(answerer, max_length)
            try:
                check_sampling(temperature, top_p, int(max_new_tokens))
                dropped = session.conversation.ask(text, images, int(max_new_tokens))
            except (UserError, TooLong, BadSample, ConversationError) as e:
                yield notice(session, f"Cannot ask this: {e}."), gr.skip()
                return
            session.shown += [{"role": "user", "content": {"path": path}} for path in readable]
            session.shown.append({"role": "user", "content": text})
            if dropped:
                notice(session, dropped_notice(dropped, session.conversation.max_length).capitalize() + ".")
            yield from answer(session, temperature, top_p, max_new_tokens, cleared={"text": "", "files": []})

        def regenerate(session: Session, temperature: float, top_p: float, max_new_tokens: int):
            """The last answer again, with the current settings."""
            if session.conversation is None or session.answer_at is None:
                yield notice(session, "Nothing to regenerate yet: ask a question first.")
                return
            del session.shown[session.answer_at:]
            yield from (chat for chat, _ in answer(session, temperature, top_p, max_new_tokens))

        def answer(session: Session, temperature, top_p, max_new_tokens, cleared=None):
            """Stream the answer to the conversation's last question into a new message."""
            shown, conversation = session.shown, session.conversation   # a Clear meanwhile starts new ones
            at = session.answer_at = len(shown)
            shown.append({"role": "assistant", "content": ""})
            yield shown, cleared
            try:
                for _ in conversation.reply(max_new_tokens=int(max_new_tokens), temperature=temperature,
                                            top_p=top_p):
                    shown[at] = {"role": "assistant", "content": conversation.turns[-1].answer}
                    yield shown, gr.skip()
            finally:   # also after Stop, which closes this generator: the next update shows it
                if not conversation.turns[-1].answer:
                    shown[at] = {"role": "assistant", "content": "(no answer)"}
            yield shown, gr.skip()

        def clear(session: Session):
            session.conversation, session.shown, session.answer_at = None, [], None
            return []

        # "always_last": a question sent while an answer is still being written is sent once that answer is done
        # (gradio's default for a submit, "once", drops it without a word; "multiple" sends it again on every Enter)
        asked = gr.on([question.submit, send_button.click], send, [session, question, *settings],
                      [chatbot, question], api_name="send", trigger_mode="always_last", **one_at_a_time)
        regenerated = regenerate_button.click(regenerate, [session, *settings], [chatbot], api_name="regenerate",
                                              **one_at_a_time)
        stop_button.click(None, None, None, cancels=[asked, regenerated], api_visibility="undocumented")
        gr.on([clear_button.click, chatbot.clear], clear, [session], [chatbot], cancels=[asked, regenerated],
              api_name="clear", queue=False)
    return app


def notice(session: Session, text: str) -> list[dict]:
    """A message from the page itself (not the model) in the chat; the chat's messages."""
    session.shown.append({"role": "assistant", "content": f"⚠️ {text}"})
    return session.shown


def demo_examples(model_dir: str, n: int = 4) -> list[dict]:
    """Questions about the demo's held-out images, when the export was trained on the demo's data (its
    train_config.yaml names a finetune.jsonl with demo.py's test.jsonl beside it); otherwise none."""
    from demo import QUESTIONS
    config_path = Path(model_dir, "train_config.yaml")
    config = yaml.safe_load(config_path.read_text()) if config_path.exists() else {}
    data, folder = (_existing(config.get(k)) for k in ("data_path", "image_folder"))
    if data is None or folder is None or data.name != "finetune.jsonl" or not (data.parent / "test.jsonl").exists():
        return []
    with open(data.parent / "test.jsonl") as f:
        records = [json.loads(line) for line, _ in zip(f, range(n))]
    questions = [r["conversations"][0]["value"].replace("<image>", "").strip() for r in records]
    if not set(questions) <= set(QUESTIONS.values()):
        return []
    return [{"text": q, "files": [str(folder / r["image"])]} for q, r in zip(questions, records)]


def _existing(path: str | None) -> Path | None:
    """A path from a recipe: relative to the working directory, or to this repository (where demo.py runs)."""
    for candidate in ([Path(path), REPO / path] if path else []):
        if candidate.exists():
            return candidate.resolve()
    return None


if __name__ == "__main__":
    run(main, "web.py")
