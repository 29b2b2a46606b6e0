"""
train_reward.py: fit the diffusion-native latent reward model (LRM) on preference pairs.

    python train_reward.py --data toy_world/pickapic-toy --backbone toy --out runs/lrm-toy      # the toy world
    python train_reward.py --data yuvalkirstain/pickapic_v2 --backbone sd15 --max-pairs 200000 \\
        --val-split validation_unique --out runs/lrm-sd15                                        # Pick-a-Pic v2
    torchrun --nproc_per_node=8 train_reward.py ...                                             # DDP (nccl; gloo on CPU)

The model (lrm.LatentRewardModel, after LPO and DiNa-LRM) scores a *noisy latent* x_t with the
backbone's own features (a UNet's down blocks + mid block; the first joint blocks of an SD3 / FLUX
transformer, pooled), a timestep embedding and a small head. Training, for each batch of pairs
(w, l, y = P(w preferred)):

    t ~ U[0, T), eps ~ N(0, I)                    the *same* t and eps for both images of a pair
    x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps     DDPM backbones (SD, SDXL)
    x_t = (1 - sigma_t) x_0 + sigma_t eps             flow matching (SD3, FLUX), sigma_t = (t + 1) / T
    p = Phi((r(w_t) - r(l_t)) / sqrt(2 v(t)))     noise-calibrated Thurstone: v(t) = v0 + kappa (1 - abar_t)
                                                  (ours) or 2 sigma_t^2 + 0.05 (DiNa-LRM's, --variance dina)
    loss = NLL(p, y) | fidelity(p, y) | Bradley-Terry (sigmoid(r_w - r_l), the baseline)

On a DDPM backbone sigma_t is the flow-matching noise level with alpha_bar_t's signal-to-noise ratio,
sqrt(1 - abar) / (sqrt(abar) + sqrt(1 - abar)); on a flow backbone abar_t = (1 - s)^2 / ((1 - s)^2 + s^2).
The VAE latents of the data are encoded once and cached on disk (--cache-dir). Validation reports
accuracy and calibration error (ECE) per noise bucket sigma in [0, 0.2), [0.2, 0.4), ... and the
accuracy of single-draw vs noise-ensembled scores of the clean latents, at random t and at DiNa-LRM's
fixed levels sigma = 0.2, 0.5, 0.7 (the same number of draws), each with different draws for the two
sides of a pair and with shared ones (as candidates are compared in use; "shared_*"); all in metrics.json.
Output: OUT/model.safetensors + OUT/lrm_config.json (lrm.load_lrm, the reward `lrm:OUT`),
OUT/ckpt.pt (resume), OUT/log.jsonl, OUT/metrics.json.

Simplifications on purpose: pairs are drawn from latents held in memory (fine up to ~10^6 pairs at
SD sizes); captions are re-encoded by the frozen text encoder each step (cheap next to the UNet);
no multi-preference filtering of the data (LPO's MPCF); only rank 0 validates.
"""

import hashlib
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

import common
import lrm
import runs

# -----------------------------------------------------------------------------
# config


