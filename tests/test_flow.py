"""Flow-matching transformer backbones (SD3.5, FLUX.1): refined sampling equals the stock pipeline,
the refined prompts' embeddings reach the transformer, x0_hat = x_t - sigma * v, previews, loading."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import WORDS
from diffusers import AutoencoderTiny, FlowMatchEulerDiscreteScheduler, FluxPipeline
from test_sampling import PROMPTS, ScriptedRefiner, preview_decoder_inputs, seeded

import common
import promptloop
import toy

STEPS = 6
SIZE = 64
SCRIPT = [["a green triangle", "a small red square"], ["a large blue circle", "a triangle on a red background"]]


def stock_images(backbone, guidance, true_cfg=1.0, negative=None):
    kwargs = dict(num_inference_steps=STEPS, guidance_scale=guidance, generator=seeded(), output_type="pt", height=SIZE, width=SIZE)
    if backbone.family == "flux":
        kwargs.update(true_cfg_scale=true_cfg, negative_prompt=negative)
    return backbone.pipe(PROMPTS, **kwargs).images


def sample(backbone, refiner, guidance, true_cfg=1.0, negative=None, refine_steps=2):
    return promptloop.refined_sample(backbone, PROMPTS, refiner, refine_steps=refine_steps, num_steps=STEPS, guidance=guidance,
                                 generator=seeded(), size=SIZE, true_cfg=true_cfg, negative_prompt=negative)


def tiny(kind):
    pipe = {"sd3": lambda: toy.tiny_sd3_pipeline(WORDS), "sd3-no-t5": lambda: toy.tiny_sd3_pipeline(WORDS, t5=False),
            "sd35l": lambda: toy.tiny_sd3_pipeline(WORDS, transformer=toy.SD35L_TRANSFORMER),
            "flux-dev": lambda: toy.tiny_flux_pipeline(WORDS),
            "flux-schnell": lambda: toy.tiny_flux_pipeline(WORDS, guidance_embeds=False)}[kind]()
    pipe.set_progress_bar_config(disable=True)
    return common.Backbone(pipe, kind, common.BackboneSpec("tiny", STEPS, 4.0, SIZE))


# -----------------------------------------------------------------------------
# bit-identity with the stock pipeline, with and without CFG


@pytest.mark.parametrize("kind, guidance, true_cfg", [
    ("sd3", 4.0, 1.0), ("sd3", 0.0, 1.0), ("sd3-no-t5", 4.0, 1.0), ("sd35l", 4.0, 1.0),
    ("flux-dev", 3.5, 1.0), ("flux-dev", 3.5, 2.0), ("flux-schnell", 0.0, 1.0), ("flux-schnell", 0.0, 2.0),
])
def test_no_refiner_and_identity_refiner_are_bit_identical(kind, guidance, true_cfg):
    backbone = tiny(kind)
    negative = "a blue circle" if true_cfg > 1 else None
    reference = stock_images(backbone, guidance, true_cfg, [negative] * len(PROMPTS) if negative else None)
    plain = sample(backbone, None, guidance, true_cfg, negative)
    refiner = ScriptedRefiner()  # returns the current prompts: re-encoded and swapped in, same numbers
    same = sample(backbone, refiner, guidance, true_cfg, negative)
    assert torch.equal(plain.images, reference)
    assert torch.equal(same.images, reference)
    assert len(refiner.calls) == 2 and refiner.calls[0]["previews"].shape == (2, 3, SIZE, SIZE)
    assert same.latents.shape == (2, 16, 8, 8)  # FLUX's packed latents come back unpacked
    # a refiner that changes the prompts changes the images
    assert not torch.equal(sample(backbone, ScriptedRefiner(SCRIPT), guidance, true_cfg, negative).images, reference)


# -----------------------------------------------------------------------------
# the transformer sees the refined prompts' embeddings (tokens and pooled)


class record_transformer_conditioning:
    """What the transformer's forward receives, after every forward pre-hook has run."""

    def __init__(self, transformer):
        self.transformer, self.records, original = transformer, [], transformer.forward

        def forward(*args, **kwargs):
            self.records.append((kwargs["encoder_hidden_states"].clone(), kwargs["pooled_projections"].clone()))
            return original(*args, **kwargs)

        transformer.forward = forward

    def remove(self):
        del self.transformer.forward


