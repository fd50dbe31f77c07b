"""`load_pretrained_model` on every checkpoint kind, its error messages, quantised loads and attention fallback."""

from __future__ import annotations

import json
import logging
import os
import shutil

import pytest
import torch

from llava.mm_utils import tokenizer_image_token
from llava.model.builder import CheckpointError, detect_checkpoint_kind, get_conv_mode, load_pretrained_model
from llava.model.multimodal_encoder.builder import VisionTowerNotFoundError

PROMPT = "USER: <image>\nWhat is in the picture? ASSISTANT:"


def logits_of(model, tokenizer, seed: int = 0):
    ids = tokenizer_image_token(PROMPT, tokenizer, return_tensors="pt")[None]
    images = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model(ids, images=images).logits


def load(path, base=None, **kw):
    return load_pretrained_model(path, base, None, device="cpu", **kw)


@pytest.fixture(scope="module")
def trained(tiny):
    """A tiny model whose projector is trained (random), saved as a full checkpoint."""
    model = tiny.model("llama", seed=3)
    model.config.conv_template = "llava_v1"
    return model, tiny.save_full(model)


def save_stage1(tiny, model) -> str:
    d = tiny.new_dir("stage1")
    model.config.save_pretrained(d)
    state = {k: v for k, v in model.state_dict().items() if "mm_projector" in k}
    torch.save(state, os.path.join(d, "mm_projector.bin"))
    return d


