#!/bin/bash
# ScienceQA test answers on several GPUs, one chunk per GPU in CUDA_VISIBLE_DEVICES (the original's
# sqa_eval_batch.sh); then `bash scripts/sqa_eval_gather.sh` merges the chunks and scores them.
#
#   CUDA_VISIBLE_DEVICES=0,1,2,3,4,5,6,7 MODEL_PATH=./checkpoints/<your ScienceQA model> bash scripts/sqa_eval_batch.sh
#
# Questions: the converted test split (`convert_sqa_to_llava.py convert_to_llava --split test`); any QCM-* file
# holds the same questions. CONV_MODE= (empty, the default) uses the template stored in the checkpoint; the
# original passed `--conv-mode llava_v0` for its v0 models. Run it again after an interruption: finished answers
# are kept and only the missing ones are generated.
set -e

MODEL_PATH=${MODEL_PATH:-./checkpoints/llava-vicuna-13b-v1.3-pretrain_lcs558k_plain-ScienceQA_QCM_LEA-12e}
CKPT=${CKPT:-$(basename "$MODEL_PATH")}
SQA_DIR=${SQA_DIR:-./playground/data/scienceqa}
QUESTIONS=${QUESTIONS:-$SQA_DIR/llava_test_QCM-LEA.json}
ANSWERS=${ANSWERS:-./playground/data/eval/scienceqa/answers/$CKPT}
CONV_MODE=${CONV_MODE-}

gpu_list="${CUDA_VISIBLE_DEVICES:-0}"
IFS=',' read -ra GPULIST <<< "$gpu_list"
CHUNKS=${#GPULIST[@]}

pids=()
for IDX in $(seq 0 $((CHUNKS-1))); do
    CUDA_VISIBLE_DEVICES=${GPULIST[$IDX]} python -m llava.eval.model_vqa_science \
        --model-path "$MODEL_PATH" \
        --question-file "$QUESTIONS" \
        --image-folder $SQA_DIR/images/test \
        --answers-file $ANSWERS/${CHUNKS}_${IDX}.jsonl \
        --num-chunks $CHUNKS \
        --chunk-idx $IDX \
        --temperature 0 \
        --conv-mode "$CONV_MODE" &
    pids+=($!)
done
for pid in "${pids[@]}"; do wait "$pid"; done
echo "Answers in $ANSWERS; now run: bash scripts/sqa_eval_gather.sh"
