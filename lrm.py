"""
lrm.py: the diffusion-native latent reward model (LRM) -- after LPO and DiNa-LRM.

    preference data    Pick-a-Pic v2 pairs (parquet or the hub, streamed) -> decoded images ->
                       VAE latents (encode_latents, batched)
    the math           noise-calibrated Thurstone likelihood (our v(t) and DiNa-LRM's v(sigma)),
                       fidelity loss, Bradley-Terry, accuracy and calibration error (the tests import these)
    noise levels       one timestep index for DDPM and flow-matching backbones, its alpha_bar and sigma
    the model          LatentRewardModel: r(x_t, c, t) from the frozen backbone's own features of a
                       noisy latent (UNet down + mid blocks; the first MMDiT / FLUX joint blocks) + a
                       timestep embedding -> a small head -> scalar
    validation         accuracy per noise bucket, noise ensembling (random or fixed levels) vs one draw
    save / load        model.safetensors + lrm_config.json; the reward `lrm:PATH`
    scorer and critic  search_scorer: the sampler's noisy latents judged at their own noise level
                       (search.py); critic_values: V(x_t) of each refinement on the reward's scale
                       (affine_fit), the per-refinement credit of train_refiner.py

Trained by train_reward.py; scored by evaluate.py --lrm and as the reward `lrm:PATH` (rewards.py).
Left out on purpose: LPO's multi-preference filtering of the data; DiNa-LRM's FiLM adapters and query-attention head
(one pooled-statistics head serves every backbone family), its EMA of the weights.
"""

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image

from common import (
    Backbone,
    UserError,
    backbone_spec,
    image_side,
    is_hub_id,
    load_backbone,
    looks_like_path,
    pack_latents,
    unreadable,
)
from promptloop import encode_prompts
from runs import parquet_split_files, read_tensors

# Pick-a-Pic v2 (Kirstain et al. 2023): a caption, two JPEGs (bytes), label_0/label_1 in
# {1/0, 0/1, 0.5/0.5 = tie}; has_label / are_different flag rows that carry no preference.
PICKAPIC_HUB_ID = "yuvalkirstain/pickapic_v2"
PREFERENCE_COLUMNS = ("caption", "jpg_0", "jpg_1", "label_0")
PREFERENCE_LOSSES = ("thurstone-nll", "thurstone-fidelity", "bradley-terry")
NOISE_VARIANCES = ("fixed", "learned", "dina")  # LatentRewardModel.variance


def preference_data_files(source, split):
    """Local parquet files of one split, or None when `source` is a hub id. A file is used for any
    split; a folder needs the split's files (runs.parquet_split_files)."""
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


# noise levels: one coordinate for both families. The model's noise input is a timestep index
# t = 0..T-1; a table gives its alpha_bar_t (DDPM) and its sigma_t (flow matching) on every backbone.
# A DDPM latent sqrt(abar) x0 + sqrt(1 - abar) eps, divided by sqrt(abar) + sqrt(1 - abar), is the
# flow-matching latent (1 - sigma) x0 + sigma eps with sigma = sqrt(1 - abar) / (sqrt(abar) + sqrt(1 - abar)):
# the same signal-to-noise ratio (1 - sigma)^2 / sigma^2 = abar / (1 - abar). Evaluation buckets are in sigma.
NOISE_BUCKETS = ((0.0, 0.2), (0.2, 0.4), (0.4, 0.6), (0.6, 0.8), (0.8, 1.0))
DINA_LEVELS = (0.2, 0.5, 0.7)  # DiNa-LRM's fixed evaluation noise levels (sigma)


def sigma_from_alpha_bar(alpha_bar):
    """The flow-matching noise level with the same signal-to-noise ratio as DDPM's alpha_bar."""
    a, b = alpha_bar.sqrt(), (1 - alpha_bar).sqrt()
    return b / (a + b)


def alpha_bar_from_sigma(sigma):
    """Inverse of sigma_from_alpha_bar: abar = (1 - sigma)^2 / ((1 - sigma)^2 + sigma^2)."""
    return (1 - sigma) ** 2 / ((1 - sigma) ** 2 + sigma ** 2)


def noise_tables(backbone):
    """(alphas_cumprod, sigmas), float32 (T,) each, of timestep index t = 0..T-1 on this backbone.

    DDPM backbones (SD, SDXL): the scheduler's alpha_bar_t, sigma its equivalent. Flow-matching
    backbones (SD3, FLUX): sigma_t = (t + 1) / T, the scheduler's unshifted training grid (t uniform
    is sigma uniform, as DiNa-LRM trains), alpha_bar its equivalent."""
    scheduler = backbone.pipe.scheduler
    if not backbone.flow_matching:
        alpha_bar = scheduler.alphas_cumprod.float().clone()
        return alpha_bar, sigma_from_alpha_bar(alpha_bar)
    steps = scheduler.config.num_train_timesteps
    sigma = torch.arange(1, steps + 1, dtype=torch.float32) / steps
    return alpha_bar_from_sigma(sigma), sigma


