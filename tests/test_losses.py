"""KD losses: exactness of the tail bucket against dense references, scale, guards."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from students.losses import (
    masked_cross_entropy,
    student_bucket_logprobs,
    teacher_bucket_logprobs,
    topk_forward_kl,
)


def teacher_topk(logits: torch.Tensor, k: int):
    lp = torch.log_softmax(logits.double(), -1)
    vals, ids = lp.topk(k, dim=-1)
    return ids, vals.float(), lp


def dense_bucket_kl(t_logits, s_logits, ids, temperature=1.0):
    """Reference: bucket both full distributions onto (top-k ids, rest), then KL."""
    p = torch.softmax(t_logits.double(), -1)
    q = torch.softmax(s_logits.double(), -1)
    p_top, q_top = p.gather(-1, ids), q.gather(-1, ids)
    p_b = torch.cat([p_top, 1 - p_top.sum(-1, keepdim=True)], -1)
    q_b = torch.cat([q_top, 1 - q_top.sum(-1, keepdim=True)], -1)
    if temperature != 1.0:  # both sides softened over the buckets, the tail as one category
        p_b, q_b = p_b ** (1 / temperature), q_b ** (1 / temperature)
        p_b, q_b = p_b / p_b.sum(-1, keepdim=True), q_b / q_b.sum(-1, keepdim=True)
    return (p_b * (p_b.log() - q_b.log())).sum(-1).mean()


@pytest.mark.parametrize("k", [1, 4, 32])
def test_forward_kl_equals_dense_bucketed_kl(k):
    torch.manual_seed(0)
    t_logits, s_logits = torch.randn(64, 100) * 3, torch.randn(64, 100) * 2
    ids, vals, _ = teacher_topk(t_logits, k)
    got = topk_forward_kl(s_logits, ids, vals, torch.ones(64))
    ref = dense_bucket_kl(t_logits, s_logits, ids)
    assert got.item() == pytest.approx(ref.item(), rel=1e-4, abs=1e-6)


def test_full_vocabulary_k_equals_exact_kl():
    torch.manual_seed(1)
    t_logits, s_logits = torch.randn(16, 50), torch.randn(16, 50)
    ids, vals, lp = teacher_topk(t_logits, 50)
    exact = F.kl_div(torch.log_softmax(s_logits.double(), -1), lp, log_target=True, reduction="batchmean")
    assert topk_forward_kl(s_logits, ids, vals, torch.ones(16)).item() == pytest.approx(
        exact.item(), rel=1e-4
    )


def test_tail_term_matters_for_peaked_and_flat_teachers():
    """Without the tail, a student matching the top-k *ratios* would look perfect."""
    torch.manual_seed(2)
    t_logits = torch.randn(8, 200)
    ids, vals, _ = teacher_topk(t_logits, 4)
    s_logits = torch.full((8, 200), -30.0)
    s_logits.scatter_(-1, ids, vals)  # all student mass on the top-4, same ratios
    kl = topk_forward_kl(s_logits, ids, vals, torch.ones(8)).item()
    assert kl > 0.1  # the teacher's tail mass has near-zero student mass: a large, exact penalty


def test_zero_when_student_equals_teacher():
    torch.manual_seed(3)
    logits = torch.randn(10, 30)
    ids, vals, _ = teacher_topk(logits, 5)
    assert abs(topk_forward_kl(logits, ids, vals, torch.ones(10)).item()) < 1e-5


def test_temperature_softens_both_and_scales_by_t_squared():
    torch.manual_seed(4)
    t_logits, s_logits = torch.randn(32, 40) * 4, torch.randn(32, 40)
    ids, vals, _ = teacher_topk(t_logits, 8)
    for temperature in (0.5, 2.0, 4.0):
        got = topk_forward_kl(s_logits, ids, vals, torch.ones(32), temperature).item()
        ref = dense_bucket_kl(t_logits, s_logits, ids, temperature).item() * temperature**2
        assert got == pytest.approx(ref, rel=1e-4)


def test_mask_and_all_masked_guard():
    torch.manual_seed(5)
    t_logits, s_logits = torch.randn(6, 20), torch.randn(6, 20, requires_grad=True)
    ids, vals, _ = teacher_topk(t_logits, 3)
    mask = torch.tensor([1, 0, 1, 0, 0, 1.0])
    sel = mask.bool()
    part = topk_forward_kl(s_logits[sel], ids[sel], vals[sel], torch.ones(3))
    assert topk_forward_kl(s_logits, ids, vals, mask).item() == pytest.approx(part.item(), rel=1e-6)
    none = topk_forward_kl(s_logits, ids, vals, torch.zeros(6))
    none.backward()
    assert none.item() == 0.0 and torch.isfinite(s_logits.grad).all()
    assert masked_cross_entropy(s_logits, ids[:, 0], torch.zeros(6)).item() == 0.0


def test_teacher_ids_beyond_student_vocab_go_to_the_tail():
    torch.manual_seed(6)
    t_logits = torch.randn(4, 60)
    ids, vals, _ = teacher_topk(t_logits, 6)
    s_logits = torch.randn(4, 50, requires_grad=True)  # ids >= 50 do not exist for the student
    loss = topk_forward_kl(s_logits, ids, vals, torch.ones(4))
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(s_logits.grad).all()
    valid = ids < 50
    log_p = teacher_bucket_logprobs(vals, valid)
    assert torch.allclose(log_p.exp().sum(-1), torch.ones(4), atol=1e-5)
    log_q = student_bucket_logprobs(s_logits, ids, valid)
    assert torch.allclose(log_q.exp().sum(-1), torch.ones(4), atol=1e-5)


def test_duplicate_id_zero_does_not_corrupt_the_student_tail():
    s_logits = torch.randn(1, 10)
    ids = torch.tensor([[0, 12, 3]])  # 12 is invalid and is parked at id 0 internally
    valid = ids < 10
    log_q = student_bucket_logprobs(s_logits, ids, valid)
    q = torch.softmax(s_logits, -1)[0]
    assert log_q[0, -1].exp().item() == pytest.approx(1 - q[0].item() - q[3].item(), rel=1e-5)


def test_kd_term_is_on_the_scale_of_ce():
    """Guards against double normalisation (a KD term 100-1000x smaller than CE)."""
    torch.manual_seed(7)
    vocab, n = 512, 256
    t_logits = torch.randn(n, vocab) * 2
    s_logits = torch.randn(n, vocab) * 0.1  # a fresh student: near uniform
    ids, vals, _ = teacher_topk(t_logits, 16)
    targets = torch.distributions.Categorical(logits=t_logits).sample()
    kd = topk_forward_kl(s_logits, ids, vals, torch.ones(n)).item()
    ce = masked_cross_entropy(s_logits, targets, torch.ones(n)).item()
    assert 0.1 < kd / ce < 1.5, (kd, ce)
    assert ce == pytest.approx(math.log(vocab), rel=0.05)


def test_sampled_kd_with_expected_counts_is_the_full_cross_entropy():
    """The estimator is linear in the counts, so E[loss] is the full-vocabulary CE exactly."""
    from students.losses import sampled_kd

    torch.manual_seed(8)
    t_logits, s_logits = torch.randn(5, 40) * 2, torch.randn(5, 40)
    p = torch.softmax(t_logits.double(), -1)
    ids = torch.arange(40).expand(5, 40)
    got = sampled_kd(s_logits, ids, p.float() * 1000, torch.ones(5))
    full = -(p * torch.log_softmax(s_logits.double(), -1)).sum(-1).mean()
    assert got.item() == pytest.approx(full.item(), rel=1e-5)


def test_sampled_kd_monte_carlo_mean_matches_full_loss_and_gradient():
    from students.losses import sampled_kd

    gen = torch.Generator().manual_seed(9)
    t_logits = torch.randn(1, 30, generator=gen) * 2
    s_logits = torch.randn(1, 30, generator=gen, requires_grad=True)
    p = torch.softmax(t_logits, -1)
    full = -(p * torch.log_softmax(s_logits, -1)).sum()
    (full_grad,) = torch.autograd.grad(full, s_logits)
    reps, n = 4000, 32
    samples = torch.multinomial(p.expand(reps, 30), n, replacement=True, generator=gen)  # (reps, n)
    counts = torch.zeros(reps, 30).scatter_add_(1, samples, torch.ones(reps, n))
    ids = torch.arange(30).expand(reps, 30)
    logits = s_logits.expand(reps, 30)
    per_rep = sampled_kd(logits, ids, counts, torch.ones(reps))
    (grad,) = torch.autograd.grad(per_rep, s_logits)
    assert per_rep.item() == pytest.approx(full.item(), rel=0.01)
    torch.testing.assert_close(grad, full_grad, atol=0.01, rtol=0)


def test_sampled_kd_temperature_and_padding():
    from students.losses import sampled_kd

    s_logits = torch.randn(2, 10)
    ids = torch.tensor([[3, 0, 0], [1, 2, 0]])
    counts = torch.tensor([[4.0, 0, 0], [1.0, 3.0, 0]])
    got = sampled_kd(s_logits, ids, counts, torch.ones(2), temperature=2.0)
    log_q = torch.log_softmax(s_logits / 2, -1)
    ref = -(log_q[0, 3] + 0.25 * log_q[1, 1] + 0.75 * log_q[1, 2]) / 2 * 4
    assert got.item() == pytest.approx(ref.item(), rel=1e-5)


# ---------------------------------------------------------------------------------------
# The divergence library: every kind against hand-written float64 references.

from students.losses import (  # noqa: E402
    KD_KINDS,
    bucket_divergence,
    dense_divergence,
    dense_kd_loss,
    kd_loss,
    multi_teacher_kd,
)


def ref_divergence(kind: str, p: torch.Tensor, q: torch.Tensor, beta: float = 0.5, skew: float = 0.1):
    """Straightforward definitions on probability vectors (float64), (..., C) -> (...,)."""

    def kl(a, b):
        return torch.where(a > 0, a * (a / b).log(), torch.zeros_like(a)).sum(-1)

    if kind == "forward_kl":
        return kl(p, q)
    if kind == "reverse_kl":
        return kl(q, p)
    if kind == "jsd":
        if beta == 0:
            return kl(p, q)
        if beta == 1:
            return kl(q, p)
        m = beta * p + (1 - beta) * q
        return beta * kl(p, m) + (1 - beta) * kl(q, m)
    if kind == "skew_kl":
        return kl(p, skew * p + (1 - skew) * q)
    if kind == "skew_reverse_kl":
        return kl(q, (1 - skew) * p + skew * q)
    assert kind == "tvd"
    return 0.5 * (p - q).abs().sum(-1)


def reference_buckets(t_logits, s_logits, ids, temperature=1.0):
    """(p_b, q_b) float64 over (top-k ids, rest), softened as documented in students.losses."""
    p = torch.softmax(t_logits.double(), -1)
    q = torch.softmax(s_logits.double(), -1)
    p_top, q_top = p.gather(-1, ids), q.gather(-1, ids)
    p_b = torch.cat([p_top, 1 - p_top.sum(-1, keepdim=True)], -1) ** (1 / temperature)
    q_b = torch.cat([q_top, 1 - q_top.sum(-1, keepdim=True)], -1) ** (1 / temperature)
    return p_b / p_b.sum(-1, keepdim=True), q_b / q_b.sum(-1, keepdim=True)


@pytest.mark.parametrize("kind", KD_KINDS)
@pytest.mark.parametrize("k", [1, 8])
@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_bucket_divergence_matches_dense_bucketed_reference(kind, k, temperature):
    torch.manual_seed(10)
    t_logits, s_logits = torch.randn(48, 120) * 3, torch.randn(48, 120) * 2
    ids, vals, _ = teacher_topk(t_logits, k)
    got = bucket_divergence(kind, s_logits, ids, vals, temperature, beta=0.3, skew=0.2)
    p_b, q_b = reference_buckets(t_logits, s_logits, ids, temperature)
    ref = ref_divergence(kind, p_b, q_b, beta=0.3, skew=0.2)
    assert got.dtype == torch.float32 and got.shape == (48,)
    torch.testing.assert_close(got.double(), ref, rtol=1e-4, atol=1e-6)
    assert kd_loss(kind, s_logits, ids, vals, torch.ones(48), temperature, 0.3, 0.2).item() == pytest.approx(
        ref.mean().item() * temperature**2, rel=1e-4, abs=1e-6
    )


@pytest.mark.parametrize("kind", KD_KINDS)
@pytest.mark.parametrize("temperature", [1.0, 3.0])
def test_full_vocabulary_k_bucket_equals_dense(kind, temperature):
    torch.manual_seed(11)
    t_logits, s_logits = torch.randn(20, 40) * 2, torch.randn(20, 40)
    ids, vals, _ = teacher_topk(t_logits, 40)
    bucket = bucket_divergence(kind, s_logits, ids, vals, temperature)
    dense = dense_divergence(kind, s_logits, t_logits, temperature)
    torch.testing.assert_close(bucket, dense, rtol=1e-4, atol=2e-6)


@pytest.mark.parametrize("kind", KD_KINDS)
def test_dense_divergence_matches_reference_formulas(kind):
    torch.manual_seed(12)
    t_logits, s_logits = torch.randn(30, 64) * 2, torch.randn(30, 64) * 2
    for temperature in (1.0, 0.7, 2.0):
        p = torch.softmax(t_logits.double() / temperature, -1)
        q = torch.softmax(s_logits.double() / temperature, -1)
        for beta, skew in ((0.5, 0.1), (0.9, 0.5)):
            got = dense_divergence(kind, s_logits, t_logits, temperature, beta=beta, skew=skew)
            ref = ref_divergence(kind, p, q, beta=beta, skew=skew)
            torch.testing.assert_close(got.double(), ref, rtol=1e-4, atol=1e-6)
        mask = torch.ones(30)
        loss = dense_kd_loss(kind, s_logits, t_logits, mask, temperature)
        ref_loss = ref_divergence(kind, p, q).mean() * temperature**2
        assert loss.item() == pytest.approx(ref_loss.item(), rel=1e-4, abs=1e-6)


@pytest.mark.parametrize("beta", [0.0, 0.1, 0.5, 0.9, 1.0])
def test_jsd_matches_trl_generalized_jsd(beta, monkeypatch):
    """TRL's GKD loss (beta weights the teacher; 0 = forward KL, 1 = reverse KL; no T²)."""
    monkeypatch.setenv("TRL_EXPERIMENTAL_SILENCE", "1")
    pytest.importorskip("trl")
    from trl.experimental.gkd.gkd_trainer import GKDTrainer

    torch.manual_seed(13)
    s_logits, t_logits = torch.randn(2, 7, 50) * 2, torch.randn(2, 7, 50) * 3
    for temperature in (1.0, 2.0):
        trl = GKDTrainer.generalized_jsd_loss(
            s_logits, t_logits, beta=beta, temperature=temperature, reduction="none"
        )
        ours = dense_divergence(
            "jsd", s_logits.reshape(14, 50), t_logits.reshape(14, 50), temperature, beta=beta
        )
        torch.testing.assert_close(ours, trl.sum(-1).reshape(14), rtol=1e-4, atol=1e-6)
    labels = torch.randint(0, 50, (2, 7))
    labels[0, :3] = -100  # TRL's ignore index; our mask is its complement
    trl_mean = GKDTrainer.generalized_jsd_loss(s_logits, t_logits, labels=labels, beta=beta)
    mask = (labels != -100).reshape(14)
    ours_mean = dense_kd_loss("jsd", s_logits.reshape(14, 50), t_logits.reshape(14, 50), mask, beta=beta)
    assert ours_mean.item() == pytest.approx(trl_mean.item(), rel=1e-4)


