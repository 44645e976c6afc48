"""A small pre-LN transformer with a masked-LM head (and a causal mode), in nanoGPT's tone.

Token ids: the language's words are ``0..V-1``; the model's special tokens come after them
(``PAD = V``, ``MASK = V+1``; ``V+2`` and ``V+3``, once CLS and EOS, are reserved and never used,
kept so that embedding shapes, hence checkpoints, stay as they are). The MLM head predicts words only.

Attention has two paths that compute the same function: PyTorch's fused
``scaled_dot_product_attention`` (fast, for training) and an explicit softmax path, which is the one
to use whenever second derivatives are taken (fused kernels are not twice differentiable). One switch
chooses: ``with explicit_attention():`` makes every flatlib attention layer in this process (any
model, also inside a DDP or ``torch.compile`` wrapper) take the explicit path inside the block and
restores the previous setting on exit (``flatlib.measurement.flatness.hessian_mode`` uses it);
``explicit_attention_on()`` says which path is taken. It is a process-wide flag, not a per-model
one (flatlib never runs models concurrently in threads of one process), so a copy of a model
(``widen``, ``rescale_norms``) has no setting to carry over.

A causal model can also run a sequence in pieces: ``KVCache`` holds one attention layer's keys and
values of the positions run so far, and ``model(tokens, cache=caches)`` runs the next positions
attending to them (the teacher language, ``flatlib.languages.teacher``, scores many continuations of
one shared prefix this way).

``widen(model, factor)`` embeds a trained model into one ``factor`` times wider that computes exactly
the same function, so that Hessian traces of models of different sizes can be compared in one
parameterization (as the paper does).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import asdict, dataclass, replace
from functools import partial
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from flatlib.checks import check_bool, check_int, check_number

N_SPECIAL = 4  # PAD, MASK and two reserved ids (once CLS, EOS)

_EXPLICIT_ATTENTION = False  # set by explicit_attention() only


@contextlib.contextmanager
def explicit_attention(enabled: bool = True) -> Iterator[None]:
    """Inside the block, every flatlib attention layer takes the explicit, twice-differentiable
    path (``enabled=False``: the fused one); the previous setting is restored on exit."""
    global _EXPLICIT_ATTENTION
    previous, _EXPLICIT_ATTENTION = _EXPLICIT_ATTENTION, bool(enabled)
    try:
        yield
    finally:
        _EXPLICIT_ATTENTION = previous


def explicit_attention_on() -> bool:
    """Whether attention takes the explicit path now (inside ``explicit_attention()``)."""
    return _EXPLICIT_ATTENTION


@dataclass(frozen=True)
class TransformerConfig:
    vocab_size: int  # the language's words (the MLM head's outputs)
    max_len: int  # longest input sequence
    n_layer: int = 2
    n_head: int = 2
    d_model: int = 64
    d_ff: int = 256  # width of the MLP's hidden layer
    causal: bool = False  # next-token model instead of a bidirectional encoder
    layer_norm_eps: float = 1e-5

    def __post_init__(self) -> None:
        for name in ("vocab_size", "max_len", "n_layer", "n_head", "d_model", "d_ff"):
            check_int(name, getattr(self, name))
        check_bool("causal", self.causal)
        # LayerNorm divides by sqrt(var + eps): eps <= 0 or NaN gives NaN or infinite activations
        check_number("layer_norm_eps", self.layer_norm_eps)
        if self.d_model % self.n_head:
            raise ValueError(f"d_model: {self.d_model} is not divisible by n_head={self.n_head}")

    @property
    def pad_id(self) -> int:
        return self.vocab_size

    @property
    def mask_id(self) -> int:
        return self.vocab_size + 1

    @property
    def n_tokens(self) -> int:
        return self.vocab_size + N_SPECIAL

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class KVCache:
    """One attention layer's keys and values ``[B, H, l, d/H]`` of the ``l`` positions run so far
    (empty: None). An attention layer called with a cache attends to the cached keys and values
    before its own and appends its own to the cache. For causal models: a prefix's keys and values do
    not depend on what follows it."""

    keys: Tensor | None = None
    values: Tensor | None = None

    def __len__(self) -> int:
        return 0 if self.keys is None else self.keys.shape[2]

    def extend(self, keys: Tensor, values: Tensor) -> tuple[Tensor, Tensor]:
        """Append ``keys``, ``values`` ``[B, H, s, d/H]``; returns all the cached ones."""
        if self.keys is not None:
            keys, values = torch.cat([self.keys, keys], dim=2), torch.cat([self.values, values], dim=2)
        self.keys, self.values = keys, values
        return keys, values


class SelfAttention(nn.Module):
    def __init__(self, config: TransformerConfig) -> None:
        super().__init__()
        self.n_head = config.n_head
        self.qkv = nn.Linear(config.d_model, 3 * config.d_model)
        self.proj = nn.Linear(config.d_model, config.d_model)

    def forward(self, x: Tensor, mask: Tensor | None, cache: KVCache | None = None) -> Tensor:
        # x: [B, L, d]; mask: [B, 1, L, L'] bool, True where attention is allowed (None: everywhere);
        # L' = L, or len(cache) + L with a cache (whose keys and values come first)
        b, length, d = x.shape
        q, k, v = self.qkv(x).split(d, dim=2)
        q, k, v = (t.view(b, length, self.n_head, d // self.n_head).transpose(1, 2) for t in (q, k, v))
        if cache is not None:
            k, v = cache.extend(k, v)
        if _EXPLICIT_ATTENTION:  # twice differentiable
            scores = (q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1])  # [B, H, L, L]
            if mask is not None:
                scores = scores.masked_fill(~mask, float("-inf"))
            y = F.softmax(scores, dim=-1) @ v
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.proj(y.transpose(1, 2).reshape(b, length, d))

    def forward_at(self, x: Tensor, mask: Tensor | None, positions: Tensor) -> Tensor:
        """``forward(x, mask)[rows, positions]`` ([B, d]: one query a row) computing only that: every
        position's keys and values (the query reads them all), the query, attention and output projection
        at ``positions`` alone. ``qkv`` still runs on every position, once (its per-example gradients stay
        closed forms for ``flatness.fisher_diagonal``); the queries it computes elsewhere are dropped."""
        b, length, d = x.shape
        rows = torch.arange(b, device=x.device)
        q, k, v = self.qkv(x).split(d, dim=2)
        q = q[rows, positions].view(b, 1, self.n_head, d // self.n_head).transpose(1, 2)  # [B, H, 1, d/H]
        k, v = (t.view(b, length, self.n_head, d // self.n_head).transpose(1, 2) for t in (k, v))
        mask = None if mask is None else mask[rows, :, positions][:, :, None, :]  # [B, 1, 1, L]
        if _EXPLICIT_ATTENTION:
            scores = (q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1])  # [B, H, 1, L]
            if mask is not None:
                scores = scores.masked_fill(~mask, float("-inf"))
            y = F.softmax(scores, dim=-1) @ v
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.proj(y.transpose(1, 2).reshape(b, d))


class MLP(nn.Module):
    def __init__(self, config: TransformerConfig) -> None:
        super().__init__()
        self.fc = nn.Linear(config.d_model, config.d_ff)
        self.proj = nn.Linear(config.d_ff, config.d_model)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(F.gelu(self.fc(x)))


class Block(nn.Module):
    """Pre-LN: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, config: TransformerConfig) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.d_model, eps=config.layer_norm_eps)
        self.attn = SelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.d_model, eps=config.layer_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x: Tensor, mask: Tensor | None, cache: KVCache | None = None) -> Tensor:
        x = x + self.attn(self.ln_1(x), mask, cache)
        return x + self.mlp(self.ln_2(x))

    def forward_at(self, x: Tensor, mask: Tensor | None, positions: Tensor) -> Tensor:
        """``forward(x, mask)[rows, positions]`` ([B, d]), with the MLP and the attention's query side run
        at ``positions`` only (``SelfAttention.forward_at``)."""
        x = (x[torch.arange(len(x), device=x.device), positions]
             + self.attn.forward_at(self.ln_1(x), mask, positions))
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    def __init__(self, config: TransformerConfig) -> None:
        super().__init__()
        self.config = config
        self.tok_emb = nn.Embedding(config.n_tokens, config.d_model)
        self.pos_emb = nn.Embedding(config.max_len, config.d_model)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.d_model, eps=config.layer_norm_eps)
        self.head = nn.Linear(config.d_model, config.vocab_size)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def n_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def attention_mask(self, tokens: Tensor) -> Tensor | None:
        """[B, 1, L, L] bool: keys that are not padding (and, if causal, not in the future); None
        when every key is allowed (no padding, not causal), which lets attention skip the mask."""
        padding = tokens == self.config.pad_id
        # (the skip branches on the data, which torch.func.vmap cannot trace: the explicit path,
        # used for second derivatives and per-example gradients, always builds the mask)
        if not self.config.causal and not _EXPLICIT_ATTENTION and not bool(padding.any()):
            return None
        keys = (~padding)[:, None, None, :]
        if self.config.causal:
            length = tokens.shape[1]
            keys = keys & torch.ones(length, length, dtype=torch.bool, device=tokens.device).tril()
        # a padding query with no allowed key would give NaN: let it attend to itself
        eye = torch.eye(tokens.shape[1], dtype=torch.bool, device=tokens.device)
        return keys | eye

    def _cached_mask(self, tokens: Tensor, cache: list[KVCache]) -> tuple[Tensor, int]:
        """The ``[L, start + L]`` causal mask of ``tokens`` continuing the ``start`` cached positions."""
        if not self.config.causal:
            raise ValueError("cache: only a causal model runs a sequence in pieces")
        if len(cache) != len(self.blocks):
            raise ValueError(f"cache: expected one KVCache per block ({len(self.blocks)}), got {len(cache)}")
        if bool((tokens == self.config.pad_id).any()):
            raise ValueError("tokens: no padding when running with a cache")
        start, length = len(cache[0]), tokens.shape[1]
        ones = partial(torch.ones, dtype=torch.bool, device=tokens.device)
        return torch.cat([ones(length, start), ones(length, length).tril()], dim=1), start

    def features(self, tokens: Tensor, cache: list[KVCache] | None = None) -> Tensor:
        """[B, L] model token ids -> [B, L, d_model], the final (layer-normed) representations.

        With ``cache`` (causal models; one ``KVCache`` per block, empty or holding the same ``start``
        earlier positions): ``tokens`` are positions ``start..start+L-1``, attending to the cached
        positions and causally to each other, and their keys and values are appended to ``cache``
        (no padding: every token is one of the sequence)."""
        start, mask = 0, None
        if cache is not None:
            mask, start = self._cached_mask(tokens, cache)
        if start + tokens.shape[1] > self.config.max_len:
            raise ValueError(f"tokens: length {start + tokens.shape[1]} > max_len {self.config.max_len}")
        positions = torch.arange(start, start + tokens.shape[1], device=tokens.device)
        x = self.tok_emb(tokens) + self.pos_emb(positions)
        if cache is None:
            mask = self.attention_mask(tokens)
        for i, block in enumerate(self.blocks):
            x = block(x, mask, None if cache is None else cache[i])
        return self.ln_f(x)

    def forward(self, tokens: Tensor, positions: Tensor | None = None,
                cache: list[KVCache] | None = None) -> Tensor:
        """[B, L] model token ids -> [B, L, V] logits over the language's words; with
        ``positions`` [B], only each row's logits at its position, [B, V] (the head is the largest
        matmul of a small model: skip it where nothing is predicted). ``cache``: see ``features``
        (``positions`` then index the new tokens).

        With ``positions`` (and no cache) the last block runs only what those logits read (the *live last
        block*, ``Block.forward_at``): its keys and values at every position, its query, attention output
        and MLP at ``positions``. The same function (float rounding aside: tests/test_model.py), with
        9 of the last block's 12 d^2 (d_ff = 4d) multiply-adds a position skipped at every other position
        (bench/train.py measures the step)."""
        if positions is None or cache is not None or not len(self.blocks):
            features = self.features(tokens, cache)
            if positions is not None:
                features = features[torch.arange(len(tokens), device=tokens.device), positions]
            return self.head(features)
        if tokens.shape[1] > self.config.max_len:
            raise ValueError(f"tokens: length {tokens.shape[1]} > max_len {self.config.max_len}")
        x = self.tok_emb(tokens) + self.pos_emb(torch.arange(tokens.shape[1], device=tokens.device))
        mask = self.attention_mask(tokens)
        for block in self.blocks[:-1]:
            x = block(x, mask)
        return self.head(self.ln_f(self.blocks[-1].forward_at(x, mask, positions)))


