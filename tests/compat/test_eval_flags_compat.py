"""The flags that restore the original's behaviour where our eval differs on purpose, checked against the original's
own code (issue 12, docs/Migration.md): `summarize_gpt_review.py --keep-failed`, and the question prompts of the
eval scripts and the CLI in `*_mmtag` templates (the original's bare `<image>` by default, training's
`<Image><image></Image>` with `--training-image-markers`).

The original's eval scripts and CLI are run in .venv-orig (the `orig` fixture) with their model loader replaced by a
stand-in model config and `tokenizer_image_token` recording the prompt it is given (no original checkpoint is needed
to build a prompt); everything else of theirs runs as written.
"""

from __future__ import annotations

import ast
import base64
import io
import json
import os
import subprocess
import sys

import pytest
from PIL import Image

from llava.conversation import conv_templates
from llava.eval import model_vqa, model_vqa_loader, model_vqa_mmbench, model_vqa_science
from llava.inference import LlavaEngine

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# ---------------------------------------------------------------------------------------------------------------------
# summarize_gpt_review --keep-failed
# ---------------------------------------------------------------------------------------------------------------------

ORIGINAL_STYLE = [  # as the original's eval_gpt_review*.py wrote them: question_id, category, tuple
    {"question_id": 1, "category": "conv", "tuple": [8, 6]},
    {"question_id": 2, "category": "conv", "tuple": [-1, -1]},
    {"question_id": 3, "category": "detail", "tuple": [9.5, 7]},
    {"question_id": 4, "category": "detail", "tuple": [7, 7]},
    {"question_id": 5, "category": "complex", "tuple": [-1, -1]},
    {"question_id": 6, "category": "complex", "tuple": [10, 3]},
    {"question_id": 7, "category": "conv", "tuple": [6, 9]},
]
OURS_STYLE = [  # as ours write them: also judge, rule hash and score parser
    {**r, "judge_model": "gpt-4-0314", "rule_sha256": "ab12", "score_parser": "original"} for r in ORIGINAL_STYLE
] + [{"question_id": 8, "category": "conv", "tuple": [-1, -1], "judge_model": "gpt-4-0314", "rule_sha256": "ab12"}]
NO_CATEGORY = [{"question_id": k, "score": s} for k, s in enumerate([[8, 6], [-1, -1], [3, 10], [-1, -1], [7, 5]])]


def _write(path, records) -> str:
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    return str(path)


def test_summarize_keep_failed_prints_the_originals_numbers(orig, tmp_path):
    files = [
        _write(tmp_path / "gpt4_text_review_orig.jsonl", ORIGINAL_STYLE),
        _write(tmp_path / "reviews_ours.jsonl", OURS_STYLE),
        _write(tmp_path / "review_nocat.jsonl", NO_CATEGORY),
    ]
    for extra in ([], ["-i", "6", "3"]):
        flags = ["-f", *files, *extra]
        theirs = orig.run(
            """
            import runpy, sys
            sys.argv[0] = "summarize_gpt_review.py"
            runpy.run_module("llava.eval.summarize_gpt_review", run_name="__main__")
            """,
            *flags,
        ).stdout
        script = os.path.join(ROOT, "llava", "eval", "summarize_gpt_review.py")
        ours = subprocess.run(
            [sys.executable, script, "--keep-failed", *flags], capture_output=True, text=True, cwd=tmp_path, timeout=300
        )
        assert ours.returncode == 0, ours.stderr
        assert ours.stdout == theirs, extra
        assert "unparseable: 3 review(s) scored [-1, -1], averaged in (--keep-failed)" in ours.stderr
        # the default leaves the [-1, -1] reviews out, so its numbers differ from the original's
        default = subprocess.run([sys.executable, script, *flags], capture_output=True, text=True, cwd=tmp_path)
        assert default.returncode == 0, default.stderr
        numbers = [line for line in default.stdout.splitlines() if line.split(" ")[0] in ("all", "conv")]
        assert numbers and not set(numbers) <= set(theirs.splitlines())


