"""Benchmark scorers and converters on small fixtures in each benchmark's format, against hand-computed results;
and the eval shell scripts' command lines against the scripts' real argument parsers."""

from __future__ import annotations

import glob
import importlib
import json
import os
import re
import shlex
import subprocess
import sys

import pytest
from eval_helpers import REPO, load_script, read_jsonl, write_images, write_json, write_jsonl

from llava.eval import eval_mme, eval_pope, eval_science_qa, eval_textvqa
from llava.eval.m4c_evaluator import EvalAIAnswerProcessor, TextVQAAccuracyEvaluator, vqa_answer_scores
from llava.eval.mini_xlsx import read_xlsx


def answer(qid, text, prompt="q", **extra) -> dict:
    return {
        "question_id": qid,
        "prompt": prompt,
        "text": text,
        "answer_id": f"a{qid}",
        "model_id": "m",
        "metadata": {},
        **extra,
    }


# ---------------------------------------------------------------------------------------------------------------------
# ScienceQA
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, letter",
    [
        ("B", "B"),
        ("C. fire", "C"),
        ("The answer is A.", "A"),
        ("The answer is A. The answer is B.", "FAILED"),
        ("I think it is D", "FAILED"),
        ("b", "FAILED"),
        ("", "FAILED"),
        ("E.", "FAILED"),
    ],
)
def test_science_qa_letter_parsing(text, letter):
    assert eval_science_qa.parse_answer(text) == letter


def test_science_qa_score(tmp_path, capsys):
    answers = {"1": 1, "2": 0, "3": 1, "4": 0, "5": 1, "6": 0, "7": 0}
    problems = {
        pid: {"choices": ["x", "y"] if pid == "5" else ["x", "y", "z"], "answer": a} for pid, a in answers.items()
    }
    write_json(tmp_path / "problems.json", problems)
    write_json(tmp_path / "pid_splits.json", {"test": ["1", "2", "3", "4", "5", "6"], "val": ["7"]})
    img = "<image>\nContext: N/A\nQuestion: ..."
    results = [
        answer("1", "B", img),  # answer 1 -> B: right (image)
        answer("2", "A. x", "text only"),  # answer 0 -> A: right
        answer("3", "The answer is B.", img),  # right (image)
        answer("4", "maybe A", img),  # FAILED: wrong (image)
        answer("5", "C", "text only"),  # problem 5 has two choices: C is no choice, wrong
        # problem 6 has no answer: wrong, not an image question
        answer("7", "A", img),  # another split: ignored
    ]
    result_file = write_jsonl(tmp_path / "answers.jsonl", results)
    summary = eval_science_qa.main(
        [
            "--base-dir",
            str(tmp_path),
            "--result-file",
            result_file,
            "--output-file",
            str(tmp_path / "out.json"),
            "--output-result",
            str(tmp_path / "res.json"),
        ]
    )
    # 3 of 6 right; image questions 1, 3, 4: 2 of 3 right.
    assert capsys.readouterr().out.strip() == "Total: 6, Correct: 3, Accuracy: 50.00%, IMG-Accuracy: 66.67%"
    assert (summary["acc"], summary["correct"], summary["count"]) == (50.0, 3, 6)
    assert summary["results"] == {"1": 1, "2": 0, "3": 1, "4": -1, "5": -1, "6": -1}
    out = json.load(open(tmp_path / "out.json"))
    assert [x["question_id"] for x in out["correct"]] == ["1", "2", "3"]
    assert [(x["question_id"], x["parsed_ans"]) for x in out["incorrect"]] == [
        ("4", "FAILED"),
        ("5", "C"),
        ("6", "FAILED"),
    ]
    assert json.load(open(tmp_path / "res.json"))["acc"] == 50.0
    assert summary["img_acc"] == pytest.approx(200 / 3)
    # The original's --output-result layout, no more keys (issue 12 item 14).
    assert sorted(json.load(open(tmp_path / "res.json"))) == ["acc", "correct", "count", "outputs", "results"]


