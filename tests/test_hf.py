"""flatlib.measurement.hf: the symmetry groups of HuggingFace GPT-2 / BERT / RoBERTa (each a symmetry of the
function, in float64; the pairs left out are not), eager attention, and the adapters from flatlib's batches
and exact optima (against objective.evaluate and a brute-force computation, row by row)."""

from __future__ import annotations

import copy
import math
import subprocess
import sys

import pytest
import torch
from torch import nn

from flatlib.analysis import your_model
from flatlib.languages import HMM, Corpus
from flatlib.measurement import flatness, hf
from flatlib.measurement.symmetry import (
    Group,
    Member,
    SymmetryError,
    check_groups,
    full_gauge_trace,
    norm_reader_group,
    rescale,
    verify_groups,
)
from flatlib.plots import your_model as your_model_plots
from flatlib.training.objective import ValidationSet, evaluate, single_mask_batch

SIZES = dict(n_layer=2, n_head=2, d_model=8, d_ff=16)
# float64 logits of O(1): a true symmetry moves them by rounding only (~1e-15); a broken one by O(0.1)
SAME, CHANGED = 1e-10, 1e-2


@pytest.fixture(scope="module")
def language() -> HMM:
    return HMM.random(n_states=4, vocab_size=8, seq_len=6, concentration=0.5, seed=0, task_positions=(2,))


@pytest.fixture(scope="module")
def corpus(language: HMM) -> Corpus:
    """Sentences of random lengths 2..6: rows with padding exercise the attention masks."""
    full = language.sample(12, seed=1)
    lengths = torch.randint(2, language.max_len + 1, (len(full),), generator=torch.Generator().manual_seed(2))
    positions = torch.arange(language.max_len)
    tokens = full.tokens.masked_fill(positions[None, :] >= lengths[:, None], -1)
    return Corpus(tokens, lengths)


@pytest.fixture(scope="module")
def mlm_rows(language: HMM, corpus: Corpus) -> ValidationSet:
    v = language.vocab_size
    inputs, positions, targets = single_mask_batch(corpus, v + 1, v, torch.Generator().manual_seed(3))
    probs = language.mlm_conditionals(corpus)[torch.arange(len(corpus)), positions]
    return ValidationSet(inputs, positions, targets, probs)


def _model(language: HMM, kind: str, seed: int = 0, **config) -> nn.Module:
    """A float64 model with every parameter perturbed (HF initialises gains to 1 and biases to 0, where
    some rescalings would be invisible)."""
    model = hf.model_for(language, kind, seed=seed, dtype=torch.float64, **{**SIZES, **config})
    generator = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=generator, dtype=p.dtype))
    return model.eval()


def _logits(model: nn.Module, language: HMM, inputs: torch.Tensor) -> torch.Tensor:
    """Every position's logits over the whole HF vocabulary, through HF's own 2-D padding mask (not the
    adapters' 4-D one)."""
    with torch.no_grad():
        return model(input_ids=inputs, attention_mask=(inputs != language.vocab_size).long()).logits


