"""What a generation request is: its sampling parameters, THE one check of them, and the errors a request can raise.

Every entry point reads generation parameters through `GenerationParams.from_request` (the model worker's
`/worker_generate_stream` body, the OpenAI-compatible server's chat body) or builds a `GenerationParams` directly
(CLI, eval, demo); both run the same field-by-field check, and each error names the field as the request spelled it:

    params = GenerationParams.from_request(body, defaults=ORIGINAL_WORKER_DEFAULTS, max_new_tokens_limit=1024)
    temperature = read_param(body, "temperature", default=1.0)     # one field, e.g. for the OpenAI server

Ranges: `temperature` 0..2 (the OpenAI API's range, the one clients know; the original worker checked nothing and
its web UI offered 0..1; 0 means greedy), `top_p` in (0, 1], `num_beams` 1..16, `max_new_tokens` 1..65536, `stop` a
string or up to 16 strings of at most 256 characters (empty ones match nowhere and are dropped).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from PIL import Image

TEMPERATURE_MAX = 2.0
NUM_BEAMS_MAX = 16
MAX_NEW_TOKENS_MAX = 1 << 16
STOP_STRINGS_MAX = 16
STOP_LENGTH_MAX = 256


class RequestError(ValueError):
    """A request the model cannot serve as given (bad parameters, image count, prompt too long).

    `field` names the request field at fault (as the request spelled it), when one is."""

    def __init__(self, message: str, field: str | None = None):
        super().__init__(message)
        self.field = field


class PromptTooLongError(RequestError):
    """The prompt, after image features are spliced in, leaves no room to generate within the context."""


def _short(value) -> str:
    text = repr(value)
    return text[:60] + "..." if len(text) > 60 else text


def _number(value, key: str, integer: bool) -> float | int:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise RequestError(f"`{key}` must be a number, got `{_short(value)}`.", key)
    if not math.isfinite(value):
        raise RequestError(f"`{key}` must be a finite number, got `{_short(value)}`.", key)
    if integer:
        if value != int(value):
            raise RequestError(f"`{key}` must be a whole number, got `{_short(value)}`.", key)
        return int(value)
    return float(value)


def _stop(value, key: str) -> list[str]:
    values = [value] if isinstance(value, str) else value
    if not isinstance(values, list) or not all(isinstance(s, str) for s in values):
        raise RequestError(f"`{key}` must be a string or a list of strings, got `{_short(value)}`.", key)
    return [s for s in values if s]  # an empty stop string matches nowhere


# name -> (parse the raw value, is it in range, the allowed range in words)
_RULES: dict[str, tuple[Callable, Callable, str]] = {
    "temperature": (lambda v, k: _number(v, k, False), lambda v: 0 <= v <= TEMPERATURE_MAX, f"0..{TEMPERATURE_MAX:g}"),
    "top_p": (lambda v, k: _number(v, k, False), lambda v: 0 < v <= 1, "(0, 1]"),
    "num_beams": (lambda v, k: _number(v, k, True), lambda v: 1 <= v <= NUM_BEAMS_MAX, f"1..{NUM_BEAMS_MAX}"),
    "max_new_tokens": (
        lambda v, k: _number(v, k, True),
        lambda v: 1 <= v <= MAX_NEW_TOKENS_MAX,
        f"1..{MAX_NEW_TOKENS_MAX}",
    ),
    "stop": (
        _stop,
        lambda v: len(v) <= STOP_STRINGS_MAX and all(len(s) <= STOP_LENGTH_MAX for s in v),
        f"up to {STOP_STRINGS_MAX} strings of at most {STOP_LENGTH_MAX} characters",
    ),
}


def _out_of_range(name: str, value, key: str, raw) -> str | None:
    """None when `value` (parsed from `raw`) is in range, else the problem in words, naming `key`."""
    _, in_range, allowed = _RULES[name]
    if in_range(value):
        return None
    return f"`{key}`={_short(raw)} is out of range (allowed: {allowed})"


def read_param(body: Mapping, name: str, default=None, *, key: str | None = None):
    """The checked value of generation parameter `name` (a `GenerationParams` field) read from `body[key]` (`key`
    defaults to `name`; e.g. the OpenAI server reads `max_new_tokens` from `max_tokens`); `default` when the field
    is absent or null. Raises `RequestError` naming `key`."""
    key = key or name
    if name not in _RULES:
        raise KeyError(f"`{name}` is not a generation parameter; known: {', '.join(_RULES)}.")
    raw = body.get(key)
    if raw is None:
        return default
    value = _RULES[name][0](raw, key)
    problem = _out_of_range(name, value, key, raw)
    if problem:
        raise RequestError(problem + ".", key)
    return value


@dataclass
class GenerationParams:
    """Sampling settings; `temperature == 0` means greedy decoding (as in the original worker). Checked on
    construction (see the module docstring for the ranges)."""

    temperature: float = 0.2
    top_p: float = 1.0
    num_beams: int = 1
    max_new_tokens: int = 512
    stop: list[str] = field(default_factory=list)

    def __post_init__(self):
        problems, first = [], None
        for name, (parse, _, _) in _RULES.items():
            raw = getattr(self, name)
            try:
                value = parse(raw, name)
            except RequestError as err:
                problems.append(str(err).rstrip("."))
                first = first or name
                continue
            setattr(self, name, value)
            problem = _out_of_range(name, value, name, raw)
            if problem:
                problems.append(problem)
                first = first or name
        if problems:
            raise RequestError("Invalid generation parameters: " + "; ".join(problems) + ".", first)

    @classmethod
    def from_request(
        cls,
        body: Mapping,
        defaults: GenerationParams | None = None,
        *,
        keys: Mapping[str, str] | None = None,
        max_new_tokens_limit: int | None = None,
    ) -> GenerationParams:
        """The parameters of a request body (a JSON object), field by field; absent or null fields take `defaults`'
        values (`GenerationParams()` when None). `keys` renames fields as the body spells them (e.g.
        `{"max_new_tokens": "max_tokens"}`). A larger `max_new_tokens` is cut to `max_new_tokens_limit`, as the
        original worker cut it to 1024. Raises `RequestError` naming the first bad field."""
        if not isinstance(body, Mapping):
            raise RequestError(f"The request must be a JSON object, got `{_short(body)}`.")
        defaults = defaults or cls()
        keys = keys or {}
        values = {name: read_param(body, name, getattr(defaults, name), key=keys.get(name)) for name in _RULES}
        if max_new_tokens_limit is not None:
            values["max_new_tokens"] = min(values["max_new_tokens"], max_new_tokens_limit)
        values["stop"] = list(values["stop"])
        return cls(**values)

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

    def stop_strings(self, template_stop: str | None = None) -> list[str]:
        """The request's stop strings plus the chat template's own (`Conversation.stop_str`), which ends a reply
        unless it is a bare newline (then replies could not span lines)."""
        stops = list(self.stop)
        if template_stop and template_stop not in stops and template_stop != "\n":
            stops.append(template_stop)
        return stops


# The original model worker's protocol defaults (temperature 1.0, top_p 1.0, 256 new tokens).
ORIGINAL_WORKER_DEFAULTS = GenerationParams(temperature=1.0, top_p=1.0, max_new_tokens=256)


@dataclass
class EncodedRequest:
    """A tokenized, checked request (`LlavaEngine.encode`): what the engine and the batch decoder run."""

    input_ids: list[int]
    images: list[Image.Image]
    n_tokens: int  # after image features are spliced in
