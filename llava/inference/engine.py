"""The one generation path: prompt + images -> text, batched or streamed. The CLI, the worker, eval and the demo
all call it; it knows nothing of HTTP.

    engine = LlavaEngine.from_pretrained("liuhaotian/llava-v1.5-7b", device="auto")
    prompt = engine.build_prompt("What is in the picture?", n_images=1)
    text = engine.generate([prompt], [[image]], GenerationParams(temperature=0))[0]
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Iterator, Sequence

import torch
from PIL import Image
from transformers import StoppingCriteria

from llava.constants import IMAGE_TOKEN_INDEX
from llava.conversation import get_conv_template
from llava.inference.decoder import BatchDecoder, eos_ids
from llava.inference.params import EncodedRequest, GenerationParams, PromptTooLongError, RequestError
from llava.inference.prefix_cache import PrefixKVCache
from llava.inference.text_stream import Detokenizer, cut_at_stop
from llava.mm_utils import KeywordsStoppingCriteria, process_images, tokenizer_image_token
from llava.prompting import image_marker_text, place_image_markers

logger = logging.getLogger(__name__)


class LlavaEngine:
    """A loaded model with its tokenizer, image processor and chat template."""

    def __init__(self, tokenizer, model, image_processor, context_len: int, conv_mode: str):
        self.tokenizer = tokenizer
        self.model = model
        self.image_processor = image_processor
        self.context_len = context_len
        self.conv_mode = conv_mode
        self._lock = threading.Lock()
        self.prefix_cache: PrefixKVCache | None = None
        self.detokenizer = Detokenizer(tokenizer)

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

    def enable_image_feature_cache(self, max_bytes: int = 256 << 20):
        """Keep the projected features of recently seen images (up to `max_bytes`), so a repeated image is not
        encoded again; 0 turns the cache off. Returns the cache (or None)."""
        from llava.model.feature_cache import ImageFeatureCache

        if not hasattr(self.model, "image_features"):  # a text-only decoder
            return None
        self.model.image_feature_cache = ImageFeatureCache(max_bytes) if max_bytes > 0 else None
        return self.model.image_feature_cache

    def enable_prefix_cache(self, max_bytes: int = 256 << 20) -> PrefixKVCache | None:
        """Keep the decoder's keys and values of recent prompt prefixes that end with an image (up to `max_bytes`),
        so `BatchDecoder` prefills only the question when an image is asked about again; 0 turns it off."""
        self.prefix_cache = PrefixKVCache(self.model, max_bytes) if max_bytes > 0 else None
        return self.prefix_cache

    @property
    def device(self) -> torch.device:
        return self.model.get_input_embeddings().weight.device

    def image_token_text(self, conv_mode: str | None = None) -> str:
        """The text that stands for one image in this model's prompts (see `llava.prompting.image_marker_text`)."""
        conv = get_conv_template(conv_mode or self.conv_mode)
        return image_marker_text(
            mmtag=conv.mmtag, mm_use_im_start_end=bool(getattr(self.config, "mm_use_im_start_end", False))
        )

    def with_image_markers(
        self, question: str, n_images: int, conv_mode: str | None = None, wrap_mmtag: bool = True
    ) -> str:
        """`question` with one image marker per image, placed and wrapped by `llava.prompting.place_image_markers`
        (`wrap_mmtag=False`: the bare marker the original's CLI and eval scripts sent in `*_mmtag` templates)."""
        return place_image_markers(
            question,
            n_images,
            template=get_conv_template(conv_mode or self.conv_mode),
            mm_use_im_start_end=bool(getattr(self.config, "mm_use_im_start_end", False)),
            wrap_mmtag=wrap_mmtag,
        )

    def build_prompt(
        self, question: str, n_images: int = 0, conv_mode: str | None = None, wrap_mmtag: bool = True
    ) -> str:
        """A one-turn prompt in the model's chat template, ready for the assistant's reply."""
        conv = get_conv_template(conv_mode or self.conv_mode)
        conv.append_message(conv.roles[0], self.with_image_markers(question, n_images, conv_mode, wrap_mmtag))
        conv.append_message(conv.roles[1], None)
        return conv.get_prompt()

    def stop_strings(self, params: GenerationParams, conv_mode: str | None = None) -> list[str]:
        """`params`' stop strings plus the chat template's (`GenerationParams.stop_strings`)."""
        return params.stop_strings(get_conv_template(conv_mode or self.conv_mode).stop_str)

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
        yield from self.stream_encoded(self.encode(prompt, images, 0), params, conv_mode)

    def stream_encoded(
        self,
        request: EncodedRequest,
        params: GenerationParams,
        conv_mode: str | None = None,
        usage: dict | None = None,
    ) -> Iterator[str]:
        """`stream` for an encoded request: one HF `generate` call in a thread. When the caller stops iterating,
        generation stops at the next token. `usage`, if given, receives `completion_tokens` and `finish_reason`."""
        stops = self.stop_strings(params, conv_mode)
        ids, mask, pixel, sizes = self._batch_tensors([request])
        kwargs = self._generate_kwargs([request], params, ids, stops)
        cancelled = threading.Event()
        kwargs["stopping_criteria"] = [*kwargs.get("stopping_criteria", []), _CancelledCriteria(cancelled)]
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
        text = self.detokenizer.stream(stops)
        sent = ""
        try:
            for new in streamer:
                text.extend(new)
                if text.stopped:
                    break
                if len(text.stable_text) > len(sent):  # only what later tokens cannot change
                    sent = text.stable_text
                    yield sent
            final = text.finish()
            if final != sent:
                yield final
        finally:
            cancelled.set()  # a consumer that went away (or a stop string) ends `generate` at its next step
            thread.join()
        if errors:
            raise errors[0]
        if usage is not None:
            stopped = text.stopped or bool(text.ids and text.ids[-1] in eos_ids(self.model.generation_config))
            usage.update(completion_tokens=len(text.ids), finish_reason="stop" if stopped else "length")

    @property
    def byte_token_ids(self) -> frozenset[int]:
        """Ids of SentencePiece byte-fallback tokens (`<0x0A>` ...), whose runs decode as one group."""
        return self.detokenizer.byte_token_ids

    @property
    def special_token_ids(self) -> frozenset[int]:
        """Ids that decoding with `skip_special_tokens=True` drops."""
        return self.detokenizer.special_token_ids

    def decoder(self, params: GenerationParams, conv_mode: str | None = None) -> BatchDecoder:
        """A step-wise batched decoder for requests sharing `params.batch_key()` (see `BatchDecoder`)."""
        return BatchDecoder(
            self.model,
            params,
            detokenizer=self.detokenizer,
            inputs=self._batch_tensors,
            context_len=self.context_len,
            template_stop=get_conv_template(conv_mode or self.conv_mode).stop_str,
            prefix_cache=self.prefix_cache,
        )


