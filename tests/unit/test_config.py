"""Config loading: typed overrides, one-line errors naming key/value/allowed, fingerprints."""

import subprocess
import sys

import pytest

from braid.config import diff_configs, load_config, parse_override, to_toml
from braid.errors import BraidError, ConfigError


def test_overrides_are_typed():
    cfg = load_config(
        None,
        [
            "--model.dim=384",
            "--moe.layers=[1, 3]",
            "--train.lr=1e-4",
            "--moe.score_func=sigmoid",
            "--overlap.chunks=auto",
            "--model.tie_embeddings=false",
            "--moe.aux_loss_coef=0",
        ],
    )
    assert cfg.model.dim == 384 and cfg.moe.layers == [1, 3] and cfg.train.lr == 1e-4
    assert cfg.moe.score_func == "sigmoid" and cfg.overlap.chunks == "auto"
    assert cfg.model.tie_embeddings is False and isinstance(cfg.moe.aux_loss_coef, float)
    assert parse_override("--a.b=[1,2]") == ("a.b", [1, 2])


@pytest.mark.parametrize("text", ["123", "true", "nan", "-inf", "1e3", "[1, 2]", "1979-05-27"])
def test_str_setting_takes_text_that_parses_as_another_type(text):
    assert load_config(None, [f"--run.dir={text}"]).run.dir == text
    assert load_config(None, [f"--checkpoint.resume={text}"]).checkpoint.resume == text
    if text[0].isalnum() and " " not in text:  # run names are one safe path component
        assert load_config(None, [f"--run.name={text}"]).run.name == text


def test_str_override_quoting_and_typed_neighbours_are_unchanged():
    cfg = load_config(
        None, ['--run.dir="two words"', "--overlap.chunks=2", "--model.dim=96", "--model.n_heads=4"]
    )
    assert cfg.run.dir == "two words"  # TOML quotes still work
    assert cfg.overlap.chunks == 2 and cfg.model.dim == 96  # int | str and int stay typed
    with pytest.raises(ConfigError, match="expected int"):
        load_config(None, ["--model.dim=true"])


@pytest.mark.parametrize(
    "override, key, words",
    [
        ("--model.dimm=3", "model.dimm", "unknown key"),
        ("--modle.dim=3", "modle", "unknown section"),
        ("--model.dim=abc", "model.dim", "expected int"),
        ("--model.dim=1.5", "model.dim", "expected int"),
        ("--moe.layers=[1.5]", "moe.layers", "expected int"),
        ("--moe.top_k=9", "moe.top_k", "between 1 and moe.num_experts=8"),
        ("--moe.top_k=0", "moe.top_k", "between 1 and moe.num_experts=8"),
        ("--model.n_heads=7", "model.n_heads", "must divide model.dim=192"),
        ("--model.n_kv_heads=4", "model.n_kv_heads", "must divide model.n_heads=6"),
        ("--train.seq_len=1000", "train.seq_len", "model.max_seq_len"),
        ("--parallel.ep=3", "parallel.ep", "must divide moe.num_experts=8"),
        ("--moe.score_func=relu", "moe.score_func", "softmax, sigmoid"),
        ("--train.grad_accum=5", "train.grad_accum", "must divide train.batch_size=16"),
        ("--moe.layers=[9]", "moe.layers", "[0, 4)"),
        ("--moe.layers=[4]", "moe.layers", "[0, 4)"),
        ("--overlap.chunks=0", "overlap.chunks", "auto"),
    ],
)
def test_bad_values_name_key_value_and_what_is_allowed(override, key, words):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    msg = str(e.value)
    assert e.value.key == key and words in msg and "\n" not in msg


def test_simulated_ranks_must_divide_the_experts():
    sim = ["--exchange.algorithm=simulated", "--moe.num_experts=8"]
    with pytest.raises(ConfigError) as e:
        load_config(None, [*sim, "--exchange.simulate_ranks=3"])
    assert e.value.key == "exchange.simulate_ranks" and "must divide moe.num_experts=8" in str(
        e.value
    )
    assert load_config(None, [*sim, "--exchange.simulate_ranks=4"]).exchange.simulate_ranks == 4
    # Only the simulated exchange stands for other ranks: the knob is inert otherwise.
    assert load_config(None, ["--moe.num_experts=8", "--exchange.simulate_ranks=3"])


