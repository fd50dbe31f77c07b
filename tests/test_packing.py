"""Sequence packing (`--packing True`): bins fit and keep modalities apart, and every sample's loss in a packed row is
its loss alone (fp32, within 1e-5), for SDPA and eager attention, in training with LoRA and the modality-grouped
sampler, and under DeepSpeed ZeRO-3 on 2 CPU ranks.

Run as a script under torchrun it is the ZeRO-3 test's driver: it trains with packing, then every rank compares the
per-sample losses of packed rows with those of the samples alone and rank 0 writes the largest difference:

    torchrun --nproc_per_node=2 tests/test_packing.py RESULT_JSON --deepspeed scripts/zero3.json <train flags>
"""

from __future__ import annotations

import json
import os
import random
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from llava.constants import IGNORE_INDEX  # noqa: E402
from llava.train.packing import PackedCollator, PackedDataset, best_fit_decreasing, pack_samples  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOLERANCE = 1e-5  # fp32: the bound on |packed - alone| per sample


# ----------------------------------------------------------------------------------------------------- bin packing


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_best_fit_decreasing_fits_every_sample_once(seed):
    rng = random.Random(seed)
    lengths = [rng.randint(1, 100) for _ in range(300)]
    bins = best_fit_decreasing(lengths, 128)
    assert sorted(i for b in bins for i in b) == list(range(300))
    assert all(sum(lengths[i] for i in b) <= 128 for b in bins)
    lower_bound = -(-sum(lengths) // 128)
    assert len(bins) <= lower_bound * 1.1 + 1  # best fit decreasing stays within a few bins of the optimum here
    with pytest.raises(ValueError, match="more than the row length"):
        best_fit_decreasing([5, 200], 128)


def test_pack_by_modality_keeps_rows_of_one_kind():
    lengths = [30, -20, 50, -10, 40, -60, 25, -5]
    for by_modality, mixed_ok in ((True, False), (False, True)):
        bins = pack_samples(lengths, 100, by_modality=by_modality)
        assert sorted(i for b in bins for i in b) == list(range(len(lengths)))
        kinds = [{lengths[i] > 0 for i in b} for b in bins]
        assert mixed_ok or all(len(k) == 1 for k in kinds)
    assert len(pack_samples(lengths, 100)) == 3  # 240 positions: mixed rows fill 3 rows


# ------------------------------------------------------------------------------------------- per-sample loss parity


def build_dataset(tiny, model, data_path: str, folder: str, max_length: int = 256):
    from llava.train.data import ImageTokenCounter, LazySupervisedDataset, load_records
    from llava.train.preprocess import Preprocessor

    return LazySupervisedDataset(
        load_records(data_path, folder),
        Preprocessor(tiny.tokenizer, "v1", False),
        max_length=max_length,
        image_processor=model.get_vision_tower().image_processor,
        image_tokens=ImageTokenCounter(model),
    )


def per_sample_losses(model, batch: dict) -> list[float]:
    """Mean cross-entropy of each sample of a packed batch, read from the model's logits of the whole batch."""
    with torch.no_grad():
        logits = model(**batch).logits.float()
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        _, positions, _, _, _, labels = base.prepare_inputs_labels_for_multimodal(
            batch["input_ids"], batch["position_ids"], None, None, batch["labels"], batch.get("images"),
            batch.get("image_sizes"),
        )  # fmt: skip
    out = []
    for row in range(logits.shape[0]):
        pos = positions[row]
        starts = [0, *((pos[1:] - pos[:-1] != 1).nonzero().flatten() + 1).tolist(), len(pos)]
        for a, b in zip(starts[:-1], starts[1:]):
            target = labels[row, a + 1 : b]
            if (target != IGNORE_INDEX).any():  # the padding sample has none
                ce = torch.nn.functional.cross_entropy(logits[row, a : b - 1], target, ignore_index=IGNORE_INDEX)
                out.append(float(ce))
    return out


def alone_losses(model, dataset: PackedDataset, rows: list[int]) -> list[float]:
    """Each sample of `rows`, in packed order, run on its own through the plain (unpacked) path."""
    out = []
    for r in rows:
        for i in dataset.bins[r]:
            item = dataset.dataset[i]
            kwargs = {"input_ids": item["input_ids"][None], "labels": item["labels"][None]}
            if item["images"]:
                kwargs.update(images=torch.stack(item["images"]), image_sizes=item["image_sizes"])
            with torch.no_grad():
                out.append(float(model(**kwargs).loss))
    return out


def compare(model, dataset: PackedDataset, pad_token_id: int, rows_per_batch: int = 3) -> tuple[float, int]:
    """Largest |packed - alone| over every sample of `dataset`, and how many samples were compared."""
    collate = PackedCollator(pad_token_id)
    packed, alone = [], []
    for first in range(0, len(dataset), rows_per_batch):
        rows = list(range(first, min(first + rows_per_batch, len(dataset))))
        packed += per_sample_losses(model, collate([dataset[r] for r in rows]))
        alone += alone_losses(model, dataset, rows)
    assert len(packed) == len(alone)
    return max(abs(a - b) for a, b in zip(packed, alone)), len(packed)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_losses_equal_unpacked(tiny, tmp_path, attn):
    from train_helpers import make_dataset

    model = tiny.model("llama", seed=3)
    model.set_attn_implementation(attn)
    data_path, folder = make_dataset(str(tmp_path), n_image=6, n_text=5, n_multi=3, style="chat")
    dataset = PackedDataset(build_dataset(tiny, model, data_path, folder, max_length=512))
    assert len(dataset) < len(dataset.dataset)  # rows really hold several samples
    assert max(len(b) for b in dataset.bins) >= 3
    worst, n = compare(model, dataset, tiny.tokenizer.pad_token_id)
    assert n == 14
    assert worst < TOLERANCE, worst


def test_packed_row_layout(tiny, tmp_path):
    """Positions restart per sample, the first label of each sample is ignored, images keep their order, and the
    spliced positions give each image's features the positions after its marker."""
    from train_helpers import make_dataset

    model = tiny.model("llama", seed=3)
    data_path, folder = make_dataset(str(tmp_path), n_image=4, n_text=2, n_multi=2, style="chat")
    dataset = PackedDataset(build_dataset(tiny, model, data_path, folder, max_length=512))
    row = dataset[0]
    members = dataset.bins[0]
    lengths = [len(dataset.dataset[i]["input_ids"]) for i in members]
    starts = [sum(lengths[:k]) for k in range(len(lengths))]
    assert (row["position_ids"] == 0).nonzero().flatten().tolist() == starts
    assert all(int(row["labels"][s]) == IGNORE_INDEX for s in starts)
    assert sum(len(dataset.dataset[i]["images"]) for i in members) == len(row["images"])

    batch = PackedCollator(tiny.tokenizer.pad_token_id)([dataset[0], dataset[1]])
    assert "attention_mask" not in batch
    with torch.no_grad():
        _, positions, mask, _, embeds, labels = model.prepare_inputs_labels_for_multimodal(
            batch["input_ids"], batch["position_ids"], None, None, batch["labels"], batch.get("images"), None
        )
    assert mask is None and positions.shape == labels.shape == embeds.shape[:2]
    expanded = [abs(dataset.sample_lengths[i]) for i in members]
    first_row = positions[0]
    begin = 0
    for n in expanded:  # each sample: 0..n-1, image features included
        assert first_row[begin : begin + n].tolist() == list(range(n))
        begin += n


# --------------------------------------------------------------------------------------------------- in training


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_training_with_packing(tiny, tmp_path, lora):
    """`--packing True` trains (mixed rows, or one modality per row with the modality-grouped sampler), with and
    without LoRA; the rows it trained on are fewer than the samples, and the loss goes down."""
    from train_helpers import logged_losses, make_dataset, tiny_flags

    from llava.train.train import train

    data_path, folder = make_dataset(str(tmp_path / "data"), n_image=10, n_text=6, style="chat")
    extra = {"lora_enable": "True", "lora_r": "4", "lora_alpha": "8"} if lora else {}
    flags = tiny_flags(
        tiny,
        data_path,
        folder,
        str(tmp_path / "out"),
        version="v1",
        packing="True",
        group_by_modality_length=str(lora),
        per_device_train_batch_size=2,
        num_train_epochs=3,
        learning_rate=5e-3,
        model_max_length=512,
        **extra,
    )
    trainer = train(flags)
    dataset = trainer.train_dataset
    assert isinstance(dataset, PackedDataset) and len(dataset) < 16
    if lora:
        assert all(len({dataset.sample_lengths[i] > 0 for i in b}) == 1 for b in dataset.bins)
    losses = logged_losses(trainer)
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0]
    worst, _ = compare(trainer.model.eval(), dataset, tiny.tokenizer.pad_token_id)
    assert worst < TOLERANCE, worst


