"""Demo-only warm-ups that stand in for the pretraining behind Vicuna and CLIP.

LLaVA starts from a decoder that already speaks the language and a CLIP whose patch features already say what is
where. The demo's tiny backbones are randomly initialised, so before the LLaVA recipe runs, each learns briefly:

- the decoder reads the dataset's text as a plain language-model corpus (`pretrain_decoder`), as Vicuna read text
  before LLaVA; without it, stage 1 (projector only, frozen decoder) has no language model to align to;
- the vision tower learns to see what the captions talk about (`pretrain_vision_tower`): what the image shows
  (from the mean of its patch features) and what each patch shows, and where (from each patch feature), so that
  the image tokens LLaVA passes to the decoder say where the objects are, as a trained CLIP's patch features do.

The recipe that follows (stage 1, stage 2, frozen tower) is unchanged.

    python -m llava.demo.warmup tower --model checkpoints/demo/backbones/tiny-clip \
        --scenes playground/data/demo/scenes.jsonl --image-folder playground/data/demo/images --steps 600
    python -m llava.demo.warmup decoder --model checkpoints/demo/backbones/tiny-llama \
        --corpus playground/data/demo/text_corpus.txt --steps 300
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

# What each patch is also asked about, besides its cell: the attributes of the object in it.
PATCH_ATTRIBUTES = ("color", "shape", "size")


def _lr_at(step: int, steps: int, peak: float, warmup_ratio: float = 0.05) -> float:
    """Linear warm-up then cosine decay to zero (the schedule the LLaVA scripts use)."""
    warm = max(1, int(steps * warmup_ratio))
    if step < warm:
        return peak * (step + 1) / warm
    return peak * 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, steps - warm)))


def _loop(
    params: Sequence[torch.nn.Parameter],
    loss_fn: Callable[[int], torch.Tensor],
    steps: int,
    lr: float,
    desc: str,
    progress: bool,
) -> list[dict]:
    """A plain AdamW loop; returns `[{"step", "loss", "learning_rate"}]` every step (the curve in docs)."""
    from tqdm import tqdm

    params = list(params)
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    history = []
    bar = tqdm(range(steps), desc=desc, disable=not progress, mininterval=2)
    for step in bar:
        current = _lr_at(step, steps, lr)
        for group in optimizer.param_groups:
            group["lr"] = current
        loss = loss_fn(step)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        history.append({"step": step + 1, "loss": round(loss.item(), 5), "learning_rate": current})
        bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    return history


def pretrain_vision_tower(
    model_dir: str,
    items: Sequence[tuple[str, dict[str, str]]],
    options: dict[str, Sequence[str]],
    steps: int = 600,
    batch_size: int = 64,
    lr: float = 3e-3,
    seed: int = 0,
    progress: bool = True,
    select_layer: int = -2,
    cells: Sequence[Sequence[int]] | None = None,
    grid: int = 3,
) -> list[dict]:
    """Teach the vision tower in `model_dir` to see what the captions say; saved back in place.

    `items` are (image path, {attribute: the true option}) and `options[attribute]` lists each attribute's
    alternatives (colour names, shapes, ...). The tower's features are read the way LLaVA reads them, the patch
    features of layer `select_layer` (`--mm_vision_select_layer`); one linear classifier per attribute on their
    average is trained with the tower, then thrown away. A minimal stand-in for CLIP's image-text pretraining, whose
    targets are the same words.

    An average over the patches keeps what is in the image but not where. With `cells` (per item, the occupied
    cells of the scene's `grid` x `grid` layout, row-major) each patch feature is also classified on its own, by
    linear heads shared by all patches: which cell it shows if an object is there, else "empty" (so an object's
    patch feature says where it is), and the object's colour, shape and size there, else "empty" (so it also says
    what is there). The cell of a patch is the one holding its centre.
    """
    from PIL import Image
    from tqdm import tqdm
    from transformers import CLIPImageProcessorPil, CLIPVisionModel

    if not items:
        raise ValueError("pretrain_vision_tower got no (image, attributes) items; pass the demo's training scenes.")
    unknown = sorted({t for _, truth in items for a, t in truth.items() if t not in options.get(a, ())})
    if unknown:
        raise ValueError(f"Values {unknown[:5]} are not among the `options` of their attribute.")
    torch.manual_seed(seed)
    rng = random.Random(seed)
    processor = CLIPImageProcessorPil.from_pretrained(model_dir)
    model = CLIPVisionModel.from_pretrained(model_dir, dtype=torch.float32)
    model.train()
    attributes = list(options)
    heads = torch.nn.ModuleList(torch.nn.Linear(model.config.hidden_size, len(options[a])) for a in attributes)
    # (N, attributes): index of the true option, -100 where the attribute does not apply (no row for 3 objects)
    targets = torch.full((len(items), len(attributes)), -100, dtype=torch.long)
    for i, (_, truth) in enumerate(items):
        for j, a in enumerate(attributes):
            if a in truth:
                targets[i, j] = list(options[a]).index(truth[a])
    pixels = []  # small images: preprocess each once
    for start in tqdm(range(0, len(items), 256), desc="[warm-up] tower images", disable=not progress, mininterval=2):
        batch = [Image.open(path).convert("RGB") for path, _ in items[start : start + 256]]
        pixels.append(processor.preprocess(batch, return_tensors="pt")["pixel_values"])
    pixels = torch.cat(pixels)
    patch_heads = torch.nn.ModuleList()
    if cells is not None:
        patch_targets = _patch_targets(items, cells, options, model.config, grid)
        for target in patch_targets.values():
            patch_heads.append(torch.nn.Linear(model.config.hidden_size, int(target.max()) + 1))

    def loss_fn(step: int) -> torch.Tensor:
        idx = torch.tensor(rng.sample(range(len(items)), min(batch_size, len(items))))
        hidden_states = model(pixel_values=pixels[idx], output_hidden_states=True).hidden_states
        patches = hidden_states[select_layer][:, 1:]  # (B, P, C), CLS dropped as LLaVA drops it
        pooled = patches.mean(1)
        losses = [F.cross_entropy(head(pooled), targets[idx, j]) for j, head in enumerate(heads)]
        for head, target in zip(patch_heads, patch_targets.values() if cells is not None else ()):
            losses.append(F.cross_entropy(head(patches).flatten(0, 1), target[idx].flatten()))
        return torch.stack([x for x in losses if not x.isnan()]).mean()

    params = [*model.parameters(), *heads.parameters(), *patch_heads.parameters()]
    history = _loop(params, loss_fn, steps, lr, "[warm-up] tower", progress)
    model.eval()
    model.save_pretrained(model_dir)
    return history


def _patch_targets(
    items: Sequence[tuple[str, dict[str, str]]],
    cells: Sequence[Sequence[int]],
    options: dict[str, Sequence[str]],
    config,
    grid: int,
) -> dict[str, torch.Tensor]:
    """Per-patch targets (N, patches) of `pretrain_vision_tower`: "cell", the patch's cell index (0 .. grid*grid-1)
    where an object is in it, else grid*grid ("empty"); and for each of `PATCH_ATTRIBUTES`, the index of the
    object's option there, else the number of options ("empty")."""
    if len(cells) != len(items):
        raise ValueError(f"`cells` has {len(cells)} entries for {len(items)} items; give one list of cells per item.")
    missing = [a for a in PATCH_ATTRIBUTES if a not in options]
    if missing:
        raise ValueError(f"Per-patch targets need the attributes {missing} among the `options`.")
    side = config.image_size // config.patch_size
    # the cell (row-major, `grid` x `grid`) that holds each patch's centre
    patch_cell = [
        int((r + 0.5) * grid / side) * grid + int((c + 0.5) * grid / side) for r in range(side) for c in range(side)
    ]
    targets = {"cell": torch.full((len(items), side * side), grid * grid, dtype=torch.long)}
    for a in PATCH_ATTRIBUTES:
        targets[a] = torch.full((len(items), side * side), len(options[a]), dtype=torch.long)
    for i, ((path, truth), occupied) in enumerate(zip(items, cells)):
        bad = [c for c in occupied if not 0 <= c < grid * grid]
        if bad:
            raise ValueError(f"Cells {bad} of `{path}` are outside the {grid}x{grid} grid (0 .. {grid * grid - 1}).")
        missing = [a for a in PATCH_ATTRIBUTES if a not in truth]
        if missing:
            raise ValueError(f"`{path}` has cells but no {missing}; per-patch targets need them.")
        for p, cell in enumerate(patch_cell):
            if cell in occupied:
                targets["cell"][i, p] = cell
                for a in PATCH_ATTRIBUTES:
                    targets[a][i, p] = list(options[a]).index(truth[a])
    return targets


