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
# # 07 · flatlib on your model
#
# Everything the other notebooks measure on flatlib's own transformer works on a HuggingFace model: its exact
# gap to the optimum of the language, its Hessian trace with every exact symmetry fixed, and a linear probe
# against the Bayes accuracy. Here a small HF BERT (`BertForMaskedLM`, built from a config: nothing is
# downloaded) is trained on the profile's HMM with flatlib's single-mask objective and measured. The notebook
# checks no claim of the paper and records none in the report (like notebook 01): its summary checks what must
# hold whatever the numbers are. docs/your_model.md is the same, as two scripts.

# %% tags=["parameters"]
profile = "cpu"  # smoke | cpu | gpu | paper (each profile's "your_model" section in flatlib.profiles)
# seeds the model's initialisation, its training batches, the trace probes, the probe's splits, the rescaling
seed = 0
kind = None  # "bert" or "roberta"; None means the profile's ("bert")

# %% [markdown]
# ## Parameters
#
# `your_model.parameters` (`flatlib.analysis.your_model`) applies the parameters to the profile and validates
# it, the `your_model` section included (model sizes, training steps, the sizes of the measurement): an
# unknown profile or a bad value stops here with a `ValueError` naming the parameter, before any work. The
# computations are `flatlib.measurement.hf`'s `train_mlm` and `measure` and the figure `your_model_figure`,
# tested in `tests/test_hf.py`. The language is the profile's HMM (the cpu profile's: 6 states, 12 words,
# sentences of 10).

# %%
import torch

from flatlib.analysis import your_model
from flatlib.languages import build_language
from flatlib.measurement import hf
from flatlib.plots import your_model as your_model_plots
from flatlib.plots.style import figures_dir, saver, set_style
from flatlib.profiles import language_spec
from flatlib.runner.runs import RunStore
from flatlib.tools.report import parameter_lines

P = your_model.parameters(profile, seed, kind)
Y = P["your_model"]
print(parameter_lines({"profile": P["profile"], "seed": P["seed"], "hmm": P["hmm"], **Y},
                      ("model", "measure")))

# %%
torch.set_num_threads(1)  # small tensors: one thread is the fastest, and reruns are bit-identical
set_style()
FIG = figures_dir(P["profile"])  # figures/ (figures/<profile>/ for profiles other than cpu)
FIG.mkdir(parents=True, exist_ok=True)
save = saver(P["profile"], P["seed"])  # save(fig, name, note): PNG + PDF, stamped with profile and seed
spec = language_spec(P, "hmm")
language = build_language(spec)

# %% [markdown]
# ## 1 · Train a HF model on flatlib's objective
#
# `hf.model_for` builds the model from `hf.config_for(language, kind)`: its vocabulary *is* flatlib's ids (the
# words, then PAD, MASK, BOS and one spare), eager attention (the traces need second derivatives), no dropout,
# the MLM head untied from the embeddings (so that the head's LayerNorm -> decoder rescaling is an exact
# symmetry). `hf.train_mlm` trains it in place: every step `batch_size` fresh sentences, one masked position
# each, the cross-entropy of the words' logits there (the objective of flatlib's own model, whose minimum is
# the language's exact conditional), AdamW with a linear warm-up; every `eval_every` steps the exact gap on
# the validation pairs.
#
# **Cached, and short.** The training is a function of the initial weights, the language and the arguments
# (each step's batch is drawn from `(seed, step)`), so `train_mlm` keeps it in flatlib's run store (`runs/`,
# or `$FLATLIB_RUNS`), keyed by the language's spec, the model's HF config, the SHA-256 of its initial weights
# and the arguments, like the other notebooks' runs: a rerun loads the final weights in a second, and an
# interrupted one resumes from its last checkpoint with the same result. From scratch it is short at the cpu
# profile anyway (2400 steps of a 2x64 BERT: 130 s and 180 s on one thread in two runs on 2026-12-07, the
# machine shared): delete the run folder printed below to retrain it.

# %%
model = hf.model_for(language, Y["kind"], seed=P["seed"], **Y["model"])
history = hf.train_mlm(model, spec, Y["steps"], Y["batch_size"], Y["lr"], P["seed"],
                       warmup_steps=Y["warmup_steps"], eval_every=Y["eval_every"],
                       eval_pairs=Y["measure"]["pairs"], store=RunStore())
