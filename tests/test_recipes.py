"""The older recipes, run from their own scripts' flags on tiny models: LLaVA-Lightning v0 with <im_start>/<im_end>
(stage 1 -> extract -> stage 2 -> reload), the V100 entry point, v0 eval habits, and (slow) the Lightning scripts
run as written on 2 CPU ranks and the ScienceQA fine-tune -> multi-GPU eval pair."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from PIL import Image
from test_mpt import build_tiny_mpt
from test_scripts_parse import REPO, program_of, script_commands
from train_helpers import draw, free_port, image_batch, make_dataset, run_watched
from transformers import TrainerCallback

from llava.conversation import get_conv_template
from llava.mm_utils import tokenizer_image_token
from llava.model.builder import detect_checkpoint_kind, load_pretrained_model
from llava.model.llava_arch import restore_token_rows
from llava.train.train import train

# Flags that make a seed command a quick CPU run; the script's own flags stay as they are otherwise.
QUICK = [
    "--max_steps", "2", "--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "1",
    "--report_to", "none", "--dataloader_num_workers", "0", "--model_max_length", "256", "--disable_tqdm", "True",
]  # fmt: skip
ENV = {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled", "PYTHONWARNINGS": "ignore",
       "TOKENIZERS_PARALLELISM": "false"}  # fmt: skip


def without(words: list[str], *flags: str) -> list[str]:
    """`words` without the given flags and their values (what cannot run in this process: DeepSpeed, FSDP)."""
    out, skip = [], False
    for word in words:
        if skip:
            skip = False
        elif word in flags:
            skip = True
        else:
            out.append(word)
    return out


def train_args(command) -> list[str]:
    return without(program_of(command.argv)[1], "--deepspeed", "--fsdp", "--fsdp_transformer_layer_cls_to_wrap")


def start_end_logits(model, tokenizer, template: str) -> torch.Tensor:
    conv = get_conv_template(template)
    conv.append_message(conv.roles[0], "<im_start><image><im_end>\nDescribe the image briefly.")
    conv.append_message(conv.roles[1], None)
    ids = tokenizer_image_token(conv.get_prompt(), tokenizer, return_tensors="pt")[None]
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids, images=image_batch()).logits


def trained_model(trainer):
    """The trainer's model without the bf16 autocast accelerate wraps its forward in (the seeds say --bf16 True)."""
    return trainer.accelerator.unwrap_model(trainer.model, keep_fp32_wrapper=False)


class EmbeddingAtStart(TrainerCallback):
    def __init__(self):
        self.embedding = self.projector = None

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.embedding = model.get_input_embeddings().weight.detach().clone()
        self.projector = {k: v.detach().clone() for k, v in model.get_model().mm_projector.state_dict().items()}


@pytest.fixture(scope="module")
def lightning_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("lightning")
    pretrain = make_dataset(str(root / "pretrain"), n_image=12)
    instruct = make_dataset(str(root / "instruct"), n_image=8, n_text=2, style="chat")
    return root, pretrain, instruct


def lightning_env(root, model_dir, clip_dir, pretrain, instruct, **extra) -> dict:
    return {
        "MODEL": model_dir, "VISION_TOWER": clip_dir, "PRETRAIN_DATA": pretrain[0], "PRETRAIN_IMAGES": pretrain[1],
        "INSTRUCT_DATA": instruct[0], "INSTRUCT_IMAGES": instruct[1], "PRETRAIN_OUT": str(root / "pretrain-out"),
        "PROJECTOR": str(root / "mm_projector" / "projector.bin"), "OUTPUT_DIR": str(root / "finetune-out"), **extra,
    }  # fmt: skip


