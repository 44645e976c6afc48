"""The arithmetic the benchmarks report (their timings are not tested: performance is measured in bench/)."""

import pytest

from bench.train import ceiling


def test_ceiling_of_a_step_by_hand():
    # a step at 20% of the peak, half of its time in matmuls: the matmuls run at 40% while they run; 40%
    # overall needs the step twice as fast, i.e. every other op free
    bound = ceiling(of_peak=0.2, matmul_share=0.5, target=0.4)
    assert bound == pytest.approx({"matmul_rate": 0.4, "step_time_left": 0.5, "non_matmul_left": 0.0})
    # at 30% with 60% of the time in matmuls: 40% needs the step at 3/4 of its
    # time, the rest at 3/8 of its time
    assert ceiling(0.3, 0.6, 0.4)["non_matmul_left"] == pytest.approx((0.75 - 0.6) / 0.4)


@pytest.mark.parametrize("kind", ["hmm", "pcfg"])
def test_the_live_last_block_is_the_same_function_with_fewer_flops(kind):
    """model(tokens, positions) (the live last block) = every block at every position (bench.train's
    full_logits), gradients included (HMM: no padding; PCFG: padded sentences, so the attention mask
    matters), and the counter sees fewer matmul FLOPs: the last block's attention output projection and
    MLP at one position a sentence instead of all."""
    import torch
    import torch.nn.functional as F
    from torch.utils.flop_counter import FlopCounterMode

    from bench.train import full_logits
    from flatlib.languages import build_language
    from flatlib.profiles import resolve
    from flatlib.runner.census import plan
    from flatlib.training.objective import mask_generator, single_mask_batch, training_corpus
    from flatlib.training.train import new_model

    runs, _ = plan(resolve("smoke"))
    config = next(c for _, c in runs.values() if c.language["kind"] == kind and c.adversarial is None)
    language = build_language(config.language)
    model = new_model(config, language).double()
    for p in model.parameters():  # away from the initialisation's symmetric point
        p.data += 0.3 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel()),
                                    dtype=p.dtype)
    corpus = training_corpus(config, language, 0, None)
    inputs, positions, targets = single_mask_batch(corpus, model.config.mask_id, model.config.pad_id,
                                                   mask_generator(config, 0))
    if kind == "pcfg":
        assert bool((inputs == model.config.pad_id).any())

    def loss_and_grads(logits_of):
        model.zero_grad()
        with FlopCounterMode(display=False) as counter:
            logits = logits_of()
            F.cross_entropy(logits, targets).backward()
        return logits.detach(), [p.grad.clone() for p in model.parameters()], counter.get_total_flops()

    full, full_grads, full_flops = loss_and_grads(lambda: full_logits(model, inputs, positions))
    live, live_grads, live_flops = loss_and_grads(lambda: model(inputs, positions))
    torch.testing.assert_close(live, full, rtol=1e-12, atol=1e-12)
    for a, b in zip(live_grads, full_grads):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    d, ff, rows, length = model.config.d_model, model.config.d_ff, len(inputs), inputs.shape[1]
    # per dead position of the last block: the attention's proj (d^2), the MLP's fc and proj (2 d ff); 6 FLOPs
    # per weight (the queries still come out of qkv everywhere; the attention itself is not a counted matmul)
    assert full_flops - live_flops == 6 * rows * (length - 1) * (d * d + 2 * d * ff)
