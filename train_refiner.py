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
               shares its initial noise: common random numbers); K refinements, each one batched
               refiner.generate call, sampled with temperature
  2. reward    terminal reward r (B*G,) from the registry (--reward SPEC, composites included)
  3. advantage A = (r - mean_group) / (std_group + eps), the same for every token of a trajectory;
               with --credit per-refinement, action k gets A_k = group-normalised (r - V(x_{t_k})):
               an LRM critic (--critic DIR) scores the noisy latent on which action k was taken
  4. log-probs old (adapter on) and reference (adapter off, peft's disable_adapter: no second
               copy of the model), teacher-forced, no gradient
  5. update    inner epochs x minibatches of trajectories; token-level loss
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
    shared_noise: bool = field(default=True, metadata={"help": "a group shares its initial noise (common random numbers); --no-shared-noise draws one per trajectory"})
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
    credit: str = field(default="terminal", metadata={"help": "terminal: every action of a trajectory gets its group-normalised reward; per-refinement: action k gets group-normalised (r - V(x_t_k)) from the --critic LRM"})
    critic: str | None = field(default=None, metadata={"help": "latent reward model folder (train_reward.py) that values the noisy latent of each refinement, for --credit per-refinement; calibrated to the reward by an affine fit on each batch"})
    kl_coef: float = field(default=0.04, metadata={"help": "beta: weight of the k3 KL to the adapter-disabled base"})
    advantage_eps: float = field(default=1e-4, metadata={"help": "eps in (r - mean) / (std + eps)"})
    inner_epochs: int = field(default=2, metadata={"help": "passes over each rollout batch (PPO epochs)"})
    minibatches: int = field(default=2, metadata={"help": "minibatches per pass (of trajectories; B*G must be divisible)"})
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
                   non_negative=("monitor_every", "max_prompts", "sampling_steps", "size", "threads"))
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


def group_advantages(rewards, group_size, eps=1e-4):
    """GRPO advantages: (r - mean_group) / (std_group + eps). rewards: (B*G,), rows grouped.

    std is the unbiased sample std (as torch.std, as TRL). Non-finite rewards (a NaN from the
    reward) are left out of their group's statistics and get advantage 0; a group with fewer than
    two finite rewards gets 0 everywhere. Returns (advantages (B*G,), zero_variance (B,) bool):
    a group whose rewards are all equal has advantages 0 -- it contributes nothing but the KL."""
    r = rewards.float().view(-1, group_size)  # (B, G)
    valid = torch.isfinite(r)
    count = valid.sum(1, keepdim=True)  # (B, 1)
    filled = torch.where(valid, r, torch.zeros_like(r))
    mean = filled.sum(1, keepdim=True) / count.clamp(min=1)
    squares = torch.where(valid, (r - mean) ** 2, torch.zeros_like(r)).sum(1, keepdim=True)
    std = (squares / (count - 1).clamp(min=1)).sqrt()
    advantages = torch.where(valid & (count >= 2), (r - mean) / (std + eps), torch.zeros_like(r))
    zero_variance = (count.squeeze(1) < 2) | torch.isclose(std.squeeze(1), torch.zeros_like(std.squeeze(1)))
    advantages[zero_variance] = 0.0
    return advantages.view(-1), zero_variance


def affine_fit(x, y):
    """Least squares y ~ a x + b over the finite y: (a, b). a = 0 when x has no spread.

    >>> affine_fit(torch.tensor([0.0, 1.0, 2.0]), torch.tensor([1.0, 3.0, 5.0]))
    (2.0, 1.0)"""
    keep = torch.isfinite(y) & torch.isfinite(x)
    x, y = x[keep].double(), y[keep].double()
    if len(x) < 2:
        return 0.0, float(y.mean()) if len(y) else 0.0
    var = ((x - x.mean()) ** 2).mean()
    a = float(((x - x.mean()) * (y - y.mean())).mean() / var) if var > 0 else 0.0
    return a, float(y.mean() - a * x.mean())