def noisy_latents(latents, noise, alpha_bar):
    """Forward diffusion x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps, abar_t: (B,).

    Written out rather than `scheduler.add_noise`: Euler schedulers (SDXL's default) only accept
    timesteps of their current sampling schedule there, and every SD/SDXL UNet takes this x_t."""
    a = alpha_bar.to(latents.dtype).view(-1, *([1] * (latents.dim() - 1)))
    return a.sqrt() * latents + (1 - a).sqrt() * noise


def flow_noisy_latents(latents, noise, sigma):
    """Flow matching's x_sigma = (1 - sigma) x_0 + sigma eps, sigma: (B,) (what SD3 and FLUX denoise)."""
    s = sigma.to(latents.dtype).view(-1, *([1] * (latents.dim() - 1)))
    return (1 - s) * latents + s * noise


def dina_variance(sigma):
    """DiNa-LRM's Thurstone variance v(sigma) = 2 sigma^2 + 0.05 per item (diffusion_rm/train/engine.py)."""
    return 2 * sigma ** 2 + 0.05


def bucket_timesteps(sigmas, lo, hi):
    """Timestep indices whose sigma lies in [lo, hi) ([lo, hi] for the last bucket, hi = 1)."""
    keep = (sigmas >= lo) & ((sigmas < hi) if hi < 1 else (sigmas <= hi))
    return keep.nonzero().squeeze(1)


def nearest_timestep(sigmas, sigma):
    """The timestep index whose sigma is nearest `sigma` (DiNa-LRM snaps to the scheduler's grid too)."""
    return int((sigmas - sigma).abs().argmin())


# --- the model


@dataclass
class LRMConfig:
    backbone: str  # alias, folder or hub id of the diffusion model the features come from
    hidden: int = 256  # width of the head and of the timestep embedding
    vfe_scale: float = 0.0  # LPO visual feature enhancement f_c + s (f_c - f_u); 0 = off (no uncond pass)
    lora_rank: int = 0  # LoRA on the attention of the blocks that run; 0 = backbone frozen
    variance: str = "fixed"  # Thurstone v: "fixed" / "learned" v0 + kappa (1 - abar_t) (ours); "dina" 2 sigma_t^2 + 0.05
    v0: float = 0.5
    kappa: float = 2.0
    blocks: int = 0  # transformers: joint blocks that run, 0 = the first half (DiNa-LRM: 12 of SD3.5-M's 24)
    ensemble_draws: int = 8  # noise ensembling of clean latents: draws of (t, eps) ...
    ensemble_t_max: int = 400  # ... with t uniform in [0, ensemble_t_max) ...
    ensemble_levels: list = field(default_factory=list)  # ... or at these fixed sigmas, cycled (DiNa-LRM: 0.2 0.5 0.7)


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


