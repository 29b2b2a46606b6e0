"""
build_toy_world.py: builds the offline toy world (toy.py) into toy_world/ -- the project's CartPole.

    python build_toy_world.py                     # full build into toy_world/ (see --help)
    python build_toy_world.py --stages pairs      # rebuild some stages: data, backbones, sd3, measure, pairs, refiner

Stages (each adds its numbers to toy_world/metrics.json):
  data       procedural 32 px images of the toy grammar (toy.py), data.parquet
  backbones  one AutoencoderKL, then an SD1.5-shaped and an SDXL-shaped pipeline trained on the
             data (UNet + text encoders, caption dropout for CFG): toy-sd15/, toy-sdxl/
  sd3        a 16-channel VAE and an SD3-shaped flow-matching pipeline (MMDiT, CLIP-L + CLIP-G + T5)
             trained by rectified flow on the same data: toy-sd3/
  measure    how often samples show the captioned colour / shape / size / background, and the
             toy aesthetic a scripted refiner reaches with and without seeing the preview
  pairs      preference pairs in the Pick-a-Pic v2 parquet schema, images from both backbones,
             labels from a noisy Thurstone model of the toy aesthetic: pickapic-toy/
  refiner    a tiny Qwen2.5-VL supervised on the refinement format: toy-refiner/
The whole build takes about an hour on 2 CPU cores; its artifacts are committed, so nobody needs
to run it to use the toy world.

Left out on purpose: the VAE has no GAN or perceptual loss, the backbones share one VAE, and
the networks are a few MB -- enough to follow the grammar, not to be pretty.
"""

import io
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

import common
import lrm
import promptloop
import refiners
import runs
import toy
from toy import TOY_COLOURS, TOY_SHAPES, TOY_SIZES, TOY_WORDS, toy_caption


@dataclass
class ToyConfig:
    out: str = field(default="toy_world", metadata={"help": "folder that receives the toy world"})
    seed: int = field(default=0, metadata={"help": "seed of everything: data, weights, pairs, labels"})
    stages: str = field(default="data,backbones,sd3,pairs,refiner",
                        metadata={"help": "comma-separated stages to build: data, backbones, sd3, pairs, refiner; "
                                          "'measure' re-measures saved backbones"})
    threads: int = field(default=1, metadata={"help": "torch CPU threads per process (1 is fastest on a busy 2-core machine)"})
    parallel: bool = field(default=True, metadata={"help": "train the two backbones in two processes at once "
                                                             "(--no-parallel: one after the other)"})
    image_size: int = field(default=32, metadata={"help": "side of the toy images in pixels"})
    dataset_size: int = field(default=4000, metadata={"help": "procedural images the backbones are trained on"})
    vae_steps: int = field(default=600, metadata={"help": "VAE training steps (one VAE, shared by both backbones)"})
    unet_steps: int = field(default=3000, metadata={"help": "UNet + text encoder training steps per backbone"})
    refiner_steps: int = field(default=1800, metadata={"help": "supervised training steps of the toy refiner"})
    batch_size: int = field(default=32, metadata={"help": "training batch size"})
    lr: float = field(default=1.5e-3, metadata={"help": "peak learning rate (one-cycle schedule)"})
    caption_dropout: float = field(default=0.1, metadata={"help": "caption dropout, so that CFG works"})
    background_settles: int = field(default=700, metadata={
        "help": "training timestep below which the captions' background words are made uninformative: "
                "the background is fixed by the noisy latent from then on, as a real model's layout is (0 = off)"})
    sample_steps: int = field(default=20, metadata={"help": "default sampling steps written to promptloop.json"})
    guidance: float = field(default=4.0, metadata={"help": "default CFG scale written to promptloop.json"})
    eval_samples: int = field(default=60, metadata={"help": "samples per backbone to measure prompt following"})
    pairs_train: int = field(default=4000, metadata={"help": "preference pairs in the train split"})
    pairs_validation: int = field(default=1000, metadata={"help": "preference pairs in the validation split"})
    pairs_test: int = field(default=1000, metadata={"help": "preference pairs in the test split"})
    images_per_prompt: int = field(default=4, metadata={"help": "images per caption; pairs are drawn among them"})
    pair_steps: int = field(default=10, metadata={"help": "sampling steps for the pair images"})
    label_noise: float = field(default=0.05, metadata={"help": "Thurstone noise: std of each image's perceived aesthetic"})
    tie_margin: float = field(default=0.01, metadata={"help": "perceived aesthetic gap below which a pair is a tie"})

# -----------------------------------------------------------------------------
# toy backbones: train the tiny SD1.5- and SDXL-shaped pipelines on the toy data set


def train_toy_vae(vae, images, steps, batch_size=32, lr=2e-3, kl_weight=1e-6, seed=0, log=print):
    """Fit the AutoencoderKL to the toy images (MSE + a tiny KL, as the SD VAEs are trained, minus
    the GAN and perceptual terms a 32 px world does not need), then set its `scaling_factor` so
    scaled latents have unit variance (SD1.5: 0.18215, SDXL: 0.13025 -- same idea), and for a
    VAE with a `shift_factor` (SD3/FLUX) that shift so they have zero mean."""
    generator = torch.Generator().manual_seed(seed)
    x = images * 2 - 1  # the VAE works in [-1, 1]
    # The encoder's last conv emits (mean, log-variance). Start the log-variance at -8 (std 0.02):
    # with the default start (std ~1) the decoder first sees mostly noise and a few hundred CPU
    # steps are not enough to learn it away; trained SD VAEs have near-deterministic posteriors.
    with torch.no_grad():
        half = vae.encoder.conv_out.out_channels // 2
        vae.encoder.conv_out.weight[half:].zero_()
        vae.encoder.conv_out.bias[half:].fill_(-8.0)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=lr)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, lr, total_steps=steps, pct_start=0.1)
    vae.train()
    for step in range(steps):
        batch = x[torch.randint(0, len(x), (batch_size,), generator=generator)]
        posterior = vae.encode(batch).latent_dist
        reconstruction = vae.decode(posterior.sample(generator)).sample
        loss = F.mse_loss(reconstruction, batch) + kl_weight * posterior.kl().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        if step % 100 == 0 or step == steps - 1:
            log(f"vae step {step:05d}/{steps} | loss {loss.item():.4f}")
    vae.eval()
    with torch.no_grad():
        latents = torch.cat([vae.encode(chunk).latent_dist.mode() for chunk in x.split(256)])
    if getattr(vae.config, "shift_factor", None) is not None:  # SD3/FLUX VAEs: (z - shift) * scale
        vae.register_to_config(shift_factor=float(latents.mean()))
    vae.register_to_config(scaling_factor=float(1.0 / latents.std()))
    return vae


def text_conditioning(pipe, captions, drop):
    """UNet conditioning for training, computed exactly as the pipeline computes it at sampling
    (its own `encode_prompt`, with gradients into the text encoders).

    drop: (B,) bool, caption dropout for classifier-free guidance. The dropped rows get what the
    pipeline uses as the unconditional input: SD1.5 encodes the empty prompt; SDXL
    (force_zeros_for_empty_prompt) uses zero embeddings and a zero pooled embedding.
    Returns kwargs for the UNet: encoder_hidden_states (B, L, D) [+ added_cond_kwargs]."""
    is_sdxl = common.pipeline_family(pipe) == "sdxl"
    if not is_sdxl:
        captions = ["" if d else c for c, d in zip(captions, drop.tolist())]
    embeds = promptloop.encode_prompts(pipe, captions)
    hidden = embeds["prompt_embeds"]
    if not is_sdxl:
        return dict(encoder_hidden_states=hidden)
    keep = (~drop).float()
    pooled = embeds["add_text_embeds"] * keep[:, None]
    hidden = hidden * keep[:, None, None]
    side = pipe.unet.config.sample_size * pipe.vae_scale_factor
    # SDXL's micro-conditioning: (original h, w, crop top, left, target h, w), as the pipeline passes
    time_ids = torch.tensor([side, side, 0, 0, side, side], dtype=hidden.dtype).repeat(len(captions), 1)
    return dict(encoder_hidden_states=hidden, added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids})


