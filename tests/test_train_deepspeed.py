"""DeepSpeed ZeRO-2 / ZeRO-3 as 2 CPU ranks (torchrun, gloo): mixed image/text batches, complete checkpoints.

The first DeepSpeed run on a machine JIT-compiles a C++ op (about a minute); it is cached afterwards.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from train_helpers import free_port, logits_of, make_dataset, original_release, run_watched, tiny_flags

from llava.model.builder import detect_checkpoint_kind, load_pretrained_model
from llava.train.data import load_records
from llava.train.llava_trainer import modality_grouped_indices

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DRIVER = os.path.join(REPO, "tests", "train_helpers.py")

pytest.importorskip("deepspeed")


def torchrun(args: list[str], timeout: int = 600) -> subprocess.CompletedProcess:
    env = dict(
        os.environ,
        OMP_NUM_THREADS="1",
        HF_HUB_OFFLINE="1",
        WANDB_MODE="disabled",
        PYTHONWARNINGS="ignore",
        TOKENIZERS_PARALLELISM="false",
    )
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}", *args]
    return run_watched(cmd, idle_timeout=timeout, cwd=REPO, env=env)  # judged on progress: silent for `timeout` s


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["zero2", "zero3"])
def test_two_ranks_mixed_batches_and_reload(tiny, tmp_path, stage):
    """ZeRO-2 trains stage 2 from the plain decoder; ZeRO-3 fine-tunes a released-style LLaVA checkpoint whose
    vision tower is not in its weights (the decoder is built inside zero.Init, the tower outside it)."""
    # 7 image + 5 text records, one per rank and step: the last step gives one rank an image and the other text.
    data_path, folder = make_dataset(str(tmp_path / "data"), n_image=7, n_text=5, style="chat")
    records = load_records(data_path, folder)
    lengths = [sum(len(t.split()) for _, t in r.messages) * (1 if r.images else -1) for r in records]
    order = modality_grouped_indices(lengths, 1, 2, torch.Generator().manual_seed(0))
    last = [bool(records[i].images) for i in order[-2:]]
    assert sorted(last) == [False, True], "the data must end with a step that mixes an image rank and a text rank"

    out = str(tmp_path / "out")
    logits_file = str(tmp_path / "trained_logits.pt")
    start = {"model_name_or_path": original_release(tiny)[0]} if stage == "zero3" else {}
    flags = tiny_flags(
        tiny,
        data_path,
        folder,
        out,
        **start,
        version="v1",
        per_device_train_batch_size=1,
        group_by_modality_length=True,
        learning_rate=1e-3,
        save_steps=3,
    )
    result = torchrun([DRIVER, logits_file, "--deepspeed", f"./scripts/{stage}.json", *flags])
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    assert "Attention implementation: sdpa (flash-attn" in result.stdout + result.stderr
    state = json.load(open(os.path.join(out, "trainer_state.json")))
    assert state["global_step"] == 6  # 12 records, 2 ranks, batch 1: the mixed step ran

    # the final model and the intermediate checkpoint are both complete, loadable models
    for path in (out, os.path.join(out, "checkpoint-3")):
        assert detect_checkpoint_kind(path).kind == "full"
    tokenizer, model, _, _ = load_pretrained_model(out, None, None, device="cpu")
    trained = torch.load(logits_file)
    torch.testing.assert_close(logits_of(model, tokenizer), trained, atol=1e-5, rtol=1e-5)
    assert model.config.conv_template == "v1"
    # the frozen tower in the checkpoint is the pretrained one (under ZeRO-3 it was rebuilt and loaded, not random)
    from transformers import CLIPVisionModel

    pretrained = CLIPVisionModel.from_pretrained(tiny.clip_dir).state_dict()
    for key, value in model.get_vision_tower().vision_tower.state_dict().items():
        torch.testing.assert_close(value, pretrained[key], msg=key)