# ---------------------------------------------------------------------------------------------------------------------
# Question prompts in *_mmtag templates: eval scripts and CLI
# ---------------------------------------------------------------------------------------------------------------------

QUESTION = "What is unusual about this image?"
TEMPLATES = ["v0_mmtag", "v1_mmtag", "llava_v1"]  # llava_v1: no mmtag, the two layouts agree

# Runs an original eval script's eval_model (or the loader's CustomDataset) until it tokenizes its first prompt.
ORIGINAL_PROMPTS = """
import importlib, json, sys, types

jobs = json.loads(sys.argv[1])


class Captured(Exception):
    pass


class AnyTensor:  # stands in for image tensors on the way to `.cuda()` (no GPU needed to build a prompt)
    def __getattr__(self, name):
        return lambda *a, **k: self

    def __getitem__(self, index):
        return self


out = {}
for job in jobs:
    m = importlib.import_module("llava.eval." + job["script"])
    config = types.SimpleNamespace(mm_use_im_start_end=job["start_end"])
    model = types.SimpleNamespace(config=config, device="cpu")
    seen = []

    def record(prompt, *a, **k):
        seen.append(prompt)
        raise Captured

    m.load_pretrained_model = lambda *a, **k: (None, model, None, 2048)
    m.tokenizer_image_token = record
    m.process_images = lambda *a, **k: AnyTensor()
    args = types.SimpleNamespace(
        model_path=job["model_path"], model_base=None, question_file=job["question_file"],
        answers_file=job["answers_file"], image_folder=job["image_folder"], conv_mode=job["conv_mode"],
        num_chunks=1, chunk_idx=0, temperature=0, top_p=None, num_beams=1, max_new_tokens=8,
        single_pred_prompt=job["single_pred_prompt"], all_rounds=False, lang="en",
    )
    try:
        if job["script"] == "model_vqa_loader":
            m.args = args  # the original's CustomDataset reads the module-level `args`
            questions = [json.loads(q) for q in open(job["question_file"])]
            m.CustomDataset(questions, job["image_folder"], None, None, config)[0]
        else:
            m.eval_model(args)
    except Captured:
        pass
    out[job["key"]] = seen[0] if seen else None
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def question_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("mmtag-questions")
    Image.new("RGB", (32, 24), (200, 30, 40)).save(root / "a.png")
    buf = io.BytesIO()
    Image.new("RGB", (32, 24), (20, 30, 240)).save(buf, format="PNG")
    vqa = _write(root / "vqa.jsonl", [{"question_id": 0, "image": "a.png", "text": QUESTION}])
    science = root / "science.json"
    science.write_text(
        json.dumps(
            [{"id": "s0", "image": "a.png", "conversations": [{"from": "human", "value": f"<image>\n{QUESTION}"}]}]
        )
    )
    mmbench = root / "mmbench.tsv"
    image = base64.b64encode(buf.getvalue()).decode()
    mmbench.write_text(
        f"index\tquestion\thint\tA\tB\tC\tD\timage\n7\t{QUESTION}\tA hint.\tred\tblue\tgreen\t\t{image}\n"
    )
    return {
        "root": str(root),
        "model_vqa": vqa,
        "model_vqa_loader": vqa,
        "science": str(science),
        "mmbench": str(mmbench),
    }


SCRIPTS = {  # script -> (our module, its question file)
    "model_vqa": (model_vqa, "model_vqa"),
    "model_vqa_loader": (model_vqa_loader, "model_vqa_loader"),
    "model_vqa_science": (model_vqa_science, "science"),
    "model_vqa_mmbench": (model_vqa_mmbench, "mmbench"),
}


def _our_prompt(script: str, files: dict, engine, conv_mode: str, extra: list[str]) -> str:
    """The prompt our script sends for its first question (built by the script's own request function)."""
    module = SCRIPTS[script][0]
    question_file = files[SCRIPTS[script][1]]
    args = module.build_parser().parse_args(
        ["--question-file", question_file, "--answers-file", "a.jsonl", "--image-folder", files["root"], *extra]
    )
    if script == "model_vqa_science":
        questions = json.load(open(question_file))
        return model_vqa_science.science_requests(questions, args, engine, conv_mode, question_file)[0].prompt
    if script == "model_vqa_mmbench":
        rows = model_vqa_mmbench.read_tsv(question_file)
        return model_vqa_mmbench.mmbench_requests(rows, rows, args, engine, conv_mode)[0].prompt
    questions = [json.loads(line) for line in open(question_file)]
    return model_vqa.question_requests(questions, args, engine, conv_mode, question_file)[0].prompt


@pytest.fixture(scope="module")
def engine(tiny):
    from transformers import AutoTokenizer

    model = tiny.model("llama", seed=1)
    return LlavaEngine(AutoTokenizer.from_pretrained(tiny.tokenizer_dir), model, None, 2048, "llava_v1")


def test_eval_script_prompts_are_the_originals_and_the_flag_gives_trainings(orig, question_files, engine, tmp_path):
    jobs, cases = [], []
    for script, (_, kind) in SCRIPTS.items():
        for conv_mode in TEMPLATES:
            for start_end in (False, True):
                for single in (False, True) if script in ("model_vqa_science", "model_vqa_mmbench") else (False,):
                    key = f"{script}|{conv_mode}|{start_end}|{single}"
                    jobs.append(
                        {
                            "key": key,
                            "script": script,
                            "conv_mode": conv_mode,
                            "start_end": start_end,
                            "single_pred_prompt": single,
                            "model_path": str(tmp_path / "llava-test-model"),
                            "question_file": question_files[kind],
                            "answers_file": str(tmp_path / "orig-answers" / f"{len(jobs)}.jsonl"),
                            "image_folder": question_files["root"],
                        }
                    )
                    cases.append((key, script, conv_mode, start_end, single))
    theirs = orig.json(ORIGINAL_PROMPTS, json.dumps(jobs))
    wrapped_any = False
    for key, script, conv_mode, start_end, single in cases:
        engine.model.config.mm_use_im_start_end = start_end
        extra = ["--single-pred-prompt"] if single else []
        assert theirs[key] is not None, key
        assert _our_prompt(script, question_files, engine, conv_mode, extra) == theirs[key], key
        trained = _our_prompt(script, question_files, engine, conv_mode, [*extra, "--training-image-markers"])
        marker = "<im_start><image><im_end>" if start_end else "<image>"
        if conv_templates[conv_mode].mmtag:
            assert trained == theirs[key].replace(marker, f"<Image>{marker}</Image>", 1), key
            assert trained.count("<Image>") == theirs[key].count("<Image>") + 1  # the system text names <Image> too
            wrapped_any = True
        else:
            assert trained == theirs[key], key
    assert wrapped_any
    engine.model.config.mm_use_im_start_end = False


def test_loader_custom_dataset_tokenizes_the_originals_prompt(orig, question_files, engine, image_processor, tmp_path):
    """The original-named `CustomDataset` (for code that runs its own loop) tokenizes the original's prompt."""
    from llava.eval.model_vqa_loader import CustomDataset
    from llava.mm_utils import tokenizer_image_token

    job = {
        "key": "k",
        "script": "model_vqa_loader",
        "conv_mode": "v1_mmtag",
        "start_end": False,
        "single_pred_prompt": False,
        "model_path": str(tmp_path / "llava-test-model"),
        "question_file": question_files["model_vqa_loader"],
        "answers_file": str(tmp_path / "a.jsonl"),
        "image_folder": question_files["root"],
    }
    prompt = orig.json(ORIGINAL_PROMPTS, json.dumps([job]))["k"]
    assert "<image>\n" + QUESTION in prompt
    questions = [json.loads(line) for line in open(job["question_file"])]
    config = engine.model.config
    dataset = CustomDataset(questions, job["image_folder"], engine.tokenizer, image_processor, config, "v1_mmtag")
    input_ids, _, size = dataset[0]
    assert input_ids.tolist() == tokenizer_image_token(prompt, engine.tokenizer)
    assert size == (32, 24)


@pytest.fixture(scope="module")
def cli_checkpoint(tiny):
    return tiny.save_full(tiny.model("llama", seed=2), name="cli-mmtag")


def _our_cli_prompt(checkpoint: str, image: str, conv_mode: str, *extra: str) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "llava.serve.cli", "--model-path", checkpoint, "--device", "cpu", "--image-file", image,
         "--conv-mode", conv_mode, "--max-new-tokens", "2", "--temperature", "0", "--debug", *extra],
        input=QUESTION + "\n", capture_output=True, text=True, cwd=ROOT, timeout=600,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    debug = next(line for line in done.stdout.splitlines() if line.startswith("{'prompt'"))
    return ast.literal_eval(debug)["prompt"]


