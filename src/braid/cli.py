"""The `braid` command: thin subcommands over the library.

User mistakes (BraidError) print one line and exit with code 2; `--debug` shows the traceback.
A training run stopped by SIGTERM exits with 143 after one line; a stdout closed early (`braid
info --knobs | head`) ends the command quietly with 141, as a process killed by SIGPIPE would.
"""

from __future__ import annotations

import argparse
import difflib
import errno
import os
import sys
from pathlib import Path

from braid.errors import BraidError


def _cmd_train(args, overrides: list[str]) -> int:
    from braid.config import load_config
    from braid.train.result import print_result
    from braid.train.signals import Stopped
    from braid.train.trainer import train

    cfg = load_config(args.config, overrides)
    try:
        result = train(cfg)
    except Stopped as e:
        if e.rank == 0:
            print(str(e), file=sys.stderr)
        return e.exit_code
    if result.get("rank", 0) == 0:
        print_result(result)
    return 0


def _cmd_info(args, overrides: list[str]) -> int:
    from braid.config import knob_docs, load_config
    from braid.info import describe

    cfg = load_config(args.config, overrides)  # checked with --knobs too: no typo passes
    if args.knobs:
        print(knob_docs())
        return 0
    print(describe(cfg, world=args.world, ep=args.ep))
    return 0


def _cmd_prep(args, overrides: list[str]) -> int:
    from braid.data.prep import prepare

    if not args.inputs and not args.hf_dataset:
        raise BraidError("braid prep needs input files/directories or --hf-dataset NAME")
    man = prepare(
        args.inputs,
        args.out,
        tokenizer=args.tokenizer,
        vocab_size=args.vocab_size,
        val_fraction=args.val_fraction,
        hf_dataset=args.hf_dataset,
        hf_split=args.hf_split,
        text_field=args.text_field,
    )
    splits = {k: v["tokens"] for k, v in man.get("splits", {}).items()} if "splits" in man else man
    print(f"prepared {args.out}: {splits}")
    return 0


def _cmd_generate(args, overrides: list[str]) -> int:
    import torch

    from braid.checkpoint.load import load_for_inference
    from braid.data.tokenizer import Tok
    from braid.generate import generate

    device = torch.device("cuda" if torch.cuda.is_available() and not args.cpu else "cpu")
    model, tok_path = load_for_inference(args.run, device)
    tok = Tok.from_file(tok_path)
    ids = tok.encode(args.prompt)
    if not ids:
        raise BraidError("the prompt encodes to no tokens: give some text with --prompt")
    gen = torch.Generator(device=device).manual_seed(args.seed)
    n_new = args.max_new_tokens
    if n_new is None:  # the default: 200 tokens, or what the context leaves room for
        n_new = max(1, min(200, model.cfg.max_seq_len - len(ids)))
    out = generate(
        model,
        torch.tensor([ids], device=device),
        n_new,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        generator=gen,
        stop_token=None if args.through_eot else tok.eot_id,
    )
    row = out[0].tolist()
    if not args.through_eot and len(row) > len(ids) and row[-1] == tok.eot_id:
        row = row[:-1]  # the document ended: print its text, not the end-of-text token
    print(tok.decode(row))
    return 0


def _cmd_runs(args, overrides: list[str]) -> int:
    from braid.metrics import format_runs
    from braid.metrics.experiments import ExperimentsDB

    root = Path(args.run_dir)
    if not (root / "experiments.db").exists():
        raise BraidError(f"no runs recorded under {root}: train first, or pass --run.dir=RUN_ROOT")
    print(format_runs(ExperimentsDB(root, read_only=True).list_runs()))
    return 0


def _cmd_report(args, overrides: list[str]) -> int:
    from braid.metrics.report import write_report

    if not Path(args.run_dir).is_dir():
        raise BraidError(f"{args.run_dir} is not a directory: give a run directory to report on")
    print(write_report(Path(args.run_dir)))
    return 0


def _cmd_dash(args, overrides: list[str]) -> int:
    from braid.dash import require_extras

    require_extras()
    from braid.dash.app import serve

    serve(args.run_dir or args.root, args.host, args.port, allow_remote=args.allow_remote)
    return 0