def min_snr_weights(alpha_bar, gamma=5.0):
    """Min-SNR-gamma loss weights for epsilon prediction (Hang et al., 2023): min(SNR, gamma) / SNR
    with SNR = alpha_bar / (1 - alpha_bar). Low-noise steps stop dominating; converges ~3x faster."""
    snr = alpha_bar / (1 - alpha_bar)
    return snr.clamp(max=gamma) / snr


def uninformative_background(caption, generator):
    """The caption with its background phrase dropped or naming a random colour (1/2 each):
    a background phrase that says nothing about the image."""
    named = toy.parse_toy_prompt(caption)
    named.pop("background", None)
    if torch.rand((), generator=generator) < 0.5:
        named["background"] = list(TOY_COLOURS)[int(torch.randint(len(TOY_COLOURS), (), generator=generator))]
    return toy_caption(**named)


def train_toy_backbone(pipe, images, captions, steps, batch_size=32, lr=1e-3, caption_dropout=0.1, seed=0,
                       log=print, name="backbone", min_snr_gamma=5.0, background_settles=0):
    """Denoising score matching on the VAE latents (epsilon prediction, the pipeline's own
    scheduler and its training noise schedule, min-SNR weighting); UNet and text encoder(s) are
    trained together (they start from random weights). The VAE is frozen, its latents encoded once.

    background_settles: at training timesteps t below it the captions' background phrase is made
    uninformative (dropped or a random colour), so the UNet learns to read the background from x_t
    there and to ignore what the prompt says about it. At sampling, the background
    is then decided in the first steps (t >= background_settles) and a later prompt cannot repaint
    it, while the shape's colour and size stay open a few steps longer -- the order in which a
    real model settles layout before detail, made explicit. That is what makes the preview worth
    looking at: a refiner that sees the emerging background can pick a shape colour to match."""
    generator = torch.Generator().manual_seed(seed)
    vae, unet, noise_schedule = pipe.vae, pipe.unet, pipe.scheduler
    with torch.no_grad():
        latents = lrm.encode_latents(vae, images * 2 - 1, batch_size=256)  # (N, 4, h, w), unit variance
    text_encoders = [m for m in (pipe.text_encoder, getattr(pipe, "text_encoder_2", None)) if m is not None]
    alphas_cumprod = noise_schedule.alphas_cumprod

    def batch_loss():
        index = torch.randint(0, len(latents), (batch_size,), generator=generator)
        x0 = latents[index]
        noise = torch.randn(x0.shape, generator=generator)
        t = torch.randint(0, noise_schedule.config.num_train_timesteps, (batch_size,), generator=generator)
        a = alphas_cumprod[t].view(-1, 1, 1, 1)
        noisy = a.sqrt() * x0 + (1 - a).sqrt() * noise  # q(x_t | x_0)
        drop = torch.rand(batch_size, generator=generator) < caption_dropout
        batch_captions = [uninformative_background(captions[i], generator) if step_t < background_settles
                          else captions[i] for i, step_t in zip(index.tolist(), t.tolist())]
        conditioning = text_conditioning(pipe, batch_captions, drop)
        prediction = unet(noisy, t, **conditioning).sample
        return (min_snr_weights(a.flatten(), min_snr_gamma) * ((prediction - noise) ** 2).mean((1, 2, 3))).mean()

    fit([unet, *text_encoders], batch_loss, steps, lr, log, name)
    return pipe


def fit(modules, batch_loss, steps, lr, log, name):
    """Train `modules` together: AdamW (weight decay 0.01), one-cycle learning rate, gradients
    clipped to norm 1; batch_loss() draws a batch and returns its loss. Leaves them in eval mode."""
    params = [p for m in modules for p in m.parameters()]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, lr, total_steps=steps, pct_start=0.05)
    for module in modules:
        module.train()
    running = None
    for step in range(steps):
        loss = batch_loss()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        scheduler.step()
        running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
        if step % 100 == 0 or step == steps - 1:
            log(f"{name} step {step:05d}/{steps} | loss {running:.4f}")
    for module in modules:
        module.eval()


def shift_sigma(sigma, shift):
    """SD3's timestep shift (Esser et al., 2024, eq. 23): sigma -> shift * sigma / (1 + (shift - 1) * sigma),
    which divides the signal-to-noise ratio by shift^2. FlowMatchEulerDiscreteScheduler(shift=...) samples
    on it; the same shift applied in training puts the training noise levels where sampling spends its steps."""
    return shift * sigma / (1 + (shift - 1) * sigma)


def settle_sigma(timestep, noise_schedule, dimension_ratio=1.0):
    """The flow-matching noise level sigma with the signal-to-noise ratio of DDPM timestep `timestep`:
    x_t = (1 - sigma) x0 + sigma * noise has SNR ((1 - sigma) / sigma)^2, DDPM alpha_bar / (1 - alpha_bar).
    dimension_ratio: latent dimensions of the flow backbone over the DDPM one's. An image is about as
    recognisable when the SNR per dimension times the dimensions is the same (the argument behind SD3's
    resolution-dependent shift sqrt(m / n)), so the level is shifted by sqrt(dimension_ratio)."""
    alpha_bar = float(noise_schedule.alphas_cumprod[timestep])
    return shift_sigma(1.0 / (1.0 + math.sqrt(alpha_bar / (1.0 - alpha_bar))), math.sqrt(dimension_ratio))


def train_toy_flow_backbone(pipe, images, captions, steps, batch_size=32, lr=1e-3, caption_dropout=0.1, seed=0,
                            log=print, name="toy-sd3", text_length=16, background_sigma=0.0):
    """Rectified-flow training of an SD3-shaped pipeline (Esser et al., 2024): x_t = (1 - sigma) x0
    + sigma * noise with sigma ~ logit-normal(0, 1) shifted by the pipeline's scheduler shift (as
    SD3 trains at high resolution), the transformer predicts the velocity noise - x0 (MSE), at
    timestep 1000 * sigma as the pipeline feeds it. Transformer and the three
    text encoders train together; the VAE is frozen. Dropped captions become "" -- what SD3's
    pipeline encodes as the CFG negative. background_sigma: below it the caption's background
    phrase is uninformative (as background_settles in train_toy_backbone)."""
    generator = torch.Generator().manual_seed(seed)
    vae, transformer = pipe.vae, pipe.transformer
    with torch.no_grad():
        latents = lrm.encode_latents(vae, images * 2 - 1, batch_size=256)  # (N, 16, h, w), zero mean, unit variance
    shift = pipe.scheduler.config.shift

    def batch_loss():
        index = torch.randint(0, len(latents), (batch_size,), generator=generator)
        x0 = latents[index]
        noise = torch.randn(x0.shape, generator=generator)
        sigma = shift_sigma(torch.sigmoid(torch.randn(batch_size, generator=generator)), shift)  # logit-normal(0, 1), shifted
        s = sigma.view(-1, 1, 1, 1)
        noisy = (1 - s) * x0 + s * noise
        drop = torch.rand(batch_size, generator=generator) < caption_dropout
        batch_captions = ["" if d else uninformative_background(captions[i], generator) if sig < background_sigma else captions[i]
                          for i, sig, d in zip(index.tolist(), sigma.tolist(), drop.tolist())]
        text = promptloop.encode_prompts(pipe, batch_captions, text_length)
        prediction = transformer(hidden_states=noisy, timestep=sigma * 1000, encoder_hidden_states=text["prompt_embeds"],
                                 pooled_projections=text["pooled_prompt_embeds"], return_dict=False)[0]
        return F.mse_loss(prediction, noise - x0)

    fit([transformer, pipe.text_encoder, pipe.text_encoder_2, pipe.text_encoder_3], batch_loss, steps, lr, log, name)
    return pipe


