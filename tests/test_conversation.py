"""Tests for llava.conversation: golden prompts per template, label segments, HF chat-template parity, images."""

import base64
import io
import json

import pytest
from PIL import Image

from llava.conversation import (
    Conversation,
    SeparatorStyle,
    conv_templates,
    default_conversation,
    get_conv_template,
    guess_conv_mode,
    to_chat_template_jinja,
)

TURNS = ["<image>\nWhat is in the picture?", "A red square.", "Where is it?", None]

SYS_HUMAN = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)
SYS_USER = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
SYS_MMTAG = (
    "A chat between a curious user and an artificial intelligence assistant. The assistant is able to understand "
    "the visual content that the user provides, and assist the user with a variety of tasks using natural "
    "language.The visual content will be provided with the following format: <Image>visual content</Image>."
)
SYS_LLAVA = (
    "You are a helpful language and vision assistant. You are able to understand the visual content that the user "
    "provides, and assist the user with a variety of tasks using natural language."
)
SYS_LLAMA_2 = (
    "You are a helpful, respectful and honest assistant. Always answer as helpfully as possible, while being safe.  "
    "Your answers should not include any harmful, unethical, racist, sexist, toxic, dangerous, or illegal content. "
    "Please ensure that your responses are socially unbiased and positive in nature.\n\nIf a question does not make "
    "any sense, or is not factually coherent, explain why instead of answering something not correct. If you don't "
    "know the answer to a question, please don't share false information."
)
V0_EXAMPLE = (
    "###Human: What are the key differences between renewable and non-renewable energy sources?###Assistant: "
    "Renewable energy sources are those that can be replenished naturally in a relatively short amount of time, "
    "such as solar, wind, hydro, geothermal, and biomass. Non-renewable energy sources, on the other hand, are "
    "finite and will eventually be depleted, such as coal, oil, and natural gas. Here are some key differences "
    "between renewable and non-renewable energy sources:\n"
    "1. Availability: Renewable energy sources are virtually inexhaustible, while non-renewable energy sources are "
    "finite and will eventually run out.\n"
    "2. Environmental impact: Renewable energy sources have a much lower environmental impact than non-renewable "
    "sources, which can lead to air and water pollution, greenhouse gas emissions, and other negative effects.\n"
    "3. Cost: Renewable energy sources can be more expensive to initially set up, but they typically have lower "
    "operational costs than non-renewable sources.\n"
    "4. Reliability: Renewable energy sources are often more reliable and can be used in more remote locations "
    "than non-renewable sources.\n"
    "5. Flexibility: Renewable energy sources are often more flexible and can be adapted to different situations "
    "and needs, while non-renewable sources are more rigid and inflexible.\n"
    "6. Sustainability: Renewable energy sources are more sustainable over the long term, while non-renewable "
    "sources are not, and their depletion can lead to economic and social instability.\n"
)
SINGLE_TAIL = "###Human: <image>\nWhat is in the picture?###Assistant: A red square.###Human: Where is it?###Assistant:"
TWO_TAIL = " USER: <image>\nWhat is in the picture? ASSISTANT: A red square.</s>USER: Where is it? ASSISTANT:"
CHATML_DIRECT = (
    "<|im_start|>system\nAnswer the questions.<|im_end|><|im_start|>user\n<image>\nWhat is in the picture?<|im_end|>"
    "<|im_start|>assistant\nA red square.<|im_end|><|im_start|>user\nWhere is it?<|im_end|><|im_start|>assistant\n"
)
PLAIN = "<image>\nWhat is in the picture?A red square.\nWhere is it?\n"

