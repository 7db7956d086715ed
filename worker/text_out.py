"""What a sequence's client sees: its tokens turned into text, cut at stops, a chunk at a time.

``TextOut`` is fed one generated token at a time (``push``) at the last stage and says what to
send now: the text that became final and the token ids it covers, and whether the sequence has
ended and why. It holds text back while it may still turn out to be part of something the
client must not see:

* the bytes of a UTF-8 character not yet complete (a byte-level tokenizer may split one over
  several tokens), so streamed text never splits a character;
* a tail that is the start of a stop string, so the text ends cleanly before the stop.

A token whose text is held back is delivered with the chunk that finally shows it: every
chunk's token ids cover exactly the text it carries, and the ids of all chunks delivered so
far are what a resumed stream continues from (``replay`` rebuilds this state from them).
"""

from __future__ import annotations

import codecs
from collections.abc import Callable
from dataclasses import dataclass

from worker.sampling import SamplingParams

LENGTH = "length"  # max_tokens reached
STOP = "stop"  # a stop string, a stop token or the end-of-sequence token


@dataclass(slots=True)
class Emit:
    """What one token releases: ``text`` and the ``tokens`` it covers ("" and () when held),
    and the finish reason once the sequence has ended."""

    text: str
    tokens: tuple[int, ...]
    finish: str = ""


class TextOut:
    def __init__(self, params: SamplingParams, token_bytes: Callable[[int], bytes],
                 eos_token_id: int | None) -> None:
        self.params = params
        self._bytes = token_bytes
        self._eos = None if params.ignore_eos else eos_token_id
        self._stop_ids = frozenset(params.stop_token_ids)
        self._stops = params.stop
        self._longest_stop = max((len(s) for s in params.stop), default=0)
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.text = ""  # every character decoded so far
        self.sent = 0  # characters of ``text`` released
        self._searched = 0  # stop strings cannot start before this index
        self._pending: list[int] = []  # tokens whose text is not released yet
        self.generated = 0
        self.finish = ""

    def replay(self, tokens: tuple[int, ...] | list[int]) -> None:
        """Take ``tokens`` as already generated and delivered (a resumed stream)."""
        for token in tokens:
            self.push(token)
        self._pending.clear()

    def push(self, token: int) -> Emit:
        if self.finish:
            raise RuntimeError("a token after the sequence ended")
        self.generated += 1
        self._pending.append(token)
        if token == self._eos or token in self._stop_ids:
            return self._end(STOP, len(self.text), include_undecoded=False)
        self.text += self._decoder.decode(self._bytes(token))
        if self._stops:
            at = self._find_stop()
            if at >= 0:
                return self._end(STOP, at, include_undecoded=False)
        if self.generated >= self.params.max_tokens:
            return self._end(LENGTH, -1, include_undecoded=True)
        release = len(self.text) - self._held_for_stop()
        if release <= self.sent:
            return Emit("", ())
        text = self.text[self.sent:release]
        self.sent = release
        tokens = tuple(self._pending)
        self._pending.clear()
        return Emit(text, tokens)

    def _find_stop(self) -> int:
        """Where the first stop string starts in the text, or -1."""
        text = self.text
        start = self._searched
        best = -1
        for stop in self._stops:
            at = text.find(stop, start)
            if at >= 0 and (best < 0 or at < best):
                best = at
        # Next time, a stop can start no earlier than where it could still fit.
        self._searched = max(self._searched, len(text) - self._longest_stop + 1)
        return best

    def _held_for_stop(self) -> int:
        """Characters at the end of the text that begin some stop string."""
        text = self.text
        held = 0
        for stop in self._stops:
            for n in range(min(len(stop) - 1, len(text)), held, -1):
                if text.endswith(stop[:n]):
                    held = n
                    break
        return held

    def _end(self, reason: str, cut: int, *, include_undecoded: bool) -> Emit:
        if include_undecoded:
            self.text += self._decoder.decode(b"", final=True)
            cut = len(self.text)
        self.finish = reason
        text = self.text[self.sent:cut] if cut > self.sent else ""
        self.sent = max(self.sent, cut)
        tokens = tuple(self._pending)
        self._pending.clear()
        return Emit(text, tokens, reason)
