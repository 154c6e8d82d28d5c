"""The transformer: KV-cache decoding equals recomputation, it can overfit, and its arithmetic
(`braid info`) matches the built model; the family configs hit their nominal sizes."""

import pytest
import torch
import torch.nn.functional as F

from braid.config import load_config
from braid.errors import BraidError
from braid.generate import filter_logits, generate
from braid.info import arithmetic
from braid.model.init import init_weights
from braid.model.transformer import Transformer

SMALL = [
    "--model.dim=64",
    "--model.n_layers=3",
    "--model.n_heads=4",
    "--model.n_kv_heads=2",
    "--model.vocab_size=128",
    "--model.ffn_hidden=64",
    "--model.max_seq_len=64",
    "--train.seq_len=32",
    "--moe.expert_hidden=32",
    "--moe.num_experts=4",
    "--moe.num_shared_experts=1",
]


def small_model(*extra: str, seed: int = 0) -> Transformer:
    cfg = load_config(None, SMALL + list(extra))
    m = Transformer(cfg.model, cfg.moe)
    init_weights(m, seed, cfg.model.init_std, cfg.model.n_layers)
    return m


def test_kv_cache_decoding_equals_full_recompute():
    torch.manual_seed(0)
    m = small_model().eval()
    prompt = torch.randint(0, 128, (2, 7))
    out = generate(m, prompt, 9, temperature=0)  # greedy, with the cache
    with torch.no_grad():
        full = m(out[:, :-1]).logits  # one pass over the whole sequence, no cache
        # Greedy choices from the full pass reproduce the cached decoding.
        assert torch.equal(full[:, 6:].argmax(-1), out[:, 7:])
        caches = m.new_caches(2, 16)
        pre = m(out[:, :7], caches=caches).logits
        step = m(out[:, 7:8], caches=caches, start_pos=7).logits
    torch.testing.assert_close(pre, full[:, :7], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(step[:, 0], full[:, 7], rtol=1e-5, atol=1e-5)


def test_prompt_longer_than_context_is_refused():
    m = small_model().eval()
    with pytest.raises(BraidError, match="exceed the model's context of 64 tokens"):
        generate(m, torch.zeros(1, 64, dtype=torch.long), 5)
    with pytest.raises(BraidError, match="ask for at most 4 new tokens"):  # never cut silently
        generate(m, torch.zeros(1, 60, dtype=torch.long), 5)
    assert generate(m, torch.zeros(1, 60, dtype=torch.long), 4, temperature=0).shape == (1, 64)


def test_top_k_and_top_p_filters():
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0]])
    assert torch.isinf(filter_logits(logits, top_k=2)[0, 2:]).all()
    assert torch.isfinite(filter_logits(logits, top_k=2)[0, :2]).all()
    p = logits.softmax(-1)[0]
    kept = filter_logits(logits, top_p=float(p[0]) + 1e-3)  # needs the top two
    assert torch.isfinite(kept[0, :2]).all() and torch.isinf(kept[0, 2:]).all()


def test_tiny_model_overfits_one_batch():
    torch.manual_seed(0)
    m = small_model()
    x = torch.randint(0, 128, (4, 33))
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
    first = None
    for _ in range(60):
        out = m(x[:, :-1])
        loss = F.cross_entropy(out.logits.flatten(0, 1), x[:, 1:].flatten())
        (loss + 0.01 * out.aux_loss).backward()
        opt.step()
        opt.zero_grad()
        first = first if first is not None else loss.item()
    assert first > 4.0 and loss.item() < 0.3, (first, loss.item())


def test_loop_and_grouped_experts_give_the_same_model():
    torch.manual_seed(0)
    x = torch.randint(0, 128, (2, 16))
    outs = []
    for impl in ("grouped", "loop"):
        m = small_model(f"--moe.expert_impl={impl}")
        out = m(x)
        out.logits.square().mean().backward()
        outs.append((out.logits.detach(), [p.grad for p in m.parameters()]))
    torch.testing.assert_close(outs[0][0], outs[1][0], rtol=1e-5, atol=1e-6)
    for a, b in zip(outs[0][1], outs[1][1], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("extra", [[], ["--model.tie_embeddings=false", "--moe.layers=[0,2]"]])
def test_info_counts_equal_the_built_model(extra):
    cfg = load_config(None, SMALL + extra)
    with torch.device("meta"):
        m = Transformer(cfg.model, cfg.moe)
    assert arithmetic(cfg).total_params == sum(p.numel() for p in m.parameters())


NOMINAL = {"small": 1.3e9, "medium": 7e9, "large": 16e9, "xl": 70e9, "moonlet": 7e9, "dsv3": 671e9}


@pytest.mark.parametrize("name", sorted(NOMINAL))
def test_family_configs_match_their_nominal_size(name):
    cfg = load_config(name)
    total = arithmetic(cfg).total_params
    assert abs(total - NOMINAL[name]) / NOMINAL[name] < 0.10, total
    with torch.device("meta"):
        m = Transformer(cfg.model, cfg.moe)
    # total_params is the main model's; MTP modules (dsv3) are counted apart.
    main = sum(p.numel() for n, p in m.named_parameters() if not n.startswith("mtp."))
    assert total == main


def test_sampling_probabilities_equal_the_no_cache_forward_at_the_temperature(monkeypatch):
    """Each step samples from softmax(logits / temperature) of the sequence so far, as one
    forward pass without a cache gives them (the cache's positions, the temperature once)."""
    torch.manual_seed(0)
    m = small_model("--model.init_std=0.2").eval()
    prompt, temp = torch.randint(0, 128, (2, 5)), 0.7
    seen = []

    def pick(probs, n, generator=None):
        seen.append(probs.clone())
        return probs.argmax(-1, keepdim=True)

    monkeypatch.setattr(torch, "multinomial", pick)
    out = generate(m, prompt, 4, temperature=temp)
    assert out.shape == (2, 9) and len(seen) == 4
    with torch.no_grad():
        for i, probs in enumerate(seen):
            want = (m(out[:, : 5 + i]).logits[:, -1] / temp).softmax(-1)
            torch.testing.assert_close(probs, want, rtol=1e-4, atol=1e-6)


def test_top_p_keeps_the_most_probable_tokens_wherever_they_sit():
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.0]])  # not sorted: the top two are 1 and 3
    p = logits.softmax(-1)[0]
    kept = filter_logits(logits, top_p=float(p[1]) + 1e-3)
    assert torch.isfinite(kept[0, [1, 3]]).all() and torch.isinf(kept[0, [0, 2]]).all()
    assert torch.equal(kept[0, [1, 3]], logits[0, [1, 3]])


