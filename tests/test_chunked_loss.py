"""The chunked fused loss: same value and gradients as the plain path, bounded logits."""

from __future__ import annotations

import pytest
import torch

from students.chunked_loss import CHUNKED_KINDS, chunked_kd_loss, unchunked_kd_loss
from students.losses import kd_loss, masked_cross_entropy, sampled_kd


def problem(n=40, d=12, vocab=90, k=6, seed=0, bias=True):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, d, generator=gen).requires_grad_(True)
    weight = (torch.randn(vocab, d, generator=gen) * 0.4).requires_grad_(True)
    b = (torch.randn(vocab, generator=gen) * 0.1).requires_grad_(True) if bias else None
    t_logits = torch.randn(n, vocab, generator=gen) * 2
    vals, ids = torch.log_softmax(t_logits, -1).topk(k, dim=-1)
    ids[0, 1] = vocab + 3  # an id the student lacks
    targets = torch.randint(0, vocab, (n,), generator=gen)
    mask = (torch.rand(n, generator=gen) > 0.3).float()
    draws = torch.multinomial(torch.softmax(t_logits, -1), 8, replacement=True, generator=gen)
    return hidden, weight, b, ids, vals, targets, mask, draws


def grads(out, tensors):
    return torch.autograd.grad(out["loss"], [t for t in tensors if t is not None])


@pytest.mark.parametrize("kind", CHUNKED_KINDS)
@pytest.mark.parametrize("bias", [True, False])
def test_value_and_gradients_match_the_plain_path(kind, bias):
    hidden, weight, b, ids, vals, targets, mask, draws = problem(bias=bias)
    kwargs = dict(kind=kind, alpha=0.6, temperature=2.0, beta=0.3, skew=0.2, lm_head_bias=b)
    if kind == "sampled":
        kwargs.update(draw_ids=draws, draw_counts=torch.ones_like(draws), temperature=1.0)
    for chunk in (1, 7, 40, 1000):  # one row, a remainder chunk, exact, one chunk for all
        got = chunked_kd_loss(hidden, weight, ids, vals, targets, mask, chunk_tokens=chunk, **kwargs)
        ref = unchunked_kd_loss(hidden, weight, ids, vals, targets, mask, **kwargs)
        for key in ("loss", "kd", "ce"):
            assert got[key].item() == pytest.approx(ref[key].item(), rel=1e-5, abs=1e-7), (key, chunk)
        for g, r in zip(grads(got, (hidden, weight, b)), grads(ref, (hidden, weight, b)), strict=True):
            torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-7)


def test_the_plain_reference_is_the_library_loss():
    hidden, weight, b, ids, vals, targets, mask, draws = problem()
    logits = hidden @ weight.T + b
    ref = unchunked_kd_loss(hidden, weight, ids, vals, targets, mask, "jsd", 0.3, 1.5, lm_head_bias=b)
    kd = kd_loss("jsd", logits, ids, vals, mask, 1.5)
    ce = masked_cross_entropy(logits, targets, mask)
    assert ref["loss"].item() == pytest.approx((0.3 * kd + 0.7 * ce).item(), rel=1e-6)
    counts = torch.ones_like(draws)
    got = chunked_kd_loss(
        hidden, weight, None, None, targets, mask, "sampled", 1.0, 1.0, 8, lm_head_bias=b, draw_ids=draws,
        draw_counts=counts,
    )  # fmt: skip
    assert got["kd"].item() == pytest.approx(sampled_kd(logits, draws, counts, mask).item(), rel=1e-5)


def test_mean_is_over_the_total_mask_weight_across_chunks():
    hidden, weight, b, ids, vals, targets, _, _ = problem()
    mask = torch.zeros(40)
    mask[:3] = 1.0
    mask[37:] = 2.0  # float weights; first chunk heavy, middle chunks empty
    got = chunked_kd_loss(hidden, weight, ids, vals, targets, mask, "forward_kl", 0.5, chunk_tokens=4)
    ref = unchunked_kd_loss(hidden, weight, ids, vals, targets, mask, "forward_kl", 0.5)
    assert got["loss"].item() == pytest.approx(ref["loss"].item(), rel=1e-6)
    g_hidden, g_weight = grads(got, (hidden, weight))
    assert g_hidden[3:37].abs().max().item() == 0.0  # masked rows are never projected
    torch.testing.assert_close(g_weight, grads(ref, (hidden, weight))[1], rtol=1e-4, atol=1e-7)


def test_empty_mask_and_alpha_edges():
    hidden, weight, b, ids, vals, targets, mask, _ = problem()
    none = chunked_kd_loss(hidden, weight, ids, vals, targets, torch.zeros(40), "tvd", 0.5, chunk_tokens=8)
    assert all(none[key].item() == 0.0 for key in ("loss", "kd", "ce"))
    g_hidden, g_weight = grads(none, (hidden, weight))
    assert g_hidden.abs().max().item() == 0.0 and g_weight.abs().max().item() == 0.0
    ce_only = chunked_kd_loss(hidden, weight, None, None, targets, mask, "reverse_kl", 0.0, chunk_tokens=8)
    ref = unchunked_kd_loss(hidden, weight, None, None, targets, mask, "reverse_kl", 0.0)
    assert ce_only["kd"].item() == 0.0 and ce_only["loss"].item() == pytest.approx(ref["ce"].item(), rel=1e-6)
    kd_only = chunked_kd_loss(hidden, weight, ids, vals, targets, mask, "skew_kl", 1.0, 3.0, chunk_tokens=8)
    ref = unchunked_kd_loss(hidden, weight, ids, vals, targets, mask, "skew_kl", 1.0, 3.0)
    assert kd_only["loss"].item() == pytest.approx(ref["kd"].item(), rel=1e-5)
    assert kd_only["ce"].item() == pytest.approx(ref["ce"].item(), rel=1e-6)  # still logged