def _cmd_export(args, overrides: list[str]) -> int:
    if args.format == "hf":
        from braid.hf.exporter import export_hf

        print(
            export_hf(
                Path(args.run),
                Path(args.out),
                arch=args.arch,
                dtype=args.dtype or "bf16",
                max_shard_size=args.max_shard_size or "5GB",
            )
        )
        return 0
    if args.arch or args.dtype or args.max_shard_size:
        raise BraidError("--arch, --dtype and --max-shard-size are for --format hf")
    from braid.checkpoint.export import export

    print(export(Path(args.run), Path(args.out)))
    return 0


def _cmd_import(args, overrides: list[str]) -> int:
    from braid.hf.importer import import_hf

    print(import_hf(Path(args.hf_dir), Path(args.out)))
    return 0


# Storage problems the user fixes (permissions, a read-only or full disk): one line, exit 2.
_USER_OS_ERRORS = (
    errno.EACCES,
    errno.EPERM,
    errno.EROFS,
    errno.ENOSPC,
    errno.EDQUOT,
    errno.ENOTDIR,  # a path the user gave names a file where a directory goes
)


class _Parser(argparse.ArgumentParser):
    """argparse with the house error format: one line, exit code 2 (no usage block)."""

    def error(self, message: str):  # type: ignore[override]
        if message.endswith("required: cmd"):  # `braid` alone, or only options
            message = f"give a command: {', '.join(_commands(self))}"
        print(f"error: {self.prog}: {message} (see {self.prog} --help)", file=sys.stderr)
        sys.exit(2)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="braid", description="Mixture-of-Experts training.")
    p.add_argument("--debug", action="store_true", help="show tracebacks for user errors")
    sub = p.add_subparsers(dest="cmd", required=True)

    t = sub.add_parser(
        "train",
        help="train a model (default: tiny on the built-in corpus)",
        epilog="Override any config key with --section.key=value; `braid info --knobs` lists them.",
    )
    t.add_argument("config", nargs="?", default=None, help="a .toml file or a built-in name")
    t.set_defaults(fn=_cmd_train)

    i = sub.add_parser("info", help="parameters, FLOPs and memory of a config")
    i.add_argument(
        "config", nargs="?", default=None, help="a .toml file or a built-in name (default: tiny)"
    )
    i.add_argument(
        "--ep", type=_positive_int, default=None, help="expert-parallel size to size memory for"
    )
    i.add_argument("--world", type=_positive_int, default=None, help="number of GPUs (default: ep)")
    i.add_argument("--knobs", action="store_true", help="print every config key with its doc")
    i.set_defaults(fn=_cmd_info)

    d = sub.add_parser("prep", help="tokenize text/jsonl/parquet into .npy shards")
    d.add_argument("inputs", nargs="*", help="files or directories")
    d.add_argument("--out", required=True, help="output directory")
    d.add_argument("--tokenizer", default=None, help="an existing tokenizer.json")
    d.add_argument("--vocab-size", type=int, default=2048, help="BPE size when training one")
    d.add_argument(
        "--val-fraction", type=float, default=0.05, help="share of tokens held out (0.05)"
    )
    d.add_argument("--hf-dataset", default=None, help="a Hugging Face dataset in the local cache")
    d.add_argument("--hf-split", default="train", help="--hf-dataset's split (train)")
    d.add_argument(
        "--text-field", default="text", help="jsonl/parquet/dataset column with the text (text)"
    )
    d.set_defaults(fn=_cmd_prep)

    g = sub.add_parser("generate", help="sample text from a trained run")
    g.add_argument("--run", required=True, help="a run directory or an exported directory")
    g.add_argument("--prompt", required=True, help="the text to continue")
    g.add_argument(
        "--max-new-tokens",
        type=int,
        default=None,
        help="tokens to sample (default: 200, or as many as the context allows)",
    )
    g.add_argument(
        "--temperature", type=float, default=0.8, help="0 samples greedily (default: 0.8)"
    )
    g.add_argument("--top-k", type=int, default=50, help="0 keeps every token (default: 50)")
    g.add_argument("--top-p", type=float, default=0.95, help="nucleus mass (default: 0.95)")
    g.add_argument("--seed", type=int, default=0, help="sampling seed (default: 0)")
    g.add_argument(
        "--through-eot",
        action="store_true",
        help="sample past the end-of-text token (default: stop at the end of the document)",
    )
    g.add_argument("--cpu", action="store_true", help="run on the CPU even if a GPU is there")
    g.set_defaults(fn=_cmd_generate)

    r = sub.add_parser("runs", help="list recorded runs")
    r.add_argument(
        "--run.dir",
        "--dir",
        dest="run_dir",
        default="runs",
        help="the run.dir root (as in train's --run.dir; --dir is the old spelling)",
    )
    r.set_defaults(fn=_cmd_runs)

    rep = sub.add_parser("report", help="write report.html for a run")
    rep.add_argument("run_dir", help="a run directory (<run.dir>/<run id>)")
    rep.set_defaults(fn=_cmd_report)

    dash = sub.add_parser("dash", help="live dashboard of the runs under a run root")
    dash.add_argument("root", nargs="?", default="runs", help="the run.dir root (default: runs)")
    dash.add_argument(
        "--run.dir", dest="run_dir", default=None, help="the same, as train spells it"
    )
    dash.add_argument("--host", default="127.0.0.1", help="address to listen on")
    dash.add_argument("--port", type=int, default=8050, help="0 picks a free one (default: 8050)")
    dash.add_argument(
        "--allow-remote",
        action="store_true",
        help="allow a non-loopback --host (no login: anyone reaching it reads runs)",
    )
    dash.set_defaults(fn=_cmd_dash)

    e = sub.add_parser("export", help="write consolidated safetensors weights and config")
    e.add_argument(
        "--run", required=True, help="a run directory, one of its checkpoints, or a model directory"
    )
    e.add_argument("--out", required=True, help="the directory to write (made new)")
    e.add_argument(
        "--format",
        choices=("braid", "hf"),
        default="braid",
        help="braid (model.safetensors + config) or hf (a transformers checkpoint)",
    )
    e.add_argument("--arch", default=None, help="hf: the architecture (default: automatic)")
    e.add_argument("--dtype", choices=("bf16", "fp32"), default=None, help="hf: default bf16")
    e.add_argument("--max-shard-size", default=None, help="hf: e.g. 5GB (the default)")
    e.set_defaults(fn=_cmd_export)

    im = sub.add_parser("import", help="convert a Hugging Face checkpoint into a Braid model")
    im.add_argument("hf_dir", help="a transformers checkpoint directory (safetensors)")
    im.add_argument("--out", required=True, help="the Braid model directory to write")
    im.set_defaults(fn=_cmd_import)
    return p


