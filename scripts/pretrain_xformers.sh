#!/bin/bash
# scripts/pretrain.sh for GPUs without FlashAttention (V100, T4): llava/train/train_xformers.py (PyTorch SDPA,
# memory-efficient kernel), no bf16 and no TF32 (pre-Ampere cards have neither), per-GPU batch 4 with 4
# accumulation steps (global batch 128 on 8 GPUs).
#
#   MODEL_VERSION=vicuna-v1-3-7b bash scripts/pretrain_xformers.sh
set -e

MODEL_VERSION=${MODEL_VERSION:-vicuna-v1-3-7b}
########### DO NOT CHANGE: stage 1 uses the plain template for every model ###########
PROMPT_VERSION=plain
DATA_PATH=${DATA_PATH:-./playground/data/LLaVA-Pretrain/blip_laion_cc_sbu_558k.json}
IMAGE_FOLDER=${IMAGE_FOLDER:-./playground/data/LLaVA-Pretrain/images}

deepspeed llava/train/train_xformers.py \
    --deepspeed ./scripts/zero2.json \
    --model_name_or_path ./checkpoints/$MODEL_VERSION \
    --version $PROMPT_VERSION \
    --data_path $DATA_PATH \
    --image_folder $IMAGE_FOLDER \
    --vision_tower openai/clip-vit-large-patch14 \
    --tune_mm_mlp_adapter True \
    --mm_vision_select_layer -2 \
    --mm_use_im_start_end False \
    --mm_use_im_patch_token False \
    --bf16 False \
    --output_dir ./checkpoints/llava-$MODEL_VERSION-pretrain \
    --num_train_epochs 1 \
    --per_device_train_batch_size 4 \
    --per_device_eval_batch_size 4 \
    --gradient_accumulation_steps 4 \
    --evaluation_strategy "no" \
    --save_strategy "steps" \
    --save_steps 24000 \
    --save_total_limit 1 \
    --learning_rate 2e-3 \
    --weight_decay 0. \
    --warmup_ratio 0.03 \
    --lr_scheduler_type "cosine" \
    --logging_steps 1 \
    --tf32 False \
    --model_max_length 2048 \
    --gradient_checkpointing True \
    --dataloader_num_workers 4 \
    --lazy_preprocess True \
    --report_to wandb \
    "$@"
