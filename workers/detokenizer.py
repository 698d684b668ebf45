"""`IncrementalDetokenizer`: one request's generated token ids turned into streamed text.

Two layers, each holding back a little text:
- the token window (vLLM's prefix_offset/read_offset, with the tokens before prefix_offset dropped):
  `tokens` is the last batch of tokens already read (the context) plus the tokens read since; each
  `add` decodes only this window and emits what lies beyond the text already sent. It starts on a few
  prompt tokens so that decoders that strip a leading space (SentencePiece) treat the first output
  token as a full decode would;
- the stop filter: text that could still be the beginning of a stop string waits until it is not.

Invariants:
- `tokens[:read_offset]` (the context) decodes to text that ends on a whole character, so decoding the
  window always begins with that text and everything after it is new;
- the first `sent` chars of the window's decode are accounted for (the context, or already emitted);
  they never include a trailing U+FFFD, which may be a character whose bytes have not all arrived;
- `held` is the longest suffix of the text past the token layer that is a prefix of some stop string,
  so the emitted text never contains the start of a stop string that later completes;
- stop matching costs memory and time linear in the text streamed, whatever the stop strings' length:
  each stop string has a streaming Knuth-Morris-Pratt matcher (`_StopMatcher`) whose state is the
  length of the longest suffix of the text that is a prefix of that stop string, and whose failure
  table is built only as far as that state has reached (a 1 MB stop string costs nothing up front);
- with no stop string matched, everything returned by `add` and `flush` concatenates to
  `tokenizer.decode(output_ids, skip_special_tokens=...)` for byte-level BPE tokenizers.
"""

from __future__ import annotations

from array import array

_REPLACEMENT = "\ufffd"  # what a decoder writes for bytes that are not (yet) a whole UTF-8 character

# Prompt tokens that seed the window; a few are enough for any decoder's leading-space rule.
_PROMPT_CONTEXT_TOKENS = 5


