"""VQA answer normalisation (the VQA / EvalAI rules) and the TextVQA/VQAv2 soft accuracy.

The rules: lower-case; drop `,` and `?`; split off `'s`; strip other punctuation (deleted, or turned into a
space when it sits inside a word); drop periods that do not start a decimal (at most 32 of them: the official code
passes `re.UNICODE`, which is 32, where `re.sub` takes its count); number words to digits; drop the articles
a/an/the; rewrite the words the official contraction table lists ("dont" -> "don't"). A prediction scores
min(1, matches/3) against each leave-one-out subset of the human answers, averaged: with ten answers, matching
1, 2, 3 or 4+ of them scores 0.3, 0.6, 0.9, 1.0.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

# The official table, byte for byte as the VQA / EvalAI evaluator (and the original LLaVA's copy) has it, quirks
# included: keys that can never match after lower-casing ("Id've", "Im"), identity entries ("let's"), and
# "somebody'd" mapped to "somebodyd". Scores only match the official ones with exactly this table.
CONTRACTIONS = {
    "aint": "ain't",
    "arent": "aren't",
    "cant": "can't",
    "couldve": "could've",
    "couldnt": "couldn't",
    "couldn'tve": "couldn't've",
    "couldnt've": "couldn't've",
    "didnt": "didn't",
    "doesnt": "doesn't",
    "dont": "don't",
    "hadnt": "hadn't",
    "hadnt've": "hadn't've",
    "hadn'tve": "hadn't've",
    "hasnt": "hasn't",
    "havent": "haven't",
    "hed": "he'd",
    "hed've": "he'd've",
    "he'dve": "he'd've",
    "hes": "he's",
    "howd": "how'd",
    "howll": "how'll",
    "hows": "how's",
    "Id've": "I'd've",
    "I'dve": "I'd've",
    "Im": "I'm",
    "Ive": "I've",
    "isnt": "isn't",
    "itd": "it'd",
    "itd've": "it'd've",
    "it'dve": "it'd've",
    "itll": "it'll",
    "let's": "let's",
    "maam": "ma'am",
    "mightnt": "mightn't",
    "mightnt've": "mightn't've",
    "mightn'tve": "mightn't've",
    "mightve": "might've",
    "mustnt": "mustn't",
    "mustve": "must've",
    "neednt": "needn't",
    "notve": "not've",
    "oclock": "o'clock",
    "oughtnt": "oughtn't",
    "ow's'at": "'ow's'at",
    "'ows'at": "'ow's'at",
    "'ow'sat": "'ow's'at",
    "shant": "shan't",
    "shed've": "she'd've",
    "she'dve": "she'd've",
    "she's": "she's",
    "shouldve": "should've",
    "shouldnt": "shouldn't",
    "shouldnt've": "shouldn't've",
    "shouldn'tve": "shouldn't've",
    "somebody'd": "somebodyd",
    "somebodyd've": "somebody'd've",
    "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll",
    "somebodys": "somebody's",
    "someoned": "someone'd",
    "someoned've": "someone'd've",
    "someone'dve": "someone'd've",
    "someonell": "someone'll",
    "someones": "someone's",
    "somethingd": "something'd",
    "somethingd've": "something'd've",
    "something'dve": "something'd've",
    "somethingll": "something'll",
    "thats": "that's",
    "thered": "there'd",
    "thered've": "there'd've",
    "there'dve": "there'd've",
    "therere": "there're",
    "theres": "there's",
    "theyd": "they'd",
    "theyd've": "they'd've",
    "they'dve": "they'd've",
    "theyll": "they'll",
    "theyre": "they're",
    "theyve": "they've",
    "twas": "'twas",
    "wasnt": "wasn't",
    "wed've": "we'd've",
    "we'dve": "we'd've",
    "weve": "we've",
    "werent": "weren't",
    "whatll": "what'll",
    "whatre": "what're",
    "whats": "what's",
    "whatve": "what've",
    "whens": "when's",
    "whered": "where'd",
    "wheres": "where's",
    "whereve": "where've",
    "whod": "who'd",
    "whod've": "who'd've",
    "who'dve": "who'd've",
    "wholl": "who'll",
    "whos": "who's",
    "whove": "who've",
    "whyll": "why'll",
    "whyre": "why're",
    "whys": "why's",
    "wont": "won't",
    "wouldve": "would've",
    "wouldnt": "wouldn't",
    "wouldnt've": "wouldn't've",
    "wouldn'tve": "wouldn't've",
    "yall": "y'all",
    "yall'll": "y'all'll",
    "y'allll": "y'all'll",
    "yall'd've": "y'all'd've",
    "y'alld've": "y'all'd've",
    "y'all'dve": "y'all'd've",
    "youd": "you'd",
    "youd've": "you'd've",
    "you'dve": "you'd've",
    "youll": "you'll",
    "youre": "you're",
    "youve": "you've",
}
NUMBER_MAP = {word: str(i) for i, word in enumerate("zero one two three four five six seven eight nine ten".split())}
NUMBER_MAP["none"] = "0"
ARTICLES = {"a", "an", "the"}
PUNCTUATIONS = list(';/[]"{}()=+\\_-><@`,?!')
# The official patterns as written. `(?!<=\d)` is a lookahead (a typo for a lookbehind in the official code) that never
# fails in front of a period, so a period is dropped unless a digit follows it.
PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
PERIOD_STRIP_COUNT = 32  # the official `PERIOD_STRIP.sub("", text, re.UNICODE)` passes re.UNICODE (32) as the count
COMMA_STRIP = re.compile(r"(?<=\d)(\,)+(?=\d)")  # a thousands separator


class EvalAIAnswerProcessor:
    """Normalise an answer the way the VQA / EvalAI servers do before comparing answers."""

    CONTRACTIONS = CONTRACTIONS  # the official class attributes, for code that reads them
    NUMBER_MAP = NUMBER_MAP
    ARTICLES = sorted(ARTICLES)
    PUNCTUATIONS = PUNCTUATIONS
    PERIOD_STRIP = PERIOD_STRIP
    COMMA_STRIP = COMMA_STRIP

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
        return PERIOD_STRIP.sub("", out, count=PERIOD_STRIP_COUNT)

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
