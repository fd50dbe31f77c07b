"""The image-marker policy (`llava.prompting`): marker text, wrapping, placement for inference, training, chat parts."""

from __future__ import annotations

import pytest

from llava.conversation import conv_templates
from llava.prompting import (
    IMAGE_PART_TEXT,
    content_text,
    image_marker_text,
    place_image_markers,
    place_training_image_markers,
    web_image_turns,
    wrap_image_markers,
)


def test_marker_text():
    assert image_marker_text() == "<image>"
    assert image_marker_text(mm_use_im_start_end=True) == "<im_start><image><im_end>"
    assert image_marker_text(mmtag=True) == "<Image><image></Image>"
    assert image_marker_text(mmtag=True, mm_use_im_start_end=True) == "<Image><im_start><image><im_end></Image>"


@pytest.mark.parametrize("mmtag", [False, True])
@pytest.mark.parametrize("start_end", [False, True])
def test_wrapping_is_idempotent(mmtag, start_end):
    text = "<image>\nLeft <image> right"
    once = wrap_image_markers(text, mmtag=mmtag, mm_use_im_start_end=start_end)
    assert wrap_image_markers(once, mmtag=mmtag, mm_use_im_start_end=start_end) == once
    assert once.count(image_marker_text(mmtag=mmtag, mm_use_im_start_end=start_end)) == 2
    assert once.count("<image>") == 2


def test_mmtag_is_a_template_field():
    assert {name for name, conv in conv_templates.items() if conv.mmtag} == {
        "v0_mmtag",
        "llava_v0_mmtag",
        "v1_mmtag",
        "llava_v1_mmtag",
    }


def test_inference_placement():
    assert place_image_markers("What?", 0) == "What?"
    assert place_image_markers("What?", 2) == "<image>\n<image>\nWhat?"
    # markers the user placed stay where they are
    assert place_image_markers("a <image> b", 1) == "a <image> b"
    assert place_image_markers("What?", 1, mm_use_im_start_end=True) == "<im_start><image><im_end>\nWhat?"
    assert place_image_markers("What?", 1, template="v1_mmtag") == "<Image><image></Image>\nWhat?"
    assert place_image_markers("What?", 1, template=conv_templates["llava_v1"]) == "<image>\nWhat?"


def test_training_placement():
    single = [("user", "What is this?\n<image>"), ("assistant", "A dot.")]
    assert place_training_image_markers(single, 1, template="v1")[0][1] == "<image>\nWhat is this?"
    assert place_training_image_markers(single, 1, template="v1_mmtag")[0][1] == "<Image><image></Image>\nWhat is this?"
    wrapped = place_training_image_markers(single, 1, template="v1", mm_use_im_start_end=True)[0][1]
    assert wrapped == "<im_start><image><im_end>\nWhat is this?"
    multi = [("user", "Left <image> right <image>"), ("assistant", "Two."), ("user", "And?"), ("assistant", "No.")]
    assert place_training_image_markers(multi, 2, template="v1") == multi
    plain = place_training_image_markers(multi, 2, template="plain")
    assert plain == [("user", "<image><image>"), ("assistant", "Two."), ("user", ""), ("assistant", "No.")]
    # not a registered template (the tokenizer's own chat template): no plain reduction, no mmtag
    assert place_training_image_markers(single, 1, template="chat_template")[0][1] == "<image>\nWhat is this?"
    assert place_training_image_markers(single, 1)[0][1] == "<image>\nWhat is this?"


def test_web_image_turns():
    assert web_image_turns("What <image> is it?") == ["<image>\nWhat  is it?"]  # the original keeps both spaces
    assert web_image_turns("<image>\nDescribe", mmtag=True) == ["<Image><image></Image>", "Received.", "Describe"]


def test_content_parts():
    parts = [("image", ""), ("image", ""), ("text", "Which?")]
    assert content_text(parts) == IMAGE_PART_TEXT * 2 + "Which?"
    assert content_text(parts, compact=True) == "<image><image>\nWhich?"
    assert content_text([("image", ""), ("text", "\nQ")], compact=True) == "<image>\nQ"
    assert content_text([("text", "Q"), ("image", "")], compact=True) == "Q<image>"
    with pytest.raises(ValueError, match="Unknown content part kind `audio`"):
        content_text([("audio", "")])
