"""The shared model-side functions against the ORIGINAL release's own: `process_images` (square / pad / anyres),
`tokenizer_image_token`, and every `conv_templates` entry's `get_prompt()`, byte for byte.

Each side runs its own function on the same inputs (image files, the same SentencePiece tokenizer dir, the same
conversations); results travel as JSON (prompts, ids) and .pt files (pixel tensors).

Deliberate differences (listed in docs/Migration.md): none here. Where the original cannot render a conversation at
all (its `plain` template with a finished assistant turn adds `None` to a string and raises TypeError), the
original's output is undefined and the case is only checked to render on our side.
"""

from __future__ import annotations

import json
import os

import PIL
import pytest
import torch
from PIL import Image

PINPOINTS = "[[32, 64], [64, 32], [64, 64]]"
LEGACY_SPECIALS = ("</s>", "<s>")  # special tokens written in a prompt's text (multi-turn v1, llama_2)
IMAGE_SIZES = {"wide": (48, 24), "tall": (20, 50), "square": (32, 32), "tiny": (7, 5)}
ASPECTS = ("square", "pad", "anyres")

# Conversations as (role index, message) lists; None is the turn to generate.
CONVERSATIONS = {
    "image_question": [(0, "<image>\nWhat is in the picture?"), (1, None)],
    "text_question": [(0, "Tell me a story about a red square."), (1, None)],
    "multi_turn": [(0, "<image>\nWhat is in the picture?"), (1, "A red square."), (0, "Where is it?"), (1, None)],
    "closed": [(0, "<image>\nDescribe it."), (1, "A red square on blue.")],
    "whitespace": [(0, "  <image>\n\n  two  spaces \t tab "), (1, None)],
}
PROMPTS_EXTRA = [
    "<image>",
    "<image>\n<image>\nCompare the two images.",
    "USER: <image>\nWhat is in the picture? ASSISTANT:",
    "no image at all",
    "A<image>B",
]

ORIG_SIDE = """
import json, sys, traceback, types
import torch
from PIL import Image
from transformers import AutoTokenizer, CLIPImageProcessor
from llava.conversation import conv_templates
from llava.mm_utils import process_images, tokenizer_image_token

spec = json.load(open(sys.argv[1]))
import PIL
out = {"prompts": {}, "ids": {}, "images": {}, "templates": sorted(conv_templates), "pillow": PIL.__version__}
for name in sorted(conv_templates):
    for conv_name, turns in spec["conversations"].items():
        conv = conv_templates[name].copy()
        try:
            for role, message in turns:
                conv.append_message(conv.roles[role], message)
            out["prompts"][f"{name}/{conv_name}"] = {"ok": True, "text": conv.get_prompt()}
        except Exception:
            out["prompts"][f"{name}/{conv_name}"] = {"ok": False, "error": traceback.format_exc()[-500:]}
tokenizer = AutoTokenizer.from_pretrained(spec["tokenizer"], use_fast=False)
for i, prompt in enumerate(spec["prompts"]):
    out["ids"][str(i)] = tokenizer_image_token(prompt, tokenizer)
processor = CLIPImageProcessor.from_pretrained(spec["clip"])
for aspect in spec["aspects"]:
    cfg = types.SimpleNamespace(image_aspect_ratio=aspect, image_grid_pinpoints=spec["pinpoints"])
    for image_name, path in spec["images"].items():
        result = process_images([Image.open(path).convert("RGB")], processor, cfg)
        file = f"{spec['workdir']}/{aspect}-{image_name}.orig.pt"
        torch.save(result if torch.is_tensor(result) else [t for t in result], file)
        out["images"][f"{aspect}/{image_name}"] = file
print(json.dumps(out))
"""


def rendered_prompts() -> list[str]:
    """Every template's prompt for the image question and the multi-turn chat (as the models see them)."""
    from llava.conversation import conv_templates

    return [
        ours_prompt(name, CONVERSATIONS[c]) for name in sorted(conv_templates) for c in ("image_question", "multi_turn")
    ]


@pytest.fixture(scope="module")
def spec(bases, tmp_path_factory) -> dict:
    workdir = str(tmp_path_factory.mktemp("utils-compat"))
    images = {}
    g = torch.Generator().manual_seed(1)
    for name, (w, h) in IMAGE_SIZES.items():
        pixels = (torch.rand(h, w, 3, generator=g) * 255).to(torch.uint8).numpy()
        path = os.path.join(workdir, f"{name}.png")
        Image.fromarray(pixels).save(path)
        images[name] = path
    return {
        "workdir": workdir,
        "conversations": CONVERSATIONS,
        "prompts": PROMPTS_EXTRA + rendered_prompts(),
        "tokenizer": bases.decoder_dirs["llama"],
        "clip": bases.clip_dir,
        "images": images,
        "aspects": list(ASPECTS),
        "pinpoints": PINPOINTS,
    }


