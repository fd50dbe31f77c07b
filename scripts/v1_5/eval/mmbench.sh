#!/bin/bash
# MMBench dev (English): answer with the option letter, convert to the .xlsx the MMBench server scores.
# Run from the repository root. Override with MODEL_PATH=... CKPT=... CONV_MODE=... (CONV_MODE= with an empty value
# uses the chat template stored in the checkpoint; vicuna_v1 is what the LLaVA-1.5 numbers were produced with).
set -e

MODEL_PATH=${MODEL_PATH:-liuhaotian/llava-v1.5-13b}
CKPT=${CKPT:-$(basename "$MODEL_PATH")}
CONV_MODE=${CONV_MODE-vicuna_v1}

SPLIT="mmbench_dev_20230712"

python -m llava.eval.model_vqa_mmbench \
    --model-path "$MODEL_PATH" \
    --question-file ./playground/data/eval/mmbench/$SPLIT.tsv \
    --answers-file ./playground/data/eval/mmbench/answers/$SPLIT/$CKPT.jsonl \
    --single-pred-prompt \
    --temperature 0 \
    --conv-mode "$CONV_MODE"

mkdir -p playground/data/eval/mmbench/answers_upload/$SPLIT

python scripts/convert_mmbench_for_submission.py \
    --annotation-file ./playground/data/eval/mmbench/$SPLIT.tsv \
    --result-dir ./playground/data/eval/mmbench/answers/$SPLIT \
    --upload-dir ./playground/data/eval/mmbench/answers_upload/$SPLIT \
    --experiment $CKPT
