"""Where models run: the CPU or a GPU.

Every function that trains or measures a model (``flatlib.training.train.pretrain``, ``load_model`` and the
measurements of ``flatlib.measurement.measure``, which load through it) takes the device from
``default_device()`` unless it is given one:

* ``FLATLIB_DEVICE`` when it is set (``cpu``, ``cuda``, ``cuda:1``, ``mps``): the way to pin a
  notebook, a sweep worker or a whole ``make figures`` to one device (spawned workers inherit it);
* else ``cuda`` when a GPU is visible, else ``cpu``.

The device is not part of a run's key: the same config trained on a GPU and on the CPU is the same
experiment, though not bit for bit the same numbers (float reductions run in another order), so a
run records the device it was trained on in its summary, and a run resumes on the device it is
resumed on. What stays on the CPU, whatever the device: the languages (sampling and the exact
conditionals, float64), the validation set's exact probabilities, the linear probes (float64
L-BFGS) and every tensor saved in a checkpoint (saved from ``.cpu()`` as safetensors, which hold
tensors only: nothing is unpickled on load).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

ENVIRONMENT_VARIABLE = "FLATLIB_DEVICE"


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """``device`` as a ``torch.device`` (``None``: ``default_device()``); a device this machine does
    not have is a ValueError naming the parameter (``device`` or ``FLATLIB_DEVICE``)."""
    name = "device"
    if device is None:
        device, name = os.environ.get(ENVIRONMENT_VARIABLE) or None, ENVIRONMENT_VARIABLE
        if device is None:
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as error:
        raise ValueError(f"{name}: not a device: {device!r} ({error})") from None
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"{name}: {device!r}, but torch sees no CUDA device on this machine")
        if resolved.index is not None and resolved.index >= torch.cuda.device_count():
            raise ValueError(f"{name}: {device!r}, but there are {torch.cuda.device_count()} CUDA devices")
    elif resolved.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"{name}: {device!r}, but MPS is not available on this machine")
    elif resolved.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"{name}: expected 'cpu', 'cuda[:index]' or 'mps', got {device!r}")
    return resolved


def default_device() -> torch.device:
    """``FLATLIB_DEVICE`` if set, else ``cuda`` when available, else ``cpu`` (see the module)."""
    return resolve_device(None)


def module_device(module: nn.Module) -> torch.device:
    """The device of ``module``'s first parameter (the CPU for a module without parameters)."""
    for parameter in module.parameters():
        return parameter.device
    return torch.device("cpu")


@contextmanager
def preserved_rng() -> Iterator[None]:
    """Run a block (typically ``torch.manual_seed(seed)`` then an initialisation) without changing
    the global random state: the CPU generator's and, on a machine with GPUs, every GPU's, since
    ``torch.manual_seed`` reseeds those too."""
    gpus = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=gpus):
        yield


def describe(device: torch.device) -> str:
    """``"cpu"`` or e.g. ``"cuda:0 (NVIDIA H100 80GB HBM3)"``: what a run's summary records."""
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return f"cuda:{index} ({torch.cuda.get_device_name(index)})"
    return str(device)