@dataclass
class Config(common.RunFlags):
    data: str = field(default="toy_world/pickapic-toy", metadata={"help": "preference pairs in the Pick-a-Pic v2 schema: a parquet file, a folder of {split}.parquet / {split}-*.parquet, or a hub id (e.g. yuvalkirstain/pickapic_v2, streamed)"})
    val_data: str | None = field(default=None, metadata={"help": "validation pairs (same forms as --data); default: --data. If both are the same single file, every 10th row is held out"})
    train_split: str = field(default="train", metadata={"help": "split of --data to train on"})
    val_split: str = field(default="validation", metadata={"help": "split of --val-data to validate on (Pick-a-Pic v2: validation_unique)"})
    backbone: str = field(default="toy", metadata={"help": "diffusion backbone whose denoiser gives the features: alias (sd15, sdxl, sd35m, flux-dev, toy, toy-sd3, ...) or diffusers folder"})
    out: str = field(default="runs/lrm", metadata={"help": "output folder (model, checkpoint, logs, metrics)"})
    steps: int = field(default=600, metadata={"help": "optimizer steps"})
    batch_size: int = field(default=32, metadata={"help": "pairs per step, over all processes"})
    lr: float = field(default=1e-3, metadata={"help": "peak learning rate (AdamW)"})
    weight_decay: float = field(default=0.01, metadata={"help": "AdamW weight decay"})
    warmup_steps: int = field(default=50, metadata={"help": "linear warmup steps, then cosine decay to 10%%"})
    grad_clip: float = field(default=1.0, metadata={"help": "max gradient norm"})
    loss: str = field(default="thurstone-nll", metadata={"help": "thurstone-nll | thurstone-fidelity | bradley-terry"})
    variance: str = field(default="fixed", metadata={"help": "Thurstone variance: fixed | learned v(t) = v0 + kappa (1 - abar_t) (ours), or dina: 2 sigma_t^2 + 0.05 (DiNa-LRM)"})
    v0: float = field(default=0.5, metadata={"help": "v(t) at t = 0 (initial value if learned)"})
    kappa: float = field(default=2.0, metadata={"help": "growth of v(t) with the noise level (initial value if learned)"})
    hidden: int = field(default=256, metadata={"help": "width of the reward head"})
    vfe_scale: float = field(default=0.0, metadata={"help": "LPO visual feature enhancement f_c + s (f_c - f_uncond); 0 = off"})
    lora_rank: int = field(default=0, metadata={"help": "LoRA rank on the attention of the blocks that run (UNet down/mid, the transformer's first --blocks); 0 = frozen"})
    blocks: int = field(default=0, metadata={"help": "SD3 / FLUX: joint blocks that run, features after a third, two thirds and all of them; 0 = half (DiNa-LRM: 12 of SD3.5-M's 24)"})
    resolution: int | None = field(default=None, metadata={"help": "image side in pixels before encoding (default: the backbone's)"})
    max_pairs: int | None = field(default=None, metadata={"help": "use at most this many training pairs (needed for the hub's 1M pairs)"})
    max_val_pairs: int = field(default=1000, metadata={"help": "use at most this many validation pairs"})
    cache_latents: bool = field(default=True, metadata={"help": "encode the images with the VAE once and cache them on disk; false = encode every step"})
    cache_dir: str | None = field(default=None, metadata={"help": "latent cache folder (default OUT/latent_cache)"})
    eval_every: int = field(default=200, metadata={"help": "validate every N steps and at the end (0 = only at the end)"})
    save_every: int = field(default=100, metadata={"help": "checkpoint every N steps (and at the end)"})
    ensemble_draws: int = field(default=8, metadata={"help": "noise ensembling: (t, eps) draws averaged per clean latent"})
    val_draws: int = field(default=1, metadata={"help": "noise draws (t, eps) per validation pair and noise bucket; more give steadier accuracy and ECE"})
    ensemble_t_max: int = field(default=400, metadata={"help": "noise ensembling: t ~ U[0, ensemble_t_max)"})
    ensemble_levels: list[float] = field(default_factory=list, metadata={"help": "noise ensembling at these fixed sigmas instead (draws cycle through them; DiNa-LRM: 0.2 0.5 0.7); validation reports both"})
    resume: bool = field(default=False, metadata={"help": "continue from OUT/ckpt.pt"})


RESUME_MAY_CHANGE = {"resume", "steps", "eval_every", "save_every", "threads", "device", "val_draws"}


