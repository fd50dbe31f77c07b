"""make_delta / apply_delta / consolidate on tiny checkpoints: exact round trips, the original's delta semantics."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from transformers import AutoTokenizer

from llava.demo.backbones import TinySizes, build_decoder
from llava.mm_utils import process_images, tokenizer_image_token
from llava.model import apply_delta, consolidate, make_delta
from llava.model.builder import load_pretrained_model
from llava.model.llava_arch import resize_embeddings_to_mean

PROMPT = "USER: <image>\nWhat colour is the circle? ASSISTANT: green"


def _weights(path: str) -> dict[str, torch.Tensor]:
    return load_file(os.path.join(path, "model.safetensors"))


def _config(path: str) -> dict:
    with open(os.path.join(path, "config.json")) as f:
        return json.load(f)


def _save_fine_tuned(tiny, seed: int = 1, with_tower: bool = True) -> str:
    """A tiny LLaVA as if fine-tuned from tiny's llama: decoder moved a little, two tokens added to the vocabulary."""
    model = tiny.model("llama", seed=seed)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "vision_tower" not in name:
                param.add_(torch.randn(param.shape, generator=generator) * 0.02)
    tokenizer = AutoTokenizer.from_pretrained(tiny.tokenizer_dir)
    tokenizer.add_tokens(["<im_patch>", "<extra>"], special_tokens=True)
    resize_embeddings_to_mean(model, len(tokenizer), 2)
    path = tiny.new_dir("target")
    state = {k: v for k, v in model.state_dict().items() if with_tower or "vision_tower" not in k}
    model.save_pretrained(path, state_dict=state)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def target(tiny) -> str:
    return _save_fine_tuned(tiny)


@pytest.fixture(scope="module")
def image() -> Image.Image:
    rng = np.random.default_rng(1)
    return Image.fromarray(rng.integers(0, 256, size=(32, 32, 3), dtype=np.uint8))


def _logits(path: str, image: Image.Image, model_base: str | None = None) -> torch.Tensor:
    tokenizer, model, image_processor, _ = load_pretrained_model(path, model_base, device="cpu")
    ids = tokenizer_image_token(PROMPT, tokenizer, return_tensors="pt")[None]
    pixels = process_images([image], image_processor, model.config)
    with torch.no_grad():
        return model(ids, images=pixels).logits


def test_make_then_apply_delta_reproduces_target_exactly(tiny, target):
    base = tiny.decoder_dirs["llama"]
    delta, out = tiny.new_dir("delta"), tiny.new_dir("applied")
    # Through the CLIs' argument parsing, with the original flags.
    flags = ["--base-model-path", base, "--target-model-path", target, "--delta-path", delta]
    make_delta.main([*flags, "--delta-dtype", "float64"])
    apply_delta.main(["--base-model-path", base, "--target-model-path", out, "--delta-path", delta])
    expected, got = _weights(target), _weights(out)
    assert sorted(got) == sorted(expected)
    for name, tensor in expected.items():
        assert got[name].dtype == tensor.dtype == torch.float32, name
        assert torch.equal(got[name], tensor), name
    assert _config(out)["vocab_size"] == 402
    assert len(AutoTokenizer.from_pretrained(out)) == 402


def test_delta_is_target_minus_base(tiny, target):
    base_dir = tiny.decoder_dirs["llama"]
    delta_dir, out = tiny.new_dir("delta"), tiny.new_dir("applied")
    make_delta.make_delta(base_dir, target, delta_dir)
    base, tgt, delta = _weights(base_dir), _weights(target), _weights(delta_dir)
    assert delta["model.layers.0.self_attn.q_proj.weight"].dtype == torch.float32  # the target's own dtype
    for name in ("model.layers.1.mlp.down_proj.weight", "model.norm.weight"):
        assert torch.equal(delta[name], tgt[name] - base[name]), name
    for name in ("model.embed_tokens.weight", "lm_head.weight"):  # shared rows: difference; added rows: target's
        assert torch.equal(delta[name][:400], tgt[name][:400] - base[name])
        assert torch.equal(delta[name][400:], tgt[name][400:])
    multimodal = [k for k in tgt if "mm_projector" in k or "vision_tower" in k]
    assert multimodal and all(torch.equal(delta[k], tgt[k]) for k in multimodal)
    # Same-dtype deltas are the original's format: the round trip is exact up to float rounding.
    apply_delta.apply_delta(base_dir, out, delta_dir)
    got = _weights(out)
    for name, tensor in tgt.items():
        torch.testing.assert_close(got[name], tensor, rtol=0, atol=1e-6)


