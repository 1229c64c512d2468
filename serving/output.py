"""The output thread: detokenization, stop strings and streaming, off the decode thread.

The decode thread hands each step's new tokens over in one `put` and goes on with the next
step; this thread turns them into text (incremental detokenization, serving/detokenize.py),
looks for stop strings, and puts Events on the requests' streams. What needs only token ids
— end of sequence, max_tokens — the decode thread decides itself and passes along as the
finish reason, so it frees those rows at once. A stop string is found here: the sequence
is marked `stopped` and the decode thread drops it at its next step (a token or two may be
computed in between; they are never streamed).

Every Event of a running request goes through here, errors and cancellations included, so
a request's events keep their order.
"""

from __future__ import annotations

import logging
import queue
import threading
from dataclasses import dataclass

from .detokenize import IncrementalText
from .sampling import SamplingParams

log = logging.getLogger("deltafleet.serving")


@dataclass
class Event:
    text: str
    token_ids: list[int]
    finish_reason: str | None = None  # "stop" | "length" | "cancelled" | None while running
    error: Exception | None = None  # an engine.EngineError
    prompt_tokens: int = 0
    completion_tokens: int = 0


@dataclass
class Emission:
    """What the output thread knows of one request; the decode thread's Sequence holds one."""

    stream: object  # engine.RequestStream
    params: SamplingParams
    prompt_tokens: int
    detok: IncrementalText
    emitted: int = 0  # characters of the completion text already streamed
    stopped: bool = False  # ended here (a stop string): the decode thread drops it at its next step
    ended: bool = False  # its last Event was put: nothing more is streamed


@dataclass
class Token:
    """A new token of a request: `finish` is "stop" (an end-of-sequence token: not part of
    the completion), "length" (its last token) or None; `count` = completion tokens so far."""

    out: Emission
    token: int
    count: int
    finish: str | None = None


@dataclass
class End:
    """A request ends without a new token (cancelled, failed): this Event is its last."""

    out: Emission
    event: Event


class OutputThread:
    def __init__(self, error: type[Exception]) -> None:
        self.error = error  # the engine's EngineError: what the API turns into an OpenAI error
        self.failure: str | None = None  # set if the thread itself stopped on an unexpected error
        self._q: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._loop, name="deltafleet-output", daemon=True)
        self._thread.start()

    def put(self, items: list[Token | End]) -> None:
        """One step's tokens and endings, in order."""
        if items:
            self._q.put(items)

    def close(self, timeout: float = 10.0) -> None:
        """Stream everything already put, then stop."""
        self._q.put(None)
        self._thread.join(timeout)

    def _loop(self) -> None:
        try:
            while (items := self._q.get()) is not None:
                for item in items:
                    try:
                        if isinstance(item, End):
                            self._end(item.out, item.event)
                        else:
                            self._token(item)
                    except Exception as e:  # a tokenizer failure ends that request only
                        log.exception("output thread: streaming a token failed")
                        item.out.stopped = True  # the decode thread drops its row at the next step
                        self._end(item.out, Event("", [], error=self.error(f"detokenization failed: {type(e).__name__}: {e}")))
        except Exception as e:  # noqa: BLE001 - outside one item's handling: say so rather than die silently
            log.exception("output thread: unexpected error; the replica's health check now fails")
            self.failure = f"output thread stopped: {type(e).__name__}: {e}"

    def _end(self, out: Emission, event: Event) -> None:
        if not out.ended:
            out.ended = True
            out.stream.put(event)

    def _token(self, t: Token) -> None:
        out = t.out
        if out.ended:  # already stopped by a stop string: tokens computed since are dropped
            return
        if t.finish == "stop":  # end of sequence: the token is not part of the completion
            self._finish(out, t, "stop", [])
            return
        out.detok.add(t.token)
        text, stops = out.detok.text, out.params.stop
        for stop in stops:
            at = text.find(stop, max(0, out.emitted - len(stop)))
            if at >= 0:
                out.stopped = True
                self._end(out, self._final(out, t, text[out.emitted:at], [], "stop"))
                return
        if t.finish == "length":
            self._finish(out, t, "length", [t.token])
            return
        hold = max((len(s) for s in stops), default=1) - 1  # a stop string may still be forming
        end = len(text) - hold
        if end > out.emitted:
            out.stream.put(Event(text[out.emitted:end], [t.token], None))
            out.emitted = end
        else:
            out.stream.put(Event("", [t.token], None))

    def _finish(self, out: Emission, t: Token, reason: str, ids: list[int]) -> None:
        out.detok.flush()  # a character still incomplete at the end is emitted as it is
        self._end(out, self._final(out, t, out.detok.text[out.emitted:], ids, reason))

    @staticmethod
    def _final(out: Emission, t: Token, text: str, ids: list[int], reason: str) -> Event:
        return Event(text, ids, reason, None, out.prompt_tokens, t.count)