def prompt_following(backbone, n=60, seed=0, num_steps=None, guidance=None, batch_size=60):
    """How often samples of full captions show the named colour / shape / size / background,
    as judged by the toy faithfulness check (toy.toy_analyze). Returns a dict of rates."""
    import random

    rng = random.Random(seed)
    prompts = [toy_caption(**toy.sample_toy_attributes(rng)) for _ in range(n)]
    found = []
    for start in range(0, n, batch_size):
        chunk = prompts[start:start + batch_size]
        generator = torch.Generator().manual_seed(seed + start)
        images = promptloop.refined_sample(backbone, chunk, num_steps=num_steps, guidance=guidance,
                                       generator=generator).images
        found += toy.toy_analyze(images)
    rates = {}
    for key in ("colour", "shape", "size", "background"):
        rates[key] = sum(f[key] == toy.parse_toy_prompt(p)[key] for f, p in zip(found, prompts)) / n
    return rates


class ScriptedRefiner:
    """A rule-based refiner (no model) for measuring what the toy world rewards.

    Keeps the user's size and background, adds "large" when the size is free, and picks the
    shape colour with the most contrast -- overriding the user's colour, as a policy trained on
    the aesthetic alone learns to (faithful=True: only where the user left the colour free, the
    best a policy can do without hacking): sees_preview=True against the background the preview
    shows (and names it); sees_preview=False on average over the backgrounds it could meet (the
    best a blind policy can do once the background is settled)."""

    def __init__(self, sees_preview, faithful=False):
        self.sees_preview, self.faithful = sees_preview, faithful

    @staticmethod
    def best_shape_colour(backgrounds):
        """The shape colour with the highest mean contrast over `backgrounds` (a colour never meets itself)."""
        best, best_contrast = None, -1.0
        for colour, rgb in TOY_COLOURS.items():
            against = [TOY_COLOURS[b] for b in backgrounds if b != colour]
            if against:
                contrast = float(toy.toy_contrast(torch.tensor(rgb), torch.tensor(against)).mean())
                if contrast > best_contrast:
                    best, best_contrast = colour, contrast
        return best

    def refine(self, previews, user_prompts, current_prompts, step, num_steps):
        seen = [r["background"] for r in toy.toy_analyze(previews)]
        prompts = []
        for user, background in zip(user_prompts, seen):
            named = toy.parse_toy_prompt(user)
            if "background" in named:
                candidates = [named["background"]]
            elif self.sees_preview:
                candidates = [background]
                named["background"] = background
            else:
                candidates = list(TOY_COLOURS)
            if not (self.faithful and "colour" in named):
                named["colour"] = self.best_shape_colour(candidates)
            named.setdefault("size", "large")
            prompts.append(toy_caption(**named))
        return refiners.RefinerOutput.from_prompts(prompts)


def preview_feedback_gain(backbone, n=48, seed=0, refine_steps=2, others=()):
    """Mean toy aesthetic (and faithfulness) of user prompts that leave the background free: plain,
    blind scripted refiner, seeing scripted refiner, the seeing one that keeps the user's colour,
    then each (name, refiner) of `others` (same initial noise for all). Shows how much latent feedback can be worth, and how far a refiner is
    from it."""
    prompts = toy.toy_prompts("test", n=n, seed=seed, kind="open")
    result = {}
    arms = (("plain", None), ("blind", ScriptedRefiner(False)), ("seeing", ScriptedRefiner(True)),
            ("oracle", ScriptedRefiner(True, faithful=True)), *others)
    for name, refiner in arms:
        generator = torch.Generator().manual_seed(seed)
        sample = promptloop.refined_sample(backbone, prompts, refiner=refiner, refine_steps=refine_steps, generator=generator)
        result[name] = round(float(toy.toy_aesthetic(sample.images).mean()), 4)
        result[name + "_faithful"] = round(float(toy.toy_faithfulness(sample.images, prompts).mean()), 4)
    return result


TOY_UNET_BLOCKS = dict(down_block_types=("CrossAttnDownBlock2D",) * 2, up_block_types=("CrossAttnUpBlock2D",) * 2,
                       layers_per_block=1)
TOY_ARCHITECTURE = dict(image_size=32, unet_blocks=TOY_UNET_BLOCKS, unet_channels=(32, 64), unet_norm_groups=8,
                        vae_channels=(16, 32, 32), vae_norm_groups=2, vae_layers=1)
# The trained toy backbones (committed) are narrower and shallower than the real models: two UNet
# levels of one layer, cross-attention at both, which bind the attributes to the shape better on a
# few CPU minutes of training; a VAE of 3 levels: 32 px -> 8x8 latents (SD's VAE downsamples 8x;
# 4x here); 2 GroupNorm groups keep colour information that an instance norm would remove


# toy-sd3: SD3.5-Medium's layout (MMDiT-X blocks then plain ones, qk-norm, CLIP-L + CLIP-G + T5),
# 64 wide; its own 16-channel VAE (the toy VAE's levels: 32 px -> 8x8 latents, 4x4 patches of 2x2);
# SD3's sampling shift 3. Its latents have 4x the dimensions of the UNet toys' (16 x 8 x 8 vs 4 x 8 x 8),
# so the same picture emerges at a 4x lower SNR per dimension: a shift of sqrt(4) = 2 over the UNet
# toys' DDIM schedule in SNR terms, and shift 3 lies close to that (sigma at step 7 of 20: 0.838 vs
# 0.821). The background settles at --background-settles moved by the same factor (settle_sigma).
# T5 reads 16 tokens (toy captions have at most 9).
TOY_SD3_ARCHITECTURE = dict(image_size=32, transformer=toy.SD35M_TRANSFORMER, heads=4, head_dim=16, clip_hidden=(32, 32),
                            t5_hidden=64, vae_channels=(16, 32, 32), vae_norm_groups=2, vae_layers=1, shift=3.0)
TOY_SD3_TEXT_LENGTH = 16


def build_toy_sd3(config, out, log=print):
    """The flow-matching toy backbone: a 16-channel VAE, then an SD3-shaped pipeline trained by
    rectified flow on the same data, its background settling at the UNet toys' noise level
    (settle_sigma of --background-settles); saved as toy-sd3/ + promptloop.json."""
    images, captions, _ = toy.toy_dataset(config.dataset_size, seed=config.seed, image_size=config.image_size)
    pipe = toy.tiny_sd3_pipeline(TOY_WORDS, seed=config.seed + 2, **dict(TOY_SD3_ARCHITECTURE, image_size=config.image_size))
    metrics = {}
    start = time.time()
    train_toy_vae(pipe.vae, images, config.vae_steps, config.batch_size, lr=3e-3, seed=config.seed, log=log)
    metrics["vae_seconds"] = round(time.time() - start, 1)
    # the UNet toys' latents: 4 channels at the same 8x8
    sigma = settle_sigma(config.background_settles, toy._scheduler(), dimension_ratio=16 / 4) if config.background_settles else 0.0
    start = time.time()
    train_toy_flow_backbone(pipe, images, captions, config.unet_steps, config.batch_size, config.lr, config.caption_dropout,
                            seed=config.seed, log=log, text_length=TOY_SD3_TEXT_LENGTH, background_sigma=sigma)
    metrics["train_seconds"] = round(time.time() - start, 1)
    metrics["background_sigma"] = round(sigma, 4)
    folder = out / "toy-sd3"
    pipe.save_pretrained(folder)
    defaults = dict(steps=config.sample_steps, guidance=config.guidance, size=config.image_size, text_length=TOY_SD3_TEXT_LENGTH)
    (folder / "promptloop.json").write_text(json.dumps(defaults, indent=1) + "\n")
    log(f"toy-sd3: trained in {metrics['train_seconds']}s -> {folder}")
    metrics.update(measure_toy_backbones(config, out, log, names=("toy-sd3",))["toy-sd3"])
    return metrics


