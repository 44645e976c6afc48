"""Device placement (flatlib.device): the choice of device, and training and measuring on it.

On a machine without a GPU the CUDA tests are skipped; the CPU ones run the same code paths (every
``.to(device)`` is then a no-op), so they check that nothing else changed."""

import pytest
import torch
from run_helpers import interrupt

from flatlib.device import ENVIRONMENT_VARIABLE, default_device, describe, module_device, resolve_device
from flatlib.measurement.measure import Protocol, measure_checkpoint, measure_finetune, measure_widened_trace
from flatlib.profiles import resolve
from flatlib.runner.runs import RunStore
from flatlib.training.train import PretrainConfig, load_model, pretrain

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")


def smoke_config(**overrides) -> PretrainConfig:
    params = resolve("smoke")
    language = {"kind": "hmm", "seed": 0, **params["hmm"]}
    settings = dict(model=params["pretraining"]["model"], lr=3e-3, warmup_steps=5, steps=40, batch_size=32,
                    eval_every=20, eval_pairs=256, checkpoint_every=20, seed=0)
    return PretrainConfig(language=language, **{**settings, **overrides})


def test_resolve_device_names_and_errors(monkeypatch):
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(torch.device("cpu")) == torch.device("cpu")
    with pytest.raises(ValueError, match="^device: expected"):
        resolve_device("xla")
    with pytest.raises(ValueError, match="^device: not a device"):
        resolve_device("no such device")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="^device: 'cuda'.*no CUDA device"):
            resolve_device("cuda")


def test_default_device_follows_the_environment(monkeypatch):
    monkeypatch.setenv(ENVIRONMENT_VARIABLE, "cpu")
    assert default_device() == torch.device("cpu")
    monkeypatch.setenv(ENVIRONMENT_VARIABLE, "bogus")
    with pytest.raises(ValueError, match=f"^{ENVIRONMENT_VARIABLE}: not a device"):
        default_device()
    monkeypatch.delenv(ENVIRONMENT_VARIABLE)
    assert default_device().type == ("cuda" if torch.cuda.is_available() else "cpu")


