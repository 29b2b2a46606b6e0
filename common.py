"""
common.py: what the promptloop scripts share.

    CLI helpers        one-line user errors, config parsing, list flags, device / dtype
    backbones          load SD1.5 / SDXL / SD3.5 / FLUX.1 / toy pipelines by alias, hub id or folder
    refined sampling   drive the stock diffusers pipeline, rewrite the prompt at K steps
    refiner            the Qwen2.5-VL policy: chat messages, batched generation, log-probs
    prompt sources     toy prompts, text files, Pick-a-Pic captions (parquet or hub)
    training utils     seeding, atomic checkpoints, resume, log.jsonl, torchrun/DDP

The large concepts have modules of their own: rewards.py (the reward registry), lrm.py (the
latent reward model), toy.py (the toy world). Nothing here runs on import, and importing it is
light: the heavy libraries are imported inside the functions that need them.
"""

import contextlib
import functools
import inspect
import json
import math
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

REPO_DIR = Path(__file__).resolve().parent
TOY_DIR = REPO_DIR / "toy_world"


class UserError(Exception):
    """Bad input from the user: reported as one line on stderr, exit code 2, no traceback."""


def run_cli(main):
    """Run a script's main(); user errors become one clear line and a non-zero exit."""
    try:
        main()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)


def flag(name):
    """A config field's command-line flag: steps_per_epoch -> --steps-per-epoch."""
    return "--" + name.replace("_", "-")


def parse_config(config_class, args=None):
    """Parse the script's config dataclass from the command line (one flag per field). A float
    flag that is NaN or infinite is a UserError for every script (argparse takes 'nan' as a float)."""
    from dataclasses import fields

    from transformers import HfArgumentParser

    (config,) = HfArgumentParser(config_class).parse_args_into_dataclasses(args=args)
    for f in fields(config):
        value = getattr(config, f.name)
        if isinstance(value, float) and not math.isfinite(value):
            raise UserError(f"{flag(f.name)} must be a finite number, got {value}")
    return config


def require(config, positive=(), non_negative=()):
    """UserError naming the first field that is not > 0 (positive) or >= 0 (non_negative); None is
    allowed (a default left to the script or the backbone)."""
    for names, low, word in ((positive, 0, "> 0"), (non_negative, None, ">= 0")):
        for name in names:
            value = getattr(config, name)
            if value is not None and (value <= 0 if low == 0 else value < 0):
                raise UserError(f"{flag(name)} must be {word}, got {value}")


def parse_ints(text, flag, minimum=None):
    """A comma-separated flag of integers, e.g. '1,4,8' -> [1, 4, 8]; UserError if one is not an
    integer or (with `minimum`) is below it, or as parse_list."""
    try:
        values = [int(item) for item in parse_list(text, flag)]
    except ValueError:
        values = None
    if values is None or (minimum is not None and min(values) < minimum):
        at_least = "" if minimum is None else f" >= {minimum}"
        raise UserError(f"{flag} must be comma-separated integers{at_least}, got '{text}'")
    return values


def parse_list(text, flag, choices=None):
    """A comma-separated flag -> its entries, e.g. 'a, b,c' -> ['a', 'b', 'c']. UserError if it
    names nothing, repeats an entry, or (with `choices`) names one outside them."""
    items = [item.strip() for item in text.split(",") if item.strip()]
    among = f" among {','.join(choices)}" if choices is not None else ""
    if not items:
        raise UserError(f"{flag} needs at least one entry{among}")
    if len(set(items)) != len(items):
        raise UserError(f"{flag} lists an entry twice: {text}")
    if choices is not None and any(item not in choices for item in items):
        raise UserError(f"{flag} must name entries{among}, got '{text}'")
    return items


