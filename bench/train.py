"""How fast does the MLM pre-training step run on this CPU, and how close is it to the hardware?

Measured: the step that ``flatlib.training.train.pretrain`` takes, unchanged: a fresh batch of 256 sentences
from the ``cpu`` profile's HMM (length 10), one masked position per sentence (``single_mask_batch``),
cross-entropy at the masked positions, backward, AdamW step. For three model sizes:

* 2 layers x 64 wide (d_ff 256, 4 heads of 16): the ``cpu`` profile's model,
* 4 x 64 (deeper, same width and heads),
* 4 x 128 (d_ff 512, 8 heads of 16: wider matrices, where matmuls should dominate).

Reported per run: tokens/s (sentences x length: the tokens the model processes), achieved FLOP/s
estimated as ``6 x n_params x tokens/s`` (forward 2, backward 4 per parameter and token), and the
share of the step spent producing the batch (the language's sampler and the masking) rather than in
the model. The yardstick is a float32 matmul peak measured in the same run on the same thread count
(best of several square matmuls): achieved / peak says how much of the machine the small model can
use. Target: >= 40% of the peak for the cpu-profile model on one thread. (The pilot's "about 40%"
was its 2x64 model, 0.045 s a step, against *half its two-thread* peak, 95 GFLOP/s; on one thread
this machine's peak is ~175 GFLOP/s, against which the pilot's step is ~24%.)

Then, for the cpu-profile model, where the step's time goes by kind of op (torch.profiler, eager,
one thread): the matmuls, the fused attention kernel, GELU, LayerNorm, the loss, the optimizer. On
10-token sentences with 16-wide heads the attention kernel and the exact (erf) GELU are not
matmuls and cost a third of the step, which is what keeps the small model from the matmul peak.

Beside the default (eager, fused attention, ``--threads`` threads, default 1):

* ``torch.compile`` of the forward + loss (backward through AOTAutograd; the optimizer stays eager),
  in a child process with a time limit, since its warm-up costs tens of seconds on this CPU (the
  "first step" column; inductor's on-disk cache makes it much shorter on later runs);
* explicit attention (``with flatlib.training.model.explicit_attention():``, the twice-differentiable path
  that the flatness computations use) for the 2x64 model;
* one process with 2 threads vs two single-threaded processes side by side, as aggregate tokens/s:
  on a 2-core machine this decides whether to parallelise inside a run or run two runs at once;
* the live last block (``Transformer.forward`` with ``positions``, what ``pretrain`` runs): the same
  logits and gradients, but the last block computes only what the masked positions' logits read. With
  one masked position a sentence, running every block at every position (``full_logits``, what the
  other rows time) spends most of the last block on positions nobody reads (for 2 layers of width d,
  d_ff 4d: 9 of the last block's 12 d^2 per position); the row says what skipping them buys.

Timing: warm-up steps first; their speed fixes the number of timed steps (about ``target_s``
seconds); the timed steps' total wall time gives tokens/s. The load average is recorded at start and
end: other work on the machine slows every row, and a busy machine is flagged in the output.

    python -m bench.train                # full run (a few minutes)
    python -m bench.train --quick        # small sizes, a smoke test (writes train_quick.json)
    python -m bench.train --no-compile   # skip torch.compile
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import os
import platform
import queue as queue_module
import time
import traceback
from dataclasses import asdict, dataclass, replace
from datetime import datetime
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from bench import common
from bench.common import cpu_model
from flatlib.languages import Language
from flatlib.profiles import build_languages, resolve
from flatlib.training.model import Transformer, explicit_attention
from flatlib.training.objective import mask_generator, single_mask_batch, training_corpus
from flatlib.training.train import PretrainConfig, learning_rate, make_optimizer, new_model

RESULTS_DIR = Path(__file__).resolve().parent / "results"
PEAK_TARGET = 0.40  # achieved / matmul peak for the cpu-profile model
BUSY_LOAD = 0.5  # a 1-minute load average above this at start: other work is running
PROFILE = "cpu"
MODELS: dict[str, dict[str, int]] = {
    "2x64": dict(resolve(PROFILE)["pretraining"]["model"]),  # the cpu profile's model (4 heads of 16)
    "4x64": {"n_layer": 4, "n_head": 4, "d_model": 64, "d_ff": 256},
    "4x128": {"n_layer": 4, "n_head": 8, "d_model": 128, "d_ff": 512},
}
CPU_MODEL = "2x64"


# ----------------------------------------------------------------------------- one measurement
@dataclass(frozen=True)
class Spec:
    """One training-throughput measurement."""

    model: str  # a key of MODELS
    batch_size: int = 256
    threads: int = 1  # torch threads of each process
    compile: bool = False
    explicit: bool = False  # the explicit (twice-differentiable) attention path
    live: bool = False  # model(inputs, positions) (the live last block) instead of full_logits
    warmup_steps: int = 5
    target_s: float = 3.0  # timed steps: about this long, from the warm-up's speed
    steps: int | None = None  # or exactly this many (the side-by-side processes must agree)


@dataclass
class Result:
    label: str
    model: str
    threads: int  # per process
    processes: int = 1
    n_params: int = 0
    steps: int = 0  # timed steps per process
    tokens_per_step: int = 0  # per process: sentences x length
    tokens_per_s: float = math.nan  # aggregate over the processes
    data_share: float = math.nan  # of step time: sampling + masking
    sample_share: float = math.nan  # of step time: the language's sampler alone
    warmup_s: float = math.nan  # the first step (with torch.compile: the compilation)
    error: str | None = None  # why there is no number (torch.compile failing, a time-out)

    def flops(self) -> float:
        return 6 * self.n_params * self.tokens_per_s

    def of_peak(self, peaks: dict[int, float]) -> float:
        """Achieved / the matmul peak of the same resources: ``processes`` x the peak on ``threads``
        (two single-threaded processes are held to twice the one-thread peak)."""
        return self.flops() / (self.processes * peaks[self.threads])


def _setup(model_name: str,
           batch_size: int) -> tuple[PretrainConfig, Language, Transformer, torch.optim.Optimizer]:
    """What ``pretrain`` builds for ``MODELS[model_name]`` on the profile's HMM: config, language,
    the model (in training mode) and its optimizer."""
    params = resolve(PROFILE)
    language = build_languages(params)["hmm"]
    config = PretrainConfig(language={"kind": "hmm", "seed": params["language_seed"], **params["hmm"]},
                            model=MODELS[model_name], batch_size=batch_size)
    model = new_model(config, language).train()
    return config, language, model, make_optimizer(config, model)


def full_logits(model: Transformer, tokens: Tensor, positions: Tensor) -> Tensor:
    """The logits at one position a row ([B, V]) with every block run at every position, the head at
    ``positions`` only: how ``Transformer.forward`` computed them before the live last block (the bench's
    rows other than "live last block" time this, so that they compare with earlier results)."""
    features = model.features(tokens)
    return model.head(features[torch.arange(len(tokens), device=tokens.device), positions])


def measure(spec: Spec, barrier: Any = None) -> Result:
    """Train ``spec``'s model as ``pretrain`` does and time it. With a ``barrier``, wait there after
    the warm-up so that side-by-side processes time the same window."""
    with explicit_attention(spec.explicit):
        return _measure(spec, barrier)


def _measure(spec: Spec, barrier: Any) -> Result:
    torch.set_num_threads(spec.threads)
    config, language, model, optimizer = _setup(spec.model, spec.batch_size)
    mc = model.config

    def loss_fn(inputs: torch.Tensor, positions: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        # the head at the masked positions only, as in pretrain (with spec.live: the last block too)
        logits = model(inputs, positions) if spec.live else full_logits(model, inputs, positions)
        return F.cross_entropy(logits, targets, reduction="sum") * (1 / len(inputs))

    # dynamic=False: every batch has the same shape, so one static graph is all it needs
    compute = torch.compile(loss_fn, dynamic=False) if spec.compile else loss_fn
    timers = {"sample": 0.0, "data": 0.0, "model": 0.0}

    def step(i: int) -> None:
        # pretrain's loop body (single-process, single-mask, fresh data), with timers in between
        t0 = time.perf_counter()
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(config, i)
        corpus = training_corpus(config, language, i, None)
        t1 = time.perf_counter()
        inputs, positions, targets = single_mask_batch(corpus, mc.mask_id, mc.pad_id,
                                                       mask_generator(config, i))
        t2 = time.perf_counter()
        loss = compute(inputs, positions, targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        loss.item()  # pretrain reads the loss every step
        t3 = time.perf_counter()
        timers["sample"] += t1 - t0
        timers["data"] += t2 - t0
        timers["model"] += t3 - t2

    start = time.perf_counter()
    step(0)
    warmup_s = time.perf_counter() - start
    start = time.perf_counter()  # the rest of the warm-up, past lazy initialisation, sets the pace
    for i in range(1, spec.warmup_steps):
        step(i)
    per_step = (time.perf_counter() - start) / max(1, spec.warmup_steps - 1)
    steps = spec.steps or max(5, math.ceil(spec.target_s / per_step))
    if barrier is not None:
        barrier.wait()
    timers.update(sample=0.0, data=0.0, model=0.0)
    start = time.perf_counter()
    for i in range(spec.warmup_steps, spec.warmup_steps + steps):
        step(i)
    elapsed = time.perf_counter() - start
    total = timers["data"] + timers["model"]
    return Result(
        label="", model=spec.model, threads=spec.threads, n_params=model.n_params(), steps=steps,
        tokens_per_step=spec.batch_size * language.seq_len,
        tokens_per_s=steps * spec.batch_size * language.seq_len / elapsed,
        data_share=timers["data"] / total, sample_share=timers["sample"] / total, warmup_s=warmup_s,
    )


def _child(spec: Spec, results: mp.Queue, barrier: Any = None) -> None:
    """A spawned process: measure, and send back a Result or the error that stopped it."""
    try:
        results.put(measure(spec, barrier))
    except BaseException as error:  # noqa: BLE001 - the parent reports it
        if barrier is not None:
            barrier.abort()  # do not leave the other process waiting
        last = traceback.format_exception_only(type(error), error)[-1].strip()
        results.put(Result(label="", model=spec.model, threads=spec.threads, error=last[:300]))


def in_processes(spec: Spec, processes: int, timeout_s: float) -> list[Result]:
    """``measure(spec)`` in ``processes`` fresh spawned processes at once (a clean torch each: no
    threads, compiled graphs or allocator state carried over); children past ``timeout_s`` are
    stopped and reported as such."""
    ctx = mp.get_context("spawn")
    results: mp.Queue = ctx.Queue()
    barrier = ctx.Barrier(processes) if processes > 1 else None
    children = [ctx.Process(target=_child, args=(spec, results, barrier), daemon=True)
                for _ in range(processes)]
    for child in children:
        child.start()
    deadline = time.monotonic() + timeout_s
    out: list[Result] = []
    while len(out) < processes:
        try:
            out.append(results.get(timeout=1.0))
        except queue_module.Empty:
            late, dead = time.monotonic() > deadline, not any(child.is_alive() for child in children)
            if late or dead:
                error = f"timed out after {timeout_s:.0f}s" if late else "a child process died"
                out += ([Result(label="", model=spec.model, threads=spec.threads, error=error)]
                        * (processes - len(out)))
    for child in children:
        child.join(timeout=5)
        if child.is_alive():
            child.terminate()  # only our own children, by handle
            child.join()
    return out


def side_by_side(spec: Spec, processes: int, timeout_s: float) -> Result:
    """Aggregate throughput of ``processes`` independent runs timed over the same window."""
    results = in_processes(spec, processes, timeout_s)
    errors = [r.error for r in results if r.error]
    if errors:
        return replace(results[0], processes=processes, error=errors[0])
    # each process timed `steps` steps from the shared barrier: the slowest one closes the window
    slowest = min(r.tokens_per_s for r in results)
    return replace(results[0], processes=processes, tokens_per_s=processes * slowest,
                   data_share=sum(r.data_share for r in results) / processes,
                   sample_share=sum(r.sample_share for r in results) / processes,
                   warmup_s=max(r.warmup_s for r in results))


# ----------------------------------------------------------------------------- where the time goes
OP_GROUPS = (  # (group, substrings of aten op names), first match wins
    ("matmul", ("aten::mm", "aten::addmm", "aten::bmm", "aten::matmul", "aten::linear")),
    ("attention (fused kernel)", ("scaled_dot_product",)),
    ("GELU", ("gelu",)),
    ("LayerNorm", ("layer_norm",)),
    ("softmax / cross-entropy", ("softmax", "nll_loss", "cross_entropy")),
    ("optimizer (AdamW)", ("lerp_", "addcdiv_", "addcmul_", "sqrt", "_foreach")),
    ("copies, fills, embedding", ("copy_", "fill_", "zero_", "cat", "clone", "index", "embedding")),
    ("other element-wise", ("add", "mul", "div", "sum", "sub", "where")),
)


def time_breakdown(model_name: str, batch_size: int, steps: int = 10) -> dict[str, float]:
    """Shares of the model step's self CPU time by kind of op (torch.profiler, one thread, eager,
    ``steps`` steps after a warm-up): what the non-matmul part of the step is made of."""
    from torch.profiler import ProfilerActivity, profile  # noqa: PLC0415

    torch.set_num_threads(1)
    config, language, model, optimizer = _setup(model_name, batch_size)
    mc = model.config
    batches = [single_mask_batch(training_corpus(config, language, i, None), mc.mask_id, mc.pad_id,
                                 mask_generator(config, i)) for i in range(steps + 3)]

    def step(batch: tuple[torch.Tensor, ...]) -> None:
        inputs, positions, targets = batch
        loss = F.cross_entropy(model(inputs, positions), targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    for batch in batches[:3]:
        step(batch)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for batch in batches[3:]:
            step(batch)
    totals: dict[str, float] = {}
    for event in prof.key_averages():
        if not event.key.startswith("aten::"):
            continue  # the profiler's own wrappers (Optimizer.step#..., autograd nodes) overlap the ops
        group = next((g for g, keys in OP_GROUPS if any(k in event.key for k in keys)), "other ops")
        totals[group] = totals.get(group, 0.0) + event.self_cpu_time_total
    total = sum(totals.values())
    return {group: value / total for group, value in sorted(totals.items(), key=lambda kv: -kv[1])}


def matmul_flops(model_name: str, batch_size: int) -> dict[str, int]:
    """The matmul FLOPs of one step (forward and backward) that ``torch.utils.flop_counter`` counts,
    with every block at every position (``full``, ``full_logits``) and with the live last block (``live``)."""
    from torch.utils.flop_counter import FlopCounterMode  # noqa: PLC0415

    config, language, model, _ = _setup(model_name, batch_size)
    inputs, positions, targets = single_mask_batch(training_corpus(config, language, 0, None),
                                                   model.config.mask_id,
                                                   model.config.pad_id, mask_generator(config, 0))
    out = {}
    variants = {"full": lambda: full_logits(model, inputs, positions),
                "live": lambda: model(inputs, positions)}
    for name, logits in variants.items():
        with FlopCounterMode(display=False) as counter:
            F.cross_entropy(logits(), targets).backward()
        out[name] = int(counter.get_total_flops())
    return out


def ceiling(of_peak: float, matmul_share: float, target: float) -> dict[str, float]:
    """What the time breakdown says about the target. The step's FLOPs are (almost) all matmul FLOPs,
    so while the matmuls run they go at ``of_peak / matmul_share`` of the peak: the most the step could
    reach if every other op took no time (``matmul_rate``). To reach ``target`` the step's time must
    fall to ``of_peak / target`` of today's with the matmuls unchanged, so the non-matmul time must
    fall to ``non_matmul_left`` of today's (0 or less: out of reach even with them free)."""
    step_left = of_peak / target
    return {"matmul_rate": of_peak / matmul_share, "step_time_left": step_left,
            "non_matmul_left": (step_left - matmul_share) / (1 - matmul_share)}


