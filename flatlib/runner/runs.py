"""The run store: every training run in a directory keyed by a hash of its whole config.

```
runs/<hash>/config.json           the config (the hash is of this, canonical JSON)
runs/<hash>/metrics.csv           one row per evaluation
runs/<hash>/ckpt_00001000.safetensors   model + optimizer tensors, metadata in the header
runs/<hash>/ckpt_00001000.sha256  written after the checkpoint: its digest (no digest = incomplete)
runs/<hash>/FINISHED              the run's summary (JSON, with its own SHA-256); present = complete
runs/<hash>/.lock                 the writers' lock (an OS file lock: ``Run.writing``)
```

A checkpoint holds the metrics rows up to its step, so a resumed run rewrites ``metrics.csv`` from
it (a truncated or edited file is never trusted); ``FINISHED`` records the SHA-256 of
``metrics.csv`` and the step and digest of the final checkpoint, and a finished run whose files no
longer match is a ``CorruptRunError`` naming the file (delete ``FINISHED`` to rebuild the metrics
from the final checkpoint). ``FINISHED`` carries the SHA-256 of its own content
(``finished_sha256``), so a one-digit edit of a summary number is caught when it is read; a marker
written before that field existed is cross-checked against the last row of ``metrics.csv``.

Several processes may share one store (two notebooks at once, a Slurm array, a colleague): a writer
holds the run's lock (``fcntl.flock`` on ``<run>/.lock``) while it trains, so a second writer of the
same run waits and then returns the first one's finished run instead of redoing or overwriting it;
measurement cache entries are locked the same way (``file_lock``). On one machine these are kernel
locks: released when the holder exits or is killed. On NFS, Linux maps ``flock`` to NFS byte-range
locks, which hold across machines where the server supports locking (NFSv4; NFSv3 with lockd);
elsewhere (some FUSE or object-store mounts) they may be advisory no-ops: give each such store one
writer at a time.

Every write is atomic (a temporary file in the same directory, then ``os.replace``), so a crash
leaves either the old file or the new one. Checkpoints are safetensors (no pickled code runs on
load) and are verified against their digest before use: a corrupt or truncated checkpoint raises
``CorruptCheckpointError`` naming the file; it is never silently used.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import io
import json
import os
import re
import secrets
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import pandas as pd
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch import Tensor

DEFAULT_ROOT = Path(os.environ.get("FLATLIB_RUNS", Path(__file__).resolve().parents[2] / "runs"))


FINISHED_DIGEST = "finished_sha256"  # FINISHED's own digest: SHA-256 of its canonical JSON without this key


def _digest(data: bytes | str) -> str:
    return hashlib.sha256(data.encode() if isinstance(data, str) else data).hexdigest()


class CorruptRunError(RuntimeError):
    """A run file that cannot be parsed, or that does not match what the run's finished marker
    records."""


class CorruptCheckpointError(CorruptRunError):
    """A checkpoint whose bytes do not match its recorded digest, or that cannot be parsed."""


def read_json_object(path: Path) -> dict[str, Any]:
    """A run file's JSON object; anything else is a ``CorruptRunError`` naming the file."""
    try:
        value = json.loads(Path(path).read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise CorruptRunError(f"{path}: not valid JSON ({error})") from None
    if not isinstance(value, dict):
        raise CorruptRunError(f"{path}: expected a JSON object, got {type(value).__name__}")
    return value


def canonical_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=False)


def config_hash(config: dict) -> str:
    """16 hex digits of the SHA-256 of the config's canonical JSON."""
    return hashlib.sha256(canonical_json(config).encode()).hexdigest()[:16]


