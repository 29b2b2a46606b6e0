"""
train_refiner.py: GRPO + LoRA on the MLLM refiner with sparse step-wise refinement (PromptLoop).

The diffusion model is never changed: the policy is the refiner (Qwen2.5-VL + a LoRA adapter on
its language model) that rewrites the prompt at K evenly spaced denoising steps after looking at
the denoised estimate; a terminal image reward trains it with GRPO.

Run:
    # the toy world (CPU, minutes)
    python train_refiner.py --backbone toy --refiner toy-refiner --reward toy-aesthetic \
        --prompts toy-open --monitor-rewards toy-faithful --steps 80 --learning-rate 2e-3 --out runs/toy
    # the real defaults (GPU): SD1.5 + Qwen2.5-VL-3B, Pick-a-Pic v2 prompts, ImageReward
    python train_refiner.py --reward imagereward --out runs/imagereward
    # several GPUs: each rank rolls out its own prompts, gradients are all-reduced
    torchrun --nproc_per_node=8 train_refiner.py --reward imagereward:1,length:0.1 --out runs/ir
    # an interrupted run continues from OUT/checkpoint.pt
    python train_refiner.py ... --out runs/toy --resume
The adapter is saved in --out (adapter_config.json + adapter_model.safetensors), so
`python sample.py --refiner runs/toy` loads it over its base refiner.

One step (per rank):
  1. rollout   B prompts x G trajectories in ONE refined_sample call over B*G rows (a group
               shares its initial noise and, with a stochastic sampler, every step's noise: one
               generator per row, seeded alike within a group; common random numbers); K refinements,
               each one batched refiner.generate call, sampled with temperature
  2. reward    terminal reward r (B*G,) from the registry (--reward SPEC, composites included)
  3. advantage A = (r - mean_group) / (std_group + eps), the same for every token of a trajectory;
               with --credit per-refinement, action k gets A_k = (r - V(x_{t_k}) - its group mean) /
               (std_group(r) + eps): an LRM critic (--critic DIR; lrm.critic_values, fitted to r per
               refinement index) scores the noisy latent action k was taken on
  4. log-probs old (adapter on) and reference (adapter off, peft's disable_adapter: no second
               copy of the model), teacher-forced, no gradient, on the update's own minibatches
               (one partition of the trajectories per step) and in its (train) mode: rho = 1 exactly
  5. update    inner epochs x those minibatches (in a new order each epoch); token-level loss
               -min(rho A, clip(rho, 1-eps, 1+eps) A) + beta k3(pi_theta, pi_ref), all tokens of
               all K actions of a trajectory; gradients all-reduced, clipped, AdamW on LoRA only

Simplifications on purpose: constant learning rate; the loss is the mean over all tokens of the
minibatch (DAPO / TRL "bnpo" aggregation) rather than a per-sequence mean; a trajectory's K actions
share one terminal reward unless --credit per-refinement; the held-out monitor runs on rank 0.
"""

import json
import math
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from peft import PeftModel, get_peft_model_state_dict, set_peft_model_state_dict

import common
import lrm
import overlap
import promptloop
import refiners
import rewards
import runs

# -----------------------------------------------------------------------------
# config


