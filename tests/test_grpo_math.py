"""GRPO's direction, not only its values: the advantage's sign and scale, one loss step on a tiny
policy moving the right completions, per-refinement credit reaching update() row by row.

test_train_refiner.py checks the formulas against hand values and TRL; these tests check that the
pieces are wired so that the policy moves the right way, in seconds (the learning runs that would
also catch a flipped sign are slow)."""

import math
from types import SimpleNamespace

import pytest
import torch

import lrm
import refiners
import runs
import train_refiner as tr

# -----------------------------------------------------------------------------
# advantages: sign and normalisation


def test_group_advantages_sign_and_normalisation():
    """Per group: the better half positive, mean 0, unbiased std 1 (up to eps); a positive affine
    change of the rewards changes nothing, a negative scale flips every sign."""
    rewards = torch.tensor([1.0, 2.0, 6.0, 10.0, 0.0, -5.0])  # two groups of 3
    advantages, zero_variance = tr.group_advantages(rewards, group_size=3, eps=0.0)
    # group 1: mean 3, unbiased std sqrt((4 + 1 + 9) / 2) = sqrt(7); group 2: mean 5/3
    s7 = 7**0.5
    mean2 = 5 / 3
    std2 = (((10 - mean2) ** 2 + mean2**2 + (5 + mean2) ** 2) / 2) ** 0.5
    expected = torch.tensor([-2 / s7, -1 / s7, 3 / s7, (10 - mean2) / std2, -mean2 / std2, (-5 - mean2) / std2])
    torch.testing.assert_close(advantages, expected)
    grouped = advantages.view(2, 3)
    torch.testing.assert_close(grouped.mean(1), torch.zeros(2), atol=1e-6, rtol=0)
    torch.testing.assert_close(grouped.std(1), torch.ones(2))
    assert not zero_variance.any()
    torch.testing.assert_close(tr.group_advantages(3.0 * rewards + 7.0, 3, eps=0.0)[0], advantages)
    torch.testing.assert_close(tr.group_advantages(-2.0 * rewards, 3, eps=0.0)[0], -advantages)


# -----------------------------------------------------------------------------
# the loss: its gradient, and one step on a tiny policy


def test_grpo_loss_gradient_is_minus_advantage_per_token():
    """At rho = 1 and pi = pi_ref (the first minibatch of a step), d loss / d log pi(token) is
    -A / num_tokens for every valid token and 0 for padding: the policy-gradient direction, the
    bnpo normaliser."""
    gen = torch.Generator().manual_seed(0)
    logprobs = (-torch.rand(4, 5, generator=gen)).requires_grad_()
    advantages = torch.tensor([1.5, -0.5, 0.0, -1.0])
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0], [1, 1, 0, 0, 0]])
    loss, _ = tr.grpo_loss(logprobs, logprobs.detach(), logprobs.detach(), advantages, mask, 0.2, 0.04, num_tokens=11)
    loss.backward()
    torch.testing.assert_close(logprobs.grad, -advantages[:, None] * mask / 11)


def test_one_grpo_step_raises_the_better_completion():
    """A tiny policy (a table of per-position logits) samples a group of completions; one SGD step
    on grpo_loss(group_advantages(rewards)) raises log pi of the best-rewarded completion and
    lowers that of the worst."""
    gen = torch.Generator().manual_seed(0)
    vocab, steps = 6, 4
    logits = torch.nn.Parameter(torch.randn(steps, vocab, generator=gen))
    completions = torch.tensor([[0, 1, 2, 3], [4, 4, 5, 5], [1, 3, 0, 2], [5, 2, 4, 0]])  # one group of G = 4
    rewards = torch.tensor([0.2, 0.9, 0.5, 0.1])  # completion 1 best, completion 3 worst
    mask = torch.ones_like(completions)

    def sequence_logprobs():  # (G, T) log pi of each completion's tokens
        return torch.log_softmax(logits, -1).gather(1, completions.T).T

    advantages, _ = tr.group_advantages(rewards, group_size=4)
    assert advantages.argmax() == 1 and advantages.argmin() == 3
    logprobs = sequence_logprobs()
    loss, _ = tr.grpo_loss(logprobs, logprobs.detach(), logprobs.detach(), advantages, mask, 0.2, 0.04, mask.sum())
    optimizer = torch.optim.SGD([logits], lr=0.5)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    change = (sequence_logprobs().sum(1) - logprobs.sum(1)).detach()  # (G,) change of log pi(completion)
    assert change[1] > 0.05 and change[3] < -0.05, change
    assert change.argmax() == 1 and change.argmin() == 3


