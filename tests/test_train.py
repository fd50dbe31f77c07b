"""Training end to end on CPU with tiny backbones: stage 1 -> stage 2, LoRA/QLoRA, resume, data and sampler checks."""

from __future__ import annotations

import glob
import json
import logging
import os
import runpy
import shlex
import sys

import pytest
import torch
from train_helpers import PROMPT, image_batch, logged_losses, logits_of, make_dataset, original_release, tiny_flags
from transformers import TrainerCallback

from llava.mm_utils import tokenizer_image_token
from llava.model.builder import detect_checkpoint_kind, load_pretrained_model
from llava.train.args import parse_args
from llava.train.data import DatasetError, ImageTokenCounter, LazySupervisedDataset, load_records
from llava.train.llava_trainer import length_grouped_indices, modality_grouped_indices
from llava.train.preprocess import Preprocessor
from llava.train.train import last_checkpoint, train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def generate(model, tokenizer) -> torch.Tensor:
    ids = tokenizer_image_token(PROMPT, tokenizer, return_tensors="pt")[None]
    return model.generate(ids, images=image_batch(), max_new_tokens=4, do_sample=False)


def load(path, base=None, **kw):
    return load_pretrained_model(path, base, None, device="cpu", **kw)


def decreased(losses: list[float]) -> bool:
    k = max(1, len(losses) // 4)
    return sum(losses[-k:]) / k < sum(losses[:k]) / k


class ProjectorAtStart(TrainerCallback):
    """Records the projector weights the run starts from."""

    def __init__(self):
        self.state = None

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.state = {k: v.detach().clone() for k, v in model.state_dict().items() if "mm_projector" in k}


class CrashAt(TrainerCallback):
    """Simulates a crash (a killed job) once `step` is reached."""

    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= self.step:
            raise KeyboardInterrupt(f"simulated kill at step {state.global_step}")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    caption = make_dataset(str(root / "caption"), n_image=24)
    chat = make_dataset(str(root / "chat"), n_image=12, n_text=6, n_multi=3, style="chat", fmt="hf")
    return {"caption": caption, "chat": chat}


@pytest.fixture(scope="module")
def stage1(tiny, data, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("stage1"))
    flags = tiny_flags(tiny, *data["caption"], out, tune_mm_mlp_adapter=True, max_steps=12, save_steps=6)
    return train(flags), out


# ---------------------------------------------------------------------------------------------------- end to end


def test_stage1_writes_projector_checkpoints(tiny, stage1):
    trainer, out = stage1
    assert decreased(logged_losses(trainer)), logged_losses(trainer)
    state = torch.load(os.path.join(out, "mm_projector.bin"))
    assert sorted(state) == [
        "model.mm_projector.0.bias",
        "model.mm_projector.0.weight",
        "model.mm_projector.2.bias",
        "model.mm_projector.2.weight",
    ]
    config = json.load(open(os.path.join(out, "config.json")))
    assert config["conv_template"] == "plain"
    assert config["tokenizer_model_max_length"] == 256 and config["tokenizer_padding_side"] == "right"
    assert config["image_aspect_ratio"] == "square" and config["mm_use_im_start_end"] is False
    assert config["mm_projector_type"] == "mlp2x_gelu" and config["mm_vision_select_layer"] == -2
    # the intermediate checkpoint is complete too, and both load on the base decoder
    middle = os.path.join(out, "checkpoint-6")
    for path in (middle, out):
        assert detect_checkpoint_kind(path).kind == "projector"
        tok, model, _, _ = load(path, tiny.decoder_dirs["llama"])
        assert generate(model, tok).shape[0] == 1
    mid_state = torch.load(os.path.join(middle, "mm_projector.bin"))
    assert not torch.equal(mid_state["model.mm_projector.0.weight"], state["model.mm_projector.0.weight"])
    _, final_model, _, _ = load(out, tiny.decoder_dirs["llama"])
    torch.testing.assert_close(final_model.get_model().mm_projector[0].weight, state["model.mm_projector.0.weight"])


def test_stage2_full_finetune_from_stage1(tiny, data, stage1, tmp_path, caplog):
    _, s1 = stage1
    out = str(tmp_path / "stage2")
    start = ProjectorAtStart()
    flags = tiny_flags(
        tiny,
        *data["chat"],
        out,
        version="v1",
        pretrain_mm_mlp_adapter=os.path.join(s1, "mm_projector.bin"),
        image_aspect_ratio="pad",
        group_by_modality_length=True,
        learning_rate=2e-3,
        max_steps=10,
        save_steps=5,
        save_total_limit=1,
    )
    with caplog.at_level(logging.INFO, logger="llava"):
        trainer = train(flags, callbacks=[start])
    # the stage-1 projector is what stage 2 starts from
    stage1_state = torch.load(os.path.join(s1, "mm_projector.bin"))
    for key, value in stage1_state.items():
        torch.testing.assert_close(start.state[key], value)
    assert decreased(logged_losses(trainer)), logged_losses(trainer)
    # start-of-run report: what trains, and one decoded sample with its supervised spans marked
    assert "Trainable parameters (checkpoint format `full`)" in caplog.text
    assert "mm_projector" in caplog.text and "[[" in caplog.text and "</s>]]" in caplog.text
    assert os.path.isfile(os.path.join(out, "llava_run_config.json"))
    # save_total_limit 1 keeps one complete intermediate checkpoint, which loads as a full model
    (ckpt,) = glob.glob(os.path.join(out, "checkpoint-*"))
    assert detect_checkpoint_kind(ckpt).kind == "full"
    tok, model, _, _ = load(out)
    assert model.config.conv_template == "v1" and model.config.image_aspect_ratio == "pad"
    torch.testing.assert_close(logits_of(model, tok), logits_of(trainer.model, tiny.tokenizer), atol=1e-6, rtol=0)
    assert generate(model, tok).shape[0] == 1
    # the projector can be pulled out of the full checkpoint again (scripts/extract_mm_projector.py)
    target = str(tmp_path / "extracted.bin")
    run_script("extract_mm_projector.py", ["--model-path", out, "--output", target])
    extracted = torch.load(target)
    torch.testing.assert_close(extracted["model.mm_projector.2.weight"], model.get_model().mm_projector[2].weight)


def run_script(name: str, argv: list[str]) -> None:
    old = sys.argv
    sys.argv = [name, *argv]
    try:
        runpy.run_path(os.path.join(REPO, "scripts", name), run_name="__main__")
    finally:
        sys.argv = old


@pytest.mark.parametrize("bits", [16, 4])
def test_lora_and_qlora_save_reload_merge(tiny, data, stage1, tmp_path, bits):
    if bits == 4:
        pytest.importorskip("bitsandbytes")
    _, s1 = stage1
    out = str(tmp_path / f"lora{bits}")
    flags = tiny_flags(
        tiny,
        *data["chat"],
        out,
        version="v1",
        pretrain_mm_mlp_adapter=os.path.join(s1, "mm_projector.bin"),
        lora_enable=True,
        lora_r=8,
        lora_alpha=16,
        mm_projector_lr=2e-3,
        learning_rate=5e-3,
        bits=bits,
        max_steps=6,
        save_steps=3,
    )
    trainer = train(flags)
    assert decreased(logged_losses(trainer)), logged_losses(trainer)
    lrs = sorted({group["initial_lr"] for group in trainer.optimizer.param_groups})
    assert lrs == [2e-3, 5e-3]  # projector group at --mm_projector_lr, LoRA at --learning_rate
    adapter = json.load(open(os.path.join(out, "adapter_config.json")))
    targets = adapter["target_modules"]
    assert targets and not any("vision_tower" in t or "mm_projector" in t or "lm_head" in t for t in targets)
    non_lora = torch.load(os.path.join(out, "non_lora_trainables.bin"))
    assert sorted(non_lora) == [
        f"base_model.model.model.mm_projector.{i}.{p}" for i in (0, 2) for p in ("bias", "weight")
    ]
    assert "quantization_config" not in json.load(open(os.path.join(out, "config.json")))
    base = tiny.decoder_dirs["llama"]
    for path in (os.path.join(out, "checkpoint-3"), out):
        assert detect_checkpoint_kind(path).kind == "lora"
    tok, merged, _, _ = load(out, base)
    tok2, unmerged, _, _ = load(out, base, merge_lora=False)
    from peft import PeftModel

    assert isinstance(unmerged, PeftModel) and not isinstance(merged, PeftModel)
    torch.testing.assert_close(logits_of(merged, tok), logits_of(unmerged, tok2), atol=1e-5, rtol=1e-5)
    if bits == 16:  # a QLoRA adapter reloads on the full-precision base, so only LoRA matches the trained model
        torch.testing.assert_close(
            logits_of(unmerged, tok2), logits_of(trainer.model, tiny.tokenizer), atol=1e-5, rtol=1e-5
        )
    assert generate(merged, tok).shape[0] == 1 and generate(unmerged, tok2).shape[0] == 1
    # scripts/merge_lora_weights.py writes a full checkpoint with the same numbers
    merged_dir = str(tmp_path / "merged")
    run_script("merge_lora_weights.py", ["--model-path", out, "--model-base", base, "--save-model-path", merged_dir])
    assert detect_checkpoint_kind(merged_dir).kind == "full"
    tok3, remerged, _, _ = load(merged_dir)
    torch.testing.assert_close(logits_of(remerged, tok3), logits_of(unmerged, tok2), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", ["projector", "full", "lora"])
def test_killed_run_resumes_to_the_same_loss(tiny, data, stage1, tmp_path, kind):
    extra = {
        "projector": dict(tune_mm_mlp_adapter=True),
        "full": dict(version="v1", pretrain_mm_mlp_adapter=os.path.join(stage1[1], "mm_projector.bin")),
        "lora": dict(version="v1", lora_enable=True, lora_r=4, lora_alpha=8, lora_dropout=0.0),
    }[kind]
    dataset = data["caption"] if kind == "projector" else data["chat"]
    common = dict(max_steps=8, save_steps=4, learning_rate=2e-3, group_by_modality_length=True, **extra)
    straight = train(tiny_flags(tiny, *dataset, str(tmp_path / "straight"), **common))
    out = str(tmp_path / "killed")
    with pytest.raises(KeyboardInterrupt):
        train(tiny_flags(tiny, *dataset, out, **common), callbacks=[CrashAt(6)])
    assert last_checkpoint(out).endswith("checkpoint-4") and not os.path.exists(os.path.join(out, "trainer_state.json"))
    resumed = train(tiny_flags(tiny, *dataset, out, **common))
    steps = [e["step"] for e in resumed.state.log_history if "loss" in e]
    assert steps == list(range(1, 9))  # steps 1-4 come from checkpoint-4's state, 5-8 were run again
    assert logged_losses(resumed)[-1] == pytest.approx(logged_losses(straight)[-1], abs=1e-6)
    assert logged_losses(resumed)[4:] == pytest.approx(logged_losses(straight)[4:], abs=1e-6)


def test_unfrozen_tower_with_its_own_lr_saves_a_full_model(tiny, data, stage1, tmp_path):
    out = str(tmp_path / "tower")
    flags = tiny_flags(
        tiny,
        *data["caption"],
        out,
        tune_mm_mlp_adapter=True,
        unfreeze_mm_vision_tower=True,
        mm_vision_tower_lr=1e-3,
        max_steps=3,
    )
    trainer = train(flags)
    groups = {round(g["initial_lr"], 6) for g in trainer.optimizer.param_groups}
    assert groups == {1e-3, 1e-2}
    tower_weight = "model.vision_tower.vision_tower.encoder.layers.0.mlp.fc1.weight"
    tok, model, _, _ = load(out)
    trained = dict(trainer.model.named_parameters())
    torch.testing.assert_close(dict(model.named_parameters())[tower_weight], trained[tower_weight])
    assert not trained["model.embed_tokens.weight"].requires_grad  # stage 1: the LLM stays frozen
    torch.testing.assert_close(logits_of(model, tok), logits_of(trainer.model, tiny.tokenizer), atol=1e-6, rtol=0)


def test_task_finetune_from_a_released_checkpoint(tiny, data, tmp_path):
    """finetune_task.sh: start from a full LLaVA model; its projector is kept, its tower loaded from the tower dir."""
    release, original = original_release(tiny)
    start = ProjectorAtStart()
    out = str(tmp_path / "task")
    flags = tiny_flags(tiny, *data["chat"], out, model_name_or_path=release, version="v1", max_steps=3)
    trainer = train(flags, callbacks=[start])
    torch.testing.assert_close(start.state["model.mm_projector.0.weight"], original.get_model().mm_projector[0].weight)
    tower = trainer.model.get_vision_tower().vision_tower.state_dict()
    for key, value in original.get_vision_tower().vision_tower.state_dict().items():
        torch.testing.assert_close(tower[key], value)
    tok, model, _, _ = load(out)
    torch.testing.assert_close(logits_of(model, tok), logits_of(trainer.model, tiny.tokenizer), atol=1e-6, rtol=0)


def test_running_masked_check_stops_with_an_example(tiny):
    from types import SimpleNamespace

    from llava.train.llava_trainer import LLaVATrainer

    stub = SimpleNamespace(
        _samples_seen=0, _masked_seen=0, _masked_example=None, max_masked_fraction=0.01, processing_class=tiny.tokenizer
    )
    ids = torch.tensor([tiny.tokenizer("USER: hello ASSISTANT:").input_ids] * 50)
    good = ids.clone()
    for _ in range(4):
        LLaVATrainer._track_masked(stub, {"input_ids": ids, "attention_mask": torch.ones_like(ids)}, good)
    masked = torch.full_like(ids, -100)
    with pytest.raises(RuntimeError, match=r"(?s)50 of 250 training samples.*USER: hello ASSISTANT:"):
        LLaVATrainer._track_masked(stub, {"input_ids": ids, "attention_mask": torch.ones_like(ids)}, masked)


def test_seed_flags_run_on_cpu_and_report_to_wandb(tiny, data, tmp_path, monkeypatch, caplog):
    """The seeds' stage-1 flags (bf16, tf32, gradient checkpointing, 4 workers, wandb) on a CPU-only machine."""
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    seeds = (
        "--version plain --mm_projector_type mlp2x_gelu --tune_mm_mlp_adapter True --mm_vision_select_layer -2 "
        "--mm_use_im_start_end False --mm_use_im_patch_token False --bf16 True --num_train_epochs 1 "
        "--per_device_train_batch_size 4 --per_device_eval_batch_size 4 --gradient_accumulation_steps 1 "
        "--evaluation_strategy no --save_strategy steps --save_steps 24000 --save_total_limit 1 --learning_rate 1e-3 "
        "--weight_decay 0. --warmup_ratio 0.03 --lr_scheduler_type cosine --logging_steps 1 --tf32 True "
        "--model_max_length 2048 --gradient_checkpointing True --dataloader_num_workers 4 --lazy_preprocess True "
        "--report_to wandb"
    )
    data_path, folder = data["caption"]
    argv = shlex.split(seeds) + [
        "--model_name_or_path", tiny.decoder_dirs["llama"], "--data_path", data_path, "--image_folder", folder,
        "--vision_tower", tiny.clip_dir, "--output_dir", str(tmp_path / "out"), "--max_steps", "2",
    ]  # fmt: skip
    if torch.cuda.is_available():
        pytest.skip("this checks the CPU fallbacks")
    with caplog.at_level(logging.INFO, logger="llava"):
        trainer = train(argv)
    assert "TF32 is off" in caplog.text and "training on CPU (bf16 autocast on CPU)" in caplog.text
    assert trainer.args.eval_strategy == "no" and trainer.args.warmup_steps == 0.03
    assert len(logged_losses(trainer)) == 2
    assert glob.glob(os.path.join(str(tmp_path), "wandb", "offline-run-*"))
    assert os.path.isfile(os.path.join(str(tmp_path / "out"), "mm_projector.bin"))


def test_lora_targets_and_attention_choice(tiny):
    import importlib.util

    from llava.train.train import lora_target_modules
    from llava.train.train_mem import pick_attention

    model = tiny.model("llama")
    llm_only = lora_target_modules(model)
    assert "model.layers.0.self_attn.q_proj" in llm_only and "model.layers.1.mlp.down_proj" in llm_only
    assert not any("vision_tower" in n or "mm_projector" in n or "lm_head" in n for n in llm_only)
    with_tower = lora_target_modules(model, include_vision_tower=True)
    assert set(with_tower) > set(llm_only) and any("vision_tower" in n for n in with_tower)
    attn, why = pick_attention()
    if importlib.util.find_spec("flash_attn") is None:
        assert attn == "sdpa" and "flash-attn is not installed" in why


# -------------------------------------------------------------------------------------------------- data checks


def test_bad_image_stops_before_step_one_unless_skipped(tiny, tmp_path, caplog):
    data_path, folder = make_dataset(str(tmp_path / "d"), n_image=8)
    records = json.load(open(data_path))
    missing = records[2]["image"]
    os.remove(os.path.join(folder, missing))
    with open(os.path.join(folder, records[5]["image"]), "wb") as f:
        f.write(b"not an image at all")
    out = str(tmp_path / "out")
    with pytest.raises(DatasetError) as err:
        train(tiny_flags(tiny, data_path, folder, out, tune_mm_mlp_adapter=True, max_steps=2))
    message = str(err.value)
    assert "2 bad record(s)" in message and f"`{data_path}` record 2" in message and missing in message
    assert "record 5: image cannot be decoded" in message and "--skip_bad_records True" in message
    assert not os.path.exists(os.path.join(out, "checkpoint-2"))
    with caplog.at_level(logging.WARNING, logger="llava"):
        trainer = train(
            tiny_flags(tiny, data_path, folder, out, tune_mm_mlp_adapter=True, max_steps=2, skip_bad_records=True)
        )
    assert len(trainer.train_dataset) == 6 and "Skipping 2 bad record(s)" in caplog.text


def test_fully_masked_samples_stop_the_run_with_an_example(tiny, tmp_path):
    data_path, folder = make_dataset(str(tmp_path / "d"), n_image=6, style="chat")
    # the first reply starts at position ~135 once the image is 16 positions: 130 cuts every reply off
    with pytest.raises(DatasetError) as err:
        train(tiny_flags(tiny, data_path, folder, str(tmp_path / "o"), version="v1", model_max_length=130, max_steps=1))
    message = str(err.value)
    assert "6 of 6 samples" in message and "USER:" in message and "--model_max_length" in message


def test_dataset_cuts_after_image_expansion(tiny, tmp_path):
    from transformers import CLIPImageProcessorPil

    model = tiny.model("llama")
    counter = ImageTokenCounter(model)
    assert counter() == model.num_image_tokens() == 16
    data_path, folder = make_dataset(str(tmp_path / "d"), n_image=2, n_multi=2, style="chat")
    records = load_records(data_path, folder)
    for max_length in (40, 70, 512):
        ds = LazySupervisedDataset(
            records,
            Preprocessor(tiny.tokenizer, "v1"),
            max_length=max_length,
            image_processor=CLIPImageProcessorPil.from_pretrained(tiny.clip_dir),
            image_tokens=counter,
        )
        for i in range(len(ds)):
            item = ds[i]
            markers = int((item["input_ids"] == -200).sum())
            assert len(item["images"]) == markers
            assert len(item["input_ids"]) - markers + 16 * markers <= max_length
    anyres = tiny.model("llama", image_aspect_ratio="anyres", image_grid_pinpoints="[[32, 64], [64, 32], [64, 64]]")
    counter = ImageTokenCounter(anyres)
    for size in [(40, 90), (90, 40), (64, 64)]:
        assert counter(size) == anyres.num_image_tokens(size)


def test_record_formats(tmp_path):
    rows = [
        {"id": "a", "image": "x.png", "conversations": [{"from": "human", "value": "Hi <image>"}, {"from": "gpt", "value": "Yo"}]},
        {"messages": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Hi"}]}, {"role": "assistant", "content": "Yo"}], "images": ["x.png"]},
        {"conversations": [{"from": "gpt", "value": "stray"}, {"from": "human", "value": "Q"}, {"from": "gpt", "value": "A"}]},
    ]  # fmt: skip
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    records = load_records(str(path), "/imgs", image_check="none")
    assert records[0].images == ["/imgs/x.png"] and records[0].messages[0] == ("user", "Hi <image>")
    assert records[1].messages == [("user", "<image>\nHi"), ("assistant", "Yo")]
    assert records[2].messages == [("user", "Q"), ("assistant", "A")]  # a leading assistant turn is dropped
    bad = [
        {
            "image": ["a.png", "b.png"],
            "conversations": [{"from": "human", "value": "<image>"}, {"from": "gpt", "value": "x"}],
        }
    ]
    path.write_text(json.dumps(bad[0]) + "\n")
    with pytest.raises(DatasetError, match=r"record 0: 1 `<image>` marker\(s\) in the text but 2 image\(s\)"):
        load_records(str(path), None, image_check="none")


# ------------------------------------------------------------------------------------------------------ sampler


@pytest.mark.parametrize("n_image, n_text", [(40, 0), (0, 40), (23, 17)])
def test_modality_grouped_batches(n_image, n_text):
    lengths = [5 + i % 7 for i in range(n_image)] + [-(5 + i % 5) for i in range(n_text)]
    batch, groups = 4, 2
    order = modality_grouped_indices(lengths, batch, groups, torch.Generator().manual_seed(0))
    assert sorted(order) == list(range(len(lengths)))
    mega = batch * groups
    runs = [order[i : i + mega] for i in range(0, len(order), mega)]
    full_single = [r for r in runs if len(r) == mega and len({lengths[i] > 0 for i in r}) == 1]
    mixed = [r for r in runs if len({lengths[i] > 0 for i in r}) > 1]
    assert len(mixed) <= 1 and (not mixed or mixed[0] is runs[-1] or runs[-2] is mixed[0])
    assert len(full_single) >= len(lengths) // mega - 2
    again = modality_grouped_indices(lengths, batch, groups, torch.Generator().manual_seed(0))
    other = modality_grouped_indices(lengths, batch, groups, torch.Generator().manual_seed(1))
    assert again == order and other != order
    plain = length_grouped_indices([abs(n) for n in lengths], batch, groups, torch.Generator().manual_seed(0))
    assert sorted(plain) == list(range(len(lengths)))


# ------------------------------------------------------------------------------------------------------ scripts


def test_every_training_script_parses():
    scripts = sorted(glob.glob(os.path.join(REPO, "scripts", "v1_5", "*.sh")))
    names = {os.path.basename(s) for s in scripts}
    assert {"pretrain.sh", "finetune.sh", "finetune_lora.sh", "finetune_task.sh", "finetune_task_lora.sh"} <= names
    for script in scripts:
        text = open(script).read().replace("\\\n", " ")
        line = next(ln for ln in text.splitlines() if "llava/train/train_mem.py" in ln)
        words = shlex.split(line.split("llava/train/train_mem.py", 1)[1])
        # The DeepSpeed config is checked as a file here; parsing it would set up DeepSpeed in this process.
        at = words.index("--deepspeed")
        assert os.path.isfile(os.path.join(REPO, words[at + 1])), script
        model_args, data_args, training_args = parse_args(words[:at] + words[at + 2 :])
        assert model_args.vision_tower and data_args.data_path and training_args.output_dir, script
        assert training_args.per_device_train_batch_size * training_args.gradient_accumulation_steps * 8 in (
            256,
            128,
        ), script
    for config in glob.glob(os.path.join(REPO, "scripts", "zero*.json")):
        assert "zero_optimization" in json.load(open(config))


@pytest.mark.parametrize(
    "flags, name, checkpoint_format",
    [
        (dict(tune_mm_mlp_adapter=True), "align", "projector"),
        (dict(tune_mm_mlp_adapter=True, unfreeze_mm_vision_tower=True), "align+tower", "full"),
        (dict(), "full", "full"),
        (dict(freeze_mm_mlp_adapter=True), "full+frozen_projector", "full"),
        (dict(freeze_backbone=True), "frozen_llm", "projector"),
        (dict(lora_enable=True), "lora", "lora"),
        (dict(lora_enable=True, bits=4), "qlora", "lora"),
        (dict(lora_enable=True, lora_vision_tower=True), "lora+tower", "lora"),
        (dict(vision_tower=None), "full+text_only", "full"),
    ],
)
def test_stage_is_named_from_the_original_flags(tiny, tmp_path, flags, name, checkpoint_format):
    from llava.train.model_setup import STAGES, training_stage

    model_args, _, training_args = parse_args(tiny_flags(tiny, "d.json", "img", str(tmp_path), **flags))
    stage = training_stage(model_args, training_args, multimodal=model_args.vision_tower is not None)
    assert (stage.name, stage.checkpoint_format) == (name, checkpoint_format)
    assert stage.base in STAGES


def test_set_trainable_freezes_by_stage_and_logs_each_part(tiny, tmp_path, caplog):
    from llava.train.model_setup import set_trainable

    model = tiny.model("llama")
    model_args, data_args, training_args = parse_args(
        tiny_flags(tiny, "d.json", "img", str(tmp_path), tune_mm_mlp_adapter=True)
    )
    assert data_args.is_multimodal  # decided once, from --vision_tower, by parse_args
    with caplog.at_level(logging.INFO, logger="llava.train"):
        stage = set_trainable(model, model_args, training_args)
    parts = model.parts()
    assert all(p.requires_grad for p in parts["mm_projector"])
    assert not any(p.requires_grad for part in ("vision_tower", "llm", "embeddings", "lm_head") for p in parts[part])
    projector = sum(p.numel() for p in parts["mm_projector"])
    tower = sum(p.numel() for p in parts["vision_tower"])
    assert f"Training stage `{stage.name}`" in caplog.text and stage.name == "align"
    assert f"mm_projector  {projector:>14,} / {0:>14,}  trained" in caplog.text
    assert f"vision_tower  {0:>14,} / {tower:>14,}  frozen" in caplog.text
