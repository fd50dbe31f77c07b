"""The original LLaVA release in its own virtual environment, run in subprocesses beside our code.

`orig` is a session fixture: it builds `.venv-orig` once (tests/compat/setup_original.sh, cached between runs by
its marker file) and returns an `Original` that runs Python code there. Tests hand data in and out as JSON or
files in a temp dir; the original's code never runs in this interpreter.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SETUP = os.path.join(ROOT, "tests", "compat", "setup_original.sh")
VENV = os.environ.get("LLAVA_ORIG_VENV", os.path.join(ROOT, ".venv-orig"))


class Original:
    """Runs code against the original LLaVA release (`import llava` there is the original package)."""

    def __init__(self, python: str, cwd: str):
        self.python = python
        self.cwd = cwd  # a directory outside our checkout, so `import llava` finds the original package

    def env(self) -> dict:
        env = dict(os.environ)
        env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", WANDB_MODE="disabled", TOKENIZERS_PARALLELISM="false")
        # Our checkout must not shadow the original package: run from a neutral directory, no PYTHONPATH.
        env.pop("PYTHONPATH", None)
        return env

    def run(self, code: str, *args: str, timeout: float = 600, cwd: str | None = None) -> subprocess.CompletedProcess:
        """Run `code` (dedented) with the original's interpreter; raise with its stderr when it fails."""
        proc = subprocess.run(
            [self.python, "-c", textwrap.dedent(code), *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            env=self.env(),
            cwd=cwd or self.cwd,
        )
        if proc.returncode != 0:
            raise AssertionError(f"original LLaVA code failed (rc {proc.returncode}):\n{proc.stderr[-4000:]}")
        return proc

    def json(self, code: str, *args: str, timeout: float = 600, cwd: str | None = None):
        """Run `code`, which must print one JSON document as its last stdout line, and return it parsed."""
        out = self.run(code, *args, timeout=timeout, cwd=cwd).stdout.strip().splitlines()
        return json.loads(out[-1])


@pytest.fixture(scope="session")
def orig(tmp_path_factory) -> Original:
    proc = subprocess.run(["bash", SETUP, VENV], capture_output=True, text=True, timeout=1800)
    if proc.returncode != 0:
        pytest.fail(
            f"could not build the original LLaVA environment ({SETUP}):\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
        )
    python = os.path.join(VENV, "bin", "python")
    neutral = tmp_path_factory.mktemp("orig-cwd")
    o = Original(python, str(neutral))
    # Sanity: the interpreter imports the ORIGINAL package, not ours.
    where = o.run("import llava, os; print(os.path.dirname(llava.__file__))", cwd=str(neutral)).stdout.strip()
    assert ".venv-orig" in where or VENV in where, f"`import llava` in the original venv resolved to {where}"
    return o


@pytest.fixture(scope="session")
def ours_python() -> str:
    return sys.executable


# ---------------------------------------------------------------------------------------------------------------------
# Shared by the checkpoint tests: backbones both environments read, and a logits probe run on either side.
# ---------------------------------------------------------------------------------------------------------------------

# Run first in the original's interpreter: its loader hard-codes fp16 (`torch_dtype=torch.float16`, the projector
# cast `.to(torch.float16)`, the tower's `.to(dtype=torch.float16)`). Inside llava.model.builder only, `torch` is
# replaced by a view of torch whose `float16` is float32, so every line of the original loader runs as written, in
# fp32. Nothing else of the original is changed.
ORIG_FP32_LOADER = """
import torch
import llava.model.builder as _builder


class _Fp32Torch:
    def __getattr__(self, name):
        return torch.float32 if name == "float16" else getattr(torch, name)


_builder.torch = _Fp32Torch()
"""

# The probe: load each job's checkpoint with `load_pretrained_model`, process its image and prompt with the side's own
# `process_images` / `tokenizer_image_token`, and save the fp32 logits. One job's failure is reported, not raised.
PROBE = """
import json, sys, traceback
import torch
from PIL import Image
from llava.constants import IMAGE_TOKEN_INDEX
from llava.mm_utils import process_images, tokenizer_image_token
from llava.model.builder import load_pretrained_model

results = {}
for job in json.load(open(sys.argv[1])):
    try:
        kwargs = dict(job.get("kwargs", {}))
        tok, model, processor, _ = load_pretrained_model(job["path"], job["base"], job["name"], device="cpu", **kwargs)
        image = Image.open(job["image"]).convert("RGB")
        images = process_images([image], processor, model.config)
        ids = tokenizer_image_token(job["prompt"], tok, IMAGE_TOKEN_INDEX, return_tensors="pt")[None]
        with torch.no_grad():
            logits = model(ids, images=images, image_sizes=[image.size]).logits
        torch.save(logits.float(), job["out"])
        results[job["key"]] = {"ok": True, "out": job["out"], "ids": ids[0].tolist(), "dtype": str(model.dtype), "type": type(model).__name__}
    except Exception:
        results[job["key"]] = {"ok": False, "error": traceback.format_exc()[-4000:]}
print(json.dumps(results))
"""


def build_llama_spm_tokenizer(out_dir: str):
    """A tiny SentencePiece BPE with LLaMA's normalisation (identity, whitespace kept, dummy prefix, byte fallback),
    so the original's slow `LlamaTokenizer` and our fast one split text the same way, as they do for LLaMA's own
    `tokenizer.model` (llava.demo.backbones' tokenizer uses SentencePiece's default NFKC normaliser, which drops
    newlines in the slow path)."""
    import io

    import sentencepiece as spm
    from transformers import LlamaTokenizer

    from llava.demo.backbones import _BASE_TEXT

    os.makedirs(out_dir, exist_ok=True)
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter([line for line in _BASE_TEXT.splitlines() if line.strip()]),
        model_writer=buf,
        model_type="bpe",
        vocab_size=400,
        byte_fallback=True,
        character_coverage=1.0,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=True,
        split_digits=True,
        allow_whitespace_only_pieces=True,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=3,
        hard_vocab_limit=False,
        minloglevel=2,
    )
    with open(os.path.join(out_dir, "tokenizer.model"), "wb") as f:
        f.write(buf.getvalue())
    tok = LlamaTokenizer.from_pretrained(out_dir, add_bos_token=True, add_eos_token=False, pad_token="<pad>")
    tok.save_pretrained(out_dir)
    return tok


