"""The shared generation path: batched == one at a time under greedy, streaming, request validation."""

from __future__ import annotations

import pytest
from PIL import Image

from llava.inference import GenerationParams, LlavaEngine, PromptTooLongError, RequestError, cut_at_stop
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
