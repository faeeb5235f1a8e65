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
    q = torch.softmax(s_logits.double() / temperature, -1)
    p_top, q_top = p.gather(-1, ids), q.gather(-1, ids)
    p_b = torch.cat([p_top, 1 - p_top.sum(-1, keepdim=True)], -1)
    q_b = torch.cat([q_top, 1 - q_top.sum(-1, keepdim=True)], -1)
    if temperature != 1.0:
        p_b = p_b ** (1 / temperature)
        p_b = p_b / p_b.sum(-1, keepdim=True)
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