def refinement_advantages(rewards, values, group_size, eps=1e-4):
    """Per-refinement credit: A_k = group_advantages(r - V_k), normalised over the group separately
    for each refinement index k. rewards (N,), values (K, N) -> (K, N).

    r - V(x_{t_k}) is what happened from action k on (potential-based shaping with gamma = 1:
    the sum of V(x_{t_{j+1}}) - V(x_{t_j}) for j >= k, with V(final) = r). Before the first
    refinement a group shares its noise and prompt, so V_0 is the same for the group and A_0 is
    the terminal advantage; later, what earlier actions did is taken out of the credit."""
    return torch.stack([group_advantages(rewards - v, group_size, eps)[0] for v in values])


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
# helpers: batching the refiner's inputs, LoRA, distributed


def step_seed(seed, step, rank):
    """Each (step, rank) has its own seed, so a resumed run replays exactly what it would have done."""
    return (seed * 1_000_003 + step * 1009 + rank) % (2**31)


def initial_noise(backbone, num_prompts, group_size, shared, generator, size):
    """Unit Gaussian initial latents (B*G, C, h, w); with `shared` a group repeats one draw."""
    shape = common.latent_shape(backbone, size or None)
    if shared:
        return torch.randn((num_prompts, *shape), generator=generator).repeat_interleave(group_size, 0)
    return torch.randn((num_prompts * group_size, *shape), generator=generator)


# -----------------------------------------------------------------------------
# rollout, log-probs, update


def sample(backbone, refiner, rows, latents, generator, config, preview_decoder):
    """refined_sample with the run's sampling settings: the rollouts and the held-out monitor."""
    return promptloop.refined_sample(
        backbone, rows, refiner, refine_steps=config.refine_steps, num_steps=config.sampling_steps or None,
        guidance=None if config.guidance < 0 else config.guidance, generator=generator, latents=latents,
        preview_decoder=preview_decoder, blank_preview=config.blank_preview, size=config.size or None,
    )


def rollout(backbone, refiner, prompts, config, preview_decoder, generator):
    """B prompts -> B*G refined trajectories in one batched refined_sample call."""
    rows = [p for p in prompts for _ in range(config.group_size)]  # (B*G,) group members adjacent
    latents = initial_noise(backbone, len(prompts), config.group_size, config.shared_noise, generator, config.size)
    return sample(backbone, refiner, rows, latents, generator, config, preview_decoder)


@torch.no_grad()
def old_and_reference_logprobs(refiner, outputs, chunk):
    """Teacher-forced log-probs of every action, with the adapter (pi_old) and without (pi_ref).

    outputs: the K RefinerOutputs of the rollout. Returns two lists of K tensors (B*G, T_k).
    pi_old is recomputed rather than taken from generation so that rho is exactly 1 before the
    first update also in bf16 (generation logits and a full forward can differ by rounding)."""
    old, ref = [], []
    for out in outputs:
        rows = range(out.completion_ids.shape[0])
        old_k, ref_k = [], []
        for start in range(0, len(rows), chunk):
            idx = list(rows[start: start + chunk])
            args = (refiners.select_rows(out.inputs, idx), out.completion_ids[idx], out.completion_mask[idx])
            old_k.append(refiner.token_logprobs(*args).float().cpu())
            with refiner.model.disable_adapter():
                ref_k.append(refiner.token_logprobs(*args).float().cpu())
        old.append(torch.cat(old_k))
        ref.append(torch.cat(ref_k))
    return old, ref


@torch.no_grad()
def critic_values(critic, trajectories, rewards):
    """V(x_{t_k}) (K, N): the LRM critic (lrm.search_scorer) on the noisy latent of each refinement
    (one score, the state is noisy already), on the reward's scale: an affine fit of the rewards on
    the critic's noise-ensembled score of the final latents, R ~ a V_final + b, least squares over the batch."""
    prompts = trajectories.prompts[0]
    values = torch.stack([critic(x, prompts, level) for x, level in zip(trajectories.states, trajectories.state_levels)])
    a, b = affine_fit(critic(trajectories.latents, prompts, None), rewards)
    return a * values + b


