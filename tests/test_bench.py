"""Performance work: the image-feature cache is exact, the one-at-a-time baseline and the batching worker agree,
the growing KV cache and the mask-free training path change no number, length grouping pads little, and the
benchmark scripts run on tiny configs with their parity checks holding (speed ratios are not asserted here)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading

import pytest
import torch
from PIL import Image

from llava.inference import GenerationParams, LlavaEngine
from llava.model.feature_cache import ImageFeatureCache, tensor_digest
from llava.serve.batching import BatchScheduler, Job, SerialScheduler

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(REPO, "scripts", "bench")
# Batch shapes that change how matrix kernels block their work: exactness must hold for each.
EXACTNESS_BATCHES = (1, 2, 3, 7, 16)
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "WANDB_MODE": "disabled"}


@pytest.fixture(scope="module")
def engine(tiny):
    model = tiny.model("llama", seed=11)
    model.config.conv_template = "llava_v1"
    return LlavaEngine.from_pretrained(tiny.save_full(model), device="cpu")


def picture(shade: int, size=(40, 30)) -> Image.Image:
    return Image.new("RGB", size, (shade % 255, 100, 200))


def pixels(engine, images):
    from llava.mm_utils import process_images

    return process_images(images, engine.image_processor, engine.config)


# ---------------------------------------------------------------------------------------------- image-feature cache


def test_feature_cache_is_exact_and_encodes_each_image_once(engine):
    model = engine.model
    batch = pixels(engine, [picture(10), picture(20), picture(10)])  # the first image repeats
    with torch.inference_mode():
        reference = model.image_features(batch)
    calls = []
    hook = model.get_vision_tower().register_forward_hook(lambda m, args, out: calls.append(args[0].shape[0]))
    model.image_feature_cache = cache = ImageFeatureCache(max_bytes=1 << 20)
    try:
        with torch.inference_mode():
            first = model.image_features(batch)
            again = model.image_features(batch)
    finally:
        hook.remove()
        model.image_feature_cache = None
    assert calls == [1, 1]  # two distinct images, each encoded once, on its own
    for got in (first, again):
        assert all(torch.equal(a, b) for a, b in zip(got, reference))
    assert cache.stats()["misses"] == 2 and cache.stats()["hits"] == 2 and len(cache) == 2


@pytest.mark.parametrize("batch", EXACTNESS_BATCHES)
def test_image_features_do_not_depend_on_the_batch(engine, threads, batch):
    """Each image's features, cached or not, are bit for bit those it gets alone, whatever it is batched with and
    however many threads run (matrix kernels block by batch shape, and on some CPUs the rounding follows)."""
    model = engine.model
    images = [picture(7 * k, size=(40 + k, 30)) for k in range(batch)]
    with torch.inference_mode():
        alone = [model.image_features(pixels(engine, [im]))[0] for im in images]
        batched = model.image_features(pixels(engine, images))
        model.image_feature_cache = ImageFeatureCache(max_bytes=64 << 20)
        try:
            half = model.image_features(pixels(engine, images[::2]))  # some cached, in another batch shape
            mixed = model.image_features(pixels(engine, images))
        finally:
            model.image_feature_cache = None
    assert all(torch.equal(a, b) for a, b in zip(batched, alone))
    assert all(torch.equal(a, b) for a, b in zip(half, alone[::2]))
    assert all(torch.equal(a, b) for a, b in zip(mixed, alone))


def test_feature_cache_bounds_bypass_and_invalidation(engine):
    model = engine.model
    images = pixels(engine, [picture(i * 40) for i in range(4)])
    with torch.inference_mode():
        one = model.image_features(images[:1])[0]
    size = one.numel() * one.element_size()
    model.image_feature_cache = cache = ImageFeatureCache(max_bytes=2 * size)
    try:
        with torch.inference_mode():
            model.image_features(images)
        assert len(cache) == 2 and cache.nbytes <= 2 * size  # least recently used entries evicted
        model.image_features(images[:1])  # autograd on (training): the cache is not used at all
        assert cache.stats()["hits"] == 0 and len(cache) == 2
        projector = model.get_model().mm_projector
        saved = {k: v.clone() for k, v in projector.state_dict().items()}
        with torch.no_grad():
            next(projector.parameters()).mul_(1.5)  # new weights: cached features must not be served
            fresh = model.image_features(images[3:])[0]
            model.image_feature_cache = None
            expected = model.image_features(images[3:])[0]
        assert torch.equal(fresh, expected) and cache.stats()["hits"] == 0
        projector.load_state_dict(saved)
    finally:
        model.image_feature_cache = None
    with pytest.raises(ValueError, match="max_bytes"):
        ImageFeatureCache(max_bytes=-1)
    assert tensor_digest(images[0]) == tensor_digest(images[0].clone()) != tensor_digest(images[1])


def test_generation_with_cache_equals_without(engine):
    params = GenerationParams(temperature=0, max_new_tokens=6)
    prompts = [engine.build_prompt(q, 1) for q in ("What is it?", "Describe it.", "Colour?")]
    images = [[picture(30)], [picture(60)], [picture(30)]]
    plain = engine.generate(prompts, images, params)
    cache = engine.enable_image_feature_cache(1 << 20)
    try:
        assert engine.generate(prompts, images, params) == plain
        assert engine.generate(prompts[:1], images[:1], params) == plain[:1]
        assert cache.stats()["misses"] == 2 and cache.stats()["hits"] == 1  # the repeat within a batch: once
    finally:
        engine.enable_image_feature_cache(0)
    assert engine.model.image_feature_cache is None


# ------------------------------------------------------------------------------------------- serving: the baseline


def run_jobs(scheduler, engine, cases, params):
    done, finals, pieces = threading.Event(), {}, {}

    def emit_for(i):
        def emit(event):
            pieces.setdefault(i, []).append(event["text"])
            if event.get("finished"):
                finals[i] = event
                if len(finals) == len(cases):
                    done.set()

        return emit

    scheduler.start()
    try:
        for i, (prompt, images) in enumerate(cases):
            scheduler.submit(Job(engine.encode(prompt, images, 1), params, emit_for(i)))
        assert done.wait(120)
    finally:
        scheduler.stop()
    return finals, pieces


def test_serial_baseline_matches_batching_worker(engine):
    params = GenerationParams(temperature=0, max_new_tokens=10)
    cases = [
        (engine.build_prompt("What is it?", 1), [picture(10)]),
        (engine.build_prompt("Say something, please.", 0), []),
        (engine.build_prompt("<image> and <image>?", 2), [picture(40), picture(80, (24, 24))]),
        (engine.build_prompt("Describe the colours.", 1), [picture(10)]),
    ]
    serial, serial_pieces = run_jobs(SerialScheduler(engine, concurrency=1), engine, cases, params)
    batched, _ = run_jobs(BatchScheduler(engine, max_batch_size=4), engine, cases, params)
    alone = [engine.generate([p], [ims], params)[0] for p, ims in cases]
    for i in range(len(cases)):
        assert serial[i]["error_code"] == 0 and serial[i]["text"] == batched[i]["text"]
        assert serial[i]["text"].strip() == alone[i]
        assert serial[i]["usage"] == batched[i]["usage"]
        assert serial[i]["finish_reason"] == batched[i]["finish_reason"]
        texts = serial_pieces[i]
        assert all(b.startswith(a) for a, b in zip(texts, texts[1:]))  # streamed text only ever grows


def test_stream_stops_generating_when_the_consumer_leaves(engine):
    prompt = engine.build_prompt("Tell me a long story.", 0)
    params = GenerationParams(temperature=0, max_new_tokens=400)
    usage: dict = {}
    before = threading.active_count()
    stream = engine.stream_encoded(engine.encode(prompt, [], 1), params, usage=usage)
    next(stream)
    assert threading.active_count() == before + 1  # `generate` runs in a thread...
    stream.close()
    assert threading.active_count() == before  # ...which closing the stream stops and joins
    assert usage == {}  # no final accounting for an abandoned stream


# --------------------------------------------------------------------------------------------- numerics unchanged


def test_growing_kv_cache_matches_concatenation():
    from transformers.cache_utils import DynamicLayer

    from llava.inference import _GrowingLayer, _set_cache_tensors

    torch.manual_seed(0)
    grow, plain = _GrowingLayer(), DynamicLayer()
    chunks = [torch.randn(3, 2, n, 4) for n in (5, 1, 1, 70, 1)]
    for i, chunk in enumerate(chunks):
        if i == 3:  # keys replaced from outside (rows selected): the layer must notice and copy
            for layer in (grow, plain):
                _set_cache_tensors(layer, layer.keys[[0, 2]], layer.values[[0, 2]])
        if i >= 3:
            chunk = chunk[:2]
        k1, v1 = grow.update(chunk, chunk + 1)
        k2, v2 = plain.update(chunk, chunk + 1)
        assert torch.equal(k1, k2) and torch.equal(v1, v2)


def test_training_loss_and_gradients_unchanged_by_the_fast_path(tiny):
    """Training batches skip the padding mask and compute logits only where a label is predicted: same loss and
    gradients as the plain masked forward over every position."""
    from transformers import LlamaForCausalLM

    from llava.constants import IGNORE_INDEX, IMAGE_TOKEN_INDEX

    model = tiny.model("llama", seed=3)
    model.train()
    ids = torch.randint(5, 300, (3, 12))
    ids[0, 2] = ids[2, 4] = IMAGE_TOKEN_INDEX
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    mask[2, 9:] = 0
    labels = ids.masked_fill(mask == 0, IGNORE_INDEX).masked_fill(ids == IMAGE_TOKEN_INDEX, IGNORE_INDEX)
    labels[:, :3] = IGNORE_INDEX
    images = torch.randn(2, 3, 32, 32)

    def grads():
        out = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        model.zero_grad(set_to_none=True)
        return out

    fast = model(input_ids=ids, attention_mask=mask, labels=labels, images=images).loss
    fast.backward()
    fast_grads = grads()
    _, _, full_mask, _, embeds, new_labels = model.prepare_inputs_labels_for_multimodal(
        ids, None, mask, None, labels, images
    )
    reference = LlamaForCausalLM.forward(model, inputs_embeds=embeds, attention_mask=full_mask, labels=new_labels)
    reference.loss.backward()
    assert not bool(full_mask.all()) and reference.logits.shape[1] == full_mask.shape[1]  # padded, all positions
    torch.testing.assert_close(fast, reference.loss, rtol=1e-5, atol=1e-6)
    ref_grads = grads()
    assert fast_grads.keys() == ref_grads.keys() and len(fast_grads) > 10
    for name, grad in fast_grads.items():
        torch.testing.assert_close(grad, ref_grads[name], rtol=1e-4, atol=1e-6, msg=name)


def test_length_grouping_pads_little():
    from llava.train.llava_trainer import length_grouped_indices

    g = torch.Generator().manual_seed(0)
    lengths = [int(x) for x in torch.randint(20, 400, (800,), generator=g)]

    def padding(order, batch=8):
        batches = [order[i : i + batch] for i in range(0, len(order), batch)]
        total = sum(max(lengths[i] for i in b) * len(b) for b in batches)
        return 1 - sum(lengths) / total

    order = length_grouped_indices(lengths, 8, 1, torch.Generator().manual_seed(1))
    assert sorted(order) == list(range(len(lengths)))
    assert padding(order) < 0.05 < padding(torch.randperm(800, generator=g).tolist())
    assert max(lengths) in [lengths[i] for i in order[:8]]  # the longest batch first: out of memory at step 1


# ---------------------------------------------------------------------------------------------- the scripts


def run_script(name: str, *args: str, timeout: int = 1800) -> str:
    proc = subprocess.run(
        [sys.executable, os.path.join(BENCH, name), *args],
        capture_output=True,
        text=True,
        env={**ENV, "OMP_NUM_THREADS": "1"},
        timeout=timeout,
        cwd=REPO,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


@pytest.mark.slow  # starts a controller, two workers and the API server
def test_serve_benchmark_runs_and_outputs_match(tmp_path):
    out = tmp_path / "serve.json"
    text = run_script(
        "serve_throughput.py",
        *("--preset", "tiny", "--concurrency", "3", "--rounds", "1", "--max-new-tokens", "8", "--warmup", "1"),
        *("--min-requests", "3", "--single-stream-rounds", "1", "--api", "worker,openai"),
        *("--work-dir", str(tmp_path), "--json-out", str(out)),
    )
    report = json.loads(out.read_text())
    assert report["mismatches"] == 0 and report["errors"] == 0 and report["single_stream"]["identical"]
    assert report["single_stream"]["batch_decoder_bandwidth_fraction"] > 0 and "memory-bandwidth ceiling" in text
    assert {(s["api"], s["concurrency"]) for s in report["summary"]} == {("worker", 3), ("openai", 3)}
    # Replies that depart at a near tie of the top two logits (batching's rounding, on some CPUs) are counted apart.
    assert "identical greedy outputs (ours vs baseline, every request):" in text and "(0 differ," in text
    assert report["near_ties"] >= 0


@pytest.mark.slow  # our stack plus `transformers serve` on the exported weights
def test_serve_benchmark_drives_transformers_serve_beside_ours(tmp_path):
    out = tmp_path / "serve.json"
    text = run_script(
        "serve_throughput.py",
        *("--preset", "tiny", "--concurrency", "1,2", "--rounds", "1", "--max-new-tokens", "6", "--warmup", "1"),
        *("--min-requests", "3", "--single-stream-rounds", "0", "--api", "openai", "--peer", "transformers-serve"),
        *("--text-only", "0.5", "--seed", "4", "--work-dir", str(tmp_path), "--json-out", str(out)),
    )
    report = json.loads(out.read_text())
    assert report["mismatches"] == 0 and report["errors"] == 0
    sides = [(s["concurrency"], "ours" in s, "peer" in s) for s in report["summary"]]
    assert sides == [(1, True, True), (2, True, True)]
    assert "## Ours (through our OpenAI API server) vs transformers-serve" in text
    # Text-only prompts are token-identical in both stacks: same greedy replies (near ties apart); image prompts are
    # not (one token fewer after `<image>` in llava-hf), so those are counted, not judged.
    assert "transformers-serve vs the one-at-a-time reply, text-only requests): True (0 differ, 0 more" in text
    assert "; 4 replies)" in text and report["peer_image_replies_differing"][1] == 2


@pytest.mark.slow  # three training processes
def test_train_benchmark_runs_with_equal_start_loss(tmp_path):
    out = tmp_path / "train.json"
    text = run_script(
        "train_throughput.py",
        *("--preset", "tiny", "--train-images", "24", "--batch-size", "4", "--steps", "3", "--warmup-steps", "1"),
        *("--rounds", "1", "--work-dir", str(tmp_path), "--json-out", str(out), "--stacks", "ours,baseline"),
        *("--mfu", "--mfu-shape", "tiny", "--mfu-batch", "2", "--mfu-text-len", "40", "--peak-tflops", "1"),
    )
    report = json.loads(out.read_text())
    assert report["start_loss_diff"] <= 1e-3 and "same loss at the shared start" in text
    for run in report["runs"]:
        assert run["samples"] == 2 * 4 and 0 <= run["padding"] < 1 and run["samples_per_s"] > 0
    assert report["mfu"]["mfu"] > 0 and report["mfu"]["model_tflops_per_step"] > 0


@pytest.mark.slow  # four training processes
def test_train_benchmark_peers_packing_bf16_and_roofline(tmp_path):
    """The TRL recipe starts from our loss, packing trains on (almost) no padding, bf16 runs on a CPU that has it,
    and every stack reports FLOP/s as a fraction of the measured GEMM peak of its dtype."""
    from llava.train.args import cpu_bf16_instructions

    stacks = ["ours", "ours_packed", "trl"] + (["ours_bf16"] if cpu_bf16_instructions() else [])
    out = tmp_path / "train.json"
    text = run_script(
        "train_throughput.py",
        *("--preset", "tiny", "--train-images", "24", "--batch-size", "4", "--steps", "3", "--warmup-steps", "1"),
        *("--rounds", "1", "--work-dir", str(tmp_path), "--json-out", str(out), "--stacks", ",".join(stacks)),
        *("--packed-rows", "1"),
    )
    report = json.loads(out.read_text())
    assert report["start_loss_diff"] <= 1e-3 and "same loss at the shared start" in text
    assert [run["mode"] for run in report["runs"]] == stacks
    runs = {run["mode"]: run for run in report["runs"]}
    assert runs["ours_packed"]["padding"] < runs["ours"]["padding"] and runs["ours_packed"]["samples"] > 2
    assert runs["trl"]["samples"] == 2 * 4 and runs["trl"]["start_loss_diff"] <= 1e-3
    roof = report["roofline"]
    assert roof["gemm_flops"] > 0 and roof["read_bytes_per_s"] > 0
    for mode in stacks:
        assert 0 < report["medians"][mode]["mfu"] < 1, mode
    assert "ours / trl" in report["ratios"] and "ours_packed / ours" in report["ratios"]
    if "ours_bf16" in runs:
        assert runs["ours_bf16"]["dtype"] == "bfloat16" and runs["ours"]["dtype"] == "float32"


def test_roofline_measures_the_machine():
    sys.path.insert(0, BENCH)
    try:
        import bench_common as bc
    finally:
        sys.path.remove(BENCH)
    flops = bc.gemm_peak_flops("float32", threads=1, size=256, seconds=0.05)
    bandwidth = bc.memory_bandwidth(threads=1, mib=64, seconds=0.05)
    assert 1e8 < flops < 1e14  # between a slow phone and a large GPU: a rate, not a time
    assert 1e8 < bandwidth["read"] < 1e13 and 1e8 < bandwidth["copy"] < 1e13


def test_packed_sample_lengths_leave_out_padding():
    sys.path.insert(0, BENCH)
    try:
        import train_throughput
    finally:
        sys.path.remove(BENCH)
    positions = torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2, 3], [0, 1, 2, 3, 4, 5, 0, 1, 2]])
    labels = torch.full_like(positions, -100)
    labels[0, [2, 4]] = 5  # row 0: samples of 3 and 2 positions, then padding (no label)
    labels[1, [1, 8]] = 5  # row 1: samples of 6 and 3
    assert train_throughput.packed_sample_lengths(positions, labels) == [3, 2, 6, 3]


def test_bf16_on_a_cpu_without_it_names_the_flag(monkeypatch, tmp_path):
    """--bf16 True trains on CPU with or without bf16 instructions (the seeds' scripts all pass it); without them the
    change note names the flag and the fp32 alternative. Both cases run here: the probe of /proc/cpuinfo is replaced
    by each answer in turn."""
    import llava.train.args as train_args

    argv = ["--output_dir", str(tmp_path), "--bf16", "True", "--report_to", "none"]
    for instructions in ("avx512_bf16", None):
        monkeypatch.setattr(train_args, "cpu_bf16_instructions", lambda found=instructions: found)
        _, _, training_args = train_args.parse_args(argv)
        assert training_args.bf16 and training_args.use_cpu
        emulated = [n for n in training_args.hardware_notes if "no bf16 instructions" in n]
        if instructions:
            assert emulated == []
        else:
            assert len(emulated) == 1 and "--bf16 True" in emulated[0] and "--bf16 False" in emulated[0]


def test_mfu_flops_of_the_7b_shape():
    sys.path.insert(0, BENCH)
    try:
        import train_throughput
    finally:
        sys.path.remove(BENCH)
    flops = train_throughput.mfu_flops(train_throughput.SHAPE_7B, batch=1, text_len=1472)
    assert flops["seq_len"] == 1472 + 576
    # 6 x ~6.6e9 parameters per token dominates; attention and the frozen tower add a few percent.
    per_token = flops["total"] / flops["tokens"]
    assert 6 * 6.4e9 < per_token < 6 * 7.6e9


def test_thread_policy_benchmark_runs_each_policy_idle_and_busy(tmp_path):
    """scripts/bench/threads.py: each policy in a fresh interpreter, without and then beside its own competitor
    (started and stopped by PID), with the thread count the policy chose."""
    out = tmp_path / "threads.json"
    policies = "cores-1,gomp-spin10k,llava"
    run = subprocess.run(
        [sys.executable, os.path.join(BENCH, "threads.py"), "--steps", "1", "--policies", policies, "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    report = json.loads(out.read_text())
    assert list(report["results"]) == policies.split(",")
    cores = os.cpu_count()
    assert report["results"]["cores-1"]["threads"] == max(1, cores - 1)
    assert report["results"]["llava"]["threads"] == cores  # llava.runtime: every core, waiting passively
    for name, r in report["results"].items():
        assert r["idle_s"] > 0 and r["busy_s"] > 0, name
        assert f"{name} " in run.stdout
    bad = subprocess.run(
        [sys.executable, os.path.join(BENCH, "threads.py"), "--policies", "spin-forever"],
        capture_output=True,
        text=True,
    )
    assert bad.returncode != 0 and "unknown policies" in bad.stderr
