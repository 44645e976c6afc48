from contextlib import nullcontext

import pytest
import torch

from flatlib.runner.runs import CorruptCheckpointError, RunStore, atomic_write, config_hash

CONFIG = {"language": {"kind": "hmm", "n_states": 4}, "lr": 1e-3, "steps": 10}


def test_config_hash_is_canonical():
    assert config_hash({"a": 1, "b": [1, 2]}) == config_hash({"b": [1, 2], "a": 1})
    assert config_hash({"a": 1}) != config_hash({"a": 2})
    assert len(config_hash(CONFIG)) == 16


def test_open_find_and_reuse(tmp_path):
    store = RunStore(tmp_path)
    assert store.find(CONFIG) is None and not store.is_finished(CONFIG)
    run = store.open(CONFIG)
    assert store.find(CONFIG).dir == run.dir and not run.finished and not store.is_finished(CONFIG)
    run.write_metrics([{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.5}])
    assert run.metrics()["loss"].tolist() == [2.0, 1.5]
    run.mark_finished({"final_gap": 0.01})
    again = store.open(CONFIG)
    assert again.finished and again.summary()["final_gap"] == 0.01 and store.is_finished(CONFIG)
    assert [r.key for r in store] == [run.key]


def test_edited_config_is_refused(tmp_path):
    store = RunStore(tmp_path)
    run = store.open(CONFIG)
    (run.dir / "config.json").write_text('{"lr": 5}')
    with pytest.raises(RuntimeError, match="refusing"):
        store.open(CONFIG)


def test_checkpoint_round_trip(tmp_path):
    run = RunStore(tmp_path).open(CONFIG)
    tensors = {"model.w": torch.randn(3, 4), "rng": torch.tensor([1, 2, 3], dtype=torch.uint8)}
    run.save_checkpoint(5, tensors, {"lr": 0.1})
    run.save_checkpoint(10, tensors, {"lr": 0.2})
    assert run.checkpoint_steps() == [5, 10]
    ckpt = run.load_checkpoint()
    assert ckpt.step == 10 and ckpt.state == {"lr": 0.2}
    assert torch.equal(ckpt.tensors["model.w"], tensors["model.w"])
    assert run.load_checkpoint(5).state == {"lr": 0.1}
    run.prune_checkpoints(keep=1)
    assert run.checkpoint_steps() == [10]


def test_checkpoint_without_digest_is_incomplete(tmp_path):
    run = RunStore(tmp_path).open(CONFIG)
    run.save_checkpoint(5, {"w": torch.ones(2)}, {})
    path = run.save_checkpoint(10, {"w": torch.ones(2)}, {})
    path.with_suffix(".sha256").unlink()  # as if the process died between the two writes
    assert run.checkpoint_steps() == [5]
    assert run.load_checkpoint().step == 5


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_corrupt_checkpoint_is_detected(tmp_path, damage):
    run = RunStore(tmp_path).open(CONFIG)
    path = run.save_checkpoint(7, {"w": torch.arange(100.0)}, {"x": 1})
    data = bytearray(path.read_bytes())
    if damage == "truncate":
        data = data[: len(data) // 2]
    else:
        data[-5] ^= 0xFF  # a bit flip in the tensor data: still parses, wrong numbers
    path.write_bytes(bytes(data))
    with pytest.raises(CorruptCheckpointError, match="ckpt_00000007"):
        run.load_checkpoint()


def test_atomic_write_leaves_no_temporary_files(tmp_path):
    target = tmp_path / "sub" / "f.txt"
    atomic_write(target, "hello")
    atomic_write(target, b"world")
    assert target.read_text() == "world"
    assert [p.name for p in target.parent.iterdir()] == ["f.txt"]


@pytest.mark.parametrize("name, text", [("config.json", "{not json"), ("FINISHED", ""), ("FINISHED", "[1, 2"),
                                        ("metrics.csv", ""), ("metrics.csv", "\x00\xff")])
def test_garbage_run_files_are_named(tmp_path, name, text):
    """Regression: a bare JSONDecodeError / EmptyDataError, and one bad run broke iterating the store."""
    from flatlib.runner.runs import CorruptRunError

    store = RunStore(tmp_path)
    good, bad = store.open(CONFIG), store.open({**CONFIG, "lr": 2e-3})
    good.mark_finished({"final_gap": 0.01})
    (bad.dir / name).write_bytes(text.encode("latin-1"))
    with pytest.raises(CorruptRunError, match=name):
        if name == "config.json":
            store.open({**CONFIG, "lr": 2e-3})
        elif name == "FINISHED":
            bad.summary()
        else:
            bad.metrics()
    with pytest.warns(UserWarning, match=name) if name == "config.json" else nullcontext():
        keys = [run.key for run in store]
    assert good.key in keys


def test_stray_checkpoint_names_are_ignored(tmp_path):
    run = RunStore(tmp_path).open(CONFIG)
    run.save_checkpoint(5, {"w": torch.zeros(2)}, {})
    for stray in ("ckpt_latest.safetensors", "ckpt_latest.sha256", "ckpt_12.safetensors", "ckpt_12.sha256"):
        (run.dir / stray).write_text("x")
    assert run.checkpoint_steps() == [5]
    assert run.load_checkpoint().step == 5
    run.prune_checkpoints(keep=1)
    assert (run.dir / "ckpt_latest.safetensors").exists()  # not ours: left alone
