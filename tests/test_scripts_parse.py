"""Every shell script under scripts/ parses: each program it runs gets its arguments checked by that program's parser.

Commands are found after joining `\\` continuations; bash itself expands them (with the script's own variable
assignments and loop variables set to 0), so quoting and defaults are exactly the script's. Training commands
(`llava/train/train*.py` under deepspeed, torchrun or python) go through our argument dataclasses; `python -m llava.*`,
`python llava/*.py` and `python scripts/*.py` go through the module's `build_parser()`. Anything else must be listed
in EXTERNAL with the reason, so no command is skipped silently.
"""

from __future__ import annotations

import dataclasses
import glob
import importlib
import importlib.util
import os
import re
import shlex
import subprocess

import pytest

from llava.model.language_model import DECODERS
from llava.model.multimodal_projector.builder import build_vision_projector
from llava.train.args import parse_args
from llava.train.preprocess import template_names
from llava.train.train import LEGACY_LAYER_CLASSES

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = os.path.join(REPO, "scripts")
# Set-up scripts, not recipes: they run pip / pytest and no llava program.
ENVIRONMENT_SCRIPTS = {"setup.sh", "test.sh"}
# The demo's entry script: set-up, then `python -m llava.demo "$@"` (tests/test_demo.py runs that module itself).
DEMO_SCRIPT = "demo.sh"
# Programs that are not ours, with the reason they are not parsed here.
EXTERNAL = {"eval/eval.py": "GQA's official scorer, shipped with the GQA data (gqa.sh runs it inside that folder)"}
# Arguments a script requires.
POSITIONAL = {"train_lightning.sh": ["v1"]}
LAUNCHERS = ("python", "python3", "deepspeed", "torchrun")
TRAIN_ENTRIES = ("llava/train/train_mem.py", "llava/train/train.py", "llava/train/train_xformers.py")
_ASSIGN = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")
_FOR = re.compile(r"^\s*for\s+([A-Za-z_][A-Za-z0-9_]*)\s+in\b")


@dataclasses.dataclass
class Command:
    script: str  # relative to the repository
    line: int
    argv: list[str]  # expanded words, leading VAR=value assignments removed

    def where(self) -> str:
        return f"{self.script}:{self.line}"


def recipe_scripts() -> list[str]:
    paths = sorted(glob.glob(os.path.join(SCRIPTS, "**", "*.sh"), recursive=True))
    return [p for p in paths if os.path.basename(p) not in ENVIRONMENT_SCRIPTS | {DEMO_SCRIPT}]


def _logical_lines(text: str) -> list[tuple[int, str]]:
    out, buf, start = [], "", 0
    for number, line in enumerate(text.splitlines(), 1):
        if not buf:
            start = number
        if line.rstrip().endswith("\\"):
            buf += line.rstrip()[:-1] + " "
            continue
        out.append((start, buf + line))
        buf = ""
    return out


def script_commands(path: str, positional: list[str] | None = None, env: dict | None = None) -> list[Command]:
    """The launcher commands of a script, expanded by bash as the script would expand them."""
    positional = POSITIONAL.get(os.path.basename(path), []) if positional is None else positional
    setup, commands, loop_vars = [], [], []
    for number, line in _logical_lines(open(path).read()):
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if match := _FOR.match(stripped):
            loop_vars.append(match.group(1))
        words = stripped.split()
        i = 0
        while i < len(words) and _ASSIGN.match(words[i]):
            i += 1
        first = words[i] if i < len(words) else ""
        if first in LAUNCHERS:
            commands.append((number, stripped))
        elif i or stripped.startswith("if ["):  # variable assignments (`IFS=, read -ra ...` included)
            setup.append(stripped)
    preamble = "\n".join([f"set -- {shlex.join(positional)}", *setup, *(f"{v}=0" for v in loop_vars), "set -e"])
    out = []
    for number, text in commands:
        text = re.sub(r"\s*&\s*$", "", text).replace('"$@"', "")
        result = subprocess.run(
            ["bash", "-c", f"{preamble}\nprintf '%s\\0' {text}"],
            capture_output=True,
            text=True,
            cwd=REPO,
            env={"PATH": os.environ.get("PATH", ""), **(env or {})},  # the scripts' defaults, not this shell's
        )
        assert result.returncode == 0, f"{path}:{number}: bash could not expand the command: {result.stderr}"
        words = result.stdout.split("\0")[:-1]
        while words and _ASSIGN.match(words[0]):
            words.pop(0)
        out.append(Command(os.path.relpath(path, REPO), number, words))
    return out


def program_of(argv: list[str]) -> tuple[str, list[str]]:
    """(`module:NAME` | `path:PATH`, its arguments) for a launcher command."""
    if argv[0] in ("deepspeed", "torchrun"):  # launcher options come before the script
        at = next(i for i, w in enumerate(argv) if w.endswith(".py"))
        return f"path:{argv[at].removeprefix('./')}", argv[at + 1 :]
    if argv[1] == "-m":
        return f"module:{argv[2]}", argv[3:]
    return f"path:{argv[1].removeprefix('./')}", argv[2:]


