"""llava-hf conversion: exported checkpoints give the same logits in transformers' own Llava, and import brings
them back to our classes with the same logits again."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from llava.conversation import conv_templates
from llava.mm_utils import process_images, tokenizer_image_token
from llava.model.builder import load_pretrained_model
from llava.model.convert_hf import (
    ConversionError,
    check_exportable,
    export_to_hf,
    import_from_hf,
    rename_key,
)

PROMPT = "A chat between a curious human and an assistant. USER: <image>\nWhat colour is the circle? ASSISTANT: green"
TOL = 1e-4


@pytest.fixture(scope="module")
def image() -> Image.Image:
    """Non-square, so `pad` and `square` preprocess differently."""
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, size=(24, 40, 3), dtype=np.uint8))


def _ours(model, tokenizer, image_processor, image):
    """(input_ids with the image sentinel, pixel values, logits) through our own pipeline."""
    ids = tokenizer_image_token(PROMPT, tokenizer, return_tensors="pt")[None]
    pixels = process_images([image], image_processor, model.config)
    with torch.no_grad():
        logits = model(ids, images=pixels).logits
    return ids, pixels, logits


def _expand_image_token(ids: torch.Tensor, image_token_id: int, count: int) -> torch.Tensor:
    """llava-hf prompts repeat the `<image>` id once per image feature where ours hold one sentinel."""
    out = []
    for token in ids[0].tolist():
        out.extend([image_token_id] * count if token == -200 else [token])
    return torch.tensor([out])


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    vocab = b.shape[-1]  # export appends rows for `<image>`; compare the original vocabulary
    assert a.shape[:-1] == b.shape[:-1]
    return (a[..., :vocab] - b).abs().max().item()


@pytest.mark.parametrize(
    ("family", "aspect"),
    [("llama", "square"), ("llama", "pad"), ("mistral", "square"), ("mistral", "pad"), ("qwen2", "square")],
)
def test_export_and_import_keep_logits(tiny, image_processor, image, family, aspect):
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    model = tiny.model(family=family, image_aspect_ratio=aspect, seed=3)
    model.config.conv_template = "llava_v1"
    src = tiny.save_full(model)
    ids, pixels, ref = _ours(model, tiny.tokenizer, image_processor, image)

    dst = export_to_hf(src, tiny.new_dir(f"hf-{family}-{aspect}"))
    hf = LlavaForConditionalGeneration.from_pretrained(dst).eval()
    cfg = hf.config
    assert cfg.text_config.model_type == family
    assert (cfg.vision_feature_select_strategy, cfg.vision_feature_layer, cfg.image_seq_length) == ("default", -2, 16)
    hf_ids = _expand_image_token(ids, cfg.image_token_index, cfg.image_seq_length)
    with torch.no_grad():
        out = hf(input_ids=hf_ids, pixel_values=pixels).logits
    assert _max_diff(out, ref) <= TOL

    # The saved processor reproduces our preprocessing: same pixels (padding included) and the same image tokens.
    processor = AutoProcessor.from_pretrained(dst)
    batch = processor(images=image, text=PROMPT, return_tensors="pt")
    assert torch.equal(batch["pixel_values"], pixels)
    assert int((batch["input_ids"] == cfg.image_token_index).sum()) == cfg.image_seq_length
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Hi"}]}]
    conv = conv_templates["llava_v1"].copy()
    conv.append_message(conv.roles[0], "<image>\nHi")
    conv.append_message(conv.roles[1], None)
    assert processor.apply_chat_template(messages, add_generation_prompt=True) == conv.get_prompt()

    # Back to the original layout: tower weights inside, so our loader needs no tower dir.
    back = import_from_hf(dst, tiny.new_dir(f"orig-{family}-{aspect}"))
    back_config = json.load(open(os.path.join(back, "config.json")))
    assert back_config["image_aspect_ratio"] == aspect
    assert back_config["conv_template"] == "llava_v1"
    assert back_config["architectures"] == [model.__class__.__name__]
    tokenizer2, model2, processor2, _ = load_pretrained_model(back, None, device="cpu")
    ids2, pixels2, logits2 = _ours(model2, tokenizer2, processor2, image)
    assert torch.equal(ids2, ids) and torch.equal(pixels2, pixels)
    assert _max_diff(logits2, ref) <= TOL

    # The loader's own llava-hf path (which calls import_from_hf) gives the same numbers.
    tokenizer3, model3, processor3, _ = load_pretrained_model(dst, None, device="cpu")
    _, pixels3, logits3 = _ours(model3, tokenizer3, processor3, image)
    assert torch.equal(pixels3, pixels)
    assert _max_diff(logits3, ref) <= TOL


def test_rename_key_round_trip():
    for key in (
        "model.layers.0.self_attn.q_proj.weight",
        "model.vision_tower.vision_tower.encoder.layers.1.mlp.fc1.bias",
        "model.mm_projector.0.weight",
        "model.mm_projector.2.bias",
        "lm_head.weight",
    ):
        assert rename_key(rename_key(key), to_hf=False) == key
    assert rename_key("model.mm_projector.2.weight") == "model.multi_modal_projector.linear_2.weight"
    assert (
        rename_key("model.vision_tower.vision_tower.post_layernorm.weight")
        == "model.vision_tower.post_layernorm.weight"
    )
    with pytest.raises(ConversionError, match="no counterpart"):
        rename_key("vision_tower.whatever")


@pytest.fixture(scope="module")
def saved_llama(tiny) -> str:
    return tiny.save_full(tiny.model(family="llama"))


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("mm_projector_type", "linear", "`mm_projector_type` is `linear`.*mlp2x_gelu"),
        ("mm_projector_type", "mlp3x_gelu", "`mm_projector_type` is `mlp3x_gelu`"),
        ("mm_use_im_start_end", True, "`mm_use_im_start_end` is true"),
        ("image_aspect_ratio", "anyres", "`image_aspect_ratio` is `anyres`.*LlavaNextForConditionalGeneration"),
        ("mm_patch_merge_type", "spatial_unpad", "`mm_patch_merge_type` is `spatial_unpad`"),
        ("mm_vision_tower", None, "no vision tower"),
    ],
)
def test_export_rejects_what_llava_hf_cannot_express(tiny, saved_llama, field, value, message):
    config = json.load(open(os.path.join(saved_llama, "config.json")))
    check_exportable(config)  # the unchanged config is fine
    config[field] = value
    with pytest.raises(ConversionError, match=message):
        check_exportable(config)
    # export_to_hf checks before it loads anything: a config.json alone is enough to get the error.
    src = tiny.new_dir("unsupported")
    with open(os.path.join(src, "config.json"), "w") as f:
        json.dump(config, f)
    with pytest.raises(ConversionError, match=message):
        export_to_hf(src, tiny.new_dir("never"))


def test_export_rejects_a_real_linear_projector_model(tiny):
    src = tiny.save_full(tiny.model(family="llama", mm_projector_type="linear"))
    with pytest.raises(ConversionError, match="mm_projector_type"):
        export_to_hf(src, tiny.new_dir("never"))


def test_import_rejects_other_architectures(tiny, saved_llama):
    with pytest.raises(ConversionError, match="LlavaForConditionalGeneration"):
        import_from_hf(saved_llama, tiny.new_dir("never"))


def test_cli_export(tiny, saved_llama):
    dst = tiny.new_dir("cli-hf")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "llava.model.convert_hf", "export", "--src", saved_llama, "--dst", dst]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    config = json.load(open(os.path.join(dst, "config.json")))
    assert config["architectures"] == ["LlavaForConditionalGeneration"]
    assert config["model_type"] == "llava"
    assert os.path.isfile(os.path.join(dst, "processor_config.json"))


def test_import_reads_the_hub_layout(tiny, saved_llama, image_processor, image):
    """Hub llava-hf repos store `language_model.model.*`, `vision_tower.vision_model.*` and a preprocessor_config.json."""
    from safetensors.torch import load_file, save_file

    tokenizer, model, _, _ = load_pretrained_model(saved_llama, None, device="cpu")
    ids, pixels, ref = _ours(model, tokenizer, image_processor, image)
    hub = export_to_hf(saved_llama, tiny.new_dir("hub"))
    weights = load_file(os.path.join(hub, "model.safetensors"))
    assert any(k.startswith("language_model.model.") for k in weights)
    legacy = {k.replace("vision_tower.", "vision_tower.vision_model.", 1): v for k, v in weights.items()}
    save_file(legacy, os.path.join(hub, "model.safetensors"), metadata={"format": "pt"})
    for name in ("processor_config.json", "chat_template.jinja"):
        os.remove(os.path.join(hub, name))

    back = import_from_hf(hub, tiny.new_dir("from-hub"))
    assert "conv_template" not in json.load(open(os.path.join(back, "config.json")))
    tokenizer2, model2, processor2, _ = load_pretrained_model(back, None, device="cpu")
    _, pixels2, logits2 = _ours(model2, tokenizer2, processor2, image)
    assert torch.equal(pixels2, pixels)
    assert _max_diff(logits2, ref) <= TOL


def test_import_half_sits_below_the_builder():
    """Issue 15: the builder loads llava-hf dirs through llava.model.llava_hf, which imports neither the builder nor
    the export half; the builder does not import the export half (no builder <-> convert_hf cycle)."""
    code = (
        "import sys\n"
        "import llava.model.llava_hf\n"
        "print(sorted(m for m in ('llava.model.builder', 'llava.model.convert_hf') if m in sys.modules))\n"
        "import llava.model.builder\n"
        "print('llava.model.convert_hf' in sys.modules)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split() == ["[]", "False"]


def test_cli_import(tiny, saved_llama):
    hf = export_to_hf(saved_llama, tiny.new_dir("cli-import-src"))
    dst = tiny.new_dir("cli-import")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "llava.model.convert_hf", "import", "--src", hf, "--dst", dst, "--dtype", "float32"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"Wrote {dst}" in proc.stdout
    config = json.load(open(os.path.join(dst, "config.json")))
    assert config["architectures"] == ["LlavaLlamaForCausalLM"] and config["unfreeze_mm_vision_tower"] is True
