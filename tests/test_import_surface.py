"""The original LLaVA's import surface (issue 12.23): each alias exercised for real against our own code paths."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import subprocess
import sys
import threading
import types
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

from tests.train_helpers import make_dataset, tiny_flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CONVERSATION = [
    {"from": "human", "value": "What is in the picture?\n<image>"},
    {"from": "gpt", "value": "A red square."},
    {"from": "human", "value": "And its colour?"},
    {"from": "gpt", "value": "It is red."},
]


def run_python(code: str, stdin: str | None = None) -> str:
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, input=stdin, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


# ------------------------------------------------------------------------------------------------ llava / llava.model


def test_import_llava_is_light_and_exports_the_model_classes():
    out = run_python(
        "import sys, json, llava\n"
        "light = not any(m in sys.modules for m in ('torch', 'transformers'))\n"
        "from llava import LlavaLlamaForCausalLM, LlavaMistralForCausalLM, LlavaConfig\n"
        "import llava.model as m\n"
        "print(json.dumps([light, LlavaLlamaForCausalLM is m.LlavaLlamaForCausalLM,\n"
        "    LlavaMistralForCausalLM is m.LlavaMistralForCausalLM, LlavaConfig is m.LlavaConfig,\n"
        "    'LlavaLlamaForCausalLM' in dir(llava)]))\n"
    )
    assert json.loads(out.splitlines()[-1]) == [True, True, True, True, True]


def test_unknown_llava_attribute_raises_attribute_error():
    import llava

    with pytest.raises(AttributeError, match="no attribute 'NoSuchName'"):
        llava.NoSuchName  # noqa: B018


def test_llava_model_exports_the_original_names():
    import llava.model

    # The names the original's llava/model/__init__.py exported.
    for name in ("LlavaLlamaForCausalLM", "LlavaConfig", "LlavaMptForCausalLM", "LlavaMptConfig"):
        assert hasattr(llava.model, name), name
    for name in ("LlavaMistralForCausalLM", "LlavaMistralConfig"):
        assert hasattr(llava.model, name), name


# ----------------------------------------------------------------------------------------------------- llava.utils


def test_build_logger_writes_its_file_once_per_line_and_leaves_stdout_alone(tmp_path, monkeypatch):
    from llava.utils import build_logger

    monkeypatch.setenv("LLAVA_LOG_DIR", str(tmp_path / "logs"))
    stdout, stderr = sys.stdout, sys.stderr
    first = build_logger("llava_test_surface", "surface.log")
    first.info("first line")
    again = build_logger("llava_test_surface", "surface.log")  # as a module imported twice would
    other = build_logger("llava_test_surface_other", "surface.log")
    again.info("second line")
    other.warning("third line")
    assert sys.stdout is stdout and sys.stderr is stderr
    assert first is again and first.level == logging.INFO
    assert len([h for h in first.handlers if isinstance(h, logging.FileHandler)]) == 1
    for h in first.handlers:
        h.flush()
    lines = (tmp_path / "logs" / "surface.log").read_text().splitlines()
    assert [line.split(" | ")[1:] for line in lines] == [
        ["INFO", "llava_test_surface", "first line"],
        ["INFO", "llava_test_surface", "second line"],
        ["WARNING", "llava_test_surface_other", "third line"],
    ]
    for logger in (first, other):
        for h in list(logger.handlers):
            if isinstance(h, logging.FileHandler):
                logger.removeHandler(h)


def test_disable_torch_init_skips_linear_and_layernorm_init():
    out = run_python(
        "import json, torch\n"
        "from llava.utils import disable_torch_init\n"
        "lin, norm = torch.nn.Linear(3, 2), torch.nn.LayerNorm(3)\n"
        "for p in (*lin.parameters(), *norm.parameters()): torch.nn.init.constant_(p, 7.0)\n"
        "lin.reset_parameters(); norm.reset_parameters()\n"
        "before = [bool((lin.weight == 7).all()), bool((norm.weight == 7).all())]\n"
        "for p in (*lin.parameters(), *norm.parameters()): torch.nn.init.constant_(p, 7.0)\n"
        "disable_torch_init()\n"
        "lin.reset_parameters(); norm.reset_parameters()\n"
        "after = [bool((lin.weight == 7).all()), bool((norm.weight == 7).all())]\n"
        "print(json.dumps([before, after]))\n"
    )
    assert json.loads(out.splitlines()[-1]) == [[False, False], [True, True]]


class _Moderation(BaseHTTPRequestHandler):
    """A local server speaking OpenAI's moderation API: flags inputs that contain `forbidden`."""

    seen: list = []

    def do_POST(self):  # noqa: N802 (http.server's name)
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).seen.append((self.path, self.headers["Authorization"], body))
        payload = {"results": [{"flagged": "forbidden" in body["input"]}]} if self.path == "/v1/moderations" else {}
        data = json.dumps(payload).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


