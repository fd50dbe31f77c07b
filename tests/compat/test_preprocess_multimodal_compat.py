"""`llava.train.train.preprocess_multimodal` against the ORIGINAL release's own, on the same LLaVA-format turns.

Ours delegates the marker's text to `llava.prompting`; the original places and wraps it by hand. Both run on every
template (as `default_conversation`, which decides `mmtag`) x `mm_use_im_start_end` x `is_multimodal`.
"""

from __future__ import annotations

import copy
import json
import types

import pytest

TURNS = [
    [{"from": "human", "value": "<image>\nWhat is in the picture?"}, {"from": "gpt", "value": "A red square."}],
    [{"from": "human", "value": "What is this?<image>"}, {"from": "gpt", "value": "Blue."}],
    [{"from": "human", "value": "  <image>\n\n  two  spaces \t tab "}, {"from": "gpt", "value": "ok"}],
    [{"from": "human", "value": "A<image>B<image>C"}, {"from": "gpt", "value": "two"}],
    [{"from": "human", "value": "<image>"}, {"from": "gpt", "value": "only"}],
    [{"from": "human", "value": "no image"}, {"from": "gpt", "value": "text"}, {"from": "human", "value": "x<image>"}],
]
CASES = [(mm, se) for mm in (True, False) for se in (True, False)]

ORIG_SIDE = """
import copy, json, sys, types
import llava.conversation as conversation_lib
from llava.train.train import preprocess_multimodal

turns = json.loads(sys.argv[1])
out = {}
for name in sorted(conversation_lib.conv_templates):
    conversation_lib.default_conversation = conversation_lib.conv_templates[name]
    for mm, se in json.loads(sys.argv[2]):
        args = types.SimpleNamespace(is_multimodal=mm, mm_use_im_start_end=se)
        out[f"{name}/{mm}/{se}"] = preprocess_multimodal(copy.deepcopy(turns), args)
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def theirs(orig) -> dict:
    return orig.json(ORIG_SIDE, json.dumps(TURNS), json.dumps(CASES))


def test_preprocess_multimodal_is_the_originals(theirs, monkeypatch):
    import llava.conversation as conversation_lib
    from llava.train.train import preprocess_multimodal

    both = json.dumps(theirs["v1_mmtag/True/True"])
    assert "<Image><im_start><image><im_end></Image>" in both  # the case where both wrappers apply is covered
    for key, expected in theirs.items():
        name, mm, se = key.split("/")
        monkeypatch.setattr(conversation_lib, "default_conversation", conversation_lib.conv_templates[name])
        args = types.SimpleNamespace(is_multimodal=mm == "True", mm_use_im_start_end=se == "True")
        ours = preprocess_multimodal(copy.deepcopy(TURNS), args)
        assert ours == expected, f"{key}:\nours {ours}\norig {expected}"