@dataclass
class Config(common.RunFlags, common.SamplingFlags):
    backbone: str = field(default="sd15", metadata={"help": "diffusion backbone: alias (sd15, sdxl, sdxl-turbo, sd35m, sd35l, flux-dev, flux-schnell, toy, toy-sdxl, toy-sd3), hub id or diffusers folder"})
    refiner: str = field(default="qwen2.5-vl-3b", metadata={"help": "base refiner (MLLM): alias (qwen2.5-vl-3b, toy-refiner), hub id or folder"})
    reward: str = field(default="imagereward", metadata={"help": "training reward: a name or a weighted sum, e.g. imagereward:1,length:0.1"})
    monitor_rewards: str = field(default="", metadata={"help": "other rewards scored on held-out prompts (comma-separated names), so reward hacking shows as a divergence"})
    prompts: str = field(default="", metadata={"help": "training prompts: toy (toy-partial, toy-open, toy-full), a text file, a parquet file/folder (Pick-a-Pic schema) or a hub id; empty = the backbone's own (toy for a toy backbone, else pickapic)"})
    heldout_prompts: str = field(default="", metadata={"help": "held-out prompts (same kinds); empty = the 'test' split of --prompts (for a text file: prompts held out of it)"})
    max_prompts: int = field(default=0, metadata={"help": "use at most this many training prompts (0 = all)"})
    steps: int = field(default=200, metadata={"help": "GRPO steps (one rollout batch + its update each)"})
    prompts_per_step: int = field(default=4, metadata={"help": "B: prompts per step on each rank"})
    group_size: int = field(default=4, metadata={"help": "G: trajectories per prompt (a GRPO group)"})
    shared_noise: bool = field(default=True, metadata={"help": "a group shares its noise, the initial noise and with a stochastic sampler every step's (one generator per row, seeded alike within a group: common random numbers); --no-shared-noise: independent noise per trajectory"})
    refine_steps: int = field(default=2, metadata={"help": "K: refinements per trajectory in training (the paper: 2 in training, 5 at inference)"})
    sampling_steps: int = field(default=0, metadata={"help": "denoising steps (0 = the backbone's default)"})
    guidance: float = field(default=-1.0, metadata={"help": "CFG scale (negative = the backbone's default); FLUX: its distilled guidance"})
    size: int = field(default=0, metadata={"help": "image side in pixels (0 = the backbone's default)"})
    blank_preview: bool = field(default=False, metadata={"help": "show the refiner a grey image instead of x0_hat (the no-visual-feedback ablation)"})
    temperature: float = field(default=1.0, metadata={"help": "sampling temperature of the policy (also used in its log-probs)"})
    max_new_tokens: int = field(default=64, metadata={"help": "longest refiner answer in tokens"})
    lora_rank: int = field(default=16, metadata={"help": "LoRA rank"})
    lora_alpha: float = field(default=32.0, metadata={"help": "LoRA alpha (scale = alpha / rank)"})
    lora_targets: str = field(default=",".join(refiners.LORA_TARGETS), metadata={"help": "linear layers of the language model that get LoRA (the vision tower stays frozen)"})
    learning_rate: float = field(default=1e-4, metadata={"help": "AdamW learning rate (constant)"})
    clip_epsilon: float = field(default=0.2, metadata={"help": "eps of the clipped surrogate: rho is clipped to [1-eps, 1+eps]"})
    credit: str = field(default="terminal", metadata={"help": "terminal: every action of a trajectory gets its group-normalised reward; per-refinement: action k gets (r - V(x_t_k) - its group mean) / (the group std of r + eps), V from the --critic LRM"})
    critic: str | None = field(default=None, metadata={"help": "latent reward model folder (train_reward.py) that values the noisy latent of each refinement, for --credit per-refinement; calibrated to the reward by an affine fit per refinement index on each batch"})
    kl_coef: float = field(default=0.04, metadata={"help": "beta: weight of the k3 KL to the adapter-disabled base"})
    advantage_eps: float = field(default=1e-4, metadata={"help": "eps in (r - mean) / (std + eps)"})
    inner_epochs: int = field(default=2, metadata={"help": "passes over each rollout batch (PPO epochs)"})
    minibatches: int = field(default=2, metadata={"help": "minibatches per pass (of trajectories, one random partition per step; B*G must be divisible)"})
    max_grad_norm: float = field(default=1.0, metadata={"help": "gradient clipping (global L2 norm)"})
    gradient_checkpointing: str = field(default="auto", metadata={"help": "auto (on with CUDA), on or off"})
    monitor_every: int = field(default=10, metadata={"help": "score the held-out prompts every N steps (0 = only at start and end)"})
    monitor_prompts: int = field(default=16, metadata={"help": "number of held-out prompts (one trajectory each, fixed noise)"})
    save_every: int = field(default=10, metadata={"help": "checkpoint + adapter every N steps (and at the end)"})
    out: str = field(default="runs/refiner", metadata={"help": "output folder: adapter, checkpoint.pt, log.jsonl, metrics.json"})
    resume: bool = field(default=False, metadata={"help": "continue from OUT/checkpoint.pt"})


# fields that may change when resuming (everything else must match the checkpoint)
RESUME_MAY_CHANGE = {"steps", "resume", "monitor_every", "save_every", "device", "gradient_checkpointing", "threads", "fast_decode"}


def check_config(config):
    common.require(config, positive=("steps", "prompts_per_step", "group_size", "inner_epochs", "minibatches", "max_new_tokens",
                                     "lora_rank", "lora_alpha", "save_every", "monitor_prompts", "max_grad_norm", "advantage_eps"),
                   non_negative=("monitor_every", "max_prompts", "sampling_steps", "size", "threads", "overlap"))
    if config.group_size < 2:
        raise common.UserError("--group-size must be >= 2: GRPO compares trajectories within a group")
    if (config.prompts_per_step * config.group_size) % config.minibatches:
        raise common.UserError(f"B*G = {config.prompts_per_step * config.group_size} is not divisible by --minibatches {config.minibatches}")
    if config.refine_steps < 1:
        raise common.UserError("--refine-steps must be >= 1: without refinements there is nothing to train")
    if config.credit not in ("terminal", "per-refinement"):
        raise common.UserError(f"--credit must be terminal or per-refinement, got '{config.credit}'")
    if (config.credit == "per-refinement") != (config.critic is not None):
        raise common.UserError("--credit per-refinement and --critic DIR go together")
    if config.temperature <= 0:
        raise common.UserError("--temperature must be > 0 (GRPO needs a stochastic policy)")
    if not 0 < config.clip_epsilon < 1 or config.kl_coef < 0 or config.learning_rate <= 0:
        raise common.UserError("need 0 < clip-epsilon < 1, kl-coef >= 0, learning-rate > 0")
    common.parse_list(config.lora_targets, "--lora-targets")  # a malformed list fails before the slow loads
    if config.gradient_checkpointing not in ("auto", "on", "off"):
        raise common.UserError(f"--gradient-checkpointing must be auto, on or off, got '{config.gradient_checkpointing}'")


