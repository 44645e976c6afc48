"""flatlib on HuggingFace ``transformers`` models: their exact symmetries, eager attention, and adapters
from flatlib's batches and exact optima to ``GPT2LMHeadModel``, ``BertForMaskedLM`` and
``RobertaForMaskedLM`` (and subclasses).

Optional: this module needs ``transformers`` (``requirements-test.txt`` pins it and what it imports);
nothing else in flatlib imports it. Models are built from configs (``config_for``), never downloaded.

**Token ids.** flatlib's batches hold *flatlib ids*: the language's words ``0..V-1``, then ``PAD = V``,
``MASK = V+1``, ``BOS = V+2`` (the start token of causal rows; flatlib's own model keeps ``V+2`` and
``V+3`` reserved). A ``TokenMap`` maps them to a HF model's vocabulary. ``config_for(language, kind)``
builds a HF config whose vocabulary *is* flatlib's (``V + 4`` ids, the identity map): what to use when
training a HF model on flatlib's languages. Another vocabulary: ``TokenMap(n_words, words=(hf ids of
the words), pad_id=..., mask_id=..., bos_id=...)``.

**Rows.** Every batch here is flatlib's single-prediction form ``(inputs [m, L], positions [m],
targets)``: row ``i`` predicts one word at ``positions[i]``, ``targets`` the word ``[m]`` or the exact
conditionals ``[m, V]`` (float: the expected loss). MLM rows: ``flatness.mlm_batches`` of an
``objective.validation_set`` (the position holds MASK). Causal rows (``causal_rows``): the sentence
shifted right behind BOS, ``inputs = [BOS, x_0, ..., x_{L-2}]``, so that position ``t`` reads
``x_<t`` and predicts ``x_t`` (``p(x_t | x_<t)``, the HMM's ``causal_conditionals``); one row per
(sentence, position). ``TokenMap.logits_fn`` / ``TokenMap.loss_fn`` serve both (the model's
attention decides what a position sees); ``TokenMap.causal_loss_fn`` is the usual whole-sequence
causal loss of ``causal_batches``.

**Restricted to the words.** A HF model's softmax runs over its whole vocabulary, special ids
included, while the language's conditionals ``p`` live on the words. The adapters' logits are the
words' logits, so their softmax ``q_w`` is the model's distribution given that the next token is a
word; the mass it puts elsewhere, ``s = 1 - sum_w q_full(w)``, is reported by ``exact_gap``
(``special_mass``), with the gap of the full softmax: ``q_full(w) = (1 - s) q_w(w)`` gives

    KL(p || q_full) = KL(p || q_w) - log(1 - s),

so ``gap_full = gap + E[-log(1 - s)]``: the difference is mass on ids that never occur. (A GPT-2 trained on
flatlib's cpu HMM measured 0.240 nats over the full softmax against 0.0012 over the words; the BERT of
docs/your_model.md, trained on the words' softmax: 0.269 against 0.028.)

**Symmetries** (``symmetry_groups``): lists of ``flatlib.measurement.symmetry.Group`` (built with its
``norm_reader_group``, ``query_key_group`` and ``value_output_group``) for ``symmetry.verify_groups`` and
``symmetry.full_gauge_trace(..., groups=...)``.

**Train and measure** (notebook 07, docs/your_model.md): ``train_mlm`` trains a masked LM in place
on flatlib's single-mask objective (deterministic; cached and resumable in the run store), ``measure``
gives the exact gap, the raw, LayerNorm-only and full-gauge traces (also after a random rescaling of
every group) and a linear probe against the Bayes accuracy; ``flatlib.analysis.your_model.failed_checks``
lists what is out of place in them.

**Attention.** Second derivatives need ``attn_implementation="eager"`` (the fused SDPA kernel of
torch 2.13 has no double backward on CPU: "derivative for
aten::_scaled_dot_product_flash_attention_for_cpu_backward is not implemented"). ``require_eager``
refuses any other implementation with the fix; ``use_eager`` switches a model; ``config_for``
builds eager models. ``logits_fn`` and ``loss_fn`` (the Hessian adapters) call ``require_eager``.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import dataclass
from typing import Any, Sequence

import pandas as pd
import torch
import torch.nn.functional as F
from torch import Tensor, nn

try:
    from transformers import (
        BertConfig,
        BertForMaskedLM,
        GPT2Config,
        GPT2LMHeadModel,
        RobertaConfig,
        RobertaForMaskedLM,
    )
except ImportError as error:  # pragma: no cover - exercised only without transformers
    raise ImportError("flatlib.measurement.hf needs transformers: pip install -r requirements-test.txt (it "
                      "pins transformers and what it imports; flatlib itself does not need it)") from error

from flatlib.checks import check_int, check_number, check_numbers, check_seed
from flatlib.languages import Corpus, Language, build_language
from flatlib.measurement.symmetry import Group, norm_reader_group, query_key_group, value_output_group
from flatlib.runner.runs import Run, RunStore
from flatlib.seeds import derived_seed
from flatlib.training.model import N_SPECIAL  # PAD, MASK, BOS (once CLS) and one reserved id after the words
from flatlib.training.objective import ValidationSet, gap_statistics, sample, single_mask_batch
from flatlib.training.train import _checkpoint_tensors, _restore  # one checkpoint layout for every run

SUPPORTED = (GPT2LMHeadModel, BertForMaskedLM, RobertaForMaskedLM)
KINDS = ("gpt2", "bert", "roberta")


# ---------------------------------------------------------------------------- attention
def attention_implementation(model: nn.Module) -> str:
    """The attention implementation a HF model runs (``"eager"``, ``"sdpa"``, ...)."""
    return str(model.config._attn_implementation)


def require_eager(model: nn.Module) -> None:
    """Raise unless ``model`` runs eager attention, the only twice-differentiable one on CPU."""
    implementation = attention_implementation(model)
    if implementation != "eager":
        raise ValueError(
            f"model: {type(model).__name__} runs attn_implementation={implementation!r}, which has no second "
            "derivative (torch's fused attention kernels implement no double backward); Hessians, traces and "
            "invariant_trace need 'eager'. Fix: model.set_attn_implementation('eager') (or "
            "flatlib.measurement.hf.use_eager(model)), or build it with attn_implementation='eager' "
            "(flatlib.measurement.hf.config_for does)")


def use_eager(model: nn.Module) -> nn.Module:
    """Switch ``model`` (in place) to eager attention, the same function computed without fused kernels;
    returns it."""
    model.set_attn_implementation("eager")
    return model


# ---------------------------------------------------------------------------- token ids
@dataclass(frozen=True)
class TokenMap:
    """flatlib ids (words ``0..n_words-1``, PAD ``n_words``, MASK ``n_words+1``, BOS ``n_words+2``) ->
    a HF model's ids. ``words``: the HF id of each word (None: the identity, words are HF ids
    ``0..n_words-1``); ``mask_id`` / ``bos_id``: None where the model has no such token (a batch using
    it then fails in the embedding lookup). ``vocab_size``: the HF vocabulary (the logits' width)."""

    n_words: int
    pad_id: int
    vocab_size: int
    mask_id: int | None = None
    bos_id: int | None = None
    words: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        check_int("n_words", self.n_words)
        check_int("vocab_size", self.vocab_size, self.n_words + 1)
        words = range(self.n_words) if self.words is None else self.words
        if len(words) != self.n_words:
            raise ValueError(f"words: expected {self.n_words} HF ids (one per word), got {len(words)}")
        ids = [*words, self.pad_id, *(i for i in (self.mask_id, self.bos_id) if i is not None)]
        if len(set(ids)) != len(ids) or not all(0 <= i < self.vocab_size for i in ids):
            raise ValueError(f"TokenMap: the words' and special tokens' HF ids must be distinct ids in "
                             f"[0, {self.vocab_size}); got words={self.words}, pad_id={self.pad_id}, "
                             f"mask_id={self.mask_id}, bos_id={self.bos_id}")

    @classmethod
    def for_language(cls, language: Language) -> "TokenMap":
        """The identity map of a ``config_for(language, ...)`` model: HF ids = flatlib ids."""
        v = language.vocab_size
        return cls(n_words=v, pad_id=v, vocab_size=v + N_SPECIAL, mask_id=v + 1, bos_id=v + 2)

    @property
    def identity(self) -> bool:
        v = self.n_words
        return self.words is None and (self.pad_id, self.mask_id, self.bos_id) == (v, v + 1, v + 2)

    @property
    def bos(self) -> int:
        """BOS's flatlib id."""
        return self.n_words + 2

    def hf_ids(self, ids: Tensor) -> Tensor:
        """flatlib ids -> HF ids (a table lookup; the identity map returns ``ids`` itself)."""
        if self.identity:
            return ids
        v = self.n_words
        words = list(range(v)) if self.words is None else list(self.words)
        unknown = -1  # an id with no HF token: the embedding lookup refuses it
        specials = [self.pad_id, unknown if self.mask_id is None else self.mask_id,
                    unknown if self.bos_id is None else self.bos_id, unknown]
        return torch.tensor(words + specials, device=ids.device)[ids]

    def word_logits(self, logits: Tensor) -> Tensor:
        """``[..., vocab_size]`` HF logits -> ``[..., n_words]``, the words' logits in flatlib order."""
        if logits.shape[-1] != self.vocab_size:
            raise ValueError(f"logits: the model has {logits.shape[-1]} output ids, the TokenMap says "
                             f"vocab_size={self.vocab_size}; build the map for this model")
        if self.words is None:
            return logits[..., : self.n_words]
        return logits.index_select(-1, torch.tensor(self.words, device=logits.device))

    # ------------------------------------------------------------ the Hessian adapters (eager only)
    def logits_fn(self, model: nn.Module, batch: Sequence[Tensor]) -> Tensor:
        """``[m, V]``: the words' logits at each row's position of ``batch = (inputs [m, L] flatlib ids,
        positions [m], ...)``: ``flatness.mlm_logits_fn`` for a HF model (MLM rows or ``causal_rows``).
        Needs eager attention (``require_eager``); runs under ``vmap`` (``fisher_diagonal``)."""
        require_eager(model)
        return self.word_logits(_row_logits(model, self, batch[0], batch[1]))

    def loss_fn(self, model: nn.Module, batch: Sequence[Tensor]) -> Tensor:
        """``flatness.mlm_loss_fn`` for a HF model: cross-entropy of ``logits_fn`` against ``batch[2]``,
        the words ``[m]`` or probabilities ``[m, V]`` (the expected loss), mean over rows, nats."""
        logits = self.logits_fn(model, batch)
        targets = batch[2]
        if targets.is_floating_point():
            targets = targets.to(logits.dtype)
        return F.cross_entropy(logits, targets)

    def causal_loss_fn(self, model: nn.Module, batch: Sequence[Tensor]) -> Tensor:
        """The whole-sequence causal loss of ``causal_batches``' ``(inputs [m, L], targets [m, L])``
        (targets: the words, -100 at padding): cross-entropy of the words' logits at every real
        position, mean over the batch's words, nats. Needs eager attention."""
        require_eager(model)
        inputs, targets = batch[0], batch[1]
        logits = self.word_logits(_forward(model, self, inputs))
        return F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100)


