"""Evaluation: answer generation for benchmarks, GPT-assisted review, benchmark scorers.

Entry points (each runs as `python -m llava.eval.X` and as `python llava/eval/X.py`):
  model_vqa, model_vqa_loader, model_vqa_science, model_vqa_mmbench, run_llava   generate answers
  eval_gpt_review, eval_gpt_review_visual, eval_gpt_review_bench, summarize_gpt_review   GPT-assisted review
  eval_science_qa, eval_pope, eval_textvqa, eval_mme   scorers (m4c_evaluator holds the VQA answer normalisation)
Nothing here is imported at package import time, so the judge scripts start without torch.
"""