def test_known_limits():
    torch.manual_seed(14)
    t_logits, s_logits = torch.randn(16, 60) * 2, torch.randn(16, 60) * 2
    ids, vals, _ = teacher_topk(t_logits, 6)

    def div(kind, **params):
        return bucket_divergence(kind, s_logits, ids, vals, **params).double()

    fwd, rev = div("forward_kl"), div("reverse_kl")
    # endpoints are the KL forms; the limits JSD(b)/b -> KL(p||q) and JSD(b)/(1-b) -> KL(q||p)
    torch.testing.assert_close(div("jsd", beta=0.0), fwd)
    torch.testing.assert_close(div("jsd", beta=1.0), rev)
    # (the approach is slow where p/q ratios are large: 6% off at 1e-3, 0.15% at 1e-5)
    torch.testing.assert_close(div("jsd", beta=1e-5) / 1e-5, fwd, rtol=5e-3, atol=1e-4)
    torch.testing.assert_close(div("jsd", beta=1 - 1e-5) / 1e-5, rev, rtol=5e-3, atol=1e-4)
    # skew 0 is plain KL, and skew moves continuously away from it
    torch.testing.assert_close(div("skew_kl", skew=0.0), fwd)
    torch.testing.assert_close(div("skew_reverse_kl", skew=0.0), rev)
    torch.testing.assert_close(div("skew_kl", skew=1e-5), fwd, rtol=1e-2, atol=1e-5)
    assert (div("skew_kl", skew=0.5) < fwd).all() and (div("skew_reverse_kl", skew=0.5) < rev).all()
    # ranges: all >= 0, TVD <= 1, JSD(0.5) <= log 2
    for kind in KD_KINDS:
        assert (div(kind) >= -1e-6).all(), kind
    assert (div("tvd") <= 1.0).all() and (div("jsd", beta=0.5) <= math.log(2) + 1e-6).all()
    # disjoint distributions: TVD -> 1, JSD(0.5) -> log 2
    peaked_t = torch.full((1, 10), -50.0)
    peaked_t[0, 0] = 50.0
    peaked_s = torch.full((1, 10), -50.0)
    peaked_s[0, 1] = 50.0
    assert dense_divergence("tvd", peaked_s, peaked_t).item() == pytest.approx(1.0, abs=1e-6)
    assert dense_divergence("jsd", peaked_s, peaked_t, beta=0.5).item() == pytest.approx(
        math.log(2), rel=1e-5
    )


