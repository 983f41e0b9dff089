"""web.py: one server on a free local port for the whole module, driven through gradio_client (streaming, history,
Clear, Stop, Regenerate, bad input, one answer at a time) and by a real browser (Debian's chromium through
playwright): upload, ask, follow up, clear; nothing requested outside 127.0.0.1, no console error, a screenshot."""
import io
import json
import os
import socket
import threading
import time
from urllib.parse import urlparse

import pytest
from PIL import Image

gradio_client = pytest.importorskip("gradio_client", reason="pip install -r requirements-web.txt (make test does)")
pytest.importorskip("gradio", reason="pip install -r requirements-web.txt (make test does)")
pytestmark = pytest.mark.filterwarnings(            # gradio's queue on pandas 3: not ours to fix
    "ignore:.*no_silent_downcasting", "ignore:The copy keyword is deprecated")

import chat  # noqa: E402
import web  # noqa: E402
from cli import run  # noqa: E402
from data import tokenize_prompt  # noqa: E402
from eval import Answerer, load_for_inference  # noqa: E402
from tests.test_train import free_port  # noqa: E402

COLOR, SHAPE = "what color is the shape ?", "what shape is this ?"
CHROMIUM = "/usr/bin/chromium"


class Probe:
    """Wraps the served model's stream: records each prompt, counts answers being written at once, can slow
    every token down (to catch an answer mid-way)."""

    def __init__(self, model):
        self.prompts, self.tokens, self.active, self.most_active, self.delay = [], 0, 0, 0, 0.0
        self.lock, self.stream = threading.Lock(), model.stream
        model.stream = self.recording

    def recording(self, input_ids, images=None, *args, **kw):
        self.prompts.append((input_ids.flatten().tolist(), 0 if images is None else len(images)))
        with self.lock:
            self.active += 1
            self.most_active = max(self.most_active, self.active)
        try:
            for token in self.stream(input_ids, images, *args, **kw):
                time.sleep(self.delay)
                self.tokens += 1
                yield token
        finally:
            with self.lock:
                self.active -= 1


@pytest.fixture(scope="module")
def server(tiny_export):
    """(url, answerer, probe): web.serve on a free port of 127.0.0.1, stopped after the module. Every host name
    this process looks up or connects to meanwhile is in OUTSIDE_CALLS when it is not this machine."""
    port = free_port()
    answerer = Answerer(*load_for_inference(str(tiny_export), device="cpu"))
    probe = Probe(answerer.model)
    lookup, connect = socket.getaddrinfo, socket.socket.connect

    def recorded_lookup(host, *args, **kw):
        record(host)
        return lookup(host, *args, **kw)

    def recorded_connect(sock, address):
        record(address[0] if isinstance(address, tuple) else address)
        return connect(sock, address)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(socket, "getaddrinfo", recorded_lookup)
        patch.setattr(socket.socket, "connect", recorded_connect)
        app = web.serve(answerer, str(tiny_export), port=port, block=False)
        yield f"http://127.0.0.1:{port}/", answerer, probe
        app.close()


OUTSIDE_CALLS = []


def record(host):
    if host not in ("127.0.0.1", "localhost", "::1", None) and not str(host).startswith("/"):
        OUTSIDE_CALLS.append(host)


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    path = tmp_path_factory.mktemp("web_images") / "red.png"
    Image.new("RGB", (40, 30), (220, 30, 30)).save(path)
    return path


@pytest.fixture(autouse=True)
def full_speed(server):
    server[2].delay = 0.0


def client(url):
    return gradio_client.Client(url, verbose=False, download_files=False)


def ask(text, files=(), max_new_tokens=8, temperature=0.0):
    return ({"text": text, "files": [gradio_client.handle_file(str(f)) for f in files]}, temperature, 1.0,
            max_new_tokens)


def texts(chat_messages):
    """The chat's messages as (role, text or "<file>") pairs."""
    return [(m["role"], " ".join(c.get("text", "<file>") for c in m["content"])) for m in chat_messages]


def prompt_ids(answerer, messages, num_images):
    return tokenize_prompt(messages, answerer.tokenizer, answerer.template, num_images=num_images).tolist()