def train_and_save_backbone(name, config, out, vae_state, vae_scaling, log=print):
    """Train one toy backbone (`toy-sd15` or `toy-sdxl`) on the shared trained VAE; save its
    diffusers folder + promptloop.json. Runs in a worker process of build_toy_backbones."""
    torch.set_num_threads(max(1, config.threads))
    images, captions, _ = toy.toy_dataset(config.dataset_size, seed=config.seed, image_size=config.image_size)
    build, seed = (toy.tiny_sd15_pipeline, config.seed) if name == "toy-sd15" else (toy.tiny_sdxl_pipeline, config.seed + 1)
    pipe = build(TOY_WORDS, seed=seed, **dict(TOY_ARCHITECTURE, image_size=config.image_size))
    pipe.vae.load_state_dict(vae_state)  # one latent space for both backbones
    pipe.vae.register_to_config(scaling_factor=vae_scaling)
    start = time.time()
    train_toy_backbone(pipe, images, captions, config.unet_steps, config.batch_size, config.lr, config.caption_dropout,
                       seed=config.seed, log=log, name=name, background_settles=config.background_settles)
    folder = out / name
    pipe.save_pretrained(folder)
    defaults = dict(steps=config.sample_steps, guidance=config.guidance, size=config.image_size)
    (folder / "promptloop.json").write_text(json.dumps(defaults, indent=1) + "\n")
    seconds = round(time.time() - start, 1)
    log(f"{name}: trained in {seconds}s -> {folder}")
    return seconds


def build_toy_backbones(config, out, log=print):
    """Train one VAE, then the SD1.5- and SDXL-shaped pipelines on it (in two processes at once
    with --parallel); save diffusers folders `toy-sd15/` and `toy-sdxl/` (+ promptloop.json with
    their sampling defaults). The two backbones share the VAE (one latent space), but have their
    own text encoders and UNets."""
    from concurrent.futures import ProcessPoolExecutor
    from functools import partial
    from multiprocessing import get_context

    metrics = {}
    images, _, _ = toy.toy_dataset(config.dataset_size, seed=config.seed, image_size=config.image_size)
    vae = toy._tiny_vae(config.seed, TOY_ARCHITECTURE["vae_channels"], TOY_ARCHITECTURE["vae_norm_groups"], TOY_ARCHITECTURE["vae_layers"])
    start = time.time()
    train_toy_vae(vae, images, config.vae_steps, config.batch_size, lr=3e-3, seed=config.seed, log=log)
    metrics["vae_seconds"] = round(time.time() - start, 1)
    train = partial(train_and_save_backbone, config=config, out=out, vae_state=vae.state_dict(),
                    vae_scaling=vae.config.scaling_factor)
    names = ("toy-sd15", "toy-sdxl")
    if config.parallel:  # worker logs go to stdout (print), the only log a worker can reach
        with ProcessPoolExecutor(len(names), mp_context=get_context("spawn")) as pool:
            seconds = list(pool.map(train, names))
    else:
        seconds = [train(name, log=log) for name in names]
    for name, s in zip(names, seconds):
        metrics[name] = dict(train_seconds=s)
    for name, measured in measure_toy_backbones(config, out, log, names).items():
        metrics[name].update(measured)
    return metrics


def measure_toy_backbones(config, out, log=print, names=("toy-sd15", "toy-sdxl", "toy-sd3")):
    """Prompt following and the scripted-refiner aesthetic of the saved toy backbones."""
    metrics = {}
    for name in names:
        if not (out / name).is_dir():
            log(f"{name}: not built, not measured")
            continue
        backbone = common.load_backbone(str(out / name))
        rates = prompt_following(backbone, config.eval_samples, seed=config.seed + 7)
        log(f"{name}: samples match colour {rates['colour']:.0%} shape {rates['shape']:.0%} "
            f"size {rates['size']:.0%} background {rates['background']:.0%} "
            f"({config.eval_samples} full captions)")
        gain = preview_feedback_gain(backbone, config.eval_samples, seed=config.seed + 8)
        log(f"{name}: toy aesthetic, prompts that leave the background free | plain {gain['plain']:.3f} | blind scripted refiner "
            f"{gain['blind']:.3f} | seeing scripted refiner {gain['seeing']:.3f}")
        metrics[name] = dict(prompt_following=rates, preview_feedback=gain)
    return metrics


# -----------------------------------------------------------------------------
# toy preference pairs in the Pick-a-Pic v2 schema, labelled by a noisy Thurstone model


def thurstone_labels(scores_0, scores_1, noise, tie_margin, generator):
    """Noisy preference labels from true scores (N,), (N,) -> label_0 (N,) in {0, 0.5, 1}.

    Thurstone case V: each annotator perceives s + noise * N(0, 1) for each image and prefers
    the higher one, P(0 > 1) = Phi((s0 - s1) / (noise * sqrt(2))); perceived gaps below
    `tie_margin` are ties (Pick-a-Pic's label_0 = label_1 = 0.5)."""
    perceived_0 = scores_0 + noise * torch.randn(scores_0.shape, generator=generator)
    perceived_1 = scores_1 + noise * torch.randn(scores_1.shape, generator=generator)
    gap = perceived_0 - perceived_1
    label_0 = (gap > 0).float()
    label_0[gap.abs() < tie_margin] = 0.5
    return label_0


def noise_ceiling(scores_0, scores_1, label_0):
    """Agreement of the *true* score order with the noisy labels, on pairs with a strict label
    and distinct true scores: the accuracy a perfect reward model would reach."""
    strict = (label_0 != 0.5) & (scores_0 != scores_1)
    return ((scores_0 > scores_1).float() == label_0)[strict].float().mean().item()


def _jpeg(image):
    buffer = io.BytesIO()
    common.to_pil(image[None])[0].save(buffer, format="JPEG", quality=95)
    return buffer.getvalue()


def _unjpeg(data):
    """JPEG bytes -> (3, H, W) in [0, 1]."""
    import numpy as np
    from PIL import Image

    return torch.from_numpy(np.array(Image.open(io.BytesIO(data)).convert("RGB"))).permute(2, 0, 1).float() / 255


