"""How fast and how accurate is flatlib's Hessian trace, compared with PyHessian's?

The paper's flatness measure is the trace of the Hessian of the pre-training loss, so every
experiment pays for trace estimates. This benchmark measures what one estimate costs at a stated
precision, and checks that the numbers are right.

Measured in one run (``--threads`` torch threads, default 1):

1. **The model.** A 2x64 Transformer like the cpu profile's, trained by ``flatlib.training.train.pretrain``
   on a small HMM (6 states, 12 words, length 10) to ~0.02 nats above the exact optimum. It is
   cached in the run store ``build/bench_runs``: the first run trains it (about 2 minutes on one
   core) and later runs reuse it. Its validation pairs are the ONE fixed evaluation set of every
   estimate below: 4096 (sentence, masked position) pairs, or the first 1024 with ``--quick``, in
   batches of 512. The loss is flatlib's single-mask MLM loss with the sampled words as hard
   targets, averaged over the pairs.
2. **HVP cost / gradient cost** on those batches, for two modes. ``reverse`` is double backward:
   each batch's gradient graph is built once and reused by every probe, so the cost is that of one
   more probe. ``forward`` is ``jvp`` of ``grad`` and reuses nothing. Target: <= 2.5x a gradient,
   where a gradient is forward + backward of the same loss on the same explicit, twice-
   differentiable attention path. Gradients and HVPs are timed in interleaved rounds so that all
   see the same load, and the best round of each is kept.
3. **Time to a 2% relative standard error of Tr H** on the fixed set, per estimator. Each has a
   cost per *probe* (Hutchinson: one Rademacher vector; Fisher: one example with one label sampled
   from the model), a per-probe coefficient of variation ``cv`` (the standard deviation of one
   probe divided by the trace), and a fixed setup cost. Hence ``n = (cv / 0.02)^2`` probes and
   ``time = setup + n x time per probe``. A run with a fixed number of probes checks the
   prediction: its time, and its standard error against ``cv / sqrt(n)``. The estimators:

   * flatlib ``hessian_trace`` (Hutchinson), in reverse and forward mode (same probes, same samples).
   * PyHessian 0.1 ``hessian(model, criterion, dataloader=...).trace()``, its multi-batch mode.
     flatlib's model sits behind PyHessian's ``criterion(model(x), y)`` interface
     (``PyHessianMLM``). PyHessian rebuilds every batch's gradient graph for every probe. Its
     default stopping rule (``tol=1e-3`` on the relative change of the running mean,
     ``maxIter=100``) is reported as is: how many probes it used, and how far its answer is from
     the best estimate. The same probe stream is then continued to a fixed count for the timing.
     ``torch.manual_seed(s)`` makes PyHessian draw exactly the signs of flatlib's probes of seed
     ``s``, so its samples must equal flatlib's, which cross-checks both implementations. Both
     rows therefore use flatlib's ``cv`` from independent seeds, so the ratio of their times is
     their cost ratio and not chance.
   * flatlib ``fisher_trace`` (labels sampled from the model). Away from the optimum this is not
     the Hessian trace, so its bias is measured rather than assumed. For softmax cross-entropy,
     ``Tr H = Tr F + Tr R`` holds exactly at any parameters. Here ``F`` is the Fisher of the
     model's own predictive distribution (the Gauss-Newton matrix) and
     ``R = sum_c (q_c - t_c) grad^2 z_c``, with logits ``z``, model probabilities ``q`` and
     targets ``t``. ``Tr R`` is the Hessian trace of ``mlm_loss_fn`` with the fixed soft
     "targets" ``t - q(theta_0)``. Hutchinson on ``R`` has little variance, because ``R`` is small
     near the optimum, so ``Tr H - Tr F`` is estimated with a small standard error. It splits into
     a part from not being at the optimum (``t`` = exact conditionals) and a part from the sampled
     words of the fixed set (hard targets minus exact conditionals). The Fisher counts as a valid
     Tr H estimator at 2% only if its bias is below 2% with two standard errors to spare.
   * "Fisher + residual": ``fisher_trace`` plus Hutchinson on ``R``. This is a composition of
     flatlib's public functions, built here, not a flatlib function. It is unbiased for Tr H at
     any parameters, and the probe budget is split between its two parts to minimise time. Its
     estimate with the most probes is the "best estimate" the others are compared with.

5. **The gauge-invariant trace** (``flatness.invariant_trace``) beside the raw Hutchinson trace of
   the expected loss on the same pairs and probes, for the model as trained and after a function-
   preserving rescaling of its final LayerNorm: cost (setup = the exact gauge diagonals, then per
   probe), standard error and time to 2%.

4. **Error against the exact trace**, on a model small enough for a dense Hessian: a 1 x 8
   Transformer with 790 parameters, in float64, trained on a 3-state HMM and evaluated on its 512
   validation pairs in 4 batches. The dense Hessian is built row by row by classic double backward
   (as in tests/test_flatness.py) and checked to be symmetric. Each estimator is run with several
   seeds at a fixed number of probes, and PyHessian also at its default stopping rule. The
   relative error is reported as its mean (the bias) and its root mean square, next to what the
   exact per-probe variance of Hutchinson, ``2 (||H||_F^2 - sum_i H_ii^2)``, predicts.
5. **Targets**: flatlib Hutchinson >= 1.5x faster than PyHessian to the same standard error; the
   fastest valid flatlib estimator >= 3x faster than PyHessian.

Timings are wall times on a shared machine. The load average is recorded at the start and the
end, and a busy machine is flagged: every timing is then pessimistic, PyHessian's and flatlib's
alike.

    python -m bench.flatness              # full run (~5 minutes; plus ~2 the first time, to train)
    python -m bench.flatness --quick      # small sizes, a smoke test (writes flatness_quick.json)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import time
import warnings
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Callable, Sequence, TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bench.common import cpu_model, print_table
from flatlib.languages import build_language
from flatlib.measurement.flatness import (
    TraceEstimate,
    dense_hessian,
    fisher_diagonal,
    fisher_trace,
    hessian_mode,
    hessian_trace,
    hvp,
    invariant_trace,
    mlm_logits_fn,
    mlm_loss_fn,
    rademacher_probes,
    trainable_parameters,
)
from flatlib.runner.runs import RunStore
from flatlib.training.model import gauge_pairs, rescale_norms
from flatlib.training.objective import evaluate, validation_set
from flatlib.training.train import PretrainConfig, load_model, pretrain

try:  # a bench-only dependency: without it the PyHessian rows are n/a, and the rest still runs
    import pyhessian
    from pyhessian import hessian as PyHessian
    PYHESSIAN_ERROR = ""
except ImportError as _error:  # pragma: no cover - depends on the environment
    pyhessian, PyHessian, PYHESSIAN_ERROR = None, None, str(_error)

# PyHessian calls loss.backward(create_graph=True), which warns on every batch about the
# parameter <-> .grad reference cycle (PyHessian breaks the cycle itself with model.zero_grad()).
# torch's forward-mode AD loads its decompositions once through the deprecated torch.jit.script.
warnings.filterwarnings("ignore", message=r"Using backward\(\) with create_graph=True")
warnings.filterwarnings("ignore", message=r"`torch.jit.script` is deprecated")

ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = ROOT / "bench" / "results"
RUNS_DIR = ROOT / "build" / "bench_runs"
BUSY_LOAD = 0.5  # a 1-minute load average above this means other work is running
REL_SE = 0.02  # the precision every "time to target" is for
INVARIANT_PROBES = 12  # probes of the raw-vs-invariant comparison (the notebooks' protocol)
HVP_TARGET = 2.5  # HVP time / gradient time
HUTCHINSON_TARGET = 1.5  # flatlib Hutchinson vs PyHessian, at equal standard error
FASTEST_TARGET = 3.0  # the fastest valid flatlib estimator vs PyHessian
BATCH = 512  # examples per batch of the fixed evaluation set

# The model measured: like the cpu profile's 2x64, AdamW with a linear decay, ~0.02 nats from the optimum.
MAIN = PretrainConfig(
    language={"kind": "hmm", "n_states": 6, "vocab_size": 12, "seq_len": 10, "concentration": 0.2, "seed": 0},
    model={"n_layer": 2, "n_head": 2, "d_model": 64, "d_ff": 256},
    lr=3e-3, warmup_steps=200, schedule="linear", steps=3000, batch_size=256, eval_pairs=4096, seed=0)
# Small enough for a dense Hessian (790 parameters). It is trained too, so that its Fisher means something.
TINY = PretrainConfig(
    language={"kind": "hmm", "n_states": 3, "vocab_size": 6, "seq_len": 5, "concentration": 0.2, "seed": 0},
    model={"n_layer": 1, "n_head": 1, "d_model": 8, "d_ff": 16},
    lr=1e-2, warmup_steps=100, schedule="linear", steps=2000, batch_size=256, eval_pairs=512, seed=0)

SIZES: dict[str, dict[str, int]] = {
    "full": dict(pairs=4096, repeats=3, cal_probes=4, fwd_probes=2, probes=80, pyh_probes=32,
                 pyh_max_iter=100, residual_probes=16, tiny_pairs=512, tiny_batch=128, tiny_probes=32,
                 tiny_reps=48, tiny_default_reps=20, tiny_residual_probes=8),
    "quick": dict(pairs=1024, repeats=2, cal_probes=3, fwd_probes=2, probes=6, pyh_probes=8,
                  pyh_max_iter=12, residual_probes=3, tiny_pairs=128, tiny_batch=32, tiny_probes=16,
                  tiny_reps=3, tiny_default_reps=5, tiny_residual_probes=4),
}

T = TypeVar("T")
Batch = tuple[Tensor, ...]  # (inputs, positions, targets[, true conditionals])


# ----------------------------------------------------------------------------- helpers
def timed(fn: Callable[[], T]) -> tuple[float, T]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def best_of(fn: Callable[[], object], repeats: int) -> float:
    """Best wall time of ``repeats`` calls, after one warm-up call. The best call is the one the
    rest of the machine disturbed least. Used for cheap, repeatable timings only."""
    fn()
    return min(timed(fn)[0] for _ in range(repeats))



def std(x: Tensor) -> float:
    return float(x.double().std())


def max_rel_diff(a: Tensor, b: Tensor) -> float:
    return float(((a.double() - b.double()).abs() / b.double().abs()).max())


def split(parts: Sequence[Tensor], n: int, batch_size: int) -> list[Batch]:
    """The first ``n`` rows of ``parts``, in batches of ``batch_size``."""
    return [tuple(t[i: min(i + batch_size, n)] for t in parts) for i in range(0, n, batch_size)]


def first_examples(batches: Sequence[Batch], n: int) -> list[Batch]:
    """The first ``n`` examples of ``batches``, keeping the batches. The pairs are i.i.d. draws, so
    a prefix is a uniform random subsample of the fixed set."""
    out, left = [], n
    for batch in batches:
        if left <= 0:
            break
        k = min(left, len(batch[0]))
        out.append(tuple(t[:k] for t in batch))
        left -= k
    return out


def n_examples(batches: Sequence[Batch]) -> int:
    return sum(len(b[0]) for b in batches)


def trained(config: PretrainConfig) -> tuple[nn.Module, float, bool]:
    """The final model of ``config`` from the run store, trained first if need be. Also returns
    the seconds that took and whether the run was already cached."""
    store = RunStore(RUNS_DIR)
    existing = store.find(config.to_dict())
    cached = existing is not None and existing.finished
    # a CPU benchmark: the model stays on the CPU even where a GPU is visible
    train_s, run = timed(lambda: pretrain(config, store, progress=not cached, device="cpu"))
    return load_model(run, device="cpu"), train_s, cached


def residual_batches(model: nn.Module, batches: Sequence[Batch], targets: str) -> list[Batch]:
    """The batches with the soft "targets" ``t - q(theta_0)``.

    ``mlm_loss_fn`` on them is ``-sum_c (t_c - q_c) z_c``: the log-sum-exp terms cancel because
    the weights sum to 0. Its Hessian is ``R = H(t) - GGN``, and the GGN is the Fisher of the
    model's own distribution. ``targets`` is ``"hard"`` (the sampled words, as in the loss
    measured) or ``"exact"`` (the true conditionals: the expected loss). Each batch must carry the
    true conditionals as a 4th tensor."""
    out = []
    with torch.no_grad(), hessian_mode(model):
        for inputs, positions, words, probs in batches:
            q = torch.softmax(mlm_logits_fn(model, (inputs, positions)).double(), dim=-1)
            t = F.one_hot(words, q.shape[1]).double() if targets == "hard" else probs
            out.append((inputs, positions, t - q))
    return out


# ----------------------------------------------------------------------------- gradient and HVP costs
def gradient_seconds(model: nn.Module, batches: Sequence[Batch], create_graph: bool) -> float:
    """The time of one gradient of the evaluation loss, with batches weighted by size as flatlib
    does, on the explicit attention path in eval mode. This is the yardstick for an HVP. With
    ``create_graph`` it is the setup cost of reverse-mode Hutchinson: every batch's graph, built
    once."""
    params = list(trainable_parameters(model).values())
    total = n_examples(batches)

    def run() -> None:
        with hessian_mode(model), torch.enable_grad():
            for batch in batches:
                loss = mlm_loss_fn(model, batch) * (len(batch[0]) / total)
                torch.autograd.grad(loss, params, create_graph=create_graph)

    return timed(run)[0]


@dataclass
class Costs:
    """Timings from ``repeats`` interleaved rounds, so that every kind sees the same load.

    Each round runs a gradient, a gradient with graph, reverse Hutchinson with ``cal_probes`` probes
    and forward Hutchinson with ``fwd_probes`` probes. The best round of each kind is the least
    disturbed measurement, used for the HVP / gradient ratios. The median is the typical cost,
    used for the prediction that the long run checks."""

    gradient: list[float]
    graph: list[float]
    reverse_per_probe: list[float]  # (reverse run - gradient with graph of the same round) / probes
    forward_per_probe: list[float]
    reverse_runs: list[TraceEstimate]  # seeds 1, 2, ...: independent of the long run's seed 0
    forward_runs: list[TraceEstimate]  # seed 0: the long run's first probes


def measure_costs(model: nn.Module, batches: Sequence[Batch], repeats: int, cal_probes: int,
                  fwd_probes: int) -> Costs:
    hessian_trace(model, mlm_loss_fn, batches[:1], 2, seed=99)  # warm-up: allocator, lazy initialisation
    hessian_trace(model, mlm_loss_fn, batches[:1], 2, seed=99, mode="forward")
    costs = Costs([], [], [], [], [], [])
    for r in range(repeats):
        costs.gradient.append(gradient_seconds(model, batches, create_graph=False))
        costs.graph.append(gradient_seconds(model, batches, create_graph=True))
        t, e = timed(lambda: hessian_trace(model, mlm_loss_fn, batches, cal_probes, seed=1 + r))
        costs.reverse_per_probe.append(max(t - costs.graph[-1], 0.0) / cal_probes)
        costs.reverse_runs.append(e)
        t, e = timed(lambda: hessian_trace(model, mlm_loss_fn, batches, fwd_probes, seed=0, mode="forward"))
        costs.forward_per_probe.append(t / fwd_probes)
        costs.forward_runs.append(e)
    return costs


# ----------------------------------------------------------------------------- PyHessian
class PyHessianMLM(nn.Module):
    """flatlib's Transformer behind PyHessian's ``criterion(model(x), y)`` interface.

    ``x`` packs the masked inputs ``[m, L]`` with the masked positions as one more column,
    ``[m, L+1]``. It has to be one tensor, because PyHessian moves ``x`` with ``.to(device)`` and
    counts examples with ``x.size(0)``. The output is ``mlm_logits_fn``'s ``[m, V]``, the same
    computation flatlib differentiates, so ``nn.CrossEntropyLoss()`` is exactly ``mlm_loss_fn``.
    PyHessian sets eval mode itself but knows nothing of flatlib's fused attention, which is not
    twice differentiable (double backward raises), so it is run inside ``hessian_mode``."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: Tensor) -> Tensor:
        return mlm_logits_fn(self.model, (x[:, :-1], x[:, -1]))


