"""The LayerNorm gauge and the gauge-invariant trace, against dense Hessians (classic double
backward, tests/test_flatness.py) on a tiny flatlib Transformer in float64.

Two evaluation sets: ``away`` (soft targets unrelated to the model: not a stationary point) and
``optimum`` (the model's own predictive distribution as targets: theta is a global minimizer of the
expected loss, so H equals the Fisher / Gauss-Newton matrix there)."""

import math

import pytest
import torch
from test_flatness import diagonal_by_name, make_transformer, optimum_case, tiny_validation_set

from flatlib.measurement.flatness import (
    dense_hessian,
    fisher_diagonal,
    hessian_trace,
    invariant_trace,
    mlm_batches,
    mlm_logits_fn,
    mlm_loss_fn,
)
from flatlib.training.model import gauge_pairs, rescale_norms, widen

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")

MODEL = make_transformer()
AWAY = mlm_batches(tiny_validation_set(), batch_size=5, soft_targets=True)  # sizes 5 and 3
OPTIMUM = optimum_case(MODEL, mlm_logits_fn, AWAY)


def dense_invariant_parts(model, H) -> tuple[float, float]:
    """(exact body trace, exact gauge minimum sum 2 sqrt(A_i B_i)) from a dense Hessian."""
    d = diagonal_by_name(model, H)
    gauged = set()
    minimum = 0.0
    for norm, reader in gauge_pairs(model):
        a = d[f"{reader}.weight"].sum(0)
        b = d[f"{norm}.weight"] + d[f"{norm}.bias"]
        minimum += float((2 * (a * b).sqrt()).sum())
        gauged |= {f"{norm}.weight", f"{norm}.bias", f"{reader}.weight"}
    body = sum(float(t.sum()) for name, t in d.items() if name not in gauged)
    return body, minimum


def logits(model, batches):
    with torch.no_grad():
        return torch.cat([mlm_logits_fn(model.eval(), b) for b in batches])


def test_gauge_pairs_name_each_layer_norm_and_its_reader():
    assert gauge_pairs(MODEL) == [("blocks.0.ln_1", "blocks.0.attn.qkv"),
                                  ("blocks.0.ln_2", "blocks.0.mlp.fc"), ("ln_f", "head")]


def test_rescale_norms_preserves_the_function_and_moves_the_parameters():
    g = torch.Generator().manual_seed(0)
    scales = {norm: torch.exp(torch.randn(4, generator=g, dtype=torch.float64))
              for norm, _ in gauge_pairs(MODEL)}
    other = rescale_norms(MODEL, scales)
    assert torch.allclose(logits(other, AWAY), logits(MODEL, AWAY), atol=1e-12, rtol=0)
    assert not torch.allclose(other.ln_f.weight, MODEL.ln_f.weight)
    assert torch.allclose(other.head.weight, MODEL.head.weight / scales["ln_f"])
    assert torch.equal(other.head.bias, MODEL.head.bias)  # the reader's bias is not part of the gauge
    with pytest.raises(ValueError, match="scales: .*blocks.0.attn"):
        rescale_norms(MODEL, {"blocks.0.attn": 2.0})
    with pytest.raises(ValueError, match="scales: ln_f's scale must be positive"):
        rescale_norms(MODEL, {"ln_f": -1.0})


def test_fisher_diagonal_is_the_hessian_diagonal_at_the_optimum():
    H = diagonal_by_name(MODEL, dense_hessian(MODEL, mlm_loss_fn, OPTIMUM))
    diagonal = fisher_diagonal(MODEL, mlm_logits_fn, OPTIMUM)
    assert set(diagonal) == set(H)
    for name, d in diagonal.items():
        assert torch.allclose(d, H[name], rtol=1e-9, atol=1e-12), name


def test_fisher_diagonal_is_the_hessian_diagonal_of_the_final_pair_anywhere():
    H = diagonal_by_name(MODEL, dense_hessian(MODEL, mlm_loss_fn, AWAY))
    names = ["ln_f.weight", "ln_f.bias", "head.weight", "blocks.0.ln_1.weight"]
    diagonal = fisher_diagonal(MODEL, mlm_logits_fn, AWAY, parameters=names)
    for name in names[:3]:  # logits linear in these: Gauss-Newton = Hessian
        assert torch.allclose(diagonal[name], H[name], rtol=1e-9, atol=1e-12), name
    # an inner LayerNorm gain: the Hessian's residual term is not zero away from the optimum
    assert float((diagonal[names[3]] - H[names[3]]).abs().max()) > 1e-3


