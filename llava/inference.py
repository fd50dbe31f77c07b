"""The one generation path: prompt + images -> text, batched or streamed. The CLI, the worker, eval and the demo
all call it; it knows nothing of HTTP.

    engine = LlavaEngine.from_pretrained("liuhaotian/llava-v1.5-7b", device="auto")
    prompt = engine.build_prompt("What is in the picture?", n_images=1)
    text = engine.generate([prompt], [[image]], GenerationParams(temperature=0))[0]
"""

from __future__ import annotations

import functools
import logging
import re
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
from PIL import Image
from transformers import StoppingCriteria
from transformers.cache_utils import DynamicLayer

from llava.constants import DEFAULT_IM_END_TOKEN, DEFAULT_IM_START_TOKEN, DEFAULT_IMAGE_TOKEN, IMAGE_TOKEN_INDEX
from llava.conversation import get_conv_template
from llava.mm_utils import KeywordsStoppingCriteria, process_images, tokenizer_image_token
from llava.model.prefix_cache import PrefixKVCache, prefix_key

logger = logging.getLogger(__name__)

_BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")


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
        self.prefix_cache: PrefixKVCache | None = None

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
        tokens: list[int] = []
        sent, final, stopped = "", "", False
        held = self.byte_token_ids | self.special_token_ids
        try:
            for new in streamer:
                tokens += new
                # Decode the whole reply each time, so byte-fallback pieces and merges come out as `generate` does.
                decoded = self.tokenizer.decode(tokens, skip_special_tokens=True)
                final = cut_at_stop(decoded, stops)
                stopped = len(final) < len(decoded)
                # A trailing run of byte tokens decodes as one group that a later byte can rewrite entirely (as in
                # `BatchDecoder.step`): show text only up to it, and never a half-decoded character.
                n = len(tokens)
                while n and tokens[n - 1] in held:
                    n -= 1
                shown = final
                if n < len(tokens):
                    shown = cut_at_stop(self.tokenizer.decode(tokens[:n], skip_special_tokens=True), stops)
                if not shown.endswith("\ufffd") and shown.startswith(sent) and shown != sent:
                    sent = shown
                    yield sent
                if stopped:
                    break
            if final != sent:
                yield final
        finally:
            cancelled.set()  # a consumer that went away (or a stop string) ends `generate` at its next step
            thread.join()
        if errors:
            raise errors[0]
        if usage is not None:
            eos = self.model.generation_config.eos_token_id
            eos = set(eos if isinstance(eos, (list, tuple)) else [] if eos is None else [eos])
            stopped = stopped or bool(tokens and tokens[-1] in eos)
            usage.update(completion_tokens=len(tokens), finish_reason="stop" if stopped else "length")

    @functools.cached_property
    def byte_token_ids(self) -> frozenset[int]:
        """Ids of SentencePiece byte-fallback tokens (`<0x0A>` ...), whose runs decode as one group."""
        return frozenset(i for token, i in self.tokenizer.get_vocab().items() if _BYTE_TOKEN.fullmatch(token))

    @functools.cached_property
    def special_token_ids(self) -> frozenset[int]:
        """Ids that decoding with `skip_special_tokens=True` drops."""
        added = getattr(self.tokenizer, "added_tokens_decoder", {}) or {}
        return frozenset(self.tokenizer.all_special_ids) | {i for i, tok in added.items() if tok.special}

    def decoder(self, params: GenerationParams, conv_mode: str | None = None) -> BatchDecoder:
        """A step-wise batched decoder for requests sharing `params.batch_key()` (see `BatchDecoder`)."""
        return BatchDecoder(self, params, conv_mode)


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


# ---------------------------------------------------------------------------------------------------------------------
# Step-wise batched decoding (continuous batching): the serving worker's generation loop
# ---------------------------------------------------------------------------------------------------------------------


@dataclass
class StepUpdate:
    """One row's progress after a `BatchDecoder.step`.

    While a row runs, `text` is the part of its reply that later tokens cannot change (see `stable_prefix`), so it
    only ever grows; `changed` says whether it grew in this step. A finished row's `text` is its whole reply with stop
    strings cut (unstripped: `generate` returns it `.strip()`ped), its `finish_reason` is "stop" (EOS or a stop
    string) or "length" (its token budget), and it is gone from the decoder.
    """

    key: object
    text: str
    changed: bool
    finished: bool
    finish_reason: str | None
    prompt_tokens: int
    completion_tokens: int