def toy_pairs(backbones, n_pairs, config, seed, split, log=print):
    """Rows of Pick-a-Pic v2 (one dict per pair) and the true scores (N,), (N,).

    As in Pick-a-Pic, several images are generated per caption (by different models) and pairs
    are drawn among them; `num_example_per_prompt` counts the pairs of that caption."""
    import random
    import uuid
    from datetime import datetime, timedelta

    rng = random.Random(seed)
    generator = torch.Generator().manual_seed(seed)
    pairs_per_prompt = max(1, config.images_per_prompt * (config.images_per_prompt - 1) // 4)  # half of all pairs
    n_prompts = math.ceil(n_pairs / pairs_per_prompt)
    # captions: user prompts of the grammar, mostly partial (those leave room for taste)
    captions = [toy_caption(**toy.partial_attributes(toy.sample_toy_attributes(rng), rng, 0.4)) for _ in range(n_prompts)]
    names = list(backbones)
    model_of = [[names[j % len(names)] for j in range(config.images_per_prompt)] for _ in captions]
    side = common.image_side(next(iter(backbones.values())))  # the backbones' own size, whatever --image-size says now
    images = torch.zeros(n_prompts, config.images_per_prompt, 3, side, side)
    for name in names:  # one batched pipeline call per backbone and chunk
        slots = [(i, j) for i in range(n_prompts) for j in range(config.images_per_prompt) if model_of[i][j] == name]
        for start in range(0, len(slots), 128):
            chunk = slots[start:start + 128]
            sample = promptloop.refined_sample(backbones[name], [captions[i] for i, _ in chunk],
                                           num_steps=config.pair_steps, generator=generator)
            for (i, j), image in zip(chunk, sample.images):
                images[i, j] = image
        log(f"{split}: {len(slots)} images from {name}")
    uids = [[str(uuid.UUID(int=rng.getrandbits(128), version=4)) for _ in range(config.images_per_prompt)] for _ in captions]
    jpegs = [[_jpeg(images[i, j]) for j in range(config.images_per_prompt)] for i in range(n_prompts)]
    # the annotators judge the images as stored (JPEG), so the labels' noise ceiling is one a model
    # of the stored data can reach (scoring the pixels before compression costs ~1 point of it)
    stored = torch.stack([_unjpeg(jpeg) for row in jpegs for jpeg in row])
    scores = toy.toy_aesthetic(stored).view(n_prompts, config.images_per_prompt)
    index_pairs = [(a, b) for a in range(config.images_per_prompt) for b in range(a + 1, config.images_per_prompt)]
    rows, s0, s1 = [], [], []
    start_time = datetime(2023, 4, 1)
    for i, caption in enumerate(captions):
        for a, b in rng.sample(index_pairs, pairs_per_prompt):
            if rng.random() < 0.5:
                a, b = b, a
            rows.append(dict(
                are_different=True, caption=caption, created_at=start_time + timedelta(seconds=rng.randrange(10**7)),
                has_label=True, image_0_uid=uids[i][a], image_0_url="", image_1_uid=uids[i][b], image_1_url="",
                jpg_0=jpegs[i][a], jpg_1=jpegs[i][b], model_0=model_of[i][a], model_1=model_of[i][b],
                num_example_per_prompt=pairs_per_prompt, ranking_id=len(rows) + seed * 10**6,
                user_id=rng.randrange(1, 200),
                toy_aesthetic_0=float(scores[i, a]), toy_aesthetic_1=float(scores[i, b]),
            ))
            s0.append(float(scores[i, a]))
            s1.append(float(scores[i, b]))
    rows, s0, s1 = rows[:n_pairs], torch.tensor(s0[:n_pairs]), torch.tensor(s1[:n_pairs])
    label_0 = thurstone_labels(s0, s1, config.label_noise, config.tie_margin, generator)
    for row, label in zip(rows, label_0.tolist()):
        row.update(label_0=label, label_1=1.0 - label,
                   best_image_uid="" if label == 0.5 else (row["image_0_uid"] if label == 1 else row["image_1_uid"]))
    return rows, s0, s1, label_0


PICKAPIC_COLUMNS = [  # the Pick-a-Pic v2 parquet columns, in its order; toy_aesthetic_* are extra
    "are_different", "best_image_uid", "caption", "created_at", "has_label", "image_0_uid", "image_0_url",
    "image_1_uid", "image_1_url", "jpg_0", "jpg_1", "label_0", "label_1", "model_0", "model_1",
    "ranking_id", "user_id", "num_example_per_prompt", "toy_aesthetic_0", "toy_aesthetic_1",
]


def build_toy_pairs(config, out, log=print):
    """Write pickapic-toy/{train,validation,test}.parquet from the saved toy backbones."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    backbones = {name: common.load_backbone(str(out / name)) for name in ("toy-sd15", "toy-sdxl")}
    folder = out / "pickapic-toy"
    folder.mkdir(parents=True, exist_ok=True)
    metrics = {}
    sizes = {"train": config.pairs_train, "validation": config.pairs_validation, "test": config.pairs_test}
    for k, (split, n) in enumerate(sizes.items()):
        rows, s0, s1, label_0 = toy_pairs(backbones, n, config, config.seed + 100 + k, split, log)
        table = pa.Table.from_pylist([{c: row[c] for c in PICKAPIC_COLUMNS} for row in rows])
        pq.write_table(table, folder / f"{split}.parquet")
        metrics[split] = dict(pairs=len(rows), ties=float((label_0 == 0.5).float().mean()),
                              noise_ceiling=noise_ceiling(s0, s1, label_0))
        log(f"{split}: {len(rows)} pairs | ties {metrics[split]['ties']:.1%} | "
            f"noise ceiling {metrics[split]['noise_ceiling']:.3f}")
    metrics.update(label_noise=config.label_noise, tie_margin=config.tie_margin)
    (folder / "labels.json").write_text(json.dumps(metrics, indent=1) + "\n")
    return metrics


# -----------------------------------------------------------------------------
# toy refiner: a tiny Qwen2.5-VL taught the refinement format by supervised fine-tuning
#
# The policy GRPO starts from. It sees exactly what the refiner sees at inference (the chat
# messages of refiners.refiner_messages with an x0_hat preview of a toy backbone) and is trained
# on the answer tokens of refiners.format_answer(target), where the target is a *random* valid
# refinement of the user's prompt: all the user's attributes, plus some of the missing ones; an
# added background is the one the preview shows (the refiner describes what it sees).
# With describe_fraction > 0, that share of its states asks it instead to write the prompt of the
# image it sees (background, shape, shape colour and size, read from the preview by
# toy.toy_analyze), as an instruction-tuned MLLM can; perception_probe asks the same of held-out
# previews; and a share of the earlier refinements in its states went against the user (drift),
# so it learns to restore the user's words rather than copy the prompt in use. The committed
# refiner is built with the defaults (30 % describe states, drift 0.5, 1800 steps); what each
# option does to perception and to keeping the user's words is measured in docs/RESULTS.md.
# So the supervised refiner writes well-formed prompts that keep the user's words, reads the
# preview, and is uncommitted about what it adds; which additions raise the reward is GRPO's to learn.

ANSWER_TAGS = ("<prompt>", "</prompt>")  # one token each: the format costs 2 tokens, not 17 bytes
DESCRIBE_REQUEST = "Write the prompt of the image."  # words of the fixed text: the vocabulary stays as it was


def describe_messages():
    """The chat that asks the refiner what it sees: its system prompt, the image and DESCRIBE_REQUEST;
    the answer is a prompt in the refiner's format (the perception probe's question)."""
    return [
        {"role": "system", "content": refiners.REFINER_SYSTEM},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": DESCRIBE_REQUEST}]},
    ]


def refiner_vocabulary(prompts):
    """Whole words of the refiner's fixed text (system prompt, message template) and of `prompts`.

    Each becomes one token of the byte-level tokenizer, so a refinement state is ~160 tokens
    instead of ~600 bytes."""
    import re

    template = refiners.refiner_messages("", "", 0, 0)[1]["content"][1]["text"]
    texts = [refiners.REFINER_SYSTEM, template, DESCRIBE_REQUEST, *prompts]
    return sorted({word for text in texts for word in re.findall(r"[A-Za-z]+", text)})


def toy_refiner_processor():
    """The toy refiner's Qwen2.5-VL processor: whole-word tokens for the grammar and the fixed
    text, the answer tags as single (non-special, so decoded) tokens, a 56 px image -> 4 vision tokens."""
    processor = toy.tiny_qwen_processor(refiner_vocabulary(toy.toy_prompts("train") + toy.toy_prompts("test")))
    processor.tokenizer.add_tokens(list(ANSWER_TAGS))
    return processor


def keeps_user_words(user_prompt, refined_prompt):
    """Every word of the user's prompt appears in the refined prompt (case-insensitive)."""
    return set(user_prompt.lower().split()) <= set(refined_prompt.lower().split())


