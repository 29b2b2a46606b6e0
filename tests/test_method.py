"""What refined sampling rests on, each checked against an independent computation (not against
what the code under test handed to a spy): the refiner sees the decoded denoised estimate x0_hat,
and a refinement swaps only the positive prompt -- the user's negative prompt and the CFG scale stay.

To see that a test guards its behaviour, plant the bug it names by hand (e.g. decode the noisy
latents instead of x0_hat in promptloop.refined_sample, or put "" in the negative half after a
refinement), run `pytest -q tests/test_method.py`, watch it fail, and take the bug out again."""

import pytest
import torch
from test_sampling import (
    PROMPTS,
    STEPS,
    ScriptedRefiner,
    record_unet_conditioning,
    seeded,
)

import common
import promptloop

GUIDANCE = 4.0


@torch.no_grad()
def test_the_refiner_sees_the_decoded_denoised_estimate(sd15):
    """The preview at the refinement before step s is VAE(x0_hat) of step s - 1, with x0_hat computed
    here by hand: the UNet's CFG noise prediction on the latents step s - 1 denoised, and DDIM's
    x0 = (x_t - sqrt(1 - abar) eps) / sqrt(abar). Decoding the noisy latents instead fails it."""
    pipe, refiner = sd15.pipe, ScriptedRefiner()
    result = promptloop.refined_sample(sd15, PROMPTS, refiner, refine_steps=1, num_steps=STEPS, guidance=GUIDANCE, generator=seeded())
    (s,) = result.schedule
    # the latents step s - 1 denoised: the stock pipeline's (refined sampling is bit-identical up to there)
    seen = {}

    def record(pipe, i, t, tensors):
        if i == s - 2:
            seen["x_t"] = tensors["latents"].clone()
        return {}

    size = common.image_side(sd15)
    pipe(PROMPTS, num_inference_steps=STEPS, guidance_scale=GUIDANCE, generator=seeded(), output_type="pt",
         height=size, width=size, callback_on_step_end=record)
    x_t, t = seen["x_t"], pipe.scheduler.timesteps[s - 1]
    positive, negative = pipe.encode_prompt(PROMPTS, "cpu", 1, True)
    noise = pipe.unet(torch.cat([x_t, x_t]), t, encoder_hidden_states=torch.cat([negative, positive])).sample
    uncond, cond = noise.chunk(2)
    eps = uncond + GUIDANCE * (cond - uncond)
    alpha_bar = pipe.scheduler.alphas_cumprod[int(t)]
    x0 = (x_t - (1 - alpha_bar).sqrt() * eps) / alpha_bar.sqrt()
    vae = pipe.vae
    expected = (vae.decode(x0 / vae.config.scaling_factor).sample / 2 + 0.5).clamp(0, 1)
    torch.testing.assert_close(refiner.calls[0]["previews"], expected, atol=1e-4, rtol=1e-4)
    noisy = (vae.decode(result.states[0] / vae.config.scaling_factor).sample / 2 + 0.5).clamp(0, 1)
    assert (noisy - expected).abs().mean() > 10 * 1e-4  # the check can tell x0_hat from the noisy latents


@pytest.mark.parametrize("name", ["sd15", "sdxl"])
@torch.no_grad()
def test_a_refinement_keeps_the_negative_prompt_and_cfg(name, request):
    """With a user's negative prompt, every UNet call before and after each refinement gets
    cat([negative prompt's embedding, current prompt's embedding]) -- 2B rows (CFG on), the negative
    half the user's, encoded by the pipeline's own encode_prompt. Replacing it by "" or dropping CFG
    after a refinement fails it."""
    backbone = request.getfixturevalue(name)
    pipe, negative = backbone.pipe, "a green triangle"
    script = [["a large blue circle", "a small red square"], ["a triangle", "a circle on a red background"]]
    records, handle = record_unet_conditioning(pipe)
    try:
        result = promptloop.refined_sample(backbone, PROMPTS, ScriptedRefiner(script), refine_steps=2, num_steps=STEPS,
                                           guidance=GUIDANCE, generator=seeded(), negative_prompt=negative)
    finally:
        handle.remove()
    assert len(records) == STEPS and result.prompts == [PROMPTS] + script

    def reference(prompts):
        out = pipe.encode_prompt(prompts, device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=True,
                                 negative_prompt=[negative] * len(prompts))
        if backbone.family == "sdxl":
            positive, negative_embeds, pooled, negative_pooled = out
            return torch.cat([negative_embeds, positive]), torch.cat([negative_pooled, pooled])
        return torch.cat([out[1], out[0]]), None

    expected = {0: reference(PROMPTS)} | {s: reference(p) for s, p in zip(result.schedule, script)}
    for step, (hidden, pooled) in enumerate(records):
        want_hidden, want_pooled = expected[max(s for s in expected if s <= step)]
        assert hidden.shape[0] == 2 * len(PROMPTS), f"step {step}: CFG off"
        assert torch.equal(hidden, want_hidden), f"step {step}"
        if want_pooled is not None:
            assert torch.equal(pooled, want_pooled), f"step {step}"
