"""OpenAI-compatible completions and chat completions, on meshserve's generative streams.

``POST /v1/completions`` (a ``prompt`` string) and ``POST /v1/chat/completions``
(``messages``, turned into a prompt on the workers by the model's ``chat_prompt``: by default
one ``role: content`` line a message, then ``assistant:``), whole or streamed as server-sent
events ending with ``data: [DONE]``. Both run as one meshserve stream, so a whole answer is the
same text a streamed one is, and a client that goes away cancels it (its KV is freed).

Parameters, as OpenAI's API defines them: ``max_tokens`` (``max_completion_tokens`` for chat;
absent: the model's default), ``temperature`` (default 1, as OpenAI's), ``top_p``, ``stop``,
``seed``, ``stream``, ``stream_options.include_usage``, ``n`` (1 only), and ``top_k`` and
``ignore_eos`` besides. Sampling parameters OpenAI has and meshserve does not (penalties,
``logprobs``, ``logit_bias``, ``best_of``, ``echo``, tools) are refused with 400 when set to
anything but their neutral value, rather than silently ignored; ``user`` is ignored; any
other key is refused by name.
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from mesh.gateway.http import HttpError

# Keys meshserve passes on, by OpenAI's name -> the engine's.
SAMPLING = {"max_tokens": "max_tokens", "max_completion_tokens": "max_tokens",
            "temperature": "temperature", "top_p": "top_p", "stop": "stop", "seed": "seed",
            "top_k": "top_k", "ignore_eos": "ignore_eos"}
# Keys accepted only at their neutral value.
NEUTRAL: dict[str, tuple[Any, ...]] = {
    "n": (1, None), "best_of": (1, None), "echo": (False, None), "logprobs": (None, False),
    "top_logprobs": (None, 0), "presence_penalty": (0, 0.0, None),
    "frequency_penalty": (0, 0.0, None), "logit_bias": (None,), "suffix": (None, ""),
    "tools": (None,), "tool_choice": (None, "none"), "functions": (None,),
    "parallel_tool_calls": (None, True, False), "response_format": (None,),
}
IGNORED = frozenset({"user", "metadata", "store", "service_tier"})
COMMON = frozenset({"model", "stream", "stream_options"})


@dataclass(frozen=True, slots=True)
class Call:
    """One completions or chat request, translated."""

    model: str
    inputs: dict[str, Any]
    params: dict[str, Any]
    stream: bool
    include_usage: bool
    chat: bool


def parse(body: Any, *, chat: bool) -> Call:
    if not isinstance(body, dict):
        raise HttpError(400, "the request must be a JSON object", kind="invalid_request")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise HttpError(400, "'model' is required", kind="invalid_request")
    payload = "messages" if chat else "prompt"
    known = COMMON | set(SAMPLING) | set(NEUTRAL) | IGNORED | {payload}
    unknown = sorted(k for k in body if k not in known)
    if unknown:
        raise HttpError(400, f"unrecognized request argument: {unknown[0][:64]}",
                        kind="invalid_request")
    for key, neutral in NEUTRAL.items():
        value = body.get(key)
        if key in body and not _is_neutral(key, value, neutral):
            raise HttpError(400, f"'{key}' is not supported by this server (only its neutral "
                                 "value is accepted)", kind="invalid_request")
    if chat:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise HttpError(400, "'messages' must be a non-empty list", kind="invalid_request")
        inputs: dict[str, Any] = {"messages": messages}
    else:
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        if not isinstance(prompt, str):
            raise HttpError(400, "'prompt' must be a string (one prompt a request)",
                            kind="invalid_request")
        inputs = {"prompt": prompt}
    params: dict[str, Any] = {"temperature": 1.0}
    for key, ours in SAMPLING.items():
        if key in body and body[key] is not None:
            params[ours] = body[key]
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise HttpError(400, "'stream' must be true or false", kind="invalid_request")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise HttpError(400, "'stream_options' must be an object", kind="invalid_request")
    return Call(model, inputs, params, stream, options.get("include_usage") is True, chat)


def _is_neutral(key: str, value: Any, neutral: tuple[Any, ...]) -> bool:
    if key == "logit_bias":
        return value is None or value == {}
    if key == "response_format":
        return value is None or value == {"type": "text"}
    return any(value is n or (type(value) is type(n) and value == n) for n in neutral)


class Completion:
    """Turns a meshserve stream's chunks into OpenAI's objects."""

    def __init__(self, call: Call) -> None:
        self.call = call
        self.id = ("chatcmpl-" if call.chat else "cmpl-") + secrets.token_hex(12)
        self.created = int(time.time())
        self.text: list[str] = []
        self.finish_reason: str | None = None
        self.usage: dict[str, int] | None = None
        # A token's event, around its text: built once, since a stream sends one per token
        # (the same bytes json.dumps of the whole chunk gives, at a fraction of the cost).
        head = self._chunk({"index": 0, "PIECE": None}).encode()
        before, after = head.split(b'"PIECE":null')
        key = b'"delta":{"content":' if call.chat else b'"text":'
        tail = b'},"logprobs":null,"finish_reason":null' if call.chat else \
            b',"logprobs":null,"finish_reason":null'
        self._event_head = b"data: " + before + key
        self._event_tail = tail + after + b"\n\n"

    def take(self, chunk: dict[str, Any]) -> str:
        """Take one chunk; the text it adds."""
        text = chunk.get("text", "")
        text = text if isinstance(text, str) else ""
        self.text.append(text)
        if "finish_reason" in chunk:
            self.finish_reason = str(chunk["finish_reason"])
            prompt = int(chunk.get("prompt_tokens", 0))
            completion = int(chunk.get("completion_tokens", 0))
            self.usage = {"prompt_tokens": prompt, "completion_tokens": completion,
                          "total_tokens": prompt + completion}
        return text

    def whole(self) -> dict[str, Any]:
        text = "".join(self.text)
        choice: dict[str, Any] = {"index": 0, "logprobs": None,
                                  "finish_reason": self.finish_reason}
        if self.call.chat:
            choice["message"] = {"role": "assistant", "content": text}
        else:
            choice["text"] = text
        return {"id": self.id, "object": "chat.completion" if self.call.chat else
                "text_completion", "created": self.created, "model": self.call.model,
                "choices": [choice], "usage": self.usage or {
                    "prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}}

    def _chunk(self, choice: dict[str, Any]) -> str:
        out: dict[str, Any] = {
            "id": self.id, "created": self.created, "model": self.call.model,
            "object": "chat.completion.chunk" if self.call.chat else "text_completion",
            "choices": [choice]}
        if self.call.include_usage:
            out["usage"] = None
        return json.dumps(out, separators=(",", ":"))

    def event(self, text: str) -> bytes:
        """The server-sent event of one piece of text after the first, whole."""
        return self._event_head + json.dumps(text).encode() + self._event_tail

    def delta(self, text: str, first: bool) -> str:
        """The event of one piece of text."""
        if self.call.chat:
            delta: dict[str, Any] = {"content": text}
            if first:
                delta["role"] = "assistant"
            return self._chunk({"index": 0, "delta": delta, "logprobs": None,
                                "finish_reason": None})
        return self._chunk({"index": 0, "text": text, "logprobs": None, "finish_reason": None})

    def closing(self) -> list[str]:
        """The events after the last piece of text: the finish reason, the usage if asked."""
        if self.call.chat:
            events = [self._chunk({"index": 0, "delta": {}, "logprobs": None,
                                   "finish_reason": self.finish_reason})]
        else:
            events = [self._chunk({"index": 0, "text": "", "logprobs": None,
                                   "finish_reason": self.finish_reason})]
        if self.call.include_usage:
            events.append(json.dumps({
                "id": self.id, "created": self.created, "model": self.call.model,
                "object": "chat.completion.chunk" if self.call.chat else "text_completion",
                "choices": [], "usage": self.usage}, separators=(",", ":")))
        return events


async def events(completion: Completion, chunks: AsyncIterator[dict[str, Any]]
                 ) -> AsyncIterator[bytes]:
    """The server-sent events of a streamed answer (``data: ...`` and its blank line), from
    its meshserve chunks."""
    first = True
    take = completion.take
    event = completion.event
    async for chunk in chunks:
        text = take(chunk)
        if first:
            yield f"data: {completion.delta(text, True)}\n\n".encode()
            first = False
        elif text:
            yield event(text)
    for closing in completion.closing():
        yield f"data: {closing}\n\n".encode()


def model_list(models: list[dict[str, Any]]) -> dict[str, Any]:
    """``GET /v1/models``: the generative deployments."""
    now = int(time.time())
    return {"object": "list", "data": [
        {"id": m["name"], "object": "model", "created": now, "owned_by": "meshserve"}
        for m in models if m.get("generative")]}