@dataclass
class _Row:
    key: object
    max_new_tokens: int
    stops: list[str]
    prompt_tokens: int
    position: int  # position id of the next token fed to the model
    tokens: list[int] = field(default_factory=list)
    sent: str = ""


class BatchDecoder:
    """Decode many requests one token at a time over one shared KV cache; requests join and leave between steps.

    Rows are left-padded: each keeps its own attention mask and position ids, so under greedy decoding a row gets the
    tokens `LlavaEngine.generate` gives it alone. Joining requests are prefilled together (their images encoded
    once, there) and their cache is spliced into the running one, padded on the left to a common length; finished
    rows are dropped from the cache at once. All rows share the sampling settings (`GenerationParams.batch_key()`);
    each row has its own token budget and stop strings. Beam search is not supported (use `generate`).

        decoder = engine.decoder(GenerationParams(temperature=0))
        decoder.add([(key, engine.encode(prompt, images, 1), params)])
        while decoder:
            for update in decoder.step(): ...
    """

    def __init__(self, engine: LlavaEngine, params: GenerationParams, conv_mode: str | None = None):
        if params.num_beams != 1:
            raise RequestError(f"Step-wise decoding does not do beam search (`num_beams`={params.num_beams}).")
        self.engine = engine
        self.params = params
        self.conv_mode = conv_mode
        self.rows: list[_Row] = []
        self._cache = None
        self._mask: torch.Tensor | None = None  # (B, L) long, 1 where the cache holds a real token
        self._logits: torch.Tensor | None = None  # (B, V) float32: the next-token logits of every row
        eos = engine.model.generation_config.eos_token_id
        self._eos = set(eos if isinstance(eos, (list, tuple)) else [] if eos is None else [eos])
        self._warpers = self._build_warpers(engine.model.generation_config, params)
        self._held_ids = engine.byte_token_ids | engine.special_token_ids
        # Stored image prefixes are reused only where cache layers are plain (no sliding window to keep consistent).
        self._prefix_reuse = getattr(engine, "prefix_cache", None) is not None and all(
            type(layer) is _GrowingLayer for layer in self._new_cache().layers
        )

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def can_join(self) -> bool:
        """Whether rows can join a running batch: dynamic caches, and sliding-window ones the context cannot outgrow."""
        return self._cache is None or _splicable(self._cache, self.engine.context_len)

    @staticmethod
    def _build_warpers(generation_config, params: GenerationParams):
        if params.greedy:
            return None
        from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

        # The same warpers, in the same order, as `generate` builds for these settings.
        warpers = LogitsProcessorList([TemperatureLogitsWarper(params.temperature)])
        top_k = getattr(generation_config, "top_k", None)
        if top_k:
            warpers.append(TopKLogitsWarper(top_k))
        if params.top_p < 1.0:
            warpers.append(TopPLogitsWarper(params.top_p))
        return warpers

    # -- joining -----------------------------------------------------------------------------------------------
    def add(self, items: Sequence[tuple[object, EncodedRequest, GenerationParams]]) -> None:
        """Prefill `(key, request, params)` items and add them to the batch. On error the batch is unchanged."""
        if not items:
            return
        for key, _, params in items:
            if params.batch_key() != self.params.batch_key():
                raise RequestError(
                    f"Request `{key}` has sampling settings {params.batch_key()} but this batch decodes with "
                    f"{self.params.batch_key()}; batch only requests with equal `GenerationParams.batch_key()`."
                )
        if self.rows and not self.can_join:
            raise RuntimeError("This model's KV cache cannot take new rows mid-batch; wait until the batch drains.")
        store = self.engine.prefix_cache if self._prefix_reuse else None
        prefixes = [
            prefix_key(request.input_ids, request.images, IMAGE_TOKEN_INDEX) if store is not None else None
            for _, request, _ in items
        ]
        found = [store.get(p[0]) if p is not None else None for p in prefixes]
        fresh = [i for i, kv in enumerate(found) if kv is None]
        reused = [i for i, kv in enumerate(found) if kv is not None]
        parts = []  # (cache, mask, logits) of the fresh rows together, then of each reused-prefix row
        if fresh:
            parts.append(self._prefill([items[i][1] for i in fresh], [prefixes[i] for i in fresh]))
        for i in reused:
            parts.append(self._prefill_after(items[i][1], found[i], prefixes[i][1]))
        items = [items[i] for i in fresh + reused]
        cache, mask, logits = parts[0]
        for cache_b, mask_b, logits_b in parts[1:]:
            cache, mask = _splice_caches(cache, mask, cache_b, mask_b)
            logits = torch.cat([logits, logits_b], dim=0)
        engine, rows = self.engine, []
        for (key, request, params), n_real in zip(items, mask.sum(-1).tolist()):
            budget = max(1, min(params.max_new_tokens, engine.context_len - request.n_tokens))
            stops = engine.stop_strings(params, self.conv_mode)
            rows.append(_Row(key, budget, stops, request.n_tokens, position=int(n_real)))
        if not self.rows:
            self._cache, self._mask, self._logits = cache, mask, logits
        else:
            self._cache, self._mask = _splice_caches(self._cache, self._mask, cache, mask)
            self._logits = torch.cat([self._logits, logits.to(self._logits.device)], dim=0)
        self.rows += rows

    def _new_cache(self):
        from transformers import DynamicCache

        cache = DynamicCache(config=self.engine.model.config.get_text_config(decoder=True))
        cache.layers = [_GrowingLayer() if type(layer) is DynamicLayer else layer for layer in cache.layers]
        return cache

    def _prefill(self, requests: list[EncodedRequest], prefixes: list) -> tuple:
        """Prefill `requests` together (left-padded); store the keys and values of their image prefixes."""
        engine, model = self.engine, self.engine.model
        ids, mask, pixel, sizes = engine._batch_tensors(requests)
        with torch.inference_mode():
            embeds = None
            if hasattr(model, "prepare_inputs_labels_for_multimodal"):  # text-only decoders have no images to splice
                _, _, mask, _, embeds, _ = model.prepare_inputs_labels_for_multimodal(
                    ids, None, mask, None, None, pixel, sizes, padding_side="left"
                )
            if embeds is None:  # no images anywhere in these prompts
                embeds = model.get_input_embeddings()(ids)
                mask = torch.ones_like(ids) if mask is None else mask
            mask = mask.long()
            # As `generate`: positions count real tokens only; padding sits at position 0.
            positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)
            cache = self._new_cache()
            out = model(
                inputs_embeds=embeds,
                attention_mask=mask,
                position_ids=positions,
                cache=cache,
                use_cache=True,
                logits_to_keep=1,  # as `generate` does: only the last position's logits, not (B, T, vocab)
            )
            logits = out.logits[:, -1].to(copy=True, dtype=torch.float32)
            del out
        width = mask.shape[1]
        for row, (prefix, n_real) in enumerate(zip(prefixes, mask.sum(-1).tolist())):
            if prefix is not None:  # columns [start, start + prefix length) of this row hold its prefix
                start, length = width - n_real, n_real - prefix[1]
                kv = [
                    (layer.keys[row : row + 1, :, start : start + length].clone(),
                     layer.values[row : row + 1, :, start : start + length].clone())
                    for layer in cache.layers
                ]  # fmt: skip
                self.engine.prefix_cache.put(prefix[0], kv)
        return cache, mask, logits

    def _prefill_after(self, request: EncodedRequest, prefix_kv, n_suffix: int) -> tuple:
        """Prefill only the ids after `request`'s image prefix, on top of that prefix's stored keys and values."""
        model = self.engine.model
        cache = self._new_cache()
        for layer, (keys, values) in zip(cache.layers, prefix_kv):
            layer.lazy_initialization(keys, values)
            _set_cache_tensors(layer, keys, values)  # never written: the first update copies them into a buffer
        length = prefix_kv[0][0].shape[-2]
        device = prefix_kv[0][0].device
        suffix = torch.tensor([request.input_ids[-n_suffix:]], dtype=torch.long, device=device)
        mask = torch.ones(1, length + n_suffix, dtype=torch.long, device=device)
        with torch.inference_mode():
            out = model(
                inputs_embeds=model.get_input_embeddings()(suffix),
                attention_mask=mask,
                position_ids=torch.arange(length, length + n_suffix, device=device)[None],
                cache=cache,
                use_cache=True,
                logits_to_keep=1,
            )
            logits = out.logits[:, -1].to(copy=True, dtype=torch.float32)
        return cache, mask, logits

    # -- decoding ----------------------------------------------------------------------------------------------
    def step(self) -> list[StepUpdate]:
        """Pick the next token of every row, report each row, drop finished rows, run the model one step."""
        if not self.rows:
            return []
        scores = self._logits
        if self._warpers is None:
            next_tokens = torch.argmax(scores, dim=-1)
        else:
            scores = self._warpers(None, scores)
            next_tokens = torch.multinomial(torch.softmax(scores, dim=-1), num_samples=1).squeeze(1)
        updates, keep = [], []
        for i, (row, token) in enumerate(zip(self.rows, next_tokens.tolist())):
            row.tokens.append(token)
            decoded = self.engine.tokenizer.decode(row.tokens, skip_special_tokens=True)
            text = cut_at_stop(decoded, row.stops)
            reason = None
            if token in self._eos or len(text) < len(decoded):
                reason = "stop"
            elif len(row.tokens) >= row.max_new_tokens:
                reason = "length"
            changed = False
            if reason is not None:
                changed, row.sent = text != row.sent, text
            else:
                # A trailing run of byte-fallback tokens decodes as one group that a later byte can rewrite entirely
                # (valid UTF-8 or one U+FFFD per byte), so it is not shown until a normal token closes it. Skipped
                # special tokens do not close a run.
                n = len(row.tokens)
                while n and row.tokens[n - 1] in self._held_ids:
                    n -= 1
                if n < len(row.tokens):
                    decoded = self.engine.tokenizer.decode(row.tokens[:n], skip_special_tokens=True)
                stable = stable_prefix(decoded, row.stops)
                if len(stable) > len(row.sent) and stable.startswith(row.sent):
                    changed, row.sent = True, stable
            updates.append(
                StepUpdate(row.key, row.sent, changed, reason is not None, reason, row.prompt_tokens, len(row.tokens))
            )
            if reason is None:
                keep.append(i)
        self._select(keep)
        if self.rows:
            self._forward(next_tokens[keep])
        return updates

    def remove(self, keys: Sequence[object]) -> None:
        """Drop rows (e.g. a client went away)."""
        drop = set(keys)
        self._select([i for i, row in enumerate(self.rows) if row.key not in drop])

    def _select(self, keep: list[int]) -> None:
        if len(keep) == len(self.rows):
            return
        self.rows = [self.rows[i] for i in keep]
        if not keep:
            self._cache = self._mask = self._logits = None
            return
        index = torch.tensor(keep, dtype=torch.long)  # on the CPU: it indexes tensors on any device
        self._cache.batch_select_indices(index)
        self._mask = self._mask[index]
        self._logits = self._logits[index]
        if self.can_join:
            # Columns that are padding in every remaining row are dead weight: cut them off the cache.
            first = int(self._mask.any(dim=0).long().argmax())
            if first > 0:
                for layer in self._cache.layers:
                    _set_cache_tensors(layer, layer.keys[..., first:, :], layer.values[..., first:, :])
                self._mask = self._mask[:, first:]

    def _forward(self, tokens: torch.Tensor) -> None:
        device = self._mask.device
        ids = tokens.to(device)[:, None]  # (B, 1)
        self._mask = torch.cat([self._mask, self._mask.new_ones(len(self.rows), 1)], dim=-1)
        positions = torch.tensor([[row.position] for row in self.rows], dtype=torch.long, device=device)
        for row in self.rows:
            row.position += 1
        with torch.inference_mode():
            out = self.engine.model(
                input_ids=ids,
                attention_mask=self._mask,
                position_ids=positions,
                cache=self._cache,
                use_cache=True,
            )
            self._logits = out.logits[:, -1].to(copy=True, dtype=torch.float32)


