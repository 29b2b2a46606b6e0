"""Refined sampling: equality with the stock pipeline, the embeddings actually used, schedules, previews."""

import contextlib

import pytest
import torch
from conftest import WORDS
from diffusers import AutoencoderTiny, DDIMScheduler, PNDMScheduler

import common
import promptloop
import refiners
import toy

PROMPTS = ["a red circle", "a blue square on a green background"]
STEPS = 8


class ScriptedRefiner:
    """Returns prompts from a script (or the current ones) and records what it was asked."""

    def __init__(self, script=None):
        self.script, self.calls = script, []

    def refine(self, previews, user_prompts, current_prompts, step, num_steps):
        self.calls.append(dict(previews=previews, user=list(user_prompts), current=list(current_prompts), step=step, num_steps=num_steps))
        new = list(current_prompts) if self.script is None else self.script[len(self.calls) - 1]
        return refiners.RefinerOutput.from_prompts(new)


def seeded():
    return torch.Generator().manual_seed(0)


def stock_images(backbone, prompts=PROMPTS, steps=STEPS, guidance=4.0):
    size = common.image_side(backbone)
    return backbone.pipe(prompts, num_inference_steps=steps, guidance_scale=guidance, generator=seeded(),
                         output_type="pt", height=size, width=size).images


# -----------------------------------------------------------------------------
# schedule


def test_schedule_evenly_spaced():
    assert promptloop.refinement_schedule(50, 5) == [8, 17, 25, 33, 42]
    assert promptloop.refinement_schedule(20, 2) == [7, 13]
    assert promptloop.refinement_schedule(10, 1) == [5]


@pytest.mark.parametrize("steps, k, expected", [(1, 5, []), (4, 5, [1, 2, 3]), (4, 2, [1, 3]), (20, 0, []), (2, 1, [1])])
def test_schedule_degenerate(steps, k, expected):
    assert promptloop.refinement_schedule(steps, k) == expected


def test_schedule_rejects_negative():
    with pytest.raises(common.UserError):
        promptloop.refinement_schedule(10, -1)


# -----------------------------------------------------------------------------
# bit-identity with the stock pipeline


@pytest.mark.parametrize("name", ["sd15", "sdxl"])
@pytest.mark.parametrize("guidance", [4.0, 0.0])
def test_no_refiner_and_identity_refiner_are_bit_identical(name, guidance, request):
    backbone = request.getfixturevalue(name)
    reference = stock_images(backbone, guidance=guidance)
    plain = promptloop.refined_sample(backbone, PROMPTS, None, num_steps=STEPS, guidance=guidance, generator=seeded())
    refiner = ScriptedRefiner()
    same = promptloop.refined_sample(backbone, PROMPTS, refiner, refine_steps=3, num_steps=STEPS, guidance=guidance, generator=seeded())
    assert torch.equal(plain.images, reference)
    assert torch.equal(same.images, reference)
    assert len(refiner.calls) == 3  # the identity refiner was really called


def test_bit_identical_with_ancestral_scheduler(sd15):
    """Schedulers that draw noise in `step` must still get the pipeline's generator through our wrapper."""
    from diffusers import EulerAncestralDiscreteScheduler

    sd15.pipe.scheduler = EulerAncestralDiscreteScheduler.from_config(sd15.pipe.scheduler.config)
    reference = stock_images(sd15)
    same = promptloop.refined_sample(sd15, PROMPTS, ScriptedRefiner(), refine_steps=3, num_steps=STEPS, guidance=4.0, generator=seeded())
    assert torch.equal(same.images, reference)


# -----------------------------------------------------------------------------
# the embeddings used after a refinement are those of the refined prompt


def record_unet_conditioning(pipe):
    records = []

    def hook(module, args, kwargs):
        added = kwargs.get("added_cond_kwargs") or {}
        records.append((kwargs["encoder_hidden_states"].clone(), added.get("text_embeds")))

    return records, pipe.unet.register_forward_pre_hook(hook, with_kwargs=True)