# -----------------------------------------------------------------------------
# per-refinement credit: action_advantages and update()


def test_action_advantages_use_the_critic_per_refinement():
    """--credit per-refinement: action k's advantage is refinement_advantages(r, V) with V the
    critic's score fitted to r per refinement (lrm.critic_values), (K, N), from a stub critic;
    without a critic every row is the terminal advantage."""
    config = SimpleNamespace(group_size=2, advantage_eps=1e-4)
    scores = torch.tensor([1.0, 3.0, 2.0, 4.0])

    def critic(latents, prompts, level):  # V = the latent's single entry
        return latents.flatten(1).sum(1)

    trajectories = SimpleNamespace(
        prompts=[["a", "a", "b", "b"]], refiner_outputs=[None, None],
        # refinement 0: one score per group (shared noise and prompt); refinement 1: R = 2 V exactly
        states=[torch.tensor([[0.0], [0.0], [1.0], [1.0]]), torch.tensor([[0.5], [1.5], [1.0], [2.0]])], state_levels=[700, 300])
    terminal, zero_variance = tr.group_advantages(scores, 2, 1e-4)
    plain, _ = tr.action_advantages(scores, trajectories, None, config)
    assert plain.shape == (2, 4) and torch.equal(plain[0], terminal) and torch.equal(plain[1], terminal)
    credited, zero = tr.action_advantages(scores, trajectories, critic, config)
    torch.testing.assert_close(credited, tr.refinement_advantages(scores, lrm.critic_values(critic, trajectories, scores), 2, 1e-4))
    assert torch.equal(zero, zero_variance)
    torch.testing.assert_close(credited[0], terminal)  # a score shared by the group takes nothing away
    torch.testing.assert_close(credited[1], torch.zeros(4), rtol=0, atol=1e-5)  # r foreseen at refinement 1: no credit left


class RecordingOptimizer:
    """Stands in for AdamW in update(): keeps the (clipped) gradient of every step, changes nothing."""

    def __init__(self, params):
        self.params, self.grads = params, []

    def zero_grad(self, set_to_none=True):
        for p in self.params:
            p.grad = None

    def step(self):
        self.grads.append([torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in self.params])


@pytest.fixture
def lora_rollout(refiner):
    """The tiny refiner with a LoRA adapter, K = 2 refinement outputs of 4 trajectories, one minibatch
    of all 4 and the old log-probs on it (= the reference ones: LoRA B starts at 0)."""
    params = refiners.add_lora(refiner, rank=4, alpha=8)
    previews = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    users = ["a circle", "a red square", "a blue triangle", "a green circle"]
    torch.manual_seed(0)
    outputs = [refiner.refine(previews, users, users, step, 4) for step in (1, 3)]
    partition = torch.arange(4).view(1, 4)
    old, ref = tr.old_and_reference_logprobs(refiner, outputs, partition)
    assert all(out.completion_mask.sum() > 4 for out in outputs)
    return refiner, params, outputs, partition, old, ref


def test_update_applies_each_refinements_own_advantages(lora_rollout):
    """update() weighs refinement k's tokens by advantages[k]: with only row k nonzero, its gradient
    is that of -sum(A_k log pi(action k)) / num_tokens (rho = 1, no KL), and differs between k."""
    refiner, params, outputs, partition, old, ref = lora_rollout
    config = SimpleNamespace(inner_epochs=1, clip_epsilon=0.2, kl_coef=0.0, max_grad_norm=1e9)
    single = runs.Distributed(0, 1, torch.device("cpu"))
    row = torch.tensor([1.0, -1.0, 0.5, -0.5])
    num_tokens = sum(out.completion_mask.sum().item() for out in outputs)
    gradients = []
    for k in range(2):
        advantages = torch.zeros(2, 4)
        advantages[k] = row
        optimizer = RecordingOptimizer(params)
        tr.update(refiner, params, optimizer, outputs, old, ref, advantages, torch.ones(4, dtype=torch.bool), partition, config, single,
                  torch.Generator().manual_seed(0))
        assert len(optimizer.grads) == 1
        got = optimizer.grads[0]
        out = outputs[k]  # the expected gradient, from refinement k alone
        refiner.model.train()
        logprobs = refiner.token_logprobs(out.inputs, out.completion_ids, out.completion_mask)
        expected = torch.autograd.grad(-(logprobs * row[:, None] * out.completion_mask).sum() / num_tokens, params, allow_unused=True)
        refiner.model.eval()
        for g, e in zip(got, expected):
            torch.testing.assert_close(g, torch.zeros_like(g) if e is None else e, atol=1e-6, rtol=1e-4)
        gradients.append(torch.cat([g.flatten() for g in got]))
    assert gradients[0].abs().max() > 1e-4 and gradients[1].abs().max() > 1e-4
    assert not torch.allclose(gradients[0], gradients[1], atol=1e-6)