def test_sd3_refined_prompt_embeddings_are_used():
    backbone = tiny("sd3")
    pipe = backbone.pipe
    handle = record_transformer_conditioning(pipe.transformer)
    records = handle.records
    result = sample(backbone, ScriptedRefiner(SCRIPT), 4.0, refine_steps=2)
    handle.remove()
    assert result.schedule == [2, 4] and result.prompts == [PROMPTS] + SCRIPT and len(records) == STEPS

    def reference(prompts):  # hand-computed: the pipeline's encoder, CFG = cat([negative "", positive])
        pos, neg, pooled, neg_pooled = pipe.encode_prompt(prompts, None, None, device="cpu", do_classifier_free_guidance=True)
        return torch.cat([neg, pos]), torch.cat([neg_pooled, pooled])

    with torch.no_grad():
        expected = {0: reference(PROMPTS), 2: reference(SCRIPT[0]), 4: reference(SCRIPT[1])}
    for step, (hidden, pooled) in enumerate(records):
        want_hidden, want_pooled = expected[max(s for s in expected if s <= step)]
        assert torch.equal(hidden, want_hidden) and torch.equal(pooled, want_pooled), f"step {step}"


@pytest.mark.parametrize("true_cfg", [1.0, 2.0])
def test_flux_refined_prompt_embeddings_are_used(true_cfg):
    """The tokens arrive through callback_on_step_end, the pooled CLIP embedding through the
    pre-hook; true CFG's negative pass keeps the negative prompt's tokens and pooled embedding."""
    backbone = tiny("flux-dev")
    pipe = backbone.pipe
    negative = "a blue circle" if true_cfg > 1 else None
    handle = record_transformer_conditioning(pipe.transformer)
    records = handle.records
    result = sample(backbone, ScriptedRefiner(SCRIPT), 3.5, true_cfg, negative, refine_steps=2)
    handle.remove()
    assert result.schedule == [2, 4]
    calls = 2 if true_cfg > 1 else 1
    assert len(records) == STEPS * calls

    def reference(prompts):
        embeds, pooled, _ = pipe.encode_prompt(prompts, None, device="cpu")
        return embeds, pooled

    with torch.no_grad():
        expected = {0: reference(PROMPTS), 2: reference(SCRIPT[0]), 4: reference(SCRIPT[1])}
        negative_reference = reference([negative] * 2) if negative else None
    for step in range(STEPS):
        hidden, pooled = records[step * calls]
        want_hidden, want_pooled = expected[max(s for s in expected if s <= step)]
        assert torch.equal(hidden, want_hidden) and torch.equal(pooled, want_pooled), f"step {step}"
        if negative:
            hidden, pooled = records[step * calls + 1]
            assert torch.equal(hidden, negative_reference[0]) and torch.equal(pooled, negative_reference[1]), f"step {step}"
    assert not pipe.transformer._forward_pre_hooks  # the hook is removed after sampling


# -----------------------------------------------------------------------------
# x0_hat for flow matching, FLUX's packing, previews


def test_flow_matching_denoised_estimate_is_exact():
    """x_t = (1 - sigma) x0 + sigma * noise and v = noise - x0 give back x0 exactly (hand-computed)."""
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    scheduler.set_timesteps(10)
    x0, noise = torch.randn(2, 16, 8, 8), torch.randn(2, 16, 8, 8)
    with promptloop.capture_denoised(scheduler) as record:
        for i, t in enumerate(scheduler.timesteps[:4]):
            sigma = scheduler.sigmas[i]
            x_t = (1 - sigma) * x0 + sigma * noise
            prev = scheduler.step(noise - x0, t, x_t).prev_sample
            torch.testing.assert_close(record["x0"], x0, atol=1e-5, rtol=1e-5)
            # and the step itself is untouched: Euler x_{t-1} = x_t + (sigma_next - sigma) * v
            torch.testing.assert_close(prev, x_t + (scheduler.sigmas[i + 1] - sigma) * (noise - x0))
    assert "step" not in vars(scheduler)  # the wrapper is gone


