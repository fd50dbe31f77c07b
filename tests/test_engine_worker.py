"""Serving through an existing engine: `transformers serve` runs our llava-hf export on CPU, `engine_worker` and
`sglang_worker` put it behind our controller and OpenAI API server, and its greedy answers equal our own worker's
on the same weights (text and image questions, streamed and not, stop strings, token limits). Real processes on
loopback, with a cluster key."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import requests
import torch
from PIL import Image
from serve_helpers import REPO, SERVE_ENV, SLACK, Proc, free_port, png_b64, wait_until

from llava.conversation import conv_templates, get_conv_template
from llava.serve.engine_prompt import content_parts, split_prompt, to_messages
from llava.serve.protocol import ServeError

KEY = "engine-test-key"
RED, BLUE = (200, 30, 30), (30, 30, 200)
# What the tiny model learns (a few seconds of AdamW), so greedy answers are decided by clear margins, depend on the
# image, and end with EOS before the token limit.
LESSONS = [
    (RED, "What colour is the picture?", "The picture is red."),
    (BLUE, "What colour is the picture?", "The picture is blue."),
    (None, "Say hello to me.", "Hello there, my friend."),
    (None, "Count to five.", "one two three four five"),
]


# ---------------------------------------------------------------------------------------------------------------------
# Prompt -> messages (no processes)
# ---------------------------------------------------------------------------------------------------------------------


def _conversation(name: str, n_users: int, system: str | None):
    conv = get_conv_template(name)
    if system is not None:
        conv.set_system_message(system)
    turns = []
    for i in range(n_users):
        turns.append(("user", "<image>\nWhat is this?" if i == 0 else f"And question {i}?"))
        if i < n_users - 1:
            turns.append(("assistant", f"Answer {i}."))
    for role, text in turns:
        conv.append_message(conv.roles[0] if role == "user" else conv.roles[1], text)
    conv.append_message(conv.roles[1], None)
    return conv.get_prompt(), turns


def _render(name: str, system: str | None, turns) -> str:
    conv = get_conv_template(name)
    if system is not None:
        conv.set_system_message(system)
    for role, text in turns:
        conv.append_message(conv.roles[0] if role == "user" else conv.roles[1], text)
    conv.append_message(conv.roles[1], None)
    return conv.get_prompt()


@pytest.mark.parametrize("name", sorted(n for n, t in conv_templates.items() if not t.messages))
def test_split_prompt_round_trips_every_template(name):
    plain = conv_templates[name].sep_style.name == "PLAIN"
    for n_users in (1, 2, 3):
        for system in (None, "Answer briefly."):
            prompt, turns = _conversation(name, n_users, system)
            got_system, got_turns = split_prompt(prompt, name)
            assert _render(name, got_system, got_turns) == prompt  # byte for byte what our worker would see
            if not plain:  # `plain` has no role tags: several turns may read as one, which renders the same
                assert got_turns == turns
                assert got_system == system


def test_split_prompt_refuses_another_template():
    prompt, _ = _conversation("chatml_direct", 1, None)
    with pytest.raises(ServeError, match="llava_v1"):
        split_prompt(prompt, "llava_v1")


def test_messages_carry_images_in_marker_order():
    prompt, _ = _conversation("llava_v1", 1, None)
    prompt = prompt.replace("What is this?", "What is this? Compare with <image>\nthat one.")
    messages = to_messages(prompt, "llava_v1", ["data:a", "data:b"])
    assert messages == [
        {
            "role": "user",
            "content": [
                {"type": "image_url", "image_url": {"url": "data:a"}},
                {"type": "text", "text": "What is this? Compare with "},
                {"type": "image_url", "image_url": {"url": "data:b"}},
                {"type": "text", "text": "that one."},
            ],
        }
    ]
    assert content_parts("no image here", []) == "no image here"
    with pytest.raises(ServeError, match="2 `<image>` markers but 1 images"):
        to_messages(prompt, "llava_v1", ["data:a"])


# ---------------------------------------------------------------------------------------------------------------------
# The stack: transformers serve + engine_worker + sglang_worker beside our own model worker
# ---------------------------------------------------------------------------------------------------------------------


def _train(tiny, image_processor):
    from llava.mm_utils import process_images, tokenizer_image_token

    model = tiny.model("llama", seed=7)
    model.config.conv_template = "llava_v1"
    examples = []
    for color, question, answer in LESSONS:
        conv = get_conv_template("llava_v1")
        conv.append_message(conv.roles[0], f"<image>\n{question}" if color else question)
        conv.append_message(conv.roles[1], None)
        prompt_len = len(tokenizer_image_token(conv.get_prompt(), tiny.tokenizer))
        conv.messages[-1][1] = answer
        ids = tokenizer_image_token(conv.get_prompt(), tiny.tokenizer)  # the reply ends with </s>
        labels = [-100] * prompt_len + ids[prompt_len:]
        pixels = process_images([Image.new("RGB", (32, 32), color)], image_processor, model.config) if color else None
        examples.append((torch.tensor([ids]), torch.tensor([labels]), pixels))
    torch.manual_seed(0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for step in range(120):
        ids, labels, pixels = examples[step % len(examples)]
        model(input_ids=ids, labels=labels, images=pixels).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return model.eval()


class Stack:
    def __init__(self, tmp: str):
        self.tmp, self.procs = tmp, []
        self.ports = {name: free_port() for name in ("engine", "controller", "ours", "engine_w", "sgl", "api")}
        self.engine_url = f"http://127.0.0.1:{self.ports['engine']}/v1"
        self.controller = f"http://127.0.0.1:{self.ports['controller']}"
        self.api = f"http://127.0.0.1:{self.ports['api']}/v1"

    def start(self, name: str, module: str, args: list[str]) -> Proc:
        proc = Proc(name, module, [str(a) for a in args], self.tmp, {"OMP_NUM_THREADS": "1"})
        self.procs.append(proc)
        return proc

    def worker_args(self, port_name: str, model_name: str) -> list:
        port = self.ports[port_name]
        common = ["--port", port, "--worker", f"http://127.0.0.1:{port}", "--controller", self.controller]
        return [*common, "--model-name", model_name, "--cluster-key", KEY, "--heart-beat-interval", "0.5"]

    def stop(self):
        for proc in reversed(self.procs):
            proc.stop()


@pytest.fixture(scope="module")
def stack(tiny, image_processor, tmp_path_factory):
    from llava.model.convert_hf import export_to_hf

    original = tiny.save_full(_train(tiny, image_processor), "engine-original")
    exported = export_to_hf(original, tiny.new_dir("engine-hf"))
    s = Stack(str(tmp_path_factory.mktemp("engine-stack")))
    try:
        s.engine = s.start(
            "transformers-serve",
            "transformers.cli.transformers",
            ["serve", exported, "--host", "127.0.0.1", "--port", s.ports["engine"], "--device", "cpu"],
        )
        s.start("controller", "llava.serve.controller", ["--port", s.ports["controller"], "--cluster-key", KEY])
        s.start(
            "ours",
            "llava.serve.model_worker",
            [*s.worker_args("ours", "ours"), "--model-path", original, "--device", "cpu"],
        )
        # The workers wait for the engine to load (--engine-wait), as they would beside a real one.
        s.start(
            "engine-worker",
            "llava.serve.engine_worker",
            [*s.worker_args("engine_w", "engine"), "--engine-url", s.engine_url, "--engine-wait", 60 * SLACK]
            + ["--engine-stop", "local"],  # transformers serve fails `stop` for vision-language models
        )
        s.start(
            "sglang-worker",
            "llava.serve.sglang_worker",
            [*s.worker_args("sgl", "sgl"), "--sgl-endpoint", s.engine_url.removesuffix("/v1"), "--engine-wait"]
            + [60 * SLACK, "--engine-stop", "local", "--conv-mode", "llava_v1"],
        )
        s.start(
            "api",
            "llava.serve.openai_api_server",
            ["--port", s.ports["api"], "--controller", s.controller, "--cluster-key", KEY],
        )
        listed = {"ours", "engine", "sgl"}
        wait_until(lambda: listed <= set(_controller(s, "/list_models")["models"]), 120, "the three workers", s.procs)
        yield s
    finally:
        s.stop()


def _controller(s: Stack, path: str, body: dict | None = None) -> dict:
    response = requests.post(s.controller + path, json=body or {}, headers={"X-LLaVA-Cluster-Key": KEY}, timeout=10)
    response.raise_for_status()
    return response.json()


def _client(s: Stack):
    from openai import OpenAI

    return OpenAI(base_url=s.api, api_key="unused", timeout=120 * SLACK, max_retries=0)


def _ask(s: Stack, model: str, color, question: str, stream: bool, **kwargs) -> tuple[str, str]:
    """(answer, finish_reason) of a greedy chat completion through our OpenAI API server."""
    content = [{"type": "text", "text": question}]
    if color:
        content.insert(
            0, {"type": "image_url", "image_url": {"url": "data:image/png;base64," + png_b64((32, 32), color)}}
        )
    request = dict(model=model, messages=[{"role": "user", "content": content}], temperature=0, **kwargs)
    client = _client(s)
    if not stream:
        choice = client.chat.completions.create(**request).choices[0]
        return choice.message.content, choice.finish_reason
    text, finish = "", None
    for chunk in client.chat.completions.create(stream=True, **request):
        for choice in chunk.choices:
            text += choice.delta.content or ""
            finish = choice.finish_reason or finish
    return text, finish


ENGINES = ("engine", "sgl")


@pytest.mark.slow
@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_greedy_answers_equal_our_worker(stack, stream):
    for color, question, taught in LESSONS[:3]:
        ours = _ask(stack, "ours", color, question, stream, max_tokens=40)
        assert ours == (taught, "stop")  # the lesson was learnt, so the comparison below is about real answers
        for model in ENGINES:
            assert _ask(stack, model, color, question, stream, max_tokens=40) == ours, model


@pytest.mark.slow
@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_stop_strings_and_max_tokens(stack, stream):
    stopped = _ask(stack, "ours", RED, "What colour is the picture?", stream, max_tokens=40, stop=[" is"])
    assert stopped == ("The picture", "stop")
    limited = _ask(stack, "ours", None, "Say hello to me.", stream, max_tokens=3)
    assert limited[1] == "length" and len(limited[0]) < len("Hello there, my friend.")
    for model in ENGINES:
        assert _ask(stack, model, RED, "What colour is the picture?", stream, max_tokens=40, stop=[" is"]) == stopped
        assert _ask(stack, model, None, "Say hello to me.", stream, max_tokens=3) == limited


@pytest.mark.slow
def test_worker_protocol_and_details(stack):
    """The original protocol through the controller's address lookup, as the web UI and test_message use it."""
    from llava.serve.client import stream_worker

    conv = get_conv_template("llava_v1")
    conv.append_message(conv.roles[0], "<image>\nWhat colour is the picture?")
    conv.append_message(conv.roles[1], None)
    payload = {"prompt": conv.get_prompt(), "images": [png_b64((32, 32), BLUE)], "temperature": 0, "stop": "</s>"}
    finals = {}
    for model in ("ours", *ENGINES):
        address = _controller(stack, "/get_worker_address", {"model": model})["address"]
        chunks = list(stream_worker(address + "/worker_generate_stream", {**payload, "model": model}, KEY))
        assert all(c["error_code"] == 0 for c in chunks), chunks[-1]
        assert all(c["text"].startswith(payload["prompt"]) for c in chunks)
        finals[model] = chunks[-1]["text"][len(payload["prompt"]) :].strip()
        assert chunks[-1]["finish_reason"] == "stop"
    assert finals == {"ours": "The picture is blue.", "engine": "The picture is blue.", "sgl": "The picture is blue."}
    address = _controller(stack, "/get_worker_address", {"model": "engine"})["address"]
    details = requests.post(address + "/model_details", headers={"X-LLaVA-Cluster-Key": KEY}, timeout=10).json()
    assert details["conv_mode"] == "llava_v1"  # found in the export's chat template
    assert details["engine"] == stack.engine_url
    assert requests.post(address + "/model_details", timeout=10).status_code == 401  # the cluster key is required
    status = requests.post(address + "/worker_get_status", headers={"X-LLaVA-Cluster-Key": KEY}, timeout=10).json()
    assert status["model_names"] == ["engine"] and status["queue_length"] == 0