def _random_log_scales(groups: list[Group], seed: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {g.name: 2 * torch.rand(g.size, generator=generator, dtype=torch.float64) - 1 for g in groups}


def _moved(model: nn.Module, groups: list[Group], log_scales: dict[str, torch.Tensor]) -> nn.Module:
    """The groups' action written out (an implementation independent of symmetry.rescale): member slice
    ``start + i`` along ``axis`` times ``exp(u_i) ** power``."""
    out = copy.deepcopy(model)
    params = dict(out.named_parameters(remove_duplicate=False))
    with torch.no_grad():
        for group in groups:
            for m in group.members:
                p = params[m.parameter]
                shape = [1] * p.dim()
                shape[m.axis] = group.size
                factor = torch.exp(m.power * log_scales[group.name]).view(shape)
                p.narrow(m.axis, m.start, group.size).mul_(factor)
    return out


# ---------------------------------------------------------------------------- the groups
@pytest.mark.parametrize("kind", hf.KINDS)
def test_every_group_is_a_symmetry(language, mlm_rows, kind):
    model = _model(language, kind)
    groups = hf.symmetry_groups(model)
    inputs = mlm_rows.inputs
    reference = _logits(model, language, inputs)
    scales = _random_log_scales(groups, seed=4)
    for chosen in [[g] for g in groups] + [groups]:
        moved = _moved(model, chosen, scales)
        changed = [n for (n, p), q in zip(model.named_parameters(), moved.parameters())
                   if not torch.equal(p, q)]
        assert changed, f"{chosen[0].name}: the rescaling moved no parameter"
        deviation = float((_logits(moved, language, inputs) - reference).abs().max())
        assert deviation < SAME, f"{[g.name for g in chosen]}: logits moved by {deviation:.3g}"
    # the library's own check agrees (its rescale, its scales, the adapters' 4-D masks)
    deviations = verify_groups(model, groups, hf.TokenMap.for_language(language).logits_fn,
                               (mlm_rows.inputs, mlm_rows.positions, mlm_rows.targets))
    assert max(deviations.values()) < SAME


def test_group_names_and_layouts(language):
    gpt2 = {g.name: g for g in hf.symmetry_groups(_model(language, "gpt2"))}
    assert set(gpt2) == {f"transformer.h.{i}.{what}" for i in range(2) for what in
                         ("ln_1 -> transformer.h.{i}.attn.c_attn".format(i=i), "attn Q/K", "attn V/O",
                          "ln_2 -> transformer.h.{i}.mlp.c_fc".format(i=i))} | {"transformer.ln_f -> lm_head"}
    d = SIZES["d_model"]
    # Conv1D weight [in, out]: the LayerNorm scales c_attn's rows (axis 0), Q/K/V are its columns (axis 1)
    ln_1 = gpt2["transformer.h.0.ln_1 -> transformer.h.0.attn.c_attn"]
    assert Member("transformer.h.0.attn.c_attn.weight", 0, 0, -1) in ln_1.members
    assert [(m.axis, m.start, m.power) for m in gpt2["transformer.h.0.attn Q/K"].members] == [
        (1, 0, 1), (0, 0, 1), (1, d, -1), (0, d, -1)]
    assert Member("transformer.h.1.attn.c_proj.weight", 0, 0, -1) in gpt2["transformer.h.1.attn V/O"].members
    bert = {g.name for g in hf.symmetry_groups(_model(language, "bert"))}
    assert bert == {f"bert.encoder.layer.{i}.attention {w}" for i in range(2) for w in ("Q/K", "V/O")} | {
        "cls.predictions.transform.LayerNorm -> cls.predictions.decoder"}


def _gelu_units(model: nn.Module) -> Group:
    """GPT-2 MLP hidden units against c_proj, per unit: not a symmetry (GELU is not homogeneous)."""
    fc, proj = "transformer.h.0.mlp.c_fc", "transformer.h.0.mlp.c_proj"
    return Group("MLP units", SIZES["d_ff"], (Member(f"{fc}.weight", 1, 0, 1), Member(f"{fc}.bias", 0, 0, 1),
                                              Member(f"{proj}.weight", 0, 0, -1)))


def _post_ln(model: nn.Module) -> Group:
    """BERT layer.0.output.LayerNorm -> layer.1 query/key/value: its output is also the residual stream."""
    attention = "bert.encoder.layer.1.attention.self"
    return norm_reader_group(model, "bert.encoder.layer.0.output.LayerNorm",
                             [f"{attention}.{m}" for m in ("query", "key", "value")])


def _linear_axis(model: nn.Module) -> Group:
    """ln_2 -> c_fc declared with nn.Linear's input axis (1) on a square Conv1D (n_inner = n_embd): the
    shapes fit, the function changes (a Conv1D's input axis is 0)."""
    return Group("ln_2 -> c_fc, wrong axis", SIZES["d_model"],
                 (Member("transformer.h.0.ln_2.weight", 0), Member("transformer.h.0.ln_2.bias", 0),
                  Member("transformer.h.0.mlp.c_fc.weight", 1, 0, -1)))


@pytest.mark.parametrize("kind, declare, config", [("gpt2", _gelu_units, {}),
                                                    ("bert", _post_ln, {}),
                                                    ("gpt2", _linear_axis, {"d_ff": SIZES["d_model"]})],
                         ids=["gpt2-mlp-units", "bert-post-ln", "gpt2-conv1d-as-linear"])
def test_excluded_pairs_change_the_function(language, mlm_rows, kind, declare, config):
    model = _model(language, kind, **config)
    group = declare(model)
    moved = _moved(model, [group], _random_log_scales([group], seed=5))
    deviation = float((_logits(moved, language, mlm_rows.inputs) - _logits(model, language, mlm_rows.inputs))
                      .abs().max())
    assert deviation > CHANGED
    batch = (mlm_rows.inputs, mlm_rows.positions, mlm_rows.targets)
    with pytest.raises(SymmetryError, match=f"{group.name}.* is not a symmetry"):
        verify_groups(model, [group], hf.TokenMap.for_language(language).logits_fn, batch)


@pytest.mark.parametrize("kind, head, reader", [
    ("gpt2", "transformer.ln_f", "lm_head"),
    ("bert", "cls.predictions.transform.LayerNorm", "cls.predictions.decoder"),
    ("roberta", "lm_head.layer_norm", "lm_head.decoder")])
def test_tied_head_left_out_and_refused(language, kind, head, reader):
    untied = hf.symmetry_groups(_model(language, kind))
    assert f"{head} -> {reader}" in {g.name for g in untied}
    tied = _model(language, kind, tie=True)
    groups = hf.symmetry_groups(tied)
    assert not any(m.parameter.startswith(reader) for g in groups for m in g.members)
    with pytest.raises(SymmetryError, match=f"{reader}.weight is tied to"):
        check_groups(tied, [norm_reader_group(tied, head, reader)])


def test_unsupported_models_refused(language):
    with pytest.raises(TypeError, match="GPT2LMHeadModel, BertForMaskedLM, RobertaForMaskedLM"):
        hf.symmetry_groups(nn.Linear(2, 2))
    with pytest.raises(ValueError, match="kind: expected one of"):
        hf.config_for(language, "t5")


# ---------------------------------------------------------------------------- eager attention
def test_sdpa_refused_with_the_fix(language, mlm_rows):
    model = _model(language, "bert")
    tokens = hf.TokenMap.for_language(language)
    batch = (mlm_rows.inputs, mlm_rows.positions, mlm_rows.targets)
    model.set_attn_implementation("sdpa")
    # why: torch's fused attention has no double backward
    params = [p for p in model.parameters()]
    with torch.enable_grad():
        out = model(input_ids=batch[0], attention_mask=(batch[0] != language.vocab_size).long()).logits
        grads = torch.autograd.grad(out.logsumexp(-1).sum(), params, create_graph=True, allow_unused=True)
        with pytest.raises(RuntimeError, match="not implemented"):
            torch.autograd.grad(sum((g * g).sum() for g in grads if g is not None), params, allow_unused=True)
    for call in (lambda: tokens.loss_fn(model, batch),
                 lambda: flatness.hessian_trace(model, tokens.loss_fn, [batch], n_probes=2, seed=0)):
        fix = r"attn_implementation='sdpa'.*set_attn_implementation\('eager'\)"
        with pytest.raises(ValueError, match=fix):
            call()
    hf.use_eager(model)
    assert hf.attention_implementation(model) == "eager"
    assert math.isfinite(flatness.hessian_trace(model, tokens.loss_fn, [batch], n_probes=2, seed=0).mean)


# ---------------------------------------------------------------------------- adapters and the exact gap
class _FlatlibView(nn.Module):
    """A HF model behind flatlib's Transformer interface, ``forward(inputs, positions) -> [m, V]`` word
    logits: what ``objective.evaluate`` calls."""

    def __init__(self, model: nn.Module, tokens: hf.TokenMap) -> None:
        super().__init__()
        self.model, self.tokens = model, tokens

    def forward(self, inputs: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self.tokens.logits_fn(self.model, (inputs, positions))


@pytest.mark.parametrize("kind", ["bert", "gpt2"])
def test_exact_gap_is_flatlibs_gap(language, corpus, mlm_rows, kind):
    model = _model(language, kind)
    tokens = hf.TokenMap.for_language(language)
    rows = mlm_rows if kind == "bert" else hf.causal_rows(language, corpus)
    mine = hf.exact_gap(model, tokens, rows, batch_size=5)
    flatlibs = evaluate(_FlatlibView(model, tokens), rows)
    for key, value in flatlibs.items():
        assert mine[key] == pytest.approx(value, rel=1e-12, abs=1e-14), key
    # the loss adapter is flatlib's MLM loss of the same logits
    with torch.no_grad():
        loss = float(tokens.loss_fn(model, (rows.inputs, rows.positions, rows.targets)))
    assert loss == pytest.approx(mine["val_loss"], rel=1e-12)


@pytest.mark.parametrize("kind", ["bert", "roberta", "gpt2"])
def test_exact_gap_brute_force(language, corpus, mlm_rows, kind):
    """Row by row: the sentence alone, unpadded, through HF's plain forward (no mask); the full softmax
    in float64; KL against the language's exact conditional computed from its definition."""
    model = _model(language, kind)
    v, rows = language.vocab_size, []
    if kind == "gpt2":  # p(x_t | x_<t) from [BOS, x_0, ..., x_{t-1}]
        causal = language.causal_conditionals(corpus)
        for i in range(len(corpus)):
            n = int(corpus.lengths[i])
            ids = torch.cat([torch.tensor([v + 2]), corpus.tokens[i, : n - 1]])
            rows += [(ids, t, causal[i, t]) for t in range(n)]
    else:
        for i in range(len(corpus)):
            n = int(corpus.lengths[i])
            rows.append((mlm_rows.inputs[i, :n], int(mlm_rows.positions[i]), mlm_rows.true_probs[i]))
    kl, kl_full, mass = [], [], []
    with torch.no_grad():
        for ids, t, p in rows:
            full = torch.softmax(model(input_ids=ids[None]).logits[0, t].double(), -1)
            s = float(full[v:].sum())
            q = full[:v] / (1 - s)
            kl.append(sum(float(p[w] * math.log(p[w] / q[w])) for w in range(v)))
            kl_full.append(sum(float(p[w] * math.log(p[w] / full[w])) for w in range(v)))
            mass.append(s)
    val = hf.causal_rows(language, corpus) if kind == "gpt2" else mlm_rows
    gap = hf.exact_gap(model, hf.TokenMap.for_language(language), val)
    assert len(val.inputs) == len(rows)
    assert gap["gap"] == pytest.approx(sum(kl) / len(kl), rel=1e-10)
    assert gap["gap_full"] == pytest.approx(sum(kl_full) / len(kl), rel=1e-10)
    assert gap["special_mass"] == pytest.approx(sum(mass) / len(mass), rel=1e-10)
    assert gap["special_mass_max"] == pytest.approx(max(mass), rel=1e-10)


def test_causal_loss_is_the_rows_loss(language, corpus):
    """The whole-sequence causal loss (mean over words) = the row loss over every (sentence, position)."""
    model = _model(language, "gpt2")
    tokens = hf.TokenMap.for_language(language)
    batches = hf.causal_batches(corpus, language.vocab_size, batch_size=5)
    words = [int((b[1] != -100).sum()) for b in batches]
    rows = hf.causal_rows(language, corpus)
    with torch.no_grad():
        losses = [float(tokens.causal_loss_fn(model, b)) for b in batches]
        sequence = sum(n * loss for n, loss in zip(words, losses)) / sum(words)
        per_row = float(tokens.loss_fn(model, (rows.inputs, rows.positions, rows.targets)))
    assert per_row == pytest.approx(sequence, rel=1e-12)


def test_token_map_of_another_vocabulary(language, mlm_rows):
    """The same BERT with its vocabulary permuted (embedding and decoder rows), read through the
    permutation's TokenMap: the same gap and loss."""
    model = _model(language, "bert")
    identity = hf.TokenMap.for_language(language)
    v = language.vocab_size
    perm = torch.randperm(v + hf.N_SPECIAL, generator=torch.Generator().manual_seed(6))  # flatlib id -> HF id
    permuted = copy.deepcopy(model)
    with torch.no_grad():
        for p in (permuted.bert.embeddings.word_embeddings.weight, permuted.cls.predictions.decoder.weight,
                  permuted.cls.predictions.decoder.bias):
            p[perm] = p.clone()
    tokens = hf.TokenMap(n_words=v, pad_id=int(perm[v]), vocab_size=v + hf.N_SPECIAL,
                         mask_id=int(perm[v + 1]), bos_id=int(perm[v + 2]),
                         words=tuple(int(i) for i in perm[:v]))
    assert tokens.identity is False
    expected, got = hf.exact_gap(model, identity, mlm_rows), hf.exact_gap(permuted, tokens, mlm_rows)
    for key in expected:
        assert got[key] == pytest.approx(expected[key], rel=1e-12, abs=1e-15), key
    batch = (mlm_rows.inputs, mlm_rows.positions, mlm_rows.true_probs)
    with torch.no_grad():
        assert float(tokens.loss_fn(permuted, batch)) == pytest.approx(float(identity.loss_fn(model, batch)),
                                                                      rel=1e-12)


# ---------------------------------------------------------------------------- the full-gauge trace
@pytest.mark.parametrize("kind", ["gpt2", "bert"])
def test_full_gauge_trace_invariant_under_every_group(language, corpus, mlm_rows, kind):
    model = _model(language, kind, n_layer=1)
    tokens = hf.TokenMap.for_language(language)
    rows = mlm_rows if kind == "bert" else hf.causal_rows(language, corpus[:4])
    batches = flatness.mlm_batches(rows, 8, soft_targets=True)
    groups = hf.symmetry_groups(model)
    moved = rescale(model, groups, _random_log_scales(groups, seed=7))
    before, after = (full_gauge_trace(m, tokens.loss_fn, tokens.logits_fn, batches, n_probes=3, seed=0,
                                      groups=groups) for m in (model, moved))
    assert after.mean == pytest.approx(before.mean, rel=1e-9)
    # the raw trace is not invariant
    assert abs(after.raw_mean - before.raw_mean) > 0.01 * abs(before.raw_mean)


def test_flatlib_imports_without_transformers():
    """transformers is optional: flatlib and its estimators import without it, and nothing but
    flatlib.measurement.hf imports it."""
    code = ("import sys; sys.modules['transformers'] = None\n"
            "import flatlib, flatlib.measurement.flatness, flatlib.measurement.symmetry, "
            "flatlib.measurement.measure, flatlib.training.objective\n"
            "assert 'flatlib.measurement.hf' not in sys.modules\n"
            "try:\n    import flatlib.measurement.hf\nexcept ImportError as e:\n    print(e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "flatlib.measurement.hf needs transformers" in out.stdout


def test_docs_your_model_runs(tmp_path, monkeypatch, capsys):
    """docs/your_model.md's two scripts, as written, at a few steps and pairs (the page's numbers are from
    the full sizes)."""
    from pathlib import Path

    text = (Path(__file__).parent.parent / "docs" / "your_model.md").read_text()
    train, measure = [block.split("```")[0] for block in text.split("```python\n")[1:]]
    sizes = {"STEPS = 2400": "STEPS = 5",
             "PAIRS, TRACE_PAIRS, PROBES, PROBE_SENTENCES, PROBE_SPLIT = 4096, 1024, 12, 4000, 1000":
             "PAIRS, TRACE_PAIRS, PROBES, PROBE_SENTENCES, PROBE_SPLIT = 256, 32, 2, 400, 100"}
    for full, small in sizes.items():
        assert full in train + measure, f"docs/your_model.md no longer sets {full!r}"
        train, measure = train.replace(full, small), measure.replace(full, small)
    monkeypatch.chdir(tmp_path)
    threads = torch.get_num_threads()
    try:
        exec(compile(train, "your_model.md: train", "exec"), {})
        exec(compile(measure, "your_model.md: measure", "exec"), {})
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    assert "trained 5 steps" in out and "full gauge" in out and "Bayes" in out


# ---------------------------------------------------------------------------- the fast Fisher diagonal
def test_fisher_diagonal_layers_on_gpt2_conv1d_equals_vmap(language, corpus):
    """GPT-2's linear maps are Conv1D (weight [in, out]): the closed-form per-example gradients handle that
    layout and agree with vmap's, a square one included (n_inner = n_embd, where summing the wrong axis
    would give a plausible number of the right shape)."""
    model = _model(language, "gpt2", n_layer=1, d_ff=SIZES["d_model"])
    tokens = hf.TokenMap.for_language(language)
    batches = flatness.mlm_batches(hf.causal_rows(language, corpus[:4]), 8, soft_targets=True)
    names = [n for n, _ in model.named_parameters()
             if n.endswith(("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_fc.bias",
                            "ln_2.weight"))]
    assert any("c_fc.weight" in n for n in names) and len(names) == 5
    fast = flatness.fisher_diagonal(model, tokens.logits_fn, batches, parameters=names, method="layers")
    slow = flatness.fisher_diagonal(model, tokens.logits_fn, batches, parameters=names, method="vmap")
    for name in names:
        assert fast[name].shape == slow[name].shape
        torch.testing.assert_close(fast[name], slow[name], rtol=1e-9, atol=1e-14, msg=name)


# ---------------------------------------------------------------------------- train_mlm and measure
TINY = dict(n_layer=1, n_head=2, d_model=8, d_ff=16)
SPEC = {"kind": "hmm", "seed": 0, "n_states": 4, "vocab_size": 8, "seq_len": 6, "concentration": 0.5,
        "task_positions": [2]}  # the `language` fixture's spec
TRAIN = dict(steps=12, batch_size=16, lr=3e-3, seed=0, warmup_steps=3, eval_every=4, eval_pairs=64)


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def _same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_train_mlm_is_deterministic_and_records_the_gap(language):
    runs = []
    for _ in range(2):
        model = hf.model_for(language, "bert", seed=0, **TINY)
        history = hf.train_mlm(model, language, **TRAIN)
        runs.append((_state(model), history))
    (first, history), (second, again) = runs
    assert _same_weights(first, second)
    assert history.table.drop(columns="seconds").equals(again.table.drop(columns="seconds"))  # not the clock
    assert list(history.table["step"]) == [0, 4, 8, 12] and not history.cached and history.key is None
    assert math.isnan(history.table["train_loss"][0]) and history.table["train_loss"][1:].notna().all()
    assert history.table["gap"].iloc[-1] < history.table["gap"].iloc[0]
    # the history's gap is exact_gap on mlm_rows, the validation pairs of objective.validation_set
    tokens = hf.TokenMap.for_language(language)
    assert history.final["gap"] == hf.exact_gap(model, tokens, hf.mlm_rows(language, tokens, 64))["gap"]
    # another seed draws other batches
    model = hf.model_for(language, "bert", seed=0, **TINY)
    hf.train_mlm(model, language, **{**TRAIN, "seed": 1})
    assert not _same_weights(first, _state(model))


def test_train_mlm_caches_in_the_run_store_and_resumes_bit_for_bit(language, tmp_path, monkeypatch):
    store = hf.RunStore(tmp_path / "runs")
    plain = hf.model_for(language, "bert", seed=0, **TINY)
    reference = hf.train_mlm(plain, language, **TRAIN)
    # interrupted after 6 steps (the checkpoint at step 4 survives), then resumed
    calls, real_sample = [], hf.sample

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) > 6:
            raise KeyboardInterrupt
        return real_sample(*args, **kwargs)

    monkeypatch.setattr(hf, "sample", failing)
    with pytest.raises(KeyboardInterrupt):
        hf.train_mlm(hf.model_for(language, "bert", seed=0, **TINY), SPEC, **TRAIN, store=store)
    monkeypatch.setattr(hf, "sample", real_sample)
    model = hf.model_for(language, "bert", seed=0, **TINY)
    resumed = hf.train_mlm(model, SPEC, **TRAIN, store=store)
    assert resumed.resumed_from == 4 and not resumed.cached
    assert _same_weights(_state(model), _state(plain))
    assert resumed.table["gap"].tolist() == reference.table["gap"].tolist()
    # finished: a fresh model at the same initial weights gets the final weights at once
    cached_model = hf.model_for(language, "bert", seed=0, **TINY)
    cached = hf.train_mlm(cached_model, SPEC, **TRAIN, store=store)
    assert cached.cached and cached.seconds == 0.0 and cached.key == resumed.key
    # the run's key, pinned (computed before the package layout): stored runs of train_mlm keep their keys
    assert resumed.key == "cd9c60236d9709d6"
    assert _same_weights(_state(cached_model), _state(plain))
    assert cached.table.equals(resumed.table)
    # other initial weights, another run
    other = hf.train_mlm(hf.model_for(language, "bert", seed=1, **TINY), SPEC, **TRAIN, store=store)
    assert other.key != resumed.key and not other.cached


@pytest.mark.parametrize("override, match", [
    ({"steps": 0}, "steps"), ({"batch_size": 1.5}, "batch_size"), ({"lr": -1.0}, "lr"),
    ({"seed": -1}, "seed"), ({"betas": (0.9, 1.0)}, "betas"), ({"eval_every": 0}, "eval_every"),
    ({"checkpoint_every": 6}, "checkpoint_every: expected a multiple of eval_every"),
    ({"weight_decay": -0.1}, "weight_decay"),
])
def test_train_mlm_refuses_bad_arguments(language, override, match):
    with pytest.raises(ValueError, match=match):
        hf.train_mlm(hf.model_for(language, "bert", seed=0, **TINY), language, **{**TRAIN, **override})


def test_train_mlm_needs_a_spec_for_the_store_and_a_masked_lm(language, tmp_path):
    with pytest.raises(ValueError, match="language: the run store keys a run by the language's spec"):
        hf.train_mlm(hf.model_for(language, "bert", seed=0, **TINY), language, **TRAIN,
                     store=hf.RunStore(tmp_path))
    with pytest.raises(TypeError, match="GPT2LMHeadModel is causal"):
        hf.train_mlm(hf.model_for(language, "gpt2", seed=0, **TINY), language, **TRAIN)
    with pytest.raises(TypeError, match="not supported"):
        hf.train_mlm(nn.Linear(2, 2), language, **TRAIN)


MEASURE = dict(task="state@2", pairs=64, trace_pairs=32, trace_probes=3, trace_batch=16, probe_sentences=200,
               probe_train=60, probe_test=40, probe_splits=2)


@pytest.mark.parametrize("kind", ["bert", "gpt2"])
def test_measure_gives_the_gap_the_invariant_traces_and_the_probe(language, kind):
    model = hf.model_for(language, kind, seed=0, **TINY)
    if kind == "bert":
        hf.train_mlm(model, language, **TRAIN)
    before = _state(model)
    m = hf.measure(model, language, **MEASURE)
    assert _same_weights(before, _state(model))  # measured, not changed
    assert your_model.failed_checks(m) == []
    assert m["trace_full"] <= m["trace_norm"] <= m["trace_raw"]
    assert m["rescaled_full"] == pytest.approx(m["trace_full"], rel=your_model.INVARIANCE_RTOL)
    assert abs(m["rescaled_raw"] - m["trace_raw"]) > 0.01 * m["trace_raw"]  # the raw trace is not invariant
    assert m["groups"] == len(hf.symmetry_groups(model)) and m["max_deviation"] < 1e-4
    assert 0 < m["bayes"] <= 1 and 0 <= m["probe"] <= 1 and 0 < m["chance"] <= m["bayes"]
    assert set(m["seconds"]) == {"gap", "hutchinson", "full_gauge", "rescaled", "probe"}
    tokens = hf.TokenMap.for_language(language)
    if kind == "bert":  # the gap is exact_gap's on the validation pairs
        assert m["gap"] == hf.exact_gap(model, tokens, hf.mlm_rows(language, tokens, 64))["gap"]
    table = your_model.measurement_table(m)
    assert table.loc["full-gauge invariant trace", "value"] == m["trace_full"]
    assert hf.measure(model, language, **MEASURE)["trace_full"] == m["trace_full"]  # deterministic


@pytest.mark.parametrize("override, match", [
    ({"task": "state@9"}, "task"), ({"trace_pairs": 65}, "trace_pairs"),
    ({"trace_probes": 1}, "trace_probes"), ({"seed": -1}, "seed"),
])
def test_measure_refuses_bad_arguments(language, override, match):
    with pytest.raises(ValueError, match=match):
        hf.measure(hf.model_for(language, "bert", seed=0, **TINY), language, **{**MEASURE, **override})


def test_failed_checks_name_what_is_out_of_place(language):
    model = hf.model_for(language, "bert", seed=0, **TINY)
    history = hf.train_mlm(model, language, **TRAIN)
    m = hf.measure(model, language, **MEASURE)
    assert your_model.failed_checks(m, history) == []
    broken = {**m, "rescaled_full": m["trace_full"] * 1.01, "probe": 0.9, "probe_ci95": 0.01, "bayes": 0.5,
              "bayes_se": 0.001, "special_mass": 1.5,
              "trace_norm": m["trace_raw"] * 2, "gap_full": math.nan}
    problems = "\n".join(your_model.failed_checks(broken))
    for words in ("full-gauge trace moved", "beats the Bayes accuracy", "special_mass",
                  "LayerNorm-only <= raw", "gap_full = nan"):
        assert words in problems
    flat = hf.TrainHistory(history.table.assign(gap=history.table["gap"].iloc[0]), 1.0, False, 0, None)
    assert "the gap did not fall" in "\n".join(your_model.failed_checks(m, flat))


def test_your_model_figure(language):
    import matplotlib

    matplotlib.use("Agg")
    model = hf.model_for(language, "bert", seed=0, **TINY)
    history = hf.train_mlm(model, language, **TRAIN)
    fig, note = your_model_plots.your_model_figure(history, hf.measure(model, language, **MEASURE),
                                                   epsilon=0.1)
    assert len(fig.axes) == 3 and "95%" in note


# --------------------------------------------------------------------------- the profiles' your_model section
def test_every_profile_has_a_your_model_section():
    from flatlib.profiles import PROFILES, resolve

    for name in PROFILES:
        section = resolve(name)["your_model"]
        assert section["task"] in HMM.random(seed=0, **PROFILES[name]["hmm"]).tasks
    # the cpu section is docs/your_model.md's BERT
    cpu = PROFILES["cpu"]["your_model"]
    assert cpu["model"] == dict(n_layer=2, n_head=4, d_model=64, d_ff=256) and cpu["steps"] == 2400


@pytest.mark.parametrize("override, match", [
    ({"steps": 0}, "your_model.steps"),
    ({"kind": "gpt2"}, "your_model.kind"),
    ({"lr": -1.0}, "your_model.lr"),
    ({"task": "state@9"}, "your_model.task"),
    ({"warmup_steps": 60}, "your_model.warmup_steps"),
    ({"model": {"n_layer": 1, "n_head": 3, "d_model": 16, "d_ff": 32}}, "your_model.model.n_head"),
    ({"measure": {"pairs": 64, "trace_pairs": 128, "trace_probes": 4, "trace_batch": 64,
                  "probe_sentences": 1000, "probe_train": 300, "probe_test": 200, "probe_splits": 2}},
     "your_model.measure.trace_pairs"),
    ({"measure": {"pairs": 512, "trace_pairs": 128, "trace_probes": 4, "trace_batch": 64,
                  "probe_sentences": 500, "probe_train": 300, "probe_test": 200, "probe_splits": 2}},
     "your_model.measure.probe_sentences"),
    ({"measure": {"pairs": 512}}, "your_model.measure: unknown keys"),
    ({"colour": 1}, r"your_model: unknown keys \['colour'\]"),
])
def test_the_your_model_section_is_validated(override, match):
    from flatlib.profiles import resolve

    with pytest.raises(ValueError, match=match):
        resolve("smoke", your_model=override)
