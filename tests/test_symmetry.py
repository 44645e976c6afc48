"""Symmetry groups declared once and verified, and the Hessian trace minimised over all of them, against
dense Hessians (classic double backward) and brute-force minimisation on tiny models in float64.

``MODEL``: a 2-block, 2-head flatlib Transformer with every parameter perturbed off its initial value.
Evaluation sets as in tests/test_invariant_trace.py: ``AWAY`` (soft targets unrelated to the model) and
``OPTIMUM`` (the model's own predictive distribution: a global minimum of the expected loss, where the
Hessian is the Gauss-Newton matrix and its diagonal the exact Fisher diagonal)."""

import math

import pytest
import torch
import torch.nn.functional as F
from scipy.optimize import minimize
from test_flatness import diagonal_by_name, optimum_case, perturb, tiny_validation_set
from torch import nn

from flatlib.measurement.flatness import (
    dense_hessian,
    hessian_mode,
    invariant_trace,
    mlm_batches,
    mlm_logits_fn,
    mlm_loss_fn,
    trainable_parameters,
)
from flatlib.measurement.symmetry import (
    Group,
    Member,
    SymmetryError,
    check_groups,
    full_gauge_trace,
    gauge_minimum,
    log_factors,
    norm_reader_group,
    query_key_group,
    rescale,
    transformer_groups,
    value_output_group,
    verify_groups,
)
from flatlib.training.model import Transformer, TransformerConfig

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")

CONFIG = TransformerConfig(vocab_size=5, max_len=4, n_layer=2, n_head=2, d_model=4, d_ff=8)
D = CONFIG.d_model


def make_model(dtype=torch.float64) -> Transformer:
    torch.manual_seed(0)
    return perturb(Transformer(CONFIG).to(dtype), 0.3, seed=3)


MODEL = make_model()
GROUPS = transformer_groups(MODEL)
AWAY = mlm_batches(tiny_validation_set(), batch_size=5, soft_targets=True)  # sizes 5 and 3
OPTIMUM = optimum_case(MODEL, mlm_logits_fn, AWAY)


