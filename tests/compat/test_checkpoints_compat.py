"""Checkpoints both ways: what we write loads in the ORIGINAL LLaVA release, what it writes loads here, same logits.

Every checkpoint is probed on both sides by the side's own `load_pretrained_model`, `process_images` and
`tokenizer_image_token` (tests/compat/conftest.py `PROBE`), on the same prompt and image file; the fp32 logits must
agree within 1e-4 and the token ids exactly.

- fp32 in the original: its loader hard-codes fp16. We run it unchanged except that, inside
  `llava.model.builder` only, `torch.float16` reads as float32 (conftest `ORIG_FP32_LOADER`), so the model, the
  stage-1 projector cast and the tower cast all stay fp32.
- The original's loader picks its code path from the directory NAME (`llava`, `lora`, `mistral`, `mpt`), so every
  directory here is named as a user of the original would name it.
- The release on the package index (1.2.2.post1) lacks the LoRA-loading fix of the original's issue #1075
  (`LlavaConfig.from_pretrained` instead of `AutoConfig.from_pretrained` for the LoRA's config). The probe applies
  that one-line fix (conftest `ORIG_1075_FIX`) before loading, as the original's last commit has it.
- Ours-written checkpoints come from our real training entry point (`llava.train.train.train`, 2 steps each) and
  scripts/merge_lora_weights.py; original-written ones from the original's own model classes, its
  `initialize_vision_modules`, peft 0.10 `get_peft_model` and its train.py save helpers, in its venv.
"""

from __future__ import annotations

import json
import os
import sys
import types

import pytest
import torch
from PIL import Image

from compat.conftest import ORIG_FP32_LOADER, ROOT, run_probe

ATOL = 1e-4
PROMPT = "USER: <image>\nWhat is in the picture? ASSISTANT:"
PINPOINTS = "[[32, 64], [64, 32], [64, 64]]"

# The fix of the original's issue #1075, applied to the release in the test env: the LoRA dir's config is read
# with LlavaConfig (as at the original's last commit) instead of AutoConfig.
ORIG_1075_FIX = """
import transformers as _transformers
from llava.model.language_model.llava_llama import LlavaConfig as _LlavaConfig


class _AutoConfigWith1075Fix:
    @staticmethod
    def from_pretrained(path, *args, **kwargs):
        return _LlavaConfig.from_pretrained(path, *args, **kwargs)


_builder.AutoConfig = _AutoConfigWith1075Fix
"""


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("ckpt-compat"))


@pytest.fixture(scope="module")
def image_file(workdir) -> str:
    """A 48x24 image (not square: `pad` and `anyres` do real work on it)."""
    g = torch.Generator().manual_seed(0)
    pixels = (torch.rand(24, 48, 3, generator=g) * 255).to(torch.uint8).numpy()
    path = os.path.join(workdir, "image.png")
    Image.fromarray(pixels).save(path)
    return path


def job(key: str, path: str, base: str | None, workdir: str, image: str, side: str, **kwargs) -> dict:
    return {
        "key": key,
        "path": path,
        "base": base,
        "name": os.path.basename(path),
        "image": image,
        "prompt": PROMPT,
        "out": os.path.join(workdir, f"{key}.{side}.pt"),
        "kwargs": kwargs,
    }


def probe_both(orig, jobs_ours: list[dict], jobs_orig: list[dict], workdir: str) -> tuple[dict, dict]:
    ours = run_probe(sys.executable, jobs_ours, workdir, cwd=ROOT, env=dict(os.environ))
    theirs = run_probe(
        orig.python, jobs_orig, workdir, cwd=orig.cwd, prelude=ORIG_FP32_LOADER + ORIG_1075_FIX, env=orig.env()
    )
    return ours, theirs


def assert_same(ours: dict, theirs: dict, key: str, ours_key: str | None = None) -> None:
    ours_key = ours_key or key
    a, b = ours[ours_key], theirs[key]
    assert a["ok"], f"our loader failed on `{ours_key}`:\n{a.get('error')}"
    assert b["ok"], f"the ORIGINAL loader failed on `{key}`:\n{b.get('error')}"
    assert b["dtype"] == "torch.float32", b
    assert a["ids"] == b["ids"], f"{key}: token ids differ:\nours {a['ids']}\norig {b['ids']}"
    la, lb = torch.load(a["out"]), torch.load(b["out"])
    assert la.shape == lb.shape, f"{key}: logits shape ours {tuple(la.shape)} vs original {tuple(lb.shape)}"
    diff = (la - lb).abs().max().item()
    assert diff <= ATOL, f"{key}: max |dlogit| {diff:.3g} > {ATOL} between ours and the original"