@pytest.mark.parametrize("batches", ["away", "optimum"])
def test_fisher_diagonal_layers_equals_the_per_example_vmap(batches):
    data = AWAY if batches == "away" else OPTIMUM
    modules = dict(MODEL.named_modules())
    names = [n for n, _ in MODEL.named_parameters()
             if isinstance(modules[n.rpartition(".")[0]], (torch.nn.Linear, torch.nn.LayerNorm))]
    assert {"ln_f.weight", "head.bias", "blocks.0.attn.qkv.weight", "blocks.0.mlp.proj.bias"} <= set(names)
    layers = fisher_diagonal(MODEL, mlm_logits_fn, data, parameters=names, method="layers")
    reference = fisher_diagonal(MODEL, mlm_logits_fn, data, parameters=names, method="vmap")
    for name in names:
        assert torch.allclose(layers[name], reference[name], rtol=1e-10, atol=1e-14), name
    # "auto" takes the layers path here, and falls back to vmap for an embedding
    auto = fisher_diagonal(MODEL, mlm_logits_fn, data, parameters=names)
    assert all(torch.equal(auto[name], layers[name]) for name in names)
    embedding = next(n for n, _ in MODEL.named_parameters() if n not in names)
    with pytest.raises(ValueError, match="method: 'layers' needs every parameter"):
        fisher_diagonal(MODEL, mlm_logits_fn, data, parameters=[embedding], method="layers")
    both = fisher_diagonal(MODEL, mlm_logits_fn, data, parameters=[embedding, "ln_f.weight"])
    assert torch.allclose(both["ln_f.weight"], reference["ln_f.weight"], rtol=1e-10)
    with pytest.raises(ValueError, match="method: expected"):
        fisher_diagonal(MODEL, mlm_logits_fn, data, method="exact")


class _TwoLayers(torch.nn.Module):
    """A small classifier whose second Linear can share the first one's weight, or be followed by an
    in-place activation: cases the closed forms of method="layers" do not cover."""

    def __init__(self, tied: bool = False, inplace: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b = torch.nn.Linear(4, 4).double(), torch.nn.Linear(4, 4).double()
        if tied:
            self.b.weight = self.a.weight
        self.act = torch.nn.ReLU(inplace=inplace)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(self.act(self.a(x)))


@pytest.mark.parametrize("case", ["tied", "inplace"])
def test_fisher_diagonal_falls_back_where_the_closed_forms_do_not_hold(case):
    model = _TwoLayers(tied=case == "tied", inplace=case == "inplace")
    batches = [(torch.randn(6, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1)),)]
    names = ["a.weight", "a.bias"] if case == "tied" else ["a.weight", "a.bias", "b.weight", "b.bias"]
    logits_fn = lambda m, batch: m(batch[0])  # noqa: E731
    reference = fisher_diagonal(model, logits_fn, batches, parameters=names, method="vmap")
    auto = fisher_diagonal(model, logits_fn, batches, parameters=names)
    for name in names:
        assert torch.allclose(auto[name], reference[name], rtol=1e-10), name
    with pytest.raises(ValueError, match="method: 'layers' needs"):
        fisher_diagonal(model, logits_fn, batches, parameters=names, method="layers")
    if case == "inplace":  # without the in-place activation the closed forms hold and agree
        plain = fisher_diagonal(_TwoLayers(), logits_fn, batches, parameters=names, method="layers")
        expected = fisher_diagonal(_TwoLayers(), logits_fn, batches, parameters=names, method="vmap")
        assert all(torch.allclose(plain[n], expected[n], rtol=1e-10) for n in names)
        with torch.no_grad():  # also inside no_grad, as the other estimators
            assert torch.allclose(fisher_diagonal(_TwoLayers(), logits_fn, batches, parameters=names,
                                                  method="layers")["a.weight"], expected["a.weight"],
                                  rtol=1e-10)


