#!/bin/bash
# Merge the chunks of scripts/sqa_eval_batch.sh (same CUDA_VISIBLE_DEVICES, MODEL_PATH or CKPT) and score them
# against ScienceQA's problems.json / pid_splits.json in SQA_DIR (the original's sqa_eval_gather.sh).
set -e

MODEL_PATH=${MODEL_PATH:-./checkpoints/llava-vicuna-13b-v1.3-pretrain_lcs558k_plain-ScienceQA_QCM_LEA-12e}
CKPT=${CKPT:-$(basename "$MODEL_PATH")}
SQA_DIR=${SQA_DIR:-./playground/data/scienceqa}
ANSWERS=${ANSWERS:-./playground/data/eval/scienceqa/answers/$CKPT}

gpu_list="${CUDA_VISIBLE_DEVICES:-0}"
IFS=',' read -ra GPULIST <<< "$gpu_list"
CHUNKS=${#GPULIST[@]}

output_file=$ANSWERS/merge.jsonl
> "$output_file"
for IDX in $(seq 0 $((CHUNKS-1))); do
    cat $ANSWERS/${CHUNKS}_${IDX}.jsonl >> "$output_file"
done

python llava/eval/eval_science_qa.py \
    --base-dir $SQA_DIR \
    --result-file $output_file \
    --output-file $ANSWERS/output.json \
    --output-result $ANSWERS/result.json
