"""The LLaVA model: key layout, projectors, towers, image splicing, padding, truncation, anyres, decoder families."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from llava.constants import IGNORE_INDEX, IMAGE_TOKEN_INDEX
from llava.mm_utils import process_images, tokenizer_image_token
from llava.model.multimodal_projector.builder import build_vision_projector

# The original LLaVA-1.5 layout (mlp2x_gelu, 2 decoder layers), written out: users' checkpoints use these names.
ORIGINAL_KEYS_LLAMA = [
    "lm_head.weight",
    "model.embed_tokens.weight",
    "model.layers.0.input_layernorm.weight",
    "model.layers.0.mlp.down_proj.weight",
    "model.layers.0.mlp.gate_proj.weight",
    "model.layers.0.mlp.up_proj.weight",
    "model.layers.0.post_attention_layernorm.weight",
    "model.layers.0.self_attn.k_proj.weight",
    "model.layers.0.self_attn.o_proj.weight",
    "model.layers.0.self_attn.q_proj.weight",
    "model.layers.0.self_attn.v_proj.weight",
    "model.layers.1.input_layernorm.weight",
    "model.layers.1.mlp.down_proj.weight",
    "model.layers.1.mlp.gate_proj.weight",
    "model.layers.1.mlp.up_proj.weight",
    "model.layers.1.post_attention_layernorm.weight",
    "model.layers.1.self_attn.k_proj.weight",
    "model.layers.1.self_attn.o_proj.weight",
    "model.layers.1.self_attn.q_proj.weight",
    "model.layers.1.self_attn.v_proj.weight",
    "model.mm_projector.0.bias",
    "model.mm_projector.0.weight",
    "model.mm_projector.2.bias",
    "model.mm_projector.2.weight",
    "model.norm.weight",
]

PROMPT = "USER: <image>\nWhat is in the picture? ASSISTANT:"


def ids_for(tokenizer, prompt: str) -> torch.Tensor:
    return tokenizer_image_token(prompt, tokenizer, return_tensors="pt")[None]


def pixels(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 32, 32, generator=g)


@pytest.fixture(scope="module")
def llama(tiny):
    return tiny.model("llama")


def test_state_dict_keys_match_original_layout(llama):
    keys = sorted(k for k in llama.state_dict() if ".vision_tower." not in k)
    assert keys == ORIGINAL_KEYS_LLAMA
    tower_keys = [k for k in llama.state_dict() if ".vision_tower." in k]
    assert tower_keys and all(k.startswith("model.vision_tower.vision_tower.") for k in tower_keys)


@pytest.mark.parametrize(
    "name, expected",
    [("linear", [(64, 32)]), ("mlp2x_gelu", [(64, 32), (64, 64)]), ("mlp3x_gelu", [(64, 32), (64, 64), (64, 64)])],
)
def test_projector_registry_shapes(name, expected):
    config = type("C", (), {"mm_projector_type": name, "mm_hidden_size": 32, "hidden_size": 64})()
    proj = build_vision_projector(config)
    shapes = [tuple(m.weight.shape) for m in proj.modules() if isinstance(m, torch.nn.Linear)]
    assert shapes == expected
    assert proj(torch.zeros(2, 5, 32)).shape == (2, 5, 64)


def test_identity_projector_and_errors():
    same = type("C", (), {"mm_projector_type": "identity", "mm_hidden_size": 64, "hidden_size": 64})()
    x = torch.randn(1, 3, 64)
    assert torch.equal(build_vision_projector(same)(x), x)
    wrong = type("C", (), {"mm_projector_type": "identity", "mm_hidden_size": 32, "hidden_size": 64})()
    with pytest.raises(ValueError, match="identity"):
        build_vision_projector(wrong)
    unknown = type("C", (), {"mm_projector_type": "mlp2x_relu", "mm_hidden_size": 32, "hidden_size": 64})()
    with pytest.raises(ValueError, match=r"Unknown projector type `mlp2x_relu`.*mlp2x_gelu"):
        build_vision_projector(unknown)


def test_select_feature_and_layer(tiny, llama):
    tower = llama.get_vision_tower()
    feats = tower(pixels(2))
    assert feats.shape == (2, 16, 32)  # 32 px / patch 8 = 4x4 patches, CLS dropped
    cls_model = tiny.model("llama", mm_vision_select_feature="cls_patch")
    assert cls_model.get_vision_tower()(pixels(2)).shape == (2, 17, 32)
    # layer -2 is the input of the last block: equal to the HF hidden state at that index
    out = tower.vision_tower(pixels(2), output_hidden_states=True)
    assert torch.equal(feats, out.hidden_states[-2][:, 1:])
    with pytest.raises(ValueError, match="mm_vision_select_feature"):
        tiny.model("llama", mm_vision_select_feature="cls")


def test_image_count_mismatch_is_an_error(tiny, llama):
    ids = ids_for(tiny.tokenizer, PROMPT)
    with pytest.raises(ValueError, match=r"1 `<image>` markers but 2 images"):
        llama(ids, images=pixels(2))
    with pytest.raises(ValueError, match=r"1 `<image>` markers but 0 images"):
        llama(ids)


@pytest.mark.parametrize("prompt", ["<image>\nDescribe.", "USER: What is <image> here? ASSISTANT:", "Look: <image>"])
def test_splice_places_features_and_masks_labels(tiny, llama, prompt):
    ids = ids_for(tiny.tokenizer, prompt)
    labels = ids.clone().clamp(min=0)
    img = pixels(1)
    _, _, mask, _, embeds, new_labels = llama.prepare_inputs_labels_for_multimodal(ids, None, None, None, labels, img)
    pos = int((ids[0] == IMAGE_TOKEN_INDEX).nonzero())
    n_feat = 16
    assert embeds.shape[1] == ids.shape[1] - 1 + n_feat
    expected = llama.encode_images(img)[0]
    torch.testing.assert_close(embeds[0, pos : pos + n_feat], expected)
    assert (new_labels[0, pos : pos + n_feat] == IGNORE_INDEX).all()
    text_embeds = llama.get_model().embed_tokens(ids[0, pos + 1 :])
    torch.testing.assert_close(embeds[0, pos + n_feat :], text_embeds)
    assert mask.all()


def test_zero_and_several_images_per_sample(tiny, llama):
    tok = tiny.tokenizer
    text_only = ids_for(tok, "USER: Hello there. ASSISTANT:")
    out = llama(text_only)
    plain = super(type(llama), llama).forward(input_ids=text_only)
    torch.testing.assert_close(out.logits, plain.logits)
    two = ids_for(tok, "USER: <image> and <image>: same? ASSISTANT:")
    assert llama(two, images=pixels(2)).logits.shape[1] == two.shape[1] - 2 + 32


def _batch(tok, prompts, side):
    rows = [tokenizer_image_token(p, tok) for p in prompts]
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), tok.pad_token_id)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, r in enumerate(rows):
        sl = slice(width - len(r), width) if side == "left" else slice(0, len(r))
        ids[i, sl] = torch.tensor(r)
        mask[i, sl] = 1
    return ids, mask


@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_batch_equals_single_runs(tiny, llama, side):
    """Mixed batch (image + text-only + two images), padded either side: each row's logits equal its solo run."""
    tok = tiny.tokenizer
    prompts = [PROMPT, "USER: A longer question without any picture at all? ASSISTANT:", "<image><image> Same?"]
    images = pixels(3, seed=1)
    ids, mask = _batch(tok, prompts, side)
    batch = llama(ids, attention_mask=mask, images=images)
    per_prompt_images = [images[:1], None, images[1:]]
    for i, p in enumerate(prompts):
        solo = llama(ids_for(tok, p), images=per_prompt_images[i]).logits[0]
        n = solo.shape[0]
        # the model re-pads on the config's side (right): real tokens come first
        torch.testing.assert_close(batch.logits[i, :n], solo, atol=1e-5, rtol=1e-4)