@pytest.mark.slow
def test_packing_under_zero3_two_ranks(tiny, tmp_path):
    """ZeRO-3 on 2 CPU ranks trains with packing, and the trained, partitioned model gives every sample the same
    loss packed as alone."""
    pytest.importorskip("deepspeed")
    from test_train_deepspeed import torchrun
    from train_helpers import make_dataset, tiny_flags

    data_path, folder = make_dataset(str(tmp_path / "data"), n_image=7, n_text=5, n_multi=2, style="chat")
    result_file = str(tmp_path / "result.json")
    flags = tiny_flags(
        tiny,
        data_path,
        folder,
        str(tmp_path / "out"),
        version="v1",
        packing="True",
        group_by_modality_length="True",
        per_device_train_batch_size=1,
        model_max_length=512,
        save_strategy="no",
    )
    result = torchrun([os.path.abspath(__file__), result_file, "--deepspeed", "./scripts/zero3.json", *flags])
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    report = json.load(open(result_file))
    assert report["samples"] == 14 and report["rows"] < 14
    assert report["worst"] < TOLERANCE, report


def _drive(result_out: str, argv: list[str]) -> None:
    from llava.train.train import train
    from llava.train.train_mem import pick_attention

    attn, why = pick_attention()
    trainer = train(argv, attn_implementation=attn, attn_reason=why)
    model = trainer.model.eval()
    worst, n = compare(model, trainer.train_dataset, trainer.processing_class.pad_token_id)  # every rank: ZeRO-3
    if trainer.args.process_index == 0:
        with open(result_out, "w") as f:
            json.dump({"worst": worst, "samples": n, "rows": len(trainer.train_dataset)}, f)


if __name__ == "__main__":
    _drive(sys.argv[1], sys.argv[2:])