GOLDEN = {
    "default": SYS_HUMAN + V0_EXAMPLE + SINGLE_TAIL,
    "v0": SYS_HUMAN + V0_EXAMPLE + SINGLE_TAIL,
    "v1": SYS_USER + TWO_TAIL,
    "vicuna_v1": SYS_USER + TWO_TAIL,
    "llama_2": "[INST] <<SYS>>\n"
    + SYS_LLAMA_2
    + "\n<</SYS>>\n\n<image>\nWhat is in the picture? [/INST] A red square. </s><s>[INST] Where is it? [/INST]",
    "llava_llama_2": "[INST] <<SYS>>\n"
    + SYS_LLAVA
    + "\n<</SYS>>\n\n<image>\nWhat is in the picture? [/INST] A red square. </s><s>[INST] Where is it? [/INST]",
    "mistral_instruct": "[INST] <image>\nWhat is in the picture? [/INST] A red square. </s>[INST] Where is it? [/INST]",
    "chatml_direct": CHATML_DIRECT,
    "mistral_direct": CHATML_DIRECT,
    "mpt": "<|im_start|>system\nA conversation between a user and an LLM-based AI assistant. The assistant gives "
    "helpful and honest answers.<|im_end|><|im_start|>user\n<image>\nWhat is in the picture?<|im_end|>"
    "<|im_start|>assistant\nA red square.<|im_end|><|im_start|>user\nWhere is it?<|im_end|><|im_start|>assistant\n",
    "plain": PLAIN,
    "v0_plain": PLAIN,
    "llava_v0": SYS_HUMAN + SINGLE_TAIL,
    "v0_mmtag": SYS_MMTAG + SINGLE_TAIL,
    "llava_v0_mmtag": SYS_MMTAG + SINGLE_TAIL,
    "llava_v1": SYS_HUMAN + TWO_TAIL,
    "v1_mmtag": SYS_MMTAG + TWO_TAIL,
    "llava_v1_mmtag": SYS_MMTAG + TWO_TAIL,
    "llama_3": "<|start_header_id|>system<|end_header_id|>\n\n"
    + SYS_LLAVA
    + "<|eot_id|><|start_header_id|>user<|end_header_id|>\n\n<image>\nWhat is in the picture?<|eot_id|>"
    "<|start_header_id|>assistant<|end_header_id|>\n\nA red square.<|eot_id|>"
    "<|start_header_id|>user<|end_header_id|>\n\nWhere is it?<|eot_id|>"
    "<|start_header_id|>assistant<|end_header_id|>\n\n",
    "qwen_2": "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n<image>\n"
    "What is in the picture?<|im_end|>\n<|im_start|>assistant\nA red square.<|im_end|>\n<|im_start|>user\n"
    "Where is it?<|im_end|>\n<|im_start|>assistant\n",
}

# The end-of-turn string each template's supervised reply ends with.
END_OF_TURN = {
    SeparatorStyle.SINGLE: "###",
    SeparatorStyle.TWO: "</s>",
    SeparatorStyle.MPT: "<|im_end|>",
    SeparatorStyle.PLAIN: "\n",
    SeparatorStyle.LLAMA_2: " </s>",
    SeparatorStyle.LLAMA_3: "<|eot_id|>",
    SeparatorStyle.CHATML: "<|im_end|>",
}
WITH_JINJA = sorted(name for name, conv in conv_templates.items() if not conv.messages)


def build(name: str, turns: list = TURNS) -> Conversation:
    conv = get_conv_template(name)
    for i, message in enumerate(turns):
        conv.append_message(conv.roles[i % 2], message)
    return conv


def image(width: int = 6, height: int = 3) -> Image.Image:
    return Image.new("RGB", (width, height), (255, 0, 0))


def test_golden_covers_every_template():
    assert set(GOLDEN) == set(conv_templates)


@pytest.mark.parametrize("name", sorted(GOLDEN))
def test_golden_prompt(name):
    assert build(name).get_prompt() == GOLDEN[name]


@pytest.mark.parametrize("name", sorted(conv_templates))
@pytest.mark.parametrize("closed", [False, True], ids=["open", "closed"])
def test_segments_join_to_prompt_and_supervise_only_replies(name, closed):
    turns = TURNS[:3] + ["There."] if closed else TURNS
    conv = build(name, turns)
    segments = conv.get_prompt_segments()
    assert "".join(text for text, _ in segments) == conv.get_prompt()
    assert all(text for text, _ in segments)
    eot = END_OF_TURN[conv.sep_style]
    supervised = [text for text, flag in segments if flag]
    assert supervised == (["A red square." + eot, "There." + eot] if closed else ["A red square." + eot])
    joined = "".join(supervised)
    assert "picture" not in joined and "Where" not in joined and "renewable" not in joined
    for role in conv.roles:
        if role:
            assert role not in joined


def test_image_tuple_moves_image_to_front():
    conv = get_conv_template("llava_v1")
    conv.append_message("USER", ("What is <image> this?", image(), "Default"))
    conv.append_message("ASSISTANT", None)
    assert conv.get_prompt() == SYS_HUMAN + " USER: <image>\nWhat is  this? ASSISTANT:"


def test_image_tuple_mmtag_wraps_image_and_is_not_supervised():
    conv = get_conv_template("v1_mmtag")
    conv.append_message("USER", ("<image>\nWhat is this?", image(), "Default"))
    conv.append_message("ASSISTANT", "A cat.")
    expected = (
        SYS_MMTAG + " USER: <Image><image></Image> ASSISTANT: Received.</s>USER: What is this? ASSISTANT: A cat.</s>"
    )
    assert conv.get_prompt() == expected
    assert [text for text, flag in conv.get_prompt_segments() if flag] == ["A cat.</s>"]


def test_llama_2_must_open_with_user():
    conv = get_conv_template("llava_llama_2")
    conv.append_message("ASSISTANT", "Hi.")
    with pytest.raises(ValueError, match="must open with"):
        conv.get_prompt()


