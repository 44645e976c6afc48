"""Does today's exact-probe solver reproduce the probe results stored in a run store, and how fast is it?

The exact probe (``flatlib.measurement.downstream.exact_probe``, probe protocol 2) is defined by its optimum,
not by its solver: a faster solver that reaches the same optimum to the same gradient tolerance must give
the same accuracies, the same chosen L2 and the same validation and test sweeps. This checks that claim on
checkpoints measured earlier: for the first ``--per-language`` stored protocol-2 checkpoint measurements of
each language in ``--runs`` (run keys in sorted order, at the profile's protocol), it recomputes the
checkpoint's features, the standard probe and the extra probes, and compares every accuracy, L2 choice and
sweep with the stored measurement, exactly. Seconds are CPU seconds of this process on one thread.

    python -m bench.probe_solver --runs runs --profile cpu     # writes bench/results/probe_solver.json
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

import torch

from bench.common import cpu_model, print_table
from flatlib.analysis.algorithms import protocol as protocol_of
from flatlib.languages import build_language
from flatlib.measurement.downstream import model_features
from flatlib.measurement.measure import Protocol, _entry, _extra_probes, _probe, downstream_corpus
from flatlib.profiles import resolve
from flatlib.runner.runs import RunStore, read_json_object
from flatlib.training.train import PretrainConfig, load_model

RESULTS_DIR = Path(__file__).resolve().parent / "results"
COMPARED = ("accuracy", "splits", "l2", "l2_edge", "sweep", "sweep_val")


def stored_measurements(root: Path, protocol: Protocol, per_language: int
                        ) -> list[tuple[str, dict[str, Any], Path]]:
    """``(run key, run config, measurement file)``: the first ``per_language`` stored checkpoint
    measurements of each language at ``protocol`` (run keys sorted)."""
    chosen: dict[str, list[tuple[str, dict[str, Any], Path]]] = {}
    key = protocol.key()
    for run_dir in sorted(p for p in root.iterdir() if (p / "config.json").exists()):
        config = read_json_object(run_dir / "config.json")
        evals = run_dir / "evals"
        files = sorted(evals.glob(f"*_{key}.json")) if evals.exists() else []
        if files and len(chosen.setdefault(config["language"]["kind"], [])) < per_language:
            chosen[config["language"]["kind"]].append((run_dir.name, config, files[0]))
    return [item for items in chosen.values() for item in items]


def differences(stored: dict[str, Any], fresh: dict[str, Any], where: str) -> list[str]:
    """Every compared field of every task that differs, as ``where/task/field``."""
    out = []
    for task, result in stored.items():
        for field in COMPARED:
            if field in result and result[field] != fresh.get(task, {}).get(field):
                out.append(f"{where}/{task}/{field}")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=Path, default=Path("runs"), help="the run store to check against")
    parser.add_argument("--profile", default="cpu", help="whose protocol the stored measurements used")
    parser.add_argument("--seed", type=int, default=0, help="the protocol's seed (the notebooks' seed)")
    parser.add_argument("--per-language", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    protocol = protocol_of({**resolve(args.profile), "seed": args.seed})  # the notebooks' protocol
    store, rows, records = RunStore(args.runs), [], []
    for key, run_config, path in stored_measurements(args.runs, protocol, args.per_language):
        stored, problem, _ = _entry(path)  # checked against its SHA-256, read-only
        if stored is None:
            raise SystemExit(f"{path} {problem or 'is missing'}")
        run = store.find(run_config)
        config = PretrainConfig.from_dict(run.config)
        language = build_language(config.language)
        model = load_model(run, stored["step"])
        corpus = downstream_corpus(config.language, protocol.probe_sentences)
        features = model_features(model, corpus)
        start = time.process_time()
        probes = _probe(language, corpus, features, protocol)
        probe_seconds = time.process_time() - start
        extra = _extra_probes(model, language, corpus, features, protocol)
        extra_seconds = time.process_time() - start - probe_seconds
        differ = differences(stored["probes"], probes, "probes")
        for name, results in stored["extra_probes"].items():
            differ += differences(results, extra.get(name, {}), name)
        records.append({"run": key, "step": stored["step"], "language": config.language["kind"],
                        "standard_probe_cpu_s": probe_seconds, "extra_probes_cpu_s": extra_seconds,
                        "differences": differ})
        rows.append((key, config.language["kind"], f"{probe_seconds:.1f}", f"{extra_seconds:.1f}",
                     "identical" if not differ else ", ".join(differ)))
    print_table(("run", "language", "standard probe s", "extra probes s", "vs stored"), rows, text_columns=2)
    RESULTS_DIR.mkdir(exist_ok=True)
    out = RESULTS_DIR / "probe_solver.json"
    out.write_text(json.dumps({"cpu": cpu_model(), "cores": os.cpu_count(), "threads": 1,
                               "load_average": os.getloadavg(), "torch": torch.__version__,
                               "profile": args.profile, "protocol_key": protocol.key(),
                               "date": time.strftime("%Y-%m-%d"), "checkpoints": records}, indent=1) + "\n")
    print(f"wrote {out}")
    return 1 if any(r["differences"] for r in records) else 0


if __name__ == "__main__":
    raise SystemExit(main())
