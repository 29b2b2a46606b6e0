"""train_refiner.py: the GRPO math, the prompt sources, a real learning run, resume, DDP.

Tiers: pure functions (hand-computed values, TRL's formulas); tiny models in-process (row
selection, a GRPO run that must raise a reward whose optimum is known); subprocess runs of the
CLI (kill -9 and --resume equals an uninterrupted run; torchrun with 2 gloo ranks)."""

import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import WORDS
from safetensors.torch import load_file

import build_toy_world
import common
import lrm
import promptloop
import refiners
import runs
import toy
import train_refiner as tr

REPO = Path(__file__).resolve().parents[1]


# -----------------------------------------------------------------------------
# GRPO math


def test_group_advantages_hand_computed():
    rewards = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 5.0, 5.0, 5.0])
    advantages, zero_variance = tr.group_advantages(rewards, group_size=4, eps=1e-4)
    std = math.sqrt((1.5**2 + 0.5**2 + 0.5**2 + 1.5**2) / 3)  # unbiased, as torch.std
    expected = [(r - 2.5) / (std + 1e-4) for r in (1, 2, 3, 4)] + [0.0] * 4
    assert torch.allclose(advantages, torch.tensor(expected), atol=1e-6)
    assert zero_variance.tolist() == [False, True]


def test_group_advantages_skip_nonfinite_rewards():
    rewards = torch.tensor([1.0, float("nan"), 3.0, float("nan"), float("inf"), 7.0])
    advantages, zero_variance = tr.group_advantages(rewards, group_size=3, eps=0.0)
    # group 1: the finite rewards 1 and 3 -> mean 2, std sqrt(2): -+1/sqrt(2); the NaN gets 0
    assert torch.allclose(advantages[:3], torch.tensor([-1 / math.sqrt(2), 0.0, 1 / math.sqrt(2)]))
    # group 2: one finite reward only -> nothing to compare: all 0, counted as zero-variance
    assert advantages[3:].tolist() == [0.0, 0.0, 0.0]
    assert zero_variance.tolist() == [False, True]
    assert torch.isfinite(advantages).all()


def test_refinement_advantages_hand_computed():
    # two groups of 2: r = (1, 3 | 2, 2); V_0 shared within each group, V_1 not
    r = torch.tensor([1.0, 3.0, 2.0, 2.0])
    values = torch.tensor([[0.0, 0.0, 1.0, 1.0], [1.0, 0.0, 0.0, 2.0]])
    a = tr.refinement_advantages(r, values, group_size=2, eps=0.0)
    h = 1 / math.sqrt(2)  # (x - mean) / std for a pair: +-1/sqrt(2)
    # k = 0: r - V_0 = (1, 3 | 1, 1) -> the terminal advantages; group 2 has no spread -> 0
    torch.testing.assert_close(a[0], torch.tensor([-h, h, 0.0, 0.0]))
    torch.testing.assert_close(a[0], tr.group_advantages(r, 2, eps=0.0)[0])
    # k = 1: r - V_1 = (0, 3 | 2, 0), centred per group and scaled by the std of r (sqrt 2 | 0): a
    # critic cannot inflate the credit, and a group with no reward spread gets none
    torch.testing.assert_close(a[1], torch.tensor([-1.5 * h, 1.5 * h, 0.0, 0.0]))


def test_clipped_surrogate_hand_computed():
    old = torch.zeros(4, 1)
    ratio = torch.tensor([[1.5], [0.5], [1.5], [1.1]])
    advantages = torch.tensor([1.0, -1.0, -1.0, 2.0])
    loss, clipped = tr.clipped_surrogate(ratio.log(), old, advantages, clip_epsilon=0.2)
    # rho=1.5, A=1: min(1.5, 1.2) -> -1.2 (clipped); rho=0.5, A=-1: min(-0.5, -0.8) -> 0.8 (clipped);
    # rho=1.5, A=-1: min(-1.5, -1.2) -> 1.5 (not clipped: the pessimistic branch is unclipped);
    # rho=1.1, A=2: inside the trust region -> -2.2
    assert torch.allclose(loss.squeeze(1), torch.tensor([-1.2, 0.8, 1.5, -2.2]), atol=1e-6)
    assert clipped.squeeze(1).tolist() == [True, True, False, False]