# --------------------------------------------------------------------------------------- written by OUR training


@pytest.fixture(scope="module")
def ours_written(bases, workdir):
    """Our training writes: stage 1 (projector), a full fine-tune (`pad`), a full fine-tune that trains the tower
    too, a LoRA run, its merge, and a full Mistral run (`anyres` + `spatial_unpad`, rope_theta 1e6)."""
    from train_helpers import make_dataset, tiny_flags

    from llava.train.train import train

    data, images = make_dataset(os.path.join(workdir, "data"), n_image=8)
    out = {
        name: os.path.join(workdir, name)
        for name in (
            "llava-llama-stage1",
            "llava-llama-full",
            "llava-llama-lora",
            "llava-llama-merged",
            "llava-mistral-full",
            "llava-llama-full-tower",
        )
    }
    common = dict(max_steps=2, per_device_train_batch_size=2)
    train(tiny_flags(bases, data, images, out["llava-llama-stage1"], tune_mm_mlp_adapter=True, **common))
    adapter = os.path.join(out["llava-llama-stage1"], "mm_projector.bin")
    train(
        tiny_flags(
            bases,
            data,
            images,
            out["llava-llama-full"],
            version="v1",
            pretrain_mm_mlp_adapter=adapter,
            image_aspect_ratio="pad",
            **common,
        )
    )
    train(
        tiny_flags(
            bases,
            data,
            images,
            out["llava-llama-full-tower"],
            version="v1",
            pretrain_mm_mlp_adapter=adapter,
            unfreeze_mm_vision_tower=True,
            **common,
        )
    )
    train(
        tiny_flags(
            bases,
            data,
            images,
            out["llava-llama-lora"],
            version="v1",
            pretrain_mm_mlp_adapter=adapter,
            lora_enable=True,
            lora_r=4,
            lora_alpha=8,
            **common,
        )
    )
    train(
        tiny_flags(
            bases,
            data,
            images,
            out["llava-mistral-full"],
            version="mistral_instruct",
            model_name_or_path=bases.decoder_dirs["mistral"],
            image_aspect_ratio="anyres",
            mm_patch_merge_type="spatial_unpad",
            image_grid_pinpoints=PINPOINTS,
            **common,
        )
    )
    sys.path.insert(0, os.path.join(ROOT, "scripts"))
    from merge_lora_weights import merge_lora

    merge_lora(
        types.SimpleNamespace(
            model_path=out["llava-llama-lora"],
            model_base=bases.decoder_dirs["llama"],
            save_model_path=out["llava-llama-merged"],
            device="cpu",
        )
    )
    return out


OURS_KINDS = {  # directory -> base it loads on (None: none)
    "llava-llama-stage1": "llama",
    "llava-llama-full": None,
    "llava-llama-full-tower": None,  # the tower trained too: both sides must use the stored tower weights
    "llava-llama-lora": "llama",
    "llava-llama-merged": None,
    "llava-mistral-full": None,
}


@pytest.fixture(scope="module")
def ours_probed(orig, bases, ours_written, workdir, image_file):
    jobs = {
        side: [
            job(name, ours_written[name], bases.decoder_dirs[b] if b else None, workdir, image_file, side)
            for name, b in OURS_KINDS.items()
        ]
        for side in ("ours", "orig")
    }
    return probe_both(orig, jobs["ours"], jobs["orig"], workdir)


@pytest.mark.parametrize("name", sorted(OURS_KINDS))
def test_ours_written_loads_in_the_original(ours_probed, name):
    ours, theirs = ours_probed
    assert_same(ours, theirs, name)


# The tokenizer each side's `load_pretrained_model` returns, on a corpus: `tok(text)` and `tokenizer_image_token`.
TOKENIZE = """
import json, sys
from llava.constants import IMAGE_TOKEN_INDEX
from llava.mm_utils import tokenizer_image_token
from llava.model.builder import load_pretrained_model

path, corpus = sys.argv[1], json.loads(sys.argv[2])
tok, _, _, _ = load_pretrained_model(path, None, path.rstrip("/").split("/")[-1], device="cpu")
print(json.dumps({
    "type": type(tok).__name__,
    "ids": [tok(text).input_ids for text in corpus],
    "image_ids": [tokenizer_image_token(text, tok, IMAGE_TOKEN_INDEX) for text in corpus if "<image>" in text],
}))
"""


