"""Braid's configuration: typed sections, TOML files, `--section.key=value` overrides, fingerprint.

A config is built once at the boundary (`load_config`), validated once, then passed around as
frozen data. Defaults live in the section dataclasses (the `tiny` model); a TOML file only states
what differs. Each section is owned by the package of the same name.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from braid.checkpoint.config import CheckpointConfig
from braid.data.config import DataConfig
from braid.errors import BraidError, ConfigError
from braid.exchange.config import ExchangeConfig
from braid.knobs import check, knob
from braid.metrics.config import MetricsConfig
from braid.model.config import ModelConfig
from braid.moe.config import MoEConfig
from braid.overlap.config import OverlapConfig
from braid.parallel.config import ParallelConfig
from braid.train.config import TrainConfig

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

CONFIG_DIR = Path(__file__).parent / "configs"
_RUN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


@dataclass(frozen=True, kw_only=True)
class RunConfig:
    dir: str = knob("runs", "Root directory for runs; each run writes <dir>/<run_id>/.")
    name: str = knob(
        "", "Run name and directory; rerunning a named run resumes it (default: a new id)."
    )

    def validate(self) -> None:
        check(self.dir != "", "run.dir", self.dir, "must be a directory path")
        check(
            self.name == "" or (_RUN_NAME.fullmatch(self.name) and ".." not in self.name),
            "run.name",
            self.name,
            "must be one path component of letters, digits, '.', '_' and '-' starting with a "
            "letter or digit (at most 128 characters); runs live under run.dir",
        )


@dataclass(frozen=True, kw_only=True)
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    moe: MoEConfig = field(default_factory=MoEConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    exchange: ExchangeConfig = field(default_factory=ExchangeConfig)
    overlap: OverlapConfig = field(default_factory=OverlapConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)

    def validate(self, *, imports: bool = True) -> Config:
        """Check every section; `imports=False` for a config read from a file that is data (a
        checkpoint's meta.json, a model directory's config.json): plug-ins it names by dotted
        path are never imported."""
        self.run.validate()
        self.model.validate()
        self.moe.validate(self.model.n_layers)
        self.train.validate()
        self.data.validate()
        self.parallel.validate()
        self.exchange.validate(imports=imports)
        self.overlap.validate()
        self.checkpoint.validate()
        self.metrics.validate()
        check(
            self.train.seq_len <= self.model.max_seq_len,
            "train.seq_len",
            self.train.seq_len,
            f"must be <= model.max_seq_len={self.model.max_seq_len}",
        )
        if self.moe.num_experts:
            check(
                self.moe.num_experts % self.parallel.ep == 0,
                "parallel.ep",
                self.parallel.ep,
                f"must divide moe.num_experts={self.moe.num_experts}",
            )
            if self.exchange.algorithm == "simulated":  # the group it stands for holds E / W
                check(
                    self.moe.num_experts % self.exchange.simulate_ranks == 0,
                    "exchange.simulate_ranks",
                    self.exchange.simulate_ranks,
                    f"must divide moe.num_experts={self.moe.num_experts}",
                )
        if self.train.cuda_graphs:
            self._check_cuda_graphs()
        return self

    def _check_cuda_graphs(self) -> None:
        """CUDA graphs replay fixed kernels with fixed sizes: every size must live on the device
        (dropless routing with device-side counts), one device, nothing read by the host."""
        why = None
        if not self.train.compile:
            why = "needs train.compile=true (the graphs are captured by torch.compile)"
        elif self.train.device == "cpu":
            why = "needs a GPU (train.device=cpu)"
        elif self.parallel.ep > 1:
            why = f"needs parallel.ep=1 (parallel.ep={self.parallel.ep}: the exchange reads its "
            why += "split sizes on the host)"
        elif self.train.grad_accum > 1:
            why = f"needs train.grad_accum=1 (train.grad_accum={self.train.grad_accum}: a replay "
            why += "would overwrite the gradients the last micro-step left in the graph's memory)"
        elif self.moe.capacity_factor > 0:
            why = "needs dropless routing (moe.capacity_factor=0)"
        elif self.exchange.algorithm == "simulated":
            why = "cannot replay exchange.algorithm=simulated (its movements time themselves "
            why += "on their own stream)"
        elif self.overlap.chunks != 1 or self.overlap.defers_dw:
            why = 'needs overlap.chunks=1 and overlap.split_dw="off" (the overlap engine runs '
            why += "work on its own streams outside the graphs)"
        if why is not None:
            raise ConfigError("train.cuda_graphs", True, why)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return dataclasses.asdict(self)

    def fingerprint(self) -> str:
        """sha256 (16 hex) of the canonical resolved config."""
        return fingerprint_of(self.to_dict())

    def replace(self, **sections: Any) -> Config:
        """A copy with whole sections or `section={key: value}` updates applied."""
        out = {}
        for name, upd in sections.items():
            cur = getattr(self, name)
            out[name] = dataclasses.replace(cur, **upd) if isinstance(upd, dict) else upd
        return dataclasses.replace(self, **out)


def fingerprint_of(config: dict) -> str:
    """The fingerprint of a config dict as written (a saved config keeps its own fingerprint
    even after braid gains knobs, so an edit of the file is detectable)."""
    blob = json.dumps(config, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def config_from_data(config: Any, fingerprint: Any, where: str | Path) -> Config:
    """The Config saved in a file that is data (a checkpoint's meta.json, a model directory's
    config.json): checked against its fingerprint, validated without importing anything it
    names. Dotted plug-in paths stay data; one line on stderr says they were not imported."""
    if not isinstance(config, dict) or fingerprint != fingerprint_of(config):
        raise BraidError(
            f"{where}: the config does not match its fingerprint: the file was "
            "altered or damaged; use an intact copy"
        )
    try:
        cfg = from_dict(config).validate(imports=False)
    except BraidError as e:
        raise BraidError(
            f"{where} holds a config this braid cannot read ({e}); use the braid "
            "version that wrote it"
        ) from None
    from braid.exchange import plugin_paths

    if named := plugin_paths(cfg.exchange):
        print(
            f"note: {where} names exchange plug-ins {', '.join(named)}; a saved config is "
            "data, so they are not imported (one process needs no exchange)",
            file=sys.stderr,
        )
    return cfg


SECTIONS: dict[str, type] = {f.name: f.default_factory for f in dataclasses.fields(Config)}  # type: ignore[misc]


def config_names() -> list[str]:
    return sorted(p.stem for p in CONFIG_DIR.glob("*.toml"))


def resolve_config_path(name_or_path: str) -> Path:
    """A file path, or the name of a built-in config (`tiny`, `medium`, ...)."""
    p = Path(name_or_path)
    builtin = CONFIG_DIR / f"{name_or_path}.toml"
    if p.is_dir() and p.suffix != ".toml" and builtin.is_file():
        return builtin  # a folder named like a built-in config in the working directory
    if p.suffix == ".toml" or p.exists():
        if p.is_dir():
            raise BraidError(f"config {name_or_path!r} is a directory: give a .toml file")
        if not p.is_file():
            raise BraidError(f"config file {name_or_path!r} not found")
        return p
    if builtin.is_file():
        return builtin
    names = ", ".join(config_names())
    raise BraidError(f"unknown config {name_or_path!r}: expected a .toml path or one of {names}")


def load_config(path: str | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Build the config: section defaults <- TOML file <- `--section.key=value` overrides."""
    raw: dict[str, dict[str, Any]] = {}
    if path:
        p = resolve_config_path(path)
        try:
            raw = tomllib.loads(p.read_bytes().decode("utf-8"))
        except UnicodeDecodeError as e:
            raise BraidError(
                f"config file {p}: not UTF-8 text (byte {e.start}); TOML files are UTF-8"
            ) from None
        except OSError as e:
            raise BraidError(f"config file {p} cannot be read ({e.strerror})") from None
        except tomllib.TOMLDecodeError as e:
            raise BraidError(f"config file {p}: invalid TOML: {e}") from None
        for sec, body in raw.items():
            if sec not in SECTIONS:
                raise ConfigError(
                    sec, body, f"unknown section; expected one of {', '.join(SECTIONS)}"
                )
            if not isinstance(body, dict):
                raise ConfigError(sec, body, "must be a [section] table")
    for ov in overrides:
        key, value = parse_override(ov)
        sec, _, name = key.partition(".")
        if not isinstance(value, str) and _field_type(sec, name) is str:
            value = ov.partition("=")[2]  # a str setting takes the text: --run.name=123
        raw.setdefault(sec, {})[name] = value
    return check_user_values(from_dict(raw).validate())


