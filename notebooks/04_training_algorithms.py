# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 04 · Training algorithms: AdamW, SGD, an adversary and the lookup table at the same loss
#
# The paper's third way to get *the same pre-training loss but different downstream accuracy*: change the
# training algorithm. From one pre-trained checkpoint at the optimum we continue with AdamW, with SGD, and
# with the paper's **adversarial algorithm**, which minimizes L_pretrain − λ·L_downstream (a downstream head
# refit periodically on held-out data) and so looks for a model at the optimal loss that transfers *badly*.
# The **lookup table** (the exact conditionals as features, the optimal model itself) completes the paper's
# table. Then we check, with CIs over training seeds, whether same loss meant same transfer.

# %% tags=["parameters"]
profile = "cpu"  # smoke | cpu | paper (flatlib.profiles)
seed = 0  # training seeds are seed, seed + 1, ...; also the seed of the probe / trace protocol
n_seeds = None  # training seeds; None means the profile's pretraining.seeds
languages = None  # e.g. ["hmm", "pcfg"]; None means the profile's algorithms.languages
# the adversary's lambda per language, e.g. {"hmm": 0.1}; None: chosen on a held-out seed from
# algorithms.weight_grid
weights = None
# local (worker processes) | serial | submitit (a Slurm job array, see flatlib.runner.sweep)
backend = "local"

# %% [markdown]
# ## Parameters
#
# `algorithms.parameters` (`flatlib/analysis/algorithms.py`) validates the parameters against the profile with
# `flatlib.profiles.resolve`, and the backend: the `pretraining` section (the model, phase 1,
# the continuations) and the `algorithms` section (which languages, the adversary's task, λ and refit
# schedule). A bad value stops here with a `ValueError` naming the parameter.

# %%
from flatlib.analysis import algorithms
from flatlib.plots import algorithms as plots
from flatlib.plots.style import figures_dir, saver, set_style
from flatlib.runner.experiments import choose_adversary_weights, training_seeds
from flatlib.tools.report import record_claims

P = algorithms.parameters(profile, seed, n_seeds=n_seeds, languages=languages, weights=weights,
                          backend=backend)
print(algorithms.describe(P))

# %%
set_style()
save = saver(P["profile"], P["seed"])
OUT = figures_dir(P["profile"])  # the CSVs go beside the figures
T = P["pretraining"]
SEEDS, NAMES, PROTOCOL = training_seeds(P), list(P["algorithms"]["languages"]), algorithms.protocol(P)
print(f"languages {NAMES} · tasks {algorithms.tasks(P)} · training seeds {SEEDS}")

# %% [markdown]
# ## 1 · The adversary's weight, chosen on a held-out seed
#
# The adversary minimises L_mlm − λ·L_down: too small a λ changes nothing, too large a λ leaves the optimal
# loss. λ is chosen before any evaluated model is trained with it, on a **held-out training seed**
# (`seed + algorithms.held_out_seed`, never one of the evaluated lineages), by the rule "adversary weight"
# of `flatlib/claims.py`: the largest λ of the profile's grid whose continuation ends within 0.002 nats of
# the same seed's AdamW continuation (the strongest adversary at equal loss). An earlier version tuned λ by
# hand on evaluated seed 0; the report says so. A `weights` parameter skips the choice.

# %%
# trains the held-out seed's runs, or reads them from the store
P, choices = choose_adversary_weights(P, backend)
for choice in choices.values():
    print(choice.describe())
weights = algorithms.weight_table(choices)
weights.to_csv(OUT / "04_adversary_weight.csv", index=False)
weights.round(4)

# %% [markdown]
# ## 2 · Continuing from the optimum with three algorithms
#
# Phase 1 and the AdamW and SGD continuations are notebook 02's runs (read back from the run store). The
# adversarial run continues from the same checkpoint with AdamW at the same learning rate on
# L_mlm − λ·L_down, where L_down is the cross-entropy of a linear head on the model's features for the
# adversary's task; the head is refit every `refit_every` steps on sentences disjoint from every
# evaluation corpus, and L_down is capped (`flatlib.training.adversary`). λ is section 1's choice on the
# held-out seed; whether the evaluated adversaries stay at equal loss with AdamW is checked below, not
# assumed.

# %%
# phase 1 first (the parents), then all three continuations of every seed; raises if one diverged
trained = algorithms.train(P, backend)
curves = algorithms.curves_table(trained.runs)  # every continuation's logged metrics, one long table
print(f"{len(trained.runs)} continuations ({len(algorithms.ALGORITHMS)} algorithms x {len(SEEDS)} seeds x "
      f"{len(NAMES)} languages) in {trained.seconds:.0f} s (0 s = all read from the run store)")

