"""The terminal chat driven through a pseudo-terminal, as a person (or tmux) would: several turns, then Ctrl-D."""

from __future__ import annotations

import os
import select
import subprocess
import sys
import time

import pytest
from PIL import Image
from serve_helpers import REPO, SERVE_ENV

from llava.inference import GenerationParams, LlavaEngine

pytestmark = pytest.mark.slow


class Terminal:
    """A child process on a pseudo-terminal; `expect` reads until a text shows up."""

    def __init__(self, args: list[str], stderr_path: str):
        self.master, slave = os.openpty()
        self._stderr = open(stderr_path, "w")
        self.proc = subprocess.Popen(
            args, stdin=slave, stdout=slave, stderr=self._stderr, env={**os.environ, **SERVE_ENV}, cwd=REPO
        )
        os.close(slave)
        self.output = ""

    def expect(self, text: str, timeout: float, start: int = 0) -> int:
        deadline = time.monotonic() + timeout
        while text not in self.output[start:]:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or self.proc.poll() is not None and not select.select([self.master], [], [], 0)[0]:
                raise TimeoutError(f"`{text}` did not appear; output so far:\n{self.output}")
            if select.select([self.master], [], [], min(remaining, 0.5))[0]:
                try:
                    self.output += os.read(self.master, 4096).decode(errors="replace")
                except OSError:  # the child closed the terminal
                    pass
        return self.output.index(text, start) + len(text)

    def send(self, data: str) -> None:
        os.write(self.master, data.encode())

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        os.close(self.master)
        self._stderr.close()


def test_cli_chat_about_an_image(tiny, tmp_path):
    model = tiny.model("llama", seed=11)
    model.config.conv_template = "llava_v1"
    checkpoint = tiny.save_full(model)
    image_path = tmp_path / "picture.png"
    Image.new("RGB", (40, 30), (10, 100, 200)).save(image_path)
    args = [
        sys.executable,
        "-m",
        "llava.serve.cli",
        "--model-path",
        checkpoint,
        "--device",
        "cpu",
        "--image-file",
        str(image_path),
        "--temperature",
        "0",
        "--max-new-tokens",
        "12",
    ]
    term = Terminal(args, str(tmp_path / "cli.stderr"))
    try:
        at = term.expect("USER: ", 120)
        answers = []
        for question in ("What is in the picture?", "And what colour is it?"):
            term.send(question + "\n")
            reply_at = term.expect("ASSISTANT: ", 60, at)
            at = term.expect("USER: ", 60, reply_at)
            answers.append(term.output[reply_at : at - len("USER: ")].strip())
        term.send("\x04")  # Ctrl-D at the start of a line: end of input
        assert term.proc.wait(30) == 0
    finally:
        term.close()
    assert all(answers), term.output
    engine = LlavaEngine.from_pretrained(checkpoint, device="cpu")
    prompt = engine.build_prompt("What is in the picture?", n_images=1)
    image = Image.open(image_path).convert("RGB")
    expected = engine.generate([prompt], [[image]], GenerationParams(temperature=0, max_new_tokens=12))[0]
    assert answers[0] == expected
