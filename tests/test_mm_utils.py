"""Tests for llava.mm_utils: image loading, preprocessing (square/pad/anyres), prompt tokenization, stopping."""

from __future__ import annotations

import base64
import contextlib
import http.server
import io
import threading
import time
from types import SimpleNamespace
from typing import ClassVar

import pytest
import torch
from PIL import Image
from transformers import CLIPImageProcessorPil, StoppingCriteriaList

from llava.constants import IMAGE_TOKEN_INDEX
from llava.mm_utils import (
    ImageLoadError,
    KeywordsStoppingCriteria,
    divide_to_patches,
    expand2square,
    get_anyres_image_grid_shape,
    get_model_name_from_path,
    load_image,
    load_image_from_base64,
    parse_grid_pinpoints,
    process_anyres_image,
    process_images,
    resize_and_pad_image,
    select_best_resolution,
    tokenizer_image_token,
)

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
PINPOINTS_336 = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
CORPUS = [
    "Hello world, this is a picture of a cat.",
    "What is in the image? Describe it in detail.",
    "USER: hi ASSISTANT: stop here ### and stop there </s>",
] * 30


# ---------------------------------------------------------------------------------------------------------------------
# Fixtures
# ---------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def processor() -> CLIPImageProcessorPil:
    return CLIPImageProcessorPil(
        size={"shortest_edge": 32},
        crop_size={"height": 32, "width": 32},
        image_mean=list(CLIP_MEAN),
        image_std=list(CLIP_STD),
    )


@pytest.fixture(scope="module")
def llama_tokenizer(tmp_path_factory):
    """SentencePiece BPE tokenizer loaded as a LlamaTokenizer that adds BOS."""
    import sentencepiece as spm
    from transformers import LlamaTokenizer

    directory = tmp_path_factory.mktemp("spm")
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS),
        model_prefix=str(directory / "tokenizer"),  # must be `tokenizer.model`, or it loads silently empty
        vocab_size=400,
        model_type="bpe",
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        byte_fallback=True,
        minloglevel=2,
    )
    tokenizer = LlamaTokenizer.from_pretrained(directory, add_bos_token=True)
    assert len(tokenizer) == 400 and tokenizer.bos_token_id == 1
    return tokenizer