def test_lightning_v0_start_end_tokens_stage1_stage2_reload(tiny, lightning_data):
    """`train_lightning.sh v0`'s three commands in this process (FSDP left out): stage 1 trains the projector and
    only the <im_start>/<im_end> rows, the stage-1 directory reloads with them, extract copies them, stage 2 starts
    from them, and the result reloads with the trained numbers and the v0 template (without few-shot examples)."""
    root, pretrain, instruct = lightning_data
    env = lightning_env(root, tiny.decoder_dirs["llama"], tiny.clip_dir, pretrain, instruct)
    stage1, extract, stage2 = script_commands(os.path.join(REPO, "scripts", "train_lightning.sh"), ["v0"], env)
    assert "--mm_use_im_start_end" in stage1.argv  # the bare flag, as the seeds wrote it

    start1 = EmbeddingAtStart()
    trainer1 = train(train_args(stage1) + QUICK, callbacks=[start1])
    tok1 = trainer1.processing_class
    rows = tok1.convert_tokens_to_ids(["<im_start>", "<im_end>"])
    trained = trainer1.model.get_input_embeddings().weight.detach()
    changed = (trained != start1.embedding).any(dim=1).nonzero().flatten().tolist()
    assert changed == rows  # only the two new rows learned
    state = torch.load(os.path.join(env["PRETRAIN_OUT"], "mm_projector.bin"))
    assert sorted(state) == ["model.embed_tokens.weight", "model.mm_projector.bias", "model.mm_projector.weight"]
    # the stage-1 directory loads on its base with those rows (and gives the trained model's numbers)
    assert detect_checkpoint_kind(env["PRETRAIN_OUT"]).kind == "projector"
    tok, model, _, _ = load_pretrained_model(env["PRETRAIN_OUT"], tiny.decoder_dirs["llama"], None, device="cpu")
    torch.testing.assert_close(model.get_input_embeddings().weight, trained)
    assert model.config.conv_template == "llava_v0" and model.config.mm_use_im_start_end is True
    expected = start_end_logits(trained_model(trainer1), tok1, "llava_v0")
    torch.testing.assert_close(start_end_logits(model, tok, "llava_v0"), expected, atol=1e-5, rtol=0)

    # python scripts/extract_mm_projector.py --model_name_or_path <stage 1> --output <projector file>
    program, args = program_of(extract.argv)
    assert program == "path:scripts/extract_mm_projector.py" and "--model_name_or_path" in args
    subprocess.run(["python", "scripts/extract_mm_projector.py", *args], cwd=REPO, check=True, capture_output=True,
                   env={**os.environ, "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"]})  # fmt: skip
    extracted = torch.load(env["PROJECTOR"])
    assert sorted(extracted) == sorted(state)
    torch.testing.assert_close(extracted["model.embed_tokens.weight"], state["model.embed_tokens.weight"])

    start2 = EmbeddingAtStart()
    trainer2 = train(train_args(stage2) + QUICK, callbacks=[start2])
    torch.testing.assert_close(start2.embedding[rows], state["model.embed_tokens.weight"][rows])
    torch.testing.assert_close(start2.projector["weight"], state["model.mm_projector.weight"])
    assert len(trainer2.state.log_history) and trainer2.state.global_step == 2
    tok, model, _, _ = load_pretrained_model(env["OUTPUT_DIR"], None, None, device="cpu")
    assert model.config.conv_template == "llava_v0" and model.config.mm_use_im_start_end is True
    expected = start_end_logits(trained_model(trainer2), trainer2.processing_class, "llava_v0")
    torch.testing.assert_close(start_end_logits(model, tok, "llava_v0"), expected, atol=1e-5, rtol=0)


def test_start_end_rows_from_a_rows_only_file_or_a_misfit(tiny):
    """The original also wrote stage-1 files holding just the added rows; a file from another vocabulary is an error."""
    model = tiny.model("llama")
    weight = model.get_input_embeddings().weight
    rows = [weight.shape[0] - 2, weight.shape[0] - 1]
    new = torch.randn(2, weight.shape[1])
    assert restore_token_rows(model, {"model.embed_tokens.weight": new}, rows, "rows.bin")
    torch.testing.assert_close(weight[rows], new)
    assert not restore_token_rows(model, {"model.mm_projector.0.weight": new}, rows, "projector-only.bin")
    with pytest.raises(ValueError, match="has shape \\(7, 64\\).*another tokenizer or decoder"):
        restore_token_rows(model, {"model.embed_tokens.weight": torch.zeros(7, 64)}, rows, "other.bin")