def test_ours_written_mistral_tokenizer_is_ours_in_the_original(orig, ours_written):
    """The original loads `*mistral*` checkpoints with its fast tokenizer: our tokenizer.json read by its
    tokenizers 0.15 (llava.model.tokenizer_compat). Same ids as our loader on special tokens written in the text,
    <image>, unicode, runs and leading spaces, newlines."""
    import subprocess

    from test_tokenizer_compat import CORPUS

    path = ours_written["llava-mistral-full"]
    args = [path, json.dumps(CORPUS)]
    theirs = orig.json(ORIG_FP32_LOADER + TOKENIZE, *args)
    proc = subprocess.run([sys.executable, "-c", TOKENIZE, *args], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-4000:]
    ours = json.loads(proc.stdout.strip().splitlines()[-1])
    assert theirs["type"] == "LlamaTokenizerFast", theirs["type"]  # the fast path, i.e. tokenizer.json
    for text, a, b in zip(CORPUS, ours["ids"], theirs["ids"], strict=True):
        assert a == b, f"{text!r}: ours {a} vs the original {b}"
    assert ours["image_ids"] == theirs["image_ids"]


def test_ours_written_files_are_of_the_originals_era(ours_written, bases):
    """The fixes behind the test above, checked on the files themselves (items 1-3 of issue 12)."""
    from peft import LoraConfig  # noqa: F401  (our peft reads the trimmed adapter config too, via the probe)

    from llava.model.checkpoint_compat import PEFT_010_LORA_FIELDS

    adapter = json.load(open(os.path.join(ours_written["llava-llama-lora"], "adapter_config.json")))
    assert set(adapter) <= PEFT_010_LORA_FIELDS, sorted(set(adapter) - PEFT_010_LORA_FIELDS)
    for name in ("llava-llama-full", "llava-llama-lora", "llava-llama-merged", "llava-mistral-full"):
        assert os.path.isfile(os.path.join(ours_written[name], "tokenizer.model")), name
    # The tower-training run records it and stores its own tower (not the tower directory's weights).
    from safetensors.torch import load_file

    tower_run = ours_written["llava-llama-full-tower"]
    assert json.load(open(os.path.join(tower_run, "config.json")))["unfreeze_mm_vision_tower"] is True
    stored = load_file(os.path.join(tower_run, "model.safetensors"))
    pretrained = load_file(os.path.join(bases.clip_dir, "model.safetensors"))
    key = "vision_model.encoder.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(stored[f"model.vision_tower.vision_tower.{key}"], pretrained[key])
    mistral = json.load(open(os.path.join(ours_written["llava-mistral-full"], "config.json")))
    assert mistral["rope_theta"] == 1e6 and mistral["rope_parameters"]["rope_theta"] == 1e6
    assert mistral["image_aspect_ratio"] == "anyres" and mistral["mm_patch_merge_type"] == "spatial_unpad"


# ---------------------------------------------------------------------------------- written by the ORIGINAL code

