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
# # 01 · The synthetic languages and their exact optima
#
# The paper's experiments compare models whose pre-training loss is *at the minimum possible value*; that
# only makes sense if the minimum is known **exactly**. Here are the two synthetic languages (an HMM and a
# PCFG), samples and latent structure, their exact optimal losses, and the downstream tasks built on them.

# %% tags=["parameters"]
profile = "cpu"  # smoke | cpu | paper (flatlib.profiles)
seed = 0  # every sample in this notebook is drawn with this seed
n_sentences = None  # evaluation sentences per language; None means the profile's n_eval_sentences

# %% [markdown]
# ## Parameters
#
# `parameters` (`flatlib.analysis.languages`) applies the parameters to the profile and validates them (an
# unknown profile or a bad value stops here with a `ValueError` naming the parameter); `build_languages`
# generates the profile's HMM and PCFG from the profile's `language_seed` (the *language* is fixed by the
# profile; `seed` only drives the sampling of sentences). Every number in this notebook is computed by
# `flatlib.analysis.languages` (tested in `tests/test_language_summary.py`) and every figure drawn by
# `flatlib.plots.languages`; `save` (from `flatlib.plots.style.saver`) writes each figure to the profile's
# figures folder, stamped with the profile and seed.

# %%
import math

import pandas as pd

from flatlib.analysis.languages import (
    RELEASED_RULES,
    check_languages,
    lookup_table_loss,
    optimal_loss_table,
    parameters,
    released_grammar,
    sampled_type_agreement,
    shortcut_sentence,
    summary,
    task_table,
    teacher_summary,
)
from flatlib.plots import languages as plots
from flatlib.plots.style import figures_dir, saver, set_style
from flatlib.profiles import build_languages, build_teacher

P = parameters(profile, seed, n_sentences)
languages = build_languages(P)
hmm, pcfg = languages["hmm"], languages["pcfg"]
for key, value in P.items():
    print(f"{key:>16}: {value}")

# %%
set_style()
# save(fig, name, note): figures/ (figures/<profile>/ beyond cpu), stamped, then shown
save = saver(P["profile"], P["seed"])
FIGURES = figures_dir(P["profile"])
N = P["n_eval_sentences"]
corpora = {name: lang.sample(N, seed=P["seed"]) for name, lang in languages.items()}

# %% [markdown]
# ## 1 · The HMM
#
# A hidden Markov model with a uniform start state; every row of the transition and emission matrices is
# drawn from a symmetric Dirichlet (concentration from the profile; smaller = sparser, more predictable
# rows), floored at 1e-4 and renormalised. Every sentence has exactly `seq_len` words. The hidden path is
# kept as the latent `states`: the downstream tasks ask for the hidden state at fixed positions.

# %%
corpus = corpora["hmm"]
print(f"{hmm!r}: {hmm.n_states} hidden states, {hmm.vocab_size} words, every sentence {hmm.seq_len} words; "
      f"task positions {hmm.task_positions}; {len(corpus)} sampled sentences")
pd.DataFrame({
    "words (ids)": [" ".join(f"{w:>2}" for w in row) for row in corpus.tokens[:5].tolist()],
    "hidden states": [" ".join(f"{h:>2}" for h in row) for row in corpus.latents["states"][:5].tolist()],
})

# %% [markdown]
# Below: the transition and emission matrices (each row a distribution) and how often each word occurs in
# the sample. Look for the sparsity: most of each row's mass sits on a few entries, which is what makes the
# language predictable (optimum well below the uniform log V) yet ambiguous (several states emit the same
# word).

# %%
save(plots.plot_hmm_parameters(hmm, corpora["hmm"]), "01_hmm_parameters",
     f"HMM transition and emission probabilities; word frequencies in {N} sampled sentences")

# %% [markdown]
# One sentence's hidden path (red) drawn over the exact posterior p(h_t = h | x) of the whole sentence
# (forward-backward; darker = more probable). Where the shading is spread over several states the words
# do not pin down the state: this is why the Bayes accuracy of the state tasks (section 4) is below 1. The
# dotted lines are the task positions.