def random_log_scales(groups, seed: int, spread: float = 1.0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {group.name: spread * torch.randn(group.size, generator=g, dtype=torch.float64)
            for group in groups}


def logits(model, batches) -> torch.Tensor:
    with hessian_mode(model), torch.no_grad():
        return torch.cat([mlm_logits_fn(model, b) for b in batches])


# ---------------------------------------------------------------------------- the description
def test_transformer_groups_name_every_exact_symmetry_of_a_block():
    assert [(g.name, g.kind, g.size) for g in GROUPS] == [
        ("blocks.0.ln_1 -> blocks.0.attn.qkv", "norm/reader", D), ("blocks.0.attn Q/K", "query/key", D),
        ("blocks.0.attn V/O", "value/output", D), ("blocks.0.ln_2 -> blocks.0.mlp.fc", "norm/reader", D),
        ("blocks.1.ln_1 -> blocks.1.attn.qkv", "norm/reader", D), ("blocks.1.attn Q/K", "query/key", D),
        ("blocks.1.attn V/O", "value/output", D), ("blocks.1.ln_2 -> blocks.1.mlp.fc", "norm/reader", D),
        ("ln_f -> head", "norm/reader", D)]
    check_groups(MODEL, GROUPS)
    deviations = verify_groups(MODEL, GROUPS, mlm_logits_fn, AWAY[0])
    assert set(deviations) == {g.name for g in GROUPS} | {"all groups"}
    # powers of two are exact in floating point: a true symmetry moves the logits by rounding at most
    scale = float(logits(MODEL, AWAY[:1]).abs().max())
    assert max(deviations.values()) <= 64 * torch.finfo(torch.float64).eps * scale


def test_log_factors_are_the_hand_written_scales_of_each_entry():
    """A qkv weight entry (r, c) is scaled by its column's ln_1 scale and its row's Q/K or V/O scale."""
    u = random_log_scales(GROUPS, seed=1)
    shapes = {n: p.shape for n, p in MODEL.named_parameters()}
    factors = {n: torch.exp(t) for n, t in log_factors(GROUPS, shapes, u).items()}
    c = {name: torch.exp(v) for name, v in u.items()}
    ln1, qk, vo = c["blocks.0.ln_1 -> blocks.0.attn.qkv"], c["blocks.0.attn Q/K"], c["blocks.0.attn V/O"]
    for r in range(3 * D):
        row = qk[r] if r < D else 1 / qk[r - D] if r < 2 * D else vo[r - 2 * D]
        for col in range(D):
            assert math.isclose(factors["blocks.0.attn.qkv.weight"][r, col], row / ln1[col], rel_tol=1e-14)
        assert math.isclose(factors["blocks.0.attn.qkv.bias"][r], row, rel_tol=1e-14)
    assert torch.allclose(factors["blocks.0.attn.proj.weight"], (1 / vo).expand(D, D), rtol=1e-14)
    assert torch.allclose(factors["ln_f.weight"], c["ln_f -> head"], rtol=1e-14)
    assert torch.allclose(factors["head.weight"], (1 / c["ln_f -> head"]).expand(5, D), rtol=1e-14)
    assert "blocks.0.attn.proj.bias" not in factors and "blocks.0.mlp.proj.weight" not in factors
    # rescale() multiplies the model's parameters by exactly these factors
    moved = dict(rescale(MODEL, GROUPS, u).named_parameters())
    for name, p in MODEL.named_parameters():
        assert torch.allclose(moved[name], p * factors.get(name, 1.0), rtol=1e-14, atol=0), name


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_rescaling_every_group_at_once_keeps_the_function(dtype):
    model = make_model(dtype)
    moved = rescale(model, GROUPS, random_log_scales(GROUPS, seed=2))
    before, after = logits(model, AWAY), logits(moved, AWAY)
    rounding = 100 * torch.finfo(dtype).eps * float(before.abs().max())  # the scales are not powers of two
    assert torch.allclose(after, before, rtol=0, atol=rounding)
    assert not torch.allclose(moved.blocks[0].attn.qkv.weight, model.blocks[0].attn.qkv.weight)


def test_the_hessian_moves_as_d_inverse_h_d_inverse():
    """The premise of the minimisation: along theta' = D theta, H' = D^-1 H D^-1 (the body's block stays)."""
    u = random_log_scales(GROUPS, seed=3, spread=0.5)
    H = dense_hessian(MODEL, mlm_loss_fn, AWAY)
    H_moved = dense_hessian(rescale(MODEL, GROUPS, u), mlm_loss_fn, AWAY)
    shapes = {n: p.shape for n, p in MODEL.named_parameters()}
    factors = log_factors(GROUPS, shapes, u)
    ones = {n: torch.ones(p.numel(), dtype=torch.float64) for n, p in trainable_parameters(MODEL).items()}
    d = torch.cat([torch.exp(factors[n]).reshape(-1) if n in factors else one for n, one in ones.items()])
    expected = H / d[:, None] / d[None, :]
    assert torch.allclose(H_moved, expected, rtol=1e-7, atol=1e-9 * float(H.abs().max()))


# ---------------------------------------------------------------------------- the minimum
def test_gauge_minimum_of_one_pair_is_two_sqrt_ab():
    group = Group("pair", 3, (Member("a", 0, 0, 1), Member("b", 0, 0, -1)))
    a = torch.tensor([1.0, 4.0, 0.5], dtype=torch.float64)
    b = torch.tensor([9.0, 1.0, 2.0], dtype=torch.float64)
    result = gauge_minimum([group], {"a": a, "b": b, "other": torch.tensor([0.25], dtype=torch.float64)})
    assert math.isclose(result.value, float((2 * (a * b).sqrt()).sum()) + 0.25, rel_tol=1e-12)
    assert math.isclose(result.raw, float(a.sum() + b.sum()) + 0.25, rel_tol=1e-15)
    assert result.parameters["other"] == {"raw": 0.25, "min": 0.25}
    # at the minimiser each side holds half of 2 sqrt(ab); first order in the minimiser's error (1e-6 at a
    # decrement of 1e-12), where the value is second order
    assert math.isclose(result.parameters["a"]["min"], float((a * b).sqrt().sum()), rel_tol=1e-5)
    assert math.isclose(sum(p["min"] for p in result.parameters.values()), result.value, rel_tol=1e-14)
    # the minimiser: a e^(-2u) = b e^(2u)
    assert torch.allclose(result.log_scales["pair"], 0.25 * torch.log(a / b), rtol=1e-6)


def test_gauge_minimum_where_the_infimum_is_not_attained():
    group = Group("pair", 2, (Member("a", 0, 0, 1), Member("b", 0, 0, -1)))
    a, b = torch.tensor([1.0, 4.0], dtype=torch.float64), torch.tensor([0.0, 1.0], dtype=torch.float64)
    result = gauge_minimum([group], {"a": a, "b": b})
    assert abs(result.value - 4.0) <= 1e-10 * result.raw  # coordinate 0's term tends to 0
    with pytest.raises(ValueError, match="diagonal: b has negative"):
        gauge_minimum([group], {"a": a, "b": -b - 1})
    with pytest.raises(ValueError, match=r"diagonal: no entries for \['b'\]"):
        gauge_minimum([group], {"a": a})
    far = {"a": torch.tensor([1.0, 1.0], dtype=torch.float64),
           "b": torch.tensor([1e6, 1.0], dtype=torch.float64)}
    assert gauge_minimum([group], far).iterations > 1  # from u = 0 the minimiser (log 1e6 / 4) is steps away
    with pytest.raises(RuntimeError, match="gauge_minimum: Newton stopped after 1 steps .*raise max_iter"):
        gauge_minimum([group], far, max_iter=1)


def brute_force_minimum(groups, diagonal) -> float:
    """min over u of sum_p h_p exp(-2 log D_p(u)) by scipy's BFGS, gradient by autograd: another optimiser
    than gauge_minimum's Newton-CG, and its own log D (one-hot masks, not log_factors)."""
    shapes = {n: t.shape for n, t in diagonal.items()}
    sizes = [g.size for g in groups]

    def objective(x):
        u = torch.tensor(x, dtype=torch.float64, requires_grad=True)
        parts = dict(zip((g.name for g in groups), u.split(sizes)))
        log_d = _differentiable_log_factors(groups, shapes, parts)
        f = sum((h * torch.exp(-2 * log_d[n])).sum() if n in log_d else h.sum() for n, h in diagonal.items())
        (g,) = torch.autograd.grad(f, u)
        return float(f.detach()), g.numpy()

    result = minimize(objective, x0=[0.0] * sum(sizes), jac=True, method="BFGS", options={"gtol": 1e-12,
                                                                                            "maxiter": 10000})
    return float(result.fun)


def _differentiable_log_factors(groups, shapes, u):
    """log_factors written out of place (so that autograd goes through it), by one-hot masks."""
    out = {}
    for group in groups:
        for m in group.members:
            index = torch.arange(shapes[m.parameter][m.axis])
            onehot = ((index[:, None] - m.start) == torch.arange(group.size)[None, :]).double()  # [len, size]
            along = onehot @ u[group.name]
            view = [1] * len(shapes[m.parameter])
            view[m.axis] = -1
            term = m.power * along.reshape(view).expand(shapes[m.parameter])
            out[m.parameter] = out.get(m.parameter, 0) + term
    return out


def test_full_gauge_trace_equals_the_brute_force_minimum_of_the_dense_hessian():
    H = dense_hessian(MODEL, mlm_loss_fn, OPTIMUM)
    diagonal = diagonal_by_name(MODEL, H)
    touched = {m.parameter for g in GROUPS for m in g.members}
    body = sum(float(t.sum()) for n, t in diagonal.items() if n not in touched)
    brute = brute_force_minimum(GROUPS, {n: t for n, t in diagonal.items() if n in touched})
    result = full_gauge_trace(MODEL, mlm_loss_fn, mlm_logits_fn, OPTIMUM, n_probes=64, seed=0)
    assert math.isclose(result.minimum.value, brute, rel_tol=1e-8)
    assert math.isclose(result.mean - result.body.mean, brute, rel_tol=1e-8)
    assert abs(result.body.mean - body) < 4 * result.body.stderr
    assert math.isclose(result.raw_mean - result.body.mean, float(H.trace()) - body, rel_tol=1e-9)
    # the model moved to the minimiser has that trace, and every nearby point of the orbit more
    flattest = rescale(MODEL, GROUPS, result.minimum.log_scales)
    trace = float(dense_hessian(flattest, mlm_loss_fn, OPTIMUM).trace())
    assert math.isclose(trace, body + brute, rel_tol=1e-8)
    for seed in range(2):
        nearby = {n: u + v for (n, u), v in zip(result.minimum.log_scales.items(),
                                                 random_log_scales(GROUPS, seed, spread=0.2).values())}
        assert float(dense_hessian(rescale(MODEL, GROUPS, nearby), mlm_loss_fn, OPTIMUM).trace()) > trace


def test_full_gauge_trace_is_invariant_under_every_group_at_once_while_the_others_move():
    reference = full_gauge_trace(MODEL, mlm_loss_fn, mlm_logits_fn, AWAY, n_probes=8, seed=0)
    for seed in (4, 5):
        moved = rescale(MODEL, GROUPS, random_log_scales(GROUPS, seed))
        result = full_gauge_trace(moved, mlm_loss_fn, mlm_logits_fn, AWAY, n_probes=8, seed=0)
        assert math.isclose(result.mean, reference.mean, rel_tol=1e-9)
        assert torch.allclose(result.samples, reference.samples, rtol=1e-9, atol=0)
        assert abs(result.raw_mean - reference.raw_mean) > 0.1 * reference.raw_mean
    # only V/O moved: the LayerNorm-only minimum moves with it, the full one does not
    vo = [g for g in GROUPS if g.kind == "value/output"]
    three = {g.name: torch.full((g.size,), math.log(3.0), dtype=torch.float64) for g in vo}
    moved = rescale(MODEL, vo, three)
    result = full_gauge_trace(moved, mlm_loss_fn, mlm_logits_fn, AWAY, n_probes=8, seed=0)
    assert math.isclose(result.mean, reference.mean, rel_tol=1e-9)
    assert abs(result.norm_mean - reference.norm_mean) > 0.05 * reference.norm_mean
    assert result.mean <= result.norm_mean <= result.raw_mean


def test_the_norm_only_minimum_is_flatness_invariant_trace_with_qkv_bias_and_proj_exact():
    result = full_gauge_trace(MODEL, mlm_loss_fn, mlm_logits_fn, OPTIMUM, n_probes=2, seed=0)
    inv = invariant_trace(MODEL, mlm_loss_fn, mlm_logits_fn, OPTIMUM, n_probes=2, seed=0)
    H = diagonal_by_name(MODEL, dense_hessian(MODEL, mlm_loss_fn, OPTIMUM))
    exact = sum(float(H[f"blocks.{i}.attn.{n}"].sum()) for i in range(2) for n in ("qkv.bias", "proj.weight"))
    expected = sum(g["min"] for g in inv.gauge.values()) + exact
    assert math.isclose(result.norm_mean - result.body.mean, expected, rel_tol=1e-9)


def test_description_names_the_groups():
    result = full_gauge_trace(MODEL, mlm_loss_fn, mlm_logits_fn, AWAY, n_probes=2, seed=0)
    assert "9 groups: 5 norm/reader, 2 query/key, 2 value/output" in str(result) and "the body" in str(result)


# ---------------------------------------------------------------------------- refusals
class Conv1D(nn.Module):
    """HuggingFace's Conv1D (transformers.pytorch_utils): ``y = x @ W + b``, weight ``[nx, nf]``."""

    def __init__(self, nf: int, nx: int) -> None:
        super().__init__()
        self.nf = nf
        self.weight = nn.Parameter(torch.randn(nx, nf, dtype=torch.float64) * 0.5)
        self.bias = nn.Parameter(torch.randn(nf, dtype=torch.float64) * 0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.addmm(self.bias, x.reshape(-1, x.shape[-1]), self.weight).reshape(*x.shape[:-1], self.nf)


class Small(nn.Module):
    """One block over a bag of tokens, pre-LN (``x + fc(ln(x))``) or post-LN (``ln(x + fc(x))``, the LN's
    output then also being the residual stream), with a Linear or Conv1D reader, a head tied to the
    embedding or not (``reuse``: no head module, the logits read through the embedding's weight, a tie
    no parameter name shows). Logits: ``[m, V]`` at the last position."""

    def __init__(self, post_ln: bool = False, conv: bool = False, tied: bool = False, width: int = 6,
                 reuse: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.post_ln, self.reuse = post_ln, reuse
        self.emb = nn.Embedding(5, 4).double()
        self.ln = nn.LayerNorm(4).double()
        self.fc = Conv1D(width, 4) if conv else nn.Linear(4, width).double()
        self.out = nn.Linear(width, 4).double()
        self.ln_f = nn.LayerNorm(4).double()
        self.head = nn.Linear(4, 5, bias=False).double()
        if tied:
            self.head.weight = self.emb.weight
        perturb(self, 0.3, seed=1)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.emb(tokens)
        if self.post_ln:
            x = self.ln(x + self.out(torch.tanh(self.fc(x))))
        else:
            x = x + self.out(torch.tanh(self.fc(self.ln(x))))
        if self.reuse:
            return (self.ln_f(x) @ self.emb.weight.T)[:, -1]
        return self.head(self.ln_f(x))[:, -1]


SMALL_BATCH = (torch.randint(0, 5, (6, 3), generator=torch.Generator().manual_seed(0)),
               torch.randint(0, 5, (6,), generator=torch.Generator().manual_seed(1)))


def small_logits(model, batch):
    return model(batch[0])


def small_loss(model, batch):
    return F.cross_entropy(model(batch[0]), batch[1])


def test_a_post_ln_pair_is_refused_with_the_logit_change():
    model = Small(post_ln=True)
    groups = [norm_reader_group(model, "ln", "fc")]
    with pytest.raises(SymmetryError, match=r"group ln -> fc is not a symmetry .*changed the logits by \d"):
        verify_groups(model, groups, small_logits, SMALL_BATCH)
    pre_ln = Small()
    verify_groups(pre_ln, [norm_reader_group(pre_ln, "ln", "fc")], small_logits, SMALL_BATCH)  # a symmetry


def test_a_tied_head_is_refused_by_name_and_by_function():
    model = Small(tied=True)
    assert "head.weight" not in trainable_parameters(model)  # the tied tensor is listed once, as emb.weight
    with pytest.raises(SymmetryError, match=r"group ln_f -> head: head.weight is tied to \['emb.weight'\]"):
        check_groups(model, [norm_reader_group(model, "ln_f", "head")])
    # declared through the embedding's name, the tie is seen the other way round
    by_hand = Group("ln_f -> emb", 4, (Member("ln_f.weight", 0), Member("ln_f.bias", 0),
                                       Member("emb.weight", 1, 0, -1)))
    with pytest.raises(SymmetryError, match=r"emb.weight is tied to \['head.weight'\]"):
        check_groups(model, [by_hand])
    # a tie no name shows (the logits read the embedding's weight directly): the function check refuses it
    reused = Small(reuse=True)
    check_groups(reused, [by_hand])
    with pytest.raises(SymmetryError, match=r"group ln_f -> emb is not a symmetry .*changed the logits by"):
        verify_groups(reused, [by_hand], small_logits, SMALL_BATCH)
    untied = Small()
    verify_groups(untied, [norm_reader_group(untied, "ln_f", "head")], small_logits, SMALL_BATCH)


def test_conv1d_readers_are_read_along_their_input_axis_and_a_wrong_axis_is_refused():
    model = Small(conv=True, width=4)  # square: a wrong axis fits the shape, only the function shows it
    group = norm_reader_group(model, "ln", "fc")
    assert group.members[-1] == Member("fc.weight", 0, 0, -1)
    verify_groups(model, [group], small_logits, SMALL_BATCH)
    wrong = Group("ln -> fc as Linear", 4, group.members[:2] + (Member("fc.weight", 1, 0, -1),))
    with pytest.raises(SymmetryError, match="ln -> fc as Linear is not a symmetry"):
        verify_groups(model, [wrong], small_logits, SMALL_BATCH)
    # a Conv1D's outputs run along axis 1
    members = value_output_group(model, ("fc", 0), "out", 4, "fc/out").members
    assert members[:2] == (Member("fc.weight", 1, 0, 1), Member("fc.bias", 0, 0, 1))
    narrow = Small(conv=True, width=3)  # fc.weight [4, 3]: the Linear axis has 3 entries for 4 coordinates
    bad = Group("ln -> fc as Linear", 4, group.members[:2] + (Member("fc.weight", 1, 0, -1),))
    with pytest.raises(SymmetryError, match=r"fc.weight has shape \(4, 3\); indices 0..3 along axis 1 .*"
                                            "layout"):
        check_groups(narrow, [bad])


def test_an_unsupported_layout_and_bad_declarations_are_refused():
    model = Small()
    model.bilinear = nn.Bilinear(4, 4, 4).double()
    with pytest.raises(SymmetryError, match="group ln -> bilinear: bilinear is a Bilinear, an unsupported"):
        norm_reader_group(model, "ln", "bilinear")
    with pytest.raises(SymmetryError, match="'nope' is not a module"):
        norm_reader_group(model, "nope", "fc")
    with pytest.raises(SymmetryError, match="model: the built-in groups are for flatlib's Transformer, got a "
                                            "Small"):
        transformer_groups(model)
    pair = norm_reader_group(model, "ln", "fc")
    twice = Group("again", 4, pair.members)
    with pytest.raises(SymmetryError, match="groups ln -> fc and again both scale ln.weight along axis 0"):
        check_groups(model, [pair, twice])
    with pytest.raises(SymmetryError, match="groups: names must be unique"):
        check_groups(model, [pair, pair])
    model.ln.weight.requires_grad_(False)
    with pytest.raises(SymmetryError, match="ln.weight is not trainable"):
        check_groups(model, [pair])
    with pytest.raises(ValueError, match="power: expected a non-zero integer for x"):
        Member("x", 0, 0, 0)
    with pytest.raises(ValueError, match="group g: kind must be one of"):
        Group("g", 1, (Member("x", 0),), kind="mlp")


def test_full_gauge_trace_refuses_before_computing_anything():
    model = Small(post_ln=True)
    with pytest.raises(SymmetryError, match="ln -> fc is not a symmetry"):
        full_gauge_trace(model, small_loss, small_logits, [SMALL_BATCH], n_probes=2,
                         seed=0, groups=[norm_reader_group(model, "ln", "fc")])


def test_query_key_group_on_separate_linear_maps():
    """BERT-style separate query and key maps: declared by module and offset, verified on a real attention."""

    class Attention(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.emb = nn.Embedding(5, 4).double()
            self.query, self.key, self.value = (nn.Linear(4, 4).double() for _ in range(3))
            self.output = nn.Linear(4, 4).double()
            self.head = nn.Linear(4, 5).double()

        def forward(self, tokens):
            x = self.emb(tokens)
            scores = self.query(x) @ self.key(x).transpose(-1, -2)
            return self.head(x + self.output(scores.softmax(-1) @ self.value(x)))[:, -1]

    model = Attention()
    groups = [query_key_group(model, ("query", 0), ("key", 0), 4, "Q/K"),
              value_output_group(model, ("value", 0), "output", 4, "V/O")]
    deviations = verify_groups(model, groups, small_logits, SMALL_BATCH)
    assert max(deviations.values()) < 1e-13
    swapped = [query_key_group(model, ("query", 0), ("value", 0), 4, "Q/V")]
    with pytest.raises(SymmetryError, match="group Q/V is not a symmetry"):
        verify_groups(model, swapped, small_logits, SMALL_BATCH)
    result = full_gauge_trace(model, small_loss, small_logits, [SMALL_BATCH],
                              n_probes=2, seed=0, groups=groups)
    moved = rescale(model, groups, random_log_scales(groups, seed=0))
    again = full_gauge_trace(moved, small_loss, small_logits, [SMALL_BATCH],
                             n_probes=2, seed=0, groups=groups)
    assert math.isclose(again.mean, result.mean, rel_tol=1e-9)