def test_convert_sqa_to_llava_formats(tmp_path):
    problems = {
        "7": {
            "question": "Which is hot?",
            "choices": ["ice", "fire"],
            "answer": 1,
            "hint": "Think.",
            "image": "image.png",
            "lecture": "Heat flows.",
            "solution": "Fire is hot.",
            "caption": "a fire",
        },
        "8": {
            "question": "Pick one.",
            "choices": ["a", "b", "c"],
            "answer": 2,
            "hint": "",
            "image": None,
            "lecture": "",
            "solution": "",
            "caption": "",
        },
    }
    write_json(tmp_path / "problems.json", problems)
    write_json(tmp_path / "pid_splits.json", {"test": ["7", "8"]})
    converter = load_script("convert_sqa_to_llava")
    path = converter.main(["convert_to_llava", "--base-dir", str(tmp_path), "--split", "test"])
    assert os.path.basename(path) == "llava_test_QCM-LEA.json"
    records = json.load(open(path))
    assert records[0] == {
        "id": "7",
        "image": "7/image.png",
        "conversations": [
            {"from": "human", "value": "Which is hot?\nContext: Think.\nOptions: (A) ice (B) fire\n<image>"},
            {"from": "gpt", "value": "Heat flows. Fire is hot. The answer is B."},
        ],
    }
    # No lecture or solution: the original's output keeps one leading space (byte-identical to the original
    # converter, issue 12; this test used to expect it stripped).
    assert records[1]["conversations"][1]["value"] == " The answer is C."
    assert "image" not in records[1]
    cqm = json.load(
        open(
            converter.main(
                ["convert_to_llava", "--base_dir", str(tmp_path), "--split", "test", "--prompt_format", "CQM-A"]
            )
        )
    )
    assert cqm[1]["conversations"] == [
        {"from": "human", "value": "Context: N/A\nQuestion: Pick one.\nOptions: (A) a (B) b (C) c"},
        {"from": "gpt", "value": "The answer is C."},
    ]
    jsonl = read_jsonl(converter.main(["convert_to_jsonl", "--base-dir", str(tmp_path), "--split", "test"]))
    assert jsonl[0]["output"] == "LECTURE: Heat flows.\nSOLUTION: Fire is hot.\n###\nANSWER: B."
    assert jsonl[0]["instruction"].endswith("\n<image>") and jsonl[1]["output"] == "###\nANSWER: C."
    with pytest.raises(ValueError, match="Unknown prompt format `QCM-XYZ`"):
        converter.main(
            ["convert_to_llava", "--base-dir", str(tmp_path), "--split", "test", "--prompt-format", "QCM-XYZ"]
        )


# ---------------------------------------------------------------------------------------------------------------------
# POPE
# ---------------------------------------------------------------------------------------------------------------------


def test_pope_yes_no_parsing():
    assert eval_pope.yes_no("Yes, there is a dog.") == "yes"
    assert eval_pope.yes_no("No.") == "no"
    assert eval_pope.yes_no("There is no cat. Yes.") == "no"
    assert eval_pope.yes_no("It is not there") == "no"
    assert eval_pope.yes_no("Yes. No dog though.") == "yes"  # only the first sentence counts
    assert eval_pope.yes_no("Nothing, no.") == "no" and eval_pope.yes_no("None") == "yes"