# %%
save(plots.plot_hidden_path(hmm, corpora["hmm"], 0), "01_hmm_hidden_path",
     "sentence 0 of the sample; red: sampled states; shading: exact posterior; dotted: task positions")

# %% [markdown]
# ## 2 · The PCFG
#
# A random grammar of the shape of the authors' released one: `S -> S1..Sk` (the sentence *types*), each
# `Si -> A1_a A1_b`, then levels `A1 ... A{depth}` of non-terminals with binary rules into the next level
# plus one "shortcut" rule emitting a word; the last level emits words from overlapping word sets (the
# ambiguity). Sentences have between 2 and `2**depth` words. Sampling keeps the derivation tree as node
# tables (`node_symbol`, `node_parent`, `node_start`, `node_end`, `node_depth`).

# %%
corpus = corpora["pcfg"]
print(f"{pcfg!r}: {len(pcfg.user_nonterminals)} non-terminals, {len(pcfg.rules)} rules, "
      f"{pcfg.vocab_size} words, sentences of {pcfg.min_len}-{pcfg.max_len} words; "
      f"task spans {pcfg.task_spans}")
print("rules of the start symbol:",
      ", ".join(f"{l} -> {' '.join(r)} ({p:.3f})" for l, r, p in pcfg.rules if l == pcfg.start))
print(f"\nthe first 5 of {len(corpus)} sampled sentences:")
for i, sentence in enumerate(pcfg.decode(corpus[:5])):
    print(f"  [{i}] {sentence}")

# %% [markdown]
# Sentence lengths and word frequencies in the sample: short sentences come from shortcut rules high in
# the tree; the word frequencies are far from uniform.

# %%
save(plots.plot_lengths_and_words(pcfg, corpora["pcfg"]), "01_pcfg_lengths_words",
     f"PCFG: sentence-length distribution and word frequencies of {N} sampled sentences")

# %% [markdown]
# The derivation tree of one sampled sentence (the longest of the first 50 that is shorter than the
# maximum, so that it uses a shortcut rule), drawn from the sampled node tables: every box is a non-terminal
# at (centre of the words it derives, -depth), words at the bottom, dashed lines from the rule that emitted
# each word. A word hanging from a high level is a shortcut.

# %%
i_tree = shortcut_sentence(pcfg, corpora["pcfg"], first=50)
save(plots.plot_parse_tree(pcfg, corpora["pcfg"], i_tree), "01_pcfg_parse_tree",
     f"sampled derivation tree of sentence {i_tree} (boxes: non-terminals; bottom row: words)")

# %% [markdown]
# ## 3 · The exact optimal losses
#
# The **single-mask MLM loss** of a model f is L(f) = E over sentences x and a masked position t of
# -log f(x_-t)[x_t]: mask one word, predict it from all the others. It is minimised by the true conditional
# p(x_t | x_-t), and its minimum is the conditional entropy. flatlib computes p(x_t = w | x_-t) **exactly**
# for every position and word: by forward-backward for the HMM, by inside-outside for the PCFG (the
# sentence length is part of the context). No approximation enters the conditionals; the only error in the
# table is the **sampling error** of averaging over a finite set of sentences: "±" is the standard error
# over sentences, which are the independent units (the words of one sentence are correlated), so it shrinks
# as 1/sqrt(n_sentences). The reduction is the mean over all tokens (nats/token).
#
# For comparison: the optimal **causal** (next-word) loss -log p(x_t | x_<t) by the forward algorithm /
# prefix probabilities. For the PCFG "words only" predicts each word given that the sentence goes on;
# "+ EOS" also predicts where the sentence ends (one more event per sentence), and then the per-sentence
# sum is exactly -log p(x). Masked prediction sees more context, so its optimum is lower. The uniform
# baseline log V is the loss of a model that knows nothing.
#
# `optimal_loss_table` computes the table from one exact causal computation per batch of sentences.
# Prefix probabilities of a PCFG cost one inside pass per prefix, slow at sentences of up to 32 words on a
# CPU, so beyond 16 words the causal columns use at most 1,000 sentences (the column "causal sentences").

