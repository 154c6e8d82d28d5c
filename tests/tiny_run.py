"""Tiny training runs for the end-to-end tests: the tiny model, a corpus of random words
prepared for it, `train()` in this process with the loss it logs at each step, and the wait for
a training process to reach a step.

The corpus is `count` words drawn from a sentence's words by `random.Random(seed)`: the same
seed, words and count give the same bytes, so each test's data (and what it measured on it)
stays put.
"""

from __future__ import annotations

import random
import re
import subprocess
from pathlib import Path

from braid.config import load_config
from braid.train.log import TrainLogger
from braid.train.trainer import train

# The tiny model (2 layers of width 64, the default experts at 64 wide, a byte-level BPE of 300
# tokens); tests add their own [train] and [checkpoint] settings.
TINY_MODEL = [
    "--model.vocab_size=300",
    "--model.dim=64",
    "--model.n_heads=4",
    "--model.n_layers=2",
    "--model.ffn_hidden=128",
    "--moe.expert_hidden=64",
]


def write_words(path: Path, words: list[str], seed: int, count: int, files: int = 0) -> Path:
    """`count` words drawn from `words` by random.Random(seed), joined by spaces, into the file
    `path`; with `files` > 0, into the new folder `path` as 0.txt, 1.txt, ..., `count` words
    each (one generator throughout). Returns `path`."""
    rnd = random.Random(seed)
    if not files:
        path.write_text(" ".join(rnd.choice(words) for _ in range(count)))
        return path
    path.mkdir()
    for i in range(files):
        (path / f"{i}.txt").write_text(" ".join(rnd.choice(words) for _ in range(count)))
    return path


def prepare_words(
    root: Path, words: list[str], seed: int, count: int, files: int = 0, **prep
) -> Path:
    """`write_words` into root/"text.txt" (or the folder root/"text" with `files`), prepared
    into root/"data" with a 300-token BPE, 10% validation and no progress bars (`prep` overrides
    any of prepare()'s settings). Returns root/"data"."""
    from braid.data.prep import prepare

    text = write_words(root / ("text" if files else "text.txt"), words, seed, count, files)
    settings = {"vocab_size": 300, "val_fraction": 0.1, "progress": False, **prep}
    prepare([text], root / "data", **settings)
    return root / "data"


def train_logged(overrides: list[str]) -> tuple[dict[int, float], dict]:
    """train() in this process; returns ({step: train/loss}, final result)."""
    seen: dict[int, float] = {}
    original = TrainLogger.train

    def record(self, step, loss, *args, **kwargs):
        seen[step] = loss
        return original(self, step, loss, *args, **kwargs)

    TrainLogger.train = record
    try:
        result = train(load_config(None, overrides))
    finally:
        TrainLogger.train = original
    return seen, result


def read_until_step(proc: subprocess.Popen, step: int, steps: int) -> list[str]:
    """Read a training process's stderr (text) up to its log line of step `step` of `steps`;
    the lines read. Fails with the end of what it wrote if it ends before that step."""
    lines: list[str] = []
    while not any(re.match(rf"step +{step}/{steps} \| loss", line) for line in lines):
        line = proc.stderr.readline()
        assert line, "".join(lines)[-2000:]  # it ended before that step
        lines.append(line)
    return lines