@pytest.mark.parametrize("kind", KD_KINDS)
def test_identical_distributions_give_zero(kind):
    torch.manual_seed(15)
    logits = torch.randn(12, 30) * 3
    ids, vals, _ = teacher_topk(logits, 5)
    for temperature in (1.0, 2.0):
        assert bucket_divergence(kind, logits, ids, vals, temperature).abs().max().item() < 1e-5
        assert dense_divergence(kind, logits, logits, temperature).abs().max().item() < 1e-6


@pytest.mark.parametrize("kind", KD_KINDS)
def test_gradients_finite_with_invalid_ids_padding_and_empty_tails(kind):
    torch.manual_seed(16)
    t_logits = torch.randn(6, 40) * 3
    ids, vals, _ = teacher_topk(t_logits, 5)
    ids[0, 2] = 45  # beyond the student's vocabulary (V = 40): its mass goes to the tail
    ids[1, :] = -1  # every id invalid: the whole teacher mass is tail
    ids[2], vals[2] = 0, 0.0  # collate's zero padding (masked below)
    vals[3] = torch.tensor([0.0, -30.0, -30.0, -30.0, -30.0])  # stored mass rounds to 1: empty tail
    s_logits = (torch.randn(6, 40) * 2).requires_grad_(True)
    s_logits.data[4, 7] = float("-inf")  # a student logit that is masked out of its vocabulary
    mask = torch.tensor([1.0, 1.0, 0.0, 1.0, 1.0, 1.0])
    for temperature in (1.0, 2.0):
        loss = kd_loss(kind, s_logits, ids, vals, mask, temperature)
        (grad,) = torch.autograd.grad(loss, s_logits)
        assert torch.isfinite(loss), (kind, temperature)
        assert torch.isfinite(grad).all(), (kind, temperature)
        assert grad[2].abs().max().item() == 0.0  # the masked padding row


