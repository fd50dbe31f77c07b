"""Step-wise batched decoding and the worker's scheduler: every request gets exactly its one-at-a-time tokens."""

from __future__ import annotations

import threading
import time

import pytest
from PIL import Image

from llava.inference import (
    GREEDY_TIE_TOLERANCE,
    GenerationParams,
    LlavaEngine,
    RequestError,
    greedy_divergence,
    stable_prefix,
)
from llava.serve.batching import BatchScheduler, Job, QueueFull

QUESTIONS = [
    ("What is it?", 1, (40, 30)),
    ("Say something without an image, please.", 0, None),
    ("<image> and <image>: which is brighter?", 2, (24, 24)),
    ("A wide picture.", 1, (120, 20)),
    ("Describe the colours in detail, please.", 1, (30, 50)),
    ("hi", 0, None),
]


def make_images(n, size, shade=0):
    return [Image.new("RGB", size, ((40 * i + 37 * shade) % 255, 100, 200)) for i in range(n)]


def cases(engine):
    out = []
    for k, (question, n, size) in enumerate(QUESTIONS):
        out.append((engine.build_prompt(question, n), make_images(n, size, k) if n else []))
    return out


@pytest.fixture(scope="module", params=["llama", "mistral", "qwen2"])
def engine(request, tiny):
    model = tiny.model(request.param, seed=21)
    model.config.conv_template = "llava_v1"
    return LlavaEngine.from_pretrained(tiny.save_full(model), device="cpu")


@pytest.fixture(scope="module")
def llama_engine(tiny):
    model = tiny.model("llama", seed=11)
    model.config.conv_template = "llava_v1"
    return LlavaEngine.from_pretrained(tiny.save_full(model), device="cpu")


def pick_stop(texts):
    """A letter or two from inside one of `texts` (never a half-decoded character), and that text's index."""
    for width in (2, 1):
        for index in sorted(range(len(texts)), key=lambda i: -len(texts[i])):
            text = texts[index]
            for i in range(1, len(text) - width + 1):
                piece = text[i : i + width]
                if piece.isascii() and piece.isalpha() and piece not in text[:i]:
                    return piece, index
    pytest.skip(f"No plain letter inside the answers {texts!r}.")


def run_decoder(engine, items, join_every=2, per_join=2, remove=()):
    """Decode `(key, prompt, images, params)` items, letting `per_join` join every `join_every` steps."""
    params = items[0][3]
    decoder = engine.decoder(params)
    pending, finals, pieces, step = list(items), {}, {}, 0
    while pending or decoder:
        if pending and step % join_every == 0 and decoder.can_join:
            batch, pending = pending[:per_join], pending[per_join:]
            decoder.add([(key, engine.encode(p, ims, 1), prm) for key, p, ims, prm in batch])
        for update in decoder.step():
            if update.changed:
                pieces.setdefault(update.key, []).append(update.text)
            if update.finished:
                finals[update.key] = update
        if step == 3 and remove:
            decoder.remove(remove)
        step += 1
    return finals, pieces


def assert_matches_alone(engine, items, finals):
    """Each greedy reply is the one-at-a-time reply, or departs from it only at a near tie of the top two logits
    (batching changes matrix shapes; see docs/Performance.md, Exactness)."""
    for key, prompt, ims, params in items:
        if key in finals:
            _, margin = greedy_divergence(engine, prompt, ims, params, finals[key].text)
            assert margin is None or margin <= GREEDY_TIE_TOLERANCE, (key, finals[key].text, margin)


def test_decoder_equals_generate_alone(engine, threads):
    """Greedy: rows that join mid-batch, with their own budgets and stop strings, get the tokens `generate` gives
    each alone."""
    budgets = [6, 11, 3, 9, 14, 7]
    items = []
    for k, ((prompt, ims), budget) in enumerate(zip(cases(engine), budgets)):
        items.append((k, prompt, ims, GenerationParams(temperature=0, max_new_tokens=budget)))
    alone = [engine.generate([p], [ims], prm)[0] for _, p, ims, prm in items]
    stop, cut = pick_stop(alone)  # a stop string taken from one answer cuts that answer (and maybe others) short
    items = [
        (k, p, ims, GenerationParams(temperature=0, max_new_tokens=prm.max_new_tokens, stop=[stop]))
        for k, p, ims, prm in items
    ]
    alone = [engine.generate([p], [ims], prm)[0] for _, p, ims, prm in items]
    finals, _ = run_decoder(engine, items)
    assert_matches_alone(engine, items, finals)
    assert finals[cut].finish_reason == "stop" and stop not in finals[cut].text
    assert all(finals[k].completion_tokens <= budgets[k] for k in range(len(items)))