def test_a_device_this_machine_lacks_fails_before_anything_is_written(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    store = RunStore(tmp_path)
    with pytest.raises(ValueError, match="^device:"):
        pretrain(smoke_config(), store, progress=False, device="cuda")
    assert not any(tmp_path.iterdir())


def test_the_summary_records_the_device_and_checkpoints_are_cpu_tensors(tmp_path):
    run = pretrain(smoke_config(), RunStore(tmp_path), progress=False, device="cpu")
    assert run.summary()["device"] == "cpu" and run.summary()["processes"] == 1
    checkpoint = run.load_checkpoint()
    assert all(t.device.type == "cpu" for t in checkpoint.tensors.values())
    assert module_device(load_model(run, device="cpu")) == torch.device("cpu")
    assert describe(torch.device("cpu")) == "cpu"


@cuda
def test_training_on_the_gpu_matches_the_cpu_run(tmp_path):
    """The same config on both devices: the same initial weights (initialised on the CPU) and data,
    so the loss curves agree to float error (reductions run in another order) and the GPU run's
    checkpoints are CPU tensors that load on either device."""
    config = smoke_config()
    on_cpu = pretrain(config, RunStore(tmp_path / "cpu"), progress=False, device="cpu")
    on_gpu = pretrain(config, RunStore(tmp_path / "gpu"), progress=False, device="cuda")
    assert on_gpu.summary()["device"].startswith("cuda:")
    first_cpu, first_gpu = on_cpu.metrics().iloc[0], on_gpu.metrics().iloc[0]
    assert first_gpu["gap"] == pytest.approx(first_cpu["gap"], rel=1e-4)  # before any step: same weights
    assert on_gpu.summary()["final_gap"] == pytest.approx(on_cpu.summary()["final_gap"], rel=5e-3)
    assert all(t.device.type == "cpu" for t in on_gpu.load_checkpoint().tensors.values())
    assert module_device(load_model(on_gpu, device="cuda")).type == "cuda"
    assert module_device(load_model(on_gpu, device="cpu")).type == "cpu"


@cuda
def test_measurements_on_the_gpu_match_the_cpu(tmp_path, monkeypatch):
    """One checkpoint (trained twice on the CPU, bit-identical, so that each copy has its own cache)
    measured on each device: the gap, the trace (the same Rademacher probes on both: they are drawn on
    the CPU), the widened trace and the probes and fine-tuning agree to float error."""
    config = smoke_config()
    runs = {name: pretrain(config, RunStore(tmp_path / name), progress=False, device="cpu")
            for name in ("cpu", "cuda")}
    protocol = Protocol(probe_sentences=600, probe_train=300, probe_test=200, probe_splits=2, trace_pairs=128,
                        trace_probes=8, trace_batch=64)
    out = {}
    for name, run in runs.items():
        monkeypatch.setenv(ENVIRONMENT_VARIABLE, name)  # measurements load models on default_device()
        out[name] = {"checkpoint": measure_checkpoint(run, config.steps, protocol),
                     "wide": measure_widened_trace(run, config.steps, 2 * config.model["d_model"], protocol),
                     "finetune": measure_finetune(run, config.steps, protocol, epochs=1)}
    cpu, gpu = out["cpu"], out["cuda"]
    assert gpu["checkpoint"]["gap"] == pytest.approx(cpu["checkpoint"]["gap"], rel=1e-4)
    assert gpu["checkpoint"]["trace"] == pytest.approx(cpu["checkpoint"]["trace"], rel=1e-3)
    for task, probe in cpu["checkpoint"]["probes"].items():
        assert gpu["checkpoint"]["probes"][task]["accuracy"] == pytest.approx(probe["accuracy"], abs=0.02)
    assert gpu["wide"]["max_logit_change"] < 1e-4
    assert gpu["wide"]["trace"] == pytest.approx(cpu["wide"]["trace"], rel=1e-3)
    for task, accuracy in cpu["finetune"]["accuracy"].items():
        assert gpu["finetune"]["accuracy"][task] == pytest.approx(accuracy, abs=0.03)


@cuda
def test_adversarial_training_runs_on_the_gpu(tmp_path):
    """The adversary's head lives on the CPU (float64), the model on the GPU: the objective's gradient
    crosses devices. The run finishes near the CPU run (the head is refit on features that differ by
    float error, so not bit for bit)."""
    adversarial = {"weight": 0.1, "task": "state@3", "refit_every": 5, "head_sentences": 100,
                   "batch_sentences": 32}
    config = smoke_config(adversarial=adversarial)
    on_cpu = pretrain(config, RunStore(tmp_path / "cpu"), progress=False, device="cpu")
    on_gpu = pretrain(config, RunStore(tmp_path / "gpu"), progress=False, device="cuda")
    assert not on_gpu.summary()["diverged"]
    assert on_gpu.summary()["final_gap"] == pytest.approx(on_cpu.summary()["final_gap"], abs=0.01)
    assert on_gpu.metrics()["adv_accuracy"].iloc[1:].notna().all()


@cuda
def test_a_gpu_run_resumes_on_the_gpu_from_its_cpu_checkpoints(tmp_path):
    """Interrupted after its step-20 checkpoint, a GPU run resumes on the GPU from the saved (CPU)
    tensors and ends where the uninterrupted run ended (to float error: GPU kernels need not be
    bitwise deterministic)."""
    config = smoke_config()
    store = RunStore(tmp_path)
    whole = pretrain(config, store, progress=False, device="cuda")
    final_gap = whole.summary()["final_gap"]
    interrupt(whole, drop_steps=(40,))
    resumed = pretrain(config, store, progress=False, device="cuda")
    assert resumed.finished and resumed.summary()["steps"] == config.steps
    assert resumed.summary()["final_gap"] == pytest.approx(final_gap, rel=1e-3)