def check_config(cfg):
    if cfg.loss not in lrm.PREFERENCE_LOSSES:
        raise common.UserError(f"unknown --loss '{cfg.loss}': use one of {', '.join(lrm.PREFERENCE_LOSSES)}")
    if cfg.variance not in lrm.NOISE_VARIANCES:
        raise common.UserError(f"unknown --variance '{cfg.variance}': use one of {', '.join(lrm.NOISE_VARIANCES)}")
    if cfg.variance != "fixed" and cfg.loss == "bradley-terry":
        raise common.UserError(f"--variance {cfg.variance} needs a Thurstone loss (Bradley-Terry has no v(t))")
    common.require(cfg, positive=("steps", "batch_size", "lr", "v0", "grad_clip", "hidden", "save_every", "max_pairs",
                                  "max_val_pairs", "resolution"),
                   non_negative=("kappa", "weight_decay", "warmup_steps", "vfe_scale", "lora_rank", "eval_every", "threads"))
    if cfg.variance == "learned" and cfg.kappa == 0:
        raise common.UserError("--variance learned needs --kappa > 0 (it is learned in log space)")
    if not 0 < cfg.ensemble_t_max <= 1000 or cfg.ensemble_draws < 1 or cfg.val_draws < 1:
        raise common.UserError("--ensemble-t-max must be in (0, 1000], --ensemble-draws and --val-draws >= 1")
    if not all(0 < s <= 1 for s in cfg.ensemble_levels):
        raise common.UserError(f"--ensemble-levels are noise levels sigma in (0, 1], got {cfg.ensemble_levels}")


# -----------------------------------------------------------------------------
# data: preference pairs -> VAE latents, cached on disk


def cache_path(cfg, backbone, source, split, resolution, max_pairs, holdout):
    """One cache file per (data, split, backbone, resolution, subset): a changed input is a new file."""
    files = lrm.preference_data_files(source, split) or [source]
    stamp = [(f, Path(f).stat().st_mtime_ns if Path(f).exists() else 0) for f in files]
    key = json.dumps([stamp, split, backbone.spec.source, resolution, max_pairs, holdout])
    folder = Path(cfg.cache_dir or Path(cfg.out) / "latent_cache")
    return folder / f"{split}-{hashlib.sha1(key.encode()).hexdigest()[:16]}.safetensors"


def load_split(cfg, backbone, dist, source, split, resolution, max_pairs, holdout):
    """Pairs of one split as latents (cached) or pixels (--cache-latents false).

    holdout: None, "train" (rows not held out) or "val" (every 10th row) when one file feeds both."""
    from safetensors.torch import save_file

    keep_row = None if holdout is None else (lambda i: (i % 10 == 0) == (holdout == "val"))
    if not cfg.cache_latents:
        return lrm.read_pairs(source, split, resolution, max_pairs, keep_row)
    path = cache_path(cfg, backbone, source, split, resolution, max_pairs, holdout)
    if dist.is_main and not path.is_file():
        pairs = lrm.read_pairs(source, split, resolution, max_pairs, keep_row)
        t0 = time.time()
        latents_0 = lrm.encode_latents(backbone.pipe.vae, pairs["pixels_0"])
        latents_1 = lrm.encode_latents(backbone.pipe.vae, pairs["pixels_1"])
        print(f"encoded {len(pairs['labels'])} {split} pairs in {time.time() - t0:.1f}s -> {path}")
        path.parent.mkdir(parents=True, exist_ok=True)
        metadata = {"captions": json.dumps(pairs["captions"]), "counts": json.dumps(pairs["counts"])}
        tmp = Path(f"{path}.{os.getpid()}.tmp")  # one per process: two runs may share a cache folder
        save_file({"latents_0": latents_0, "latents_1": latents_1, "labels": pairs["labels"]}, str(tmp), metadata=metadata)
        tmp.replace(path)  # atomic: a killed encode leaves no half-written cache
    runs.barrier(dist)
    from safetensors import safe_open

    try:  # a cache cut short or garbled (a full disk, a bad copy, someone's --cache-dir): named, no traceback
        with safe_open(str(path), "pt") as f:
            metadata = f.metadata() or {}
            tensors = {key: f.get_tensor(key) for key in f.keys()}
        captions, counts = json.loads(metadata["captions"]), json.loads(metadata["counts"])
    except (*common.UNREADABLE_ERRORS, KeyError) as e:
        raise common.UserError(f"latent cache: {common.unreadable(e, path)} (delete it to encode the pairs again)") from e
    return dict(tensors, captions=captions, counts=counts)