def _description(batch: Sequence[Tensor]) -> str:
    what = ("the expected loss (cross-entropy against the exact conditionals)" if batch[2].is_floating_point()
            else "the loss against the sampled words")
    return (f"{what} of a HuggingFace model at one position per row, its softmax restricted to the "
            "language's words (mean over rows, nats)")


# flatness._describe reads these (through the bound methods) into every estimate's description
TokenMap.loss_fn.describe = _description  # type: ignore[attr-defined]
TokenMap.logits_fn.description = (  # type: ignore[attr-defined]
    "a HuggingFace model's predictive distribution at one position per row, restricted to the language's "
    "words (mean over rows, nats)")
TokenMap.causal_loss_fn.description = (  # type: ignore[attr-defined]
    "the causal LM loss of a HuggingFace model, its softmax restricted to the language's words (mean over "
    "words, nats)")


def _is_causal(model: nn.Module) -> bool:
    if isinstance(model, GPT2LMHeadModel):
        return True
    if isinstance(model, (BertForMaskedLM, RobertaForMaskedLM)):
        return False
    raise TypeError(f"model: {type(model).__name__} is not supported; flatlib.measurement.hf supports "
                    f"{', '.join(c.__name__ for c in SUPPORTED)} (and their subclasses)")


def _attention_mask(model: nn.Module, ids: Tensor, pad_id: int) -> Tensor:
    """Keys that are not padding (and, for a causal model, not in the future). Eager: the prepared 4-D
    additive mask ``[m, 1, L, L]``, which HF passes through as it is, so that no data-dependent branch
    runs (``vmap``-safe; without a mask GPT-2 checks the inputs for padding); other implementations: the
    2-D 0/1 mask, HF adding the causal part."""
    keep = ids != pad_id  # [m, L]
    if attention_implementation(model) != "eager":
        return keep.long()
    allowed = keep[:, None, None, :]
    if _is_causal(model):
        length = ids.shape[1]
        allowed = allowed & torch.ones(length, length, dtype=torch.bool, device=ids.device).tril()
    dtype = next(model.parameters()).dtype
    blocked = torch.zeros(ids.shape[0], 1, ids.shape[1], ids.shape[1], dtype=dtype, device=ids.device)
    # finfo.min, not -inf (HF's own choice): a row with no allowed key stays finite
    return blocked.masked_fill(~allowed, torch.finfo(dtype).min)


