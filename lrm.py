"""
lrm.py: the diffusion-native latent reward model (LRM) -- after LPO and DiNa-LRM.

    preference data    Pick-a-Pic v2 pairs (parquet or the hub, streamed) -> decoded images ->
                       VAE latents (encode_latents, batched)
    the math           noise-calibrated Thurstone likelihood, fidelity loss, Bradley-Terry,
                       accuracy and calibration error (the tests import these)
    the model          LatentRewardModel: r(x_t, c, t) from the frozen backbone's own UNet features
                       of a noisy latent + a timestep embedding -> a small head -> scalar
    validation         accuracy per noise bucket, noise ensembling vs a single draw
    save / load        model.safetensors + lrm_config.json; the reward `lrm:PATH`

Trained by train_reward.py; scored by evaluate.py --lrm and as the reward `lrm:PATH` (rewards.py).
Left out on purpose: transformer (MMDiT) backbones, LPO's multi-preference filtering of the data.
"""

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image

from common import UserError, encode_prompts, is_hub_id, load_backbone, parquet_split_files

# Pick-a-Pic v2 (Kirstain et al. 2023): a caption, two JPEGs (bytes), label_0/label_1 in
# {1/0, 0/1, 0.5/0.5 = tie}; has_label / are_different flag rows that carry no preference.
PICKAPIC_HUB_ID = "yuvalkirstain/pickapic_v2"
PREFERENCE_COLUMNS = ("caption", "jpg_0", "jpg_1", "label_0")
PREFERENCE_LOSSES = ("thurstone-nll", "thurstone-fidelity", "bradley-terry")


def preference_data_files(source, split):
    """Local parquet files of one split, or None when `source` is a hub id. A file is used for any
    split; a folder needs the split's files (common.parquet_split_files)."""
    path = Path(source)
    if path.is_file():
        return [str(path)]
    if path.is_dir():
        files = parquet_split_files(path, split)
        if not files:
            raise UserError(f"no parquet files for split '{split}' in '{source}' ({split}.parquet or {split}-*.parquet)")
        return [str(f) for f in files]
    if not is_hub_id(source):
        raise UserError(f"preference data '{source}' not found (a parquet file, a folder of them, or a hub id)")
    return None


def decode_image(value):
    """JPEG/PNG bytes (or a datasets Image dict / PIL image) -> RGB PIL image; None if undecodable."""
    import io

    if isinstance(value, dict):
        value = value.get("bytes")
    if isinstance(value, Image.Image):
        return value.convert("RGB")
    if not isinstance(value, (bytes, bytearray)):
        return None
    try:
        with Image.open(io.BytesIO(value)) as image:
            return image.convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError):
        return None


def iter_preference_pairs(source, split="train", counts=None):
    """Yield dict(index, caption, image_0, image_1, label_0) from Pick-a-Pic-schema data.

    label_0 = P(image 0 preferred): 1, 0, or 0.5 for a tie (kept: the soft-target losses and the
    fidelity loss use ties). As in the PickScore / Diffusion-DPO preprocessing of Pick-a-Pic,
    rows with has_label == False (no human choice) or are_different == False (the same image
    twice) are dropped. Bad rows (missing label, undecodable image) are skipped and counted in
    `counts` (a dict updated in place). Streams (the hub's train split is ~300 GB)."""
    import itertools

    from datasets import load_dataset

    counts = {} if counts is None else counts
    for key in ("rows", "used", "ties", "no_label", "not_different", "bad_image", "bad_caption"):
        counts.setdefault(key, 0)
    files = preference_data_files(source, split)
    try:
        if files is None:
            dataset = load_dataset(source, split=split, streaming=True)
        else:
            dataset = load_dataset("parquet", data_files={split: files}, split=split, streaming=True)
        rows = iter(dataset)
        first = next(rows, None)
    except Exception as e:  # datasets / pyarrow / hub errors have many types; all mean "cannot read"
        message = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"cannot read preference data '{source}' (split '{split}'): {message}") from e
    if first is None:
        return
    missing = [c for c in PREFERENCE_COLUMNS if c not in first]
    if missing:
        raise UserError(f"preference data '{source}' lacks column(s) {', '.join(missing)} (Pick-a-Pic schema: {', '.join(PREFERENCE_COLUMNS)})")
    for index, row in enumerate(itertools.chain([first], rows)):
        counts["rows"] += 1
        label = row.get("label_0")
        if row.get("has_label") is False or label is None or not isinstance(label, (int, float)) or not 0 <= label <= 1:
            counts["no_label"] += 1  # also catches NaN (not 0 <= nan)
            continue
        if row.get("are_different") is False:
            counts["not_different"] += 1
            continue
        caption = row.get("caption")
        if not isinstance(caption, str) or not caption.strip():
            counts["bad_caption"] += 1
            continue
        image_0, image_1 = decode_image(row["jpg_0"]), decode_image(row["jpg_1"])
        if image_0 is None or image_1 is None:
            counts["bad_image"] += 1
            continue
        counts["used"] += 1
        counts["ties"] += int(label == 0.5)
        yield dict(index=index, caption=caption, image_0=image_0, image_1=image_1, label_0=float(label))