def pair_latents(model, data, indices):
    """Clean latents (B, C, h, w) of both sides of the pairs at `indices`; encodes now when not cached."""
    if "latents_0" in data:
        return data["latents_0"][indices], data["latents_1"][indices]
    both = torch.cat([data["pixels_0"][indices], data["pixels_1"][indices]])
    return lrm.encode_latents(model.backbone.pipe.vae, both, batch_size=len(both)).chunk(2)


# -----------------------------------------------------------------------------
# small named helpers


def learning_rate(step, cfg):
    """Linear warmup to cfg.lr, then cosine decay to 10% of it."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def batch_indices(step, num_pairs, batch_size, seed):
    """Global batch of pair indices for `step`: epochs of seeded permutations, a function of step only
    (so a resumed run draws exactly the batches an uninterrupted one would)."""
    start = step * batch_size
    indices = []
    while len(indices) < batch_size:
        epoch, offset = divmod(start + len(indices), num_pairs)
        order = torch.randperm(num_pairs, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
        indices.extend(order[offset : offset + batch_size - len(indices)].tolist())
    return torch.tensor(indices)


def step_noise(step, seed, batch_size, latent_shape, num_timesteps):
    """t (B,) and eps (B, C, h, w) of one global batch, seeded by step: the same on every rank."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + step + 1)
    t = torch.randint(0, num_timesteps, (batch_size,), generator=generator)
    return t, torch.randn((batch_size, *latent_shape), generator=generator)


def pair_loss(model, latents_0, latents_1, noise, t, captions, targets, loss):
    """One training step's loss: both images of each pair noised with the same eps and t (B,), their
    rewards (B,), (B,), and the Thurstone variance v(t) of *that* noise level (the calibration: the
    same reward gap means less at a higher noise level). model: the LatentRewardModel or its DDP
    wrapper. Returns (loss, r_0, r_1, variance)."""
    r_0, r_1 = lrm.pair_rewards(model, latents_0, latents_1, noise, t, captions)
    variance = (model.module if hasattr(model, "module") else model).variance(t)  # (B,)
    return lrm.preference_loss(loss, r_0, r_1, variance, targets), r_0, r_1, variance


@torch.no_grad()
def evaluate(model, data, cfg, device, batch_size=64):
    """Accuracy, ECE and loss per noise bucket (same t and eps for a pair), and the accuracy of
    noise-ensembled vs single-draw scores of the clean latents (each image scored on its own)."""
    model.eval()
    labels = data["labels"]
    generator = torch.Generator().manual_seed(1234)  # the same validation noise at every evaluation
    rewards = lrm.lrm_validation_rewards(model, lambda idx: pair_latents(model, data, idx), data["captions"], generator,
                                            batch_size, device, bucket_draws=cfg.val_draws)
    result = {"pairs": len(labels), "ties": int((labels == 0.5).sum()), "val_draws": cfg.val_draws, "buckets": {}}
    repeated = labels.repeat(cfg.val_draws)
    for (lo, hi), (r_0, r_1, t) in rewards["buckets"].items():
        variance = model.variance(t.to(device)).cpu()
        p = lrm.preference_probability(cfg.loss, r_0, r_1, variance)
        result["buckets"][f"{lo:.1f}-{hi:.1f}"] = dict(accuracy=lrm.pairwise_accuracy(p, repeated), ece=lrm.expected_calibration_error(p, repeated),
                                               loss=lrm.preference_loss(cfg.loss, r_0, r_1, variance, repeated).item())
    result.update(ensemble_draws=cfg.ensemble_draws, ensemble_t_max=cfg.ensemble_t_max, levels=list(lrm.DINA_LEVELS))
    # different draws for a pair's two sides (unprefixed keys) and shared ones (shared_*: how candidates are compared in use)
    for prefix, scores in (("", rewards), ("shared_", rewards["shared"])):
        for name, key in (("draws", ""), ("levels", "levels_")):
            single, ensemble = lrm.ensemble_accuracies(*scores[name], labels)
            result.update({f"{prefix}{key}single_accuracy": single, f"{prefix}{key}ensemble_accuracy": ensemble})
    model.train()
    return result