def stable_prefix(text: str, stops: Sequence[str] = ()) -> str:
    """The part of a partial reply that later tokens cannot change: `text` without trailing half-decoded characters
    or whitespace (decoders may merge it with what follows) and without a trailing start of a stop string (which the
    next token may complete and cut)."""
    while True:
        end = len(text)
        while end and (text[end - 1] == "\ufffd" or text[end - 1].isspace()):
            end -= 1
        hold = 0
        for stop in stops:
            for k in range(min(len(stop) - 1, end), 0, -1):
                if text[:end].endswith(stop[:k]):
                    hold = max(hold, k)
                    break
        if end - hold == len(text):
            return text
        text = text[: end - hold]


def _splicable(cache, context_len: int) -> bool:
    """Whether rows can be spliced into / trimmed out of `cache` by editing its tensors.

    Plain dynamic layers always; sliding-window layers only when no sequence can outgrow the window (then they keep
    the whole history too). The cache's width never exceeds the longest row: after every change its first column
    holds some row's first token.
    """
    from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

    for layer in getattr(cache, "layers", [None]):
        if type(layer) in (DynamicLayer, _GrowingLayer):
            continue
        if type(layer) is DynamicSlidingWindowLayer and not layer.record_past and context_len < layer.sliding_window:
            continue
        return False
    return True