def atomic_write(path: Path, data: bytes | str) -> None:
    """Write ``data`` to ``path`` so that readers see the old file or the whole new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # not mkstemp, which creates files 0600 whatever the umask (a shared store would be unreadable
    # to colleagues): 0666 less the umask, like any file
    tmp = path.parent / f".{path.name}.{secrets.token_hex(8)}.tmp"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    except OSError as error:  # a read-only store, a full disk: name the file we were writing, not the temp
        raise _named(error, path) from None
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as error:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(error, OSError):
            raise _named(error, path) from None
        raise


def _named(error: OSError, path: Path) -> OSError:
    """The same kind of OSError (PermissionError, ...), its message naming ``path`` and what to do."""
    advice = {errno.ENOSPC: "the disk is full: free space and rerun (nothing finished is lost)",
              errno.EDQUOT: "the disk quota is exceeded: free space and rerun (nothing finished is lost)",
              errno.EACCES: "not writable: check the folder's permissions, or point FLATLIB_RUNS at a "
                            "writable store",
              errno.EROFS: "the file system is read-only: point FLATLIB_RUNS at a writable store"}
    reason = advice.get(error.errno or 0, error.strerror or str(error))
    return type(error)(error.errno, f"cannot write {path}: {reason}")


def writable(error: BaseException) -> bool:
    """False for the OSErrors of a store that cannot be written (permissions, read-only file system)."""
    return not (isinstance(error, OSError) and error.errno in (errno.EACCES, errno.EPERM, errno.EROFS))


@contextlib.contextmanager
def file_lock(path: Path, what: str) -> Iterator[None]:
    """Hold an exclusive OS lock (``fcntl.flock``) on ``path`` (created if need be) for the block;
    another process asking for it waits, saying once on stderr what it waits for (``what``). The
    kernel releases the lock when its holder exits or is killed, so a crashed writer never leaves a
    stale lock behind. An OSError (e.g. a read-only store) names ``path``."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as error:
        raise _named(error, path) from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"waiting for another process that holds {path} ({what})", file=sys.stderr, flush=True)
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock


@dataclass
class Checkpoint:
    step: int
    tensors: dict[str, Tensor]
    state: dict[str, Any]  # JSON-able: optimizer hyper-parameters, counters...