history.table.to_csv(FIG / "07_training.csv", index=False)
print(f"{type(model).__name__}, {sum(p.numel() for p in model.parameters())} parameters; "
      f"{'loaded from' if history.cached else f'trained in {history.seconds:.0f} s into'} run {history.key}")
history.table[["step", "lr", "train_loss", "gap", "gap_se", "special_mass", "gap_full"]].round(4)

# %% [markdown]
# ## 2 · Measure it as flatlib measures its own models
#
# `hf.measure` (the model is not changed):
#
# * **the exact gap** $\mathbb{E}\,\mathrm{KL}(p \,\|\, q)$ on the validation pairs, $q$ the model's softmax
#   over the *words* (flatlib's own model has no other outputs), with the mass the full softmax puts on the
#   special ids (`special_mass`, never a target, so training leaves it where initialisation put it) and the
#   gap of the full softmax;
# * **three Hessian traces** of the expected loss on the first `trace_pairs` pairs: raw (the model's
#   coordinates), LayerNorm-only (the gauge `flatness.invariant_trace` fixes on flatlib's models: here the MLM
#   head's LayerNorm -> decoder) and the **full gauge** (`symmetry.full_gauge_trace` over
#   `hf.symmetry_groups`: also attention Q/K and V/O per layer; BERT is post-LN, so no LayerNorm before a
#   block is a symmetry). The gauged parameters' part is exact, the rest a Hutchinson estimate (`trace_probes`
#   probes), whose SE all three share;
# * **the same function in other coordinates**: every group rescaled by $e^{N(0,1)}$ per coordinate, and the
#   three traces again. Only the full-gauge trace is a property of the function: it must not move;
# * **a linear probe** of the hidden state at the task's position (`task`: the hidden state at that position)
#   against the Bayes accuracy the exact posterior allows.

# %%
measured = hf.measure(model, language, task=Y["task"], seed=P["seed"], **Y["measure"])
table = your_model.measurement_table(measured)
table.to_csv(FIG / "07_measurements.csv")
print("seconds: " + ", ".join(f"{part} {s:.1f}" for part, s in measured["seconds"].items()))
table.round(4)

# %% [markdown]
# Left: the exact gap during training (log axis), over the words' softmax (the objective) and over the full
# softmax (the difference is the special-token mass), with the profile's ε (dashed). Middle: the three traces
# of the trained model and of the same function rescaled; look at which bars move. Right: the probe's accuracy
# against the Bayes accuracy and the majority class. Error bars: 95% intervals.

# %%
fig, note = your_model_plots.your_model_figure(history, measured, epsilon=P["pretraining"]["epsilon"])
save(fig, "07_your_model", note)

# %% [markdown]
# ## Summary (checked)
#
# The cell below asserts only what must hold whatever the outcome (`your_model.failed_checks`): every number
# finite, the gap non-negative within 3 SE, the special mass a probability, full gauge <= LayerNorm-only <=
# raw, the full-gauge trace the same on the rescaled function (to `your_model.INVARIANCE_RTOL`, float32
# rounding), the probe not above the Bayes accuracy beyond 3 SE, and a gap that fell during training. It does
# not assert that the model reached the optimum: the summary says whether its gap is within the profile's ε
# (`pretraining.epsilon`, the bound flatlib's own models are trained to).

# %%
# the checks on this cell's first line raise if a number is out of place: nbval fails the notebook on it
problems = your_model.failed_checks(measured, history)
assert not problems, problems
lines = [f"07_your_model · profile={P['profile']} · seed={P['seed']} · {type(model).__name__} {Y['model']}",
         your_model.summary(measured, history, P["pretraining"]["epsilon"])]
if P["profile"] == "smoke":
    lines.append("profile smoke: a short run of a tiny model; the numbers check the code path")
lines.append("checks passed: finite numbers · gap >= 0 · full <= LayerNorm-only <= raw · "
             "full gauge invariant · probe <= Bayes · the gap fell")
print("\n".join(lines))
