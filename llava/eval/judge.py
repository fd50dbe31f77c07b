"""GPT-assisted review: ask a judge model to score two answers to each question, resumably, with retries.

The three review scripts (eval_gpt_review, eval_gpt_review_visual, eval_gpt_review_bench) differ only in the
context they show the judge and in how a question's category picks its rule in rule.json; this module holds the
rest. Any OpenAI-compatible server can judge: `--api-base` or `OPENAI_BASE_URL` points the `openai` client at it.
Each review record is the original's `{id, question_id, answer1_id, answer2_id, category, content, tuple}` plus
`judge_model`, `rule_sha256` (the hash of the rule prompt) and `score_parser` (`original`, or `lenient` under
`--lenient-scores`), so scores from different judges, rules or parsers are never mixed. The system message and the
score parsing are the original scripts' own, so the original rule.json gives like-for-like reviews.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
import random
import sys
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

DEFAULT_JUDGE_MODEL = "gpt-4-0314"  # the judge of the LLaVA papers' numbers (eval_gpt_review.py: `gpt-4`, as it was)
DEFAULT_RULE_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "table", "rule.json")
# The original review scripts' system message, byte for byte: it is part of what the judge sees.
SYSTEM_PROMPT = "You are a helpful and precise assistant for checking the quality of the answer."
INVALID_SCORE = [-1, -1]


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------------------------------
# Rules, prompts, scores
# ---------------------------------------------------------------------------------------------------------------------


def load_rules(path: str | None = None) -> dict[str, dict]:
    """rule.json: `{category: {"role": ..., "prompt": ...}}`."""
    path = os.path.expanduser(path or DEFAULT_RULE_FILE)
    with open(path, encoding="utf-8") as f:
        rules = json.load(f)
    bad = [k for k, v in rules.items() if not isinstance(v, dict) or not {"role", "prompt"} <= set(v)]
    if bad:
        raise ValueError(f"`{path}`: rule(s) {bad} need both `role` and `prompt`.")
    return rules


def rule_hash(rule: dict) -> str:
    """A short sha256 of the rule prompt: records which judging instructions produced a score."""
    return hashlib.sha256(rule["prompt"].encode("utf-8")).hexdigest()[:16]


def answers_block(question: str, answer1: str, answer2: str, role: str, prompt: str) -> str:
    """The part of the judge's message after the context: question, the two answers, the rule."""
    return (
        f"[Question]\n{question}\n\n"
        f"[{role} 1]\n{answer1}\n\n[End of {role} 1]\n\n"
        f"[{role} 2]\n{answer2}\n\n[End of {role} 2]\n\n"
        f"[System]\n{prompt}\n\n"
    )


def parse_score(review: str, lenient: bool = False) -> list[float]:
    """The two scores on the review's first line; [-1, -1] when that line does not hold exactly two.

    By default this is the original scripts' rule: the first line, each `,` turned into a space, split on single
    spaces, must give exactly two numbers ("8 7" and "8,7" parse; "8, 7", "8  7", " 8 7", "8\t7" and "**8 7**" do
    not). With `lenient` (`--lenient-scores`), surrounding blanks and `*` are stripped and any whitespace separates
    the numbers, so those parse too; such reviews record `score_parser: lenient`."""
    try:
        first = (review or "").strip().split("\n")[0] if lenient else (review or "").split("\n")[0]
        first = first.replace(",", " ")
        parts = first.strip(" *").split() if lenient else first.split(" ")
        if len(parts) == 2:
            return [float(parts[0]), float(parts[1])]
    except ValueError:
        pass
    log(f"Unparseable judge scores (recorded as {INVALID_SCORE}): {(review or '')[:100]!r}")
    return list(INVALID_SCORE)


def is_invalid(scores) -> bool:
    return list(scores) == INVALID_SCORE


# ---------------------------------------------------------------------------------------------------------------------
# The judge
# ---------------------------------------------------------------------------------------------------------------------


class JudgeError(RuntimeError):
    """The judge could not be reached, refused the request, or kept failing after every retry."""


