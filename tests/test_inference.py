"""The shared generation path: batched == one at a time under greedy, streaming, request validation."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from llava.inference import (
    GREEDY_TIE_TOLERANCE,
    GenerationParams,
    LlavaEngine,
    PromptTooLongError,
    RequestError,
    cut_at_stop,
    greedy_divergence,
)
from llava.model.builder import load_pretrained_model


@pytest.fixture(scope="module")
def engine(tiny):
    model = tiny.model("llama", seed=11)
    model.config.conv_template = "llava_v1"
    path = tiny.save_full(model)
    return LlavaEngine.from_pretrained(path, device="cpu")


def images(n, size=(40, 30)):
    return [Image.new("RGB", size, (40 * i % 255, 100, 200)) for i in range(n)]


def test_template_comes_from_checkpoint(engine):
    assert engine.conv_mode == "llava_v1"
    prompt = engine.build_prompt("What is it?", n_images=1)
    assert prompt.endswith("USER: <image>\nWhat is it? ASSISTANT:")
    assert engine.build_prompt("a <image> b", n_images=1).count("<image>") == 1


def test_batched_equals_single_greedy(engine):
    params = GenerationParams(temperature=0, max_new_tokens=8)
    prompts = [
        engine.build_prompt("What is it?", 1),
        engine.build_prompt("Say something without an image, please.", 0),
        engine.build_prompt("<image> and <image>: which is brighter?", 2),
        engine.build_prompt("A wide picture.", 1),
    ]
    ims = [images(1), [], images(2), images(1, size=(120, 20))]
    batched = engine.generate(prompts, ims, params)
    alone = [engine.generate([p], [i], params)[0] for p, i in zip(prompts, ims)]
    assert batched == alone
    assert all(isinstance(t, str) for t in batched)


# Batch shapes that change how matrix kernels block their work: the claims below must hold for each.
EXACTNESS_BATCHES = (1, 2, 3, 7, 16)
QUESTIONS = ["What is it?", "Describe the colours, please.", "Is it big?", "Say something without an image.", "hi"]


def mixed_requests(engine, n):
    """`n` different requests: one or two images of varied sizes, or none."""
    prompts, ims = [], []
    for k in range(n):
        n_images = (1, 1, 0, 2)[k % 4]
        question = QUESTIONS[k % len(QUESTIONS)]
        if n_images == 2:
            question = "<image> and <image>: " + question
        prompts.append(engine.build_prompt(question, n_images))
        ims.append([Image.new("RGB", (30 + 7 * k + j, 30), (37 * k % 255, 90 + j, 200)) for j in range(n_images)])
    return prompts, ims


def assert_greedy_matches_alone(engine, prompts, ims, params, replies):
    """Each reply is the one-at-a-time greedy reply, or departs from it only at a near tie of the top two logits."""
    for prompt, images, reply in zip(prompts, ims, replies):
        alone, margin = greedy_divergence(engine, prompt, images, params, reply)
        assert margin is None or margin <= GREEDY_TIE_TOLERANCE, (reply, alone, margin)


@pytest.mark.parametrize("batch", EXACTNESS_BATCHES)
def test_batched_generate_and_decoder_equal_single(engine, threads, batch):
    """Batched `generate` and the step-wise decoder against one-at-a-time, with 1 and 2 threads and batch shapes that
    change the kernels' blocking: the prompt logits agree within the stated tolerance, and greedy replies are the
    one-at-a-time replies (a departure would have to be a near tie, which `greedy_divergence` measures)."""
    params = GenerationParams(temperature=0, max_new_tokens=6)
    prompts, ims = mixed_requests(engine, batch)
    requests = [engine.encode(p, i, 0) for p, i in zip(prompts, ims)]

    def last_logits(reqs):
        ids, mask, pixel, sizes = engine._batch_tensors(reqs)
        with torch.inference_mode():
            _, _, mask, _, embeds, _ = engine.model.prepare_inputs_labels_for_multimodal(
                ids, None, mask, None, None, pixel, sizes, padding_side="left"
            )
            if embeds is None:
                embeds = engine.model.get_input_embeddings()(ids)
            mask = mask.long()
            positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)
            return engine.model(inputs_embeds=embeds, attention_mask=mask, position_ids=positions).logits[:, -1]

    together = last_logits(requests)
    alone = torch.cat([last_logits([r]) for r in requests])
    assert float((together - alone).abs().max()) <= GREEDY_TIE_TOLERANCE
    assert_greedy_matches_alone(engine, prompts, ims, params, engine.generate(prompts, ims, params))
    decoder = engine.decoder(params)
    decoder.add([(k, r, params) for k, r in enumerate(requests)])
    finals = {}
    while decoder:
        finals.update({u.key: u.text for u in decoder.step() if u.finished})
    assert_greedy_matches_alone(engine, prompts, ims, params, [finals[k] for k in range(batch)])


def test_greedy_divergence_measures_the_departure(engine):
    params = GenerationParams(temperature=0, max_new_tokens=6)
    prompt, ims = engine.build_prompt("What is it?", 1), images(1)
    alone = engine.generate([prompt], [ims], params)[0]
    assert greedy_divergence(engine, prompt, ims, params, alone) == (alone, None)
    text, margin = greedy_divergence(engine, prompt, ims, params, "\u00a7" + alone)  # departs at the first token
    assert text == alone and margin is not None and margin >= 0


def test_stream_ends_with_generate_output(engine):
    params = GenerationParams(temperature=0, max_new_tokens=10)
    prompt = engine.build_prompt("Describe.", 1)
    pieces = list(engine.stream(prompt, images(1), params))
    assert len(pieces) >= 2 and all(b.startswith(a) for a, b in zip(pieces[:-2], pieces[1:-1]))
    assert pieces[-1].strip() == engine.generate([prompt], [images(1)], params)[0]


def test_stop_strings_cut_the_reply(engine):
    params = GenerationParams(temperature=0, max_new_tokens=12)
    prompt = engine.build_prompt("Describe.", 1)
    full = engine.generate([prompt], [images(1)], params)[0]
    assert len(full) > 3
    stop = full[2:4]
    cut = engine.generate([prompt], [images(1)], GenerationParams(temperature=0, max_new_tokens=12, stop=[stop]))[0]
    assert cut == cut_at_stop(full, [stop]).strip() and stop not in cut


def test_request_errors(engine):
    prompt = engine.build_prompt("What?", 1)
    with pytest.raises(RequestError, match=r"1 `<image>` marker\(s\) but 2 image\(s\)"):
        engine.generate([prompt], [images(2)])
    with pytest.raises(PromptTooLongError, match="exceeds the model's context of 2048"):
        engine.encode(engine.build_prompt("word " * 2100, 0), [], 16)
    for bad in (dict(temperature=-1), dict(top_p=0), dict(max_new_tokens=0), dict(num_beams=100)):
        with pytest.raises(RequestError, match=next(iter(bad))):
            GenerationParams(**bad)


def test_sampling_runs(engine):
    out = engine.generate(
        [engine.build_prompt("Hi", 1)], [images(1)], GenerationParams(temperature=0.7, top_p=0.9, max_new_tokens=4)
    )
    assert isinstance(out[0], str)


def test_engine_matches_loader(engine, tiny):
    tok, model, proc, ctx = load_pretrained_model(engine.model.config._name_or_path, None, device="cpu")
    assert ctx == engine.context_len and type(model) is type(engine.model)


def test_kv_cache_is_passed_under_its_current_name(engine):
    """transformers 5.25 deprecates `past_key_values` (gone in 5.40): generation and the step-wise decoder use `cache`;
    a caller written for the original LLaVA may still pass `past_key_values` to `forward`."""
    import warnings

    params = GenerationParams(temperature=0, max_new_tokens=4)
    prompt = engine.build_prompt("What is it?", 1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        expected = engine.generate([prompt], [images(1)], params)[0]
        decoder = engine.decoder(params)
        decoder.add([(0, engine.encode(prompt, images(1), 1), params)])
        while decoder:
            final = [u.text for u in decoder.step() if u.finished] or None
    assert not [w for w in caught if "past_key_values" in str(w.message)]
    assert final == [expected]
    from transformers import DynamicCache

    ids = torch.tensor([engine.tokenizer("hello there").input_ids])
    with torch.inference_mode():
        first = engine.model(input_ids=ids[:, :-1], past_key_values=DynamicCache(), use_cache=True)
        kv = first.cache if getattr(first, "cache", None) is not None else first.past_key_values
        step = engine.model(input_ids=ids[:, -1:], past_key_values=kv, use_cache=True)
        whole = engine.model(input_ids=ids).logits[:, -1]
    assert torch.allclose(step.logits[:, -1], whole, atol=1e-5)
