"""Common random numbers where rewards are compared (DESIGN: "GRPO" and "The LRM in the loop").

A GRPO group shares its noise -- the initial noise and, with a stochastic sampler, every step's --
so that its trajectories differ by their prompts alone; and an LRM score is a function of the latent,
never of its row: every row of a call gets the same (t, eps) draws.
"""

from types import SimpleNamespace

import pytest
import torch

import common
import lrm
import refiners
import train_refiner as tr

PROMPTS = ["a red circle", "a blue square", "a green triangle", "a small circle"]


class IdentityRefiner:
    """A policy that keeps the current prompts: a group's trajectories then differ by their noise only."""

    model = torch.nn.Identity()  # rollout() puts the policy in eval mode

    def refine(self, previews, user_prompts, current_prompts, step, num_steps):
        return refiners.RefinerOutput.from_prompts(list(current_prompts))


# -----------------------------------------------------------------------------
# a GRPO group shares every step's noise (train_refiner.rollout)


@pytest.fixture
def ancestral(sd15):
    """The tiny SD1.5 sampling with ancestral Euler (SDXL-turbo's sampler): fresh noise at every step."""
    from diffusers import EulerAncestralDiscreteScheduler

    sd15.pipe.scheduler = EulerAncestralDiscreteScheduler.from_config(sd15.pipe.scheduler.config)
    return sd15


def grouped_images(backbone, shared):
    """Two groups of 3 trajectories of the same prompt, identity refiner: (2, 3, 3, H, W) images."""
    config = tr.Config(group_size=3, sampling_steps=3, refine_steps=1, guidance=4.0, blank_preview=True, shared_noise=shared)
    sample = tr.rollout(backbone, IdentityRefiner(), ["a circle", "a circle"], config, None, torch.Generator().manual_seed(0))
    return sample.images.view(2, 3, *sample.images.shape[1:])


def test_group_shares_every_steps_noise(ancestral):
    """Shared noise: identical prompts in one group give identical images under a stochastic sampler
    (one generator for the batch would draw each row its own step noise); two groups differ."""
    images = grouped_images(ancestral, shared=True)
    for group in images:
        assert all(torch.equal(group[0], image) for image in group[1:])
    assert (images[0, 0] - images[1, 0]).abs().max() > 1e-3


def test_no_shared_noise_rows_differ(ancestral):
    images = grouped_images(ancestral, shared=False).flatten(0, 1)
    assert min((images[i] - images[j]).abs().max() for i in range(6) for j in range(i)) > 1e-3


def test_row_generators_seeded_alike_within_a_group():
    draws = [torch.randn(3, generator=g) for g in tr.row_generators(7, 2, 3, shared=True)]
    assert all(torch.equal(draws[0], d) for d in draws[1:3]) and not torch.equal(draws[0], draws[3])
    draws = [torch.randn(3, generator=g) for g in tr.row_generators(7, 2, 3, shared=False)]
    assert len({tuple(d.tolist()) for d in draws}) == 6


# -----------------------------------------------------------------------------
# an LRM score is a function of the latent (lrm.final_scores: the lrm reward, search, the critic)


@pytest.fixture
def model(sd15, tiny_sd15_dir):
    return lrm.LatentRewardModel(sd15, lrm.LRMConfig(backbone=str(tiny_sd15_dir), hidden=16, ensemble_draws=2)).eval()


def test_copies_of_one_latent_get_equal_scores(model, sd15, tmp_path):
    """The issue's case: one latent copied into a group of 4 rows scores alike, so the group has no
    spread and GRPO gives it no advantage (per-row draws gave each copy its own score)."""
    lrm.save_lrm(model, tmp_path / "lrm")
    reward = lrm.lrm_reward(str(tmp_path / "lrm"))  # the reward `lrm:DIR` as train_refiner builds it
    latent = torch.randn(1, *common.latent_shape(sd15), generator=torch.Generator().manual_seed(0))
    scores = reward(None, PROMPTS[:1] * 4, latents=latent.repeat(4, 1, 1, 1))
    assert scores.max() - scores.min() < 1e-6  # up to batched float rounding
    advantages, zero_variance = tr.group_advantages(scores, 4)
    assert zero_variance.all() and torch.equal(advantages, torch.zeros(4))


def test_scores_do_not_depend_on_the_row_or_the_call(model, sd15):
    latents = torch.randn(4, *common.latent_shape(sd15), generator=torch.Generator().manual_seed(1))
    scores = lrm.final_scores(model, latents, PROMPTS)
    assert scores.max() - scores.min() > 1e-3  # different latents and prompts: different scores
    # the batch reversed: the scores reversed
    torch.testing.assert_close(lrm.final_scores(model, latents.flip(0), PROMPTS[::-1]), scores.flip(0), rtol=0, atol=1e-6)
    # latent 0 again, in another call next to other latents: the same score
    others = torch.randn(3, *common.latent_shape(sd15), generator=torch.Generator().manual_seed(2))
    again = lrm.final_scores(model, torch.cat([others, latents[:1]]), PROMPTS[1:] + PROMPTS[:1])
    torch.testing.assert_close(again[-1], scores[0], rtol=0, atol=1e-6)


def test_critic_fit_does_not_depend_on_the_row(model, sd15):
    """critic_values scores each refinement's noisy latents with shared draws and fits them to the
    rewards level by level: reversing the trajectories reverses the values."""
    critic = lrm.search_scorer(model, sd15)
    shape = common.latent_shape(sd15)
    latents, states = (torch.randn(4, *shape, generator=torch.Generator().manual_seed(s)) for s in (3, 4))
    rewards = torch.tensor([0.1, 0.7, 0.3, 0.9])

    def trajectories(order):
        return SimpleNamespace(prompts=[[PROMPTS[i] for i in order]], latents=latents[order], states=[states[order]], state_levels=[301])

    values = lrm.critic_values(critic, trajectories([0, 1, 2, 3]), rewards)
    reversed_values = lrm.critic_values(critic, trajectories([3, 2, 1, 0]), rewards.flip(0))
    torch.testing.assert_close(reversed_values, values.flip(1), rtol=0, atol=1e-5)