def test_batched_generate_equals_single_generate(tiny, llama):
    tok = tiny.tokenizer
    prompts = [PROMPT, "USER: Tell me something long about squares and circles? ASSISTANT:", "<image> Hi"]
    images = pixels(2, seed=2)
    ids, mask = _batch(tok, prompts, "left")
    kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=tok.pad_token_id, eos_token_id=None)
    batch = llama.generate(ids, attention_mask=mask, images=images, **kwargs)
    solo_images = [images[:1], None, images[1:]]
    for i, p in enumerate(prompts):
        solo = llama.generate(ids_for(tok, p), images=solo_images[i], **kwargs)
        assert batch[i].tolist() == solo[0].tolist()


def test_truncation_counts_image_features(tiny, llama):
    ids = ids_for(tiny.tokenizer, "USER: <image>\n" + "word " * 20 + "ASSISTANT:")
    llama.config.tokenizer_model_max_length = 24
    try:
        _, _, mask, _, embeds, labels = llama.prepare_inputs_labels_for_multimodal(
            ids, None, None, None, ids.clamp(min=0), pixels(1)
        )
        out = llama(ids, images=pixels(1), labels=ids.clamp(min=0))
    finally:
        llama.config.tokenizer_model_max_length = 2048
    assert embeds.shape[1] == 24 and labels.shape[1] == 24 and mask.shape[1] == 24
    assert out.logits.shape[1] == 24 and torch.isfinite(out.loss)


