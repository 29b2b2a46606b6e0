"""lrm.py on tiny pipelines with the real block structure: the features are the blocks' own maps."""

import pytest
import torch

import common
import lrm
import toy
from conftest import WORDS


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
        features = model._unet_features(x_t, torch.tensor([10, 700]), cond["prompt_embeds"], cond.get("text_embeds"))
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


def test_transformer_backbones_are_refused_in_one_line(sd3):
    with pytest.raises(common.UserError, match="runs on UNet backbones"):
        lrm.LatentRewardModel(sd3, lrm.LRMConfig(backbone="tiny-sd3"))