ORIGINAL_CLI = """
import builtins, json, sys, types
import llava.serve.cli as m


class Captured(Exception):
    pass


class AnyTensor:
    def __getattr__(self, name):
        return lambda *a, **k: self


seen = []


def record(prompt, *a, **k):
    seen.append(prompt)
    raise Captured


lines = iter([sys.argv[3]])
builtins.input = lambda *a: next(lines)
model = types.SimpleNamespace(config=types.SimpleNamespace(mm_use_im_start_end=False), device="cpu")
m.load_pretrained_model = lambda *a, **k: (None, model, None, 2048)
m.process_images = lambda *a, **k: AnyTensor()
m.tokenizer_image_token = record
args = types.SimpleNamespace(model_path="llava-test-model", model_base=None, image_file=sys.argv[1], device="cpu",
                             conv_mode=sys.argv[2], temperature=0, max_new_tokens=2, load_8bit=False, load_4bit=False,
                             debug=False)
try:
    m.main(args)
except Captured:
    pass
print()  # the original printed the role with end=""
print(json.dumps(seen[0]))
"""


@pytest.mark.parametrize("conv_mode", ["v0_mmtag", "v1_mmtag"])
def test_cli_prompt_is_the_originals_and_the_flag_gives_trainings(orig, cli_checkpoint, question_files, conv_mode):
    image = os.path.join(question_files["root"], "a.png")
    theirs = orig.json(ORIGINAL_CLI, image, conv_mode, QUESTION)
    assert "<image>\n" + QUESTION in theirs and "<Image><image></Image>" not in theirs
    assert _our_cli_prompt(cli_checkpoint, image, conv_mode) == theirs
    wrapped = _our_cli_prompt(cli_checkpoint, image, conv_mode, "--training-image-markers")
    assert wrapped == theirs.replace("<image>\n", "<Image><image></Image>\n", 1)