def eval_line(step, result):
    buckets = " ".join(f"{k}:{v['accuracy']:.3f}" for k, v in result["buckets"].items())
    return (f"eval {step:05d} | acc per sigma-bucket {buckets} | single {result['single_accuracy']:.3f} | ensemble {result['ensemble_accuracy']:.3f}"
            f" | fixed levels {result['levels_ensemble_accuracy']:.3f} | shared draws: single {result['shared_single_accuracy']:.3f}"
            f" | ensemble {result['shared_ensemble_accuracy']:.3f}")


# -----------------------------------------------------------------------------
# main


def main():
    cfg = common.parse_config(Config)
    check_config(cfg)
    dist = runs.setup_distributed(cfg.device)
    if cfg.batch_size % dist.world_size:
        raise common.UserError(f"--batch-size {cfg.batch_size} must be divisible by the {dist.world_size} processes")
    runs.seed_everything(cfg.seed)
    device, dtype = common.setup_run(cfg, dist.device)
    out = Path(cfg.out)
    ckpt_path = out / "ckpt.pt"
    out.mkdir(parents=True, exist_ok=True)
    state = runs.resume_checkpoint(ckpt_path, cfg, RESUME_MAY_CHANGE) if cfg.resume else None

    # --- backbone, data
    backbone = common.load_backbone(cfg.backbone, device, dtype)
    resolution = common.image_side(backbone, cfg.resolution)
    val_source = cfg.val_data or cfg.data
    same_file = Path(cfg.data).is_file() and Path(val_source).is_file() and Path(cfg.data).resolve() == Path(val_source).resolve()
    train = load_split(cfg, backbone, dist, cfg.data, cfg.train_split, resolution, cfg.max_pairs, "train" if same_file else None)
    val = load_split(cfg, backbone, dist, val_source, cfg.val_split, resolution, cfg.max_val_pairs, "val" if same_file else None)
    num_pairs = len(train["labels"])
    latent_shape = common.latent_shape(backbone, resolution)
    if dist.is_main:
        print(f"train pairs {num_pairs} (rows {train['counts']}) | val pairs {len(val['labels'])} (rows {val['counts']})")

    # --- model, optimizer
    backbone_name = cfg.backbone if cfg.backbone in common.BACKBONES else str(Path(cfg.backbone).resolve()) if Path(cfg.backbone).exists() else cfg.backbone
    lrm_config = lrm.LRMConfig(
        backbone=backbone_name, hidden=cfg.hidden, vfe_scale=cfg.vfe_scale, lora_rank=cfg.lora_rank, variance=cfg.variance,
        v0=cfg.v0, kappa=cfg.kappa, blocks=cfg.blocks, ensemble_draws=cfg.ensemble_draws, ensemble_t_max=cfg.ensemble_t_max,
        ensemble_levels=cfg.ensemble_levels,
    )
    model = lrm.LatentRewardModel(backbone, lrm_config).train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    start_step, history = 0, []
    if state is not None:
        model.load_trainable_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["rng"])
        start_step, history = state["step"], state["eval_history"]
        if dist.is_main:
            print(f"resumed from {ckpt_path} at step {start_step}")
    ddp_model = model
    if dist.world_size > 1:
        from torch.nn.parallel import DistributedDataParallel

        ddp_model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)

    def save(step):
        if dist.is_main:
            runs.save_checkpoint(ckpt_path, dict(
                model=model.trainable_state_dict(), optimizer=optimizer.state_dict(), step=step,
                rng=torch.get_rng_state(), config=asdict(cfg), eval_history=history,
            ))
        runs.barrier(dist)

    # --- training loop
    local = cfg.batch_size // dist.world_size
    log = None
    if dist.is_main:
        runs.trim_log(out / "log.jsonl", start_step)  # on resume the steps after the checkpoint are redone
        log = open(out / "log.jsonl", "a")
    skipped_steps, step_times = 0, []
    for step in range(start_step, cfg.steps):
        t0 = time.time()
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, cfg)
        # global batch drawn identically on every rank, then each rank takes its slice
        indices = batch_indices(step, num_pairs, cfg.batch_size, cfg.seed)
        t, noise = step_noise(step, cfg.seed, cfg.batch_size, latent_shape, model.num_timesteps)
        part = slice(dist.rank * local, (dist.rank + 1) * local)
        indices, t, noise = indices[part], t[part], noise[part]
        latents_0, latents_1 = pair_latents(model, train, indices)
        captions = [train["captions"][i] for i in indices]
        targets = train["labels"][indices].to(device)
        loss, r_0, r_1, variance = pair_loss(ddp_model, latents_0.to(device), latents_1.to(device), noise.to(device), t.to(device),
                                             captions, targets, cfg.loss)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        finite = bool(torch.isfinite(loss) and torch.isfinite(grad_norm))
        if finite:
            optimizer.step()
        else:  # a NaN/inf loss or gradient is reported and never applied
            skipped_steps += 1
        dt = time.time() - t0
        step_times.append(dt)
        if dist.is_main:
            p = lrm.preference_probability(cfg.loss, r_0, r_1, variance).detach().cpu()
            record = dict(step=step + 1, loss=loss.item(), accuracy=lrm.pairwise_accuracy(p, targets.cpu()),
                          lr=learning_rate(step, cfg), grad_norm=grad_norm.item(), dt=dt, skipped=skipped_steps)
            if cfg.variance == "learned":
                record.update(v0=model.log_v0.exp().item(), kappa=model.log_kappa.exp().item())
            print(f"step {step + 1:05d}/{cfg.steps} | loss {record['loss']:.4f} | acc {record['accuracy']:.3f} | "
                  f"lr {record['lr']:.2e} | dt {dt * 1000:.0f}ms" + ("" if finite else " | non-finite, skipped"), flush=True)
            log.write(json.dumps(record) + "\n")
            log.flush()
        if cfg.eval_every and (step + 1) % cfg.eval_every == 0 and step + 1 < cfg.steps:
            if dist.is_main:
                result = evaluate(model, val, cfg, device)
                history.append(dict(step=step + 1, **result))
                print(eval_line(step + 1, result), flush=True)
                log.write(json.dumps(dict(step=step + 1, eval=result)) + "\n")
            runs.barrier(dist)
        if (step + 1) % cfg.save_every == 0 or step + 1 == cfg.steps:
            save(step + 1)

    # --- final validation, save
    if dist.is_main:
        result = evaluate(model, val, cfg, device)
        print(eval_line(cfg.steps, result))
        lrm.save_lrm(model, out)
        # an epoch = one pass over the training pairs at this batch size (step times of this process)
        steps_per_epoch = num_pairs / cfg.batch_size
        mean_dt = sum(step_times) / max(1, len(step_times))
        metrics = dict(
            final=result, history=history, train_rows=train["counts"], val_rows=val["counts"], train_pairs=num_pairs,
            skipped_steps=skipped_steps, cache_latents=cfg.cache_latents, mean_step_s=mean_dt,
            epoch_time_s=mean_dt * steps_per_epoch, world_size=dist.world_size, config=asdict(cfg),
        )
        labels_info = Path(val_source) / "labels.json"
        if labels_info.is_file():  # the toy pairs' noise ceiling: what a perfect reward model would reach
            metrics["noise_ceiling"] = json.loads(labels_info.read_text()).get(cfg.val_split, {}).get("noise_ceiling")
        (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
        log.close()
    runs.barrier(dist)
    runs.cleanup_distributed(dist)


if __name__ == "__main__":
    common.run_cli(main)
