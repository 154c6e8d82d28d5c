"""Where prep's text comes from: files (text, .jsonl, .parquet), a cached HF dataset, or memory.

Contract: a `Source` streams `(piece, nbytes, ends_doc)` triples: consecutive pieces of one
document in order, `ends_doc` True on a document's last piece, `nbytes` the input bytes the
piece accounts for (for progress). Pieces are at most about `PIECE_CHARS` long and are cut just
before a whitespace run that follows a non-space character, which leaves a byte-level BPE's
ids unchanged, so a huge text file never has to sit in memory (or in one encode call) at once.
Empty documents are skipped. Unreadable input is a one-line DataError naming the file.

Formats: `.jsonl`/`.ndjson` (one JSON object per line, text in `text_field`), `.parquet`
(column `text_field`, needs pyarrow), anything else is UTF-8 text and is one document.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from braid.data.manifest import brief
from braid.errors import DataError

PIECE_CHARS = 1 << 18
JSONL_EXTS = (".jsonl", ".ndjson")
Piece = tuple[str, int, bool]


@dataclass
class Source:
    """One input: `name` for the manifest, `nbytes` for progress (None: unknown), `pieces`."""

    name: str
    nbytes: int | None
    pieces: Callable[[], Iterator[Piece]]


def cut_point(s: str, limit: int) -> int:
    """An index in (limit // 2, limit] to cut `s` at without changing byte-level BPE ids."""
    lo = limit // 2
    for ch in ("\n", " "):
        i = s.rfind(ch, lo, limit + 1)
        while i > lo:
            if not s[i - 1].isspace():
                return i
            i = s.rfind(ch, lo, i)
    return limit  # one enormous word: any cut is as good as another


def split_text(blocks: Iterable[str], limit: int = PIECE_CHARS) -> Iterator[str]:
    """Re-cut a stream of text blocks into pieces of at most `limit` characters."""
    buf = ""
    for block in blocks:
        buf += block
        while len(buf) > limit:
            i = cut_point(buf, limit)
            yield buf[:i]
            buf = buf[i:]
    if buf:
        yield buf


def document_pieces(text: str) -> Iterator[Piece]:
    """The pieces of one in-memory document (nothing for an empty one)."""
    pieces = list(split_text([text]))
    for k, p in enumerate(pieces):
        yield p, len(p.encode("utf-8")), k == len(pieces) - 1


def _mark_last(pieces: Iterator[str]) -> Iterator[Piece]:
    prev = None
    for p in pieces:
        if prev is not None:
            yield prev, len(prev.encode("utf-8")), False
        prev = p
    if prev is not None:
        yield prev, len(prev.encode("utf-8")), True


def _text_pieces(path: Path) -> Iterator[Piece]:
    def blocks() -> Iterator[str]:
        # newline="" keeps \r\n as written, so decoding the tokens gives the file back.
        with open(path, encoding="utf-8-sig", newline="") as f:
            while block := f.read(PIECE_CHARS * 4):
                if "\x00" in block:
                    raise DataError(
                        f"input {str(path)!r} looks binary (NUL bytes): pass text, .jsonl or "
                        ".parquet files"
                    )
                yield block

    try:
        yield from _mark_last(split_text(blocks()))
    except UnicodeDecodeError as e:
        raise DataError(
            f"input {str(path)!r} is not UTF-8 text (byte {e.start}): pass text, .jsonl or "
            ".parquet files"
        ) from None


def _jsonl_pieces(path: Path, field: str) -> Iterator[Piece]:
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except ValueError:
                raise DataError(
                    f"{str(path)!r} line {lineno} is not valid JSON: fix it or remove the line"
                ) from None
            if not isinstance(rec, dict) or field not in rec:
                keys = ", ".join(list(rec)[:8]) if isinstance(rec, dict) else "not an object"
                raise DataError(
                    f"{str(path)!r} line {lineno} has no field {field!r} ({keys}): "
                    "pass --text-field NAME"
                )
            text = rec[field]
            if text is None:
                continue  # a null text is an empty document
            if not isinstance(text, str):
                raise DataError(
                    f"{str(path)!r} line {lineno}: field {field!r} holds "
                    f"{type(text).__name__}, not text: pass --text-field NAME of a text field"
                )
            n = len(line)
            for piece, _, last in document_pieces(text):
                yield piece, (n if last else 0), last


def _parquet_pieces(path: Path, field: str) -> Iterator[Piece]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(
            f"reading {str(path)!r} needs pyarrow: pip install pyarrow (or pip install "
            "'braid[data]')"
        ) from None
    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises ArrowInvalid and friends
        raise DataError(f"{str(path)!r} is not a readable parquet file ({brief(e)})") from None
    names = pf.schema_arrow.names
    if field not in names:
        raise DataError(
            f"{str(path)!r} has no column {field!r} (columns: {', '.join(names[:8])}): "
            "pass --text-field NAME"
        )
    per_row = os.path.getsize(path) / max(1, pf.metadata.num_rows)
    for batch in pf.iter_batches(batch_size=1024, columns=[field]):
        for text in batch.column(0).to_pylist():
            if text is None:
                continue
            if not isinstance(text, str):
                raise DataError(
                    f"{str(path)!r} column {field!r} holds {type(text).__name__}, not text: "
                    "pass --text-field NAME of a string column"
                )
            for piece, _, last in document_pieces(text):
                yield piece, (int(per_row) if last else 0), last


def file_source(path: Path, text_field: str) -> Source:
    ext = path.suffix.lower()
    if ext in JSONL_EXTS:
        fn = lambda: _jsonl_pieces(path, text_field)
    elif ext == ".parquet":
        fn = lambda: _parquet_pieces(path, text_field)
    else:
        fn = lambda: _text_pieces(path)
    return Source(str(path), os.path.getsize(path), fn)


def expand_inputs(inputs: Iterable[str | Path]) -> list[Path]:
    """The input files: each file as given, each directory as its files (recursive, sorted).

    Hidden files and directories (names starting with '.') inside a directory are skipped.
    """
    files: list[Path] = []
    for item in inputs:
        p = Path(item).expanduser()
        if p.is_file():
            files.append(p.resolve())
        elif p.is_dir():
            found = sorted(
                f
                for f in p.rglob("*")
                if f.is_file() and not any(part.startswith(".") for part in f.relative_to(p).parts)
            )
            if not found:
                raise DataError(f"input directory {str(p)!r} has no files: pass text files")
            files.extend(f.resolve() for f in found)
        else:
            raise DataError(f"input {str(p)!r} does not exist: pass existing files or directories")
    return files


def hf_source(name: str, split: str, text_field: str) -> Source:
    """A Hugging Face dataset from the local cache only (offline: no network at run time)."""
    # The datasets library reads these when imported: set them first so it never goes online.
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        import datasets
    except ImportError:
        raise DataError(
            f"hf_dataset={name!r} needs the datasets library: pip install datasets "
            "(or pass text/jsonl/parquet files)"
        ) from None
    try:
        ds = datasets.load_dataset(name, split=split)
    except Exception as e:  # offline misses raise various ConnectionError/FileNotFound types
        raise DataError(
            f"hf_dataset={name!r} split={split!r} is not available offline ({brief(e)}): "
            "download it into the Hugging Face cache first, or pass files"
        ) from None
    if text_field not in ds.column_names:
        raise DataError(
            f"hf_dataset={name!r} has no column {text_field!r} (columns: "
            f"{', '.join(ds.column_names[:8])}): pass --text-field NAME"
        )

    def pieces() -> Iterator[Piece]:
        for batch in ds.iter(batch_size=1000):
            for text in batch[text_field]:
                if isinstance(text, str):
                    yield from document_pieces(text)

    return Source(f"hf:{name}:{split}", None, pieces)


def memory_source(name: str, documents: list[str]) -> Source:
    """Documents already in memory (the built-in corpus)."""

    def pieces() -> Iterator[Piece]:
        for doc in documents:
            yield from document_pieces(doc)

    return Source(name, sum(len(d.encode("utf-8")) for d in documents), pieces)