@pytest.mark.parametrize("kind", KD_KINDS)
def test_mask_semantics(kind):
    torch.manual_seed(17)
    t_logits = torch.randn(8, 25) * 2
    ids, vals, _ = teacher_topk(t_logits, 4)
    s_logits = torch.randn(8, 25, requires_grad=True)
    mask = torch.tensor([1, 0, 1, 1, 0, 0, 1, 0], dtype=torch.bool)
    full = kd_loss(kind, s_logits, ids, vals, mask, 2.0)
    sub = kd_loss(kind, s_logits[mask], ids[mask], vals[mask], torch.ones(4), 2.0)
    assert full.item() == pytest.approx(sub.item(), rel=1e-6)
    # whatever the masked rows hold, they change nothing and receive no gradient
    scrambled = vals.clone()
    scrambled[~mask] = -torch.rand(4, 4) * 20
    assert kd_loss(kind, s_logits, ids, scrambled, mask, 2.0).item() == pytest.approx(full.item(), rel=1e-6)
    (grad,) = torch.autograd.grad(full, s_logits)
    assert grad[~mask].abs().max().item() == 0.0
    # float weights: a weighted mean
    weights = torch.tensor([2.0, 0, 1, 1, 0, 0, 0, 0])
    per = bucket_divergence(kind, s_logits, ids, vals, 2.0)
    expect = (2 * per[0] + per[2] + per[3]) / 4 * 4.0
    assert kd_loss(kind, s_logits, ids, vals, weights, 2.0).item() == pytest.approx(expect.item(), rel=1e-6)
    # empty mask: exactly 0, with a graph
    none = kd_loss(kind, s_logits, ids, vals, torch.zeros(8), 2.0)
    none.backward()
    assert none.item() == 0.0 and s_logits.grad.abs().max().item() == 0.0
    dense_none = dense_kd_loss(kind, s_logits, t_logits, torch.zeros(8))
    assert dense_none.requires_grad and dense_none.item() == 0.0


