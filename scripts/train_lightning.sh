#!/bin/bash
# LLaVA-Lightning (the original README's v0-era recipe): feature alignment on the LCS-558K subset, then one epoch of
# visual instruction tuning on llava_instruct_80k.json; about 3 hours on 8x A100 for a 7B Vicuna.
#
#   bash ./scripts/train_lightning.sh {v0,v1} [extra flags for both stages, e.g. --report_to none]
#
# v0 / v1 is the conversation template of your Vicuna weights (`v0` for Vicuna v0, `v1` for Vicuna v1.x); it is
# used in both stages and recorded in the checkpoints. Set the paths below (or in the environment).
# Hyperparameters as released: global batch 128 in both stages (16 per GPU x 8 GPUs; with NPROC other than 8 the
# gradient accumulation keeps it at 128), lr 2e-3 then 2e-5, 1 epoch each, max length 2048, weight decay 0.
# Stage 1 also trains the <im_start>/<im_end> embedding rows (--mm_use_im_start_end); stage 2 restores them from the
# projector file and shards the model with FSDP over the LLaMA decoder layers (see docs/Training.md, "FSDP").
set -e

WEIGHT_VERSION=$1
case "$WEIGHT_VERSION" in
    v0|v1) ;;
    *) echo "usage: bash ./scripts/train_lightning.sh {v0,v1} [extra flags]" >&2; exit 2 ;;
esac
shift

MODEL=${MODEL:-./checkpoints/llama-vicuna-7b}
VISION_TOWER=${VISION_TOWER:-openai/clip-vit-large-patch14}
PRETRAIN_DATA=${PRETRAIN_DATA:-./playground/data/LLaVA-Pretrain/blip_laion_cc_sbu_558k.json}
PRETRAIN_IMAGES=${PRETRAIN_IMAGES:-./playground/data/LLaVA-Pretrain/images}
INSTRUCT_DATA=${INSTRUCT_DATA:-./playground/data/llava_instruct_80k.json}
INSTRUCT_IMAGES=${INSTRUCT_IMAGES:-./playground/data/coco/train2017}
PRETRAIN_OUT=${PRETRAIN_OUT:-./checkpoints/llava-lightning-7b-pretrain}
PROJECTOR=${PROJECTOR:-./checkpoints/mm_projector/llava-lightning-7b-pretrain.bin}
OUTPUT_DIR=${OUTPUT_DIR:-./checkpoints/llava-lightning-7b-$WEIGHT_VERSION}
NPROC=${NPROC:-8}
MASTER_PORT=${MASTER_PORT:-25001}
ACCUM=$((128 / (16 * NPROC)))
if [ "$ACCUM" -lt 1 ]; then ACCUM=1; fi

# Pretraining (2 hours)
torchrun --nnodes=1 --nproc_per_node=$NPROC --master_port=$MASTER_PORT \
    llava/train/train_mem.py \
    --model_name_or_path $MODEL \
    --version $WEIGHT_VERSION \
    --data_path $PRETRAIN_DATA \
    --image_folder $PRETRAIN_IMAGES \
    --vision_tower $VISION_TOWER \
    --tune_mm_mlp_adapter True \
    --mm_vision_select_layer -2 \
    --mm_use_im_start_end \
    --bf16 True \
    --output_dir $PRETRAIN_OUT \
    --num_train_epochs 1 \
    --per_device_train_batch_size 16 \
    --per_device_eval_batch_size 4 \
    --gradient_accumulation_steps $ACCUM \
    --evaluation_strategy "no" \
    --save_strategy "steps" \
    --save_steps 2400 \
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

# Extract projector features (with the trained <im_start>/<im_end> rows)
python scripts/extract_mm_projector.py \
    --model_name_or_path $PRETRAIN_OUT \
    --output $PROJECTOR

# Visual instruction tuning (1 hour)
torchrun --nnodes=1 --nproc_per_node=$NPROC --master_port=$MASTER_PORT \
    llava/train/train_mem.py \
    --model_name_or_path $MODEL \
    --version $WEIGHT_VERSION \
    --data_path $INSTRUCT_DATA \
    --image_folder $INSTRUCT_IMAGES \
    --vision_tower $VISION_TOWER \
    --pretrain_mm_mlp_adapter $PROJECTOR \
    --mm_vision_select_layer -2 \
    --mm_use_im_start_end True \
    --bf16 True \
    --output_dir $OUTPUT_DIR \
    --num_train_epochs 1 \
    --per_device_train_batch_size 16 \
    --per_device_eval_batch_size 4 \
    --gradient_accumulation_steps $ACCUM \
    --evaluation_strategy "no" \
    --save_strategy "steps" \
    --save_steps 5000 \
    --save_total_limit 1 \
    --learning_rate 2e-5 \
    --weight_decay 0. \
    --warmup_ratio 0.03 \
    --lr_scheduler_type "cosine" \
    --logging_steps 1 \
    --tf32 True \
    --fsdp "full_shard auto_wrap" \
    --fsdp_transformer_layer_cls_to_wrap 'LlamaDecoderLayer' \
    --model_max_length 2048 \
    --gradient_checkpointing True \
    --dataloader_num_workers 4 \
    --lazy_preprocess True \
    --report_to wandb \
    "$@"
