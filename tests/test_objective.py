"""The stage objective: each term gives exactly the loss library's value; chunked = plain."""

from __future__ import annotations

import pytest
import torch

from students.config import HiddenLossConfig, LossConfig
from students.hidden_losses import HiddenStateDistiller
from students.losses import kd_loss, masked_cross_entropy, multi_teacher_kd, sampled_kd
from students.objective import EnsembleKD, FusedChunks, Objective, OnLogits, SampledKD, TopKDivergence

V, B, T, K, U = 64, 2, 7, 4, 3
N = B * (T - 1)


@pytest.fixture(scope="module")
def model():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=V,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=32,
    )
    return LlamaForCausalLM(config).float()


def topk(generator: torch.Generator, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    logprobs = torch.log_softmax(torch.randn(B, T - 1, V, generator=generator) * 2, -1)
    values, ids = logprobs.topk(width, dim=-1)
    return ids, values


@pytest.fixture(scope="module")
def batch() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    input_ids = torch.randint(0, V, (B, T), generator=g)
    mask = torch.ones(B, T - 1)
    mask[1, 4:] = 0  # a padded tail
    ids, lps = topk(g, K)
    ids1, lps1 = topk(g, K - 1)
    draw_ids = torch.randint(0, V, (B, T - 1, U), generator=g)
    draw_counts = torch.randint(0, 4, (B, T - 1, U), generator=g).float()
    return {
        "input_ids": input_ids,
        "next_ids": input_ids[:, 1:],
        "label_mask": mask,
        "topk_ids": ids,
        "topk_logprobs": lps,
        "topk_ids@1": ids1,
        "topk_logprobs@1": lps1,
        "draw_ids": draw_ids,
        "draw_counts": draw_counts,
        "hidden_row": torch.tensor([0, 0, 1]),
        "hidden_pos": torch.tensor([1, 5, 2]),
        "hidden_layer_2": torch.randn(3, 8, generator=g),
    }


def flat_logits(model, batch) -> torch.Tensor:
    return model(input_ids=batch["input_ids"]).logits[:, :-1].reshape(N, V)


def run(objective, model, batch, temperature=1.5) -> dict[str, torch.Tensor]:
    return objective(model, model.get_output_embeddings(), batch, temperature)


def test_build_picks_the_terms_once():
    assert isinstance(Objective.build(LossConfig(alpha=0.0)).logits.kd, type(None))
    assert Objective.build(LossConfig(kind="jsd", beta=0.3)).logits.kd == TopKDivergence("jsd", 0.3, 0.1)
    assert isinstance(Objective.build(LossConfig(kind="sampled")).logits.kd, SampledKD)
    ensemble = Objective.build(LossConfig(), teacher_weights=[1.0, 3.0]).logits
    assert isinstance(ensemble, OnLogits) and ensemble.kd == EnsembleKD("forward_kl", (1.0, 3.0))
    chunked = Objective.build(LossConfig(chunk_tokens=5)).logits
    assert isinstance(chunked, FusedChunks) and chunked.chunk_tokens == 5


def test_build_refuses_what_it_cannot_compute():
    with pytest.raises(ValueError, match="chunk_tokens is not supported with data.teachers"):
        Objective.build(LossConfig(chunk_tokens=8), teacher_weights=[1.0, 1.0])
    hidden = LossConfig(hidden=HiddenLossConfig(layer_map={1: 2}))
    with pytest.raises(ValueError, match="exactly when loss.hidden is set"):
        Objective.build(hidden)
    with pytest.raises(ValueError, match="exactly when loss.hidden is set"):
        Objective.build(LossConfig(), distiller=HiddenStateDistiller({1: 2}, 16, 8))


def test_top_k_term_is_kd_loss_mixed_with_ce(model, batch):
    parts = run(Objective.build(LossConfig(kind="skew_kl", alpha=0.7, skew=0.2)), model, batch)
    logits, mask = flat_logits(model, batch), batch["label_mask"].reshape(-1)
    ids, lps = batch["topk_ids"].reshape(N, K), batch["topk_logprobs"].reshape(N, K)
    kd = kd_loss("skew_kl", logits, ids, lps, mask, 1.5, skew=0.2)
    ce = masked_cross_entropy(logits, batch["next_ids"].reshape(-1), mask)
    torch.testing.assert_close(parts["kd"], kd, rtol=0, atol=0)
    torch.testing.assert_close(parts["ce"], ce, rtol=0, atol=0)
    torch.testing.assert_close(parts["loss"], 0.7 * kd + 0.3 * ce, rtol=0, atol=0)
    assert set(parts) == {"loss", "kd", "ce"}


def test_sampled_term_is_sampled_kd(model, batch):
    parts = run(Objective.build(LossConfig(kind="sampled", alpha=1.0)), model, batch)
    logits, mask = flat_logits(model, batch), batch["label_mask"].reshape(-1)
    want = sampled_kd(logits, batch["draw_ids"].reshape(N, U), batch["draw_counts"].reshape(N, U), mask, 1.5)
    torch.testing.assert_close(parts["kd"], want, rtol=0, atol=0)
    torch.testing.assert_close(parts["loss"], want, rtol=0, atol=0)


def test_ensemble_term_is_multi_teacher_kd(model, batch):
    parts = run(Objective.build(LossConfig(kind="tvd"), teacher_weights=[1.0, 3.0]), model, batch)
    logits, mask = flat_logits(model, batch), batch["label_mask"].reshape(-1)
    teachers = [
        (1.0, batch["topk_ids"].reshape(N, K), batch["topk_logprobs"].reshape(N, K)),
        (3.0, batch["topk_ids@1"].reshape(N, K - 1), batch["topk_logprobs@1"].reshape(N, K - 1)),
    ]
    torch.testing.assert_close(
        parts["kd"], multi_teacher_kd("tvd", logits, teachers, mask, 1.5), rtol=0, atol=0
    )


@pytest.mark.parametrize("chunk", [0, 4])
def test_alpha_zero_is_ce_alone(model, batch, chunk):
    parts = run(Objective.build(LossConfig(alpha=0.0, chunk_tokens=chunk)), model, batch)
    assert parts["kd"].item() == 0.0
    torch.testing.assert_close(parts["loss"], parts["ce"])


@pytest.mark.parametrize("loss", [LossConfig(kind="reverse_kl", alpha=0.6), LossConfig(kind="sampled")])
def test_fused_chunks_match_the_plain_path(model, batch, loss):
    from dataclasses import replace

    values, grads = [], []
    for chunk in (0, 5):
        model.zero_grad()
        parts = run(Objective.build(replace(loss, chunk_tokens=chunk)), model, batch)
        parts["loss"].backward()
        values.append(parts)
        grads.append([p.grad.clone() for p in model.parameters()])
    for key in ("loss", "kd", "ce"):
        torch.testing.assert_close(values[1][key], values[0][key], rtol=1e-5, atol=1e-6)
    for a, b in zip(grads[1], grads[0], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    model.zero_grad()


@pytest.mark.parametrize("chunk", [0, 5])
def test_hidden_term_adds_the_weighted_feature_loss(model, batch, chunk):
    torch.manual_seed(2)
    distiller = HiddenStateDistiller({1: 2}, 16, 8)
    loss = LossConfig(hidden=HiddenLossConfig(layer_map={1: 2}, weight=0.25), chunk_tokens=chunk)
    parts = run(Objective.build(loss, distiller=distiller), model, batch)
    plain = run(Objective.build(LossConfig(chunk_tokens=chunk)), model, batch)
    states = model(input_ids=batch["input_ids"], output_hidden_states=True).hidden_states
    want = distiller(states, batch["hidden_row"], batch["hidden_pos"], {2: batch["hidden_layer_2"]})
    torch.testing.assert_close(parts["hidden"], want.detach())
    torch.testing.assert_close(parts["loss"], plain["loss"] + 0.25 * want)
    assert not parts["hidden"].requires_grad
    parts["loss"].backward()
    assert distiller.projections["1"].weight.grad.abs().sum() > 0
    model.zero_grad()