def pretrain_decoder(
    model_dir: str,
    documents: Sequence[str],
    steps: int = 300,
    batch_size: int = 32,
    block_size: int = 128,
    lr: float = 3e-3,
    seed: int = 0,
    progress: bool = True,
) -> list[dict]:
    """Train the causal LM in `model_dir` (its tokenizer alongside) on `documents`; saved back in place.

    Documents are tokenized as `<s> text </s>`, concatenated in a shuffled order and cut into blocks of
    `block_size` tokens (the usual way a language model reads a corpus); each step takes `batch_size` random blocks.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    documents = [d for d in documents if d.strip()]
    if not documents:
        raise ValueError("pretrain_decoder got no text; pass the demo dataset's text corpus.")
    torch.manual_seed(seed)
    rng = random.Random(seed)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.train()
    order = list(range(len(documents)))
    rng.shuffle(order)
    encoded = tokenizer([documents[i] for i in order], add_special_tokens=False)["input_ids"]
    stream = []
    for ids in encoded:
        stream += [tokenizer.bos_token_id, *ids, tokenizer.eos_token_id]
    blocks = len(stream) // block_size
    if blocks < 1:
        raise ValueError(f"The corpus has {len(stream)} tokens, fewer than one block of {block_size}.")
    data = torch.tensor(stream[: blocks * block_size]).view(blocks, block_size)

    def loss_fn(step: int) -> torch.Tensor:
        idx = torch.tensor(rng.sample(range(blocks), min(batch_size, blocks)))
        batch = data[idx]
        return model(input_ids=batch, labels=batch).loss

    history = _loop(list(model.parameters()), loss_fn, steps, lr, "[warm-up] decoder", progress)
    model.eval()
    model.save_pretrained(model_dir)
    return history


def scene_items(scenes_file: str, image_folder: str) -> list[tuple[str, dict[str, str]]]:
    """(image path, {attribute: its value}) for the training images of a demo dataset's `scenes.jsonl`."""
    from llava.demo.data import read_scenes

    return [(os.path.join(image_folder, rel), scene.attributes()) for rel, scene in read_scenes(scenes_file, "train")]


