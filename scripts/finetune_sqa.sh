#!/bin/bash
# ScienceQA fine-tuning of the original LLaVA (the original's finetune_sqa.sh; NOT a LLaVA-1.5 recipe): 12 epochs on
# the ScienceQA training split in LLaVA format, from a stage-1 projector, global batch 128 (16 per GPU x 8 GPUs).
#
#   bash scripts/finetune_sqa.sh [extra flags, e.g. --report_to none]
#
# Make the data with scripts/convert_sqa_to_llava.py (`convert_to_llava --split train --prompt-format QCM-LEA`).
# QCM-LEA answers end with "The answer is X.", which llava/eval/eval_science_qa.py scores directly; the v0 paper
# runs used QCM-LEPA (SQA_FORMAT=QCM-LEPA), whose answers end "###\nANSWER: X." and were scored with the original's
# `--answer-prompter` second pass (model_vqa_science has it; see docs/Migration.md). Score with scripts/sqa_eval_batch.sh + sqa_eval_gather.sh.
set -e

PROMPT_VERSION=${PROMPT_VERSION:-v1}
MODEL=${MODEL:-lmsys/vicuna-13b-v1.3}
PROJECTOR=${PROJECTOR:-./checkpoints/huggingface/liuhaotian/llava-pretrain-vicuna-13b-v1.3/mm_projector.bin}
SQA_DIR=${SQA_DIR:-./playground/data/scienceqa}
SQA_FORMAT=${SQA_FORMAT:-QCM-LEA}
OUTPUT_DIR=${OUTPUT_DIR:-./checkpoints/llava-vicuna-13b-v1.3-pretrain_lcs558k_plain-ScienceQA_${SQA_FORMAT//-/_}-12e}

deepspeed llava/train/train_mem.py \
    --deepspeed ./scripts/zero2.json \
    --model_name_or_path $MODEL \
    --version $PROMPT_VERSION \
    --data_path $SQA_DIR/llava_train_$SQA_FORMAT.json \
    --image_folder $SQA_DIR/images/train \
    --vision_tower openai/clip-vit-large-patch14 \
    --pretrain_mm_mlp_adapter $PROJECTOR \
    --mm_vision_select_layer -2 \
    --mm_use_im_start_end False \
    --mm_use_im_patch_token False \
    --bf16 True \
    --output_dir $OUTPUT_DIR \
    --num_train_epochs 12 \
    --per_device_train_batch_size 16 \
    --per_device_eval_batch_size 4 \
    --gradient_accumulation_steps 1 \
    --evaluation_strategy "no" \
    --save_strategy "steps" \
    --save_steps 50000 \
    --save_total_limit 1 \
    --learning_rate 2e-5 \
    --weight_decay 0. \
    --warmup_ratio 0.03 \
    --lr_scheduler_type "cosine" \
    --logging_steps 1 \
    --tf32 True \
    --model_max_length 2048 \
    --gradient_checkpointing True \
    --dataloader_num_workers 4 \
    --lazy_preprocess True \
    --report_to wandb \
    "$@"