def pyhessian_data(batches: Sequence[Batch]) -> list[tuple[Tensor, Tensor]]:
    """``(x, y)`` batches for PyHessian's ``dataloader=``. Any iterable of pairs works, and a list
    of ready batches spares PyHessian a DataLoader's collation cost, which is not what is measured."""
    return [(torch.cat([b[0], b[1][:, None]], dim=1), b[2]) for b in batches]


@dataclass
class PyHessianResult:
    setup_s: float  # hessian(...) construction
    first: list[float]  # the samples of trace(maxIter, tol), under its own stopping rule
    first_s: float
    samples: list[float]  # ``first`` continued with the same probe stream up to ``fill_to`` probes
    samples_s: float  # wall time of all of ``samples``


def run_pyhessian(model: nn.Module, batches: Sequence[Batch], seed: int, max_iter: int, tol: float,
                  fill_to: int = 0) -> PyHessianResult:
    """PyHessian's trace in its dataloader mode: ``trace(maxIter, tol)`` after
    ``torch.manual_seed(seed)``, then more probes from the same stream up to ``fill_to``.

    PyHessian draws its probes from the global RNG, which is forked here so that the caller's RNG
    is left untouched. ``trace(tol=0)`` never stops early on a positive running mean, and the stream
    continues where the first call left it, so the samples equal those of one uninterrupted call
    (checked)."""
    wrapper, data = PyHessianMLM(model), pyhessian_data(batches)
    with hessian_mode(model), torch.random.fork_rng(devices=[]):
        # cuda=False is required: the default, cuda=True, sends every batch .to("cuda")
        setup_s, h = timed(lambda: PyHessian(wrapper, nn.CrossEntropyLoss(), dataloader=data, cuda=False))
        torch.manual_seed(seed)
        first_s, first = timed(lambda: [float(x) for x in h.trace(maxIter=max_iter, tol=tol)])
        samples = list(first)
        start = time.perf_counter()
        while len(samples) < fill_to:
            samples += [float(x) for x in h.trace(maxIter=fill_to - len(samples), tol=0.0)]
        rest_s = time.perf_counter() - start
    model.zero_grad(set_to_none=True)  # PyHessian leaves .grad behind on the model it is given
    return PyHessianResult(setup_s, first, first_s, samples, first_s + rest_s)