def pick_device(name="auto"):
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def pick_dtype(name, device):
    """'auto' = bf16 on GPU (fp16 for the SD VAE is fragile), fp32 on CPU."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[name]


# -----------------------------------------------------------------------------
# backbones


@dataclass
class BackboneSpec:
    source: str  # hub id or local diffusers folder
    steps: int  # default number of sampling steps
    guidance: float  # default guidance: the CFG scale (SD1.5/SDXL/SD3; <= 1 = no CFG, as SDXL-turbo
    #                  wants), for FLUX the distilled guidance its transformer is conditioned on
    size: int | None = None  # default image side in pixels (None = the pipeline's own)
    taesd: str | None = None  # tiny preview decoder for this latent space
    text_length: int | None = None  # SD3/FLUX: T5 tokens (max_sequence_length); None = the pipeline's default


BACKBONES = {
    "sd15": BackboneSpec("stable-diffusion-v1-5/stable-diffusion-v1-5", 50, 7.5, 512, "madebyollin/taesd"),
    "sdxl": BackboneSpec("stabilityai/stable-diffusion-xl-base-1.0", 50, 5.0, 1024, "madebyollin/taesdxl"),
    "sdxl-turbo": BackboneSpec("stabilityai/sdxl-turbo", 4, 0.0, 512, "madebyollin/taesdxl"),
    # flow-matching transformers (the model cards' sampling settings)
    "sd35m": BackboneSpec("stabilityai/stable-diffusion-3.5-medium", 40, 4.5, 1024, "madebyollin/taesd3"),
    "sd35l": BackboneSpec("stabilityai/stable-diffusion-3.5-large", 28, 3.5, 1024, "madebyollin/taesd3"),
    "flux-dev": BackboneSpec("black-forest-labs/FLUX.1-dev", 28, 3.5, 1024, "madebyollin/taef1"),
    "flux-schnell": BackboneSpec("black-forest-labs/FLUX.1-schnell", 4, 0.0, 1024, "madebyollin/taef1", 256),
    # toy backbones: folders built by build_toy_world.py; their defaults are in their promptloop.json
    "toy": BackboneSpec(str(TOY_DIR / "toy-sd15"), 20, 4.0),
    "toy-sdxl": BackboneSpec(str(TOY_DIR / "toy-sdxl"), 20, 4.0),
    "toy-sd3": BackboneSpec(str(TOY_DIR / "toy-sd3"), 20, 4.0),
}

# Aligned UNets to put over a base backbone (the paper's composition experiment):
# Diffusion-DPO (Wallace et al.) releases full UNets in diffusers format.
ALIGNED_UNETS = {
    "dpo-sd15": "mhdang/dpo-sd1.5-text2image-v1",
    "dpo-sdxl": "mhdang/dpo-sdxl-text2image-v1",
}

# The stock diffusers pipelines promptloop drives, by family. The families differ in what the
# text conditioning is (sd: CLIP tokens; sdxl: two CLIPs' tokens + a pooled embedding; sd3: two
# CLIPs + T5 tokens + pooled; flux: T5 tokens + CLIP pooled), in the denoiser (UNet or
# transformer) and in the sampler (DDPM-family schedulers or flow-matching Euler).
PIPELINE_FAMILIES = {
    "StableDiffusionPipeline": "sd", "StableDiffusionXLPipeline": "sdxl",
    "StableDiffusion3Pipeline": "sd3", "FluxPipeline": "flux",
}


FOLDER_DEFAULTS = {  # sampling defaults of a diffusers folder without a promptloop.json
    "sd": dict(steps=30, guidance=7.5), "sdxl": dict(steps=30, guidance=5.0),
    "sd3": dict(steps=28, guidance=7.0), "flux": dict(steps=28, guidance=3.5),
}


def pipeline_family(pipe):
    return PIPELINE_FAMILIES.get(type(pipe).__name__)


@dataclass
class Backbone:
    pipe: object  # a diffusers StableDiffusion(XL|3)Pipeline or FluxPipeline
    name: str
    spec: BackboneSpec

    @property
    def family(self):
        return pipeline_family(self.pipe)

    @property
    def flow_matching(self):
        """SD3 / FLUX: a flow-matching transformer (x = (1 - sigma) x0 + sigma eps), not a DDPM UNet."""
        return self.family in ("sd3", "flux")

    @property
    def denoiser(self):
        """The UNet (SD1.5/SDXL) or the transformer (SD3/FLUX)."""
        return self.pipe.unet if hasattr(self.pipe, "unet") else self.pipe.transformer

    @property
    def device(self):
        return self.denoiser.device


FILE_SUFFIXES = (".parquet", ".txt", ".json", ".pt", ".pth", ".bin", ".safetensors")


def looks_like_path(name):
    """A local path rather than a hub id: it exists, is explicit (/, ./, ~), is deeper than
    owner/name, or names a file (data.parquet, model.pt, ...)."""
    return (Path(name).exists() or name.startswith((".", "/", "~")) or name.count("/") > 1
            or (os.sep != "/" and os.sep in name) or name.endswith(FILE_SUFFIXES))


def is_hub_id(name):
    """'owner/name' that is not a local path: what from_pretrained / load_dataset look up on the hub."""
    return not looks_like_path(name) and re.fullmatch(r"[\w.-]+/[\w.-]+", name) is not None


def backbone_spec(name):
    """Alias -> spec; a local folder gets defaults from its `promptloop.json` or its pipeline class."""
    if name in BACKBONES:
        spec = BACKBONES[name]
        if not name.startswith("toy"):
            return spec
        if not Path(spec.source).is_dir():
            raise UserError(f"toy backbone '{name}' not built: run `python build_toy_world.py` (looked in {spec.source})")
        name = spec.source  # a local folder: defaults come from its promptloop.json
    if not looks_like_path(name) and "/" not in name:
        raise UserError(f"unknown backbone '{name}': use one of {', '.join(BACKBONES)}, a hub id or a diffusers folder")
    if looks_like_path(name):
        folder = Path(name)
        if not (folder / "model_index.json").is_file():
            raise UserError(f"backbone folder '{name}' not found or not a diffusers pipeline (no model_index.json)")
        defaults = {}
        if (folder / "promptloop.json").is_file():
            defaults = json.loads((folder / "promptloop.json").read_text())
        else:  # the pipeline's own defaults
            family = PIPELINE_FAMILIES.get(json.loads((folder / "model_index.json").read_text()).get("_class_name"))
            defaults = FOLDER_DEFAULTS.get(family, FOLDER_DEFAULTS["sd"])
        return BackboneSpec(str(folder), **defaults)
    return BackboneSpec(name, 30, 7.5)  # any other hub id: SD-like defaults


def load_backbone(name, device="cpu", dtype=torch.float32, unet=None, lora=None, t5=True):
    """Load a text-to-image pipeline by alias, hub id or folder.

    unet: an aligned UNet to use instead of the base one (alias from ALIGNED_UNETS, hub id
          or folder; a `unet/` subfolder is used when present) -- e.g. Diffusion-DPO.
    lora: a diffusers LoRA (folder or hub id) loaded on the backbone with `load_lora_weights`.
    t5:   False loads SD3 without its T5 encoder (`text_encoder_3=None`: the pipeline then feeds
          zeros for the T5 tokens; SD3.5-L's 4.8 B-parameter T5-XXL is 9.5 GB in bf16).
    """
    from diffusers import DiffusionPipeline, UNet2DConditionModel

    spec = backbone_spec(name)
    kwargs = {} if t5 else dict(text_encoder_3=None, tokenizer_3=None)
    try:
        pipe = DiffusionPipeline.from_pretrained(spec.source, dtype=dtype, **kwargs)
        if unet is not None:
            if not hasattr(pipe, "unet"):
                raise UserError(f"backbone '{name}' has no UNet to replace (--unet is for SD1.5/SDXL backbones)")
            source = ALIGNED_UNETS.get(unet, unet)
            sub = "unet" if not Path(source).is_dir() or (Path(source) / "unet").is_dir() else None
            pipe.unet = UNet2DConditionModel.from_pretrained(source, subfolder=sub, dtype=dtype)
        if lora is not None:
            pipe.load_lora_weights(lora)
    except (OSError, ValueError, EnvironmentError) as e:
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"cannot load backbone '{name}' ({spec.source}): {first_line}") from e
    if pipeline_family(pipe) is None:
        raise UserError(f"backbone '{name}' is a {type(pipe).__name__}; promptloop drives {', '.join(PIPELINE_FAMILIES)}")
    if not t5 and pipeline_family(pipe) != "sd3":
        raise UserError(f"backbone '{name}': only SD3 pipelines can run without their T5 encoder")
    pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    return Backbone(pipe, name, spec)


def image_side(backbone, size=None):
    """Image side in pixels: `size`, else the backbone's default, else the pipeline's native size.
    UserError unless the pipeline can take it: a positive multiple of the VAE's downsampling
    factor, times 2 for the transformers (SD3 patchifies, FLUX packs 2x2 latent pixels)."""
    pipe = backbone.pipe
    native = getattr(pipe, "default_sample_size", None) or backbone.denoiser.config.sample_size
    side = size or backbone.spec.size or native * pipe.vae_scale_factor
    multiple = pipe.vae_scale_factor * (2 if backbone.flow_matching else 1)
    if side < multiple or side % multiple:
        raise UserError(f"image size {side} px: backbone '{backbone.name}' needs a positive multiple of {multiple}")
    return side


def latent_shape(backbone, size=None):
    """(C, h, w) of the backbone's latents for images of `size` px (see image_side); for FLUX the
    unpacked shape (16, h, w), as refined_sample takes and returns them."""
    side = image_side(backbone, size) // backbone.pipe.vae_scale_factor
    return (backbone.pipe.vae.config.latent_channels, side, side)


def pack_latents(latents):
    """FLUX's packing: (B, C, h, w) -> (B, h/2 * w/2, 4C), each 2x2 patch of latent pixels one token."""
    b, c, h, w = latents.shape
    return latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(tokens, side):
    """Inverse of pack_latents for a square latent of `side` pixels: (B, side^2/4, 4C) -> (B, C, side, side)."""
    b, _, channels = tokens.shape
    half = side // 2
    return tokens.view(b, half, half, channels // 4, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, channels // 4, side, side)


# -----------------------------------------------------------------------------
# refined sampling


def refinement_schedule(num_steps, refine_steps):
    """Denoising step indices *before* which the prompt is rewritten, evenly spaced.

    Refinement before step s uses the denoised estimate x0_hat available after step s-1, so s
    ranges over 1..num_steps-1: nothing can be refined before the first step (no estimate yet)
    or after the last (nothing left to steer). K is capped at num_steps-1; N=1 or K=0 means
    plain sampling. E.g. N=50, K=5 -> [8, 17, 25, 33, 42]; N=4, K=5 -> [1, 2, 3]."""
    if refine_steps < 0:
        raise UserError(f"refine steps must be >= 0, got {refine_steps}")
    if num_steps < 1:
        raise UserError(f"sampling steps must be >= 1, got {num_steps}")
    k = min(refine_steps, num_steps - 1)
    return sorted({min(num_steps - 1, max(1, round(j * num_steps / (k + 1)))) for j in range(1, k + 1)})


@contextlib.contextmanager
def capture_denoised(scheduler):
    """Record the denoised estimate x0_hat of each scheduler step, without changing the step.

    Schedulers such as DDIM/Euler return `pred_original_sample`; for those that do not
    (PNDM, DPM-Solver, the flow-matching Euler of SD3/FLUX) it is computed from the model output. The wrapper keeps
    the original signature (functools.wraps), so the pipeline still passes eta / generator."""
    original = scheduler.step
    record = {}

    @functools.wraps(original)
    def step(model_output, timestep, sample, *args, return_dict=True, **kwargs):
        out = original(model_output, timestep, sample, *args, return_dict=True, **kwargs)
        x0 = getattr(out, "pred_original_sample", None)
        record["x0"] = x0 if x0 is not None else _denoised_from_model_output(scheduler, model_output, timestep, sample)
        return out if return_dict else (out.prev_sample,)

    scheduler.step = step
    try:
        yield record
    finally:
        del scheduler.step  # the instance attribute shadowed the class method


def _denoised_from_model_output(scheduler, model_output, timestep, sample):
    if not hasattr(scheduler, "alphas_cumprod"):
        # flow matching (SD3, FLUX): x_t = (1 - sigma) x0 + sigma * noise and the model predicts the
        # velocity v = noise - x0, so x0 = x_t - sigma * v; the step just taken advanced step_index
        sigma = scheduler.sigmas[scheduler.step_index - 1].to(sample.device)
        return sample.float() - sigma.float() * model_output.float()
    alpha_bar = scheduler.alphas_cumprod.to(sample.device)[int(timestep)].to(sample.dtype)
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return (sample - (1 - alpha_bar).sqrt() * model_output) / alpha_bar.sqrt()
    if kind == "v_prediction":
        return alpha_bar.sqrt() * sample - (1 - alpha_bar).sqrt() * model_output
    return model_output  # "sample"


class PreviewDecoder:
    """Latent x0_hat -> RGB preview in [0, 1], shape (B, 3, h, w).

    vae    the backbone's own VAE (full quality, the most expensive)
    taesd  AutoencoderTiny (madebyollin/taesd, taesdxl, taesd3, taef1): ~16x cheaper than the VAE
    linear a C->3 affine map (C = 4 latent channels, 16 for SD3/FLUX) fitted once by least squares
           against the backbone's VAE on the first preview it sees; previews at latent
           resolution, essentially free
    Latents are the denoiser's: (z - shift) * scale for VAE latents z (shift 0 for SD1.5/SDXL).
    """

    KINDS = ("vae", "taesd", "linear")

    def __init__(self, kind, backbone, taesd_source=None):
        if kind not in self.KINDS:
            raise UserError(f"unknown preview decoder '{kind}': use one of {', '.join(self.KINDS)}")
        self.kind, self.backbone = kind, backbone
        self.vae = backbone.pipe.vae
        self.linear_map = None  # (5, 3) once fitted
        if kind == "taesd":
            from diffusers import AutoencoderTiny

            source = taesd_source or backbone.spec.taesd
            if source is None:
                raise UserError(f"no TAESD decoder known for backbone '{backbone.name}'; use --preview-decoder vae|linear")
            try:
                self.tiny = AutoencoderTiny.from_pretrained(source, dtype=self.vae.dtype).to(self.vae.device)
            except OSError as e:
                raise UserError(f"cannot load TAESD '{source}': {str(e).splitlines()[0]}") from e

    @staticmethod
    @torch.no_grad()
    def _decode(vae, x0):
        """As the pipelines decode: z = x0 / scale + shift. TAESD for SD1.5/SDXL has scale 1 (it
        takes the UNet's latents as they are); TAESD3 / TAEF1 carry their VAE's scale and shift."""
        z = x0.to(vae.dtype) / vae.config.scaling_factor + (getattr(vae.config, "shift_factor", None) or 0.0)
        return (vae.decode(z, return_dict=False)[0].float() / 2 + 0.5).clamp(0, 1)

    def _vae_decode(self, x0):
        return self._decode(self.vae, x0)

    @torch.no_grad()
    def __call__(self, x0):
        if self.kind == "vae":
            return self._vae_decode(x0)
        if self.kind == "taesd":
            return self._decode(self.tiny, x0)
        x = x0.float()
        if self.linear_map is None:
            self.linear_map = fit_linear_preview(x, self._vae_decode(x0))
        b, _, h, w = x.shape
        rgb = _affine_features(x) @ self.linear_map.to(x.device)  # (B*h*w, 3)
        return rgb.reshape(b, h, w, 3).permute(0, 3, 1, 2).clamp(0, 1)


def _affine_features(latents):
    """(B, C, h, w) -> (B*h*w, C+1): each latent pixel's channels and a 1."""
    b, c, h, w = latents.shape
    return torch.cat([latents.permute(0, 2, 3, 1).reshape(-1, c), torch.ones(b * h * w, 1, device=latents.device, dtype=latents.dtype)], 1)


def fit_linear_preview(latents, images):
    """Least-squares affine map latent channels -> RGB: (C+1, 3). Images are pooled to latent size."""
    h, w = latents.shape[-2:]
    target = F.adaptive_avg_pool2d(images.float(), (h, w)).permute(0, 2, 3, 1).reshape(-1, 3)
    return torch.linalg.lstsq(_affine_features(latents.float()).cpu(), target.cpu()).solution  # (C+1, 3)


@dataclass
class RefinedSample:
    images: torch.Tensor  # (B, 3, H, W) in [0, 1], exactly what the pipeline returned
    latents: torch.Tensor  # (B, C, h, w) final latents (what a latent reward scores)
    schedule: list  # denoising steps before which the prompt was rewritten
    prompts: list  # prompts[k][b]: prompt in force from schedule[k] on (prompts[0] = user prompts)
    previews: list = field(default_factory=list)  # previews[k]: (B, 3, h, w) seen at refinement k
    states: list = field(default_factory=list)  # states[k]: (B, C, h, w) noisy latents x_t when refinement k was made
    state_levels: list = field(default_factory=list)  # their noise level: DDPM timestep (int) or flow sigma (float)
    refiner_outputs: list = field(default_factory=list)  # what the refiner returned at each refinement
    candidates: list = field(default_factory=list)  # search: candidates[k] = {"prompts": [[M prompts] per image], "scores": (B, M), "chosen": (B,)}

    @property
    def final_prompts(self):
        return self.prompts[-1]

    def rows(self, rows):
        """This sample restricted to `rows` (B',): best-of-n keeps each prompt's best image."""
        rows = torch.as_tensor(rows).long()
        return RefinedSample(
            self.images[rows], self.latents[rows], self.schedule, [[p[r] for r in rows.tolist()] for p in self.prompts],
            [x[rows] for x in self.previews], [x[rows] for x in self.states], self.state_levels,
            [out.rows(rows) for out in self.refiner_outputs])

    def score(self, reward):
        """A reward (rewards.py) of each sample: (B,) float32 on the CPU, NaN where not finite. The reward
        sees the user prompts, the final refined prompts, every refinement's answers[k][b] (None
        without a refiner) and the final latents."""
        answers = [out.answers for out in self.refiner_outputs] or None
        scores = reward(self.images, self.prompts[0], refined_prompts=self.final_prompts, answers=answers, latents=self.latents)
        scores = torch.as_tensor(scores).detach().float().cpu().reshape(-1)
        if len(scores) != len(self.images):
            raise ValueError(f"a reward returned {len(scores)} scores for {len(self.images)} images")
        return scores


def encode_prompts(pipe, prompts, text_length=None):
    """Positive prompt embeddings with the pipeline's own `encode_prompt`, as its call computes them.

    Returns {"prompt_embeds": (B, L, D)} plus the pooled text embedding (B, D2) under the name the
    pipeline's loop gives it: "add_text_embeds" (SDXL), "pooled_prompt_embeds" (SD3, FLUX).
    text_length: T5 tokens for SD3/FLUX (their `max_sequence_length`; None = the call's default)."""
    family = pipeline_family(pipe)
    device = pipe._execution_device
    if family in ("sd3", "flux"):
        text_length = text_length or inspect.signature(pipe.__call__).parameters["max_sequence_length"].default
        lora_scale = (getattr(pipe, "_joint_attention_kwargs", None) or {}).get("scale")
        if family == "sd3":
            embeds, _, pooled, _ = pipe.encode_prompt(
                prompts, None, None, device=device, num_images_per_prompt=1, do_classifier_free_guidance=False,
                clip_skip=getattr(pipe, "_clip_skip", None), max_sequence_length=text_length, lora_scale=lora_scale)
        else:
            embeds, pooled, _ = pipe.encode_prompt(prompts, None, device=device, num_images_per_prompt=1,
                                                   max_sequence_length=text_length, lora_scale=lora_scale)
        return {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled}
    kwargs = dict(device=device, num_images_per_prompt=1, do_classifier_free_guidance=False)
    lora_scale = (pipe.cross_attention_kwargs or {}).get("scale") if hasattr(pipe, "cross_attention_kwargs") else None
    clip_skip = getattr(pipe, "clip_skip", None) if hasattr(pipe, "_clip_skip") else None
    if family == "sdxl":
        embeds, _, pooled, _ = pipe.encode_prompt(prompts, lora_scale=lora_scale, clip_skip=clip_skip, **kwargs)
        return {"prompt_embeds": embeds, "add_text_embeds": pooled}
    embeds, _ = pipe.encode_prompt(prompts, lora_scale=lora_scale, clip_skip=clip_skip, **kwargs)
    return {"prompt_embeds": embeds}


# single-step samplers: the next state depends on the current latents only, so a search may copy one
# candidate's latents over the others (multistep ones, PNDM or DPM-Solver, keep a history per row)
SEARCH_SCHEDULERS = ("DDIMScheduler", "DDPMScheduler", "LCMScheduler", "FlowMatchEulerDiscreteScheduler")


def best_candidates(scores):
    """(B, m) scores of each image's m candidates -> (B,) index of the best; a NaN score ranks last."""
    return scores.nan_to_num(-math.inf).argmax(1)


@dataclass
class Search:
    """Reward-guided refinement at sampling time (refined_sample's `search`; sample.py --search M).

    At each refinement the refiner proposes m candidate prompts per image in one batched call (B*m
    rows, each image's m copies sharing its state); every candidate is continued to the next
    refinement point -- the last one to the end of sampling -- in the same batched loop; `score`
    judges the latents reached and each image keeps its best candidate: its latents replace the
    other copies' and the next refinement starts from them. No decode is needed when `score` is a
    latent reward model (lrm.search_scorer).
      score(latents (R, C, h, w), user_prompts (R,), level, group) -> (R,) scores, higher is better;
      level: the latents' noise level (DDPM timestep or flow sigma, as RefinedSample.state_levels),
      None for the final clean latents; group = m: the rows come as each image's m candidates (a
      scorer that draws noise should give them the same draws).
    Cost: every step runs m rows per image (m x the denoiser evaluations, the same as best-of-m),
    the copies before the first refinement identical (a pipeline's batch is fixed for its loop).
    m = 1 is plain refined sampling, bit for bit, and never calls `score`."""

    m: int
    score: object


def refined_sample(
    backbone,
    prompts,
    refiner=None,
    refine_steps=5,
    num_steps=None,
    guidance=None,
    generator=None,
    latents=None,
    negative_prompt=None,
    preview_decoder="vae",
    blank_preview=False,
    size=None,
    true_cfg=1.0,
    search=None,
):
    """Sample `prompts` with the stock pipeline; a refiner rewrites them at K evenly spaced steps.

    The pipeline runs its own loop; `callback_on_step_end` (a public diffusers hook) swaps the
    text conditioning after a refinement. At refinement k (before step s_k):
      x0_hat (from the step just taken) -> preview decoder -> refiner(previews, user prompts,
      current prompts, s_k, N) -> new prompts -> encode_prompt -> new prompt_embeds (+ pooled).
    The CFG negative half and SDXL's time ids are kept as the pipeline built them.
    With refiner=None the call is exactly the stock pipeline call (bit-identical images).

    refiner: any object with `refine(previews, user_prompts, current_prompts, step, num_steps)`
             returning an object with `.prompts` (see Refiner).
    blank_preview: show the refiner a grey image instead of x0_hat (the no-feedback ablation).
    latents: initial noise (B, C, h, w) (latent_shape; FLUX's are packed here, as its pipeline wants).
    guidance: the backbone's guidance (BackboneSpec.guidance); true_cfg: FLUX only, its two-pass
             classifier-free guidance with `negative_prompt` (`true_cfg_scale`; 1 = off).
    search:  a Search: m candidate refinements per image, each image keeps its best-scored one.
    """
    pipe, family = backbone.pipe, backbone.family
    prompts = list(prompts)
    if not prompts or any(not isinstance(p, str) or not p.strip() for p in prompts):
        raise UserError("every prompt must be a non-empty string")
    if true_cfg != 1.0 and family != "flux":
        raise UserError(f"true CFG is FLUX's; backbone '{backbone.name}' uses --guidance for classifier-free guidance")
    num_steps = num_steps or backbone.spec.steps
    guidance = backbone.spec.guidance if guidance is None else guidance
    size = image_side(backbone, size)  # what the pipeline would pick itself, checked
    schedule = refinement_schedule(num_steps, refine_steps) if refiner is not None else []
    b, m = len(prompts), search.m if search is not None and schedule else 1
    if m > 1:
        if type(pipe.scheduler).__name__ not in SEARCH_SCHEDULERS:
            raise UserError(f"search needs a single-step sampler ({', '.join(SEARCH_SCHEDULERS)}); "
                            f"backbone '{backbone.name}' samples with {type(pipe.scheduler).__name__}")
        if latents is None:  # the noise the pipeline would draw for the B images, then m copies of each
            from diffusers.utils.torch_utils import randn_tensor

            latents = randn_tensor((b, *latent_shape(backbone, size)), generator=generator, device=backbone.device,
                                   dtype=backbone.denoiser.dtype)
        latents = latents.repeat_interleave(m, 0)
        if isinstance(generator, list):  # one per row, as the pipeline checks (stochastic samplers draw from it)
            generator = [g for g in generator for _ in range(m)]
    rows = [p for p in prompts for _ in range(m)]  # row r is image r // m (m = 1: the prompts themselves)
    if isinstance(negative_prompt, str):
        negative_prompt = [negative_prompt] * len(rows)  # the pipeline wants one per prompt
    elif negative_prompt is not None:
        negative_prompt = [p for p in negative_prompt for _ in range(m)]
    uses_negative = true_cfg > 1 if family == "flux" else guidance > 1
    latent_side = size // pipe.vae_scale_factor
    if latents is not None:  # the pipeline moves given latents to its device but keeps their dtype
        latents = latents.to(backbone.device, backbone.denoiser.dtype)
        latents = pack_latents(latents) if family == "flux" else latents
    result = RefinedSample(images=None, latents=None, schedule=schedule, prompts=[prompts])
    decoder = preview_decoder if isinstance(preview_decoder, PreviewDecoder) else None
    if schedule and decoder is None and not blank_preview:
        decoder = PreviewDecoder(preview_decoder, backbone)
    text_length = backbone.spec.text_length if backbone.flow_matching else None
    flux_pooled = {}  # FLUX: the refined prompts' token embeddings and their pooled CLIP embedding
    pending = []  # search: the last refinement's candidates, until their lookahead ends

    def unpacked(x):
        return unpack_latents(x, latent_side) if family == "flux" else x

    def put_in_force(out, scores=None):
        """A refinement's prompts now in force: all of them, or (search) each image's best candidate.
        Returns the row each image continues from, repeated for its m copies."""
        best = torch.zeros(b, dtype=torch.long)
        if scores is not None:
            best = best_candidates(scores)
            result.candidates.append({"prompts": [out.prompts[i * m:(i + 1) * m] for i in range(b)], "scores": scores, "chosen": best})
        if out is not None:
            out = out.rows(torch.arange(b) * m + best) if m > 1 else out
            result.refiner_outputs.append(out)
            result.prompts.append(list(out.prompts))
        return (torch.arange(b) * m + best).repeat_interleave(m)

    def choose(latents, level):
        """Search: score each image's m candidates, keep the best (before the first refinement: its first copy)."""
        if not pending:
            return put_in_force(None)
        scores = torch.as_tensor(search.score(latents, rows, level, m)).float().cpu().reshape(b, m)
        return put_in_force(pending.pop(), scores)

    def on_step_end(pipe, i, t, tensors):
        result.latents = unpacked(tensors["latents"])
        if i + 1 not in schedule:
            return {}
        scheduler, updates = pipe.scheduler, {}
        level = float(scheduler.sigmas[scheduler.step_index]) if backbone.flow_matching else int(scheduler.timesteps[i + 1])
        x0 = unpacked(denoised["x0"])
        if m > 1:  # the candidates of the last refinement have looked ahead to here
            keep = choose(result.latents, level)
            result.latents, x0 = result.latents[keep], x0[keep]
            updates["latents"] = pack_latents(result.latents) if family == "flux" else result.latents
        previews = torch.full((b, 3, 64, 64), 0.5) if blank_preview else decoder(x0[::m])  # one per image
        current = [p for p in result.prompts[-1] for _ in range(m)]
        out = refiner.refine(previews.float().cpu().repeat_interleave(m, 0), rows, current, i + 1, num_steps)
        result.previews.append(previews.float().cpu())
        result.states.append(result.latents[::m].float().cpu())  # what step i + 1 will denoise
        result.state_levels.append(level)
        if m > 1:
            pending.append(out)
        else:
            put_in_force(out)
        new = encode_prompts(pipe, list(out.prompts), text_length)
        for key in tensors:
            if key in new:
                old, value = tensors[key], new[key].to(tensors[key].dtype)
                # with CFG the loop holds cat([negative, positive]); keep the negative half
                updates[key] = torch.cat([old[: len(rows)], value]) if len(old) == 2 * len(rows) else value
        if family == "flux":
            flux_pooled.update(embeds=updates["prompt_embeds"], pooled=new["pooled_prompt_embeds"])
        return updates

    def flux_pooled_projections(module, args, kwargs):
        # FluxPipeline hands prompt_embeds to callback_on_step_end but not pooled_prompt_embeds,
        # which it passes to the transformer as `pooled_projections` on every step. This forward
        # pre-hook (a public torch mechanism; nothing in the pipeline changes) puts the refined
        # prompts' pooled CLIP embedding there, on the calls whose text tokens are the refined
        # prompts' -- the tensor the callback returned -- and not on true CFG's negative pass.
        if "embeds" in flux_pooled and kwargs.get("encoder_hidden_states") is flux_pooled["embeds"]:
            kwargs["pooled_projections"] = flux_pooled["pooled"].to(kwargs["pooled_projections"].dtype)
        return args, kwargs

    text_inputs = {"sd": ["prompt_embeds"], "sdxl": ["prompt_embeds", "add_text_embeds"],
                   "sd3": ["prompt_embeds", "pooled_prompt_embeds"], "flux": ["prompt_embeds"]}[family]
    call_kwargs = dict(
        prompt=rows, num_inference_steps=num_steps, guidance_scale=guidance, generator=generator,
        latents=latents, negative_prompt=negative_prompt if uses_negative else None, output_type="pt",
        callback_on_step_end=on_step_end, callback_on_step_end_tensor_inputs=["latents"] + (text_inputs if schedule else []),
        height=size, width=size,
    )
    if family == "flux":
        call_kwargs["true_cfg_scale"] = true_cfg
    if text_length is not None:
        call_kwargs["max_sequence_length"] = text_length
    hook = backbone.denoiser.register_forward_pre_hook(flux_pooled_projections, with_kwargs=True) if family == "flux" and schedule else None
    try:
        with capture_denoised(pipe.scheduler) as denoised, torch.no_grad():
            result.images = pipe(**call_kwargs).images.float().cpu()
    finally:
        if hook is not None:
            hook.remove()
    if m > 1:  # the last refinement's candidates looked ahead to the end: score the final latents
        keep = choose(result.latents, None)[::m]
        result.images, result.latents = result.images[keep], result.latents[keep]
    return result


def best_of_sample(backbone, prompts, n, score, latents, **kwargs):
    """Best-of-n whole images: n independent (refined) samples per prompt in one batched call, from
    the initial noises `latents` (B, n, C, h, w); `score` (as Search's, level None) picks each
    prompt's best by its final latents. Returns (the best samples, a RefinedSample of B rows;
    scores (B, n)). kwargs go to refined_sample (refiner, refine_steps, ...)."""
    rows = [p for p in prompts for _ in range(n)]
    sample = refined_sample(backbone, rows, latents=latents.flatten(0, 1), **kwargs)
    scores = torch.as_tensor(score(sample.latents, rows, None, n)).float().cpu().reshape(len(prompts), n)
    best = torch.arange(len(prompts)) * n + best_candidates(scores)
    return sample.rows(best), scores


def caption_font(size):
    """PIL's built-in font at `size` px, for the labels of the pictures sample.py and evaluate.py draw."""
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has one bitmap size
        return ImageFont.load_default()


def to_pil(images):
    """(B, 3, H, W) in [0, 1] -> list of PIL images."""
    array = (images.clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy() * 255).round().astype(np.uint8)
    return [Image.fromarray(a) for a in array]


# -----------------------------------------------------------------------------
# prompt sources (text file, Pick-a-Pic captions, toy prompts)
#
#     toy                          the toy grammar's prompts (toy.toy_prompts; splits train / test;
#                                  drawn with `seed`, repeating once all are used)
#     toy-partial | toy-open       those that leave an attribute free | the background free
#     | toy-full                    | those that name everything (see toy_prompts)
#     prompts.txt                  one prompt per line, blank lines skipped (one set: `split` unused)
#     data.parquet | FOLDER        Pick-a-Pic v2 schema, only the `caption` column is read; in a
#                                  folder the files of the split (parquet_split_files) when there
#                                  are such files, else all of them
#     pickapic | HUB_ID            a hub data set via `datasets`, streamed (no full download of
#                                  the images), e.g. yuvalkirstain/pickapic_v2
# Captions are stripped, deduplicated (first occurrence kept, source order), non-strings and
# empty ones skipped and counted.

PROMPT_SOURCES = {"pickapic": "yuvalkirstain/pickapic_v2"}
CAPTION_COLUMN = "caption"


def parquet_split_files(folder, split):
    """The parquet files of one split in a folder: `{split}.parquet`, `{split}-*.parquet` (the hub's
    layout, e.g. data/train-00000-of-00645.parquet) or any file in a subfolder named `split`."""
    files = sorted(Path(folder).rglob("*.parquet"))
    return [f for f in files if re.fullmatch(rf"{re.escape(split)}(-.*)?\.parquet", f.name) or f.parent.name == split]


def _check_caption_column(files):
    import pyarrow.parquet as pq

    for f in files:
        try:
            names = pq.read_schema(f).names
        except Exception as e:  # pyarrow raises its own ArrowInvalid for files that are not parquet
            raise UserError(f"cannot read parquet file '{f}': {str(e).strip().splitlines()[0]}") from e
        if CAPTION_COLUMN not in names:
            raise UserError(f"'{f}' has no '{CAPTION_COLUMN}' column (columns: {', '.join(names[:8])})")


def _caption_rows(source, split):
    """Iterate the raw caption column of a parquet file/folder or a hub data set."""
    import datasets

    try:
        if Path(source).exists():
            files = [source] if Path(source).is_file() else parquet_split_files(source, split) or sorted(Path(source).rglob("*.parquet"))
            files = [str(f) for f in files]
            if not files:
                raise UserError(f"no parquet files in '{source}'")
            _check_caption_column(files)
            rows = datasets.load_dataset("parquet", data_files=files, split="train", columns=[CAPTION_COLUMN])
        else:
            rows = datasets.load_dataset(source, split=split, streaming=True, columns=[CAPTION_COLUMN])
        for row in rows:
            yield row[CAPTION_COLUMN]
    except UserError:
        raise
    except (OSError, ValueError, KeyError, ImportError, datasets.exceptions.DatasetNotFoundError,
            datasets.exceptions.DatasetGenerationError) as e:
        message = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"cannot read captions ('{CAPTION_COLUMN}' column) from '{source}' split '{split}': {message}") from e


def load_prompts(source, split="train", limit=None, seed=0):
    """User prompts from a source (see above) -> list[str], at most `limit` (the first ones).

    seed: draws the toy prompts (the other sources are read in their own order)."""
    if not isinstance(source, str) or not source.strip():
        raise UserError("empty prompt source: use 'toy', a text file, a parquet file/folder or a hub id")
    if limit is not None and limit < 1:
        raise UserError(f"prompt limit must be >= 1, got {limit}")
    import toy

    source = PROMPT_SOURCES.get(source, source)
    if source == "toy" or source.startswith("toy-") and source[4:] in toy.TOY_PROMPT_KINDS:
        try:
            prompts = toy.toy_prompts(split, limit, seed, kind=source[4:] or "all")
        except ValueError as e:
            raise UserError(str(e)) from e
    elif Path(source).is_file() and not source.endswith(".parquet"):
        try:
            lines = Path(source).read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as e:
            raise UserError(f"cannot read prompt file '{source}': {e}") from e
        prompts = _distinct_prompts(lines, limit)[0]
    elif Path(source).exists() or is_hub_id(source):  # parquet or hub id
        prompts, skipped = _distinct_prompts(_caption_rows(source, split), limit)
        if skipped:
            print(f"prompts: skipped {skipped} empty or non-text captions in '{source}'", file=sys.stderr)
    else:
        raise UserError(f"prompt source '{source}' not found: use 'toy', a text file, a parquet file/folder or a hub id")
    if not prompts:
        raise UserError(f"no prompts in '{source}' (split '{split}')")
    return prompts


def _distinct_prompts(rows, limit):
    """Stripped, deduplicated strings in order; stops at `limit`. Returns (prompts, skipped)."""
    seen, prompts, skipped = set(), [], 0
    for row in rows:
        text = " ".join(row.split()) if isinstance(row, str) else ""
        if not text:
            skipped += 1
            continue
        if text not in seen:
            seen.add(text)
            prompts.append(text)
            if limit is not None and len(prompts) >= limit:
                break
    return prompts, skipped


# -----------------------------------------------------------------------------
# training utilities


def seed_everything(seed):
    import random

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def save_checkpoint(path, state):
    """Atomic: write to a temp file in the same folder, then rename over the old one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def resume_checkpoint(path, config, may_change):
    """The checkpoint `--resume` continues from; UserError if there is none (a typo in --out must not
    start a fresh run silently, as nanoGPT and HF Trainer refuse too) or if it was written with a
    different config, apart from the fields in `may_change` (run length, logging, device, ...)."""
    from dataclasses import asdict

    path = Path(path)
    if not path.is_file():
        raise UserError(f"--resume: no checkpoint at {path}")
    state = load_checkpoint(path)
    changed = sorted(k for k, v in asdict(config).items() if k not in may_change and state["config"].get(k) != v)
    if changed:
        raise UserError(f"--resume: {path} was written with a different {', '.join(changed)}")
    return state


def trim_log(path, step):
    """Keep the lines of log.jsonl up to `step` (a resumed run redoes the steps after its checkpoint);
    step 0, a fresh run, keeps none. A line cut short by a kill, or one without a step, is dropped."""
    path = Path(path)
    kept = []
    for line in path.read_text().splitlines() if path.is_file() and step > 0 else []:
        try:
            if json.loads(line)["step"] <= step:
                kept.append(line + "\n")
        except (ValueError, KeyError, TypeError):
            continue
    path.write_text("".join(kept))


@dataclass
class Distributed:
    rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self):
        return self.rank == 0


def setup_distributed(device="auto"):
    """Plain DDP under torchrun (RANK/WORLD_SIZE/LOCAL_RANK set); a single process otherwise.

    nccl on GPUs (one per process), gloo on CPU."""
    if "RANK" not in os.environ:
        return Distributed(0, 1, pick_device(device))
    import torch.distributed as dist

    local_rank = int(os.environ["LOCAL_RANK"])
    use_cuda = torch.cuda.is_available() and device != "cpu"
    if use_cuda:
        torch.cuda.set_device(local_rank)
    dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return Distributed(dist.get_rank(), dist.get_world_size(), torch.device(f"cuda:{local_rank}" if use_cuda else "cpu"))


def barrier(dist_info):
    if dist_info.world_size > 1:
        torch.distributed.barrier()


def all_sum(value, dist_info):
    """Sum of a float over ranks (token counts, reward sums)."""
    tensor = torch.tensor(float(value), dtype=torch.float64, device=dist_info.device)
    if dist_info.world_size > 1:
        torch.distributed.all_reduce(tensor)
    return tensor.item()


def all_reduce_gradients(params, dist_info):
    """Average gradients over ranks (what DDP does; done by hand where a model also runs generate()
    and peft's disable_adapter(), which DDP's forward wrapper does not cover)."""
    if dist_info.world_size == 1:
        return
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        torch.distributed.all_reduce(p.grad, op=torch.distributed.ReduceOp.SUM)
        p.grad /= dist_info.world_size


def all_gather(values, dist_info):
    """(N,) on each rank -> (world * N,) everywhere, on the CPU (for logging over all ranks)."""
    if dist_info.world_size == 1:
        return values
    gathered = [torch.zeros_like(values, device=dist_info.device) for _ in range(dist_info.world_size)]
    torch.distributed.all_gather(gathered, values.to(dist_info.device))
    return torch.cat(gathered).cpu()


def rank_divergence(params, dist_info):
    """Largest |w_rank - w_rank0| over all parameters and ranks: 0.0 when the ranks are in sync."""
    if dist_info.world_size == 1:
        return 0.0
    flat = torch.cat([p.detach().float().flatten() for p in params]).to(dist_info.device)
    reference = flat.clone()
    torch.distributed.broadcast(reference, 0)
    gap = (flat - reference).abs().max()
    torch.distributed.all_reduce(gap, op=torch.distributed.ReduceOp.MAX)
    return gap.item()


def cleanup_distributed(dist_info):
    if dist_info.world_size > 1:
        import torch.distributed as dist

        dist.destroy_process_group()