def parser_of(program: str):
    kind, name = program.split(":", 1)
    if kind == "module":
        return importlib.import_module(name).build_parser()
    if name.startswith("llava/"):
        return importlib.import_module(name.removesuffix(".py").replace("/", ".")).build_parser()
    spec = importlib.util.spec_from_file_location(f"_script_{os.path.basename(name)[:-3]}", os.path.join(REPO, name))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.build_parser()


def parse_training(command: Command):
    """Our dataclasses over a training command's flags (the DeepSpeed config is checked as a file, not set up)."""
    _, words = program_of(command.argv)
    if "--deepspeed" in words:
        at = words.index("--deepspeed")
        assert os.path.isfile(os.path.join(REPO, words[at + 1])), f"{command.where()}: no file {words[at + 1]}"
        words = words[:at] + words[at + 2 :]
    try:
        return parse_args(words)
    except (SystemExit, ValueError) as err:
        raise AssertionError(f"{command.where()}: {err}") from err


def check_training(command: Command) -> None:
    model_args, data_args, training_args = parse_training(command)
    where = command.where()
    assert model_args.model_name_or_path and data_args.data_path and training_args.output_dir, where
    assert model_args.version in template_names(), f"{where}: unknown --version `{model_args.version}`"
    config = type("C", (), {"mm_projector_type": model_args.mm_projector_type, "mm_hidden_size": 8, "hidden_size": 8})
    build_vision_projector(config)  # raises on an unknown --mm_projector_type
    layers = {s.decoder_layer_cls for s in DECODERS.values()} | set(LEGACY_LAYER_CLASSES)
    for name in (training_args.fsdp_config or {}).get("transformer_layer_cls_to_wrap") or []:
        assert name in layers, f"{where}: FSDP layer class `{name}` is no decoder's ({sorted(layers)})"


def all_commands() -> list[Command]:
    return [c for path in recipe_scripts() for c in script_commands(path)]


COMMANDS = all_commands()


@pytest.mark.parametrize("command", COMMANDS, ids=[c.where() for c in COMMANDS])
def test_command_parses(command):
    program, args = program_of(command.argv)
    name = program.split(":", 1)[1]
    if name in EXTERNAL:
        return
    if name in TRAIN_ENTRIES:
        assert os.path.isfile(os.path.join(REPO, name)), command.where()
        check_training(command)
        return
    assert name.startswith(("llava", "scripts/")), f"{command.where()}: `{name}` is not ours and not in EXTERNAL"
    parser = parser_of(program)
    try:
        parser.parse_args(args)
    except SystemExit as err:
        raise AssertionError(f"{command.where()}: {name} rejects {shlex.join(args)}") from err


def test_every_script_is_covered():
    """Each recipe script runs at least one program that is parsed here; the set-up scripts run no llava program."""
    covered = {c.script for c in COMMANDS}
    for path in recipe_scripts():
        assert os.path.relpath(path, REPO) in covered, f"{path}: no python/deepspeed/torchrun command found"
    for name in ENVIRONMENT_SCRIPTS:
        text = open(os.path.join(SCRIPTS, name)).read()
        assert "-m llava" not in text and "llava/" not in text, name
    demo = open(os.path.join(SCRIPTS, DEMO_SCRIPT)).read()
    assert 'python -m llava.demo "$@"' in demo and "scripts/setup.sh" in demo
    used = {program_of(c.argv)[0].split(":", 1)[1] for c in COMMANDS}
    assert set(EXTERNAL) <= used, "an EXTERNAL entry no script uses any more"
    assert {"scripts/train_lightning.sh", "scripts/train_lightning_mpt.sh", "scripts/finetune_sqa.sh"} <= covered


def test_a_mistyped_flag_is_caught(tmp_path):
    """The check itself: an unknown training flag, a mistyped value and an unknown eval flag all fail."""
    bad = {
        "train.sh": "deepspeed llava/train/train_mem.py --deepspeed ./scripts/zero2.json --model_name_or_path m "
        "--vision_tower v --data_path d --output_dir o --tune_mm_mlp_adapter True --mm_use_im_start_endd\n",
        "typed.sh": "torchrun --nproc_per_node=2 llava/train/train_mem.py --model_name_or_path m --data_path d "
        "--output_dir o --num_train_epochs one\n",
        "eval.sh": "python -m llava.eval.model_vqa_science --model-path m --question-file q --answers-file a "
        "--answer-promter\n",
    }
    for name, text in bad.items():
        path = tmp_path / name
        path.write_text("#!/bin/bash\n" + text)
        (command,) = script_commands(str(path))
        with pytest.raises(AssertionError):
            test_command_parses(command)