def test_kd_scale_against_ce_with_a_one_hot_teacher():
    """Forward KL = H(p, q) - H(p); with p one-hot-ish on the target, H(p, q) is the CE."""
    torch.manual_seed(18)
    n, vocab = 64, 200
    targets = torch.randint(0, vocab, (n,))
    t_logits = torch.randn(n, vocab) * 0.5
    t_logits[torch.arange(n), targets] += 12.0  # p(target) ~ 0.97
    s_logits = torch.randn(n, vocab) * 2
    ids, vals, lp = teacher_topk(t_logits, 16)
    mask = torch.ones(n)
    kd = kd_loss("forward_kl", s_logits, ids, vals, mask).item()
    ce = masked_cross_entropy(s_logits, targets, mask).item()
    p_b, q_b = reference_buckets(t_logits, s_logits, ids)
    entropy = -(p_b * p_b.log()).sum(-1).mean().item()
    cross = -(p_b * q_b.log()).sum(-1).mean().item()
    assert kd == pytest.approx(cross - entropy, rel=1e-4)
    assert kd == pytest.approx(ce - entropy, rel=0.05)  # KD and CE are on one scale
    assert 0.8 < kd / ce < 1.0, (kd, ce)


@pytest.mark.parametrize("dense", [True, False])
def test_t_squared_keeps_the_gradient_scale_across_temperatures(dense):
    """Hinton's high-T limit: d(T² KL)/ds_i -> (s_i - t_i) / (V N) for zero-mean logits."""
    torch.manual_seed(19)
    n, vocab = 16, 50
    t_logits = torch.randn(n, vocab)
    t_logits -= t_logits.mean(-1, keepdim=True)
    s_logits = torch.randn(n, vocab)
    s_logits -= s_logits.mean(-1, keepdim=True)
    s_logits.requires_grad_(True)
    ids, vals, _ = teacher_topk(t_logits, vocab)  # K = V: the bucket loss is the dense one
    norms = {}
    for temperature in (1.0, 2.0, 4.0, 8.0, 100.0):
        if dense:
            loss = dense_kd_loss("forward_kl", s_logits, t_logits, torch.ones(n), temperature)
        else:
            loss = kd_loss("forward_kl", s_logits, ids, vals, torch.ones(n), temperature)
        (grad,) = torch.autograd.grad(loss, s_logits)
        norms[temperature] = grad.norm().item()
    limit = (s_logits.detach() - t_logits) / (vocab * n)
    torch.testing.assert_close(grad, limit, rtol=0, atol=0.05 * limit.abs().max().item())
    for temperature in (2.0, 4.0, 8.0):
        assert norms[temperature] / norms[100.0] == pytest.approx(1.0, abs=0.35), norms
    # without T² the gradient would shrink ~ 1/T²: from T=4 to T=8 by ~4x
    assert (norms[4.0] / 16) / (norms[8.0] / 64) == pytest.approx(4.0, rel=0.15)


