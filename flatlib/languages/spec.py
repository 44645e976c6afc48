"""Languages from their specs: the JSON-able dicts that name a language in a run's config.

``{"kind": "hmm" | "pcfg" | "teacher", "seed": int, **kwargs}`` builds ``HMM.random`` /
``PCFG.random`` / ``TeacherLM.random`` with those kwargs; ``{"kind": "pcfg_rules", "path": ...,
"sha256": ...}`` parses a rules file (``PCFG.from_rules``). A built language is immutable (nothing
in flatlib assigns to one after construction), so ``build_language`` returns one shared instance
per spec: a config validated, trained and measured builds its language once.
"""

from __future__ import annotations

import hashlib
import json
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch

from flatlib.languages.base import Language
from flatlib.languages.hmm import HMM
from flatlib.languages.pcfg import PCFG
from flatlib.languages.teacher import TeacherLM


def _rules_digest(spec: dict[str, Any]) -> str:
    """The SHA-256 of a ``pcfg_rules`` spec's file; ValueError naming ``language.path``."""
    if "path" not in spec:
        raise ValueError("language.path: missing (the rules file of a 'pcfg_rules' language)")
    try:
        data = Path(spec["path"]).read_bytes()
    except (OSError, TypeError) as error:
        raise ValueError(f"language.path: cannot read the rules file {spec['path']!r} ({error})") from None
    return hashlib.sha256(data).hexdigest()


def complete_language(spec: dict[str, Any]) -> dict[str, Any]:
    """``spec`` as it enters a run's key: a ``pcfg_rules`` spec gains ``sha256``, the hash of its
    file's contents, so that editing the file makes a new run instead of returning the old one (the
    path stays, for humans). Other specs are returned unchanged."""
    if spec.get("kind") != "pcfg_rules" or "sha256" in spec:
        return spec
    return {**spec, "sha256": _rules_digest(spec)}


def build_language(spec: dict[str, Any]) -> Language:
    """A language from its spec: ``{"kind": "hmm" | "pcfg" | "teacher", "seed": int, **kwargs}``
    (the kwargs of ``HMM.random`` / ``PCFG.random`` / ``TeacherLM.random``), or ``{"kind":
    "pcfg_rules", "path": ..., "sha256": ...}`` (``PCFG.from_rules`` keyword arguments besides; a
    file whose contents no longer match ``sha256`` is an error: that run's grammar is gone).
    Invalid specs raise ValueError naming ``language.<field>``.

    Cached: equal specs (as JSON, key order kept: a PCFG's ``task_spans`` order is its tasks'
    order) give the same instance; a rules file is re-hashed on every call, and its digest is part
    of the cache key. Building leaves the global random state alone (a ``TeacherLM`` initialises a
    Transformer before drawing its weights from ``seed``), so a cache hit and a miss are alike."""
    spec = dict(spec)
    if spec.get("kind") == "pcfg_rules":  # check the file now, cached or not
        digest = _rules_digest(spec)
        expected = spec.setdefault("sha256", digest)
        if digest != expected:
            raise ValueError(f"language.path: the rules file {spec['path']!r} has changed since this run "
                             f"was keyed (sha256 {digest[:12]}..., the run's {expected[:12]}...); restore it "
                             "to use this run, or build a new config from the edited file")
    try:
        key = json.dumps(spec)
    except (TypeError, ValueError):  # a value JSON cannot hold: not cacheable, built as given
        return _build(spec)
    return _cached(key)


@lru_cache(maxsize=16)
def _cached(key: str) -> Language:
    return _build(json.loads(key))


def _build(spec: dict[str, Any]) -> Language:
    kind = spec.pop("kind", None)
    try:
        with torch.random.fork_rng(devices=[]):  # the CPU generator (a GPU's is never touched)
            if kind == "hmm":
                return HMM.random(**spec)
            if kind == "pcfg":
                return PCFG.random(**spec)
            if kind == "pcfg_rules":
                path = spec.pop("path")
                spec.pop("sha256")
                return PCFG.from_rules(Path(path), **spec)
            if kind == "teacher":
                return TeacherLM.random(**spec)
    except (TypeError, ValueError) as error:
        raise ValueError(f"language.{error}") from None
    raise ValueError(f"language.kind: expected 'hmm', 'pcfg', 'pcfg_rules' or 'teacher', got {kind!r}")