# ----------------------------------------------------------------------------- estimator rows
@dataclass
class Row:
    """One estimator of a trace on the fixed evaluation set, with its time to REL_SE."""

    estimator: str
    probe: str  # what one probe is
    value: float  # the estimate from the probes run
    stderr: float
    probes_run: int
    per_probe_s: float
    setup_s: float
    cv: float  # the per-probe standard deviation relative to the trace estimated
    probes_to_target: str  # "n_F + n_R" for the composite
    seconds_to_target: float
    check_probes: str = ""  # the fixed-count run that checks the prediction
    check_rel_se: float | None = None
    check_predicted_rel_se: float | None = None
    check_predicted_s: float | None = None
    check_measured_s: float | None = None
    bias: float | None = None  # relative, where known (the Fisher)
    valid: bool = True  # an estimator of Tr H at REL_SE (the Fisher only if its bias is small enough)
    note: str = ""
    speedup_vs_pyhessian: float | None = None


def probes_for(cv: float) -> int:
    return max(2, math.ceil((cv / REL_SE) ** 2))


def hutchinson_row(name: str, check: TraceEstimate, check_s: float | None, setup_s: float,
                   per_probe_s: float, predicted_per_probe_s: float | None, sd: float, best: float) -> Row:
    """A Hutchinson row. The time to target comes from ``per_probe_s``, measured on the long run,
    and ``sd``, the pooled standard deviation of one probe. The long run ``check``, which took
    ``check_s`` seconds, checks the prediction made from the calibration rounds'
    ``predicted_per_probe_s``."""
    cv = sd / best
    n = probes_for(cv)
    predicted_s = None if predicted_per_probe_s is None else setup_s + check.n_probes * predicted_per_probe_s
    return Row(name, "Rademacher vector", check.mean, check.stderr, check.n_probes, per_probe_s, setup_s, cv,
               str(n), setup_s + n * per_probe_s, check_probes=str(check.n_probes),
               check_rel_se=check.stderr / best, check_predicted_rel_se=cv / math.sqrt(check.n_probes),
               check_predicted_s=predicted_s, check_measured_s=check_s)


def split_budget(var_f: float, cost_f: float, var_r: float, cost_r: float, target_var: float,
                 min_r: int = 2) -> tuple[int, int]:
    """The probes ``(n_f, n_r)`` that minimise ``n_f cost_f + n_r cost_r`` subject to
    ``var_f / n_f + var_r / n_r <= target_var``. By Lagrange, ``n_i ~ sqrt(var_i / cost_i)``. At
    least ``min_r`` residual probes are kept, because a standard error needs two."""
    k = (math.sqrt(var_f * cost_f) + math.sqrt(var_r * cost_r)) / target_var
    n_r = max(min_r, math.ceil(k * math.sqrt(var_r / cost_r)))
    while var_r / n_r >= target_var:
        n_r += 1
    return math.ceil(var_f / (target_var - var_r / n_r)), n_r