def test_bf16_inputs_are_computed_in_float32():
    torch.manual_seed(20)
    t_logits, s_logits = torch.randn(10, 80) * 2, torch.randn(10, 80) * 2
    ids, vals, _ = teacher_topk(t_logits, 8)
    s16 = s_logits.bfloat16()
    for kind in KD_KINDS:
        got = bucket_divergence(kind, s16, ids, vals.bfloat16())
        ref = bucket_divergence(kind, s16.float(), ids, vals.bfloat16().float())
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-7)


def test_multi_teacher_semantics_and_validation():
    torch.manual_seed(21)
    s_logits = torch.randn(10, 70, requires_grad=True)
    ids1, vals1, _ = teacher_topk(torch.randn(10, 70) * 2, 4)
    ids2, vals2, _ = teacher_topk(torch.randn(10, 70) * 3, 9)  # teachers may store different k
    mask = torch.tensor([1.0] * 7 + [0.0] * 3)
    for kind in KD_KINDS:
        single = kd_loss(kind, s_logits, ids1, vals1, mask, 2.0)
        one = multi_teacher_kd(kind, s_logits, [(3.0, ids1, vals1)], mask, 2.0)
        assert one.item() == pytest.approx(single.item(), rel=1e-6)
        two = multi_teacher_kd(kind, s_logits, [(1.0, ids1, vals1), (3.0, ids2, vals2)], mask, 2.0)
        expect = 0.25 * single + 0.75 * kd_loss(kind, s_logits, ids2, vals2, mask, 2.0)
        assert two.item() == pytest.approx(expect.item(), rel=1e-5)
    ignored = multi_teacher_kd("jsd", s_logits, [(1.0, ids1, vals1), (0.0, ids2, vals2)], mask)
    assert ignored.item() == pytest.approx(kd_loss("jsd", s_logits, ids1, vals1, mask).item(), rel=1e-6)
    none = multi_teacher_kd("tvd", s_logits, [(1.0, ids1, vals1)], torch.zeros(10))
    none.backward()
    assert none.item() == 0.0 and torch.isfinite(s_logits.grad).all()
    for teachers, match in (
        ([], "at least one"),
        ([(-1.0, ids1, vals1)], "finite and >= 0"),
        ([(float("nan"), ids1, vals1)], "finite and >= 0"),
        ([(0.0, ids1, vals1), (0.0, ids2, vals2)], "not all be 0"),
        ([(1.0, ids1)], "must be \\(weight, topk_ids, topk_logprobs\\)"),
    ):
        with pytest.raises(ValueError, match=match):
            multi_teacher_kd("forward_kl", s_logits, teachers, mask)


def test_bad_arguments_raise_clear_errors():
    s_logits = torch.randn(4, 20)
    ids, vals, _ = teacher_topk(torch.randn(4, 20), 3)
    mask = torch.ones(4)
    with pytest.raises(ValueError, match="unknown KD loss kind 'kl'.*forward_kl, reverse_kl, jsd.*tvd"):
        kd_loss("kl", s_logits, ids, vals, mask)
    with pytest.raises(ValueError, match="temperature"):
        kd_loss("forward_kl", s_logits, ids, vals, mask, temperature=0.0)
    with pytest.raises(ValueError, match="beta"):
        kd_loss("jsd", s_logits, ids, vals, mask, beta=1.5)
    with pytest.raises(ValueError, match="skew"):
        kd_loss("skew_kl", s_logits, ids, vals, mask, skew=1.0)
    with pytest.raises(ValueError, match="mask must have shape"):
        kd_loss("forward_kl", s_logits, ids, vals, torch.ones(4, 1))
    with pytest.raises(ValueError, match="topk_ids"):
        kd_loss("forward_kl", s_logits, ids[:, :2], vals, mask)
    with pytest.raises(ValueError, match="same shape"):
        dense_divergence("tvd", s_logits, torch.randn(4, 21))