def test_loss_and_backward_reach_projector_not_frozen_tower(tiny, llama):
    ids = ids_for(tiny.tokenizer, PROMPT + " A red square.")
    labels = ids.clamp(min=0)
    llama.zero_grad()
    out = llama(ids, images=pixels(1), labels=labels)
    out.loss.backward()
    proj_grads = [p.grad for p in llama.get_model().mm_projector.parameters()]
    assert all(g is not None and g.abs().sum() > 0 for g in proj_grads)
    assert all(p.grad is None for p in llama.get_vision_tower().parameters())
    llama.zero_grad()


@pytest.mark.parametrize("family", ["mistral", "qwen2"])
def test_other_decoder_families_build_train_and_generate(tiny, family):
    model = tiny.model(family)
    ids = ids_for(tiny.tokenizer, PROMPT)
    out = model(ids, images=pixels(1), labels=ids.clamp(min=0))
    out.loss.backward()
    gen = model.generate(ids, images=pixels(1), max_new_tokens=3, do_sample=False)
    assert gen.shape == (1, 3)
    assert type(model).__name__ == {"mistral": "LlavaMistralForCausalLM", "qwen2": "LlavaQwen2ForCausalLM"}[family]


def test_pad_mode_uses_mean_colour(tiny, image_processor, llama):
    img = Image.new("RGB", (64, 16), (255, 0, 0))
    llama.config.image_aspect_ratio = "pad"
    try:
        padded = process_images([img], image_processor, llama.config)
    finally:
        llama.config.image_aspect_ratio = "square"
    # top rows are background = processor mean -> ~0 after normalisation
    assert padded[0, :, 0, :].abs().max() < 0.02


SIZES = [(32, 32), (64, 32), (32, 64), (100, 37), (37, 100), (200, 90), (17, 300), (300, 17), (64, 64), (95, 96)]


@pytest.mark.parametrize("merge", ["flat", "spatial", "spatial_unpad"])
def test_anyres_feature_count_matches_splice(tiny, image_processor, merge):
    model = tiny.model(
        "llama",
        image_aspect_ratio="anyres",
        mm_patch_merge_type=merge,
        image_grid_pinpoints=[[32, 64], [64, 32], [64, 64], [96, 32], [32, 96]],
    )
    tok = tiny.tokenizer
    ids = ids_for(tok, "<image>\nWhat?")
    for size in SIZES:
        img = Image.new("RGB", size, (10, 200, 30))
        images = process_images([img], image_processor, model.config)
        _, _, _, _, embeds, _ = model.prepare_inputs_labels_for_multimodal(
            ids, None, None, None, None, images, image_sizes=[img.size]
        )
        n_spliced = embeds.shape[1] - (ids.shape[1] - 1)
        assert n_spliced == model.num_image_tokens(img.size), (size, merge)
    if merge == "spatial_unpad":
        assert "model.image_newline" in model.state_dict()


def test_im_start_end_tokens_added_at_mean(tiny):
    import copy

    model = tiny.model("llama")
    tok = copy.deepcopy(tiny.tokenizer)
    before = model.get_input_embeddings().weight.detach().clone()
    args = type("A", (), {"mm_use_im_start_end": True, "mm_use_im_patch_token": True, "tune_mm_mlp_adapter": True})()
    model.initialize_vision_tokenizer(args, tok)
    after = model.get_input_embeddings().weight
    assert after.shape[0] == before.shape[0] + 3
    torch.testing.assert_close(after[-1], before.mean(0))
    assert after.requires_grad and not model.get_output_embeddings().weight.requires_grad


