"""Probabilistic context-free grammars: vectorised sampling and exact conditionals by inside-outside.

Rules are read in the authors' format, one a line: ``LHS RHS... probability``. A symbol is a
non-terminal iff it is the left side of some rule; every other symbol is a word. Internally every
rule is one of: ``A -> w`` (lexical), ``A -> B`` (unary) or ``A -> B C`` (binary); longer right sides
and words inside them are binarised with fresh internal symbols (``<...>``) that never appear in
task labels. Grammars must be acyclic (no non-terminal can derive itself), so sentences have a
bounded length ``max_len`` and the inside algorithm is exact and finite.

Exact single-mask conditionals use the fact that the outside algorithm is back-propagation through
the inside algorithm (Eisner, 2016): the sentence probability Z is linear in the "leaf" vector
``l_t[A] = P(A -> x_t)`` of each position, so ``dZ/dl_t[A]`` is the outside score of ``A`` over
``[t, t+1)``, which does not depend on ``x_t``, and ``p(x_t = w | x_-t)`` is proportional to
``sum_A dZ/dl_t[A] P(A -> w)``. One batched inside pass plus one backward pass gives every
position of every sentence. Inside scores are kept as (vector, log-scale) per span so that long
sentences never underflow.
"""

from __future__ import annotations

import math
import numbers
import unicodedata
import warnings
from collections import defaultdict
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from torch import Tensor

from flatlib.checks import check_int, check_seed, is_real
from flatlib.languages.base import (
    PAD,
    Corpus,
    LanguageBase,
    LossEstimate,
    RowSampler,
    loss_estimate,
    unknown_task,
)

Rule = tuple[str, tuple[str, ...], float]

# The released code labels tasks B and C by the most likely non-terminal of the first 4 and 2 words;
# the paper describes spans of 16 and 8 tokens (with sentences of up to 32). None = whole sentence.
RELEASED_TASK_SPANS: dict[str, int | None] = {"A": None, "B": 4, "C": 2}
PAPER_TASK_SPANS: dict[str, int | None] = {"A": None, "B": 16, "C": 8}


def _not_a_rule(line: str) -> bool:
    """One line with fewer than three fields, the last not a number: a path, not a bad rule."""
    fields = line.split()
    try:
        float(fields[-1] if fields else 0)
    except ValueError:
        return len(fields) < 3
    return False


BOM = "\ufeff"  # a UTF-8 byte-order mark, as Windows editors write at the start of a file