class _GrowingLayer(DynamicLayer):
    """A `DynamicLayer` that appends into spare capacity. `DynamicLayer` concatenates, copying the whole cache at
    every step, which dominates a large batch's decoding step on a CPU. Here keys and values are views of larger
    buffers; when they were replaced from outside (rows selected, columns trimmed, caches spliced) or the buffer is
    full, the next update copies them into a new buffer with room for `_GROW` more tokens."""

    _buffers: tuple[torch.Tensor, torch.Tensor] | None = None
    _views: tuple[torch.Tensor, torch.Tensor] | None = None

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        n = self.keys.shape[-2] if self.keys.numel() else 0
        add = key_states.shape[-2]
        ours = self._views is not None and self._views[0] is self.keys and self._views[1] is self.values
        if not ours or n + add > self._buffers[0].shape[-2]:
            shape = [*key_states.shape[:-2], n + add + _GROW, key_states.shape[-1]]
            self._buffers = (key_states.new_empty(shape), value_states.new_empty(shape))
            if n:
                self._buffers[0][..., :n, :] = self.keys
                self._buffers[1][..., :n, :] = self.values
        keys, values = self._buffers
        keys[..., n : n + add, :] = key_states  # (B, H, T, D)
        values[..., n : n + add, :] = value_states
        self.keys, self.values = keys[..., : n + add, :], values[..., : n + add, :]
        self._views = (self.keys, self.values)
        return self.keys, self.values