def test_k3_kl_hand_computed_and_unbiased():
    value = tr.k3_kl(torch.tensor(math.log(0.5)), torch.tensor(math.log(0.25)))
    assert value.item() == pytest.approx(0.5 - math.log(0.5) - 1, abs=1e-6)
    assert tr.k3_kl(torch.tensor(-1.3), torch.tensor(-1.3)).item() == 0.0
    # tokens sampled from pi: the mean of k3 estimates KL(pi || pi_ref)
    gen = torch.Generator().manual_seed(0)
    pi, ref = torch.tensor([0.5, 0.3, 0.1, 0.1]), torch.tensor([0.25, 0.25, 0.25, 0.25])
    tokens = torch.multinomial(pi, 200_000, replacement=True, generator=gen)
    estimate = tr.k3_kl(pi.log()[tokens], ref.log()[tokens]).mean().item()
    exact = (pi * (pi / ref).log()).sum().item()
    assert estimate == pytest.approx(exact, abs=5e-3)
    assert (tr.k3_kl(torch.randn(100), torch.randn(100)) >= 0).all()


def trl_grpo_loss(per_token_logps, old_per_token_logps, ref_per_token_logps, advantages, completion_mask, epsilon, beta):
    """TRL's GRPOTrainer._compute_loss (trl/trainer/grpo_trainer.py), loss_type="bnpo", written out."""
    per_token_kl = torch.exp(ref_per_token_logps - per_token_logps) - (ref_per_token_logps - per_token_logps) - 1
    coef_1 = torch.exp(per_token_logps - old_per_token_logps)
    coef_2 = torch.clamp(coef_1, 1 - epsilon, 1 + epsilon)
    per_token_loss1 = coef_1 * advantages.unsqueeze(1)
    per_token_loss2 = coef_2 * advantages.unsqueeze(1)
    per_token_loss = -torch.min(per_token_loss1, per_token_loss2)
    per_token_loss = per_token_loss + beta * per_token_kl
    return (per_token_loss * completion_mask).sum() / completion_mask.sum().clamp(min=1.0)


def trl_advantages(rewards, num_generations):
    """TRL's GRPO advantages: (r - mean) / (std + 1e-4) per group, torch.std (unbiased)."""
    mean_grouped_rewards = rewards.view(-1, num_generations).mean(dim=1).repeat_interleave(num_generations)
    std_grouped_rewards = rewards.view(-1, num_generations).std(dim=1).repeat_interleave(num_generations)
    return (rewards - mean_grouped_rewards) / (std_grouped_rewards + 1e-4)


def test_loss_matches_trl_formulas():
    gen = torch.Generator().manual_seed(1)
    n, t = 8, 6
    logps = -torch.rand(n, t, generator=gen) * 3
    old = logps + 0.3 * torch.randn(n, t, generator=gen)  # ratios both inside and outside the clip range
    ref = logps + 0.5 * torch.randn(n, t, generator=gen)
    rewards = torch.randn(n, generator=gen)
    mask = (torch.rand(n, t, generator=gen) > 0.3).long()
    advantages, _ = tr.group_advantages(rewards, group_size=4)
    assert torch.allclose(advantages, trl_advantages(rewards, 4), atol=1e-6)
    ours, stats = tr.grpo_loss(logps, old, ref, advantages, mask, 0.2, 0.04, num_tokens=mask.sum().item())
    theirs = trl_grpo_loss(logps, old, ref, advantages, mask, 0.2, 0.04)
    assert ours.item() == pytest.approx(theirs.item(), abs=1e-6)
    assert 0 < stats["clip_fraction"] < 1 and stats["kl"] > 0


# -----------------------------------------------------------------------------
# prompt sources


