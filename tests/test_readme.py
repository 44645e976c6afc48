"""The README's flatness snippet runs as written (on a tiny run standing in for "the run trained above")."""

import re
from pathlib import Path

from flatlib.runs import RunStore
from flatlib.train import PretrainConfig, load_model, pretrain

README = Path(__file__).resolve().parents[1] / "README.md"


def snippet(containing: str) -> str:
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    found = [b for b in blocks if containing in b]
    assert len(found) == 1, f"expected one README python block with {containing!r}, found {len(found)}"
    return found[0]


def test_the_flatness_snippet_runs_as_written(tmp_path):
    config = PretrainConfig(language={"kind": "hmm", "n_states": 4, "vocab_size": 8, "seq_len": 8,
                                      "concentration": 0.3, "seed": 0},
                            model={"n_layer": 1, "n_head": 2, "d_model": 16, "d_ff": 32}, steps=40, batch_size=64,
                            eval_every=20, checkpoint_every=20, eval_pairs=256, warmup_steps=5, lr=3e-3)
    run = pretrain(config, RunStore(tmp_path), progress=False)
    names = {"run": run, "config": config, "load_model": load_model}
    exec(compile(snippet("full_gauge_trace"), str(README), "exec"), names)  # noqa: S102 - our own README
    raw, inv, full = names["raw"], names["inv"], names["full"]
    # the whole gauge is a minimum over more symmetries than the LayerNorm's: never above it, beyond noise
    assert full.mean <= full.norm_mean + 1e-9 * abs(full.norm_mean)
    assert inv.mean <= inv.raw_mean and full.raw_mean > 0 and raw.mean > 0