def test_flux_packing_matches_the_pipeline():
    latents = torch.randn(3, 16, 8, 8)
    packed = common.pack_latents(latents)
    assert torch.equal(packed, FluxPipeline._pack_latents(latents, 3, 16, 8, 8))
    assert torch.equal(common.unpack_latents(packed, 8), latents)
    assert torch.equal(FluxPipeline._unpack_latents(packed, 64, 64, 8), latents)


@pytest.mark.parametrize("kind", ["sd3", "flux-dev"])
def test_preview_is_the_vae_decoded_denoised_estimate(kind):
    backbone = tiny(kind)
    refiner = ScriptedRefiner()
    with preview_decoder_inputs() as captured:
        sample(backbone, refiner, 3.5, refine_steps=1)
    vae = backbone.pipe.vae
    assert captured["x0"].shape == (2, 16, 8, 8)  # unpacked for FLUX
    with torch.no_grad():  # the pipelines' own decoding: z = x0 / scale + shift
        expected = (vae.decode(captured["x0"] / vae.config.scaling_factor + vae.config.shift_factor).sample / 2 + 0.5).clamp(0, 1)
    torch.testing.assert_close(refiner.calls[0]["previews"], expected)


def test_taesd3_and_linear_previews(tmp_path):
    backbone = tiny("sd3")
    torch.manual_seed(0)
    # TAESD3's layout: TAESD's (4 levels, 1/3/3/3 blocks) with 16 latent channels, its VAE's scale and shift
    AutoencoderTiny(encoder_block_out_channels=(8,) * 4, decoder_block_out_channels=(8,) * 4, latent_channels=16,
                    num_encoder_blocks=(1, 3, 3, 3), num_decoder_blocks=(3, 3, 3, 1), **toy.SD3_VAE_SCALE,
                    ).save_pretrained(tmp_path / "taesd3")
    decoder = promptloop.PreviewDecoder("taesd", backbone, taesd_source=str(tmp_path / "taesd3"))
    x0 = torch.randn(2, *common.latent_shape(backbone))
    preview = decoder(x0)
    with torch.no_grad():
        expected = (decoder.tiny.decode(x0 / 1.5305 + 0.0609).sample / 2 + 0.5).clamp(0, 1)
    torch.testing.assert_close(preview, expected)
    assert preview.shape == (2, 3, SIZE, SIZE)
    linear = promptloop.PreviewDecoder("linear", backbone)
    assert linear(x0).shape == (2, 3, 8, 8) and linear.linear_map.shape == (17, 3)  # 16 channels + 1


def test_image_side_and_latent_shape():
    sd3, flux = tiny("sd3"), tiny("flux-dev")
    assert common.latent_shape(sd3) == (16, 8, 8) and common.latent_shape(flux, 128) == (16, 16, 16)
    with pytest.raises(common.UserError, match="multiple of 16"):
        common.image_side(flux, 72)  # a multiple of the VAE's 8 but not of 8 x the 2x2 packing
    with pytest.raises(common.UserError, match="true CFG"):
        promptloop.refined_sample(sd3, PROMPTS, true_cfg=2.0)


# -----------------------------------------------------------------------------
# loading: the four aliases through the hub code path, folders, the no-T5 option


