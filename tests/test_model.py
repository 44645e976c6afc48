import pytest
import torch

from flatlib.training.model import (
    KVCache,
    Transformer,
    TransformerConfig,
    explicit_attention,
    explicit_attention_on,
    widen,
)


def tiny(causal=False, **kw):
    torch.manual_seed(0)
    config = TransformerConfig(vocab_size=11, max_len=7, n_layer=2, n_head=2, d_model=8, d_ff=16,
                               causal=causal, **kw)
    model = Transformer(config)
    # non-trivial LayerNorm gains and biases, so widening is tested where it can go wrong
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return model


def batch(config, n=5):
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, config.vocab_size, (n, config.max_len), generator=g)
    tokens[0, 5:] = config.pad_id
    tokens[1, 2] = config.mask_id
    return tokens


@pytest.mark.parametrize("causal", [False, True])
def test_fast_and_explicit_attention_agree(causal):
    model = tiny(causal).eval()
    tokens = batch(model.config)
    fast = model(tokens)
    with explicit_attention():
        assert explicit_attention_on()
        slow = model(tokens)
        with explicit_attention(False):  # nested: the fused path, then back
            assert not explicit_attention_on()
            torch.testing.assert_close(model(tokens), fast, atol=0, rtol=0)
        assert explicit_attention_on()
    assert not explicit_attention_on()
    torch.testing.assert_close(fast, slow, atol=1e-5, rtol=1e-5)


def test_explicit_attention_is_twice_differentiable():
    model = tiny().eval()
    tokens = batch(model.config)
    with explicit_attention():
        loss = model(tokens).logsumexp(-1).mean()
        params = [p for p in model.parameters()]
        grads = torch.autograd.grad(loss, params, create_graph=True)
        v = [torch.randn_like(p) for p in params]
        hvp = torch.autograd.grad(sum((g * u).sum() for g, u in zip(grads, v)), params)
    assert all(torch.isfinite(h).all() for h in hvp)
    assert sum(h.abs().sum() for h in hvp) > 0


def test_padding_does_not_leak():
    """A padded sentence gets the same outputs as the same sentence without its padding."""
    model = tiny().eval()
    tokens = batch(model.config)  # row 0: 5 words, then padding
    torch.testing.assert_close(model(tokens[:1])[0, :5], model(tokens[:1, :5])[0], atol=1e-6, rtol=0)


def test_causal_model_ignores_the_future():
    model = tiny(causal=True).eval()
    tokens = batch(model.config)
    changed = tokens.clone()
    changed[:, 4:] = 3
    torch.testing.assert_close(model(changed)[:, :4], model(tokens)[:, :4])


@pytest.mark.parametrize("explicit", [False, True])
def test_cache_runs_a_causal_sequence_in_pieces(explicit):
    """Positions run in pieces through a KVCache get the logits of the whole sequence at once."""
    model = tiny(causal=True).double().eval()
    tokens = batch(model.config)[2:]  # no padding, no mask token
    whole = model(tokens)
    cache = [KVCache() for _ in model.blocks]
    with explicit_attention(explicit):
        pieces = [model(tokens[:, a:b], cache=cache) for a, b in ((0, 3), (3, 4), (4, 7))]
    torch.testing.assert_close(torch.cat(pieces, dim=1), whole, atol=1e-12, rtol=0)
    assert all(len(c) == 7 and c.keys.shape == (3, 2, 7, 4) for c in cache)
    with pytest.raises(ValueError, match="max_len"):
        model(tokens[:, :1], cache=cache)
    with pytest.raises(ValueError, match="causal"):
        tiny().eval()(tokens, cache=[KVCache(), KVCache()])
    with pytest.raises(ValueError, match="one KVCache per block"):
        model(tokens, cache=[KVCache()])
    with pytest.raises(ValueError, match="padding"):
        model(batch(model.config)[:1], cache=[KVCache(), KVCache()])


