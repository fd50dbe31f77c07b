#!/bin/bash
# Stage 1 of the LLaVA v1.0 era (before LLaVA-1.5): projector pretraining of a Vicuna v1.3 / LLaMA-2 chat model on
# the LCS-558K (or CC3M-595K) captions, global batch 128 (16 per GPU x 8 GPUs), lr 2e-3, linear projector,
# CLIP-L/14 at 224 px. For LLaVA-1.5 use scripts/v1_5/pretrain.sh.
#
#   MODEL_VERSION=vicuna-v1-3-7b bash scripts/pretrain.sh     # or MODEL_VERSION=llama-2-7b-chat
set -e

MODEL_VERSION=${MODEL_VERSION:-vicuna-v1-3-7b}
########### DO NOT CHANGE: stage 1 uses the plain template for every model ###########
PROMPT_VERSION=plain
DATA_PATH=${DATA_PATH:-./playground/data/LLaVA-Pretrain/blip_laion_cc_sbu_558k.json}
IMAGE_FOLDER=${IMAGE_FOLDER:-./playground/data/LLaVA-Pretrain/images}

deepspeed llava/train/train_mem.py \
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
    --bf16 True \
    --output_dir ./checkpoints/llava-$MODEL_VERSION-pretrain \
    --num_train_epochs 1 \
    --per_device_train_batch_size 16 \
    --per_device_eval_batch_size 4 \
    --gradient_accumulation_steps 1 \
    --evaluation_strategy "no" \
    --save_strategy "steps" \
    --save_steps 24000 \
    --save_total_limit 1 \
    --learning_rate 2e-3 \
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
