"""Tests of flatlib.theory: the exact identities behind notebook 06, on tiny cases, and the
sections of the notebook (``noise_vs_curvature``, ``sgd_vs_flow``, ``flat_vs_sharp``: their tables
and verdicts).

Dense reference Hessians come from ``flatlib.measurement.flatness.dense_hessian`` (classic double backward,
``torch.autograd.grad`` with ``create_graph``, row by row), never from ``torch.func.hessian`` (see
docs/design.md); the batched exact Hessian of ``flatlib.theory`` is checked against them, and against
``flatlib.measurement.flatness.hvp``.
"""

import copy
import dataclasses
import itertools
import math

import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch

from flatlib.languages import HMM, Corpus
from flatlib.measurement.flatness import dense_hessian, hvp
from flatlib.plots.theory import implicit_bias_figure, noise_vs_curvature_figure, transfer_figure
from flatlib.profiles import PROFILES, theory_params
from flatlib.theory import (
    BagOfWordsLanguage,
    ContextSet,
    FactoredSoftmax,
    FlatModel,
    OneLayerTransformer,
    balance_neurons,
    exact_fisher,
    exact_gradient_covariance,
    exact_hessian,
    expected_loss,
    expected_loss_fn,
    feature_solution,
    fisher_trace_at_optimum,
    flat_vs_sharp,
    gradient_noise,
    hessian_traces,
    hmm_contexts,
    min_norm_head_errors,
    neuron_trace_parts,
    noise_vs_curvature,
    random_solution,
    retract,
    run_gd,
    run_sgd,
    sgd_vs_flow,
    slow_flow,
    tiny,
    trace_gradient,
    with_ids,
)

# torch loads its forward-AD decompositions through torch.jit.script on first use (one-off, harmless)
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")


