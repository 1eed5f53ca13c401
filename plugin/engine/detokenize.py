"""Token ids → text, one step's new tokens at a time.

Re-detokenising a stream's whole hypothesis after every step costs O(utterance length) per step
(quadratic per utterance) and used to run under the engine lock that `feed()` waits on. A
SentencePiece text is the concatenation of its pieces with "▁" read as a space, so each step only
looks up the pieces of its new tokens (memoised per id). Tokenizers where that does not hold (byte
fallback, pieces that decode differently alone) are detected once at load and decoded whole instead.
"""

from __future__ import annotations

import logging
import random

logger = logging.getLogger("pipecat_nemotron.engine")

_SPACE = "\u2581"


def _normalised(text: str) -> str:
    return " ".join(text.split())


class PieceTable:
    """Per-id text of a tokenizer's pieces, or None if the tokenizer is not piece-concatenative."""

    def __init__(self, tokenizer):
        self._tokenizer = tokenizer
        self._text: dict[int, str] = {}
        self.incremental = self._check()

    def text_of(self, ids: list[int]) -> str:
        """The whole decode, as the tokenizer does it."""
        return self._tokenizer.ids_to_text(ids) if ids else ""

    def piece(self, token_id: int) -> str:
        text = self._text.get(token_id)
        if text is None:
            piece = self._tokenizer.ids_to_tokens([token_id])[0]
            # a piece decodes alone as in context, except the word-start space that a whole decode keeps
            text = (" " if piece.startswith(_SPACE) else "") + self._tokenizer.ids_to_text([token_id])
            self._text[token_id] = text
        return text

    def _check(self) -> bool:
        """Whether joining pieces equals the tokenizer's own decode, on every id and on random sequences."""
        vocab = getattr(self._tokenizer, "vocab_size", 0) or 0
        if not vocab or not hasattr(self._tokenizer, "ids_to_tokens"):
            return False
        try:
            for token_id in range(vocab):
                piece = self._tokenizer.ids_to_tokens([token_id])[0]
                if piece.startswith("<0x") or _normalised(self.piece(token_id)) != _normalised(
                        self.text_of([token_id])):
                    return False
            rng = random.Random(0)
            for _ in range(50):
                ids = [rng.randrange(vocab) for _ in range(rng.randrange(1, 40))]
                if _normalised("".join(self.piece(i) for i in ids)) != _normalised(self.text_of(ids)):
                    return False
        except Exception:  # any oddity: decode whole hypotheses instead
            logger.debug("tokenizer pieces cannot be joined; decoding whole hypotheses", exc_info=True)
            return False
        return True


class Detokenizer:
    """One stream's text so far; `update()` with the hypothesis after each step (engine thread only)."""

    def __init__(self, table: PieceTable):
        self._table = table
        self._count = 0
        self._last: int | None = None
        self._text = ""

    def reset(self) -> None:
        """A new utterance: the hypothesis starts again."""
        self._count, self._last, self._text = 0, None, ""

    def update(self, token_ids: list[int]) -> str:
        """The raw text (tags included) of `token_ids`, which extend the previous call's ids."""
        if not self._table.incremental:
            return self._table.text_of(token_ids)
        count = len(token_ids)
        if count < self._count or (self._count and token_ids[self._count - 1] != self._last):
            self.reset()  # not a continuation: start over
        for token_id in token_ids[self._count:]:
            self._text += self._table.piece(token_id)
        self._count = count
        self._last = token_ids[-1] if token_ids else None
        return self._text.strip()
