"""Where a trained demo model keeps, or loses, where an object is: linear probes for its row and column.

Each probe is a ridge-regularised least-squares fit (one-hot targets, torch only) on the training images that show
one object, scored on the held-out ones. It reads, in the order the information flows:

- `tower`: the vision tower's patch features at `--mm_vision_select_layer -2` (all patches, concatenated);
- `projector (stage 1)` / `projector (stage 2)`: the same features through each stage's projector;
- `LLM layer k`: the decoder's hidden state at the position that writes the answer to a row (column) question.

A probe near 100 % where the model's answers are wrong says the information is there and the step after it does
not use it. docs/Demo.md ("Why position was the weak spot") has the measurements.

    python -m llava.demo.probe --data-dir playground/data/demo --output-dir checkpoints/demo
"""

from __future__ import annotations

import argparse
import json
import os
import random

import torch

AXES = ("row", "column")


def ridge_probe(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor) -> float:
    """Held-out accuracy of a linear classifier fitted by ridge least squares to one-hot targets."""
    classes = int(max(train_y.max(), test_y.max())) + 1
    a = torch.cat([train_x.double(), torch.ones(len(train_x), 1, dtype=torch.double)], 1)
    b = torch.cat([test_x.double(), torch.ones(len(test_x), 1, dtype=torch.double)], 1)
    scale = a.pow(2).mean()  # regularise relative to the features' scale
    weights = torch.linalg.solve(
        a.T @ a + 1e-4 * scale * len(a) * torch.eye(a.shape[1], dtype=torch.double),
        a.T @ torch.nn.functional.one_hot(train_y, classes).double(),
    )
    return ((b @ weights).argmax(1) == test_y).double().mean().item()


def lone_objects(data_dir: str, split: str, limit: int) -> list[tuple[str, object]]:
    """(image path, Scene) of up to `limit` images of `split` that show one object (those with a row and column)."""
    from llava.demo.data import read_scenes

    path = os.path.join(data_dir, "scenes.jsonl")
    if not os.path.isfile(path):
        raise ValueError(f"No `{path}`: pass the --data-dir of a demo run (python -m llava.demo.data writes it).")
    scenes = read_scenes(path, split)
    return [(os.path.join(data_dir, "images", rel), s) for rel, s in scenes if s.count == 1][:limit]


