"""Training and serving agree on what the model sees: for every template, the token ids that training puts before
the first reply are the ids the real serving path feeds the model for the same question and images.

Training: a one-turn record -> `Preprocessor` (marker placement, template rendering, tokenization). Serving:
`LlavaEngine.build_prompt(question, n_images)` -> `LlavaEngine.encode` (`tokenizer_image_token`), on a real engine
around a tiny model. Both sides take their image markers from `llava.prompting`; this test catches either side
drifting (a template, the marker layout, `mmtag`, `mm_use_im_start_end`, the tokenization of the chunks between
images).
"""

from __future__ import annotations

import pytest
from PIL import Image
from train_helpers import byte_bpe_tokenizer

from llava.constants import DEFAULT_IM_END_TOKEN, DEFAULT_IM_START_TOKEN, IGNORE_INDEX, IMAGE_TOKEN_INDEX
from llava.conversation import SeparatorStyle, conv_templates
from llava.inference import LlavaEngine
from llava.train.preprocess import Preprocessor

QUESTION = "What colour is the square?"
REPLY = "It is red."
CHAT_SPECIALS = ("<|im_start|>", "<|im_end|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "</s>")


def record(n_images: int) -> list[tuple[str, str]]:
    """A one-turn training record as datasets write it: one image after the question (training moves it to the
    front, where serving puts it), several images before it."""
    if n_images == 1:
        user = f"{QUESTION}\n<image>"
    else:
        user = "<image>\n" * n_images + QUESTION
    return [("user", user), ("assistant", REPLY)]


@pytest.fixture(scope="module")
def model(tiny):
    return tiny.model("llama", seed=3)


@pytest.fixture(scope="module")
def tokenizers(tiny, tmp_path_factory):
    """SentencePiece (Llama/Vicuna-like) and byte-level BPE (Llama-3/Qwen-like), each also with the start/end
    image tokens added as training adds them for `mm_use_im_start_end`."""
    from transformers import AutoTokenizer

    root = tmp_path_factory.mktemp("agreement-tokenizers")
    out = {}
    for start_end in (False, True):
        spm = AutoTokenizer.from_pretrained(tiny.tokenizer_dir)
        bpe = byte_bpe_tokenizer(str(root / f"bpe-{start_end}"), specials=CHAT_SPECIALS)
        for name, tok in (("spm", spm), ("bpe", bpe)):
            if start_end:
                tok.add_tokens([DEFAULT_IM_START_TOKEN, DEFAULT_IM_END_TOKEN], special_tokens=True)
            out[name, start_end] = tok
    return out


def encode(engine: LlavaEngine, prompt: str, n_images: int) -> list[int]:
    """The engine's own request encoding (`tokenizer_image_token` plus its checks), with `n_images` images."""
    images = [Image.new("RGB", (30 + 10 * k, 24), (200, 20 * k, 40)) for k in range(n_images)]
    return engine.encode(prompt, images).input_ids


def training_ids(tokenizer, name: str, start_end: bool, n_images: int) -> list[int]:
    """The ids training puts before the record's reply. A template's few-shot examples (`v0`) are for prompting
    only (training starts from an empty history, as the original's), so here the record carries them as turns."""
    examples = [
        ("user" if i % 2 == 0 else "assistant", text) for i, (_, text) in enumerate(conv_templates[name].messages)
    ]
    tokens = Preprocessor(tokenizer, name, mm_use_im_start_end=start_end)(examples + record(n_images), n_images)
    supervised = [i for i, label in enumerate(tokens.labels) if label != IGNORE_INDEX]
    last_reply = next(i for i, prev in zip(supervised[1:], supervised) if i != prev + 1) if examples else supervised[0]
    return tokens.input_ids[:last_reply]


@pytest.mark.parametrize("n_images", [0, 1, 2])
@pytest.mark.parametrize("start_end", [False, True], ids=["bare", "im_start_end"])
@pytest.mark.parametrize("tok_name", ["spm", "bpe"])
@pytest.mark.parametrize("name", sorted(conv_templates))
def test_training_tokens_equal_serving_tokens(model, tokenizers, name, tok_name, start_end, n_images):
    tokenizer = tokenizers[tok_name, start_end]
    model.config.mm_use_im_start_end = start_end
    engine = LlavaEngine(tokenizer, model, None, context_len=2048, conv_mode=name)
    prompt = engine.build_prompt(QUESTION, n_images)
    served = encode(engine, prompt, n_images)
    trained = training_ids(tokenizer, name, start_end, n_images)
    assert served.count(IMAGE_TOKEN_INDEX) == trained.count(IMAGE_TOKEN_INDEX) == n_images
    if start_end and n_images:
        start = tokenizer.convert_tokens_to_ids(DEFAULT_IM_START_TOKEN)
        assert served[served.index(IMAGE_TOKEN_INDEX) - 1] == start
    if conv_templates[name].sep_style is not SeparatorStyle.PLAIN:
        assert served == trained, (prompt, tokenizer.decode([t for t in served if t >= 0]))
        return
    # `plain` (stage 1) is the one documented exception (docs/Migration.md): training keeps only the images of the
    # user turn, so the caption follows them directly, while the original's inference prompt keeps the question and
    # ends with a newline. The image tokens still come first, as training has them.
    marker = engine.image_token_text()
    assert trained == encode(engine, marker * n_images, n_images)
    assert prompt == (marker + "\n") * n_images + QUESTION + "\n"