@torch.no_grad()
def widen(model: Transformer, factor: int) -> Transformer:
    """A model ``factor`` times wider (d_model, d_ff and the number of heads) computing the same
    function.

    The residual stream of the wide model is ``factor`` copies of the narrow one, ``x' = [x, ..., x]``.
    This is what makes LayerNorm work: the copies have the same mean and variance as ``x``, so
    ``LN(x') = [LN(x), ..., LN(x)]`` with tiled gain and bias. (Zero-padding ``x`` instead would
    change both statistics; that is the trap the authors' enlarge.py falls into.) A linear map
    between copied vectors gets blocks ``W / factor`` (each output copy averages the input copies);
    the head, whose output is not copied, gets ``[W, ..., W] / factor``. Heads are copied too
    (``n_head * factor`` heads of the same size), so every attention pattern is unchanged.
    """
    check_int("factor", factor)
    c = model.config
    wide_config = replace(c, d_model=c.d_model * factor, d_ff=c.d_ff * factor, n_head=c.n_head * factor)
    reference = next(model.parameters())
    wide = Transformer(wide_config).to(device=reference.device, dtype=reference.dtype)

    def tile(t: Tensor) -> Tensor:  # a vector living in a copied space
        return t.repeat(factor)

    def copy_to_copy(w: Tensor) -> Tensor:  # [out, in] between copied spaces
        return torch.kron(torch.ones(factor, factor, dtype=w.dtype, device=w.device), w) / factor

    def linear(dst: nn.Linear, src: nn.Linear) -> None:
        dst.weight.copy_(copy_to_copy(src.weight))
        dst.bias.copy_(tile(src.bias))

    def layer_norm(dst: nn.LayerNorm, src: nn.LayerNorm) -> None:
        dst.weight.copy_(tile(src.weight))
        dst.bias.copy_(tile(src.bias))

    wide.tok_emb.weight.copy_(model.tok_emb.weight.repeat(1, factor))
    wide.pos_emb.weight.copy_(model.pos_emb.weight.repeat(1, factor))
    d = c.d_model
    for wb, b in zip(wide.blocks, model.blocks):
        layer_norm(wb.ln_1, b.ln_1)
        layer_norm(wb.ln_2, b.ln_2)
        # qkv: the narrow output is [q | k | v]; each of q, k, v becomes its own copied space
        w, bias = b.attn.qkv.weight, b.attn.qkv.bias
        wb.attn.qkv.weight.copy_(torch.cat([copy_to_copy(w[i * d:(i + 1) * d]) for i in range(3)]))
        wb.attn.qkv.bias.copy_(torch.cat([tile(bias[i * d:(i + 1) * d]) for i in range(3)]))
        linear(wb.attn.proj, b.attn.proj)
        linear(wb.mlp.fc, b.mlp.fc)
        linear(wb.mlp.proj, b.mlp.proj)
    layer_norm(wide.ln_f, model.ln_f)
    wide.head.weight.copy_(model.head.weight.repeat(1, factor) / factor)
    wide.head.bias.copy_(model.head.bias)
    return wide


