"""Probe protocol 2 (flatlib.measurement.downstream.exact_probe): the exact multinomial logistic regression,
classes absent from a training split, one L2 per (task, model) chosen on the pooled validation splits with its
grid edge flagged, accuracy as a function of L2, and its selection through ``Protocol.probe_version``
without changing any existing cache key."""

import math
from dataclasses import asdict

import numpy as np
import pytest
import torch
from scipy.optimize import minimize
from test_experiments import LANGUAGE

from flatlib.languages import HMM
from flatlib.measurement.downstream import (
    PROBE_V2_L2_GRID,
    PROBE_V2_PATIENCE,
    accuracy_vs_l2,
    choose_l2,
    exact_probe,
    fit_logistic,
    fit_logistic_exact,
    grid_edge,
    lookup_table_features,
    pool,
)
from flatlib.measurement.measure import Protocol, lookup_table_probe


def blobs(n: int, d: int, k: int, seed: int, noise: float = 1.5) -> tuple[torch.Tensor, torch.Tensor]:
    """``k`` overlapping Gaussian classes in ``d`` dimensions with correlated, unequal-scale features:
    neither separable nor well conditioned."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, k, (n,), generator=g)
    centres = torch.randn(k, d, generator=g, dtype=torch.float64)
    mix = torch.randn(d, d, generator=g, dtype=torch.float64) / math.sqrt(d)
    x = (centres[y] + noise * torch.randn(n, d, generator=g, dtype=torch.float64)) @ mix
    return x * torch.logspace(-1, 1, d, dtype=torch.float64), y


def reference_solve(x: torch.Tensor, y: torch.Tensor, classes: list[int], l2: float
                    ) -> tuple[np.ndarray, float, float, float]:
    """The documented objective on the present ``classes`` (bias unpenalised, one class's bias pinned at 0
    to remove the shift invariance) by scipy's L-BFGS-B run to 1e-13: ``([D + 1, K] weights, objective,
    gradient norm, smallest Hessian eigenvalue)`` at its solution, biases re-centred to sum 0 as the exact
    solver returns them. The last two bound the distance to the optimum: |w - w*| <= |g| / lambda_min."""
    xs, n = np.concatenate([x.numpy(), np.ones((len(x), 1))], 1), len(x)
    index = {c: k for k, c in enumerate(classes)}
    onehot = np.zeros((n, len(classes)))
    onehot[np.arange(n), [index[int(c)] for c in y]] = 1
    shape = (xs.shape[1], len(classes))

    def unpack(theta: np.ndarray) -> np.ndarray:
        return np.append(theta, 0.0).reshape(shape)  # the last class's bias pinned

    def objective(theta: np.ndarray) -> tuple[float, np.ndarray]:
        w = unpack(theta)
        z = xs @ w
        z -= z.max(1, keepdims=True)
        p = np.exp(z)
        p /= p.sum(1, keepdims=True)
        loss = -np.mean(np.sum(onehot * np.log(p), 1)) + l2 * np.sum(w[:-1] ** 2)
        grad = xs.T @ (p - onehot) / n
        grad[:-1] += 2 * l2 * w[:-1]
        return loss, grad.ravel()[:-1]

    result = minimize(objective, np.zeros(shape[0] * shape[1] - 1), jac=True, method="L-BFGS-B",
                      options={"maxiter": 200_000, "maxfun": 400_000, "gtol": 1e-13, "ftol": 1e-16,
                               "maxcor": 50})
    w = unpack(result.x)
    p = np.exp(xs @ w - (xs @ w).max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    # Hessian in the pinned coordinates: sum_i (diag p_i - p_i p_i^T) (x) x_i x_i^T / n + 2 l2 on the weights
    blocks = np.einsum("ic,ce->ice", p, np.eye(len(classes))) - np.einsum("ic,ie->ice", p, p)
    hessian = np.einsum("ia,ib,ice->acbe", xs, xs, blocks).reshape(w.size, w.size) / n
    hessian[: -len(classes), : -len(classes)] += 2 * l2 * np.eye(w.size - len(classes))
    smallest = float(np.linalg.eigvalsh(hessian[:-1, :-1])[0])
    w[-1] -= w[-1].mean()
    return w, float(result.fun), float(np.linalg.norm(result.jac)), smallest


def restricted_gradient(weight: torch.Tensor, x: torch.Tensor, y: torch.Tensor, classes: list[int],
                        l2: float) -> torch.Tensor:
    """The documented objective's gradient by autograd, at the present classes' columns of ``weight``."""
    w = weight[:, classes].clone().requires_grad_(True)
    xs = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], 1)
    target = torch.tensor([classes.index(int(c)) for c in y])
    loss = torch.nn.functional.cross_entropy(xs @ w, target) + l2 * (w[:-1] ** 2).sum()
    loss.backward()
    return w.grad


# ---------------------------------------------------------------------------- the exact solver
@pytest.mark.parametrize("l2", [1e-7, 1e-4, 1e-1])
@pytest.mark.parametrize("dense_limit", [10**6, 0], ids=["dense Hessian", "conjugate gradients"])
def test_exact_solver_matches_a_long_reference_solve(l2: float, dense_limit: int) -> None:
    x, y = blobs(400, 12, 5, seed=1)
    x = (x - x.mean(0)) / x.std(0)
    fit = fit_logistic_exact(x, y, 5, l2, tol=1e-10, dense_limit=dense_limit)
    reference, objective, gradient, curvature = reference_solve(x, y, list(range(5)), l2)
    assert fit.converged and fit.max_gradient <= 1e-10
    assert fit.objective <= objective + 1e-12  # the long reference solve is no better ...
    assert fit.objective == pytest.approx(objective, rel=1e-10)  # ... nor worse
    # both within |gradient| / (smallest curvature) of the unique optimum (pinned coordinates: the
    # biases' shift removed, which moves each bias by at most its mean)
    bound = (gradient + fit.max_gradient * math.sqrt(fit.weight.numel())) / curvature
    assert float(torch.linalg.norm(fit.weight - torch.from_numpy(reference))) <= 2 * bound + 1e-12


@pytest.mark.parametrize("dense_limit", [10**6, 0], ids=["dense Hessian", "conjugate gradients"])
def test_exact_solution_is_stationary(dense_limit: int) -> None:
    """The optimality condition, checked by autograd independently of the solver's own gradient."""
    x, y = blobs(600, 20, 7, seed=2)
    x = (x - x.mean(0)) / x.std(0)
    for l2 in (1e-6, 1e-2):
        fit = fit_logistic_exact(x, y, 7, l2, tol=1e-9, dense_limit=dense_limit)
        assert fit.converged and fit.newton_steps < 50
        assert restricted_gradient(fit.weight, x, y, list(range(7)), l2).abs().max() <= 1e-9
        assert abs(float(fit.weight[-1].sum())) < 1e-9  # the biases' free shift fixed at sum 0