def keeps_user_attributes(user_prompt, refined_prompt):
    """The refined prompt names every attribute the user's prompt names, with the same value
    (stricter than keeping the words: "a red circle on a blue background" -> "a blue circle on a
    red background" keeps the words but not the attributes)."""
    user, refined = toy.parse_toy_prompt(user_prompt), toy.parse_toy_prompt(refined_prompt)
    return all(refined.get(key) == value for key, value in user.items())


def in_toy_grammar(prompt):
    """The prompt is exactly a caption of the toy grammar (no missing or repeated word)."""
    named = toy.parse_toy_prompt(prompt)
    return "shape" in named and toy_caption(**named) == prompt


def refinement_target(user_prompt, rng, p_add=0.5, seen_background=None, p_seen=0.8):
    """A random valid refinement of a toy prompt: the user's attributes kept, each missing one
    (size, colour, background) added with probability `p_add`, its value drawn uniformly; the
    background never takes the shape's colour (as in the grammar). rng: a random.Random.

    seen_background: the background colour the preview shows, if any. The background is then
    added with probability `p_seen` and names it -- the refiner describes what it sees, as a
    real MLLM does (and learns to look) -- and the shape's colour is drawn among the others.
    Which colour goes well with it is not taught: that is GRPO's."""
    attributes = toy.parse_toy_prompt(user_prompt)
    if "shape" not in attributes:  # not a toy prompt: nothing to refine
        return user_prompt
    if "size" not in attributes and rng.random() < p_add:
        attributes["size"] = rng.choice(list(TOY_SIZES))
    background = attributes.get("background") or seen_background
    if "colour" not in attributes and rng.random() < p_add:
        attributes["colour"] = rng.choice([c for c in TOY_COLOURS if c != background])
    if "background" not in attributes and rng.random() < (p_seen if seen_background else p_add):
        if seen_background is not None and seen_background != attributes.get("colour"):
            attributes["background"] = seen_background
        else:
            attributes["background"] = rng.choice([c for c in TOY_COLOURS if c != attributes.get("colour")])
    return toy_caption(**attributes)


def seen_attributes(previews):
    """What each preview (list of (3, h, w)) shows, read by toy.toy_analyze: a dict with its
    background and, once a shape has emerged, its shape, colour and size; None for a blank (grey)
    preview (refined_sample's blank_preview ablation), which shows nothing."""
    seen = []
    for preview in previews:
        if preview.std() < 1e-3:
            seen.append(None)
            continue
        found = toy.toy_analyze(preview[None])[0]
        keys = ("background", "shape", "colour", "size") if found["shape"] is not None else ("background",)
        seen.append({key: found[key] for key in keys})
    return seen


def describe_target(seen):
    """The prompt of what a preview shows (a caption of the toy grammar), or None where it shows no shape."""
    if seen is None or "shape" not in seen or seen["colour"] == seen["background"]:
        return None
    return toy_caption(**seen)


class PreviewRecorder:
    """A refiner that keeps the prompt and records what a refiner would see: (preview (3, h, w),
    step, num_steps) at every refinement of every sample."""

    def __init__(self):
        self.states, self.users = [], []  # users[i]: the user prompt whose sampling showed states[i]

    def refine(self, previews, user_prompts, current_prompts, step, num_steps):
        self.states += [(preview, step, num_steps) for preview in previews]
        self.users += list(user_prompts)
        return refiners.RefinerOutput.from_prompts(current_prompts)


def record_previews(backbone, prompts, refine_steps, seed=0, batch_size=16, users=None):
    """x0_hat previews of `backbone` sampling `prompts` (its default steps, VAE previews), as
    promptloop.refined_sample shows them to a refiner: list of (preview, step, num_steps), grouped
    by batch, then refinement, then prompt. `users` (a list), if given, gets each one's prompt."""
    recorder = PreviewRecorder()
    for start in range(0, len(prompts), batch_size):
        generator = torch.Generator().manual_seed(seed + start)
        promptloop.refined_sample(backbone, prompts[start:start + batch_size], recorder, refine_steps, generator=generator)
    if users is not None:
        users += recorder.users
    return recorder.states


def drifted(prompt, user_prompt, rng):
    """`prompt` (a refinement of `user_prompt`) with one of the user's attributes changed to
    another value or left out, as an earlier sampled refinement can go wrong; the shape is
    always named (a prompt of the grammar needs one)."""
    attributes = toy.parse_toy_prompt(prompt)
    key = rng.choice(sorted(toy.parse_toy_prompt(user_prompt)))
    if key != "shape" and rng.random() < 0.5:
        del attributes[key]
    else:  # another value (a colour neither the shape's nor the background's: the grammar never paints both alike)
        values = {"shape": TOY_SHAPES, "size": TOY_SIZES}.get(key, TOY_COLOURS)
        attributes[key] = rng.choice([v for v in values if v not in (attributes[key], attributes.get("colour"), attributes.get("background"))])
    return toy_caption(**attributes)


def refinement_state(preview, user_prompt, step, num_steps, rng, drift=0.0):
    """One training state as met at inference. The current prompt is the user's (first
    refinement) or an earlier refinement; half the time (step, num_steps) are rescaled to
    another number of sampling steps, so the state text also covers e.g. 4-step or 50-step runs.

    drift: the share of earlier refinements that went against the user (`drifted`); the answer
    is still drawn from the user's prompt, so the refiner learns to restore what the user asked
    for instead of copying the prompt in use."""
    current = user_prompt if rng.random() < 0.5 else refinement_target(user_prompt, rng)
    if drift and current != user_prompt and rng.random() < drift:  # (no draw when off: the old stream)
        current = drifted(current, user_prompt, rng)
    if rng.random() < 0.5:
        new_num_steps = rng.choice([4, 8, 30, 50])
        step = min(new_num_steps - 1, max(1, round(step * new_num_steps / num_steps)))
        num_steps = new_num_steps
    return preview, user_prompt, current, step, num_steps


def sft_batch(processor, states, rng):
    """One SFT batch: states (preview, user prompt, current prompt, step, num_steps) rendered
    with the inference chat template, a fresh random target's answer appended (an added
    background names the one the preview shows). A state whose user prompt is None asks the
    refiner to describe its preview (describe_messages); the answer is describe_target's prompt.

    Returns (inputs, labels): the processor's outputs for the whole sequences (right-padded)
    and labels (B, L) = the answer's tokens and its end token, -100 elsewhere (the loss is on
    the answer only)."""
    tokenizer = processor.tokenizer
    texts, answers = [], []
    seen = seen_attributes([state[0] for state in states])
    for (_, user, current, step, num_steps), shown in zip(states, seen):
        if user is None:
            messages, target = describe_messages(), describe_target(shown)
            if target is None:
                raise ValueError("a describe state needs a preview that shows a shape")
        else:
            messages = refiners.refiner_messages(user, current, step, num_steps)
            target = refinement_target(user, rng, seen_background=shown and shown["background"])
        prompt = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        answers.append(refiners.format_answer(target) + tokenizer.eos_token)
        texts.append(prompt + answers[-1])
    images = [common.to_pil(state[0][None])[0] for state in states]  # sizes differ (blank previews)
    inputs = processor(text=texts, images=images, padding=True, padding_side="right", return_tensors="pt")
    labels = torch.full_like(inputs["input_ids"], -100)
    lengths = inputs["attention_mask"].sum(1)
    for row, answer in enumerate(answers):
        answer_ids = torch.tensor(tokenizer(answer)["input_ids"])
        end = int(lengths[row])
        # the answer must tokenize the same alone and after the prompt (the prompt ends in "\n")
        if not torch.equal(inputs["input_ids"][row, end - len(answer_ids):end], answer_ids):
            raise ValueError(f"answer tokens shift at the prompt boundary: {answer!r}")
        labels[row, end - len(answer_ids):end] = answer_ids
    return dict(inputs), labels