def test_answers_stream_remember_the_conversation_and_clear_forgets_it(server, tiny_export, image, capsys):
    url, answerer, probe = server
    c = client(url)
    job = c.submit(*ask(SHAPE, [image]), api_name="/send")
    updates = [texts(chat_messages) for chat_messages, _ in job]
    first = updates[-1][-1][1]
    partial = [u[-1][1] for u in updates[:-1] if u[-1][0] == "assistant"]
    assert len({p for p in partial if p and p != first}) >= 2            # the answer grows, piece by piece
    assert updates[-1] == [("user", "<file>"), ("user", SHAPE), ("assistant", first)]
    chat.main(["--model", str(tiny_export), "--image", str(image), "--max_new_tokens", "8", SHAPE])
    assert first == capsys.readouterr().out.strip()                    # chat.py's greedy answer

    second = texts(c.predict(*ask(COLOR), api_name="/send")[0])
    assert second[:3] == updates[-1] and second[3] == ("user", COLOR)
    history = [{"role": "user", "content": f"<image>\n{SHAPE}"}, {"role": "assistant", "content": first},
               {"role": "user", "content": COLOR}]
    assert probe.prompts[-1] == (prompt_ids(answerer, history, 1), 1)   # the second turn sees the first

    assert c.predict(api_name="/clear") == []
    again = texts(c.predict(*ask(SHAPE, [image]), api_name="/send")[0])
    assert again == updates[-1] and probe.prompts[-1] == probe.prompts[-3]