def test_delta_leaves_out_a_tower_the_target_does_not_hold(tiny, image):
    target = _save_fine_tuned(tiny, seed=2, with_tower=False)
    base = tiny.decoder_dirs["llama"]
    delta, out = tiny.new_dir("delta"), tiny.new_dir("applied")
    make_delta.make_delta(base, target, delta, delta_dtype=torch.float64)
    assert not any("vision_tower" in k for k in _weights(delta))
    apply_delta.apply_delta(base, out, delta)
    assert sorted(_weights(out)) == sorted(_weights(target))
    assert torch.equal(_logits(out, image), _logits(target, image))


def test_make_delta_rejects_a_base_of_another_shape(tiny, target):
    base = tiny.new_dir("wider-base")
    build_decoder(base, tiny.tokenizer, sizes=TinySizes(intermediate_size=96))
    with pytest.raises(make_delta.DeltaError, match=r"`model\.layers\.0\.mlp\..*`: shape \(128, 64\).*vs \(96, 64\)"):
        make_delta.make_delta(base, target, tiny.new_dir("never"))


def test_consolidate_makes_an_old_checkpoint_self_contained(tiny, image):
    # An original-release style checkpoint: tower not in the weights, old `llava` model type, no stored tower config.
    model = tiny.model("llama", seed=4)
    src = tiny.new_dir("llava-v1-old")
    model.save_pretrained(src, state_dict={k: v for k, v in model.state_dict().items() if "vision_tower" not in k})
    tiny.tokenizer.save_pretrained(src)
    config = _config(src)
    config.update(model_type="llava", mm_vision_tower_config=None)
    with open(os.path.join(src, "config.json"), "w") as f:
        json.dump(config, f)

    dst = consolidate.consolidate_ckpt(src, tiny.new_dir("consolidated"))
    out_config = _config(dst)
    assert out_config["architectures"] == ["LlavaLlamaForCausalLM"] and out_config["model_type"] == "llava_llama"
    assert out_config["mm_vision_tower_config"]["model_type"] == "clip_vision_model"
    assert out_config["conv_template"] == "llava_v1"  # what the original picked from the source's name
    assert any("vision_tower" in k for k in _weights(dst))
    assert torch.equal(_logits(dst, image), _logits(src, image))


def test_consolidate_merges_a_stage1_projector(tiny, image):
    model = tiny.model("llama", seed=5)
    src = tiny.new_dir("stage1")
    model.config.save_pretrained(src)
    projector = {k: v for k, v in model.state_dict().items() if "mm_projector" in k}
    torch.save(projector, os.path.join(src, "mm_projector.bin"))
    base = tiny.decoder_dirs["llama"]
    consolidate.main(["--src", src, "--dst", (dst := tiny.new_dir("merged")), "--model-base", base])
    assert torch.equal(_logits(dst, image), _logits(src, image, model_base=base))
    weights = _weights(dst)
    assert all(torch.equal(weights[k], v) for k, v in projector.items())


def test_float64_delta_is_lossless_where_a_same_dtype_delta_is_not():
    generator = torch.Generator().manual_seed(0)
    base = torch.randn(1000, generator=generator)
    target = base * 1e-3 + torch.randn(1000, generator=generator) * 1e-6  # |target| << |base|: rounding shows

    def round_trip(delta_dtype: torch.dtype) -> torch.Tensor:
        holder = torch.nn.Module()
        holder.weight = torch.nn.Parameter(target.clone())
        make_delta.shift_by_base(holder, {"weight": base}, sign=-1, out_dtype=delta_dtype, source="target")
        make_delta.shift_by_base(holder, {"weight": base}, sign=1, out_dtype=torch.float32, source="delta")
        return holder.weight.detach()

    assert torch.equal(round_trip(torch.float64), target)
    assert not torch.equal(round_trip(torch.float32), target)