# %%
losses, exact = optimal_loss_table(languages, corpora)
losses.to_csv(FIGURES / "01_optimal_losses.csv")
for name, c in exact.items():
    print(f"{name}: max |row sum - 1| = {c.row_error:.1e}; "
          f"causal sum vs -log p(x): relative error {c.chain_rule_error:.1e}")
losses.round(4)

# %% [markdown]
# Read the table as: **MLM optimum < causal optimum < log V** for both languages. These numbers are the
# lines every pre-training run in the next notebooks is measured against ("gap to the optimum"). The row
# checks above confirm that every exact conditional is a probability distribution, and that the causal
# losses, accumulated over a sentence, reproduce the sentence probability computed independently by the
# inside / forward algorithm (the chain rule).
#
# ### The authors' released grammar
#
# The authors released one grammar (`rule_deep_mlm.txt`; four of its pre-terminals sum to 0.9998, so it is
# loaded with `renormalize=True`, as nltk's sampler effectively did). Its exact single-mask optimum is about
# **4.44 nats/token**, not the paper's 3.196: that grammar's sentences have at most 16 words, while the
# paper describes sentences up to 32, so the paper's figures likely used a deeper grammar. The cell is
# skipped if the file is not present (it lives in `shared/anchors/` next to the repository).

# %%
released = released_grammar(N, P["seed"], P["profile"])  # None if the rule file is not there
if released is not None:
    print(f"{released.grammar!r}\nexact single-mask optimum: {released.mlm}  "
          f"(uniform log V = {math.log(released.grammar.vocab_size):.3f}; paper: 3.196)")
else:
    print(f"{RELEASED_RULES} not found: skipping the released grammar")

# %% [markdown]
# ## 4 · Downstream tasks
#
# **HMM** (`state@t`): predict the hidden state at position t from the whole sentence (the paper: positions
# 6 and 10 of 16). The label is the *sampled* state, so even the best possible classifier errs: its accuracy,
# the **Bayes accuracy** E_x[max_h p(h_t = h | x)], is computed exactly per sentence from the posterior and
# averaged over the sample (± standard error).
#
# **PCFG** (A, B, C): the label is the non-terminal with the largest inside probability over a span:
# task A the sentence type S1..Sk of the whole sentence, tasks B and C the most likely non-terminal (any of
# the grammar's) deriving the first `span` words. The released code uses whole sentence / 4 words / 2 words,
# while the paper reports spans of 32 / 16 / 8 tokens; the profile sets the spans (printed below). A
# sentence shorter than the span, or whose prefix no single non-terminal derives, has no label (-1) and is
# left out. These labels are a deterministic function of the words (an argmax of inside probabilities), so
# the **Bayes accuracy is 1**: everything needed is in the sentence, and the question is how easily a
# model's features expose it. The majority-class rate is the accuracy of always guessing the most frequent
# label.

# %%
tasks, task_labels = task_table(languages, corpora)
tasks.to_csv(FIGURES / "01_downstream_tasks.csv")
print("PCFG task spans (None = whole sentence):", pcfg.task_spans)
tasks.round(3)

# %% [markdown]
# The PCFG labels are defined by the words, not by the tree that generated them: for task A, how often is
# the most likely type the one that was actually sampled?

# %%
agreement = sampled_type_agreement(pcfg, corpora["pcfg"])  # None without a whole-sentence task
if agreement is not None:
    print(f"task {agreement[0]}: the label equals the sampled sentence type for {agreement[1]:.1%} "
          f"of the {N} sentences")

# %% [markdown]
# The label distributions (fractions of the labelled sentences). A task whose labels are dominated by one
# class is easy to fake: compare any probe's accuracy with the majority-class rate in the title.