def test_v100_entry_point_trains_without_flash_kernels(tiny, lightning_data, tmp_path, caplog):
    """scripts/pretrain_xformers.sh: llava/train/train_xformers.py, with SDPA's flash kernel off while it trains."""
    from llava.train.train_xformers import main

    class Kernels(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            self.flash = torch.backends.cuda.flash_sdp_enabled()
            self.efficient = torch.backends.cuda.mem_efficient_sdp_enabled()

    (command,) = script_commands(os.path.join(REPO, "scripts", "pretrain_xformers.sh"))
    assert program_of(command.argv)[0] == "path:llava/train/train_xformers.py"
    _, pretrain, _ = lightning_data
    local = ["--model_name_or_path", tiny.decoder_dirs["llama"], "--vision_tower", tiny.clip_dir,
             "--data_path", pretrain[0], "--image_folder", pretrain[1], "--output_dir", str(tmp_path / "out")]  # fmt: skip
    kernels = Kernels()
    with caplog.at_level("INFO", logger="llava"):
        trainer = main(train_args(command) + local + QUICK, callbacks=[kernels])
    assert trainer.state.global_step == 2 and not trainer.args.bf16
    assert kernels.flash is False and kernels.efficient is True
    assert torch.backends.cuda.flash_sdp_enabled()  # restored afterwards
    assert "memory-efficient kernel (no flash-attn)" in caplog.text


def test_v0_eval_scripts_pass_the_checkpoint_as_model_name(tiny, tmp_path):
    """`python -m llava.eval.model_vqa --model-name ./checkpoints/LLaVA-13B-v0 ...` (the v0 README) works."""
    from llava.eval import model_vqa

    checkpoint = tiny.save_full(tiny.model("llama"), "LLaVA-13B-v0")
    draw("red", "circle").save(tmp_path / "a.png")
    questions = tmp_path / "q.jsonl"
    questions.write_text(json.dumps({"question_id": 1, "image": "a.png", "text": "What is it?"}) + "\n")
    answers = str(tmp_path / "answers.jsonl")
    model_vqa.main(["--model-name", checkpoint, "--question-file", str(questions), "--image-folder", str(tmp_path),
                    "--answers-file", answers, "--max_new_tokens", "3", "--temperature", "0", "--device", "cpu",
                    "--conv-mode", "llava_v0"])  # fmt: skip
    (answer,) = [json.loads(line) for line in open(answers)]
    assert answer["question_id"] == 1 and answer["model_id"] == checkpoint


# ------------------------------------------------------------------------------------------- scripts as written


def run_script(name: str, env: dict, *args: str) -> str:
    path = os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"]
    result = run_watched(["bash", f"scripts/{name}", *args], cwd=REPO, idle_timeout=900,
                         env={**os.environ, **ENV, "PATH": path, **env})  # fmt: skip
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-6000:]
    return log


@pytest.mark.slow
@pytest.mark.parametrize("family", ["llama", "mpt"])
def test_lightning_scripts_run_on_two_cpu_ranks(tiny, family, tmp_path):
    """`bash ./scripts/train_lightning.sh v1` / `bash ./scripts/train_lightning_mpt.sh` as written (torchrun,
    stage 1 -> extract -> FSDP stage 2) with NPROC=2 CPU ranks and tiny paths; both outputs load and generate."""
    if family == "llama":
        model_dir, script, args, template = tiny.decoder_dirs["llama"], "train_lightning.sh", ["v1"], "v1"
    else:
        model_dir, script, args, template = str(tmp_path / "mpt"), "train_lightning_mpt.sh", [], "mpt"
        build_tiny_mpt(model_dir, tiny.tokenizer)
    pretrain = make_dataset(str(tmp_path / "pretrain"), n_image=8)
    instruct = make_dataset(str(tmp_path / "instruct"), n_image=8, style="chat")
    env = lightning_env(tmp_path, model_dir, tiny.clip_dir, pretrain, instruct, NPROC="2", MASTER_PORT=str(free_port()))
    log = run_script(script, env, *args, *QUICK)
    assert "Wrote 3 tensors to" in log and "--fsdp on CPU" in log
    for path, base in ((env["PRETRAIN_OUT"], model_dir), (env["OUTPUT_DIR"], None)):
        tok, model, _, _ = load_pretrained_model(path, base, None, device="cpu")
        assert model.config.conv_template == template and model.config.mm_use_im_start_end is True
        assert start_end_logits(model, tok, template).isfinite().all()