class Bases:
    """Tiny backbones saved so that BOTH environments read them: an SPM tokenizer (`tokenizer.model` in every
    decoder dir, for the original's slow `LlamaTokenizer`), a CLIP tower with the `vision_model.*` key layout of
    transformers 4.x (transformers 5 writes flat keys that 4.37 would silently leave random), and LLaMA / Mistral
    decoders whose config.json also carries the legacy rope keys. The Mistral base has rope_theta 1e6."""

    ROPE_THETA = {"llama": 10000.0, "mistral": 1e6}

    def __init__(self, root: str):
        from safetensors.torch import load_file, save_file

        from llava.demo import backbones
        from llava.model.checkpoint_compat import copy_sentencepiece, write_legacy_config_keys

        self.root = root
        self.tokenizer_dir = os.path.join(root, "tokenizer")
        self.tokenizer = build_llama_spm_tokenizer(self.tokenizer_dir)
        self.clip_dir = os.path.join(root, "clip")
        backbones.build_vision_tower(self.clip_dir)
        weights = os.path.join(self.clip_dir, "model.safetensors")
        state = load_file(weights)
        save_file({f"vision_model.{k}": v for k, v in state.items()}, weights, metadata={"format": "pt"})
        self.decoder_dirs = {}
        for family, theta in self.ROPE_THETA.items():
            d = os.path.join(root, family)
            backbones.build_decoder(d, self.tokenizer, family=family)
            config_file = os.path.join(d, "config.json")
            with open(config_file) as f:
                config = json.load(f)
            config["rope_parameters"]["rope_theta"] = theta
            with open(config_file, "w") as f:
                json.dump(config, f, indent=2)
            write_legacy_config_keys(d)
            copy_sentencepiece(self.tokenizer, d)
            self.decoder_dirs[family] = d


@pytest.fixture(scope="session")
def bases(tmp_path_factory) -> Bases:
    return Bases(str(tmp_path_factory.mktemp("compat-bases")))


def run_probe(
    python: str, jobs: list[dict], workdir: str, cwd: str, prelude: str = "", env: dict | None = None
) -> dict:
    """Run PROBE over `jobs` with `python` (from `cwd`, which decides which `llava` it imports)."""
    jobs_file = os.path.join(workdir, f"jobs-{abs(hash(python)) % 10**8}-{len(os.listdir(workdir))}.json")
    with open(jobs_file, "w") as f:
        json.dump(jobs, f)
    proc = subprocess.run(
        [python, "-c", textwrap.dedent(prelude) + textwrap.dedent(PROBE), jobs_file],
        capture_output=True,
        text=True,
        timeout=1800,
        env=env,
        cwd=cwd,
    )
    if proc.returncode != 0:
        raise AssertionError(f"probe failed (rc {proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])