def answer_loss(model, inputs, labels):
    """Mean next-token cross-entropy over the answer tokens."""
    logits = model(**inputs, use_cache=False).logits[:, :-1]  # (B, L-1, V): predicts tokens 1..L-1
    return F.cross_entropy(logits.flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100)


@torch.no_grad()
def refiner_sampling_stats(refiner, previews, user_prompts, step, num_steps, samples=8):
    """Sample `samples` refinements of each user prompt in one batched call (at the refiner's
    own temperature, current prompt = user prompt). previews: (P, 3, h, w), one per prompt.

    Returns parse_rate (answers refiners.parse_answer accepts), keep_words_rate,
    keep_attributes_rate and grammatical_rate (exactly a caption of the toy grammar; all three
    among parsed prompts), distinct (mean distinct prompts per user
    prompt), distinct_partial (the same over prompts that leave an attribute free) and
    distinct_targets (mean distinct prompts among as many draws of refinement_target)."""
    import random

    users = [user for user in user_prompts for _ in range(samples)]
    out = refiner.refine(previews.repeat_interleave(samples, 0), users, users, step, num_steps)
    parsed = [refiners.parse_answer(answer, refiner.max_words) for answer in out.answers]
    kept = [(user, prompt) for user, prompt in zip(users, parsed) if prompt is not None]
    distinct = {u: len({p for user, p in zip(users, parsed) if user == u}) for u in user_prompts}
    partial = [u for u in user_prompts if toy.TOY_PROMPT_KINDS["partial"](toy.parse_toy_prompt(u))]
    # the same count for draws of the SFT target distribution itself: the diversity to expect
    rng = random.Random(0)
    target_distinct = [len({refinement_target(u, rng) for _ in range(samples)}) for u in user_prompts]
    return dict(
        parse_rate=len(kept) / len(users),
        keep_words_rate=sum(keeps_user_words(u, p) for u, p in kept) / max(1, len(kept)),
        keep_attributes_rate=sum(keeps_user_attributes(u, p) for u, p in kept) / max(1, len(kept)),
        grammatical_rate=sum(in_toy_grammar(p) for _, p in kept) / max(1, len(kept)),
        distinct=sum(distinct.values()) / len(distinct),
        distinct_partial=sum(distinct[u] for u in partial) / max(1, len(partial)),
        distinct_targets=sum(target_distinct) / len(target_distinct),
        samples=samples,
    )


PERCEIVED = ("background", "colour", "size")  # what the perception probe scores


@torch.no_grad()
def perception_probe(refiner, previews):
    """How well `refiner` reads its previews: asked to write the prompt of each (describe_messages,
    at the refiner's own temperature), is the background, the shape's colour and its size it names
    the one toy.toy_analyze reads from the preview? previews: (P, 3, h, w); only those that show a
    shape count. Returns the rate of each attribute, of all three at once, of answers in the toy
    grammar, and the number of previews scored."""
    seen = seen_attributes(list(previews))
    rows = [i for i, shown in enumerate(seen) if describe_target(shown) is not None]
    if not rows:
        raise ValueError("no preview shows a shape: nothing to probe")
    inputs = refiners.chat_inputs(refiner.processor, [describe_messages()] * len(rows), previews[rows], refiner.preview_size)
    completion, _, _ = refiner.generate(inputs)
    answers = refiner.processor.tokenizer.batch_decode(completion, skip_special_tokens=True)
    named = [toy.parse_toy_prompt(refiners.parse_answer(answer) or "") for answer in answers]
    correct = {key: [said.get(key) == seen[row][key] for row, said in zip(rows, named)] for key in PERCEIVED}
    rates = {key: sum(hits) / len(rows) for key, hits in correct.items()}
    rates["all"] = sum(all(hits) for hits in zip(*correct.values())) / len(rows)
    rates["grammatical"] = sum(in_toy_grammar(refiners.parse_answer(a) or "") for a in answers) / len(rows)
    return dict(rates, previews=len(rows))


@torch.no_grad()
def sampling_keep_rate(refiner, backbone, prompts, refine_steps=5, seed=0, batch_size=16):
    """Refined sampling as a user runs it (K refinements, each from the last one's prompt): the
    fraction of the refiner's rewrites that keep every attribute the user named (an unusable
    answer keeps the current prompt and is not counted as a rewrite), and how many were made."""
    kept = made = 0
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start:start + batch_size]
        sample = promptloop.refined_sample(backbone, chunk, refiner, refine_steps,
                                           generator=torch.Generator().manual_seed(seed + start))
        for rewritten, out in zip(sample.prompts[1:], sample.refiner_outputs):
            for user, prompt, fallback in zip(chunk, rewritten, out.fallback.tolist()):
                if not fallback:
                    made += 1
                    kept += keeps_user_attributes(user, prompt)
    return dict(keep_attributes_rate=kept / max(1, made), rewrites=made)


