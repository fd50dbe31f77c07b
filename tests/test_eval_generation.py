"""Answer generation scripts on a tiny checkpoint: answer-file format, chunking, batching, resuming, the CLIs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable

import pytest
from eval_helpers import (
    REPO,
    load_script,
    make_image,
    png_base64,
    read_jsonl,
    subprocess_env,
    write_images,
    write_jsonl,
)

from llava.eval import model_vqa, model_vqa_loader, model_vqa_mmbench, model_vqa_science, run_llava
from llava.eval.runner import get_chunk
from llava.inference import GenerationParams, LlavaEngine

ANSWER_KEYS = {"question_id", "prompt", "text", "answer_id", "model_id", "metadata"}
GREEDY = ["--temperature", "0", "--max_new_tokens", "5"]
CN_INSTRUCTION = "请直接回答选项字母。"
SQA_INSTRUCTION = "Answer with the option's letter from the given choices directly."


@pytest.fixture(scope="module")
def ckpt(tiny) -> str:
    model = tiny.model("llama", seed=5)
    model.config.conv_template = "llava_v1"
    return tiny.save_full(model, name="eval-ckpt")


@pytest.fixture(scope="module")
def engine(ckpt) -> LlavaEngine:
    return LlavaEngine.from_pretrained(ckpt, device="cpu")


def expected(engine, question: str, images: list, conv_mode: str | None = None) -> str:
    """What the engine answers for `question` put in the template with one marker per image (greedy, 5 tokens)."""
    prompt = engine.build_prompt(question, len(images), conv_mode)
    return engine.generate([prompt], [images], GenerationParams(temperature=0, max_new_tokens=5), conv_mode)[0]


# ---------------------------------------------------------------------------------------------------------------------
# Fixtures in each benchmark's format
# ---------------------------------------------------------------------------------------------------------------------


def vqa_questions(tmp_path, n: int = 5) -> tuple[str, str, list[dict]]:
    folder = tmp_path / "images"
    names = [f"img{i}.png" for i in range(3)] + ["sub/img3.png"]
    write_images(folder, names)
    questions = []
    for i in range(n):
        q = {"question_id": 100 + i, "text": f"What colour is shape {i}?", "category": "conv"}
        if i % 5 == 3:
            q["text"] = "Compare <image> with <image>: which is larger?"
            q["image"] = [names[0], names[3]]
        elif i % 5 != 4:  # every fifth question is text-only
            q["image"] = names[i % 4]
        questions.append(q)
    return write_jsonl(tmp_path / "questions.jsonl", questions), str(folder), questions


def sqa_files(tmp_path) -> tuple[str, str]:
    """ScienceQA in its own format (problems.json, pid_splits.json, images), converted by our converter."""
    base = tmp_path / "scienceqa"
    problems = {
        "1": {
            "question": "Which is a mammal?",
            "choices": ["frog", "whale"],
            "answer": 1,
            "hint": "",
            "image": None,
            "lecture": "Mammals have hair.",
            "solution": "A whale is a mammal.",
            "caption": "",
        },
        "2": {
            "question": "What colour is the shape?",
            "choices": ["red", "blue", "green"],
            "answer": 0,
            "hint": "Look at the image.",
            "image": "image.png",
            "lecture": "",
            "solution": "",
            "caption": "c",
        },
        "3": {
            "question": "Which is hot?",
            "choices": ["ice", "fire"],
            "answer": 1,
            "hint": "",
            "image": "image.png",
            "lecture": "L.",
            "solution": "S.",
            "caption": "",
        },
    }
    write_images(base / "images" / "test", ["2/image.png", "3/image.png"])
    (base / "problems.json").write_text(json.dumps(problems))
    (base / "pid_splits.json").write_text(json.dumps({"test": ["1", "2", "3"], "train": []}))
    converter = load_script("convert_sqa_to_llava")
    question_file = converter.main(
        ["convert_to_llava", "--base-dir", str(base), "--split", "test", "--prompt-format", "CQM-A"]
    )
    return question_file, str(base / "images" / "test")


def mmbench_tsv(tmp_path, name: str = "mmbench.tsv") -> tuple[str, list[dict]]:
    image0, image1 = png_base64(make_image(1)), png_base64(make_image(2, (50, 30)))
    rows = [
        {
            "index": 10,
            "question": "Which shape is shown?",
            "hint": "A picture of shapes.",
            "A": "circle",
            "B": "square",
            "C": "star",
            "D": "line",
            "answer": "B",
            "category": "shape",
            "image": image0,
        },
        {
            "index": 11,
            "question": "What colour?",
            "hint": "nan",
            "A": "red",
            "B": "blue",
            "C": "green",
            "D": "",
            "answer": "C",
            "category": "colour",
            "image": image1,
        },
        {
            "index": 12,
            "question": "Is it round?",
            "hint": "",
            "A": "yes",
            "B": "no",
            "C": "",
            "D": "",
            "answer": "A",
            "category": "shape",
            "image": "10",
        },  # the image of row 10, as newer TSVs store it
    ]
    columns = ["index", "question", "hint", "A", "B", "C", "D", "answer", "category", "image"]
    path = tmp_path / name
    path.write_text(
        "\t".join(columns) + "\n" + "".join("\t".join(str(r[c]) for c in columns) + "\n" for r in rows),
        encoding="utf-8",
    )
    return str(path), rows


def script_case(name: str, tmp_path) -> tuple[object, list[str], Callable]:
    """(module, CLI arguments without --answers-file, key of a record) for one generation script."""
    if name in ("model_vqa", "model_vqa_loader"):
        qfile, folder, _ = vqa_questions(tmp_path, n=7)
        args = ["--question-file", qfile, "--image-folder", folder]
        if name == "model_vqa_loader":
            args += ["--batch-size", "2", "--num-workers", "0"]
        return {"model_vqa": model_vqa, "model_vqa_loader": model_vqa_loader}[name], args, lambda r: r["question_id"]
    if name == "model_vqa_science":
        qfile, folder = sqa_files(tmp_path)
        return (
            model_vqa_science,
            ["--question-file", qfile, "--image-folder", folder, "--single-pred-prompt"],
            (lambda r: r["question_id"]),
        )
    qfile, _ = mmbench_tsv(tmp_path)
    return (
        model_vqa_mmbench,
        ["--question-file", qfile, "--all-rounds", "--single-pred-prompt"],
        (lambda r: (r["question_id"], r["round_id"])),
    )


def run(module, engine, ckpt, args: list[str]):
    parsed = module.build_parser().parse_args(["--model-path", ckpt, *GREEDY, *args])
    return module.eval_model(parsed, engine=engine)


# ---------------------------------------------------------------------------------------------------------------------
# Tests
# ---------------------------------------------------------------------------------------------------------------------


def test_get_chunk_covers_items_in_order():
    items = list(range(7))
    assert [x for k in range(3) for x in get_chunk(items, 3, k)] == items
    assert [len(get_chunk(items, 3, k)) for k in range(3)] == [3, 3, 1]
    assert get_chunk([1, 2], 4, 3) == [] and get_chunk([], 2, 1) == []
    with pytest.raises(ValueError, match="chunk-idx"):
        get_chunk(items, 2, 2)


def test_model_vqa_answers_every_question(engine, ckpt, tmp_path):
    qfile, folder, questions = vqa_questions(tmp_path)
    path = run(
        model_vqa,
        engine,
        ckpt,
        ["--question-file", qfile, "--image-folder", folder, "--answers-file", str(tmp_path / "out" / "answers.jsonl")],
    )
    answers = read_jsonl(path)
    assert [a["question_id"] for a in answers] == [q["question_id"] for q in questions]
    for q, a in zip(questions, answers):
        assert set(a) == ANSWER_KEYS
        assert a["prompt"] == q["text"] and a["model_id"] == os.path.basename(ckpt)
        assert a["metadata"]["conv_mode"] == "llava_v1" and a["metadata"]["temperature"] == 0
        names = q.get("image") or []
        images = [_load(folder, n) for n in ([names] if isinstance(names, str) else names)]
        assert a["text"] == expected(engine, q["text"], images)
    assert len({a["answer_id"] for a in answers}) == len(answers)
    # The text-only question and the two-image one got different answers from the one-image ones.
    assert len({a["text"] for a in answers}) > 1


def _load(folder, name):
    from PIL import Image

    with Image.open(os.path.join(folder, name)) as im:
        return im.convert("RGB")


@pytest.mark.parametrize("name", ["model_vqa", "model_vqa_loader", "model_vqa_science", "model_vqa_mmbench"])
def test_chunked_runs_merge_to_the_unchunked_run(name, engine, ckpt, tmp_path):
    module, args, key = script_case(name, tmp_path)
    whole = read_jsonl(run(module, engine, ckpt, [*args, "--answers-file", str(tmp_path / "all.jsonl")]))
    merged = []
    for idx in range(3):
        out = str(tmp_path / f"3_{idx}.jsonl")
        merged += read_jsonl(
            run(module, engine, ckpt, [*args, "--answers-file", out, "--num-chunks", "3", "--chunk-idx", str(idx)])
        )
    assert len(whole) >= 3 and len({key(r) for r in whole}) == len(whole)
    assert all(ANSWER_KEYS <= set(r) for r in whole)
    strip = [{k: v for k, v in r.items() if k != "answer_id"} for r in whole]
    assert [{k: v for k, v in r.items() if k != "answer_id"} for r in merged] == strip


def test_batched_loader_equals_batch_size_one(engine, ckpt, tmp_path):
    qfile, folder, questions = vqa_questions(tmp_path, n=6)
    common = ["--question-file", qfile, "--image-folder", folder]
    one = run(
        model_vqa_loader,
        engine,
        ckpt,
        [*common, "--answers-file", str(tmp_path / "b1.jsonl"), "--batch-size", "1", "--num-workers", "0"],
    )
    # Three per batch, images loaded by a DataLoader worker process.
    three = run(
        model_vqa_loader,
        engine,
        ckpt,
        [*common, "--answers-file", str(tmp_path / "b3.jsonl"), "--batch-size", "3", "--num-workers", "1"],
    )
    texts_one = [(a["question_id"], a["text"]) for a in read_jsonl(one)]
    assert texts_one == [(a["question_id"], a["text"]) for a in read_jsonl(three)]
    assert [q for q, _ in texts_one] == [q["question_id"] for q in questions]


def test_resume_skips_answered_questions(engine, ckpt, tmp_path):
    qfile, folder, questions = vqa_questions(tmp_path)
    out = tmp_path / "answers.jsonl"
    args = ["--question-file", qfile, "--image-folder", folder, "--answers-file", str(out)]
    first = read_jsonl(run(model_vqa, engine, ckpt, args))
    # Keep two answers and half of a third, as a run killed while writing leaves the file.
    lines = out.read_text().splitlines()
    out.write_text(lines[0] + "\n" + lines[1] + "\n" + lines[2][:20])
    resumed = read_jsonl(run(model_vqa, engine, ckpt, args))
    assert [a["question_id"] for a in resumed] == [q["question_id"] for q in questions]
    assert [a["answer_id"] for a in resumed[:2]] == [a["answer_id"] for a in first[:2]]
    assert [a["text"] for a in resumed] == [a["text"] for a in first]
    again = read_jsonl(run(model_vqa, engine, ckpt, args))
    assert again == resumed  # nothing left to answer
    fresh = read_jsonl(run(model_vqa, engine, ckpt, [*args, "--overwrite"]))
    assert len(fresh) == len(first) and not {a["answer_id"] for a in fresh} & {a["answer_id"] for a in first}
    out.write_text("not json\n" + lines[0] + "\n")
    with pytest.raises(ValueError, match="line 1 is not an answer record"):
        run(model_vqa, engine, ckpt, args)


def test_conv_mode_flag_overrides_the_checkpoint_template(engine, ckpt, tmp_path):
    qfile, folder, questions = vqa_questions(tmp_path, n=3)
    args = ["--question-file", qfile, "--image-folder", folder, "--conv-mode", "llava_v0"]
    answers = read_jsonl(run(model_vqa, engine, ckpt, [*args, "--answers-file", str(tmp_path / "v0.jsonl")]))
    assert {a["metadata"]["conv_mode"] for a in answers} == {"llava_v0"}
    q = questions[0]
    assert answers[0]["text"] == expected(engine, q["text"], [_load(folder, q["image"])], "llava_v0")
    with pytest.raises(ValueError, match="Unknown `--conv-mode` `nope`"):
        run(
            model_vqa,
            engine,
            ckpt,
            ["--question-file", qfile, "--conv-mode", "nope", "--answers-file", str(tmp_path / "x.jsonl")],
        )


def test_model_vqa_science_prompts(engine, ckpt, tmp_path):
    qfile, folder = sqa_files(tmp_path)
    questions = json.load(open(qfile))
    answers = read_jsonl(
        run(
            model_vqa_science,
            engine,
            ckpt,
            [
                "--question-file",
                qfile,
                "--image-folder",
                folder,
                "--single-pred-prompt",
                "--answers-file",
                str(tmp_path / "sqa.jsonl"),
            ],
        )
    )
    assert [a["question_id"] for a in answers] == ["1", "2", "3"]
    for q, a in zip(questions, answers):
        question = q["conversations"][0]["value"].replace("<image>", "").strip()
        assert a["prompt"] == ("<image>\n" if "image" in q else "") + question + "\n" + SQA_INSTRUCTION
        images = [_load(folder, q["image"])] if "image" in q else []
        assert a["text"] == expected(engine, question + "\n" + SQA_INSTRUCTION, images)
    assert answers[0]["prompt"].startswith("Context: N/A\nQuestion: Which is a mammal?\nOptions: (A) frog (B) whale")


def test_model_vqa_mmbench_rounds_and_chinese_prompt(engine, ckpt, tmp_path):
    qfile, rows = mmbench_tsv(tmp_path)
    out = str(tmp_path / "mmbench.jsonl")
    answers = read_jsonl(
        run(
            model_vqa_mmbench,
            engine,
            ckpt,
            ["--question-file", qfile, "--answers-file", out, "--all-rounds", "--single-pred-prompt", "--lang", "cn"],
        )
    )
    assert [(a["question_id"], a["round_id"]) for a in answers] == [(10, r) for r in range(4)] + [
        (11, r) for r in range(3)
    ] + [(12, r) for r in range(2)]
    second = answers[1]  # row 10, round 1: options rotated by one, letters stay A..D
    assert second["options"] == ["square", "star", "line", "circle"]
    assert second["option_char"] == ["B", "C", "D", "A"]
    assert second["prompt"] == "A picture of shapes.\nWhich shape is shown?\nA. square\nB. star\nC. line\nD. circle"
    assert answers[4]["prompt"] == "What colour?\nA. red\nB. blue\nC. green"  # "nan" hint dropped, 3 options
    image10 = make_image(1)
    assert second["text"] == expected(engine, second["prompt"] + "\n" + CN_INSTRUCTION, [image10])
    assert answers[7]["text"] == expected(engine, answers[7]["prompt"] + "\n" + CN_INSTRUCTION, [image10])


def test_run_llava_several_images_with_placeholders(engine, ckpt, tmp_path, capsys):
    paths = write_images(tmp_path, ["a.png", "b.png"])
    query = "Is <image-placeholder> brighter than <image-placeholder>?"
    parsed = run_llava.build_parser().parse_args(
        ["--model-path", ckpt, "--image-file", ",".join(paths), "--query", query, *GREEDY]
    )
    out = run_llava.eval_model(parsed, engine=engine)
    images = [_load(tmp_path, "a.png"), _load(tmp_path, "b.png")]
    assert out == expected(engine, "Is <image> brighter than <image>?", images)
    assert capsys.readouterr().out.strip() == out.strip()
    # README style: a bare object with only some attributes.
    args = type(
        "Args",
        (),
        {
            "model_path": ckpt,
            "model_base": None,
            "query": "Describe it.",
            "conv_mode": None,
            "image_file": paths[0],
            "sep": ",",
            "temperature": 0,
            "top_p": None,
            "num_beams": 1,
            "max_new_tokens": 5,
        },
    )()
    assert run_llava.eval_model(args, engine=engine) == expected(engine, "Describe it.", images[:1])
    args.query = "Compare <image-placeholder> and <image-placeholder>."
    with pytest.raises(ValueError, match=r"2 `<image>` marker\(s\) but 1 image"):
        run_llava.eval_model(args, engine=engine)


@pytest.mark.slow
def test_cli_module_and_file_path(engine, ckpt, tmp_path):
    """`python -m llava.eval.model_vqa` and `python llava/eval/run_llava.py` as users type them."""
    qfile, folder, questions = vqa_questions(tmp_path, n=3)
    out = tmp_path / "cli.jsonl"
    env = subprocess_env()
    cmd = [
        sys.executable,
        "-m",
        "llava.eval.model_vqa",
        "--model-path",
        ckpt,
        "--question-file",
        qfile,
        "--image-folder",
        folder,
        "--answers-file",
        str(out),
        *GREEDY,
    ]
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-2000:]
    in_process = read_jsonl(
        run(
            model_vqa,
            engine,
            ckpt,
            ["--question-file", qfile, "--image-folder", folder, "--answers-file", str(tmp_path / "ip.jsonl")],
        )
    )
    assert [(a["question_id"], a["text"]) for a in read_jsonl(out)] == [
        (a["question_id"], a["text"]) for a in in_process
    ]
    image = write_images(tmp_path, ["x.png"])[0]
    cmd = [
        sys.executable,
        "llava/eval/run_llava.py",
        "--model-path",
        ckpt,
        "--image-file",
        image,
        "--query",
        "What is it?",
        *GREEDY,
    ]
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == expected(engine, "What is it?", [_load(tmp_path, "x.png")]).strip()


def test_missing_question_file_fails_before_loading(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        run(
            model_vqa,
            None,
            "/nonexistent/model",
            ["--question-file", str(tmp_path / "nope.jsonl"), "--answers-file", str(tmp_path / "a.jsonl")],
        )


def test_model_vqa_science_answer_prompter(engine, ckpt, tmp_path):
    """v0 two-pass prompting: the reasoning is fed back with `###\\nANSWER:` and the reply joined as the answer."""
    qfile, folder = sqa_files(tmp_path)
    questions = json.load(open(qfile))
    args = ["--question-file", qfile, "--image-folder", folder, "--answer-prompter"]
    answers = read_jsonl(run(model_vqa_science, engine, ckpt, [*args, "--answers-file", str(tmp_path / "ap.jsonl")]))
    params = GenerationParams(temperature=0, max_new_tokens=64)
    for q, a in zip(questions, answers):
        question = q["conversations"][0]["value"].replace("<image>", "").strip()
        images = [_load(folder, q["image"])] if "image" in q else []
        reasoning = expected(engine, question, images)
        prompt = engine.build_prompt(question, len(images)) + reasoning + " ###\nANSWER:"
        answer = engine.generate([prompt], [images], params)[0]
        assert a["text"] == reasoning + "\n The answer is " + answer


def test_resume_needs_the_same_model_questions_and_settings(engine, ckpt, tmp_path):
    """Issue 12 item 21: an answers file is resumed only when its answers record the same run (in `metadata`)."""
    import shutil

    qfile, folder, _ = vqa_questions(tmp_path, n=3)
    model_dir = str(tmp_path / "llava-retrained")
    shutil.copytree(ckpt, model_dir)
    out = tmp_path / "answers.jsonl"
    args = ["--question-file", qfile, "--image-folder", folder, "--answers-file", str(out)]

    def run_here(*extra):
        parsed = model_vqa.build_parser().parse_args(["--model-path", model_dir, *GREEDY, *args, *extra])
        return model_vqa.eval_model(parsed, engine=engine)

    run_here()
    meta = read_jsonl(out)[0]["metadata"]
    assert meta["max_new_tokens"] == 5 and meta["conv_mode"] == "llava_v1"
    assert meta["model_path"] == model_dir and len(meta["question_file_sha256"]) == 64 and meta["model_fingerprint"]
    assert os.listdir(tmp_path / ".") and not [n for n in os.listdir(tmp_path) if n.endswith(".meta.json")]
    first = out.read_text()
    out.write_text("".join(first.splitlines(keepends=True)[:2]))  # a partial file, resumed by the same run
    run_here()
    assert len(read_jsonl(out)) == 3
    with pytest.raises(ValueError, match=r"line 1 was written by a different run.*max_new_tokens: 5 -> 6.*--overwrite"):
        run_here("--max_new_tokens", "6")
    with pytest.raises(ValueError, match=r"conv_mode: 'llava_v1' -> 'llava_v0'"):
        run_here("--conv-mode", "llava_v0")
    # The questions changed.
    with open(qfile, "a", encoding="utf-8") as f:
        f.write(json.dumps({"question_id": 99, "text": "New question?"}) + "\n")
    with pytest.raises(ValueError, match=r"question_file_sha256"):
        run_here()
    # The checkpoint was retrained in the same folder.
    weights = [n for n in os.listdir(model_dir) if n.endswith(".safetensors")][0]
    with open(os.path.join(model_dir, weights), "r+b") as f:
        f.seek(-8, os.SEEK_END)
        f.write(b"\x01" * 8)
    with pytest.raises(ValueError, match=r"model_fingerprint"):
        run_here()
    run_here("--overwrite")
    assert [a["question_id"] for a in read_jsonl(out)][-1] == 99
    run_here()  # the answers now record this run: resumes, nothing to answer
    # A file written by the original scripts (`metadata: {}`) is not resumed silently.
    records = read_jsonl(out)
    write_jsonl(out, [{**r, "metadata": {}} for r in records])
    with pytest.raises(ValueError, match=r"line 1 does not record the model.*--overwrite"):
        run_here()


def test_default_template_is_the_originals_not_a_name_guess(engine, ckpt, tmp_path, monkeypatch):
    """Issue 12 item 20: no --conv-mode and no recorded template -> llava_v1 (model_vqa_science: llava_v0), even when
    the engine guessed another template from the folder name."""
    monkeypatch.delattr(engine.model.config, "conv_template")
    monkeypatch.setattr(engine, "conv_mode", "llava_v0")  # what a name like `llava-13b-finetune` guesses
    qfile, folder, _ = vqa_questions(tmp_path, n=1)
    vqa = read_jsonl(
        run(
            model_vqa,
            engine,
            ckpt,
            ["--question-file", qfile, "--image-folder", folder, "--answers-file", str(tmp_path / "v.jsonl")],
        )
    )
    assert {a["metadata"]["conv_mode"] for a in vqa} == {"llava_v1"}
    monkeypatch.setattr(engine, "conv_mode", "llava_v1")
    sqa_q, sqa_folder = sqa_files(tmp_path)
    sqa = read_jsonl(
        run(
            model_vqa_science,
            engine,
            ckpt,
            ["--question-file", sqa_q, "--image-folder", sqa_folder, "--answers-file", str(tmp_path / "s.jsonl")],
        )
    )
    assert {a["metadata"]["conv_mode"] for a in sqa} == {"llava_v0"}
    # A recorded template wins over the script default.
    monkeypatch.setattr(engine.model.config, "conv_template", "vicuna_v1", raising=False)
    sqa = read_jsonl(
        run(
            model_vqa_science,
            engine,
            ckpt,
            ["--question-file", sqa_q, "--image-folder", sqa_folder, "--answers-file", str(tmp_path / "s2.jsonl")],
        )
    )
    assert {a["metadata"]["conv_mode"] for a in sqa} == {"vicuna_v1"}


def test_mmbench_defaults_and_na_options(tmp_path):
    """Issue 12 items 22 and 12: 1024 new tokens as the original; `NA`-like option texts stay options."""
    from llava.eval.model_vqa_mmbench import PANDAS_NA_VALUES, get_options, read_tsv

    assert (
        model_vqa_mmbench.build_parser().parse_args(["--question-file", "q", "--answers-file", "a"]).max_new_tokens
        == 1024
    )
    pandas = pytest.importorskip("pandas")
    from pandas._libs.parsers import STR_NA_VALUES

    assert PANDAS_NA_VALUES == set(STR_NA_VALUES)  # the set pandas reads as missing, as the original's read did
    tsv = tmp_path / "na.tsv"
    tsv.write_text("index\tquestion\tA\tB\tC\tD\timage\n1\tWhich?\tNA\tN/A\tnull\t#N/A\tx\n2\tAnd?\tn/a\tyes\t\t\tx\n")
    rows = read_tsv(str(tsv))
    assert get_options(rows[0], ["A", "B", "C", "D"]) == ["NA", "N/A", "null", "#N/A"]
    assert get_options(rows[1], ["A", "B", "C", "D"]) == ["n/a", "yes"]
    assert get_options(rows[0], ["A", "B", "C", "D"], na_as_missing=True) == []  # the original's behaviour
    assert pandas.read_table(str(tsv))["A"].isna().all()  # why: pandas' defaults drop them


def test_original_loader_names_custom_dataset_and_collate_fn(engine, tmp_path):
    """Issue 12 item 23: `model_vqa_loader.CustomDataset` / `collate_fn` with the original's call shapes."""
    from torch.utils.data import DataLoader

    from llava.mm_utils import process_images, tokenizer_image_token

    qfile, folder, questions = vqa_questions(tmp_path, n=4)
    one_image = [q for q in questions if isinstance(q.get("image"), str)]
    dataset = model_vqa_loader.CustomDataset(
        one_image, folder, engine.tokenizer, engine.image_processor, engine.model.config
    )
    assert len(dataset) == len(one_image) and dataset.conv_mode == "llava_v1"
    loader = DataLoader(dataset, batch_size=1, num_workers=0, shuffle=False, collate_fn=model_vqa_loader.collate_fn)
    for q, (input_ids, images, sizes) in zip(one_image, loader):
        image = _load(folder, q["image"])
        prompt = engine.build_prompt(q["text"], 1, "llava_v1")
        assert input_ids.tolist() == [tokenizer_image_token(prompt, engine.tokenizer, return_tensors="pt").tolist()]
        assert (
            images.shape[0] == 1
            and (images[0] == process_images([image], engine.image_processor, engine.model.config)[0]).all()
        )
        assert sizes == (image.size,)