ORIG_WRITER = """
import os, sys, types
import torch
from transformers import AutoTokenizer
from peft import LoraConfig, get_peft_model
from llava.model import LlavaLlamaForCausalLM, LlavaMistralForCausalLM
from llava.train.train import (find_all_linear_names, get_mm_adapter_state_maybe_zero_3,
                               get_peft_state_maybe_zero_3, get_peft_state_non_lora_maybe_zero_3)

import llava.train.train as _orig_train

# The save helpers gather ZeRO-3 shards through `maybe_zero_3`, which imports deepspeed (not installed in the
# original's test env). Without ZeRO its result is the parameter detached, on the CPU, cloned: do exactly that.
_orig_train.maybe_zero_3 = lambda param, ignore_status=False, name=None: param.detach().cpu().clone()

root, clip, llama, mistral, pinpoints = sys.argv[1:6]


def model_args(**kw):
    args = dict(vision_tower=clip, mm_vision_select_layer=-2, mm_vision_select_feature="patch",
                pretrain_mm_mlp_adapter=None, mm_projector_type="mlp2x_gelu", mm_patch_merge_type="flat",
                mm_use_im_start_end=False, mm_use_im_patch_token=False)
    args.update(kw)
    return types.SimpleNamespace(**args)


def attach_vision(model, seed, aspect="square", **kw):
    # As the original train.py: initialize_vision_modules, then the data fields written into the config.
    torch.manual_seed(seed)
    model.get_model().initialize_vision_modules(model_args=model_args(**kw))
    config = model.config
    config.image_aspect_ratio = aspect
    config.image_grid_pinpoints = pinpoints if aspect == "anyres" else None
    config.tokenizer_padding_side = "right"
    config.tokenizer_model_max_length = 2048
    config.mm_use_im_start_end = config.mm_use_im_patch_token = False
    config.mm_projector_lr = None
    config.use_cache = True
    return model


def save_tokenizer(base, out):
    AutoTokenizer.from_pretrained(base, use_fast=False).save_pretrained(out)


# full, LLaMA, square
out = os.path.join(root, "llava-orig-llama-full")
model = attach_vision(LlavaLlamaForCausalLM.from_pretrained(llama, torch_dtype=torch.float32), seed=11)
model.save_pretrained(out)
save_tokenizer(llama, out)

# stage 1 on LLaMA: config.json + mm_projector.bin, as the original trainer saves with --tune_mm_mlp_adapter
out = os.path.join(root, "llava-orig-llama-stage1")
model = attach_vision(LlavaLlamaForCausalLM.from_pretrained(llama, torch_dtype=torch.float32), seed=12, aspect="pad")
os.makedirs(out, exist_ok=True)
model.config.save_pretrained(out)
torch.save(get_mm_adapter_state_maybe_zero_3(model.named_parameters(), ["mm_projector"]),
           os.path.join(out, "mm_projector.bin"))

# full, Mistral (rope_theta 1e6), anyres + spatial_unpad
out = os.path.join(root, "llava-orig-mistral-full")
model = LlavaMistralForCausalLM.from_pretrained(mistral, torch_dtype=torch.float32)
model = attach_vision(model, seed=13, aspect="anyres", mm_patch_merge_type="spatial_unpad")
assert model.config.rope_theta == 1e6, model.config.rope_theta
model.save_pretrained(out)
save_tokenizer(mistral, out)

# LoRA on LLaMA, in the original train.py's order: peft first (no tower yet), then the vision modules; saved
# with its own helpers.
out = os.path.join(root, "llava-orig-llama-lora")
model = LlavaLlamaForCausalLM.from_pretrained(llama, torch_dtype=torch.float32)
config = LoraConfig(r=4, lora_alpha=8, target_modules=find_all_linear_names(model), lora_dropout=0.0, bias="none",
                    task_type="CAUSAL_LM")
model = get_peft_model(model, config)
torch.manual_seed(14)
for name, p in model.named_parameters():
    if "lora_B" in name:
        torch.nn.init.normal_(p, std=0.05)  # non-zero, so the adapter changes the logits
attach_vision(model, seed=15)
os.makedirs(out, exist_ok=True)
model.config.save_pretrained(out)
model.save_pretrained(out, state_dict=get_peft_state_maybe_zero_3(model.named_parameters(), "none"))
torch.save(get_peft_state_non_lora_maybe_zero_3(model.named_parameters()), os.path.join(out, "non_lora_trainables.bin"))
save_tokenizer(llama, out)
print("{}")
"""

ORIG_KINDS = {  # directory -> base
    "llava-orig-llama-full": None,
    "llava-orig-llama-stage1": "llama",
    "llava-orig-mistral-full": None,
    "llava-orig-llama-lora": "llama",
}


@pytest.fixture(scope="module")
def orig_written(orig, bases, workdir) -> dict:
    root = os.path.join(workdir, "orig-written")
    os.makedirs(root, exist_ok=True)
    clip, llama, mistral = bases.clip_dir, bases.decoder_dirs["llama"], bases.decoder_dirs["mistral"]
    orig.json(ORIG_WRITER, root, clip, llama, mistral, PINPOINTS)
    return {name: os.path.join(root, name) for name in ORIG_KINDS}


@pytest.fixture(scope="module")
def orig_probed(orig, bases, orig_written, workdir, image_file):
    def jobs(side):
        out = []
        for name, b in ORIG_KINDS.items():
            base = bases.decoder_dirs[b] if b else None
            out.append(job(name, orig_written[name], base, workdir, image_file, side))
        return out

    ours_jobs = jobs("ours")
    # Item 4 of issue 12: the original LoRA, kept unmerged (its target names also match the CLIP tower's layers).
    lora = orig_written["llava-orig-llama-lora"]
    ours_jobs.append(
        job("lora-unmerged", lora, bases.decoder_dirs["llama"], workdir, image_file, "ours", merge_lora=False)
    )
    return probe_both(orig, ours_jobs, jobs("orig"), workdir)


@pytest.mark.parametrize("name", sorted(ORIG_KINDS))
def test_original_written_loads_here(orig_probed, name):
    ours, theirs = orig_probed
    assert_same(ours, theirs, name)


def test_original_lora_unmerged_loads_here(orig_probed):
    ours, theirs = orig_probed
    assert ours["lora-unmerged"]["type"].startswith("PeftModel"), ours["lora-unmerged"]
    assert_same(ours, theirs, "llava-orig-llama-lora", ours_key="lora-unmerged")