def test_pope_scores(tmp_path):
    coco = tmp_path / "coco"
    random_labels = [("a.jpg", "yes"), ("b.jpg", "yes"), ("c.jpg", "no"), ("d.jpg", "no"), ("e.jpg", "yes")]
    adversarial_labels = [("f.jpg", "no"), ("g.jpg", "yes")]
    for name, labels in (("random", random_labels), ("adversarial", adversarial_labels)):
        write_jsonl(
            coco / f"coco_pope_{name}.json",
            [
                {"question_id": i + 1, "image": img, "text": "Is there a dog in the image?", "label": label}
                for i, (img, label) in enumerate(labels)
            ],
        )
    questions = [
        {"question_id": 100 + i, "image": img, "text": "Is there a dog in the image?", "category": cat}
        for i, (img, cat) in enumerate(
            [(img, "adversarial") for img, _ in adversarial_labels] + [(img, "random") for img, _ in random_labels]
        )
    ]
    qfile = write_jsonl(tmp_path / "llava_pope_test.jsonl", questions)
    texts = {
        100: "No, there is not.",
        101: "Yes it is.",
        102: "Yes, there is a dog.",
        103: "No.",
        104: "There is no dog in the image. Yes.",
        105: "Yes",
        106: "It is not there",
    }
    # The answers file in another order than the questions (merged chunks, resumed runs).
    rfile = write_jsonl(tmp_path / "answers.jsonl", [answer(q, t) for q, t in sorted(texts.items(), reverse=True)])
    out = eval_pope.main(["--annotation-dir", str(coco), "--question-file", qfile, "--result-file", rfile])
    # random: preds yes,no,no,yes,no vs labels yes,yes,no,no,yes -> TP 1, FP 1, TN 1, FN 2.
    r = out["random"]
    assert (r["TP"], r["FP"], r["TN"], r["FN"]) == (1, 1, 1, 2)
    assert r["accuracy"] == pytest.approx(0.4) and r["precision"] == pytest.approx(0.5)
    assert r["recall"] == pytest.approx(1 / 3) and r["f1"] == pytest.approx(0.4) and r["yes_ratio"] == 0.4
    a = out["adversarial"]
    assert (a["accuracy"], a["precision"], a["recall"], a["f1"], a["yes_ratio"]) == (1.0, 1.0, 1.0, 1.0, 0.5)
    # A question file whose images do not line up with the labels is refused.
    questions[0]["image"] = "zzz.jpg"
    write_jsonl(qfile, questions)
    with pytest.raises(ValueError, match="does not line up"):
        eval_pope.main(["--annotation-dir", str(coco), "--question-file", qfile, "--result-file", rfile])


# ---------------------------------------------------------------------------------------------------------------------
# TextVQA / VQA normalisation
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "raw, normalised",
    [
        ("The Dog.", "dog"),
        ("Two apples", "2 apples"),
        ("dont know", "don't know"),
        ("red/blue", "red blue"),
        ("It is 3.5", "it is 3.5"),
        ("1,000", "1000"),
        ("Yes!", "yes"),
        ("Coca-Cola", "coca cola"),
        ("a cat , a dog", "cat dog"),
        ("youre right", "you're right"),
        ("man's hat", "man 's hat"),
        ("ten\tpast\nnine", "10 past 9"),
        ("well", "well"),
    ],
)
def test_vqa_answer_normalisation(raw, normalised):
    assert EvalAIAnswerProcessor()(raw) == normalised