# %%
save(plots.plot_task_labels(languages, task_labels, tasks), "01_task_labels",
     f"label distributions of the downstream tasks over {N} sampled sentences per language "
     "(unlabelled sentences left out); HMM Bayes accuracy from the exact posterior")

# %% [markdown]
# ## 5 · The lookup-table model
#
# The paper's **lookup table** is the Bayes-optimal pre-trained model itself: its "features" at position t
# are the exact conditional distribution p(x_t = · | x_-t), one V-vector per position
# (`flatlib.measurement.downstream.lookup_table_features`). It sits exactly at the optimum of the pre-training
# loss, and in the paper a linear probe on these features transfers *worse* than a trained transformer: same
# (optimal) loss, different downstream. Below, one sentence per language (positions × words; red circles: the
# true words). Each row is the distribution a perfect MLM predicts at that position when it is masked.

# %%
save(plots.plot_lookup_features(languages, corpora, {"hmm": 0, "pcfg": i_tree}), "01_lookup_table_features",
     "lookup-table (exact MLM conditional) features of one sentence per language; red circles: true words")

# %% [markdown]
# The check that ties the lookup table to the optimum: the mean over all tokens of -log(feature of the true
# word) must equal the exact optimal MLM loss of section 3 (the features *are* exp(-nll) at the true word).
# `lookup_table_loss` computes it through the feature map, batch by batch.

# %%
lookup = {name: lookup_table_loss(lang, corpora[name]) for name, lang in languages.items()}
for name, loss in lookup.items():
    optimum = losses.loc[name, "MLM optimum"]
    print(f"{name}: lookup-table loss {loss:.10f} vs optimum {optimum:.10f} "
          f"(|diff| {abs(loss - optimum):.1e})")

# %% [markdown]
# ## 6 · The third language: text from a teacher language model
#
# The paper's third dataset is text sampled from a small pretrained LM (OPT restricted to its 2,000 most
# frequent tokens). flatlib cannot download weights, so its teacher is one it controls: a small causal
# transformer with random weights (`temperature` sets how peaked it is) that first draws a latent **topic**
# and then writes a fixed-length sentence conditioned on it. Its conditionals are exact because it *is* the
# distribution: the causal ones are its own softmax (marginalised over the unseen topic), the single-mask
# ones are computed by enumerating every word at the masked position (cost grows with the vocabulary:
# this notebook uses at most 2,000 sentences, and 200 for large vocabularies). The downstream task is the
# topic, with an exact Bayes accuracy from p(topic | x). Left: the exact topic posterior of a few
# sentences (the sampled topic is boxed); right: the lookup-table features of one sentence.

# %%
teacher = build_teacher(P)
taught = teacher_summary(teacher, N, P["seed"])  # at most 2,000 sentences (200 beyond 50 words), see above
taught.table().to_csv(FIGURES / "01_teacher.csv")
print(f"{teacher!r}")
for i in range(3):
    print(f"  topic {int(taught.labels[i])}: " + " ".join(f"w{w}" for w in taught.corpus.tokens[i].tolist()))
save(plots.plot_teacher(teacher, taught.corpus, n_show=10), "01_teacher",
     "teacher LM: topic posteriors of 10 sampled sentences; exact MLM conditionals of sentence 0")
taught.table().round(4)

# %% [markdown]
# ## Summary (checked)
#
# `check_languages` asserts what this notebook claims (an `AssertionError` naming the language and the
# check otherwise) and `summary` prints one rounded summary (the cell nbval
# compares between runs): the exact conditionals are distributions, the causal chain rule reproduces
# -log p(x), the optima sit below log V with MLM below causal, the lookup table's loss is the optimum,
# the HMM tasks are learnable beyond the majority class, and sampling is reproducible from the seed.

# %%
# the checks on this cell's first line raise if a number is out of place: nbval fails the notebook on it
check_languages(languages, losses, exact, lookup, tasks, taught, released, seed=P["seed"])
print(summary(P, languages, losses, tasks, taught, released))