@dataclass
class FisherParts:
    """Two passes of ``fisher_trace`` over the fixed set (seeds 0 and 1, one label per example each)."""

    value: float  # the mean over examples of the two labels' mean
    se_examples: float  # over examples, as if the set were a sample of contexts
    se_labels: float  # the label noise alone: the standard error for the fixed set's Tr F
    sd: float  # the standard deviation of one probe (one example with one label)
    per_example_s: float


def fisher_parts(model: nn.Module, batches: Sequence[Batch]) -> FisherParts:
    s0, f0 = timed(lambda: fisher_trace(model, mlm_logits_fn, batches, seed=0))
    s1, f1 = timed(lambda: fisher_trace(model, mlm_logits_fn, batches, seed=1))
    a, b, n = f0.samples, f1.samples, len(f0.samples)
    # per example, (a - b)^2 / 2 estimates the label variance; the two-label mean has half of it
    return FisherParts(float((a + b).mean() / 2), std((a + b) / 2) / math.sqrt(n),
                       float((a - b).pow(2).sum().sqrt()) / (2 * n), std(torch.cat([a, b])), min(s0, s1) / n)


def main_model_rows(model: nn.Module, full: list[Batch], sizes: dict[str, int],
                    progress: Callable[[str], None]) -> dict[str, Any]:
    """Sections 2 and 3 on the main model: costs, estimators, and their rows."""
    batches = [b[:3] for b in full]
    n_pairs = n_examples(batches)
    costs = measure_costs(model, batches, sizes["repeats"], sizes["cal_probes"], sizes["fwd_probes"])
    v = next(rademacher_probes(model, 1, seed=7))
    hvp_call_s = best_of(lambda: hvp(model, mlm_loss_fn, batches, v), 1)
    progress(f"best of {sizes['repeats']}: gradient {min(costs.gradient):.3f}s, with graph "
             f"{min(costs.graph):.3f}s, reverse HVP {min(costs.reverse_per_probe):.3f}s/probe, forward "
             f"{min(costs.forward_per_probe):.3f}s/probe, one hvp() call {hvp_call_s:.3f}s")

    # Hutchinson, reverse: the long run (seed 0)
    check_s, check = timed(lambda: hessian_trace(model, mlm_loss_fn, batches, sizes["probes"], seed=0))
    progress(f"Hutchinson reverse, {sizes['probes']} probes: {check.mean:.3f} ± {check.stderr:.3f}, "
             f"{check_s:.1f}s")
    setup_s = statistics.median(costs.graph)
    rev_probe_s = max(check_s - setup_s, 0.0) / sizes["probes"]  # the long run: the typical cost
    fwd_probe_s = statistics.median(costs.forward_per_probe)
    fwd_diff = max(max_rel_diff(e.samples, check.samples[: sizes["fwd_probes"]]) for e in costs.forward_runs)

    fisher = fisher_parts(model, batches)
    progress(f"Fisher, 2 x {n_pairs} examples: {fisher.value:.3f} ± {fisher.se_labels:.3f} (labels) "
             f"± {fisher.se_examples:.3f} (examples)")

    # Tr H - Tr F = Tr R, for the hard targets (the loss measured) and the exact conditionals
    residuals: dict[str, tuple[float, float, TraceEstimate]] = {}
    for kind, seed in (("hard", 2), ("exact", 3)):
        q_s, rb = timed(lambda kind=kind: residual_batches(model, full, kind))
        r_s, r = timed(lambda rb=rb, seed=seed: hessian_trace(model, mlm_loss_fn, rb,
                                                              sizes["residual_probes"], seed=seed))
        residuals[kind] = (q_s, r_s, r)
        progress(f"Tr R ({kind} targets), {sizes['residual_probes']} probes: {r.mean:.3f} ± {r.stderr:.3f}")
    q_s, r_s, resid = residuals["hard"]
    best = fisher.value + resid.mean  # Tr H = Tr F + Tr R: the most precise estimate of this run
    best_se = math.hypot(fisher.se_labels, resid.stderr)
    resid_probe_s = max(r_s - setup_s, 0.0) / sizes["residual_probes"]
    resid_sd = std(resid.samples)

    pyh = None
    if PyHessian is not None:
        pyh = run_pyhessian(model, batches, seed=0, max_iter=sizes["pyh_max_iter"], tol=1e-3,
                            fill_to=sizes["pyh_probes"])
        progress(f"PyHessian: its default rule stopped after {len(pyh.first)} probes ({pyh.first_s:.1f}s); "
                 f"{len(pyh.samples)} probes in all ({pyh.samples_s:.1f}s)")

    # the spread of one probe's v^T H v, from independent probe streams (seeds 0, 1, 2, ...)
    hutch_sd = std(torch.cat([check.samples] + [e.samples for e in costs.reverse_runs]))
    rows = [hutchinson_row("flatlib Hutchinson, reverse", check, check_s, setup_s, rev_probe_s,
                           statistics.median(costs.reverse_per_probe), hutch_sd, best)]
    fwd = hutchinson_row("flatlib Hutchinson, forward", costs.forward_runs[0], None, 0.0, fwd_probe_s, None,
                         hutch_sd, best)
    fwd.check_probes, fwd.check_rel_se = "", None  # timed in the calibration rounds only (too slow for more)
    fwd.note = f"same probes as reverse (seed 0): samples agree to {fwd_diff:.1e} (relative)"
    rows.append(fwd)

    # The Fisher estimates Tr F, and its own cv and time to 2% are for Tr F. As an estimator of Tr H
    # its bias is -Tr R. It counts as valid only if |bias| + 2 SE < 2%. If the central bias is below
    # 2%, the examples needed for a 2% root-mean-square error, bias included, are reported too.
    bias, bias_se = -resid.mean / best, resid.stderr / best
    fisher_valid = abs(bias) + 2 * bias_se < REL_SE
    n_fisher = probes_for(fisher.sd / fisher.value)
    room = (REL_SE * best) ** 2 - resid.mean ** 2  # the variance left for a 2% RMS error
    n_rms = math.ceil(fisher.sd ** 2 / room) if room > 0 else None
    note = (f"estimates Tr F (its cv and time to 2% are for Tr F); as a Tr H estimator its bias "
            f"(Tr F - Tr H)/Tr H = {bias:+.2%} ± {bias_se:.2%}: "
            + ("valid at 2%" if fisher_valid else "not known to be below 2%, so not counted as valid"))
    if n_rms:
        note += (f"; a 2% RMS error for Tr H, bias included, would take {n_rms} examples "
                 f"({n_rms * fisher.per_example_s:.2f}s)")
    fisher_row = Row("flatlib Fisher (sampled labels)", "example, 1 label", fisher.value, fisher.se_examples,
                     2 * n_pairs, fisher.per_example_s, 0.0, fisher.sd / fisher.value, str(n_fisher),
                     n_fisher * fisher.per_example_s, bias=bias, valid=fisher_valid, note=note)
    sub = first_examples(batches, min(n_fisher, n_pairs))
    sub_s, sub_f = timed(lambda: fisher_trace(model, mlm_logits_fn, sub, seed=5))
    fisher_row.check_probes = str(n_examples(sub))
    fisher_row.check_rel_se = sub_f.stderr / sub_f.mean
    fisher_row.check_predicted_rel_se = fisher.sd / fisher.value / math.sqrt(n_examples(sub))
    fisher_row.check_predicted_s = n_examples(sub) * fisher.per_example_s
    fisher_row.check_measured_s = sub_s
    rows.append(fisher_row)

    # the composite: the Fisher on n_f examples + Hutchinson of R with n_r probes, costs balanced
    n_f, n_r = split_budget(fisher.sd ** 2, fisher.per_example_s, resid_sd ** 2, resid_probe_s,
                            (REL_SE * best) ** 2)
    comp_setup = setup_s + q_s
    comp = Row("Fisher + residual Hutchinson", "example / R probe", best, best_se,
               2 * n_pairs + sizes["residual_probes"], resid_probe_s, comp_setup,
               math.hypot(fisher.sd, resid_sd) / best, f"{n_f} + {n_r}",
               comp_setup + n_f * fisher.per_example_s + n_r * resid_probe_s,
               note=f"Tr F {fisher.value:.3f} ± {fisher.se_labels:.3f} + Tr R {resid.mean:.3f} ± "
                    f"{resid.stderr:.3f}; a composition of flatlib functions, unbiased at any parameters")
    sub = first_examples(batches, min(n_f, n_pairs))
    comp_s, (sub_f, sub_r) = timed(lambda: (
        fisher_trace(model, mlm_logits_fn, sub, seed=6),
        hessian_trace(model, mlm_loss_fn, residual_batches(model, full, "hard"), n_r, seed=7)))
    comp.check_probes = f"{n_examples(sub)} + {n_r}"
    comp.check_rel_se = math.hypot(sub_f.stderr, sub_r.stderr) / best
    comp.check_predicted_rel_se = math.sqrt(fisher.sd ** 2 / n_examples(sub) + resid_sd ** 2 / n_r) / best
    comp.check_predicted_s, comp.check_measured_s = comp.seconds_to_target, comp_s
    rows.append(comp)
    progress(f"composite check ({comp.check_probes}): {sub_f.mean + sub_r.mean:.3f}, {comp_s:.1f}s")

    pyh_agreement = math.nan
    if pyh is not None:
        samples = torch.tensor(pyh.samples, dtype=torch.float64)
        # torch.manual_seed(0) gave PyHessian flatlib's probes of seed 0: the samples must agree
        k = min(len(samples), len(check.samples))
        pyh_agreement = max_rel_diff(samples[:k], check.samples[:k])
        per_probe, n = pyh.samples_s / len(samples), probes_for(hutch_sd / best)
        se = std(samples) / math.sqrt(len(samples))
        pyh_row = Row("PyHessian trace (dataloader)", "Rademacher vector", float(samples.mean()), se,
                      len(samples), per_probe, pyh.setup_s, hutch_sd / best, str(n),
                      pyh.setup_s + n * per_probe,
                      check_probes=str(len(samples)), check_rel_se=se / best,
                      check_predicted_rel_se=hutch_sd / best / math.sqrt(len(samples)),
                      check_measured_s=pyh.samples_s,
                      note=f"rebuilds each batch's gradient graph for every probe; same probes as flatlib's "
                           f"seed 0, samples agree to {pyh_agreement:.1e} (relative)")
        rows.append(pyh_row)
        for r in rows:
            r.speedup_vs_pyhessian = pyh_row.seconds_to_target / r.seconds_to_target

    return {"costs": costs, "hvp_call_s": hvp_call_s, "check": check, "rev_probe_s": rev_probe_s,
            "fwd_probe_s": fwd_probe_s, "fwd_diff": fwd_diff, "fisher": fisher, "residuals": residuals,
            "best": best, "best_se": best_se, "pyh": pyh, "pyh_agreement": pyh_agreement, "rows": rows,
            "n_rms": n_rms, "composite_check_value": sub_f.mean + sub_r.mean}