class _Scripted(torch.nn.Module):
    """A stand-in model whose greedy choice at generation step s is rows[b][s]."""

    def __init__(self, rows: list[list[int]], prompt_len: int, vocab: int = 16):
        super().__init__()
        self.rows, self.prompt_len, self.vocab = torch.tensor(rows), prompt_len, vocab
        self.cfg = type("Cfg", (), {"max_seq_len": 64})()

    def new_caches(self, batch, max_len):
        return [None]

    def forward(self, idx_BT, caches=None, start_pos=0):
        step = start_pos + idx_BT.shape[1] - self.prompt_len
        logits = F.one_hot(self.rows[:, step], self.vocab).float()[:, None] * 10
        return type("Out", (), {"logits": logits})()


def test_generation_stops_once_every_row_has_given_the_stop_token():
    stop, prompt = 9, torch.zeros(2, 3, dtype=torch.long)
    rows = [[5, 9, 1, 2, 3, 4], [4, 4, 9, 7, 7, 7]]  # row 0 stops at step 1, row 1 at step 2
    out = generate(_Scripted(rows, 3), prompt, 6, temperature=0, stop_token=stop)
    assert out.shape == (2, 6)  # the step where the last row stops is the last one
    assert out[0, 3:5].tolist() == [5, 9] and out[1, 3:].tolist() == [4, 4, 9]
    out = generate(_Scripted(rows, 3), prompt, 6, temperature=0)  # no stop token: all six
    assert out[:, 3:].tolist() == rows


@pytest.mark.parametrize(
    "kw, words",
    [
        (dict(top_p=0.0), "--top-p 0.0"),
        (dict(top_k=-1), "--top-k -1"),
        (dict(temperature=-0.5), "--temperature -0.5"),
        (dict(max_new_tokens=0), "--max-new-tokens 0"),
    ],
)
def test_sampling_settings_out_of_range_are_refused(kw, words):
    m = small_model().eval()
    args = dict(max_new_tokens=2, temperature=1.0, top_k=0, top_p=1.0) | kw
    with pytest.raises(BraidError, match=words):
        generate(m, torch.zeros(1, 4, dtype=torch.long), **args)


def test_init_scales_the_residual_output_projections_by_depth():
    """normal(0, std), the residual branches' output projections (attention wo, dense, shared
    and routed w2) std / sqrt(2 * n_layers); norms at one."""
    m = small_model("--model.init_std=0.05")
    resid = 0.05 / (2 * 3) ** 0.5
    outs = ("attn.wo.weight", "ffn.w2.weight", "experts.w2", "shared.w2.weight")
    seen = set()
    for name, p in m.named_parameters():
        if name.endswith("norm.weight"):
            assert torch.equal(p, torch.ones_like(p)), name
            continue
        want = resid if name.endswith(outs) else 0.05
        seen |= {o for o in outs if name.endswith(o)}
        assert abs(p.std().item() / want - 1) < 0.15, (name, p.std().item(), want)
        assert abs(p.mean().item()) < 0.2 * want, name
    assert seen == set(outs)


def test_first_k_dense_and_every_lay_out_the_moe_layers():
    from braid.moe.layer import MoE

    for extra, want in (
        (["--moe.first_k_dense=1", "--moe.every=2"], [1, 3, 5]),
        (["--moe.first_k_dense=2", "--moe.every=3"], [2, 5]),
        (["--moe.first_k_dense=0", "--moe.every=1"], [0, 1, 2, 3, 4, 5]),
        (["--moe.layers=[4, 0]"], [0, 4]),
    ):
        cfg = load_config(None, SMALL + ["--model.n_layers=6", *extra])
        with torch.device("meta"):
            m = Transformer(cfg.model, cfg.moe)
        assert m.moe_layers == want, extra
        assert [i for i, b in enumerate(m.blocks) if isinstance(b.ffn, MoE)] == want, extra
