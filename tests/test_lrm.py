"""lrm.py on tiny pipelines with the real block structure: the features are the blocks' own maps;
the noise levels of DDPM and flow-matching backbones by hand; the critic's calibration to the reward."""

import math

import pytest
import torch
from conftest import WORDS

import common
import lrm
import toy


@pytest.mark.parametrize("builder, sides", [(toy.tiny_sd15_pipeline, [8, 4, 2, 1, 1]), (toy.tiny_sdxl_pipeline, [8, 4, 2, 2])])
def test_pooled_features_are_each_down_block_at_its_own_resolution(builder, sides, tmp_path):
    """Each down block is pooled at its own resolution: the input of its downsampler, or, for the last
    block (no downsampler, two layers), its output -- not its first layer's output -- then the mid block."""
    builder(WORDS).save_pretrained(tmp_path)
    backbone = common.load_backbone(str(tmp_path))
    unet = backbone.pipe.unet
    assert unet.config.layers_per_block == 2 and unet.down_blocks[-1].downsamplers is None  # the real layout
    model = lrm.LatentRewardModel(backbone, lrm.LRMConfig(backbone=str(tmp_path)))
    cond = model.text_conditioning(["a red circle", "a square on a blue background"])
    x_t = torch.randn(2, *common.latent_shape(backbone), generator=torch.Generator().manual_seed(0))
    # the same maps, found independently: what each downsampler receives, what the last down block
    # and the mid block return (hooks registered first run first)
    maps = []
    hooks = [unet.mid_block.register_forward_hook(lambda m, i, o: maps.append(o))]
    for block in unet.down_blocks:
        if block.downsamplers is not None:
            hooks.append(block.downsamplers[0].register_forward_pre_hook(lambda m, args: maps.append(args[0])))
        else:
            hooks.append(block.register_forward_hook(lambda m, i, o: maps.append(o[0])))
    with torch.no_grad():
        features = model._unet_features(x_t, torch.tensor([10, 700]), cond["prompt_embeds"], cond.get("add_text_embeds"))
    for hook in hooks:
        hook.remove()
    assert [h.shape[-1] for h in maps] == sides
    channels = [*unet.config.block_out_channels, unet.config.block_out_channels[-1]]
    assert [h.shape[1] for h in maps] == channels
    torch.testing.assert_close(features, torch.cat([lrm.pool_feature_map(h) for h in maps], 1))
    assert features.shape == (2, 8 * sum(channels))  # what the head's LayerNorm was sized for
    assert model(x_t, torch.tensor([10, 700]), cond).shape == (2,)


def test_pool_feature_map_by_hand():
    h = torch.arange(2 * 16, dtype=torch.float32).view(1, 2, 4, 4)  # two channels of 4x4: 0..15, 16..31
    pooled = lrm.pool_feature_map(h)[0]  # mean (2), std (2), 2x2 grid (2 x 4), centre (2), ring (2)
    assert pooled.shape == (16,)
    torch.testing.assert_close(pooled[0:2], torch.tensor([7.5, 23.5]))
    torch.testing.assert_close(pooled[2:4], torch.arange(16.0).std().repeat(2))
    torch.testing.assert_close(pooled[4:8], torch.tensor([2.5, 4.5, 10.5, 12.5]))  # the grid of channel 0
    centre = torch.tensor([5.0, 6, 9, 10]).mean()  # the middle 2x2 of channel 0
    torch.testing.assert_close(pooled[12], centre)
    torch.testing.assert_close(pooled[14], (torch.arange(16.0).sum() - 4 * centre) / 12)
    # a 1x1 map (a tiny model's last level): no spread, no ring -- finite, never NaN
    one = lrm.pool_feature_map(torch.tensor([[[[3.0]]]]))[0]
    torch.testing.assert_close(one, torch.tensor([3.0, 0, 3, 3, 3, 3, 3, 3]))


# -----------------------------------------------------------------------------
# noise levels: DDPM and flow matching on one coordinate