# ---------------------------------------------------------------------------- the LayerNorm gauge
def gauge_pairs(model: Transformer) -> list[tuple[str, str]]:
    """``(norm, reader)`` module names: each LayerNorm and the one linear map that reads its output
    (``blocks.i.ln_1 -> blocks.i.attn.qkv``, ``blocks.i.ln_2 -> blocks.i.mlp.fc``, ``ln_f -> head``).

    In a pre-LN transformer a LayerNorm's output ``u = gamma * n + beta`` feeds only its reader
    ``y = W u + b``. Scaling coordinate ``i`` of the norm's affine, ``(gamma_i, beta_i) -> c_i
    (gamma_i, beta_i)``, and the reader's column ``W[:, i] -> W[:, i] / c_i`` leaves ``y``, hence
    the whole function, unchanged (``rescale_norms``). The pairs act on disjoint parameters.
    (``ln_f``'s output is also what ``features`` returns; a probe that standardises its features,
    as ``flatlib.measurement.downstream.linear_probe`` does, cannot see the rescaling either.)"""
    pairs = []
    for i in range(len(model.blocks)):
        pairs += [(f"blocks.{i}.ln_1", f"blocks.{i}.attn.qkv"), (f"blocks.{i}.ln_2", f"blocks.{i}.mlp.fc")]
    return pairs + [("ln_f", "head")]