def build_toy_refiner(config, out, log=print, train_steps=450, batch_size=32, lr=3e-3, hidden=128, layers=2,
                      heads=8, eval_prompts=24, describe_fraction=0.3, preview_prompts=96, vision_hidden=32, vision_depth=1,
                      describe_images=1500, matched_fraction=0.0, drift=0.5, describe_warmup=0):
    """Build the toy refiner: SFT of a tiny Qwen2.5-VL on the refinement format (and, in a
    `describe_fraction` of its states and in all of the first `describe_warmup` steps, on writing
    the prompt of the preview it sees); save it (model, processor, chat template) to
    `out/toy-refiner`, then measure it sampled at temperature 1. In refinement states, a
    `matched_fraction` shows the preview of the user's own prompt, and a `drift` share of the
    earlier refinements went against the user (refinement_state).

    config: the ToyConfig (its `seed`); out: the toy world folder, whose toy backbones
    (`toy-sd15`, `toy-sdxl`, built first) provide the x0_hat previews. ~5-10 minutes on 2 CPU
    cores. Returns the metrics: parse / keep rates of one refinement and of refined sampling,
    distinct prompts, the perception probe, the base refiner's reward beside the scripted
    refiners', final loss."""
    import random

    seed = config.seed
    backbone_dirs = [out / name for name in ("toy-sd15", "toy-sdxl") if (out / name / "model_index.json").is_file()]
    if not backbone_dirs:
        raise common.UserError(f"the refiner stage needs the toy backbones in {out}: build the 'backbones' stage first")
    rng = random.Random(seed)
    train_prompts, test_prompts = toy.toy_prompts("train"), toy.toy_prompts("test", n=eval_prompts, seed=seed)

    # previews of both backbones at the refinement steps of inference (K=5) and GRPO (K=2), and
    # grey ones (refined_sample's blank_preview ablation)
    start = time.time()
    previews = []
    owners = []  # the user prompt each preview was sampled from
    for folder in backbone_dirs:
        backbone = common.load_backbone(str(folder))
        prompts = rng.sample(train_prompts, preview_prompts)
        previews += record_previews(backbone, prompts, 5, seed, users=owners) + record_previews(backbone, prompts, 2, seed + 1, users=owners)
    num_steps = previews[0][2]
    describable = [state for state, shown in zip(previews, seen_attributes([p[0] for p in previews]))
                   if describe_target(shown) is not None]
    # and clean images of the toy data set, as an MLLM has seen captioned images before it refines
    images = toy.toy_dataset(describe_images, seed=seed + 5, image_size=config.image_size)[0] if describe_images else []
    describable += [(image, None, None) for image in images]
    previews += [(torch.full((3, 64, 64), 0.5), step, num_steps) for step in range(1, num_steps, 2)]
    log(f"refiner: {len(previews)} previews from {', '.join(f.name for f in backbone_dirs)} in {time.time() - start:.0f}s")

    processor = toy_refiner_processor()
    # 8 heads of 16 dims learn to copy the user's words from the state sooner than 4 of 32
    model = toy.tiny_qwen_model(processor, hidden=hidden, layers=layers, heads=heads, vision_hidden=vision_hidden,
                                vision_depth=vision_depth, seed=seed)
    params = sum(p.numel() for p in model.parameters())
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, lr, total_steps=train_steps, pct_start=0.1)
    model.train()
    start, losses = time.time(), []
    for step in range(1, train_steps + 1):
        # the preview is drawn independently of the user prompt; the targets read only its
        # background (what else the image is good for is GRPO's to learn)
        states = []
        for _ in range(batch_size):
            if step <= describe_warmup or (describe_fraction and rng.random() < describe_fraction):  # (no draw when off: the old stream)
                states.append((describable[rng.randrange(len(describable))][0], None, None, None, None))
                continue
            if matched_fraction and rng.random() < matched_fraction:
                # the preview of the user's own prompt, as at inference: where the backbone drew
                # something else than the user asked, the answer still keeps the user's words
                i = rng.randrange(len(owners))
                preview, preview_step, preview_num_steps = previews[i]
                states.append(refinement_state(preview, owners[i], preview_step, preview_num_steps, rng, drift))
                continue
            preview, preview_step, preview_num_steps = previews[rng.randrange(len(previews))]
            states.append(refinement_state(preview, rng.choice(train_prompts), preview_step, preview_num_steps, rng, drift))
        inputs, labels = sft_batch(processor, states, rng)
        loss = answer_loss(model, inputs, labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
        if step % 50 == 0 or step == train_steps:
            log(f"refiner step {step:05d}/{train_steps} | loss {sum(losses[-50:]) / len(losses[-50:]):.4f} "
                f"| {(time.time() - start) / step * 1000:.0f} ms/step")
    train_seconds = time.time() - start
    model.eval()
    folder = out / "toy-refiner"
    model.save_pretrained(folder)
    processor.save_pretrained(folder)

    # measure the saved folder, loaded the way sample.py loads it, sampled at temperature 1
    torch.manual_seed(seed)
    refiner = refiners.load_refiner(str(folder), temperature=1.0, max_new_tokens=32)
    backbone = common.load_backbone(str(backbone_dirs[0]))
    test_states = record_previews(backbone, test_prompts, 1, seed + 2)  # one refinement: one preview per prompt
    test_previews = torch.stack([state[0] for state in test_states])
    stats = refiner_sampling_stats(refiner, test_previews, test_prompts, test_states[0][1], test_states[0][2])
    # what it sees: previews of held-out prompts at every refinement step of K = 5
    probe_previews = torch.stack([state[0] for state in record_previews(backbone, test_prompts, 5, seed + 3)])
    probe = perception_probe(refiner, probe_previews)
    keep = sampling_keep_rate(refiner, backbone, toy.toy_prompts("test", n=64, seed=seed + 4), seed=seed + 4)
    reward = preview_feedback_gain(backbone, config.eval_samples, seed=config.seed + 8, others=[("base", refiner)])
    size_mb = sum(f.stat().st_size for f in folder.iterdir()) / 2**20
    log(f"refiner: {params / 1e6:.2f}M parameters, {size_mb:.1f} MB, trained in {train_seconds:.0f}s | "
        f"held-out prompts x {stats['samples']} samples at temperature 1: parseable {stats['parse_rate']:.1%}, "
        f"keep the user's words {stats['keep_words_rate']:.1%} (attributes {stats['keep_attributes_rate']:.1%}), "
        f"in the grammar {stats['grammatical_rate']:.1%}, "
        f"distinct prompts per user prompt {stats['distinct']:.2f} (partial prompts {stats['distinct_partial']:.2f}; "
        f"SFT targets {stats['distinct_targets']:.2f})")
    log(f"refiner: refined sampling (K = 5, {keep['rewrites']} rewrites) keeps the user's attributes in "
        f"{keep['keep_attributes_rate']:.1%} | perception probe on {probe['previews']} held-out previews: background "
        f"{probe['background']:.1%}, shape colour {probe['colour']:.1%}, size {probe['size']:.1%}, all three {probe['all']:.1%}")
    log(f"refiner: toy aesthetic / faithfulness, prompts that leave the background free (K = 2) | plain "
        f"{reward['plain']:.3f} / {reward['plain_faithful']:.3f} | base refiner {reward['base']:.3f} / {reward['base_faithful']:.3f} "
        f"| seeing scripted refiner {reward['seeing']:.3f} / {reward['seeing_faithful']:.3f} "
        f"(keeping the user's colour {reward['oracle']:.3f} / {reward['oracle_faithful']:.3f})")
    return dict(stats, sampling=keep, perception=probe, reward=reward, parameters=params, size_mb=round(size_mb, 2), train_steps=train_steps,
                final_loss=round(sum(losses[-50:]) / len(losses[-50:]), 4), train_seconds=round(train_seconds, 1))


# -----------------------------------------------------------------------------
# build: python build_toy_world.py [--stages data,backbones,pairs,refiner]

STAGES = ("data", "backbones", "sd3", "measure", "pairs", "refiner")  # measure: re-measure saved backbones


def build_toy_data(config, out, log=print):
    """The procedural data set as a parquet file (PNG bytes + caption + attributes), for reference:
    the backbone stage regenerates the same images from the seed."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    images, captions, attributes = toy.toy_dataset(config.dataset_size, seed=config.seed, image_size=config.image_size)
    rows = []
    for pil, caption, attrs in zip(common.to_pil(images), captions, attributes):
        buffer = io.BytesIO()
        pil.save(buffer, format="PNG")
        rows.append(dict(image=buffer.getvalue(), caption=caption, **attrs))
    out.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), out / "data.parquet")
    log(f"data: {len(rows)} images of {config.image_size} px -> {out / 'data.parquet'}")
    partial = toy.TOY_PROMPT_KINDS["partial"]
    return dict(images=len(rows), partial_captions=sum(partial(toy.parse_toy_prompt(c)) for c in captions))


def main(args=None):
    config = common.parse_config(ToyConfig, args)
    stages = common.parse_list(config.stages, "--stages", STAGES)
    if config.images_per_prompt < 2:
        raise common.UserError(f"--images-per-prompt must be >= 2 (a pair needs two images), got {config.images_per_prompt}")
    common.require(config, positive=("image_size", "dataset_size", "vae_steps", "unet_steps", "refiner_steps", "batch_size", "lr",
                                     "sample_steps", "eval_samples", "pairs_train", "pairs_validation", "pairs_test", "pair_steps"),
                   non_negative=("threads", "caption_dropout", "background_settles", "guidance", "label_noise", "tie_margin"))
    if config.threads > 0:
        torch.set_num_threads(config.threads)
    runs.seed_everything(config.seed)
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    metrics_path = out / "metrics.json"
    metrics = json.loads(metrics_path.read_text()) if metrics_path.is_file() else {}
    builders = dict(data=build_toy_data, backbones=build_toy_backbones, sd3=build_toy_sd3, measure=measure_toy_backbones, pairs=build_toy_pairs,
                    refiner=lambda config, out, log: build_toy_refiner(config, out, log=log, train_steps=config.refiner_steps))
    for stage in STAGES:
        if stage not in stages:
            continue
        start = time.time()
        print(f"== {stage}", flush=True)
        result = builders[stage](config, out, log=lambda line: print(line, flush=True))
        seconds = round(time.time() - start, 1)
        metrics[stage] = dict(result or {}, seconds=seconds)
        print(f"== {stage} done in {seconds}s", flush=True)
        metrics_path.write_text(json.dumps(metrics, indent=1) + "\n")  # after each stage: a partial build keeps its numbers
    print(json.dumps(metrics, indent=1))


if __name__ == "__main__":
    common.run_cli(main)