def _commands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    """The subcommands' parsers by name."""
    sub = next(a for a in parser._subparsers._group_actions if a.dest == "cmd")  # type: ignore[union-attr]
    return sub.choices  # type: ignore[return-value]


def _positive_int(text: str) -> int:
    """argparse type: an integer >= 1 (its error names the value)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be >= 1")
    return value


def _not_an_override(parser: argparse.ArgumentParser, cmd: str, given: list[str]) -> str:
    """The message for `--x=y` arguments given to a command that takes no config overrides: a
    dotted key is a misplaced override, anything else a mistyped option (with a suggestion)."""
    key = given[0].split("=", 1)[0]
    if "." in key:
        return f"config overrides ({key}=...) are for train and info, not {cmd}"
    sub = _commands(parser)[cmd]
    flags = [o for o in sub._option_string_actions if o.startswith("--")]
    near = difflib.get_close_matches(key.replace("_", "-"), flags, n=1)
    hint = f" (did you mean {near[0]}?)" if near else ""
    return f"unrecognized arguments: {' '.join(given)}{hint}"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    debug = "--debug" in argv  # accepted anywhere: before or after the subcommand
    argv = [a for a in argv if a != "--debug"]
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    args.debug = debug
    overrides = [a for a in rest if a.startswith("--") and "=" in a]
    unknown = [a for a in rest if a not in overrides]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if overrides and args.cmd not in ("train", "info"):
        parser.error(_not_an_override(parser, args.cmd, overrides))
    try:
        code = args.fn(args, overrides)
        sys.stdout.flush()  # a closed pipe shows here, where it is handled, not at exit
        return code
    except BrokenPipeError:
        # The reader went away (`| head`): not an error. Point stdout at /dev/null so that the
        # interpreter's own flush at exit does not fail again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + 13  # SIGPIPE
    except BraidError as e:
        if args.debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        if args.debug or e.errno not in _USER_OS_ERRORS:
            raise  # anything else is a bug: keep its traceback
        from braid.errors import describe_os_error

        doing = "write" if e.errno in (errno.EROFS, errno.ENOSPC, errno.EDQUOT) else "access"
        print(f"error: {describe_os_error(e, e.filename or '?', doing)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
