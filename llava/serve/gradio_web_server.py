"""The Gradio web UI: chat with any model the controller serves, with an image, streamed answers, votes and logs.

    python -m llava.serve.gradio_web_server --controller http://localhost:10000 --model-list-mode reload

Every model registered with the controller appears in the model list (`once`: read at start; `reload`: read on each
page load), so several models and several workers per model are served side by side from one page. Each finished
answer, vote and flag is appended as one JSON line to `<log-dir>/<date>-conv.json`; uploaded images are saved once,
by content hash, under `<log-dir>/serve_images/<date>/`. When a request fails, the chat shows why (no worker for the
model, worker not responding, out of memory, image rejected, prompt too long) rather than a generic message.
"""

import argparse
import base64
import datetime
import hashlib
import json
import logging
import os
import threading
import time

from llava.constants import LOGDIR
from llava.conversation import IMAGE_PROCESS_MODES, Conversation, get_conv_template
from llava.mm_utils import ImageLimits, ImageLoadError, _describe, load_images
from llava.serve.client import CALL_ERRORS, ClusterClient, NoWorker, cluster_key_from
from llava.serve.protocol import explain, template_from_model_name
from llava.serve.server_utils import (
    DEFAULT_HOST,
    add_cluster_args,
    add_image_limit_args,
    image_limits_from,
    require,
    setup_logging,
)

require("gradio", extra="serve")

import gradio as gr  # noqa: E402
import httpx  # noqa: E402

logger = logging.getLogger("llava.serve.gradio_web_server")

DEFAULT_TEMPLATE = "llava_v1"  # shown until the first answer; replaced by the model's own template then
MAX_INPUT_CHARS = 1536
CURSOR = "▌"
NO_MODEL = "No model is available: start a model worker and reload the page."

TITLE_MD = """
# LLaVA: Large Language and Vision Assistant
Pick a model, upload an image (optional), ask a question. Answers are streamed; rate them with the buttons below.
"""

TOS_MD = """
### Terms of use
This is a research preview. The service may produce offensive or wrong content. Conversations (text and images)
are logged to improve the service.
"""


class WebServer:
    """State shared by all browser sessions: where the controller is, where logs go."""

    def __init__(
        self,
        controller_url: str,
        log_dir: str,
        model_list_mode: str = "once",
        request_timeout: float = 120.0,
        max_new_tokens_limit: int = 1536,
        cluster_key: str | None = None,
        image_limits: ImageLimits | None = None,
    ):
        if model_list_mode not in ("once", "reload"):
            raise ValueError(f"Unknown --model-list-mode `{model_list_mode}`; use `once` or `reload`.")
        self.controller_url = controller_url.rstrip("/")
        self.log_dir = log_dir
        self.model_list_mode = model_list_mode
        self.request_timeout = request_timeout
        self.max_new_tokens_limit = max_new_tokens_limit
        self.cluster_key = cluster_key  # sent to the controller and workers
        self.client = ClusterClient(self.controller_url, cluster_key)
        self.image_limits = image_limits or ImageLimits()  # checked on each upload before it is decoded
        self._log_lock = threading.Lock()
        self.models = self.get_model_list() if model_list_mode == "once" else []

    # -- controller --------------------------------------------------------------------------------------------
    def get_model_list(self) -> list[str]:
        try:
            return self.client.list_models(refresh=True)
        except CALL_ERRORS as err:
            logger.warning("Cannot list models from the controller at %s: %s", self.controller_url, err)
            return []

    def worker_for(self, model: str) -> str:
        """The address of a worker for `model`; raises `UserFacingError` with the reason when there is none."""
        try:
            return self.client.get_worker_address(model)
        except NoWorker as err:
            raise UserFacingError(err.message) from err
        except CALL_ERRORS as err:
            raise UserFacingError(
                f"The controller at {self.controller_url} is not responding ({type(err).__name__}). "
                "Ask the administrator to check it."
            ) from err

    def model_template(self, address: str, model: str = "") -> str:
        """The worker's own chat template (our `/model_details`); for a worker that lacks that endpoint (the
        original's, SGLang's), the template the original web UI would pick from the model name."""
        try:
            details = self.client.model_details(address)
        except CALL_ERRORS as err:
            if isinstance(err, httpx.TransportError):
                self.client.report_unreachable(address)
            raise UserFacingError(
                f"The model worker at {address} is not responding ({type(err).__name__}); it may have stopped. "
                "Try again in a few seconds or pick another model."
            ) from err
        if details is None:  # an original-protocol worker
            template = template_from_model_name(model)
            logger.info("Worker %s has no /model_details; template `%s` from its name", address, template)
            return template
        return details.get("conv_mode") or DEFAULT_TEMPLATE

    # -- logs --------------------------------------------------------------------------------------------------
    def _today(self) -> str:
        return datetime.date.today().isoformat()

    def conv_log_file(self) -> str:
        return os.path.join(self.log_dir, f"{self._today()}-conv.json")

    def save_images(self, conv: Conversation) -> list[str]:
        """Save the conversation's images (PNG, named by content hash) and return their paths."""
        folder = os.path.join(self.log_dir, "serve_images", self._today())
        paths = []
        for b64 in conv.get_images(return_pil=False):
            data = base64.b64decode(b64)
            path = os.path.join(folder, hashlib.md5(data).hexdigest() + ".png")
            if not os.path.isfile(path):
                os.makedirs(folder, exist_ok=True)
                with open(path, "wb") as f:
                    f.write(data)
            paths.append(path)
        return paths

    def log(self, record: dict) -> None:
        os.makedirs(self.log_dir, exist_ok=True)
        with self._log_lock, open(self.conv_log_file(), "a") as f:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")


