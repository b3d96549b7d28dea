"""Incremental detokenisation for streaming, with stop strings.

Decoding token by token breaks in two ways: a multi-byte UTF-8 character split over several byte-level
tokens decodes to U+FFFD until its last byte arrives, and SentencePiece-style tokenizers drop a word's
leading space when a token is decoded without its left context. The offsets below are TGI's and vLLM's
answer (``decode_token`` / ``detokenize_incrementally``): decode a short window with left context twice
(up to the last emitted token, and up to now) and emit the difference only once it does not end in U+FFFD.

Stop strings are matched on the decoded text; text that could still be the start of a stop string is held
back (``"hello ST"`` with stop ``"STOP"`` emits ``"hello "`` and waits), so a client never receives part of
a stop string.
"""
from __future__ import annotations

REPLACEMENT = "\ufffd"
PROMPT_CONTEXT = 5  # prompt tokens of left context (vLLM INITIAL_INCREMENTAL_DETOKENIZATION_OFFSET)


class IncrementalDetokenizer:
    def __init__(self, tokenizer, prompt_ids: list[int] = (), stop_strings: list[str] = (),
                 skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids: list[int] = list(prompt_ids[-PROMPT_CONTEXT:])
        self.prefix_offset = 0
        self.read_offset = len(self.ids)
        self.stop_strings = [s for s in stop_strings if s]
        self.pending = ""  # decoded, not yet emitted (may start a stop string)
        self.text = ""  # everything emitted so far
        self.stopped = False

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def _decode_new(self) -> str:
        prefix = self._decode(self.ids[self.prefix_offset:self.read_offset])
        full = self._decode(self.ids[self.prefix_offset:])
        if len(full) > len(prefix) and not full.endswith(REPLACEMENT):
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
            return full[len(prefix):]
        return ""

    def push(self, new_ids: list[int]) -> str:
        """Add generated ids; return the text that may be streamed now (possibly ""). Sets ``stopped`` when a
        stop string appears: the returned text then ends right before it."""
        if self.stopped:
            return ""
        self.ids.extend(new_ids)
        self.pending += self._decode_new()
        return self._release()

    def flush(self) -> str:
        """End of generation: whatever is still held back (incomplete trailing bytes decode to U+FFFD)."""
        if self.stopped:
            return ""
        done = self._decode(self.ids[self.prefix_offset:self.read_offset])
        rest = self._decode(self.ids[self.prefix_offset:])[len(done):]
        self.prefix_offset = self.read_offset = len(self.ids)
        out, self.pending = self.pending + rest, ""
        self.text += out
        return out

    def _release(self) -> str:
        if not self.stop_strings:
            out, self.pending = self.pending, ""
            self.text += out
            return out
        hits = [(i, s) for s in self.stop_strings if (i := self.pending.find(s)) >= 0]
        if hits:
            cut = min(i for i, _ in hits)
            out, self.pending = self.pending[:cut], ""
            self.stopped = True
            self.text += out
            return out
        hold = 0
        for s in self.stop_strings:
            for k in range(min(len(s) - 1, len(self.pending)), hold, -1):
                if self.pending.endswith(s[:k]):
                    hold = k
                    break
        out = self.pending[:len(self.pending) - hold]
        self.pending = self.pending[len(self.pending) - hold:]
        self.text += out
        return out