def image_to_tensor(image, size):
    """PIL -> (3, size, size) uint8: resize the short side, center crop. uint8 keeps a data set of
    pairs 4x smaller in memory than float; encode_latents maps it to the VAE's [-1, 1]."""
    from torchvision.transforms.functional import center_crop, pil_to_tensor, resize

    return center_crop(resize(pil_to_tensor(image), size, antialias=True), size)


def read_pairs(source, split, size, max_pairs=None, keep_row=None):
    """Preference pairs decoded into memory: dict(pixels_0, pixels_1 (N, 3, S, S) uint8, labels (N,)
    = label_0, captions, counts of the rows read and skipped). keep_row(index) -> bool selects rows."""
    from tqdm import tqdm

    counts, pixels_0, pixels_1, labels, captions = {}, [], [], [], []
    for pair in tqdm(iter_preference_pairs(source, split, counts), desc=f"read {split}", leave=False):
        if keep_row is not None and not keep_row(pair["index"]):
            continue
        pixels_0.append(image_to_tensor(pair["image_0"], size))
        pixels_1.append(image_to_tensor(pair["image_1"], size))
        labels.append(pair["label_0"])
        captions.append(pair["caption"])
        if max_pairs is not None and len(labels) >= max_pairs:
            break
    if not labels:
        raise UserError(f"no usable preference pairs in '{source}' (split '{split}'): {counts}")
    return dict(pixels_0=torch.stack(pixels_0), pixels_1=torch.stack(pixels_1), labels=torch.tensor(labels),
                captions=captions, counts=counts)


@torch.no_grad()
def encode_latents(vae, pixels, batch_size=32):
    """Images (N, 3, H, W), uint8 or float in [-1, 1] -> the UNet's latents (N, C, H/f, W/f), float32
    on the CPU: the posterior mean (minus the VAE's shift, if any) x its scaling factor, in batches."""
    shift = getattr(vae.config, "shift_factor", None) or 0.0  # SD3 / FLUX VAEs have one, SD's none
    out = []
    for chunk in pixels.split(batch_size):
        chunk = chunk.float() / 127.5 - 1 if chunk.dtype == torch.uint8 else chunk
        latents = vae.encode(chunk.to(vae.device, vae.dtype)).latent_dist.mean
        out.append(((latents - shift) * vae.config.scaling_factor).float().cpu())
    return torch.cat(out).contiguous()


# --- the math: preference likelihoods, losses, calibration (tests import these)


def noise_variance(alpha_bar, v0, kappa):
    """v(t) = v0 + kappa * (1 - alpha_bar_t): the preference noise grows with the diffusion noise."""
    return v0 + kappa * (1 - alpha_bar)


def thurstone_probability(r_w, r_l, variance):
    """P(w > l | t) = Phi((r_w - r_l) / sqrt(2 v(t))) (each reward observed with N(0, v(t)) noise)."""
    return torch.special.ndtr((r_w - r_l) / torch.sqrt(2 * variance))


def thurstone_nll(r_w, r_l, variance, target):
    """Soft-target negative log-likelihood of the noise-calibrated Thurstone model, mean over pairs.

    target = P(w preferred) from the labels (1, 0 or 0.5 for a tie); log Phi via log_ndtr (stable)."""
    z = (r_w - r_l) / torch.sqrt(2 * variance)
    return -(target * torch.special.log_ndtr(z) + (1 - target) * torch.special.log_ndtr(-z)).mean()