def check_user_values(cfg: Config) -> Config:
    """Checks of a config the user gives that a config read back from a file skips (an older
    braid wrote those without them, and they must stay readable): every float finite (no knob
    means inf or nan), train.stop_at within train.steps."""
    for sec in dataclasses.fields(cfg):
        section = getattr(cfg, sec.name)
        for f in dataclasses.fields(section):
            value = getattr(section, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise ConfigError(f"{sec.name}.{f.name}", value, "expected a finite number")
    t = cfg.train
    if t.stop_at > t.steps:
        raise ConfigError(
            "train.stop_at", t.stop_at, f"must be <= train.steps={t.steps} (0 = at steps)"
        )
    return cfg


def parse_override(arg: str) -> tuple[str, Any]:
    """`--section.key=value` -> ("section.key", typed value). Values use TOML syntax; bare words
    are strings, so `--moe.score_func=sigmoid` and `--moe.layers=[1,3]` both work. (`load_config`
    gives a key of type str the text itself when it parses as something else: `--run.name=1e3`
    is the name "1e3".)"""
    body = arg[2:] if arg.startswith("--") else arg
    key, eq, text = body.partition("=")
    if not eq or "." not in key:
        raise BraidError(f"bad override {arg!r}: expected --section.key=value")
    try:
        value = tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        value = text
    return key, value


def _field_type(sec: str, name: str) -> Any:
    """The annotation of `sec.name`, or None for an unknown key (from_dict reports those)."""
    cls = SECTIONS.get(sec)
    return None if cls is None else typing.get_type_hints(cls).get(name)


def from_dict(raw: dict[str, dict[str, Any]]) -> Config:
    sections = {}
    for sec, body in raw.items():
        if sec not in SECTIONS:
            raise ConfigError(sec, body, f"unknown section; expected one of {', '.join(SECTIONS)}")
        cls = SECTIONS[sec]
        hints = typing.get_type_hints(cls)
        kwargs = {}
        for key, value in body.items():
            if key not in hints:
                known = ", ".join(f.name for f in dataclasses.fields(cls))
                raise ConfigError(f"{sec}.{key}", value, f"unknown key; [{sec}] has {known}")
            kwargs[key] = _coerce(f"{sec}.{key}", value, hints[key])
        sections[sec] = cls(**kwargs)
    return Config(**sections)


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """Check `value` against the annotation `tp`; ints are accepted for floats."""
    origin = typing.get_origin(tp)
    if origin is typing.Literal:  # one of the listed values, of the same type (1 is not True)
        if any(type(value) is type(a) and value == a for a in typing.get_args(tp)):
            return value
        raise ConfigError(key, value, f"expected {_type_name(tp)}")
    if origin in (typing.Union, types.UnionType):
        for arm in typing.get_args(tp):
            try:
                return _coerce(key, value, arm)
            except ConfigError:
                pass
        raise ConfigError(key, value, f"expected {_type_name(tp)}")
    if origin is list:
        (item,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(key, value, f"expected a list of {_type_name(item)}")
        return [_coerce(key, v, item) for v in value]
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is int and isinstance(value, bool):
        raise ConfigError(key, value, "expected int")
    if not isinstance(value, tp):
        raise ConfigError(key, value, f"expected {_type_name(tp)}")
    return value


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is typing.Literal:
        return "one of " + ", ".join(json.dumps(a) for a in typing.get_args(tp))
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if typing.get_origin(tp) is list:
        return f"list of {_type_name(typing.get_args(tp)[0])}"
    return getattr(tp, "__name__", str(tp))


def to_toml(cfg: Config) -> str:
    """The resolved config as TOML (every key, so a run can be reproduced from it alone)."""
    lines = []
    for sec, body in cfg.to_dict().items():
        lines.append(f"[{sec}]")
        lines += [f"{k} = {_toml_value(v)}" for k, v in body.items()]
        lines.append("")
    return "\n".join(lines)


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    raise TypeError(f"cannot write {v!r} as TOML")


def diff_configs(a: dict, b: dict) -> list[str]:
    """Keys ("section.key") whose values differ between two config dicts."""
    keys = []
    for sec in sorted(set(a) | set(b)):
        sa, sb = a.get(sec, {}), b.get(sec, {})
        keys += [f"{sec}.{k}" for k in sorted(set(sa) | set(sb)) if sa.get(k) != sb.get(k)]
    return keys


def knob_docs() -> str:
    """Markdown table of every knob with its default and doc (docs/config.md is made from it)."""
    out = []
    for sec, cls in SECTIONS.items():
        out += [f"## [{sec}]", "", "| key | default | meaning |", "|---|---|---|"]
        for f in dataclasses.fields(cls):
            default = f.default_factory() if f.default is dataclasses.MISSING else f.default
            out.append(f"| `{f.name}` | `{_toml_value(default)}` | {f.metadata.get('doc', '')} |")
        out.append("")
    return "\n".join(out)