def test_fingerprint_is_stable_and_sensitive():
    a, b = load_config(None, []), load_config(None, [])
    assert a.fingerprint() == b.fingerprint()
    c = load_config(None, ["--train.lr=1e-3"])
    assert c.fingerprint() != a.fingerprint()
    assert diff_configs(a.to_dict(), c.to_dict()) == ["train.lr"]


def test_resolved_toml_round_trips(tmp_path):
    cfg = load_config("medium", ["--moe.layers=[1,2]"])
    p = tmp_path / "c.toml"
    p.write_text(to_toml(cfg))
    assert load_config(str(p)).fingerprint() == cfg.fingerprint()


def test_unknown_config_file_or_name():
    with pytest.raises(BraidError, match="unknown config 'nope'"):
        load_config("nope")
    with pytest.raises(BraidError, match="not found"):
        load_config("missing.toml")


def test_cli_user_error_is_one_line_with_exit_code_2():
    proc = subprocess.run(
        [sys.executable, "-m", "braid", "info", "--moe.top_k=99"], capture_output=True, text=True
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "error: config moe.top_k=99: must be between 1 and moe.num_experts=8"
    ]
    proc = subprocess.run(
        [sys.executable, "-m", "braid", "--debug", "info", "--moe.top_k=99"],
        capture_output=True,
        text=True,
    )
    assert proc.returncode != 0 and "Traceback" in proc.stderr


def test_user_only_checks_refuse_new_values_but_saved_configs_stay_readable():
    """inf/nan floats and train.stop_at > train.steps are refused from the user, while a config
    an older braid saved with them (a checkpoint's or an export's) still loads."""
    import math

    import pytest

    from braid.config import Config, config_from_data, fingerprint_of, load_config
    from braid.errors import ConfigError

    for override, key in (
        ("--train.lr=inf", "train.lr"),
        ("--model.rope_theta=nan", "model.rope_theta"),
        ("--train.stop_at=5", "train.stop_at"),
    ):
        with pytest.raises(ConfigError) as e:
            load_config("tiny", [override, "--train.steps=4"])
        assert e.value.key == key
    saved = Config().to_dict()
    saved["train"].update(steps=4, stop_at=6, grad_clip=math.inf)
    cfg = config_from_data(saved, fingerprint_of(saved), "meta.json")
    assert cfg.train.stop_at == 6 and math.isinf(cfg.train.grad_clip)


def test_the_process_group_timeout_comes_from_parallel_timeout_min(monkeypatch):
    import datetime

    import pytest
    import torch.distributed as dist

    from braid.config import load_config
    from braid.errors import ConfigError
    from braid.parallel import distributed

    seen = {}

    class Stop(Exception):
        pass

    def record(backend, **kw):
        seen.update(kw)
        raise Stop

    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", record)
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("LOCAL_RANK", "0")
    cfg = load_config("tiny", ["--parallel.timeout_min=2.5", "--train.device=cpu"])
    with pytest.raises(Stop):
        distributed.init_distributed(cfg)
    assert seen["timeout"] == datetime.timedelta(minutes=2.5)
    with pytest.raises(ConfigError, match="parallel.timeout_min"):
        load_config("tiny", ["--parallel.timeout_min=0"])


@pytest.mark.parametrize(
    "key", ["vocab_size", "dim", "n_layers", "n_heads", "ffn_hidden", "max_seq_len"]
)
def test_model_sizes_of_zero_are_refused(key):
    with pytest.raises(ConfigError) as e:
        load_config(None, [f"--model.{key}=0"])
    assert e.value.key == f"model.{key}" and "must be > 0" in str(e.value)


def test_override_values_may_hold_an_equals_sign():
    assert load_config(None, ["--run.dir=a=b"]).run.dir == "a=b"
    assert parse_override("--data.path=x=y") == ("data.path", "x=y")


def test_stop_at_may_equal_steps():
    cfg = load_config("tiny", ["--train.steps=4", "--train.stop_at=4"])
    assert (cfg.train.steps, cfg.train.stop_at) == (4, 4)


def test_fingerprint_covers_every_section():
    from braid.config import Config, fingerprint_of

    base = Config().to_dict()
    for sec, body in base.items():
        key = next(iter(body))
        changed = {s: dict(b) for s, b in base.items()}
        changed[sec][key] = [body[key], "changed"]  # any other value
        assert fingerprint_of(changed) != fingerprint_of(base), sec
