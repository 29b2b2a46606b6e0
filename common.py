"""
common.py: what the promptloop scripts share, and nothing else.

    CLI helpers   one-line user errors, config parsing, the flag groups several scripts share,
                  list flags, device / dtype
    backbones     load SD1.5 / SDXL / SD3.5 / FLUX.1 / toy pipelines by alias, hub id or folder, and
                  their family hooks (what refined sampling needs to know of a family: latent
                  packing, the text inputs a refinement swaps, noise levels, FLUX's pooled embedding)
    pictures      fonts and PIL conversion for the pictures the scripts draw

The large concepts have modules of their own: promptloop.py (refined sampling: the method),
refiners.py (the MLLM policy), search.py (LRM-guided search, best-of-n), rewards.py (the reward
registry), lrm.py (the latent reward model), runs.py (prompt sources, seeding, checkpoints, DDP),
toy.py (the toy world). Nothing here runs on import, and importing it is light: the heavy
libraries are imported inside the functions that need them.
"""

import contextlib
import json
import math
import os
import pickle
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors import SafetensorError

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


def first_line(error):
    """The first line of an exception's message (its type's name if it has none): what a UserError
    quotes of a library's error."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


# What reading a weights or checkpoint file that is cut short, garbled or of another format raises:
# safetensors' SafetensorError (an Exception only), torch.load's RuntimeError (a broken zip),
# UnpicklingError or EOFError (a broken pickle), and OSError / ValueError.
UNREADABLE_ERRORS = (OSError, ValueError, RuntimeError, EOFError, pickle.UnpicklingError, SafetensorError)


def unreadable(error, *paths):
    """'cannot read PATH: reason', for the UserError of a loader that failed on a file with `error`.
    A folder given (a model or adapter read by transformers / peft, whose errors name no file) is
    searched for the .safetensors file whose header safetensors rejects; else the first path is named."""
    from safetensors import safe_open

    def broken(file):
        try:
            with safe_open(str(file), "pt"):
                return False
        except (SafetensorError, OSError):
            return True

    paths = [Path(p) for p in paths if p is not None]
    files = [file for folder in paths if folder.is_dir() for file in sorted(folder.glob("*.safetensors"))]
    culprit = next((file for file in files if broken(file)), paths[0])
    return f"cannot read '{culprit}': {first_line(error)}"


def load_failure(error, *paths):
    """Why a loader failed, for its UserError: a weights file cut short or garbled named (unreadable),
    else the library's first line (not found, a bad config, ...)."""
    broken = isinstance(error, SafetensorError) or not isinstance(error, (OSError, ValueError))
    return unreadable(error, *paths) if broken else first_line(error)


def flag(name):
    """A config field's command-line flag: steps_per_epoch -> --steps-per-epoch."""
    return "--" + name.replace("_", "-")


def parse_config(config_class, args=None):
    """Parse the script's config dataclass from the command line (one flag per field). A float
    flag that is NaN or infinite is a UserError for every script (argparse takes 'nan' as a float)."""
    from dataclasses import fields

    from transformers import HfArgumentParser

    try:
        (config,) = HfArgumentParser(config_class).parse_args_into_dataclasses(args=args)
    except ValueError as e:  # an argument no field takes (argparse's own errors exit 2 with usage)
        raise UserError(first_line(e)) from e
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


@dataclass
class RunFlags:
    """Flags of every script that runs models (mixed into its Config)."""

    seed: int = field(default=0, metadata={"help": "random seed (the script's docstring says what it draws)"})
    device: str = field(default="auto", metadata={"help": "auto (the GPU if there is one) | cpu | cuda | cuda:N"})
    dtype: str = field(default="auto", metadata={"help": "auto (bf16 on GPU, fp32 on CPU) | fp32 | bf16 | fp16"})
    threads: int = field(default=0, metadata={"help": "torch CPU threads; 0 = torch's default (one per core). Numbers of RL runs depend on it: state it with them"})


