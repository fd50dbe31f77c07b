#!/bin/bash
# MME: answer, score perception and cognition (also writes the official eval_tool's answer files).
# Run from the repository root. Override with MODEL_PATH=... CKPT=... CONV_MODE=... (CONV_MODE= with an empty value
# uses the chat template stored in the checkpoint; vicuna_v1 is what the LLaVA-1.5 numbers were produced with).
set -e

MODEL_PATH=${MODEL_PATH:-liuhaotian/llava-v1.5-13b}
CKPT=${CKPT:-$(basename "$MODEL_PATH")}
CONV_MODE=${CONV_MODE-vicuna_v1}

python -m llava.eval.model_vqa_loader \
    --model-path "$MODEL_PATH" \
    --question-file ./playground/data/eval/MME/llava_mme.jsonl \
    --image-folder ./playground/data/eval/MME/MME_Benchmark_release_version \
    --answers-file ./playground/data/eval/MME/answers/$CKPT.jsonl \
    --temperature 0 \
    --conv-mode "$CONV_MODE"

python -m llava.eval.eval_mme \
    --data-dir ./playground/data/eval/MME/MME_Benchmark_release_version \
    --result-file ./playground/data/eval/MME/answers/$CKPT.jsonl \
    --results-dir ./playground/data/eval/MME/eval_tool/answers/$CKPT