@pytest.mark.parametrize("name", ["sd15", "sdxl"])
def test_refined_prompt_embeddings_are_used(name, request):
    backbone = request.getfixturevalue(name)
    pipe = backbone.pipe
    script = [["a green triangle", "a small red square"], ["a large blue circle", "a triangle on a red background"]]
    refiner = ScriptedRefiner(script)
    records, handle = record_unet_conditioning(pipe)
    result = promptloop.refined_sample(backbone, PROMPTS, refiner, refine_steps=2, num_steps=STEPS, guidance=4.0, generator=seeded())
    handle.remove()
    assert result.schedule == [3, 5] and [c["step"] for c in refiner.calls] == [3, 5]
    assert refiner.calls[1]["current"] == script[0] and refiner.calls[0]["user"] == PROMPTS
    assert result.prompts == [PROMPTS] + script
    assert len(records) == STEPS

    def reference(prompts):
        # hand-computed: the pipeline's own encoder, CFG negatives = encoding of "" (SD) / zeros or "" (SDXL)
        if backbone.family == "sdxl":
            pos, neg, pooled, neg_pooled = pipe.encode_prompt(prompts, device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=True)
            return torch.cat([neg, pos]), torch.cat([neg_pooled, pooled])
        pos, neg = pipe.encode_prompt(prompts, "cpu", 1, True)
        return torch.cat([neg, pos]), None

    with torch.no_grad():
        expected = {0: reference(PROMPTS), 3: reference(script[0]), 5: reference(script[1])}
    for step, (hidden, pooled) in enumerate(records):
        want_hidden, want_pooled = expected[max(s for s in expected if s <= step)]
        assert torch.equal(hidden, want_hidden), f"step {step}"
        if backbone.family == "sdxl":
            assert torch.equal(pooled, want_pooled), f"step {step}"
    # and the refined prompts changed the image
    assert not torch.equal(result.images, stock_images(backbone))


def test_one_step_has_no_room_for_refinement(sd15):
    refiner = ScriptedRefiner([["a triangle", "a triangle"]])
    result = promptloop.refined_sample(sd15, PROMPTS, refiner, refine_steps=5, num_steps=1, guidance=4.0, generator=seeded())
    assert result.schedule == [] and refiner.calls == []
    assert torch.equal(result.images, stock_images(sd15, steps=1))


def test_more_refinements_than_steps_is_capped(sd15):
    refiner = ScriptedRefiner()
    result = promptloop.refined_sample(sd15, PROMPTS, refiner, refine_steps=50, num_steps=4, guidance=4.0, generator=seeded())
    assert [c["step"] for c in refiner.calls] == [1, 2, 3] == result.schedule
    assert all(c["num_steps"] == 4 for c in refiner.calls)


def test_zero_refinements_is_plain_sampling(sd15):
    refiner = ScriptedRefiner()
    result = promptloop.refined_sample(sd15, PROMPTS, refiner, refine_steps=0, num_steps=STEPS, guidance=4.0, generator=seeded())
    assert refiner.calls == [] and torch.equal(result.images, stock_images(sd15))


def test_group_shares_initial_noise(sd15):
    """Explicit latents: identical prompts with identical noise give identical images (GRPO's common noise)."""
    latents = torch.randn(1, 4, 16, 16, generator=seeded()).repeat(2, 1, 1, 1)
    result = promptloop.refined_sample(sd15, ["a circle", "a circle"], None, num_steps=4, guidance=4.0, latents=latents)
    assert torch.equal(result.images[0], result.images[1])
    assert result.latents.shape == (2, 4, 16, 16)


def test_float32_latents_on_a_bf16_backbone(tiny_sd15_dir):
    """Callers draw initial noise in float32 on the CPU (train_refiner); a bf16 pipeline on a GPU
    moves given latents to its device but not to its dtype, so refined_sample must."""
    backbone = common.load_backbone(str(tiny_sd15_dir), dtype=torch.bfloat16)
    latents = torch.randn(2, *common.latent_shape(backbone), generator=seeded())
    result = promptloop.refined_sample(backbone, ["a circle", "a square"], ScriptedRefiner(), refine_steps=1, num_steps=3,
                                   guidance=4.0, latents=latents, preview_decoder="linear")
    assert result.images.shape == (2, 3, 64, 64) and torch.isfinite(result.images).all()