def test_violates_moderation_against_a_local_moderation_server(monkeypatch, caplog):
    from llava.utils import violates_moderation

    server = ThreadingHTTPServer(("127.0.0.1", 0), _Moderation)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        monkeypatch.setenv("OPENAI_API_KEY", "sk-local")
        monkeypatch.setenv("OPENAI_BASE_URL", f"http://127.0.0.1:{server.server_port}/v1")
        assert violates_moderation('a "forbidden"\nthing') is True  # quotes and newlines: still valid JSON
        assert violates_moderation("a kind thing") is False
        assert _Moderation.seen[0] == ("/v1/moderations", "Bearer sk-local", {"input": 'a "forbidden"thing'})
        monkeypatch.setenv("OPENAI_BASE_URL", f"http://127.0.0.1:{server.server_port}/elsewhere")
        with caplog.at_level(logging.WARNING, logger="llava.utils"):
            assert violates_moderation("forbidden") is False  # no result: not flagged, and said so
        assert "gave no result" in caplog.text
    finally:
        server.shutdown()
        server.server_close()
    monkeypatch.delenv("OPENAI_API_KEY")
    with pytest.raises(RuntimeError, match="OPENAI_API_KEY"):
        violates_moderation("text")


def test_pretty_print_semaphore_and_messages():
    from llava.utils import moderation_msg, pretty_print_semaphore, server_error_msg

    semaphore = asyncio.Semaphore(2)
    assert pretty_print_semaphore(semaphore) == "Semaphore(value=2, locked=False)"
    assert pretty_print_semaphore(None) == "None"
    assert server_error_msg.startswith("**NETWORK ERROR") and "MODERATION" in moderation_msg


# ----------------------------------------------------------------------------------------------- llava.model.utils