def test_exact_solver_and_capped_lbfgs_share_the_objective() -> None:
    """On an easy problem the capped L-BFGS of protocol 1 reaches the same optimum: same objective."""
    x, y = blobs(300, 6, 3, seed=3, noise=3.0)
    x = (x - x.mean(0)) / x.std(0)
    exact = fit_logistic_exact(x, y, 3, 1e-2).weight
    lbfgs = fit_logistic(x, y, 3, 1e-2, max_iter=2000)
    logits = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], 1) @ (lbfgs - exact)
    assert (logits - logits.mean(1, keepdim=True)).abs().max() < 1e-5  # equal up to the biases' free shift


def test_absent_classes_get_probability_zero_and_the_optimum_is_attained() -> None:
    """Classes 1 and 4 have no training example: the infimum of protocol 1's objective sends their biases to
    -inf; the solver restricts the model to the present classes, whose optimum exists (finite, stationary)."""
    x, y = blobs(500, 8, 6, seed=4)
    x = (x - x.mean(0)) / x.std(0)
    keep = (y != 1) & (y != 4)
    x, y = x[keep], y[keep]
    present = [0, 2, 3, 5]
    fit = fit_logistic_exact(x, y, 6, 1e-5)
    assert fit.converged and fit.present.tolist() == [True, False, True, True, False, True]
    assert torch.isfinite(fit.weight[:, present]).all()
    assert (fit.weight[:-1, [1, 4]] == 0).all() and (fit.weight[-1, [1, 4]] == -math.inf).all()
    assert restricted_gradient(fit.weight, x, y, present, 1e-5).abs().max() <= 1e-8
    objective = reference_solve(x, y, present, 1e-5)[1]
    assert fit.objective <= objective + 1e-12 and fit.objective == pytest.approx(objective, rel=1e-10)
    # protocol 1's model on all 6 classes approaches the restricted optimum from above as the absent biases
    # fall: the restricted optimum is that objective's infimum. At the optimum the present classes' weights
    # sum to 0 (the penalty's stationarity), so their mean logit is 0, their log-sum-exp >= 0, and a bias
    # of -30 on two classes adds at most 2 exp(-30) to the cross-entropy.
    xs = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], 1)
    full, values = fit.weight.clone(), []
    for bias in (-5.0, -30.0):
        full[-1, [1, 4]] = bias
        values.append(float(torch.nn.functional.cross_entropy(xs @ full, y) + 1e-5 * (full[:-1] ** 2).sum()))
    assert fit.objective < values[1] < values[0] and values[1] - fit.objective <= 2 * math.exp(-30) + 1e-14
    # and predicts no absent class
    assert not torch.isin((xs @ fit.weight).argmax(1), torch.tensor([1, 4])).any()