def pool_tokens(image, text, rows):
    """A joint block's tokens -> (B, 10 D): the image tokens (B, rows * cols, D) laid back on their
    (rows, cols) grid through pool_feature_map (8 D), and the text tokens' (B, L, D) mean and std (2 D)."""
    b, n, d = image.shape
    grid = image.transpose(1, 2).reshape(b, d, rows, n // rows)
    text = text.float()
    return torch.cat([pool_feature_map(grid), text.mean(1), text.std(1)], 1)


def transformer_taps(blocks):
    """The joint blocks after which features are pooled: thirds of the `blocks` that run (DiNa-LRM:
    after 4, 8 and 12 of 12), 1-based; fewer when `blocks` < 3."""
    return sorted({math.ceil(blocks * k / 3) for k in (1, 2, 3)})


def image_token_ids(rows, cols, device):
    """FLUX's positions of the packed image tokens: (rows * cols, 3) = (0, row, col)."""
    ids = torch.zeros(rows, cols, 3, device=device)
    ids[..., 1] = torch.arange(rows, device=device)[:, None]
    ids[..., 2] = torch.arange(cols, device=device)[None, :]
    return ids.view(-1, 3)


class _StopDenoiser(Exception):
    """Raised by the last feature hook: the rest of the denoiser is not needed (half of it or more)."""


def run_until_stopped(call, hooks):
    """call() until a feature hook raises _StopDenoiser; the hooks are removed whatever happens."""
    try:
        call()
    except _StopDenoiser:
        pass
    finally:
        for hook in hooks:
            hook.remove()


class LatentRewardModel(torch.nn.Module):
    """r(x_t, c, t): a reward on noisy latents from the diffusion backbone's own features.

    x_t (B, C, h, w), prompt c, timestep index t (B,) -> the backbone's denoiser, cut short by
    forward hooks -> pooled features (B, F) -> LayerNorm, + a sinusoidal embedding of t -> MLP -> (B,).
      UNet (SD, SDXL): the down blocks and the mid block run; each one's feature map is pooled
        (channel mean, std, 2x2-grid, centre, ring: pool_feature_map); the up blocks never run.
      MMDiT (SD3) / FLUX: the first `blocks` joint (double-stream) blocks run; after a third, two
        thirds and all of them the image tokens are pooled as a feature map and the text tokens by
        mean and std (pool_tokens). DiNa-LRM puts a FiLM adapter per tapped layer and a 4-query
        attention head on the tokens instead; one pooled-statistics head for every family keeps
        the head out of the comparison between backbones (and the model readable in one screen).
    The backbone is frozen; with lora_rank > 0 a LoRA adapter is added to *this backbone's*
    denoiser (so give the model its own backbone). v(t) is the Thurstone noise variance."""

    def __init__(self, backbone, config):
        from diffusers.models.embeddings import Timesteps

        super().__init__()
        if config.variance not in NOISE_VARIANCES:
            raise UserError(f"unknown variance '{config.variance}': use one of {', '.join(NOISE_VARIANCES)}")
        self.backbone, self.config, self.family, self.flow = backbone, config, backbone.family, backbone.flow_matching
        self.denoiser = backbone.denoiser
        self.denoiser.requires_grad_(False)
        if not self.flow:
            if config.blocks:
                raise UserError(f"blocks {config.blocks}: a UNet backbone runs its down and mid blocks; blocks is for SD3 / FLUX transformers")
            if self.denoiser.mid_block is None:
                raise UserError(f"backbone '{config.backbone}': the latent reward model needs a UNet with a mid block")
            channels = list(self.denoiser.config.block_out_channels)
            feature_dim = 8 * (sum(channels) + channels[-1])  # each down block and the mid block
            lora_target = r".*(down_blocks|mid_block)\..*\.(to_q|to_k|to_v|to_out\.0)"  # the up blocks never run
        else:
            n = len(self.denoiser.transformer_blocks)
            blocks = config.blocks or max(1, n // 2)
            most = n - 1 if self.family == "sd3" else n  # SD3's last joint block updates no text tokens
            if not 1 <= blocks <= most:
                raise UserError(f"blocks {blocks}: backbone '{config.backbone}' has {n} joint blocks, use 1..{most}")
            self.taps = transformer_taps(blocks)
            width = self.denoiser.config.num_attention_heads * self.denoiser.config.attention_head_dim
            feature_dim = 10 * width * len(self.taps)
            run = "|".join(str(i) for i in range(blocks))
            lora_target = rf"transformer_blocks\.({run})\.attn2?\.(to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj|add_v_proj|to_add_out)"
        if config.lora_rank > 0:
            from peft import LoraConfig

            self.denoiser.add_adapter(LoraConfig(r=config.lora_rank, lora_alpha=config.lora_rank, target_modules=lora_target))
        self.feature_norm = torch.nn.LayerNorm(feature_dim)
        self.time_embedding = torch.nn.Sequential(
            Timesteps(config.hidden, flip_sin_to_cos=True, downscale_freq_shift=0), torch.nn.Linear(config.hidden, config.hidden), torch.nn.SiLU()
        )
        # no bias on the output: preferences only see reward differences, so it would get no gradient
        self.head = torch.nn.Sequential(
            torch.nn.Linear(feature_dim + config.hidden, config.hidden), torch.nn.SiLU(),
            torch.nn.Linear(config.hidden, config.hidden), torch.nn.SiLU(), torch.nn.Linear(config.hidden, 1, bias=False),
        )
        alphas_cumprod, sigmas = noise_tables(backbone)
        self.register_buffer("alphas_cumprod", alphas_cumprod, persistent=False)
        self.register_buffer("sigmas", sigmas, persistent=False)
        if config.variance == "learned":
            self.log_v0 = torch.nn.Parameter(torch.tensor(math.log(config.v0)))
            self.log_kappa = torch.nn.Parameter(torch.tensor(math.log(config.kappa)))
        self._uncond = None
        self.to(self.denoiser.device)
        # the head stays fp32 whatever the backbone's dtype
        for module in (self.feature_norm, self.time_embedding, self.head):
            module.float()

    def train(self, mode=True):
        super().train(mode)
        self.denoiser.eval()  # frozen backbone: no dropout even while the head trains
        return self

    @property
    def num_timesteps(self):
        return len(self.alphas_cumprod)

    def add_noise(self, latents, noise, timesteps):
        """The backbone's own forward process at timestep indices (B,): DDPM or flow matching."""
        if self.flow:
            return flow_noisy_latents(latents, noise, self.sigmas[timesteps])
        return noisy_latents(latents, noise, self.alphas_cumprod[timesteps])

    def state_timestep(self, level):
        """The timestep index of a sampler state's noise level (promptloop.RefinedSample.state_levels): a
        DDPM timestep is one already; a flow-matching sigma maps to the nearest index."""
        return nearest_timestep(self.sigmas.cpu(), level) if self.flow else int(level)

    def variance(self, timesteps):
        """v(t): (B,) float32."""
        timesteps = timesteps.long()
        if self.config.variance == "dina":
            return dina_variance(self.sigmas.to(timesteps.device)[timesteps])
        alpha_bar = self.alphas_cumprod.to(timesteps.device)[timesteps]
        if self.config.variance == "learned":
            return noise_variance(alpha_bar, self.log_v0.exp(), self.log_kappa.exp())
        return noise_variance(alpha_bar, self.config.v0, self.config.kappa)

    @torch.no_grad()
    def text_conditioning(self, prompts):
        """The backbone's own encode_prompt: {"prompt_embeds": (B, L, D)} + the pooled embedding (SDXL
        "add_text_embeds", SD3/FLUX "pooled_prompt_embeds"); with vfe_scale, "uncond_"-prefixed copies of ""."""
        out = encode_prompts(self.backbone.pipe, list(prompts), self.backbone.spec.text_length)
        if self.config.vfe_scale:
            if self._uncond is None:
                self._uncond = encode_prompts(self.backbone.pipe, [""], self.backbone.spec.text_length)
            out |= {f"uncond_{k}": v.expand(len(prompts), *v.shape[1:]) for k, v in self._uncond.items()}
        return out

    def _unet_features(self, x_t, timesteps, prompt_embeds, add_text_embeds=None):
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
            raise _StopDenoiser

        unet = self.denoiser
        hooks = [block.register_forward_hook(pool_down_block) for block in unet.down_blocks]
        hooks.append(unet.mid_block.register_forward_hook(stop))
        added = None
        if add_text_embeds is not None:
            # SDXL's micro-conditioning: (original size, crop top-left, target size) = the image size
            side = x_t.shape[-2] * self.backbone.pipe.vae_scale_factor, x_t.shape[-1] * self.backbone.pipe.vae_scale_factor
            time_ids = torch.tensor([[*side, 0, 0, *side]], device=x_t.device, dtype=add_text_embeds.dtype).expand(len(x_t), -1)
            added = {"text_embeds": add_text_embeds, "time_ids": time_ids}
        run_until_stopped(lambda: unet(x_t.to(unet.dtype), timesteps, encoder_hidden_states=prompt_embeds, added_cond_kwargs=added), hooks)
        return torch.cat(pooled, 1)

    def _transformer_features(self, x_t, timesteps, prompt_embeds, pooled_prompt_embeds):
        """(B, F): pool_tokens after each tapped joint block (SD3 MMDiT, FLUX double-stream)."""
        model, (b, _, h, w) = self.denoiser, x_t.shape
        sigma = self.sigmas[timesteps].to(model.dtype)
        pooled = []

        def tap(block, inputs, output):
            text, image = output  # a joint block returns (text tokens, image tokens)
            pooled.append(pool_tokens(image, text, h // 2))  # both patchify 2x2 latent pixels per token
            if len(pooled) == len(self.taps):
                raise _StopDenoiser

        hooks = [model.transformer_blocks[i - 1].register_forward_hook(tap) for i in self.taps]
        x_t = x_t.to(model.dtype)
        if self.family == "sd3":  # SD3 takes the timestep in [0, 1000): sigma * T, as its pipeline does
            kwargs = dict(hidden_states=x_t, timestep=sigma * self.num_timesteps)
        else:  # FLUX takes sigma, packed 2x2 tokens with their positions, and its distilled guidance
            guidance = torch.full((b,), self.backbone.spec.guidance, device=x_t.device) if model.config.guidance_embeds else None
            kwargs = dict(hidden_states=pack_latents(x_t), timestep=sigma, guidance=guidance, img_ids=image_token_ids(h // 2, w // 2, x_t.device),
                          txt_ids=torch.zeros(prompt_embeds.shape[1], 3, device=x_t.device))
        run_until_stopped(lambda: model(encoder_hidden_states=prompt_embeds, pooled_projections=pooled_prompt_embeds, **kwargs), hooks)
        return torch.cat(pooled, 1)

    def features(self, x_t, timesteps, cond):
        """(B, F) pooled backbone features of noisy latents under text conditioning `cond`."""
        if self.flow:
            return self._transformer_features(x_t, timesteps, cond["prompt_embeds"], cond["pooled_prompt_embeds"])
        return self._unet_features(x_t, timesteps, cond["prompt_embeds"], cond.get("add_text_embeds"))

    def forward(self, x_t, timesteps, cond):
        """Rewards (B,) of noisy latents x_t (B, C, h, w) at timestep indices (B,) under text conditioning `cond`."""
        timesteps = timesteps.to(x_t.device).long()
        train_denoiser = self.config.lora_rank > 0 and torch.is_grad_enabled()
        with torch.set_grad_enabled(train_denoiser):
            if self.config.vfe_scale:
                # conditional and unconditional passes batched, as in CFG
                keys = [k for k in cond if not k.startswith("uncond_")]
                both = {k: torch.cat([cond[k], cond[f"uncond_{k}"]]) for k in keys}
                f_cond, f_uncond = self.features(torch.cat([x_t, x_t]), torch.cat([timesteps, timesteps]), both).chunk(2)
                features = f_cond + self.config.vfe_scale * (f_cond - f_uncond)
            else:
                features = self.features(x_t, timesteps, cond)
        h = torch.cat([self.feature_norm(features), self.time_embedding(timesteps).float()], 1)
        return self.head(h).squeeze(-1)

    @torch.no_grad()
    def score(self, x_t, prompts, timesteps):
        """Rewards (B,) of noisy latents x_t at timestep indices (an int or (B,))."""
        timesteps = torch.as_tensor(timesteps, device=x_t.device).long().expand(len(x_t))
        return self(x_t, timesteps, self.text_conditioning(prompts))

    @torch.no_grad()
    def ensemble_score(self, latents, prompts, draws=None, t_max=None, generator=None, levels=None, shared=False):
        """Noise ensembling (DiNa-LRM): mean reward of clean latents (B, C, h, w) over `draws`
        independent noisings (noised_scores). generator: a torch.Generator on CPU."""
        return self.noised_scores(latents, prompts, draws, t_max, generator, levels, shared).mean(0)

    @torch.no_grad()
    def noised_scores(self, latents, prompts, draws=None, t_max=None, generator=None, levels=None, shared=False):
        """The draws of ensemble_score, not yet averaged: (draws, B). Draw d noises with fresh eps at
        t ~ U[0, t_max) ("random draws"), or, when `levels` (sigmas; default the config's) are given,
        at the timestep of sigma = levels[d % len(levels)] ("fixed levels", as DiNa-LRM evaluates).
        shared: every row gets the same draws -- per draw one t and one eps of a single latent's
        shape, broadcast over the batch -- so a row's score is a function of its latent and prompt,
        not of its position or of the batch (scores compared with each other: common random numbers
        take the noise out of their differences); else each row draws its own."""
        draws = draws or self.config.ensemble_draws
        t_max = t_max or self.config.ensemble_t_max
        levels = self.config.ensemble_levels if levels is None else levels
        b = len(latents)
        cond = {k: v.repeat(draws, *[1] * (v.dim() - 1)) for k, v in self.text_conditioning(prompts).items()}
        # all draws in one batched forward (rows ordered draw-major: row d*B + b)
        ts, noises = [], []
        level_timesteps = [nearest_timestep(self.sigmas.cpu(), sigma) for sigma in levels]
        rows = 1 if shared else b  # rows drawn per draw; a shared draw is expanded over the batch
        for d in range(draws):
            if levels:
                ts.append(torch.full((b,), level_timesteps[d % len(levels)]))
            else:
                ts.append(torch.randint(0, t_max, (rows,), generator=generator).expand(b))
            noises.append(torch.randn((rows, *latents.shape[1:]), generator=generator).expand(b, *latents.shape[1:]))
        t = torch.cat(ts).to(latents.device)  # (D*B,)
        noise = torch.cat(noises).to(latents.device, latents.dtype)  # (D*B, C, h, w)
        x_t = self.add_noise(latents.repeat(draws, 1, 1, 1), noise, t)
        return self(x_t, t, cond).view(draws, b)

    def trainable_state_dict(self):
        """Head, timestep embedding, learned variance, LoRA weights: what training changes (no frozen backbone)."""
        return {k: v.detach().clone().contiguous() for k, v in self.state_dict().items() if not k.startswith("denoiser.") or "lora_" in k}

    def load_trainable_state_dict(self, state):
        state = {f"denoiser.{k[5:]}" if k.startswith("unet.") else k: v for k, v in state.items()}  # saved before transformers
        missing, unexpected = self.load_state_dict(state, strict=False)
        missing = [k for k in missing if not k.startswith("denoiser.") or "lora_" in k]
        if missing or unexpected:
            raise UserError(f"latent reward weights do not fit the model: missing {missing[:3]}, unexpected {unexpected[:3]}")


def pair_rewards(model, latents_0, latents_1, noise, timesteps, captions):
    """Rewards (B,), (B,) of both images of each pair noised with the *same* eps and t, in one
    forward (train_reward.py, bench.py). model: a LatentRewardModel or its DDP wrapper."""
    raw = model.module if hasattr(model, "module") else model
    x_t = torch.cat([raw.add_noise(latents_0, noise, timesteps), raw.add_noise(latents_1, noise, timesteps)])
    return model(x_t, torch.cat([timesteps, timesteps]), raw.text_conditioning(captions + captions)).chunk(2)


@torch.no_grad()
def lrm_validation_rewards(model, pair_latents, captions, generator, batch_size=64, device="cpu", dtype=torch.float32, bucket_draws=1,
                           levels=DINA_LEVELS):
    """Rewards of held-out pairs, as the LRM is evaluated (train_reward.py, evaluate.py).

    pair_latents(indices) -> clean latents (latents_0, latents_1) of those pairs, (B, C, h, w) each.
    Returns {"buckets": {(lo, hi): (r_0, r_1, t)}, "draws": (r_0, r_1), "levels": (r_0, r_1)}: per
    noise bucket (sigma in [lo, hi)) both images of a pair noised with the same t (uniform over the
    bucket's timesteps) and eps, as in training, `bucket_draws` times, rewards and t (bucket_draws * N,),
    draw-major (labels.repeat(bucket_draws) matches); and each clean latent scored on its own over the
    model's ensemble draws, (D, N) each, at random t ("draws") and at the fixed sigma `levels` ("levels",
    the same number of draws): a row is a single-draw score, the mean over rows the noise ensemble.
    Those two give the two sides of a pair *different* draws (the generator runs on from side 0 to
    side 1); result["shared"] = {"draws": ..., "levels": ...} scores them again with the *same* (t, eps)
    per draw for both sides of a pair, as candidates are compared in use (final_scores: a GRPO group,
    search's candidates). Different draws add noise to each difference r_0 - r_1 that averaging over
    draws then removes, so they overstate what ensembling gains where draws are shared."""
    n = len(captions)
    batches = [torch.arange(i, min(n, i + batch_size)) for i in range(0, n, batch_size)]
    clean = [pair_latents(idx) for idx in batches]  # once: pair_latents may run the VAE
    result = {"buckets": {}}
    for lo, hi in NOISE_BUCKETS:
        timesteps = bucket_timesteps(model.sigmas.cpu(), lo, hi)
        r_0, r_1, ts = [], [], []
        for idx, latents in list(zip(batches, clean)) * bucket_draws:
            t = timesteps[torch.randint(0, len(timesteps), (len(idx),), generator=generator)]
            noise = torch.randn(latents[0].shape, generator=generator).to(device, dtype)
            x_t = torch.cat([model.add_noise(x.to(device, dtype), noise, t.to(device)) for x in latents])
            r = model.score(x_t, [captions[i] for i in idx] * 2, torch.cat([t, t]).to(device)).float().cpu()
            r_0.append(r[: len(idx)])
            r_1.append(r[len(idx):])
            ts.append(t)
        result["buckets"][(lo, hi)] = (torch.cat(r_0), torch.cat(r_1), torch.cat(ts))
    # "different" first, so that its generator use (and its numbers) are what they were before "shared"
    for shared in (False, True):
        for name, at in (("draws", ()), ("levels", levels)):
            scores = [[], []]
            for idx, pair in zip(batches, clean):
                state = generator.get_state()
                for side, latents in enumerate(pair):
                    if shared:  # side 1 replays side 0's draws: row b of both sides gets the same (t, eps)
                        generator.set_state(state)
                    scores[side].append(model.noised_scores(latents.to(device, dtype), [captions[i] for i in idx], generator=generator,
                                                            levels=at).float().cpu())
            protocol = result.setdefault("shared", {}) if shared else result
            protocol[name] = (torch.cat(scores[0], 1), torch.cat(scores[1], 1))
    return result


def ensemble_accuracies(draws_0, draws_1, labels):
    """(single, ensemble) pairwise accuracy of (D, N) noised scores: the mean accuracy of one draw
    (the expectation, not one lucky or unlucky draw) and the accuracy of the mean over draws."""
    single = sum(pairwise_accuracy(torch.sigmoid(a - b), labels) for a, b in zip(draws_0, draws_1)) / len(draws_0)
    return single, pairwise_accuracy(torch.sigmoid(draws_0.mean(0) - draws_1.mean(0)), labels)


@torch.no_grad()
def preference_accuracy(model, scorers, source, split, limit, seed, device="cpu", dtype=torch.float32, batch_size=16):
    """Share of held-out preference pairs (ties left out) on which a scorer prefers the image people
    preferred (evaluate.py --preference-data). The LRM per noise bucket (sigma): both images of a pair
    noised with the same t (uniform over the bucket) and the same eps, as in training; then
    noise-ensembled on the clean latents (how it is used as a reward), at random t and at DiNa-LRM's
    fixed levels, with different and with shared draws for a pair's two sides (lrm_validation_rewards).
    Each pixel reward of `scorers` ({label: reward fn}, rewards.py) on the same pairs' clean images. source, split: the pairs (Pick-a-Pic v2 schema); limit: how many (0 = all); seed:
    the noise draws. Returns (rows {scorer, bucket, accuracy, n}, counts of rows read / skipped)."""
    pairs = read_pairs(source, split, image_side(model.backbone), limit or None)
    labels, captions = pairs["labels"], pairs["captions"]  # labels: P(image 0 preferred): 1, 0 or 0.5
    pixels = [pairs["pixels_0"], pairs["pixels_1"]]  # uint8
    latents = [encode_latents(model.backbone.pipe.vae, x, batch_size) for x in pixels]
    batches = [slice(i, i + batch_size) for i in range(0, len(labels), batch_size)]
    n = int((labels != 0.5).sum())

    generator = torch.Generator().manual_seed(seed)
    result = lrm_validation_rewards(model, lambda idx: (latents[0][idx], latents[1][idx]), captions, generator,
                                    batch_size, device, dtype)
    rows = [dict(scorer="lrm", bucket=f"σ {lo:.1f}-{hi:.1f}", accuracy=pairwise_accuracy(torch.sigmoid(r_0 - r_1), labels), n=n)
            for (lo, hi), (r_0, r_1, _) in result["buckets"].items()]
    draws = model.config.ensemble_draws
    for name, how in (("draws", f"t ~ U[0, {model.config.ensemble_t_max})"), ("levels", f"σ = {', '.join(map(str, DINA_LEVELS))}")):
        for scores, shared in ((result[name], ""), (result["shared"][name], ", shared by a pair's two sides")):
            single, ensemble = ensemble_accuracies(*scores, labels)
            rows += [dict(scorer=f"lrm, single noise draw at {how}{shared} (mean over draws)", bucket="clean", accuracy=single, n=n),
                     dict(scorer=f"lrm, noise-ensembled ({draws} draws at {how}{shared})", bucket="clean", accuracy=ensemble, n=n)]
    for label, reward in scorers.items():
        scores = [torch.cat([reward(pixels[side][b].float() / 255, captions[b], latents=latents[side][b].to(device, dtype)) for b in batches])
                  for side in (0, 1)]
        keep = torch.isfinite(scores[0]) & torch.isfinite(scores[1])
        accuracy = pairwise_accuracy(torch.sigmoid(scores[0][keep] - scores[1][keep]), labels[keep])
        rows.append(dict(scorer=label, bucket="clean", accuracy=accuracy, n=int((labels[keep] != 0.5).sum())))
    return rows, pairs["counts"]


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


def read_lrm(folder):
    """(LRMConfig, trainable weights) of a saved LatentRewardModel, no backbone loaded: one file
    missing, cut short or garbled is a UserError naming it."""
    folder = Path(folder)
    if not (folder / "lrm_config.json").is_file() or not (folder / "model.safetensors").is_file():
        raise UserError(f"'{folder}' is not a latent reward model (needs lrm_config.json and model.safetensors)")
    what = f"cannot load latent reward model '{folder}'"
    try:
        config = LRMConfig(**json.loads((folder / "lrm_config.json").read_text()))
    except (ValueError, TypeError) as e:  # not JSON, not an object, or fields LRMConfig does not have
        raise UserError(f"{what}: {unreadable(e, folder / 'lrm_config.json')}") from e
    return config, read_tensors(folder / "model.safetensors", what)


def shares_backbone(config, spec):
    """Whether an LRM of `config` can run on the copy of a sampler's backbone of `spec` (a
    common.BackboneSpec) rather than on a second copy of its own (gigabytes for SDXL, SD3, FLUX).
    True for the same model: the same source -- alias, folder or hub id, resolved as
    common.backbone_spec resolves them -- loaded as common.load_backbone loads it by that name alone
    (the caller's part: an aligned UNet, a LoRA or a T5 left out make the sampler's another model).
    False for an LRM with LoRA (lora_rank > 0): LatentRewardModel adds its adapter to the backbone's
    own denoiser, which would change the sampler's images; it needs a copy of its own."""

    def resolved(source):
        return str(Path(source).expanduser().resolve()) if looks_like_path(source) else source

    return config.lora_rank == 0 and resolved(backbone_spec(config.backbone).source) == resolved(spec.source)


def load_lrm(folder, device="cpu", dtype=torch.float32, backbone=None):
    """A saved LatentRewardModel on the backbone its config names, eval mode. backbone: a loaded one
    (the sampler's, as common.load_backbone loads it by its name alone) that the LRM runs on when it
    is the same model, in `dtype` (shares_backbone); else, or without one, the LRM loads its own
    copy. Both files are read before any backbone is loaded (read_lrm)."""
    config, state = read_lrm(folder)
    if backbone is not None and backbone.denoiser.dtype == dtype and shares_backbone(config, backbone.spec):
        # the same pipeline under the LRM's own name and spec (its T5 length, FLUX's guidance): the
        # LRM computes what it computes on its own copy, and freezes the denoiser the sampler only runs
        backbone = Backbone(backbone.pipe, config.backbone, backbone_spec(config.backbone))
    else:
        backbone = load_backbone(config.backbone, device, dtype)
    model = LatentRewardModel(backbone, config)
    model.load_trainable_state_dict(state)
    return model.eval()


def check_channels(model, channels):
    """UserError unless latents of `channels` channels live in the LRM backbone's latent space."""
    if channels != model.backbone.pipe.vae.config.latent_channels:
        raise UserError(f"latent reward model: latents have {channels} channels, its backbone '{model.config.backbone}' "
                        f"{model.backbone.pipe.vae.config.latent_channels}")


def final_scores(model, latents, prompts):
    """The LRM's judgement of clean final latents (B, C, h, w): its noise ensemble, every row with the
    same (t, eps) draws from a generator seeded alike in every call, so a score is a function of the
    latent and prompt alone: equal latents get equal scores wherever they sit in the batch and in
    whichever call (a GRPO group, an image's search candidates, the critic's fit). (B,) float32 on the CPU."""
    check_channels(model, latents.shape[1])
    generator = torch.Generator().manual_seed(0)
    device, dtype = model.denoiser.device, model.denoiser.dtype
    return model.ensemble_score(latents.to(device, dtype), list(prompts), generator=generator, shared=True).float().cpu()


def lrm_reward(path, device="cpu", dtype=torch.float32, backbone=None):
    """The reward `lrm:PATH`: final_scores of the sampler's clean final latents, against the user's prompts.
    backbone: the sampler's, which the LRM runs on when it is its model (load_lrm).

    fn(images, prompts, *, refined_prompts=None, answers=None, latents=None) -> (B,) float32 on CPU;
    fn.lrm_model is the LRM (a sampler of its backbone may run on its copy: evaluate.py)."""
    model = load_lrm(path, torch.device(device), dtype, backbone)

    def reward(images, prompts, *, refined_prompts=None, answers=None, latents=None):
        if latents is None:
            raise UserError("the lrm reward scores latents: call it with latents= (the sampler's final latents)")
        # The LRM trains on t ~ U[0, 1000) so that it can judge the sampler's states at any noise level
        # (search, the critic); a clean final latent has no noise level of its own, so it is noised
        # only to t ~ U[0, ensemble_t_max) (400 by default: sigma < 0.54 on SD1.5's schedule, which
        # `toy` shares; sigma < 0.4 on flow matching), where the LRM is most accurate (docs/RESULTS.md, toy pairs: 0.82 at sigma
        # < 0.4, 0.81 at [0.4, 0.6), 0.79 at [0.6, 0.8), 0.71 at sigma >= 0.8), and the ensemble_draws
        # draws are averaged (noise ensembling, both sides on shared draws: +0.4 points over a single draw
        # at random t on the toy LRM; with different draws per side it looked like +2.4).
        return final_scores(model, latents, prompts)

    reward.lrm_model = model
    return reward


def search_scorer(model, backbone):
    """search.Search's `score` from an LRM: the sampling loop's noisy latents judged at their own noise
    level in one pass (they are noisy already: no decode, no extra noise), the final clean latents
    by final_scores, against the user's prompts. UserError unless the LRM reads `backbone`'s latents
    as its loop holds them (same latent space; DDPM-scaled on a UNet, not Euler's x0 + sigma eps)."""
    if model.flow != backbone.flow_matching:
        raise UserError(f"latent reward model on '{model.config.backbone}' ({'flow matching' if model.flow else 'DDPM'}) "
                        f"cannot judge the latents of backbone '{backbone.name}' ({backbone.family})")
    check_channels(model, backbone.pipe.vae.config.latent_channels)
    if not model.flow and hasattr(backbone.pipe.scheduler, "sigmas"):
        raise UserError(f"an LRM reads DDPM-scaled latents; '{backbone.name}' samples with {type(backbone.pipe.scheduler).__name__} "
                        f"(use DDIM, DDPM, PNDM or LCM)")

    def score(latents, prompts, level):  # final_scores gives every row the same draws: a score is the latent's alone
        if level is None:
            return final_scores(model, latents, prompts)
        return model.score(latents.to(model.denoiser.device, model.denoiser.dtype), list(prompts), model.state_timestep(level)).float().cpu()

    return score


# --- the LRM as a critic (train_refiner.py --credit per-refinement)


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


@torch.no_grad()
def critic_values(critic, trajectories, rewards):
    """V(x_{t_k}) (K, N): the critic (a search_scorer) on the noisy latent of each refinement of the
    trajectories (a promptloop.RefinedSample; one score, the state is noisy already), on the reward's
    scale by one affine fit per refinement index k: R ~ a_k score_k + b_k, least squares of the
    rewards (N,) over the batch. One fit per level because the LRM's scale differs between noise
    levels (e.g. std 1.97 at t = 0, 2.91 at t = 600), and a_k score_k + b_k is then the batch's best
    affine prediction of R from what was known at refinement k; a score that does not predict R
    gets a_k ~ 0, a constant, which takes nothing out of the terminal credit.

    >>> from types import SimpleNamespace
    >>> states = [torch.tensor([[1.0], [2.0], [3.0]]), torch.tensor([[0.0], [5.0], [10.0]])]  # K = 2, N = 3
    >>> rollout = SimpleNamespace(prompts=[["a", "b", "c"]], states=states, state_levels=[600, 200])
    >>> critic_values(lambda x, prompts, level: x.flatten(1).sum(1), rollout, torch.tensor([1.0, 3.0, 5.0]))
    tensor([[1., 3., 5.],
            [1., 3., 5.]])

    (R = 2 score_0 - 1 at level 600 and R = 0.4 score_1 + 1 at level 200: each level its own slope.)"""
    prompts = trajectories.prompts[0]
    values = []
    for x, level in zip(trajectories.states, trajectories.state_levels):
        score = critic(x, prompts, level)  # (N,)
        a, b = affine_fit(score, rewards)
        values.append(a * score + b)
    return torch.stack(values)
