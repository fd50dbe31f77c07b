"""The original name of convert_mmvet_for_submission.py, which the original scripts/v1_5/eval/mmvet.sh calls.

    python scripts/convert_mmvet_for_eval.py --src answers.jsonl --dst results/llava-v1.5-13b.json

Same flags and output as convert_mmvet_for_submission.py (this file only forwards to it).
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from convert_mmvet_for_submission import build_parser, main  # noqa: E402

__all__ = ["build_parser", "main"]

if __name__ == "__main__":
    main()
