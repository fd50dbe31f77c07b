#!/bin/bash
# VizWiz test: answer, convert for the EvalAI server.
# Run from the repository root. Override with MODEL_PATH=... CKPT=... CONV_MODE=... (CONV_MODE= with an empty value
# uses the chat template stored in the checkpoint; vicuna_v1 is what the LLaVA-1.5 numbers were produced with).
set -e

MODEL_PATH=${MODEL_PATH:-liuhaotian/llava-v1.5-13b}
CKPT=${CKPT:-$(basename "$MODEL_PATH")}
CONV_MODE=${CONV_MODE-vicuna_v1}

python -m llava.eval.model_vqa_loader \
    --model-path "$MODEL_PATH" \
    --question-file ./playground/data/eval/vizwiz/llava_test.jsonl \
    --image-folder ./playground/data/eval/vizwiz/test \
    --answers-file ./playground/data/eval/vizwiz/answers/$CKPT.jsonl \
    --temperature 0 \
    --conv-mode "$CONV_MODE"

python scripts/convert_vizwiz_for_submission.py \
    --annotation-file ./playground/data/eval/vizwiz/llava_test.jsonl \
    --result-file ./playground/data/eval/vizwiz/answers/$CKPT.jsonl \
    --result-upload-file ./playground/data/eval/vizwiz/answers_upload/$CKPT.json