def _forward(model: nn.Module, tokens: TokenMap, inputs: Tensor) -> Tensor:
    """``[m, L, vocab_size]`` HF logits of flatlib-id ``inputs [m, L]``."""
    ids = tokens.hf_ids(inputs)
    mask = _attention_mask(model, ids, tokens.pad_id)
    return model(input_ids=ids, attention_mask=mask, use_cache=False).logits


def _row_logits(model: nn.Module, tokens: TokenMap, inputs: Tensor, positions: Tensor) -> Tensor:
    """``[m, vocab_size]``: each row's logits at its position (``gather``: fine under ``vmap``)."""
    logits = _forward(model, tokens, inputs)
    index = positions.reshape(-1, 1, 1).expand(-1, 1, logits.shape[-1])
    return logits.gather(1, index).squeeze(1)


# ---------------------------------------------------------------------------- causal rows and batches
def _shifted(corpus: Corpus, n_words: int) -> Tensor:
    """``[n, L]`` flatlib ids ``[BOS, x_0, ..., x_{L-2}]`` (PAD after each sentence): position ``t``
    reads ``x_<t``."""
    tokens = torch.where(corpus.mask, corpus.tokens, n_words)
    bos = torch.full((len(corpus), 1), n_words + 2, dtype=tokens.dtype)
    return torch.cat([bos, tokens[:, :-1]], dim=1)


def causal_batches(corpus: Corpus, n_words: int, batch_size: int) -> list[tuple[Tensor, Tensor]]:
    """Consecutive ``(inputs [b, L], targets [b, L])`` of ``corpus`` for ``TokenMap.causal_loss_fn``:
    inputs ``[BOS, x_0, ..., x_{L-2}]`` in flatlib ids, targets the words ``x_t`` (-100 at padding)."""
    check_int("batch_size", batch_size)
    inputs, targets = _shifted(corpus, n_words), corpus.tokens.masked_fill(~corpus.mask, -100)
    return [(inputs[i : i + batch_size], targets[i : i + batch_size])
            for i in range(0, len(corpus), batch_size)]


@dataclass(frozen=True)
class Rows:
    """One prediction per row, with the exact conditionals there: the fields of
    ``objective.ValidationSet`` (``flatness.mlm_batches`` and ``exact_gap`` read either)."""

    inputs: Tensor  # [m, L] flatlib ids
    positions: Tensor  # [m]
    targets: Tensor  # [m] the true words
    true_probs: Tensor  # [m, V] float64


def causal_rows(language: Language, corpus: Corpus) -> Rows:
    """Every (sentence, position) of ``corpus`` as a causal row: inputs ``[BOS, x_0, ..., x_{L-2}]``,
    the position ``t``, the word ``x_t`` and the exact ``p(x_t = . | x_<t)``
    (``language.causal_conditionals``). Batch them with ``flatness.mlm_batches``."""
    rows, positions = corpus.mask.nonzero(as_tuple=True)
    inputs = _shifted(corpus, language.vocab_size)[rows]
    probs = language.causal_conditionals(corpus)[rows, positions, : language.vocab_size]
    return Rows(inputs, positions, corpus.tokens[rows, positions], probs)


# ---------------------------------------------------------------------------- models for flatlib's languages
def config_for(language: Language, kind: str, n_layer: int = 2, n_head: int = 2, d_model: int = 64,
               d_ff: int = 256, tie: bool = False, dropout: float = 0.0, **overrides: Any) -> Any:
    """A HF config (``kind``: ``"gpt2"``, ``"bert"`` or ``"roberta"``) for ``language``: vocabulary =
    flatlib's ids (``TokenMap.for_language``), positions for its sentences, eager attention,
    ``dropout`` everywhere (0: flatlib's model has none), the head ``tie``-d to the word embeddings or
    not (untied: the head's LayerNorm -> head rescaling is an exact symmetry; tied it is not).
    ``overrides`` go to the config class as they are."""
    v, length = language.vocab_size, language.max_len
    common = dict(vocab_size=v + N_SPECIAL, pad_token_id=v, bos_token_id=v + 2, eos_token_id=v + 2,
                  tie_word_embeddings=tie, attn_implementation="eager")
    if kind == "gpt2":
        settings = dict(n_positions=length + 1, n_embd=d_model, n_layer=n_layer, n_head=n_head, n_inner=d_ff,
                        resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout)
        return GPT2Config(**{**common, **settings, **overrides})
    settings = dict(hidden_size=d_model, num_hidden_layers=n_layer, num_attention_heads=n_head,
                    intermediate_size=d_ff, hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout,
                    type_vocab_size=1)
    if kind == "bert":
        return BertConfig(**{**common, **settings, "max_position_embeddings": length, **overrides})
    if kind == "roberta":  # RoBERTa numbers positions from pad_token_id + 1
        return RobertaConfig(**{**common, **settings, "max_position_embeddings": v + 1 + length, **overrides})
    raise ValueError(f"kind: expected one of {KINDS}, got {kind!r}")


