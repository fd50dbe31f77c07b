"""The one generation path: prompt + images -> text, batched or streamed. The CLI, the worker, eval and the demo
all call it; it knows nothing of HTTP.

    engine = LlavaEngine.from_pretrained("liuhaotian/llava-v1.5-7b", device="auto")
    prompt = engine.build_prompt("What is in the picture?", n_images=1)
    text = engine.generate([prompt], [[image]], GenerationParams(temperature=0))[0]
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
from PIL import Image

from llava.constants import DEFAULT_IM_END_TOKEN, DEFAULT_IM_START_TOKEN, DEFAULT_IMAGE_TOKEN, IMAGE_TOKEN_INDEX
from llava.conversation import get_conv_template
from llava.mm_utils import KeywordsStoppingCriteria, process_images, tokenizer_image_token

logger = logging.getLogger(__name__)


class RequestError(ValueError):
    """A request the model cannot serve as given (bad parameters, image count, prompt too long)."""


class PromptTooLongError(RequestError):
    """The prompt, after image features are spliced in, leaves no room to generate within the context."""


@dataclass
class GenerationParams:
    """Sampling settings; `temperature == 0` means greedy decoding (as in the original worker)."""

    temperature: float = 0.2
    top_p: float = 1.0
    num_beams: int = 1
    max_new_tokens: int = 512
    stop: list[str] = field(default_factory=list)

    def __post_init__(self):
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = [s for s in (self.stop or []) if s]
        checks = [
            ("temperature", isinstance(self.temperature, (int, float)) and 0 <= self.temperature <= 10, "0..10"),
            ("top_p", isinstance(self.top_p, (int, float)) and 0 < self.top_p <= 1, "(0, 1]"),
            ("num_beams", isinstance(self.num_beams, int) and 1 <= self.num_beams <= 16, "1..16"),
            (
                "max_new_tokens",
                isinstance(self.max_new_tokens, int) and 1 <= self.max_new_tokens <= 1 << 16,
                "1..65536",
            ),
            (
                "stop",
                len(self.stop) <= 16 and all(isinstance(s, str) and len(s) <= 256 for s in self.stop),
                "<= 16 strings",
            ),
        ]
        bad = [f"`{name}`={getattr(self, name)!r} (allowed: {allowed})" for name, ok, allowed in checks if not ok]
        if bad:
            raise RequestError("Invalid generation parameters: " + "; ".join(bad) + ".")

    @property
    def greedy(self) -> bool:
        return self.temperature <= 1e-5

    def generate_kwargs(self) -> dict:
        if self.greedy:
            return {"do_sample": False, "num_beams": self.num_beams}
        return {"do_sample": True, "temperature": self.temperature, "top_p": self.top_p, "num_beams": self.num_beams}

    def batch_key(self) -> tuple:
        """Requests with equal keys can share one `generate` call."""
        return (self.greedy, self.temperature if not self.greedy else 0.0, self.top_p, self.num_beams)


@dataclass
class EncodedRequest:
    input_ids: list[int]
    images: list[Image.Image]
    n_tokens: int  # after image features are spliced in


class LlavaEngine:
    """A loaded model with its tokenizer, image processor and chat template."""

    def __init__(self, tokenizer, model, image_processor, context_len: int, conv_mode: str):
        self.tokenizer = tokenizer
        self.model = model
        self.image_processor = image_processor
        self.context_len = context_len
        self.conv_mode = conv_mode
        self._lock = threading.Lock()

    @classmethod
    def from_pretrained(
        cls,
        model_path: str,
        model_base: str | None = None,
        *,
        conv_mode: str | None = None,
        model_name: str | None = None,
        load_8bit: bool = False,
        load_4bit: bool = False,
        device: str = "auto",
        device_map="auto",
        use_flash_attn: bool = False,
        vision_tower: str | None = None,
    ) -> LlavaEngine:
        from llava.model.builder import get_conv_mode, load_pretrained_model

        tokenizer, model, image_processor, context_len = load_pretrained_model(
            model_path,
            model_base,
            model_name,
            load_8bit=load_8bit,
            load_4bit=load_4bit,
            device_map=device_map,
            device=device,
            use_flash_attn=use_flash_attn,
            vision_tower=vision_tower,
        )
        return cls(tokenizer, model, image_processor, context_len, get_conv_mode(model.config, model_path, conv_mode))

    # -- prompts ---------------------------------------------------------------------------------------------------
    @property
    def config(self):
        return self.model.config

    @property
    def device(self) -> torch.device:
        return self.model.get_input_embeddings().weight.device

    def image_token_text(self) -> str:
        if getattr(self.config, "mm_use_im_start_end", False):
            return DEFAULT_IM_START_TOKEN + DEFAULT_IMAGE_TOKEN + DEFAULT_IM_END_TOKEN
        return DEFAULT_IMAGE_TOKEN

    def with_image_markers(self, question: str, n_images: int) -> str:
        """`question` with one image marker per image: prepended as in the original when it has none."""
        if n_images and DEFAULT_IMAGE_TOKEN not in question:
            question = (DEFAULT_IMAGE_TOKEN + "\n") * n_images + question
        if getattr(self.config, "mm_use_im_start_end", False):
            question = question.replace(DEFAULT_IMAGE_TOKEN, self.image_token_text())
        return question

    def build_prompt(self, question: str, n_images: int = 0, conv_mode: str | None = None) -> str:
        """A one-turn prompt in the model's chat template, ready for the assistant's reply."""
        conv = get_conv_template(conv_mode or self.conv_mode)
        conv.append_message(conv.roles[0], self.with_image_markers(question, n_images))
        conv.append_message(conv.roles[1], None)
        return conv.get_prompt()

    def stop_strings(self, params: GenerationParams, conv_mode: str | None = None) -> list[str]:
        conv_stop = get_conv_template(conv_mode or self.conv_mode).stop_str
        stops = list(params.stop)
        if conv_stop and conv_stop not in stops and conv_stop != "\n":
            stops.append(conv_stop)
        return stops

    # -- encoding --------------------------------------------------------------------------------------------------
    def count_image_tokens(self, images: Sequence[Image.Image]) -> int:
        if not images:
            return 0
        return sum(self.model.num_image_tokens(im.size) for im in images)

    def encode(self, prompt: str, images: Sequence[Image.Image], max_new_tokens: int = 0) -> EncodedRequest:
        """Tokenize and check a request before it reaches the model: image count and context length."""
        ids = tokenizer_image_token(prompt, self.tokenizer)
        n_markers = sum(1 for t in ids if t == IMAGE_TOKEN_INDEX)
        if n_markers != len(images):
            raise RequestError(
                f"The prompt has {n_markers} `<image>` marker(s) but {len(images)} image(s) were sent; "
                "send one image per `<image>`."
            )
        if images and self.model.get_vision_tower() is None:
            raise RequestError("This model has no vision tower; send text only.")
        n_tokens = len(ids) - n_markers + self.count_image_tokens(images)
        if n_tokens + max_new_tokens > self.context_len:
            raise PromptTooLongError(
                f"The prompt is {n_tokens} tokens after image expansion; with max_new_tokens={max_new_tokens} that "
                f"exceeds the model's context of {self.context_len}. Shorten the prompt or lower max_new_tokens."
            )
        return EncodedRequest(ids, list(images), n_tokens)

    def _batch_tensors(self, requests: Sequence[EncodedRequest]):
        pad_id = self.tokenizer.pad_token_id
        if pad_id is None:
            pad_id = self.tokenizer.eos_token_id or 0
        width = max(len(r.input_ids) for r in requests)
        ids = torch.full((len(requests), width), pad_id, dtype=torch.long)
        mask = torch.zeros(len(requests), width, dtype=torch.long)
        for i, r in enumerate(requests):  # left padding: every row ends where generation starts
            ids[i, width - len(r.input_ids) :] = torch.tensor(r.input_ids, dtype=torch.long)
            mask[i, width - len(r.input_ids) :] = 1
        all_images = [im for r in requests for im in r.images]
        images, sizes = None, None
        if all_images:
            pixel = process_images(all_images, self.image_processor, self.config)
            dtype = self.model.get_vision_tower().dtype
            if isinstance(pixel, torch.Tensor):
                images = pixel.to(self.device, dtype=dtype)
            else:
                images = [p.to(self.device, dtype=dtype) for p in pixel]
            sizes = [im.size for im in all_images]
        return ids.to(self.device), mask.to(self.device), images, sizes

    def _generate_kwargs(self, requests, params: GenerationParams, ids, stops) -> dict:
        kwargs = params.generate_kwargs()
        longest = max(r.n_tokens for r in requests)
        kwargs["max_new_tokens"] = max(1, min(params.max_new_tokens, self.context_len - longest))
        kwargs["pad_token_id"] = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        kwargs["use_cache"] = True
        if stops:
            # The prompt is given as embeddings, so generated ids start at position 0.
            kwargs["stopping_criteria"] = [KeywordsStoppingCriteria(stops, self.tokenizer, ids[:, :0])]
        return kwargs

    # -- generation ------------------------------------------------------------------------------------------------
    def generate(
        self,
        prompts: Sequence[str],
        images: Sequence[Sequence[Image.Image]] | None = None,
        params: GenerationParams | None = None,
        conv_mode: str | None = None,
    ) -> list[str]:
        """Generate for several prompts in one batched forward pass; returns the text after each prompt."""
        params = params or GenerationParams()
        images = images if images is not None else [[] for _ in prompts]
        requests = [self.encode(p, ims, 0) for p, ims in zip(prompts, images)]
        return self.generate_encoded(requests, params, conv_mode)

    def generate_encoded(
        self, requests: Sequence[EncodedRequest], params: GenerationParams, conv_mode: str | None = None
    ) -> list[str]:
        stops = self.stop_strings(params, conv_mode)
        ids, mask, pixel, sizes = self._batch_tensors(requests)
        kwargs = self._generate_kwargs(requests, params, ids, stops)
        with torch.inference_mode():
            out = self.model.generate(ids, attention_mask=mask, images=pixel, image_sizes=sizes, **kwargs)
        texts = self.tokenizer.batch_decode(out, skip_special_tokens=True)
        return [cut_at_stop(t, stops).strip() for t in texts]

    def stream(
        self,
        prompt: str,
        images: Sequence[Image.Image] = (),
        params: GenerationParams | None = None,
        conv_mode: str | None = None,
    ) -> Iterator[str]:
        """Yield the generated text so far, growing, until a stop string or the token limit."""
        params = params or GenerationParams()
        request = self.encode(prompt, images, 0)
        stops = self.stop_strings(params, conv_mode)
        ids, mask, pixel, sizes = self._batch_tensors([request])
        kwargs = self._generate_kwargs([request], params, ids, stops)
        streamer = _TokenStreamer()
        errors: list[BaseException] = []

        def run():
            try:
                with torch.inference_mode():
                    self.model.generate(
                        ids, attention_mask=mask, images=pixel, image_sizes=sizes, streamer=streamer, **kwargs
                    )
            except BaseException as err:  # re-raised in the consumer's thread below
                errors.append(err)
                streamer.end()

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        tokens: list[int] = []
        sent, final = "", ""
        for new in streamer:
            tokens += new
            # Decode the whole reply each time, so byte-fallback pieces and merges come out as `generate` gives them.
            decoded = self.tokenizer.decode(tokens, skip_special_tokens=True)
            final = cut_at_stop(decoded, stops)
            stopped = len(final) < len(decoded)
            # Hold back a half-decoded character, and text that a later byte would rewrite.
            if not final.endswith("\ufffd") and final.startswith(sent) and final != sent:
                sent = final
                yield sent
            if stopped:
                break
        if final != sent:
            yield final
        thread.join()
        if errors:
            raise errors[0]


class _TokenStreamer:
    """A `generate` streamer that hands each step's new token ids to the consuming thread."""

    _END = object()

    def __init__(self, timeout: float = 600.0):
        import queue

        self.queue: queue.Queue = queue.Queue()
        self.timeout = timeout

    def put(self, value: torch.Tensor) -> None:
        ids = value.flatten().tolist()  # batch of one; the first call carries the (empty) prompt ids
        if ids:
            self.queue.put(ids)

    def end(self) -> None:
        self.queue.put(self._END)

    def __iter__(self):
        while (item := self.queue.get(timeout=self.timeout)) is not self._END:
            yield item


def cut_at_stop(text: str, stops: Sequence[str]) -> str:
    """`text` up to the first stop string (the stop string itself removed)."""
    cut = len(text)
    for s in stops:
        pos = text.find(s)
        if pos != -1:
            cut = min(cut, pos)
    return text[:cut]
