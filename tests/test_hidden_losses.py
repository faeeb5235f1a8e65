"""Feature distillation: projections learn, distances are in range, layer maps are checked."""

from __future__ import annotations

import pytest
import torch

from students.hidden_losses import HiddenStateDistiller, hidden_state_loss


def fake_hidden_states(
    layers: int, batch: int, seq: int, dim: int, seed: int = 0
) -> tuple[torch.Tensor, ...]:
    """Stand-in for ``output_hidden_states=True``: layers + 1 tensors of (B, T, D)."""
    gen = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(batch, seq, dim, generator=gen) for _ in range(layers + 1))


def test_mse_and_cosine_match_their_definitions():
    torch.manual_seed(0)
    s, t = torch.randn(9, 6), torch.randn(9, 6)
    mask = torch.tensor([1, 1, 0, 1, 0, 1, 1, 1, 0], dtype=torch.bool)
    mse = ((s - t) ** 2).mean(-1)[mask].mean()
    cos = (1 - (s * t).sum(-1) / (s.norm(dim=-1) * t.norm(dim=-1)))[mask].mean()
    assert hidden_state_loss("mse", s, t, mask).item() == pytest.approx(mse.item(), rel=1e-6)
    assert hidden_state_loss("cosine", s, t, mask).item() == pytest.approx(cos.item(), rel=1e-6)
    assert hidden_state_loss("cosine", s, 3 * s).item() == pytest.approx(0.0, abs=1e-6)
    assert hidden_state_loss("cosine", s, -s).item() == pytest.approx(2.0, abs=1e-6)
    zero = torch.zeros(9, 6)  # a zero vector: finite (cosine similarity 0)
    assert hidden_state_loss("cosine", zero, t).item() == pytest.approx(1.0, abs=1e-6)


def test_cosine_distance_is_in_zero_two():
    torch.manual_seed(1)
    for _ in range(5):
        s, t = torch.randn(200, 8) * 10, torch.randn(200, 8) * 0.01
        value = hidden_state_loss("cosine", s, t)
        assert 0.0 <= value.item() <= 2.0
    per = [hidden_state_loss("cosine", s[i : i + 1], t[i : i + 1]).item() for i in range(200)]
    assert min(per) >= 0.0 and max(per) <= 2.0


def test_gathers_positions_and_reads_half_precision_teacher_vectors():
    states = fake_hidden_states(layers=3, batch=2, seq=5, dim=4)
    distiller = HiddenStateDistiller({1: 2, 3: 4}, student_dim=4, teacher_dims=4, kind="mse")
    b_idx, t_idx = torch.tensor([0, 1, 1]), torch.tensor([4, 0, 2])
    # equal dims start as the identity: a teacher equal to the student's vectors costs 0
    teacher = {2: states[1][b_idx, t_idx].half(), 4: states[3][b_idx, t_idx].bfloat16()}
    per = distiller.per_layer(states, b_idx, t_idx, teacher)
    assert per[1].dtype == torch.float32
    assert per[1].item() < 1e-5 and per[3].item() < 1e-4  # only the half-precision rounding
    other = {2: teacher[2], 4: torch.zeros(3, 4, dtype=torch.bfloat16)}
    expect = (states[3][b_idx, t_idx] ** 2).mean()
    assert distiller(states, b_idx, t_idx, other).item() == pytest.approx(
        (per[1] + expect).item() / 2, rel=1e-3
    )


@pytest.mark.parametrize("kind", ["mse", "cosine"])
def test_projection_learns(kind):
    """Teacher layer = a fixed linear map of the student's layer: a few Adam steps cut the loss."""
    torch.manual_seed(2)
    states = fake_hidden_states(layers=2, batch=4, seq=16, dim=8, seed=3)
    mixing = torch.randn(8, 12)
    b_idx = torch.arange(4).repeat_interleave(16)
    t_idx = torch.arange(16).repeat(4)
    teacher = {5: (states[2][b_idx, t_idx] @ mixing).bfloat16()}
    distiller = HiddenStateDistiller({2: 5}, student_dim=8, teacher_dims={5: 12}, kind=kind)
    optimizer = torch.optim.Adam(distiller.parameters(), lr=0.05)
    mask = torch.ones(64)
    mask[::7] = 0
    losses = []
    for _ in range(40):
        loss = distiller(states, b_idx, t_idx, teacher, mask)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.1 * losses[0], losses[::8]


