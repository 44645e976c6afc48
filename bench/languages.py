"""Benchmark flatlib's synthetic languages against plain per-sentence reference implementations.

Everything downstream of a language (training corpora, optimal losses, Bayes accuracies) costs
one of two things per sentence, so those are what we measure, in sentences per second:

* sampling, ``lang.sample(n, seed)``: against the way such corpora are usually drawn, a
  recursive nltk-style sampler in plain Python for the PCFG (``random.Random.choices`` at every
  node) and a per-sentence numpy loop for the HMM (``Generator.choice`` at every step);
* exact single-mask MLM conditionals, ``lang.mlm_conditionals(corpus)``: against a textbook
  per-sentence inside-outside (PCFG) / forward-backward (HMM) in float64 numpy. The reference is
  checked to agree with flatlib to 1e-6 on every sentence it timed, so it is an honest baseline.

Languages: the paper-size PCFG (``PCFG.random(depth=5)``: 50+10 non-terminals, 200 words, up
to 32 words), the released grammar's shape (depth 4, up to 16 words) and the paper-size HMM (100
states, 200 words, length 16). flatlib runs on a realistic batch; the slow references run on
fewer sentences and are reported per sentence. Both run in the same process on the same core
count: torch gets ``--threads`` (default 1), numpy's BLAS is pinned to one thread because the
references are single-core loops by nature.

    python -m bench.languages            # full run (a few minutes on one core)
    python -m bench.languages --quick    # small sizes, a smoke test
"""

from __future__ import annotations

import os

# must happen before numpy loads its BLAS: the references are per-sentence loops on one core
for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse
import inspect
import json
import platform
import random
import time
from collections import defaultdict
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path
from typing import Callable, TypeVar

import numpy as np
import torch

from bench import common
from bench.common import cpu_model
from flatlib.languages import HMM, PCFG, Corpus

RESULTS_DIR = Path(__file__).resolve().parent / "results"
SAMPLE_TARGET = 50.0  # flatlib sampling must beat the plain sampler by this factor
MLM_TARGET = 20.0  # and exact conditionals the per-sentence reference by this one
AGREEMENT_TOL = 1e-6

T = TypeVar("T")


# ----------------------------------------------------------------------------- references
def pcfg_reference_sampler(grammar: PCFG) -> Callable[[int, int], list[list[int]]]:
    """A recursive sampler over ``grammar.rules`` as one would write it with nltk: pick a right
    side with ``rng.choices``, recurse left to right, words are leaves."""
    options: dict[str, tuple[list[tuple[str, ...]], list[float]]] = defaultdict(lambda: ([], []))
    for lhs, rhs, prob in grammar.rules:  # indexing by left side is setup, as in nltk's grammar
        options[lhs][0].append(rhs)
        options[lhs][1].append(prob)
    options = dict(options)
    word_id = {w: i for i, w in enumerate(grammar.vocab)}

    def sample(n: int, seed: int) -> list[list[int]]:
        rng = random.Random(seed)

        def expand(symbol: str, out: list[int]) -> None:
            if symbol not in options:
                out.append(word_id[symbol])
                return
            rhs_list, weights = options[symbol]
            for child in rng.choices(rhs_list, weights)[0]:
                expand(child, out)

        sentences = []
        for _ in range(n):
            words: list[int] = []
            expand(grammar.start, words)
            sentences.append(words)
        return sentences

    return sample