def parse_rules(path_or_text: str | Path) -> list[Rule]:
    """Rules from a file path or from the text itself, with the file and line number in every error. A
    string is a path if it is an existing file, or one line that cannot be a rule ("LHS RHS...
    probability": three fields at least, the last a number); a path that does not exist is a
    FileNotFoundError naming it (a missing "grammar.txt" was parsed as rule text). Files are read as
    UTF-8.

    Invisible characters: a byte-order mark at the very start of the text is removed, with a
    UserWarning naming the file (it would otherwise become part of the start symbol, ``'\\ufeffS'``);
    any other non-printing character in a field (zero-width spaces and joiners, a BOM elsewhere, soft
    hyphens, control characters: ``str.isprintable`` is false) is refused with the file, line and
    character, since ``'NP\\u200b'`` would silently be a new non-terminal. Whitespace of any kind
    separates the fields, as ``str.split`` does."""
    if isinstance(path_or_text, str) and "\n" not in path_or_text and (
        Path(path_or_text).is_file() or _not_a_rule(path_or_text)
    ):
        path_or_text = Path(path_or_text)
    if isinstance(path_or_text, Path):
        if not path_or_text.is_file():
            raise FileNotFoundError(f"rules: no such file: {str(path_or_text)!r}")
        where = f"rules file {str(path_or_text)!r}"
        try:
            text = path_or_text.read_text(encoding="utf-8")
        except UnicodeDecodeError as error:
            raise ValueError(f"{where}: not UTF-8 text ({error}); save it as UTF-8") from None
    elif isinstance(path_or_text, str):
        where, text = "rules", path_or_text
    else:
        raise ValueError(f"rules: expected a path or rule text, got {type(path_or_text).__name__}")
    if text.startswith(BOM):
        warnings.warn(f"{where}: starts with a UTF-8 byte-order mark (U+FEFF), removed before parsing; save "
                      "the file as UTF-8 without a BOM to silence this", UserWarning, stacklevel=3)
        text = text[len(BOM):]
    rules: list[Rule] = []
    for number, line in enumerate(text.splitlines(), start=1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        fields = line.split()
        for field in fields:
            _check_visible(field, f"{where} line {number}")
        if len(fields) < 3:
            raise ValueError(f"{where} line {number}: expected 'LHS RHS... probability', got {line!r}")
        try:
            prob = float(fields[-1])
        except ValueError:
            raise ValueError(f"{where} line {number}: probability {fields[-1]!r} is not a number") from None
        if not (math.isfinite(prob) and 0 <= prob <= 1):
            raise ValueError(f"{where} line {number}: probability {prob} of {fields[0]} is not in [0, 1]")
        rules.append((fields[0], tuple(fields[1:-1]), prob))
    if not rules:
        raise ValueError(f"{where}: no rules found (empty rule file?)")
    return rules


def _invisible(symbol: str) -> str | None:
    """A description of the first non-printing character of ``symbol`` (None if there is none)."""
    for position, char in enumerate(symbol, start=1):
        if not char.isprintable():
            name = unicodedata.name(char, "")
            return f"U+{ord(char):04X}{f' ({name})' if name else ''} at character {position}"
    return None


def _check_visible(symbol: str, where: str) -> None:
    invisible = _invisible(symbol)
    if invisible is not None:
        raise ValueError(f"{where}: {symbol!r} contains an invisible or non-printing character, {invisible}; "
                         "delete it (it would make a different symbol that looks the same)")


def _check_symbol(symbol: str) -> None:
    """Binarisation names its internal symbols ``<word>`` and ``<LHS|tail words>``: a user symbol
    must not be spellable as one (a user's ``<a>`` would merge with the pre-terminal of the word
    ``a``), so ``<...`` and whitespace are refused."""
    if (not isinstance(symbol, str) or not symbol or symbol.startswith("<")
            or any(c.isspace() for c in symbol)):
        raise ValueError(f"rules: symbol {symbol!r} is not allowed (symbols are non-empty, without "
                         "whitespace, and must not start with '<', which marks the grammar's internal "
                         "symbols)")
    invisible = _invisible(symbol)
    if invisible is not None:  # 'NP\u200b' would be a second NP that prints the same
        raise ValueError(f"rules: symbol {symbol!r} is not allowed: it contains an invisible or non-printing "
                         f"character, {invisible}")


class PCFG(LanguageBase):
    """A probabilistic context-free grammar (acyclic) as a language.

    Args:
        rules: ``(lhs, rhs, probability)`` triples; duplicates are summed (as the authors' code does).
        start: the start symbol (default: the left side of the first rule).
        task_spans: task name -> length of the sentence prefix whose most likely non-terminal is the
            label (``None``: the whole sentence). Default: the released code's ``A``/``B``/``C`` =
            whole sentence / 4 words / 2 words, keeping those that fit in ``max_len`` (the paper reports
            32/16/8-token spans: ``PAPER_TASK_SPANS``).
        renormalize: if True, rescale the rules of every left side whose probabilities sum to
            within ``RENORMALIZE_TOLERANCE`` (0.01, nltk's tolerance) of 1; otherwise they must sum
            to 1 within 1e-6. The authors' released grammar needs this: four of its pre-terminals
            sum to 0.99977-0.99998 (nltk accepted them, and its sampler normalises the weights, so
            the renormalised grammar is the distribution their sentences were drawn from).
    """

    RENORMALIZE_TOLERANCE = 1e-2
    # the binary rules are a dense [N, N, N] float64 tensor over the N non-terminals (binarisation's
    # included): 2 GB is N = 630; raise this on a machine with the memory for larger grammars
    MAX_RULE_TENSOR_BYTES = 2 * 10**9

    def __init__(self, rules: list[Rule], start: str | None = None,
                 task_spans: dict[str, int | None] | None = None, renormalize: bool = False) -> None:
        if not rules:
            raise ValueError("rules: a grammar needs at least one rule")
        merged: dict[tuple[str, tuple[str, ...]], float] = defaultdict(float)
        for lhs, rhs, prob in rules:
            if not rhs:
                raise ValueError(f"rules: {lhs} has a rule with an empty right side")
            # each rule on its own: negatives could sum to 1 with the others, and NaN fails no sum check
            if not (isinstance(prob, numbers.Real) and not isinstance(prob, bool) and math.isfinite(prob)
                    and 0 <= prob <= 1):
                raise ValueError(f"rules: probability {prob!r} of {lhs} -> {' '.join(rhs)} is not in [0, 1]")
            for symbol in (lhs, *rhs):
                _check_symbol(symbol)
            merged[(lhs, tuple(rhs))] += float(prob)
        lhs_order = list(dict.fromkeys(lhs for lhs, _ in merged))
        start = lhs_order[0] if start is None else start
        if start not in lhs_order:
            raise ValueError(f"start: unknown symbol {start!r} (it has no rules)")
        self.start = start
        if renormalize:
            merged = self._renormalized(merged)
        self._check_sums(merged, lhs_order)
        self.rules = [(lhs, rhs, prob) for (lhs, rhs), prob in merged.items()]
        nonterminals = set(lhs_order)
        self.vocab: list[str] = sorted({s for _, rhs in merged for s in rhs if s not in nonterminals})
        if not self.vocab:
            raise ValueError("rules: the grammar has no words (every symbol has rules)")
        binarised = self._binarise(merged, nonterminals)
        self.nonterminals: list[str] = list(dict.fromkeys([start] + lhs_order + [l for l, _, _ in binarised]))
        self._build_tensors(binarised)
        if task_spans is None:  # the released spans that fit in this grammar's sentences
            task_spans = {t: s for t, s in RELEASED_TASK_SPANS.items() if s is None or s <= self.max_len}
        self.task_spans = dict(task_spans)
        for task, span in self.task_spans.items():
            if span is not None:
                check_int(f"task_spans[{task!r}]", span)
                if span > self.max_len:
                    raise ValueError(f"task_spans: span of task {task!r} must be in [1, {self.max_len}], got "
                                     f"{span!r}")

    # ---------------------------------------------------------------- construction
    @classmethod
    def from_rules(cls, path_or_text: str | Path, start: str | None = None,
                   task_spans: dict[str, int | None] | None = None,
                   renormalize: bool = False) -> "PCFG":
        """Read a grammar in the authors' format (a path, or the rule text itself)."""
        return cls(parse_rules(path_or_text), start=start, task_spans=task_spans,
                   renormalize=renormalize)

    @classmethod
    def _renormalized(cls, merged: dict) -> dict:
        totals: dict[str, float] = defaultdict(float)
        for (lhs, _), prob in merged.items():
            totals[lhs] += prob
        out = {}
        for (lhs, rhs), prob in merged.items():
            fix = abs(totals[lhs] - 1) <= cls.RENORMALIZE_TOLERANCE and totals[lhs] > 0
            out[(lhs, rhs)] = prob / totals[lhs] if fix else prob
        return out

    @staticmethod
    def _check_sums(merged: dict, lhs_order: list[str], tol: float = 1e-6) -> None:
        totals: dict[str, float] = defaultdict(float)
        for (lhs, _), prob in merged.items():
            totals[lhs] += prob
        for lhs in lhs_order:
            if abs(totals[lhs] - 1) > tol:
                raise ValueError(
                    f"rules: probabilities of {lhs} sum to {totals[lhs]:.8g}, not 1 (tolerance {tol})"
                )

    @staticmethod
    def _binarise(merged: dict, nonterminals: set[str]) -> list[Rule]:
        """Rewrite every rule as lexical / unary / binary over (possibly fresh) non-terminals."""
        out: list[Rule] = []
        fresh_words: set[str] = set()

        def as_symbol(s: str) -> str:
            if s in nonterminals:
                return s
            fresh_words.add(s)
            return f"<{s}>"

        for (lhs, rhs), prob in merged.items():
            if len(rhs) == 1:
                out.append((lhs, rhs, prob))
                continue
            symbols = [as_symbol(s) for s in rhs]
            parent = lhs
            for i in range(len(symbols) - 2):
                rest = f"<{lhs}|{' '.join(rhs[i + 1:])}>"
                out.append((parent, (symbols[i], rest), prob if parent == lhs else 1.0))
                parent = rest
            out.append((parent, tuple(symbols[-2:]), prob if parent == lhs else 1.0))
        out.extend((f"<{w}>", (w,), 1.0) for w in sorted(fresh_words))
        # a chain shared by two rules with the same tail is emitted twice with prob 1: keep one
        return list({(l, r): (l, r, p) for l, r, p in out}.values())

    def _build_tensors(self, rules: list[Rule]) -> None:
        nt_index = {a: i for i, a in enumerate(self.nonterminals)}
        word_index = {w: i for i, w in enumerate(self.vocab)}
        n, v = len(self.nonterminals), len(self.vocab)
        if 8 * n**3 > self.MAX_RULE_TENSOR_BYTES:  # refuse before allocating, with the estimate
            raise ValueError(f"rules: {n} non-terminals (after binarisation) need a dense binary-rule tensor "
                             f"of {8 * n**3 / 1e9:.1f} GB; PCFG.MAX_RULE_TENSOR_BYTES allows "
                             f"{self.MAX_RULE_TENSOR_BYTES / 1e9:.1f} GB "
                             f"(about {round((self.MAX_RULE_TENSOR_BYTES / 8) ** (1 / 3))} non-terminals)")
        self.n_nonterminals, self.vocab_size = n, v
        lexical = torch.zeros(n, v, dtype=torch.float64)
        unary = torch.zeros(n, n, dtype=torch.float64)
        binary = torch.zeros(n, n, n, dtype=torch.float64)
        children: dict[int, set[int]] = defaultdict(set)
        per_lhs: dict[int, list[tuple[float, int, int]]] = defaultdict(list)
        for lhs, rhs, prob in rules:
            a = nt_index[lhs]
            if len(rhs) == 1 and rhs[0] in word_index:
                lexical[a, word_index[rhs[0]]] += prob
                per_lhs[a].append((prob, word_index[rhs[0]], PAD))
            elif len(rhs) == 1:
                b = nt_index[rhs[0]]
                unary[a, b] += prob
                children[a].add(b)
                per_lhs[a].append((prob, v + b, PAD))
            else:
                b, c = nt_index[rhs[0]], nt_index[rhs[1]]
                binary[a, b, c] += prob
                children[a].update((b, c))
                per_lhs[a].append((prob, v + b, v + c))
        self.lexical, self.unary, self.binary = lexical, unary, binary
        self._topological = self._topological_order(children)
        # unary closure U* = sum_k U^k (finite: unary chains are acyclic)
        closure, power = torch.eye(n, dtype=torch.float64), unary.clone()
        while power.abs().sum() > 0:
            closure, power = closure + power, power @ unary
        self.unary_closure = closure
        # only the (B, C) pairs some rule uses enter the inside recursion
        self._pair_blocks, self._pair_rules = self._blocks_of_pairs(binary)
        # sampling tables: per non-terminal, its rules padded to the longest list
        width = max(len(r) for r in per_lhs.values())
        self._rule_probs = torch.zeros(n, width, dtype=torch.float64)
        self._rule_rhs = torch.full((n, width, 2), PAD, dtype=torch.long)
        for a, entries in per_lhs.items():
            for j, (prob, first, second) in enumerate(entries):
                self._rule_probs[a, j] = prob
                self._rule_rhs[a, j] = torch.tensor([first, second])
        self._rule_sampler = RowSampler(self._rule_probs)
        self._rule_first = self._rule_rhs[..., 0].flatten()  # by flat rule index lhs * width + j
        self._rule_second = self._rule_rhs[..., 1].flatten()
        self._length_bounds()

    @staticmethod
    def _blocks_of_pairs(binary: Tensor) -> tuple[list[tuple[Tensor, Tensor, Tensor]], Tensor]:
        """The (left child, right child) pairs some binary rule uses, grouped into dense blocks.

        Pairs are the edges of a bipartite graph between left and right children; each connected
        component is a block ``rows x cols`` whose products one small matrix multiplication gives.
        In the paper's level-structured grammars a block is one level (10 x 10 of 3600 possible
        pairs), so this skips ~90% of the work of a dense product. Returns the blocks as
        (rows, cols, used: flat indices into rows x cols) and the rule matrix [P, N] mapping the
        pairs, in block order, to parents.
        """
        n = binary.shape[0]
        used = binary.abs().sum(dim=0) > 0  # [N, N]: (B, C) used by some rule
        component = list(range(2 * n))  # union-find over left nodes 0..n-1 and right nodes n..2n-1

        def root(x: int) -> int:
            while component[x] != x:
                component[x] = component[component[x]]
                x = component[x]
            return x

        for b, c in used.nonzero().tolist():
            component[root(b)] = root(n + c)
        blocks, columns = [], []
        for r in sorted({root(b) for b, _ in used.nonzero().tolist()}):
            rows = torch.tensor([b for b in range(n) if used[b].any() and root(b) == r])
            cols = torch.tensor([c for c in range(n) if used[:, c].any() and root(n + c) == r])
            block_used = used[rows][:, cols].flatten().nonzero().squeeze(1)
            blocks.append((rows, cols, block_used))
            pair_b = rows[block_used // len(cols)]
            pair_c = cols[block_used % len(cols)]
            columns.append(binary[:, pair_b, pair_c].T)  # [P_block, N]
        rules = torch.cat(columns) if columns else torch.zeros(0, n, dtype=binary.dtype)
        return blocks, rules.contiguous()

    def _topological_order(self, children: dict[int, set[int]]) -> list[int]:
        """Non-terminals, children before parents; ValueError naming a cycle if there is one."""
        state: dict[int, int] = {}  # 1 = on the DFS stack, 2 = done
        order: list[int] = []
        for root in range(len(self.nonterminals)):
            if root in state:
                continue
            stack = [(root, iter(sorted(children[root])))]
            state[root] = 1
            while stack:
                node, it = stack[-1]
                child = next(it, None)
                if child is None:
                    state[node] = 2
                    order.append(node)
                    stack.pop()
                elif state.get(child) == 1:
                    path = [self.nonterminals[s] for s, _ in stack]
                    cycle = path[path.index(self.nonterminals[child]):] + [self.nonterminals[child]]
                    raise ValueError(
                        f"rules: derivation cycle {' -> '.join(cycle)}: the language would be "
                        "infinite; flatlib supports acyclic grammars only"
                    )
                elif child not in state:
                    state[child] = 1
                    stack.append((child, iter(sorted(children[child]))))
        return order

    def _length_bounds(self) -> None:
        """The possible yield lengths and the largest derivation tree of every non-terminal."""
        n, v = self.n_nonterminals, self.vocab_size
        yields: list[set[int]] = [set() for _ in range(n)]
        nodes = [0] * n
        for a in self._topological:  # children first
            for prob, (first, second) in zip(self._rule_probs[a].tolist(), self._rule_rhs[a].tolist()):
                if prob <= 0:
                    continue
                parts = [s for s in (first, second) if s != PAD]
                lengths, size = {0}, 1
                for s in parts:
                    lengths = {x + y for x in lengths for y in ({1} if s < v else yields[s - v])}
                    size += 0 if s < v else nodes[s - v]
                yields[a] |= lengths
                nodes[a] = max(nodes[a], size)
        self.yield_lengths = [frozenset(y) for y in yields]  # by index into nonterminals
        s = self.nonterminals.index(self.start)
        self.min_len, self.max_len, self._max_nodes = min(yields[s]), max(yields[s]), nodes[s]

    @classmethod
    def random(cls, seed: int = 0, depth: int = 4, n_types: int = 9, n_per_level: int = 10,
               n_binary_rules: int = 20, vocab_size: int = 200, words_per_preterminal: int = 100,
               shortcut_prob: tuple[float, float] = (0.05, 0.45), rule_concentration: float = 1.0,
               word_concentration: float = 0.5,
               task_spans: dict[str, int | None] | None = None) -> "PCFG":
        """A random grammar of the paper's shape (the defaults are the released grammar's sizes).

        ``S -> S1..S{n_types}``; each ``Si -> A1_a A1_b``; levels ``A1..A{depth}`` of
        ``n_per_level`` non-terminals; ``Ak_j`` (k < depth) has ``n_binary_rules`` binary rules into
        level k+1 (probabilities ~ Dirichlet(rule_concentration)) plus one "shortcut" rule emitting a
        word with probability ~ U(shortcut_prob); each pre-terminal ``A{depth}_j`` emits
        ``words_per_preterminal`` words of a shared vocabulary of ``vocab_size`` (probabilities ~
        Dirichlet(word_concentration)); words are shared between pre-terminals, which is the
        ambiguity. Sentences have at most ``2**depth`` words: depth 4 gives 16, depth 5 gives 32.
        """
        checks = {"depth": depth, "n_types": n_types, "n_per_level": n_per_level,
                  "n_binary_rules": n_binary_rules, "vocab_size": vocab_size,
                  "words_per_preterminal": words_per_preterminal}
        for name, value in checks.items():
            check_int(name, value)
        if words_per_preterminal > vocab_size:
            raise ValueError(f"words_per_preterminal: {words_per_preterminal} > vocab_size {vocab_size}")
        if n_binary_rules > n_per_level**2:
            raise ValueError(f"n_binary_rules: {n_binary_rules} > n_per_level**2 = {n_per_level**2}")
        if not (isinstance(shortcut_prob, (tuple, list)) and len(shortcut_prob) == 2
                and all(is_real(p) for p in shortcut_prob) and 0 <= shortcut_prob[0] <= shortcut_prob[1] < 1):
            raise ValueError(f"shortcut_prob: expected 0 <= low <= high < 1, got {shortcut_prob!r}")
        for name, value in (("rule_concentration", rule_concentration),
                            ("word_concentration", word_concentration)):
            # NaN > 0 is False, so NaN passed the old `<= 0` check; a bool is not a number
            if not (is_real(value) and value > 0):
                raise ValueError(f"{name}: expected a finite number > 0, got {value!r}")
        check_seed("seed", seed)
        rng = np.random.default_rng(seed)
        width = len(str(vocab_size - 1))
        words = [f"w{i:0{width}d}" for i in range(vocab_size)]
        rules: list[Rule] = []
        type_probs = rng.dirichlet(np.ones(n_types))
        for i in range(n_types):
            rules.append(("S", (f"S{i + 1}",), float(type_probs[i])))
            a, b = rng.integers(n_per_level, size=2)
            rules.append((f"S{i + 1}", (f"A1_{a}", f"A1_{b}"), 1.0))
        for level in range(1, depth):
            for j in range(n_per_level):
                shortcut = rng.uniform(*shortcut_prob)
                pairs = rng.choice(n_per_level**2, size=n_binary_rules, replace=False)
                probs = rng.dirichlet(np.full(n_binary_rules, rule_concentration)) * (1 - shortcut)
                for pair, prob in zip(pairs, probs):
                    b, c = divmod(int(pair), n_per_level)
                    rules.append((f"A{level}_{j}", (f"A{level + 1}_{b}", f"A{level + 1}_{c}"), float(prob)))
                rules.append((f"A{level}_{j}", (words[rng.integers(vocab_size)],), float(shortcut)))
        # pre-terminal word sets that together cover the whole vocabulary
        word_sets = [set(rng.choice(vocab_size, size=words_per_preterminal, replace=False).tolist())
                     for _ in range(n_per_level)]
        for w in sorted(set(range(vocab_size)) - set().union(*word_sets)):
            word_sets[int(rng.integers(n_per_level))].add(w)
        for j, word_set in enumerate(word_sets):
            ids = sorted(word_set)
            probs = rng.dirichlet(np.full(len(ids), word_concentration))
            rules.extend((f"A{depth}_{j}", (words[w],), float(p)) for w, p in zip(ids, probs))
        return cls(rules, start="S", task_spans=task_spans)

    def __repr__(self) -> str:
        return (f"PCFG({len(self.user_nonterminals)} non-terminals, {self.vocab_size} words, "
                f"sentences of {self.min_len}-{self.max_len} words)")

    @property
    def user_nonterminals(self) -> list[str]:
        """The grammar's own non-terminals (without binarisation's internal ``<...>`` symbols)."""
        return [a for a in self.nonterminals if not a.startswith("<")]

    def encode(self, sentences: list[str]) -> Corpus:
        """Sentences as text (words separated by spaces) -> Corpus; ValueError on unknown words."""
        index = {w: i for i, w in enumerate(self.vocab)}
        tokens = torch.full((len(sentences), self.max_len), PAD, dtype=torch.long)
        lengths = torch.zeros(len(sentences), dtype=torch.long)
        for i, sentence in enumerate(sentences):
            words = sentence.split()
            if not 1 <= len(words) <= self.max_len:
                raise ValueError(f"sentences[{i}]: length {len(words)} outside [1, {self.max_len}]")
            for t, w in enumerate(words):
                if w not in index:
                    raise ValueError(f"sentences[{i}]: unknown word {w!r}")
                tokens[i, t] = index[w]
            lengths[i] = len(words)
        return Corpus(tokens, lengths)

    def decode(self, corpus: Corpus) -> list[str]:
        return [" ".join(self.vocab[w] for w in row[:n].tolist())
                for row, n in zip(corpus.tokens, corpus.lengths.tolist())]

    # ---------------------------------------------------------------- sampling
    def sample(self, n: int, seed: int = 0, trees: bool = True) -> Corpus:
        """``n`` sentences, expanded top-down for all sentences at once (one step per tree level).

        With ``trees`` (the default), the latents hold the derivation tree as node tables
        ``[n, M]`` (``PAD`` beyond a tree's nodes): ``node_symbol`` (index into ``nonterminals``),
        ``node_parent`` (node index, -1 for the root), ``node_start`` / ``node_end`` (the span of
        words it derives) and ``node_depth``. ``trees=False`` skips them (about 2x faster: for
        training on fresh samples; the tasks' labels come from the words alone).
        """
        check_int("n", n, low=0)
        generator = torch.Generator().manual_seed(seed)
        # chunks of ~1k sentences keep the frontier in cache (2-3x faster than one big batch)
        chunks = [self._sample_chunk(min(self.sample_chunk, n - i), generator, trees)
                  for i in range(0, n, self.sample_chunk)] or [self._sample_chunk(0, generator, trees)]
        return Corpus(torch.cat([c.tokens for c in chunks]), torch.cat([c.lengths for c in chunks]),
                      {k: torch.cat([c.latents[k] for c in chunks]) for k in chunks[0].latents})

    sample_chunk = 1024

    def _sample_chunk(self, n: int, generator: torch.Generator, trees: bool) -> Corpus:
        v, start = self.vocab_size, self.nonterminals.index(self.start)
        # The frontier, left to right. Every cell becomes two (its right child, or PAD) so that no
        # per-level re-layout is needed, and every step is a dense operation on the whole frontier
        # (cheaper than picking out the non-terminal cells); PAD cells are squeezed out at the end.
        symbols = torch.full((n, 1), v + start, dtype=torch.long)
        if trees:
            parents = torch.full((n, 1), -1, dtype=torch.long)  # node id of each cell's parent
            m = self._max_nodes
            node_symbol, node_parent, node_depth = (torch.full((n, m + 1), PAD, dtype=torch.long)
                                                    for _ in range(3))  # column m: a dump for non-nodes
            n_nodes = torch.zeros(n, 1, dtype=torch.long)
        depth = 0
        while True:
            expand = symbols >= v
            if not expand.any():
                break
            lhs = (symbols - v).clamp_(min=0)
            rule = self._rule_sampler.sample_dense(lhs, generator)
            second = torch.where(expand, self._rule_second[rule], PAD)
            if trees:  # each expanded cell is a node; its children point to it
                node_id = n_nodes + expand.T.to(torch.int32).cumsum(dim=0).T - 1
                target = torch.where(expand, node_id, m)
                node_symbol.scatter_(1, target, lhs)
                node_parent.scatter_(1, target, parents)
                node_depth.scatter_(1, target, torch.full_like(lhs, depth))
                n_nodes = n_nodes + expand.sum(dim=1, keepdim=True)
                parents = torch.where(expand, node_id, parents).repeat_interleave(2, dim=1)
            symbols = torch.stack([torch.where(expand, self._rule_first[rule], symbols), second], dim=-1)
            symbols = symbols.reshape(n, -1)
            depth += 1
        symbols, word_parents = self._squeeze(symbols, parents if trees else None)
        lengths = (symbols != PAD).sum(dim=1)
        tokens = torch.full((n, self.max_len), PAD, dtype=torch.long)
        tokens[:, : symbols.shape[1]] = symbols
        if not trees:
            return Corpus(tokens, lengths)
        node_symbol, node_parent, node_depth = (t[:, :m] for t in (node_symbol, node_parent, node_depth))
        node_start, node_end = self._node_spans(word_parents, lengths, node_parent, node_depth, depth)
        latents = {"node_symbol": node_symbol, "node_parent": node_parent, "node_start": node_start,
                   "node_end": node_end, "node_depth": node_depth}
        return Corpus(tokens, lengths, latents)

    def _squeeze(self, symbols: Tensor, parents: Tensor | None) -> tuple[Tensor, Tensor | None]:
        """Move every row's words to its start (keeping their order): [n, F] -> [n, max_len]."""
        keep = symbols != PAD
        # (a cumulative sum down the columns of the transpose is much faster than along rows)
        rank = keep.T.to(torch.int32).cumsum(dim=0).T - 1
        position = torch.where(keep, rank.long(), self.max_len)  # column max_len: a dump
        out = torch.full((len(symbols), self.max_len + 1), PAD, dtype=torch.long)
        out.scatter_(1, position, symbols)
        if parents is None:
            return out[:, : self.max_len], None
        out_parents = torch.full_like(out, -1).scatter_(1, position, parents)
        return out[:, : self.max_len], out_parents[:, : self.max_len]

    def _node_spans(self, word_parent: Tensor, lengths: Tensor, node_parent: Tensor,
                    node_depth: Tensor, max_depth: int) -> tuple[Tensor, Tensor]:
        """Span of every node: min / max over its words, pushed up the tree level by level."""
        n, m = node_parent.shape
        big = self.max_len + 1
        start = torch.full((n, m + 1), big, dtype=torch.long)  # column m collects padding
        end = torch.full((n, m + 1), -1, dtype=torch.long)
        positions = torch.arange(word_parent.shape[1]).expand(n, -1)
        real = positions < lengths[:, None]
        target = torch.where(real, word_parent, m)
        start.scatter_reduce_(1, target, torch.where(real, positions, big), "amin")
        end.scatter_reduce_(1, target, torch.where(real, positions + 1, -1), "amax")
        for d in range(max_depth - 1, 0, -1):
            at_depth = node_depth == d
            target = torch.where(at_depth, node_parent, m)
            start.scatter_reduce_(1, target, torch.where(at_depth, start[:, :m], big), "amin")
            end.scatter_reduce_(1, target, torch.where(at_depth, end[:, :m], -1), "amax")
        exists = node_depth != PAD
        return start[:, :m].where(exists, PAD), end[:, :m].where(exists, PAD)

    # ---------------------------------------------------------------- exact inference
    def _inside(self, leaves: Tensor) -> list[tuple[Tensor, Tensor]]:
        """The inside chart of a batch. ``leaves`` [B, L, N]: the leaf score of every non-terminal at
        every position (before unary closure). Returns, for every width ``w = 1..L`` (index w-1), a
        pair (vector [B, L-w+1, N], log-scale [B, L-w+1]) with
        ``inside(A, i, i+w) = vector[:, i, A] * exp(log_scale[:, i])``. Differentiable in ``leaves``.
        """
        closure_t = self.unary_closure.T
        chart: list[tuple[Tensor, Tensor]] = []

        def rescale(vec: Tensor, log_scale: Tensor) -> tuple[Tensor, Tensor]:
            top = vec.detach().amax(dim=-1, keepdim=True)
            top = torch.where(top > 0, top, torch.ones_like(top))  # impossible spans stay 0
            return vec / top, log_scale + torch.log(top.squeeze(-1))

        width1 = leaves @ closure_t
        chart.append(rescale(width1, torch.zeros(width1.shape[:2], dtype=width1.dtype)))
        length = leaves.shape[1]
        for w in range(2, length + 1):
            starts = length - w + 1
            lefts, rights, scales = [], [], []
            for k in range(1, w):  # left child has width k, right child width w - k
                left_vec, left_scale = chart[k - 1]
                right_vec, right_scale = chart[w - k - 1]
                lefts.append(left_vec[:, :starts])
                rights.append(right_vec[:, k : k + starts])
                scales.append(left_scale[:, :starts] + right_scale[:, k : k + starts])
            scale = torch.stack(scales, dim=-1)  # [B, S, K]
            top = scale.amax(dim=-1)
            weights = torch.exp(scale - top[..., None])
            left = torch.stack(lefts, dim=-1) * weights[:, :, None, :]  # [B, S, N, K]
            right = torch.stack(rights, dim=-2)  # [B, S, K, N]
            pairs = torch.cat([  # sum over splits of left x right, for the pairs rules use
                (left[:, :, rows] @ right[..., cols]).flatten(start_dim=2)[..., used]
                for rows, cols, used in self._pair_blocks
            ], dim=-1)
            vec = (pairs @ self._pair_rules) @ closure_t
            chart.append(rescale(vec, top))
        return chart

    def _leaves(self, corpus: Corpus) -> Tensor:
        return self.lexical.T[corpus.tokens.clamp(min=0)]  # [n, L, N]

    def _log_inside(self, chart, width: Tensor, symbol: int, start: int = 0) -> Tensor:
        """log inside(symbol, start, start + width[b]) for every b (width >= 1)."""
        vecs = torch.stack([vec[:, start, symbol] for vec, _ in chart], dim=1)  # [B, L]
        scales = torch.stack([scale[:, start] for _, scale in chart], dim=1)
        index = (width - 1)[:, None]
        return torch.log(vecs.gather(1, index).squeeze(1)) + scales.gather(1, index).squeeze(1)

    def _length_groups(self, corpus: Corpus) -> Iterator[tuple[Tensor, int]]:
        """(indices, length) of batches of sentences of one length: the chart of a batch is as wide
        as its longest sentence and costs O(length^3), so mixing lengths wastes most of the work."""
        for length in corpus.lengths.unique().tolist():
            indices = (corpus.lengths == length).nonzero().squeeze(1)
            for start in range(0, len(indices), self.chunk_size):
                yield indices[start : start + self.chunk_size], length

    def log_prob(self, corpus: Corpus) -> Tensor:
        """``[n]`` log p(x) of each sentence (inside algorithm)."""
        self.check_corpus(corpus)
        out = torch.empty(len(corpus), dtype=torch.float64)
        with torch.no_grad():
            for indices, length in self._length_groups(corpus):
                chart = self._inside(self._leaves(corpus[indices])[:, :length])
                out[indices] = self._log_inside(chart, corpus.lengths[indices],
                                                self.nonterminals.index(self.start))
        return out

    def mlm_conditionals(self, corpus: Corpus) -> Tensor:
        """``[n, L, V]`` float64: p(x_t = w | all other words), every position (inside-outside).

        Rows at padding positions are 0. Sentence lengths are part of the context: the masked
        sentence is known to have ``lengths[i]`` words.
        """
        self.check_corpus(corpus)
        out = torch.zeros(len(corpus), corpus.max_len, self.vocab_size, dtype=torch.float64)
        for indices, length in self._length_groups(corpus):
            chunk = corpus[indices]
            leaves = self._leaves(chunk)[:, :length].requires_grad_(True)
            chart = self._inside(leaves)
            log_z = self._log_inside(chart, chunk.lengths, self.nonterminals.index(self.start))
            impossible = (~torch.isfinite(log_z)).nonzero()
            if impossible.numel():
                raise ValueError(f"corpus: sentence {int(indices[impossible[0]])} has probability 0 "
                                 "under this grammar")
            (outside,) = torch.autograd.grad(log_z.sum(), leaves)  # [B, L, N] = outside / Z
            scores = outside @ self.lexical  # [B, L, V]; equals 1 at the true word
            norm = scores.sum(dim=-1, keepdim=True)
            out[indices, :length] = torch.where(norm > 0, scores / norm, 0.0)
        return out

    def _prefix_terms(self, corpus: Corpus) -> tuple[Tensor, Tensor]:
        """For every sentence and every prefix length k = 0..len: p(x_k = w, the sentence goes on |
        x_<k) (``[n, L+1, V]``) and p(the sentence ends after x_<k | x_<k) (``[n, L+1]``)."""
        v, big = self.vocab_size, self.max_len
        start = self.nonterminals.index(self.start)
        any_word = self.lexical.sum(dim=1)  # P(A -> some word): the leaf of an unobserved position
        n_rows = len(corpus)
        next_word = torch.zeros(n_rows, big + 1, v, dtype=torch.float64)
        end = torch.zeros(n_rows, big + 1, dtype=torch.float64)
        leaves_true = torch.cat(
            [self._leaves(corpus), any_word.expand(n_rows, big - corpus.max_len, -1)], dim=1
        )
        widths = torch.arange(1, big + 1)
        for k in range(0, int(corpus.lengths.max()) + 1):
            rows = (corpus.lengths >= k).nonzero().squeeze(1)
            if k == big:  # the longest possible prefix: the sentence must end
                end[rows, k] = 1.0
                continue
            known = torch.arange(big) < k  # words before k are observed, the rest are wildcards
            leaves = torch.where(known[None, :, None], leaves_true[rows], any_word)
            leaves.requires_grad_(True)
            chart = self._inside(leaves)
            # inside(start, 0, m) for every total length m: P(x_<k, then any m - k words)
            vecs = torch.stack([vec[:, 0, start] for vec, _ in chart], dim=1)  # [B, big]
            scales = torch.stack([scale[:, 0] for _, scale in chart], dim=1)  # no gradient
            goes_on = widths > k
            top = scales.masked_fill(~goes_on, -math.inf).amax(dim=1, keepdim=True)
            weights = torch.exp(scales.masked_fill(~goes_on, -math.inf) - top)
            total = (vecs * weights).sum(dim=1)
            possible = total > 0
            log_continue = torch.log(torch.where(possible, total, 1.0)) + top.squeeze(1)
            (outside,) = torch.autograd.grad(log_continue.masked_fill(~possible, 0.0).sum(), leaves)
            word_scores = (outside[:, k] @ self.lexical).detach()  # sums to 1 where possible
            log_continue = log_continue.detach().masked_fill(~possible, -math.inf)
            if k >= 1:
                log_end = torch.log(vecs[:, k - 1].detach()) + scales[:, k - 1]
            else:
                log_end = torch.full_like(log_continue, -math.inf)  # no empty sentences
            p_continue = torch.exp(log_continue - torch.logaddexp(log_continue, log_end))
            next_word[rows, k] = word_scores * p_continue[:, None]
            end[rows, k] = 1 - p_continue
        return next_word, end

    def causal_conditionals(self, corpus: Corpus, include_eos: bool = False) -> Tensor:
        """Exact next-word conditionals from prefix probabilities.

        ``include_eos=False`` (default): ``[n, L, V]``, p(x_t = w | x_<t, the sentence has a word at
        t), i.e. the next word given that the sentence does not end before it; rows sum to 1 at real
        positions and are 0 at padding. ``include_eos=True``: ``[n, L+1, V+1]`` over the words plus
        an end-of-sentence column (index V): row t is p(x_t = w | x_<t) for t = 0..len, and
        ``-sum_t log p`` over the len+1 events of a sentence is exactly ``-log p(x)``.

        Prefix probabilities are computed by filling the positions after the prefix with a
        "any word" leaf and summing the inside score over every possible total length.
        """
        self.check_corpus(corpus)
        chunks_word, chunks_end = [], []
        for chunk in corpus.batches(self.chunk_size):
            w, e = self._prefix_terms(chunk)
            chunks_word.append(w)
            chunks_end.append(e)
        next_word, end = torch.cat(chunks_word), torch.cat(chunks_end)
        length = corpus.max_len
        if include_eos:
            out = torch.cat([next_word, end[..., None]], dim=-1)[:, : length + 1]
            valid = torch.arange(length + 1)[None, :] <= corpus.lengths[:, None]
            return out * valid[..., None]
        words = next_word[:, :length]
        norm = words.sum(dim=-1, keepdim=True)
        return torch.where(corpus.mask[..., None] & (norm > 0), words / norm.clamp(min=1e-300), 0.0)

    def optimal_causal_loss(self, corpus: Corpus, reduction: str = "token",
                            include_eos: bool = False) -> LossEstimate:
        """Exact minimal next-word loss; with ``include_eos`` the end-of-sentence event counts as a
        token too (then the per-sentence sum is the sentence's negative log-likelihood)."""
        if not include_eos:
            return super().optimal_causal_loss(corpus, reduction)
        probs = self.causal_conditionals(corpus, include_eos=True)
        targets = torch.cat([corpus.tokens, torch.full((len(corpus), 1), PAD)], dim=1)
        positions = torch.arange(corpus.max_len + 1)[None, :]
        targets = torch.where(positions == corpus.lengths[:, None], self.vocab_size, targets)
        mask = positions <= corpus.lengths[:, None]
        p_true = probs.gather(-1, targets.clamp(min=0)[..., None]).squeeze(-1)
        return loss_estimate(-torch.log(p_true).masked_fill(~mask, 0.0), mask, reduction)

    # ---------------------------------------------------------------- downstream tasks
    @property
    def tasks(self) -> tuple[str, ...]:
        return tuple(self.task_spans)

    def task_classes(self, task: str) -> list[str]:
        """The candidate labels of ``task``: the sentence types (non-terminals the start symbol
        rewrites to by a unary rule, S1..S9 in the paper's grammar) for whole-sentence tasks;
        for prefix tasks, every non-terminal but the start symbol that can derive a span of the
        task's length (the others could never be the label)."""
        if task not in self.task_spans:
            raise unknown_task(task, "grammar", self.tasks)
        start = self.nonterminals.index(self.start)
        types = [self.nonterminals[b] for b in self.unary[start].nonzero().squeeze(1).tolist()]
        span = self.task_spans[task]
        if span is None and types:
            return types
        return [a for i, a in enumerate(self.nonterminals)
                if not a.startswith("<") and a != self.start
                and (span is None or span in self.yield_lengths[i])]

    def n_classes(self, task: str) -> int:
        return len(self.task_classes(task))

    def task_labels(self, corpus: Corpus, task: str) -> Tensor:
        """``[n]`` the index (into ``task_classes(task)``) of the non-terminal with the largest
        inside probability over the task's span: the whole sentence or its first ``span`` words.
        -1 where the sentence is shorter than the span or no candidate derives it."""
        classes = self.task_classes(task)
        candidates = torch.tensor([self.nonterminals.index(a) for a in classes])
        span = self.task_spans[task]
        self.check_corpus(corpus)
        labels = torch.full((len(corpus),), -1, dtype=torch.long)
        for indices, length in self._length_groups(corpus):
            if span is not None and span > length:
                continue  # no label: the sentence is shorter than the span
            width = length if span is None else span
            with torch.no_grad():  # only spans starting at 0 are needed: a chart of the prefix
                chart = self._inside(self._leaves(corpus[indices])[:, :width])
            scores = chart[width - 1][0][:, 0, candidates]
            best = scores.max(dim=1)
            labels[indices] = torch.where(best.values > 0, best.indices, -1)
        return labels


__all__ = ["PCFG", "parse_rules", "PAPER_TASK_SPANS", "RELEASED_TASK_SPANS"]