def test_decoder_streams_growing_text(llama_engine):
    engine = llama_engine
    params = GenerationParams(temperature=0, max_new_tokens=24)
    items = [(k, p, ims, params) for k, (p, ims) in enumerate(cases(engine))]
    finals, pieces = run_decoder(engine, items, join_every=1, per_join=3)
    for k, (_, p, ims, _) in enumerate(items):
        texts = pieces[k]
        assert all(b.startswith(a) for a, b in zip(texts, texts[1:])), texts  # never takes text back
        assert finals[k].text.strip() == engine.generate([p], [ims], params)[0]
    assert sum(len(t) >= 3 for t in pieces.values()) >= 3  # answers arrive in several pieces


def test_decoder_remove_leaves_other_rows_exact(llama_engine):
    engine = llama_engine
    params = GenerationParams(temperature=0, max_new_tokens=10)
    items = [(k, p, ims, params) for k, (p, ims) in enumerate(cases(engine))]
    finals, _ = run_decoder(engine, items, join_every=1, per_join=6, remove=[1, 3])
    assert set(finals) == {0, 2, 4, 5}
    for k in finals:
        _, p, ims, _ = items[k]
        assert finals[k].text.strip() == engine.generate([p], [ims], params)[0]


def test_decoder_sampling_and_key_checks(llama_engine):
    engine = llama_engine
    params = GenerationParams(temperature=0.8, top_p=0.9, max_new_tokens=5)
    decoder = engine.decoder(params)
    (p, ims), (p2, ims2) = cases(engine)[:2]
    decoder.add([("a", engine.encode(p, ims, 1), params), ("b", engine.encode(p2, ims2, 1), params)])
    with pytest.raises(RequestError, match="sampling settings"):
        decoder.add([("c", engine.encode(p, ims, 1), GenerationParams(temperature=0))])
    done = {}
    while decoder:
        done.update({u.key: u for u in decoder.step() if u.finished})
    assert set(done) == {"a", "b"} and all(u.completion_tokens <= 5 for u in done.values())
    with pytest.raises(RequestError, match="beam"):
        engine.decoder(GenerationParams(temperature=0, num_beams=2))


def test_prefix_cache_reuses_image_prefixes_exactly(engine, threads):
    """Asked again about the same image, a row prefills only its question on top of the stored prefix, and greedy
    text stays what `generate` gives alone; other images, other prefixes and text-only prompts are not mixed up."""
    engine.enable_prefix_cache(64 << 20)
    try:
        params = GenerationParams(temperature=0, max_new_tokens=8)
        red, blue = make_images(1, (40, 30), 3), make_images(1, (40, 30), 4)
        two = make_images(2, (24, 24), 5)
        questions = ["What is it?", "Describe the colours, please.", "Is it big?"]
        items = [(f"red{k}", engine.build_prompt(q, 1), red, params) for k, q in enumerate(questions)]
        items += [(f"blue{k}", engine.build_prompt(q, 1), blue, params) for k, q in enumerate(questions[:2])]
        items += [("two0", engine.build_prompt("<image> and <image>: which?", 2), two, params)]
        items += [("two1", engine.build_prompt("<image> and <image>: same?", 2), two, params)]
        items += [("text", engine.build_prompt("No picture here.", 0), [], params)]
        finals, _ = run_decoder(engine, items, join_every=1, per_join=1)
        assert set(finals) == {k for k, *_ in items}
        assert_matches_alone(engine, items, finals)
        stats = engine.prefix_cache.stats()
        reuse = engine.decoder(params)._prefix_reuse
        assert reuse == ("mistral" not in engine.model.config.model_type)  # tiny Mistral: sliding-window layers
        if reuse:
            assert stats["entries"] == 3 and stats["hits"] == 4, stats  # red x2, blue x1, two x1
        else:  # sliding-window cache layers: nothing reused, still exact
            assert stats["hits"] == 0
    finally:
        engine.prefix_cache = None


