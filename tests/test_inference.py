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
    """Sampling with a fixed seed repeats itself (through `generate` and the step-wise decoder), and differs from
    greedy decoding for some seed: the temperature and top_p reach the sampler."""
    prompt, ims = engine.build_prompt("Hi", 1), images(1)
    params = GenerationParams(temperature=0.7, top_p=0.9, max_new_tokens=8)
    greedy = engine.generate([prompt], [ims], GenerationParams(temperature=0, max_new_tokens=8))[0]

    def sampled(seed):
        torch.manual_seed(seed)
        return engine.generate([prompt], [ims], params)[0]

    def decoded(seed):
        torch.manual_seed(seed)
        decoder = engine.decoder(params)
        decoder.add([(0, engine.encode(prompt, ims, 1), params)])
        finals = []
        while decoder:
            finals += [u for u in decoder.step() if u.finished]
        return finals[0].text.strip(), finals[0].completion_tokens

    runs = [sampled(seed) for seed in range(4)]
    assert all(isinstance(t, str) for t in runs)
    assert [sampled(seed) for seed in range(4)] == runs
    assert any(text != greedy for text in runs), (greedy, runs)
    steps = [decoded(seed) for seed in range(4)]
    assert [decoded(seed) for seed in range(4)] == steps
    assert any(text != greedy for text, _ in steps), (greedy, steps)


def test_engine_matches_loader(engine, tiny):
    """The engine's greedy reply is what the original recipe gives: `load_pretrained_model`, `tokenizer_image_token`,
    `process_images`, `model.generate`, decode."""
    from llava.mm_utils import process_images, tokenizer_image_token

    tok, model, proc, ctx = load_pretrained_model(engine.model.config._name_or_path, None, device="cpu")
    assert ctx == engine.context_len and type(model) is type(engine.model)
    for question, n in (("What is in the picture?", 1), ("Say something without an image, please.", 0)):
        prompt, ims = engine.build_prompt(question, n), images(n)
        ids = torch.tensor([tokenizer_image_token(prompt, tok)])
        pixel = process_images(ims, proc, model.config) if ims else None
        with torch.inference_mode():
            out = model.generate(
                ids,
                images=pixel,
                image_sizes=[im.size for im in ims] or None,
                do_sample=False,
                num_beams=1,
                max_new_tokens=10,
                pad_token_id=tok.pad_token_id,
            )
        expected = tok.decode(out[0], skip_special_tokens=True).strip()
        got = engine.generate([prompt], [ims], GenerationParams(temperature=0, max_new_tokens=10))[0]
        assert got == expected and len(got) > 0


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


# ---------------------------------------------------------------------------------------------------------------------
# The incremental detokenizer (llava.inference.text_stream)
# ---------------------------------------------------------------------------------------------------------------------

WIDE_TEXT = "é € 😀 中文 ñ"  # two-, three- and four-byte characters: byte-fallback pieces in the tiny tokenizer


def random_replies(tokenizer, n: int, seed: int = 0) -> list[list[int]]:
    """`n` id sequences mixing ordinary pieces, byte-fallback runs of multi-byte characters (whole, cut short, or
    with a special token inside), stray bytes, and special tokens."""
    import random

    rng = random.Random(seed)
    vocab = tokenizer.get_vocab()
    bytes_ = {int(t[3:5], 16): i for t, i in vocab.items() if len(t) == 6 and t.startswith("<0x")}
    specials = sorted(set(tokenizer.all_special_ids))
    ordinary = sorted(set(vocab.values()) - set(bytes_.values()) - set(specials))
    chars = [bytes_[b] for c in WIDE_TEXT for b in c.encode()]
    words = tokenizer("The circle is green. Where is the star?", add_special_tokens=False).input_ids
    out = []
    for _ in range(n):
        ids: list[int] = []
        for _ in range(rng.randint(0, 14)):
            kind = rng.random()
            if kind < 0.3:
                ids.append(rng.choice(ordinary))
            elif kind < 0.45:
                start = rng.randrange(len(words))
                ids += words[start : start + rng.randint(1, 4)]
            elif kind < 0.75:
                c = rng.choice(WIDE_TEXT.replace(" ", ""))
                run = [bytes_[b] for b in c.encode()]
                if rng.random() < 0.2:
                    run = run[: rng.randint(1, len(run))]  # a character cut short
                if rng.random() < 0.2:
                    run.insert(rng.randint(0, len(run)), rng.choice(specials))  # a special token inside the run
                ids += run
            elif kind < 0.85:
                ids.append(rng.choice(chars + list(bytes_.values())))  # a stray byte
            else:
                ids.append(rng.choice(specials))
        out.append(ids)
    return out


def old_stable_text(tokenizer, held, ids, stops):
    """What the decoder showed before the incremental detokenizer: the whole reply decoded again, trailing held
    tokens left out, `stable_prefix` of that."""
    from llava.inference import stable_prefix

    n = len(ids)
    while n and ids[n - 1] in held:
        n -= 1
    return stable_prefix(tokenizer.decode(ids[:n], skip_special_tokens=True), stops)


