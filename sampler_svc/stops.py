"""The text of a growing completion: decoded and searched for stop strings incrementally.

Both run on the event loop for every token of every row, so each costs work in proportion
to the new text, never to the sequence so far:

- `IncrementalDecoder` decodes only a small window of tokens per token, the way vLLM's
  detokenizer does: the piece of text returned last is decoded again with the new tokens, as
  context (a decoder may treat a leading token differently, e.g. strip a space), and the new
  text is what the window adds to it. While the window's text ends in U+FFFD the last
  character may be an incomplete multi-byte one whose bytes span tokens: it is returned
  once complete (the text before it at once). For byte-level tokenizers (GPT-2, Llama 3,
  Qwen) the concatenated pieces are exactly the full decode of the tokens.
- `StopScanner` searches each new piece plus the last `longest stop - 1` characters before
  it, the only text a stop string ending in the new piece can span, and holds those
  characters back from the stream until they cannot start a stop string any more, so a
  streamed completion never shows the beginning of a stop string that later matches.
"""

from __future__ import annotations

from headway.modeling import Tokenizer

REPLACEMENT = "\ufffd"  # what a decoder yields for bytes that are not (yet) a character
# Tokens held back waiting for a character to complete before the text is released anyway.
# Valid UTF-8 needs at most 3 (a character is at most 4 bytes, a token at least 1), so only
# a stream of invalid bytes reaches it; there the replacement characters around the point
# of release may differ from a full decode, but the work per token stays bounded.
MAX_HOLD_TOKENS = 32


class IncrementalDecoder:
    """Text of a token sequence that grows one token at a time (special tokens skipped)."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self.tokens: list[int] = []
        self._prefix = 0  # tokens[_prefix:_read]: the last piece returned, kept as context
        self._read = 0  # tokens before this one are returned as text
        self._prefix_text = ""  # decode(tokens[_prefix:_read])
        self._early = 0  # characters after _prefix_text returned before _read moved
        self.decoded_tokens = 0  # work done: tokens passed to the tokenizer

    def _decode(self, start: int, end: int | None = None) -> str:
        ids = self.tokens[start:end]
        self.decoded_tokens += len(ids)
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def push(self, token: int) -> str:
        """Append `token`; the text it completes (not a character that may be incomplete)."""
        self.tokens.append(token)
        text = self._decode(self._prefix)
        incomplete = text.endswith(REPLACEMENT)
        held = len(text) <= len(self._prefix_text) or incomplete
        if held and len(self.tokens) - self._read <= MAX_HOLD_TOKENS:
            # Everything before the last character is final already (UTF-8 decoding never
            # revisits it): return that much now, a stop string may end there.
            start = len(self._prefix_text) + self._early
            early = text[start : len(text) - incomplete]
            self._early += len(early)
            return early
        # Forced only on an incomplete character: without one it is a character boundary.
        return self._advance(text, forced=incomplete)

    def flush(self) -> str:
        """The text still held back, at the end of the sequence."""
        if self._read == len(self.tokens):
            return ""
        return self._advance(self._decode(self._prefix), forced=False)

    def _advance(self, text: str, *, forced: bool) -> str:
        new = text[len(self._prefix_text) + self._early :]
        self._early = 0
        if forced:  # no character boundary to keep as context: start afresh
            self._prefix = self._read = len(self.tokens)
            self._prefix_text = ""
        else:
            # Decoded on its own, not cut from `text`: a decoder may render a window's first
            # token differently (a SentencePiece space), and the next window starts there.
            self._prefix, self._read = self._read, len(self.tokens)
            self._prefix_text = self._decode(self._prefix, self._read)
        return new


class StopScanner:
    """Cuts text that arrives in pieces at the first occurrence of any stop string."""

    def __init__(self, stops: list[str]) -> None:
        self.stops = stops
        # Characters of the text so far that a stop string ending in a later piece can span.
        self.overlap = max((len(s) for s in stops), default=1) - 1
        self._pending = ""  # text not released yet: at most `overlap` characters
        self.searched_chars = 0  # work done: characters searched, summed over stop strings

    def feed(self, piece: str) -> tuple[str, bool]:
        """Add `piece`; (text released, True if a stop string was found).

        On a stop the text before it is released, the stop string and anything after it
        never are; feed nothing more after that.
        """
        if not self.stops:
            return piece, False
        if not piece:
            return "", False
        window = self._pending + piece
        cut = -1
        for stop in self.stops:
            self.searched_chars += len(window)
            at = window.find(stop)
            if at != -1 and (cut == -1 or at < cut):
                cut = at
        if cut != -1:
            self._pending = ""
            return window[:cut], True
        keep = max(0, len(window) - self.overlap)
        self._pending = window[keep:]
        return window[:keep], False

    def finish(self) -> str:
        """The text held back, released at the end of the sequence."""
        rest, self._pending = self._pending, ""
        return rest
