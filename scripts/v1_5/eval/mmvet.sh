#!/bin/bash
# MM-Vet: answer, convert to the JSON the MM-Vet grader (GPT-4 based, run separately) takes.
# Run from the repository root. Override with MODEL_PATH=... CKPT=... CONV_MODE=... (CONV_MODE= with an empty value
# uses the chat template stored in the checkpoint; vicuna_v1 is what the LLaVA-1.5 numbers were produced with).
set -e

MODEL_PATH=${MODEL_PATH:-liuhaotian/llava-v1.5-13b}
CKPT=${CKPT:-$(basename "$MODEL_PATH")}
CONV_MODE=${CONV_MODE-vicuna_v1}

python -m llava.eval.model_vqa \
    --model-path "$MODEL_PATH" \
    --question-file ./playground/data/eval/mm-vet/llava-mm-vet.jsonl \
    --image-folder ./playground/data/eval/mm-vet/images \
    --answers-file ./playground/data/eval/mm-vet/answers/$CKPT.jsonl \
    --temperature 0 \
    --conv-mode "$CONV_MODE"

mkdir -p ./playground/data/eval/mm-vet/results

python scripts/convert_mmvet_for_submission.py \
    --src ./playground/data/eval/mm-vet/answers/$CKPT.jsonl \
    --dst ./playground/data/eval/mm-vet/results/$CKPT.json
