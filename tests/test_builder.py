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


def test_no_device_given_uses_the_best_available_and_logs_it(trained, caplog):
    """Issue 12, item 24: callers that never pass `device` (the original's default was "cuda") still load here."""
    expected = "cuda" if torch.cuda.is_available() else ("mps" if torch.backends.mps.is_available() else "cpu")
    with caplog.at_level(logging.INFO, logger="llava.model.builder"):
        _, model, _, _ = load_pretrained_model(trained[1], None, None)
    assert model.device.type == expected
    assert f"no device given; using `{expected}`" in caplog.text


def test_original_style_lora_unmerged_does_not_wrap_the_tower(tiny):
    """Issue 12, item 4: the original applies LoRA with short target names (`q_proj`, ...) before the vision tower
    exists; loading it unmerged here must wrap only the decoder's layers, not CLIP's q/k/v."""
    from conftest import vision_args
    from peft import LoraConfig, get_peft_model

    from llava.model import DECODERS

    model = DECODERS["llama"].causal_lm_cls.from_pretrained(tiny.decoder_dirs["llama"])
    short = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=short, lora_dropout=0.0))
    torch.manual_seed(8)
    for name, p in peft_model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.05)
    model.get_model().initialize_vision_modules(vision_args(tiny.clip_dir))
    model.config.image_aspect_ratio = "square"
    model.config.mm_use_im_start_end = model.config.mm_use_im_patch_token = False
    model.eval()
    d = tiny.new_dir("lora-short-names")
    peft_model.save_pretrained(d)
    torch.save(
        {k: v for k, v in peft_model.state_dict().items() if "mm_projector" in k},
        os.path.join(d, "non_lora_trainables.bin"),
    )
    model.config.save_pretrained(d)
    tiny.tokenizer.save_pretrained(d)
    expected = logits_of(peft_model, tiny.tokenizer)

    tok, unmerged, _, _ = load(d, tiny.decoder_dirs["llama"], merge_lora=False)
    wrapped = [n for n, _ in unmerged.named_modules() if n.endswith(".base_layer")]
    assert wrapped and not [n for n in wrapped if "vision_tower" in n], wrapped
    torch.testing.assert_close(logits_of(unmerged, tok), expected, atol=1e-5, rtol=1e-5)
    tok, merged, _, _ = load(d, tiny.decoder_dirs["llama"])
    torch.testing.assert_close(logits_of(merged, tok), expected, atol=1e-5, rtol=1e-5)


def _with_scaled_tower(tiny, path: str, name: str, **config_updates) -> str:
    """A copy of the full checkpoint `path` whose stored tower weights differ from the tower directory's."""
    from safetensors.torch import load_file, save_file

    d = tiny.new_dir(name)
    shutil.copytree(path, d, dirs_exist_ok=True)
    f = os.path.join(d, "model.safetensors")
    state = {k: (v * 1.5 if ".vision_tower." in k and v.is_floating_point() else v) for k, v in load_file(f).items()}
    save_file(state, f, metadata={"format": "pt"})
    cfg = json.load(open(os.path.join(d, "config.json")))
    cfg.update(config_updates)
    json.dump(cfg, open(os.path.join(d, "config.json"), "w"))
    return d


def test_tower_reloaded_from_mm_vision_tower_unless_trained(tiny, trained, caplog):
    """Issue 12, item 5: as the original, tower weights stored in a checkpoint are ignored (the tower comes from
    `mm_vision_tower`) unless the config records that the run trained the tower."""
    from safetensors.torch import load_file

    model, path = trained
    frozen = _with_scaled_tower(tiny, path, "stored-tower-frozen")
    tokenizer, loaded, _, _ = load(frozen)
    torch.testing.assert_close(logits_of(loaded, tokenizer), logits_of(model, tiny.tokenizer), atol=0, rtol=0)

    trained_tower = _with_scaled_tower(tiny, path, "stored-tower-trained", unfreeze_mm_vision_tower=True)
    _, loaded, _, _ = load(trained_tower)
    stored = load_file(os.path.join(trained_tower, "model.safetensors"))
    key = next(k for k in stored if k.endswith("vision_tower.vision_tower.embeddings.patch_embedding.weight"))
    torch.testing.assert_close(loaded.state_dict()[key], stored[key], atol=0, rtol=0)

    # The tower directory is gone: the stored copy is used, with a warning (the original would stop).
    moved = _with_scaled_tower(tiny, path, "stored-tower-moved", mm_vision_tower="/nonexistent/clip-336")
    with caplog.at_level(logging.WARNING, logger="llava.model.builder"):
        _, loaded, _, _ = load(moved)
    assert "Using the tower weights stored in the checkpoint" in caplog.text
    stored = load_file(os.path.join(moved, "model.safetensors"))
    torch.testing.assert_close(loaded.state_dict()[key], stored[key], atol=0, rtol=0)