def model_for(language: Language, kind: str, seed: int = 0, dtype: torch.dtype = torch.float32,
              **config: Any) -> nn.Module:
    """A freshly initialised HF model of ``config_for(language, kind, **config)`` (seeded with
    ``seed``; the global RNG is restored afterwards), in ``dtype``, eager attention."""
    model_class = {"gpt2": GPT2LMHeadModel, "bert": BertForMaskedLM, "roberta": RobertaForMaskedLM}
    hf_config = config_for(language, kind, **config)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_class[kind](hf_config)
    return model.to(dtype)


# ---------------------------------------------------------------------------- the exact gap
def _rows(val: Any) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    if isinstance(val, (tuple, list)):
        if len(val) != 4:
            raise ValueError("val: expected (inputs, positions, targets, true_probs), a ValidationSet "
                             "or Rows")
        return tuple(val)  # type: ignore[return-value]
    return val.inputs, val.positions, val.targets, val.true_probs


@torch.no_grad()
def exact_gap(model: nn.Module, tokens: TokenMap, val: Any, batch_size: int = 512) -> dict[str, float]:
    """``objective.evaluate`` for a HF model: on the rows of ``val`` (an ``objective.ValidationSet``,
    ``causal_rows``, or ``(inputs, positions, targets, true_probs)``), with ``q`` the model's softmax
    restricted to the words (module docstring),

        gap = mean_rows KL(p || q),   val_loss = mean -log q(target),   val_optimum = mean -log p(target),

    the same keys and numbers as ``objective.evaluate`` (``gap_se``, ``gap_paired``, ``gap_paired_se``),
    plus what the restriction leaves out: ``special_mass`` (mean over rows of ``s``, the full softmax's
    mass off the words), ``special_mass_max``, and ``gap_full = gap + mean -log(1 - s)``, the gap of the
    full softmax. Any attention implementation (no second derivative); eval mode, restored after."""
    check_int("batch_size", batch_size)
    inputs, positions, targets, probs = _rows(val)
    if probs.shape != (len(inputs), tokens.n_words):
        raise ValueError(f"val: true_probs has shape {tuple(probs.shape)}, expected ({len(inputs)}, "
                         f"{tokens.n_words}) (one row per example, one column per word)")
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    log_q, log_word_mass = [], []
    try:
        for start in range(0, len(inputs), batch_size):
            rows = slice(start, start + batch_size)
            full = _row_logits(model, tokens, inputs[rows].to(device), positions[rows].to(device)).double()
            words = tokens.word_logits(full)
            log_q.append(F.log_softmax(words, dim=-1).cpu())
            log_word_mass.append((words.logsumexp(-1) - full.logsumexp(-1)).cpu())  # log(1 - s)
    finally:
        model.train(was_training)
    log_q, log_word_mass = torch.cat(log_q), torch.cat(log_word_mass)
    special = -torch.expm1(log_word_mass)  # s, per row
    out = gap_statistics(log_q, probs.double(), targets)
    return {**out, "special_mass": float(special.mean()), "special_mass_max": float(special.max()),
            "gap_full": out["gap"] + float((-log_word_mass).mean())}