@pytest.mark.parametrize("upload, text, message", [
    ("notes.txt", SHAPE, "⚠️ Not an image I can read: notes.txt (image unreadable)"),
    ("cut.png", SHAPE, "⚠️ Not an image I can read: cut.png (image unreadable)"),
    (None, "  ", "⚠️ Cannot ask this: type a question"),
    (None, "yes " * 600, "⚠️ Cannot ask this: this question takes 6"),
])
def test_bad_input_gets_a_message_in_the_chat(server, tmp_path, upload, text, message):
    url, _, probe = server
    files = []
    if upload == "notes.txt":
        files = [tmp_path / upload]
        files[0].write_text("not an image")
    elif upload == "cut.png":
        png = io.BytesIO()
        Image.effect_noise((64, 64), 60).save(png, "PNG")
        files = [tmp_path / upload]
        files[0].write_bytes(png.getvalue()[:len(png.getvalue()) // 2])     # a truncated file
    asked = len(probe.prompts)
    shown, box = client(url).predict(*ask(text, files), api_name="/send")
    assert texts(shown)[-1][1].startswith(message) and len(shown) == 1
    assert len(probe.prompts) == asked                                 # nothing was generated
    if upload:
        assert box["text"] == text and box["files"] == []              # the question stays, without the bad file


def test_each_tab_has_its_conversation_and_answers_are_written_one_at_a_time(server):
    url, answerer, probe = server
    probe.delay, probe.most_active = 0.05, 0
    jobs = [client(url).submit(*ask(q, max_new_tokens=6), api_name="/send") for q in (SHAPE, COLOR)]
    seen = set()
    while not all(job.done() for job in jobs):
        seen |= {job.status().code for job in jobs}
        time.sleep(0.01)
    assert probe.most_active == 1 and gradio_client.utils.Status.IN_QUEUE in seen     # the other one waited
    for job, question in zip(jobs, (SHAPE, COLOR)):
        assert texts(job.result()[0])[0] == ("user", question)         # no turn of the other tab
    assert sorted(probe.prompts[-2:]) == sorted(
        (prompt_ids(answerer, [{"role": "user", "content": q}], 0), 0) for q in (SHAPE, COLOR))


def test_stop_ends_the_answer_at_once_and_regenerate_writes_it_again(server):
    url, _, probe = server
    c = client(url)
    probe.delay = 0.05
    job = c.submit(*ask(SHAPE, max_new_tokens=60), api_name="/send")
    while len(job.outputs()) < 3:                                      # a few pieces in
        time.sleep(0.01)
    job.cancel()
    deadline = time.time() + 10                                        # at once, unless the machine is loaded
    while probe.active and time.time() < deadline:
        time.sleep(0.05)
    written = probe.tokens
    time.sleep(0.3)
    assert probe.tokens == written and probe.active == 0              # nothing more after Stop
    probe.delay = 0.0
    regenerated = texts(c.predict(0.0, 1.0, 8, api_name="/regenerate"))
    fresh = texts(client(url).predict(*ask(SHAPE), api_name="/send")[0])
    assert regenerated == fresh                                        # the stopped answer, written again in full


def test_the_page_in_a_real_browser(server, image, tmp_path_factory, capsys):
    if not os.path.exists(CHROMIUM):
        pytest.skip(f"no {CHROMIUM}: apt-get install chromium (Debian's package; .ci/run installs it)")
    playwright = pytest.importorskip("playwright.sync_api", reason="pip install -r requirements-web.txt")
    url, answerer, probe = server
    expected = answer_of(answerer, [(SHAPE, [image])])
    follow_up = answer_of(answerer, [(SHAPE, [image]), (COLOR, [])])
    requests, errors = [], []
    shot = tmp_path_factory.mktemp("screenshots") / "web_chat.png"
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=[
            "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--disable-component-update", "--no-first-run", "--disable-sync", "--disable-default-apps"])
        try:
            page = browser.new_page(viewport={"width": 1100, "height": 900})
            page.set_default_timeout(90_000)                            # two workers share two cores in make test
            page.on("request", lambda r: requests.append(r.url))
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(url)
            assert "template vicuna_v1" in page.locator("#header").inner_text()     # the export and its template
            page.locator("#question input[type=file]").set_input_files(str(image))
            page.locator("#question textarea").fill(SHAPE)
            page.locator("#question img").wait_for()                    # the upload is attached
            probe.delay, asked = 0.1, len(probe.prompts)
            page.locator("#send").click()
            bot = page.locator('[data-testid="bot"]')
            bot.first.wait_for()                                        # the answer is being written (slowly) ...
            page.locator("#question textarea").fill(COLOR)
            page.keyboard.press("Enter")                                # ... and the follow-up waits its turn,
            page.keyboard.press("Enter")                                # sent once however often Enter is pressed
            assert probe.active == 1                                    # (the first answer was still running)
            page.wait_for_function("t => [...document.querySelectorAll('[data-testid=\"bot\"]')]"
                                   ".some(e => e.innerText.trim() === t)", arg=expected)
            assert page.locator('[data-testid="user"] img').count() == 1   # the image is in the conversation
            page.wait_for_function("t => [...document.querySelectorAll('[data-testid=\"bot\"]')].length == 2 && "
                                   "document.querySelectorAll('[data-testid=\"bot\"]')[1].innerText.trim() === t",
                                   arg=follow_up)
            page.wait_for_timeout(1500)                                 # no third answer starts
            assert len(probe.prompts) == asked + 2 and bot.count() == 2
            page.screenshot(path=str(shot), full_page=True)
            page.locator("#clear").click()
            bot.first.wait_for(state="detached")
        finally:
            browser.close()
    with capsys.disabled():
        print(f"\nscreenshot of the web chat: {shot}")
    assert [u for u in requests if urlparse(u).hostname not in ("127.0.0.1", None)] == []
    assert errors == []


def test_demo_examples_only_for_an_export_of_the_demo(tmp_path):
    from demo import QUESTIONS, record
    (tmp_path / "images").mkdir()
    records = [record(f"test-0-{kind}", "test_00000.png", [(question, "red")]) for kind, question in QUESTIONS.items()]
    (tmp_path / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (tmp_path / "finetune.jsonl").write_text("")
    (tmp_path / "export").mkdir()
    config = f"template: chatml\ndata_path: {tmp_path / 'finetune.jsonl'}\nimage_folder: {tmp_path / 'images'}\n"
    (tmp_path / "export" / "train_config.yaml").write_text(config)
    assert web.demo_examples(str(tmp_path / "export")) == [
        {"text": q, "files": [str(tmp_path / "images" / "test_00000.png")]} for q in QUESTIONS.values()]
    (tmp_path / "export" / "train_config.yaml").write_text(config.replace("finetune.jsonl", "test.jsonl"))
    assert web.demo_examples(str(tmp_path / "export")) == []


def test_a_wrong_model_directory_is_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit:
        run(web.main, "web.py", ["--model", str(tmp_path / "nowhere")])
    assert exit.value.code == 2
    assert capsys.readouterr().err.startswith(f"web.py: --model: {tmp_path / 'nowhere'}: no such directory")


def answer_of(answerer, turns):
    """The greedy answer to the last of these turns (earlier answers generated the same way): chat.Conversation."""
    conversation = chat.Conversation(answerer)
    for question, images in turns:
        conversation.ask(question, [Image.open(i) for i in images])
        "".join(conversation.reply())
    return conversation.turns[-1].answer


def test_the_server_reached_nothing_outside_this_machine(server):
    assert OUTSIDE_CALLS == []       # no analytics, no version check, no share link, no hub