def _trainer_model(tiny, kind: str, seed: int):
    """A tiny model set up to train as a run of checkpoint format `kind` would, its trainable weights perturbed."""
    model = tiny.model("llama", seed=seed)
    model.config.conv_template = "llava_v1"
    if kind == "lora":
        from peft import LoraConfig, get_peft_model

        cfg = LoraConfig(r=4, lora_alpha=8, target_modules=r"model\.layers\.\d+\.(self_attn|mlp)\.\w+_proj")
        model = get_peft_model(model, cfg)
    for name, p in model.named_parameters():
        p.requires_grad = "mm_projector" in name or "lora_" in name or kind == "full"
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad and ("lora_B" in name or "mm_projector" in name or "lm_head" in name):
                p.add_(0.05 * torch.randn(p.shape, generator=generator))
    return model.eval()


@pytest.mark.parametrize("kind", ["full", "projector", "lora"])
def test_every_checkpoint_the_trainer_writes_loads_as_is(tiny, kind, tmp_path):
    """Issue 15, change 6: LLaVATrainer writes each of its formats through llava.model.checkpoint_format; the kind is
    detected from the files, `load_pretrained_model` loads it with the trained numbers, and the trainer's resume
    reads it back into a fresh model."""
    from transformers import TrainingArguments

    from llava.model.checkpoint_format import TRAINER_KINDS, missing_weight_files
    from llava.train.llava_trainer import LLaVATrainer

    def trainer_for(model, out):
        args = TrainingArguments(output_dir=str(out), report_to=[], use_cpu=True)
        return LLaVATrainer(model=model, args=args, processing_class=tiny.tokenizer, checkpoint_format=kind)

    assert kind in TRAINER_KINDS
    model = _trainer_model(tiny, kind, seed=11)
    expected = logits_of(model, tiny.tokenizer)
    out = tmp_path / "out"
    trainer_for(model, out).save_model(str(out))

    assert detect_checkpoint_kind(str(out)).kind == kind
    assert missing_weight_files(str(out), kind) == []
    base = None if kind == "full" else tiny.decoder_dirs["llama"]
    tokenizer, loaded, _, _ = load(str(out), base)
    torch.testing.assert_close(logits_of(loaded, tokenizer), expected, atol=1e-5, rtol=1e-5)
    if kind != "full":
        with pytest.raises(CheckpointError, match="--model-base"):
            load(str(out))

    fresh = _trainer_model(tiny, kind, seed=12)  # other trained weights, same architecture
    assert not torch.allclose(logits_of(fresh, tiny.tokenizer), expected)
    trainer_for(fresh, tmp_path / "resume")._load_from_checkpoint(str(out))
    torch.testing.assert_close(logits_of(fresh.eval(), tiny.tokenizer), expected, atol=1e-5, rtol=1e-5)


def test_partial_state_with_unknown_or_misshapen_weights_is_an_error(tiny, trained):
    from llava.model.checkpoint_format import load_trained_state

    model, _ = trained
    projector = {k: v for k, v in model.state_dict().items() if "mm_projector" in k}
    with pytest.raises(CheckpointError, match=r"`extra.bin` has weights this model does not have: \['model.nope'\]"):
        load_trained_state(model, {**projector, "model.nope": torch.zeros(2)}, "extra.bin")
    norm = "model.norm.weight"
    with pytest.raises(CheckpointError, match=r"`bad.bin`: shape mismatch for \['model.norm.weight: file \(3,\)"):
        load_trained_state(model, {**projector, norm: torch.zeros(3)}, "bad.bin")
    with pytest.raises(ValueError, match="holds no projector weights"):
        load_trained_state(model, {norm: model.state_dict()[norm]}, "no-projector.bin")
    # A PeftModel's key prefix is dropped; a state without projector keys is fine when none is required.
    before = model.state_dict()[norm].clone()
    loaded = load_trained_state(model, {f"base_model.model.{norm}": before * 1}, "x.bin", require_projector=False)
    assert loaded.other == [norm] and not loaded.projector