@torch.no_grad()
def model_features(model: nn.Module, tokens: TokenMap, corpus: Corpus, batch_size: int = 1024) -> Tensor:
    """``[n, L, d]`` final representations of the unmasked sentences (0 at padding), on the CPU:
    ``downstream.model_features`` for a HF model (feed them to ``downstream.probe_inputs`` and
    ``linear_probe``). A masked LM's last hidden state (BERT/RoBERTa: after the last block's
    LayerNorm); GPT-2's (after ``ln_f``) at position ``t`` having read ``[BOS, x_0..x_t]``."""
    check_int("batch_size", batch_size)
    causal, was_training = _is_causal(model), model.training
    model.eval()
    device = next(model.parameters()).device
    out = []
    try:
        for chunk in corpus.batches(batch_size):
            flat = torch.where(chunk.mask, chunk.tokens, tokens.n_words)
            if causal:  # BOS first: position t + 1 has read x_0..x_t
                flat = torch.cat([torch.full((len(chunk), 1), tokens.bos), flat], dim=1)
            ids = tokens.hf_ids(flat).to(device)
            mask = _attention_mask(model, ids, tokens.pad_id)
            hidden = model.base_model(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
            hidden = hidden[:, 1:] if causal else hidden
            out.append(hidden.cpu() * chunk.mask[..., None])
    finally:
        model.train(was_training)
    return torch.cat(out)


# ---------------------------------------------------------------------------- symmetry groups
def symmetry_groups(model: nn.Module) -> list[Group]:
    """The exact per-coordinate rescaling symmetries of a supported HF model, as
    ``flatlib.measurement.symmetry.Group`` s (coordinate ``i`` of a group multiplies its members' slices by
    ``c_i ** power``; see ``flatlib.measurement.symmetry``).

    ``GPT2LMHeadModel`` (pre-LN; ``Conv1D`` weights are ``[in, out]``: a reader's input axis is 0, an
    output column is axis 1), per block ``transformer.h.i``, with ``d = n_embd``:

    * ``ln_1 -> attn.c_attn``: ``ln_1.weight``, ``ln_1.bias`` (+1), ``c_attn.weight`` rows (axis 0, -1).
      ``ln_1``'s output has no other reader (the residual takes the block's input, not ``ln_1``'s).
    * ``ln_2 -> mlp.c_fc``: likewise, ``c_fc.weight`` rows (axis 0, -1).
    * ``attn Q/K`` (size ``d``, per head coordinate: scores are ``sum_i q_i k_i`` within a head):
      ``c_attn.weight[:, 0:d]`` and ``c_attn.bias[0:d]`` (+1), ``c_attn.weight[:, d:2d]`` and
      ``c_attn.bias[d:2d]`` (-1).
    * ``attn V/O`` (size ``d``: the head's output is linear in ``v``): ``c_attn.weight[:, 2d:3d]`` and
      ``c_attn.bias[2d:3d]`` (+1), ``attn.c_proj.weight`` rows (axis 0, -1).
    * ``transformer.ln_f -> lm_head`` (``lm_head.weight [V, d]``, columns: axis 1, -1) only when the
      head is untied from ``transformer.wte``. Tied (HF's default), scaling the head's columns also
      scales the input embeddings, which is not a symmetry; the group is left out, and a user who
      names ``lm_head.weight`` in a group is refused by ``symmetry.check_groups`` (a tied parameter).

    ``BertForMaskedLM`` / ``RobertaForMaskedLM`` (post-LN: each LayerNorm's output is also the next
    residual stream, so a LayerNorm -> query/key/value or -> intermediate rescaling changes the
    function and is *not* here), per layer ``<base>.encoder.layer.i.attention`` (``nn.Linear``,
    ``[out, in]``):

    * ``Q/K``: ``self.query.weight`` rows and ``self.query.bias`` (+1), ``self.key`` the same (-1).
    * ``V/O``: ``self.value.weight`` rows and ``self.value.bias`` (+1), ``output.dense.weight``
      columns (axis 1, -1).
    * the MLM head's transform LayerNorm -> decoder (BERT: ``cls.predictions.transform.LayerNorm ->
      cls.predictions.decoder``; RoBERTa: ``lm_head.layer_norm -> lm_head.decoder``), its gain and
      bias (+1) against the decoder's columns (-1), only when the decoder is untied from the word
      embeddings (the same reason as GPT-2's head).

    Not symmetries, left out: the MLP's hidden units (GELU is not positively homogeneous), a tied
    head, any post-LN LayerNorm against its readers. Unfixed: the residual stream's common scale
    (every writer to it and the embeddings together), exact only up to LayerNorm's epsilon. Cross-
    attention (``add_cross_attention`` / ``is_decoder`` models) is refused.
    """
    if isinstance(model, GPT2LMHeadModel):
        return _gpt2_groups(model)
    if isinstance(model, (BertForMaskedLM, RobertaForMaskedLM)):
        return _bert_groups(model)
    _is_causal(model)  # raises the TypeError naming the supported classes
    raise AssertionError("unreachable")


def _names(model: nn.Module) -> dict[int, str]:
    return {id(module): name for name, module in model.named_modules()}


def _tied(a: nn.Parameter, b: nn.Parameter) -> bool:
    return a is b or (a.data_ptr() == b.data_ptr() and a.shape == b.shape)


def _gpt2_groups(model: GPT2LMHeadModel) -> list[Group]:
    if model.config.add_cross_attention:
        raise ValueError("model: GPT-2 with add_cross_attention is not supported by "
                         "flatlib.measurement.hf.symmetry_groups (its cross-attention reads another stream); "
                         "declare its groups yourself")
    names, d = _names(model), model.config.n_embd
    groups = []
    for block in model.transformer.h:
        b, attn = names[id(block)], names[id(block.attn)]
        c_attn = f"{attn}.c_attn"
        groups += [
            norm_reader_group(model, f"{b}.ln_1", c_attn),
            query_key_group(model, (c_attn, 0), (c_attn, d), d, f"{attn} Q/K"),
            value_output_group(model, (c_attn, 2 * d), f"{attn}.c_proj", d, f"{attn} V/O"),
            norm_reader_group(model, f"{b}.ln_2", f"{b}.mlp.c_fc"),
        ]
    if not _tied(model.lm_head.weight, model.transformer.wte.weight):
        groups.append(norm_reader_group(model, names[id(model.transformer.ln_f)], names[id(model.lm_head)]))
    return groups


def _bert_groups(model: nn.Module) -> list[Group]:
    if model.config.is_decoder or getattr(model.config, "add_cross_attention", False):
        raise ValueError("model: a decoder / cross-attention BERT or RoBERTa is not supported by "
                         "flatlib.measurement.hf.symmetry_groups (its cross-attention reads another stream); "
                         "declare its groups yourself")
    names = _names(model)
    groups = []
    for layer in model.base_model.encoder.layer:
        attention = layer.attention
        prefix, size = names[id(attention)], attention.self.query.weight.shape[0]
        q, k, v = (names[id(getattr(attention.self, m))] for m in ("query", "key", "value"))
        groups += [query_key_group(model, (q, 0), (k, 0), size, f"{prefix} Q/K"),
                   value_output_group(model, (v, 0), names[id(attention.output.dense)], size,
                                      f"{prefix} V/O")]
    if isinstance(model, BertForMaskedLM):
        norm, decoder = model.cls.predictions.transform.LayerNorm, model.cls.predictions.decoder
    else:
        norm, decoder = model.lm_head.layer_norm, model.lm_head.decoder
    if not _tied(decoder.weight, model.get_input_embeddings().weight):
        groups.append(norm_reader_group(model, names[id(norm)], names[id(decoder)]))
    return groups


# ---------------------------------------------------------------------------- training on flatlib's objective
def mlm_rows(language: Language, tokens: TokenMap, n_pairs: int) -> ValidationSet:
    """``n_pairs`` (sentence, masked position) pairs of ``language`` with the exact conditionals there:
    the pairs of ``objective.validation_set`` (the same sentences and positions for every model of the
    language), in ``tokens``' flatlib ids. What ``exact_gap`` and the traces of ``measure`` read."""
    check_int("n_pairs", n_pairs)
    corpus = sample(language, n_pairs, seed=derived_seed("validation sentences"))
    generator = torch.Generator().manual_seed(derived_seed("validation positions"))
    inputs, positions, targets = single_mask_batch(corpus, tokens.mask_id, tokens.pad_id, generator)
    probs = language.mlm_conditionals(corpus)[torch.arange(n_pairs), positions]
    return ValidationSet(inputs, positions, targets, probs)


@dataclass(frozen=True)
class TrainHistory:
    """``train_mlm``'s record. ``table``: one row per evaluation (step 0, every ``eval_every`` steps, the
    last step) with ``step``, ``lr`` (of the step before it), ``train_loss`` (mean batch loss since the
    previous row; NaN at step 0), ``exact_gap``'s keys (``gap``, ``gap_se``, ``val_loss``,
    ``val_optimum``, ``special_mass``, ``gap_full``, ...) and ``seconds`` (training wall time so far,
    evaluations included). ``seconds``: this call's wall time (0.0 when the run store had the run);
    ``cached``: the model was loaded from the run store; ``resumed_from``: the step this call started
    at (0: from scratch); ``key``: the run store key (None without a store)."""

    table: pd.DataFrame
    seconds: float
    cached: bool
    resumed_from: int
    key: str | None

    @property
    def final(self) -> dict[str, float]:
        """The last evaluation's row."""
        return {k: float(v) for k, v in self.table.iloc[-1].items()}


def _weights_digest(model: nn.Module) -> str:
    """SHA-256 of the model's state (names, dtypes, shapes and bytes): the run store's key of the
    initial weights."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        data = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8)
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(data.numpy().tobytes())
    return digest.hexdigest()


def _hf_config(model: nn.Module) -> dict[str, Any]:
    """The model's HF config as JSON, without what does not change the function it computes."""
    config = json.loads(model.config.to_json_string())
    return {k: v for k, v in config.items() if not k.startswith("_") and k not in
            ("transformers_version", "architectures", "dtype", "torch_dtype", "attn_implementation")}


def _json_row(row: dict[str, float]) -> dict[str, float | None]:
    return {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in row.items()}


def _history(run: Run, seconds: float, cached: bool, resumed_from: int) -> TrainHistory:
    return TrainHistory(run.metrics(), seconds, cached, resumed_from, run.key)


def train_mlm(model: nn.Module, language: Language | dict[str, Any], steps: int, batch_size: int = 256,
              lr: float = 3e-3, seed: int = 0, *, warmup_steps: int = 200, weight_decay: float = 0.01,
              betas: tuple[float, float] = (0.9, 0.98), eval_every: int | None = None, eval_pairs: int = 4096,
              store: RunStore | None = None, checkpoint_every: int | None = None,
              tokens: TokenMap | None = None) -> TrainHistory:
    """Train a masked LM (``BertForMaskedLM`` / ``RobertaForMaskedLM``) **in place** on flatlib's
    single-mask objective: at step ``k``, ``batch_size`` fresh sentences of ``language`` (seeded with
    ``derived_seed("sentences", seed, k)``), one masked position each (``derived_seed("masks", seed,
    k)``), the cross-entropy of the words' logits there (``TokenMap.loss_fn``: the objective of
    flatlib's own model, whose optimum is the language's exact conditional). AdamW over every
    parameter (``lr``, ``betas``, ``weight_decay``), the learning rate warmed up linearly over
    ``warmup_steps`` (step ``k`` at ``lr * min(1, (k + 1) / warmup_steps)``), then constant.

    Every ``eval_every`` steps (default ``steps // 10``), at step 0 and at the end, ``exact_gap`` on
    ``mlm_rows(language, tokens, eval_pairs)`` (``objective.validation_set``'s pairs): the history.

    **Deterministic**: the batches are a function of ``(seed, k)`` and the model computes what its
    weights say (``config_for`` builds models without dropout; with dropout the global RNG enters),
    so the same model, language and arguments give the same weights, bit for bit on one device and
    thread count. **Cached and resumable** with ``store`` (``flatlib.runner.runs.RunStore``): the run is keyed
    by the language's spec (``language`` must then be a spec, as ``languages.build_language`` takes it,
    e.g. ``profiles.language_spec(params, "hmm")``), the model's class and HF config, the SHA-256 of its
    weights at the call, ``dtype`` and these arguments; a finished run loads its final weights into
    ``model`` at once (``cached``); an interrupted one resumes from its last checkpoint (model and
    AdamW state, every ``checkpoint_every`` steps, a multiple of ``eval_every``, its default) and ends
    with the same weights as an uninterrupted run. Without ``store`` nothing is written. The model is
    left in eval mode.

    ``tokens``: the map of the model's vocabulary (default ``TokenMap.for_language``, the vocabulary
    of ``config_for``). The model trains on its own device; data are drawn on the CPU.
    """
    if not isinstance(model, (BertForMaskedLM, RobertaForMaskedLM)):
        _is_causal(model)  # an unsupported class: the TypeError naming the supported ones
        raise TypeError(f"model: train_mlm trains a masked LM (BertForMaskedLM, RobertaForMaskedLM); "
                        f"{type(model).__name__} is causal: train it with TokenMap.causal_loss_fn on "
                        "hf.causal_batches")
    spec = language if isinstance(language, dict) else None
    language = build_language(spec) if spec is not None else language
    for name, value, low in (("steps", steps, 1), ("batch_size", batch_size, 1),
                             ("warmup_steps", warmup_steps, 0), ("eval_pairs", eval_pairs, 1)):
        check_int(name, value, low)
    check_seed("seed", seed)
    check_number("lr", lr)
    check_number("weight_decay", weight_decay, low_closed=True)
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise ValueError(f"betas: expected two numbers in [0, 1), got {betas!r}")
    check_numbers("betas", betas, 0.0, 1.0, low_closed=True)
    eval_every = max(1, steps // 10) if eval_every is None else eval_every
    check_int("eval_every", eval_every)
    checkpoint_every = eval_every if checkpoint_every is None else checkpoint_every
    check_int("checkpoint_every", checkpoint_every)
    if checkpoint_every % eval_every:
        raise ValueError(f"checkpoint_every: expected a multiple of eval_every ({eval_every}), got "
                         f"{checkpoint_every} (a checkpoint holds the history up to its step)")
    tokens = TokenMap.for_language(language) if tokens is None else tokens
    if tokens.n_words != language.vocab_size or tokens.mask_id is None:
        raise ValueError(f"tokens: expected a TokenMap of the language's {language.vocab_size} words with a "
                         f"MASK id, got {tokens}")
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=tuple(betas), weight_decay=weight_decay)
    run = None
    if store is not None:
        if spec is None:
            raise ValueError("language: the run store keys a run by the language's spec; pass the spec "
                             "(e.g. flatlib.profiles.language_spec(params, 'hmm')) instead of the Language, "
                             "or leave store out")
        # "flatlib.hf.train_mlm": the run kind's name, part of every such run's key (it predates the package
        # layout; changing it would make every stored run of train_mlm a new run)
        config = {"kind": "flatlib.hf.train_mlm", "language": spec, "model": type(model).__name__,
                  "hf_config": _hf_config(model), "initial_weights_sha256": _weights_digest(model),
                  "dtype": str(next(model.parameters()).dtype), "tokens": [tokens.n_words, tokens.pad_id,
                  tokens.vocab_size, tokens.mask_id, tokens.bos_id, tokens.words],
                  "steps": steps, "batch_size": batch_size, "lr": lr, "seed": seed,
                  "warmup_steps": warmup_steps,
                  "weight_decay": weight_decay, "betas": list(betas), "eval_every": eval_every,
                  "eval_pairs": eval_pairs}
        run = store.open(config)
        if run.finished:
            _restore(model, None, run.verified().load_checkpoint().tensors)
            return _history(run, 0.0, True, steps)
        with run.writing():
            if run.finished:  # another process finished it while this one waited
                _restore(model, None, run.verified().load_checkpoint().tensors)
                return _history(run, 0.0, True, steps)
            return _train_mlm(model, language, tokens, optimizer, run, steps, batch_size, lr, seed,
                              warmup_steps, eval_every, eval_pairs, checkpoint_every)
    return _train_mlm(model, language, tokens, optimizer, None, steps, batch_size, lr, seed, warmup_steps,
                      eval_every, eval_pairs, checkpoint_every)


def _train_mlm(model: nn.Module, language: Language, tokens: TokenMap, optimizer: torch.optim.Optimizer,
               run: Run | None, steps: int, batch_size: int, lr: float, seed: int, warmup_steps: int,
               eval_every: int, eval_pairs: int, checkpoint_every: int) -> TrainHistory:
    """``train_mlm``'s loop (holding the run's lock when there is a run)."""
    start_time = time.time()
    device = next(model.parameters()).device
    val = mlm_rows(language, tokens, eval_pairs)
    rows: list[dict[str, Any]] = []
    step, running, earlier = 0, 0.0, 0.0
    checkpoint = run.load_checkpoint() if run is not None else None
    if checkpoint is not None:
        _restore(model, optimizer, checkpoint.tensors)
        step, rows, earlier = checkpoint.step, checkpoint.state["rows"], checkpoint.state["seconds"]
    resumed_from = step

    def record(lr_used: float, train_loss: float) -> None:
        gap = exact_gap(model, tokens, val)
        rows.append(_json_row({"step": step, "lr": lr_used, "train_loss": train_loss, **gap,
                               "seconds": earlier + time.time() - start_time}))

    def save() -> None:
        if run is not None:
            run.save_checkpoint(step, _checkpoint_tensors(model, optimizer),
                                {"rows": rows, "seconds": earlier + time.time() - start_time})

    if not rows:
        record(math.nan, math.nan)
        save()
    last_row = rows[-1]["step"]
    model.train()
    try:
        while step < steps:
            rate = lr * min(1.0, (step + 1) / warmup_steps) if warmup_steps else lr
            for group in optimizer.param_groups:
                group["lr"] = rate
            corpus = sample(language, batch_size, seed=derived_seed("sentences", seed, step))
            masks = torch.Generator().manual_seed(derived_seed("masks", seed, step))
            batch = single_mask_batch(corpus, tokens.mask_id, tokens.pad_id, masks)
            loss = tokens.loss_fn(model, tuple(x.to(device) for x in batch))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            running += loss.item()
            step += 1
            if step % eval_every == 0 or step == steps:
                record(rate, running / (step - last_row))
                running, last_row = 0.0, step
            if step % checkpoint_every == 0 or step == steps:
                save()
    finally:
        model.eval()
    seconds = time.time() - start_time
    if run is None:
        table = pd.DataFrame([{k: math.nan if v is None else v for k, v in r.items()} for r in rows])
        return TrainHistory(table, seconds, False, resumed_from, None)
    run.write_metrics(rows)
    final = rows[-1]
    run.prune_checkpoints(keep=1)
    run.mark_finished({"final_gap": final["gap"], "final_gap_se": final["gap_se"],
                       "final_val_loss": final["val_loss"],
                       "steps": steps, "seconds": final["seconds"], "threads": torch.get_num_threads(),
                       "device": str(device)})
    return _history(run, seconds, False, resumed_from)


# ---------------------------------------------------------------------------- measuring a trained model


def measure(model: nn.Module, language: Language, *, task: str, pairs: int = 4096, trace_pairs: int = 1024,
            trace_probes: int = 12, trace_batch: int = 512, probe_sentences: int = 4000,
            probe_train: int = 1000, probe_test: int = 1000, probe_splits: int = 3, seed: int = 0,
            tokens: TokenMap | None = None) -> dict[str, Any]:
    """What flatlib measures on its own models, for a HF model (eval mode; the model is not changed):

    * ``exact_gap``'s keys (``gap``, ``gap_se``, ``special_mass``, ``gap_full``, ...) on ``pairs`` rows:
      ``mlm_rows`` for a masked LM, ``causal_rows`` of as many sentences as that takes for GPT-2.
    * ``hutchinson``, ``hutchinson_se``: ``flatness.hessian_trace`` of the expected loss (soft targets)
      on the first ``trace_pairs`` rows, ``trace_probes`` Rademacher probes from ``seed``, every parameter.
    * ``trace_raw``, ``trace_norm``, ``trace_full`` and ``trace_se``: ``symmetry.full_gauge_trace`` with
      ``symmetry_groups(model)`` on the same rows and probes (``.raw_mean``: the model's coordinates;
      ``.norm_mean``: the LayerNorm -> reader groups alone; ``.mean``: every group, the trace of the
      function). The three share one noise, the body's Hutchinson estimate (``trace_se``); the gauged
      parameters' part is exact.
    * ``rescaled_raw``, ``rescaled_norm``, ``rescaled_full``: the same three on the same function in
      other coordinates, every group rescaled by ``exp(N(0, 1))`` per coordinate (``symmetry.rescale``,
      generator seeded ``seed + 1``); ``max_deviation``: the largest logit change ``verify_groups``
      found over the groups (a group that is not a symmetry raises ``SymmetryError`` instead).
    * ``probe``, ``probe_ci95``: ``downstream.linear_probe`` of ``model_features`` for ``task`` on
      ``probe_sentences`` sentences (seeded ``derived_seed("probe sentences")``), ``probe_train`` /
      ``probe_test`` examples, ``probe_splits`` splits (``ci95``: the t-interval's half-width);
      ``bayes``, ``bayes_se``: the language's Bayes accuracy of the task on those sentences (NaN where
      the language has none, e.g. a PCFG); ``chance``: the largest class's share.
    * ``seconds``: wall time per part (``gap``, ``hutchinson``, ``full_gauge``, ``rescaled``, ``probe``).

    Needs eager attention (the traces' second derivatives; ``require_eager``).
    """
    from flatlib.measurement.downstream import linear_probe, probe_inputs  # noqa: PLC0415 - flatlib.measurement.hf stays light to import
    from flatlib.measurement.flatness import hessian_trace  # noqa: PLC0415
    from flatlib.measurement.mlm import mlm_batches  # noqa: PLC0415
    from flatlib.measurement.symmetry import full_gauge_trace, rescale  # noqa: PLC0415

    require_eager(model)
    for name, value in (("pairs", pairs), ("trace_pairs", trace_pairs), ("trace_batch", trace_batch),
                        ("probe_sentences", probe_sentences), ("probe_train", probe_train),
                        ("probe_test", probe_test), ("probe_splits", probe_splits)):
        check_int(name, value)
    check_int("trace_probes", trace_probes, 2)
    check_seed("seed", seed, offset=1)
    if trace_pairs > pairs:
        raise ValueError(f"trace_pairs: expected at most pairs ({pairs}), got {trace_pairs}")
    if task not in language.tasks:
        raise ValueError(f"task: {task!r} is not a task of {type(language).__name__} {language.tasks}")
    tokens = TokenMap.for_language(language) if tokens is None else tokens
    was_training = model.training
    model.eval()
    out: dict[str, Any] = {"task": task, "seconds": {}}
    try:
        clock = time.time()
        if _is_causal(model):
            corpus = sample(language, -(-pairs // language.max_len),
                            seed=derived_seed("validation sentences"))
            rows = causal_rows(language, corpus)
            rows = Rows(*(x[:pairs] for x in (rows.inputs, rows.positions, rows.targets, rows.true_probs)))
        else:
            rows = mlm_rows(language, tokens, pairs)
        out.update(exact_gap(model, tokens, rows))
        out["seconds"]["gap"] = time.time() - clock

        clock = time.time()
        head = tuple(x[:trace_pairs] for x in _rows(rows))
        batches = mlm_batches(head, trace_batch, soft_targets=True)
        raw = hessian_trace(model, tokens.loss_fn, batches, n_probes=trace_probes, seed=seed)
        out.update(hutchinson=raw.mean, hutchinson_se=raw.stderr)
        out["seconds"]["hutchinson"] = time.time() - clock

        clock = time.time()
        groups = symmetry_groups(model)
        trace = full_gauge_trace(model, tokens.loss_fn, tokens.logits_fn, batches, n_probes=trace_probes,
                                 seed=seed, groups=groups)
        out.update(trace_raw=trace.raw_mean, trace_norm=trace.norm_mean, trace_full=trace.mean,
                   trace_se=trace.stderr, groups=len(groups), max_deviation=max(trace.deviations.values()))
        out["seconds"]["full_gauge"] = time.time() - clock

        clock = time.time()
        generator = torch.Generator().manual_seed(seed + 1)
        moved = rescale(model, groups, {g.name: torch.randn(g.size, generator=generator, dtype=torch.float64)
                                        for g in groups})
        again = full_gauge_trace(moved, tokens.loss_fn, tokens.logits_fn, batches, n_probes=trace_probes,
                                 seed=seed, groups=groups)
        out.update(rescaled_raw=again.raw_mean, rescaled_norm=again.norm_mean, rescaled_full=again.mean,
                   rescaled_se=again.stderr)
        out["seconds"]["rescaled"] = time.time() - clock

        clock = time.time()
        probe_corpus = sample(language, probe_sentences, seed=derived_seed("probe sentences"))
        features = probe_inputs(language, probe_corpus, model_features(model, tokens, probe_corpus), task)
        labels = language.task_labels(probe_corpus, task)
        n_classes = language.n_classes(task)
        probe = linear_probe(features, labels, n_classes, n_train=probe_train, n_test=probe_test,
                             n_splits=probe_splits, seed=seed)
        bayes = language.bayes_accuracy(probe_corpus, task) if hasattr(language, "bayes_accuracy") else None
        known = labels[labels >= 0]
        out.update(probe=probe.accuracy, probe_ci95=probe.ci95,
                   bayes=math.nan if bayes is None else bayes.mean,
                   bayes_se=math.nan if bayes is None else bayes.stderr,
                   chance=float(torch.bincount(known, minlength=n_classes).max() / len(known)))
        out["seconds"]["probe"] = time.time() - clock
    finally:
        model.train(was_training)
    return out