def test_mmtag_prompts_are_the_originals_unless_training_markers_and_answers_record_which(engine, ckpt, tmp_path):
    """`*_mmtag` templates: the original eval scripts' bare `<image>` by default, training's `<Image><image></Image>`
    with `--training-image-markers` (the engine's own prompt); a file is not resumed under the other layout."""
    qfile, folder, questions = vqa_questions(tmp_path, n=2)
    out = tmp_path / "mmtag.jsonl"
    args = ["--question-file", qfile, "--image-folder", folder, "--answers-file", str(out), "--conv-mode", "v1_mmtag"]
    parsed = model_vqa.build_parser().parse_args(["--model-path", ckpt, *args])
    prompt = model_vqa.question_requests(questions, parsed, engine, "v1_mmtag", qfile)[0].prompt
    assert "USER: <image>\n" + questions[0]["text"] in prompt and "<Image><image>" not in prompt
    parsed.training_image_markers = True
    wrapped = model_vqa.question_requests(questions, parsed, engine, "v1_mmtag", qfile)[0].prompt
    assert wrapped == engine.build_prompt(questions[0]["text"], 1, "v1_mmtag") != prompt
    answers = read_jsonl(run(model_vqa, engine, ckpt, args))
    assert {a["metadata"]["image_markers"] for a in answers} == {"original"}
    with pytest.raises(ValueError, match="--overwrite"):
        run(model_vqa, engine, ckpt, [*args, "--training-image-markers"])
    answers = read_jsonl(run(model_vqa, engine, ckpt, [*args, "--training-image-markers", "--overwrite"]))
    assert {a["metadata"]["image_markers"] for a in answers} == {"training"}
    plain_args = ["--question-file", qfile, "--image-folder", folder, "--conv-mode", "llava_v1"]
    answers = read_jsonl(run(model_vqa, engine, ckpt, [*plain_args, "--answers-file", str(tmp_path / "v1.jsonl")]))
    assert all("image_markers" not in a["metadata"] for a in answers)  # no mmtag: the two layouts are the same