def test_one_present_class_predicts_it() -> None:
    x = torch.randn(20, 3, dtype=torch.float64)
    fit = fit_logistic_exact(x, torch.full((20,), 2), 4, 1e-3)
    assert fit.converged and fit.objective == 0.0 and fit.present.tolist() == [False, False, True, False]
    assert ((torch.cat([x, torch.ones(20, 1, dtype=x.dtype)], 1) @ fit.weight).argmax(1) == 2).all()


def test_exact_solver_refuses_bad_arguments() -> None:
    x, y = torch.zeros(5, 2, dtype=torch.float64), torch.tensor([0, 1, 0, 1, 3])
    with pytest.raises(ValueError, match="y: .*n_classes = 3"):
        fit_logistic_exact(x, y, 3, 1e-3)
    with pytest.raises(ValueError, match="l2"):
        fit_logistic_exact(x, y.clamp(max=1), 3, -1.0)
    with pytest.raises(ValueError, match="x: expected float64"):
        fit_logistic_exact(x.float(), y.clamp(max=1), 3, 1e-3)


# ---------------------------------------------------------------------------- choosing L2
def test_choose_l2_pools_the_splits_and_prefers_the_stronger_penalty_on_ties() -> None:
    import pandas as pd
    table = pd.DataFrame({"split": [0, 0, 0, 1, 1, 1], "l2": [1e-3, 1e-2, 1e-1] * 2,
                          "val_accuracy": [0.9, 0.6, 0.5, 0.5, 0.8, 0.7]})
    assert choose_l2(table) == 1e-2  # pooled 0.70 / 0.70 / 0.60: a tie, the stronger penalty ...
    table.loc[0, "val_accuracy"] = 0.91
    assert choose_l2(table) == 1e-3  # ... unless the weaker is better
    table.loc[3, "val_accuracy"] = 0.45
    assert choose_l2(table) == 1e-2  # one L2 for both splits: split 0 alone would still say 1e-3


def test_grid_edge() -> None:
    grid = (1e-1, 1e-3, 1e-2)
    assert grid_edge(grid, 1e-3) == "lower" and grid_edge(grid, 1e-1) == "upper"
    assert grid_edge(grid, 1e-2) is None
    assert grid_edge((1e-4,), 1e-4) is None  # a fixed L2 was not chosen
    assert PROBE_V2_L2_GRID[0] <= 1e-7 and PROBE_V2_L2_GRID[-1] >= 1e-1
    assert list(PROBE_V2_L2_GRID) == sorted(PROBE_V2_L2_GRID)


def hmm_task():
    hmm = HMM.random(n_states=4, vocab_size=8, seq_len=6, concentration=0.5, seed=3, task_positions=(3,))
    corpus = hmm.sample(1200, seed=0)
    features = pool(lookup_table_features(hmm, corpus), corpus, "concat").float()
    return hmm, features, hmm.task_labels(corpus, "state@3")


def test_exact_probe_chooses_one_l2_and_flags_an_edge() -> None:
    hmm, x, labels = hmm_task()
    kwargs = dict(n_train=400, n_test=300, n_splits=2, seed=5)
    result = exact_probe(x, labels, 4, l2_grid=(1e-4, 1e-2, 1e0, 1e1), **kwargs)
    curve = accuracy_vs_l2(x, labels, 4, l2_grid=(1e-4, 1e-2, 1e0, 1e1), **kwargs)
    pooled = curve["val_accuracy"]
    assert result.chosen_l2 == [pooled[pooled == pooled.max()].index.max()] * 2
    assert result.l2_edge == grid_edge((1e-4, 1e-2, 1e0, 1e1), result.chosen_l2[0])
    assert result.accuracy == pytest.approx(curve.loc[result.chosen_l2[0], "test_accuracy"], abs=1e-12)
    assert result.max_gradient <= 1e-8
    # a strong penalty is worse on these features than a weak one: a grid that stops at 1 and 10 hits its edge
    strong = exact_probe(x, labels, 4, l2_grid=(1e0, 1e1), **kwargs)
    assert strong.chosen_l2 == [1e0, 1e0] and strong.l2_edge == "lower"