# ------------------------------------------------------------------------------- assembler, parts, families, loader


def test_build_llava_writes_every_multimodal_field_once(tiny):
    from llava.model.assemble import ProjectorSpec, PromptSpec, VisionSpec, build_llava, multimodal_fields

    vision = VisionSpec(tiny.clip_dir, select_layer=-2, select_feature="cls_patch")
    projector = ProjectorSpec("mlp3x_gelu", "spatial_unpad")
    prompt = PromptSpec("anyres", "[[32, 64], [64, 32]]", True, True, "left", 99)
    model = build_llava(tiny.decoder_dirs["llama"], vision, projector, prompt, record={"conv_template": "v1"}, seed=3)
    config = model.config
    expected = multimodal_fields(vision, projector, prompt)
    assert {k: getattr(config, k) for k in expected} == expected
    assert set(expected) >= {"mm_vision_tower", "mm_projector_type", "image_grid_pinpoints", "tokenizer_padding_side"}
    assert config.mm_hidden_size == model.get_vision_tower().hidden_size == 32
    assert config.mm_vision_tower_config["model_type"] == "clip_vision_model"
    assert config.conv_template == "v1"
    assert len(model.get_model().mm_projector) == 5 and model.get_model().image_newline.shape == (64,)
    # The seed decides the new projector: the same seed twice gives the same weights, another seed does not.
    again = build_llava(tiny.decoder_dirs["llama"], vision, projector, prompt, seed=3)
    other = build_llava(tiny.decoder_dirs["llama"], vision, projector, prompt, seed=4)
    w = model.get_model().mm_projector[0].weight
    assert torch.equal(w, again.get_model().mm_projector[0].weight)
    assert not torch.equal(w, other.get_model().mm_projector[0].weight)


def test_initialize_vision_modules_is_the_assembler(tiny):
    """The original's entry point writes the tower/projector fields the assembler writes, and leaves the prompt ones."""
    from conftest import vision_args

    from llava.model import DECODERS
    from llava.model.assemble import multimodal_fields, specs_from_args

    model = DECODERS["llama"].causal_lm_cls.from_pretrained(tiny.decoder_dirs["llama"])
    args = vision_args(tiny.clip_dir)
    model.get_model().initialize_vision_modules(args)
    vision, projector, _ = specs_from_args(args)
    expected = multimodal_fields(vision, projector, None)
    assert {k: getattr(model.config, k) for k in expected} == expected
    assert getattr(model.config, "image_aspect_ratio", None) is None  # a data field: training writes it
    assert model.config.mm_hidden_size == 32 and model.get_vision_tower().is_loaded


def test_parts_cover_every_parameter_once(tiny):
    from peft import LoraConfig, get_peft_model

    from llava.model.assemble import PARTS, module_parts, parameter_parts, part_of

    model = tiny.model("llama", mm_patch_merge_type="spatial_unpad")
    parts = model.parts()
    assert set(parts) <= set(PARTS)
    ids = [id(p) for group in parts.values() for p in group]
    assert len(ids) == len(set(ids)) == len(list(model.parameters()))
    assert {id(p) for p in parts["vision_tower"]} == {id(p) for p in model.get_vision_tower().parameters()}
    projector = {id(p) for p in model.get_model().mm_projector.parameters()} | {id(model.get_model().image_newline)}
    assert {id(p) for p in parts["mm_projector"]} == projector
    assert [id(p) for p in parts["embeddings"]] == [id(model.get_input_embeddings().weight)]
    assert [id(p) for p in parts["lm_head"]] == [id(model.get_output_embeddings().weight)]
    assert part_of(model, "model.layers.0.self_attn.q_proj.weight") == "llm"
    assert module_parts(model)["model.mm_projector.0"] == "mm_projector"
    with pytest.raises(KeyError, match="no_such_layer"):
        part_of(model, "model.no_such_layer.weight")
    # Wrapped in peft: adapter weights are their own part, wherever they sit; names carry the wrapper's prefix.
    targets = [
        "model.layers.0.self_attn.q_proj",
        "model.vision_tower.vision_tower.encoder.layers.0.mlp.fc1",
    ]
    wrapped = get_peft_model(model, LoraConfig(r=2, target_modules=targets))
    by_name = parameter_parts(wrapped)
    lora = sorted(n for n, part in by_name.items() if part == "lora")
    assert len(lora) == 4 and all(".lora_" in n for n in lora)
    host = parameter_parts(wrapped, lora=False)
    assert {host[n] for n in lora} == {"llm", "vision_tower"}
    assert by_name["base_model.model.model.mm_projector.2.weight"] == "mm_projector"