def test_invariant_trace_against_the_dense_hessian_and_brute_force_rescaling():
    H = dense_hessian(MODEL, mlm_loss_fn, OPTIMUM)
    body, minimum = dense_invariant_parts(MODEL, H)
    inv = invariant_trace(MODEL, mlm_loss_fn, mlm_logits_fn, OPTIMUM, n_probes=64, seed=0)
    assert math.isclose(sum(g["min"] for g in inv.gauge.values()), minimum, rel_tol=1e-9)
    assert abs(inv.body.mean - body) < 4 * inv.body.stderr
    assert math.isclose(inv.mean - inv.body.mean, minimum, rel_tol=1e-9)
    assert math.isclose(inv.raw_mean - inv.body.mean, float(H.trace()) - body, rel_tol=1e-9)
    # brute force: the model moved to the returned scales has exactly that trace, and it is the smallest
    flattest = float(dense_hessian(rescale_norms(MODEL, inv.scales), mlm_loss_fn, OPTIMUM).trace())
    assert math.isclose(flattest, body + minimum, rel_tol=1e-8)
    assert flattest < float(H.trace())
    g = torch.Generator().manual_seed(1)
    for _ in range(3):
        nearby = {norm: c * torch.exp(0.3 * torch.randn(4, generator=g, dtype=torch.float64))
                  for norm, c in inv.scales.items()}
        assert float(dense_hessian(rescale_norms(MODEL, nearby), mlm_loss_fn, OPTIMUM).trace()) > flattest


@pytest.mark.parametrize("norm", ["blocks.0.ln_1", "blocks.0.ln_2", "ln_f"])
def test_invariant_under_each_rescaling_while_the_raw_trace_moves(norm):
    other = rescale_norms(MODEL, {norm: 10.0})
    raw, raw_other = (float(dense_hessian(m, mlm_loss_fn, AWAY).trace()) for m in (MODEL, other))
    inv, inv_other = (invariant_trace(m, mlm_loss_fn, mlm_logits_fn, AWAY, n_probes=8, seed=0)
                      for m in (MODEL, other))
    assert abs(raw_other - raw) > 20 * inv.stderr  # the raw trace moves by many standard errors
    assert math.isclose(inv_other.mean, inv.mean, rel_tol=1e-9)  # the invariant one not at all
    assert torch.allclose(inv_other.samples, inv.samples, rtol=1e-9, atol=0)


def test_never_above_the_raw_trace():
    for model in (MODEL, rescale_norms(MODEL, {"ln_f": 0.2, "blocks.0.ln_1": 5.0})):
        inv = invariant_trace(model, mlm_loss_fn, mlm_logits_fn, OPTIMUM, n_probes=16, seed=0)
        raw = hessian_trace(model, mlm_loss_fn, OPTIMUM, n_probes=16, seed=0)
        assert inv.mean <= inv.raw_mean  # the same body samples: 2 sqrt(AB) <= A + B exactly
        assert inv.mean < raw.mean + 4 * math.hypot(raw.stderr, inv.stderr)


def test_widen_keeps_the_final_pair_and_divides_the_inner_pairs_by_sqrt_f():
    """What the docstring says happens under widen(f): an architecture change, not a gauge."""
    inv = invariant_trace(MODEL, mlm_loss_fn, mlm_logits_fn, OPTIMUM, n_probes=2, seed=0)
    for f in (2, 3):
        wide = widen(MODEL, f)
        names = {norm: norm for norm, _ in gauge_pairs(wide)}
        inv_wide = invariant_trace(wide, mlm_loss_fn, mlm_logits_fn, OPTIMUM, n_probes=2, seed=0)
        assert set(inv_wide.gauge) == set(names)
        assert math.isclose(inv_wide.gauge["ln_f"]["min"], inv.gauge["ln_f"]["min"], rel_tol=1e-9)
        for norm in ("blocks.0.ln_1", "blocks.0.ln_2"):
            assert math.isclose(inv_wide.gauge[norm]["min"], inv.gauge[norm]["min"] / math.sqrt(f),
                                rel_tol=1e-9)


def test_bad_arguments():
    with pytest.raises(ValueError, match="n_probes"):
        invariant_trace(MODEL, mlm_loss_fn, mlm_logits_fn, AWAY, n_probes=1, seed=0)
    with pytest.raises(ValueError, match="pairs: .*disjoint"):
        invariant_trace(MODEL, mlm_loss_fn, mlm_logits_fn, AWAY, n_probes=2, seed=0,
                        pairs=[("ln_f", "head"), ("ln_f", "head")])
    with pytest.raises(ValueError, match="parameters: .*nope"):
        fisher_diagonal(MODEL, mlm_logits_fn, AWAY, parameters=["nope"])


def test_description_names_the_gauge_and_the_body():
    inv = invariant_trace(MODEL, mlm_loss_fn, mlm_logits_fn, AWAY, n_probes=2, seed=0)
    assert "LayerNorm gauge" in str(inv) and "the body" in str(inv) and "3 LayerNorm/reader pairs" in str(inv)