def test_accuracy_vs_l2_per_l2_is_the_exact_probe_at_that_l2() -> None:
    hmm, x, labels = hmm_task()
    kwargs = dict(n_train=400, n_test=300, n_splits=2, seed=5)
    curve = accuracy_vs_l2(x, labels, 4, l2_grid=(1e-5, 1e-3, 1e-1), **kwargs)
    assert list(curve.index) == [1e-5, 1e-3, 1e-1]
    assert set(curve.columns) >= {"test_accuracy", "test_ci95", "val_accuracy"}
    for l2 in curve.index:
        single = exact_probe(x, labels, 4, l2_grid=(l2,), **kwargs)
        assert single.accuracy == pytest.approx(curve.loc[l2, "test_accuracy"], abs=1e-12)
        assert single.ci95 == pytest.approx(curve.loc[l2, "test_ci95"], abs=1e-12)


# ---------------------------------------------------------------------------- the protocol
def test_protocol_version_1_keeps_every_key_and_version_2_gets_a_new_one() -> None:
    small = dict(probe_sentences=800, probe_train=300, probe_test=200, probe_splits=2,
                 probe_l2_grid=(1e-3, 1e-1), seed=4)
    assert Protocol(**small).key() == "deb9c43d80e644e2"  # computed before probe_version existed
    assert Protocol(**small, probe_version=1).key() == "deb9c43d80e644e2"
    assert Protocol(probe_version=1).key() == Protocol().key()
    assert Protocol(**small, probe_version=2).key() not in ("deb9c43d80e644e2", Protocol(**small).key())
    v2 = Protocol(**small, probe_version=2)
    assert Protocol(**asdict(v2)) == v2 and Protocol(**asdict(v2)).key() == v2.key()  # as workers rebuild it


def test_protocol_version_1_probe_is_bit_identical() -> None:
    """lookup_table_probe under protocol 1, pinned before protocol 2 existed."""
    protocol = Protocol(probe_sentences=800, probe_train=300, probe_test=200, probe_splits=2,
                        probe_l2_grid=(1e-3, 1e-1), seed=4)
    r = lookup_table_probe(LANGUAGE, protocol)["state@3"]
    assert r == {"accuracy": 0.62, "ci95": 0.19059307104262058, "splits": [0.605, 0.635],
                 "chosen_l2": [0.001, 0.001], "sweep": {"0.001": 0.62, "0.1": 0.605}, "majority": 0.35375,
                 "bayes": 0.759598951928355, "bayes_se": 0.005730638829868803}


def test_protocol_version_2_records_the_choice() -> None:
    protocol = Protocol(probe_sentences=800, probe_train=300, probe_test=200, probe_splits=2,
                        probe_l2_grid=(1e-5, 1e-3, 1e-1), seed=4, probe_version=2)
    r = lookup_table_probe(LANGUAGE, protocol)["state@3"]
    assert r["probe_version"] == 2 and r["chosen_l2"] == [r["l2"]] * 2 and r["l2"] in (1e-5, 1e-3, 1e-1)
    assert r["l2_edge"] == grid_edge((1e-5, 1e-3, 1e-1), r["l2"]) and r["max_gradient"] <= 1e-8
    assert set(r["sweep"]) == set(r["sweep_val"]) == {"1e-05", "0.001", "0.1"}
    assert r["accuracy"] == pytest.approx(r["sweep"][str(r["l2"])], abs=1e-12)


def test_protocol_unknown_probe_version_is_refused_before_anything_is_cached() -> None:
    with pytest.raises(ValueError, match=r"probe_version: expected 1 or 2"):  # refused when built
        Protocol(probe_version=3)
    protocol = Protocol(probe_sentences=800, probe_train=300, probe_test=200)
    # past the constructor: key() and the probe refuse it too
    object.__setattr__(protocol, "probe_version", 0)
    with pytest.raises(ValueError, match=r"probe_version: expected 1 or 2"):
        protocol.key()
    with pytest.raises(ValueError, match=r"probe_version: expected 1 or 2"):
        lookup_table_probe(LANGUAGE, protocol)