class Run:
    """One run's directory. Create through ``RunStore.open``."""

    def __init__(self, directory: Path, config: dict) -> None:
        self.dir = Path(directory)
        self.config = config

    @property
    def key(self) -> str:
        return self.dir.name

    def __repr__(self) -> str:
        return f"Run({self.key}, {'finished' if self.finished else 'partial'})"

    # ---------------------------------------------------------------- metrics
    @property
    def metrics_path(self) -> Path:
        return self.dir / "metrics.csv"

    def metrics(self) -> pd.DataFrame:
        """The metrics; for a finished run, checked against the checksum ``FINISHED`` records."""
        vouched = self._vouched("metrics_sha256")
        if not self.metrics_path.exists():
            if vouched is not None:
                raise CorruptRunError(f"{self.metrics_path}: missing, but the run is finished")
            return pd.DataFrame()
        data = self.metrics_path.read_bytes()
        if vouched is not None and hashlib.sha256(data).hexdigest() != vouched:
            raise CorruptRunError(f"{self.metrics_path}: does not match the SHA-256 recorded in "
                                  "FINISHED (truncated or edited); delete FINISHED to rewrite it from "
                                  "the final checkpoint")
        try:
            frame = pd.read_csv(io.BytesIO(data))
        except (ValueError, UnicodeDecodeError) as error:  # pandas' ParserError, EmptyDataError
            raise CorruptRunError(f"{self.metrics_path}: unreadable ({error})") from None
        if "step" not in frame.columns:
            raise CorruptRunError(f"{self.metrics_path}: no 'step' column "
                                  f"(columns {list(frame.columns)[:5]})")
        return frame

    def write_metrics(self, rows: list[dict]) -> None:
        """Replace the metrics with ``rows`` (atomically: the file is small)."""
        atomic_write(self.metrics_path, pd.DataFrame(rows).to_csv(index=False))

    # ---------------------------------------------------------------- checkpoints
    def checkpoint_path(self, step: int) -> Path:
        return self.dir / f"ckpt_{step:08d}.safetensors"

    def _checkpoint_files(self) -> Iterator[tuple[int, Path]]:
        """(step, path) of every file named as ``checkpoint_path`` names them; other files that
        start with ``ckpt_`` (a user's ``ckpt_latest``) are not ours and are ignored."""
        for path in self.dir.glob("ckpt_*.safetensors"):
            match = re.fullmatch(r"ckpt_(\d{8,})\.safetensors", path.name)
            if match and self.checkpoint_path(int(match[1])) == path:
                yield int(match[1]), path

    def checkpoint_steps(self) -> list[int]:
        """Steps of the complete checkpoints (those with a digest), in order."""
        return sorted(step for step, path in self._checkpoint_files() if path.with_suffix(".sha256").exists())

    def save_checkpoint(self, step: int, tensors: dict[str, Tensor], state: dict[str, Any]) -> Path:
        path = self.checkpoint_path(step)
        tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
        data = save_safetensors(tensors, metadata={"state": canonical_json({"step": step, **state})})
        atomic_write(path, data)
        atomic_write(path.with_suffix(".sha256"), hashlib.sha256(data).hexdigest())
        return path

    def load_checkpoint(self, step: int | None = None) -> Checkpoint | None:
        """The checkpoint at ``step`` (default: the latest complete one; for a finished run, the final
        one its ``FINISHED`` records, which must be there), verified; None if none."""
        final = self._vouched("checkpoint")
        if step is None and final is not None:
            path = self.checkpoint_path(final["step"])
            digest_path = path.with_suffix(".sha256")
            if not digest_path.exists() or digest_path.read_text().strip() != final["sha256"]:
                raise CorruptRunError(f"{path}: the run's final checkpoint (recorded in FINISHED) is missing "
                                      "or incomplete; delete the run directory to retrain it")
            step = final["step"]
        steps = self.checkpoint_steps()
        if step is None:
            if not steps:
                return None
            step = steps[-1]
        path = self.checkpoint_path(step)
        digest_path = path.with_suffix(".sha256")
        if not path.exists() or not digest_path.exists():
            raise FileNotFoundError(f"no complete checkpoint at step {step} in {self.dir}")
        data = path.read_bytes()
        if hashlib.sha256(data).hexdigest() != digest_path.read_text().strip():
            marker = " and the run's FINISHED" if self.finished else ""
            raise CorruptCheckpointError(
                f"{path}: contents do not match the recorded SHA-256 (truncated or corrupted); "
                f"delete it (with its .sha256{marker}) to resume from the previous checkpoint"
            )
        try:
            tensors = load_safetensors(data)
            header_len = int.from_bytes(data[:8], "little")
            state = json.loads(json.loads(data[8 : 8 + header_len])["__metadata__"]["state"])
        except (SafetensorError, ValueError, KeyError) as error:
            raise CorruptCheckpointError(f"{path}: unreadable ({error})") from None
        return Checkpoint(int(state.pop("step")), tensors, state)

    def prune_checkpoints(self, keep: int) -> None:
        """Delete all but the last ``keep`` complete checkpoints (and any incomplete ones)."""
        complete = self.checkpoint_steps()
        keep_steps = set(complete[-keep:]) if keep > 0 else set()
        for step, path in list(self._checkpoint_files()):
            if step not in keep_steps:
                path.with_suffix(".sha256").unlink(missing_ok=True)
                path.unlink(missing_ok=True)

    # ---------------------------------------------------------------- completion
    @property
    def finished(self) -> bool:
        return (self.dir / "FINISHED").exists()

    def writing(self) -> contextlib.AbstractContextManager[None]:
        """The run's writers' lock (see the module): hold it to train, resume or finish the run."""
        return file_lock(self.dir / ".lock", f"it is training run {self.key}")

    def verified(self) -> "Run":
        """This finished run, after checking every file its ``FINISHED`` vouches for: the marker's own
        digest, ``metrics.csv``'s SHA-256 and the final checkpoint's bytes. A ``CorruptRunError``
        naming the file otherwise (what ``pretrain`` checks before returning a finished run)."""
        self.metrics()  # FINISHED's digest (through summary) and metrics.csv's
        final = self._vouched("checkpoint")
        if final is not None:
            self.load_checkpoint()  # the recorded final checkpoint, verified against its digest
        return self

    def mark_finished(self, summary: dict[str, Any]) -> None:
        """Write ``FINISHED``: ``summary`` plus what it vouches for, the SHA-256 of ``metrics.csv``
        and the step and digest of the last complete checkpoint (None where there are none)."""
        integrity: dict[str, Any] = {"metrics_sha256": None, "checkpoint": None}
        if self.metrics_path.exists():
            integrity["metrics_sha256"] = hashlib.sha256(self.metrics_path.read_bytes()).hexdigest()
        steps = self.checkpoint_steps()
        if steps:
            digest = self.checkpoint_path(steps[-1]).with_suffix(".sha256").read_text().strip()
            integrity["checkpoint"] = {"step": steps[-1], "sha256": digest}
        body = {**summary, **integrity}
        body.pop(FINISHED_DIGEST, None)
        atomic_write(self.dir / "FINISHED",
                     canonical_json({**body, FINISHED_DIGEST: _digest(canonical_json(body))}))

    def _vouched(self, key: str) -> Any:
        """What ``FINISHED`` records under ``key`` (None for an unfinished run, or an older marker)."""
        return self.summary().get(key) if self.finished else None

    def summary(self) -> dict[str, Any]:
        """The summary ``FINISHED`` records, checked: against its own SHA-256, or (a marker older than
        that field) against the last row of ``metrics.csv``. A ``CorruptRunError`` naming the file."""
        if not self.finished:
            raise RuntimeError(f"{self}: not finished")
        path = self.dir / "FINISHED"
        body = read_json_object(path)
        recorded = body.pop(FINISHED_DIGEST, None)
        if recorded is None:
            self._cross_check(body, path)
        elif recorded != _digest(canonical_json(body)):
            raise CorruptRunError(f"{path}: does not match its recorded SHA-256 (edited or damaged); delete "
                                  "FINISHED and rerun the same pretrain: it rewrites it from the final "
                                  "checkpoint")
        return body

    def _cross_check(self, body: dict[str, Any], path: Path) -> None:
        """An older ``FINISHED`` (no digest of its own): its final gap and loss must be the last
        metrics row's, and that file must be the one it vouches for."""
        if not self.metrics_path.exists() or body.get("metrics_sha256") is None:
            return
        data = self.metrics_path.read_bytes()
        if _digest(data) != body["metrics_sha256"]:
            return  # metrics() reports that, naming metrics.csv
        try:
            last = pd.read_csv(io.BytesIO(data)).iloc[-1]
        except (ValueError, UnicodeDecodeError, IndexError):
            return  # likewise
        for key, column in (("final_gap", "gap"), ("final_gap_se", "gap_se"), ("final_val_loss", "val_loss")):
            value = body.get(key)
            if (value is not None and column in last.index and pd.notna(last[column])
                    and value != float(last[column])):
                raise CorruptRunError(f"{path}: {key} = {value} but the last row of {self.metrics_path} says "
                                      f"{float(last[column])} (edited?); delete FINISHED and rerun the same "
                                      "pretrain: it rewrites it from the final checkpoint")


