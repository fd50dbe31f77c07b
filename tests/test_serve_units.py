"""Serving pieces in-process: controller dispatch and expiry, OpenAI message rendering, request validation."""

from __future__ import annotations

import time

import pytest

from llava.serve.controller import Controller
from llava.serve.openai_api_server import ApiError, parse_chat_request, render_prompt
from llava.serve.protocol import ErrorCode, ServeError, encode_chunk, iter_chunks


def status(*models, queue=0, speed=1):
    return {"model_names": list(models), "speed": speed, "queue_length": queue}


def test_controller_dispatch_and_models():
    controller = Controller("shortest_queue", heart_beat_expiration=60)
    controller.register_worker("http://a", True, status("m1", queue=3))
    controller.register_worker("http://b", True, status("m1", queue=1))
    controller.register_worker("http://c", True, status("m2"))
    assert controller.list_models() == ["m1", "m2"]
    # shortest queue first; each dispatch counts, so a burst spreads over both workers
    picks = [controller.get_worker_address("m1") for _ in range(4)]
    assert picks[:2] == ["http://b", "http://b"] and set(picks) == {"http://a", "http://b"}
    assert controller.get_worker_address("m2") == "http://c"
    assert controller.get_worker_address("nope") == ""
    lottery = Controller("lottery")
    lottery.register_worker("http://a", True, status("m1", speed=1))
    lottery.register_worker("http://b", True, status("m1", speed=3))
    assert {lottery.get_worker_address("m1") for _ in range(50)} == {"http://a", "http://b"}
    assert controller.worker_api_get_status()["workers"] == 3
    with pytest.raises(ValueError, match="dispatch method"):
        Controller("round_robin")
    with pytest.raises(ServeError, match="model_names"):
        controller.register_worker("http://d", True, {"model_names": [], "speed": 1, "queue_length": 0})


def test_controller_heart_beat_expiry():
    # `a` is checked right after its heartbeat (microseconds old; the expiry is far more than 5x that even on a busy
    # machine) and `b` only once more than the expiry has surely passed since it registered: no timed assumption.
    expiry = 1.0
    controller = Controller(heart_beat_expiration=expiry)
    controller.register_worker("http://a", True, status("m1"))
    controller.register_worker("http://b", True, status("m2"))
    b_registered = time.monotonic()
    controller.register_worker("http://manual", False, status("m3"))  # registered by hand: never expires
    beats = 0
    while time.monotonic() - b_registered <= expiry or beats < 4:
        time.sleep(0.1)
        assert controller.receive_heart_beat("http://a", 0)
        beats += 1
    assert controller.list_models() == ["m1", "m3"]  # b went silent: gone from the list at once
    assert controller.get_worker_address("m2") == ""
    controller.remove_stale_workers()
    assert set(controller.workers) == {"http://a", "http://manual"}
    assert not controller.receive_heart_beat("http://b", 0)  # tells b to register again


def test_openai_messages_render_in_the_model_template():
    messages = [
        {"role": "system", "content": "Be brief."},
        {
            "role": "user",
            "content": [
                {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAA"}},
                {"type": "text", "text": "What is it?"},
            ],
        },
        {"role": "assistant", "content": "A square."},
        {
            "role": "user",
            "content": [{"type": "text", "text": "And "}, {"type": "image_url", "image_url": "https://x/y.png"}],
        },
    ]
    prompt, images = render_prompt(messages, "llava_v1")
    assert prompt == "Be brief. USER: <image>\nWhat is it? ASSISTANT: A square.</s>USER: And <image>\n ASSISTANT:"
    assert images == ["data:image/png;base64,AAA", "https://x/y.png"]
    # the same rendering as the engine's one-turn prompt for [image, text]
    one, _ = render_prompt([messages[1]], "llava_v1")
    assert one.endswith("USER: <image>\nWhat is it? ASSISTANT:")


@pytest.mark.parametrize(
    "body, message",
    [
        ({"messages": [{"role": "user", "content": "hi"}]}, "`model` is required"),
        ({"model": "m", "messages": []}, "`messages` must be a non-empty list"),
        ({"model": "m", "messages": [{"role": "robot", "content": "hi"}]}, "role` must be one of"),
        ({"model": "m", "messages": [{"role": "user", "content": "hi"}], "temperature": -1}, "`temperature`"),
        ({"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}, "`max_tokens`"),
        ({"model": "m", "messages": [{"role": "user", "content": "hi"}], "top_p": 2}, "`top_p`"),
        ({"model": "m", "messages": [{"role": "user", "content": "hi"}], "n": 3}, "`n`=1"),
        ({"model": "m", "messages": [{"role": "user", "content": "hi"}], "stop": [1]}, "`stop`"),
        ({"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": "yes"}, "`stream`"),
    ],
)
def test_openai_request_errors(body, message):
    with pytest.raises(ApiError, match=message) as info:
        parse_chat_request(body)
    assert info.value.status == 400 and info.value.body()["error"]["type"] == "invalid_request_error"


@pytest.mark.parametrize(
    "messages, message",
    [
        ([{"role": "assistant", "content": "hi"}], "start and end with a user message"),
        ([{"role": "user", "content": "see <image>"}], "send images as image_url parts"),
        ([{"role": "user", "content": [{"type": "audio"}]}], "must be {type: text"),
        ([{"role": "user", "content": "a"}, {"role": "system", "content": "b"}], "system messages must come first"),
        ([{"role": "user", "content": 5}], "must be a string or a list"),
    ],
)
def test_openai_message_errors(messages, message):
    with pytest.raises(ApiError, match=message):
        render_prompt(messages, "llava_v1")


def test_stream_chunks_round_trip():
    stream = encode_chunk("a", 0) + encode_chunk("ab", 0, finish_reason="stop")
    pieces = [stream[i : i + 5] for i in range(0, len(stream), 5)]  # chunk borders fall anywhere
    chunks = list(iter_chunks(pieces))
    assert [c["text"] for c in chunks] == ["a", "ab"] and chunks[-1]["finish_reason"] == "stop"
    assert list(iter_chunks([b'{"text": "x", "error_code": 1}']))[0]["error_code"] == 1  # a 4xx body, no NUL
    assert list(iter_chunks([b"garbage\0"]))[0]["error_code"] == ErrorCode.SERVER_ERROR