def update(refiner, params, optimizer, outputs, old, ref, advantages, valid, config, dist_info, generator):
    """inner_epochs x minibatches of GRPO on one rollout batch; advantages (K, N), one row per
    refinement. Returns averaged stats."""
    n = advantages.shape[1]
    size = n // config.minibatches
    stats = dict(loss=[], kl=[], clip_fraction=[], grad_norm=[], skipped=0)
    refiner.model.train()  # no dropout anywhere (lora_dropout=0); lets gradient checkpointing run
    for _ in range(config.inner_epochs):
        order = torch.randperm(n, generator=generator)
        for mb in range(config.minibatches):
            idx = order[mb * size: (mb + 1) * size].tolist()
            masks = [out.completion_mask[idx] * valid[idx].unsqueeze(1) for out in outputs]  # (n_mb, T_k)
            num_tokens = max(1.0, runs.all_sum(sum(m.sum().item() for m in masks), dist_info))
            optimizer.zero_grad(set_to_none=True)
            total, kls, clips = 0.0, [], []
            for k, out in enumerate(outputs):
                logprobs = refiner.token_logprobs(refiners.select_rows(out.inputs, idx), out.completion_ids[idx], out.completion_mask[idx])
                loss, s = grpo_loss(
                    logprobs.float(), old[k][idx].to(logprobs.device), ref[k][idx].to(logprobs.device),
                    advantages[k][idx].to(logprobs.device), masks[k].to(logprobs.device), config.clip_epsilon,
                    config.kl_coef, num_tokens / dist_info.world_size,
                )
                loss.backward()  # one backward per refinement step keeps one activation set alive
                total += loss.item()
                kls.append(s["kl"])
                clips.append(s["clip_fraction"])
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
    return {k: (v if k == "skipped" else mean(v)) for k, v in stats.items()}


@torch.no_grad()
def monitor(backbone, refiner, prompts, reward, others, config, preview_decoder, refined=True):
    """Held-out rewards of the current policy (one trajectory per prompt, fixed noise and seed)."""
    generator = torch.Generator().manual_seed(config.seed + 12345)
    torch.manual_seed(config.seed + 12345)  # the refiner samples with the global generator
    latents = initial_noise(backbone, len(prompts), 1, False, generator, config.size)
    samples = sample(backbone, refiner if refined else None, prompts, latents, generator, config, preview_decoder)
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
# main