@pytest.mark.parametrize("whole", [False, True], ids=["window", "whole"])
@pytest.mark.parametrize("stops", [(), ("is",), ("\n", "ar?", "€")], ids=["nostop", "stop", "stops"])
def test_text_stream_equals_decoding_everything(tiny, stops, whole):
    """Token by token, the incremental detokenizer's reply is exactly `tokenizer.decode` of all the ids so far, cut at
    the first stop string; it stops at the first token whose text completes a stop string; its stable text only
    grows and is what decoding everything again would show."""
    from llava.inference import Detokenizer

    tokenizer = tiny.tokenizer
    detokenizer = Detokenizer(tokenizer)
    detokenizer.whole = whole
    decode = lambda ids: tokenizer.decode(ids, skip_special_tokens=True)  # noqa: E731
    replies = random_replies(tokenizer, 250, seed=len(stops) + whole)
    probe = tokenizer.convert_tokens_to_ids([f"<0x{b:02X}>" for c in "中😀" for b in c.encode()])
    replies.append(tokenizer("A", add_special_tokens=False).input_ids + probe + [2])  # split across steps, then EOS
    assert any(i in detokenizer.byte_token_ids for r in replies for i in r)
    n_stopped = 0
    for ids in replies:
        stream = detokenizer.stream(stops)
        shown = ""
        for k, token in enumerate(ids, 1):
            stream.push(token)
            if stream.stopped:
                break
            assert cut_at_stop(decode(ids[:k]), stops) == decode(ids[:k]), ids[:k]  # no stop text yet
            assert stream.stable_text.startswith(shown)
            shown = stream.stable_text
            assert shown == old_stable_text(tokenizer, detokenizer.held_ids, ids[:k], stops), ids[:k]
        n_stopped += stream.stopped
        reply = stream.finish()
        assert reply == cut_at_stop(decode(stream.ids), stops), stream.ids
        assert reply.startswith(shown) and stream.ids == ids[: len(stream.ids)]
    if stops:
        assert n_stopped > 0


# ---------------------------------------------------------------------------------------------------------------------
# Generation parameters (llava.inference.params): the one check
# ---------------------------------------------------------------------------------------------------------------------


def test_generation_params_from_request():
    from llava.inference import ORIGINAL_WORKER_DEFAULTS, read_param

    params = GenerationParams.from_request({"prompt": "x"}, defaults=ORIGINAL_WORKER_DEFAULTS)
    assert (params.temperature, params.top_p, params.max_new_tokens, params.stop) == (1.0, 1.0, 256, [])
    body = {"temperature": 2, "top_p": 0.5, "max_new_tokens": 5000, "stop": "###", "num_beams": 2}
    params = GenerationParams.from_request(body, max_new_tokens_limit=1024)
    assert (params.temperature, params.top_p, params.max_new_tokens, params.stop, params.num_beams) == (
        2.0, 0.5, 1024, ["###"], 2
    )  # fmt: skip
    assert isinstance(params.temperature, float) and isinstance(params.max_new_tokens, int)
    params = GenerationParams.from_request({"max_tokens": 7, "stop": ["a", ""]}, keys={"max_new_tokens": "max_tokens"})
    assert params.max_new_tokens == 7 and params.stop == ["a"]
    assert read_param({"temperature": None}, "temperature", 1.0) == 1.0
    assert read_param({}, "max_new_tokens", key="max_tokens") is None
    assert GenerationParams(stop=["x"]).stop_strings("</s>") == ["x", "</s>"]
    assert GenerationParams(stop=["</s>"]).stop_strings("</s>") == ["</s>"]
    assert GenerationParams().stop_strings("\n") == []


@pytest.mark.parametrize(
    "body, field, message",
    [
        ({"temperature": 2.5}, "temperature", "`temperature`=2.5 is out of range (allowed: 0..2)"),
        ({"temperature": -1}, "temperature", "`temperature`=-1"),
        ({"temperature": "hot"}, "temperature", "`temperature` must be a number"),
        ({"temperature": True}, "temperature", "`temperature` must be a number"),
        ({"temperature": float("nan")}, "temperature", "`temperature` must be a finite number"),
        ({"top_p": 0}, "top_p", "`top_p`=0"),
        ({"top_p": 1.5}, "top_p", "allowed: (0, 1]"),
        ({"max_new_tokens": 2.5}, "max_new_tokens", "`max_new_tokens` must be a whole number"),
        ({"max_new_tokens": -5}, "max_new_tokens", "`max_new_tokens`=-5"),
        ({"max_tokens": 0}, "max_tokens", "`max_tokens`=0"),
        ({"num_beams": 17}, "num_beams", "`num_beams`=17"),
        ({"stop": [1]}, "stop", "`stop` must be a string or a list of strings"),
        ({"stop": ["s"] * 17}, "stop", "up to 16 strings"),
        ({"stop": "x" * 300}, "stop", "at most 256 characters"),
    ],
)
def test_generation_params_errors_name_the_field(body, field, message):
    with pytest.raises(RequestError) as info:
        GenerationParams.from_request(body, keys={"max_new_tokens": "max_tokens"} if "max_tokens" in body else None)
    assert message in str(info.value) and info.value.field == field


def test_generation_params_one_range_everywhere():
    """The constructor runs the same check as request parsing (CLI, eval and demo build params directly)."""
    assert GenerationParams(temperature=2).temperature == 2.0
    with pytest.raises(RequestError, match=r"`temperature`=3 is out of range \(allowed: 0..2\)") as info:
        GenerationParams(temperature=3)
    assert info.value.field == "temperature"
    with pytest.raises(RequestError, match="`top_p`=0 .*; `max_new_tokens`=0"):
        GenerationParams(top_p=0, max_new_tokens=0)