# ----------------------------------------------------------------------------- the yardstick
def matmul_peak(threads: int, sizes: tuple[int, ...], repeats: int, min_s: float = 0.1) -> float:
    """Float32 FLOP/s of the fastest square matmul (best of ``repeats``; each repeat runs long
    enough, ``min_s``, for the timer not to matter)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    best = 0.0
    for n in sizes:
        a, b = torch.randn(n, n), torch.randn(n, n)
        out = torch.empty(n, n)
        torch.mm(a, b, out=out)  # warm-up: packing buffers, thread pool
        start = time.perf_counter()
        torch.mm(a, b, out=out)
        calls = max(1, math.ceil(min_s / max(time.perf_counter() - start, 1e-6)))
        for _ in range(repeats):
            start = time.perf_counter()
            for _ in range(calls):
                torch.mm(a, b, out=out)
            best = max(best, 2 * n**3 * calls / (time.perf_counter() - start))
    torch.set_num_threads(previous)
    return best


# ----------------------------------------------------------------------------- report

def finite(d: dict[str, Any]) -> dict[str, Any]:
    """NaN (no measurement) as null: JSON has no NaN."""
    return {k: None if isinstance(v, float) and math.isnan(v) else v for k, v in d.items()}


def print_table(rows: list[Result], peaks: dict[int, float], target_rows: set[int]) -> None:
    header = ("run", "model", "params", "procs x thr", "tokens/s", "GFLOP/s", "of peak", "data %",
              "ms/step", "first step s", f">= {PEAK_TARGET:.0%}?")
    cells = [header]
    for k, r in enumerate(rows):
        if r.error:
            cells.append((r.label, r.model, f"{r.n_params:,}" if r.n_params else "-",
                          f"{r.processes} x {r.threads}", "n/a", "", "", "", "", "", ""))
            continue
        ms = 1e3 * r.tokens_per_step / r.tokens_per_s if r.processes == 1 else math.nan
        cells.append((r.label, r.model, f"{r.n_params:,}", f"{r.processes} x {r.threads}",
                      f"{r.tokens_per_s:,.0f}", f"{r.flops() / 1e9:.1f}", f"{r.of_peak(peaks):.1%}",
                      f"{r.data_share:.1%}", "-" if math.isnan(ms) else f"{ms:.1f}", f"{r.warmup_s:.1f}",
                      ("yes" if r.of_peak(peaks) >= PEAK_TARGET else "NO") if k in target_rows else ""))
    common.print_table(cells[0], cells[1:], text_columns=2)
    for r in rows:
        if r.error:
            print(f"n/a: {r.label} {r.model}: {r.error}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads of the default runs (default 1)")
    parser.add_argument("--quick", action="store_true", help="small sizes: a smoke test, not numbers")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile rows")
    parser.add_argument("--out", type=Path, default=None,
                        help="JSON path (default: bench/results/train.json, or train_quick.json with "
                             "--quick)")
    args = parser.parse_args()
    load_start = os.getloadavg()
    started = time.perf_counter()

    if args.quick:
        sizes = dict(batch_size=32, warmup_steps=2, target_s=0.2, matmul=(256,), repeats=2,
                     compile_models=(CPU_MODEL,), compile_timeout_s=300)
    else:
        sizes = dict(batch_size=256, warmup_steps=5, target_s=3.0, matmul=(256, 512, 1024), repeats=5,
                     compile_models=(CPU_MODEL, "4x128"), compile_timeout_s=240)
    base = dict(batch_size=sizes["batch_size"], warmup_steps=sizes["warmup_steps"],
                target_s=sizes["target_s"])
    if args.quick:
        print("--quick: a smoke test with tiny sizes; the numbers mean little")
    if load_start[0] > BUSY_LOAD:
        print(f"warning: load average {load_start[0]:.2f} at start: other work is running, "
              "every number below is pessimistic")

    thread_counts = sorted({args.threads, 1, 2})  # the runs' threads per process
    peaks = {t: matmul_peak(t, sizes["matmul"], sizes["repeats"]) for t in thread_counts}
    print("float32 matmul peak: " + ", ".join(f"{p / 1e9:.1f} GFLOP/s on {t} thread{'s' * (t > 1)}"
                                              for t, p in peaks.items()), flush=True)

    rows: list[Result] = []
    target_rows: set[int] = set()

    def add(label: str, result: Result, target: bool = False) -> Result:
        result.label = label
        rows.append(result)
        if target:
            target_rows.add(len(rows) - 1)
        status = result.error or f"{result.tokens_per_s:,.0f} tokens/s"
        print(f"  {label:<24} {result.model:<6} {status}  ({time.perf_counter() - started:.0f}s)", flush=True)
        return result

    print("eager, fused attention:", flush=True)
    eager = {name: add(f"eager {args.threads} thr", measure(Spec(name, threads=args.threads, **base)),
                       target=name == CPU_MODEL and args.threads == 1)
             for name in MODELS}
    add("explicit attention", measure(Spec(CPU_MODEL, threads=args.threads, explicit=True, **base)),
        target=args.threads == 1)
    live = add("live last block", measure(Spec(CPU_MODEL, threads=args.threads, live=True, **base)))
    live_flops = matmul_flops(CPU_MODEL, sizes["batch_size"])

    if not args.no_compile:
        print("torch.compile (child process; the first step compiles):", flush=True)
        for name in sizes["compile_models"]:
            spec = Spec(name, threads=args.threads, compile=True, **base)
            add(f"compiled {args.threads} thr", in_processes(spec, 1, sizes["compile_timeout_s"])[0],
                target=name == CPU_MODEL and args.threads == 1)

    print("one process with 2 threads vs two single-threaded processes side by side:", flush=True)
    parallel: dict[str, tuple[Result, Result]] = {}
    for name in MODELS:
        one = measure(Spec(name, threads=2, **base)) if args.threads != 2 else eager[name]
        one = add("1 proc x 2 thr", one) if args.threads != 2 else one
        # the same number of timed steps as the single-thread run, in each process
        steps = eager[name].steps if args.threads == 1 else None
        two = add("2 procs x 1 thr", side_by_side(Spec(name, threads=1, steps=steps, **base), 2, 300))
        parallel[name] = (one, two)
    breakdown = time_breakdown(CPU_MODEL, sizes["batch_size"], steps=3 if args.quick else 10)
    load_end = os.getloadavg()

    print()
    print_table(rows, peaks, target_rows)
    print(f"\nwhere a {CPU_MODEL} step's time goes (eager, 1 thread, torch.profiler self time): "
          + ", ".join(f"{group} {share:.0%}" for group, share in breakdown.items()))
    print()
    for k in sorted(target_rows):
        r = rows[k]
        if not r.error:
            share = r.of_peak(peaks)
            print(f"target ({r.label}, {r.model}): {share:.1%} of the {r.threads}-thread matmul peak, "
                  f"{'met' if share >= PEAK_TARGET else 'NOT met'} (>= {PEAK_TARGET:.0%})")
    bound = None
    target_row = next((rows[k] for k in sorted(target_rows) if not rows[k].error), None)
    if target_row is not None and breakdown.get("matmul"):
        bound = ceiling(target_row.of_peak(peaks), breakdown["matmul"], PEAK_TARGET)
        needs = (f"{PEAK_TARGET:.0%} is met" if bound["non_matmul_left"] >= 1 else
                 f"{PEAK_TARGET:.0%} needs the non-matmul time cut to {bound['non_matmul_left']:.0%} of "
                 "today's")
        print(f"the {CPU_MODEL} matmuls run at {bound['matmul_rate']:.0%} of the peak while they run (the "
              f"step's ceiling with every other op free); {needs} ({1 - breakdown['matmul']:.0%} of the "
              "step: " + ", ".join(f"{g} {v:.0%}" for g, v in breakdown.items() if g != "matmul") + ")")
    if not live.error:
        print(f"live last block ({CPU_MODEL}): {live.tokens_per_s / eager[CPU_MODEL].tokens_per_s:.2f}x the "
              f"eager step's tokens/s, with {live_flops['live'] / live_flops['full']:.0%} of its matmul "
              "FLOPs (counted); its 'of peak' counts the work of the model as written")
    compiled = {r.model: r for r in rows if r.label.startswith("compiled")}
    for name, r in compiled.items():
        if r.error:
            print(f"torch.compile {name}: n/a ({r.error})")
        else:
            print(f"torch.compile {name}: {r.tokens_per_s / eager[name].tokens_per_s:.2f}x eager, "
                  f"first step (compilation) {r.warmup_s:.0f}s")
    for name, (one, two) in parallel.items():
        if one.error or two.error:
            continue
        line = (f"{name}: 2 procs x 1 thr = {two.tokens_per_s / one.tokens_per_s:.2f}x 1 proc x 2 thr "
                f"({two.tokens_per_s:,.0f} vs {one.tokens_per_s:,.0f} tokens/s)")
        if args.threads == 1:  # both against the single-threaded run
            line += ("; over 1 thread, a second thread adds "
                     f"{one.tokens_per_s / eager[name].tokens_per_s - 1:+.0%}, a second process "
                     f"{two.tokens_per_s / eager[name].tokens_per_s - 1:+.0%}")
        print(line)
    print(f"load average: {load_start[0]:.2f} at start, {load_end[0]:.2f} at end"
          + (" (other work was running: numbers are pessimistic)"
             if max(load_start[0], load_end[0]) > BUSY_LOAD else ""))

    out = args.out or RESULTS_DIR / ("train_quick.json" if args.quick else "train.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    report = {
        "date": datetime.now().astimezone().isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "quick": args.quick,
        "threads": args.threads,
        "machine": {"cpu": cpu_model(), "cpu_count": os.cpu_count(), "platform": platform.platform(),
                    "load_average_start": load_start, "load_average_end": load_end,
                    "busy": max(load_start[0], load_end[0]) > BUSY_LOAD},
        "language": {"profile": PROFILE, "name": "hmm", **resolve(PROFILE)["hmm"]},
        "models": MODELS,
        "sizes": sizes,
        "matmul_peak_flops": {str(t): p for t, p in peaks.items()},
        "time_breakdown": {"model": CPU_MODEL, "shares": breakdown},
        "ceiling": bound,
        "live_last_block_matmul_flops": live_flops,
        "target": PEAK_TARGET,
        "results": [finite(asdict(r)) | {"flops": None if r.error else r.flops(),
                                 "of_peak": None if r.error else r.of_peak(peaks),
                                 "target_row": k in target_rows}
                    for k, r in enumerate(rows)],
        "wall_s": time.perf_counter() - started,
    }
    out.write_text(json.dumps(report, indent=2, default=list) + "\n")
    print(f"\nwrote {out} ({report['wall_s']:.0f}s)")


if __name__ == "__main__":
    main()
