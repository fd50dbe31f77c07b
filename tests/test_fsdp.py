"""FSDP launches of the seeds (`--fsdp "full_shard auto_wrap" --fsdp_transformer_layer_cls_to_wrap LlamaDecoderLayer`):
the flags map onto transformers 5's FSDP2 settings, the wrapped class is checked against the model, and a real
2-rank run on CPU (torchrun, gloo) trains, shards the decoder layers and saves a model that reloads exactly."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys

import pytest
import torch
from test_mpt import build_tiny_mpt
from train_helpers import free_port, logits_of, make_dataset, run_watched, tiny_flags

from llava.model import DECODERS
from llava.model.builder import detect_checkpoint_kind, load_pretrained_model
from llava.train.args import parse_args
from llava.train.train import check_fsdp

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DRIVER = os.path.join(REPO, "tests", "train_helpers.py")
SEED_FSDP = "--fsdp 'full_shard auto_wrap' --fsdp_transformer_layer_cls_to_wrap 'LlamaDecoderLayer'"
BASE = "--model_name_or_path m --vision_tower v --data_path d --output_dir o "


def training_args(flags: str):
    return parse_args(shlex.split(BASE + flags))[2]


def test_seed_fsdp_flags_become_fsdp2_settings(tmp_path):
    args = training_args(SEED_FSDP + " --gradient_checkpointing True")
    assert args.fsdp is True and args.fsdp_config["transformer_layer_cls_to_wrap"] == ["LlamaDecoderLayer"]
    plugin = args.fsdp_plugin_args
    assert plugin["fsdp_version"] == 2 and plugin["reshard_after_forward"] is True
    assert plugin["auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"
    assert plugin["transformer_cls_names_to_wrap"] == "LlamaDecoderLayer"
    plugin = training_args("--fsdp 'shard_grad_op auto_wrap offload'").fsdp_plugin_args
    assert plugin["reshard_after_forward"] is False and plugin["cpu_offload"] is True
    # a --fsdp_config file and the separate flag combine
    config = tmp_path / "fsdp.json"
    config.write_text(json.dumps({"fsdp_state_dict_type": "FULL_STATE_DICT", "min_num_params": 0}))
    args = training_args(f"--fsdp 'full_shard auto_wrap' --fsdp_config {config} "
                         "--fsdp_transformer_layer_cls_to_wrap MistralDecoderLayer")  # fmt: skip
    assert args.fsdp_plugin_args["transformer_cls_names_to_wrap"] == "MistralDecoderLayer"
    with pytest.raises(ValueError, match="needs FSDP"):
        training_args("--fsdp_transformer_layer_cls_to_wrap LlamaDecoderLayer")
    with pytest.raises(ValueError, match="hybrid_shard is not available with FSDP2"):
        training_args("--fsdp 'hybrid_shard auto_wrap'")


def test_wrapped_class_is_checked_against_the_model(tiny, tmp_path):
    mistral = tiny.model("mistral")
    with pytest.raises(ValueError, match="no `LlamaDecoderLayer` layer; this model's decoder layer is `MistralDec"):
        check_fsdp(mistral, training_args(SEED_FSDP), "full")
    args = training_args("--fsdp 'full_shard auto_wrap' --fsdp_transformer_layer_cls_to_wrap MistralDecoderLayer")
    check_fsdp(mistral, args, "full")
    # the original's own MPT class name (`MPTBlock`, scripts/train_lightning_mpt.sh) names transformers' MptBlock
    build_tiny_mpt(str(tmp_path / "mpt"), tiny.tokenizer)
    mpt = DECODERS["mpt"].causal_lm_cls.from_pretrained(str(tmp_path / "mpt"))
    args = training_args("--fsdp 'full_shard auto_wrap' --fsdp_transformer_layer_cls_to_wrap MPTBlock")
    check_fsdp(mpt, args, "full")
    assert args.fsdp_plugin_args["transformer_cls_names_to_wrap"] == "MptBlock"
    # stage 1 and LoRA save part of the model, which FSDP leaves sharded: refused before step 1
    with pytest.raises(ValueError, match="use DeepSpeed|Run it with DeepSpeed"):
        check_fsdp(mistral, args, "projector")


def torchrun(args: list[str]) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", WANDB_MODE="disabled", PYTHONWARNINGS="ignore")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc_per_node=2",
           f"--master_port={free_port()}", *args]  # fmt: skip
    return run_watched(cmd, idle_timeout=600, cwd=REPO, env=env)  # judged on progress, not on a total time


@pytest.mark.slow
def test_seed_fsdp_launch_on_two_cpu_ranks(tiny, tmp_path):
    """The seeds' stage-2 FSDP launch (torchrun + train_mem.py + --fsdp) on 2 CPU ranks runs to the end and saves
    complete checkpoints that reload to the trained numbers. On CPU accelerate does not shard (it applies FSDP on
    GPUs only): the run says so and trains as DDP; with GPUs each LlamaDecoderLayer becomes an FSDP unit."""
    data_path, folder = make_dataset(str(tmp_path / "data"), n_image=10, n_text=2, style="chat")
    out = str(tmp_path / "out")
    logits_file = str(tmp_path / "logits.pt")
    flags = tiny_flags(
        tiny, data_path, folder, out, version="v1", per_device_train_batch_size=2, max_steps=3, save_steps=2,
        learning_rate=1e-3, gradient_checkpointing=True, group_by_modality_length=True,
    )  # fmt: skip
    result = torchrun([DRIVER, logits_file, *flags, *shlex.split(SEED_FSDP)])
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-6000:]
    if torch.cuda.is_available():
        assert re.search(r"FSDP units: .*LlamaDecoderLayer x2", log), log[-3000:]
    else:
        assert "--fsdp on CPU: accelerate shards models on GPUs" in log and "FSDP units: none" in log, log[-3000:]
    assert json.load(open(os.path.join(out, "trainer_state.json")))["global_step"] == 3
    for path in (out, os.path.join(out, "checkpoint-2")):
        assert detect_checkpoint_kind(path).kind == "full"
    tokenizer, model, _, _ = load_pretrained_model(out, None, None, device="cpu")
    torch.testing.assert_close(logits_of(model, tokenizer), torch.load(logits_file), atol=1e-5, rtol=1e-5)


@pytest.mark.slow
@pytest.mark.skipif(
    not hasattr(torch.cpu.Stream, "record_event"),
    reason=f"torch {torch.__version__}'s FSDP2 cannot run on CPU ranks (torch.cpu.Stream has no record_event; torch "
    "2.6 fails in foreach_all_gather): only the oldest allowed torch, where FSDP runs on GPUs as accelerate uses it",
)
def test_fsdp2_shards_llava_on_gloo(tiny, tmp_path):
    """torch's FSDP2 itself runs on 2 CPU ranks over gloo: the LLaVA model (LLaMA, and MPT with its tied embedding),
    sharded with accelerate's wrap policy built from the seeds' flags, trains two steps on different data per rank
    and ends with exactly the weights of the unsharded model trained on both ranks' data."""
    mpt_dir = str(tmp_path / "mpt")
    build_tiny_mpt(mpt_dir, tiny.tokenizer)
    report = str(tmp_path / "report.json")
    runs = [("llama", tiny.decoder_dirs["llama"], "LlamaDecoderLayer"), ("mpt", mpt_dir, "MPTBlock")]
    result = torchrun([__file__, report, tiny.clip_dir, json.dumps(runs)])
    assert result.returncode == 0, (result.stdout + result.stderr)[-6000:]
    found = json.load(open(report))
    assert found["llama"]["units"] == {"LlamaDecoderLayer": 2, "LlavaLlamaForCausalLM": 1}, found
    assert found["mpt"]["units"] == {"MptBlock": 2, "LlavaMptForCausalLM": 1}, found
    for family in ("llama", "mpt"):
        assert found[family]["sharded"] and found[family]["max_diff"] < 1e-6, found