class IncrementalDetokenizer:
    """Turns a request's generated token ids into text, a few tokens at a time."""

    __slots__ = (
        "_held",
        "_matchers",
        "_pieces",
        "_read_offset",
        "_sent",
        "_skip_ids",
        "_stopped",
        "_tokenizer",
        "_tokens",
    )

    def __init__(self, tokenizer, prompt_token_ids: list[int], stop: list[str] = (), skip_special_tokens: bool = True):
        if any(not s for s in stop):
            raise ValueError("stop strings must be non-empty; an empty one would match before any text")
        self._tokenizer = tokenizer
        # `all_special_ids` is recomputed on each access by some tokenizers: read it once.
        self._skip_ids = frozenset(tokenizer.all_special_ids) if skip_special_tokens else frozenset()
        self._matchers = tuple(_StopMatcher(s) for s in stop)
        self._held = ""
        self._pieces: list[str] = []
        self._stopped = False

        self._tokens = self._to_tokens(prompt_token_ids[-_PROMPT_CONTEXT_TOKENS:])
        context = self._decode(self._tokens)
        if context.endswith(_REPLACEMENT):
            # The prompt ends inside a character: its continuation bytes belong to the output's text
            # (as U+FFFD, as decoding the output alone gives), so no prompt context is used.
            self._tokens, context = [], ""
        self._read_offset = len(self._tokens)
        self._sent = len(context)

    @property
    def text(self) -> str:
        """Everything emitted so far (after stop truncation)."""
        return "".join(self._pieces)

    def add(self, token_ids: list[int]) -> tuple[str, bool]:
        """Append new output tokens. Returns (text that may be emitted now, stopped).

        stopped is True when a stop string appeared: the returned text ends right before the stop
        string's first occurrence and the stop string itself is never emitted; no further add() calls follow.
        """
        if self._stopped:
            raise RuntimeError("add() after a stop string: the request is already finished")
        new_tokens = self._to_tokens(token_ids)
        if not new_tokens:
            return "", False
        self._tokens.extend(new_tokens)
        return self._filter_stops(self._decode_window(final=False))

    def flush(self) -> str:
        """At finish (not by a stop string): the text still held back, to be emitted last."""
        if self._stopped:
            return ""
        # A stop string can only be in text the token layer held (it ended in U+FFFD); cut it there too.
        out, _ = self._filter_stops(self._decode_window(final=True), final=True)
        return out

    def _to_tokens(self, token_ids: list[int]) -> list[str]:
        if self._skip_ids:
            token_ids = [i for i in token_ids if i not in self._skip_ids]
        return self._tokenizer.convert_ids_to_tokens(token_ids)

    def _decode(self, tokens: list[str]) -> str:
        return self._tokenizer.convert_tokens_to_string(tokens) if tokens else ""

    def _decode_window(self, final: bool) -> str:
        """The token layer: new text of whole characters (at `final`, whatever remains)."""
        if self._read_offset == len(self._tokens):
            return ""
        text = self._decode(self._tokens)
        if text.endswith(_REPLACEMENT) and not final:
            # The last character may be incomplete. Text before the trailing run of U+FFFD ends on a
            # whole character, so decoding more bytes cannot change it: send it now, keep the run.
            end = len(text.rstrip(_REPLACEMENT))
            delta = text[self._sent : end]
            self._sent = max(self._sent, end)
            return delta
        delta = text[self._sent :]
        # The window ends on a whole character: the tokens just read become the next window's context,
        # and tokens before it are never decoded again.
        del self._tokens[: self._read_offset]
        self._read_offset = len(self._tokens)
        self._sent = len(self._decode(self._tokens))
        return delta

    def _filter_stops(self, delta: str, final: bool = False) -> tuple[str, bool]:
        """The stop layer: cut at the first stop string, hold back a possible start of one."""
        if not self._matchers:
            self._pieces.append(delta)
            return delta, False
        held = len(self._held)
        text = self._held + delta
        # `held` contains no whole stop string, so any match ends in `delta`. The first stop string to
        # complete wins (the one a token-at-a-time stream meets first); on a tie, the earliest start.
        first = None
        for m in self._matchers:
            end = m.feed(delta)
            if end >= 0:
                end += held
                start = end - len(m.stop)
                if first is None or (end, start) < first:
                    first = (end, start)
        if first is not None:
            out, self._held, self._stopped = text[: first[1]], "", True
        else:
            # Each matcher's state is its stop string's longest prefix that ends the text so far.
            keep = 0 if final else max(m.matched for m in self._matchers)
            out, self._held = text[: len(text) - keep], text[len(text) - keep :]
        self._pieces.append(out)
        return out, self._stopped


class _StopMatcher:
    """Streaming Knuth-Morris-Pratt search for one stop string over text fed piece by piece.

    `matched` is the length of the longest suffix of the text fed so far that is a proper prefix of
    `stop`. `_fail[q]` is the length of the longest proper border of `stop[: q + 1]`, computed only for
    q < the largest `matched` reached: the table grows with the text fed, not with the stop string.
    """

    __slots__ = ("_fail", "matched", "stop")

    def __init__(self, stop: str):
        self.stop = stop
        self.matched = 0
        self._fail = array("q", [0])

    def feed(self, text: str) -> int:
        """Advance over `text`; the index in `text` just past the stop string's first occurrence, or -1."""
        stop, fail, n = self.stop, self._fail, len(self.stop)
        j, i, end = self.matched, 0, len(text)
        while i < end:
            if j == 0:
                # Nothing matched: skip at C speed to the next character that could start the stop.
                i = text.find(stop[0], i)
                if i < 0:
                    break
                j, i = 1, i + 1
            else:
                c = text[i]
                while j and stop[j] != c:
                    j = fail[j - 1]
                if stop[j] == c:
                    j += 1
                i += 1
            if j == n:
                self.matched = 0
                return i
            if j > len(fail):
                self._extend(j)
        self.matched = j
        return -1

    def _extend(self, length: int) -> None:
        """Grow the failure table to `length` entries (the standard prefix-function recurrence)."""
        stop, fail = self.stop, self._fail
        k = fail[-1]
        for q in range(len(fail), length):
            c = stop[q]
            while k and stop[k] != c:
                k = fail[k - 1]
            if stop[k] == c:
                k += 1
            fail.append(k)
