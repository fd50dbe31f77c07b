"""The client of an OpenAI-compatible engine (vLLM, SGLang, lmdeploy, `transformers serve`): probe it, send it a
chat completion, and relay its server-sent events as our worker protocol's chunks.

    info = probe_engine("http://localhost:8000/v1", None, api_key=None)      # which model it serves
    engine = EngineClient("http://localhost:8000/v1", info.model)
    response = await engine.open(body)                                        # `ServeError` naming the URL
    async for chunk in engine.relay(prompt, stops, response): ...            # our JSON + NUL chunks

Every error names the engine URL. Stop strings are applied here too, whatever the engine does with them.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import httpx

from llava.inference import cut_at_stop, stable_prefix
from llava.serve.protocol import ErrorCode, ServeError, encode_chunk


class EngineUnavailable(RuntimeError):
    """The engine URL does not answer (at start-up, or when a request is forwarded)."""


@dataclass
class EngineInfo:
    model: str  # the id the engine serves (sent as `model`)
    context_length: int | None


def probe_engine(engine_url: str, engine_model: str | None, api_key: str | None, wait_s: float = 0) -> EngineInfo:
    """Ask the engine's `/models` which model it serves; `EngineUnavailable` (naming the URL and what to do) when it
    does not answer within `wait_s` seconds (one try when 0), or when `engine_model` is not among its models."""
    deadline, last = time.monotonic() + wait_s, None
    while True:
        try:
            response = httpx.get(engine_url + "/models", headers=_auth(api_key), timeout=10)
            if response.status_code == 200:
                break
            last = f"HTTP {response.status_code}: {response.text[:200]}"
        except httpx.HTTPError as err:
            last = f"{type(err).__name__}: {err}"
        if time.monotonic() >= deadline:
            raise EngineUnavailable(
                f"The engine at {engine_url} does not answer ({last}). Start it first (docs/Serving.md, "
                "'Scaling out'), check --engine-url (it ends with /v1), or wait for it with --engine-wait SECONDS."
            )
        time.sleep(1.0)
    try:
        cards = [c for c in response.json().get("data", []) if isinstance(c, dict) and c.get("id")]
    except (ValueError, AttributeError) as err:
        raise EngineUnavailable(f"{engine_url}/models is not an OpenAI model list ({err}).") from err
    ids = [c["id"] for c in cards]
    if engine_model is None:
        if len(ids) != 1:
            raise EngineUnavailable(
                f"The engine at {engine_url} serves {len(ids)} models ({', '.join(ids) or 'none'}); "
                "name one with --engine-model."
            )
        engine_model = ids[0]
    elif ids and engine_model not in ids:
        raise EngineUnavailable(f"The engine at {engine_url} does not serve `{engine_model}`; it has {ids}.")
    card = next((c for c in cards if c["id"] == engine_model), {})
    context = card.get("max_model_len") or card.get("context_length")
    return EngineInfo(engine_model, int(context) if isinstance(context, int) else None)


def _auth(api_key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


class EngineClient:
    """One engine URL (its OpenAI API base, ending in /v1) and the model id it serves, on a pooled async client
    (`http`, set in the server's event loop)."""

    def __init__(self, url: str, model: str, api_key: str | None = None):
        self.engine_url, self.model, self.api_key = url.rstrip("/"), model, api_key
        self.http: httpx.AsyncClient | None = None

    def start(self) -> None:
        self.http = httpx.AsyncClient(timeout=httpx.Timeout(10.0, read=None), limits=httpx.Limits(max_connections=None))

    async def aclose(self) -> None:
        if self.http is not None:
            await self.http.aclose()

    async def open(self, body: dict) -> httpx.Response:
        """Send the request; a `ServeError` naming the engine URL when it cannot be reached or refuses."""
        url = self.engine_url + "/chat/completions"
        try:
            request = self.http.build_request("POST", url, json=body, headers=_auth(self.api_key))
            response = await self.http.send(request, stream=True)
        except httpx.HTTPError as err:
            raise ServeError(
                f"The engine at {self.engine_url} is unreachable ({type(err).__name__}: {err}).", ErrorCode.SERVER_ERROR
            ) from err
        if response.status_code != 200:
            text = (await response.aread()).decode(errors="replace")[:500]
            await response.aclose()
            code = ErrorCode.BAD_REQUEST if 400 <= response.status_code < 500 else ErrorCode.SERVER_ERROR
            if response.status_code == 429:
                code = ErrorCode.OVERLOADED
            raise ServeError(f"The engine at {self.engine_url} answered HTTP {response.status_code}: {text}", code)
        return response

    async def relay(self, prompt: str, stops: list[str], response: httpx.Response) -> AsyncIterator[bytes]:
        """The engine's server-sent events as our chunks: `text` = prompt + the reply so far (never a stop string or
        a beginning of one), then a last chunk with `finish_reason` and `usage`; failures as one error chunk."""
        reply, shown, finish, usage = "", "", None, {}
        try:
            async for line in response.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                event = json.loads(data)
                if event.get("error"):
                    message = event["error"].get("message") if isinstance(event["error"], dict) else event["error"]
                    yield encode_chunk(f"The engine at {self.engine_url} failed: {message}", ErrorCode.SERVER_ERROR)
                    return
                usage = event.get("usage") or usage
                for choice in event.get("choices") or []:
                    reply += (choice.get("delta") or {}).get("content") or ""
                    finish = choice.get("finish_reason") or finish
                if stops and cut_at_stop(reply, stops) != reply:
                    reply, finish = cut_at_stop(reply, stops), "stop"
                    break  # closing the stream ends the generation in the engine
                visible = stable_prefix(reply, stops)
                if len(visible) > len(shown):
                    shown = visible
                    yield encode_chunk(prompt + shown)
        except (httpx.HTTPError, ValueError) as err:
            kind = (
                "sent malformed JSON" if isinstance(err, ValueError) else f"stopped mid-answer ({type(err).__name__})"
            )
            yield encode_chunk(f"The engine at {self.engine_url} {kind}: {err}", ErrorCode.SERVER_ERROR)
            return
        finally:
            await response.aclose()
        if finish is None:
            yield encode_chunk(
                f"The engine at {self.engine_url} ended the answer without finishing it.", ErrorCode.SERVER_ERROR
            )
            return
        tokens = {"prompt_tokens": usage.get("prompt_tokens"), "completion_tokens": usage.get("completion_tokens")}
        yield encode_chunk(prompt + reply, finish_reason=finish, usage=tokens)
