"""The import layering of docs/Architecture.md ("Layers"), checked on the source: every `llava.*` import in every module
of the package, at module level or inside a function, points to its own layer or a lower one, except the three
exceptions that section names. A new module outside the table fails here until it is placed."""

from __future__ import annotations

import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "llava"

BASE = {"llava", "llava.constants", "llava.runtime", "llava.utils"}
PROMPT = {"llava.conversation", "llava.chat_styles", "llava.chat_template", "llava.prompting", "llava.mm_utils",
          "llava.image_io"}
TRAIN_ENTRY_POINTS = {"llava.train.train", "llava.train.train_mem", "llava.train.train_xformers"}

# What each layer may import (besides itself). Entry points are split by package: eval never imports serve, serve and
# eval reach a model through `inference`, the training entry points through `train`; the demo sits on top of all.
MAY_IMPORT = {
    "base": set(),
    "prompt": {"base"},
    "model": {"prompt", "base"},
    "training": {"model", "prompt", "base"},
    "generation": {"model", "prompt", "base"},
    "entry:train": {"training", "model", "prompt", "base"},
    "entry:data": {"entry:train", "training", "model", "prompt", "base"},
    "entry:eval": {"generation", "prompt", "base"},
    "entry:serve": {"generation", "prompt", "base"},
    "entry:demo": {"entry:train", "entry:eval", "entry:serve", "entry:data", "training", "generation", "model",
                   "prompt", "base"},
}

# The documented exceptions (docs/Architecture.md), as (importing module, imported module).
EXCEPTIONS = {
    # The original's Conversation.get_images / to_gradio_chatbot delegate to the web UI's helpers, lazily.
    ("llava.conversation", "llava.serve.gradio_utils"),
    # The prefix cache's old path, re-exported for outside code; nothing in llava/ imports it.
    ("llava.model.prefix_cache", "llava.inference.prefix_cache"),
    # The engine worker finds an exported checkpoint's chat template.
    ("llava.serve.engine_worker", "llava.model.convert_hf"),
}


def layer_of(module: str) -> str:
    if module in BASE:
        return "base"
    if module in PROMPT:
        return "prompt"
    if module in TRAIN_ENTRY_POINTS:
        return "entry:train"
    top = module.split(".")[1] if module.count(".") >= 1 else ""
    layers = {"model": "model", "train": "training", "inference": "generation", "serve": "entry:serve",
              "eval": "entry:eval", "demo": "entry:demo", "data": "entry:data"}
    if top in layers:
        return layers[top]
    raise AssertionError(
        f"{module}: not placed in a layer; add it to docs/Architecture.md's table and to tests/test_layers.py"
    )


def module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def llava_imports(source: str, module: str, is_package: bool) -> set[str]:
    """Every `llava` module `source` imports, resolved to a module name (for `from llava.x import y`, `llava.x.y`
    when that is a module, else `llava.x`)."""
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name == "llava" or a.name.startswith("llava."))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                anchor = module.split(".") if is_package else module.split(".")[:-1]
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            if base != "llava" and not base.startswith("llava."):
                continue
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                found.add(sub if _is_module(sub) else base)
    return found


def _is_module(name: str) -> bool:
    path = PACKAGE.parent.joinpath(*name.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def violations(module: str, imported: set[str]) -> list[str]:
    mine = layer_of(module)
    bad = []
    for target in sorted(imported):
        theirs = layer_of(target)
        if theirs != mine and theirs not in MAY_IMPORT[mine] and (module, target) not in EXCEPTIONS:
            bad.append(f"{module} ({mine}) imports {target} ({theirs})")
    return bad


def package_imports() -> dict[str, set[str]]:
    graph = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        module = module_name(path)
        graph[module] = llava_imports(path.read_text(encoding="utf-8"), module, path.name == "__init__.py")
    return graph


def test_every_import_points_down_or_is_a_documented_exception():
    graph = package_imports()
    assert len(graph) > 100, "the walk found too few modules: is PACKAGE right?"
    bad = [v for module, imported in graph.items() for v in violations(module, imported)]
    assert not bad, "imports pointing up a layer (docs/Architecture.md, 'Layers'):\n" + "\n".join(bad)


def test_each_documented_exception_still_exists():
    """An exception that no longer happens is removed from the list (and from the docs), so the list stays exact."""
    graph = package_imports()
    for module, target in sorted(EXCEPTIONS):
        assert target in graph.get(module, set()), f"{module} no longer imports {target}: drop the exception"


def test_nothing_in_the_package_imports_the_old_prefix_cache_path():
    graph = package_imports()
    users = sorted(m for m, imported in graph.items() if "llava.model.prefix_cache" in imported)
    assert users == [], users


@pytest.mark.parametrize(
    ("module", "source", "expected"),
    [
        ("llava.model.builder", "from llava.serve import cli\n", ["llava.model.builder (model) imports llava.serve.cli"]),
        ("llava.eval.runner", "def f():\n    import llava.serve.controller\n", ["llava.eval.runner (entry:eval)"]),
        ("llava.train.data", "from llava.inference import engine\n", ["llava.train.data (training)"]),
        ("llava.inference.engine", "from ..train import preprocess\n", ["llava.inference.engine (generation)"]),
        ("llava.mm_utils", "from llava import constants\nfrom llava.image_io import load\n", []),
        ("llava.serve.engine_worker", "from llava.model.convert_hf import match_conv_template\n", []),
        ("llava.serve.cli", "from llava.model.builder import load_pretrained_model\n", ["llava.serve.cli (entry:serve)"]),
    ],
)
def test_the_checker_catches_an_upward_import(module, source, expected):
    is_package = False
    found = violations(module, llava_imports(source, module, is_package))
    assert len(found) == len(expected), found
    for got, prefix in zip(found, expected):
        assert got.startswith(prefix), (got, prefix)
