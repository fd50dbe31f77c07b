#!/bin/bash
# VQAv2 test-dev: answer on every GPU in CUDA_VISIBLE_DEVICES (one chunk each), merge, convert for EvalAI.
# Run from the repository root. Override with MODEL_PATH=... CKPT=... CONV_MODE=... (CONV_MODE= with an empty value
# uses the chat template stored in the checkpoint; vicuna_v1 is what the LLaVA-1.5 numbers were produced with).
set -e

MODEL_PATH=${MODEL_PATH:-liuhaotian/llava-v1.5-13b}
CKPT=${CKPT:-$(basename "$MODEL_PATH")}
CONV_MODE=${CONV_MODE-vicuna_v1}

gpu_list="${CUDA_VISIBLE_DEVICES:-0}"
IFS=',' read -ra GPULIST <<< "$gpu_list"
CHUNKS=${#GPULIST[@]}
SPLIT="llava_vqav2_mscoco_test-dev2015"
ANSWERS=./playground/data/eval/vqav2/answers/$SPLIT/$CKPT

pids=()
for IDX in $(seq 0 $((CHUNKS-1))); do
    CUDA_VISIBLE_DEVICES=${GPULIST[$IDX]} python -m llava.eval.model_vqa_loader \
        --model-path "$MODEL_PATH" \
        --question-file ./playground/data/eval/vqav2/$SPLIT.jsonl \
        --image-folder ./playground/data/eval/vqav2/test2015 \
        --answers-file $ANSWERS/${CHUNKS}_${IDX}.jsonl \
        --num-chunks $CHUNKS \
        --chunk-idx $IDX \
        --temperature 0 \
        --conv-mode "$CONV_MODE" &
    pids+=($!)
done
for pid in "${pids[@]}"; do wait "$pid"; done

output_file=$ANSWERS/merge.jsonl
> "$output_file"
for IDX in $(seq 0 $((CHUNKS-1))); do
    cat $ANSWERS/${CHUNKS}_${IDX}.jsonl >> "$output_file"
done

python scripts/convert_vqav2_for_submission.py --split $SPLIT --ckpt $CKPT
