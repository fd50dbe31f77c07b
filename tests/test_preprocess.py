"""Label masking: for every template and several tokenizers, the supervised tokens decode to exactly the replies."""

from __future__ import annotations

import pytest
from train_helpers import byte_bpe_tokenizer

from llava.constants import IGNORE_INDEX, IMAGE_TOKEN_INDEX
from llava.conversation import SeparatorStyle, conv_templates, get_conv_template, to_chat_template_jinja
from llava.mm_utils import tokenizer_image_token
from llava.train.preprocess import (
    CHAT_TEMPLATE,
    ConversationError,
    Preprocessor,
    Tokenized,
    check_version,
    prepare_image_markers,
    render_supervision,
    supervised_spans,
    truncate_to_fit,
)

CHAT_SPECIALS = ("<|im_start|>", "<|im_end|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "</s>")

CONVERSATIONS = {
    "single": [("user", "<image>\nWhat is in the picture?"), ("assistant", "A red square on a blue background.")],
    "image_last": [("user", "What colour is the circle?\n<image>"), ("assistant", "The circle is green.")],
    "multi_turn": [
        ("user", "<image>\nDescribe the image briefly."),
        ("assistant", "A yellow circle next to a purple square."),
        ("user", "How many triangles are there?"),
        ("assistant", "There are three triangles."),
        ("user", "Where is the star?"),
        ("assistant", "The star is in the top left corner."),
    ],
    "text_only": [
        ("user", "Answer the question using a single word. Is the shape large or small?"),
        ("assistant", "Small."),
        ("user", "And the circle?"),
        ("assistant", "It is big."),
    ],
    "multi_image": [
        ("user", "<image> and <image>: which one is red?"),
        ("assistant", "The first one."),
        ("user", "Now this one <image>"),
        ("assistant", "It is blue."),
    ],
    "system": [
        ("system", "You are a helpful language and vision assistant."),
        ("user", "<image>\nWhat is in the picture?"),
        ("assistant", "A heart."),
    ],
}


@pytest.fixture(scope="module")
def tokenizers(tiny, tmp_path_factory):
    root = tmp_path_factory.mktemp("tokenizers")
    return {
        "spm": tiny.tokenizer,
        "bpe_specials": byte_bpe_tokenizer(str(root / "bpe1"), specials=CHAT_SPECIALS),
        "bpe_plain": byte_bpe_tokenizer(str(root / "bpe2")),
    }


def end_of_turn(name: str) -> str:
    """What follows each assistant reply and is supervised with it, per separator style (written out here)."""
    conv = conv_templates[name]
    return {
        SeparatorStyle.SINGLE: conv.sep,
        SeparatorStyle.TWO: conv.sep2,
        SeparatorStyle.MPT: conv.sep,
        SeparatorStyle.PLAIN: conv.sep2,
        SeparatorStyle.LLAMA_2: " " + (conv.sep2 or ""),
        SeparatorStyle.LLAMA_3: conv.sep,
        SeparatorStyle.CHATML: conv.sep,
    }[conv.sep_style]


def decoded_spans(tokenizer, tokens: Tokenized) -> list[str]:
    # Tokenizers fold the space before a reply into its first token; decoding may or may not give it back.
    return [
        tokenizer.decode(span, clean_up_tokenization_spaces=False).removeprefix(" ")
        for span in supervised_spans(tokens)
    ]


def replies(messages) -> list[str]:
    return [text for role, text in messages if role == "assistant"]


@pytest.mark.parametrize("conversation", sorted(CONVERSATIONS))
@pytest.mark.parametrize("tok_name", ["spm", "bpe_specials", "bpe_plain"])
@pytest.mark.parametrize("name", sorted(conv_templates))
def test_supervised_tokens_are_the_replies(tokenizers, name, tok_name, conversation):
    tokenizer = tokenizers[tok_name]
    messages = CONVERSATIONS[conversation]
    pre = Preprocessor(tokenizer, name)
    tokens = pre(messages)
    expected = [r + end_of_turn(name) for r in replies(messages)]
    if conv_templates[name].sep_style is SeparatorStyle.PLAIN:
        expected = ["".join(expected)]  # user turns shrink to their images: the replies form one run
        if conversation == "multi_image":  # except where an image sits between two replies
            expected = [r + end_of_turn(name) for r in replies(messages)]
    assert decoded_spans(tokenizer, tokens) == expected
    # every image marker survives, unsupervised; nothing else is a sentinel
    n_images = sum(t.count("<image>") for _, t in messages)
    assert tokens.input_ids.count(IMAGE_TOKEN_INDEX) == n_images
    assert all(lab == IGNORE_INDEX for tok, lab in zip(tokens.input_ids, tokens.labels) if tok == IMAGE_TOKEN_INDEX)
    assert all(lab in (IGNORE_INDEX, tok) for tok, lab in zip(tokens.input_ids, tokens.labels))


@pytest.mark.parametrize("tok_name", ["spm", "bpe_specials"])
@pytest.mark.parametrize("name", sorted(conv_templates))
def test_training_prompt_matches_inference_prompt(tokenizers, name, tok_name):
    """The tokens before the first reply are exactly what `tokenizer_image_token` gives the template's own prompt.

    The prompt here is built with the training marker layout; tests/test_prompt_agreement.py compares against the
    real serving path (`LlavaEngine.build_prompt` + `encode`), which catches drift between the two."""
    tokenizer = tokenizers[tok_name]
    messages = CONVERSATIONS["single"]
    tokens = Preprocessor(tokenizer, name)(messages)
    first = next(i for i, lab in enumerate(tokens.labels) if lab != IGNORE_INDEX)
    conv = get_conv_template(name)
    conv.messages = []
    text = prepare_image_markers(messages, 1, name)[0][1]
    conv.append_message(conv.roles[0], text)
    conv.append_message(conv.roles[1], None)
    prompt = conv.get_prompt()
    if conv.sep_style is SeparatorStyle.PLAIN:
        # The original's plain prompt ends with a newline its training text never has (issue 12, item 6).
        assert prompt.endswith("\n")
        prompt = prompt[:-1]
    assert tokens.input_ids[:first] == tokenizer_image_token(prompt, tokenizer)


# Not plain: its prompt ends with a newline that its training text lacks (as the original's), so its Jinja form does
# not render a conversation as a growing prefix, which training on a chat template needs (issue 12, item 6).
@pytest.mark.parametrize(
    "name",
    sorted(n for n, c in conv_templates.items() if not c.messages and c.sep_style is not SeparatorStyle.PLAIN),
)
@pytest.mark.parametrize("tok_name", ["spm", "bpe_specials"])
def test_tokenizer_chat_template(tokenizers, name, tok_name, tmp_path):
    """`--version chat_template`: the tokenizer's own template (here each registered one as Jinja)."""
    import copy

    tokenizer = copy.deepcopy(tokenizers[tok_name])
    tokenizer.chat_template = to_chat_template_jinja(name)
    for conversation in ("multi_turn", "system", "text_only"):
        messages = CONVERSATIONS[conversation]
        tokens = Preprocessor(tokenizer, CHAT_TEMPLATE)(messages)
        spans = decoded_spans(tokenizer, tokens)
        # the template's own separators may be followed by turn-separating whitespace, which is not supervised
        assert [s.rstrip() for s in spans] == [(r + end_of_turn(name)).rstrip() for r in replies(messages)]
        # same ids as the registered template (which also reshapes images for plain and *mmtag, so not those)
        if conv_templates[name].sep_style is not SeparatorStyle.PLAIN and "mmtag" not in name:
            assert tokens.input_ids == Preprocessor(tokenizer, name)(messages).input_ids


def test_chat_template_of_a_saved_tokenizer(tokenizers, tmp_path):
    """A Qwen-style tokenizer dir with its own ChatML template, reloaded from disk."""
    from transformers import AutoTokenizer

    tokenizer = tokenizers["bpe_specials"]
    tokenizer.chat_template = to_chat_template_jinja("qwen_2")
    tokenizer.save_pretrained(tmp_path)
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    tokens = Preprocessor(reloaded, CHAT_TEMPLATE)(CONVERSATIONS["multi_turn"])
    assert decoded_spans(reloaded, tokens) == [r + "<|im_end|>" for r in replies(CONVERSATIONS["multi_turn"])]


def test_plain_keeps_only_image_and_caption(tokenizers):
    tok = tokenizers["spm"]
    messages = [("user", "Describe this image in detail.\n<image>"), ("assistant", "A red square.")]
    pre = Preprocessor(tok, "plain")
    assert pre.segments(messages) == [("<image>", False), ("A red square.\n", True)]
    tokens = pre(messages)
    assert tokens.input_ids[:2] == [tok.bos_token_id, IMAGE_TOKEN_INDEX]
    assert render_supervision(tok, tokens) == "<s><image>[[A red square.\n]]"


def test_image_marker_layout():
    single = [("user", "What is this?\n<image>"), ("assistant", "A dot.")]
    assert prepare_image_markers(single, 1, "v1")[0][1] == "<image>\nWhat is this?"
    multi = [("user", "Left <image> right <image>"), ("assistant", "Two.")]
    assert prepare_image_markers(multi, 2, "v1")[0][1] == "Left <image> right <image>"
    assert prepare_image_markers(single, 1, "v1_mmtag")[0][1] == "<Image><image></Image>\nWhat is this?"
    wrapped = prepare_image_markers(single, 1, "v1", mm_use_im_start_end=True)[0][1]
    assert wrapped == "<im_start><image><im_end>\nWhat is this?"
    assert prepare_image_markers(multi, 2, "plain")[0][1] == "<image><image>"


def test_im_start_end_tokens_are_not_supervised(tiny, tmp_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny.tokenizer_dir)
    tok.add_tokens(["<im_start>", "<im_end>"], special_tokens=True)
    tokens = Preprocessor(tok, "v1", mm_use_im_start_end=True)(CONVERSATIONS["single"])
    start = tok.convert_tokens_to_ids("<im_start>")
    i = tokens.input_ids.index(IMAGE_TOKEN_INDEX)
    assert tokens.input_ids[i - 1] == start and tokens.labels[i - 1] == IGNORE_INDEX
    assert decoded_spans(tok, tokens) == ["A red square on a blue background.</s>"]


def test_truncation_counts_image_features():
    tokens = Tokenized([1, 5, IMAGE_TOKEN_INDEX, 6, 7, 8, IMAGE_TOKEN_INDEX, 9], [-100, -100, -100, 6, 7, 8, -100, 9])
    kept, n = truncate_to_fit(tokens, [10, 10], max_length=14)
    assert kept.input_ids == [1, 5, IMAGE_TOKEN_INDEX, 6, 7] and n == 1  # 2 + 10 + 2 = 14 positions
    kept, n = truncate_to_fit(tokens, [10, 10], max_length=11)
    assert kept.input_ids == [1, 5] and n == 0  # the first image does not fit whole: it and the rest go
    same, n = truncate_to_fit(tokens, [10, 10], max_length=100)
    assert same is tokens and n == 2


def test_truncated_replies_leave_a_fully_masked_sample(tokenizers):
    tok = tokenizers["spm"]
    tokens = Preprocessor(tok, "v1")(CONVERSATIONS["single"])
    first = next(i for i, lab in enumerate(tokens.labels) if lab != IGNORE_INDEX)
    cut, _ = truncate_to_fit(tokens, [576], max_length=first - 1 + 576)
    assert cut.num_supervised == 0 and cut.num_images == 1


@pytest.mark.parametrize(
    "messages, match",
    [
        ([("assistant", "hi")], "`user` was expected"),
        ([("user", "a"), ("user", "b")], "must alternate"),
        ([("user", "hello")], "no assistant reply"),
        ([("robot", "hello")], "Unknown role `robot`"),
        ([], "no messages"),
    ],
)
def test_bad_conversations(tokenizers, messages, match):
    with pytest.raises(ConversationError, match=match):
        Preprocessor(tokenizers["spm"], "v1")(messages)


def test_unknown_version_lists_the_valid_ones(tokenizers):
    with pytest.raises(ValueError, match=r"Unknown `--version` `vicuna_v9`.*plain.*vicuna_v1"):
        check_version("vicuna_v9")
    with pytest.raises(ValueError, match="has none"):
        Preprocessor(tokenizers["bpe_plain"], CHAT_TEMPLATE)


def test_training_loads_the_tokenizer_as_serving_does(tiny):
    """A LLaMA SentencePiece base without a `legacy` choice: training tokenizes a multi-turn text (`</s>USER:` inside
    one chunk) to the ids the serving loader and the original (transformers 4.37's legacy mode) give."""
    from types import SimpleNamespace

    from transformers import AutoTokenizer

    from llava.model.builder import load_tokenizer as serving_tokenizer
    from llava.train.model_setup import load_tokenizer as training_tokenizer

    training = training_tokenizer(
        SimpleNamespace(model_name_or_path=tiny.tokenizer_dir), SimpleNamespace(cache_dir=None, model_max_length=64)
    )
    serving = serving_tokenizer(tiny.tokenizer_dir)
    default = AutoTokenizer.from_pretrained(tiny.tokenizer_dir)
    texts = ["ASSISTANT: red</s>USER: What is it?", "a<unk>b", " hi", "USER: hi ASSISTANT:"]
    for text in texts:
        assert training(text).input_ids == serving(text).input_ids, text
    # the case is real: transformers 5's default gives the word after `</s>` another piece
    assert default(texts[0]).input_ids != training(texts[0]).input_ids
    assert training.padding_side == "right" and training.model_max_length == 64