ORIGINAL_WEB_PROMPTS = """
import json
from llava.conversation import conv_templates

out = {}
for name in sorted(conv_templates):
    conv = conv_templates[name].copy()
    # as the original web UI's add_text/http_bot leave the first turn: (text with `<image>` appended, image, mode)
    conv.append_message(conv.roles[0], (json.loads(%r) + "\\n<image>", None, "Default"))
    conv.append_message(conv.roles[1], None)
    out[name] = conv.get_prompt()
print(json.dumps(out))
"""


def test_web_ui_image_turn_prompts_are_the_originals(orig):
    """The web-UI path (a first message given as a tuple): `*_mmtag` templates show the image as a separate
    `<Image><image></Image>` turn answered `Received.`, the others put `<image>\\n` first, in both codes."""
    theirs = orig.json(ORIGINAL_WEB_PROMPTS % json.dumps(QUESTION))
    assert any("Received." in prompt for prompt in theirs.values())
    for name, prompt in theirs.items():
        conv = conv_templates[name].copy()
        conv.append_message(conv.roles[0], (QUESTION + "\n<image>", None, "Default"))
        conv.append_message(conv.roles[1], None)
        assert conv.get_prompt() == prompt, name


# ---------------------------------------------------------------------------------------------------------------------
# run_llava
# ---------------------------------------------------------------------------------------------------------------------