def test_aliases_have_the_model_cards_settings():
    assert common.backbone_spec("sd35m").source == "stabilityai/stable-diffusion-3.5-medium"
    assert common.backbone_spec("sd35l").source == "stabilityai/stable-diffusion-3.5-large"
    assert common.backbone_spec("flux-dev").source == "black-forest-labs/FLUX.1-dev"
    schnell = common.backbone_spec("flux-schnell")
    assert (schnell.source, schnell.steps, schnell.guidance, schnell.text_length) == ("black-forest-labs/FLUX.1-schnell", 4, 0.0, 256)
    assert common.backbone_spec("sd35m").taesd == "madebyollin/taesd3" and common.backbone_spec("flux-dev").taesd == "madebyollin/taef1"


def test_folders_load_with_their_family(tiny_sd3_dir, tiny_flux_dir, tmp_path):
    sd3 = common.load_backbone(str(tiny_sd3_dir))
    assert sd3.family == "sd3" and sd3.denoiser is sd3.pipe.transformer
    assert (sd3.spec.steps, sd3.spec.guidance) == (28, 7.0)  # the SD3 pipeline's defaults
    no_t5 = common.load_backbone(str(tiny_sd3_dir), t5=False)
    assert no_t5.pipe.text_encoder_3 is None and no_t5.pipe.tokenizer_3 is None
    assert promptloop.refined_sample(no_t5, PROMPTS[:1], None, num_steps=2).images.shape == (1, 3, SIZE, SIZE)
    assert common.load_backbone(str(tiny_flux_dir)).family == "flux"
    with pytest.raises(common.UserError, match="only SD3"):
        common.load_backbone(str(tiny_flux_dir), t5=False)
    with pytest.raises(common.UserError, match="no UNet"):
        common.load_backbone(str(tiny_sd3_dir), unet=str(tmp_path))


@pytest.mark.slow
def test_aliases_load_from_the_hub_cache(tmp_path):
    """load_backbone('sd35m' | 'sd35l' | 'flux-dev' | 'flux-schnell') runs the real hub code path
    (from_pretrained of the model card's repo id) against a local hub cache holding tiny stand-ins."""
    stand_ins = {"stabilityai/stable-diffusion-3.5-medium": lambda: toy.tiny_sd3_pipeline(WORDS),
                 "stabilityai/stable-diffusion-3.5-large": lambda: toy.tiny_sd3_pipeline(WORDS, transformer=toy.SD35L_TRANSFORMER),
                 "black-forest-labs/FLUX.1-dev": lambda: toy.tiny_flux_pipeline(WORDS),
                 "black-forest-labs/FLUX.1-schnell": lambda: toy.tiny_flux_pipeline(WORDS, guidance_embeds=False)}
    commit = "0" * 40
    for repo, build in stand_ins.items():
        folder = tmp_path / ("models--" + repo.replace("/", "--"))
        build().save_pretrained(folder / "snapshots" / commit)
        (folder / "refs").mkdir()
        (folder / "refs" / "main").write_text(commit)
    script = (
        "import json, common, promptloop\n"
        "out = {}\n"
        "for alias in ('sd35m', 'sd35l', 'flux-dev', 'flux-schnell'):\n"
        "    b = common.load_backbone(alias, t5=not alias.startswith('sd35'))\n"
        "    images = promptloop.refined_sample(b, ['a red circle'], None, num_steps=2, size=64).images\n"
        "    out[alias] = [b.family, type(b.pipe.text_encoder_3).__name__ if b.family == 'sd3' else None,\n"
        "                  b.pipe.transformer.config.num_layers, list(images.shape)]\n"
        "print(json.dumps(out))\n"
    )
    env = dict(os.environ, HF_HUB_CACHE=str(tmp_path), HF_HUB_OFFLINE="1", PYTHONPATH=str(Path(common.REPO_DIR)))
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    loaded = json.loads(done.stdout.strip().splitlines()[-1])
    assert loaded == {"sd35m": ["sd3", "NoneType", 4, [1, 3, 64, 64]], "sd35l": ["sd3", "NoneType", 4, [1, 3, 64, 64]],
                      "flux-dev": ["flux", None, 1, [1, 3, 64, 64]], "flux-schnell": ["flux", None, 1, [1, 3, 64, 64]]}
