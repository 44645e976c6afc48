"""What one unit of the story costs on this machine: seconds per optimizer step (of each kind of step
the profile trains), per evaluation of the gap, and per cached measurement (of each kind). Times
``flatlib.runner.census.plan``'s counts, they predict where ``make figures`` spends its time
(``python -m flatlib.runner.census --profile P --costs bench/results/costs_P.json``) before it runs.

How each cost is measured, single-threaded (as the sweeps' workers run), in a temporary run store:

* a step: for each ``census.step_class`` of the profile, one of its configs started from scratch
  (``init_from`` dropped: a step costs the same wherever it starts) is trained twice, for ``n1`` and
  ``n2`` steps with no evaluation in between; ``(t2 - t1) / (n2 - n1)`` leaves out the set-up (the
  language, the validation set, the first and last evaluation, the checkpoints), which a real run pays
  once; ``n2`` is chosen so that the difference takes about ``--target`` seconds;
* an evaluation: ``flatlib.training.objective.evaluate`` on the config's validation set, best of three;
* a measurement: ``flatlib.measurement.measure``'s cached measurement (checkpoint: gap, probes, both traces;
  widened trace; fine-tuning) of a one-step model of each ``census.measure_class``, once. An
  untrained model's probe fits need not cost what a trained model's do (with probe protocol 2 its grid walk
  stops where its validation accuracy stops improving); on the cpu profile (2026-12-07) a one-step 2x64
  model's checkpoint measurement took 36.7 s (HMM) and 65.2 s (PCFG), a trained clock anneal's 27.9 s and
  59.3 s (profiled, one thread).

Not counted: a run's set-up (the language, the validation set, loading), notebook 02's gauge
measurements, the lookup-table probes, notebooks 01 and 06: the prediction is a lower bound.

    python -m bench.costs --profile cpu      # 8.3 min here (2026-12-07); writes bench/results/costs_cpu.json
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import torch

from bench.common import cpu_model, print_table
from flatlib.analysis.algorithms import protocol as protocol_of
from flatlib.languages import build_language
from flatlib.measurement.measure import measure_checkpoint, measure_finetune, measure_widened_trace
from flatlib.profiles import PROFILES, resolve
from flatlib.runner.census import eval_class, measure_class, plan, step_class
from flatlib.runner.runs import RunStore
from flatlib.training.objective import evaluate, validation_set
from flatlib.training.train import PretrainConfig, new_model, pretrain

RESULTS_DIR = Path(__file__).resolve().parent / "results"
MAX_TIMED_STEPS = 5000  # if the rough estimate is swamped by set-up noise, do not time for an hour


def _fresh(config: PretrainConfig, steps: int) -> PretrainConfig:
    """``config`` from scratch for ``steps`` steps, evaluated and checkpointed only at the end."""
    return replace(config, init_from=None, steps=steps, warmup_steps=0, eval_every=steps,
                   checkpoint_every=steps, stop_gap=None, extra_steps=0)


def _seconds(work: Callable[[], Any]) -> float:
    start = time.perf_counter()
    work()
    return time.perf_counter() - start


def step_seconds(config: PretrainConfig, store: RunStore, target_s: float) -> float:
    """Seconds per optimizer step of ``config``'s kind, set-up excluded (see the module doc)."""
    def train(steps: int) -> float:  # in a store of its own: never a finished run of an earlier call
        start = time.perf_counter()
        run = pretrain(_fresh(config, steps), RunStore(tempfile.mkdtemp(dir=store.root)), progress=False)
        seconds = time.perf_counter() - start
        if run.summary().get("steps") != steps:
            raise RuntimeError(f"{step_class(config)}: the timing run stopped at step "
                               f"{run.summary().get('steps')} of {steps} (diverged?)")
        return seconds

    train(1)  # builds what later runs find cached (the language, the validation set)
    n1 = 5
    t1 = min(train(n1) for _ in range(2))
    rough = (train(n1 + 20) - t1) / 20
    n2 = n1 + min(MAX_TIMED_STEPS, max(40, round(target_s / max(rough, 1e-4))))
    return max(min(train(n2) for _ in range(2)) - t1, 0.0) / (n2 - n1)


def eval_seconds(config: PretrainConfig) -> float:
    language = build_language(config.language)
    model = new_model(config, language)
    val = validation_set(config, language)
    evaluate(model, val)
    return min(_seconds(lambda: evaluate(model, val)) for _ in range(3))


def measure_seconds(kind: str, config: PretrainConfig, width: int | None, params: dict[str, Any],
                    store: RunStore) -> float:
    run = pretrain(_fresh(config, 1), store, progress=False)
    protocol = protocol_of(params)
    if kind == "checkpoint":
        return _seconds(lambda: measure_checkpoint(run, 1, protocol))
    if kind == "widened_trace":
        return _seconds(lambda: measure_widened_trace(run, 1, width, protocol))
    epochs = params["model_size"]["finetune_epochs"]
    return _seconds(lambda: measure_finetune(run, 1, protocol, epochs=epochs))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--profile", default="cpu", choices=sorted(PROFILES))
    parser.add_argument("--target", type=float, default=2.0, help="seconds of timed steps per step kind")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    params = resolve(args.profile)
    runs, measured = plan(params)
    steps: dict[str, PretrainConfig] = {}
    evals: dict[str, PretrainConfig] = {}
    for _, config in runs.values():
        steps.setdefault(step_class(config), config)
        evals.setdefault(eval_class(config), config)
    measures: dict[str, tuple[str, PretrainConfig, int | None]] = {}
    for m in measured:
        measures.setdefault(measure_class(m.kind, m.config, m.width), (m.kind, m.config, m.width))
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        store = RunStore(tmp)
        step_s = {name: step_seconds(c, store, args.target) for name, c in steps.items()}
        eval_s = {name: eval_seconds(c) for name, c in evals.items()}
        measure_s = {name: measure_seconds(kind, c, w, params, store)
                     for name, (kind, c, w) in measures.items()}
    report = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "profile": args.profile,
              "torch": torch.__version__, "threads": 1,
              "machine": f"{cpu_model()}, {torch.get_num_threads()} thread",
              "step_s": step_s, "eval_s": eval_s, "measure_s": measure_s,
              "wall_s": time.perf_counter() - started}
    rows = ([("step", k, f"{v * 1e3:.2f} ms") for k, v in step_s.items()]
            + [("evaluation", k, f"{v:.3f} s") for k, v in eval_s.items()]
            + [("measurement", k, f"{v:.1f} s") for k, v in measure_s.items()])
    print_table(("unit", "class", "cost"), rows, text_columns=2)
    out = args.out or RESULTS_DIR / f"costs_{args.profile}.json"
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {out}; predict with: python -m flatlib.runner.census --profile {args.profile} --costs "
          f"{out}")


if __name__ == "__main__":
    main()