def scene_cells(scenes_file: str) -> list[tuple[int, ...]]:
    """The occupied grid cells of each training image of `scenes.jsonl`, in `scene_items`' order."""
    from llava.demo.data import read_scenes

    return [scene.cells for _, scene in read_scenes(scenes_file, "train")]


def main(argv: list[str] | None = None) -> None:
    from llava.demo.data import CATEGORIES

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="what", required=True)
    tower = sub.add_parser("tower", help="train a CLIP vision tower dir in place on a demo dataset's scenes")
    tower.add_argument("--scenes", required=True, help="scenes.jsonl of a demo dataset")
    tower.add_argument("--image-folder", required=True)
    decoder = sub.add_parser("decoder", help="train a causal LM dir in place on a text corpus (one document a line)")
    decoder.add_argument("--corpus", required=True, help="a text file, e.g. a demo dataset's text_corpus.txt")
    for p, steps, lr in ((tower, 600, 3e-3), (decoder, 300, 3e-3)):
        p.add_argument("--model", required=True, help="the HF model dir to train (overwritten)")
        p.add_argument("--steps", type=int, default=steps)
        p.add_argument("--batch-size", type=int, default=64 if p is tower else 32)
        p.add_argument("--lr", type=float, default=lr)
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--log", default=None, help="write the loss history here (JSON)")
    args = parser.parse_args(argv)
    if args.what == "tower":
        items = scene_items(args.scenes, args.image_folder)
        options = {k: list(v) for k, v in CATEGORIES.items()}
        history = pretrain_vision_tower(
            args.model, items, options, args.steps, args.batch_size, args.lr, args.seed, cells=scene_cells(args.scenes)
        )
    else:
        with open(args.corpus) as f:
            documents = f.read().splitlines()
        history = pretrain_decoder(args.model, documents, args.steps, args.batch_size, lr=args.lr, seed=args.seed)
    if args.log:
        with open(args.log, "w") as f:
            json.dump(history, f)


if __name__ == "__main__":
    main()