@pytest.fixture(scope="module")
def original(orig, spec) -> dict:
    spec_file = os.path.join(spec["workdir"], "spec.json")
    with open(spec_file, "w") as f:
        json.dump(spec, f)
    return orig.json(ORIG_SIDE, spec_file)


def ours_prompt(name: str, turns) -> str:
    from llava.conversation import conv_templates

    conv = conv_templates[name].copy()
    for role, message in turns:
        conv.append_message(conv.roles[role], message)
    return conv.get_prompt()


def test_same_template_names(original):
    from llava.conversation import conv_templates

    missing = sorted(set(original["templates"]) - set(conv_templates))
    assert not missing, f"templates of the original missing here: {missing}"


@pytest.mark.parametrize("conv_name", sorted(CONVERSATIONS))
def test_every_template_prompt_is_byte_identical(original, conv_name):
    rendered_by_original = 0
    for name in original["templates"]:
        theirs = original["prompts"][f"{name}/{conv_name}"]
        ours = ours_prompt(name, CONVERSATIONS[conv_name])
        if not theirs["ok"]:
            # The original raises here (plain + a finished reply); ours renders. Nothing to compare against.
            assert "TypeError" in theirs["error"], (name, theirs["error"])
            continue
        rendered_by_original += 1
        assert ours == theirs["text"], f"`{name}` / {conv_name}:\nours {ours!r}\norig {theirs['text']!r}"
    assert rendered_by_original >= len(original["templates"]) - 2  # only plain / v0_plain may be skipped


def test_tokenizer_image_token_is_identical(original, spec):
    """Our loader's tokenizer (transformers 5) and the original's slow `LlamaTokenizer` on the same `tokenizer.model`,
    each through its own `tokenizer_image_token`, on every rendered prompt and a few edge cases."""
    from llava.mm_utils import tokenizer_image_token
    from llava.model.builder import load_tokenizer

    tokenizer = load_tokenizer(spec["tokenizer"])
    checked = 0
    for i, prompt in enumerate(spec["prompts"]):
        if any(t in prompt for t in LEGACY_SPECIALS):
            continue  # see test_tokenizer_after_a_special_token_in_text
        assert tokenizer_image_token(prompt, tokenizer) == original["ids"][str(i)], repr(prompt)
        checked += 1
    assert checked >= len(spec["prompts"]) // 2


def test_tokenizer_after_a_special_token_in_text(original, spec):
    """After a special token written in the text (`</s>USER:` between v1 turns, `</s><s>[INST]` in llama_2) the
    original's slow LlamaTokenizer (legacy mode, transformers 4.37's default) starts the next word with its own
    `▁` piece; transformers 5 does that only with `legacy=True`, which our loader passes (`tokenizer_kwargs`)."""
    from llava.mm_utils import tokenizer_image_token
    from llava.model.builder import load_tokenizer

    tokenizer = load_tokenizer(spec["tokenizer"])
    cases = [(i, p) for i, p in enumerate(spec["prompts"]) if any(t in p for t in LEGACY_SPECIALS)]
    assert cases
    for i, prompt in cases:
        assert tokenizer_image_token(prompt, tokenizer) == original["ids"][str(i)], repr(prompt)


@pytest.mark.parametrize("aspect", ASPECTS)
def test_process_images_is_identical(original, spec, aspect):
    import types

    from transformers import CLIPImageProcessorPil

    from llava.mm_utils import process_images

    processor = CLIPImageProcessorPil.from_pretrained(spec["clip"])
    cfg = types.SimpleNamespace(image_aspect_ratio=aspect, image_grid_pinpoints=PINPOINTS)
    for image_name, path in spec["images"].items():
        ours = process_images([Image.open(path).convert("RGB")], processor, cfg)
        theirs = torch.load(original["images"][f"{aspect}/{image_name}"])
        ours = list(ours) if not torch.is_tensor(ours) else ours
        if torch.is_tensor(theirs):
            assert torch.is_tensor(ours) and ours.shape == theirs.shape, (image_name, aspect)
            if aspect == "anyres" and original["pillow"] != PIL.__version__:
                # The overview tile (index 0) is `image.resize((side, side))`, whose pixels differ between Pillow
                # versions (the original's env resolves a newer Pillow than ours); the tiles are exact.
                torch.testing.assert_close(ours[:, 1:], theirs[:, 1:], atol=0, rtol=0, msg=f"{aspect}/{image_name}")
                torch.testing.assert_close(ours[:, :1], theirs[:, :1], atol=0.25, rtol=0)
                continue
            torch.testing.assert_close(ours, theirs, atol=0, rtol=0, msg=f"{aspect}/{image_name}")
        else:
            assert len(ours) == len(theirs), (image_name, aspect)
            for a, b in zip(ours, theirs, strict=True):
                torch.testing.assert_close(a, b, atol=0, rtol=0, msg=f"{aspect}/{image_name}")