# -----------------------------------------------------------------------------
# GRPO math (imported by the tests)


def group_mean_std(x, valid):
    """Mean and unbiased std (B, 1) of each group's valid entries (as torch.std, as TRL); x, valid: (B, G)."""
    count = valid.sum(1, keepdim=True)  # (B, 1)
    mean = torch.where(valid, x, torch.zeros_like(x)).sum(1, keepdim=True) / count.clamp(min=1)
    squares = torch.where(valid, (x - mean) ** 2, torch.zeros_like(x)).sum(1, keepdim=True)
    return mean, (squares / (count - 1).clamp(min=1)).sqrt()


def group_advantages(rewards, group_size, eps=1e-4):
    """GRPO advantages: (r - mean_group) / (std_group + eps). rewards: (B*G,), rows grouped.

    std is the unbiased sample std (as torch.std, as TRL). Non-finite rewards (a NaN from the
    reward) are left out of their group's statistics and get advantage 0; a group with fewer than
    two finite rewards gets 0 everywhere. Returns (advantages (B*G,), zero_variance (B,) bool):
    a group whose rewards are all equal has advantages 0 -- it contributes nothing but the KL."""
    r = rewards.float().view(-1, group_size)  # (B, G)
    valid = torch.isfinite(r)
    count = valid.sum(1, keepdim=True)  # (B, 1)
    mean, std = group_mean_std(r, valid)
    advantages = torch.where(valid & (count >= 2), (r - mean) / (std + eps), torch.zeros_like(r))
    zero_variance = (count.squeeze(1) < 2) | torch.isclose(std.squeeze(1), torch.zeros_like(std.squeeze(1)))
    advantages[zero_variance] = 0.0
    return advantages.view(-1), zero_variance


def refinement_advantages(rewards, values, group_size, eps=1e-4):
    """Per-refinement credit: A_k = (r - V_k - mean_group(r - V_k)) / (std_group(r) + eps).
    rewards (N,), values (K, N) on the reward's scale (lrm.critic_values) -> (K, N).

    r - V(x_{t_k}) is what happened from action k on (potential-based shaping with gamma = 1:
    the sum of V(x_{t_{j+1}}) - V(x_{t_j}) for j >= k, with V(final) = r). Every k is divided by
    the std of r itself, as the terminal advantage is, not by the residual's own std: a critic
    that explains part of r shrinks the credit by that part, and one that explains nothing (V_k
    the same for the whole group) leaves the terminal advantage; normalising each residual by its
    own std would blow the critic's error up to unit scale. Before the first refinement a group
    shares its noise and prompt, so V_0 is the same for the group and A_0 is the terminal
    advantage. A group with no reward spread gets 0 (as in group_advantages); a non-finite r or
    V_k gets 0 and stays out of the group mean.

    >>> refinement_advantages(torch.tensor([1.0, 3.0]), torch.tensor([[5.0, 5.0], [1.5, 2.5]]), 2, eps=0.0)
    tensor([[-0.7071,  0.7071],
            [-0.3536,  0.3536]])

    (r = (1, 3): std sqrt(2); k = 0: V constant, r - V - mean = (-1, 1) -> the terminal -+1/sqrt(2);
    k = 1: the critic saw half the gap coming, r - V_1 - mean = (-0.5, 0.5) -> half the credit.)"""
    r = rewards.float().view(-1, group_size)  # (B, G)
    _, zero_variance = group_advantages(rewards, group_size, eps)  # (B,)
    _, reward_std = group_mean_std(r, torch.isfinite(r))  # (B, 1): the terminal advantage's scale
    credits = []
    for residual in (r - values.float().view(len(values), -1, group_size)):  # (B, G) each: r - V_k
        valid = torch.isfinite(residual)
        mean, _ = group_mean_std(residual, valid)  # (B, 1)
        credit = torch.where(valid, (residual - mean) / (reward_std + eps), torch.zeros_like(residual))
        credit[zero_variance] = 0.0
        credits.append(credit.view(-1))
    return torch.stack(credits)