@dataclass
class SamplingFlags:
    """Flags of the scripts that run refined sampling (sample.py, train_refiner.py, evaluate.py)."""

    t5: bool = field(default=True, metadata={"help": "SD3 only: --t5 false loads it without its T5 encoder (much less memory)"})
    preview_decoder: str = field(default="vae", metadata={"help": "how the refiner's preview of x0_hat is decoded: vae | taesd | linear"})
    preview_size: int = field(default=0, metadata={"help": "side in px of the preview the refiner sees (448 -> 256 vision tokens for Qwen2.5-VL, 224 -> 64); 0 = its default (448 for hub models)"})
    fast_decode: str = field(default="auto", metadata={"help": "refiner decoding on a static KV cache, compiled once per shape: auto (on with a GPU) | on | off"})
    overlap: int = field(default=0, metadata={"help": "D: a refinement's prompts take effect D steps after the preview it read, the refiner running beside the denoiser meanwhile (0 = synchronous)"})


def setup_run(config, device=None):
    """Apply a RunFlags config: torch's CPU threads; returns (device, dtype). device: one chosen
    already (under torchrun, the rank's), else --device's."""
    require(config, non_negative=("threads",))
    if config.threads > 0:
        torch.set_num_threads(config.threads)
    device = device or pick_device(config.device)
    return device, pick_dtype(config.dtype, device)


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