@torch.no_grad()
def rescale_norms(model: Transformer, scales: dict[str, Tensor | float]) -> Transformer:
    """A copy of ``model`` with LayerNorm ``name``'s gain and bias multiplied by ``scales[name]``
    (a positive scalar or a ``[d_model]`` vector) and its reader's columns divided by it: the same
    function in other coordinates (see ``gauge_pairs``). ``scales`` keys must be norms of
    ``gauge_pairs(model)``; norms not named are left as they are."""
    readers = dict(gauge_pairs(model))
    unknown = sorted(set(scales) - set(readers))
    if unknown:
        raise ValueError(f"scales: {unknown} are not LayerNorms of the model (expected some of "
                         f"{sorted(readers)})")
    out = Transformer(model.config).to(next(model.parameters()))
    out.load_state_dict(model.state_dict())
    modules = dict(out.named_modules())
    for name, scale in scales.items():
        norm, reader = modules[name], modules[readers[name]]
        c = torch.as_tensor(scale, dtype=norm.weight.dtype, device=norm.weight.device).expand_as(norm.weight)
        if not bool(torch.all(c > 0)) or not bool(torch.all(torch.isfinite(c))):
            raise ValueError(f"scales: {name}'s scale must be positive and finite")
        norm.weight.mul_(c)
        norm.bias.mul_(c)
        reader.weight.div_(c)  # [out, d_model]: column i / c_i
    return out
