"""Tokenizers: train a byte-level BPE, load any tokenizer.json, and a small `Tok` wrapper.

Contract: `train_bpe` is deterministic (same texts and vocab_size give the same tokenizer.json)
and its tokenizer round-trips every string exactly (`decode(encode(s)) == s`), because it is a
byte-level BPE with no normalizer and no prefix space. `load_tokenizer` accepts any
Hugging Face `tokenizers` JSON file and raises DataError when it is missing or unreadable.
`Tok` is what prep and generation use: plain lists of ids, no special tokens added on encode.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from braid.errors import DataError

EOT = "<|endoftext|>"
# End-of-text markers of common tokenizers, tried in order when a loaded tokenizer lacks EOT.
# DeepSeek-V3 spells its own with fullwidth bars and a "▁".
EOT_CANDIDATES = (
    EOT,
    "</s>",
    "<|end_of_text|>",
    "<eos>",
    "<|eot_id|>",
    "<|im_end|>",
    "[SEP]",
    "<\uff5cend\u2581of\u2581sentence\uff5c>",
)
# 256 byte symbols plus the end-of-text token: the smallest possible byte-level vocabulary.
MIN_VOCAB = 257


def train_bpe(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    """A byte-level BPE with `vocab_size` entries at most (fewer if the text runs out of pairs).

    Id 0 is `<|endoftext|>`; the next 256 ids are the byte alphabet, so any text encodes.
    """
    if not isinstance(vocab_size, int) or vocab_size < MIN_VOCAB:
        raise DataError(
            f"vocab_size={vocab_size!r}: a byte-level BPE needs at least {MIN_VOCAB} "
            "(256 bytes + <|endoftext|>)"
        )
    tok = Tokenizer(models.BPE())
    # add_prefix_space=False keeps decode(encode(s)) == s; the GPT-2 regex splits words.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        show_progress=False,
        special_tokens=[EOT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def load_tokenizer(path: str | Path) -> Tokenizer:
    """The tokenizer stored in the `tokenizers` JSON file at `path`."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"tokenizer {str(p)!r} does not exist: pass an existing tokenizer.json")
    try:
        return Tokenizer.from_file(str(p))
    except Exception as e:  # the Rust side raises plain Exception subclasses
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:120]
        raise DataError(
            f"tokenizer {str(p)!r} is not a valid tokenizer.json ({reason}): "
            "pass a file saved by the Hugging Face tokenizers library"
        ) from None


def find_eot(tok: Tokenizer, where: str = "tokenizer") -> int:
    """The id of the end-of-text token; DataError when the tokenizer has none we know."""
    for name in EOT_CANDIDATES:
        i = tok.token_to_id(name)
        if i is not None:
            return i
    raise DataError(
        f"{where} has no end-of-text token (looked for {', '.join(EOT_CANDIDATES)}): "
        f"add {EOT} as a special token"
    )


def id_bound(tok: Tokenizer) -> int:
    """One more than the largest id the tokenizer can emit (>= its vocab size if ids have gaps)."""
    vocab = tok.get_vocab(with_added_tokens=True)
    return max(tok.get_vocab_size(with_added_tokens=True), max(vocab.values(), default=-1) + 1)


class Tok:
    """A tokenizer as prep and generation see it: ids in, text out, plus `eot_id`."""

    def __init__(self, tokenizer: Tokenizer, where: str = "tokenizer"):
        self.tokenizer = tokenizer
        self.eot_id: int = find_eot(tokenizer, where)
        self.vocab_size: int = id_bound(tokenizer)

    @classmethod
    def from_file(cls, path: str | Path) -> Tok:
        return cls(load_tokenizer(path), where=f"tokenizer {str(path)!r}")

    def encode(self, text: str) -> list[int]:
        # No BOS/EOS from a post-processor: prep appends EOT itself, after each document.
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """`encode` of each text, run in parallel by the tokenizers library."""
        # encode_batch_fast (tokenizers >= 0.20) skips offsets: twice as fast, same ids.
        fn = getattr(self.tokenizer, "encode_batch_fast", self.tokenizer.encode_batch)
        return [e.ids for e in fn(texts, add_special_tokens=False)]

    def decode(self, ids: list[int]) -> str:
        # Keep special tokens so document boundaries stay visible and round trips are exact.
        return self.tokenizer.decode(list(ids), skip_special_tokens=False)

    def save(self, path: str | Path) -> None:
        self.tokenizer.save(str(path))