# ---------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module", autouse=True)
def float64_default():
    """float64 by default in this module only (autouse: before the module's other fixtures). Set at
    import time it leaked into every other test module of the session (collection imports them
    all), so models there were float64 in-process but float32 in worker processes."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


def tiny_hmm() -> HMM:
    return HMM.random(n_states=2, vocab_size=3, seq_len=3, concentration=0.5, seed=0)


@pytest.fixture(scope="module")
def raw_contexts() -> ContextSet:
    return hmm_contexts(tiny_hmm())


@pytest.fixture(scope="module")
def contexts(raw_contexts) -> ContextSet:
    return with_ids(raw_contexts)  # the factored model looks contexts up by id


@pytest.fixture(scope="module")
def optimum(contexts):
    return FactoredSoftmax.at_optimum(contexts, rank=4, scale=1.5, seed=1)


def reference_hessian(flat: FlatModel, theta: torch.Tensor, contexts: ContextSet) -> torch.Tensor:
    """``flatlib.measurement.flatness.dense_hessian`` of the expected loss at ``theta`` (on a copy of the
    model)."""
    model = copy.deepcopy(flat.model)
    FlatModel(model).load_(theta)
    return dense_hessian(model, expected_loss_fn, [contexts.batch()])


def off_optimum(model: FactoredSoftmax, scale: float = 0.4, seed: int = 2) -> FactoredSoftmax:
    flat = FlatModel(model)
    g = torch.Generator().manual_seed(seed)
    theta = flat.vector() + scale * torch.randn(flat.n_params, generator=g)
    other = FactoredSoftmax(model.A.shape[0], model.A.shape[1], model.B.shape[1])
    FlatModel(other).load_(theta)
    return other


# ---------------------------------------------------------------------------- finite languages
def test_hmm_contexts_match_enumeration(raw_contexts):
    contexts = raw_contexts
    hmm = tiny_hmm()
    V, L = hmm.vocab_size, hmm.seq_len
    sentences = torch.tensor(list(itertools.product(range(V), repeat=L)))
    prob = hmm.log_prob(Corpus(sentences, torch.full((len(sentences),), L))).exp()
    assert contexts.n_contexts == L * V ** (L - 1)
    assert float(contexts.weights.sum()) == pytest.approx(1.0, abs=1e-12)
    # brute force: p(x_t = w | x_-t) and p(x_-t) / L from the joint, for every context
    for c in range(contexts.n_contexts):
        t = int(contexts.positions[c])
        rest = contexts.inputs[c].tolist()
        match = torch.ones(len(sentences), dtype=torch.bool)
        for s in range(L):
            if s != t:
                match &= sentences[:, s] == rest[s]
        joint = torch.zeros(V)
        for i in match.nonzero().squeeze(1).tolist():
            joint[sentences[i, t]] += prob[i]
        assert float(contexts.weights[c]) == pytest.approx(float(joint.sum()) / L, abs=1e-12)
        torch.testing.assert_close(contexts.targets[c], joint / joint.sum(), atol=1e-10, rtol=0)
    # the optimum: the weighted mean entropy equals the HMM's own optimal single-mask loss
    corpus = Corpus(sentences, torch.full((len(sentences),), L))
    nll = -(hmm.mlm_conditionals(corpus).gather(2, sentences[..., None]).squeeze(2).log())
    assert contexts.optimal_loss() == pytest.approx(float((prob[:, None] * nll).sum() / L), abs=1e-10)


def test_context_set_validates():
    w, p = torch.tensor([0.5, 0.5]), torch.tensor([[0.3, 0.7], [1.0, 0.0]])
    with pytest.raises(ValueError, match="weights"):
        ContextSet(torch.arange(2), torch.tensor([0.5, 0.6]), p)
    with pytest.raises(ValueError, match="targets"):
        ContextSet(torch.arange(2), w, torch.tensor([[0.3, 0.6], [1.0, 0.0]]))
    with pytest.raises(ValueError, match="inputs"):
        ContextSet(torch.arange(3), w, p)
    with pytest.raises(ValueError, match="n_samples"):
        ContextSet(torch.arange(2), w, p).sample_pairs(0, torch.Generator())


def test_bag_language_matches_brute_force():
    lang = BagOfWordsLanguage.two_features(n_words=4, seq_len=4, strengths=(0.5, 0.3),
                                           field=(0.1, 0.0, -0.2, 0.05))
    V, T = 4, 4
    sentences = torch.tensor(list(itertools.product(range(V), repeat=T)))
    J = (lang.strengths[:, None, None] * lang.features[:, :, None] * lang.features[:, None, :]).sum(0)
    energy = torch.zeros(len(sentences))
    for s in range(T):
        energy += lang.field[sentences[:, s]]
        for t in range(s + 1, T):
            energy += J[sentences[:, s], sentences[:, t]]
    prob = energy.exp() / energy.exp().sum()
    ctx = lang.contexts()
    assert ctx.n_contexts == math.comb(T - 1 + V - 1, V - 1)
    counts = lang.context_counts
    for c in range(ctx.n_contexts):
        joint = torch.zeros(V)
        for t in range(T):
            rest = torch.cat([sentences[:, :t], sentences[:, t + 1:]], 1)
            rest_counts = torch.nn.functional.one_hot(rest, V).sum(1)
            match = (rest_counts == counts[c]).all(1)
            for w in range(V):
                joint[w] += prob[match & (sentences[:, t] == w)].sum() / T
        assert float(ctx.weights[c]) == pytest.approx(float(joint.sum()), abs=1e-12)
        torch.testing.assert_close(ctx.targets[c], joint / joint.sum(), atol=1e-10, rtol=0)
        # the model's input: the context's words (sorted) and the [MASK] token last
        tokens = ctx.inputs[c]
        assert int(tokens[-1]) == V and torch.equal(torch.bincount(tokens[:-1], minlength=V), counts[c])


def test_bag_language_validates():
    with pytest.raises(ValueError, match="seq_len"):
        BagOfWordsLanguage.two_features(n_words=4, seq_len=5)  # 4 context words: a feature can be 0
    with pytest.raises(ValueError, match="n_words"):
        BagOfWordsLanguage.two_features(n_words=3, seq_len=4)
    with pytest.raises(ValueError, match="strengths"):
        BagOfWordsLanguage.two_features(n_words=4, seq_len=4, strengths=(0.5,))


# ---------------------------------------------------------------------------- dense Hessians
def test_exact_hessian_matches_the_reference_and_flatness_hvp(contexts, optimum):
    model = off_optimum(optimum)
    flat = FlatModel(model)
    theta = flat.vector()
    fast = exact_hessian(flat, theta, contexts)
    reference = reference_hessian(flat, theta, contexts)
    assert torch.allclose(reference, reference.T, atol=1e-12), "the reference must be symmetric"
    torch.testing.assert_close(fast, reference, atol=1e-10, rtol=1e-10)
    # and flatlib.measurement.flatness.hvp (double backward through the model) on the same expected loss
    v = torch.randn(flat.n_params, generator=torch.Generator().manual_seed(3))
    hv = hvp(model, expected_loss_fn, [contexts.batch()], v)
    torch.testing.assert_close(hv, reference @ v, atol=1e-10, rtol=1e-10)


def test_hessian_traces_of_many_points(contexts, optimum):
    flat = FlatModel(optimum)
    g = torch.Generator().manual_seed(6)
    thetas = flat.vector() + 0.3 * torch.randn(3, flat.n_params, generator=g)
    traces = hessian_traces(flat, thetas, contexts)
    for theta, trace in zip(thetas, traces):
        reference = reference_hessian(flat, theta, contexts)
        assert float(trace) == pytest.approx(float(reference.trace()), rel=1e-10)


def test_transformer_exact_hessian_matches_the_reference():
    lang = BagOfWordsLanguage.two_features(n_words=4, seq_len=4)
    ctx = lang.contexts()
    model = random_solution(lang, width=24, seed=0)
    g = torch.Generator().manual_seed(5)
    flat = FlatModel(model)
    theta = flat.vector() + 0.05 * torch.randn(flat.n_params, generator=g)  # attention non-uniform too
    reference = reference_hessian(flat, theta, ctx)
    assert torch.allclose(reference, reference.T, atol=1e-10)
    torch.testing.assert_close(exact_hessian(flat, theta, ctx), reference, atol=1e-9, rtol=1e-9)


# ---------------------------------------------------------------------------- noise = curvature
def test_optimum_is_exact(contexts, optimum):
    flat = FlatModel(optimum)
    loss = float(expected_loss(flat, flat.vector(), contexts))
    assert loss == pytest.approx(contexts.optimal_loss(), abs=1e-12)
    g = torch.func.grad(lambda t: expected_loss(flat, t, contexts))(flat.vector())
    assert float(g.norm()) < 1e-12


def test_exact_covariance_equals_hessian_and_fisher_at_the_optimum(contexts, optimum):
    flat = FlatModel(optimum)
    theta = flat.vector()
    H = reference_hessian(flat, theta, contexts)
    C = exact_gradient_covariance(flat, theta, contexts)
    F = exact_fisher(flat, theta, contexts)
    scale = float(H.abs().max())
    assert float((C - H).abs().max()) < 1e-10 * scale
    assert float((F - H).abs().max()) < 1e-10 * scale
    assert fisher_trace_at_optimum(flat, theta, contexts) == pytest.approx(float(H.trace()), rel=1e-10)


def test_exact_covariance_differs_from_hessian_away_from_the_optimum(contexts, optimum):
    flat = FlatModel(off_optimum(optimum))
    theta = flat.vector()
    H = reference_hessian(flat, theta, contexts)
    C = exact_gradient_covariance(flat, theta, contexts)
    F = exact_fisher(flat, theta, contexts)
    assert float((C - H).abs().max()) > 1e-2 * float(H.abs().max())
    assert float((F - H).abs().max()) > 1e-2 * float(H.abs().max())
    # the exact decomposition: E[g g^T] = Σ_c w_c J_c^T (S(p_c) + (q_c - p_c)(q_c - p_c)^T) J_c
    mean = torch.func.grad(lambda t: expected_loss(flat, t, contexts))(theta)
    # [N, V, P]: first derivatives only (one jacrev; no second derivative is taken through torch.func here)
    J = torch.func.jacrev(lambda t: flat.logits(t, contexts.inputs))(theta)
    q = torch.softmax(flat.logits(theta, contexts.inputs), -1)
    p = contexts.targets
    r = q - p
    S = torch.diag_embed(p) - p[:, :, None] * p[:, None, :] + r[:, :, None] * r[:, None, :]
    second = torch.einsum("c,cki,ckl,clj->ij", contexts.weights, J, S, J)
    torch.testing.assert_close(C, second - torch.outer(mean, mean), atol=1e-10, rtol=1e-10)


def test_sampled_noise_matches_exact_within_its_standard_error(contexts, optimum):
    flat = FlatModel(optimum)
    theta = flat.vector()
    g = torch.Generator().manual_seed(4)
    vectors = torch.randn(4, flat.n_params, generator=g)
    H = reference_hessian(flat, theta, contexts)
    est = gradient_noise(flat, theta, contexts, vectors, n_samples=4000, seed=7)
    z_trace = (est.trace - float(H.trace())) / est.trace_se
    z_forms = (est.forms - torch.einsum("ki,ij,kj->k", vectors, H, vectors)) / est.forms_se
    assert est.trace_se > 0 and (est.forms_se > 0).all()
    assert abs(z_trace) < 4 and (z_forms.abs() < 4).all(), (z_trace, z_forms)
    # the same draws are reproduced by the same seed
    again = gradient_noise(flat, theta, contexts, vectors, n_samples=4000, seed=7)
    assert again.trace == est.trace and torch.equal(again.forms, est.forms)


def test_sampled_noise_detects_the_difference_away_from_the_optimum(contexts, optimum):
    flat = FlatModel(off_optimum(optimum, scale=0.6))
    theta = flat.vector()
    H = reference_hessian(flat, theta, contexts)
    C = exact_gradient_covariance(flat, theta, contexts)
    est = gradient_noise(flat, theta, contexts, torch.zeros(0, flat.n_params), n_samples=4000, seed=8)
    assert abs(est.trace - float(C.trace())) < 4 * est.trace_se  # it estimates C...
    assert abs(est.trace - float(H.trace())) > 4 * est.trace_se  # ...which is not H here


def test_gradient_noise_validates(contexts, optimum):
    flat = FlatModel(optimum)
    theta = flat.vector()
    with pytest.raises(ValueError, match="n_samples"):
        gradient_noise(flat, theta, contexts, torch.zeros(0, flat.n_params), n_samples=1, seed=0)
    with pytest.raises(ValueError, match="vectors"):
        gradient_noise(flat, theta, contexts, torch.zeros(2, flat.n_params + 1), n_samples=10, seed=0)
    with pytest.raises(ValueError, match="theta"):
        expected_loss(flat, theta[:-1], contexts)


# ---------------------------------------------------------------------------- SGD / GD / flow
def test_factored_trace_matches_closed_form(contexts, optimum):
    # at the optimum Tr H = Σ_c w_c [tr(B S_c Bᵀ) + |a_c|² tr S_c],  S_c = diag p_c - p_c p_cᵀ
    flat = FlatModel(optimum)
    p = contexts.targets
    S = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
    A, B = optimum.A.detach(), optimum.B.detach()
    closed = (contexts.weights * (torch.einsum("jk,ckl,jl->c", B, S, B)
                                  + (A ** 2).sum(1) * S.diagonal(dim1=1, dim2=2).sum(1))).sum()
    trace = float(exact_hessian(flat, flat.vector(), contexts).trace())
    assert trace == pytest.approx(float(closed), rel=1e-10)
    # and its gradient: ∂/∂B = 2 Σ w_c B S_c, ∂/∂a_c = 2 w_c tr(S_c) a_c
    grad = trace_gradient(flat, flat.vector(), contexts)
    gA = 2 * (contexts.weights * S.diagonal(dim1=1, dim2=2).sum(1))[:, None] * A
    gB = 2 * torch.einsum("c,jk,ckl->jl", contexts.weights, B, S)
    torch.testing.assert_close(grad, torch.cat([gA.reshape(-1), gB.reshape(-1)]), atol=1e-10, rtol=1e-10)


def test_trace_gradient_matches_finite_differences(contexts, optimum):
    # T(theta) = sum w_c p_c(y) |g(c, y)|^2 at and around an optimum; a central difference along v
    flat = FlatModel(off_optimum(optimum, scale=0.2))
    theta = flat.vector()
    v = torch.randn(flat.n_params, generator=torch.Generator().manual_seed(10))
    eps = 1e-5
    plus = fisher_trace_at_optimum(flat, theta + eps * v, contexts)
    minus = fisher_trace_at_optimum(flat, theta - eps * v, contexts)
    directional = float(trace_gradient(flat, theta, contexts) @ v)
    assert directional == pytest.approx((plus - minus) / (2 * eps), rel=1e-6)


def test_gd_stays_and_sgd_keeps_the_loss_near_the_optimum(contexts, optimum):
    flat = FlatModel(optimum)
    theta0 = flat.vector()
    gd = run_gd(flat, contexts, theta0, lr=0.1, steps=200, record_steps=[0, 100, 200])
    assert gd.gap.abs().max() < 1e-12
    assert float((gd.trace - gd.trace[0]).abs().max()) < 1e-9 * float(gd.trace[0, 0])
    lr, batch = 0.05, 2
    sgd = run_sgd(flat, contexts, theta0, lr=lr, batch_size=batch, steps=400, n_chains=4, seed=0,
                  record_steps=[0, 200, 400])
    assert sgd.gap.shape == (3, 4) and sgd.trace.shape == (3, 4)
    assert float(sgd.gap[0].abs().max()) < 1e-12
    # the excess loss stays of the order of the label-noise level eta Tr H / (4B) (the stationary mean
    # of the gap to leading order; a chain's gap fluctuates around it), far below the entropy
    level = lr * float(sgd.trace[0].mean()) / (4 * batch)
    assert level < 0.05 * contexts.optimal_loss()
    assert float(sgd.gap[1:].max()) < 4 * level
    assert (sgd.gap[1:] >= 0).all()
    # deterministic given the seed; different seeds, different paths
    again = run_sgd(flat, contexts, theta0, lr=lr, batch_size=batch, steps=400, n_chains=4, seed=0,
                    record_steps=[0, 200, 400])
    assert torch.equal(again.final, sgd.final)
    assert not torch.equal(sgd.final[0], sgd.final[1])


def test_retract_and_flow_stay_on_the_optimal_set(contexts, optimum):
    flat = FlatModel(optimum)
    theta0 = flat.vector()
    g = torch.Generator().manual_seed(9)
    moved = retract(flat, theta0 + 1e-3 * torch.randn(flat.n_params, generator=g), contexts)
    assert float(expected_loss(flat, moved, contexts)) - contexts.optimal_loss() < 1e-12
    flow = slow_flow(flat, contexts, theta0, t_max=1.0, dt=0.25)
    assert flow.gap.abs().max() < 1e-10
    assert (flow.trace.diff() < 0).all(), "the trace must decrease along the flow"
    # the null space of H at the optimum is the tangent space: dimension P - N (V - 1)
    assert flow.nullity[0] == flat.n_params - contexts.n_contexts * (contexts.vocab_size - 1)


def test_flow_converges_in_its_step(contexts, optimum):
    flat = FlatModel(optimum)
    coarse = slow_flow(flat, contexts, flat.vector(), t_max=1.0, dt=0.25)
    fine = slow_flow(flat, contexts, flat.vector(), t_max=1.0, dt=0.125)
    assert float(coarse.trace[-1]) == pytest.approx(float(fine.trace[-1]), rel=1e-3)
    assert float(coarse.trace[-1]) < float(coarse.trace[0]) - 0.05 * float(coarse.trace[0])  # it moved


def test_strengths_are_kept_in_float64():
    with torch.device("cpu"):
        previous = torch.get_default_dtype()
        torch.set_default_dtype(torch.float32)
        try:
            lang = BagOfWordsLanguage.two_features(n_words=4, seq_len=4, strengths=(0.5, 0.3))
        finally:
            torch.set_default_dtype(previous)
    assert lang.strengths.dtype == torch.float64 and float(lang.strengths[1]) == 0.3


def test_runners_validate(contexts, optimum):
    flat = FlatModel(optimum)
    theta0 = flat.vector()
    for kwargs, name in [({"lr": 0.0}, "lr"), ({"batch_size": 0}, "batch_size"), ({"steps": -1}, "steps"),
                         ({"n_chains": 0}, "n_chains"), ({"record_steps": [5, 1000]}, "record_steps")]:
        args = {"lr": 0.1, "batch_size": 1, "steps": 10, "n_chains": 2, "seed": 0, "record_steps": [0, 10]}
        args.update(kwargs)
        with pytest.raises(ValueError, match=name):
            run_sgd(flat, contexts, theta0, **args)
    with pytest.raises(ValueError, match="dt"):
        slow_flow(flat, contexts, theta0, t_max=1.0, dt=0.0)


# ---------------------------------------------------------------------------- the one-layer transformer
@pytest.fixture(scope="module")
def bag():
    return BagOfWordsLanguage.two_features(n_words=4, seq_len=4, strengths=(0.5, 0.3))


def test_two_solutions_have_equal_loss_and_different_traces(bag):
    ctx = bag.contexts()
    flat_model = balance_neurons(feature_solution(bag, width=24), ctx)
    random_model = balance_neurons(random_solution(bag, width=24, seed=0), ctx)
    losses, traces = [], []
    for model in (flat_model, random_model):
        flat = FlatModel(model)
        theta = flat.vector()
        losses.append(float(expected_loss(flat, theta, ctx)))
        H = reference_hessian(flat, theta, ctx)
        traces.append(float(H.trace()))
        assert fisher_trace_at_optimum(flat, theta, ctx) == pytest.approx(traces[-1], rel=1e-8)
    assert abs(losses[0] - losses[1]) < 1e-6
    assert losses[0] == pytest.approx(ctx.optimal_loss(), abs=1e-10)
    assert traces[0] < 0.5 * traces[1], traces


def test_balancing_preserves_the_function_and_minimises_the_trace(bag):
    ctx = bag.contexts()
    model = random_solution(bag, width=24, seed=1)
    balanced = balance_neurons(model, ctx)
    with torch.no_grad():
        torch.testing.assert_close(balanced(ctx.inputs), model(ctx.inputs), atol=1e-10, rtol=1e-10)
    before = fisher_trace_at_optimum(FlatModel(model), FlatModel(model).vector(), ctx)
    after = fisher_trace_at_optimum(FlatModel(balanced), FlatModel(balanced).vector(), ctx)
    assert after <= before + 1e-12
    # a stationary point of the rescaling: rescaling any one live neuron by 1.1 or 1/1.1 raises the trace
    # (a random neuron can be dead on every context: then it has no part in the trace)
    P, Q, _ = neuron_trace_parts(balanced, ctx)
    live = ((P > 0) & (Q > 0)).nonzero().squeeze(1)
    assert len(live) >= ctx.n_contexts
    for i in live[:3].tolist():
        for factor in (1.1, 1 / 1.1):
            other = OneLayerTransformer(bag.n_words, 24)
            other.load_state_dict(balanced.state_dict())
            with torch.no_grad():
                other.W[i] *= factor
                other.b[i] *= factor
                other.A[:, i] /= factor
            assert fisher_trace_at_optimum(FlatModel(other), FlatModel(other).vector(), ctx) > after


def test_solutions_validate(bag):
    with pytest.raises(ValueError, match="width"):
        random_solution(bag, width=3, seed=0)  # fewer neurons than words: no exact fit
    with pytest.raises(ValueError, match="width"):
        feature_solution(bag, width=3)


def test_min_norm_head(bag):
    ctx = bag.contexts()
    model = feature_solution(bag, width=8)
    with torch.no_grad():
        phi = model.neurons(ctx.inputs)
    score = bag.scores()
    out = min_norm_head_errors(phi, ctx.weights, score, n_train=(1, 64), draws=20, seed=0)
    assert out.errors.shape == (2, 20)
    # many examples: the score is linear in the feature neurons, so the head is exact
    assert float(out.errors[1].max()) == 0.0
    # one example has one sign of the score: the other half of the contexts is misclassified
    assert float(out.errors[0].min()) > 0.2
    again = min_norm_head_errors(phi, ctx.weights, score, n_train=(1, 64), draws=20, seed=0)
    assert torch.equal(again.errors, out.errors)
    with pytest.raises(ValueError, match="n_train"):
        min_norm_head_errors(phi, ctx.weights, score, n_train=(0,), draws=2, seed=0)
    with pytest.raises(ValueError, match="draws"):
        min_norm_head_errors(phi, ctx.weights, score, n_train=(1,), draws=1, seed=0)


# ---------------------------------------------------------------------------- sizes
def test_theory_params():
    for profile in PROFILES:
        params = theory_params(profile, seed=0)
        assert params["profile"] == profile and params["seed"] == 0
        assert ({k: v for k, v in params.items() if k not in ("profile", "seed")}
                == PROFILES[profile]["theory"])
    with pytest.raises(ValueError, match="profile"):
        theory_params("nope", seed=0)
    with pytest.raises(ValueError, match="seed"):
        theory_params("smoke", seed=-1)
    with pytest.raises(ValueError, match="theory.implicit_bias.n_chains"):
        theory_params("smoke", seed=0, implicit_bias={"n_chains": 1})
    with pytest.raises(ValueError, match="theory.nonsense: unknown"):
        theory_params("smoke", seed=0, nonsense=1)
    with pytest.raises(ValueError, match="theory.implicit_bias.configs"):
        theory_params("smoke", seed=0, implicit_bias={"configs": ((0.1, 0),)})
    with pytest.raises(ValueError, match="theory.noise.offset"):
        theory_params("smoke", seed=0, noise={"offset": 0.0})
    with pytest.raises(ValueError, match="theory.transformer.n_words"):
        theory_params("smoke", seed=0, transformer={"n_words": 6})
    params = theory_params("smoke", seed=3, implicit_bias={"n_chains": 3, "time": None})
    assert params["implicit_bias"]["n_chains"] == 3 and params["seed"] == 3
    assert params["implicit_bias"]["time"] == PROFILES["smoke"]["theory"]["implicit_bias"]["time"]
    assert PROFILES["smoke"]["theory"]["implicit_bias"]["n_chains"] != 3  # the profile itself is untouched


# ---------------------------------------------------------------------------- the notebook's sections
def test_tiny():
    assert tiny(3e-13) == "< 1e-12" and tiny(-3e-13) == "< 1e-12"
    assert tiny(0.01234) == "0.012" and tiny(2.0) == "2"


@pytest.fixture(scope="module")
def noise_result():
    return noise_vs_curvature(tiny_hmm(), rank=4, n_samples=1000, n_forms=2, offset=0.5, seed=0)


def test_noise_vs_curvature_measures_what_its_table_says(noise_result):
    r = noise_result
    table = r.table
    assert list(table.point.unique()) == ["at the optimum", "away from it"]
    assert list(table.quantity) == ["Tr", "v1", "v2"] * 2
    torch.testing.assert_close(r.vectors.norm(dim=1), torch.ones(2, dtype=torch.float64))
    assert abs(r.points["at the optimum"].gap) < 1e-12 and r.points["away from it"].gap > 0.01
    for point, frame in table.groupby("point", sort=False):
        H, C = r.points[point].hessian, r.points[point].covariance
        flat = FlatModel(FactoredSoftmax(r.contexts.n_contexts, 4, r.contexts.vocab_size))
        assert H.shape == (flat.n_params, flat.n_params) == (r.n_params, r.n_params)
        expected_h = [float(H.trace())] + [float(v @ H @ v) for v in r.vectors]
        expected_c = [float(C.trace())] + [float(v @ C @ v) for v in r.vectors]
        np.testing.assert_allclose(frame["H exact"], expected_h, rtol=1e-12)
        np.testing.assert_allclose(frame["C exact"], expected_c, rtol=1e-12)
        np.testing.assert_allclose(frame["z"], (frame["C sampled"] - frame["H exact"]) / frame["C se"],
                                   rtol=1e-12)
        # the forms through flatlib.measurement.flatness.hvp are those of the dense H
        torch.testing.assert_close(r.points[point].hvp_forms,
                                   torch.tensor(expected_h[1:], dtype=torch.float64))
    # at the optimum the sampled noise estimates H (within 4 SE); away from it the exact C is not H
    assert (table[table.point == "at the optimum"]["z"].abs() < 4).all()
    away = table[table.point == "away from it"].iloc[0]
    assert abs(away["C exact"] - away["H exact"]) > 0.1 * away["H exact"]


def test_noise_verdict_holds_at_an_optimum_and_not_when_nothing_moves(noise_result):
    v = noise_result.verdict()
    assert v.equal_at_optimum < 1e-9 and min(v.differ_away.values()) > 1e-2 and v.z_away_trace > 3
    assert v.hvp_agreement < 1e-8
    assert v.held == "yes" and v.claim().held == "yes" and v.failed_checks() == []
    assert "Prediction (C = H = F at the optimum, not away from it): HELD." in v.report()
    assert v.summary().startswith("1 noise = curvature") and v.summary().endswith("held: yes")
    # "away" moved by 1e-7 only: C = H = F there too, so the prediction's second half fails
    still = noise_vs_curvature(tiny_hmm(), rank=4, n_samples=200, n_forms=1, offset=1e-7, seed=0).verdict()
    assert max(still.differ_away.values()) < 1e-4 and still.held == "no" and "NOT HELD" in still.report()


def test_noise_checks_catch_a_broken_estimate(noise_result):
    table = noise_result.table.copy()
    table.loc[1, "C se"] = math.nan
    broken = dataclasses.replace(noise_result, table=table).verdict()
    assert broken.failed_checks() == [
        "section 1: a sampled estimate or its standard error is not finite and positive"]


@pytest.fixture(scope="module")
def bias_result(contexts):
    return sgd_vs_flow(contexts, rank=4, init_scale=2.0, configs=((0.1, 1), (0.1, 4)), time=1.0, n_chains=3,
                       n_records=2, flow_dt=0.25, seed=0)


def test_sgd_vs_flow_table(bias_result):
    r = bias_result
    table = r.table
    assert len(table) == 2 * 3 and list(r.runs) == [(0.1, 1), (0.1, 4)]
    np.testing.assert_allclose(table["tau"], table["lr"] ** 2 * table["step"] / table["batch"], rtol=1e-12)
    np.testing.assert_allclose(sorted(set(table["tau"])), r.taus, atol=1e-12)
    start = table[table.step == 0]
    np.testing.assert_allclose(start["trace"], r.trace0, rtol=1e-12)  # every chain starts at the optimum
    assert (start["gap"].abs() < 1e-12).all()
    np.testing.assert_allclose(table["flow trace"], np.interp(table["tau"], r.flow.time, r.flow.trace),
                               rtol=1e-12)
    np.testing.assert_allclose(table["level eta Tr/(4B)"],
                               table["lr"] * table["trace"] / (4 * table["batch"]))
    for (lr, batch), run in r.runs.items():
        rows = table[(table.lr == lr) & (table.batch == batch)]
        np.testing.assert_allclose(rows["trace"], run.trace.mean(1).numpy(), rtol=1e-12)
        last = rows.iloc[-1]
        flow_drop = r.trace0 - last["flow trace"]
        assert last["rel. error of the drop"] == pytest.approx((r.trace0 - last["trace"]
                                                                - flow_drop) / flow_drop)
    assert math.isnan(start["rel. error of the drop"].iloc[0])  # the flow has not dropped at tau = 0
    assert list(r.excerpt().index.names) == ["lr", "batch", "tau"]


def test_sgd_verdict(bias_result):
    r = bias_result
    v = r.verdict()
    assert list(v.table["eta/B"]) == sorted(v.table["eta/B"])
    for _, row in v.table.iterrows():
        run = r.runs[row["lr"], int(row["batch"])]
        assert row["drop"] == pytest.approx(float((run.trace[0] - run.trace[-1]).mean()), rel=1e-12)
        assert row["flow drop"] == pytest.approx(r.trace0 - float(r.flow.trace[-1]), rel=1e-12)
    assert v.gd_static and v.gd_change < 1e-8
    assert v.fell  # SGD lowered the trace beyond its CI under both configurations
    flags = v.gd_static and v.loss_optimal and v.fell and v.close_at_smallest and v.ordered
    assert v.held == ("yes" if flags else "partly" if v.gd_static and v.fell else "no")
    assert v.failed_checks() == [] and v.claim().held == v.held
    assert len(v.summary().splitlines()) == 2 + len(r.runs)
    # a diverged chain is caught
    run = r.runs[0.1, 1]
    bad = dataclasses.replace(run, trace=run.trace.clone().index_fill_(0, torch.tensor([1]), math.inf))
    broken = dataclasses.replace(r, runs={**r.runs, (0.1, 1): bad}).verdict()
    assert "section 2: an SGD run diverged" in broken.failed_checks()


@pytest.fixture(scope="module")
def transfer_result():
    return flat_vs_sharp(n_words=4, seq_len=4, strengths=(0.5, 0.3), width=24, d_key=2, n_train=(1, 2, 8, 64),
                         draws=10, seed=0)


def test_flat_vs_sharp_tables(transfer_result):
    r = transfer_result
    st = r.solution_table
    assert list(st.index) == ["feature", "random"]
    assert (st["loss - L*"].abs() < 1e-10).all()
    assert st.loc["feature", "live neurons"] == 4
    assert (st["Tr H (exact)"] <= st["Tr H before balancing"] + 1e-12).all()
    assert st.loc["feature", "Tr H (exact)"] < st.loc["random", "Tr H (exact)"]
    for name, model in r.solutions.items():
        flat = FlatModel(model)
        assert st.loc[name, "parameters"] == flat.n_params
        exact = float(reference_hessian(flat, flat.vector(), r.contexts).trace())
        assert st.loc[name, "Tr H (exact)"] == pytest.approx(exact, rel=1e-8)
        assert abs(st.loc[name, "Tr H Hutchinson"] - exact) < 5 * st.loc[name, "Hutchinson se"]
    ht = r.head_table
    assert len(ht) == 2 * 4 and r.n_train == (1, 2, 8, 64)
    assert r.p_positive == pytest.approx(0.5, abs=1e-12)  # no field: the two halves are symmetric
    np.testing.assert_allclose(ht["paper bound 1 - 2^-n"], 1 - 0.5 ** ht["n"])
    np.testing.assert_allclose(ht["both signs 1 - p+^n - p-^n"], 1 - 2 * 0.5 ** ht["n"], atol=1e-12)
    for name, head in r.head.items():
        rows = ht[ht.solution == name]
        np.testing.assert_allclose(rows["error"], head.mean().numpy(), rtol=1e-12)
        np.testing.assert_allclose(rows["P(error = 0)"], head.zero_error_rate().numpy(), rtol=1e-12)
    feature = ht[ht.solution == "feature"].set_index("n")
    assert feature.loc[1, "P(error = 0)"] == 0.0 and feature.loc[64, "P(error = 0)"] == 1.0


def test_flat_vs_sharp_verdict(transfer_result):
    r = transfer_result
    v = r.verdict()
    ht = r.head_table
    for name in r.solutions:
        rows = ht[(ht.solution == name) & (ht["P(error = 0)"] >= 0.9)]
        assert r.first_n(name) == v.n90[name] == (int(rows["n"].min()) if len(rows) else None)
    assert v.loss_equal and v.flatter and v.hutchinson_agrees
    # one example shows one sign only: the paper's 1 - 2^-n fails at n = 1
    assert 1 in v.below and not v.bound_ok
    assert v.held == ("partly" if v.transfers else "no")
    assert v.failed_checks() == [] and v.claim().held == v.held
    assert "not met at n = 1" in v.claim().ours
    table = ht.copy()
    table.loc[0, "error"] = 1.5
    broken = dataclasses.replace(r, head_table=table).verdict()
    assert broken.failed_checks() == ["section 3: a head error is outside [0, 1]"]


def test_figures_draw_every_section(noise_result, bias_result, transfer_result):
    for draw, result, n_axes, words in [(noise_vs_curvature_figure, noise_result, 2, "1000 sampled examples"),
                                        (implicit_bias_figure, bias_result, 3, "3 SGD chains"),
                                        (transfer_figure, transfer_result, 3, "10 draws per n")]:
        fig, note = draw(result)
        try:
            assert len(fig.axes) == n_axes and words in note
        finally:
            plt.close(fig)