class _CancelledCriteria(StoppingCriteria):
    """A `generate` stopping criterion that ends every row once `event` is set."""

    def __init__(self, event: threading.Event):
        self.event = event

    def __call__(self, input_ids: torch.LongTensor, scores=None, **kwargs) -> torch.Tensor:
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


class _TokenStreamer:
    """A `generate` streamer that hands each step's new token ids to the consuming thread."""

    _END = object()

    def __init__(self, timeout: float = 600.0):
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


# Batching changes the shapes of the decoder's matrix products, and on some CPUs (and GPUs) the rounding follows, so a
# row's fp32 logits in a batch equal its one-at-a-time logits only within this bound. Greedy tokens are therefore the
# one-at-a-time tokens except where the top two logits of a step lie within it (a near tie). See docs/Performance.md.
GREEDY_TIE_TOLERANCE = 1e-4


def greedy_divergence(
    engine: LlavaEngine,
    prompt: str,
    images: Sequence[Image.Image],
    params: GenerationParams,
    other: str,
) -> tuple[str, float | None]:
    """Check a greedy reply `other` (from a batch, a cache, a server) against this prompt's one-at-a-time reply.

    Returns `(alone, margin)`: the reply generated alone and, where `other` departs from it, the gap between the
    top two logits at the step where it departs (None when the replies agree). A departure is a rounding effect
    only when that gap is within `GREEDY_TIE_TOLERANCE`.
    """
    request = engine.encode(prompt, images, 0)
    stops = engine.stop_strings(params)
    ids, mask, pixel, sizes = engine._batch_tensors([request])
    kwargs = engine._generate_kwargs([request], params, ids, stops)
    kwargs.update(do_sample=False, output_scores=True, return_dict_in_generate=True)
    with torch.inference_mode():
        out = engine.model.generate(ids, attention_mask=mask, images=pixel, image_sizes=sizes, **kwargs)
    tokens = out.sequences[0].tolist()
    alone = cut_at_stop(engine.tokenizer.decode(tokens, skip_special_tokens=True), stops).strip()
    if alone == other.strip():
        return alone, None
    for step, scores in enumerate(out.scores):
        text = engine.tokenizer.decode(tokens[: step + 1], skip_special_tokens=True).strip()
        if not other.strip().startswith(text):  # the reference's token at this step is not the one `other` took
            top = torch.topk(scores[0].float(), 2).values
            return alone, float(top[0] - top[1])
    # `other` goes on where the reference stopped: a departure at the last step only if that step chose end-of-text.
    if out.scores and tokens[-1] in (engine.tokenizer.eos_token_id, engine.tokenizer.pad_token_id):
        top = torch.topk(out.scores[-1][0].float(), 2).values
        return alone, float(top[0] - top[1])
    return alone, float("inf")
