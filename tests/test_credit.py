"""Per-refinement credit (--credit per-refinement): refinement_advantages scales every refinement's
residual r - V_k by the terminal reward's group std, and lrm.critic_values fits the critic to the
reward per refinement index. A good critic shrinks the credit, a useless one leaves the terminal
advantage, a group with no reward spread gets nothing."""

import math
from types import SimpleNamespace

import torch

import lrm
import train_refiner as tr


def test_refinement_advantages_hand_computed():
    # two groups of 2: r = (1, 3 | 2, 2); V_0 shared within each group, V_1 not
    r = torch.tensor([1.0, 3.0, 2.0, 2.0])
    values = torch.tensor([[0.0, 0.0, 1.0, 1.0], [1.5, 2.5, 0.0, 2.0]])
    a = tr.refinement_advantages(r, values, group_size=2, eps=0.0)
    s = math.sqrt(2)  # group 1's reward std; group 2 has none
    # k = 0: r - V_0 - mean = (-1, 1 | 0, 0) -> the terminal advantages
    torch.testing.assert_close(a[0], torch.tensor([-1 / s, 1 / s, 0.0, 0.0]))
    torch.testing.assert_close(a[0], tr.group_advantages(r, 2, eps=0.0)[0])
    # k = 1: r - V_1 = (-0.5, 0.5 | 2, 0): the critic foresaw half of group 1's gap -> half the credit
    # (normalising the residual by its own std would give +-1/sqrt(2) again); group 2: no reward spread -> 0
    torch.testing.assert_close(a[1], torch.tensor([-0.5 / s, 0.5 / s, 0.0, 0.0]))


def test_a_critic_equal_to_the_conditional_mean_shrinks_the_credit():
    """r = m + u + w: m fixed by the group's shared start, u by action 0, w by what follows action 1.
    V_0 = E[r | start] = m, V_1 = E[r | x_{t_1}] = m + u. A_0 is the terminal advantage; A_1 keeps
    only w's part: |A_1| about std(w) / std(r) of the terminal one, not inflated back to unit scale."""
    gen = torch.Generator().manual_seed(0)
    groups, group_size = 256, 8
    m = torch.randn(groups, generator=gen).repeat_interleave(group_size)
    u, w = torch.randn(groups * group_size, generator=gen), 0.5 * torch.randn(groups * group_size, generator=gen)
    r = m + u + w
    terminal, _ = tr.group_advantages(r, group_size)
    a = tr.refinement_advantages(r, torch.stack([m, m + u]), group_size)
    torch.testing.assert_close(a[0], terminal)
    ratio = (a[1].abs().mean() / terminal.abs().mean()).item()
    assert 0.3 < ratio < 0.6, ratio  # std(w) / std(u + w) = 0.5 / sqrt(1.25) = 0.45


def test_a_useless_critic_gives_the_terminal_advantages():
    """V_k the same for the whole group (a constant, or the shared start's score) takes nothing out
    and puts nothing in: the terminal advantages for every k. Values on a 1/8 grid and groups of 4,
    so that every sum and mean is exact and the equality is too."""
    gen = torch.Generator().manual_seed(0)
    r = torch.randint(-16, 17, (12,), generator=gen) / 8  # 3 groups of 4
    terminal, _ = tr.group_advantages(r, 4)
    values = torch.stack([torch.full((12,), 0.375), torch.full((12,), -5.25), torch.tensor([1.5, -2.0, 0.125]).repeat_interleave(4)])
    a = tr.refinement_advantages(r, values, 4)
    for k in range(3):
        assert torch.equal(a[k], terminal), k
    # any group-constant critic (not on the grid): the same up to float rounding
    noisy = torch.randn(3, generator=gen).repeat_interleave(4)
    torch.testing.assert_close(tr.refinement_advantages(r, noisy[None], 4)[0], terminal, rtol=0, atol=1e-6)


def test_zero_spread_group_gets_no_credit():
    """A group whose rewards are all equal gets 0 at every refinement, whatever the critic says
    (as its terminal advantage: nothing to compare); non-finite rewards or values get 0."""
    r = torch.tensor([2.0, 2.0, 2.0, 1.0, math.nan, 3.0])
    values = torch.tensor([[0.0, 1.0, 5.0, 0.0, 0.0, 0.0], [3.0, -1.0, 0.5, 0.0, 1.0, math.nan]])
    a = tr.refinement_advantages(r, values, group_size=3)
    assert torch.equal(a[:, :3], torch.zeros(2, 3))
    assert a[0, 3] < 0 < a[0, 5] and a[0, 4] == 0 and a[1, 4] == 0 and a[1, 5] == 0
    assert a[1, 3] == 0  # the only finite residual of its group: centred on itself
    assert torch.isfinite(a).all()


def test_critic_values_fit_each_refinement_on_its_own():
    """lrm.critic_values: R ~ a_k V_k + b_k per refinement index k, the critic called at each state's
    level; scores with different scales per level land on the reward's scale alike."""
    levels = []

    def critic(latents, prompts, level):  # V = the sum of a (N, 1) latent's entries
        levels.append(level)
        return latents.flatten(1).sum(1)

    rewards = torch.tensor([1.0, 3.0, 5.0])
    trajectories = SimpleNamespace(prompts=[["a", "b", "c"]], states=[torch.tensor([[1.0], [2.0], [3.0]]),  # R = 2 V - 1
                                                                       torch.tensor([[0.0], [5.0], [10.0]]),  # R = 0.4 V + 1
                                                                       torch.ones(3, 1)], state_levels=[700, 300, 100])
    values = lrm.critic_values(critic, trajectories, rewards)
    torch.testing.assert_close(values, torch.tensor([[1.0, 3.0, 5.0], [1.0, 3.0, 5.0], [3.0, 3.0, 3.0]]))  # no spread: the mean
    assert levels == [700, 300, 100]