def test_copy_is_independent_and_templates_are_read_only():
    template = conv_templates["llava_v1"]
    conv = template.copy()
    conv.append_message("USER", "hi")
    other = conv.copy()
    other.append_message("ASSISTANT", "hello")
    other.system = "changed"
    assert len(conv.messages) == 1 and conv.system == SYS_HUMAN
    assert len(template.messages) == 0
    assert get_conv_template("llava_v1") is not get_conv_template("llava_v1")
    with pytest.raises(TypeError, match="copy"):
        template.append_message("USER", "hi")
    assert default_conversation is conv_templates["vicuna_v1"]


def test_unknown_template_lists_valid_names():
    with pytest.raises(KeyError) as err:
        get_conv_template("nope")
    assert isinstance(err.value, ValueError)
    assert "`nope`" in str(err.value) and "llava_v1" in str(err.value)


@pytest.mark.parametrize(
    ("model_name", "expected"),
    [
        ("llava-v1.5-7b", "llava_v1"),
        ("llava-v1.6-vicuna-13b", "llava_v1"),
        ("llava-v1.6-mistral-7b", "mistral_instruct"),
        ("llava-v1.6-34b", "chatml_direct"),
        ("llava-llama-2-13b-chat-lightning-preview", "llava_llama_2"),
        ("Llama-2-7b-chat-hf", "llama_2"),
        ("LLaVA-Lightning-MPT-7B-preview", "mpt"),
        ("llava-13b-v0", "llava_v0"),
        ("LLaVA-7b-delta-v0", "llava_v0"),
        ("llava-v1-0719-336px-lora-mmtag-vicuna-13b", "v1_mmtag"),
        ("llama3-llava-next-8b", "llama_3"),
        ("llava-qwen2-7b", "qwen_2"),
    ],
)
def test_guess_conv_mode(model_name, expected):
    assert guess_conv_mode(model_name) == expected
    assert expected in conv_templates