def test_empty_prompt_rejected(sd15):
    with pytest.raises(common.UserError):
        promptloop.refined_sample(sd15, ["a circle", "  "], None, num_steps=2)


# -----------------------------------------------------------------------------
# previews


@contextlib.contextmanager
def preview_decoder_inputs():
    """Records the x0_hat every PreviewDecoder call receives: {"x0": the last one}."""
    captured, original = {}, promptloop.PreviewDecoder.__call__

    def spy(self, x0):
        captured["x0"] = x0.clone()
        return original(self, x0)

    promptloop.PreviewDecoder.__call__ = spy
    try:
        yield captured
    finally:
        promptloop.PreviewDecoder.__call__ = original


def test_preview_is_decoded_denoised_estimate(sd15):
    refiner = ScriptedRefiner()
    with preview_decoder_inputs() as captured:
        promptloop.refined_sample(sd15, PROMPTS, refiner, refine_steps=1, num_steps=STEPS, guidance=4.0, generator=seeded())
    preview = refiner.calls[0]["previews"]
    vae = sd15.pipe.vae
    with torch.no_grad():
        expected = (vae.decode(captured["x0"] / vae.config.scaling_factor).sample / 2 + 0.5).clamp(0, 1)
    assert preview.shape == (2, 3, 64, 64)
    torch.testing.assert_close(preview, expected)


def test_blank_preview(sd15):
    refiner = ScriptedRefiner()
    promptloop.refined_sample(sd15, PROMPTS, refiner, refine_steps=1, num_steps=4, blank_preview=True, generator=seeded())
    assert torch.all(refiner.calls[0]["previews"] == 0.5)


def test_denoised_estimate_without_pred_original_sample():
    """PNDM returns no x0_hat: our formula must agree with DDIM's pred_original_sample."""
    ddim = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False)
    ddim.set_timesteps(10)
    sample, eps = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    t = ddim.timesteps[3]
    expected = ddim.step(eps, t, sample).pred_original_sample
    torch.testing.assert_close(promptloop._denoised_from_model_output(ddim, eps, t, sample), expected)
    pndm = PNDMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, skip_prk_steps=True)
    pndm.set_timesteps(10)
    with promptloop.capture_denoised(pndm) as record:
        pndm.step(eps, pndm.timesteps[0], sample)
    torch.testing.assert_close(record["x0"], promptloop._denoised_from_model_output(pndm, eps, pndm.timesteps[0], sample))


def test_linear_preview_fits_vae(sd15):
    """The fitted C->3 map at latent resolution; on a random tiny VAE (nearly non-linear in its
    latents) only its shape means something: the held-out test below is on a trained VAE."""
    linear = promptloop.PreviewDecoder("linear", sd15)
    assert linear(torch.randn(3, 4, 16, 16)).shape == (3, 3, 16, 16) and linear.linear_map.shape == (5, 3)


@pytest.mark.skipif(not (common.TOY_DIR / "toy-sd15" / "vae").is_dir(), reason="toy world not built")
def test_linear_preview_predicts_the_vae_on_held_out_latents():
    """Fitted on the first latents it sees, the linear preview predicts the VAE's (pooled) colours
    of other latents far better than their mean colour does: scored on held-out latents, so a map
    that ignores the latents (only its bias) or mixes up channels fails."""
    toy_sd15 = common.load_backbone(str(common.TOY_DIR / "toy-sd15"))
    gen = torch.Generator().manual_seed(0)
    fitted, held_out = (torch.randn(3, *common.latent_shape(toy_sd15), generator=gen) for _ in range(2))
    vae = promptloop.PreviewDecoder("vae", toy_sd15)
    linear = promptloop.PreviewDecoder("linear", toy_sd15)
    linear(fitted)  # the fit happens on the first preview
    side = held_out.shape[-2:]
    target = torch.nn.functional.adaptive_avg_pool2d(vae(held_out), side)
    mean_colour = torch.nn.functional.adaptive_avg_pool2d(vae(fitted), side).mean((0, 2, 3), keepdim=True)
    error = ((linear(held_out) - target) ** 2).mean()
    baseline = ((target - mean_colour) ** 2).mean()
    assert error < 0.75 * baseline, (error, baseline)  # measured: 0.58 of it


