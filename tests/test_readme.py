"""The README's five library snippets run as written, in order, in one namespace (each reads what the
ones before it defined), at a smaller size: fewer steps, sentences and probes, substituted in the text.
Each substitution must find its text, so a snippet that changes fails here until this test follows it."""

import math
import os
import re
from pathlib import Path

import pytest
import torch

README = Path(__file__).resolve().parents[1] / "README.md"

# (text in the snippet, what the test runs instead)
SMALLER = {
    "hmm.sample(2000, seed=0)": "hmm.sample(500, seed=0)",
    "pcfg.sample(500, seed=0)": "pcfg.sample(100, seed=0)",
    "steps=3000, batch_size=256)":
        "steps=60, batch_size=64, eval_every=20, checkpoint_every=20, eval_pairs=512)",
    "warmup_steps=200": "warmup_steps=10",
    "n_probes=12": "n_probes=3",
}


def snippets() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def smaller(code: str) -> str:
    for full, small in SMALLER.items():
        code = code.replace(full, small)
    return code


def test_the_readme_has_five_snippets_and_every_substitution_applies():
    blocks = snippets()
    assert len(blocks) == 5, f"expected the README's five python snippets, found {len(blocks)}"
    text = "".join(blocks)
    for full in SMALLER:
        assert full in text, f"README no longer contains {full!r}: update tests/test_readme.py"


@pytest.fixture(scope="module")
def namespace(tmp_path_factory):
    """The first four snippets run (the fifth needs transformers), in a folder of their own: the run store
    "runs" lands there."""
    folder, here, threads = tmp_path_factory.mktemp("readme"), os.getcwd(), torch.get_num_threads()
    names: dict = {"folder": folder}
    os.chdir(folder)
    try:
        for k, code in enumerate(snippets()[:4]):
            exec(compile(smaller(code), f"README.md snippet {k + 1}", "exec"), names)  # noqa: S102
        run = names["run"]
        names.update(finished=run.finished, metrics=run.metrics(), run_dir=Path(run.dir).resolve())
    finally:
        os.chdir(here)
        torch.set_num_threads(threads)
    return names


def test_1_exact_optimal_losses(namespace):
    """Exact optimal losses and a Bayes accuracy in range; exact conditionals are distributions."""
    hmm, pcfg = namespace["hmm"], namespace["pcfg"]
    loss = hmm.optimal_mlm_loss(namespace["corpus"])
    assert 0 < loss.mean < math.log(hmm.vocab_size) and loss.stderr > 0
    bayes = hmm.bayes_accuracy(namespace["corpus"], "state@3")
    assert 1 / hmm.n_states < bayes.mean <= 1
    sentences, p = namespace["sentences"], namespace["p"]
    assert p.shape == (len(sentences.lengths), sentences.tokens.shape[1], pcfg.vocab_size)
    real = sentences.mask
    assert torch.allclose(p[real].sum(-1), torch.ones(int(real.sum()), dtype=p.dtype), atol=1e-6)
    assert 0 < pcfg.optimal_mlm_loss(sentences).mean < math.log(pcfg.vocab_size)


def test_2_training_lowers_the_gap(namespace):
    """The run is finished, in the store the snippet named, and its gap falls and stays a KL (>= 0)."""
    assert namespace["finished"] and namespace["run_dir"].is_relative_to(namespace["folder"].resolve())
    gaps = namespace["metrics"]["gap"].dropna()
    assert len(gaps) >= 2 and gaps.iloc[-1] < gaps.iloc[0] and (gaps >= 0).all()


def test_3_the_exact_gap_is_the_recorded_one(namespace):
    """evaluate() on the validation pairs gives the gap the run recorded at its last step."""
    stats = namespace["evaluate"](namespace["model"], namespace["val"])
    assert stats["gap"] == pytest.approx(namespace["metrics"]["gap"].dropna().iloc[-1], rel=1e-6)
    assert stats["val_loss"] - stats["val_optimum"] == pytest.approx(stats["gap_paired"], abs=1e-9)


def test_4_fixing_the_gauge_never_raises_the_trace(namespace):
    """Full gauge <= LayerNorm only (the same estimate) and LayerNorm only <= raw, beyond rounding."""
    raw, inv, full = namespace["raw"], namespace["inv"], namespace["full"]
    assert raw.mean > 0 and inv.mean <= inv.raw_mean and full.raw_mean > 0
    assert full.mean <= full.norm_mean + 1e-9 * abs(full.norm_mean)


def test_5_a_huggingface_model(namespace, capsys):
    """The HF snippet: evaluate()'s keys and more, a full softmax never closer than the words' one, an
    untrained BERT further from the optimum than the trained flatlib model, and its full-gauge trace."""
    pytest.importorskip("transformers")
    names, threads = dict(namespace), torch.get_num_threads()
    try:
        exec(compile(smaller(snippets()[4]), "README.md snippet 5", "exec"), names)  # noqa: S102 - our README
    finally:
        torch.set_num_threads(threads)
    assert "special_mass" in capsys.readouterr().out
    trained = names["evaluate"](names["model"], names["val"])
    gap = names["hf"].exact_gap(names["bert"], names["tokens"], names["val"])
    assert set(trained) <= set(gap) and 0 < gap["special_mass"] < 1
    assert gap["gap"] > trained["gap"] > 0 and gap["gap_full"] >= gap["gap"]
    full = names["bert_full"]
    assert math.isfinite(full.mean) and full.mean <= full.norm_mean + 1e-9 * abs(full.norm_mean)