# ----------------------------------------------------------------------------- dense check
def relative_errors(values: Sequence[float], exact: float) -> dict[str, float]:
    errors = [(v - exact) / exact for v in values]
    return {"mean": statistics.fmean(errors),  # the bias, if any
            "mean_se": statistics.stdev(errors) / math.sqrt(len(errors)) if len(errors) > 1 else math.nan,
            "rms": math.sqrt(statistics.fmean([e * e for e in errors])),
            "max_abs": max(abs(e) for e in errors)}


def dense_check(sizes: dict[str, int]) -> dict[str, Any]:
    """Section 4: every estimator against the exact trace of a 790-parameter model, in float64."""
    model, train_s, cached = trained(TINY)
    model = model.double()
    val = validation_set(TINY, build_language(TINY.language))
    n = sizes["tiny_pairs"]
    full = split((val.inputs, val.positions, val.targets, val.true_probs), n, sizes["tiny_batch"])
    batches = [b[:3] for b in full]

    dense_s, H = timed(lambda: dense_hessian(model, mlm_loss_fn, batches))
    exact = float(H.trace())
    exact_expected = float(dense_hessian(model, mlm_loss_fn, [(b[0], b[1], b[3]) for b in full]).trace())
    exact_fisher = fisher_trace(model, mlm_logits_fn, batches, seed=0, n_samples=None).mean
    # Hutchinson's exact per-probe variance with Rademacher probes: 2 sum_{i != j} H_ij^2
    cv_exact = math.sqrt(2 * (float((H * H).sum()) - float((H.diagonal() ** 2).sum()))) / exact
    k, reps = sizes["tiny_probes"], sizes["tiny_reps"]

    hutch = [hessian_trace(model, mlm_loss_fn, batches, k, seed=s) for s in range(reps)]
    fwd = hessian_trace(model, mlm_loss_fn, batches, k, seed=0, mode="forward")
    fisher = [fisher_trace(model, mlm_logits_fn, batches, seed=100 + s) for s in range(reps)]
    resid = residual_batches(model, full, "hard")
    k_r = sizes["tiny_residual_probes"]
    composite = [f.mean + hessian_trace(model, mlm_loss_fn, resid, k_r, seed=200 + s).mean
                 for s, f in enumerate(fisher)]
    # the samples are v^T H v of the dense Hessian for the documented probes
    probes = list(rademacher_probes(model, k, seed=0))
    sample_diff = max_rel_diff(hutch[0].samples, torch.stack([v @ H @ v for v in probes]))
    estimators: dict[str, Any] = {
        "flatlib Hutchinson (reverse)": {
            "probes": k, "reps": reps, **relative_errors([e.mean for e in hutch], exact),
            "expected_rms": cv_exact / math.sqrt(k),
            "cv_measured": statistics.fmean(std(e.samples) for e in hutch) / exact},
        "flatlib Hutchinson (forward)": {
            "probes": k, "reps": 1, **relative_errors([fwd.mean], exact),
            "expected_rms": cv_exact / math.sqrt(k),
            "max_rel_diff_vs_reverse": max_rel_diff(fwd.samples, hutch[0].samples)},
        "flatlib Fisher (1 label/example)": {
            "probes": n, "reps": reps, **relative_errors([f.mean for f in fisher], exact),
            "error_vs_exact_fisher": relative_errors([f.mean for f in fisher], exact_fisher)},
        "Fisher + residual (composite)": {
            "probes": f"{n} + {k_r}", "reps": reps, **relative_errors(composite, exact)},
    }
    pyh_same = None
    if PyHessian is not None:
        # with the same seeds PyHessian draws flatlib's probes: its samples must agree (then its
        # fixed-probe errors are flatlib's, so they are not repeated in the table)
        fixed = [run_pyhessian(model, batches, seed=s, max_iter=k, tol=0.0) for s in range(min(2, reps))]
        pyh_same = {"seeds": len(fixed), "max_rel_diff_vs_flatlib": max(
            max_rel_diff(torch.tensor(r.samples, dtype=torch.float64), e.samples)
            for r, e in zip(fixed, hutch))}
        default = [run_pyhessian(model, batches, seed=1000 + s, max_iter=100, tol=1e-3)
                   for s in range(sizes["tiny_default_reps"])]
        used = sorted(len(r.first) for r in default)
        estimators["PyHessian trace (default tol=1e-3)"] = {
            "probes": f"{used[0]}-{used[-1]} (median {statistics.median(used):g})", "reps": len(default),
            **relative_errors([statistics.fmean(r.first) for r in default], exact),
            "expected_rms": statistics.fmean(cv_exact / math.sqrt(u) for u in used), "probes_used": used}
    return {"config": TINY.to_dict(), "n_params": H.shape[0], "pairs": n, "batches": len(batches),
            "gap": evaluate(model, val)["gap"], "train_s": train_s, "cached": cached, "dense_s": dense_s,
            "asymmetry": float((H - H.T).abs().max() / H.abs().max()), "exact_trace": exact,
            "exact_trace_expected_loss": exact_expected, "exact_fisher_trace": exact_fisher,
            "cv_exact": cv_exact, "samples_vs_dense_max_rel_diff": sample_diff,
            "pyhessian_same_probes": pyh_same, "estimators": estimators}