@pytest.mark.parametrize("factor", [1, 2, 3])
@pytest.mark.parametrize("causal", [False, True])
def test_widen_preserves_the_function(factor, causal):
    model = tiny(causal).eval()
    tokens = batch(model.config)
    wide = widen(model, factor).eval()
    assert wide.config.d_model == 8 * factor and wide.config.n_head == 2 * factor
    assert wide.n_params() > model.n_params() or factor == 1
    torch.testing.assert_close(wide(tokens), model(tokens), atol=1e-5, rtol=0)
    with explicit_attention():
        torch.testing.assert_close(wide(tokens), model(tokens), atol=1e-5, rtol=0)


def test_widen_in_float64_is_exact():
    model = tiny().double().eval()
    tokens = batch(model.config)
    torch.testing.assert_close(widen(model, 4).eval()(tokens), model(tokens), atol=1e-12, rtol=0)


def test_bad_configs_raise():
    with pytest.raises(ValueError, match="d_model"):
        TransformerConfig(vocab_size=5, max_len=4, n_head=3, d_model=8)
    with pytest.raises(ValueError, match="n_layer"):
        TransformerConfig(vocab_size=5, max_len=4, n_layer=0)
    with pytest.raises(ValueError, match="factor"):
        widen(tiny(), 0)
    with pytest.raises(ValueError, match="tokens: length"):
        tiny()(torch.zeros(1, 9, dtype=torch.long))


def test_logits_at_positions_and_unmasked_fast_path():
    model = tiny().eval()
    tokens = batch(model.config)
    positions = torch.tensor([0, 2, 6, 3, 1])
    full = model(tokens)
    torch.testing.assert_close(model(tokens, positions), full[torch.arange(5), positions])
    # rows without padding take the mask-free attention path; same numbers as inside a padded batch
    torch.testing.assert_close(model(tokens[1:]), full[1:], atol=1e-6, rtol=0)
    assert model.attention_mask(tokens[1:]) is None and model.attention_mask(tokens) is not None


@pytest.mark.parametrize("bad", [True, 2.0])
@pytest.mark.parametrize("name", ["vocab_size", "max_len", "n_layer", "n_head", "d_model", "d_ff"])
def test_config_integers_reject_bools_and_floats(name, bad):
    sizes = dict(vocab_size=5, max_len=4, n_layer=1, n_head=1, d_model=8, d_ff=16)
    with pytest.raises(ValueError, match=f"{name}: expected an integer >= 1, got {bad!r}"):
        TransformerConfig(**{**sizes, name: bad})


@pytest.mark.parametrize("bad", [True, 2.0])
def test_widen_factor_rejects_bools_and_floats(bad):
    with pytest.raises(ValueError, match=f"factor: expected an integer >= 1, got {bad!r}"):
        widen(tiny(), bad)


@pytest.mark.parametrize("explicit", [False, True])
def test_live_last_block_is_the_whole_model_at_the_positions(explicit):
    """model(tokens, positions) runs the last block's query side and MLP at ``positions`` only; it is the
    same function as every block at every position, on padded rows too, on both attention paths (the
    explicit one is what second derivatives and vmap use)."""
    torch.manual_seed(0)
    model = Transformer(TransformerConfig(vocab_size=7, max_len=6, n_layer=2, n_head=2, d_model=8,
                                          d_ff=16)).double()
    tokens = torch.randint(0, 7, (5, 6))
    tokens[1, 4:] = model.config.pad_id  # a padded row
    positions = torch.tensor([0, 3, 5, 2, 1])
    with explicit_attention(explicit):
        live = model(tokens, positions)
        full = model.head(model.features(tokens)[torch.arange(5), positions])
        torch.testing.assert_close(live, full, rtol=1e-12, atol=1e-12)
        # per example (vmap over rows, as per-example gradients do) as well
        if explicit:
            one = torch.func.vmap(lambda t, p: model(t[None], p[None])[0])(tokens, positions)
            torch.testing.assert_close(one, full, rtol=1e-12, atol=1e-12)
