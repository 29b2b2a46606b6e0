"""Reward-guided refinement at sampling time (search.Search) and best-of-n: the best-scored
candidate is kept, candidates are batched, M = 1 is plain refined sampling bit for bit; one row per
image runs before the first refinement, an image's equal candidates run once, only the kept rows
are decoded, and the denoiser evaluations counted are the ones made."""

import contextlib

import pytest
import torch
from diffusers import DDPMScheduler, PNDMScheduler
from test_sampling import ScriptedRefiner, seeded

import common
import lrm
import promptloop
import refiners
import search

PROMPTS = ["a red circle", "a blue square on a green background"]
COLOURS = ["red", "blue", "green", "large", "small"]


class CandidateRefiner:
    """Row r of each call proposes '<user prompt> <COLOURS[r % m]>': every image's m candidates differ."""

    def __init__(self, m):
        self.m, self.calls = m, []

    def refine(self, previews, user_prompts, current_prompts, step, num_steps):
        self.calls.append(dict(previews=previews, user=list(user_prompts), current=list(current_prompts), step=step))
        return refiners.RefinerOutput.from_prompts([f"{u} {COLOURS[r % self.m]}" for r, u in enumerate(user_prompts)])


class ScriptedScore:
    """Scores whose best row per image is known: call c prefers candidate (image + c + 1) % m. Records what it saw."""

    def __init__(self, m):
        self.m, self.calls = m, []

    def best(self, call, image):
        return (image + call + 1) % self.m

    def __call__(self, latents, prompts, level):
        call = len(self.calls)
        self.calls.append(dict(latents=latents.clone(), prompts=list(prompts), level=level))
        scores = torch.zeros(len(latents) // self.m, self.m)
        for i in range(len(scores)):
            scores[i, self.best(call, i)] = 1.0
        return scores.flatten() - 0.1 * torch.arange(len(latents))  # distinct scores, the known best still first


def never_called(latents, prompts, level):
    raise AssertionError("a search with one candidate must not score anything")


@pytest.mark.parametrize("name", ["sd15", "sd3"])
def test_one_candidate_is_refined_sampling_bit_for_bit(name, refiner, request):
    backbone = request.getfixturevalue(name)
    runs = []
    for hook in (None, search.Search(1, never_called)):
        torch.manual_seed(0)  # the refiner samples with the global generator
        runs.append(promptloop.refined_sample(backbone, PROMPTS, refiner, refine_steps=2, num_steps=5, generator=seeded(), hook=hook))
    assert torch.equal(runs[0].images, runs[1].images) and torch.equal(runs[0].latents, runs[1].latents)
    assert runs[0].prompts == runs[1].prompts and not runs[1].candidates


CASES = {  # backbone fixture, its sampler, refined_sample's guidance arguments
    "sd15": ("sd15", None, {}), "sdxl": ("sdxl", None, {}), "sd3": ("sd3", None, {}), "flux": ("flux", None, {}),
    "flux true CFG": ("flux", None, dict(true_cfg=2.0, negative_prompt="a green background")),
    "sd15 DDPM": ("sd15", DDPMScheduler, {}),  # step noise from each image's generator
}


def generators(name):
    """A generator per image where the sampler draws step noise (the rows of an image draw alike), else one."""
    return [torch.Generator().manual_seed(i) for i in range(len(PROMPTS))] if "DDPM" in name else seeded()


@pytest.mark.parametrize("name", list(CASES))
def test_search_keeps_the_best_scored_candidate(name, request):
    """M = 3, K = 3: one refiner call per refinement over B*M rows; each image continues from the
    latents of the candidate the score preferred, with its prompt; replaying the kept prompts
    without search from the same noise gives the same image."""
    fixture, scheduler, kwargs = CASES[name]
    backbone, m = request.getfixturevalue(fixture), 3
    if scheduler is not None:
        backbone.pipe.scheduler = scheduler.from_config(backbone.pipe.scheduler.config)
    refiner, score = CandidateRefiner(m), ScriptedScore(m)
    steps = 7
    result = promptloop.refined_sample(backbone, PROMPTS, refiner, refine_steps=3, num_steps=steps, generator=generators(name), size=64,
                                       hook=search.Search(m, score), **kwargs)
    b, schedule = len(PROMPTS), promptloop.refinement_schedule(steps, 3)
    # batched: one call per refinement, every image's m rows; its copies share one preview and one current prompt
    assert [c["step"] for c in refiner.calls] == schedule and len(score.calls) == len(schedule)
    for call in refiner.calls:
        assert call["user"] == [p for p in PROMPTS for _ in range(m)] and len(call["previews"]) == b * m
        for i in range(b):
            group = call["previews"][i * m:(i + 1) * m]
            assert torch.equal(group, group[:1].expand_as(group)) and len(set(call["current"][i * m:(i + 1) * m])) == 1
    # the score judged the states the next refinement starts from (their noise level), the last one the final latents
    assert [c["level"] for c in score.calls] == result.state_levels[1:] + [None]
    assert len(result.candidates) == len(schedule) and len(result.prompts) == len(schedule) + 1
    for k, found in enumerate(result.candidates):
        seen = score.calls[k]["latents"]
        for i in range(b):
            best = score.best(k, i)
            assert int(found["chosen"][i]) == best and found["prompts"][i] == [f"{PROMPTS[i]} {c}" for c in COLOURS[:m]]
            assert result.prompts[k + 1][i] == found["prompts"][i][best]  # the kept candidate's prompt in force
            kept = seen[i * m + best].float().cpu()
            if k + 1 < len(schedule):  # the next refinement starts from the kept candidate's latents
                torch.testing.assert_close(result.states[k + 1][i], kept, rtol=0, atol=0)
                assert refiner.calls[k + 1]["current"][i * m] == found["prompts"][i][best]
            else:
                torch.testing.assert_close(result.latents[i].float().cpu(), kept, rtol=0, atol=0)
    assert result.images.shape[0] == b and [o.prompts for o in result.refiner_outputs] == result.prompts[1:]
    # the kept trajectory, replayed without search from the same noise (batch B, not B*M: float-level equal)
    replay = promptloop.refined_sample(backbone, PROMPTS, ScriptedRefiner(result.prompts[1:]), refine_steps=3, num_steps=steps,
                                       generator=generators(name), size=64, **kwargs)
    torch.testing.assert_close(replay.images, result.images, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(replay.latents.float(), result.latents.float(), rtol=1e-4, atol=1e-4)


class RepeatingRefiner:
    """Image i's candidate j is '<user prompt> <COLOURS[min(i, j)]>': image 0 proposes one prompt m
    times, image 1 two distinct ones (the first once, the second m - 1 times)."""

    def __init__(self, m):
        self.m = m

    def refine(self, previews, user_prompts, current_prompts, step, num_steps):
        return refiners.RefinerOutput.from_prompts([f"{u} {COLOURS[min(r // self.m, r % self.m)]}" for r, u in enumerate(user_prompts)])


@contextlib.contextmanager
def denoiser_batches(backbone):
    """The batch of every denoiser call (with CFG a row counts twice: cat([negative, positive]))."""
    seen = []

    def record(module, args, kwargs):
        seen.append(len(kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]))

    handle = backbone.denoiser.register_forward_pre_hook(record, with_kwargs=True)
    try:
        yield seen
    finally:
        handle.remove()


@pytest.mark.parametrize("name", ["sd15", "sdxl", "sd3", "flux", "toy", "toy-sdxl", "toy-sd3"])
def test_search_runs_each_distinct_candidate_once(name, request, monkeypatch):
    """M = 3, K = 2 of 6 steps (refinements before steps 2 and 4): B rows up to the first refinement,
    then one per distinct candidate (image 0: 1, image 1: 2), one per image again where they are
    judged; equal candidates share their score; the VAE decodes one row per image (previews and the
    final images); the evaluations counted are the rows the denoiser ran."""
    backbone = request.getfixturevalue(name) if name in ("sd15", "sdxl", "sd3", "flux") else common.load_backbone(name)
    m, steps, b = 3, 6, len(PROMPTS)
    decoded = []
    decode = backbone.pipe.vae.decode
    monkeypatch.setattr(backbone.pipe.vae, "decode", lambda z, *args, **kwargs: decoded.append(len(z)) or decode(z, *args, **kwargs))

    def score(latents, prompts, level):  # the last row of each image is best
        return torch.arange(len(latents)).float()

    with denoiser_batches(backbone) as batches:
        result = promptloop.refined_sample(backbone, PROMPTS, RepeatingRefiner(m), refine_steps=2, num_steps=steps, generator=seeded(),
                                           hook=search.Search(m, score))
    cfg = 2 if getattr(backbone.pipe, "do_classifier_free_guidance", False) else 1
    assert [n // cfg for n in batches] == [b, b, 3, 3, 3, 3] and all(n % cfg == 0 for n in batches)
    assert result.evaluations.tolist() == [2 + 4 * 1, 2 + 4 * 2] and int(result.evaluations.sum()) == sum(batches) // cfg
    for found in result.candidates:  # image 0's three equal candidates, image 1's last two: one score each
        assert len(set(found["scores"][0].tolist())) == 1 and found["scores"][1, 1] == found["scores"][1, 2]
        assert found["scores"][1, 2] > found["scores"][1, 0] and found["chosen"].tolist() == [0, 1]  # the first of the equal best
    assert result.prompts[1:] == [[f"{PROMPTS[0]} red", f"{PROMPTS[1]} blue"]] * 2
    assert decoded == [b, b, b] and result.images.shape[0] == b  # two previews, the final images


def test_evaluations_of_refined_sampling_and_best_of_n(sd15):
    """Plain (refined) sampling spends N evaluations per image; best-of-n n x N per prompt."""
    plain = promptloop.refined_sample(sd15, PROMPTS, CandidateRefiner(1), refine_steps=2, num_steps=5)
    assert plain.evaluations.tolist() == [5, 5]
    noise = torch.randn(len(PROMPTS), 3, *common.latent_shape(sd15), generator=seeded())
    best, _ = search.best_of_sample(sd15, PROMPTS, 3, ScriptedScore(3), noise, refiner=CandidateRefiner(1), refine_steps=1, num_steps=4)
    assert best.evaluations.tolist() == [12, 12]


def test_search_refuses_a_multistep_sampler(tiny_sd15_dir):
    backbone = common.load_backbone(str(tiny_sd15_dir))
    backbone.pipe.scheduler = PNDMScheduler.from_config(backbone.pipe.scheduler.config)
    with pytest.raises(common.UserError, match="single-step sampler"):
        promptloop.refined_sample(backbone, PROMPTS, CandidateRefiner(2), refine_steps=1, num_steps=3, hook=search.Search(2, ScriptedScore(2)))


def test_best_of_n_keeps_each_prompts_best_image(sd15):
    n, shape = 3, common.latent_shape(sd15)
    noise = torch.randn(len(PROMPTS), n, *shape, generator=seeded())
    score = ScriptedScore(n)
    best, scores = search.best_of_sample(sd15, PROMPTS, n, score, noise, refiner=CandidateRefiner(1), refine_steps=1, num_steps=3)
    everything = promptloop.refined_sample(sd15, [p for p in PROMPTS for _ in range(n)], CandidateRefiner(1), refine_steps=1,
                                       num_steps=3, latents=noise.flatten(0, 1))
    rows = [i * n + score.best(0, i) for i in range(len(PROMPTS))]
    assert scores.shape == (len(PROMPTS), n) and score.calls[0]["level"] is None
    assert torch.equal(best.images, everything.images[rows]) and best.prompts[1] == [everything.prompts[1][r] for r in rows]


def test_lrm_search_scorer(sd15, sd3, tiny_sd15_dir):
    """Noisy loop latents: one pass at their own timestep; clean final latents: the lrm reward's
    noise ensemble. An LRM of another latent space or sampler convention is refused."""
    model = lrm.LatentRewardModel(sd15, lrm.LRMConfig(backbone=str(tiny_sd15_dir), hidden=16, ensemble_draws=2)).eval()
    score = lrm.search_scorer(model, sd15)
    latents = torch.randn(2, *common.latent_shape(sd15), generator=seeded())
    with torch.no_grad():
        expected = model(latents, torch.tensor([301, 301]), model.text_conditioning(PROMPTS))
    torch.testing.assert_close(score(latents, PROMPTS, 301), expected)
    torch.testing.assert_close(score(latents, PROMPTS, None), lrm.final_scores(model, latents, PROMPTS))
    # candidates of one image are compared under the same noise draws: equal latents, equal scores
    copies = latents[:1].repeat(3, 1, 1, 1)
    shared = score(copies, PROMPTS[:1] * 3, None)
    assert shared.max() - shared.min() < 1e-6  # every row the same draws: up to batched float rounding
    with pytest.raises(common.UserError, match="cannot judge"):
        lrm.search_scorer(model, sd3)
    from diffusers import EulerDiscreteScheduler

    euler = common.load_backbone(str(tiny_sd15_dir))
    euler.pipe.scheduler = EulerDiscreteScheduler.from_config(euler.pipe.scheduler.config)
    with pytest.raises(common.UserError, match="DDPM-scaled"):
        lrm.search_scorer(model, euler)
