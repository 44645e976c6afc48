"""Issue 13: bad input is named, nothing stale is reused, nothing silently wrong."""

import pytest

from flatlib.languages import HMM, PCFG, TeacherLM
from flatlib.profiles import resolve
from flatlib.train import build_language

TINY = {"hmm": {"kind": "hmm", "n_states": 3, "vocab_size": 4, "seq_len": 4},
        "pcfg": {"kind": "pcfg", "depth": 2, "n_types": 2, "n_per_level": 3, "n_binary_rules": 2,
                 "vocab_size": 6, "words_per_preterminal": 2},
        "teacher": {"kind": "teacher", "vocab_size": 5, "seq_len": 4, "n_topics": 2, "d_model": 16}}


@pytest.mark.parametrize("kind", sorted(TINY))
@pytest.mark.parametrize("seed", [None, -1, 2**64, 1.5, True])
def test_a_language_needs_an_integer_seed(kind, seed):
    """Regression: seed None kept one run key but drew a new language on every build."""
    with pytest.raises(ValueError, match="^language.seed: "):
        build_language({**TINY[kind], "seed": seed})
    constructor = {"hmm": HMM, "pcfg": PCFG, "teacher": TeacherLM}[kind]
    kwargs = {k: v for k, v in TINY[kind].items() if k != "kind"}
    with pytest.raises(ValueError, match="^seed: "):
        constructor.random(**kwargs, seed=seed)


def test_a_seed_is_the_same_language_every_time():
    spec = {**TINY["hmm"], "seed": 2**63 - 1}
    assert (build_language(spec).transition == build_language(spec).transition).all()


@pytest.mark.parametrize("name", ["seed", "language_seed"])
def test_profile_seeds_must_fit(name):
    with pytest.raises(ValueError, match=f"^{name}: "):
        resolve("smoke", **{name: 2**64})