# -----------------------------------------------------------------------------
# pi_old and pi_ref on the update's own minibatches: rho = 1 before the first update


def two_minibatch_rollout(lora_rollout):
    """lora_rollout's actions, a random partition into 2 minibatches of 2 and pi_old / pi_ref on it."""
    refiner, params, outputs, _, _, _ = lora_rollout
    partition = tr.minibatch_partition(4, 2, torch.Generator().manual_seed(1))
    old, ref = tr.old_and_reference_logprobs(refiner, outputs, partition)
    return refiner, params, outputs, partition, old, ref


def test_old_logprobs_are_computed_on_the_update_minibatches(lora_rollout, monkeypatch):
    """Every teacher-forced forward of pi_old, pi_ref and both inner epochs' updates sees one of the
    partition's minibatches (the same rows through select_rows) in train mode."""
    refiner, params, outputs, _, _, _ = lora_rollout
    calls = []
    token_logprobs = refiner.token_logprobs

    def spy(inputs, completion_ids, completion_mask):
        calls.append((inputs["input_ids"], completion_ids, refiner.model.training))
        return token_logprobs(inputs, completion_ids, completion_mask)

    monkeypatch.setattr(refiner, "token_logprobs", spy)
    refiner, params, outputs, partition, old, ref = two_minibatch_rollout(lora_rollout)
    batches = [(refiners.select_rows(out.inputs, idx)["input_ids"], out.completion_ids[idx]) for idx in partition.tolist() for out in outputs]
    old_calls = calls[:]  # per minibatch, per refinement: pi_old then pi_ref
    assert len(old_calls) == 2 * len(batches)
    for (inputs, completions), call in zip([b for b in batches for _ in range(2)], old_calls):
        assert torch.equal(call[0], inputs) and torch.equal(call[1], completions) and call[2]
    config = SimpleNamespace(inner_epochs=2, clip_epsilon=0.2, kl_coef=0.04, max_grad_norm=1.0)
    tr.update(refiner, params, RecordingOptimizer(params), outputs, old, ref, torch.randn(2, 4, generator=torch.Generator().manual_seed(0)),
              torch.ones(4, dtype=torch.bool), partition, config, runs.Distributed(0, 1, torch.device("cpu")), torch.Generator().manual_seed(0))
    update_calls = calls[len(old_calls):]
    assert len(update_calls) == 2 * len(batches)  # 2 epochs
    for inputs, completions, training in update_calls:
        assert training and any(torch.equal(inputs, i) and torch.equal(completions, c) for i, c in batches)
    assert not refiner.model.training  # back in eval mode for the next rollout


def test_ratio_gap_is_zero_before_the_first_update(lora_rollout):
    """update() reports max |rho - 1| of its first minibatch before any update: a shifted pi_old
    shows as a gap of the shift's size; pi_old from old_and_reference_logprobs gives exactly 0 in
    fp32, though AdamW moves the policy for the later minibatches (their KL to pi_ref > 0)."""
    refiner, params, outputs, partition, old, ref = two_minibatch_rollout(lora_rollout)
    config = SimpleNamespace(inner_epochs=2, clip_epsilon=0.2, kl_coef=0.04, max_grad_norm=1.0)
    single = runs.Distributed(0, 1, torch.device("cpu"))
    advantages = torch.tensor([[1.0, -1.0, 0.5, -0.5], [0.5, 1.0, -1.0, -0.5]])
    valid = torch.ones(4, dtype=torch.bool)
    shifted = [o + 1e-3 * out.completion_mask for o, out in zip(old, outputs)]  # pi_old off by 1e-3 on every token
    stats = tr.update(refiner, params, RecordingOptimizer(params), outputs, shifted, ref, advantages, valid, partition,
                      config, single, torch.Generator().manual_seed(0))
    assert stats["ratio_gap"] == pytest.approx(1 - math.exp(-1e-3), rel=1e-2)
    stats = tr.update(refiner, params, torch.optim.AdamW(params, lr=1e-2), outputs, old, ref, advantages, valid, partition,
                      config, single, torch.Generator().manual_seed(0))
    assert stats["ratio_gap"] == 0.0 and stats["skipped"] == 0 and stats["kl"] > 1e-7