def test_load_prompts_text_parquet_toy(tmp_path, capsys):
    import pyarrow as pa
    import pyarrow.parquet as pq

    text = tmp_path / "prompts.txt"
    text.write_text("a red circle\n\n  a blue   square \na red circle\n")
    assert runs.load_prompts(str(text)) == ["a red circle", "a blue square"]
    assert runs.load_prompts(str(text), limit=1) == ["a red circle"]

    folder = tmp_path / "pickapic" / "data"
    folder.mkdir(parents=True)
    schema = dict(caption=["a cat", "a cat ", None, "", "a dog"], label_0=[1.0, 0.0, 0.5, 1.0, 0.0])
    pq.write_table(pa.table(schema), folder / "train-00000-of-00001.parquet")
    pq.write_table(pa.table(dict(caption=["a held-out cat"], label_0=[1.0])), folder / "test-00000-of-00001.parquet")
    assert runs.load_prompts(str(tmp_path / "pickapic")) == ["a cat", "a dog"]
    assert "skipped 2" in capsys.readouterr().err  # the None and the empty caption
    assert runs.load_prompts(str(tmp_path / "pickapic"), split="test") == ["a held-out cat"]

    train, test = runs.load_prompts("toy", "train"), runs.load_prompts("toy", "test")
    assert train and test and not set(train) & set(test)

    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    for bad in ("", str(empty), str(tmp_path / "missing.txt")):
        with pytest.raises(common.UserError):
            runs.load_prompts(bad)
    pq.write_table(pa.table(dict(text=["no caption column"])), tmp_path / "wrong.parquet")
    with pytest.raises(common.UserError, match="caption"):
        runs.load_prompts(str(tmp_path / "wrong.parquet"))


# -----------------------------------------------------------------------------
# tiny models: a policy whose prompts are short and whose outputs GRPO can move


@pytest.fixture(scope="module")
def policy_dir(tmp_path_factory):
    """A tiny random Qwen2.5-VL whose vocabulary holds the words of the refiner's messages (short
    prompts, fast) and whose output layer is scaled up 10x (a random 64-d model otherwise has
    near-uniform logits that a LoRA cannot move far)."""
    text = refiners.REFINER_SYSTEM + " " + refiners.refiner_messages("u", "c", 1, 2)[1]["content"][1]["text"] + " system user assistant"
    words = WORDS + sorted(set(re.findall(r"[A-Za-z]+", text)) - set(WORDS))
    processor = toy.tiny_qwen_processor(words)
    model = toy.tiny_qwen_model(processor)
    with torch.no_grad():
        model.lm_head.weight.mul_(10.0)
    folder = tmp_path_factory.mktemp("policy")
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def lowercase_reward(images, prompts, *, answers=None, **_):
    """Fraction of the refiner's answer characters that are lowercase ASCII letters or spaces,
    averaged over the K answers. The optimum (1.0) is known: write only lowercase words."""
    if not answers:
        return torch.zeros(len(prompts))

    def fraction(answer):
        return sum((c.isascii() and c.islower()) or c == " " for c in answer) / max(1, len(answer))

    return torch.tensor([sum(map(fraction, column)) / len(column) for column in zip(*answers)])