def test_student_gradients_flow_and_masked_positions_do_not():
    states = tuple(s.requires_grad_(True) for s in fake_hidden_states(layers=1, batch=1, seq=4, dim=3))
    distiller = HiddenStateDistiller({1: 1}, student_dim=3, teacher_dims=5, kind="cosine")
    idx = torch.tensor([0, 0, 0])
    pos = torch.tensor([0, 1, 3])
    loss = distiller(states, idx, pos, {1: torch.randn(3, 5)}, mask=torch.tensor([1.0, 0.0, 1.0]))
    loss.backward()
    grad = states[1].grad[0]
    assert grad[0].abs().sum() > 0 and grad[3].abs().sum() > 0
    assert grad[1].abs().sum() == 0 and grad[2].abs().sum() == 0
    empty = distiller(states, idx, pos, {1: torch.randn(3, 5)}, mask=torch.zeros(3))
    assert empty.item() == 0.0 and empty.requires_grad


def test_with_a_transformers_model_numbering():
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2
    )
    model = transformers.LlamaForCausalLM(config)
    out = model(input_ids=torch.randint(0, 64, (2, 6)), output_hidden_states=True)
    assert len(out.hidden_states) == 3  # 0 = embeddings, 1..2 = decoder layers
    distiller = HiddenStateDistiller({0: 0, 2: 7}, student_dim=32, teacher_dims={0: 16, 7: 48})
    b_idx, t_idx = torch.tensor([0, 1]), torch.tensor([5, 2])
    loss = distiller(out.hidden_states, b_idx, t_idx, {0: torch.randn(2, 16), 7: torch.randn(2, 48)})
    loss.backward()
    assert model.model.embed_tokens.weight.grad is not None and torch.isfinite(loss)
    with pytest.raises(ValueError, match="student layer 3, but the student returned 3 hidden states"):
        HiddenStateDistiller({3: 0}, 32, 16)(out.hidden_states, b_idx, t_idx, {0: torch.randn(2, 16)})


def test_validation_errors():
    with pytest.raises(ValueError, match="non-empty"):
        HiddenStateDistiller({}, 4, 4)
    with pytest.raises(ValueError, match="integer layer ids >= 0"):
        HiddenStateDistiller({-1: 2}, 4, 4)
    with pytest.raises(ValueError, match="integer layer ids >= 0"):
        HiddenStateDistiller({"1": 2}, 4, 4)
    with pytest.raises(ValueError, match="unknown hidden-state loss kind 'l1'; valid kinds: mse, cosine"):
        HiddenStateDistiller({1: 2}, 4, 4, kind="l1")
    with pytest.raises(ValueError, match=r"no size for teacher layer\(s\) \[3\]"):
        HiddenStateDistiller({1: 2, 2: 3}, 4, {2: 8})
    with pytest.raises(ValueError, match="student_dim"):
        HiddenStateDistiller({1: 2}, 0, 4)
    distiller = HiddenStateDistiller({1: 2}, 4, 6)
    states = fake_hidden_states(layers=2, batch=1, seq=3, dim=4)
    idx, pos = torch.tensor([0]), torch.tensor([1])
    with pytest.raises(ValueError, match="no teacher vectors for teacher layer 2"):
        distiller(states, idx, pos, {1: torch.randn(1, 6)})
    with pytest.raises(ValueError, match=r"must be \(1, 6\)"):
        distiller(states, idx, pos, {2: torch.randn(1, 5)})
    with pytest.raises(ValueError, match=r"must be \(B, T, 4\)"):
        distiller(fake_hidden_states(2, 1, 3, 5), idx, pos, {2: torch.randn(1, 6)})
    with pytest.raises(ValueError, match="batch_index and position_index"):
        distiller(states, idx, torch.tensor([1, 2]), {2: torch.randn(1, 6)})
    with pytest.raises(ValueError, match="mask must have shape"):
        distiller(states, idx, pos, {2: torch.randn(1, 6)}, mask=torch.ones(2))