# %% [markdown]
# Left of each pair: the gap to the optimum during the continuation (mean over seeds, band min-max); the
# claim needs every algorithm to stay at the optimal loss. Right: the adversary's downstream loss L_down
# (the refit head's cross-entropy on the adversary's batches): the adversary pushes it up while the gap stays
# small.

# %%
fig = plots.continuations(curves, P)
save(fig, "04_continuations", f"{len(SEEDS)} seeds from the same phase-1 checkpoints; "
     f"gap on {T['eval_pairs']} validation pairs (mean, band min-max over seeds)")

# %% [markdown]
# ## 3 · The paper's table, at this profile
#
# Every continuation's final checkpoint (and the phase-1 checkpoint it started from) measured with the
# fixed protocol of notebook 02: gap, linear-probe accuracy per task (L2 chosen on a validation split; mean
# over resplits), Hessian trace (mean loss, nats). Means over training seeds ± 95% CI over seeds. The
# lookup table is the same probe on the exact conditionals (no training: its CI is over probe resplits;
# its gap is 0 by construction). The paper's numbers (a 235M model on its PCFG) are shown beside ours,
# labelled as the paper's; they are not comparable in size, only in direction.

# %%
measured = algorithms.measure(P, trained)
M, lookup = measured.table, measured.lookup
M.to_csv(OUT / "04_measurements.csv", index=False)
print(f"{measured.checkpoints} checkpoints measured (or read from the cache) in {measured.seconds:.0f} s")

tables = algorithms.result_tables(P, measured)
for name, table in tables.items():
    table.to_csv(OUT / f"04_table_{name}.csv")
    print(f"\n{name} (profile {P['profile']}, {len(SEEDS)} seeds, ± 95% CI; "
          f"after {T['continue_steps']} continuation steps):")
    print(table.to_string())
print("\nthe paper's table (PCFG, 235M parameters; second-hand):")
print(algorithms.PAPER_TABLE.to_string(index=False))

# %% [markdown]
# The table as a figure: probe accuracy per task, mean ± 95% CI over seeds (lookup table: CI over
# resplits), and the invariant Hessian trace (the full gauge fixed; the raw trace is in the table above) of
# each algorithm's models (mean ± 95% CI over seeds; the view is set by the seeds' own values, a 95% CI over
# 2-3 seeds can reach far beyond them). The paper's pattern: the adversary is lower than AdamW on every task
# and sharper (higher trace); the lookup table, the optimal model itself, is lowest.

# %%
fig = plots.accuracy_and_trace(M, lookup, P)
save(fig, "04_algorithms", f"after {T['continue_steps']} continuation steps; "
     f"mean ± 95% CI over {len(SEEDS)} seeds "
     f"(lookup: over {PROTOCOL.probe_splits} probe resplits); invariant trace: {PROTOCOL.gauge} gauge fixed, "
     f"{PROTOCOL.trace_probes} probes, {PROTOCOL.trace_pairs} pairs")

# %% [markdown]
# ## 4 · The verdict, computed by the rules
#
# By the rules of `flatlib/claims.py`, fixed before these runs, applied by `algorithms.verdict_table` (the
# claims with the paper's numbers: `algorithms.claims`): paired per seed (every algorithm continued
# the same phase-1 checkpoint), the adversary minus AdamW per task, mean with its 95% t-interval over seeds
# (rule "paired effect", combined over tasks by rule "parts"), decided only if the two are at **equal loss**
# (mean gaps within 0.002 nats, the same rule as notebook 02; an earlier version accepted "both within ε");
# the same for the invariant trace, where the paper predicts a rise (the raw trace's difference is shown
# beside it); and the trained AdamW model against the lookup table (rule "unpaired effect", Welch interval:
# the lookup table's spread is over probe resplits). λ was chosen on a held-out seed (section 1).

# %%
verdict = algorithms.verdicts(P, measured)
claims = algorithms.claims(P, M, verdict, choices)
verdict.to_csv(OUT / "04_verdict.csv", index=False)
verdict.set_index(["language", "comparison", "quantity"]).round(4)

# %% [markdown]
# ## Summary (checked)
#
# Asserts (`algorithms.check_summary`) what must hold whatever the outcome (not the paper's claims): every
# continuation stayed finite, every gap, trace and accuracy is finite, the adversary's downstream loss was
# recorded, and the probes stay below the Bayes accuracy plus a tolerance where it is known. Prints one
# rounded summary with the verdict.

# %%
# the checks on this cell's first line raise if a number is out of place: nbval fails the notebook on it
algorithms.check_summary(trained.runs, M, lookup)  # raises AssertionError naming what failed
print(algorithms.summary(P, verdict, claims))
# only once the checks above passed
record_claims(P["profile"], "04_training_algorithms", claims,
              {"seeds": SEEDS, "languages": NAMES, "weights": P["algorithms"]["weights"]})