def test_measure_checkpoint_under_protocol_2_uses_it_for_every_probe(tmp_path) -> None:
    from dataclasses import replace

    from test_experiments import SMALL, base_config

    from flatlib.measurement.measure import measure_checkpoint
    from flatlib.runner.runs import RunStore
    from flatlib.training.train import pretrain

    run = pretrain(base_config(), RunStore(tmp_path), progress=False)
    protocol = replace(SMALL, probe_version=2, probe_l2_grid=(1e-5, 1e-3, 1e-1))
    m = measure_checkpoint(run, 40, protocol)
    for probe in [m["probes"]] + list(m["extra_probes"].values()):
        assert probe["state@3"]["probe_version"] == 2 and probe["state@3"]["max_gradient"] <= 1e-8
    assert m["extra_probes"]["limited"]["state@3"]["l2"] == SMALL.limited_l2
    assert m["extra_probes"]["limited"]["state@3"]["l2_edge"] is None  # a fixed L2: no choice, no edge
    cached = [path.name for path in (run.dir / "evals").glob("*.json")]
    assert cached == [f"{40:08d}_{protocol.key()}.json"]
    assert protocol.key() != replace(SMALL, probe_l2_grid=(1e-5, 1e-3, 1e-1)).key()


def test_the_walk_down_the_grid_stops_past_the_optimum_with_the_whole_grids_choice() -> None:
    """Protocol 2 walks from the strongest penalty down and stops after PROBE_V2_PATIENCE strengths in a
    row below the best pooled validation accuracy: on a unimodal curve it chooses what the whole grid
    chooses, from fewer fits, and every strength it skipped is weaker than the choice."""
    hmm, x, labels = hmm_task()
    kwargs = dict(n_train=400, n_test=300, n_splits=2, seed=5)
    grid = PROBE_V2_L2_GRID
    whole = exact_probe(x, labels, 4, l2_grid=grid, patience=None, **kwargs)
    walked = exact_probe(x, labels, 4, l2_grid=grid, **kwargs)
    assert PROBE_V2_PATIENCE == 3 and len(whole.sweep) == len(grid)
    chosen = whole.chosen_l2[0]
    pooled = whole.sweep["val_accuracy"]
    # where the whole curve falls at the next PROBE_V2_PATIENCE weaker strengths, the walk stops there
    below = [l2 for l2 in sorted(grid, reverse=True) if l2 < chosen][:PROBE_V2_PATIENCE]
    if len(below) == PROBE_V2_PATIENCE and all(pooled[l2] < pooled[chosen] for l2 in below):
        assert len(walked.sweep) < len(grid) and walked.sweep.index.min() == min(below)
    assert walked.chosen_l2 == whole.chosen_l2 and walked.accuracy == whole.accuracy
    assert (set(walked.sweep.index) <= set(grid)
            and all(l2 < chosen for l2 in set(grid) - set(walked.sweep.index)))
    with pytest.raises(ValueError, match="patience"):
        exact_probe(x, labels, 4, l2_grid=grid, patience=0, **kwargs)


def test_conjugate_gradients_in_the_gram_eigenbasis_reach_the_dense_solvers_optimum() -> None:
    """The conjugate-gradient path rotates the features into the eigenbasis of x^T x / n (an orthogonal
    change of coordinates: same logits, same penalty) and returns the weights in the original ones: the
    same optimum as the dense Hessian's, whether the basis is given (once per split, as the probe does) or
    computed; a basis of the wrong size is refused, naming it."""
    x, y = blobs(300, 9, 4, seed=7)
    x = (x - x.mean(0)) / x.std(0)
    dense = fit_logistic_exact(x, y, 4, 1e-4, tol=1e-11, dense_limit=10**6)
    basis = torch.linalg.eigh(x.T @ x / len(x))
    for given in (None, basis):
        cg = fit_logistic_exact(x, y, 4, 1e-4, tol=1e-11, dense_limit=0, basis=given)
        assert cg.converged and cg.objective == pytest.approx(dense.objective, rel=1e-12)
        assert torch.allclose(cg.weight, dense.weight, atol=1e-8)
        assert restricted_gradient(cg.weight, x, y, list(range(4)), 1e-4).abs().max() <= 1e-10
    with pytest.raises(ValueError, match="basis"):
        fit_logistic_exact(x, y, 4, 1e-4, dense_limit=0, basis=(basis[0][:-1], basis[1][:-1, :-1]))
