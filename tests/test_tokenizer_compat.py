"""tokenizer.json in the form tokenizers 0.15 reads (llava.model.tokenizer_compat): same ids here before and after.

The original's side (its tokenizers 0.15 and transformers 4.37 reading the rewritten file) is checked in
tests/compat/test_checkpoints_compat.py on this corpus.
"""

from __future__ import annotations

import json
import os
import shutil

import pytest

from llava.model.tokenizer_compat import NotExpressible, legacy_tokenizer_json

# Special tokens written in the text, <image>, unicode (byte fallback), runs of spaces, leading / trailing spaces,
# newlines and tabs, the `▁` character itself, whole LLaVA prompts of two templates.
CORPUS = [
    "",
    " ",
    "  ",
    "hello world",
    " hello",
    "hello ",
    "hello  world",
    "a   b    c",
    "\thello\tworld\n",
    "\n\nhi\n",
    "USER: <image>\nWhat is in the picture? ASSISTANT:",
    "A chat between a curious human and an artificial intelligence assistant. USER: <image>\nDescribe. "
    "ASSISTANT: A cat.</s>USER: Where? ASSISTANT:",
    "[INST] <image>\nWhat is shown? [/INST] A red square. </s>[INST] Where is it? [/INST]",
    "<s>[INST] hi [/INST]",
    "</s>",
    "<s>",
    "<unk>",
    "<pad>",
    "x<pad>y",
    "<image>",
    " <image> ",
    "<s> </s>  <s>",
    "café naïve résumé",
    "中文测试 日本語",
    "emoji 😀👍🏽 done",
    "Ω≈ç√∫",
    "\u2581already\u2581marked",
    " \u2581x",
    "1234567890 3.14",
    "tab\tand\rcarriage",
    "zero\u200bwidth",
    "combining e\u0301",
    "ＦＵＬＬ width",
    "quotes “like” ‘this’",
    "Line one.\nLine two.\n\nLine three with  double  spaces.",
    "trailing newline\n",
    "\u00a0nbsp\u00a0",
]


def encode_all(path: str) -> list[list[int]]:
    from llava.model.builder import load_tokenizer

    tokenizer = load_tokenizer(path)
    return [tokenizer(text).input_ids for text in CORPUS]


def components(doc, kind: str):
    """Every dict of `type` `kind` anywhere in a tokenizer.json document."""
    if isinstance(doc, dict):
        if doc.get("type") == kind:
            yield doc
        for value in doc.values():
            yield from components(value, kind)
    elif isinstance(doc, list):
        for value in doc:
            yield from components(value, kind)


@pytest.fixture(scope="module")
def spm_tokenizer(tmp_path_factory):
    """A LLaMA-style SentencePiece BPE (byte fallback, whitespace pieces), as LLaMA / Mistral ship it."""
    from compat.conftest import build_llama_spm_tokenizer

    return build_llama_spm_tokenizer(str(tmp_path_factory.mktemp("spm")))


@pytest.mark.parametrize("which", ["llama_spm", "demo"])
def test_rewritten_tokenizer_json_encodes_as_before(which, spm_tokenizer, tiny, tmp_path):
    """Written as our writers write it, then finished: 0.15's syntax, and our loader's ids unchanged; the file read
    raw by tokenizers gives those ids too (that is what the original's fast tokenizer runs)."""
    from tokenizers import Tokenizer

    from llava.model.checkpoint_compat import finish_checkpoint_dir

    tokenizer = spm_tokenizer if which == "llama_spm" else tiny.tokenizer
    before, after = str(tmp_path / "before"), str(tmp_path / "after")
    tokenizer.save_pretrained(before)
    written = open(os.path.join(before, "tokenizer.json"), encoding="utf-8").read()
    finish_checkpoint_dir(before, tokenizer)
    shutil.copytree(before, after)
    # `before`: the tokenizer.json transformers 5 wrote, the rest finished; `after`: what finish_checkpoint_dir left.
    with open(os.path.join(before, "tokenizer.json"), "w", encoding="utf-8") as f:
        f.write(written)
    doc = json.load(open(os.path.join(after, "tokenizer.json"), encoding="utf-8"))
    assert all(isinstance(m, str) and m.count(" ") == 1 for m in doc["model"]["merges"])
    assert "ignore_merges" not in doc["model"]
    for meta in components(doc, "Metaspace"):
        assert "split" not in meta and isinstance(meta["add_prefix_space"], bool), meta

    ours = encode_all(after)
    assert ours == encode_all(before)
    raw = Tokenizer.from_file(os.path.join(after, "tokenizer.json"))
    assert [raw.encode(text).ids for text in CORPUS] == ours


def test_rewrite_is_stable(spm_tokenizer, tmp_path):
    from llava.model.checkpoint_compat import finish_checkpoint_dir

    spm_tokenizer.save_pretrained(tmp_path)
    finish_checkpoint_dir(str(tmp_path), spm_tokenizer)
    once = (tmp_path / "tokenizer.json").read_text(encoding="utf-8")
    finish_checkpoint_dir(str(tmp_path), spm_tokenizer)
    assert (tmp_path / "tokenizer.json").read_text(encoding="utf-8") == once


def _bpe(merges, scheme: str) -> dict:
    vocab = {"▁": 0, "a": 1, "b": 2, "▁a": 3, "▁▁": 4, "ab": 5}
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [],
        "normalizer": None,
        "pre_tokenizer": {"type": "Metaspace", "replacement": "▁", "prepend_scheme": scheme, "split": False},
        "post_processor": None,
        "decoder": None,
        "model": {"type": "BPE", "vocab": vocab, "merges": merges, "ignore_merges": False},
    }


def test_prepend_first_without_split_is_exact_or_refused():
    """`first` without splitting: 0.15's splitting Metaspace when no merge joins across `▁`, else no exact form."""
    from tokenizers import Tokenizer

    plain = _bpe([["▁", "a"], ["a", "b"]], "first")
    legacy = legacy_tokenizer_json(plain)
    assert legacy["pre_tokenizer"] == {
        "type": "Metaspace",
        "replacement": "▁",
        "add_prefix_space": True,
        "prepend_scheme": "first",
    }
    new, old = Tokenizer.from_str(json.dumps(plain)), Tokenizer.from_str(json.dumps(legacy))
    for text in ("a b", "ab  ab", " a", "ba ab a"):
        assert new.encode(text).ids == old.encode(text).ids, text
    with pytest.raises(NotExpressible, match="prepend_scheme `first`"):
        legacy_tokenizer_json(_bpe([["▁", "▁"], ["▁", "a"]], "first"))


def test_ignore_merges_and_spaces_in_merges_are_refused():
    doc = _bpe([["▁", "a"]], "always")
    doc["model"]["ignore_merges"] = True
    with pytest.raises(NotExpressible, match="ignore_merges"):
        legacy_tokenizer_json(doc)
    doc = _bpe([["a", "b c"]], "always")
    with pytest.raises(NotExpressible, match="contains a space"):
        legacy_tokenizer_json(doc)