@pytest.fixture(scope="module")
def bytelevel_tokenizer():
    """Byte-level BPE (GPT-2/Qwen style) with no BOS."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=["<|endoftext|>"]
    )
    backend.train_from_iterator(CORPUS, trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|endoftext|>")
    assert tokenizer.bos_token_id is None
    return tokenizer


def _png_bytes(size=(8, 6), color=(255, 0, 0), mode="RGB") -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, size, color).save(buffer, format="PNG")
    return buffer.getvalue()


class _Handler(http.server.BaseHTTPRequestHandler):
    routes: ClassVar[dict[str, tuple[bytes, str, bool | None, float]]] = {}

    def do_GET(self):
        route = self.routes.get(self.path)
        if route is None:
            self.send_error(404, "Not Found")
            return
        body, content_type, send_length, delay = route
        if send_length is None:  # one byte per `delay`: each read may be quick, the whole transfer is not
            self.send_response(200)
            self.end_headers()
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                for byte in body:
                    self.wfile.write(bytes([byte]))
                    self.wfile.flush()
                    time.sleep(delay)
            return
        time.sleep(delay)
        self.send_response(200)
        self.send_header("Content-Type", content_type)
        if send_length:
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()  # HTTP/1.0: without Content-Length the body ends when the connection closes
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):  # the client gave up on an oversized body
            self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def image_server():
    _Handler.routes = {
        "/ok.png": (_png_bytes((12, 7), (0, 255, 0)), "image/png", True, 0.0),
        "/big.bin": (b"\0" * 200_000, "application/octet-stream", True, 0.0),
        "/big-stream.bin": (b"\0" * 200_000, "application/octet-stream", False, 0.0),
        "/page.html": (b"<html>not an image</html>", "text/html", True, 0.0),
        "/huge.png": (_png_bytes((200, 200)), "image/png", True, 0.0),
        "/slow.png": (_png_bytes(), "image/png", True, 1.0),
        "/trickle.png": (_png_bytes((64, 64)), "image/png", None, 0.05),
        "/stall.png": (_png_bytes((64, 64)), "image/png", None, 2.0),
    }
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.fixture(autouse=True)
def _no_proxy(monkeypatch):
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")


# ---------------------------------------------------------------------------------------------------------------------
# load_image
# ---------------------------------------------------------------------------------------------------------------------


def test_load_image_from_path_converts_to_rgb(tmp_path):
    path = tmp_path / "gray.png"
    path.write_bytes(_png_bytes((9, 4), 128, mode="L"))
    for source in (str(path), path):
        image = load_image(source)
        assert image.mode == "RGB" and image.size == (9, 4)
        assert image.getpixel((0, 0)) == (128, 128, 128)


def test_load_image_from_base64_and_data_url():
    payload = base64.b64encode(_png_bytes((5, 3), (1, 2, 3))).decode()
    for source in (payload, f"data:image/png;base64,{payload}", f"  {payload}\n"):
        image = load_image(source)
        assert image.size == (5, 3) and image.getpixel((4, 2)) == (1, 2, 3)
    assert load_image_from_base64(payload).size == (5, 3)
    assert load_image_from_base64(f"data:image/png;base64,{payload}").size == (5, 3)
    urlsafe = base64.urlsafe_b64encode(_png_bytes((5, 3))).decode().rstrip("=")
    assert load_image(urlsafe).size == (5, 3)


def test_load_image_from_http(image_server):
    image = load_image(f"{image_server}/ok.png")
    assert image.mode == "RGB" and image.size == (12, 7) and image.getpixel((0, 0)) == (0, 255, 0)


@pytest.mark.parametrize(
    ("path", "kwargs", "expected"),
    [
        ("/missing.png", {}, "HTTP 404"),
        ("/big.bin", {"max_bytes": 50_000}, "too large: Content-Length 200000"),
        ("/big-stream.bin", {"max_bytes": 50_000}, "too large: more than max_bytes=50000"),
        ("/page.html", {}, "not an image"),
        ("/huge.png", {"max_pixels": 10_000}, "too many pixels: 200x200 = 40000 > max_pixels=10000"),
        ("/slow.png", {"timeout": 0.2}, "timeout=0.2s"),
        ("/trickle.png", {"timeout": 0.5}, "timeout=0.5s"),
        ("/stall.png", {"timeout": 0.3}, "timeout=0.3s"),
    ],
)
def test_load_image_http_errors(image_server, path, kwargs, expected):
    url = f"{image_server}{path}"
    start = time.monotonic()
    with pytest.raises(ImageLoadError) as info:
        load_image(url, **kwargs)
    assert time.monotonic() - start < 1.5
    message = str(info.value)
    assert expected in message
    assert url in message


def test_load_image_connection_refused():
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(ImageLoadError, match="could not be downloaded"):
        load_image(f"http://127.0.0.1:{port}/x.png", timeout=2.0)


def test_load_image_errors(tmp_path):
    with pytest.raises(ImageLoadError, match=r"`/no/such/dir/x\.png` not found"):
        load_image("/no/such/dir/x.png")
    with pytest.raises(ImageLoadError, match="not valid base64"):
        load_image("data:image/png;base64,!!!not*base64!!!")
    with pytest.raises(ImageLoadError, match="not a base64 data URL"):
        load_image("data:image/png,rawbytes")
    with pytest.raises(ImageLoadError, match="not an image"):
        load_image(base64.b64encode(b"hello world, plain text " * 8).decode())
    with pytest.raises(ImageLoadError, match="too large"):
        load_image(base64.b64encode(_png_bytes((64, 64))).decode(), max_bytes=10)
    big = tmp_path / "big.png"
    big.write_bytes(_png_bytes((40, 30)))
    with pytest.raises(ImageLoadError, match="too many pixels: 40x30 = 1200 > max_pixels=1000"):
        load_image(big, max_pixels=1000)
    with pytest.raises(ImageLoadError, match="local paths are not allowed"):
        load_image(str(big), allow_paths=False)
    text_file = tmp_path / "notes.png"
    text_file.write_text("not really a png")
    with pytest.raises(ImageLoadError, match="not an image"):
        load_image(text_file)
    with pytest.raises(ImageLoadError, match="must be a path"):
        load_image(123)  # type: ignore[arg-type]
    assert issubclass(ImageLoadError, ValueError)


def test_load_image_error_message_shortens_long_sources():
    junk = "QUJD" * 100_000  # valid base64, 400k chars, decodes to "ABC..." which is no image
    with pytest.raises(ImageLoadError) as info:
        load_image(junk)
    assert "400000 chars" in str(info.value) and len(str(info.value)) < 400


# ---------------------------------------------------------------------------------------------------------------------
# Geometry
# ---------------------------------------------------------------------------------------------------------------------


def test_expand2square_wide_and_tall():
    wide = expand2square(Image.new("RGB", (40, 20), (255, 0, 0)), (0, 0, 255))
    assert wide.size == (40, 40)
    assert wide.getpixel((20, 9)) == (0, 0, 255) and wide.getpixel((20, 10)) == (255, 0, 0)
    assert wide.getpixel((20, 29)) == (255, 0, 0) and wide.getpixel((20, 30)) == (0, 0, 255)
    tall = expand2square(Image.new("RGB", (10, 30), (255, 0, 0)), (7, 8, 9))
    assert tall.size == (30, 30)
    assert tall.getpixel((9, 0)) == (7, 8, 9) and tall.getpixel((10, 0)) == (255, 0, 0)
    assert tall.getpixel((19, 29)) == (255, 0, 0) and tall.getpixel((20, 29)) == (7, 8, 9)
    square = Image.new("RGB", (5, 5))
    assert expand2square(square, (0, 0, 0)) is square


def test_select_best_resolution_hand_worked():
    # (128, 64) keeps all 5000 pixels; the others scale the image down to 64x32.
    assert select_best_resolution((100, 50), [(64, 64), (128, 64), (64, 128)]) == (128, 64)
    # All candidates keep every pixel: the least wasted canvas wins.
    assert select_best_resolution((10, 10), [(20, 40), (20, 20), (40, 40)]) == (20, 20)
    # LLaVA-NeXT 336 grid: 800x600 fits 672x672 at 672x504; 1000x300 fits 1008x336 keeping all 300000 pixels.
    assert select_best_resolution((800, 600), PINPOINTS_336) == (672, 672)
    assert select_best_resolution((1000, 300), PINPOINTS_336) == (1008, 336)
    assert select_best_resolution((300, 1000), PINPOINTS_336) == (336, 1008)
    with pytest.raises(ValueError, match="empty"):
        select_best_resolution((10, 10), [])


def test_resize_and_pad_image_and_divide_to_patches():
    image = Image.new("RGB", (100, 50), (255, 255, 255))
    padded = resize_and_pad_image(image, (64, 64))
    assert padded.size == (64, 64)
    assert padded.getpixel((32, 15)) == (0, 0, 0) and padded.getpixel((32, 16)) == (255, 255, 255)
    assert padded.getpixel((32, 47)) == (255, 255, 255) and padded.getpixel((32, 48)) == (0, 0, 0)
    halves = Image.new("RGB", (64, 32), (255, 0, 0))
    halves.paste((0, 255, 0), (32, 0, 64, 32))
    patches = divide_to_patches(halves, 32)
    assert [p.size for p in patches] == [(32, 32), (32, 32)]
    assert patches[0].getpixel((5, 5)) == (255, 0, 0) and patches[1].getpixel((5, 5)) == (0, 255, 0)
    assert len(divide_to_patches(Image.new("RGB", (96, 64)), 32)) == 6


def test_parse_grid_pinpoints_forms():
    expected = [(336, 672), (672, 336)]
    assert parse_grid_pinpoints([[336, 672], [672, 336]]) == expected
    assert parse_grid_pinpoints(((336, 672), (672, 336))) == expected
    assert parse_grid_pinpoints("[[336, 672], [672, 336]]") == expected
    assert parse_grid_pinpoints("(1x1),...,(2x2)", 336) == [(336, 336), (336, 672), (672, 336), (672, 672)]
    assert len(parse_grid_pinpoints("(1x1),...,(6x6)", 384)) == 36
    assert parse_grid_pinpoints("(1x2),(2x1)", 10) == [(10, 20), (20, 10)]
    with pytest.raises(ValueError, match="pass `patch_size`"):
        parse_grid_pinpoints("(1x1),...,(3x3)")
    with pytest.raises(ValueError, match="Cannot parse grid pinpoints `nonsense`"):
        parse_grid_pinpoints("nonsense")
    with pytest.raises(ValueError, match="not a list of"):
        parse_grid_pinpoints([[1, 2, 3]])
    with pytest.raises(ValueError, match="positive"):
        parse_grid_pinpoints([[0, 336]])


def test_get_anyres_image_grid_shape():
    assert get_anyres_image_grid_shape((1000, 300), PINPOINTS_336, 336) == (3, 1)
    assert get_anyres_image_grid_shape((300, 1000), PINPOINTS_336, 336) == (1, 3)
    assert get_anyres_image_grid_shape((800, 600), PINPOINTS_336, 336) == (2, 2)
    assert get_anyres_image_grid_shape((100, 30), "(1x1),...,(3x3)", 32) == (3, 1)


# ---------------------------------------------------------------------------------------------------------------------
# process_images
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("aspect", [None, "square", "resize"])
def test_process_images_square(processor, aspect):
    images = [Image.new("RGB", (64, 40), (255, 0, 0)), Image.new("L", (20, 50), 30)]
    out = process_images(images, processor, SimpleNamespace(image_aspect_ratio=aspect))
    assert isinstance(out, torch.Tensor) and out.shape == (2, 3, 32, 32) and out.dtype == torch.float32
    expected = processor.preprocess(images[0], return_tensors="pt")["pixel_values"][0]
    torch.testing.assert_close(out[0], expected)


def test_process_images_pad_fills_with_mean(processor):
    wide = Image.new("RGB", (64, 16), (255, 0, 0))
    out = process_images([wide], processor, SimpleNamespace(image_aspect_ratio="pad"))
    assert out.shape == (1, 3, 32, 32)
    # 64x16 padded to 64x64 then resized to 32x32: rows 0-11 and 20-31 are the mean colour, ~0 once normalised.
    border = torch.cat([out[0, :, :10, :], out[0, :, 22:, :]], dim=1)
    assert border.abs().max() < 0.02
    centre = out[0, :, 16, 16]
    red = torch.tensor([(1 - CLIP_MEAN[0]) / CLIP_STD[0], -CLIP_MEAN[1] / CLIP_STD[1], -CLIP_MEAN[2] / CLIP_STD[2]])
    torch.testing.assert_close(centre, red, atol=0.02, rtol=0)


@pytest.mark.parametrize(
    ("size", "grid"),
    [
        ((32, 32), (1, 1)),
        ((100, 30), (3, 1)),
        ((30, 100), (1, 3)),
        ((70, 70), (3, 3)),
        ((64, 30), (2, 1)),
        ((64, 40), (2, 2)),
    ],
)
def test_process_images_anyres_shapes(processor, size, grid):
    cfg = SimpleNamespace(image_aspect_ratio="anyres", image_grid_pinpoints="(1x1),...,(3x3)")
    out = process_images([Image.new("RGB", size, (10, 200, 30))], processor, cfg)
    shape = get_anyres_image_grid_shape(size, cfg.image_grid_pinpoints, 32)
    assert shape == grid
    assert isinstance(out, torch.Tensor) and out.shape == (1, 1 + shape[0] * shape[1], 3, 32, 32)


def test_process_images_anyres_mixed_sizes_returns_list(processor):
    cfg = {"image_aspect_ratio": "anyres", "image_grid_pinpoints": [[32, 32], [64, 32], [32, 64]]}
    out = process_images([Image.new("RGB", (60, 30)), Image.new("RGB", (30, 30))], processor, cfg)
    assert isinstance(out, list) and [t.shape for t in out] == [(3, 3, 32, 32), (2, 3, 32, 32)]


def test_process_anyres_image_order(processor):
    halves = Image.new("RGB", (64, 32), (255, 0, 0))
    halves.paste((0, 255, 0), (32, 0, 64, 32))
    out = process_anyres_image(halves, processor, [[64, 32], [32, 64]])
    assert out.shape == (3, 3, 32, 32)
    whole = processor.preprocess(halves.resize((32, 32)), return_tensors="pt")["pixel_values"][0]
    torch.testing.assert_close(out[0], whole)
    assert out[1, 0].mean() > 1.5 and out[1, 1].mean() < -1.5  # left patch red
    assert out[2, 1].mean() > 1.5 and out[2, 0].mean() < -1.5  # right patch green


def test_process_images_errors(processor):
    image = Image.new("RGB", (8, 8))
    with pytest.raises(ValueError, match=r"Unknown image_aspect_ratio `crop`; use one of None, 'square'.*'anyres'"):
        process_images([image], processor, SimpleNamespace(image_aspect_ratio="crop"))
    with pytest.raises(ValueError, match="image_grid_pinpoints"):
        process_images([image], processor, SimpleNamespace(image_aspect_ratio="anyres"))
    with pytest.raises(ValueError, match="no images"):
        process_images([], processor, SimpleNamespace(image_aspect_ratio="pad"))


def test_process_images_unequal_shapes_returns_list():
    no_crop = CLIPImageProcessorPil(size={"shortest_edge": 16}, do_center_crop=False)
    out = process_images([Image.new("RGB", (32, 16)), Image.new("RGB", (16, 32))], no_crop, SimpleNamespace())
    assert isinstance(out, list) and [t.shape for t in out] == [(3, 16, 32), (3, 32, 16)]


# ---------------------------------------------------------------------------------------------------------------------
# tokenizer_image_token
# ---------------------------------------------------------------------------------------------------------------------


def _expected_ids(tokenizer, prompt: str, bos: bool) -> list[int]:
    ids = [tokenizer.bos_token_id] if bos else []
    for i, chunk in enumerate(prompt.split("<image>")):
        if i:
            ids.append(IMAGE_TOKEN_INDEX)
        ids.extend(tokenizer(chunk, add_special_tokens=False).input_ids if chunk else [])
    return ids


PROMPTS = [
    "<image>\nWhat is in the image?",
    "Hello <image> world, describe it.",
    "Describe this picture<image>",
    "<image><image>a cat<image> and <image>",
    "USER: hi ASSISTANT: stop here",
]


@pytest.mark.parametrize("prompt", PROMPTS)
def test_tokenizer_image_token_with_bos(llama_tokenizer, prompt):
    ids = tokenizer_image_token(prompt, llama_tokenizer)
    assert ids == _expected_ids(llama_tokenizer, prompt, bos=True)
    assert ids[0] == llama_tokenizer.bos_token_id and ids.count(llama_tokenizer.bos_token_id) == 1
    assert ids.count(IMAGE_TOKEN_INDEX) == prompt.count("<image>")
    if "<image>" not in prompt:
        assert ids == llama_tokenizer(prompt).input_ids


@pytest.mark.parametrize("prompt", PROMPTS)
def test_tokenizer_image_token_without_bos(bytelevel_tokenizer, prompt):
    ids = tokenizer_image_token(prompt, bytelevel_tokenizer)
    assert ids == _expected_ids(bytelevel_tokenizer, prompt, bos=False)
    assert ids.count(IMAGE_TOKEN_INDEX) == prompt.count("<image>")
    text_ids = [i for i in ids if i != IMAGE_TOKEN_INDEX]
    assert bytelevel_tokenizer.decode(text_ids) == prompt.replace("<image>", "")
    if prompt.endswith("<image>"):
        assert ids[-1] == IMAGE_TOKEN_INDEX
    if prompt.startswith("<image>"):
        assert ids[0] == IMAGE_TOKEN_INDEX


def test_tokenizer_image_token_tensor_and_options(llama_tokenizer):
    prompt = "<image>\nhi"
    tensor = tokenizer_image_token(prompt, llama_tokenizer, return_tensors="pt")
    assert tensor.dtype == torch.long and tensor.dim() == 1
    assert tensor.tolist() == tokenizer_image_token(prompt, llama_tokenizer)
    custom = tokenizer_image_token(prompt, llama_tokenizer, image_token_index=-7)
    assert custom[:2] == [llama_tokenizer.bos_token_id, -7]
    with pytest.raises(ValueError, match="Unsupported return_tensors `np`"):
        tokenizer_image_token(prompt, llama_tokenizer, return_tensors="np")


# ---------------------------------------------------------------------------------------------------------------------
# KeywordsStoppingCriteria
# ---------------------------------------------------------------------------------------------------------------------


def test_keywords_stopping_criteria_batch(bytelevel_tokenizer):
    tok = bytelevel_tokenizer
    prompt = tok("USER: hi ### ASSISTANT:").input_ids  # the keyword inside the prompt must not count
    input_ids = torch.tensor([prompt, prompt])
    criteria = KeywordsStoppingCriteria(["###"], tok, input_ids)
    result = criteria(input_ids, None)
    assert result.dtype == torch.bool and result.shape == (2,) and not result.any()

    hit = tok(" stop here ###", add_special_tokens=False).input_ids
    miss = tok(" stop here and", add_special_tokens=False).input_ids
    width = max(len(hit), len(miss))
    hit = [tok.eos_token_id] * (width - len(hit)) + hit  # left-pad so both rows have equal length
    miss = [tok.eos_token_id] * (width - len(miss)) + miss
    output_ids = torch.tensor([prompt + hit, prompt + miss])
    assert criteria(output_ids, None).tolist() == [True, False]
    swapped = torch.tensor([prompt + miss, prompt + hit])
    assert StoppingCriteriaList([criteria])(swapped, None).tolist() == [False, True]


def test_keywords_stopping_criteria_special_token(llama_tokenizer):
    tok = llama_tokenizer
    prompt = tok("USER: hi ASSISTANT:").input_ids
    criteria = KeywordsStoppingCriteria(["</s>"], tok, torch.tensor([prompt]))
    words = tok(" stop here", add_special_tokens=False).input_ids
    assert criteria(torch.tensor([prompt + words]), None).tolist() == [False]
    assert criteria(torch.tensor([prompt + words + [tok.eos_token_id]]), None).tolist() == [True]
    with pytest.raises(ValueError, match="non-empty keyword"):
        KeywordsStoppingCriteria([""], tok, torch.tensor([prompt]))


# ---------------------------------------------------------------------------------------------------------------------
# get_model_name_from_path
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "name"),
    [
        ("a/b/checkpoint-100", "b_checkpoint-100"),
        ("./checkpoints/llava-v1.5-7b-lora/checkpoint-2000/", "llava-v1.5-7b-lora_checkpoint-2000"),
        ("liuhaotian/llava-v1.5-7b", "llava-v1.5-7b"),
        ("/abs/models/llava-v1.6-mistral-7b/", "llava-v1.6-mistral-7b"),
        ("checkpoint-5", "checkpoint-5"),
        ("llava-tiny", "llava-tiny"),
    ],
)
def test_get_model_name_from_path(path, name):
    assert get_model_name_from_path(path) == name


def test_get_model_name_from_empty_path():
    with pytest.raises(ValueError, match="empty path"):
        get_model_name_from_path("/")