def test_vqa_soft_accuracy():
    for k, score in ((0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (10, 1.0)):
        gts = ["yes"] * k + ["no"] * (10 - k)
        assert vqa_answer_scores(gts).get("yes", 0.0) == pytest.approx(score)


def test_textvqa_accuracy(tmp_path, capsys):
    annotations = {
        "data": [
            {"image_id": "img1", "question": "What number is shown?", "answers": ["2"] * 3 + ["3"] * 7},
            {
                "image_id": "img2",
                "question": "What brand is it?",
                "answers": ["coca cola", "Coca-Cola"] + ["pepsi"] * 8,
            },
            {"image_id": "img3", "question": "What does it say?", "answers": ["don't know"] * 10},
            {"image_id": "img3", "question": "Which colour?", "answers": ["red"] * 10},
        ]
    }
    afile = write_json(tmp_path / "TextVQA_0.5.1_val.json", annotations)
    instruction = "Answer the question using a single word or phrase."
    results = [
        answer("img1", "Two.", f"What number is shown?\nReference OCR token: 2, two\n{instruction}"),  # 3 match: 0.9
        answer("img2", "The Coca-Cola", f"What brand is it?\n{instruction}"),  # 2 match: 0.6
        answer("img3", "dont know", "OCR tokens: a, b Question: What does it say? Short answer:"),  # 10: 1.0
        answer("img3", "blue", f"Reference OCR token: red\nWhich colour?\n{instruction}"),  # 0.0
    ]
    rfile = write_jsonl(tmp_path / "answers.jsonl", results)
    out = eval_textvqa.main(["--annotation-file", afile, "--result-file", rfile])
    assert out[rfile] == pytest.approx((0.9 + 0.6 + 1.0 + 0.0) / 4)
    assert "Samples: 4\nAccuracy: 62.50%" in capsys.readouterr().out
    assert TextVQAAccuracyEvaluator().eval_pred_list([{"pred_answer": "3", "gt_answers": ["3"] * 10}]) == 1.0
    write_jsonl(rfile, [answer("img1", "2", "one line only")])
    with pytest.raises(ValueError, match="Cannot find the question"):
        eval_textvqa.main(["--annotation-file", afile, "--result-file", rfile])


# ---------------------------------------------------------------------------------------------------------------------
# MME
# ---------------------------------------------------------------------------------------------------------------------


def test_mme_scores(tmp_path, capsys):
    data = tmp_path / "MME_Benchmark_release_version"
    # existence: images and question files side by side; artwork: images/ and questions_answers_YN/.
    write_images(data / "existence", ["1.png", "2.png"])
    write_images(data / "artwork" / "images", ["10.jpg", "11.jpg"])
    qa = {
        ("existence", "1"): [
            ("Is there a dog in this image? Please answer yes or no.", "Yes"),
            ("Is there a cat in this image? Please answer yes or no.", "No"),
        ],
        ("existence", "2"): [
            ("Is there a car in this image? Please answer yes or no.", "Yes"),
            ("Is there a bus in this image? Please answer yes or no.", "No"),
        ],
        ("artwork", "10"): [
            ("Is this artwork by Monet? Please answer yes or no.", "Yes"),
            ("Is this artwork by Dali? Please answer yes or no.", "No"),
        ],
        ("artwork", "11"): [
            ("Is this artwork from 1800?  Please answer yes or no.", "No"),
            ("Is this artwork from 1900?  Please answer yes or no.", "Yes"),
        ],
    }
    for (category, stem), pairs in qa.items():
        folder = data / category / ("questions_answers_YN" if category == "artwork" else "")
        os.makedirs(folder, exist_ok=True)
        (folder / f"{stem}.txt").write_text("".join(f"{q}\t{a}\n" for q, a in pairs))
    suffix = "\nAnswer the question using a single word or phrase."
    preds = {  # existence: 3 of 4 right, one image fully right; artwork: 3 of 4 ("Maybe" is other), one image right
        ("existence/1.png", 0): "Yes",
        ("existence/1.png", 1): "No",
        ("existence/2.png", 0): "No, it is not",
        ("existence/2.png", 1): "no",
        ("artwork/10.jpg", 0): "Yes, it is",
        ("artwork/10.jpg", 1): "Maybe",
        ("artwork/11.jpg", 0): "No.",
        ("artwork/11.jpg", 1): "yes",
    }
    results = []
    for (qid, i), text in preds.items():
        category, image = qid.split("/")
        question = qa[category, image.split(".")[0]][i][0].replace("  ", " ")  # llava_mme.jsonl has one space
        results.append(answer(qid, text, question + suffix))
    rfile = write_jsonl(tmp_path / "answers.jsonl", results[::-1])
    out_dir = tmp_path / "eval_tool" / "answers" / "ckpt"
    # An unanswered question is refused, not scored as a smaller test (issue 12 item 13).
    partial = write_jsonl(tmp_path / "partial.jsonl", results[:-1])
    with pytest.raises(ValueError, match=r"no answer for 1 MME question.*artwork: 1.*artwork/11"):
        eval_mme.main(["--data-dir", str(data), "--result-file", partial])
    report = eval_mme.main(["--data-dir", str(data), "--result-file", rfile, "--results-dir", str(out_dir)])
    perception = report["Perception"]
    # Each subtask: accuracy 3/4 + accuracy+ 1/2 -> 125; perception total 250.
    assert perception["subtasks"]["existence"]["score"] == pytest.approx(125.0)
    assert perception["subtasks"]["artwork"]["score"] == pytest.approx(125.0)
    assert perception["subtasks"]["artwork"]["other"] == 1
    assert perception["total"] == pytest.approx(250.0) and "Cognition" not in report
    assert "total score: 250.00" in capsys.readouterr().out
    lines = (out_dir / "artwork.txt").read_text().splitlines()
    assert "11.jpg\tIs this artwork from 1800?  Please answer yes or no.\tNo\tNo." in lines


# ---------------------------------------------------------------------------------------------------------------------
# Converters
# ---------------------------------------------------------------------------------------------------------------------


def test_convert_gqa_and_mmvet(tmp_path):
    src = write_jsonl(tmp_path / "merge.jsonl", [answer(201, "Yes."), answer("202a", "The Table..")])
    preds = load_script("convert_gqa_for_eval").main(["--src", src, "--dst", str(tmp_path / "gqa" / "pred.json")])
    assert preds == [{"questionId": 201, "prediction": "yes"}, {"questionId": "202a", "prediction": "the table"}]
    assert json.load(open(tmp_path / "gqa" / "pred.json")) == preds
    load_script("convert_mmvet_for_submission").main(["--src", src, "--dst", str(tmp_path / "mmvet.json")])
    assert json.load(open(tmp_path / "mmvet.json")) == {"v1_201": "Yes.", "v1_202a": "The Table.."}


def test_convert_vqav2_and_vizwiz(tmp_path, capsys):
    vqa = tmp_path / "vqav2"
    write_jsonl(
        vqa / "llava_vqav2_mscoco_test2015.jsonl",
        [{"question_id": q, "image": f"{q}.jpg", "text": "?"} for q in (1, 2, 3)],
    )
    merge = vqa / "answers" / "test-dev" / "ckpt" / "merge.jsonl"
    write_jsonl(merge, [answer(1, "Two dogs."), answer(3, "Yes")])
    with open(merge, "a") as f:
        f.write("{truncated\n")
    dst = load_script("convert_vqav2_for_submission").main(["--dir", str(vqa), "--split", "test-dev", "--ckpt", "ckpt"])
    assert json.load(open(dst)) == [
        {"question_id": 1, "answer": "2 dogs"},
        {"question_id": 2, "answer": ""},
        {"question_id": 3, "answer": "yes"},
    ]
    assert "total results: 2, total split: 3, error_line: 1" in capsys.readouterr().out

    questions = write_jsonl(
        tmp_path / "vizwiz" / "llava_test.jsonl",
        [{"question_id": q, "image": f"VizWiz_{q}.jpg", "text": "?"} for q in (7, 8)],
    )
    results = write_jsonl(tmp_path / "vizwiz" / "answers.jsonl", [answer(8, "A Red Can!"), answer(7, "unanswerable")])
    vizwiz = load_script("convert_vizwiz_for_submission")
    upload = tmp_path / "vizwiz" / "upload" / "ckpt.json"
    vizwiz.main(["--annotation-file", questions, "--result-file", results, "--result-upload-file", str(upload)])
    assert json.load(open(upload)) == [
        {"image": "VizWiz_7.jpg", "answer": "unanswerable"},
        {"image": "VizWiz_8.jpg", "answer": "red can"},
    ]
    write_jsonl(results, [answer(7, "x")])
    with pytest.raises(SystemExit, match="no answer for 1 question"):
        vizwiz.main(["--annotation-file", questions, "--result-file", results, "--result-upload-file", str(upload)])


def test_convert_seed(tmp_path, capsys):
    data = {
        "question_type": {"Scene Understanding": 1, "Instance Counting": 2, "Action Recognition": 10},
        "questions": [
            {"question_id": "101", "data_type": "image", "question_type_id": 1, "answer": "A"},
            {"question_id": "102", "data_type": "image", "question_type_id": 1, "answer": "B"},
            {"question_id": "103", "data_type": "image", "question_type_id": 2, "answer": "C"},
            {"question_id": "104", "data_type": "video", "question_type_id": 10, "answer": "D"},
            {"question_id": "105", "data_type": "video", "question_type_id": 10, "answer": "A"},
        ],
    }
    ann = write_json(tmp_path / "SEED-Bench.json", data)
    results = write_jsonl(
        tmp_path / "merge.jsonl", [answer("101", "A"), answer("102", "A"), answer("103", "C"), answer("104", "D")]
    )  # 105 unanswered
    upload = tmp_path / "upload.jsonl"
    scores = load_script("convert_seed_for_submission").main(
        ["--annotation-file", ann, "--result-file", results, "--result-upload-file", str(upload)]
    )
    # Scene 1/2, Counting 1/1, Action 1/2; total 3/5; image 2/3; video 1/2.
    assert scores == pytest.approx({"all": 60.0, "image": 200 / 3, "video": 50.0})
    out = capsys.readouterr().out
    assert (
        "Scene Understanding: 50.00%" in out and "Instance Counting: 100.00%" in out and "Total accuracy: 60.00%" in out
    )
    assert read_jsonl(upload) == [
        {"question_id": q, "prediction": p} for q, p in (("101", "A"), ("102", "A"), ("103", "C"), ("104", "D"))
    ]


def test_convert_mmbench_to_xlsx(tmp_path):
    columns = [
        "index",
        "question",
        "hint",
        "A",
        "B",
        "C",
        "D",
        "answer",
        "category",
        "image",
        "source",
        "l2-category",
        "comment",
        "split",
    ]
    rows = [
        ["0", "Which one?", "h", "cat", "dog", "1", "", "A", "c", "iVBOR" * 20, "s", "l2", "nan", "dev"],
        ["1", "Count?", "nan", "3", "4", "5", "6", "B", "c", "0", "s", "l2", "", "dev"],
        ["2", "Unanswered?", "", "yes", "no", "", "", "A", "c", "0", "s", "l2", "", "dev"],
    ]
    tsv = tmp_path / "mmbench_dev.tsv"
    tsv.write_text("\n".join("\t".join(r) for r in [columns, *rows]) + "\n")
    result_dir = tmp_path / "answers"
    write_jsonl(
        result_dir / "exp.jsonl",
        [
            answer(0, "A", round_id=0),
            answer(0, "D", round_id=1),
            answer(1, "B. 4", round_id=0),
        ],
    )
    path = load_script("convert_mmbench_for_submission").main(
        [
            "--annotation-file",
            str(tsv),
            "--result-dir",
            str(result_dir),
            "--upload-dir",
            str(tmp_path / "up"),
            "--experiment",
            "exp",
        ]
    )
    header, table = read_xlsx(path)
    assert header == ["index", "question", "A", "B", "C", "D", "prediction", "answer", "split"]
    assert table == [
        # Round 0's answer, not the rotated round 1's. Numeric columns are numbers, floats where a cell is empty
        # (as pandas writes them).
        [0, "Which one?", "cat", "dog", 1.0, None, "A", "A", "dev"],
        [1, "Count?", "3", "4", 5.0, 6.0, "B. 4", "B", "dev"],
        [2, "Unanswered?", "yes", "no", None, None, None, "A", "dev"],
    ]


# ---------------------------------------------------------------------------------------------------------------------
# scripts/v1_5/eval/*.sh
# ---------------------------------------------------------------------------------------------------------------------

BENCHMARKS = [
    "vqav2",
    "gqa",
    "vizwiz",
    "sqa",
    "textvqa",
    "pope",
    "mme",
    "mmbench",
    "mmbench_cn",
    "seed",
    "llavabench",
    "mmvet",
]
SCRIPT_VALUES = {"CHUNKS": "2", "IDX": "1"}


def _commands(script: str) -> list[list[str]]:
    """Every `python ...` command in a shell script, continuation lines joined, variables filled with stand-ins."""
    text = open(script).read().replace("\\\n", " ")
    commands = []
    for line in text.splitlines():
        line = line.strip().removesuffix("&").strip()
        line = re.sub(
            r"\$\{([A-Za-z_]\w*)[^}]*\}|\$([A-Za-z_]\w*)",
            lambda m: SCRIPT_VALUES.get(m.group(1) or m.group(2), "X"),
            line,
        )
        words = shlex.split(line) if "python" in line else []
        while words and re.match(r"^[A-Z_]+=", words[0]):
            words = words[1:]
        if words and words[0] == "python":
            commands.append(words[1:])
    return commands


def _parser_for(command: list[str]):
    if command[0] == "-m":
        return importlib.import_module(command[1]).build_parser(), command[2:]
    path = command[0]
    if path.startswith("llava/eval/"):
        return importlib.import_module("llava.eval." + os.path.basename(path)[:-3]).build_parser(), command[1:]
    if path.startswith("scripts/"):
        return load_script(os.path.basename(path)[:-3]).build_parser(), command[1:]
    return None, command


def test_eval_shell_scripts_parse():
    scripts = sorted(glob.glob(os.path.join(REPO, "scripts", "v1_5", "eval", "*.sh")))
    assert {os.path.basename(s)[:-3] for s in scripts} >= set(BENCHMARKS)
    checked = 0
    for script in scripts:
        assert subprocess.run(["bash", "-n", script]).returncode == 0, script
        commands = _commands(script)
        assert commands, script
        for command in commands:
            parser, argv = _parser_for(command)
            if parser is None:
                assert command == ["eval/eval.py", "--tier", "testdev_balanced"], (script, command)  # GQA's own
                continue
            parser.exit_on_error = False
            args = parser.parse_args(argv)  # raises on an unknown flag or a bad value
            checked += 1
            if "conv_mode" in vars(args):
                assert args.temperature == 0 and args.conv_mode == "X", script
    assert checked >= 24


@pytest.mark.slow
def test_pope_script_end_to_end(tmp_path, tiny):
    """scripts/v1_5/eval/pope.sh as users run it, from a tree with playground/data, on a tiny checkpoint."""
    model = tiny.model("llama", seed=2)
    model.config.conv_template = "llava_v1"
    ckpt = tiny.save_full(model, name="pope-ckpt")
    for name in ("llava", "scripts"):
        os.symlink(os.path.join(REPO, name), tmp_path / name)
    pope = tmp_path / "playground" / "data" / "eval" / "pope"
    write_images(pope / "val2014", ["a.jpg", "b.jpg", "c.jpg"])
    labels = [("a.jpg", "yes"), ("b.jpg", "no"), ("c.jpg", "yes")]
    write_jsonl(
        pope / "coco" / "coco_pope_random.json",
        [
            {"question_id": i + 1, "image": img, "text": "Is there a dog?", "label": lab}
            for i, (img, lab) in enumerate(labels)
        ],
    )
    write_jsonl(
        pope / "llava_pope_test.jsonl",
        [
            {
                "question_id": 10 + i,
                "image": img,
                "text": "Is there a dog?\nAnswer the question using a single word or phrase.",
                "category": "random",
            }
            for i, (img, _) in enumerate(labels)
        ],
    )
    env = {
        **os.environ,
        "MODEL_PATH": ckpt,
        "CONV_MODE": "",
        "HF_HUB_OFFLINE": "1",
        "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"],
    }
    done = subprocess.run(
        ["bash", "scripts/v1_5/eval/pope.sh"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=1200
    )
    assert done.returncode == 0, done.stderr[-3000:]
    files = glob.glob(str(pope / "answers" / "*.jsonl"))
    assert [os.path.basename(f) for f in files] == [os.path.basename(ckpt) + ".jsonl"]  # CKPT from MODEL_PATH
    answers = read_jsonl(files[0])
    assert [a["question_id"] for a in answers] == [10, 11, 12]
    assert {a["metadata"]["conv_mode"] for a in answers} == {"llava_v1"}  # CONV_MODE= : the checkpoint's template
    assert "Category: random, # samples: 3" in done.stdout and "F1 score:" in done.stdout


def test_convert_mmbench_keeps_na_like_cells_as_text(tmp_path):
    """Issue 12 item 12: `NA`-like cells stay text in the upload; --na-as-missing writes them empty, as the original."""
    columns = ["index", "question", "hint", "A", "B", "C", "D", "answer", "image"]
    tsv = tmp_path / "mmbench_dev.tsv"
    tsv.write_text(
        "\t".join(columns) + "\n" + "\t".join(["0", "Which?", "NA", "N/A", "null", "#N/A", "", "A", "x"]) + "\n"
    )
    write_jsonl(tmp_path / "answers" / "exp.jsonl", [answer(0, "A", round_id=0)])
    common = ["--annotation-file", str(tsv), "--result-dir", str(tmp_path / "answers"), "--experiment", "exp"]
    converter = load_script("convert_mmbench_for_submission")
    header, table = read_xlsx(converter.main([*common, "--upload-dir", str(tmp_path / "up")]))
    assert header == ["index", "question", "A", "B", "C", "D", "prediction", "answer"]
    assert table == [[0, "Which?", "N/A", "null", "#N/A", None, "A", "A"]]
    _, table = read_xlsx(converter.main([*common, "--upload-dir", str(tmp_path / "orig"), "--na-as-missing"]))
    assert table == [[0, "Which?", None, None, None, None, "A", "A"]]