def clipped_surrogate(logprobs, old_logprobs, advantages, clip_epsilon):
    """Per-token PPO/GRPO objective to minimise: -min(rho A, clip(rho, 1-eps, 1+eps) A).

    logprobs, old_logprobs: (N, T); advantages: (N,). rho = pi_theta / pi_old per token.
    Returns (loss (N, T), clipped (N, T) bool: the clipped branch is the active one)."""
    ratio = torch.exp(logprobs - old_logprobs)
    adv = advantages.unsqueeze(1)  # (N, 1): one advantage for every token of a trajectory
    unclipped = ratio * adv
    clipped = ratio.clamp(1 - clip_epsilon, 1 + clip_epsilon) * adv
    is_clipped = ((ratio < 1 - clip_epsilon) & (adv < 0)) | ((ratio > 1 + clip_epsilon) & (adv > 0))
    return -torch.min(unclipped, clipped), is_clipped


def k3_kl(logprobs, ref_logprobs):
    """Per-token k3 estimator of KL(pi_theta || pi_ref) (Schulman 2020; DeepSeekMath's GRPO):
    exp(ref - logp) - (ref - logp) - 1, unbiased for tokens sampled from pi_theta, always >= 0."""
    delta = ref_logprobs - logprobs
    return torch.exp(delta) - delta - 1


def grpo_loss(logprobs, old_logprobs, ref_logprobs, advantages, mask, clip_epsilon, kl_coef, num_tokens):
    """Token-level GRPO loss of one minibatch: sum over its valid tokens / num_tokens.

    All (N, T) except advantages (N,). num_tokens: the normaliser -- the number of valid tokens of
    the minibatch over all ranks, times world size (gradients are averaged over ranks), so the
    result is the mean over every token of the global minibatch. Returns (loss, stats)."""
    mask = mask.float()
    surrogate, is_clipped = clipped_surrogate(logprobs, old_logprobs, advantages, clip_epsilon)
    kl = k3_kl(logprobs, ref_logprobs)
    per_token = surrogate + kl_coef * kl
    loss = (per_token * mask).sum() / num_tokens
    n = mask.sum().clamp(min=1)
    stats = dict(kl=((kl * mask).sum() / n).item(), clip_fraction=((is_clipped.float() * mask).sum() / n).item())
    return loss, stats


# -----------------------------------------------------------------------------
# rollout: B prompts x G trajectories, their rewards, each action's advantage; the held-out monitor


def step_seed(seed, step, rank):
    """Each (step, rank) has its own seed, so a resumed run replays exactly what it would have done."""
    return runs.mix_seed(seed, step * 1009 + rank) % 2**31


def initial_noise(backbone, num_prompts, group_size, shared, generator, size):
    """Unit Gaussian initial latents (B*G, C, h, w); with `shared` a group repeats one draw."""
    shape = common.latent_shape(backbone, size or None)
    if shared:
        return torch.randn((num_prompts, *shape), generator=generator).repeat_interleave(group_size, 0)
    return torch.randn((num_prompts * group_size, *shape), generator=generator)