DTYPES = {"auto": None, "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def pick_device(name="auto"):
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(name)
    except RuntimeError as e:
        raise UserError(f"--device: {first_line(e)}") from e


def pick_dtype(name, device):
    """'auto' = bf16 on GPU (fp16 for the SD VAE is fragile), fp32 on CPU."""
    if name not in DTYPES:
        raise UserError(f"--dtype must be one of {', '.join(DTYPES)}, got '{name}'")
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return DTYPES[name]


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


@dataclass(frozen=True)
class Family:
    """What refined sampling (promptloop.refined_sample) needs to know of a pipeline family: its hooks.

    text_inputs:   the callback tensors that carry the prompt, which a refinement swaps (the pooled
                   embedding under the name the pipeline's loop gives it)
    flow_matching: x = (1 - sigma) x0 + sigma eps (SD3, FLUX), not a DDPM schedule
    row_inputs:    other callback tensors with a row per sample, which follow the rows when a hook
                   changes them (SDXL's time ids: they interleave the CFG halves, but refined_sample
                   passes no negative sizes, so every row is the same)"""

    text_inputs: tuple
    flow_matching: bool = False
    row_inputs: tuple = ()

    def pack(self, latents):
        """(B, C, h, w) latents -> what the pipeline's loop holds (the same, but for FLUX)."""
        return latents

    def unpack(self, latents, side):
        return latents

    def noise_level(self, scheduler, step):
        """The noise level of the latents that step `step` denoises: DDPM timestep (int) or flow sigma."""
        if self.flow_matching:
            return float(scheduler.sigmas[scheduler.step_index])
        return int(scheduler.timesteps[step])

    def sampling_kwargs(self, backbone, guidance, true_cfg, negative_prompt):
        """The pipeline call's guidance arguments: classifier-free guidance with the negative
        prompt when guidance > 1 (true_cfg is FLUX's alone); SD3's T5 length."""
        if true_cfg != 1.0:
            raise UserError(f"true CFG is FLUX's; backbone '{backbone.name}' uses --guidance for classifier-free guidance")
        return self._call_kwargs(backbone, guidance, negative_prompt if guidance > 1 else None)

    def _call_kwargs(self, backbone, guidance, negative_prompt, **extra):
        kwargs = dict(guidance_scale=guidance, negative_prompt=negative_prompt, **extra)
        if self.flow_matching and backbone.spec.text_length is not None:  # SD3 / FLUX: the T5 length
            kwargs["max_sequence_length"] = backbone.spec.text_length
        return kwargs

    @contextlib.contextmanager
    def text_swap(self, denoiser):
        """Context for a sampling run whose text conditioning a refinement swaps: yields
        `swapped(updates, encoded=None, rows=None)`, told each swap (the callback's updates,
        encode_prompts' output) and each change of the rows (an index into the rows held)."""
        yield lambda updates, encoded=None, rows=None: None


class FluxFamily(Family):
    """FLUX: latents packed 2x2 into tokens; guidance distilled into the transformer, so CFG is
    `true_cfg_scale` (two passes); the pooled CLIP embedding enters through a forward pre-hook."""

    def pack(self, latents):
        return pack_latents(latents)

    def unpack(self, latents, side):
        return unpack_latents(latents, side)

    def sampling_kwargs(self, backbone, guidance, true_cfg, negative_prompt):
        return self._call_kwargs(backbone, guidance, negative_prompt if true_cfg > 1 else None, true_cfg_scale=true_cfg)

    @contextlib.contextmanager
    def text_swap(self, denoiser):
        # FluxPipeline hands prompt_embeds to callback_on_step_end but not pooled_prompt_embeds,
        # which it passes to the transformer as `pooled_projections` on every step. This forward
        # pre-hook (a public torch mechanism; nothing in the pipeline changes) puts the refined
        # prompts' pooled CLIP embedding there, on the calls whose text tokens are the refined
        # prompts' -- the tensor the callback returned -- and not on true CFG's negative pass.
        # When the loop changes its rows, the tensors the pipeline built before its loop with a row
        # per sample take the same rows here: `guidance`, true CFG's negative text, the pooled embedding.
        refined, own, held = {}, {}, {}  # own: the pipeline's pooled embedding; held["rows"]: its rows the loop holds

        def pooled_projections(module, args, kwargs):
            own.setdefault("pooled", kwargs["pooled_projections"])  # the first call: the pipeline's own text
            rows = held.get("rows")
            if "embeds" in refined and kwargs.get("encoder_hidden_states") is refined["embeds"]:
                kwargs["pooled_projections"] = refined["pooled"].to(kwargs["pooled_projections"].dtype)
            elif rows is not None:  # true CFG's negative pass
                kwargs.update(encoder_hidden_states=kwargs["encoder_hidden_states"][rows], pooled_projections=kwargs["pooled_projections"][rows])
            if rows is not None and kwargs.get("guidance") is not None:
                kwargs["guidance"] = kwargs["guidance"][rows]
            return args, kwargs

        def swapped(updates, encoded=None, rows=None):
            if rows is not None:  # new rows: of the pipeline's own tensors and of the pooled embedding in force
                held["rows"] = rows if "rows" not in held else held["rows"][rows]
                refined["pooled"] = refined.get("pooled", own["pooled"])[rows]
            if encoded is not None:
                refined["pooled"] = encoded["pooled_prompt_embeds"]
            refined["embeds"] = updates["prompt_embeds"]

        hook = denoiser.register_forward_pre_hook(pooled_projections, with_kwargs=True)
        try:
            yield swapped
        finally:
            hook.remove()


FAMILIES = {
    "sd": Family(("prompt_embeds",)),
    "sdxl": Family(("prompt_embeds", "add_text_embeds"), row_inputs=("add_time_ids",)),
    "sd3": Family(("prompt_embeds", "pooled_prompt_embeds"), flow_matching=True),
    "flux": FluxFamily(("prompt_embeds",), flow_matching=True),
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
    def hooks(self):
        """The family's hooks (Family): what refined sampling needs to know of this pipeline."""
        return FAMILIES[self.family]

    @property
    def flow_matching(self):
        """SD3 / FLUX: a flow-matching transformer (x = (1 - sigma) x0 + sigma eps), not a DDPM UNet."""
        return self.hooks.flow_matching

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
    except UNREADABLE_ERRORS as e:  # not found, or a weights file cut short or garbled (named)
        folders = [Path(spec.source, sub) for sub in ("unet", "transformer", "vae", "text_encoder")]
        raise UserError(f"cannot load backbone '{name}' ({spec.source}): {load_failure(e, *folders)}") from e
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
# pictures


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