def test_taesd_preview(sd15, tmp_path):
    torch.manual_seed(0)
    # TAESD's layout (4 levels, 1/3/3/3 blocks: 8x upsampling), narrow
    AutoencoderTiny(encoder_block_out_channels=(8,) * 4, decoder_block_out_channels=(8,) * 4,
                    num_encoder_blocks=(1, 3, 3, 3), num_decoder_blocks=(3, 3, 3, 1)).save_pretrained(tmp_path / "taesd")
    decoder = promptloop.PreviewDecoder("taesd", sd15, taesd_source=str(tmp_path / "taesd"))
    preview = decoder(torch.randn(2, *common.latent_shape(sd15)))
    assert preview.shape == (2, 3, 64, 64) and preview.min() >= 0 and preview.max() <= 1
    with pytest.raises(common.UserError, match="TAESD"):
        promptloop.PreviewDecoder("taesd", sd15)  # a local folder has no known TAESD
    with pytest.raises(common.UserError):
        promptloop.PreviewDecoder("jpeg", sd15)


# -----------------------------------------------------------------------------
# backbone loading: aliases, folders, aligned UNet, LoRA


def test_backbone_aliases_and_errors(tmp_path):
    assert common.backbone_spec("sdxl-turbo").guidance == 0.0 and common.backbone_spec("sdxl-turbo").steps == 4
    assert common.backbone_spec("sd15").source == "stable-diffusion-v1-5/stable-diffusion-v1-5"
    with pytest.raises(common.UserError, match="unknown backbone"):
        common.backbone_spec("sd16")
    with pytest.raises(common.UserError, match="not found"):
        common.backbone_spec(str(tmp_path / "missing"))


def test_folder_defaults_from_promptloop_json(tiny_sd15_dir, tmp_path):
    import json
    import shutil

    folder = tmp_path / "with-defaults"
    shutil.copytree(tiny_sd15_dir, folder)
    (folder / "promptloop.json").write_text(json.dumps({"steps": 7, "guidance": 3.0, "size": 32}))
    spec = common.backbone_spec(str(folder))
    assert (spec.steps, spec.guidance, spec.size) == (7, 3.0, 32)


@pytest.mark.slow
def test_aligned_unet_over_base(tiny_sd15_dir, tmp_path):
    other = toy.tiny_sd15_pipeline(WORDS, seed=1).unet
    other.save_pretrained(tmp_path / "aligned" / "unet")
    backbone = common.load_backbone(str(tiny_sd15_dir), unet=str(tmp_path / "aligned"))
    for name, value in other.state_dict().items():
        assert torch.equal(backbone.pipe.unet.state_dict()[name], value)
    base = common.load_backbone(str(tiny_sd15_dir))
    assert not torch.equal(stock_images(backbone), stock_images(base))


@pytest.mark.slow
def test_lora_over_base(tiny_sd15_dir, tmp_path):
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    base = common.load_backbone(str(tiny_sd15_dir))
    unet = base.pipe.unet
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"], init_lora_weights=False))
    StableDiffusionPipeline.save_lora_weights(tmp_path / "lora", unet_lora_layers=get_peft_model_state_dict(unet))
    with_lora = common.load_backbone(str(tiny_sd15_dir), lora=str(tmp_path / "lora"))
    assert not torch.equal(stock_images(with_lora), stock_images(common.load_backbone(str(tiny_sd15_dir))))
