"""VQA answer normalisation (the VQA / EvalAI rules) and the TextVQA/VQAv2 soft accuracy.

The rules: lower-case; drop `,` and `?`; split off `'s`; strip other punctuation (deleted, or turned into a
space when it sits inside a word); drop periods that do not start a decimal; number words to digits; drop the
articles a/an/the; restore the apostrophe of common contractions ("dont" -> "don't"). A prediction scores
min(1, matches/3) against each leave-one-out subset of the human answers, averaged: with ten answers, matching
1, 2, 3 or 4+ of them scores 0.3, 0.6, 0.9, 1.0.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Iterable, Sequence

# Contractions with their apostrophes; the keys to restore them from are every spelling that drops some of them.
_CONTRACTIONS = """
ain't aren't can't could've couldn't couldn't've didn't doesn't don't hadn't hadn't've hasn't haven't he'd he'd've
he's how'd how'll how's i'd've i'm i've isn't it'd it'd've it'll let's ma'am mightn't mightn't've might've mustn't
must've needn't not've o'clock oughtn't shan't she'd've she'll she's should've shouldn't shouldn't've somebody'd
somebody'd've somebody'll somebody's someone'd someone'd've someone'll someone's something'd something'd've
something'll that's there'd there'd've there're there's they'd they'd've they'll they're they've 'twas wasn't we'd've
we've weren't what'll what're what's what've when's where'd where's where've who'd who'd've who'll who's who've
why'll why're why's won't would've wouldn't wouldn't've y'all y'all'll y'all'd've you'd you'd've you'll you're you've
""".split()
# Spellings without apostrophes that are ordinary words, so never rewritten.
_REAL_WORDS = {"id", "im", "ive", "ill", "its", "lets", "shed", "shell", "hell", "wed", "well", "were", "whore"}


def _contraction_keys(word: str) -> Iterable[str]:
    cuts = [i for i, ch in enumerate(word) if ch == "'"]
    for n in range(1, len(cuts) + 1):
        for dropped in itertools.combinations(cuts, n):
            yield "".join(ch for i, ch in enumerate(word) if i not in dropped)


CONTRACTIONS = {
    key: word for word in _CONTRACTIONS for key in _contraction_keys(word) if key not in _REAL_WORDS and key != word
}
NUMBER_MAP = {word: str(i) for i, word in enumerate("zero one two three four five six seven eight nine ten".split())}
NUMBER_MAP["none"] = "0"
ARTICLES = {"a", "an", "the"}
PUNCTUATIONS = list(';/[]"{}()=+\\_-><@`,?!')
PERIOD_STRIP = re.compile(r"\.(?!\d)")  # a period that does not start a decimal part
COMMA_STRIP = re.compile(r"(\d)(,)(\d)")  # a thousands separator


class EvalAIAnswerProcessor:
    """Normalise an answer the way the VQA / EvalAI servers do before comparing answers."""

    def word_tokenize(self, word: str) -> str:
        return word.lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()

    def process_punctuation(self, text: str) -> str:
        out = text
        for p in PUNCTUATIONS:
            # Punctuation next to a space (or any text with a thousands separator) is deleted; inside a word it
            # becomes a space ("red/blue" -> "red blue").
            if (p + " " in text or " " + p in text) or COMMA_STRIP.search(text) is not None:
                out = out.replace(p, "")
            else:
                out = out.replace(p, " ")
        return PERIOD_STRIP.sub("", out)

    def process_digit_article(self, text: str) -> str:
        words = [NUMBER_MAP.get(w, w) for w in text.lower().split()]
        words = [CONTRACTIONS.get(w, w) for w in words if w not in ARTICLES]
        return " ".join(words)

    def __call__(self, item: str) -> str:
        item = self.word_tokenize(item)
        item = item.replace("\n", " ").replace("\t", " ").strip()
        item = self.process_punctuation(item)
        return self.process_digit_article(item)


def vqa_answer_scores(gt_answers: Sequence[str], processor: EvalAIAnswerProcessor | None = None) -> dict[str, float]:
    """Score of each distinct (normalised) answer: min(1, matches/3) over leave-one-out subsets, averaged."""
    processor = processor or EvalAIAnswerProcessor()
    answers = [processor(a) for a in gt_answers]
    if not answers:
        raise ValueError("No ground-truth answers to score against.")
    scores = {}
    for candidate in set(answers):
        accs = []
        for i in range(len(answers)):
            matches = sum(1 for j, a in enumerate(answers) if j != i and a == candidate)
            accs.append(min(1.0, matches / 3))
        scores[candidate] = sum(accs) / len(accs)
    return scores


class TextVQAAccuracyEvaluator:
    """Mean VQA soft accuracy of predictions: `[{"pred_answer": str, "gt_answers": [str, ...]}, ...]`."""

    def __init__(self):
        self.answer_processor = EvalAIAnswerProcessor()

    def eval_pred_list(self, pred_list: Sequence[dict]) -> float:
        if not pred_list:
            raise ValueError("No predictions to evaluate.")
        scores = []
        for entry in pred_list:
            pred = self.answer_processor(entry["pred_answer"])
            scores.append(vqa_answer_scores(entry["gt_answers"], self.answer_processor).get(pred, 0.0))
        return sum(scores) / len(scores)