# ------------------------------------------------------------------------------ 2-rank driver (run by torchrun)


def _build(family: str, decoder_dir: str, clip_dir: str):
    from conftest import vision_args

    model = DECODERS[family].causal_lm_cls.from_pretrained(decoder_dir)
    torch.manual_seed(0)
    model.get_model().initialize_vision_modules(vision_args(clip_dir))
    model.config.image_aspect_ratio, model.config.tokenizer_padding_side = "square", "right"
    model.get_vision_tower().requires_grad_(False)
    return model


def _shard(model, args) -> dict[str, int]:
    """What accelerate's FSDP2 preparation does with the wrap policy: each matching layer, then the root."""
    from accelerate.utils import FullyShardedDataParallelPlugin
    from accelerate.utils.fsdp_utils import fsdp2_prepare_auto_wrap_policy, get_module_children_bottom_up
    from torch.distributed.fsdp import FSDPModule, fully_shard

    plugin = FullyShardedDataParallelPlugin(**args.fsdp_plugin_args)
    plugin.set_auto_wrap_policy(model)
    policy = fsdp2_prepare_auto_wrap_policy(plugin, model)
    for module in get_module_children_bottom_up(model)[:-1]:
        if policy(module):
            fully_shard(module, reshard_after_forward=plugin.reshard_after_forward)
    fully_shard(model, reshard_after_forward=plugin.reshard_after_forward)
    units = [type(m).__name__.removeprefix("FSDP") for m in model.modules() if isinstance(m, FSDPModule)]
    return {name: units.count(name) for name in dict.fromkeys(units)}


def _drive(report: str, clip_dir: str, runs: list) -> None:
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.tensor import DTensor
    from train_helpers import image_batch

    dist.init_process_group("gloo")
    rank, found = dist.get_rank(), {}
    batches = [torch.tensor([[1, 5, 6, -200, 7, 8, 9, 10, 11]]), torch.tensor([[1, 12, -200, 13, 14, 15, 16, 17, 18]])]
    for family, decoder_dir, layer_cls in runs:
        reference, model = _build(family, decoder_dir, clip_dir), _build(family, decoder_dir, clip_dir)
        args = training_args(f"--fsdp 'full_shard auto_wrap' --fsdp_transformer_layer_cls_to_wrap {layer_cls}")
        check_fsdp(model, args, "full")
        units = _shard(model, args)
        sharded = all(isinstance(p, DTensor) for p in model.parameters())
        optimizers = [
            torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2) for m in (reference, model)
        ]
        for _ in range(2):
            ids = batches[rank]  # each rank its own data; the reference sees both
            model(input_ids=ids, images=image_batch(rank), labels=ids.clamp(min=0)).loss.backward()
            loss = sum(
                reference(input_ids=b, images=image_batch(i), labels=b.clamp(min=0)).loss for i, b in enumerate(batches)
            )
            (loss / 2).backward()
            for optimizer in optimizers:
                optimizer.step()
                optimizer.zero_grad()
        full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if rank == 0:
            expected = reference.state_dict()
            diff = max((full[k] - expected[k]).abs().max().item() for k in full)
            found[family] = {"units": units, "sharded": sharded, "max_diff": diff, "keys": len(full) == len(expected)}
    if rank == 0:
        json.dump(found, open(report, "w"))
    dist.destroy_process_group()


if __name__ == "__main__":
    _drive(sys.argv[1], sys.argv[2], json.loads(sys.argv[3]))