@pytest.fixture(scope="module")
def tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<s>", "</s>", "<|im_end|>", "<|eot_id|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    backend.train_from_iterator(["a red square is here", "what is in the picture", "where is it"], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>")


HF_MESSAGES = [
    {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is in the picture?"}]},
    {"role": "assistant", "content": "A red square."},
    {"role": "user", "content": "Where is it?"},
]


@pytest.mark.parametrize("name", WITH_JINJA)
def test_jinja_matches_get_prompt(tokenizer, name):
    tokenizer.chat_template = to_chat_template_jinja(name)
    rendered = tokenizer.apply_chat_template(HF_MESSAGES, tokenize=False, add_generation_prompt=True)
    assert rendered == build(name).get_prompt()

    # A system message replaces the default system prompt; no generation prompt after a finished reply.
    messages = [{"role": "system", "content": "Be brief."}, *HF_MESSAGES[:2]]
    rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)
    conv = build(name, TURNS[:2])
    conv.set_system_message("Be brief.")
    assert rendered == conv.get_prompt()


def test_jinja_required_templates_exist():
    required = {"llava_v1", "vicuna_v1", "mistral_instruct", "llava_llama_2", "chatml_direct", "plain", "llama_3"}
    assert required | {"qwen_2"} <= set(WITH_JINJA)
    with pytest.raises(ValueError, match="few-shot"):
        to_chat_template_jinja("v0")
    with pytest.raises(KeyError):
        to_chat_template_jinja("nope")


def test_set_system_message_keeps_chatml_header():
    conv = get_conv_template("chatml_direct")
    conv.set_system_message("Be brief.")
    assert conv.system == "<|im_start|>system\nBe brief."


def test_stop_strings_and_token_ids(tokenizer):
    assert get_conv_template("llava_v1").stop_str == "</s>"
    assert get_conv_template("llava_v0").stop_str == "###"
    assert get_conv_template("chatml_direct").stop_str == "<|im_end|>"
    assert get_conv_template("llama_3").stop_str == "<|eot_id|>"
    assert get_conv_template("qwen_2").stop_str == "<|im_end|>"
    assert get_conv_template("llava_v1").sep2 == "</s>"
    eos = tokenizer.eos_token_id
    assert get_conv_template("llava_v1").stop_token_ids(tokenizer) == [eos]
    assert get_conv_template("qwen_2").stop_token_ids(tokenizer) == [eos, tokenizer.convert_tokens_to_ids("<|im_end|>")]
    assert get_conv_template("llava_v0").stop_token_ids(tokenizer) == [eos]  # "###" is not one token


def test_get_images_modes():
    conv = get_conv_template("llava_v1")
    conv.append_message("USER", ("<image>\nPad", image(6, 3), "Pad"))
    conv.append_message("ASSISTANT", "ok")
    conv.append_message("USER", ("Resize", image(6, 3), "Resize"))
    conv.append_message("ASSISTANT", "ok")
    conv.append_message("USER", ("Default", image(2000, 1000), "Default"))
    conv.append_message("ASSISTANT", None)
    padded, resized, big = conv.get_images(return_pil=True)
    assert padded.size == (6, 6)
    assert padded.getpixel((0, 0)) == (122, 116, 104) and padded.getpixel((0, 2)) == (255, 0, 0)
    assert resized.size == (336, 336)
    assert big.size == (1344, 672)  # the original HEAD's rule (issue 12.19), not the LLaVA-1.5 one (800x400)
    encoded = conv.get_images()
    assert Image.open(io.BytesIO(base64.b64decode(encoded[0]))).size == (6, 6)
    # Tall images keep their orientation; the long side is derived from the rounded short one, as the original.
    conv = get_conv_template("llava_v1")
    conv.append_message("USER", ("Crop", image(500, 1500), "Crop"))
    assert conv.get_images(return_pil=True)[0].size == (448, 1344)
    # Only a long side over 1344 is shrunk: a 1300x1300 upload stays as it is (the 1.5 rule made it 400x400).
    conv.messages[0][1] = ("x", image(1300, 1300), "Default")
    assert conv.get_images(return_pil=True)[0].size == (1300, 1300)
    conv.messages[0][1] = ("x", image(), "Stretch")
    with pytest.raises(ValueError, match="Stretch"):
        conv.get_images()


def test_to_gradio_chatbot_and_dict():
    conv = get_conv_template("llava_v1")
    conv.append_message("USER", ("<image>\nWhat is this?", image(), "Pad"))
    conv.append_message("ASSISTANT", "A red square.")
    conv.append_message("USER", "Where?")
    conv.append_message("ASSISTANT", None)
    chat = conv.to_gradio_chatbot()
    assert [m["role"] for m in chat] == ["user", "assistant", "user"]
    assert chat[0]["content"].startswith('<img src="data:image/png;base64,')
    assert chat[0]["content"].endswith("/>What is this?")
    assert chat[1:] == [{"role": "assistant", "content": "A red square."}, {"role": "user", "content": "Where?"}]
    summary = conv.dict()
    assert summary["messages"][0] == ["USER", "<image>\nWhat is this?"]
    assert summary["sep2"] == "</s>" and summary["roles"] == ["USER", "ASSISTANT"]
    json.dumps(summary)


# The exported text of every template's chat template, as sha256 prefixes. Exported checkpoints store it and
# `llava.model.llava_hf.match_conv_template` recognises a template by string equality, so it must never change
# (these are the hashes of the text written before the styles were described once, in llava/chat_styles.py).
JINJA_SHA256 = {
    "chatml_direct": "39d6b0370132ae32",
    "llama_2": "da288de0021a2354",
    "llama_3": "354a7d83bf21beb1",
    "llava_llama_2": "651de44bb63c1de7",
    "llava_v0": "677420481e81168a",
    "llava_v0_mmtag": "f6bd4f8b5679db79",
    "llava_v1": "fea05173fa2225fb",
    "llava_v1_mmtag": "8c6c650cbbff23c5",
    "mistral_direct": "39d6b0370132ae32",
    "mistral_instruct": "4eef6a9d0741d691",
    "mpt": "2c4add2ac470e62d",
    "plain": "faa4025523407fed",
    "qwen_2": "5af3ac027b625a8d",
    "v0_mmtag": "f6bd4f8b5679db79",
    "v0_plain": "faa4025523407fed",
    "v1": "d8c555804949e9c1",
    "v1_mmtag": "8c6c650cbbff23c5",
    "vicuna_v1": "d8c555804949e9c1",
}


def test_exported_jinja_text_never_changes():
    import hashlib

    assert sorted(JINJA_SHA256) == WITH_JINJA
    for name in WITH_JINJA:
        digest = hashlib.sha256(to_chat_template_jinja(name).encode()).hexdigest()[:16]
        assert digest == JINJA_SHA256[name], name


def test_style_descriptions_are_checked(monkeypatch):
    import dataclasses

    import llava.conversation as conversation_lib
    from llava.chat_template import to_chat_template_jinja as export

    # TWO ends a reply with `sep2`: a template without one is refused by name, not rendered with "None".
    conv = dataclasses.replace(conv_templates["v1"], messages=[], sep2=None)
    conv.append_message("USER", "hi")
    conv.append_message("ASSISTANT", "hello")
    with pytest.raises(ValueError, match="`TWO` template needs `sep2`"):
        conv.get_prompt()
    # PLAIN's Jinja form relies on an empty `sep` (an answered user turn cannot be told from an unanswered one).
    odd = dataclasses.replace(conv_templates["plain"], sep="|")
    monkeypatch.setitem(conversation_lib.conv_templates, "odd_plain", odd)
    with pytest.raises(ValueError, match="give it an empty `sep`"):
        export("odd_plain")