@pytest.fixture
def one_thread():
    """Tiny models run fastest on one thread (no oversubscription when the machine is shared)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_args(backbone_dir, refiner_dir, out, *extra):
    return [
        "--backbone", str(backbone_dir), "--refiner", str(refiner_dir), "--prompts", "toy", "--out", str(out),
        "--sampling-steps", "3", "--max-new-tokens", "8", "--prompts-per-step", "2", "--group-size", "2",
        "--monitor-prompts", "4", "--device", "cpu", *extra,
    ]


def test_select_rows_matches_full_batch(policy_dir):
    """Minibatches cut pixel_values by image_grid_thw and drop all-padding columns: the log-probs
    of the selected rows equal those of the full batch."""
    refiner = refiners.load_refiner(str(policy_dir), max_new_tokens=6)
    torch.manual_seed(0)
    users = ["a circle", "a large red square on a blue background", "a blue triangle"]
    out = refiner.refine(torch.rand(3, 3, 32, 32), users, users, 1, 2)
    full = refiner.token_logprobs(out.inputs, out.completion_ids, out.completion_mask)
    assert (full - out.logprobs).abs().max() < 1e-4  # teacher forcing reproduces generation
    rows = [2, 0]
    part = refiner.token_logprobs(refiners.select_rows(out.inputs, rows), out.completion_ids[rows], out.completion_mask[rows])
    assert torch.allclose(part, full[rows], atol=1e-5)
    assert refiners.select_rows(out.inputs, [0])["input_ids"].shape[1] < out.inputs["input_ids"].shape[1]  # padding dropped


def test_initial_noise_and_blank_preview(sd15, policy_dir, one_thread):
    gen = torch.Generator().manual_seed(0)
    shared = tr.initial_noise(sd15, 2, 3, True, gen, 0)
    assert shared.shape[0] == 6 and torch.equal(shared[0], shared[2]) and not torch.equal(shared[2], shared[3])
    separate = tr.initial_noise(sd15, 2, 3, False, gen, 0)
    assert not torch.equal(separate[0], separate[1])
    refiner = refiners.load_refiner(str(policy_dir), max_new_tokens=4)
    config = common.parse_config(tr.Config, tiny_args("x", "y", "z", "--blank-preview", "--refine-steps", "2"))
    sample = tr.rollout(sd15, refiner, ["a circle"], config, None, torch.Generator().manual_seed(0))
    assert len(sample.previews) == 2 and all(torch.all(p == 0.5) for p in sample.previews)


@pytest.mark.slow
def test_grpo_raises_a_reward_with_known_optimum(tiny_sd15_dir, policy_dir, tmp_path, one_thread):
    """A real learning test: the held-out reward (fixed prompts and noise) must rise clearly."""
    args = tiny_args(tiny_sd15_dir, policy_dir, tmp_path / "run", "--steps", "16", "--refine-steps", "1",
                     "--group-size", "4", "--learning-rate", "3e-3", "--monitor-every", "0", "--save-every", "100",
                     "--minibatches", "1", "--inner-epochs", "1", "--monitor-prompts", "8", "--reward", "unused")
    metrics = tr.train(common.parse_config(tr.Config, args), reward=lowercase_reward)
    start, end = metrics["heldout_start"]["reward"], metrics["heldout_end"]["reward"]
    assert end > start + 0.1, (start, end)
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    steps = [r for r in log if "reward_mean" in r]
    assert len(steps) == 16 and steps[0]["logprob_gap"] < 1e-4
    assert all(k in steps[0] for k in ("reward_std", "kl", "clip_fraction", "fallback_rate", "zero_variance_groups", "seconds"))
    # the saved adapter loads through refiners.load_refiner and holds the trained weights
    loaded = refiners.load_refiner(str(tmp_path / "run"))
    saved = load_file(tmp_path / "run" / "adapter_model.safetensors")
    assert saved and any(v.abs().sum() > 0 for k, v in saved.items() if "lora_B" in k)
    lora = {k: v for k, v in loaded.model.state_dict().items() if "lora_B" in k}
    assert len(lora) == sum("lora_B" in k for k in saved) and all("language_model" in k for k in lora)


@pytest.mark.slow
@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_grpo_learns_on_flow_matching_backbones(family, tiny_sd3_dir, tiny_flux_dir, policy_dir, tmp_path, one_thread):
    """The same learning test on SD3 (run without its T5 encoder, --no-t5) and FLUX backbones."""
    backbone, extra = (tiny_sd3_dir, ["--no-t5"]) if family == "sd3" else (tiny_flux_dir, ["--size", "64"])
    args = tiny_args(backbone, policy_dir, tmp_path / "run", "--steps", "16", "--refine-steps", "1", "--group-size", "4",
                     "--learning-rate", "3e-3", "--monitor-every", "0", "--save-every", "100", "--minibatches", "1",
                     "--inner-epochs", "1", "--monitor-prompts", "8", "--reward", "unused", *extra)
    metrics = tr.train(common.parse_config(tr.Config, args), reward=lowercase_reward)
    start, end = metrics["heldout_start"]["reward"], metrics["heldout_end"]["reward"]
    assert end > start + 0.1, (start, end)


@pytest.mark.parametrize("folder", ["tiny_sd15_dir", "tiny_sd3_dir"])
def test_refinement_states_are_what_the_denoiser_gets_next(folder, policy_dir, request, one_thread):
    """refined_sample keeps, per refinement, the noisy latents and their noise level: exactly the
    sample and timestep the denoiser receives at the next step (DDIM: t; SD3: sigma * 1000)."""
    backbone = common.load_backbone(str(request.getfixturevalue(folder)))
    seen = []
    hook = backbone.denoiser.register_forward_pre_hook(
        lambda m, args, kwargs: seen.append(((kwargs.get("hidden_states", args[0] if args else None)).clone(),
                                             kwargs.get("timestep", args[1] if len(args) > 1 else None))), with_kwargs=True)
    try:
        out = promptloop.refined_sample(backbone, ["a red circle", "a square"], refiners.load_refiner(str(policy_dir), max_new_tokens=4),
                                    refine_steps=2, num_steps=4, generator=torch.Generator().manual_seed(0))
    finally:
        hook.remove()
    assert out.schedule == [1, 3] and len(out.states) == len(out.state_levels) == 2
    critic = lrm.LatentRewardModel(backbone, lrm.LRMConfig(backbone="tiny"))
    for state, level, step in zip(out.states, out.state_levels, out.schedule):
        sample, timestep = seen[step]  # the denoiser call of step s_k (CFG doubles the batch: cond half last)
        torch.testing.assert_close(state, sample[-2:].float())
        t = float(torch.as_tensor(timestep).flatten()[0])
        if backbone.family == "sd3":
            assert level == pytest.approx(t / 1000) and 0 < level < 1
            assert critic.state_timestep(level) == round(level * 1000) - 1
        else:
            assert level == t and critic.state_timestep(level) == int(t)


@pytest.mark.slow
def test_per_refinement_credit_trains_with_an_lrm_critic(tiny_sd15_dir, policy_dir, tmp_path, one_thread):
    """--credit per-refinement --critic DIR: a short run trains (the per-refinement advantages reach
    the loss) and the flags are checked together."""
    critic_dir = tmp_path / "critic"
    lrm.save_lrm(lrm.LatentRewardModel(common.load_backbone(str(tiny_sd15_dir)), lrm.LRMConfig(backbone=str(tiny_sd15_dir), hidden=16,
                                                                                                   ensemble_draws=2)), critic_dir)
    args = tiny_args(tiny_sd15_dir, policy_dir, tmp_path / "run", "--steps", "2", "--refine-steps", "2", "--monitor-every", "0",
                     "--reward", "unused", "--credit", "per-refinement", "--critic", str(critic_dir))
    metrics = tr.train(common.parse_config(tr.Config, args), reward=lowercase_reward)
    assert metrics["steps"] == 2 and metrics["config"]["credit"] == "per-refinement"
    saved = load_file(tmp_path / "run" / "adapter_model.safetensors")
    assert any(v.abs().sum() > 0 for k, v in saved.items() if "lora_B" in k)
    with pytest.raises(common.UserError, match="go together"):
        tr.check_config(common.parse_config(tr.Config, tiny_args(tiny_sd15_dir, policy_dir, tmp_path / "x", "--credit", "per-refinement")))


def test_nonfinite_rewards_and_losses_are_skipped(tiny_sd15_dir, policy_dir, tmp_path, monkeypatch, one_thread):
    """NaN rewards are left out of the groups and counted; a NaN loss is never applied."""

    def half_nan_reward(images, prompts, **_):
        scores = torch.rand(len(prompts))
        scores[::2] = math.nan
        return scores

    def nan_loss(*args, **kwargs):
        loss, stats = grpo_loss(*args, **kwargs)
        return loss * math.nan, stats

    grpo_loss = tr.grpo_loss
    monkeypatch.setattr(tr, "grpo_loss", nan_loss)
    args = tiny_args(tiny_sd15_dir, policy_dir, tmp_path / "run", "--steps", "1", "--refine-steps", "1", "--group-size", "4",
                     "--minibatches", "2", "--inner-epochs", "1", "--monitor-prompts", "2", "--reward", "unused")
    tr.train(common.parse_config(tr.Config, args), reward=half_nan_reward)
    record = [r for r in map(json.loads, (tmp_path / "run" / "log.jsonl").read_text().splitlines()) if "reward_mean" in r][0]
    assert record["nonfinite_rewards"] == 4 and math.isfinite(record["reward_mean"])
    assert record["skipped"] == 2  # both minibatches
    saved = load_file(tmp_path / "run" / "adapter_model.safetensors")
    assert all(v.abs().sum() == 0 for k, v in saved.items() if "lora_B" in k)  # still the LoRA init


@pytest.mark.skipif(not (common.TOY_DIR / "toy-refiner").is_dir() or not (common.TOY_DIR / "toy-sd15").is_dir(),
                    reason="toy world not built")
@pytest.mark.slow
def test_toy_adapter_records_the_alias_and_loads(tmp_path, one_thread):
    """An adapter trained from the toy-refiner alias names the alias as its base, so it loads
    wherever the toy world lives (sample.py --refiner DIR goes through refiners.load_refiner)."""
    from peft import PeftModel

    args = ["--backbone", "toy", "--refiner", "toy-refiner", "--reward", "toy-aesthetic", "--prompts", "toy",
            "--steps", "1", "--prompts-per-step", "1", "--group-size", "2", "--sampling-steps", "4",
            "--monitor-prompts", "2", "--device", "cpu", "--out", str(tmp_path / "run")]
    tr.train(common.parse_config(tr.Config, args))
    config = json.loads((tmp_path / "run" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "toy-refiner"
    assert isinstance(refiners.load_refiner(str(tmp_path / "run")).model, PeftModel)


@pytest.mark.parametrize("name", ["grpo-toy-composite", "grpo-toy-aesthetic"])
def test_committed_toy_adapters_load_and_refine(name):
    """The adapters under toy_world/adapters/ (the README's headline and its reward-hacking
    example) load over the toy refiner by its alias and change its answers."""
    from peft import PeftModel

    folder = common.TOY_DIR / "adapters" / name
    assert json.loads((folder / "adapter_config.json").read_text())["base_model_name_or_path"] == "toy-refiner"
    tuned, base = refiners.load_refiner(str(folder), do_sample=False), refiners.load_refiner("toy-refiner", do_sample=False)
    assert isinstance(tuned.model, PeftModel)
    previews, users = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(0)), ["a triangle", "a red square", "a circle", "a square"]
    answers = [r.refine(previews, users, users, 3, 20).prompts for r in (tuned, base)]
    assert answers[0] != answers[1]


@pytest.mark.slow
def test_committed_toy_adapters_keep_or_hack_the_users_words():
    """The headline adapter (aesthetic + faithfulness) keeps every attribute the user named in most
    of its sampled rewrites; the aesthetic-only one, the documented reward-hacking example, rewrites
    them in most (docs/RESULTS.md, "How the recipe was found"; the base toy refiner keeps 99 %)."""
    backbone, prompts = common.load_backbone("toy"), toy.toy_prompts("test", n=64, seed=10, kind="open")
    rates = {}
    for name in ("grpo-toy-composite", "grpo-toy-aesthetic"):
        torch.manual_seed(0)
        keep = build_toy_world.sampling_keep_rate(refiners.load_refiner(str(common.TOY_DIR / "adapters" / name)), backbone, prompts, seed=10)
        assert keep["rewrites"] >= 300, keep
        rates[name] = keep["keep_attributes_rate"]
    # measured 0.878 and 0.331 (320 rewrites each, one thread)
    assert rates["grpo-toy-composite"] >= 0.8 and rates["grpo-toy-aesthetic"] <= 0.5, rates


def test_base_model_name_is_portable(tmp_path):
    assert refiners.base_model_name("toy-refiner") == "toy-refiner"  # resolved by refiners.REFINERS on load
    assert refiners.base_model_name("Qwen/Qwen2.5-VL-3B-Instruct") == "Qwen/Qwen2.5-VL-3B-Instruct"
    assert refiners.base_model_name(str(tmp_path)) == str(tmp_path.resolve())


# -----------------------------------------------------------------------------
# subprocess runs of the CLI


def cli_env():
    return {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


def cli(*args, **kwargs):
    return subprocess.run([sys.executable, str(REPO / "train_refiner.py"), *args], capture_output=True, text=True,
                          env=cli_env(), cwd=REPO, **kwargs)


@pytest.mark.slow
def test_bad_input_is_one_line(tmp_path):
    cases = {"unknown reward": ["--reward", "no-such-reward"], "--group-size": ["--group-size", "1"],
             "not found": ["--prompts", str(tmp_path / "none.txt")], "no checkpoint": ["--resume"],  # never a fresh run
             "finite": ["--learning-rate", "nan"], "--steps must be > 0": ["--steps", "0"], "--save-every": ["--save-every", "0"],
             "--lora-targets needs": ["--lora-targets", " , "]}
    for message, extra in cases.items():
        result = cli("--reward", "jpeg", "--out", str(tmp_path), *extra)
        assert result.returncode == 2, result.stderr[-2000:]
        assert result.stderr.strip().startswith("error:") and "Traceback" not in result.stderr
        assert message in result.stderr, (message, result.stderr)
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr


def step_records(out):
    keep = ("step", "reward_mean", "loss", "kl", "heldout")
    return [{k: r[k] for k in keep if k in r} for r in map(json.loads, (out / "log.jsonl").read_text().splitlines())]


@pytest.mark.slow
def test_kill_and_resume_equals_uninterrupted_run(tiny_sd15_dir, policy_dir, tmp_path):
    """kill -9 after the first checkpoint, --resume: same adapter, same log as a run never stopped.
    The resumed run also turns gradient checkpointing on (allowed to change on resume), which
    must not change the numbers."""
    common_args = tiny_args(tiny_sd15_dir, policy_dir, "OUT", "--steps", "4", "--save-every", "1", "--monitor-every", "2",
                            "--reward", "jpeg", "--no-shared-noise", "--learning-rate", "1e-2", "--refine-steps", "2")

    def args(out, *extra):
        return [str(out) if a == "OUT" else a for a in common_args] + list(extra)

    errors = open(tmp_path / "a.stderr", "w")
    straight = subprocess.Popen([sys.executable, str(REPO / "train_refiner.py"), *args(tmp_path / "a")],
                                env=cli_env(), cwd=REPO, stdout=subprocess.DEVNULL, stderr=errors)
    killed = subprocess.Popen([sys.executable, str(REPO / "train_refiner.py"), *args(tmp_path / "b")],
                              env=cli_env(), cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (tmp_path / "b" / "checkpoint.pt").exists() and killed.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    killed.send_signal(signal.SIGKILL)
    assert killed.wait() == -signal.SIGKILL, "the run ended before it could be killed"
    assert straight.wait(timeout=300) == 0, (tmp_path / "a.stderr").read_text()[-2000:]
    result = cli(*args(tmp_path / "b", "--resume", "--gradient-checkpointing", "on"), timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "resumed from" in result.stdout

    a, b = (load_file(tmp_path / run / "adapter_model.safetensors") for run in ("a", "b"))
    assert a.keys() == b.keys()
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    assert any(a[k].abs().sum() > 0 for k in a if "lora_B" in k)  # training moved the weights
    records_a, records_b = step_records(tmp_path / "a"), step_records(tmp_path / "b")
    assert [r["step"] for r in records_a] == [r["step"] for r in records_b]
    for ra, rb in zip(records_a, records_b):
        for key in ra:
            if key in ("reward_mean", "loss", "kl"):
                assert ra[key] == pytest.approx(rb[key], rel=1e-4, abs=1e-6), (ra, rb)


@pytest.mark.slow
def test_same_command_seed_and_threads_give_the_same_numbers(tiny_sd15_dir, policy_dir, tmp_path):
    """Reproducibility, as the README states it: the same command with the same --seed and --threads
    gives bit-identical numbers (rewards, losses, held-out scores, adapter weights) when run twice --
    here at the same time, so machine load cannot matter either."""
    # --no-shared-noise: the tiny policy never answers in format, so only the noise spreads a group's rewards
    args = tiny_args(tiny_sd15_dir, policy_dir, "OUT", "--steps", "3", "--monitor-every", "3", "--reward", "jpeg", "--no-shared-noise",
                     "--monitor-rewards", "toy-aesthetic", "--learning-rate", "1e-2", "--refine-steps", "2", "--threads", "1", "--seed", "3")
    runs = [subprocess.Popen([sys.executable, str(REPO / "train_refiner.py"), *[str(tmp_path / run) if a == "OUT" else a for a in args]],
                             env=cli_env(), cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for run in "ab"]
    for run in runs:
        assert run.wait(timeout=300) == 0, run.stderr.read()[-2000:]
    metrics = [json.loads((tmp_path / run / "metrics.json").read_text()) for run in "ab"]
    assert metrics[0]["heldout_end"] == metrics[1]["heldout_end"] and metrics[0]["heldout_start"] == metrics[1]["heldout_start"]
    assert step_records(tmp_path / "a") == step_records(tmp_path / "b")
    a, b = (load_file(tmp_path / run / "adapter_model.safetensors") for run in "ab")
    assert all(torch.equal(a[k], b[k]) for k in a) and any(a[k].abs().sum() > 0 for k in a if "lora_B" in k)


@pytest.mark.slow
def test_torchrun_two_ranks_keep_lora_identical(tiny_sd15_dir, policy_dir, tmp_path):
    out = tmp_path / "ddp"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29531",
               str(REPO / "train_refiner.py"),
               *tiny_args(tiny_sd15_dir, policy_dir, out, "--steps", "2", "--save-every", "1", "--monitor-every", "0",
                          "--reward", "jpeg", "--no-shared-noise", "--learning-rate", "1e-2", "--refine-steps", "1")]
    result = subprocess.run(command, capture_output=True, text=True, env=cli_env(), cwd=REPO, timeout=400)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["world_size"] == 2
    assert metrics["rank_divergence"] == 0.0  # max |w_rank1 - w_rank0| over every LoRA weight
    records = [r for r in map(json.loads, (out / "log.jsonl").read_text().splitlines()) if "reward_mean" in r]
    assert records[-1]["groups"] == 4  # 2 prompts on each of 2 ranks
    saved = load_file(out / "adapter_model.safetensors")
    assert any(v.abs().sum() > 0 for k, v in saved.items() if "lora_B" in k)


def test_gradient_checkpointing_saves_activations_and_keeps_gradients(policy_dir, tmp_path, one_thread):
    """--gradient-checkpointing on: the teacher-forced forward of update() keeps fewer activations
    for backward (bytes packed by torch.autograd.graph.saved_tensors_hooks; the checkpointed layers
    recompute theirs), and the LoRA gradients are those of the run without it."""
    previews, users = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)), ["a circle", "a red square"]
    saved, gradients = {}, {}
    for mode in ("off", "on"):
        config = common.parse_config(tr.Config, tiny_args("x", policy_dir, tmp_path, "--gradient-checkpointing", mode, "--lora-rank", "4"))
        torch.manual_seed(0)  # the same LoRA initialisation
        refiner, params = tr.load_policy(config, torch.device("cpu"), torch.float32)
        with torch.no_grad():  # LoRA B starts at 0: move it, so that the gradients of A are not all 0
            for p in params:
                p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
        torch.manual_seed(0)
        out = refiner.refine(previews, users, users, 1, 2)
        refiner.model.train()  # as update() runs it (checkpointing is active in train mode only)
        packed = []

        def pack(tensor):
            packed.append(tensor.numel() * tensor.element_size())
            return tensor

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            logprobs = refiner.token_logprobs(out.inputs, out.completion_ids, out.completion_mask)
        (logprobs.sum() / out.completion_mask.sum()).backward()
        saved[mode], gradients[mode] = sum(packed), [p.grad.clone() for p in params]
    assert saved["on"] < 0.7 * saved["off"], saved
    for off, on in zip(gradients["off"], gradients["on"]):
        torch.testing.assert_close(on, off, rtol=1e-4, atol=1e-6)
    assert any(g.abs().max() > 0 for g in gradients["on"])
