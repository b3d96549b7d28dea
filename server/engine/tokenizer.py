"""A deterministic byte-level tokenizer built in code, so the demo model and the tests need no download.

Ids: ``<pad>`` = 0, ``<bos>`` = 1, ``<eos>`` = 2, then byte ``b`` = 3 + b (vocab 259). It is a real HF
``PreTrainedTokenizerFast`` (``tokenizers`` BPE with no merges over GPT-2's byte-to-unicode alphabet), so
``decode`` of a partial multi-byte character yields U+FFFD, exactly like any byte-level BPE tokenizer: the
incremental detokenizer is tested against that behaviour.
"""
from __future__ import annotations

SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>")
NUM_SPECIAL = len(SPECIAL_TOKENS)
VOCAB_SIZE = NUM_SPECIAL + 256


def byte_level_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    byte_chars = _bytes_to_unicode()
    assert set(byte_chars) == set(alphabet), "tokenizers' byte-level alphabet changed"
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    vocab.update({byte_chars[b]: NUM_SPECIAL + b for b in range(256)})
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], fuse_unk=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>",
                                   clean_up_tokenization_spaces=False)


def _bytes_to_unicode() -> list[str]:
    """GPT-2's reversible byte -> printable unicode character map (openai/gpt-2 ``encoder.py``)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    table = dict(zip(bs, cs))
    return [chr(table[b]) for b in range(256)]