def hmm_reference_sample(hmm: HMM, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Sentence by sentence, step by step: ``Generator.choice`` for every state and word."""
    rng = np.random.default_rng(seed)
    initial, transition, emission = (m.numpy() for m in (hmm.initial, hmm.transition, hmm.emission))
    n_states, vocab_size = emission.shape
    states = np.empty((n, hmm.seq_len), dtype=np.int64)
    tokens = np.empty((n, hmm.seq_len), dtype=np.int64)
    for i in range(n):
        h = rng.choice(n_states, p=initial)
        for t in range(hmm.seq_len):
            if t > 0:
                h = rng.choice(n_states, p=transition[h])
            states[i, t] = h
            tokens[i, t] = rng.choice(vocab_size, p=emission[h])
    return tokens, states


def pcfg_reference_mlm(lexical: np.ndarray, closure: np.ndarray, binary: np.ndarray, start: int,
                       words: np.ndarray) -> np.ndarray:
    """``[L, V]`` p(x_t = w | x_-t) for one sentence: textbook inside-outside over dense tensors.

    Charts hold scores *after* the unary closure (``closure[A, B]`` = P(A =>* B) by unary chains),
    so a binary rule's parent is the pre-closure symbol. No rescaling: float64 holds the
    probability of a 32-word sentence of these grammars (~1e-70) with room to spare.
    """
    n_nt, length = lexical.shape[0], len(words)
    rules = binary.reshape(n_nt, n_nt * n_nt)  # [A, (B, C)]
    inside = np.zeros((length + 1, length + 1, n_nt))
    for t, w in enumerate(words):
        inside[t, t + 1] = closure @ lexical[:, w]
    for width in range(2, length + 1):
        for i in range(length - width + 1):
            j = i + width
            # sum over split points k of inside(B, i, k) inside(C, k, j), for every pair (B, C)
            pairs = inside[i, i + 1 : j].T @ inside[i + 1 : j, j]
            inside[i, j] = closure @ (rules @ pairs.ravel())

    outside = np.zeros_like(inside)
    outside[0, length, start] = 1.0
    leaf_outside = np.empty((length, n_nt))
    for width in range(length, 0, -1):
        for i in range(length - width + 1):
            j = i + width
            parent = closure.T @ outside[i, j]  # outside of the symbol a rule rewrites here
            if width == 1:
                leaf_outside[i] = parent
                continue
            per_pair = (parent @ rules).reshape(n_nt, n_nt)  # sum_A outside(A) P(A -> B C)
            outside[i, i + 1 : j] += inside[i + 1 : j, j] @ per_pair.T  # left children B
            outside[i + 1 : j, j] += inside[i, i + 1 : j] @ per_pair  # right children C
    scores = leaf_outside @ lexical
    return scores / scores.sum(axis=1, keepdims=True)


def hmm_reference_mlm(initial: np.ndarray, transition: np.ndarray, emission: np.ndarray,
                      words: np.ndarray) -> np.ndarray:
    """``[L, V]`` p(x_t = w | x_-t) for one sentence: scaled forward-backward in numpy."""
    length, n_states = len(words), len(initial)
    emit = emission[:, words].T  # [L, H]
    predictive = np.empty((length, n_states))  # p(h_t | x_<t)
    prior = initial
    for t in range(length):
        predictive[t] = prior
        joint = prior * emit[t]
        prior = (joint / joint.sum()) @ transition
    beta = np.empty((length, n_states))  # proportional to p(x_>t | h_t)
    beta[-1] = 1.0 / n_states
    for t in range(length - 2, -1, -1):
        message = transition @ (emit[t + 1] * beta[t + 1])
        beta[t] = message / message.sum()
    scores = (predictive * beta) @ emission
    return scores / scores.sum(axis=1, keepdims=True)


# ----------------------------------------------------------------------------- timing
def timed(fn: Callable[[], T], repeats: int = 3, warmup: Callable[[], object] | None = None
          ) -> tuple[float, T]:
    """Best wall time over ``repeats`` calls, after one warm-up call (``warmup`` or ``fn`` itself:
    the first call pays for allocator growth and lazy initialisation). The best run is the one
    least disturbed by the rest of the machine."""
    (warmup or fn)()
    best, result = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - start)
    return best, result


@dataclass
class Row:
    language: str
    operation: str
    flatlib_per_s: float
    reference_per_s: float
    target: float
    flatlib_sentences: int
    reference_sentences: int
    max_abs_diff: float | None = None  # reference vs flatlib conditionals, where compared

    @property
    def speedup(self) -> float:
        return self.flatlib_per_s / self.reference_per_s

    @property
    def met(self) -> bool:
        return self.speedup >= self.target


# ----------------------------------------------------------------------------- benchmarks
def bench_pcfg(name: str, grammar: PCFG, sizes: dict[str, int]) -> list[Row]:
    reference_sampler = pcfg_reference_sampler(grammar)
    n, n_ref = sizes["sample"], sizes["sample_ref"]
    flat_s, _ = timed(lambda: grammar.sample(n, seed=1))
    ref_s, _ = timed(lambda: reference_sampler(n_ref, 1))
    rows = [Row(name, "sample", n / flat_s, n_ref / ref_s, SAMPLE_TARGET, n, n_ref)]
    if "trees" in inspect.signature(grammar.sample).parameters:
        # the reference keeps no tree either: this is the like-for-like comparison
        flat_s, _ = timed(lambda: grammar.sample(n, seed=1, trees=False))
        rows.append(Row(name, "sample(trees=False)", n / flat_s, n_ref / ref_s, SAMPLE_TARGET, n, n_ref))

    corpus = grammar.sample(sizes["pcfg_mlm"], seed=2)
    n_ref = sizes["pcfg_mlm_ref"]
    # the full batch takes seconds: warm up on a slice, time once or twice
    flat_s, flat_probs = timed(lambda: grammar.mlm_conditionals(corpus), repeats=sizes["mlm_repeats"],
                               warmup=lambda: grammar.mlm_conditionals(corpus[:8]))
    lexical, closure, binary = (m.numpy() for m in (grammar.lexical, grammar.unary_closure, grammar.binary))
    start = grammar.nonterminals.index(grammar.start)
    sentences = [row[:k].numpy() for row, k in zip(corpus.tokens[:n_ref], corpus.lengths[:n_ref].tolist())]
    ref_s, ref_probs = timed(
        lambda: [pcfg_reference_mlm(lexical, closure, binary, start, s) for s in sentences], repeats=2,
        warmup=lambda: pcfg_reference_mlm(lexical, closure, binary, start, sentences[0]))
    diff = max_abs_diff(flat_probs, ref_probs, corpus)
    rows.append(Row(name, "mlm_conditionals", len(corpus) / flat_s, n_ref / ref_s, MLM_TARGET,
                    len(corpus), n_ref, diff))
    return rows


def bench_hmm(name: str, hmm: HMM, sizes: dict[str, int]) -> list[Row]:
    n, n_ref = sizes["sample"], sizes["hmm_sample_ref"]
    flat_s, _ = timed(lambda: hmm.sample(n, seed=1))
    ref_s, _ = timed(lambda: hmm_reference_sample(hmm, n_ref, 1), repeats=1)
    rows = [Row(name, "sample", n / flat_s, n_ref / ref_s, SAMPLE_TARGET, n, n_ref)]

    corpus = hmm.sample(sizes["hmm_mlm"], seed=2)
    n_ref = sizes["hmm_mlm_ref"]
    flat_s, flat_probs = timed(lambda: hmm.mlm_conditionals(corpus))
    initial, transition, emission = (m.numpy() for m in (hmm.initial, hmm.transition, hmm.emission))
    sentences = [row.numpy() for row in corpus.tokens[:n_ref]]
    ref_s, ref_probs = timed(
        lambda: [hmm_reference_mlm(initial, transition, emission, s) for s in sentences])
    diff = max_abs_diff(flat_probs, ref_probs, corpus)
    rows.append(Row(name, "mlm_conditionals", len(corpus) / flat_s, n_ref / ref_s, MLM_TARGET,
                    len(corpus), n_ref, diff))
    return rows


def max_abs_diff(flat_probs: torch.Tensor, ref_probs: list[np.ndarray], corpus: Corpus) -> float:
    """Largest disagreement over the real positions of the sentences the reference timed; a
    reference that disagrees is no baseline, so this fails loudly."""
    diff = max(float(np.abs(flat_probs[i, : len(p)].numpy() - p).max()) for i, p in enumerate(ref_probs))
    assert all(len(p) == int(corpus.lengths[i]) for i, p in enumerate(ref_probs))
    assert diff < AGREEMENT_TOL, f"reference and flatlib conditionals differ by {diff:.3g}"
    return diff


# ----------------------------------------------------------------------------- report
def print_table(rows: list[Row]) -> None:
    header = ("language", "operation", "flatlib sent/s", "reference sent/s", "speed-up", "target", "met?")
    common.print_table(header, [
        (r.language, r.operation, f"{r.flatlib_per_s:,.1f}", f"{r.reference_per_s:,.1f}",
         f"{r.speedup:,.1f}x", f">={r.target:g}x", "yes" if r.met else "NO")
        for r in rows
    ], text_columns=2)
    for r in rows:
        if r.max_abs_diff is not None:
            print(f"{r.language} {r.operation}: reference agrees with flatlib to {r.max_abs_diff:.2e} "
                  f"(max abs diff over {r.reference_sentences} sentences)")



def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=1, help="torch threads for flatlib (default 1)")
    parser.add_argument("--quick", action="store_true", help="small sizes: a smoke test, not numbers")
    parser.add_argument("--out", type=Path, default=None,
                        help="JSON path (default: bench/results/languages.json, or languages_quick.json "
                             "with --quick, so a smoke test never overwrites real numbers)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    if args.quick:
        sizes = dict(sample=1000, sample_ref=200, hmm_sample_ref=50, hmm_mlm=200, hmm_mlm_ref=20,
                     pcfg_mlm=32, pcfg_mlm_ref=4, mlm_repeats=1)
    else:
        sizes = dict(sample=10_000, sample_ref=5_000, hmm_sample_ref=1_000, hmm_mlm=2_000, hmm_mlm_ref=500,
                     pcfg_mlm=256, pcfg_mlm_ref=50, mlm_repeats=2)
    languages = [
        ("PCFG depth 5 (paper, <=32 words)", PCFG.random(seed=0, depth=5)),
        ("PCFG depth 4 (released, <=16 words)", PCFG.random(seed=0)),
        ("HMM 100 states (paper)", HMM.random(n_states=100, vocab_size=200, seq_len=16, seed=0)),
    ]
    rows: list[Row] = []
    for name, lang in languages:
        print(f"{name}: {lang!r}", flush=True)
        start = time.perf_counter()
        rows += bench_pcfg(name, lang, sizes) if isinstance(lang, PCFG) else bench_hmm(name, lang, sizes)
        print(f"  done in {time.perf_counter() - start:.1f}s", flush=True)
    print()
    print_table(rows)

    out = args.out or RESULTS_DIR / ("languages_quick.json" if args.quick else "languages.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    report = {
        "date": datetime.now().astimezone().isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
        "threads": args.threads,
        "quick": args.quick,
        "machine": {"processor": platform.processor() or cpu_model(), "cpu_count": os.cpu_count(),
                    "platform": platform.platform(),
                    "load_average": os.getloadavg()},  # other work on the machine skews timings
        "sizes": sizes,
        "results": [asdict(r) | {"speedup": r.speedup, "met": r.met} for r in rows],
    }
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
