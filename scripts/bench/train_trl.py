"""The training benchmark's TRL peer: the seed-003 recipe, `LlavaForConditionalGeneration` + TRL's `SFTTrainer` with
its vision-language collator (`DataCollatorForVisionLanguageModeling`), as a user of llava-hf + TRL would run it.

It starts from our starting weights, exported as a user would (`llava.model.convert_hf.export_to_hf`: llava-hf
weights, `LlavaProcessor`, the `llava_v1` chat template), reads the same records as HF `messages` / `images`, and lets
TRL's collator render, tokenize and process the images on the fly (its processor: CLIP's resize and centre crop).
TRL's defaults are kept except where they would change the work per step compared with ours: fp32 (TRL defaults to
bf16 mixed precision) and no gradient checkpointing (TRL turns it on; ours is off). TRL supervises every token of a
conversation by default; with `assistant_only_loss` it needs `{% generation %}` markers our template does not have.
Its loss at the shared start is checked against ours on the same TRL-collated batch (same ids, pixels and labels).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable

from llava.constants import DEFAULT_IMAGE_TOKEN


def hf_messages(messages: list[tuple[str, str]]) -> list[dict]:
    """Our (role, text) turns as HF messages whose content parts put an image where each `<image>` marker is."""
    out = []
    for role, text in messages:
        parts: list[dict] = []
        for k, piece in enumerate(text.split(DEFAULT_IMAGE_TOKEN)):
            if k:
                parts.append({"type": "image"})
                piece = piece.removeprefix("\n")  # the template renders an image part as "<image>\n"
            if piece:
                parts.append({"type": "text", "text": piece})
        out.append({"role": role, "content": parts})
    return out


def messages_dataset(records):
    """Records as a `datasets.Dataset` of TRL vision-language examples: `messages` and `images` (decoded to PIL
    when an example is read, as a hub dataset's image column is)."""
    import datasets

    data = {"messages": [hf_messages(r.messages) for r in records], "images": [list(r.images) for r in records]}
    return datasets.Dataset.from_dict(data).cast_column("images", datasets.List(datasets.Image(mode="RGB")))


def ours_batch(batch: dict, image_id: int, pad_id: int) -> dict:
    """A TRL-collated batch as our model's input: each run of image tokens back to one `<image>` marker."""
    import torch

    from llava.constants import IGNORE_INDEX, IMAGE_TOKEN_INDEX

    rows = []
    for ids, labels, mask in zip(batch["input_ids"], batch["labels"], batch["attention_mask"]):
        ids, labels = ids[mask.bool()].tolist(), labels[mask.bool()].tolist()
        keep_ids, keep_labels = [], []
        for i, (t, lab) in enumerate(zip(ids, labels)):
            if t == image_id:
                if i == 0 or ids[i - 1] != image_id:
                    keep_ids.append(IMAGE_TOKEN_INDEX)
                    keep_labels.append(IGNORE_INDEX)
                continue
            keep_ids.append(t)
            keep_labels.append(lab)
        rows.append((keep_ids, keep_labels))
    width = max(len(r[0]) for r in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for r, (ids, lab) in enumerate(rows):
        input_ids[r, : len(ids)], labels[r, : len(ids)], mask[r, : len(ids)] = torch.tensor(ids), torch.tensor(lab), 1
    out = {"input_ids": input_ids, "labels": labels, "attention_mask": mask}
    if "pixel_values" in batch:
        out["images"] = batch["pixel_values"]
    return out


def run_trl_recipe(spec: dict, meter, train_flags: Callable, loss_of: Callable, last_loss: Callable):
    """Train with TRL's `SFTTrainer` for `spec["steps"]` steps, metered by `meter`; the run's `RunResult`."""
    import transformers
    from trl import SFTConfig, SFTTrainer

    from llava.model.convert_hf import export_to_hf
    from llava.train.args import parse_args
    from llava.train.data import load_records
    from llava.train.train import attach_vision, load_model, load_tokenizer

    with tempfile.TemporaryDirectory(prefix="bench-trl-") as out:
        model_args, data_args, training_args = parse_args(train_flags(spec, out))
        transformers.set_seed(training_args.seed)
        tokenizer = load_tokenizer(model_args, training_args)
        ours = load_model(model_args, training_args, "sdpa")
        attach_vision(ours, model_args, data_args, training_args)
        ours.config.tokenizer_padding_side = tokenizer.padding_side
        ours.config.tokenizer_model_max_length = tokenizer.model_max_length
        ours_dir, hf_dir = os.path.join(out, "ours"), os.path.join(out, "hf")
        ours.save_pretrained(ours_dir)
        tokenizer.save_pretrained(ours_dir)
        export_to_hf(ours_dir, hf_dir, conv_mode="llava_v1")
        model = transformers.LlavaForConditionalGeneration.from_pretrained(hf_dir, dtype="float32")
        processor = transformers.AutoProcessor.from_pretrained(hf_dir)
        model.config.use_cache = False
        model.model.vision_tower.requires_grad_(False)  # stage 2: the tower is frozen, projector and LLM learn
        dataset = messages_dataset(load_records(data_args.data_path, data_args.image_folder, "none"))
        config = SFTConfig(
            output_dir=out,
            max_steps=spec["steps"],
            per_device_train_batch_size=spec["batch_size"],
            gradient_accumulation_steps=1,
            learning_rate=2e-5,
            weight_decay=0.0,
            warmup_steps=0.03,
            lr_scheduler_type="cosine",
            logging_steps=spec["steps"],
            save_strategy="no",
            dataloader_num_workers=0,
            report_to="none",
            seed=training_args.seed,
            disable_tqdm=True,
            max_length=2048,
            gradient_checkpointing=False,
            bf16=spec["device"] == "cuda",
            use_cpu=spec["device"] != "cuda",
        )
        trainer = SFTTrainer(model=model, args=config, train_dataset=dataset, processing_class=processor)
        batch = trainer.data_collator([dataset[i] for i in range(min(len(dataset), spec["batch_size"]))])
        # Same start: our model's loss on TRL's batch (image-token runs back to markers), over our vocabulary
        # (llava-hf's has one more row, `<image>`, which no label uses).
        # TRL's labels include the image-token positions (it supervises every token); ours never supervises them, so
        # they are left out of both losses here.
        vocab, parity = ours.config.vocab_size, dict(batch)
        parity["labels"] = batch["labels"].masked_fill(batch["input_ids"] == model.config.image_token_id, -100)
        start_diff = abs(
            loss_of(model, parity, vocab)
            - loss_of(ours, ours_batch(batch, model.config.image_token_id, tokenizer.pad_token_id))
        )
        del ours
        meter.attach(model, model.model.language_model)
        trainer.add_callback(meter.callback())
        trainer.train()
    result = meter.result("trl", last_loss(trainer))
    result.start_loss_diff = start_diff
    return result
