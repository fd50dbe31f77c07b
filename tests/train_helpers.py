"""Helpers for the training tests: a small generated LLaVA dataset, a byte-level BPE tokenizer, common flags.

Run as a script under torchrun it is the DeepSpeed tests' driver: it trains, then every rank runs the trained
model on a fixed prompt and rank 0 saves the logits:
    torchrun --nproc_per_node=2 tests/train_helpers.py LOGITS_OUT --deepspeed scripts/zero3.json <train flags>
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time

import torch
from PIL import Image, ImageDraw

from llava.serve.launch import free_port  # noqa: F401  (the one free-port helper; the training tests import it here)

COLORS = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220), "yellow": (230, 220, 20)}
SHAPES = ("square", "circle")


def draw(color: str, shape: str, size: int = 32) -> Image.Image:
    image = Image.new("RGB", (size, size), (255, 255, 255))
    d = ImageDraw.Draw(image)
    box = (6, 6, size - 6, size - 6)
    (d.rectangle if shape == "square" else d.ellipse)(box, fill=COLORS[color])
    return image


def make_dataset(
    root: str,
    n_image: int = 16,
    n_text: int = 0,
    n_multi: int = 0,
    style: str = "caption",
    fmt: str = "llava",
    seed: int = 0,
) -> tuple[str, str]:
    """Write images and a dataset JSON under `root`; returns (data_path, image_folder).

    style `caption`: stage-1 records ("<image>" -> "A red square."); `chat`: two-turn conversations.
    fmt `llava` writes {id, image, conversations}; `hf` writes {messages, images}.
    """
    rng = random.Random(seed)
    folder = os.path.join(root, "images")
    os.makedirs(folder, exist_ok=True)
    records = []
    for i in range(n_image + n_multi):
        picks = [(rng.choice(list(COLORS)), rng.choice(SHAPES)) for _ in range(2 if i >= n_image else 1)]
        names = []
        for k, (color, shape) in enumerate(picks):
            name = f"{i:03d}_{k}.png"
            draw(color, shape).save(os.path.join(folder, name))
            names.append(name)
        caption = " and ".join(f"A {c} {s}." for c, s in picks)
        if style == "caption":
            turns = [("human", "<image>\n" if len(names) == 1 else "<image> <image>\n"), ("gpt", caption)]
        else:
            marks = "<image>\n" * len(names)
            turns = [
                ("human", marks + "Describe the image briefly."),
                ("gpt", caption),
                ("human", "What colour is the shape?"),
                ("gpt", f"It is {picks[0][0]}."),
            ]
        records.append(_record(i, names if len(names) > 1 else names[0], turns, fmt))
    for j in range(n_text):
        n = rng.randint(1, 9)
        turns = [("human", "How many triangles are there?"), ("gpt", f"There are {n} triangles.")]
        records.append(_record(1000 + j, None, turns, fmt))
    rng.shuffle(records)
    path = os.path.join(root, "data.json")
    with open(path, "w") as f:
        json.dump(records, f)
    return path, folder


def _record(i, image, turns, fmt):
    if fmt == "llava":
        rec = {"id": str(i), "conversations": [{"from": r, "value": v} for r, v in turns]}
        if image is not None:
            rec["image"] = image
        return rec
    messages = []
    for role, text in turns:
        parts = []
        for _ in range(text.count("<image>")):
            parts.append({"type": "image"})
        rest = text.replace("<image>", "").strip()
        if rest:
            parts.append({"type": "text", "text": rest})
        messages.append({"role": "user" if role == "human" else "assistant", "content": parts})
    rec = {"messages": messages}
    if image is not None:
        rec["images"] = image if isinstance(image, list) else [image]
    return rec


def byte_bpe_tokenizer(out_dir: str, specials: tuple[str, ...] = ()):
    """A GPT-2-style byte-level BPE (no BOS, no dummy prefix), like Llama-3 / Qwen tokenizers."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from llava.demo.backbones import _BASE_TEXT

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    special = ["<|endoftext|>", "<image>", *specials]
    trainer = trainers.BpeTrainer(
        vocab_size=500, special_tokens=special, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tk.train_from_iterator([_BASE_TEXT] * 3, trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    tok.save_pretrained(out_dir)
    return tok


def run_watched(cmd: list[str], *, idle_timeout: float = 600, **kwargs) -> subprocess.CompletedProcess:
    """`subprocess.run(cmd, capture_output=True, text=True)` judged on progress, not on its total time: it is stopped
    (its whole process group: torchrun and its ranks) only when it prints nothing for `idle_timeout` seconds, so a
    run on a busy machine may take as long as it needs while it keeps logging (training steps, build messages)."""
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True, **kwargs
    )
    out: dict[str, list[str]] = {"stdout": [], "stderr": []}
    last = [time.monotonic()]

    def pump(stream, name):
        for line in stream:
            out[name].append(line)
            last[0] = time.monotonic()

    readers = [threading.Thread(target=pump, args=(proc.stdout, "stdout"), daemon=True),
               threading.Thread(target=pump, args=(proc.stderr, "stderr"), daemon=True)]  # fmt: skip
    for reader in readers:
        reader.start()
    while proc.poll() is None:
        if time.monotonic() - last[0] > idle_timeout:
            os.killpg(proc.pid, signal.SIGKILL)  # the group this call started (start_new_session), nothing else
            proc.wait()
            raise subprocess.TimeoutExpired(
                cmd, idle_timeout, output="".join(out["stdout"])[-5000:], stderr="".join(out["stderr"])[-5000:]
            )
        time.sleep(0.5)
    for reader in readers:
        reader.join()
    return subprocess.CompletedProcess(cmd, proc.returncode, "".join(out["stdout"]), "".join(out["stderr"]))


def tiny_flags(tiny, data_path: str, image_folder: str, output_dir: str, **overrides) -> list[str]:
    """Flags of a tiny CPU run in the seeds' style (mlp2x_gelu projector, layer -2, no start/end tokens)."""
    flags = {
        "model_name_or_path": tiny.decoder_dirs["llama"],
        "version": "plain",
        "data_path": data_path,
        "image_folder": image_folder,
        "vision_tower": tiny.clip_dir,
        "mm_projector_type": "mlp2x_gelu",
        "mm_vision_select_layer": "-2",
        "mm_use_im_start_end": "False",
        "mm_use_im_patch_token": "False",
        "output_dir": output_dir,
        "num_train_epochs": "1",
        "per_device_train_batch_size": "4",
        "gradient_accumulation_steps": "1",
        "evaluation_strategy": "no",
        "save_strategy": "steps",
        "save_steps": "1000",
        "learning_rate": "1e-2",
        "weight_decay": "0.",
        "warmup_ratio": "0.03",
        "lr_scheduler_type": "cosine",
        "logging_steps": "1",
        "model_max_length": "256",
        "dataloader_num_workers": "0",
        "lazy_preprocess": "True",
        "report_to": "none",
        "seed": "0",
        "disable_tqdm": "True",
    }
    flags.update({k: str(v) for k, v in overrides.items()})
    out = []
    for k, v in flags.items():
        if v is not None and v != "None":
            out += [f"--{k}", v]
    return out


def logged_losses(trainer) -> list[float]:
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


def original_release(tiny):
    """A full LLaVA-1.5-style checkpoint: `model_type: llava`, no vision tower weights (loaded from its dir)."""
    from safetensors.torch import load_file, save_file

    model = tiny.model("llama", seed=1)
    model.config.conv_template = "v1"
    path = tiny.save_full(model, "release")
    weights = os.path.join(path, "model.safetensors")
    state = {k: v for k, v in load_file(weights).items() if ".vision_tower." not in k}
    save_file(state, weights, metadata={"format": "pt"})
    config = json.load(open(os.path.join(path, "config.json")))
    config.update(model_type="llava", mm_vision_tower=tiny.clip_dir)
    config.pop("mm_vision_tower_config", None)
    json.dump(config, open(os.path.join(path, "config.json"), "w"))
    return path, model


PROMPT = (
    "A chat between a curious user and an artificial intelligence assistant. USER: <image>\n"
    "Describe the image briefly. ASSISTANT:"
)


def image_batch(seed: int = 0) -> torch.Tensor:
    return torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def logits_of(model, tokenizer) -> torch.Tensor:
    from llava.mm_utils import tokenizer_image_token

    model.eval()
    ids = tokenizer_image_token(PROMPT, tokenizer, return_tensors="pt")[None]
    with torch.no_grad():
        return model(input_ids=ids, images=image_batch()).logits


def _drive(logits_out: str, argv: list[str]) -> None:
    from llava.train.train import train
    from llava.train.train_mem import pick_attention

    attn, why = pick_attention()
    trainer = train(argv, attn_implementation=attn, attn_reason=why)
    logits = logits_of(trainer.model, trainer.processing_class)  # every rank: ZeRO-3 gathers collectively
    if trainer.args.process_index == 0:
        torch.save(logits, logits_out)


if __name__ == "__main__":
    _drive(sys.argv[1], sys.argv[2:])