def tiny_scienceqa(root: str, n_train: int = 6, n_test: int = 4) -> str:
    """problems.json, pid_splits.json and images laid out as ScienceQA's data/scienceqa."""
    problems, splits = {}, {"train": [], "test": []}
    colors = ["red", "green", "blue", "yellow"]
    for i in range(n_train + n_test):
        split = "train" if i < n_train else "test"
        pid = str(100 + i)
        color = colors[i % 4]
        problems[pid] = {
            "question": "What colour is the shape?", "choices": [colors[(i + 1) % 4], color], "answer": 1,
            "hint": "", "image": "image.png" if i % 3 else None, "lecture": "Shapes have colours.",
            "solution": f"The shape is {color}.", "split": split,
        }  # fmt: skip
        splits[split].append(pid)
        if problems[pid]["image"]:
            os.makedirs(os.path.join(root, "images", split, pid), exist_ok=True)
            draw(color, "square").save(os.path.join(root, "images", split, pid, "image.png"))
    json.dump(problems, open(os.path.join(root, "problems.json"), "w"))
    json.dump(splits, open(os.path.join(root, "pid_splits.json"), "w"))
    return root


@pytest.mark.slow
def test_scienceqa_finetune_then_multi_gpu_eval_pair(tiny, tmp_path):
    """finetune_sqa.sh's flags (12 epochs -> 2 steps here) on converted ScienceQA data, then
    `bash scripts/sqa_eval_batch.sh` with two "GPUs" (two chunks, two processes) and `bash scripts/sqa_eval_gather.sh`."""
    from llava.train.train import train as run_train

    sqa = tiny_scienceqa(str(tmp_path / "scienceqa"))
    for split in ("train", "test"):
        subprocess.run(["python", "scripts/convert_sqa_to_llava.py", "convert_to_llava", "--base-dir", sqa,
                        "--split", split, "--prompt-format", "QCM-LEA"], cwd=REPO, check=True, capture_output=True,
                       env={**os.environ, "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"]})  # fmt: skip
    projector = tiny.new_dir("sqa-projector")
    stage1 = tiny.model("llama", mm_projector_type="linear")
    torch.save({f"model.mm_projector.{k}": v for k, v in stage1.get_model().mm_projector.state_dict().items()},
               os.path.join(projector, "mm_projector.bin"))  # fmt: skip
    out = str(tmp_path / "sqa-model")
    env = {"MODEL": tiny.decoder_dirs["llama"], "SQA_DIR": sqa, "PROJECTOR": os.path.join(projector, "mm_projector.bin"),
           "OUTPUT_DIR": out}  # fmt: skip
    (command,) = script_commands(os.path.join(REPO, "scripts", "finetune_sqa.sh"), env=env)
    args = train_args(command) + QUICK + ["--vision_tower", tiny.clip_dir]
    trainer = run_train(args)
    assert trainer.args.num_train_epochs == 12 and trainer.state.global_step == 2

    answers = str(tmp_path / "answers")
    eval_env = {"MODEL_PATH": out, "SQA_DIR": sqa, "ANSWERS": answers, "CUDA_VISIBLE_DEVICES": "0,1"}
    run_script("sqa_eval_batch.sh", eval_env)
    assert sorted(os.listdir(answers)) == ["2_0.jsonl", "2_1.jsonl"]
    log = run_script("sqa_eval_gather.sh", eval_env)
    assert "Total: 4, Correct:" in log
    result = json.load(open(os.path.join(answers, "result.json")))
    assert result["count"] == 4 and sorted(result["results"]) == ["106", "107", "108", "109"]
    assert Image.open(os.path.join(sqa, "images", "test", "107", "image.png")).size == (32, 32)