def save_lora(tiny, model) -> str:
    """A LoRA run's output: adapter on the LLM's linear layers, projector in non_lora_trainables.bin."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(7)
    cfg = LoraConfig(
        r=4, lora_alpha=8, target_modules=r"model\.layers\.\d+\.(self_attn|mlp)\.\w+_proj", lora_dropout=0.0
    )
    peft_model = get_peft_model(model, cfg)
    for name, p in peft_model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.05)  # non-zero, so merging changes the logits
    d = tiny.new_dir("lora")
    peft_model.save_pretrained(d)
    non_lora = {k: v for k, v in peft_model.state_dict().items() if "mm_projector" in k}
    torch.save(non_lora, os.path.join(d, "non_lora_trainables.bin"))
    model.config.save_pretrained(d)
    tiny.tokenizer.save_pretrained(d)
    return d, peft_model


def test_detect_kinds_by_files_not_names(tiny, trained):
    _, full = trained
    renamed = os.path.join(tiny.root, "llava-v1.5-7b-lora-mm_projector")  # a misleading name
    shutil.copytree(full, renamed)
    assert detect_checkpoint_kind(renamed).kind == "full"
    assert detect_checkpoint_kind(tiny.decoder_dirs["llama"]).kind == "text"


def test_full_checkpoint_round_trip(tiny, trained):
    model, path = trained
    tokenizer, loaded, processor, context_len = load(path)
    torch.testing.assert_close(logits_of(loaded, tokenizer), logits_of(model, tiny.tokenizer), atol=0, rtol=0)
    assert processor.crop_size["height"] == 32
    assert context_len == 2048
    assert get_conv_mode(loaded.config, path) == "llava_v1"
    assert get_conv_mode(loaded.config, path, override="mistral_instruct") == "mistral_instruct"


def test_full_checkpoint_with_original_tower_keys(tiny, trained):
    """Original releases that carry `...vision_tower.vision_model.*` keys load without the tower dir."""
    from safetensors.torch import load_file, save_file

    model, path = trained
    d = tiny.new_dir("full-with-tower")
    shutil.copytree(path, d, dirs_exist_ok=True)
    f = os.path.join(d, "model.safetensors")
    state = load_file(f)
    save_file(
        {
            k.replace("vision_tower.vision_tower.", "vision_tower.vision_tower.vision_model."): v
            for k, v in state.items()
        },
        f,
        metadata={"format": "pt"},
    )
    tokenizer, loaded, _, _ = load(d)
    torch.testing.assert_close(logits_of(loaded, tokenizer), logits_of(model, tiny.tokenizer), atol=0, rtol=0)


def test_stage1_projector_on_model_base(tiny, trained):
    model, _ = trained
    d = save_stage1(tiny, model)
    assert detect_checkpoint_kind(d).kind == "projector"
    tokenizer, loaded, _, _ = load(d, tiny.decoder_dirs["llama"])
    torch.testing.assert_close(logits_of(loaded, tokenizer), logits_of(model, tiny.tokenizer), atol=0, rtol=0)
    with pytest.raises(CheckpointError, match=r"projector weights only.*--model-base"):
        load(d)


def test_stage1_projector_shape_mismatch(tiny, trained):
    model, _ = trained
    d = save_stage1(tiny, model)
    state = torch.load(os.path.join(d, "mm_projector.bin"))
    state["model.mm_projector.0.weight"] = torch.zeros(64, 48)
    torch.save(state, os.path.join(d, "mm_projector.bin"))
    with pytest.raises(ValueError, match=r"shape mismatches.*0\.weight: file \(64, 48\) vs model \(64, 32\)"):
        load(d, tiny.decoder_dirs["llama"])


def test_full_checkpoint_missing_projector(tiny, trained):
    from safetensors.torch import load_file, save_file

    _, path = trained
    d = tiny.new_dir("no-projector")
    shutil.copytree(path, d, dirs_exist_ok=True)
    f = os.path.join(d, "model.safetensors")
    state = {k: v for k, v in load_file(f).items() if "mm_projector" not in k}
    save_file(state, f, metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"lacks projector weights.*mm_projector\.0\.weight"):
        load(d)


def test_unknown_projector_type(tiny, trained):
    _, path = trained
    d = tiny.new_dir("bad-projector-type")
    shutil.copytree(path, d, dirs_exist_ok=True)
    cfg = json.load(open(os.path.join(d, "config.json")))
    cfg["mm_projector_type"] = "mlp2x_swish"
    json.dump(cfg, open(os.path.join(d, "config.json"), "w"))
    with pytest.raises(ValueError, match=r"Unknown projector type `mlp2x_swish`"):
        load(d)


def test_vision_tower_not_found(tiny, trained):
    model, path = trained
    d = tiny.new_dir("moved-tower")
    shutil.copytree(path, d, dirs_exist_ok=True)
    cfg = json.load(open(os.path.join(d, "config.json")))
    cfg["mm_vision_tower"] = "/nonexistent/clip-vit-large-patch14-336"
    cfg.pop("mm_vision_tower_config")
    json.dump(cfg, open(os.path.join(d, "config.json"), "w"))
    with pytest.raises(VisionTowerNotFoundError) as err:
        load(d)
    assert "/nonexistent/clip-vit-large-patch14-336" in str(err.value)
    assert "mm_vision_tower" in str(err.value) and "local" in str(err.value)
    # the override points at a local copy and then it loads
    tokenizer, loaded, _, _ = load(d, vision_tower=tiny.clip_dir)
    torch.testing.assert_close(logits_of(loaded, tokenizer), logits_of(model, tiny.tokenizer), atol=0, rtol=0)


def test_lora_merged_and_unmerged(tiny):
    model = tiny.model("llama", seed=5)
    d, peft_model = save_lora(tiny, model)
    assert detect_checkpoint_kind(d).kind == "lora"
    expected = logits_of(peft_model, tiny.tokenizer)
    tok, merged, _, _ = load(d, tiny.decoder_dirs["llama"])
    tok2, unmerged, _, _ = load(d, tiny.decoder_dirs["llama"], merge_lora=False)
    assert type(merged).__name__ == "LlavaLlamaForCausalLM"
    assert type(unmerged).__name__ == "PeftModel"
    torch.testing.assert_close(logits_of(merged, tok), expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logits_of(unmerged, tok2), expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logits_of(merged, tok), logits_of(unmerged, tok2), atol=1e-5, rtol=1e-5)
    gen = unmerged.generate(
        tokenizer_image_token(PROMPT, tok, return_tensors="pt")[None],
        images=torch.zeros(1, 3, 32, 32),
        max_new_tokens=3,
        do_sample=False,
    )
    assert gen.shape == (1, 3)
    with pytest.raises(CheckpointError, match="LoRA adapter"):
        load(d)
    os.remove(os.path.join(d, "non_lora_trainables.bin"))
    with pytest.raises(CheckpointError, match="non_lora_trainables.bin"):
        load(d, tiny.decoder_dirs["llama"])


def test_lora_with_wrong_base(tiny):
    model = tiny.model("llama", seed=6)
    d, _ = save_lora(tiny, model)
    from llava.demo.backbones import TinySizes, build_decoder

    other = tiny.new_dir("other-base")
    build_decoder(other, tiny.tokenizer, sizes=TinySizes(hidden_size=96, intermediate_size=160))
    with pytest.raises(
        CheckpointError, match=r"does not match the base.*hidden_size: LoRA was trained on 64, base has 96"
    ):
        load(d, other)


@pytest.mark.parametrize("bits", ["load_4bit", "load_8bit"])
def test_quantized_load_generates_on_cpu(tiny, trained, bits):
    pytest.importorskip("bitsandbytes")
    _, path = trained
    tokenizer, model, _, _ = load(path, **{bits: True})
    linear_types = {type(m).__name__ for m in model.model.layers.modules()}
    assert linear_types & {"Linear4bit", "Linear8bitLt"}
    assert type(model.get_model().mm_projector[0]).__name__ == "Linear"  # projector stays full precision
    ids = tokenizer_image_token(PROMPT, tokenizer, return_tensors="pt")[None]
    out = model.generate(ids, images=torch.zeros(1, 3, 32, 32), max_new_tokens=4, do_sample=False)
    assert out.shape == (1, 4)


def test_flash_attn_falls_back_to_sdpa_with_log(tiny, trained, caplog):
    import importlib.util

    if importlib.util.find_spec("flash_attn") is not None:
        pytest.skip("flash-attn is installed here")
    _, path = trained
    with caplog.at_level(logging.WARNING, logger="llava.model.builder"):
        _, model, _, _ = load(path, use_flash_attn=True)
    assert "flash-attn is not installed" in caplog.text and "SDPA" in caplog.text
    assert model.config._attn_implementation == "sdpa"


def test_cuda_requested_without_cuda(trained):
    if torch.cuda.is_available():
        pytest.skip("CUDA present")
    with pytest.raises(RuntimeError, match="device='cpu'"):
        load_pretrained_model(trained[1], None, device="cuda")


def test_not_a_checkpoint(tiny):
    d = tiny.new_dir("empty")
    with pytest.raises(CheckpointError, match="no config.json"):
        load(d)
