"""One copy of the diffusion backbone: an LRM (the reward `lrm:DIR`, train_refiner.py's --critic,
sample.py's --search scorer) runs on the sampler's copy when it is the same model, and evaluate.py
samples on the copy an LRM holds; the scores are those of a separately loaded copy. An LRM with LoRA,
or a sampler that is another model (an aligned UNet, another dtype, no T5), gets a copy of its own.

Loads are counted at diffusers' DiffusionPipeline.from_pretrained, which common.load_backbone calls."""

import pytest
import torch

import common
import evaluate
import lrm
import promptloop
import rewards
import sample
import train_refiner as tr

PROMPTS = ["a red circle", "a blue square on a green background", "a large triangle"]
CPU, FP32 = torch.device("cpu"), torch.float32


@pytest.fixture
def loads(monkeypatch):
    """The sources of every pipeline loaded from here on."""
    from diffusers import DiffusionPipeline

    sources, load = [], DiffusionPipeline.from_pretrained

    def counted(source, *args, **kwargs):
        sources.append(source)
        return load(source, *args, **kwargs)

    monkeypatch.setattr(DiffusionPipeline, "from_pretrained", counted)
    return sources


def save_lrm(backbone_dir, folder, **config):
    torch.manual_seed(0)  # a random head: different latents get clearly different scores
    model = lrm.LatentRewardModel(common.load_backbone(str(backbone_dir)),
                                  lrm.LRMConfig(backbone=str(backbone_dir), hidden=16, ensemble_draws=2, **config))
    lrm.save_lrm(model, folder)
    return folder


@pytest.fixture(scope="module")
def lrm_dir(tiny_sd15_dir, tmp_path_factory):
    return save_lrm(tiny_sd15_dir, tmp_path_factory.mktemp("lrm"))


@pytest.fixture(scope="module")
def lora_lrm_dir(tiny_sd15_dir, tmp_path_factory):
    return save_lrm(tiny_sd15_dir, tmp_path_factory.mktemp("lora-lrm"), lora_rank=2)


def some_latents(backbone, seed=0):
    return torch.randn(len(PROMPTS), *common.latent_shape(backbone), generator=torch.Generator().manual_seed(seed))


def lora_parameters(module):
    return [name for name, _ in module.named_parameters() if "lora_" in name]


def test_an_lrm_shares_a_backbone_of_the_same_source_only(tiny_sd15_dir, tmp_path):
    link = tmp_path / "link"
    link.symlink_to(tiny_sd15_dir)
    spec = common.backbone_spec(str(tiny_sd15_dir))
    assert lrm.shares_backbone(lrm.LRMConfig(backbone=str(link)), spec)  # one folder by two paths
    assert lrm.shares_backbone(lrm.LRMConfig(backbone="sd15"), common.backbone_spec("stable-diffusion-v1-5/stable-diffusion-v1-5"))
    assert not lrm.shares_backbone(lrm.LRMConfig(backbone="sdxl-turbo"), common.backbone_spec("sd15"))
    assert not lrm.shares_backbone(lrm.LRMConfig(backbone=str(tiny_sd15_dir), lora_rank=2), spec)


def test_the_lrm_reward_runs_on_the_samplers_backbone_with_the_same_scores(lrm_dir, sd15, loads):
    loads.clear()
    shared = rewards.build_reward(f"lrm:{lrm_dir}", backbone=sd15)
    assert loads == []  # no second copy
    model = shared.fns[0].lrm_model
    assert model.denoiser is sd15.denoiser and not model.denoiser.training
    own = rewards.build_reward(f"lrm:{lrm_dir}")  # no backbone given: the LRM loads its own, as before
    assert len(loads) == 1 and own.fns[0].lrm_model.denoiser is not sd15.denoiser
    latents = some_latents(sd15)
    scores = shared(None, PROMPTS, latents=latents)
    assert scores.max() - scores.min() > 1e-3
    assert torch.equal(scores, own(None, PROMPTS, latents=latents))  # the same weights either way


def test_an_lrm_with_lora_or_in_another_dtype_loads_its_own_copy(lrm_dir, lora_lrm_dir, sd15, loads):
    loads.clear()
    model = lrm.load_lrm(lora_lrm_dir, backbone=sd15)
    assert len(loads) == 1 and model.denoiser is not sd15.denoiser
    assert lora_parameters(model.denoiser) and not lora_parameters(sd15.denoiser)  # the sampler's denoiser has no adapter
    model = lrm.load_lrm(lrm_dir, dtype=torch.bfloat16, backbone=sd15)
    assert len(loads) == 2 and model.denoiser.dtype == torch.bfloat16 and sd15.denoiser.dtype == FP32