_GROW = 64  # tokens of spare room a growing cache layer allocates at a time


def _set_cache_tensors(layer, keys: torch.Tensor, values: torch.Tensor) -> None:
    layer.keys, layer.values = keys, values
    if hasattr(layer, "cumulative_length"):  # sliding-window layers count the tokens they have seen
        layer.cumulative_length = keys.shape[-2]


def _splice_caches(cache_a, mask_a: torch.Tensor, cache_b, mask_b: torch.Tensor):
    """Stack two batches' caches (rows of `a` first), left-padding the shorter one with masked-out zeros."""
    length = max(mask_a.shape[1], mask_b.shape[1])

    def pad(t: torch.Tensor, dim: int) -> torch.Tensor:
        missing = length - t.shape[dim]
        if missing == 0:
            return t
        shape = list(t.shape)
        shape[dim] = missing
        return torch.cat([t.new_zeros(shape), t], dim=dim)

    for layer_a, layer_b in zip(cache_a.layers, cache_b.layers):
        keys = torch.cat([pad(layer_a.keys, 2), pad(layer_b.keys, 2).to(layer_a.keys.device)], dim=0)
        values = torch.cat([pad(layer_a.values, 2), pad(layer_b.values, 2).to(layer_a.values.device)], dim=0)
        _set_cache_tensors(layer_a, keys, values)
    mask = torch.cat([pad(mask_a, 1), pad(mask_b, 1).to(mask_a.device)], dim=0)
    return cache_a, mask


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