class RunStore:
    """A folder of runs keyed by config hash (default ``runs/`` in the repository, or
    ``$FLATLIB_RUNS``)."""

    def __init__(self, root: str | Path | None = None) -> None:
        self.root = Path(root) if root is not None else DEFAULT_ROOT

    def path(self, config: dict) -> Path:
        return self.root / config_hash(config)

    def open(self, config: dict) -> Run:
        """The run of ``config``: existing (finished or partial) or newly created."""
        directory = self.path(config)
        config_path = directory / "config.json"
        if config_path.exists():
            stored = read_json_object(config_path)
            if canonical_json(stored) != canonical_json(config):
                raise RuntimeError(f"{config_path}: hash collision or edited config; refusing to reuse it")
        else:
            atomic_write(config_path, json.dumps(config, sort_keys=True, indent=2))
        return Run(directory, config)

    def find(self, config: dict) -> Run | None:
        """The run of ``config`` if it exists."""
        directory = self.path(config)
        return Run(directory, config) if (directory / "config.json").exists() else None

    def is_finished(self, config: dict) -> bool:
        """Whether the run of ``config`` exists and is finished (``pretrain`` would return it at once)."""
        run = self.find(config)
        return run is not None and run.finished

    def __iter__(self) -> Iterator[Run]:
        """Every run with a readable config; an unreadable one is skipped with a warning naming it
        (one bad directory must not hide the others)."""
        for config_path in sorted(self.root.glob("*/config.json")):
            try:
                config = read_json_object(config_path)
            except CorruptRunError as error:
                warnings.warn(f"skipping a run: {error}", stacklevel=2)
                continue
            yield Run(config_path.parent, config)