def test_the_critic_runs_on_the_samplers_backbone(tiny_sd15_dir, lrm_dir, sd15, tmp_path, loads):
    def config(*extra):
        return common.parse_config(tr.Config, ["--backbone", str(tiny_sd15_dir), "--out", str(tmp_path), "--credit", "per-refinement",
                                               "--critic", str(lrm_dir), *extra])

    loads.clear()
    critic = tr.load_critic(config(), sd15, CPU, FP32)
    assert loads == []
    own = tr.load_critic(config("--t5", "false"), sd15, CPU, FP32)  # a sampler without T5 is not the LRM's model: a copy
    assert len(loads) == 1
    latents = some_latents(sd15)
    for level in (301, None):  # a noisy state at its timestep; final latents
        torch.testing.assert_close(critic(latents, PROMPTS, level), own(latents, PROMPTS, level), rtol=0, atol=0)


def test_train_refiner_loads_the_backbone_once_and_checks_reward_specs_before(tiny_sd15_dir, lrm_dir, tmp_path, monkeypatch, loads):
    """The lrm: reward, the monitor's lrm: reward and the critic all run on the sampler's backbone;
    a bad spec (an unknown name, a folder that holds no LRM) fails before anything loads."""

    class PolicyReached(Exception):
        pass

    def no_policy(config, device, dtype):
        raise PolicyReached

    monkeypatch.setattr(tr, "load_policy", no_policy)  # the set-up is what is tested; no refiner, no training

    def config(reward):
        return common.parse_config(tr.Config, [
            "--backbone", str(tiny_sd15_dir), "--refiner", "unused", "--prompts", "toy", "--out", str(tmp_path / "run"),
            "--device", "cpu", "--reward", reward, "--monitor-rewards", f"lrm:{lrm_dir}", "--credit", "per-refinement",
            "--critic", str(lrm_dir)])

    for bad in ("no-such-reward", f"lrm:{tmp_path}"):
        with pytest.raises(common.UserError):
            tr.train(config(bad))
    assert loads == []
    with pytest.raises(PolicyReached):
        tr.train(config(f"lrm:{lrm_dir}:0.5"))
    assert loads == [str(tiny_sd15_dir)]  # the sampler's, once


def test_sample_search_scores_on_the_samplers_backbone(tiny_sd15_dir, lrm_dir, sd15, loads):
    def config(*extra):
        return common.parse_config(sample.Config, ["--backbone", str(tiny_sd15_dir), "--prompt", PROMPTS[0], "--search", "2",
                                                   "--lrm", str(lrm_dir), *extra])

    loads.clear()
    hook = sample.search_hook(config(), sd15, CPU, FP32)
    assert loads == []
    aligned = sample.search_hook(config("--unet", str(tiny_sd15_dir)), sd15, CPU, FP32)  # an aligned UNet: another model
    assert len(loads) == 1
    latents = some_latents(sd15)
    for level in (501, None):
        torch.testing.assert_close(hook.score(latents, PROMPTS, level), aligned.score(latents, PROMPTS, level), rtol=0, atol=0)


def test_evaluate_samples_on_the_copy_an_lrm_holds(tiny_sd15_dir, lrm_dir, lora_lrm_dir, loads):
    def config(*extra):
        return common.parse_config(evaluate.Config, ["--backbones", str(tiny_sd15_dir), *extra])

    scorers = {"lrm": rewards.build_reward(f"lrm:{lrm_dir}"), "jpeg": rewards.build_reward("jpeg")}
    with_lora = lrm.load_lrm(lora_lrm_dir)
    held = evaluate.latent_reward_models(with_lora, scorers)
    assert held == [with_lora, scorers["lrm"].fns[0].lrm_model]
    loads.clear()
    backbone = evaluate.load_sampler(str(tiny_sd15_dir), held, config(), CPU, FP32)
    assert loads == [] and backbone.denoiser is held[1].denoiser  # not the LoRA LRM's denoiser
    assert backbone.name == str(tiny_sd15_dir) and held[1].backbone.name == str(tiny_sd15_dir)
    # --unet makes the sampler another model (here the same UNet again: the same images)
    own = evaluate.load_sampler(str(tiny_sd15_dir), held, config("--unet", str(tiny_sd15_dir)), CPU, FP32)
    assert len(loads) == 1 and own.denoiser is not backbone.denoiser

    def images(backbone):
        return promptloop.refined_sample(backbone, PROMPTS, num_steps=2, generator=torch.Generator().manual_seed(0)).images

    torch.testing.assert_close(images(backbone), images(own), rtol=0, atol=0)