def fidelity_loss(p, target, eps=1e-6):
    """1 - sqrt(p y) - sqrt((1-p)(1-y)) (Tsai et al. 2007; used by DiNa-LRM): zero at p = y, ties included.

    sqrt(p) * sqrt(y) rather than sqrt(p * y): the latter has a 0/0 gradient when y = 0."""
    p = p.clamp(eps, 1 - eps)
    return (1 - torch.sqrt(p) * torch.sqrt(target) - torch.sqrt(1 - p) * torch.sqrt(1 - target)).mean()


def bradley_terry_probability(r_w, r_l):
    """P(w > l) = sigmoid(r_w - r_l): the usual reward-model likelihood, blind to the noise level."""
    return torch.sigmoid(r_w - r_l)


def bradley_terry_nll(r_w, r_l, target):
    return F.binary_cross_entropy_with_logits(r_w - r_l, target)


def preference_probability(loss, r_w, r_l, variance):
    """P(w > l | t) under the likelihood that `loss` trains."""
    return bradley_terry_probability(r_w, r_l) if loss == "bradley-terry" else thurstone_probability(r_w, r_l, variance)


def preference_loss(loss, r_w, r_l, variance, target):
    if loss == "thurstone-nll":
        return thurstone_nll(r_w, r_l, variance, target)
    if loss == "thurstone-fidelity":
        return fidelity_loss(thurstone_probability(r_w, r_l, variance), target)
    if loss == "bradley-terry":
        return bradley_terry_nll(r_w, r_l, target)
    raise UserError(f"unknown loss '{loss}': use one of {', '.join(PREFERENCE_LOSSES)}")


def pairwise_accuracy(p, target):
    """Share of non-tie pairs whose labelled winner gets p > 0.5 (p = P(first preferred))."""
    keep = target != 0.5
    if not keep.any():
        return float("nan")
    return ((p[keep] > 0.5) == (target[keep] > 0.5)).double().mean().item()


def expected_calibration_error(p, target, bins=10):
    """ECE (Guo et al. 2017) of pairwise predictions, ties excluded.

    confidence = max(p, 1-p) in [0.5, 1], split into `bins` equal-width bins; ECE = sum over bins of
    (bin share) * |accuracy in bin - mean confidence in bin|."""
    keep = target != 0.5
    p, target = p[keep].double(), target[keep].double()
    if p.numel() == 0:
        return float("nan")
    confidence = torch.maximum(p, 1 - p)
    correct = ((p > 0.5) == (target > 0.5)).double()
    bin_index = ((confidence - 0.5) * 2 * bins).long().clamp(0, bins - 1)
    ece = 0.0
    for b in range(bins):
        in_bin = bin_index == b
        if in_bin.any():
            ece += in_bin.double().mean().item() * abs(correct[in_bin].mean().item() - confidence[in_bin].mean().item())
    return ece


# noise buckets of the evaluation (train_reward.py, evaluate.py): timestep ranges of 200
NOISE_BUCKETS = [(lo, lo + 200) for lo in range(0, 1000, 200)]


def noisy_latents(latents, noise, alpha_bar):
    """Forward diffusion x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps, abar_t: (B,).

    Written out rather than `scheduler.add_noise`: Euler schedulers (SDXL's default) only accept
    timesteps of their current sampling schedule there, and every SD/SDXL UNet takes this x_t."""
    a = alpha_bar.to(latents.dtype).view(-1, *([1] * (latents.dim() - 1)))
    return a.sqrt() * latents + (1 - a).sqrt() * noise


# --- the model


@dataclass
class LRMConfig:
    backbone: str  # alias, folder or hub id of the diffusion model the features come from
    hidden: int = 256  # width of the head and of the timestep embedding
    vfe_scale: float = 0.0  # LPO visual feature enhancement f_c + s (f_c - f_u); 0 = off (no uncond pass)
    lora_rank: int = 0  # LoRA on the down/mid attention projections of the UNet; 0 = UNet frozen
    variance: str = "fixed"  # v(t) = v0 + kappa (1 - abar_t): "fixed", or "learned" (v0, kappa trained)
    v0: float = 0.5
    kappa: float = 2.0
    ensemble_draws: int = 8  # noise ensembling of clean latents: draws of (t, eps) ...
    ensemble_t_max: int = 400  # ... with t uniform in [0, ensemble_t_max)