def _v0_checkpoint(root) -> str:
    path = os.path.join(root, "llava-13b-v0")
    os.makedirs(path)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump({"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 8}, f)
    return path


def test_auto_upgrade_rewrites_a_v0_config(tmp_path):
    from llava.model.utils import auto_upgrade

    path = _v0_checkpoint(tmp_path)
    assert auto_upgrade(path, confirm=True) is True
    config = json.load(open(os.path.join(path, "config.json")))
    assert config == {"model_type": "llava", "architectures": ["LlavaLlamaForCausalLM"], "hidden_size": 8}
    assert auto_upgrade(path, confirm=True) is False  # already upgraded


def test_auto_upgrade_asks_on_stdin_like_the_original(tmp_path):
    yes, no = _v0_checkpoint(tmp_path / "a"), _v0_checkpoint(tmp_path / "b")
    code = "import sys; from llava.model.utils import auto_upgrade; print(auto_upgrade(sys.argv[1]))"
    proc = subprocess.run([sys.executable, "-c", code, yes], cwd=REPO, input="y\n", capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("True"), proc.stderr
    assert json.load(open(os.path.join(yes, "config.json")))["model_type"] == "llava"
    proc = subprocess.run([sys.executable, "-c", code, no], cwd=REPO, input="n\n", capture_output=True, text=True)
    assert proc.returncode == 1 and "aborted" in proc.stdout
    assert json.load(open(os.path.join(no, "config.json")))["model_type"] == "llama"


def test_auto_upgrade_leaves_other_checkpoints_alone(tmp_path):
    from llava.model.utils import auto_upgrade

    plain = tmp_path / "vicuna"
    plain.mkdir()
    (plain / "config.json").write_text(json.dumps({"model_type": "llama", "architectures": ["LlamaForCausalLM"]}))
    assert auto_upgrade(str(plain), confirm=True) is False
    with pytest.raises(FileNotFoundError, match="config.json"):
        auto_upgrade(str(tmp_path / "llava-missing"))


# -------------------------------------------------------------------------------------------------- CLIPVisionTower


def test_clip_vision_tower_alias_gives_our_towers_features(tiny):
    from transformers import CLIPVisionModel

    from llava.model.multimodal_encoder.builder import VisionTower
    from llava.model.multimodal_encoder.clip_encoder import CLIPVisionTower

    args = types.SimpleNamespace(mm_vision_select_layer=-2, mm_vision_select_feature="patch")
    tower = CLIPVisionTower(tiny.clip_dir, args)  # the original's call: loads at once
    assert isinstance(tower, VisionTower) and tower.is_loaded
    ours = VisionTower(tiny.clip_dir, args)
    ours.load_model()
    reference = CLIPVisionModel.from_pretrained(tiny.clip_dir).eval()
    size = tower.config.image_size
    images = torch.randn(3, 3, size, size, generator=torch.Generator().manual_seed(0))
    features = tower(images)
    assert features.shape == (3, tower.num_patches, tower.hidden_size)
    torch.testing.assert_close(features, ours(images), rtol=0, atol=0)
    expected = reference(images, output_hidden_states=True).hidden_states[-2][:, 1:]
    torch.testing.assert_close(features, expected)
    as_list = tower(list(images))  # the original's list form: one (1, P, C) tensor per image
    assert len(as_list) == 3 and all(f.shape == (1, tower.num_patches, tower.hidden_size) for f in as_list)
    torch.testing.assert_close(torch.cat(as_list), features)
    assert tower(images.double()).dtype == torch.float64  # features come back in the pixels' dtype
    assert tower.num_patches == (tower.config.image_size // tower.config.patch_size) ** 2
    assert tower.config.hidden_size == tower.hidden_size == reference.config.hidden_size
    pixels = tower.image_processor(images=[__import__("PIL.Image").Image.new("RGB", (50, 40))], return_tensors="pt")
    assert tuple(pixels["pixel_values"].shape[-2:]) == (size, size)


def test_clip_vision_tower_delay_load_and_reload(tiny):
    from llava.model.multimodal_encoder.clip_encoder import CLIPVisionTower

    args = types.SimpleNamespace(mm_vision_select_layer=-2)
    tower = CLIPVisionTower(tiny.clip_dir, args, delay_load=True)
    assert not tower.is_loaded and tower.hidden_size > 0
    tower.load_model()
    weight = next(tower.vision_tower.parameters())
    with torch.no_grad():
        weight.add_(1.0)
    tower.load_model()  # as the original: a loaded tower is not reloaded
    assert next(tower.vision_tower.parameters()) is weight
    unfrozen = CLIPVisionTower(tiny.clip_dir, types.SimpleNamespace(unfreeze_mm_vision_tower=True), delay_load=True)
    assert unfrozen.is_loaded


# ------------------------------------------------------------------------------------------- llava.train.train helpers


@pytest.fixture
def v1_default(monkeypatch):
    import llava.conversation as conversation_lib

    monkeypatch.setattr(conversation_lib, "default_conversation", conversation_lib.conv_templates["v1"])


def _messages(conversation):
    from llava.train.data import ROLE_ALIASES

    return [(ROLE_ALIASES[t["from"]], t["value"]) for t in conversation]


def test_preprocess_gives_our_preprocessing_path(tiny, v1_default):
    from llava.constants import IGNORE_INDEX, IMAGE_TOKEN_INDEX
    from llava.train.preprocess import Preprocessor
    from llava.train.train import preprocess

    out = preprocess([CONVERSATION], tiny.tokenizer, has_image=True)
    expected = Preprocessor(tiny.tokenizer, "v1")(_messages(CONVERSATION))
    assert out["input_ids"].tolist() == [expected.input_ids] and out["labels"].tolist() == [expected.labels]
    assert (out["input_ids"] == IMAGE_TOKEN_INDEX).sum() == 1
    supervised = out["labels"][0][out["labels"][0] != IGNORE_INDEX].tolist()
    text = tiny.tokenizer.decode(supervised)
    assert "A red square." in text and "It is red." in text and "picture" not in text
    # `version=` picks another template; the default follows `default_conversation`.
    plain = preprocess([CONVERSATION[:2]], tiny.tokenizer, has_image=True, version="plain")
    assert plain["input_ids"].tolist() == [Preprocessor(tiny.tokenizer, "plain")(_messages(CONVERSATION[:2])).input_ids]


def test_preprocess_pads_several_sources_and_refuses_unflagged_images(tiny, v1_default):
    from llava.constants import IGNORE_INDEX
    from llava.train.train import preprocess

    text_only = [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello there, friend."}]
    out = preprocess([text_only, text_only[:1] + [{"from": "gpt", "value": "Yo"}]], tiny.tokenizer)
    assert out["input_ids"].shape == out["labels"].shape and out["input_ids"].shape[0] == 2
    short = preprocess([text_only[:1] + [{"from": "gpt", "value": "Yo"}]], tiny.tokenizer)
    n = short["input_ids"].shape[1]
    assert out["input_ids"][1, :n].tolist() == short["input_ids"][0].tolist()
    assert (out["labels"][1, n:] == IGNORE_INDEX).all() and (
        out["input_ids"][1, n:] == tiny.tokenizer.pad_token_id
    ).all()
    with pytest.raises(ValueError, match="has_image=False"):
        preprocess([CONVERSATION], tiny.tokenizer)


def test_preprocess_multimodal_then_preprocess_matches_start_end_tokens(tiny, v1_default):
    import copy

    from llava.train.preprocess import Preprocessor
    from llava.train.train import preprocess, preprocess_multimodal

    data_args = types.SimpleNamespace(is_multimodal=True, mm_use_im_start_end=True)
    sources = preprocess_multimodal(copy.deepcopy([CONVERSATION]), data_args)
    assert sources[0][0]["value"] == "<im_start><image><im_end>\nWhat is in the picture?"
    out = preprocess(sources, tiny.tokenizer, has_image=True)
    expected = Preprocessor(tiny.tokenizer, "v1", mm_use_im_start_end=True)(_messages(CONVERSATION))
    assert out["input_ids"].tolist() == [expected.input_ids] and out["labels"].tolist() == [expected.labels]
    untouched = preprocess_multimodal(copy.deepcopy([CONVERSATION]), types.SimpleNamespace(is_multimodal=False))
    assert untouched == [CONVERSATION]


def test_preprocess_refuses_a_default_conversation_that_is_no_template(tiny, monkeypatch):
    import dataclasses

    import llava.conversation as conversation_lib
    from llava.train.train import preprocess

    odd = dataclasses.replace(conversation_lib.conv_templates["v1"], system="Something else.")
    monkeypatch.setattr(conversation_lib, "default_conversation", odd)
    with pytest.raises(ValueError, match="pass `version=`"):
        preprocess([CONVERSATION], tiny.tokenizer, has_image=True)


def test_make_supervised_data_module_equals_the_training_dataset(tiny, tmp_path, v1_default):
    from llava.train.args import parse_args
    from llava.train.train import build_dataset, make_supervised_data_module

    data_path, folder = make_dataset(str(tmp_path), n_image=3, n_text=1, style="chat")
    flags = tiny_flags(tiny, data_path, folder, str(tmp_path / "out"), version="v1", model_max_length=200)
    model_args, data_args, training_args = parse_args(flags)
    model = tiny.model("llama")
    tokenizer = tiny.tokenizer
    tokenizer.model_max_length = training_args.model_max_length
    module = make_supervised_data_module(tokenizer=tokenizer, data_args=data_args, model=model)
    reference = build_dataset(tokenizer, model, model_args, data_args, training_args)
    assert module["eval_dataset"] is None and len(module["train_dataset"]) == len(reference) == 4
    for i in range(len(reference)):
        got, want = module["train_dataset"][i], reference[i]
        assert got["input_ids"].tolist() == want["input_ids"].tolist()
        assert got["labels"].tolist() == want["labels"].tolist()
        assert ("images" in got) == ("images" in want)
        if "images" in want:
            torch.testing.assert_close(got["images"], want["images"], rtol=0, atol=0)
    batch = module["data_collator"]([module["train_dataset"][i] for i in range(2)])
    assert batch["input_ids"].shape == batch["attention_mask"].shape and batch["input_ids"].shape[0] == 2
    with pytest.raises(ValueError, match="pass `model=`"):
        make_supervised_data_module(tokenizer=tokenizer, data_args=data_args)


def test_safe_save_model_for_hf_trainer_writes_a_loadable_checkpoint(tiny, tmp_path):
    from llava.model.builder import load_pretrained_model
    from llava.train.train import safe_save_model_for_hf_trainer, train

    data_path, folder = make_dataset(str(tmp_path), n_image=4)
    trainer = train(tiny_flags(tiny, data_path, folder, str(tmp_path / "run"), tune_mm_mlp_adapter=True, max_steps=2))
    out = str(tmp_path / "saved")
    safe_save_model_for_hf_trainer(trainer=trainer, output_dir=out)
    assert os.path.isfile(os.path.join(out, "mm_projector.bin")) and os.path.isfile(os.path.join(out, "config.json"))
    _, model, _, _ = load_pretrained_model(out, tiny.decoder_dirs["llama"], None, device="cpu")
    trained = trainer.model.get_model().mm_projector.state_dict()
    loaded = model.get_model().mm_projector.state_dict()
    assert trained.keys() == loaded.keys()
    for key in trained:
        torch.testing.assert_close(loaded[key], trained[key].to(loaded[key].dtype), rtol=0, atol=0)


# ------------------------------------------------------------------------------------------- llava.train.llava_trainer


def test_llava_trainer_keeps_the_original_sampler_names():
    """The original's llava_trainer helpers, with its signatures: a permutation grouped per `batch_size * world_size`."""
    import torch

    from llava.train.llava_trainer import (  # noqa: F401
        LengthGroupedSampler,
        LLaVATrainer,
        get_length_grouped_indices,
        get_modality_length_grouped_indices,
        split_to_even_chunks,
    )

    lengths = [5, -3, 8, -1, 2, -7, 9, 4, -2, 6, 1, -5]  # 7 image samples (positive), 5 text-only
    order = get_modality_length_grouped_indices(lengths, 2, 2, generator=torch.Generator().manual_seed(0))
    assert sorted(order) == list(range(len(lengths)))
    runs = [order[i : i + 4] for i in range(0, len(order), 4)]
    assert [len({lengths[i] > 0 for i in run}) for run in runs[:-1]] == [1, 1]  # the last run joins the leftovers
    sizes = [abs(n) for n in lengths]
    order = get_length_grouped_indices(sizes, 2, 2, generator=torch.Generator().manual_seed(0), merge=True)
    assert sorted(order) == list(range(len(lengths)))
    assert split_to_even_chunks([0, 1, 2, 3, 4], sizes, 2) == [[0, 2, 4], [1, 3]]
    chunks = split_to_even_chunks([6, 2, 5, 0], sizes, 2)
    assert sorted(len(c) for c in chunks) == [2, 2]
    assert sorted(sum(sizes[i] for i in c) for c in chunks) == [14, 15]
