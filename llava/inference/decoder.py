"""Continuous batching on token ids: many requests decoded one token at a time over one shared KV cache.

The serving worker's generation loop (scheduled by `llava.serve.batching`) and the CLI's streaming both run it. It
works on a model, its caches and a detokenizer; it knows nothing of prompts, templates or the engine (which builds
it: `LlavaEngine.decoder`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from llava.constants import IMAGE_TOKEN_INDEX
from llava.inference import kv_cache
from llava.inference.params import EncodedRequest, GenerationParams, RequestError
from llava.inference.prefix_cache import PrefixKVCache, prefix_key
from llava.inference.text_stream import Detokenizer, TextStream

# requests -> (input ids, attention mask, pixel values, image sizes): left-padded, on the model's device
BatchInputs = Callable[[Sequence[EncodedRequest]], tuple]


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
    text: TextStream
    prompt_tokens: int
    position: int  # position id of the next token fed to the model
    sent: str = ""
    n_tokens: int = field(default=0)


def eos_ids(generation_config) -> set[int]:
    eos = generation_config.eos_token_id
    return set(eos if isinstance(eos, (list, tuple)) else [] if eos is None else [eos])


class BatchDecoder:
    """Decode many requests one token at a time over one shared KV cache; requests join and leave between steps.

    Rows are left-padded: each keeps its own attention mask and position ids, so under greedy decoding a row gets the
    tokens `LlavaEngine.generate` gives it alone. Joining requests are prefilled together (their images encoded
    once, there) and their cache is spliced into the running one, padded on the left to a common length; finished
    rows are dropped from the cache at once. All rows share the sampling settings (`GenerationParams.batch_key()`);
    each row has its own token budget and stop strings. Beam search is not supported (use `generate`). Each row's
    text grows through a `TextStream`, so a step costs the same however long the replies are.

        decoder = engine.decoder(GenerationParams(temperature=0))
        decoder.add([(key, engine.encode(prompt, images, 1), params)])
        while decoder:
            for update in decoder.step(): ...
    """

    def __init__(
        self,
        model,
        params: GenerationParams,
        *,
        detokenizer: Detokenizer,
        inputs: BatchInputs,
        context_len: int,
        template_stop: str | None = None,
        prefix_cache: PrefixKVCache | None = None,
    ):
        if params.num_beams != 1:
            raise RequestError(f"Step-wise decoding does not do beam search (`num_beams`={params.num_beams}).")
        self.model = model
        self.params = params
        self.detokenizer = detokenizer
        self.inputs = inputs
        self.context_len = context_len
        self.template_stop = template_stop
        self.prefix_cache = prefix_cache
        self.rows: list[_Row] = []
        self._cache = None
        self._mask: torch.Tensor | None = None  # (B, L) long, 1 where the cache holds a real token
        self._logits: torch.Tensor | None = None  # (B, V) float32: the next-token logits of every row
        self._eos = eos_ids(model.generation_config)
        self._warpers = self._build_warpers(model.generation_config, params)
        # Stored image prefixes are reused only where cache layers are plain (no sliding window to keep consistent).
        self._prefix_reuse = prefix_cache is not None and kv_cache.all_plain(kv_cache.new_cache(model))

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def can_join(self) -> bool:
        """Whether rows can join a running batch: dynamic caches, and sliding-window ones the context cannot outgrow."""
        return self._cache is None or kv_cache._splicable(self._cache, self.context_len)

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
        store = self.prefix_cache if self._prefix_reuse else None
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
            cache, mask = kv_cache._splice_caches(cache, mask, cache_b, mask_b)
            logits = torch.cat([logits, logits_b], dim=0)
        rows = []
        for (key, request, params), n_real in zip(items, mask.sum(-1).tolist()):
            budget = max(1, min(params.max_new_tokens, self.context_len - request.n_tokens))
            text = self.detokenizer.stream(params.stop_strings(self.template_stop))
            rows.append(_Row(key, budget, text, request.n_tokens, position=int(n_real)))
        if not self.rows:
            self._cache, self._mask, self._logits = cache, mask, logits
        else:
            self._cache, self._mask = kv_cache._splice_caches(self._cache, self._mask, cache, mask)
            self._logits = torch.cat([self._logits, logits.to(self._logits.device)], dim=0)
        self.rows += rows

    def _run(self, cache, **inputs) -> torch.Tensor:
        """One forward pass over `cache`; the float32 next-token logits of every row."""
        out = self.model(cache=cache, use_cache=True, **inputs)
        return out.logits[:, -1].to(copy=True, dtype=torch.float32)

    def _prefill(self, requests: list[EncodedRequest], prefixes: list) -> tuple:
        """Prefill `requests` together (left-padded); store the keys and values of their image prefixes."""
        model = self.model
        ids, mask, pixel, sizes = self.inputs(requests)
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
            cache = kv_cache.new_cache(model)
            # logits_to_keep=1 as `generate` does: only the last position's logits, not (B, T, vocab)
            logits = self._run(
                cache, inputs_embeds=embeds, attention_mask=mask, position_ids=positions, logits_to_keep=1
            )
        width = mask.shape[1]
        for row, (prefix, n_real) in enumerate(zip(prefixes, mask.sum(-1).tolist())):
            if prefix is not None:  # columns [start, start + prefix length) of this row hold its prefix
                start = width - n_real
                self.prefix_cache.put(prefix[0], kv_cache.copy_prefix(cache, row, start, n_real - prefix[1]))
        return cache, mask, logits

    def _prefill_after(self, request: EncodedRequest, prefix_kv, n_suffix: int) -> tuple:
        """Prefill only the ids after `request`'s image prefix, on top of that prefix's stored keys and values."""
        model = self.model
        cache = kv_cache.seeded_cache(model, prefix_kv)
        length = prefix_kv[0][0].shape[-2]
        device = prefix_kv[0][0].device
        suffix = torch.tensor([request.input_ids[-n_suffix:]], dtype=torch.long, device=device)
        mask = torch.ones(1, length + n_suffix, dtype=torch.long, device=device)
        with torch.inference_mode():
            logits = self._run(
                cache,
                inputs_embeds=model.get_input_embeddings()(suffix),
                attention_mask=mask,
                position_ids=torch.arange(length, length + n_suffix, device=device)[None],
                logits_to_keep=1,
            )
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
            row.text.push(token)
            row.n_tokens += 1
            reason = None
            if token in self._eos or row.text.stopped:
                reason = "stop"
            elif row.n_tokens >= row.max_new_tokens:
                reason = "length"
            if reason is not None:
                text = row.text.finish()
                changed, row.sent = text != row.sent, text
            else:
                changed = len(row.text.stable_text) > len(row.sent)
                if changed:
                    row.sent = row.text.stable_text
            updates.append(
                StepUpdate(row.key, row.sent, changed, reason is not None, reason, row.prompt_tokens, row.n_tokens)
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
        # Columns that are padding in every remaining row are dead weight: cut them off the cache.
        self._mask = kv_cache.select_rows(self._cache, self._mask, keep, trim=self.can_join)
        self._logits = self._logits[torch.tensor(keep, dtype=torch.long)]

    def _forward(self, tokens: torch.Tensor) -> None:
        device = self._mask.device
        ids = tokens.to(device)[:, None]  # (B, 1)
        self._mask = torch.cat([self._mask, self._mask.new_ones(len(self.rows), 1)], dim=-1)
        positions = torch.tensor([[row.position] for row in self.rows], dtype=torch.long, device=device)
        for row in self.rows:
            row.position += 1
        with torch.inference_mode():
            self._logits = self._run(self._cache, input_ids=ids, attention_mask=self._mask, position_ids=positions)