def pool_feature_map(h):
    """(B, C, H, W) -> (B, 8C): channel mean, std, 2x2-grid means, centre and ring means. The grid keeps
    a coarse layout that global pooling loses; centre vs. ring separates the subject from its surroundings."""
    h = h.float()
    height, width = h.shape[-2:]
    mean = h.mean((2, 3))
    centre = torch.zeros(height, width, dtype=torch.bool, device=h.device)
    centre[height // 4:height - height // 4, width // 4:width - width // 4] = True
    # maps smaller than 4x4 (tiny test models; SD1.5 at 512 px pools 64 down to 8) have no ring,
    # a 1x1 map no spread: those statistics fall back to the mean and to 0
    std = h.std((2, 3)) if height * width > 1 else torch.zeros_like(mean)
    ring = h[..., ~centre].mean(-1) if not centre.all() else mean
    return torch.cat([mean, std, F.adaptive_avg_pool2d(h, 2).flatten(1), h[..., centre].mean(-1), ring], 1)


class _StopUNet(Exception):
    """Raised by the mid-block hook: the up blocks are not needed for the features (half the UNet)."""


class LatentRewardModel(torch.nn.Module):
    """r(x_t, c, t): a reward on noisy latents from the diffusion backbone's own features.

    x_t (B, C, h, w), prompt c, timestep t (B,) -> UNet down blocks + mid block (forward hooks;
    the up blocks are skipped) -> per-block channel mean, std and 2x2-grid means, concatenated
    (B, F) -> LayerNorm, + a sinusoidal timestep embedding -> MLP -> scalar (B,).
    The UNet is frozen; with lora_rank > 0 a LoRA adapter is added to *this backbone's* UNet (so
    give the model its own backbone). v(t) is the Thurstone noise variance."""

    def __init__(self, backbone, config):
        from diffusers.models.embeddings import Timesteps

        super().__init__()
        if config.variance not in ("fixed", "learned"):
            raise UserError(f"unknown variance '{config.variance}': use fixed or learned")
        self.backbone, self.config = backbone, config
        if backbone.family not in ("sd", "sdxl"):
            raise UserError(f"backbone '{config.backbone}' is a {backbone.family.upper()} transformer; the latent reward model "
                            "runs on UNet backbones (SD1.5, SDXL)")
        self.unet = backbone.pipe.unet
        if self.unet.mid_block is None:
            raise UserError(f"backbone '{config.backbone}': the latent reward model needs a UNet with a mid block")
        self.unet.requires_grad_(False)
        if config.lora_rank > 0:
            from peft import LoraConfig

            # only down/mid attention: the up blocks never run for the features
            target = r".*(down_blocks|mid_block)\..*\.(to_q|to_k|to_v|to_out\.0)"
            self.unet.add_adapter(LoraConfig(r=config.lora_rank, lora_alpha=config.lora_rank, target_modules=target))
        channels = list(self.unet.config.block_out_channels)
        feature_dim = 8 * (sum(channels) + channels[-1])  # mean, std, 2x2 grid, centre, ring of each down block and the mid block
        self.feature_norm = torch.nn.LayerNorm(feature_dim)
        self.time_embedding = torch.nn.Sequential(
            Timesteps(config.hidden, flip_sin_to_cos=True, downscale_freq_shift=0), torch.nn.Linear(config.hidden, config.hidden), torch.nn.SiLU()
        )
        # no bias on the output: preferences only see reward differences, so it would get no gradient
        self.head = torch.nn.Sequential(
            torch.nn.Linear(feature_dim + config.hidden, config.hidden), torch.nn.SiLU(),
            torch.nn.Linear(config.hidden, config.hidden), torch.nn.SiLU(), torch.nn.Linear(config.hidden, 1, bias=False),
        )
        self.register_buffer("alphas_cumprod", backbone.pipe.scheduler.alphas_cumprod.float().clone(), persistent=False)
        if config.variance == "learned":
            self.log_v0 = torch.nn.Parameter(torch.tensor(math.log(config.v0)))
            self.log_kappa = torch.nn.Parameter(torch.tensor(math.log(config.kappa)))
        self._uncond = None
        self.to(self.unet.device)
        # the head stays fp32 whatever the backbone's dtype
        for module in (self.feature_norm, self.time_embedding, self.head):
            module.float()

    def train(self, mode=True):
        super().train(mode)
        self.unet.eval()  # frozen backbone: no dropout even while the head trains
        return self

    @property
    def num_timesteps(self):
        return len(self.alphas_cumprod)

    def variance(self, timesteps):
        """v(t): (B,) float32."""
        alpha_bar = self.alphas_cumprod.to(timesteps.device)[timesteps.long()]
        if self.config.variance == "learned":
            return noise_variance(alpha_bar, self.log_v0.exp(), self.log_kappa.exp())
        return noise_variance(alpha_bar, self.config.v0, self.config.kappa)

    @torch.no_grad()
    def text_conditioning(self, prompts):
        """The backbone's own encode_prompt: {"prompt_embeds": (B, L, D)} (+ SDXL "text_embeds" pooled)."""
        cond = encode_prompts(self.backbone.pipe, list(prompts))
        out = {"prompt_embeds": cond["prompt_embeds"]}
        if "add_text_embeds" in cond:
            out["text_embeds"] = cond["add_text_embeds"]
        if self.config.vfe_scale:
            if self._uncond is None:
                empty = encode_prompts(self.backbone.pipe, [""])
                self._uncond = {"prompt_embeds": empty["prompt_embeds"], "text_embeds": empty.get("add_text_embeds")}
            b = len(prompts)
            out["uncond_prompt_embeds"] = self._uncond["prompt_embeds"].expand(b, -1, -1)
            if "text_embeds" in out:
                out["uncond_text_embeds"] = self._uncond["text_embeds"].expand(b, -1)
        return out

    def _unet_features(self, x_t, timesteps, prompt_embeds, text_embeds=None):
        """(B, F): pool_feature_map of each down block's feature map at its own resolution (before its
        downsampler, if it has one) and of the mid block's output."""
        pooled = []

        def pool_down_block(block, inputs, output):
            # a down block returns (h, residuals): one residual per layer, then the downsampled h if
            # the block has a downsampler. Its own resolution is the input of that downsampler, the
            # last residual before it; a block without one (the last) returns it as h.
            h, residuals = output
            pooled.append(pool_feature_map(residuals[-2] if block.downsamplers is not None else h))

        def stop(module, inputs, output):
            pooled.append(pool_feature_map(output))
            raise _StopUNet

        hooks = [block.register_forward_hook(pool_down_block) for block in self.unet.down_blocks]
        hooks.append(self.unet.mid_block.register_forward_hook(stop))
        added = None
        if text_embeds is not None:
            # SDXL's micro-conditioning: (original size, crop top-left, target size) = the image size
            side = x_t.shape[-2] * self.backbone.pipe.vae_scale_factor, x_t.shape[-1] * self.backbone.pipe.vae_scale_factor
            time_ids = torch.tensor([[*side, 0, 0, *side]], device=x_t.device, dtype=text_embeds.dtype).expand(len(x_t), -1)
            added = {"text_embeds": text_embeds, "time_ids": time_ids}
        try:
            self.unet(x_t.to(self.unet.dtype), timesteps, encoder_hidden_states=prompt_embeds, added_cond_kwargs=added)
        except _StopUNet:
            pass
        finally:
            for hook in hooks:
                hook.remove()
        return torch.cat(pooled, 1)

    def forward(self, x_t, timesteps, cond):
        """Rewards (B,) of noisy latents x_t (B, C, h, w) at timesteps (B,) under text conditioning `cond`."""
        timesteps = timesteps.to(x_t.device).long()
        train_unet = self.config.lora_rank > 0 and torch.is_grad_enabled()
        with torch.set_grad_enabled(train_unet):
            if self.config.vfe_scale:
                # conditional and unconditional passes batched, as in CFG
                text = None if "text_embeds" not in cond else torch.cat([cond["text_embeds"], cond["uncond_text_embeds"]])
                both = self._unet_features(torch.cat([x_t, x_t]), torch.cat([timesteps, timesteps]),
                                           torch.cat([cond["prompt_embeds"], cond["uncond_prompt_embeds"]]), text)
                f_cond, f_uncond = both.chunk(2)
                features = f_cond + self.config.vfe_scale * (f_cond - f_uncond)
            else:
                features = self._unet_features(x_t, timesteps, cond["prompt_embeds"], cond.get("text_embeds"))
        h = torch.cat([self.feature_norm(features), self.time_embedding(timesteps).float()], 1)
        return self.head(h).squeeze(-1)

    @torch.no_grad()
    def score(self, x_t, prompts, timesteps):
        """Rewards (B,) of noisy latents x_t at timesteps (an int or (B,))."""
        timesteps = torch.as_tensor(timesteps, device=x_t.device).long().expand(len(x_t))
        return self(x_t, timesteps, self.text_conditioning(prompts))

    @torch.no_grad()
    def ensemble_score(self, latents, prompts, draws=None, t_max=None, generator=None):
        """Noise ensembling (DiNa-LRM): mean reward of clean latents (B, C, h, w) over `draws`
        independent (t ~ U[0, t_max), eps ~ N(0, I)) draws. generator: a torch.Generator on CPU."""
        return self.noised_scores(latents, prompts, draws, t_max, generator).mean(0)

    @torch.no_grad()
    def noised_scores(self, latents, prompts, draws=None, t_max=None, generator=None):
        """The draws of ensemble_score, not yet averaged: (draws, B)."""
        draws = draws or self.config.ensemble_draws
        t_max = t_max or self.config.ensemble_t_max
        b = len(latents)
        cond = {k: v.repeat(draws, *[1] * (v.dim() - 1)) for k, v in self.text_conditioning(prompts).items()}
        # all draws in one batched forward (rows ordered draw-major: row d*B + b)
        ts, noises = [], []
        for _ in range(draws):
            ts.append(torch.randint(0, t_max, (b,), generator=generator))
            noises.append(torch.randn(latents.shape, generator=generator))
        t = torch.cat(ts)  # (D*B,)
        noise = torch.cat(noises).to(latents.device, latents.dtype)  # (D*B, C, h, w)
        x_t = noisy_latents(latents.repeat(draws, 1, 1, 1), noise, self.alphas_cumprod[t].to(latents.device))
        return self(x_t, t.to(latents.device), cond).view(draws, b)

    def trainable_state_dict(self):
        """Head, timestep embedding, learned variance, LoRA weights: what training changes (no frozen UNet)."""
        return {k: v.detach().clone().contiguous() for k, v in self.state_dict().items() if not k.startswith("unet.") or "lora_" in k}

    def load_trainable_state_dict(self, state):
        missing, unexpected = self.load_state_dict(state, strict=False)
        missing = [k for k in missing if not k.startswith("unet.") or "lora_" in k]
        if missing or unexpected:
            raise UserError(f"latent reward weights do not fit the model: missing {missing[:3]}, unexpected {unexpected[:3]}")


@torch.no_grad()
def lrm_validation_rewards(model, pair_latents, captions, generator, batch_size=64, device="cpu", dtype=torch.float32, bucket_draws=1):
    """Rewards of held-out pairs, as the LRM is evaluated (train_reward.py, evaluate.py).

    pair_latents(indices) -> clean latents (latents_0, latents_1) of those pairs, (B, C, h, w) each.
    Returns {"buckets": {(lo, hi): (r_0, r_1, t)}, "draws": (r_0, r_1)}: per noise bucket both
    images of a pair noised with the same t ~ U[lo, hi) and eps (as in training), `bucket_draws`
    times, rewards and t (bucket_draws * N,), draw-major (labels.repeat(bucket_draws) matches); and
    each clean latent scored on its own over the model's ensemble draws (how a reward is used),
    (D, N) each: a draw's row is a single-draw score, the mean over rows the noise ensemble."""
    n = len(captions)
    batches = [torch.arange(i, min(n, i + batch_size)) for i in range(0, n, batch_size)]
    clean = [pair_latents(idx) for idx in batches]  # once: pair_latents may run the VAE
    alphas_cumprod = model.alphas_cumprod.cpu()
    result = {"buckets": {}}
    for lo, hi in NOISE_BUCKETS:
        hi = min(hi, model.num_timesteps)
        r_0, r_1, ts = [], [], []
        for idx, latents in list(zip(batches, clean)) * bucket_draws:
            t = torch.randint(lo, hi, (len(idx),), generator=generator)
            noise = torch.randn(latents[0].shape, generator=generator)
            x_t = torch.cat([noisy_latents(x.float(), noise, alphas_cumprod[t]) for x in latents]).to(device, dtype)
            r = model.score(x_t, [captions[i] for i in idx] * 2, torch.cat([t, t]).to(device)).float().cpu()
            r_0.append(r[: len(idx)])
            r_1.append(r[len(idx):])
            ts.append(t)
        result["buckets"][(lo, hi)] = (torch.cat(r_0), torch.cat(r_1), torch.cat(ts))
    draws = [[], []]
    for idx, pair in zip(batches, clean):
        for side, latents in enumerate(pair):
            draws[side].append(model.noised_scores(latents.to(device, dtype), [captions[i] for i in idx], generator=generator).float().cpu())
    result["draws"] = (torch.cat(draws[0], 1), torch.cat(draws[1], 1))
    return result


def ensemble_accuracies(draws_0, draws_1, labels):
    """(single, ensemble) pairwise accuracy of (D, N) noised scores: the mean accuracy of one draw
    (the expectation, not one lucky or unlucky draw) and the accuracy of the mean over draws."""
    single = sum(pairwise_accuracy(torch.sigmoid(a - b), labels) for a, b in zip(draws_0, draws_1)) / len(draws_0)
    return single, pairwise_accuracy(torch.sigmoid(draws_0.mean(0) - draws_1.mean(0)), labels)


def save_lrm(model, folder):
    """model.safetensors (trainable weights) + lrm_config.json (names the backbone); atomic renames."""
    from dataclasses import asdict

    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(model.trainable_state_dict(), folder / "model.safetensors.tmp")
    os.replace(folder / "model.safetensors.tmp", folder / "model.safetensors")
    (folder / "lrm_config.json.tmp").write_text(json.dumps(asdict(model.config), indent=2))
    os.replace(folder / "lrm_config.json.tmp", folder / "lrm_config.json")


def load_lrm(folder, device="cpu", dtype=torch.float32, backbone=None):
    """A saved LatentRewardModel; loads the backbone its config names unless one is given."""
    from safetensors.torch import load_file

    folder = Path(folder)
    if not (folder / "lrm_config.json").is_file() or not (folder / "model.safetensors").is_file():
        raise UserError(f"'{folder}' is not a latent reward model (needs lrm_config.json and model.safetensors)")
    config = LRMConfig(**json.loads((folder / "lrm_config.json").read_text()))
    backbone = backbone or load_backbone(config.backbone, device, dtype)
    model = LatentRewardModel(backbone, config)
    model.load_trainable_state_dict(load_file(folder / "model.safetensors"))
    return model.eval()


def lrm_reward(path, device="cpu", dtype=torch.float32):
    """The reward `lrm:PATH`: noise-ensembled LRM score of the sampler's clean final latents.

    fn(images, prompts, *, refined_prompts=None, answers=None, latents=None) -> (B,) float32 on CPU.
    Scores against the user's prompts; a fixed noise seed per call, so equal latents get equal rewards."""
    device = torch.device(device)
    model = load_lrm(path, device, dtype)
    channels = model.unet.config.in_channels

    def reward(images, prompts, *, refined_prompts=None, answers=None, latents=None):
        if latents is None:
            raise UserError("the lrm reward scores latents: call it with latents= (the sampler's final latents)")
        if latents.shape[1] != channels:
            raise UserError(f"lrm reward: latents have {latents.shape[1]} channels, its backbone '{model.config.backbone}' {channels}")
        generator = torch.Generator().manual_seed(0)
        return model.ensemble_score(latents.to(device, dtype), list(prompts), generator=generator).float().cpu()

    return reward