def test_flow_noising_sigma_mapping_and_dina_variance_by_hand(sd3):
    x0, eps = torch.tensor([[2.0, -1.0]]), torch.tensor([[0.5, 1.0]])
    # x_sigma = (1 - sigma) x0 + sigma eps at sigma = 0.25: (1.5 + 0.125, -0.75 + 0.25)
    torch.testing.assert_close(lrm.flow_noisy_latents(x0, eps, torch.tensor([0.25])), torch.tensor([[1.625, -0.5]]))
    # DiNa-LRM's v(sigma) = 2 sigma^2 + 0.05
    torch.testing.assert_close(lrm.dina_variance(torch.tensor([0.0, 0.5, 1.0])), torch.tensor([0.05, 0.55, 2.05]))
    # abar = 0.5: sqrt(0.5) / (2 sqrt(0.5)) = 0.5; abar = 0.8: sqrt(0.2) / (sqrt(0.8) + sqrt(0.2)) = 1/3
    sigma = lrm.sigma_from_alpha_bar(torch.tensor([0.5, 0.8]))
    torch.testing.assert_close(sigma, torch.tensor([0.5, 1 / 3]))
    torch.testing.assert_close(lrm.alpha_bar_from_sigma(sigma), torch.tensor([0.5, 0.8]))
    # a DDPM latent rescaled by 1 / (sqrt(abar) + sqrt(1 - abar)) is the flow latent at the equivalent sigma
    abar = torch.tensor([0.8])
    ddpm = lrm.noisy_latents(x0, eps, abar) / (abar.sqrt() + (1 - abar).sqrt())
    torch.testing.assert_close(ddpm, lrm.flow_noisy_latents(x0, eps, sigma[1:]))
    # the model on an SD3 backbone: sigma_t = (t + 1) / 1000, flow noising, v from sigma_t
    model = lrm.LatentRewardModel(sd3, lrm.LRMConfig(backbone="tiny-sd3", variance="dina"))
    t = torch.tensor([249])
    torch.testing.assert_close(model.sigmas[t], torch.tensor([0.25]))
    torch.testing.assert_close(model.add_noise(x0, eps, t), torch.tensor([[1.625, -0.5]]))
    torch.testing.assert_close(model.variance(torch.tensor([249, 499])), torch.tensor([2 * 0.0625 + 0.05, 0.55]))
    assert lrm.nearest_timestep(model.sigmas, 0.5) == 499
    assert lrm.bucket_timesteps(model.sigmas, 0.8, 1.0).tolist() == list(range(799, 1000))  # sigma 0.8 .. 1, 1 included


def test_ddpm_backbone_sigma_is_the_equivalent_of_its_alpha_bar(tiny_sd15_dir):
    model = lrm.LatentRewardModel(common.load_backbone(str(tiny_sd15_dir)), lrm.LRMConfig(backbone="tiny", variance="dina"))
    abar = model.alphas_cumprod[[0, 500, 999]]
    torch.testing.assert_close(model.sigmas[[0, 500, 999]], (1 - abar).sqrt() / (abar.sqrt() + (1 - abar).sqrt()))
    torch.testing.assert_close(model.variance(torch.tensor([500])), 2 * model.sigmas[[500]] ** 2 + 0.05)
    x0, eps = torch.randn(1, 4, 2, 2), torch.randn(1, 4, 2, 2)
    torch.testing.assert_close(model.add_noise(x0, eps, torch.tensor([500])), abar[1].sqrt() * x0 + (1 - abar[1]).sqrt() * eps)


# -----------------------------------------------------------------------------
# transformers: the pooled tokens are the joint blocks' own outputs


