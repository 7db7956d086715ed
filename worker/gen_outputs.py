"""The last stage of a generative world: sample each sequence's next token and answer.

``Outputs`` holds what the last stage knows of every sequence it decodes (how to answer it,
how to sample it, its text so far: worker.text_out) from the step that introduced it (its
``GenJoin``) to its end. ``sample`` takes one micro-batch's logits, picks a token for every
sequence that samples, and holds the answers for the world's ``Replier``:

* a stream gets a chunk whenever text becomes final, ``{"text": ...}`` with the token ids it
  covers in the chunk header (``tokens``); its last chunk adds ``finish_reason`` (``length`` or
  ``stop``), ``prompt_tokens`` and ``completion_tokens``, and the end marker repeats them;
* an ``infer`` request gets one result when it ends, the same keys with the whole text.

It returns ``{sid: (token, finished)}`` for rank 0, which extends or ends the sequences.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from mesh.messages import ClientKind
from worker.generative import GenerativeHandler
from worker.pipeline import GenJoin
from worker.sampling import SamplingParams, sample
from worker.text_out import TextOut
from worker.world import Replier


@dataclass(eq=False)
class SeqOut:
    rid: Any
    client_id: Any
    kind: str
    prompt_len: int
    text: TextOut
    chunks: int = 0  # chunks sent (a resumed stream counts those its client already has)
    pieces: list[str] = field(default_factory=list)  # an infer request's text so far


class Outputs:
    def __init__(self, handler: GenerativeHandler, replier: Replier) -> None:
        self.handler = handler
        self.replier = replier
        self._seqs: dict[int, SeqOut] = {}
        self.tokens_out = 0  # tokens sampled (a counter for the heartbeat)

    def __len__(self) -> int:
        return len(self._seqs)

    def __contains__(self, sid: int) -> bool:
        return sid in self._seqs

    def join(self, j: GenJoin) -> None:
        tokenizer = self.handler.tokenizer
        text = TextOut(SamplingParams.from_wire(j.params), tokenizer.token_bytes,
                       tokenizer.eos_token_id)
        text.replay(j.resume_tokens)
        self._seqs[j.sid] = SeqOut(j.rid, j.client_id, j.kind, j.prompt_len, text,
                                   chunks=j.resume_chunks)

    def drop(self, sid: int) -> None:
        self._seqs.pop(sid, None)

    def reply_to(self, sid: int) -> tuple[Any, Any] | None:
        out = self._seqs.get(sid)
        return None if out is None else (out.rid, out.client_id)

    def sample(self, sids: list[int], logits: Any) -> dict[int, tuple[int, bool]]:
        """Pick the next token of each sequence ``sids`` names (one row of ``logits`` each,
        in order), answer what became final, and return ``{sid: (token, finished)}``."""
        if int(logits.shape[0]) != len(sids):
            raise ValueError(f"the model returned {int(logits.shape[0])} rows of logits for "
                             f"{len(sids)} sequences that sample")
        outs = [self._seqs.get(sid) for sid in sids]
        live = [i for i, out in enumerate(outs) if out is not None]
        picked: dict[int, tuple[int, bool]] = {}
        if not live:
            return {sid: (-1, True) for sid in sids}
        rows = logits if len(live) == len(sids) else logits[live]
        tokens = sample(rows, [outs[i].text.params for i in live],  # type: ignore[union-attr]
                        [outs[i].text.generated for i in live])  # type: ignore[union-attr]
        self.tokens_out += len(tokens)
        for i, token in zip(live, tokens, strict=True):
            sid = sids[i]
            out = outs[i]
            assert out is not None
            picked[sid] = (token, self._deliver(sid, out, token))
        for sid in sids:
            picked.setdefault(sid, (-1, True))  # unknown here: it ended already
        return picked

    def _deliver(self, sid: int, out: SeqOut, token: int) -> bool:
        emit = out.text.push(token)
        if out.kind == ClientKind.STREAM:
            if emit.tokens or emit.finish:
                outputs: dict[str, Any] = {"text": emit.text}
                if emit.finish:
                    outputs.update(self._summary(out))
                self.replier.chunk(out.rid, out.client_id, out.chunks, outputs,
                                   list(emit.tokens))
                out.chunks += 1
            if emit.finish:
                self.replier.end(out.rid, out.client_id, out.chunks, self._summary(out))
        else:
            if emit.text:
                out.pieces.append(emit.text)
            if emit.finish:
                self.replier.result(out.rid, out.client_id,
                                    {"text": "".join(out.pieces), **self._summary(out)})
        if emit.finish:
            del self._seqs[sid]
            return True
        return False

    @staticmethod
    def _summary(out: SeqOut) -> dict[str, Any]:
        return {"finish_reason": out.text.finish, "prompt_tokens": out.prompt_len,
                "completion_tokens": out.text.generated}