class Judge:
    """A chat model behind an OpenAI-compatible API, called with retries and exponential backoff.

    Rate limits (429), server errors (5xx), timeouts and dropped connections are retried up to `max_retries` times,
    waiting `retry_delay * 2**attempt` seconds (with jitter, at most `max_delay`, or what `Retry-After` asks).
    Other errors (bad key, unknown model, bad request) fail at once: retrying cannot fix them.
    """

    def __init__(
        self,
        model: str = DEFAULT_JUDGE_MODEL,
        api_base: str | None = None,
        api_key: str | None = None,
        temperature: float = 0.2,
        max_tokens: int = 1024,
        max_retries: int = 8,
        retry_delay: float = 1.0,
        max_delay: float = 60.0,
        timeout: float = 120.0,
    ):
        if importlib.util.find_spec("openai") is None:
            raise ImportError("GPT-assisted review needs the `openai` client: pip install 'llava[serve]'.")
        import openai

        self.openai = openai
        base = api_base or os.environ.get("OPENAI_BASE_URL") or None
        key = api_key or os.environ.get("OPENAI_API_KEY")
        if not key:
            if not base:
                raise JudgeError(
                    "No API key for the judge: set OPENAI_API_KEY, or point --api-base / OPENAI_BASE_URL at an "
                    "OpenAI-compatible server."
                )
            key = "EMPTY"  # local OpenAI-compatible servers often need none
        # Retries are ours (logged, and the same for every server), so the client's own are off.
        self.client = openai.OpenAI(api_key=key, base_url=base, max_retries=0, timeout=timeout)
        self.base_url = str(self.client.base_url)
        self.model = model
        self.temperature = temperature
        self.max_tokens = max_tokens
        self.max_retries = max_retries
        self.retry_delay = retry_delay
        self.max_delay = max_delay

    def _delay(self, attempt: int, err: Exception) -> float:
        response = getattr(err, "response", None)
        retry_after = response.headers.get("retry-after") if response is not None else None
        if retry_after is not None:
            try:
                return min(self.max_delay, max(0.0, float(retry_after)))
            except ValueError:
                pass
        return min(self.max_delay, self.retry_delay * 2**attempt) * (0.5 + random.random() / 2)

    def review(self, content: str) -> str:
        """The judge's reply to one review request."""
        openai = self.openai
        retryable = (openai.RateLimitError, openai.InternalServerError, openai.APIConnectionError)
        for attempt in range(self.max_retries + 1):
            try:
                response = self.client.chat.completions.create(
                    model=self.model,
                    messages=[{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": content}],
                    temperature=self.temperature,
                    max_tokens=self.max_tokens,
                )
                return response.choices[0].message.content or ""
            except retryable as err:
                if attempt == self.max_retries:
                    raise JudgeError(
                        f"The judge at {self.base_url} still fails after {self.max_retries} retries: {err}"
                    ) from err
                delay = self._delay(attempt, err)
                log(f"Judge: {type(err).__name__} ({err}); retry {attempt + 1}/{self.max_retries} in {delay:.1f}s.")
                time.sleep(delay)
            except openai.NotFoundError as err:
                raise JudgeError(
                    f"The judge at {self.base_url} has no model `{self.model}` ({err}). Pass --judge-model with one it "
                    "serves (gpt-4-0314, the papers' judge, is retired on api.openai.com)."
                ) from err
            except openai.APIStatusError as err:
                raise JudgeError(f"The judge at {self.base_url} refused the request: {err}") from err
        raise AssertionError("unreachable")


# ---------------------------------------------------------------------------------------------------------------------
# The review loop
# ---------------------------------------------------------------------------------------------------------------------


@dataclass
class ReviewJob:
    id: int
    question_id: object
    answer1_id: object
    answer2_id: object
    category: str
    content: str
    rule_sha256: str
    rule_name: str = ""  # the rule.json entry used (eval_gpt_review: `default` for a category without its own)


def add_judge_args(parser: argparse.ArgumentParser, context: bool, judge_model: str = DEFAULT_JUDGE_MODEL) -> None:
    """The original review flags plus the judge's."""
    parser.add_argument("-q", "--question", type=str, required=True, help="question JSONL")
    if context:
        parser.add_argument("-c", "--context", type=str, required=True, help="context JSONL (captions / boxes)")
    parser.add_argument(
        "-a", "--answer-list", nargs=2, required=True, metavar=("REFERENCE", "CANDIDATE"), help="two answer JSONLs"
    )
    parser.add_argument("-r", "--rule", type=str, default=DEFAULT_RULE_FILE, help="rule.json (default: ours)")
    parser.add_argument("-o", "--output", type=str, required=True, help="review JSONL (appended; resumable)")
    parser.add_argument("--max-tokens", type=int, default=1024, help="most tokens the judge may write per review")
    parser.add_argument("--judge-model", type=str, default=judge_model, help=f"default: {judge_model}")
    parser.add_argument("--api-base", type=str, default=None, help="OpenAI-compatible base URL (or OPENAI_BASE_URL)")
    parser.add_argument("--api-key", type=str, default=None, help="default: OPENAI_API_KEY")
    parser.add_argument("--temperature", type=float, default=0.2, help="the judge's sampling temperature")
    parser.add_argument("--max-retries", type=int, default=8, help="retries on rate limits and server errors")
    parser.add_argument("--retry-delay", type=float, default=1.0, help="first backoff in seconds (doubles)")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds per judge request")
    parser.add_argument("--parallel", type=int, default=1, help="reviews requested at once")
    parser.add_argument("--overwrite", action="store_true", help="start the output afresh instead of resuming")
    parser.add_argument(
        "--lenient-scores",
        action="store_true",
        help="also parse first lines like `8, 7`, `8  7` or `**8 7**` (the original scores them [-1, -1]); "
        "recorded as score_parser=lenient in each review",
    )


def judge_from_args(args) -> Judge:
    return Judge(
        model=args.judge_model,
        api_base=args.api_base,
        api_key=args.api_key,
        temperature=args.temperature,
        max_tokens=args.max_tokens,
        max_retries=args.max_retries,
        retry_delay=args.retry_delay,
        timeout=args.timeout,
    )


def read_records(path: str, drop_truncated_tail: bool = False) -> list[dict]:
    """Records of a JSON-lines file. With `drop_truncated_tail`, a bad last line (a write cut off by a crash) is
    removed from the file instead of being an error."""
    path = os.path.expanduser(path)
    with open(path, encoding="utf-8") as f:
        lines = [(n, line) for n, line in enumerate(f, 1) if line.strip()]
    out = []
    for i, (number, line) in enumerate(lines):
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError as err:
            if drop_truncated_tail and i == len(lines) - 1:
                log(f"{path}: dropping a truncated last line (line {number}); that question is reviewed again.")
                with open(path, "w", encoding="utf-8") as f:
                    f.write("".join(kept.rstrip("\n") + "\n" for _, kept in lines[:-1]))
                break
            raise ValueError(f"`{path}` line {number} is not valid JSON ({err}).") from err
    return out


def answers_by_question(path: str, question_ids: list) -> dict:
    """{question_id: answer record} for every question; a missing answer is an error naming the file."""
    records = {r["question_id"]: r for r in read_records(path)}
    missing = [qid for qid in question_ids if qid not in records]
    if missing:
        raise ValueError(f"`{path}` has no answer for question_id(s) {missing[:10]} ({len(missing)} missing).")
    return records


def build_jobs(
    args,
    rules: dict,
    pick_rule: Callable[[dict], str],
    context_for: Callable[[dict], str],
    category_of: Callable[[dict], str] | None = None,
) -> list[ReviewJob]:
    """One job per question: `pick_rule(question)` names its rule, `context_for(question)` opens the message, and
    `category_of(question)` is the category its review records (default: the rule's name)."""
    questions = read_records(args.question)
    ids = [q["question_id"] for q in questions]
    answers1 = answers_by_question(args.answer_list[0], ids)
    answers2 = answers_by_question(args.answer_list[1], ids)
    jobs = []
    for idx, question in enumerate(questions):
        category = pick_rule(question)
        if category not in rules:
            raise ValueError(
                f"Question {question['question_id']}: category `{category}` is not in the rule file `{args.rule}` "
                f"(it has {sorted(rules)})."
            )
        rule = rules[category]
        ans1, ans2 = answers1[question["question_id"]], answers2[question["question_id"]]
        content = context_for(question) + answers_block(
            question["text"], ans1["text"], ans2["text"], rule["role"], rule["prompt"]
        )
        jobs.append(
            ReviewJob(
                id=idx + 1,
                question_id=question["question_id"],
                answer1_id=ans1.get("answer_id", ans1["question_id"]),
                answer2_id=ans2.get("answer_id", ans2["question_id"]),
                category=category_of(question) if category_of else category,
                content=content,
                rule_sha256=rule_hash(rule),
                rule_name=category,
            )
        )
    return jobs


def _existing_reviews(path: str, judge_model: str, jobs: list[ReviewJob], parser: str = "original") -> set:
    """question_ids already reviewed in `path`; refuses a file written by another judge, rule or score parser."""
    if not os.path.exists(path):
        return set()
    hashes = {job.question_id: job.rule_sha256 for job in jobs}
    done, unlabeled = set(), 0
    for record in read_records(path, drop_truncated_tail=True):
        if "judge_model" not in record:
            unlabeled += 1
        elif record["judge_model"] != judge_model or (
            record["question_id"] in hashes and record.get("rule_sha256") != hashes[record["question_id"]]
        ):
            raise JudgeError(
                f"`{path}` holds reviews by judge `{record['judge_model']}` (rule {record.get('rule_sha256')}); this "
                f"run uses judge `{judge_model}` (rule {hashes.get(record['question_id'])}). Scores from different "
                "judges or rules must not be mixed: write to another --output, or pass --overwrite."
            )
        elif record.get("score_parser", "original") != parser:
            raise JudgeError(
                f"`{path}` holds reviews scored with the `{record.get('score_parser', 'original')}` score parser; "
                f"this run uses `{parser}` (--lenient-scores). Write to another --output, or pass --overwrite."
            )
        done.add(record["question_id"])
    if unlabeled:
        log(f"{path}: {unlabeled} review(s) do not record their judge (older format); kept as they are.")
    return done


def run_reviews(
    jobs: list[ReviewJob],
    judge: Judge,
    output: str,
    parallel: int = 1,
    overwrite: bool = False,
    lenient_scores: bool = False,
) -> dict:
    """Review every job whose question is not in `output` yet, appending one record each; returns counts."""
    parser = "lenient" if lenient_scores else "original"
    output = os.path.expanduser(output)
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    if overwrite and os.path.exists(output):
        os.remove(output)
    done = _existing_reviews(output, judge.model, jobs, parser)
    todo = [job for job in jobs if job.question_id not in done]
    if done:
        log(f"{output}: {len(jobs) - len(todo)} of {len(jobs)} questions already reviewed; skipping them.")
    invalid = 0
    queue = iter(todo)
    in_flight: deque = deque()
    pool = ThreadPoolExecutor(max_workers=max(1, parallel))

    def submit_more() -> None:  # at most `parallel` requests out at a time, so a failure stops the run promptly
        while len(in_flight) < max(1, parallel) and (job := next(queue, None)) is not None:
            in_flight.append((job, pool.submit(judge.review, job.content)))

    with open(output, "a", encoding="utf-8") as f:
        try:
            submit_more()
            while in_flight:
                job, future = in_flight.popleft()
                review = future.result()
                submit_more()
                scores = parse_score(review, lenient=lenient_scores)
                invalid += is_invalid(scores)
                record = {
                    "id": job.id,
                    "question_id": job.question_id,
                    "answer1_id": job.answer1_id,
                    "answer2_id": job.answer2_id,
                    "category": job.category,
                    "content": review,
                    "tuple": scores,
                    "judge_model": judge.model,
                    "rule_sha256": job.rule_sha256,
                    "score_parser": parser,
                }
                f.write(json.dumps(record) + "\n")
                f.flush()
                log(f"reviewed {job.id}/{len(jobs)} (question {job.question_id}): {scores}")
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
    summary = {"reviewed": len(todo), "skipped": len(jobs) - len(todo), "invalid": invalid}
    log(
        f"{output}: {summary['reviewed']} reviewed, {summary['skipped']} already there, {invalid} with unparseable "
        f"scores (recorded as {INVALID_SCORE}; summarize_gpt_review counts and leaves them out)."
    )
    return summary
