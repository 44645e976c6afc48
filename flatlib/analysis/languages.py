"""What notebook 01 reports about the synthetic languages, computed in one place: their exact optimal
losses (with the checks that the exact conditionals are distributions and obey the chain rule), their
downstream tasks (label counts, majority class, Bayes accuracy), the lookup-table model's loss, the
teacher LM's table, the authors' released grammar, and the checked summary.

Everything here is derived from the languages' exact conditionals (``flatlib.languages``); the
functions only organise them into rows and tables. Not imported by ``flatlib.languages`` itself (it
uses ``flatlib.measurement.downstream``, which imports the languages):
``from flatlib.analysis.languages import ...``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import pandas as pd
import torch
from torch import Tensor

from flatlib.languages.base import PAD, Corpus, Estimate, Language, LossEstimate, loss_estimate
from flatlib.languages.hmm import HMM
from flatlib.languages.pcfg import PCFG
from flatlib.languages.teacher import TOPIC_TASK, TeacherLM
from flatlib.measurement.downstream import lookup_table_features
from flatlib.profiles import resolve

BATCH = 1024  # sentences per exact computation in this module (the chunking the committed numbers used)
CAUSAL_MAX_SHORT = 16  # languages with sentences up to this long get their causal loss on every sentence
CAUSAL_SENTENCES_LONG = 1000  # ...longer ones on at most this many (prefix probabilities are slow)
EXACT_TOLERANCE = 1e-9  # what "exact" means in the checks: rows sum to 1, chain rule, lookup = optimum
PAPER_PCFG_OPTIMUM = 3.196  # the paper's optimal MLM loss of its PCFG (docs/paper.md)
RELEASED_RULES = Path(__file__).resolve().parents[3] / "shared" / "anchors" / "rule_deep_mlm.txt"


def parameters(profile: str, seed: int = 0, n_sentences: int | None = None) -> dict[str, Any]:
    """Notebook 01's parameters: the profile resolved (``flatlib.profiles.resolve``), ``n_sentences``
    (None: the profile's ``n_eval_sentences``) the sentences each estimate averages over. Invalid values
    raise ``ValueError`` naming the parameter."""
    return resolve(profile, seed=seed, n_eval_sentences=n_sentences)


# ------------------------------------------------------------------------------------ optimal losses
def causal_sample_size(language: Language, n: int) -> int:
    """How many of ``n`` sentences the causal losses are computed on: all of them for sentences of at
    most 16 words, at most 1000 beyond (a PCFG's prefix probabilities cost one inside pass per prefix,
    slow at 32 words on a CPU)."""
    return n if language.max_len <= CAUSAL_MAX_SHORT else min(n, CAUSAL_SENTENCES_LONG)


@dataclass(frozen=True)
class OptimalLosses:
    """A language's exact optimal losses on a corpus, with the checks of the exact conditionals.

    Attributes:
        mlm: the single-mask MLM optimum over the whole corpus.
        causal: the next-word optimum (words only: each word given that the sentence goes on).
        causal_eos: the next-word optimum with the end-of-sentence event (PCFG only; None otherwise).
        row_error: the largest ``|sum_w p(w | context) - 1|`` over every exact conditional computed
            (MLM rows of the first 1024 sentences, every causal row, with and without EOS).
        chain_rule_error: ``|sum of causal nlls - (-sum log p(x))| / (-sum log p(x))`` over the causal
            sentences, with ``log p(x)`` from the inside / forward algorithm (the EOS losses for a PCFG,
            whose sentence ends are events; the word losses for fixed-length languages).
    """

    mlm: LossEstimate
    causal: LossEstimate
    causal_eos: LossEstimate | None
    row_error: float
    chain_rule_error: float


def _true_nll(probs: Tensor, targets: Tensor, mask: Tensor) -> Tensor:
    """``-log probs[..., target]`` at the positions of ``mask``, 0 elsewhere."""
    return -torch.log(probs.gather(-1, targets.clamp(min=0)[..., None]).squeeze(-1)).masked_fill(~mask, 0)


def optimal_losses(language: Language, corpus: Corpus, n_causal: int | None = None,
                   batch_size: int = BATCH) -> OptimalLosses:
    """The exact MLM optimum on ``corpus`` and the causal optima on its first ``n_causal`` sentences
    (default ``causal_sample_size``), from one exact causal computation per batch: for a PCFG the
    conditionals with an end-of-sentence column give both the "+ EOS" loss and, renormalised over the
    words, the words-only loss. See ``OptimalLosses`` for the checks."""
    mlm = language.optimal_mlm_loss(corpus)
    sub = corpus[: causal_sample_size(language, len(corpus)) if n_causal is None else n_causal]
    head = corpus[:batch_size]
    row_err = [float((language.mlm_conditionals(head).sum(-1) - 1)[head.mask].abs().max())]
    nll_words, nll_eos, masks_eos = [], [], []
    for chunk in sub.batches(batch_size):
        if isinstance(language, PCFG):
            probs = language.causal_conditionals(chunk, include_eos=True)  # [n, L+1, V+1]
            valid = torch.arange(chunk.max_len + 1)[None, :] <= chunk.lengths[:, None]
            row_err.append(float((probs.sum(-1) - 1)[valid].abs().max()))
            # the targets: the words, then the end-of-sentence column (index V) at position len
            targets = torch.cat([chunk.tokens, torch.full((len(chunk), 1), PAD)], dim=1)
            is_word = torch.cat([chunk.mask, torch.zeros(len(chunk), 1, dtype=torch.bool)], 1)
            targets = torch.where(valid & ~is_word, language.vocab_size, targets)
            nll_eos.append(_true_nll(probs, targets, valid))
            masks_eos.append(valid)
            words = probs[:, : chunk.max_len, : language.vocab_size]
            words = words / words.sum(-1, keepdim=True).clamp(min=1e-300)
        else:
            words = language.causal_conditionals(chunk)
        row_err.append(float((words.sum(-1) - 1)[chunk.mask].abs().max()))
        nll_words.append(_true_nll(words, chunk.tokens, chunk.mask))
    causal = loss_estimate(torch.cat(nll_words), sub.mask)
    eos = loss_estimate(torch.cat(nll_eos), torch.cat(masks_eos)) if nll_eos else None
    full = eos if eos is not None else causal
    nll_sum = -float(language.log_prob(sub).sum())
    return OptimalLosses(mlm, causal, eos, max(row_err), abs(full.mean * full.n_tokens - nll_sum) / nll_sum)


def optimal_loss_row(language: Language, losses: OptimalLosses) -> dict[str, float | int]:
    """One row of the optimal-loss table (nats/token; "± se" columns are standard errors over
    sentences; "causal + EOS" is nan for languages without sentence ends)."""
    mlm, causal, eos = losses.mlm, losses.causal, losses.causal_eos
    return {
        "V": language.vocab_size, "max length": language.max_len,
        "sentences": mlm.n_sentences, "tokens": mlm.n_tokens,
        "MLM optimum": mlm.mean, "MLM ± se": mlm.stderr,
        "causal sentences": causal.n_sentences,
        "causal optimum (words)": causal.mean, "causal ± se": causal.stderr,
        "causal + EOS": eos.mean if eos else math.nan, "causal + EOS ± se": eos.stderr if eos else math.nan,
        "uniform log V": math.log(language.vocab_size),
    }


def optimal_loss_table(languages: Mapping[str, Language], corpora: Mapping[str, Corpus]
                       ) -> tuple[pd.DataFrame, dict[str, OptimalLosses]]:
    """The optimal-loss table (one row per language, indexed by ``language``) and the
    ``OptimalLosses`` behind each row."""
    losses = {name: optimal_losses(lang, corpora[name]) for name, lang in languages.items()}
    rows = [{"language": name, **optimal_loss_row(lang, losses[name])} for name, lang in languages.items()]
    return pd.DataFrame(rows).set_index("language"), losses


def lookup_table_loss(language: Language, corpus: Corpus, batch_size: int = BATCH) -> float:
    """The single-mask loss of the lookup-table model
    (``flatlib.measurement.downstream.lookup_table_features``): the mean over the corpus's tokens of ``-log``
    its feature at the true word. The features are the
    exact conditionals, so this is the optimal MLM loss, computed through the feature map."""
    nll = 0.0
    for chunk in corpus.batches(batch_size):
        features = lookup_table_features(language, chunk)
        p_true = features.gather(-1, chunk.tokens.clamp(min=0)[..., None]).squeeze(-1)
        nll += float(-torch.log(p_true[chunk.mask]).sum())
    return nll / corpus.n_tokens


# ------------------------------------------------------------------------------------ downstream tasks
def task_description(language: Language, task: str) -> str:
    """What ``task``'s label is, in words."""
    if isinstance(language, PCFG):
        span = language.task_spans[task]
        if span is None:
            return "sentence type of the whole sentence"
        return f"non-terminal of the first {span} words"
    if isinstance(language, HMM):
        return f"hidden state at position {task.split('@')[1]}"
    if isinstance(language, TeacherLM):
        return "topic of the sentence"
    raise ValueError(f"language: no description of the tasks of {type(language).__name__}")


def task_bayes_accuracy(language: Language, corpus: Corpus, task: str) -> tuple[float, float]:
    """The Bayes accuracy of ``task`` and its standard error: exact per sentence from the posterior for
    the HMM and the teacher (sampled latent labels); ``(1, 0)`` for the PCFG, whose labels are a
    deterministic function of the words."""
    if isinstance(language, PCFG):
        return 1.0, 0.0
    estimate: Estimate = language.bayes_accuracy(corpus, task)  # type: ignore[attr-defined]
    return estimate.mean, estimate.stderr


def majority_rate(labels: Tensor, n_classes: int) -> float:
    """The accuracy of always guessing the most frequent label, over the labelled (``>= 0``) entries.
    (Computed as a torch float32 ratio, as the committed task tables were.)"""
    labelled = labels[labels >= 0]
    counts = torch.bincount(labelled, minlength=n_classes)
    return float(counts.max() / counts.sum())


def task_row(language: Language, corpus: Corpus, task: str, labels: Tensor) -> dict[str, object]:
    """One row of the task table: what the label is, the classes, the fraction of unlabelled
    sentences, the majority-class rate and the Bayes accuracy (± standard error)."""
    bayes, bayes_se = task_bayes_accuracy(language, corpus, task)
    return {"label": task_description(language, task), "classes": language.n_classes(task),
            "without label": float((labels < 0).double().mean()),
            "majority class": majority_rate(labels, language.n_classes(task)),
            "Bayes accuracy": bayes, "Bayes ± se": bayes_se}


def task_table(languages: Mapping[str, Language], corpora: Mapping[str, Corpus]
               ) -> tuple[pd.DataFrame, dict[tuple[str, str], Tensor]]:
    """The downstream-task table (indexed by ``(language, task)``) and every task's labels."""
    rows, labels = [], {}
    for name, lang in languages.items():
        for task in lang.tasks:
            labels[name, task] = lang.task_labels(corpora[name], task)
            row = task_row(lang, corpora[name], task, labels[name, task])
            rows.append({"language": name, "task": task, **row})
    return pd.DataFrame(rows).set_index(["language", "task"]), labels


def sampled_type_agreement(grammar: PCFG, corpus: Corpus) -> tuple[str, float] | None:
    """For the grammar's whole-sentence task: the fraction of sentences whose label (the most likely
    sentence type given the words) is the type that was sampled (the start symbol's child in the
    sampled tree). Returns ``(task, fraction)``, or None if the grammar has no whole-sentence task."""
    whole = [t for t in grammar.tasks if grammar.task_spans[t] is None]
    if not whole:
        return None
    task = whole[0]
    classes = grammar.task_classes(task)
    sampled = corpus.latents["node_symbol"][:, 1]  # node 1 is the start symbol's child
    sampled_class = torch.tensor([classes.index(grammar.nonterminals[s]) for s in sampled.tolist()])
    return task, float((grammar.task_labels(corpus, task) == sampled_class).double().mean())


def shortcut_sentence(grammar: PCFG, corpus: Corpus, first: int = 50) -> int:
    """The index of the longest of the first ``first`` sentences that is shorter than the grammar's
    longest (so that its derivation uses a shortcut rule); the longest of them if none is shorter."""
    lengths = corpus.lengths[:first]
    short = lengths < grammar.max_len
    return int(torch.where(short, lengths, -1).argmax()) if short.any() else int(lengths.argmax())


# ------------------------------------------------------------------------------------ the teacher LM
def teacher_sample_size(teacher: TeacherLM, n: int) -> int:
    """At most 2,000 of ``n`` sentences, 200 for vocabularies over 50 words: the teacher's exact
    single-mask conditionals enumerate every word at every position."""
    return min(n, 2000 if teacher.vocab_size <= 50 else 200)


@dataclass(frozen=True)
class TeacherSummary:
    """The teacher LM on a sample: its optimal losses, its topic task, and the sample itself."""

    corpus: Corpus
    mlm: LossEstimate
    causal: LossEstimate
    bayes: Estimate
    labels: Tensor
    majority: float
    vocab_size: int
    seq_len: int
    n_topics: int

    def table(self) -> pd.DataFrame:
        """One row, indexed ``teacher``."""
        return pd.DataFrame([{
            "sentences": len(self.corpus), "V": self.vocab_size, "length": self.seq_len,
            "topics": self.n_topics,
            "MLM optimum": self.mlm.mean, "MLM ± se": self.mlm.stderr,
            "causal optimum": self.causal.mean, "causal ± se": self.causal.stderr,
            "uniform log V": math.log(self.vocab_size), "topic Bayes accuracy": self.bayes.mean,
            "Bayes ± se": self.bayes.stderr, "topic majority": self.majority,
        }], index=["teacher"])


def teacher_summary(teacher: TeacherLM, n: int, seed: int) -> TeacherSummary:
    """Sample ``teacher_sample_size(teacher, n)`` sentences with ``seed`` and compute the teacher's
    exact MLM and causal optima, its topic Bayes accuracy and majority-topic rate on them."""
    n_teacher = teacher_sample_size(teacher, n)
    corpus = teacher.sample(n_teacher, seed=seed)
    labels = teacher.task_labels(corpus, TOPIC_TASK)
    majority = float(torch.bincount(labels, minlength=teacher.n_classes(TOPIC_TASK)).max()) / n_teacher
    return TeacherSummary(corpus, teacher.optimal_mlm_loss(corpus), teacher.optimal_causal_loss(corpus),
                          teacher.bayes_accuracy(corpus, TOPIC_TASK), labels, majority,
                          teacher.vocab_size, teacher.seq_len, teacher.n_classes(TOPIC_TASK))


# ------------------------------------------------------------------------------------ the released grammar
@dataclass(frozen=True)
class ReleasedGrammar:
    """The authors' released grammar and its exact single-mask optimum on a sample."""

    grammar: PCFG
    mlm: LossEstimate


def released_grammar(n: int, seed: int, profile: str, path: Path = RELEASED_RULES) -> ReleasedGrammar | None:
    """The authors' released grammar (loaded with ``renormalize=True``: four of its pre-terminals sum
    to 0.9998) and its exact MLM optimum on ``min(n, 2000)`` sentences (200 at the smoke profile)
    drawn with ``seed``; None if ``path`` does not exist."""
    if not Path(path).is_file():
        return None
    grammar = PCFG.from_rules(path, renormalize=True)
    n_released = min(n, 200 if profile == "smoke" else 2000)
    return ReleasedGrammar(grammar, grammar.optimal_mlm_loss(grammar.sample(n_released, seed=seed)))


# ------------------------------------------------------------------------------------ the checked summary
def sampling_reproducible(language: Language, seed: int, n: int = 64) -> bool:
    """Two samples with ``seed`` are identical (words and every latent), one with ``seed + 1`` differs."""
    a, b = language.sample(n, seed=seed), language.sample(n, seed=seed)
    same = torch.equal(a.tokens, b.tokens) and all(torch.equal(a.latents[k], b.latents[k]) for k in a.latents)
    return same and not torch.equal(a.tokens, language.sample(n, seed=seed + 1).tokens)


def check_languages(languages: Mapping[str, Language], losses: pd.DataFrame,
                    exact: Mapping[str, OptimalLosses], lookup: Mapping[str, float], tasks: pd.DataFrame,
                    teacher: TeacherSummary, released: ReleasedGrammar | None, seed: int,
                    tol: float = EXACT_TOLERANCE) -> None:
    """Assert what notebook 01 claims (AssertionError naming the language and the check otherwise):
    exact conditionals are distributions and obey the chain rule (within ``tol``); MLM optimum <
    causal optimum < log V; the lookup-table loss is the MLM optimum (within ``tol``); sampling is
    reproducible from the seed; every HMM task and the teacher's topic are predictable beyond the
    majority class; the released grammar's optimum lies between the paper's 3.196 and log V."""
    for name, lang in languages.items():
        row, c = losses.loc[name], exact[name]
        assert c.row_error < tol, f"{name}: a conditional row does not sum to 1 ({c.row_error:.2e})"
        assert c.chain_rule_error < tol, f"{name}: causal losses do not add up to -log p(x)"
        assert row["MLM optimum"] < row["causal optimum (words)"] < row["uniform log V"], name
        assert abs(lookup[name] - row["MLM optimum"]) < tol, f"{name}: lookup-table loss != optimum"
        assert sampling_reproducible(lang, seed), f"{name}: sampling is not reproducible from the seed"
        if isinstance(lang, HMM):
            for task in lang.tasks:
                t = tasks.loc[(name, task)]
                assert t["Bayes accuracy"] > t["majority class"], task
    assert teacher.mlm.mean < teacher.causal.mean < math.log(teacher.vocab_size), \
        "teacher: MLM < causal < log V fails"
    assert teacher.bayes.mean > teacher.majority, \
        "teacher: the topic is not predictable beyond the majority class"
    if released is not None:
        log_v = math.log(released.grammar.vocab_size)
        assert PAPER_PCFG_OPTIMUM < released.mlm.mean < log_v, "released grammar"


def summary(params: Mapping[str, object], languages: Mapping[str, Language], losses: pd.DataFrame,
            tasks: pd.DataFrame, teacher: TeacherSummary, released: ReleasedGrammar | None) -> str:
    """Notebook 01's rounded summary (the text nbval compares between runs)."""
    lines = [f"01_synthetic_languages · profile={params['profile']} · seed={params['seed']} · "
             f"{params['n_eval_sentences']} sentences per language"]
    for name, lang in languages.items():
        row = losses.loc[name]
        text = (f"{name:>4}: V={lang.vocab_size} max_len={lang.max_len} · "
                f"MLM optimum {row['MLM optimum']:.3f} ± {row['MLM ± se']:.3f} · "
                f"causal {row['causal optimum (words)']:.3f} ± {row['causal ± se']:.3f}")
        if isinstance(lang, PCFG):
            text += f" · causal+EOS {row['causal + EOS']:.3f} ± {row['causal + EOS ± se']:.3f}"
        lines.append(text + f" · log V {row['uniform log V']:.3f}")
        for task in lang.tasks:
            t = tasks.loc[(name, task)]
            lines.append(f"      task {task}: {t['classes']} classes · no label {t['without label']:.3f} · "
                         f"majority {t['majority class']:.3f} · "
                         f"Bayes {t['Bayes accuracy']:.3f} ± {t['Bayes ± se']:.3f}")
    if released is not None:
        lines.append(f"released grammar: MLM optimum {released.mlm.mean:.3f} ± {released.mlm.stderr:.3f} "
                     f"on {released.mlm.n_sentences} sentences (paper: {PAPER_PCFG_OPTIMUM})")
    else:
        lines.append("released grammar: not found (skipped)")
    t = teacher
    lines.append(f"teacher: V={t.vocab_size} length={t.seq_len} · MLM optimum {t.mlm.mean:.3f} ± "
                 f"{t.mlm.stderr:.3f} · causal {t.causal.mean:.3f} ± {t.causal.stderr:.3f} · topic Bayes "
                 f"{t.bayes.mean:.3f} ± {t.bayes.stderr:.3f} vs majority {t.majority:.3f} "
                 f"({len(t.corpus)} sentences)")
    lines.append("checks passed: rows sum to 1 (1e-9) · causal chain rule = -log p(x) · MLM < causal < log V"
                 " · lookup-table loss = optimum (1e-9) · HMM Bayes > majority · sampling reproducible")
    return "\n".join(lines)


__all__ = ["OptimalLosses", "causal_sample_size", "optimal_losses", "optimal_loss_row", "optimal_loss_table",
           "lookup_table_loss", "task_description", "task_bayes_accuracy", "majority_rate", "task_row",
           "task_table", "sampled_type_agreement", "shortcut_sentence", "TeacherSummary",
           "teacher_sample_size", "teacher_summary", "ReleasedGrammar", "released_grammar", "RELEASED_RULES",
           "sampling_reproducible", "check_languages", "summary"]