def row_generators(seed, num_prompts, group_size, shared):
    """One CPU generator per row (B*G,), for the noise a stochastic sampler (ancestral Euler, DDPM,
    LCM) draws at every step; the pipeline takes a list, one per row. With `shared` a group's G
    generators are seeded alike, so its trajectories also see the same noise at every step and
    differ only by their prompts (common random numbers); one generator for the whole batch would
    give every row its own noise at each step. Without `shared`, one seed per row."""
    def row_seed(row):
        return runs.mix_seed(seed, row // group_size if shared else row)

    return [torch.Generator().manual_seed(row_seed(row)) for row in range(num_prompts * group_size)]


def sample(backbone, refiner, rows, latents, generators, config, preview_decoder):
    """refined_sample with the run's sampling settings: the rollouts and the held-out monitor.
    latents: initial noise (N, C, h, w); generators: one per row (row_generators), for the steps' noise."""
    return promptloop.refined_sample(
        backbone, rows, refiner, refine_steps=config.refine_steps, num_steps=config.sampling_steps or None,
        guidance=None if config.guidance < 0 else config.guidance, generator=generators, latents=latents,
        preview_decoder=preview_decoder, blank_preview=config.blank_preview, size=config.size or None,
        hook=overlap.overlap_hook(config.overlap),  # --overlap D: the delay is part of the environment
    )


def rollout(backbone, refiner, prompts, config, preview_decoder, generator):
    """B prompts -> B*G refined trajectories in one batched refined_sample call. generator: the step's
    (seeded with step_seed); the initial noise is drawn from it, the row generators seeded from its seed
    (not drawn from it: update() goes on with it as it was)."""
    refiner.model.eval()  # sampling in eval mode (update() switches to train mode and back)
    rows = [p for p in prompts for _ in range(config.group_size)]  # (B*G,) group members adjacent
    latents = initial_noise(backbone, len(prompts), config.group_size, config.shared_noise, generator, config.size)
    generators = row_generators(generator.initial_seed(), len(prompts), config.group_size, config.shared_noise)
    return sample(backbone, refiner, rows, latents, generators, config, preview_decoder)


def action_advantages(scores, trajectories, critic, config):
    """Advantages (K, B*G) of the K refinement actions of each trajectory, and the groups with no
    reward spread (B,) bool. Without a critic every action gets its trajectory's group advantage;
    with one (--credit per-refinement) action k gets refinement_advantages' r - V(x_{t_k})."""
    advantages, zero_variance = group_advantages(scores, config.group_size, config.advantage_eps)
    if critic is None:
        return advantages.expand(len(trajectories.refiner_outputs), -1), zero_variance
    values = lrm.critic_values(critic, trajectories, scores)  # (K, B*G), on the reward's scale
    return refinement_advantages(scores, values, config.group_size, config.advantage_eps), zero_variance


@torch.no_grad()
def monitor(backbone, refiner, prompts, reward, others, config, preview_decoder, refined=True):
    """Held-out rewards of the current policy (one trajectory per prompt, fixed noise and seed)."""
    generator = torch.Generator().manual_seed(config.seed + 12345)
    torch.manual_seed(config.seed + 12345)  # the refiner samples with the global generator
    latents = initial_noise(backbone, len(prompts), 1, False, generator, config.size)
    generators = row_generators(config.seed + 12345, len(prompts), 1, False)  # a prompt's step noise: fixed too
    samples = sample(backbone, refiner if refined else None, prompts, latents, generators, config, preview_decoder)
    try:
        result = {"reward": nanmean(samples.score(reward))}
        if others is not None:
            samples.score(others)
            result.update(others.term_means())
    except common.UserError:  # e.g. `structure` scores answers: an unrefined sample has none
        if refined:
            raise
        result = {"reward": math.nan}
    return result


def nanmean(x):
    x = x[torch.isfinite(x)]
    return x.mean().item() if len(x) else math.nan


# -----------------------------------------------------------------------------
# log-probs


def minibatch_partition(num_rows, minibatches, generator):
    """The step's minibatches (minibatches, N / minibatches): a random partition of the N trajectories,
    drawn once per step and used for pi_old, pi_ref and every inner epoch.

    Why one partition and not PPO's reshuffle per epoch: a log-prob depends on the batch it is
    computed in (select_rows drops the padding the rows share, so shapes differ, and bf16 kernels
    round differently per shape), and on the mode (gradient checkpointing runs in train mode only).
    Computing pi_old on other batches than the update's gives rho != 1 before any update, which the
    k3 term and AdamW turn into lr-sized steps. With one partition every forward of a row, old, ref
    and each epoch's, sees the same batch, so rho = 1 exactly until the policy moves; only the
    order of the minibatches changes between epochs."""
    return torch.randperm(num_rows, generator=generator).view(minibatches, -1)


@torch.no_grad()
def old_and_reference_logprobs(refiner, outputs, partition):
    """Teacher-forced log-probs of every action, with the adapter (pi_old) and without (pi_ref).

    outputs: the K RefinerOutputs of the rollout; partition: the update's minibatches (M, N / M).
    Each minibatch is computed as update() computes it: the same rows through select_rows, in
    train mode. Returns two lists of K tensors (N, T_k) (rows in rollout order, on the CPU).
    pi_old is recomputed rather than taken from generation so that rho is exactly 1 before the
    first update also in bf16 (generation logits and a full forward can differ by rounding)."""
    refiner.model.train()  # the update's mode (see update())
    old = [torch.zeros(out.completion_ids.shape) for out in outputs]  # K x (N, T_k)
    ref = [torch.zeros(out.completion_ids.shape) for out in outputs]
    for idx in partition.tolist():
        for k, out in enumerate(outputs):
            args = (refiners.select_rows(out.inputs, idx), out.completion_ids[idx], out.completion_mask[idx])
            old[k][idx] = refiner.token_logprobs(*args).float().cpu()
            with refiner.model.disable_adapter():  # pi_ref: the base model, no second copy
                ref[k][idx] = refiner.token_logprobs(*args).float().cpu()
    refiner.model.eval()
    return old, ref


# -----------------------------------------------------------------------------
# update


def update(refiner, params, optimizer, outputs, old, ref, advantages, valid, partition, config, dist_info, generator):
    """inner_epochs x the partition's minibatches (M, N / M) of GRPO on one rollout batch, in a new
    order each epoch; advantages (K, N), one row per refinement. Returns averaged stats and
    ratio_gap: max |rho - 1| over the first minibatch's tokens before any update (0 when old was
    computed as this forward is)."""
    stats = dict(loss=[], kl=[], clip_fraction=[], grad_norm=[], skipped=0)
    ratio_gap = None
    refiner.model.train()  # no dropout anywhere (lora_dropout=0); lets gradient checkpointing run
    for _ in range(config.inner_epochs):
        for idx in partition[torch.randperm(len(partition), generator=generator)].tolist():  # the trajectories of each minibatch
            masks = [out.completion_mask[idx] * valid[idx].unsqueeze(1) for out in outputs]  # (n_mb, T_k)
            num_tokens = max(1.0, runs.all_sum(sum(m.sum().item() for m in masks), dist_info))
            optimizer.zero_grad(set_to_none=True)
            total, kls, clips, gaps = 0.0, [], [], []
            for k, out in enumerate(outputs):
                logprobs = refiner.token_logprobs(refiners.select_rows(out.inputs, idx), out.completion_ids[idx], out.completion_mask[idx])
                old_k = old[k][idx].to(logprobs.device)  # (n_mb, T_k)
                gaps.append((torch.exp(logprobs.detach().float() - old_k) - 1).abs().max().item())  # padding: 0 - 0
                loss, s = grpo_loss(
                    logprobs.float(), old_k, ref[k][idx].to(logprobs.device),
                    advantages[k][idx].to(logprobs.device), masks[k].to(logprobs.device), config.clip_epsilon,
                    config.kl_coef, num_tokens / dist_info.world_size,
                )
                loss.backward()  # one backward per refinement step keeps one activation set alive
                total += loss.item()
                kls.append(s["kl"])
                clips.append(s["clip_fraction"])
            if ratio_gap is None:  # the first minibatch, before any update
                ratio_gap = max(gaps)
            runs.all_reduce_gradients(params, dist_info)
            grad_norm = torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
            if not torch.isfinite(grad_norm):  # NaN/inf loss or gradient on any rank: never applied
                stats["skipped"] += 1
                optimizer.zero_grad(set_to_none=True)
                continue
            optimizer.step()
            stats["loss"].append(total)
            stats["kl"].append(sum(kls) / len(kls))
            stats["clip_fraction"].append(sum(clips) / len(clips))
            stats["grad_norm"].append(grad_norm.item())
    refiner.model.eval()
    mean = lambda xs: sum(xs) / len(xs) if xs else math.nan  # noqa: E731
    return {**{k: (v if k == "skipped" else mean(v)) for k, v in stats.items()}, "ratio_gap": ratio_gap}


# -----------------------------------------------------------------------------
# set-up: models, resume


def load_backbone(config, device, dtype):
    """The diffusion backbone the refiner steers."""
    backbone = common.load_backbone(config.backbone, device=device, dtype=dtype, t5=config.t5)
    if device.type == "cuda":
        backbone.pipe.vae.enable_slicing()  # decode B*G images one at a time: no memory peak
    return backbone


def lrm_backbone(config, backbone):
    """The backbone that the LRMs (--critic, lrm: rewards) run on when it is their model, instead of
    a copy of their own (lrm.load_lrm), or None: with --t5 false it lacks the T5 an SD3 LRM reads."""
    return backbone if config.t5 else None


def load_critic(config, backbone, device, dtype):
    """With --critic the LRM that values the backbone's noisy latents (lrm.search_scorer checks that
    it can read them as this sampler holds them), else None."""
    if not config.critic:
        return None
    return lrm.search_scorer(lrm.load_lrm(config.critic, device, dtype, lrm_backbone(config, backbone)), backbone)


def load_policy(config, device, dtype):
    """The base refiner with a fresh LoRA adapter on its language model: (refiner, LoRA parameters)."""
    refiner = refiners.load_refiner(config.refiner, device=device, dtype=dtype, temperature=config.temperature,
                                    max_new_tokens=config.max_new_tokens, fast_decode=config.fast_decode, preview_size=config.preview_size)
    if isinstance(refiner.model, PeftModel):
        raise common.UserError(f"--refiner '{config.refiner}' is an adapter folder: start from a base refiner (use --resume to continue a run)")
    if config.gradient_checkpointing == "on" or (config.gradient_checkpointing == "auto" and device.type == "cuda"):
        refiner.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    params = refiners.add_lora(refiner, config.lora_rank, config.lora_alpha, common.parse_list(config.lora_targets, "--lora-targets"))
    return refiner, params


def resume(state, out_dir, refiner, params, optimizer, dist_info):
    """The step to start after: the checkpoint's (its LoRA weights and optimizer state loaded), or 0
    with rank 0's initial LoRA weights on every rank. log.jsonl keeps the lines up to that step."""
    if state is not None:
        set_peft_model_state_dict(refiner.model, state["lora"])
        optimizer.load_state_dict(state["optimizer"])
    elif dist_info.world_size > 1:
        for p in params:  # belt and braces: identical initial LoRA weights on every rank
            torch.distributed.broadcast(p.data, 0)
    start_step = 0 if state is None else state["step"]
    if dist_info.is_main:
        if state is not None:
            print(f"resumed from {out_dir / 'checkpoint.pt'} at step {start_step}")
        runs.trim_log(out_dir / "log.jsonl", start_step)  # a killed run may have logged past its checkpoint
    return start_step


# -----------------------------------------------------------------------------
# the step's record and log line, the checkpoint (the DDP collectives live here)


def step_record(step, trajectories, scores, zero_variance, advantages, old, stats, reward, config, dist_info, t0):
    """The step's log.jsonl record, over all ranks (every rank calls it: all_gather / all_sum).
    advantages: (K, B*G), every action's (zero-variance groups and NaN rewards count as 0).
    The policy's token entropy is not logged: it needs the whole (B, T, V) distribution, and
    refiners.token_logprobs returns only the log-probs of the sampled tokens."""
    outputs = trajectories.refiner_outputs
    all_rewards = runs.all_gather(scores, dist_info)
    finite = all_rewards[torch.isfinite(all_rewards)]
    all_advantages = runs.all_gather(advantages.flatten().float(), dist_info).abs()  # (world * K * B*G,)
    answer_tokens = runs.all_sum(sum(o.completion_mask.sum().item() for o in outputs), dist_info)
    record = dict(
        step=step,
        reward_mean=nanmean(all_rewards),
        reward_std=finite.std().item() if len(finite) > 1 else math.nan,
        nonfinite_rewards=int(runs.all_sum((~torch.isfinite(scores)).sum().item(), dist_info)),
        zero_variance_groups=int(runs.all_sum(zero_variance.sum().item(), dist_info)),
        groups=config.prompts_per_step * dist_info.world_size,
        fallback_rate=runs.all_sum(torch.cat([o.fallback.float() for o in outputs]).mean().item(), dist_info) / dist_info.world_size,
        logprob_gap=max((o.logprobs - lp).abs().max().item() for o, lp in zip(outputs, old)),  # generation vs teacher forcing
        advantage_abs_mean=all_advantages.mean().item(),
        advantage_abs_max=all_advantages.max().item(),
        answer_tokens=answer_tokens / (len(outputs) * len(all_rewards)),  # mean answer length in tokens
        **stats,
        seconds=time.time() - t0,
        example=[trajectories.prompts[0][0], trajectories.final_prompts[0]],  # user prompt -> final prompt
    )
    # max |rho - 1| on the first minibatch, before any update: 0 when pi_old was computed as the update computes
    record["ratio_gap"] = max(runs.all_gather(torch.tensor([stats["ratio_gap"]]), dist_info).tolist())
    if hasattr(reward, "term_means") and len(getattr(reward, "terms", [])) > 1:
        record["reward_terms"] = reward.term_means()
    return record


def log_line(record, steps):
    """The one line per step rank 0 prints."""
    return (f"step {record['step']:05d}/{steps} | reward {record['reward_mean']:.4f} ± {record['reward_std']:.4f} | "
            f"kl {record['kl']:.5f} | clip {record['clip_fraction']:.3f} | |rho-1| {record['ratio_gap']:.1e} | fallback {record['fallback_rate']:.2f} | "
            f"zero-var {record['zero_variance_groups']}/{record['groups']} | dt {record['seconds'] * 1000:.0f}ms"
            + (f" | skipped {record['skipped']}" if record["skipped"] or record["nonfinite_rewards"] else ""))


def append_log(path, record, dist_info):
    if dist_info.is_main:
        with open(path, "a") as f:
            f.write(json.dumps(record) + "\n")


def save(step, refiner, optimizer, params, config, out_dir, dist_info):
    """Rank 0 writes the adapter and checkpoint.pt (all a resume needs). Returns the largest gap between
    the ranks' LoRA weights (every rank calls it), 0.0 when they are in sync."""
    divergence = runs.rank_divergence(params, dist_info)
    if dist_info.is_main:
        refiners.save_adapter(refiner.model, out_dir, refiners.base_model_name(config.refiner))
        runs.save_checkpoint(out_dir / "checkpoint.pt", dict(
            lora=get_peft_model_state_dict(refiner.model), optimizer=optimizer.state_dict(),
            step=step, config=asdict(config), rng=torch.get_rng_state(),
        ))
        if divergence != 0.0:
            print(f"warning: LoRA weights differ between ranks by {divergence:.3g}")
    return divergence


# -----------------------------------------------------------------------------
# main


def train(config, reward=None, monitor_reward=None):
    """The training run; `reward` / `monitor_reward` (callables like rewards.Reward) override the
    registry specs -- the tests use that to train on rewards they define."""
    check_config(config)
    dist_info = runs.setup_distributed(config.device)
    device, dtype = common.setup_run(config, dist_info.device)
    out_dir, log_path = Path(config.out), Path(config.out) / "log.jsonl"
    out_dir.mkdir(parents=True, exist_ok=True)
    state = runs.resume_checkpoint(out_dir / "checkpoint.pt", config, RESUME_MAY_CHANGE) if config.resume else None
    log = print if dist_info.is_main else (lambda *a, **k: None)

    # ---- reward specs and prompts first (bad ones fail before the slow loads), then the models
    for spec, given in ((config.reward, reward), (config.monitor_rewards, monitor_reward)):
        if given is None and spec:
            rewards.check_reward_spec(spec)
    train_prompts, heldout_prompts = runs.train_and_heldout_prompts(  # the backbone's own prompts by default
        config.prompts or ("toy" if config.backbone.startswith("toy") else "pickapic"), config.heldout_prompts,
        config.max_prompts or None, config.monitor_prompts, config.seed)
    backbone = load_backbone(config, device, dtype)
    # the rewards after the backbone: an lrm: term runs on it when it is its LRM's model
    shared = lrm_backbone(config, backbone)
    reward = reward or rewards.build_reward(config.reward, device, dtype, shared)
    others = monitor_reward or (rewards.build_reward(config.monitor_rewards, device, dtype, shared) if config.monitor_rewards else None)
    runs.seed_everything(config.seed)  # same LoRA init on every rank (the critic's and the policy's set-up draw numbers)
    critic = load_critic(config, backbone, device, dtype)
    refiner, params = load_policy(config, device, dtype)
    preview_decoder = None if config.blank_preview else promptloop.PreviewDecoder(config.preview_decoder, backbone)
    optimizer = torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=0.0)
    start_step = resume(state, out_dir, refiner, params, optimizer, dist_info)
    log(f"train prompts {len(train_prompts)} | held-out {len(heldout_prompts)} | trainable LoRA parameters "
        f"{sum(p.numel() for p in params):,} | world {dist_info.world_size} | device {device} {dtype}")

    def heldout(step, refined=True):
        """Rank 0 scores the held-out prompts (unrefined: the backbone alone), logs and records them."""
        if not dist_info.is_main:
            return {}
        result = monitor(backbone, refiner, heldout_prompts, reward, others, config, preview_decoder, refined)
        log(f"held-out {f'step {step:05d}' if refined else 'unrefined'} | " + " | ".join(f"{k} {v:.4f}" for k, v in result.items()))
        append_log(log_path, {"step": step, "heldout" if refined else "heldout_unrefined": result}, dist_info)
        return result

    metrics = {}
    if start_step == 0 and dist_info.is_main:
        metrics["heldout_unrefined"] = heldout(0, refined=False)
        metrics["heldout_start"] = heldout(0)

    # ---- GRPO loop
    for step in range(start_step + 1, config.steps + 1):
        t0 = time.time()
        seed = step_seed(config.seed, step, dist_info.rank)
        runs.seed_everything(seed)  # the refiner samples its tokens with the global generator
        generator = torch.Generator().manual_seed(seed)
        prompts = random.Random(seed).choices(train_prompts, k=config.prompts_per_step)  # each rank its own B prompts
        trajectories = rollout(backbone, refiner, prompts, config, preview_decoder, generator)
        scores = trajectories.score(reward)  # (B*G,) terminal rewards
        advantages, zero_variance = action_advantages(scores, trajectories, critic, config)  # (K, B*G), (B,)
        outputs = trajectories.refiner_outputs  # K RefinerOutputs: the actions
        partition = minibatch_partition(len(scores), config.minibatches, generator)  # (M, B*G / M), for old, ref and update
        old, ref = old_and_reference_logprobs(refiner, outputs, partition)
        stats = update(refiner, params, optimizer, outputs, old, ref, advantages, torch.isfinite(scores), partition, config, dist_info, generator)

        record = step_record(step, trajectories, scores, zero_variance, advantages, old, stats, reward, config, dist_info, t0)
        log(log_line(record, config.steps))
        append_log(log_path, record, dist_info)
        if config.monitor_every and step % config.monitor_every == 0 and step < config.steps:
            heldout(step)
        if step % config.save_every == 0 or step == config.steps:
            metrics["rank_divergence"] = save(step, refiner, optimizer, params, config, out_dir, dist_info)

    # ---- final held-out score and metrics
    if config.steps > start_step:
        metrics["heldout_end"] = heldout(config.steps)
    if dist_info.is_main:  # metrics.json: this run's over those of the run it resumed
        previous = json.loads((out_dir / "metrics.json").read_text()) if (out_dir / "metrics.json").exists() else {}
        metrics = {**previous, **metrics, "steps": config.steps, "world_size": dist_info.world_size, "config": asdict(config)}
        (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
        log(f"saved adapter and metrics in {out_dir}")
    runs.cleanup_distributed(dist_info)
    return metrics


def main():
    config = common.parse_config(Config)
    train(config)


if __name__ == "__main__":
    common.run_cli(main)