def test_mpt_tied_head_is_the_embedding_part(tiny, tmp_path):
    from transformers import MptConfig, MptForCausalLM

    from llava.model.assemble import ProjectorSpec, VisionSpec, build_llava, module_parts

    MptForCausalLM(MptConfig(d_model=64, n_heads=4, n_layers=1, vocab_size=len(tiny.tokenizer))).save_pretrained(
        tmp_path
    )
    model = build_llava(str(tmp_path), VisionSpec(tiny.clip_dir), ProjectorSpec("linear"))
    parts = model.parts()
    assert "lm_head" not in parts and [id(p) for p in parts["embeddings"]] == [id(model.transformer.wte.weight)]
    assert module_parts(model)["lm_head"] == "lm_head"  # never a LoRA target, though its weight is the embedding's


@pytest.mark.parametrize(
    "model_type, family",
    [("llava_llama", "llama"), ("llava_mistral", "mistral"), ("llava_qwen2", "qwen2"), ("llava_mpt", "mpt")],
)
def test_family_classes_keep_names_and_auto_registration(model_type, family):
    import importlib

    from transformers import AutoConfig, AutoModelForCausalLM

    from llava.model import DECODERS
    from llava.model.llava_arch import LlavaMetaForCausalLM, LlavaMetaModel

    spec = DECODERS[family]
    module = importlib.import_module(f"llava.model.language_model.llava_{family}")
    config_cls, causal_lm_cls = spec.config_cls, spec.causal_lm_cls
    assert getattr(module, config_cls.__name__) is config_cls and config_cls.__module__ == module.__name__
    assert getattr(module, causal_lm_cls.__name__) is causal_lm_cls
    assert type(AutoConfig.for_model(model_type)) is config_cls and config_cls.model_type == model_type
    assert AutoModelForCausalLM._model_mapping[config_cls] is causal_lm_cls
    assert issubclass(causal_lm_cls, LlavaMetaForCausalLM) and issubclass(
        causal_lm_cls.llava_model_class, LlavaMetaModel
    )
    assert causal_lm_cls.llava_model_class.config_class is config_cls
    names = {"llama": ("LlavaConfig", "LlavaLlamaForCausalLM"), "mpt": ("LlavaMptConfig", "LlavaMptForCausalLM")}
    if family in names:
        assert (config_cls.__name__, causal_lm_cls.__name__) == names[family]


def test_load_pretrained_model_rejects_unknown_keyword_arguments(tiny, llama):
    from llava.model.builder import load_pretrained_model

    path = tiny.save_full(llama, "kwargs")
    with pytest.raises(TypeError, match="`trust_remote_code`"):
        load_pretrained_model(path, None, None, device="cpu", trust_remote_code=True)
    # What the original forwarded to from_pretrained and still means something is accepted.
    _, model, _, _ = load_pretrained_model(
        path, None, None, device="cpu", torch_dtype=torch.bfloat16, low_cpu_mem_usage=True
    )
    assert model.dtype == torch.bfloat16


def test_weights_of_another_shape_name_key_and_both_shapes(tiny, llama):
    import json
    import os

    from llava.model.builder import CheckpointError, load_pretrained_model

    path = tiny.save_full(llama, "misshapen")
    config_file = os.path.join(path, "config.json")
    config = json.load(open(config_file))
    config["intermediate_size"] += 8
    json.dump(config, open(config_file, "w"))
    wanted = rf"size mismatch: model\.layers\.0\.mlp\.down_proj\.weight: file \(64, {config['intermediate_size'] - 8}\)"
    with pytest.raises(CheckpointError, match=wanted):
        load_pretrained_model(path, None, None, device="cpu")
