"""The notebooks' run grids: which runs notebooks 02-05 train, as ``PretrainConfig``s built from a
resolved profile (``flatlib.profiles.resolve``). Notebooks 02-05 ask for the same configs, so they
share runs through the store (a config's hash is its run's key), and notebook 05 finds every model
of 02-04 without retraining. How a checkpoint is measured is ``flatlib.measurement.measure``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import pandas as pd

from flatlib.claims import adversary_weight
from flatlib.profiles import language_spec
from flatlib.runner.runs import Run
from flatlib.runner.sweep import run_configs
from flatlib.training.clock import clock_grid
from flatlib.training.train import PretrainConfig, continuation


def model_of(params: dict[str, Any], width: int | None = None) -> dict[str, int]:
    """The profile's pre-training model (``pretraining.model``), or its ``model_size`` family at
    ``width`` (``d_ff = ff_mult * width``, heads of ``head_dim``: ``widen`` multiplies the number of
    heads, so a widened model of this family has exactly the widest model's architecture)."""
    if width is None:
        return dict(params["pretraining"]["model"])
    s = params["model_size"]
    return {"n_layer": s["n_layer"], "n_head": width // s["head_dim"], "d_model": width,
            "d_ff": s["ff_mult"] * width}


def phase1_config(params: dict[str, Any], name: str, seed: int, width: int | None = None) -> PretrainConfig:
    """Pre-training towards the optimum (notebook 02's phase 1, notebook 03's sizes): AdamW, a linear
    warm-up, then a linear decay to 0 at ``pretraining.steps[name]`` (for a ``width`` of notebook 03,
    at ``model_size.steps[name]``); one checkpoint at the end.

    Every width of notebook 03 trains at **one** learning rate, the one the widest width can take:
    ``pretraining.lr * min(1, d_model / widest)`` (Adam's learning rate falls as 1/width, as in muP:
    at the cpu profile a 2x128 HMM model at the 2x64 model's lr 3e-3 stalls at a gap of 0.035 nats,
    at 1.5e-3 it reaches 0.015). An earlier version scaled each width's own rate, which confounded
    size with learning rate (issue 14)."""
    t = params["pretraining"]
    steps = t["steps"][name] if width is None else params["model_size"]["steps"][name]
    widest = max(params["model_size"]["widths"])
    lr = t["lr"] if width is None else t["lr"] * min(1.0, t["model"]["d_model"] / widest)
    return PretrainConfig(language=language_spec(params, name), model=model_of(params, width),
                          optimizer="adamw",
                          lr=lr, warmup_steps=t["warmup_steps"], schedule="linear", min_lr=0.0, steps=steps,
                          batch_size=t["batch_size"], eval_every=t["eval_every"], eval_pairs=t["eval_pairs"],
                          checkpoint_every=steps, seed=seed)


# SGD continues on the loss alone: the theory's slow flow (docs/paper.md) moves along the loss's minimizers,
# which an L2 term would move. With PretrainConfig's default (coupled) weight decay 0.01 at lr 0.1 the
# weights shrink by 1 - 0.001 a step (x0.3 over 1200 steps), and because LayerNorm makes the loss
# scale-invariant in most of them, the trace *doubled* and the gap rose 0.013 nats (cpu, 3 seeds);
# without it the trace fell 20.6 -> 14.2 at a gap +0.0015 (seed 0).
SGD_WEIGHT_DECAY = 0.0


def phase2_config(params: dict[str, Any], name: str, seed: int, optimizer: str,
                  **overrides: Any) -> PretrainConfig:
    """Training on after phase 1 (notebook 02's phase 2, notebook 04's algorithms): a fresh
    ``optimizer`` ("sgd" at ``pretraining.sgd_lr`` without weight decay, see ``SGD_WEIGHT_DECAY``, or
    "adamw" at ``pretraining.adamw_lr`` with phase 1's decoupled weight decay) at a constant learning
    rate from the final phase-1 checkpoint, for ``continue_steps`` steps, checkpoints every
    ``checkpoint_every``. ``overrides`` go to ``continuation`` (e.g. ``adversarial={...}``)."""
    t = params["pretraining"]
    base = phase1_config(params, name, seed)
    lr = {"sgd": t["sgd_lr"], "adamw": t["adamw_lr"]}[optimizer]
    settings = {"eval_every": t["continue_eval_every"], "checkpoint_every": t["checkpoint_every"],
                **({"weight_decay": SGD_WEIGHT_DECAY} if optimizer == "sgd" else {}), **overrides}
    return continuation(base, from_step=base.steps, steps=t["continue_steps"], optimizer=optimizer, lr=lr,
                        **settings)


@dataclass(frozen=True)
class ModelRef:
    """One measured model of the notebooks: the run's config and the checkpoint's step, where it
    comes from (``origin``), the parameterization its trace is measured in (``family``; ``widen_to``
    is the width it is widened to first, or None), and its training ``lineage`` (a phase-1 run and
    its continuations share one: they are not independent)."""

    language: str
    origin: str
    family: str
    lineage: str
    config: PretrainConfig
    step: int
    widen_to: int | None = None


def training_seeds(params: dict[str, Any]) -> list[int]:
    """The training seeds of notebooks 02-04: ``seed``, ``seed + 1``, ... (``pretraining.seeds`` of
    them)."""
    return [params["seed"] + i for i in range(params["pretraining"]["seeds"])]


def lineage_seeds(params: dict[str, Any]) -> list[int]:
    """The training seeds of the pre-training family's lineages in notebook 05:
    ``max(pretraining.seeds, pretraining.correlation_seeds)`` of them from ``seed``; the first
    ``pretraining.seeds`` are ``training_seeds``."""
    t = params["pretraining"]
    return [params["seed"] + i for i in range(max(t["seeds"], t["correlation_seeds"]))]


def experiment_models(params: dict[str, Any], names: list[str] | None = None) -> list[ModelRef]:
    """Every checkpoint notebooks 02-04 measure at the resolved profile ``params``: the end of phase
    1, the end of every constant-lr continuation (SGD, AdamW) and every clock anneal's end (02), the
    ends of the adversarial continuations of notebook 04 (for the languages of its profile section), and every
    width of notebook 03 (for ``model_size.languages``, traces after widening to the widest). The 2x64 family
    has ``pretraining.correlation_seeds`` lineages (notebook 05's rule "correlation" needs 5): those
    beyond ``pretraining.seeds`` have phase 1, the constant-rate continuations and the adversary,
    not the clock's doses."""
    t = params["pretraining"]
    names = list(names or t["languages"])
    clock_seeds = set(training_seeds(params))
    base = model_of(params)
    family = f"{base['n_layer']}x{base['d_model']}"
    out = []
    for name in names:
        for s in lineage_seeds(params):
            lineage = f"{name} seed {s}"
            first = phase1_config(params, name, s)
            out.append(ModelRef(name, "02 phase 1", family, lineage, first, first.steps))
            # constant-lr continuations (notebook 04's SGD, 02's and 04's AdamW)
            for optimizer in ("sgd", "adamw"):
                config = phase2_config(params, name, s, optimizer)
                # a continuation's end only: its earlier checkpoints (every checkpoint_every steps) would add
                # models to notebook 05 but no lineage, and its bootstrap resamples lineages
                # (cut for the budget, issue 14)
                out.append(ModelRef(name, f"02 {optimizer}", family, lineage, config, config.steps))
            if "clock" in params and s in clock_seeds:  # notebook 02's dose-response: every anneal's end
                out += [ModelRef(name, "02 sgd clock", family, lineage, p.anneal, p.anneal.steps)
                        for p in clock_grid({(name, s): first}, params["clock"])]
            adversarial = adversarial_config(params, name, s)
            if adversarial is not None:
                out.append(ModelRef(name, "04 adversarial", family, lineage, adversarial, adversarial.steps))
    sizes = params["model_size"]
    widest = sizes["widths"][-1]
    for name in names:
        if name not in sizes["languages"]:
            continue
        for w in sizes["widths"]:
            for s in training_seeds(params):  # notebook 03's seeds
                config = phase1_config(params, name, s, width=w)
                out.append(ModelRef(name, "03 sizes", f"widths widened to {widest}", f"{name} w{w} seed {s}",
                                    config, config.steps, None if w == widest else widest))
    return out


def adversarial_config(params: dict[str, Any], name: str, seed: int,
                       weight: float | None = None) -> PretrainConfig | None:
    """Notebook 04's adversarial continuation of ``name`` (None if the profile's ``algorithms``
    section does not list ``name``): AdamW at ``pretraining.adamw_lr`` from the same phase-1
    checkpoint as notebook 02's continuations, on L_mlm - weight * L_downstream for the language's
    adversarial task (``flatlib.training.adversary``, option ``adversarial``). ``weight`` defaults to
    ``algorithms.weights[name]``, which ``choose_adversary_weights`` fills in."""
    a = params.get("algorithms")
    if a is None or name not in a["languages"]:
        return None
    if weight is None:
        if "weights" not in a:
            raise ValueError("algorithms.weights: not chosen yet; call "
                             "flatlib.runner.experiments.choose_adversary_weights (the held-out choice) or "
                             "give the weights as a parameter")
        weight = a["weights"][name]
    settings = {**a["adversarial"], "task": a["tasks"][name], "weight": weight}
    return phase2_config(params, name, seed, "adamw", adversarial=settings)


@dataclass(frozen=True)
class WeightChoice:
    """The adversary's weight for ``language``, chosen on the held-out training ``seed`` by rule
    "adversary weight" (``flatlib.claims.adversary_weight``): the final ``gaps`` of the adversarial
    continuations per λ of the grid, the gap of the AdamW continuation of the same seed
    (``reference_gap``), the chosen ``weight`` and whether it is ``at_equal_loss``."""

    language: str
    seed: int
    gaps: dict[float, float]
    reference_gap: float
    weight: float
    at_equal_loss: bool

    def describe(self) -> str:
        return (f"λ = {self.weight} chosen on held-out seed {self.seed} (rule 'adversary weight': gaps "
                + ", ".join(f"λ {w}: {g:.4f}" for w, g in self.gaps.items())
                + f" against AdamW's {self.reference_gap:.4f}"
                + ("" if self.at_equal_loss else "; none at equal loss, the smallest taken") + ")")


def held_out_configs(params: dict[str, Any], name: str) -> dict[str, PretrainConfig]:
    """The runs that choose ``name``'s adversary weight: phase 1, the AdamW continuation and one
    adversarial continuation per λ of ``algorithms.weight_grid``, all of the held-out training
    seed ``seed + algorithms.held_out_seed`` (never an evaluated lineage). Keys: "phase 1",
    "adamw", and each λ."""
    a = params["algorithms"]
    seed = params["seed"] + a["held_out_seed"]
    out: dict[Any, PretrainConfig] = {"phase 1": phase1_config(params, name, seed),
                                      "adamw": phase2_config(params, name, seed, "adamw")}
    out.update({weight: adversarial_config(params, name, seed, weight) for weight in a["weight_grid"][name]})
    return out


def choose_adversary_weights(params: dict[str, Any], backend: str = "local"
                             ) -> tuple[dict[str, Any], dict[str, WeightChoice]]:
    """``params`` with ``algorithms.weights`` filled in by rule "adversary weight" on the held-out
    seed (training its runs, ``held_out_configs``, or reading them from the store), and the choice
    per language. Weights given as a parameter are kept as they are (no choices returned)."""
    a = params["algorithms"]
    if "weights" in a:
        return params, {}
    configs = {name: held_out_configs(params, name) for name in a["languages"]}
    workers = params["pretraining"]["workers"]
    run_configs([c["phase 1"] for c in configs.values()], backend=backend, workers=workers, progress=False)
    rest = [(name, key, config) for name, c in configs.items() for key, config in c.items()
            if key != "phase 1"]
    results = run_configs([config for _, _, config in rest], backend=backend, workers=workers, progress=False)
    gaps: dict[str, dict[Any, float]] = {name: {} for name in configs}
    for (name, key, _), result in zip(rest, results):
        summary = result.run.summary()
        gaps[name][key] = math.nan if summary.get("diverged", False) else summary["final_gap"]
    choices = {}
    for name, g in gaps.items():
        by_weight = {w: gap for w, gap in g.items() if w != "adamw"}
        weight, equal = adversary_weight(by_weight, g["adamw"])
        choices[name] = WeightChoice(name, params["seed"] + a["held_out_seed"], by_weight, g["adamw"], weight,
                                     equal)
    chosen = {**params, "algorithms": {**a, "weights": {name: c.weight for name, c in choices.items()}}}
    return chosen, choices


def final_gaps(runs: dict[tuple[str, int], Run], epsilon: float) -> pd.DataFrame:
    """The end of every run of ``{(language, seed): run}`` from its summary, indexed by (language,
    seed): steps, parameters, the exact optimal validation loss, the validation loss, the gap ± SE,
    and whether the gap is within ``epsilon``."""
    rows = []
    for (name, seed), run in runs.items():
        s = run.summary()
        rows.append({"language": name, "seed": seed, "steps": s["steps"], "parameters": s["n_params"],
                     "optimum (val)": s["val_optimum"], "val loss": s["final_val_loss"],
                     "gap": s["final_gap"],
                     "gap ± se": s["final_gap_se"], f"within ε={epsilon}": s["final_gap"] <= epsilon})
    return pd.DataFrame(rows).set_index(["language", "seed"])
