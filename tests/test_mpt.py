"""LLaVA on MPT (`LlavaMptForCausalLM`, transformers' own MPT classes): build, train, save, reload, generate, and
load a checkpoint laid out as the original LLaVA-Lightning-MPT-7B-preview was."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file
from train_helpers import image_batch, make_dataset, tiny_flags
from transformers import MptConfig, MptForCausalLM

from llava.conversation import get_conv_template
from llava.mm_utils import tokenizer_image_token
from llava.model import DECODERS, LlavaMptForCausalLM
from llava.model.builder import get_conv_mode, load_pretrained_model
from llava.train.train import train


def build_tiny_mpt(out_dir: str, tokenizer, extra_rows: int = 0, seed: int = 0) -> MptForCausalLM:
    """A randomly initialised MPT decoder (ALiBi, tied LM head, no biases), saved as an HF dir with `tokenizer`."""
    config = MptConfig(
        d_model=64,
        n_heads=4,
        n_layers=2,
        max_seq_len=2048,
        vocab_size=len(tokenizer) + extra_rows,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = MptForCausalLM(config)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return model


@pytest.fixture(scope="module")
def mpt_dir(tiny, tmp_path_factory):
    path = str(tmp_path_factory.mktemp("mpt"))
    build_tiny_mpt(path, tiny.tokenizer)
    return path


def prompt_ids(tokenizer, template: str, start_end: bool = False) -> torch.Tensor:
    conv = get_conv_template(template)
    image = "<im_start><image><im_end>" if start_end else "<image>"
    conv.append_message(conv.roles[0], f"{image}\nDescribe the image briefly.")
    conv.append_message(conv.roles[1], None)
    return tokenizer_image_token(conv.get_prompt(), tokenizer, return_tensors="pt")[None]


def test_mpt_llava_builds_trains_reloads_and_generates(tiny, mpt_dir, tmp_path):
    data_path, folder = make_dataset(str(tmp_path / "data"), n_image=8, style="chat")
    out = str(tmp_path / "out")
    flags = tiny_flags(
        tiny, data_path, folder, out, model_name_or_path=mpt_dir, version="mpt", max_steps=2, learning_rate=1e-3
    )
    trainer = train(flags)  # asks for SDPA, as every entry point does: MPT runs eager attention
    model = trainer.model
    assert isinstance(model, LlavaMptForCausalLM) and model.config._attn_implementation == "eager"
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight  # tied, as MPT's are
    # the original's key layout: everything under `transformer.`, no separate LM head
    keys = set(load_file(os.path.join(out, "model.safetensors")))
    assert {"transformer.wte.weight", "transformer.blocks.1.attn.Wqkv.weight", "transformer.norm_f.weight"} <= keys
    assert {"transformer.mm_projector.0.weight", "transformer.mm_projector.2.bias"} <= keys
    assert not any(k.startswith("model.") for k in keys)
    config = json.load(open(os.path.join(out, "config.json")))
    assert config["model_type"] == "llava_mpt" and config["architectures"] == ["LlavaMptForCausalLM"]

    tokenizer, loaded, _, context_len = load_pretrained_model(out, None, None, device="cpu")
    assert isinstance(loaded, LlavaMptForCausalLM) and context_len == 256
    assert loaded.config.conv_template == "mpt"
    ids = prompt_ids(tokenizer, "mpt")
    model.eval()
    with torch.no_grad():
        expected = model(input_ids=ids, images=image_batch()).logits
        torch.testing.assert_close(loaded(input_ids=ids, images=image_batch()).logits, expected, atol=1e-5, rtol=0)
    torch.manual_seed(0)
    for p in loaded.parameters():  # sharper weights, so greedy decoding does not repeat one token
        p.data.normal_(0, 0.3)
    single = loaded.generate(ids, images=image_batch(), max_new_tokens=5, do_sample=False)
    uncached = loaded.generate(ids, images=image_batch(), max_new_tokens=5, do_sample=False, use_cache=False)
    assert single.shape == (1, 5) and torch.equal(single, uncached)
    # batched, left-padded (ALiBi biases from the key position): the same tokens as alone
    short = prompt_ids(tokenizer, "mpt")[:, 20:]
    width = ids.shape[1]
    batch = torch.cat([ids, torch.cat([torch.full((1, width - short.shape[1]), tokenizer.pad_token_id), short], 1)])
    mask = (torch.arange(width)[None] >= torch.tensor([[0], [width - short.shape[1]]])).long()
    images = torch.cat([image_batch(0), image_batch(1)])
    both = loaded.generate(batch, images=images, attention_mask=mask, max_new_tokens=5, do_sample=False)
    alone = loaded.generate(short, images=image_batch(1), max_new_tokens=5, do_sample=False)
    assert torch.equal(both[0], single[0]) and torch.equal(both[1], alone[0])


def original_mpt_checkpoint(tiny, mpt_dir: str, path: str) -> tuple[dict, dict]:
    """A directory laid out as liuhaotian/LLaVA-Lightning-MPT-7B-preview: `LlavaMPTForCausalLM`, `llava_mpt`, MPT's
    own config fields, `transformer.*` weights with a linear projector and the <im_patch>/<im_start>/<im_end> rows,
    no LM head (tied), no vision tower (loaded from `mm_vision_tower`)."""
    os.makedirs(path)
    base = load_file(os.path.join(mpt_dir, "model.safetensors"))
    generator = torch.Generator().manual_seed(3)
    state = {k: v for k, v in base.items() if k != "lm_head.weight"}
    wte = state["transformer.wte.weight"]
    state["transformer.wte.weight"] = torch.cat([wte, torch.randn(3, wte.shape[1], generator=generator) * 0.02])
    state["transformer.mm_projector.weight"] = torch.randn(64, 32, generator=generator) * 0.1
    state["transformer.mm_projector.bias"] = torch.zeros(64)
    save_file(state, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
    config = json.load(open(os.path.join(mpt_dir, "config.json")))
    config.update(
        architectures=["LlavaMPTForCausalLM"],
        model_type="llava_mpt",
        vocab_size=wte.shape[0] + 3,
        mm_vision_tower=tiny.clip_dir,
        mm_hidden_size=32,
        mm_vision_select_layer=-2,
        mm_use_im_start_end=True,
        use_mm_proj=True,
        tune_mm_mlp_adapter=False,
        init_device="cpu",
        no_bias=True,
        norm_type="low_precision_layernorm",
        tokenizer_name="EleutherAI/gpt-neox-20b",
    )
    config["attn_config"]["attn_impl"] = "triton"
    json.dump(config, open(os.path.join(path, "config.json"), "w"))
    tiny.tokenizer.save_pretrained(path)
    return config, state


def test_original_llava_mpt_checkpoint_loads(tiny, mpt_dir, tmp_path):
    path = str(tmp_path / "LLaVA-Lightning-MPT-7B-preview")
    config, state = original_mpt_checkpoint(tiny, mpt_dir, path)
    tokenizer, model, processor, context_len = load_pretrained_model(path, None, None, device="cpu")
    assert isinstance(model, LlavaMptForCausalLM) and processor is not None and context_len == 2048
    rows = len(load_file(os.path.join(mpt_dir, "model.safetensors"))["transformer.wte.weight"])
    assert tokenizer.convert_tokens_to_ids(["<im_patch>", "<im_start>", "<im_end>"]) == [rows, rows + 1, rows + 2]
    torch.testing.assert_close(model.get_input_embeddings().weight, state["transformer.wte.weight"])
    torch.testing.assert_close(model.get_model().mm_projector.weight, state["transformer.mm_projector.weight"])
    assert get_conv_mode(model.config, path) == "mpt"  # no stored template: the original's name rule
    # the same numbers as our class built by hand from the same weights
    spec = DECODERS["mpt"]
    reference = spec.causal_lm_cls(spec.config_cls(**{k: v for k, v in config.items() if k != "model_type"}))
    reference.get_model().vision_tower.load_model()
    missing, _ = reference.load_state_dict(state, strict=False)
    assert all(".vision_tower." in k or k == "lm_head.weight" for k in missing)
    reference.eval()
    ids = prompt_ids(tokenizer, "mpt", start_end=True)
    with torch.no_grad():
        torch.testing.assert_close(
            model(input_ids=ids, images=image_batch()).logits, reference(input_ids=ids, images=image_batch()).logits
        )
    assert model.generate(ids, images=image_batch(), max_new_tokens=3, do_sample=False).shape == (1, 3)