def uploaded_image(**kwargs) -> gr.Image:
    """An image input that hands over the uploaded file's path without opening it: gradio's own preprocessing would
    open it with PIL and show PIL's raw error (with the temporary path) for a bomb or a non-image; `add_text`
    checks it against the server's limits instead. The override is set on the instance, not in a subclass: gradio
    treats a subclass as a custom component whose front end the page cannot find (it never finishes loading)."""
    box = gr.Image(**kwargs)
    plain = box.preprocess

    def preprocess(payload):
        if payload is not None and payload.path and not (payload.url or "").startswith("data:"):
            return payload.path
        return plain(payload)

    box.preprocess = preprocess
    return box


class UserFacingError(Exception):
    """A failure whose message is shown in the chat."""


def new_conversation() -> Conversation:
    return get_conv_template(DEFAULT_TEMPLATE)


def _ip(request: gr.Request | None) -> str | None:
    return getattr(getattr(request, "client", None), "host", None)


def _buttons(interactive: bool):
    return (gr.update(interactive=interactive),) * 5  # upvote, downvote, flag, regenerate, clear


def _last_reply(conv: Conversation):
    return conv.messages[-1][1] if conv.messages else None


def build_demo(server: WebServer, embed: bool = False, upload_max_age: int | None = 3600) -> gr.Blocks:
    def load_demo(request: gr.Request):
        models = server.get_model_list() if server.model_list_mode == "reload" else server.models
        value = models[0] if models else None
        return new_conversation(), gr.update(choices=models, value=value, visible=True)

    def vote(kind: str):
        def handler(state: Conversation, model: str, request: gr.Request):
            server.log(
                {
                    "tstamp": round(time.time(), 4),
                    "type": kind,
                    "model": model,
                    "state": state.dict(),
                    "ip": _ip(request),
                }
            )
            return ("",) + (gr.update(interactive=False),) * 3

        return handler

    def regenerate(state: Conversation, image_process_mode: str):
        if len(state.messages) < state.offset + 2:
            state.skip_next = True
            return (state, state.to_gradio_chatbot(), "", None) + _buttons(False)
        state.messages[-1][1] = None
        user = state.messages[-2][1]
        if isinstance(user, tuple):  # apply the mode chosen now
            state.messages[-2][1] = (user[0], user[1], image_process_mode)
        state.skip_next = False
        return (state, state.to_gradio_chatbot(), "", None) + _buttons(False)

    def clear_history():
        state = new_conversation()
        return (state, state.to_gradio_chatbot(), "", None) + _buttons(False)

    def add_text(state: Conversation, text: str, image, image_process_mode: str):
        text = (text or "").strip()
        if not text and image is None:
            state.skip_next = True
            return (state, state.to_gradio_chatbot(), "", None) + _buttons(False)
        text = text[:MAX_INPUT_CHARS]
        if image is not None:
            try:  # the server's image limits, checked from the header before the pixels are decoded
                image = load_images([image], server.image_limits, allow_paths=True)[0]
            except ImageLoadError as err:  # a plain message, without the temporary file's path
                notice = str(err).replace(_describe(image), "The uploaded image").replace("Image 1 of 1 was", "It was")
                state.skip_next = True
                chat = state.to_gradio_chatbot() + [{"role": "assistant", "content": f"⚠️ {notice}"}]
                return (state, chat, text, None) + _buttons(False)
            if state.get_images(return_pil=True):  # one image per conversation: a new image starts a new one
                state = new_conversation()
            message = (text, image, image_process_mode)
        else:
            message = text
        state.append_message(state.roles[0], message)
        state.append_message(state.roles[1], None)
        state.skip_next = False
        return (state, state.to_gradio_chatbot(), "", None) + _buttons(False)

    def http_bot(state: Conversation, model: str, temperature, top_p, max_new_tokens, request: gr.Request):
        start = time.time()
        if state.skip_next:  # nothing was sent (empty input or a refused image): keep the chat as add_text left it
            yield (state, gr.skip()) + _buttons(len(state.messages) > state.offset)
            return
        error = None
        try:
            if not model:
                raise UserFacingError(NO_MODEL)
            address = server.worker_for(model)
            if len(state.messages) == state.offset + 2:  # first turn: switch to the model's own template
                fresh = get_conv_template(server.model_template(address, model))
                for i, (_, message) in enumerate(state.messages[state.offset :]):
                    fresh.append_message(fresh.roles[i % 2], message)
                state = fresh
            payload = {
                "model": model,
                "prompt": state.get_prompt(),
                "images": state.get_images(return_pil=False),
                "temperature": float(temperature),
                "top_p": float(top_p),
                "max_new_tokens": min(int(max_new_tokens), server.max_new_tokens_limit),
                "stop": state.sep if state.sep_style.name in ("SINGLE", "MPT") else state.sep2,  # as the original UI
            }
            state.messages[-1][1] = CURSOR
            yield (state, state.to_gradio_chatbot()) + _buttons(False)
            for output in stream_reply(server, address, model, payload):
                state.messages[-1][1] = output + CURSOR
                yield (state, state.to_gradio_chatbot()) + _buttons(False)
            state.messages[-1][1] = (_last_reply(state) or CURSOR)[: -len(CURSOR)]
        except UserFacingError as err:
            error = str(err)
            state.messages[-1][1] = f"⚠️ {error}"
        yield (state, state.to_gradio_chatbot()) + _buttons(True)
        images = server.save_images(state)
        record = {
            "tstamp": round(time.time(), 4),
            "type": "chat",
            "model": model,
            "start": round(start, 4),
            "finish": round(time.time(), 4),
            "state": state.dict(),
            "images": images,
            "ip": _ip(request),
        }
        if error:
            record["error"] = error
        server.log(record)

    # uploads live in gradio's cache: delete those older than `upload_max_age` s periodically, and all at shutdown
    delete_cache = None if upload_max_age is None else (max(1, min(60, upload_max_age // 4 or 1)), upload_max_age)
    with gr.Blocks(title="LLaVA", delete_cache=delete_cache) as demo:
        state = gr.State(new_conversation())
        if not embed:
            gr.Markdown(TITLE_MD)
        with gr.Row():
            with gr.Column(scale=3):
                model_selector = gr.Dropdown(
                    choices=server.models,
                    value=server.models[0] if server.models else None,
                    label="Model",
                    interactive=True,
                    elem_id="model_selector",
                )
                # a file path, not a PIL image: gradio must not decode an upload before our limits see its header
                imagebox = uploaded_image(type="filepath", image_mode=None, label="Image", elem_id="imagebox")
                image_process_mode = gr.Radio(
                    list(IMAGE_PROCESS_MODES),
                    value="Default",
                    label="Preprocess for non-square image",
                    elem_id="image_process_mode",
                )
                with gr.Accordion("Parameters", open=False, elem_id="parameters"):
                    temperature = gr.Slider(0.0, 1.0, value=0.2, step=0.1, label="Temperature", elem_id="temperature")
                    top_p = gr.Slider(0.1, 1.0, value=0.7, step=0.1, label="Top P", elem_id="top_p")
                    max_output_tokens = gr.Slider(
                        1,
                        server.max_new_tokens_limit,
                        value=512,
                        step=1,
                        label="Max output tokens",
                        elem_id="max_output_tokens",
                    )
            with gr.Column(scale=8):
                chatbot = gr.Chatbot(label="LLaVA Chatbot", height=550, elem_id="chatbot", feedback_options=None)
                with gr.Row():
                    textbox = gr.Textbox(
                        show_label=False, placeholder="Enter text and press ENTER", scale=8, elem_id="textbox"
                    )
                    submit_btn = gr.Button("Send", variant="primary", scale=1, elem_id="send_btn")
                with gr.Row():
                    upvote_btn = gr.Button("👍  Upvote", interactive=False, elem_id="upvote_btn")
                    downvote_btn = gr.Button("👎  Downvote", interactive=False, elem_id="downvote_btn")
                    flag_btn = gr.Button("⚠️  Flag", interactive=False, elem_id="flag_btn")
                    regenerate_btn = gr.Button("🔄  Regenerate", interactive=False, elem_id="regenerate_btn")
                    clear_btn = gr.Button("🗑️  Clear", interactive=False, elem_id="clear_btn")
        if not embed:
            gr.Markdown(TOS_MD)

        buttons = [upvote_btn, downvote_btn, flag_btn, regenerate_btn, clear_btn]
        bot_inputs = [state, model_selector, temperature, top_p, max_output_tokens]
        bot_outputs = [state, chatbot] + buttons
        edit_outputs = [state, chatbot, textbox, imagebox] + buttons
        vote_outputs = [textbox, upvote_btn, downvote_btn, flag_btn]

        upvote_btn.click(vote("upvote"), [state, model_selector], vote_outputs)
        downvote_btn.click(vote("downvote"), [state, model_selector], vote_outputs)
        flag_btn.click(vote("flag"), [state, model_selector], vote_outputs)
        regenerate_btn.click(regenerate, [state, image_process_mode], edit_outputs).then(
            http_bot, bot_inputs, bot_outputs
        )
        clear_btn.click(clear_history, None, edit_outputs)
        for trigger in (textbox.submit, submit_btn.click):
            trigger(add_text, [state, textbox, imagebox, image_process_mode], edit_outputs).then(
                http_bot, bot_inputs, bot_outputs
            )
        demo.load(load_demo, None, [state, model_selector])
    return demo


def stream_reply(server: WebServer, address: str, model: str, payload: dict):
    """Yield the growing reply from a worker; raise `UserFacingError` with the worker's reason on failure."""
    prompt = payload["prompt"]
    started = False
    try:
        for data in server.client.generate_stream(address, payload, httpx.Timeout(10.0, read=server.request_timeout)):
            started = True
            code = data.get("error_code", 0)
            if code:
                raise UserFacingError(explain(code, data.get("text", "")))
            yield data["text"][len(prompt) :].strip()
    except httpx.HTTPError as err:
        server.client.report_unreachable(address)
        if started:
            raise UserFacingError(
                f"The connection to the worker for `{model}` broke mid-answer ({type(err).__name__}); try again."
            ) from err
        raise UserFacingError(
            f"The model worker for `{model}` at {address} is not responding ({type(err).__name__}); it may have "
            "stopped. Try again in a few seconds or pick another model."
        ) from err


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default=DEFAULT_HOST, help="Interface to listen on; 0.0.0.0 exposes the UI.")
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument("--controller-url", "--controller", dest="controller_url", default="http://localhost:21001")
    parser.add_argument("--concurrency-count", type=int, default=16, help="Answers streamed at once.")
    parser.add_argument("--model-list-mode", choices=["once", "reload"], default="once")
    parser.add_argument("--share", action="store_true", help="Create a public gradio.live link (needs internet).")
    parser.add_argument("--embed", action="store_true", help="Hide the title and terms (for embedding).")
    parser.add_argument("--log-dir", default=os.environ.get("LLAVA_LOG_DIR", LOGDIR))
    parser.add_argument("--request-timeout", type=float, default=120.0, help="Seconds to wait for a worker.")
    parser.add_argument("--max-file-size", default="20mb", help="Largest upload the page accepts.")
    parser.add_argument(
        "--upload-max-age",
        type=int,
        default=3600,
        help="Seconds an uploaded file is kept; older uploads are deleted (checked every min(60, age/4) s, "
        "and all at shutdown).",
    )
    add_cluster_args(parser)
    add_image_limit_args(parser, urls=False)
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    setup_logging("llava.serve.gradio_web_server")
    server = WebServer(
        args.controller_url,
        args.log_dir,
        args.model_list_mode,
        args.request_timeout,
        cluster_key=cluster_key_from(args.cluster_key),
        image_limits=image_limits_from(args),
    )
    logger.info("Web UI for %s; models: %s; logs in %s", args.controller_url, server.models, args.log_dir)
    demo = build_demo(server, embed=args.embed, upload_max_age=args.upload_max_age)
    demo.queue(default_concurrency_limit=args.concurrency_count, api_open=False)
    demo.launch(
        server_name=args.host,
        server_port=args.port,
        share=args.share,
        max_file_size=args.max_file_size,
        show_error=True,
    )


if __name__ == "__main__":
    main()