def load_prompt_sets(config):
    """(train, held-out) prompts; --prompts defaults to the backbone's own prompts: the toy grammar
    for a toy backbone (offline), Pick-a-Pic v2's captions otherwise."""
    source = config.prompts or ("toy" if config.backbone.startswith("toy") else "pickapic")
    train = runs.load_prompts(source, "train", config.max_prompts or None, config.seed)
    if config.heldout_prompts:
        heldout = runs.load_prompts(config.heldout_prompts, "test", config.monitor_prompts, config.seed)
    else:
        heldout = runs.load_prompts(source, "test", config.monitor_prompts, config.seed)
        if set(heldout) & set(train):  # a source without splits (a text file): hold prompts out of it
            rng = random.Random(config.seed)
            heldout = rng.sample(train, min(config.monitor_prompts, len(train) // 5))
            train = [p for p in train if p not in set(heldout)]
            if not heldout or not train:
                raise common.UserError(f"too few prompts in '{source}' to hold some out: give --heldout-prompts")
    return train, heldout


def train(config, reward=None, monitor_reward=None):
    """The training run; `reward` / `monitor_reward` (callables like rewards.Reward) override the
    registry specs -- the tests use that to train on rewards they define."""
    check_config(config)
    if config.threads > 0:
        torch.set_num_threads(config.threads)
    dist_info = runs.setup_distributed(config.device)
    device = dist_info.device
    dtype = common.pick_dtype(config.dtype, device)
    out_dir = Path(config.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    checkpoint_path = out_dir / "checkpoint.pt"
    state = runs.resume_checkpoint(checkpoint_path, config, RESUME_MAY_CHANGE) if config.resume else None
    log = print if dist_info.is_main else (lambda *a, **k: None)

    # ---- rewards and prompts first (bad specs fail before the slow loads), then the models
    reward = reward or rewards.build_reward(config.reward, device, dtype)
    others = monitor_reward or (rewards.build_reward(config.monitor_rewards, device, dtype) if config.monitor_rewards else None)
    train_prompts, heldout_prompts = load_prompt_sets(config)
    runs.seed_everything(config.seed)  # same LoRA init on every rank
    backbone = common.load_backbone(config.backbone, device=device, dtype=dtype, t5=config.t5)
    # the critic: the LRM scoring this sampler's states (search_scorer checks it can read them)
    critic = lrm.search_scorer(lrm.load_lrm(config.critic, device, dtype), backbone) if config.critic else None
    if device.type == "cuda":
        backbone.pipe.vae.enable_slicing()  # decode B*G images one at a time: no memory peak
    base = refiners.load_refiner(config.refiner, device=device, dtype=dtype, temperature=config.temperature,
                               max_new_tokens=config.max_new_tokens, fast_decode=config.fast_decode, preview_size=config.preview_size)
    if isinstance(base.model, PeftModel):
        raise common.UserError(f"--refiner '{config.refiner}' is an adapter folder: start from a base refiner (use --resume to continue a run)")
    use_checkpointing = config.gradient_checkpointing == "on" or (config.gradient_checkpointing == "auto" and device.type == "cuda")
    if use_checkpointing:
        base.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    params = refiners.add_lora(base, config.lora_rank, config.lora_alpha, common.parse_list(config.lora_targets, "--lora-targets"))
    refiner = base
    preview_decoder = None if config.blank_preview else promptloop.PreviewDecoder(config.preview_decoder, backbone)
    optimizer = torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=0.0)

    start_step = 0
    if state is not None:
        set_peft_model_state_dict(refiner.model, state["lora"])
        optimizer.load_state_dict(state["optimizer"])
        start_step = state["step"]
        log(f"resumed from {checkpoint_path} at step {start_step}")
    elif dist_info.world_size > 1:
        import torch.distributed as dist

        for p in params:  # belt and braces: identical initial LoRA weights on every rank
            dist.broadcast(p.data, 0)
    log_path = out_dir / "log.jsonl"
    if dist_info.is_main:  # keep only the log lines the checkpoint covers (a killed run may have more)
        runs.trim_log(log_path, start_step)
    log(f"train prompts {len(train_prompts)} | held-out {len(heldout_prompts)} | trainable LoRA parameters "
        f"{sum(p.numel() for p in params):,} | world {dist_info.world_size} | device {device} {dtype}")

    def write_log(record):
        if dist_info.is_main:
            with open(log_path, "a") as f:
                f.write(json.dumps(record) + "\n")

    def heldout(step):
        if not dist_info.is_main:
            return {}
        result = monitor(backbone, refiner, heldout_prompts, reward, others, config, preview_decoder)
        log(f"held-out step {step:05d} | " + " | ".join(f"{k} {v:.4f}" for k, v in result.items()))
        write_log({"step": step, "heldout": result})
        return result

    metrics = {}
    if start_step == 0 and dist_info.is_main:
        metrics["heldout_unrefined"] = monitor(backbone, refiner, heldout_prompts, reward, others, config, preview_decoder, refined=False)
        log("held-out unrefined | " + " | ".join(f"{k} {v:.4f}" for k, v in metrics["heldout_unrefined"].items()))
        write_log({"step": 0, "heldout_unrefined": metrics["heldout_unrefined"]})
        metrics["heldout_start"] = heldout(0)

    # ---- GRPO loop
    for step in range(start_step + 1, config.steps + 1):
        t0 = time.time()
        seed = step_seed(config.seed, step, dist_info.rank)
        runs.seed_everything(seed)  # the refiner samples its tokens with the global generator
        generator = torch.Generator().manual_seed(seed)
        # each rank draws its own B prompts
        prompts = random.Random(seed).choices(train_prompts, k=config.prompts_per_step)
        refiner.model.eval()
        trajectories = rollout(backbone, refiner, prompts, config, preview_decoder, generator)
        scores = trajectories.score(reward)  # (B*G,) terminal rewards
        valid = torch.isfinite(scores)
        advantages, zero_variance = group_advantages(scores, config.group_size, config.advantage_eps)
        outputs = trajectories.refiner_outputs
        if critic is None:
            advantages = advantages.expand(len(outputs), -1)  # (K, N): every action the terminal advantage
        else:
            advantages = refinement_advantages(scores, critic_values(critic, trajectories, scores), config.group_size, config.advantage_eps)
        chunk = (config.prompts_per_step * config.group_size) // config.minibatches
        old, ref = old_and_reference_logprobs(refiner, outputs, chunk)
        logprob_gap = max((o.logprobs - lp).abs().max().item() for o, lp in zip(outputs, old))
        stats = update(refiner, params, optimizer, outputs, old, ref, advantages, valid, config, dist_info, generator)

        all_rewards = runs.all_gather(scores, dist_info)
        finite = all_rewards[torch.isfinite(all_rewards)]
        record = dict(
            step=step,
            reward_mean=finite.mean().item() if len(finite) else math.nan,
            reward_std=finite.std().item() if len(finite) > 1 else math.nan,
            nonfinite_rewards=int(runs.all_sum((~valid).sum().item(), dist_info)),
            zero_variance_groups=int(runs.all_sum(zero_variance.sum().item(), dist_info)),
            groups=config.prompts_per_step * dist_info.world_size,
            fallback_rate=runs.all_sum(torch.cat([o.fallback.float() for o in outputs]).mean().item(), dist_info) / dist_info.world_size,
            logprob_gap=logprob_gap,
            **stats,
            seconds=time.time() - t0,
            example=[trajectories.prompts[0][0], trajectories.final_prompts[0]],  # user prompt -> final prompt
        )
        if hasattr(reward, "term_means") and len(getattr(reward, "terms", [])) > 1:
            record["reward_terms"] = reward.term_means()
        log(f"step {step:05d}/{config.steps} | reward {record['reward_mean']:.4f} ± {record['reward_std']:.4f} | "
            f"kl {record['kl']:.5f} | clip {record['clip_fraction']:.3f} | fallback {record['fallback_rate']:.2f} | "
            f"zero-var {record['zero_variance_groups']}/{record['groups']} | dt {record['seconds'] * 1000:.0f}ms"
            + (f" | skipped {record['skipped']}" if record["skipped"] or record["nonfinite_rewards"] else ""))
        write_log(record)

        if config.monitor_every and step % config.monitor_every == 0 and step < config.steps:
            heldout(step)
        if step % config.save_every == 0 or step == config.steps:
            divergence = runs.rank_divergence(params, dist_info)
            if dist_info.is_main:
                refiners.save_adapter(refiner.model, out_dir, refiners.base_model_name(config.refiner))
                runs.save_checkpoint(checkpoint_path, dict(
                    lora=get_peft_model_state_dict(refiner.model), optimizer=optimizer.state_dict(),
                    step=step, config=asdict(config), rng=torch.get_rng_state(),
                ))
            if divergence != 0.0:
                log(f"warning: LoRA weights differ between ranks by {divergence:.3g}")
            metrics["rank_divergence"] = divergence

    # ---- final held-out score and metrics
    if config.steps > start_step:
        metrics["heldout_end"] = heldout(config.steps)
    if dist_info.is_main:
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
