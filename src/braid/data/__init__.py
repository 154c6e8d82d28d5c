"""braid.data: text in, token batches out.

- `tokenizer`: train a byte-level BPE / load a tokenizer.json; `Tok` (encode, decode, eot_id).
- `prep`: `prepare(...)` writes a dataset directory (token shards + tokenizer + manifest).
- `corpus`: `ensure_default_corpus(...)`, the built-in Shakespeare corpus, prepared once.
- `shards`: `TokenDataset`, `BatchLoader` and `val_batches` read a prepared dataset.
- `manifest` / `sources`: the on-disk format, and the input readers prep uses.

Nothing is imported here, so reading the config does not pull in torch or tokenizers.
"""
