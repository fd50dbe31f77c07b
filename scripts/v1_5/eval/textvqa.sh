#!/bin/bash
# TextVQA val (with reference OCR tokens): answer, score with the VQA soft accuracy.
# Run from the repository root. Override with MODEL_PATH=... CKPT=... CONV_MODE=... (CONV_MODE= with an empty value
# uses the chat template stored in the checkpoint; vicuna_v1 is what the LLaVA-1.5 numbers were produced with).
set -e

MODEL_PATH=${MODEL_PATH:-liuhaotian/llava-v1.5-13b}
CKPT=${CKPT:-$(basename "$MODEL_PATH")}
CONV_MODE=${CONV_MODE-vicuna_v1}

python -m llava.eval.model_vqa_loader \
    --model-path "$MODEL_PATH" \
    --question-file ./playground/data/eval/textvqa/llava_textvqa_val_v051_ocr.jsonl \
    --image-folder ./playground/data/eval/textvqa/train_images \
    --answers-file ./playground/data/eval/textvqa/answers/$CKPT.jsonl \
    --temperature 0 \
    --conv-mode "$CONV_MODE"

python -m llava.eval.eval_textvqa \
    --annotation-file ./playground/data/eval/textvqa/TextVQA_0.5.1_val.json \
    --result-file ./playground/data/eval/textvqa/answers/$CKPT.jsonl
