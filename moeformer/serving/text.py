"""Text of a token stream as it grows: incremental detokenization and stop strings.

A token does not always end on a character boundary (byte-level vocabularies split UTF-8 sequences) and some
tokenizers decode a token differently depending on its left neighbour (a leading space), so new text is the decode
of a short window of recent tokens minus the decode of the window without the new ones, and is held back while it
ends in an incomplete character. Text that could still be the start of a stop string is held back too, until it
either completes the stop string (the text ends before it) or cannot anymore.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Protocol

REPLACEMENT = "\ufffd"  # what a decoder gives for an incomplete UTF-8 sequence
CONTEXT = 4  # prompt ids decoded before the first new ones (enough for a word boundary or a split character)


class Decoder(Protocol):
    vocab_size: int

    def decode(self, ids: Iterable[int]) -> str: ...


class IncrementalDetokenizer:
    """Turns token ids, pushed as they are generated, into text pieces whose concatenation is the decode of all.

    `context`: the last prompt ids, decoded with the first new ones so that their text is the one they have after
    the prompt. Ids outside the tokenizer's vocabulary (a model's padded rows) are dropped.
    """

    def __init__(self, tokenizer: Decoder, context: Sequence[int] = ()) -> None:
        self.tokenizer = tokenizer
        self.ids = [i for i in context[-CONTEXT:] if 0 <= i < tokenizer.vocab_size]
        self.prefix = 0  # window start: ids before it are final
        self.read = len(self.ids)  # ids before it have been turned into text

    def push(self, ids: Iterable[int]) -> str:
        """The text the new `ids` complete (may be empty while a character is incomplete)."""
        self.ids.extend(i for i in ids if 0 <= i < self.tokenizer.vocab_size)
        if len(self.ids) == self.read:
            return ""
        done = self.tokenizer.decode(self.ids[self.prefix : self.read])
        text = self.tokenizer.decode(self.ids[self.prefix :])
        if len(text) <= len(done) or text.endswith(REPLACEMENT):
            return ""
        self.prefix, self.read = self.read, len(self.ids)
        return text[len(done) :]

    def flush(self) -> str:
        """The text still held back (an incomplete character at the end of the stream decodes as U+FFFD)."""
        done = self.tokenizer.decode(self.ids[self.prefix : self.read])
        text = self.tokenizer.decode(self.ids[self.prefix :])
        self.prefix = self.read = len(self.ids)
        return text[len(done) :]


class StopMatcher:
    """Cuts a stream of text pieces at the first occurrence of any stop string.

    `push` returns the text that is safe to show: everything except a tail that is the beginning of a stop string.
    Once a stop string is complete, `stopped` is set and the text ends right before it (of overlapping stop strings,
    the one that completes first).
    """

    def __init__(self, stops: Sequence[str] = ()) -> None:
        if any(not s for s in stops):
            raise ValueError("stop strings must not be empty")
        self.stops = tuple(stops)
        self.pending = ""
        self.stopped = False

    def push(self, text: str) -> str:
        if self.stopped:
            return ""
        self.pending += text
        found = [(i + len(s), i) for s, i in ((s, self.pending.find(s)) for s in self.stops) if i >= 0]
        if found:  # the stop string completed first (the longest of those ending there) wins, however text is split
            out, self.pending, self.stopped = self.pending[: min(found)[1]], "", True
            return out
        hold = max((k for s in self.stops for k in range(1, len(s)) if self.pending.endswith(s[:k])), default=0)
        out, self.pending = self.pending[: len(self.pending) - hold], self.pending[len(self.pending) - hold :]
        return out

    def flush(self) -> str:
        """The held-back tail, at the end of the stream (no stop string completed it)."""
        out, self.pending = ("" if self.stopped else self.pending), ""
        return out


class CompletionText:
    """The text of one completion: its new token ids detokenized after the prompt's, cut at the first stop string."""

    def __init__(self, tokenizer: Decoder, prompt_ids: Sequence[int], stops: Sequence[str] = ()) -> None:
        self.detokenizer = IncrementalDetokenizer(tokenizer, prompt_ids)
        self.matcher = StopMatcher(stops)

    @property
    def stopped(self) -> bool:
        """A stop string has appeared: the text is complete."""
        return self.matcher.stopped

    def push(self, ids: Iterable[int]) -> str:
        return self.matcher.push(self.detokenizer.push(ids))

    def finish(self) -> str:
        """The rest of the text at the end of the stream."""
        return self.matcher.push(self.detokenizer.flush()) + self.matcher.flush()