def _labels(scenes) -> dict[str, torch.Tensor]:
    cells = torch.tensor([s.cells[0] for _, s in scenes])
    return {"row": cells // 3, "column": cells % 3}


def _projector(path: str) -> torch.nn.Module | None:
    """The projector of a stage-1 `mm_projector.bin` or of a stage-2 model dir, in float32, read as the model loader
    reads it (`llava.model.checkpoint_format`; the builder for a full model); None when that stage is not on disk."""
    from types import SimpleNamespace

    from llava.model import checkpoint_format as ckpt
    from llava.model.builder import load_pretrained_model
    from llava.model.multimodal_projector.builder import build_vision_projector

    directory = os.path.dirname(path) if path.endswith(".bin") else path
    if not os.path.isfile(path if path.endswith(".bin") else os.path.join(path, ckpt.CONFIG_FILE)):
        return None
    info = ckpt.detect_checkpoint_kind(directory)
    if info.kind in ("projector", "lora"):  # trained weights beside the base: the projector alone
        state, source = ckpt.read_trained_state(directory, info.kind)
        projector = build_vision_projector(SimpleNamespace(**info.config))
        ckpt.load_projector_weights(projector, state, source)
    elif info.kind == "full":
        _, model, _, _ = load_pretrained_model(directory, None, os.path.basename(directory), device="cpu")
        projector = model.get_model().mm_projector
    else:
        raise ValueError(f"`{directory}` is a `{info.kind}` checkpoint; the probe reads a LLaVA run's stage 1 or 2.")
    return projector.float().eval()


@torch.no_grad()
def tower_features(clip_dir: str, scenes, select_layer: int = -2) -> torch.Tensor:
    """(N, patches, C) patch features of the vision tower in `clip_dir`, CLS dropped, as LLaVA reads them."""
    from PIL import Image
    from transformers import CLIPImageProcessorPil, CLIPVisionModel

    processor = CLIPImageProcessorPil.from_pretrained(clip_dir)
    model = CLIPVisionModel.from_pretrained(clip_dir).eval()
    out = []
    for start in range(0, len(scenes), 256):
        images = [Image.open(path).convert("RGB") for path, _ in scenes[start : start + 256]]
        pixels = processor.preprocess(images, return_tensors="pt")["pixel_values"]
        out.append(model(pixel_values=pixels, output_hidden_states=True).hidden_states[select_layer][:, 1:])
    return torch.cat(out)


@torch.no_grad()
def answer_states(model_dir: str, scenes, axis: str, seed: int = 0) -> torch.Tensor:
    """(N, layers + 1, hidden) decoder hidden states at the answer position of a short `axis` question per image."""
    from PIL import Image

    from llava.conversation import get_conv_template
    from llava.demo.scenes import question_text
    from llava.mm_utils import process_images, tokenizer_image_token
    from llava.model.builder import load_pretrained_model

    tokenizer, model, processor, _ = load_pretrained_model(model_dir, None, os.path.basename(model_dir), device="cpu")
    model.eval()
    rng = random.Random(seed)
    states = []
    for path, scene in scenes:
        conv = get_conv_template("vicuna_v1")
        conv.append_message(conv.roles[0], "<image>\n" + question_text(axis, scene, rng))
        conv.append_message(conv.roles[1], None)
        ids = tokenizer_image_token(conv.get_prompt(), tokenizer, return_tensors="pt")[None]
        image = process_images([Image.open(path).convert("RGB")], processor, model.config)
        hidden = model(input_ids=ids, images=image, output_hidden_states=True).hidden_states
        states.append(torch.stack([h[0, -1] for h in hidden]))
    return torch.stack(states)


def probe_run(data_dir: str, output_dir: str, train_limit: int = 1500, eval_limit: int = 400) -> dict[str, dict]:
    """{stage: {"row": accuracy, "column": accuracy}} for every stage of a demo run that exists on disk."""
    train, held_out = lone_objects(data_dir, "train", train_limit), lone_objects(data_dir, "eval", eval_limit)
    if len(train) < 30 or len(held_out) < 10:
        raise ValueError(f"`{data_dir}` has {len(train)} training and {len(held_out)} held-out lone-object images; "
                         "a probe needs at least 30 and 10 (is it a demo dataset?).")  # fmt: skip
    y_train, y_test = _labels(train), _labels(held_out)
    clip = os.path.join(output_dir, "backbones", "tiny-clip")
    x_train, x_test = tower_features(clip, train), tower_features(clip, held_out)
    stages = {"tower": (x_train.flatten(1), x_test.flatten(1))}
    for name, path in (
        ("projector (stage 1)", "llava-tiny-pretrain/mm_projector.bin"),
        ("projector (stage 2)", "llava-tiny"),
    ):
        projector = _projector(os.path.join(output_dir, path))
        if projector is not None:
            with torch.no_grad():
                stages[name] = (projector(x_train).flatten(1), projector(x_test).flatten(1))
    results = {name: {a: ridge_probe(tr, y_train[a], te, y_test[a]) for a in AXES} for name, (tr, te) in stages.items()}
    model_dir = os.path.join(output_dir, "llava-tiny")
    if os.path.isfile(os.path.join(model_dir, "config.json")):
        for axis in AXES:
            s_train, s_test = answer_states(model_dir, train, axis), answer_states(model_dir, held_out, axis)
            for layer in range(s_train.shape[1]):
                accuracy = ridge_probe(s_train[:, layer], y_train[axis], s_test[:, layer], y_test[axis])
                results.setdefault(f"LLM layer {layer} (answer position)", {})[axis] = accuracy
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data-dir", default="playground/data/demo")
    parser.add_argument("--output-dir", default="checkpoints/demo")
    parser.add_argument("--train-images", type=int, default=1500, help="lone-object training images to fit on")
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args(argv)
    results = probe_run(args.data_dir, args.output_dir, args.train_images)
    for stage, accuracy in results.items():
        print(f"{stage:<36}" + "".join(f"{axis} {100 * accuracy[axis]:5.1f}%   " for axis in AXES), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
