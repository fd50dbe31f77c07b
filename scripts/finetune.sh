#!/bin/bash
# Stage 2 of the LLaVA v1.0 era (before LLaVA-1.5), LLaVA-Lightning schedule (1 epoch on
# llava_instruct_80k.json), from the stage-1 projector of scripts/pretrain.sh;
# global batch 128 (16 per GPU x 8 GPUs), lr 2e-5. For LLaVA-1.5 use scripts/v1_5/finetune.sh.
#
#   PROMPT_VERSION=v1 MODEL_VERSION=vicuna-v1-3-7b bash scripts/finetune.sh
#   PROMPT_VERSION=llava_llama_2 MODEL_VERSION=llama-2-7b-chat bash scripts/finetune.sh
set -e

PROMPT_VERSION=${PROMPT_VERSION:-v1}
MODEL_VERSION=${MODEL_VERSION:-vicuna-v1-3-7b}
DATA_PATH=${DATA_PATH:-./playground/data/llava_instruct_80k.json}
IMAGE_FOLDER=${IMAGE_FOLDER:-./playground/data/coco/train2017}

deepspeed llava/train/train_mem.py \
    --deepspeed ./scripts/zero2.json \
    --model_name_or_path ./checkpoints/$MODEL_VERSION \
    --version $PROMPT_VERSION \
    --data_path $DATA_PATH \
    --image_folder $IMAGE_FOLDER \
    --vision_tower openai/clip-vit-large-patch14 \
    --pretrain_mm_mlp_adapter ./checkpoints/llava-$MODEL_VERSION-pretrain/mm_projector.bin \
    --mm_vision_select_layer -2 \
    --mm_use_im_start_end False \
    --mm_use_im_patch_token False \
    --bf16 True \
    --output_dir ./checkpoints/llava-$MODEL_VERSION-finetune \
    --num_train_epochs 1 \
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
