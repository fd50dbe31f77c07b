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