# ----------------------------------------------------------------------------- report
def fmt_s(x: float | None) -> str:
    return "n/a" if x is None else (f"{x:.2f}" if x < 10 else f"{x:,.0f}")


def finite(obj: Any) -> Any:
    """NaN and inf as null: JSON has neither."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite(v) for v in obj]
    return obj


def print_costs(m: dict[str, Any], n_pairs: int, repeats: int) -> dict[str, float]:
    costs: Costs = m["costs"]
    grad_s = min(costs.gradient)
    print(f"\nHVP cost / gradient cost on the fixed set ({n_pairs} pairs; gradient {grad_s:.3f}s; "
          f"best of {repeats} interleaved rounds unless noted)")
    lines = [("reverse (graph reused), per probe", min(costs.reverse_per_probe), True),
             ("forward (jvp of grad), per probe", min(costs.forward_per_probe), True),
             ("reverse, graph rebuilt (one hvp() call)", m["hvp_call_s"], False),
             ("gradient with graph (reverse setup)", min(costs.graph), False),
             ("reverse per probe, mean over the long run", m["rev_probe_s"], False)]
    if m["pyh"] is not None:
        lines.append(("PyHessian dataloader per probe, mean over its run", m["rows"][-1].per_probe_s, False))
    print_table(("operation", "seconds", "x gradient", f"<= {HVP_TARGET}x?"),
          [(name, f"{s:.3f}", f"{s / grad_s:.2f}",
            ("yes" if s / grad_s <= HVP_TARGET else "NO") if target else "")
           for name, s, target in lines])
    return {"reverse": min(costs.reverse_per_probe) / grad_s,
            "forward": min(costs.forward_per_probe) / grad_s}


def print_estimators(m: dict[str, Any], n_pairs: int) -> None:
    print(f"\nTr H of the single-mask MLM loss (hard targets) on {n_pairs} pairs: time to a {REL_SE:.0%} "
          f"relative standard error (best estimate {m['best']:.3f} ± {m['best_se']:.3f}; check = a "
          "fixed-count run, measured (predicted))")
    print_table(("estimator", "probe", "estimate ± SE", "Tr H?", "s/probe", "setup s", "cv", "probes to 2%",
           "s to 2%", "vs PyHessian", "check: probes", "SE", "s"),
          [(r.estimator, r.probe, f"{r.value:.3f} ± {r.stderr:.3f}",
            "yes" if r.valid else f"bias {r.bias:+.1%}",
            f"{r.per_probe_s:.4f}", f"{r.setup_s:.2f}", f"{r.cv:.3f}", r.probes_to_target,
            fmt_s(r.seconds_to_target),
            f"{r.speedup_vs_pyhessian:,.1f}x" if r.speedup_vs_pyhessian else "n/a", r.check_probes,
            f"{r.check_rel_se:.1%} ({r.check_predicted_rel_se:.1%})" if r.check_rel_se is not None else "",
            f"{fmt_s(r.check_measured_s)} ({fmt_s(r.check_predicted_s)})"
            if r.check_measured_s is not None else "")
           for r in m["rows"]])
    for r in m["rows"]:
        if r.note:
            print(f"  {r.estimator}: {r.note}")


def print_fisher_vs_hessian(m: dict[str, Any], n_pairs: int) -> dict[str, Any]:
    h, f = m["check"], m["fisher"]
    resid, exact = m["residuals"]["hard"][2], m["residuals"]["exact"][2]
    z = (f.value - h.mean) / math.hypot(h.stderr, f.se_examples)
    print(f"\nFisher vs Hessian trace (the same {n_pairs} pairs):")
    print(f"  Hutchinson Tr H    {h.mean:.3f} ± {h.stderr:.3f}  ({h.n_probes} probes)")
    print(f"  Fisher Tr F        {f.value:.3f} ± {f.se_examples:.3f} over examples, ± {f.se_labels:.3f} "
          "from the labels alone (2 labels per example)")
    print(f"  difference F - H   {f.value - h.mean:+.3f} = {z:+.1f} combined SE (Hutchinson's SE dominates)")
    print(f"  measured directly: Tr H - Tr F = Tr R = {resid.mean:+.3f} ± {resid.stderr:.3f} "
          f"({resid.mean / resid.stderr:+.1f} SE, {resid.mean / m['best']:+.2%} of Tr H), of which "
          f"{exact.mean:+.3f} ± {exact.stderr:.3f} from not being at the optimum (exact conditionals as "
          "targets) and the rest from the sampled words of the fixed set")
    bias, bias_se = -resid.mean / m["best"], resid.stderr / m["best"]
    return {"hutchinson": h.mean, "hutchinson_se": h.stderr, "fisher": f.value,
            "fisher_se_examples": f.se_examples, "fisher_se_labels": f.se_labels, "z_plain": z,
            "trace_R_hard": resid.mean, "trace_R_hard_se": resid.stderr, "trace_R_exact": exact.mean,
            "trace_R_exact_se": exact.stderr, "fisher_bias": bias, "fisher_bias_se": bias_se,
            "fisher_valid": abs(bias) + 2 * bias_se < REL_SE,
            "fisher_examples_for_2pct_rms_vs_trace_h": m["n_rms"]}


def print_pyhessian_default(m: dict[str, Any], max_iter: int, quick: bool) -> dict[str, Any]:
    pyh: PyHessianResult | None = m["pyh"]
    if pyh is None:
        return {}
    best, k = m["best"], len(pyh.first)
    mean = statistics.fmean(pyh.first)
    own_se = statistics.stdev(pyh.first) / math.sqrt(k) if k > 1 else math.nan
    print(f"\nPyHessian's default stopping rule (tol=1e-3, maxIter={max_iter}"
          + (", capped by --quick" if quick else "")
          + f"): stopped after {k} probes ({pyh.first_s:.1f}s) at {mean:.3f}, "
          f"{(mean - best) / best:+.1%} from the best estimate, which is {(mean - best) / own_se:+.1f} of "
          f"its own SE ({own_se / best:.1%}; "
          "PyHessian does not report it, and the rule stops when the last samples agree, so that SE is "
          "optimistic)")
    return {"probes": k, "max_iter": max_iter, "tol": 1e-3, "estimate": mean, "own_se": own_se,
            "seconds": pyh.first_s, "relative_error": (mean - best) / best,
            "error_in_best_se": (mean - best) / m["best_se"], "error_in_own_se": (mean - best) / own_se}


def print_dense(dense: dict[str, Any]) -> None:
    print(f"\nExact trace of a {dense['n_params']}-parameter model (float64, gap {dense['gap']:.4f} nats, "
          f"{dense['pairs']} pairs in {dense['batches']} batches; dense Hessian in {dense['dense_s']:.1f}s, "
          f"asymmetry {dense['asymmetry']:.1e}): Tr H = {dense['exact_trace']:.4f}; for the expected loss "
          f"{dense['exact_trace_expected_loss']:.4f}; exact Fisher {dense['exact_fisher_trace']:.4f}; "
          f"Hutchinson cv per probe {dense['cv_exact']:.3f}")
    print_table(("estimator", "probes", "reps", "mean rel. error ± SE", "RMS rel. error", "expected RMS"),
          [(name, str(e["probes"]), str(e["reps"]),
            f"{e['mean']:+.2%} ± {e['mean_se']:.2%}" if math.isfinite(e["mean_se"]) else f"{e['mean']:+.2%}",
            f"{e['rms']:.2%}", f"{e['expected_rms']:.2%}" if "expected_rms" in e else "")
           for name, e in dense["estimators"].items()])
    estimators = dense["estimators"]
    print(f"  flatlib's samples equal v^T H v of the dense Hessian for its documented probes to "
          f"{dense['samples_vs_dense_max_rel_diff']:.1e}; forward and reverse mode samples agree to "
          f"{estimators['flatlib Hutchinson (forward)']['max_rel_diff_vs_reverse']:.1e} (relative)")
    if dense["pyhessian_same_probes"]:
        print("  PyHessian with torch.manual_seed(s) draws flatlib's probes of seed s: its samples agree to "
              f"{dense['pyhessian_same_probes']['max_rel_diff_vs_flatlib']:.1e} (relative), so its "
              "fixed-probe errors are flatlib's (not repeated in the table)")
        print(f"  PyHessian's default rule, probes used: "
              f"{estimators['PyHessian trace (default tol=1e-3)']['probes_used']}")


def print_targets(m: dict[str, Any], ratios: dict[str, float]) -> dict[str, Any]:
    targets: dict[str, Any] = {}
    rows: list[Row] = m["rows"]
    print()
    if m["pyh"] is not None:
        pyh_row, hutch = rows[-1], rows[0]
        ratio = pyh_row.seconds_to_target / hutch.seconds_to_target
        targets["hutchinson_vs_pyhessian"] = {"speedup": ratio, "target": HUTCHINSON_TARGET,
                                              "met": ratio >= HUTCHINSON_TARGET}
        print(f"target: flatlib Hutchinson {ratio:.3f}x faster than PyHessian to {REL_SE:.0%} SE: "
              f"{'met' if ratio >= HUTCHINSON_TARGET else 'NOT met'} (>= {HUTCHINSON_TARGET}x)")
        flatlib_rows = [r for r in rows
                        if r is not pyh_row and r.valid and not r.estimator.startswith("Fisher +")]
        fastest = min(flatlib_rows, key=lambda r: r.seconds_to_target)
        ratio = pyh_row.seconds_to_target / fastest.seconds_to_target
        targets["fastest_vs_pyhessian"] = {"estimator": fastest.estimator, "speedup": ratio,
                                           "target": FASTEST_TARGET, "met": ratio >= FASTEST_TARGET}
        print(f"target: fastest valid flatlib estimator ({fastest.estimator}) {ratio:,.3g}x faster than "
              f"PyHessian: {'met' if ratio >= FASTEST_TARGET else 'NOT met'} (>= {FASTEST_TARGET:g}x)")
        composite = next(r for r in rows if r.estimator.startswith("Fisher +"))
        ratio = pyh_row.seconds_to_target / composite.seconds_to_target
        targets["composite_vs_pyhessian"] = {"speedup": ratio, "target": FASTEST_TARGET,
                                             "met": ratio >= FASTEST_TARGET}
        print(f"  (Fisher + residual Hutchinson, unbiased at any parameters: {ratio:,.1f}x)")
        fisher = next(r for r in rows if r.estimator.startswith("flatlib Fisher"))
        if not fisher.valid and m["n_rms"]:
            ratio = pyh_row.seconds_to_target / (m["n_rms"] * fisher.per_probe_s)
            targets["fisher_rms_vs_pyhessian"] = {"speedup": ratio, "examples": m["n_rms"]}
            print(f"  (the Fisher to a 2% RMS error for Tr H, if its central bias {fisher.bias:+.1%} is "
                  f"taken as known: {ratio:,.0f}x)")
    for mode in ("reverse", "forward"):
        targets[f"hvp_{mode}"] = {"ratio": ratios[mode], "target": HVP_TARGET,
                                  "met": ratios[mode] <= HVP_TARGET}
    print(f"target: HVP <= {HVP_TARGET}x a gradient: " + ", ".join(
        f"{mode} {ratios[mode]:.3f}x {'met' if ratios[mode] <= HVP_TARGET else 'NOT met'}"
        for mode in ("reverse", "forward")))
    return targets


def invariant_rows(model: nn.Module, batches: Sequence[Batch], n_probes: int) -> dict[str, Any]:
    """The gauge-invariant trace (``flatness.invariant_trace``) beside the raw Hutchinson trace on
    the same pairs and probes, for the model as trained and after a function-preserving rescaling of
    its final LayerNorm (gain folded into the head, then x3): seconds, estimate ± SE, the per-probe
    coefficient of variation and the time to a 2% relative SE (``setup + n x per probe``; the
    invariant trace's setup is its exact gauge diagonals, C per-example gradients per example)."""
    soft = [(b[0], b[1], b[3]) for b in batches]  # the expected loss: targets = the exact conditionals
    gain = model.ln_f.weight.detach().abs()
    out: dict[str, Any] = {}
    for label, m in (("as trained", model),
                     ("ln_f gain folded, x3", rescale_norms(model, {"ln_f": 3 / gain}))):
        raw_s, raw = timed(lambda: hessian_trace(m, mlm_loss_fn, soft, n_probes, seed=0))
        setup_s, _ = timed(lambda: fisher_diagonal(m, mlm_logits_fn, soft, parameters=[
            n for norm, reader in gauge_pairs(m)
            for n in (f"{norm}.weight", f"{norm}.bias", f"{reader}.weight")]))
        inv_s, inv = timed(lambda: invariant_trace(m, mlm_loss_fn, mlm_logits_fn, soft, n_probes, seed=0))
        rows = {}
        for name, est, seconds, setup in (("raw hessian_trace", raw, raw_s, 0.0),
                                          ("invariant_trace", inv, inv_s, setup_s)):
            per_probe = (seconds - setup) / n_probes
            cv = float(est.samples.std()) / abs(est.mean)
            n = probes_for(cv)
            rows[name] = {"estimate": est.mean, "stderr": est.stderr, "seconds": seconds, "setup_s": setup,
                          "per_probe_s": per_probe, "cv": cv, "probes_to_target": n,
                          "seconds_to_target": setup + n * per_probe}
        out[label] = rows
    return out


def print_invariant(inv: dict[str, Any], n_pairs: int, n_probes: int) -> None:
    print(f"\nRaw vs gauge-invariant trace of the expected loss ({n_pairs} pairs, {n_probes} probes each; "
          f"time to {REL_SE:.0%} SE = setup + probes x s/probe):")
    print_table(("model", "estimator", "estimate ± SE", "cv", "setup s", "s/probe", f"probes to {REL_SE:.0%}",
                 f"s to {REL_SE:.0%}"),
                [(label, name, f"{r['estimate']:.3f} ± {r['stderr']:.3f}", f"{r['cv']:.3f}",
                  f"{r['setup_s']:.2f}",
                  f"{r['per_probe_s']:.3f}", str(r["probes_to_target"]), f"{r['seconds_to_target']:.1f}")
                 for label, rows in inv.items() for name, r in rows.items()], text_columns=2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--quick", action="store_true", help="small sizes: a smoke test, not numbers")
    parser.add_argument("--out", type=Path, default=None,
                        help="JSON path (default: bench/results/flatness.json, or flatness_quick.json "
                             "with --quick)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    sizes = SIZES["quick" if args.quick else "full"]
    load_start = os.getloadavg()
    if args.quick:
        print("--quick: a smoke test with small sizes; the numbers mean little")
    if load_start[0] > BUSY_LOAD:
        print(f"warning: load average {load_start[0]:.2f} at start: other work is running, so every timing "
              "is pessimistic")
    if PyHessian is None:
        print(f"PyHessian cannot be imported ({PYHESSIAN_ERROR}): its rows are n/a")

    # 1. the model and the fixed evaluation set
    model, train_s, cached = trained(MAIN)
    val = validation_set(MAIN, build_language(MAIN.language))
    gap = evaluate(model, val)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params:,} parameters, gap {gap['gap']:.4f} ± {gap['gap_se']:.4f} nats "
          f"({'cached' if cached else f'trained in {train_s:.0f}s'})", flush=True)
    n_pairs = sizes["pairs"]
    full = split((val.inputs, val.positions, val.targets, val.true_probs), n_pairs, BATCH)
    print(f"fixed evaluation set: {n_pairs} validation pairs in {len(full)} batches", flush=True)
    started = time.perf_counter()

    def progress(what: str) -> None:
        print(f"  {what} ({time.perf_counter() - started:.0f}s)", flush=True)

    # 2 and 3 on the main model, 4 on the tiny one
    m = main_model_rows(model, full, sizes, progress)
    dense = dense_check(sizes)
    progress("dense check done")
    load_end = os.getloadavg()
    wall_s = time.perf_counter() - started

    ratios = print_costs(m, n_pairs, sizes["repeats"])
    print_estimators(m, n_pairs)
    fisher_vs_hessian = print_fisher_vs_hessian(m, n_pairs)
    pyh_default = print_pyhessian_default(m, sizes["pyh_max_iter"], args.quick)
    invariant = invariant_rows(model, full, INVARIANT_PROBES)
    print_invariant(invariant, n_pairs, INVARIANT_PROBES)
    print_dense(dense)
    targets = print_targets(m, ratios)
    busy = max(load_start[0], load_end[0]) > BUSY_LOAD
    print(f"load average: {load_start[0]:.2f} at start, {load_end[0]:.2f} at end"
          + (" (other work was running, so the timings are pessimistic)" if busy else ""))

    costs: Costs = m["costs"]
    out = args.out or RESULTS_DIR / ("flatness_quick.json" if args.quick else "flatness.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    report = {
        "date": datetime.now().astimezone().isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "pyhessian": "0.1" if pyhessian else None,  # the package has no __version__ (0.1 is pinned)
        "python": platform.python_version(),
        "threads": args.threads,
        "quick": args.quick,
        "machine": {"cpu": cpu_model(), "cpu_count": os.cpu_count(), "platform": platform.platform(),
                    "load_average_start": load_start, "load_average_end": load_end, "busy": busy},
        "model": {"config": MAIN.to_dict(), "n_params": n_params, **gap, "train_s": train_s,
                  "cached": cached},
        "evaluation_set": {"pairs": n_pairs, "batch_size": BATCH, "batches": len(full),
                           "loss": "single-mask MLM, hard targets, mean over pairs"},
        "sizes": sizes,
        "seconds": {"gradient": costs.gradient, "gradient_with_graph": costs.graph,
                    "reverse_per_probe": costs.reverse_per_probe,
                    "forward_per_probe": costs.forward_per_probe,
                    "hvp_call_reverse": m["hvp_call_s"], "reverse_per_probe_long_run": m["rev_probe_s"]},
        "hvp_over_gradient": ratios,
        "best_estimate": {"value": m["best"], "stderr": m["best_se"],
                          "how": "Fisher (2 labels per example) + Hutchinson of R"},
        "estimators": [asdict(r) for r in m["rows"]],
        "fisher_vs_hessian": fisher_vs_hessian,
        "pyhessian_default": pyh_default,
        "pyhessian_vs_flatlib_samples_max_rel_diff": m["pyh_agreement"],
        "forward_vs_reverse_samples_max_rel_diff": m["fwd_diff"],
        "composite_check_value": m["composite_check_value"],
        "dense": dense,
        "invariant_trace": invariant,
        "targets": targets,
        "wall_s": wall_s,
    }
    out.write_text(json.dumps(finite(report), indent=2) + "\n")
    print(f"\nwrote {out} ({wall_s:.0f}s, not counting training)")


if __name__ == "__main__":
    main()
