"""A `tokenizer.json` that tokenizers 0.15 (the original LLaVA's pin) reads as the tokenizer our loader builds.

The original loads `*mistral*` checkpoints with its fast tokenizer, i.e. `tokenizer.json` read by tokenizers 0.15
as it is (transformers 4.37's `LlamaTokenizerFast` takes the file's pipeline unchanged). tokenizers >= 0.19 writes
two things 0.15 cannot parse:
  model.merges       pairs `["a", "b"]`; 0.15 reads only `"a b"` strings (both versions read those)
  Metaspace          `split` and no `add_prefix_space`; 0.15 always splits at `▁` and requires `add_prefix_space`
and `model.ignore_merges`, unknown to 0.15 but harmless when false (0.15 behaves as false).

`write_legacy_tokenizer_json` rewrites the file as the pipeline OUR loader (`llava.model.builder.load_tokenizer`)
builds from the checkpoint, in the vocabulary of 0.15. transformers 5's `LlamaTokenizer` rebuilds its pipeline
from its own settings (a Metaspace pre-tokenizer that does not split, prepending `▁` to every text segment for
`legacy=True`), so the file's own pre-tokenizer is not what we run; writing the loaded pipeline makes the original
run that too. A Metaspace that does not split has no 0.15 pre-tokenizer; the same steps as normalizers do:
  always  Replace(" " -> "▁"), Prepend("▁"), Replace(\\A"▁▁" -> "▁")   (prepend unless it already starts with ▁)
  never   Replace(" " -> "▁")
`first` (prepend only at the start of the whole text) needs the text offsets only a pre-tokenizer sees; it becomes
0.15's splitting Metaspace when no merge joins across a `▁` (then splitting changes nothing), else the file stays as
written and a warning says that the original's tokenizers 0.15 cannot read it.

Every rewrite is checked when written: the new file, read by our tokenizers, must encode a probe corpus (spaces,
newlines, unicode, every added token) to the ids of the loaded tokenizer, or the file is left as it was.
"""

from __future__ import annotations

import copy
import json
import logging
import os

logger = logging.getLogger(__name__)

TOKENIZER_JSON = "tokenizer.json"
PROBE_TEXTS = (
    "",
    " ",
    "  ",
    "hello world",
    " hello",
    "hello ",
    "a   b    c",
    "\tone\ttwo\n\nthree\n",
    "USER: <image>\nWhat is in the picture? ASSISTANT: A cat.",
    "[INST] <image>\nWhat is shown? [/INST] A red square. ",
    "café naïve 中文 日本語 😀👍🏽 Ω≈ç√ 1234 3.14",
    "\u2581marked \u2581\u2581x",
    "\u00a0nbsp\u200bzero e\u0301",
)


class NotExpressible(ValueError):
    """A part of the tokenizer has no form that tokenizers 0.15 reads as the same tokenizer."""


def _merge_string(pair) -> str:
    if isinstance(pair, str):
        return pair
    left, right = pair
    if " " in left or " " in right:
        raise NotExpressible(f'the merge {pair!r} contains a space, which 0.15\'s `"a b"` merge strings cannot hold')
    return f"{left} {right}"


def _legacy_model(model: dict) -> dict:
    model = dict(model)
    if model.get("type") != "BPE":
        return model
    if model.pop("ignore_merges", False):
        raise NotExpressible("`model.ignore_merges` is true; tokenizers 0.15 always applies the merges")
    model["merges"] = [_merge_string(m) for m in model.get("merges", [])]
    return model


def _merges_cross(model: dict, replacement: str) -> bool:
    """Whether a merge joins a token to one that starts with `replacement` (then splitting at it would differ)."""
    for merge in model.get("merges", []):
        right = merge.split(" ", 1)[1] if isinstance(merge, str) else merge[1]
        if right.startswith(replacement):
            return True
    return False


def _legacy_metaspace(spec: dict) -> dict:
    """A 0.15 Metaspace (pre-tokenizer or decoder) for a >= 0.19 one; the splitting is the caller's concern."""
    scheme = spec.get("prepend_scheme", "always")
    out = {"type": "Metaspace", "replacement": spec["replacement"], "add_prefix_space": scheme != "never"}
    out["prepend_scheme"] = scheme if scheme != "never" else "always"  # unused when add_prefix_space is false
    return out


def _legacy_decoder(decoder: dict | None) -> dict | None:
    if decoder is None:
        return None
    if decoder.get("type") == "Metaspace":
        return _legacy_metaspace(decoder)
    if decoder.get("type") == "Sequence":
        return {**decoder, "decoders": [_legacy_decoder(d) for d in decoder["decoders"]]}
    return decoder