@pytest.mark.slow
def test_engine_gone_gives_an_error_naming_it(stack):
    """Last in this module: it stops the engine."""
    from openai import APIStatusError

    stack.engine.stop()
    for model in ENGINES:
        with pytest.raises(APIStatusError) as err:
            _ask(stack, model, None, "Say hello to me.", False, max_tokens=5)
        assert err.value.status_code == 503
        assert stack.engine_url in str(err.value)
    assert _ask(stack, "ours", None, "Say hello to me.", False, max_tokens=40)[0] == "Hello there, my friend."


@pytest.mark.slow
def test_refuses_to_start_without_an_engine(tmp_path):
    url = f"http://127.0.0.1:{free_port()}/v1"  # nothing listens there
    for module, flag in (
        ("llava.serve.engine_worker", "--engine-url"),
        ("llava.serve.sglang_worker", "--sgl-endpoint"),
    ):
        done = subprocess.run(
            [sys.executable, "-m", module, flag, url, "--port", str(free_port()), "--no-register"],
            capture_output=True,
            text=True,
            timeout=60 * SLACK,
            cwd=REPO,
            env={**os.environ, **SERVE_ENV},
        )
        assert done.returncode != 0
        assert f"The engine at {url} does not answer" in done.stderr, done.stderr[-2000:]