# The original's run_llava.eval_model until it tokenizes its prompt (model loader replaced, images loaded as written).
ORIGINAL_RUN_LLAVA = """
import json, sys, types
from llava.eval import run_llava as m

jobs = json.loads(sys.argv[1])


class Captured(Exception):
    pass


class AnyTensor:
    def __getattr__(self, name):
        return lambda *a, **k: self


out = {}
for job in jobs:
    seen = []

    def record(prompt, *a, **k):
        seen.append(prompt)
        raise Captured

    model = types.SimpleNamespace(config=types.SimpleNamespace(mm_use_im_start_end=job["start_end"]), device="cpu")
    m.load_pretrained_model = lambda *a, **k: (None, model, None, 2048)
    m.tokenizer_image_token = record
    m.process_images = lambda *a, **k: AnyTensor()
    args = types.SimpleNamespace(
        model_path=job["model_path"], model_base=None, query=job["query"], conv_mode=job["conv_mode"],
        image_file=job["image_file"], sep=",", temperature=0, top_p=None, num_beams=1, max_new_tokens=8,
    )
    try:
        m.eval_model(args)
    except Captured:
        pass
    out[job["key"]] = seen[0] if seen else None
print(json.dumps(out))
"""


class PromptSpy:
    """Our engine, with `generate` recording the prompt it is given instead of decoding."""

    def __init__(self, engine):
        self.engine, self.prompts = engine, []

    def __getattr__(self, name):
        return getattr(self.engine, name)

    def generate(self, prompts, *a, **k):
        self.prompts.extend(prompts)
        return ["ok"] * len(prompts)


def test_run_llava_prompt_is_the_originals_and_the_flag_gives_trainings(orig, question_files, engine, tmp_path):
    from llava.eval import run_llava

    image = os.path.join(question_files["root"], "a.png")
    queries = {"plain": QUESTION, "placeholder": f"Look: <image-placeholder> {QUESTION}"}
    jobs, cases = [], []
    for conv_mode in ("v1_mmtag", "v0_mmtag", "llava_v1"):
        for start_end in (False, True):
            for name, query in queries.items():
                key = f"{conv_mode}|{start_end}|{name}"
                jobs.append(
                    {
                        "key": key,
                        "conv_mode": conv_mode,
                        "start_end": start_end,
                        "query": query,
                        "image_file": image,
                        "model_path": str(tmp_path / "llava-test-model"),
                    }
                )
                cases.append((key, conv_mode, start_end, query))
    theirs = orig.json(ORIGINAL_RUN_LLAVA, json.dumps(jobs))
    for key, conv_mode, start_end, query in cases:
        engine.model.config.mm_use_im_start_end = start_end
        flags = ["--model-path", "unused", "--image-file", image, "--query", query, "--conv-mode", conv_mode]
        spy = PromptSpy(engine)
        run_llava.eval_model(run_llava.build_parser().parse_args(flags), engine=spy)
        run_llava.eval_model(run_llava.build_parser().parse_args([*flags, "--training-image-markers"]), engine=spy)
        ours, trained = spy.prompts
        assert theirs[key] is not None and ours == theirs[key], (key, ours, theirs[key])
        if conv_templates[conv_mode].mmtag:
            assert trained.count("<Image>") == ours.count("<Image>") + 1, key
        else:
            assert trained == ours, key
    engine.model.config.mm_use_im_start_end = False