def test_prefix_cache_is_bounded_and_follows_the_weights(tiny):
    import torch

    from llava.model.prefix_cache import PrefixKVCache, prefix_key

    model = torch.nn.Linear(2, 2)
    cache = PrefixKVCache(model, max_bytes=3 * 40)  # three entries of 2 x 5 float32
    kv = lambda: [(torch.zeros(1, 1, 5, 1), torch.zeros(1, 1, 5, 1))]  # noqa: E731
    for k in range(4):
        cache.put(("p", k), kv())
    assert len(cache) == 3 and cache.get(("p", 0)) is None and cache.get(("p", 3)) is not None
    cache.put(("big",), [(torch.zeros(100), torch.zeros(100))])  # larger than the budget: not kept
    assert cache.get(("big",)) is None and cache.nbytes <= cache.max_bytes
    with torch.no_grad():
        model.weight.add_(1.0)  # new weights: nothing stored for the old ones is served
    assert cache.get(("p", 3)) is None and len(cache) == 0
    image = Image.new("RGB", (4, 4), (1, 2, 3))
    key, n_after = prefix_key([1, 5, -200, 7, 8], [image], -200)
    assert n_after == 2 and key == prefix_key([1, 5, -200, 9], [image.copy()], -200)[0]
    assert key != prefix_key([1, 5, -200, 9], [Image.new("RGB", (4, 4), (1, 2, 4))], -200)[0]
    assert prefix_key([1, 5, 7], [], -200) is None and prefix_key([1, -200], [image], -200) is None
    with pytest.raises(ValueError, match="max_bytes"):
        PrefixKVCache(model, max_bytes=-1)


def test_stable_prefix():
    assert stable_prefix("Hello wor") == "Hello wor"
    assert stable_prefix("Hello \ufffd") == "Hello"
    assert stable_prefix("answer ##", ["###"]) == "answer"
    assert stable_prefix("answer </", ["</s>"]) == "answer"
    assert stable_prefix("a</s>b", ["</s>"]) == "a</s>b"  # a complete stop is cut by the caller, not here


class Collector:
    """Collects a job's events (as the HTTP layer would) and notes when it finished."""

    def __init__(self):
        self.events, self.done = [], threading.Event()

    def __call__(self, event):
        self.events.append(event)
        if event.get("finished"):
            self.done.set()


def test_scheduler_concurrent_requests_equal_alone(llama_engine):
    engine = llama_engine
    scheduler = BatchScheduler(engine, max_batch_size=4, batch_wait_s=0.002).start()
    try:
        base = cases(engine)
        work = []
        for i in range(12):
            prompt, ims = base[i % len(base)]
            params = GenerationParams(temperature=0, max_new_tokens=4 + i % 5)
            work.append((prompt, ims, params, Collector()))

        def submit(item, delay):
            time.sleep(delay)
            prompt, ims, params, collector = item
            scheduler.submit(Job(engine.encode(prompt, ims, 1), params, collector))

        threads = [threading.Thread(target=submit, args=(item, 0.003 * i)) for i, item in enumerate(work)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for *_, collector in work:
            assert collector.done.wait(60)
        for prompt, ims, params, collector in work:
            final = collector.events[-1]
            assert final["error_code"] == 0 and final["finish_reason"] in ("stop", "length")
            assert final["text"].strip() == engine.generate([prompt], [ims], params)[0]
        assert scheduler.max_rows_seen > 1  # requests really shared forward passes
        assert scheduler.batches < len(work)
        assert scheduler.queue_length == 0
    finally:
        scheduler.stop()


def test_scheduler_mixed_settings_cancel_and_queue_limit(llama_engine):
    engine = llama_engine
    (p, ims), (p2, _) = cases(engine)[:2]
    idle = BatchScheduler(engine, max_queue=2)  # not started: nothing leaves the queue
    for _ in range(2):
        idle.submit(Job(engine.encode(p, ims, 1), GenerationParams(), Collector()))
    with pytest.raises(QueueFull, match="queue is full"):
        idle.submit(Job(engine.encode(p, ims, 1), GenerationParams(), Collector()))

    scheduler = BatchScheduler(engine, max_batch_size=3, batch_wait_s=0.01).start()
    try:
        greedy = GenerationParams(temperature=0, max_new_tokens=6)
        sampled = GenerationParams(temperature=0.7, top_p=0.9, max_new_tokens=6)
        beams = GenerationParams(temperature=0, num_beams=2, max_new_tokens=4)
        long = Collector()
        cancelled = Job(engine.encode(p2, [], 1), GenerationParams(temperature=0, max_new_tokens=400), long)
        scheduler.submit(cancelled)
        jobs = [Job(engine.encode(p, ims, 1), prm, Collector()) for prm in (greedy, sampled, greedy, beams, sampled)]
        for job in jobs:
            scheduler.submit(job)
        time.sleep(0.05)
        cancelled.cancelled.set()
        for job in jobs:
            assert job.emit.done.wait(60)
            assert job.emit.events[-1]["error_code"] == 0
        assert jobs[0].emit.events[-1]["text"] == jobs[2].emit.events[-1]["text"]
        deadline = time.monotonic() + 60  # a few seconds when idle; the machine may be busy
        while scheduler.queue_length and time.monotonic() < deadline:
            time.sleep(0.02)
        assert scheduler.queue_length == 0 and not long.done.is_set()
    finally:
        scheduler.stop()