def _metaspace_normalizers(replacement: str, scheme: str) -> list[dict]:
    steps = [{"type": "Replace", "pattern": {"String": " "}, "content": replacement}]
    if scheme == "always":
        steps += [
            {"type": "Prepend", "prepend": replacement},
            {"type": "Replace", "pattern": {"Regex": "\\A" + replacement * 2}, "content": replacement},
        ]
    return steps


def legacy_tokenizer_json(tokenizer: dict) -> dict:
    """`tokenizer` (a tokenizer.json document) in the form tokenizers 0.15 reads as the same tokenizer; raises
    NotExpressible when there is none."""
    out = copy.deepcopy(tokenizer)
    out["model"] = _legacy_model(out["model"])
    out["decoder"] = _legacy_decoder(out.get("decoder"))
    pre = out.get("pre_tokenizer")
    if pre is not None and pre.get("type") == "Sequence":
        if any(p.get("type") == "Metaspace" and not p.get("split", True) for p in pre["pretokenizers"]):
            raise NotExpressible("a non-splitting Metaspace inside a pre-tokenizer Sequence")
        out["pre_tokenizer"] = {
            **pre,
            "pretokenizers": [
                _legacy_metaspace(p) if p.get("type") == "Metaspace" else p for p in pre["pretokenizers"]
            ],
        }
    elif pre is not None and pre.get("type") == "Metaspace":
        replacement, scheme = pre["replacement"], pre.get("prepend_scheme", "always")
        if pre.get("split", True) or (scheme == "first" and not _merges_cross(out["model"], replacement)):
            out["pre_tokenizer"] = _legacy_metaspace(pre)
        elif scheme == "first":
            raise NotExpressible(
                "a non-splitting Metaspace with prepend_scheme `first` whose merges join across `▁`: tokenizers "
                "0.15 has no pre-tokenizer that prepends only at the start of the text without splitting there"
            )
        else:
            # As normalizers: the added tokens are then matched on normalized text, so they must all be
            # `normalized: false`; without a normalizer before, that flag made no difference, so setting it is exact.
            normalizer = out.get("normalizer")
            if normalizer is not None and any(t.get("normalized") for t in out.get("added_tokens", [])):
                raise NotExpressible(
                    "a non-splitting Metaspace after a normalizer, with added tokens matched on normalized text"
                )
            for token in out.get("added_tokens", []):
                token["normalized"] = False
            steps = ([normalizer] if normalizer is not None else []) + _metaspace_normalizers(replacement, scheme)
            out["normalizer"] = {"type": "Sequence", "normalizers": steps}
            out["pre_tokenizer"] = None
    return out


def _probe_texts(tokenizer: dict) -> list[str]:
    tokens = [t["content"] for t in tokenizer.get("added_tokens", [])]
    joined = [f"x{t}y {t} z  {t}\n{t}" for t in tokens] + [" ".join(tokens), "".join(tokens)]
    return list(PROBE_TEXTS) + joined


def _same_encodings(a, b, texts: list[str]) -> str | None:
    for text in texts:
        ids_a, ids_b = a.encode(text).ids, b.encode(text).ids
        if ids_a != ids_b:
            return f"{text!r}: loaded {ids_a} vs rewritten {ids_b}"
    return None


def write_legacy_tokenizer_json(output_dir: str) -> bool:
    """Rewrite `output_dir/tokenizer.json` as the tokenizer our loader builds from `output_dir`, in the form
    tokenizers 0.15 reads. Returns whether the file was rewritten (False: no tokenizer.json, or no exact form)."""
    from tokenizers import Tokenizer

    from llava.model.builder import load_tokenizer

    path = os.path.join(output_dir, TOKENIZER_JSON)
    if not os.path.isfile(path):
        return False
    with open(path, encoding="utf-8") as f:
        written = json.load(f)
    backend = load_tokenizer(output_dir).backend_tokenizer
    loaded = json.loads(backend.to_str())
    loaded["truncation"], loaded["padding"] = written.get("truncation"), written.get("padding")
    try:
        legacy = legacy_tokenizer_json(loaded)
    except NotExpressible as e:
        logger.warning("%s: kept as written; the original LLaVA (tokenizers 0.15) cannot read it: %s.", path, e)
        return False
    text = json.dumps(legacy, indent=2, ensure_ascii=False)
    difference = _same_encodings(backend, Tokenizer.from_str(text), _probe_texts(legacy))
    if difference:
        logger.warning(
            "%s: kept as written; its tokenizers-0.15 form would tokenize differently (%s), so the original LLaVA "
            "(tokenizers 0.15) cannot read this checkpoint's tokenizer.json.",
            path,
            difference,
        )
        return False
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
    return True