def test_frozen_head_no_grad_and_kd_ce_are_detached():
    hidden, weight, b, ids, vals, targets, mask, _ = problem(bias=False)
    frozen = weight.detach()
    out = chunked_kd_loss(hidden, frozen, ids, vals, targets, mask, chunk_tokens=8)
    ref = unchunked_kd_loss(hidden, frozen, ids, vals, targets, mask)
    torch.testing.assert_close(grads(out, (hidden,))[0], grads(ref, (hidden,))[0], rtol=1e-4, atol=1e-7)
    assert not out["kd"].requires_grad and not out["ce"].requires_grad
    with torch.no_grad():
        value = chunked_kd_loss(hidden, weight, ids, vals, targets, mask, chunk_tokens=8)
    assert not value["loss"].requires_grad
    assert value["loss"].item() == pytest.approx(ref["loss"].item(), rel=1e-6)


def test_bf16_is_close_to_the_plain_bf16_path():
    hidden, weight, _, ids, vals, targets, mask, _ = problem(n=64, d=32, vocab=300, bias=False)
    h16 = hidden.detach().bfloat16().requires_grad_(True)
    w16 = weight.detach().bfloat16().requires_grad_(True)
    got = chunked_kd_loss(h16, w16, ids, vals, targets, mask, "jsd", 0.5, chunk_tokens=16)
    ref = unchunked_kd_loss(h16, w16, ids, vals, targets, mask, "jsd", 0.5)
    assert got["loss"].dtype == torch.float32
    assert got["loss"].item() == pytest.approx(ref["loss"].item(), rel=1e-4)
    for g, r in zip(grads(got, (h16, w16)), grads(ref, (h16, w16)), strict=True):
        assert g.dtype == torch.bfloat16
        torch.testing.assert_close(g.float(), r.float(), rtol=0.02, atol=1e-4)


def test_never_holds_more_than_a_chunk_of_logits():
    """Every tensor autograd saves (in forward and in the per-chunk graphs) is smaller than
    a chunk's logits, or a parameter-sized gradient; the plain path saves full (N, V) ones."""
    n, vocab, d, chunk = 64, 500, 8, 16
    hidden, weight, b, ids, vals, targets, mask, _ = problem(n=n, d=d, vocab=vocab)
    sizes: list[int] = []

    def pack(tensor):
        sizes.append(tensor.numel())
        return tensor

    for fn, bound in ((chunked_kd_loss, chunk * vocab), (unchunked_kd_loss, None)):
        sizes.clear()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = fn(hidden, weight, ids, vals, targets, mask, "jsd", 0.5, chunk_tokens=chunk, lm_head_bias=b)
        out["loss"].backward()
        if bound is not None:
            assert max(sizes) <= max(bound, vocab * d), max(sizes)
        else:
            assert max(sizes) >= n * vocab  # the check can fail


def test_bad_arguments():
    hidden, weight, _, ids, vals, targets, mask, _ = problem()
    with pytest.raises(ValueError, match="unknown KD loss kind 'kl'.*forward_kl.*sampled"):
        chunked_kd_loss(hidden, weight, ids, vals, targets, mask, "kl")
    with pytest.raises(ValueError, match="alpha"):
        chunked_kd_loss(hidden, weight, ids, vals, targets, mask, alpha=1.5)
    with pytest.raises(ValueError, match="chunk_tokens"):
        chunked_kd_loss(hidden, weight, ids, vals, targets, mask, chunk_tokens=0)
    with pytest.raises(ValueError, match=r"lm_head_weight \(V, D\)"):
        chunked_kd_loss(hidden, weight.T, ids, vals, targets, mask)
    with pytest.raises(ValueError, match="needs topk_ids and topk_logprobs"):
        chunked_kd_loss(hidden, weight, None, None, targets, mask)
    with pytest.raises(ValueError, match="needs draw_ids and draw_counts"):
        chunked_kd_loss(hidden, weight, ids, vals, targets, mask, "sampled")
    with pytest.raises(ValueError, match="targets and mask"):
        chunked_kd_loss(hidden, weight, ids, vals, targets, mask[:5])
    bad = targets.clone()
    bad[mask.nonzero()[0]] = 90
    with pytest.raises(ValueError, match=r"targets of selected positions must be ids in \[0, 90\)"):
        chunked_kd_loss(hidden, weight, ids, vals, bad, mask)
    bad[~mask.bool()] = -100  # unselected rows may hold anything
    bad[mask.nonzero()[0]] = 0
    assert torch.isfinite(unchunked_kd_loss(hidden, weight, ids, vals, bad, mask)["loss"])
    with pytest.raises(ValueError, match="lm_head_bias"):
        chunked_kd_loss(hidden, weight, ids, vals, targets, mask, lm_head_bias=torch.zeros(3))


def test_scaled_backward_as_in_gradient_accumulation_and_one_backward_only():
    hidden, weight, b, ids, vals, targets, mask, _ = problem()
    got = chunked_kd_loss(
        hidden, weight, ids, vals, targets, mask, "jsd", 0.5, chunk_tokens=8, lm_head_bias=b
    )
    ref = unchunked_kd_loss(hidden, weight, ids, vals, targets, mask, "jsd", 0.5, lm_head_bias=b)
    got_grads = torch.autograd.grad(got["loss"] / 4, (hidden, weight, b), retain_graph=True)
    ref_grads = torch.autograd.grad(ref["loss"] / 4, (hidden, weight, b))
    for g, r in zip(got_grads, ref_grads, strict=True):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-8)
    with pytest.raises(RuntimeError, match="one backward per forward"):
        got["loss"].backward()