def _pooled_by_hand(image, text, rows):
    """pool_tokens written the other way round: the token grid by view + permute (row-major tokens)."""
    b, n, d = image.shape
    grid = image.view(b, rows, n // rows, d).permute(0, 3, 1, 2)
    return torch.cat([lrm.pool_feature_map(grid), text.mean(1), text.std(1)], 1)


def test_mmdit_features_are_the_joint_blocks_outputs_computed_independently(sd3):
    """SD3.5-M's structure (dual-attention blocks first, RMS qk-norm), 3 of 4 blocks: features after
    blocks 1, 2, 3 == the blocks run by hand from the transformer's own embedders."""
    model = lrm.LatentRewardModel(sd3, lrm.LRMConfig(backbone="tiny-sd3", blocks=3))
    transformer = sd3.pipe.transformer
    assert model.taps == [1, 2, 3] and transformer.transformer_blocks[0].attn2 is not None  # SD3.5's dual attention
    prompts = ["a red circle", "a square on a blue background"]
    cond = model.text_conditioning(prompts)
    x_t = torch.randn(2, *common.latent_shape(sd3), generator=torch.Generator().manual_seed(0))
    t = torch.tensor([100, 700])
    with torch.no_grad():
        features = model.features(x_t, t, cond)
        hidden = transformer.pos_embed(x_t)  # (B, tokens, D): 2x2 patches + positions
        temb = transformer.time_text_embed(model.sigmas[t] * 1000, cond["pooled_prompt_embeds"])
        text = transformer.context_embedder(cond["prompt_embeds"])
        expected = []
        for block in transformer.transformer_blocks[:3]:
            text, hidden = block(hidden_states=hidden, encoder_hidden_states=text, temb=temb)
            expected.append(_pooled_by_hand(hidden, text, x_t.shape[-2] // 2))
    torch.testing.assert_close(features, torch.cat(expected, 1))
    assert features.shape == (2, 3 * 10 * transformer.inner_dim)  # what the head's LayerNorm was sized for
    assert model(x_t, t, cond).shape == (2,)
    # the default runs half the blocks (DiNa-LRM: 12 of 24), taps at thirds of them
    assert lrm.LatentRewardModel(sd3, lrm.LRMConfig(backbone="tiny-sd3")).taps == [1, 2]
    assert lrm.transformer_taps(12) == [4, 8, 12]
    with pytest.raises(common.UserError, match="use 1..3"):
        lrm.LatentRewardModel(sd3, lrm.LRMConfig(backbone="tiny-sd3", blocks=4))  # the last block has no text output


def test_flux_features_are_the_double_stream_blocks_outputs(flux):
    """FLUX.1's structure: packed 2x2 tokens with RoPE positions, the distilled guidance embedded."""
    model = lrm.LatentRewardModel(flux, lrm.LRMConfig(backbone="tiny-flux"))
    transformer = flux.pipe.transformer
    cond = model.text_conditioning(["a red circle"])
    x_t = torch.randn(1, *common.latent_shape(flux), generator=torch.Generator().manual_seed(0))
    t = torch.tensor([600])
    rows = x_t.shape[-2] // 2
    with torch.no_grad():
        features = model.features(x_t, t, cond)
        hidden = transformer.x_embedder(common.pack_latents(x_t))
        guidance = torch.tensor([flux.spec.guidance])
        temb = transformer.time_text_embed(model.sigmas[t] * 1000, guidance * 1000, cond["pooled_prompt_embeds"])
        text = transformer.context_embedder(cond["prompt_embeds"])
        ids = torch.cat([torch.zeros(text.shape[1], 3), lrm.image_token_ids(rows, rows, "cpu")])
        text, hidden = transformer.transformer_blocks[0](hidden_states=hidden, encoder_hidden_states=text, temb=temb,
                                                         image_rotary_emb=transformer.pos_embed(ids))
    torch.testing.assert_close(features, _pooled_by_hand(hidden, text, rows))
    # the same latent at another noise level gives other features (the timestep reaches them)
    assert not torch.allclose(features, model.features(x_t, torch.tensor([100]), cond))


def test_transformer_lora_targets_only_the_blocks_that_run(sd3):
    model = lrm.LatentRewardModel(sd3, lrm.LRMConfig(backbone="tiny-sd3", lora_rank=2, blocks=2))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad and "lora_" in n]
    blocks = {int(n.split("transformer_blocks.")[1].split(".")[0]) for n in trainable}
    assert blocks == {0, 1} and any("add_q_proj" in n for n in trainable) and any(".attn2." in n for n in trainable)


@pytest.mark.parametrize("folder", ["tiny_sd3_dir", "tiny_flux_dir"])
def test_lrm_reward_on_flow_backbones(folder, tmp_path, request):
    """`lrm:PATH` with an SD3 / FLUX LRM: the sampler's unpacked (B, 16, h, w) latents, fixed-level
    ensembling from the saved config, the same reward for the same latents."""
    import rewards

    folder = str(request.getfixturevalue(folder))
    torch.manual_seed(0)
    config = lrm.LRMConfig(backbone=folder, hidden=16, ensemble_draws=3, ensemble_levels=[0.2, 0.5, 0.7])
    model = lrm.LatentRewardModel(common.load_backbone(folder), config)
    lrm.save_lrm(model, tmp_path / "lrm")
    reward = rewards.build_reward(f"lrm:{tmp_path / 'lrm'}")
    latents = torch.randn(2, 16, 8, 8)
    prompts = ["a red circle", "a blue square"]
    out = reward(None, prompts, latents=latents)
    assert out.shape == (2,) and torch.equal(out, reward(None, prompts, latents=latents))
    # fixed levels: draw d at sigma 0.2, 0.5, 0.7 in turn (t = 199, 499, 699), fresh eps per draw, one eps for every row
    generator, singles = torch.Generator().manual_seed(0), []
    cond = model.text_conditioning(prompts)
    for t in (199, 499, 699):
        noise = torch.randn(latents[:1].shape, generator=generator).expand_as(latents)  # one eps for every row
        t = torch.full((2,), t)
        singles.append(model(lrm.flow_noisy_latents(latents, noise, model.sigmas[t]), t, cond))
    torch.testing.assert_close(out, torch.stack(singles).mean(0).detach(), atol=1e-5, rtol=1e-5)
    with pytest.raises(common.UserError, match="channels"):
        reward(None, prompts, latents=torch.randn(2, 4, 8, 8))


# -----------------------------------------------------------------------------
# the LRM as a critic (train_refiner.py --credit per-refinement)


def test_affine_fit_hand_computed():
    assert lrm.affine_fit(torch.tensor([0.0, 1.0, 2.0]), torch.tensor([1.0, 3.0, 5.0])) == pytest.approx((2.0, 1.0))
    assert lrm.affine_fit(torch.tensor([1.0, 1.0]), torch.tensor([2.0, 4.0])) == (0.0, 3.0)  # no spread: the mean
    assert lrm.affine_fit(torch.tensor([0.0, 1.0, 5.0]), torch.tensor([0.0, 2.0, math.nan])) == pytest.approx((2.0, 0.0))


# -----------------------------------------------------------------------------
# the Thurstone variance: the same reward gap means less at a higher noise level


def test_thurstone_likelihood_depends_on_the_noise_level():
    """v(t) = v0 + kappa (1 - abar_t): one reward gap gives P(w > l) nearer 1/2 and another loss at
    high noise (abar 0.05) than at low noise (abar 0.99), for both Thurstone losses; Bradley-Terry is
    blind to the level (the baseline the design compares against)."""
    r_w, r_l, target = torch.tensor([1.0, 1.0]), torch.tensor([0.0, 0.0]), torch.tensor([1.0, 1.0])
    variance = lrm.noise_variance(torch.tensor([0.99, 0.05]), 0.5, 2.0)  # (low noise, high noise)
    torch.testing.assert_close(variance, torch.tensor([0.52, 2.4]))
    p = lrm.thurstone_probability(r_w, r_l, variance)
    torch.testing.assert_close(p, torch.special.ndtr(1 / torch.sqrt(2 * torch.tensor([0.52, 2.4]))))
    assert p[0] > p[1] + 0.1 and p[1] > 0.5
    for loss in ("thurstone-nll", "thurstone-fidelity"):
        low, high = (lrm.preference_loss(loss, r_w[:1], r_l[:1], v, target[:1]) for v in (variance[:1], variance[1:]))
        assert high > low + 0.05, (loss, low, high)  # a correct ranking earns less at high noise
    assert lrm.preference_loss("bradley-terry", r_w[:1], r_l[:1], variance[:1], target[:1]) == \
        lrm.preference_loss("bradley-terry", r_w[:1], r_l[:1], variance[1:], target[:1])


@pytest.mark.parametrize("variance", ["fixed", "learned", "dina"])
def test_model_variance_follows_the_timestep(tiny_sd15_dir, variance):
    """The model's v(t), which train_reward.py hands to preference_loss, is read at each pair's own
    timestep: v0 + kappa (1 - abar_t) (fixed, learned at its init) or 2 sigma_t^2 + 0.05 (dina), rising
    with t; so the same rewards give a higher loss at t = 900 than at t = 50."""
    model = lrm.LatentRewardModel(common.load_backbone(str(tiny_sd15_dir)), lrm.LRMConfig(backbone="tiny", variance=variance))
    t = torch.tensor([50, 500, 900])
    v = model.variance(t)
    if variance == "dina":
        expected = lrm.dina_variance(model.sigmas[t])
    else:
        expected = lrm.noise_variance(model.alphas_cumprod[t], 0.5, 2.0)
    torch.testing.assert_close(v, expected.float())
    assert v[0] < v[1] < v[2] and v[2] > 2 * v[0]
    r_w, r_l, target = torch.ones(3), torch.zeros(3), torch.ones(3)
    losses = [lrm.preference_loss("thurstone-nll", r_w[i:i + 1], r_l[i:i + 1], v[i:i + 1], target[i:i + 1]).item() for i in range(3)]
    assert losses[0] < losses[1] < losses[2]
    if variance == "learned":  # v0 and kappa get gradients through the loss
        lrm.preference_loss("thurstone-nll", r_w, r_l, v, target).backward()
        assert model.log_v0.grad.abs() > 0 and model.log_kappa.grad.abs() > 0


def test_shared_draws_give_a_pair_of_equal_latents_even_odds(tiny_sd15_dir):
    """lrm_validation_rewards scores a pair's two sides with the same (t, eps) per draw under "shared"
    (as candidates are compared in use): a pair of two equal latents gets p = 0.5 exactly for every
    number of draws averaged, across batches (6 pairs in batches of 4 and 2). Under "different" draws
    (the unprefixed results) the noise alone tells the two sides apart."""
    backbone = common.load_backbone(str(tiny_sd15_dir))
    model = lrm.LatentRewardModel(backbone, lrm.LRMConfig(backbone="tiny", ensemble_draws=4)).eval()
    latents = torch.randn(6, *common.latent_shape(backbone), generator=torch.Generator().manual_seed(0))
    captions = ["a red circle", "a square on a blue background", "a red square"] * 2
    result = lrm.lrm_validation_rewards(model, lambda idx: (latents[idx], latents[idx].clone()), captions,
                                        torch.Generator().manual_seed(0), batch_size=4, levels=(0.2, 0.5))
    for name in ("draws", "levels"):
        assert result["shared"][name][0].shape == (4, 6)
        for draws in range(1, 5):
            shared_0, shared_1 = (r[:draws].mean(0) for r in result["shared"][name])
            different_0, different_1 = (r[:draws].mean(0) for r in result[name])
            assert torch.equal(torch.sigmoid(shared_0 - shared_1), torch.full((6,), 0.5)), (name, draws)
            assert (different_0 != different_1).all(), (name, draws)
