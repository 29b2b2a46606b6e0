"""
common.py: what the promptloop scripts share.

    backbones          load SD1.5 / SDXL / SDXL-turbo / toy pipelines by alias or folder
    refined sampling   drive the stock diffusers pipeline, rewrite the prompt at K steps
    refiner            the Qwen2.5-VL policy: chat messages, batched generation, log-probs
    toy world          the toy grammar and weight-free toy rewards (built by toy.py)
    rewards            registry of scorers chosen by name, composites
    latent reward      the diffusion-native latent reward model (LRM)
    training utils     seeding, atomic checkpoints, torchrun/DDP setup

Nothing here runs on import; the scripts (sample.py, train_refiner.py, train_reward.py,
evaluate.py, toy.py, bench.py) import what they need.
"""

import contextlib
import functools
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


def parse_config(config_class, args=None):
    """Parse the script's config dataclass from the command line (one flag per field)."""
    from transformers import HfArgumentParser

    (config,) = HfArgumentParser(config_class).parse_args_into_dataclasses(args=args)
    return config


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
    guidance: float  # default CFG scale (0 = no CFG, as SDXL-turbo wants)
    size: int | None = None  # default image side in pixels (None = the pipeline's own)
    taesd: str | None = None  # tiny preview decoder for this latent space


BACKBONES = {
    "sd15": BackboneSpec("stable-diffusion-v1-5/stable-diffusion-v1-5", 50, 7.5, 512, "madebyollin/taesd"),
    "sdxl": BackboneSpec("stabilityai/stable-diffusion-xl-base-1.0", 50, 5.0, 1024, "madebyollin/taesdxl"),
    "sdxl-turbo": BackboneSpec("stabilityai/sdxl-turbo", 4, 0.0, 512, "madebyollin/taesdxl"),
    # toy backbones: folders built by toy.py; their defaults are in their promptloop.json
    "toy": BackboneSpec(str(TOY_DIR / "toy-sd15"), 20, 4.0),
    "toy-sdxl": BackboneSpec(str(TOY_DIR / "toy-sdxl"), 20, 4.0),
}

# Aligned UNets to put over a base backbone (the paper's composition experiment):
# Diffusion-DPO (Wallace et al.) releases full UNets in diffusers format.
ALIGNED_UNETS = {
    "dpo-sd15": "mhdang/dpo-sd1.5-text2image-v1",
    "dpo-sdxl": "mhdang/dpo-sdxl-text2image-v1",
}


@dataclass
class Backbone:
    pipe: object  # a diffusers StableDiffusionPipeline / StableDiffusionXLPipeline
    name: str
    spec: BackboneSpec

    @property
    def is_sdxl(self):
        return "add_text_embeds" in self.pipe._callback_tensor_inputs

    @property
    def device(self):
        return self.pipe.unet.device


def _looks_like_path(name):
    """A local path rather than a hub id: it exists, is explicit (/, ./, ~) or is deeper than owner/name."""
    return Path(name).exists() or name.startswith((".", "/", "~")) or name.count("/") > 1 or os.sep not in "/" and os.sep in name


def backbone_spec(name):
    """Alias -> spec; a local folder gets defaults from its `promptloop.json` or its pipeline class."""
    if name in BACKBONES:
        spec = BACKBONES[name]
        if not name.startswith("toy"):
            return spec
        if not Path(spec.source).is_dir():
            raise UserError(f"toy backbone '{name}' not built: run `python toy.py` (looked in {spec.source})")
        name = spec.source  # a local folder: defaults come from its promptloop.json
    if not _looks_like_path(name) and "/" not in name:
        raise UserError(f"unknown backbone '{name}': use one of {', '.join(BACKBONES)}, a hub id or a diffusers folder")
    if _looks_like_path(name):
        folder = Path(name)
        if not (folder / "model_index.json").is_file():
            raise UserError(f"backbone folder '{name}' not found or not a diffusers pipeline (no model_index.json)")
        defaults = {}
        if (folder / "promptloop.json").is_file():
            defaults = json.loads((folder / "promptloop.json").read_text())
        else:
            is_xl = "XL" in json.loads((folder / "model_index.json").read_text()).get("_class_name", "")
            defaults = dict(steps=30, guidance=5.0 if is_xl else 7.5)
        return BackboneSpec(str(folder), **defaults)
    return BackboneSpec(name, 30, 7.5)  # any other hub id: SD-like defaults


def load_backbone(name, device="cpu", dtype=torch.float32, unet=None, lora=None):
    """Load a text-to-image pipeline by alias, hub id or folder.

    unet: an aligned UNet to use instead of the base one (alias from ALIGNED_UNETS, hub id
          or folder; a `unet/` subfolder is used when present) -- e.g. Diffusion-DPO.
    lora: a diffusers LoRA (folder or hub id) loaded on the backbone with `load_lora_weights`.
    """
    from diffusers import DiffusionPipeline, UNet2DConditionModel

    spec = backbone_spec(name)
    try:
        pipe = DiffusionPipeline.from_pretrained(spec.source, dtype=dtype)
        if unet is not None:
            source = ALIGNED_UNETS.get(unet, unet)
            sub = "unet" if not Path(source).is_dir() or (Path(source) / "unet").is_dir() else None
            pipe.unet = UNet2DConditionModel.from_pretrained(source, subfolder=sub, dtype=dtype)
        if lora is not None:
            pipe.load_lora_weights(lora)
    except (OSError, ValueError, EnvironmentError) as e:
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"cannot load backbone '{name}' ({spec.source}): {first_line}") from e
    if not hasattr(pipe, "encode_prompt") or "prompt_embeds" not in getattr(pipe, "_callback_tensor_inputs", []):
        raise UserError(f"backbone '{name}' is a {type(pipe).__name__}; promptloop needs an SD1.5/SDXL-style pipeline")
    pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    return Backbone(pipe, name, spec)


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
    (PNDM, DPM-Solver) it is computed from the model output with alpha_bar_t. The wrapper keeps
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
    taesd  AutoencoderTiny (madebyollin/taesd, taesdxl): ~16x cheaper than the VAE at 512 px
    linear a 4->3 affine map fitted once by least squares against the backbone's VAE on the
           first preview it sees; previews at latent resolution, essentially free
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

    @torch.no_grad()
    def _vae_decode(self, x0):
        image = self.vae.decode(x0.to(self.vae.dtype) / self.vae.config.scaling_factor, return_dict=False)[0]
        return (image.float() / 2 + 0.5).clamp(0, 1)

    @torch.no_grad()
    def __call__(self, x0):
        if self.kind == "vae":
            return self._vae_decode(x0)
        if self.kind == "taesd":
            # AutoencoderTiny works on the UNet's latents as they are (its scaling_factor is 1)
            return (self.tiny.decode(x0.to(self.tiny.dtype), return_dict=False)[0].float() / 2 + 0.5).clamp(0, 1)
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
    refiner_outputs: list = field(default_factory=list)  # what the refiner returned at each refinement

    @property
    def final_prompts(self):
        return self.prompts[-1]


def encode_prompts(pipe, prompts):
    """Positive prompt embeddings with the pipeline's own `encode_prompt`.

    Returns {"prompt_embeds": (B, L, D)} plus, for SDXL, {"add_text_embeds": (B, D2)} (pooled)."""
    kwargs = dict(device=pipe._execution_device, num_images_per_prompt=1, do_classifier_free_guidance=False)
    lora_scale = (pipe.cross_attention_kwargs or {}).get("scale") if hasattr(pipe, "cross_attention_kwargs") else None
    clip_skip = getattr(pipe, "clip_skip", None) if hasattr(pipe, "_clip_skip") else None
    if "add_text_embeds" in pipe._callback_tensor_inputs:
        embeds, _, pooled, _ = pipe.encode_prompt(prompts, lora_scale=lora_scale, clip_skip=clip_skip, **kwargs)
        return {"prompt_embeds": embeds, "add_text_embeds": pooled}
    embeds, _ = pipe.encode_prompt(prompts, lora_scale=lora_scale, clip_skip=clip_skip, **kwargs)
    return {"prompt_embeds": embeds}


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
):
    """Sample `prompts` with the stock pipeline; a refiner rewrites them at K evenly spaced steps.

    The pipeline runs its own loop; `callback_on_step_end` (a public diffusers hook) swaps the
    text conditioning after a refinement. At refinement k (before step s_k):
      x0_hat (from the step just taken) -> preview decoder -> refiner(previews, user prompts,
      current prompts, s_k, N) -> new prompts -> encode_prompt -> new prompt_embeds (+ SDXL pooled).
    The CFG negative half and SDXL's time ids are kept as the pipeline built them.
    With refiner=None the call is exactly the stock pipeline call (bit-identical images).

    refiner: any object with `refine(previews, user_prompts, current_prompts, step, num_steps)`
             returning an object with `.prompts` (see Refiner).
    blank_preview: show the refiner a grey image instead of x0_hat (the no-feedback ablation).
    """
    pipe = backbone.pipe
    prompts = list(prompts)
    if not prompts or any(not isinstance(p, str) or not p.strip() for p in prompts):
        raise UserError("every prompt must be a non-empty string")
    num_steps = num_steps or backbone.spec.steps
    guidance = backbone.spec.guidance if guidance is None else guidance
    size = size or backbone.spec.size
    schedule = refinement_schedule(num_steps, refine_steps) if refiner is not None else []
    if isinstance(negative_prompt, str):
        negative_prompt = [negative_prompt] * len(prompts)  # the pipeline wants one per prompt
    if latents is not None:  # the pipeline moves given latents to its device but keeps their dtype
        latents = latents.to(pipe.unet.device, pipe.unet.dtype)
    result = RefinedSample(images=None, latents=None, schedule=schedule, prompts=[prompts])
    decoder = preview_decoder if isinstance(preview_decoder, PreviewDecoder) else None
    if schedule and decoder is None and not blank_preview:
        decoder = PreviewDecoder(preview_decoder, backbone)

    def on_step_end(pipe, i, t, tensors):
        result.latents = tensors["latents"]
        if i + 1 not in schedule:
            return {}
        x0 = denoised["x0"]
        previews = torch.full((len(prompts), 3, 64, 64), 0.5) if blank_preview else decoder(x0)
        out = refiner.refine(previews.float().cpu(), prompts, result.prompts[-1], i + 1, num_steps)
        result.previews.append(previews.float().cpu())
        result.refiner_outputs.append(out)
        result.prompts.append(list(out.prompts))
        new = encode_prompts(pipe, list(out.prompts))
        updates = {}
        for key, value in new.items():
            old = tensors[key]
            # with CFG the loop holds cat([negative, positive]); keep the negative half
            updates[key] = torch.cat([old[: len(prompts)], value.to(old.dtype)]) if pipe.do_classifier_free_guidance else value.to(old.dtype)
        return updates

    tensor_inputs = ["latents"] + (["prompt_embeds"] + (["add_text_embeds"] if backbone.is_sdxl else []) if schedule else [])
    call_kwargs = dict(
        prompt=prompts, num_inference_steps=num_steps, guidance_scale=guidance, generator=generator,
        latents=latents, negative_prompt=negative_prompt if guidance > 1 else None, output_type="pt",
        callback_on_step_end=on_step_end, callback_on_step_end_tensor_inputs=tensor_inputs,
    )
    if size is not None:
        call_kwargs.update(height=size, width=size)
    with capture_denoised(pipe.scheduler) as denoised, torch.no_grad():
        result.images = pipe(**call_kwargs).images.float().cpu()
    return result


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
# refiner: the MLLM policy (Qwen2.5-VL) that rewrites prompts from previews

REFINERS = {
    "qwen2.5-vl-3b": "Qwen/Qwen2.5-VL-3B-Instruct",
    "qwen2.5-vl-7b": "Qwen/Qwen2.5-VL-7B-Instruct",
    "toy-refiner": str(TOY_DIR / "toy-refiner"),
}

REFINER_SYSTEM = (
    "You refine prompts for a text-to-image diffusion model while it is sampling. You see the current "
    "denoised estimate of the image, the user's prompt and the prompt in use. Write the prompt for the "
    "remaining steps: keep everything the user asked for, add or change details so that the final image "
    "is better. Answer only with <prompt>the new prompt</prompt>."
)


def refiner_messages(user_prompt, current_prompt, step, num_steps):
    """Chat messages of one refinement state (the image goes where {"type": "image"} stands)."""
    text = (
        f"User prompt: {user_prompt}\nCurrent prompt: {current_prompt}\n"
        f"Step {step} of {num_steps}. Write the refined prompt."
    )
    return [
        {"role": "system", "content": REFINER_SYSTEM},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]},
    ]


def format_answer(prompt):
    """The answer format the refiner is asked for (and is supervised on in the toy world)."""
    return f"<prompt>{prompt}</prompt>"


ANSWER_PATTERN = re.compile(r"^\s*<prompt>([^<>]*)</prompt>\s*$")


def parse_answer(answer, max_words=60):
    """The refined prompt in an answer, or None (empty, overlong, malformed).

    max_words: CLIP reads 77 tokens; ~60 words is where prompts start being cut off."""
    match = ANSWER_PATTERN.match(answer)
    if match is None:
        return None
    prompt = " ".join(match.group(1).split())
    if not prompt or len(prompt.split()) > max_words:
        return None
    return prompt


@dataclass
class RefinerOutput:
    prompts: list  # the prompts to use next (the current prompt where the answer was unusable)
    answers: list  # raw decoded answers
    fallback: torch.Tensor  # (B,) bool: answer unusable, current prompt kept
    inputs: dict = None  # processor outputs the generation saw (on CPU), for teacher forcing
    completion_ids: torch.Tensor = None  # (B, T) generated tokens, padded
    completion_mask: torch.Tensor = None  # (B, T) 1 up to and including the end token
    logprobs: torch.Tensor = None  # (B, T) log pi(token) at generation time

    @classmethod
    def from_prompts(cls, prompts):
        """The output of a refiner without a model (scripted rules, recorders): well-formed answers."""
        prompts = list(prompts)
        return cls(prompts, [format_answer(p) for p in prompts], torch.zeros(len(prompts), dtype=torch.bool))


class Refiner:
    """Qwen2.5-VL (or any chat VLM with a processor) rewriting prompts, batched.

    The policy is pi(token) = softmax(logits / temperature) with the vision special tokens
    masked out (they must never be generated); `token_logprobs` recomputes exactly that with a
    teacher-forced forward that gets every input the generation got (incl. image_grid_thw and
    mm_token_type_ids, which set Qwen2.5-VL's multimodal rope positions)."""

    VISION_TOKENS = ("<|vision_start|>", "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>")

    def __init__(self, model, processor, temperature=1.0, max_new_tokens=96, do_sample=True, max_words=60,
                 preview_size=None):
        self.model, self.processor = model, processor
        self.temperature, self.max_new_tokens, self.do_sample = temperature, max_new_tokens, do_sample
        self.max_words, self.preview_size = max_words, preview_size
        tokenizer = processor.tokenizer
        tokenizer.padding_side = "left"  # batched generation continues every row at the same column
        self.suppressed = [i for i in tokenizer.convert_tokens_to_ids(list(self.VISION_TOKENS)) if i is not None and i != tokenizer.unk_token_id]
        eos = model.generation_config.eos_token_id
        self.eos_ids = [eos] if isinstance(eos, int) else list(eos)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos_ids[0]

    @classmethod
    def from_pretrained(cls, name, adapter=None, device="cpu", dtype=torch.float32, **kwargs):
        """Load a refiner by alias, hub id or folder; `adapter` is a PEFT LoRA folder.

        A folder that is itself a PEFT adapter (adapter_config.json) is loaded over its base."""
        from transformers import AutoModelForImageTextToText, AutoProcessor

        source = REFINERS.get(name, name)
        if name in REFINERS and name.startswith("toy") and not Path(source).is_dir():
            raise UserError(f"toy refiner not built: run `python toy.py` (looked in {source})")
        if _looks_like_path(source) and not Path(source).is_dir():
            raise UserError(f"refiner folder '{name}' not found")
        if Path(source, "adapter_config.json").is_file() and adapter is None:
            adapter = source
            source = json.loads(Path(source, "adapter_config.json").read_text())["base_model_name_or_path"]
            source = REFINERS.get(source, source)
        try:
            processor = AutoProcessor.from_pretrained(adapter if adapter and Path(adapter, "tokenizer_config.json").is_file() else source)
            model = AutoModelForImageTextToText.from_pretrained(source, dtype=dtype)
            if adapter is not None:
                from peft import PeftModel

                model = PeftModel.from_pretrained(model, adapter)
        except (OSError, ValueError) as e:
            raise UserError(f"cannot load refiner '{name}': {str(e).strip().splitlines()[0]}") from e
        if len(processor.tokenizer) < 1000 and not Path(source).is_dir():
            # transformers 5 + HF_HUB_OFFLINE can hand back a near-empty tokenizer from a hub id
            raise UserError(f"refiner '{name}': tokenizer has only {len(processor.tokenizer)} tokens (offline without a cache?)")
        if "preview_size" not in kwargs and not Path(source).is_dir():
            kwargs["preview_size"] = 448  # 448 px -> 16x16 merged vision tokens for Qwen2.5-VL
        return cls(model.to(device).eval(), processor, **kwargs)

    def _inputs(self, previews, user_prompts, current_prompts, step, num_steps):
        images = to_pil(previews)
        if self.preview_size:
            images = [im.resize((self.preview_size, self.preview_size), Image.BICUBIC) for im in images]
        texts = [
            self.processor.apply_chat_template(refiner_messages(u, c, step, num_steps), tokenize=False, add_generation_prompt=True)
            for u, c in zip(user_prompts, current_prompts)
        ]
        return self.processor(text=texts, images=images, padding=True, return_tensors="pt")

    def _policy_logits(self, logits):
        logits = logits.float()
        logits[..., self.suppressed] = -math.inf
        return logits / self.temperature

    @torch.no_grad()
    def refine(self, previews, user_prompts, current_prompts, step, num_steps):
        from transformers import GenerationConfig

        inputs = self._inputs(previews, user_prompts, current_prompts, step, num_steps)
        device = self.model.device
        config = GenerationConfig(
            do_sample=self.do_sample, temperature=self.temperature if self.do_sample else None, top_k=None, top_p=None,
            max_new_tokens=self.max_new_tokens, eos_token_id=self.eos_ids, pad_token_id=self.pad_id,
            suppress_tokens=self.suppressed, output_logits=True, return_dict_in_generate=True,
        )
        out = self.model.generate(**{k: v.to(device) for k, v in inputs.items()}, generation_config=config)
        completion = out.sequences[:, inputs["input_ids"].shape[1]:].cpu()  # (B, T)
        # mask: tokens up to and including the first end token
        is_end = torch.isin(completion, torch.tensor(self.eos_ids))
        after_end = (is_end.cumsum(1) - is_end.long()) > 0
        mask = ~after_end
        logits = torch.stack(out.logits, 1).cpu()  # (B, T, V) raw logits at each generated position
        logprobs = torch.log_softmax(self._policy_logits(logits), -1).gather(-1, completion.unsqueeze(-1)).squeeze(-1)
        logprobs = logprobs.masked_fill(~mask, 0.0)
        completion = completion.masked_fill(~mask, self.pad_id)
        answers = self.processor.tokenizer.batch_decode(completion, skip_special_tokens=True)
        prompts, fallback = [], []
        for answer, current in zip(answers, current_prompts):
            parsed = parse_answer(answer, self.max_words)
            fallback.append(parsed is None)
            prompts.append(current if parsed is None else parsed)
        return RefinerOutput(prompts, answers, torch.tensor(fallback), dict(inputs), completion, mask.long(), logprobs)

    def token_logprobs(self, inputs, completion_ids, completion_mask):
        """Teacher-forced log pi(completion | inputs): (B, T); differentiable (no no_grad here)."""
        device = self.model.device
        forward = {k: v.to(device) for k, v in inputs.items()}
        forward["input_ids"] = torch.cat([forward["input_ids"], completion_ids.to(device)], 1)
        forward["attention_mask"] = torch.cat([forward["attention_mask"], completion_mask.to(device)], 1)
        if "mm_token_type_ids" in forward:  # generated tokens are text (type 0)
            forward["mm_token_type_ids"] = torch.cat([forward["mm_token_type_ids"], torch.zeros_like(completion_ids).to(device)], 1)
        # only the T+1 last positions' logits: the full-sequence logits (vocab 152k) would dominate memory
        steps = completion_ids.shape[1]
        logits = self.model(**forward, use_cache=False, logits_to_keep=steps + 1).logits[:, :-1]  # (B, T, V)
        logprobs = torch.log_softmax(self._policy_logits(logits), -1)
        return logprobs.gather(-1, completion_ids.to(device).unsqueeze(-1)).squeeze(-1) * completion_mask.to(device)


def load_refiner(name, adapter=None, device="cpu", dtype=torch.float32, **kwargs):
    """'none' -> None (plain sampling); otherwise a Refiner."""
    if name in (None, "", "none"):
        return None
    return Refiner.from_pretrained(name, adapter=adapter, device=device, dtype=dtype, **kwargs)


# -----------------------------------------------------------------------------
# toy world (grammar and weight-free pixel rewards; the artifacts are built by toy.py)
#
# A toy image is one shape (circle, square, triangle) of one colour and size, centred on a plain
# background of another colour. Captions come from a closed grammar; the shape is always named,
# size, colour and background may be left out ("a circle", "a red square", ...):
#     a [small|large] [<colour>] <shape> [on a <colour> background]
# An attribute the caption leaves out is drawn at random by the data set, so the backbones learn
# to leave it free. The background is settled in the first sampling steps and cannot be repainted
# by a later prompt; the shape's colour and size can. So a refiner that *sees* the emerging image
# can choose a shape colour that suits the background it finds there.

TOY_COLOURS = {  # name -> RGB in [0, 1]; far apart in RGB and spread in luminance
    "red": (0.85, 0.10, 0.10),
    "green": (0.10, 0.65, 0.15),
    "blue": (0.10, 0.20, 0.85),
    "yellow": (0.95, 0.85, 0.10),
    "white": (0.95, 0.95, 0.95),
    "black": (0.05, 0.05, 0.05),
}
TOY_SHAPES = ("circle", "square", "triangle")
TOY_SIZES = {"small": 0.20, "large": 0.36}  # half-extent of the shape as a fraction of the image side
TOY_WORDS = ["a", "on", "background", *TOY_SIZES, *TOY_COLOURS, *TOY_SHAPES]  # whole-word tokens


def toy_caption(shape, colour=None, size=None, background=None):
    """Caption of the toy grammar; None leaves an attribute out."""
    words = ["a"] + [w for w in (size, colour) if w] + [shape]
    if background:
        words += ["on", "a", background, "background"]
    return " ".join(words)


def parse_toy_prompt(prompt):
    """The attributes a prompt names: a dict with some of shape, colour, size, background.

    Tolerant of extra words (refined prompts may add some): the background is the colour word
    right before "background", the shape colour the first other colour word before the shape."""
    words = re.findall(r"[a-z]+", prompt.lower())
    named = {}
    background_at = None
    for i, word in enumerate(words):
        if word == "background" and i > 0 and words[i - 1] in TOY_COLOURS:
            background_at = i - 1
            named["background"] = words[i - 1]
            break
    shape_at = next((i for i, w in enumerate(words) if w in TOY_SHAPES), None)
    if shape_at is not None:
        named["shape"] = words[shape_at]
    for i, word in enumerate(words[: shape_at if shape_at is not None else len(words)]):
        if word in TOY_COLOURS and i != background_at and "colour" not in named:
            named["colour"] = word
        if word in TOY_SIZES and "size" not in named:
            named["size"] = word
    return named


def _all_toy_captions():
    captions = []
    for shape in TOY_SHAPES:
        for size in (None, *TOY_SIZES):
            for colour in (None, *TOY_COLOURS):
                for background in (None, *TOY_COLOURS):
                    if colour is None or colour != background:
                        captions.append(toy_caption(shape, colour, size, background))
    return captions


def _names_everything(named):
    return all(k in named for k in ("size", "colour", "background"))


TOY_PROMPT_KINDS = {  # which user prompts of the grammar a kind selects (from the attributes it names)
    "all": lambda named: True,
    "full": _names_everything,
    "partial": lambda named: not _names_everything(named),
    "open": lambda named: "background" not in named,  # as users mostly write: the background left free
}


def toy_prompts(split="train", n=None, seed=0, kind="all"):
    """User prompts of the toy world, split once and for all (20% held out as "test").

    kind: "all", "partial" (leaves size, colour or background free: room for refinement),
          "full" (names all three) or "open" (leaves the background free: only a refiner that
          sees the preview knows which background it got). n: draw n prompts (without
          replacement while possible) with `seed`.
    The split is a fixed permutation, independent of `seed`, so train and test never overlap."""
    import random

    if split not in ("train", "test"):
        raise UserError(f"toy prompt split must be 'train' or 'test', got '{split}'")
    if kind not in TOY_PROMPT_KINDS:
        raise UserError(f"toy prompt kind must be one of {', '.join(TOY_PROMPT_KINDS)}, got '{kind}'")
    captions = _all_toy_captions()
    random.Random(1234).shuffle(captions)
    n_test = len(captions) // 5
    chosen = captions[:n_test] if split == "test" else captions[n_test:]
    chosen = [c for c in chosen if TOY_PROMPT_KINDS[kind](parse_toy_prompt(c))]
    chosen = sorted(chosen)
    if n is None:
        return chosen
    rng = random.Random(seed)
    out = []
    while len(out) < n:
        out += rng.sample(chosen, min(len(chosen), n - len(out)))
    return out


def _luminance(rgb):
    return rgb @ torch.tensor([0.299, 0.587, 0.114], dtype=rgb.dtype)


def toy_contrast(rgb_a, rgb_b):
    """Perceived contrast of two colours (..., 3) -> (...) in [0, 1]: half colour distance, half luminance."""
    colour = (rgb_a - rgb_b).norm(dim=-1) / math.sqrt(3)
    return 0.5 * colour + 0.5 * (_luminance(rgb_a) - _luminance(rgb_b)).abs()


def _nearest_toy_colour(rgb):
    palette = torch.tensor(list(TOY_COLOURS.values()), dtype=rgb.dtype)
    return list(TOY_COLOURS)[int((palette - rgb).norm(dim=-1).argmin())]


@torch.no_grad()
def toy_analyze(images, border=2):
    """Read a toy image from its pixels. images: (B, 3, H, W) in [0, 1].

    Background = median colour of a `border`-pixel frame. Shape mask = pixels farther from it
    than half the largest distance (so a faint shape is still found; its faintness is the
    contrast). Returns a list of dicts: background / colour (nearest palette names), shape,
    size, area (mask fraction), extent (bbox side / image side), contrast, clean (1 = uniform
    background frame, 0 = blotchy)."""
    images = images.detach().float().cpu().clamp(0, 1)
    b, _, h, w = images.shape
    frame = torch.ones(h, w, dtype=torch.bool)
    frame[border:h - border, border:w - border] = False
    results = []
    for image in images:
        pixels = image.permute(1, 2, 0)  # (H, W, 3)
        background = pixels[frame].median(dim=0).values  # (3,)
        distance = (pixels - background).norm(dim=-1)  # (H, W)
        # non-uniform frame = a background that changed its mind half way (or noise)
        frame_spread = distance[frame].mean().item()
        clean = max(0.0, 1.0 - frame_spread / 0.3)  # two backgrounds half and half: ~0.3-0.5
        # the shape never reaches the frame: frame pixels are left out of the mask, so a decoder's
        # rim artefacts along the image edge cannot stretch the shape's bounding box
        inner = distance.masked_fill(frame, 0.0)
        peak = inner.flatten().quantile(0.99).item()  # robust to a few outlier pixels
        mask = inner > max(0.5 * peak, 0.1) if peak > 0.15 else torch.zeros(h, w, dtype=torch.bool)
        area = mask.float().mean().item()
        info = dict(background=_nearest_toy_colour(background), area=area, clean=clean, contrast=0.0,
                    colour=None, shape=None, size=None, extent=0.0)
        if mask.sum() >= 4:
            rows = torch.where(mask.sum(1) >= 1)[0]
            cols = torch.where(mask.sum(0) >= 1)[0]
            top, bottom, left, right = rows.min().item(), rows.max().item(), cols.min().item(), cols.max().item()
            height, width = bottom - top + 1, right - left + 1
            shape_rgb = pixels[mask].mean(0)
            # shape from the mask: fill of its bounding box (square 1, circle pi/4, triangle 1/2)
            # and the width of its top third vs its bottom third (a triangle points up)
            fill = mask[top:bottom + 1, left:right + 1].float().mean().item()
            third = max(1, height // 3)
            top_width = mask[top:top + third].float().sum(1).mean().item()
            bottom_width = mask[bottom + 1 - third:bottom + 1].float().sum(1).mean().item()
            if top_width < 0.65 * bottom_width:
                shape = "triangle"
            elif fill > 0.88:
                shape = "square"
            else:
                shape = "circle"
            extent = max(height / h, width / w)
            info.update(colour=_nearest_toy_colour(shape_rgb), shape=shape, extent=extent,
                        size="large" if extent > 0.56 else "small",
                        contrast=toy_contrast(shape_rgb, background).item())
        results.append(info)
    return results


def toy_aesthetic(images, prompts=None, **_):
    """Toy "aesthetic" on pixels, (B, 3, H, W) in [0, 1] -> (B,) float32 in [0, 1].

    (0.6 contrast(shape, background) + 0.4 min(1, area / 0.3)) x (0.5 + 0.5 clean):
    a large shape that stands out on a clean background scores high. The prompt is ignored.
    What a refiner can learn: add "large"; choose a shape colour that contrasts with the
    background (the best one depends on it: white on black, black on white). The toy
    backbones settle the background in their first steps (toy.py, `background_settles`): after
    that a prompt can no longer repaint it, but can still recolour and resize the shape. So when
    the user leaves the background free, only a refiner that *sees* it in the preview can pick
    the right colour; a blind one can only guess (see toy.py, stage "measure")."""
    scores = [
        (0.6 * r["contrast"] + 0.4 * min(1.0, r["area"] / 0.3)) * (0.5 + 0.5 * r["clean"])
        for r in toy_analyze(images)
    ]
    return torch.tensor(scores, dtype=torch.float32)


def toy_faithfulness(images, prompts, **_):
    """Toy faithfulness to the (user) prompt: the fraction of attributes the prompt names that
    the image shows (shape, colour, size, background). (B,) float32 in [0, 1]; a prompt naming
    nothing of the grammar scores 1."""
    if len(prompts) != len(images):
        raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
    scores = []
    for found, prompt in zip(toy_analyze(images), prompts):
        named = parse_toy_prompt(prompt)
        scores.append(sum(found[k] == v for k, v in named.items()) / len(named) if named else 1.0)
    return torch.tensor(scores, dtype=torch.float32)


TOY_REWARDS = {"toy-aesthetic": toy_aesthetic, "toy-faithful": toy_faithfulness}


# -----------------------------------------------------------------------------
# prompt sources (text file, Pick-a-Pic captions, toy prompts)
#
#     toy                          the toy grammar's prompts (toy_prompts; splits train / test;
#                                  drawn with `seed`, repeating once all are used)
#     toy-partial | toy-open       those that leave an attribute free | the background free
#     | toy-full                    | those that name everything (see toy_prompts)
#     prompts.txt                  one prompt per line, blank lines skipped (one set: `split` unused)
#     data.parquet | FOLDER        Pick-a-Pic v2 schema, only the `caption` column is read; in a
#                                  folder the files named after the split (train-*.parquet,
#                                  test.parquet, ...) when there are such files, else all of them
#     pickapic | HUB_ID            a hub data set via `datasets`, streamed (no full download of
#                                  the images), e.g. yuvalkirstain/pickapic_v2
# Captions are stripped, deduplicated (first occurrence kept, source order), non-strings and
# empty ones skipped and counted.

PROMPT_SOURCES = {"pickapic": "yuvalkirstain/pickapic_v2"}
CAPTION_COLUMN = "caption"


def _parquet_files(folder, split):
    files = sorted(Path(folder).rglob("*.parquet"))
    named = [f for f in files if re.match(rf"{re.escape(split)}([-_.]|$)", f.name) or f.parent.name == split]
    return named if named else files


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
            files = [str(source)] if Path(source).is_file() else [str(f) for f in _parquet_files(source, split)]
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
    source = PROMPT_SOURCES.get(source, source)
    if source == "toy" or source.startswith("toy-") and source[4:] in TOY_PROMPT_KINDS:
        prompts = toy_prompts(split, limit, seed, kind=source[4:] or "all")
    elif Path(source).is_file() and not source.endswith(".parquet"):
        try:
            lines = Path(source).read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as e:
            raise UserError(f"cannot read prompt file '{source}': {e}") from e
        prompts = _distinct_prompts(lines, limit)[0]
    elif Path(source).exists() or re.fullmatch(r"[\w.-]+/[\w.-]+", source):  # parquet or hub id
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
# rewards
#
# A reward function scores a batch, one number per sample:
#     fn(images, prompts, *, refined_prompts=None, answers=None, latents=None) -> (B,) float32, CPU
# images: (B, 3, H, W) in [0, 1] (any device); prompts: the *user* prompts; refined_prompts: the
# prompts finally used; answers: the refiner's raw answers; latents: the backbone's final latents.
# REWARDS maps a name to a small factory(arg, device, dtype) -> fn, where `arg` is the optional
# ":ARG" of the spec (a local folder/file instead of the hub id, the LRM path, ...). A spec such
# as "imagereward:1,vlm:0.5,length:0.1,structure:0.1" is a weighted sum (build_reward).
#
# Non-finite scores are never averaged away: a sample whose weighted sum is NaN/inf gets NaN,
# Reward.last_nonfinite counts them (and a RuntimeWarning says which term produced them), and
# callers skip those samples (e.g. `torch.isfinite(rewards)`).


def _as_scores(values, batch_size, label):
    """Anything a scorer returns -> (B,) float32 on CPU, detached; a wrong shape is a bug."""
    scores = torch.as_tensor(values).detach().float().cpu().reshape(-1)
    if scores.shape != (batch_size,):
        raise ValueError(f"reward '{label}' returned {tuple(scores.shape)} scores for a batch of {batch_size}")
    return scores


def _no_arg(name, arg):
    if arg is not None:
        raise UserError(f"reward '{name}' takes no argument, got '{arg}' (a weight must be a number)")


def _uses(fn, *inputs):
    """Tag a reward function with the inputs it reads (so callers can skip e.g. the VAE decode)."""
    fn.reward_inputs = frozenset(inputs)
    return fn


def jpeg_sizes(images, quality=95):
    """Size in kB of each image saved as JPEG: DDPO's (in)compressibility measure. (B,)"""
    import io

    sizes = []
    for image in to_pil(images):
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=quality)
        sizes.append(buffer.tell() / 1000)
    return torch.tensor(sizes, dtype=torch.float32)


def jpeg_reward(arg, device, dtype, sign=-1.0):
    """jpeg = compressibility = -size in kB; jpeg-incompressibility = +size in kB (weight-free)."""
    _no_arg("jpeg", arg)
    return _uses(lambda images, prompts, **_: sign * jpeg_sizes(images), "images")


def length_score(num_tokens, budget=77):
    """Refined-prompt length against the text encoder's budget: 1 while the prompt fits, falling
    linearly to 0 at twice the budget (tokens past the budget are cut off and cannot steer the image).
    num_tokens: (B,) counts including the begin/end tokens."""
    return (2.0 - num_tokens.float() / budget).clamp(0.0, 1.0)


def load_clip_tokenizer(source=None):
    """CLIP tokenizer by hub id or folder; a backbone alias (e.g. `toy`, `sd15`) or a diffusers
    pipeline folder gives the pipeline's own `tokenizer/`."""
    from transformers import AutoTokenizer

    source = source or "openai/clip-vit-large-patch14"
    is_backbone = source in BACKBONES
    source = BACKBONES[source].source if is_backbone else source
    subfolder = "tokenizer" if is_backbone or Path(source, "tokenizer").is_dir() else ""
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, subfolder=subfolder)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot load tokenizer '{source}': {str(e).strip().splitlines()[0]}") from e
    if len(tokenizer) < 1000 and not Path(source).is_dir():
        # transformers 5 + HF_HUB_OFFLINE can hand back a near-empty tokenizer from a hub id
        raise UserError(f"tokenizer '{source}' has only {len(tokenizer)} tokens (offline without a cache?)")
    return tokenizer


def length_reward(arg, device, dtype):
    """length[:BACKBONE|TOKENIZER]: scores the refined prompt (the user prompt when there is none)
    with length_score; the budget is the tokenizer's model_max_length (77 for CLIP). Default: the
    CLIP ViT-L/14 tokenizer (SD1.5's); `length:toy` reads the toy backbone's, offline."""
    tokenizer = load_clip_tokenizer(arg)

    def fn(images, prompts, *, refined_prompts=None, **_):
        texts = list(refined_prompts if refined_prompts is not None else prompts)
        counts = torch.tensor([len(ids) for ids in tokenizer(texts, truncation=False)["input_ids"]])
        return length_score(counts, tokenizer.model_max_length)

    return _uses(fn, "refined_prompts")


def structure_score(answers):
    """1 if an answer followed the required format (parse_answer accepts it), else 0.

    answers: one answer per sample (answers[b]), or one list per refinement (answers[k][b], as
    RefinedSample.prompts), in which case a sample scores the fraction of its answers that did.
    A missing answer (None) did not follow the format."""
    if answers and isinstance(answers[0], (list, tuple)):
        per_step = torch.stack([structure_score(step) for step in answers])  # (K, B)
        return per_step.mean(0)
    return torch.tensor([float(isinstance(a, str) and parse_answer(a) is not None) for a in answers], dtype=torch.float32)


def structure_reward(arg, device, dtype):
    _no_arg("structure", arg)

    def fn(images, prompts, *, answers=None, **_):
        if answers is None:
            raise UserError("reward 'structure' scores the refiner's answers: it needs a refiner")
        return structure_score(answers)

    return _uses(fn, "answers")


def toy_reward(name):
    """Factory of a toy reward; TOY_REWARDS is looked up when the reward is built."""

    def factory(arg, device, dtype):
        _no_arg(name, arg)
        table = globals().get("TOY_REWARDS", {})
        if name not in table:
            raise UserError(f"toy reward '{name}' is not defined (known toy rewards: {', '.join(table) or 'none'})")
        score = table[name]
        return _uses(lambda images, prompts, **_: score(images, prompts), "images")

    return factory


def lrm_factory(arg, device, dtype):
    """lrm:PATH -> the latent reward model saved by train_reward.py, scoring final latents."""
    if not arg:
        raise UserError("reward 'lrm' needs the path of a trained latent reward model: lrm:PATH")
    if "lrm_reward" not in globals():
        raise UserError("the latent reward model (lrm_reward) is not available in this version of common.py")
    fn = globals()["lrm_reward"](arg, device, dtype)
    if not hasattr(fn, "reward_inputs"):
        _uses(fn, "latents")
    return fn


# --- real scorers: official checkpoints, official preprocessing -----------------------------------
# Every scorer takes the images as the official code takes them, as 8-bit PIL images (to_pil),
# and preprocesses them exactly as that code does; the weights are read with safetensors or
# torch.load(weights_only=True) only.

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # openai/CLIP's normalisation (also BLIP's)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def _load_error(what, source, error):
    lines = str(error).strip().splitlines()
    return UserError(f"cannot load {what} '{source}': {lines[0] if lines else type(error).__name__}")


def _weights_file(source, filename, repo):
    """A local file, `filename` inside a local folder, or the file from hub repo `repo`."""
    if source is not None and Path(source).is_file():
        return str(source)
    if source is not None and Path(source, filename).is_file():
        return str(Path(source, filename))
    if source is not None and (Path(source).exists() or source.startswith((".", "/", "~")) or source.count("/") != 1):
        raise UserError(f"'{source}' is neither a weights file nor a folder holding {filename}")
    from huggingface_hub import hf_hub_download

    try:
        return hf_hub_download(source or repo, filename)
    except Exception as e:  # offline, missing file, no such repo: one clear line
        raise _load_error(f"{filename} from", source or repo, e) from e


def load_weights(path):
    """A state dict from .safetensors or a torch file (weights_only); {'state_dict': sd} unwrapped."""
    if str(path).endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path)
    state = torch.load(path, map_location="cpu", weights_only=True)
    return state.get("state_dict", state) if isinstance(state, dict) else state


def _openai_clip_transform(size):
    """openai/CLIP's `_transform` (clip.load), also ImageReward's: PIL bicubic resize of the short
    side, centre crop, to tensor, normalise."""
    from torchvision import transforms as T

    return T.Compose([
        T.Resize(size, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(size),
        T.Lambda(lambda image: image.convert("RGB")), T.ToTensor(), T.Normalize(CLIP_MEAN, CLIP_STD),
    ])


def _pixels(images, transform, device, dtype):
    """(B, 3, H, W) in [0, 1] -> 8-bit PIL -> official transform -> (B, 3, S, S) on device."""
    return torch.stack([transform(image) for image in to_pil(images)]).to(device, dtype)


def _pooled(output):
    """get_image/text_features returns a tensor (transformers 4) or an output with .pooler_output (5)."""
    return output if torch.is_tensor(output) else output.pooler_output


def aesthetic_mlp(input_size=768):
    """The LAION improved aesthetic predictor v2 head (sac+logos+ava1-l14-linearMSE: no activations;
    the same head, on BLIP text features, is ImageReward's). Dropout is inactive in eval mode."""
    return torch.nn.Sequential(
        torch.nn.Linear(input_size, 1024), torch.nn.Dropout(0.2), torch.nn.Linear(1024, 128), torch.nn.Dropout(0.2),
        torch.nn.Linear(128, 64), torch.nn.Dropout(0.1), torch.nn.Linear(64, 16), torch.nn.Linear(16, 1),
    )


def _clip_model(source, device, dtype, what):
    from transformers import CLIPModel

    try:
        return CLIPModel.from_pretrained(source, dtype=dtype).to(device).eval()
    except (OSError, ValueError) as e:
        raise _load_error(what, source, e) from e


def _processor(source, what):
    from transformers import AutoProcessor

    try:
        processor = AutoProcessor.from_pretrained(source)
    except (OSError, ValueError) as e:
        raise _load_error(f"{what} processor", source, e) from e
    if len(processor.tokenizer) < 1000 and not Path(source).is_dir():
        raise UserError(f"{what} processor '{source}': tokenizer has only {len(processor.tokenizer)} tokens (offline without a cache?)")
    return processor


def clip_embeddings(model, processor, images, prompts):
    """L2-normalised CLIP image and text embeddings, (B, D) each, as the official PickScore code
    computes them (processor on PIL images; text padded, truncated to 77 tokens)."""
    device, dtype = model.device, model.dtype
    pixel_values = processor(images=to_pil(images), return_tensors="pt")["pixel_values"].to(device, dtype)
    text = processor(text=list(prompts), padding=True, truncation=True, max_length=77, return_tensors="pt").to(device)
    image_embeds = _pooled(model.get_image_features(pixel_values=pixel_values)).float()
    text_embeds = _pooled(model.get_text_features(input_ids=text["input_ids"], attention_mask=text["attention_mask"])).float()
    return F.normalize(image_embeds, dim=-1), F.normalize(text_embeds, dim=-1)


def clip_reward(arg, device, dtype):
    """clip[:FOLDER]: CLIP score 100 * max(cos(image, prompt), 0) (Hessel et al.'s CLIPScore without
    the 2.5 rescaling, as torchmetrics reports it) with openai/clip-vit-large-patch14."""
    source = arg or "openai/clip-vit-large-patch14"
    model, processor = _clip_model(source, device, dtype, "CLIP"), _processor(source, "CLIP")

    @torch.no_grad()
    def fn(images, prompts, **_):
        image_embeds, text_embeds = clip_embeddings(model, processor, images, prompts)
        return 100 * (image_embeds * text_embeds).sum(-1).clamp(min=0)

    return _uses(fn, "images")


def pickscore_reward(arg, device, dtype):
    """pickscore[:FOLDER]: PickScore v1 = logit_scale.exp() * cos(image, prompt), its official code
    (yuvalkirstain/PickScore_v1, processor laion/CLIP-ViT-H-14-laion2B-s32B-b79K)."""
    source = arg or "yuvalkirstain/PickScore_v1"
    has_processor = arg is not None and any(Path(source, f).is_file() for f in ("preprocessor_config.json", "processor_config.json"))
    processor = _processor(source if has_processor else "laion/CLIP-ViT-H-14-laion2B-s32B-b79K", "PickScore")
    model = _clip_model(source, device, dtype, "PickScore")

    @torch.no_grad()
    def fn(images, prompts, **_):
        image_embeds, text_embeds = clip_embeddings(model, processor, images, prompts)
        return model.logit_scale.exp().float() * (image_embeds * text_embeds).sum(-1)

    return _uses(fn, "images")


AESTHETIC_HEAD = ("camenduru/improved-aesthetic-predictor", "sac+logos+ava1-l14-linearMSE.pth")


def aesthetic_reward(arg, device, dtype):
    """aesthetic[:FOLDER]: LAION improved aesthetic predictor v2 (simple_inference.py): the CLIP
    ViT-L/14 image embedding (openai/CLIP preprocessing), L2-normalised, through the MLP head.
    FOLDER holds a transformers CLIP ViT-L/14 and sac+logos+ava1-l14-linearMSE.pth."""
    clip_source = arg or "openai/clip-vit-large-patch14"
    head_file = _weights_file(arg or AESTHETIC_HEAD[0], AESTHETIC_HEAD[1], AESTHETIC_HEAD[0])
    model = _clip_model(clip_source, device, dtype, "CLIP ViT-L/14")
    head = aesthetic_mlp(model.config.projection_dim)
    head.load_state_dict({k.removeprefix("layers."): v for k, v in load_weights(head_file).items()})
    head = head.to(device, torch.float32).eval()
    transform = _openai_clip_transform(model.config.vision_config.image_size)

    @torch.no_grad()
    def fn(images, prompts, **_):
        embeds = _pooled(model.get_image_features(pixel_values=_pixels(images, transform, device, dtype))).float()
        return head(F.normalize(embeds, dim=-1)).squeeze(-1)

    return _uses(fn, "images")


def hps_transform(size):
    """HPSv2's validation transform, as img_score.py builds it (its open_clip fork's
    image_transform(resize_longest_max=True)): to tensor *first*, bicubic resize of the *long* side
    to `size`, zero padding to a centred square (no crop), normalise."""
    from torchvision.transforms import functional as TF

    def transform(image):
        pixels = TF.to_tensor(image.convert("RGB"))  # (3, H, W)
        height, width = pixels.shape[1:]
        scale = size / max(height, width)
        if scale != 1.0:
            new_height, new_width = round(height * scale), round(width * scale)
            pixels = TF.resize(pixels, [new_height, new_width], TF.InterpolationMode.BICUBIC)
            pad_h, pad_w = size - new_height, size - new_width
            pixels = TF.pad(pixels, [pad_w // 2, pad_h // 2, pad_w - pad_w // 2, pad_h - pad_h // 2], fill=0)
        return TF.normalize(pixels, CLIP_MEAN, CLIP_STD)

    return transform


def load_hps_model(checkpoint, model_name="ViT-H-14", device="cpu", dtype=torch.float32):
    """open_clip `model_name` with the HPSv2 checkpoint's weights (all of them: strict load)."""
    import open_clip

    model = open_clip.create_model(model_name, pretrained=None)
    model.load_state_dict(load_weights(checkpoint), strict=True)
    return model.to(device, dtype).eval(), open_clip.get_tokenizer(model_name)


def hps_scorer(model, tokenizer, device, dtype):
    """HPSv2 score = cos(image, prompt) of the fine-tuned open_clip model (img_score.py: image_features
    @ text_features.T, both already normalised by the model, diagonal)."""
    transform = hps_transform(model.visual.image_size[0])

    @torch.no_grad()
    def fn(images, prompts, **_):
        image_features = model.encode_image(_pixels(images, transform, device, dtype), normalize=True)
        text_features = model.encode_text(tokenizer(list(prompts)).to(device), normalize=True)
        return (image_features.float() * text_features.float()).sum(-1)

    return _uses(fn, "images")


def hpsv2_reward(arg, device, dtype):
    """hpsv2[:FILE]: HPS v2.1 (xswu/HPSv2 HPS_v2.1_compressed.pt) on open_clip ViT-H-14."""
    checkpoint = _weights_file(arg, "HPS_v2.1_compressed.pt", "xswu/HPSv2")
    return hps_scorer(*load_hps_model(checkpoint, "ViT-H-14", device, dtype), device, dtype)


# ImageReward = BLIP ViT-L/16 image encoder + BERT-base text encoder with cross-attention to the
# image tokens (the BLIP "med" text encoder) + the aesthetic MLP head on the [CLS] feature,
# standardised with the official mean/std. transformers' BlipVisionModel / BlipTextModel are ports
# of exactly these BLIP modules; imagereward_state_dict maps the official tensor names onto them.
IMAGEREWARD_MEAN, IMAGEREWARD_STD = 0.16717362830052426, 1.0333394966054072
IMAGEREWARD_TEXT = dict(  # BLIP's med_config.json (bert-base-uncased + [DEC] + [ENC] tokens)
    vocab_size=30524, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
    max_position_embeddings=512, layer_norm_eps=1e-12, hidden_act="gelu", pad_token_id=0,
)
IMAGEREWARD_VISION = dict(  # BLIP create_vit("large", 224): ViT-L/16, timm LayerNorm eps 1e-6
    hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16, image_size=224,
    patch_size=16, layer_norm_eps=1e-6, hidden_act="gelu",
)
# official tensors ImageReward.score never reads (BLIP's contrastive projections, a fixed buffer)
IMAGEREWARD_UNUSED = ("blip.vision_proj.", "blip.text_proj.", "blip.text_encoder.embeddings.position_ids")


class ImageRewardModel(torch.nn.Module):
    def __init__(self, text_config=None, vision_config=None):
        super().__init__()
        from transformers import BlipTextConfig, BlipVisionConfig
        from transformers.models.blip.modeling_blip import BlipVisionModel
        from transformers.models.blip.modeling_blip_text import BlipTextModel

        vision = BlipVisionConfig(**(vision_config or IMAGEREWARD_VISION))
        text = BlipTextConfig(**(text_config or IMAGEREWARD_TEXT), encoder_hidden_size=vision.hidden_size)
        self.vision = BlipVisionModel(vision)
        self.text = BlipTextModel(text, add_pooling_layer=False)
        self.mlp = aesthetic_mlp(text.hidden_size)

    def forward(self, pixel_values, input_ids, attention_mask):
        image_embeds = self.vision(pixel_values=pixel_values).last_hidden_state  # (B, 1+N, 1024)
        image_mask = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=image_embeds.device)
        text = self.text(input_ids=input_ids, attention_mask=attention_mask, encoder_hidden_states=image_embeds,
                         encoder_attention_mask=image_mask).last_hidden_state  # (B, L, 768)
        reward = self.mlp(text[:, 0].float()).squeeze(-1)  # the [CLS] feature
        return (reward - IMAGEREWARD_MEAN) / IMAGEREWARD_STD


def _imagereward_name(name):
    """Official ImageReward.pt tensor name -> ImageRewardModel name (None: not used by the score)."""
    if name.startswith(IMAGEREWARD_UNUSED):
        return None
    if name.startswith("mlp.layers."):
        return "mlp." + name.removeprefix("mlp.layers.")
    if name.startswith("blip.text_encoder."):
        return "text." + name.removeprefix("blip.text_encoder.")  # the med BERT *is* BlipTextModel
    if not name.startswith("blip.visual_encoder."):
        raise KeyError(f"unexpected tensor in an ImageReward checkpoint: {name}")
    name = name.removeprefix("blip.visual_encoder.")
    fixed = {"cls_token": "embeddings.class_embedding", "pos_embed": "embeddings.position_embedding",
             "patch_embed.proj.weight": "embeddings.patch_embedding.weight",
             "patch_embed.proj.bias": "embeddings.patch_embedding.bias",
             "norm.weight": "post_layernorm.weight", "norm.bias": "post_layernorm.bias"}
    if name in fixed:
        return "vision." + fixed[name]
    match = re.fullmatch(r"blocks\.(\d+)\.(.+)\.(weight|bias)", name)
    renames = {"norm1": "layer_norm1", "norm2": "layer_norm2", "attn.qkv": "self_attn.qkv",
               "attn.proj": "self_attn.projection", "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2"}
    if match is None or match.group(2) not in renames:
        raise KeyError(f"unexpected tensor in an ImageReward checkpoint: blip.visual_encoder.{name}")
    block, module, kind = match.groups()
    return f"vision.encoder.layers.{block}.{renames[module]}.{kind}"


def imagereward_state_dict(official):
    """Official ImageReward.pt state dict -> ImageRewardModel state dict (every used tensor mapped)."""
    return {new: value for name, value in official.items() if (new := _imagereward_name(name)) is not None}


def load_imagereward_tokenizer(source="google-bert/bert-base-uncased"):
    """BLIP's init_tokenizer: bert-base-uncased + bos [DEC] + additional [ENC]."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError) as e:
        raise _load_error("ImageReward tokenizer", source, e) from e
    if len(tokenizer) < 1000 and not Path(source).is_dir():
        raise UserError(f"tokenizer '{source}' has only {len(tokenizer)} tokens (offline without a cache?)")
    tokenizer.add_special_tokens({"bos_token": "[DEC]", "additional_special_tokens": ["[ENC]"]})
    return tokenizer


def imagereward_scorer(model, tokenizer, device, dtype):
    """ImageReward.score, batched: prompts padded to 35 tokens, images through BLIP's transform."""
    transform = _openai_clip_transform(model.vision.config.image_size)
    model.mlp.float()  # the official head runs in float32 on .float() features

    @torch.no_grad()
    def fn(images, prompts, **_):
        text = tokenizer(list(prompts), padding="max_length", truncation=True, max_length=35, return_tensors="pt").to(device)
        return model(_pixels(images, transform, device, dtype), text["input_ids"], text["attention_mask"])

    return _uses(fn, "images")


def load_imagereward(source=None, device="cpu", dtype=torch.float32, vision_config=None):
    """(ImageRewardModel, tokenizer) as the official ImageReward.load builds them: ImageReward.pt and
    med_config.json from THUDM/ImageReward (or a local folder holding them, optionally with the
    bert-base-uncased tokenizer files; or the .pt file itself). vision_config: ViT-L/16 unless given."""
    checkpoint = _weights_file(source, "ImageReward.pt", "THUDM/ImageReward")
    folder = Path(checkpoint).parent if source is not None else None
    if folder is not None and (folder / "med_config.json").is_file():
        med_config = json.loads((folder / "med_config.json").read_text())
    else:
        med_config = json.loads(Path(_weights_file(None, "med_config.json", "THUDM/ImageReward")).read_text())
    text_config = {k: med_config[k] for k in IMAGEREWARD_TEXT if k in med_config}
    model = ImageRewardModel(text_config, vision_config)
    model.load_state_dict(imagereward_state_dict(load_weights(checkpoint)), strict=True)
    has_tokenizer = folder is not None and any((folder / f).is_file() for f in ("vocab.txt", "tokenizer.json"))
    tokenizer = load_imagereward_tokenizer(str(folder) if has_tokenizer else "google-bert/bert-base-uncased")
    return model.to(device, dtype).eval(), tokenizer


def imagereward_reward(arg, device, dtype):
    """imagereward[:FILE|FOLDER]: THUDM/ImageReward (BLIP ViT-L + med BERT + MLP)."""
    return imagereward_scorer(*load_imagereward(arg, device, dtype), device, dtype)


# --- the VLM judge --------------------------------------------------------------------------------
# A local chat VLM (default Qwen2.5-VL-3B-Instruct, the refiner's base) replaces the paper's
# proprietary judge: it is asked for a 0-9 rating of how well the image matches the user prompt,
# and the score is the expected rating under its next-token distribution restricted to the ten
# digit tokens, from one forward pass (smoother than a sampled rating), scaled to [0, 1].

VLM_JUDGE_QUESTION = (
    "Rate how well this image matches the description \"{prompt}\", from 0 (not at all) to 9 "
    "(perfectly). Answer with a single digit."
)


def vlm_judge_messages(prompt):
    return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": VLM_JUDGE_QUESTION.format(prompt=prompt)}]}]


def expected_rating(digit_logits):
    """(B, 10) logits of the tokens "0".."9" -> (B,) expected rating / 9, in [0, 1]."""
    probs = torch.softmax(digit_logits.float(), -1)
    return (probs * torch.arange(10, dtype=probs.dtype, device=probs.device)).sum(-1) / 9


class VLMJudge:
    def __init__(self, model, processor, image_size=None):
        self.model, self.processor, self.image_size = model, processor, image_size
        tokenizer = processor.tokenizer
        tokenizer.padding_side = "left"  # every row's last column is then its answer position
        self.digit_ids = []
        for digit in "0123456789":
            ids = tokenizer.encode(digit, add_special_tokens=False)
            if len(ids) != 1:
                raise UserError(f"VLM judge: the tokenizer has no single token for '{digit}'")
            self.digit_ids.append(ids[0])

    @torch.no_grad()
    def __call__(self, images, prompts, **_):
        pil = to_pil(images)
        if self.image_size:
            pil = [image.resize((self.image_size, self.image_size), Image.BICUBIC) for image in pil]
        texts = [self.processor.apply_chat_template(vlm_judge_messages(p), tokenize=False, add_generation_prompt=True)
                 for p in prompts]
        inputs = self.processor(text=texts, images=pil, padding=True, return_tensors="pt").to(self.model.device)
        logits = self.model(**inputs, logits_to_keep=1).logits[:, -1]  # (B, V) next-token logits
        return expected_rating(logits[:, self.digit_ids])


def vlm_reward(arg, device, dtype):
    """vlm[:ID|FOLDER]: the local VLM judge (default Qwen/Qwen2.5-VL-3B-Instruct)."""
    from transformers import AutoModelForImageTextToText

    source = arg or "Qwen/Qwen2.5-VL-3B-Instruct"
    processor = _processor(source, "VLM judge")
    try:
        model = AutoModelForImageTextToText.from_pretrained(source, dtype=dtype).to(device).eval()
    except (OSError, ValueError) as e:
        raise _load_error("VLM judge", source, e) from e
    # hub models see 448 px (16x16 merged vision tokens for Qwen2.5-VL); a folder uses its processor's own
    judge = VLMJudge(model, processor, image_size=None if Path(source).is_dir() else 448)
    return _uses(judge, "images")


REWARDS = {
    "imagereward": imagereward_reward,
    "hpsv2": hpsv2_reward,
    "aesthetic": aesthetic_reward,
    "pickscore": pickscore_reward,
    "clip": clip_reward,
    "vlm": vlm_reward,
    "jpeg": jpeg_reward,
    "jpeg-incompressibility": functools.partial(jpeg_reward, sign=1.0),
    "length": length_reward,
    "structure": structure_reward,
    "toy-aesthetic": toy_reward("toy-aesthetic"),
    "toy-faithful": toy_reward("toy-faithful"),
    "lrm": lrm_factory,
}


@dataclass
class RewardTerm:
    name: str
    arg: str | None
    weight: float

    @property
    def label(self):
        return self.name if self.arg is None else f"{self.name}:{self.arg}"


def _valid_names():
    return ", ".join(REWARDS)


def parse_reward_spec(spec):
    """'name', 'name:WEIGHT', 'name:ARG' or 'name:ARG:WEIGHT', comma-separated -> [RewardTerm].

    The last ':' part is a weight when it is a number; e.g. 'imagereward:1,vlm:0.5',
    'lrm:runs/lrm', 'lrm:runs/lrm:0.5'. Weights may be 0 (a term that is only logged)."""
    if not isinstance(spec, str) or not spec.strip():
        raise UserError(f"empty reward spec: use a name or a weighted sum such as 'imagereward:1,length:0.1' of: {_valid_names()}")
    terms = []
    for part in spec.split(","):
        name, *rest = [piece.strip() for piece in part.strip().split(":")]
        if not name:
            raise UserError(f"empty term in reward spec '{spec}': valid names are {_valid_names()}")
        if name not in REWARDS:
            raise UserError(f"unknown reward '{name}' in '{spec}': valid names are {_valid_names()}")
        weight = 1.0
        if rest:
            try:
                weight = float(rest[-1])
                rest = rest[:-1]
            except ValueError:
                if len(rest) > 1:  # name:ARG:WEIGHT with a weight that is not a number
                    raise UserError(f"bad weight '{rest[-1]}' for reward '{name}' in '{spec}': must be a number") from None
            if not math.isfinite(weight):
                raise UserError(f"bad weight '{weight}' for reward '{name}' in '{spec}': must be finite")
        arg = ":".join(rest) if rest else None
        if arg == "":
            raise UserError(f"empty argument for reward '{name}' in '{spec}'")
        terms.append(RewardTerm(name, arg, weight))
    return terms


class Reward:
    """A weighted sum of reward terms, callable like a reward function -> (B,) float32 on CPU.

    After each call: last_terms[label] = (B,) scores of each term (for logging), last_nonfinite =
    number of samples whose sum is NaN/inf (they are NaN in the result; skip them)."""

    def __init__(self, terms, fns, spec=""):
        self.terms, self.fns, self.spec = terms, fns, spec
        self.last_terms, self.last_nonfinite = {}, 0

    @property
    def inputs(self):
        """What the terms read: a subset of {"images", "refined_prompts", "answers", "latents"}."""
        return frozenset().union(*(getattr(fn, "reward_inputs", {"images"}) for fn in self.fns))

    @torch.no_grad()
    def __call__(self, images, prompts, *, refined_prompts=None, answers=None, latents=None):
        batch_size = len(prompts)
        total = torch.zeros(batch_size)
        self.last_terms, bad = {}, {}
        for term, fn in zip(self.terms, self.fns):
            scores = _as_scores(
                fn(images, prompts, refined_prompts=refined_prompts, answers=answers, latents=latents),
                batch_size, term.label,
            )
            self.last_terms[term.label] = scores
            if not torch.isfinite(scores).all():
                bad[term.label] = int((~torch.isfinite(scores)).sum())
            if term.weight != 0:  # a weight-0 term is only logged: its NaNs must not void the sum
                total = total + term.weight * scores
        nonfinite = ~torch.isfinite(total)
        total[nonfinite] = math.nan  # +inf - inf, inf * w, ...: all become "skip this sample"
        self.last_nonfinite = int(nonfinite.sum())
        if bad:
            import warnings

            counts = ", ".join(f"{label}: {n}" for label, n in bad.items())
            warnings.warn(f"reward '{self.spec}': {self.last_nonfinite}/{batch_size} samples have a "
                          f"non-finite reward ({counts}); they are NaN and must be skipped", RuntimeWarning)
        return total

    def term_means(self):
        """{label: mean over the finite scores of the last call} for one-line logs."""
        return {label: s[torch.isfinite(s)].mean().item() if torch.isfinite(s).any() else math.nan
                for label, s in self.last_terms.items()}


def build_reward(spec, device="cpu", dtype=torch.float32):
    """A Reward from a spec (see parse_reward_spec); bad specs raise UserError listing the names."""
    terms = parse_reward_spec(spec)
    fns = [REWARDS[term.name](term.arg, pick_device(device) if isinstance(device, str) else device, dtype)
           for term in terms]
    return Reward(terms, fns, spec)


# -----------------------------------------------------------------------------
# latent reward model and preference data

# Pick-a-Pic v2 (Kirstain et al. 2023): a caption, two JPEGs (bytes), label_0/label_1 in
# {1/0, 0/1, 0.5/0.5 = tie}; has_label / are_different flag rows that carry no preference.
PICKAPIC_HUB_ID = "yuvalkirstain/pickapic_v2"
PREFERENCE_COLUMNS = ("caption", "jpg_0", "jpg_1", "label_0")
PREFERENCE_LOSSES = ("thurstone-nll", "thurstone-fidelity", "bradley-terry")


def preference_data_files(source, split):
    """Local parquet files of one split, or None when `source` is a hub id.

    A file is used for any split; a folder needs `{split}.parquet` or `{split}-*.parquet`
    (the hub's own layout, e.g. data/train-00000-of-00645.parquet)."""
    path = Path(source)
    if path.is_file():
        return [str(path)]
    if path.is_dir():
        files = sorted({*path.glob(f"{split}.parquet"), *path.glob(f"**/{split}-*.parquet")})
        if not files:
            raise UserError(f"no parquet files for split '{split}' in '{source}' ({split}.parquet or {split}-*.parquet)")
        return [str(f) for f in files]
    if source.startswith((".", os.sep, "~")) or source.endswith(".parquet") or source.count("/") != 1:
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
    """PIL -> (3, size, size) in [-1, 1]: resize the short side, center crop (the VAE's input range)."""
    from torchvision.transforms.functional import center_crop, pil_to_tensor, resize

    x = center_crop(resize(pil_to_tensor(image), size, antialias=True), size)
    return x.float() / 127.5 - 1


@torch.no_grad()
def encode_latents(vae, pixels):
    """(B, 3, H, W) in [-1, 1] -> the UNet's latents (B, C, H/f, W/f): posterior mean x scaling factor."""
    posterior = vae.encode(pixels.to(vae.device, vae.dtype)).latent_dist
    latents = posterior.mean
    shift = getattr(vae.config, "shift_factor", None)
    if shift is not None:
        latents = latents - shift
    return latents * vae.config.scaling_factor


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
        """(B, F): channel mean, std and 2x2-grid means of each down block's and the mid block's output."""
        pooled = []

        def pool(output):
            # down blocks return (h, residuals); residuals[-2] is h before the downsampler (twice the resolution)
            h = (output[1][-2] if isinstance(output, tuple) and len(output[1]) > 1 else
                 output[0] if isinstance(output, tuple) else output).float()
            # a 2x2 grid of means keeps a coarse layout that global pooling loses; centre vs. ring
            # separates the subject from its surroundings
            hh, ww = h.shape[-2:]
            centre = torch.zeros(hh, ww, dtype=torch.bool, device=h.device)
            centre[hh // 4:hh - hh // 4, ww // 4:ww - ww // 4] = True
            pooled.extend([h.mean((2, 3)), h.std((2, 3)), F.adaptive_avg_pool2d(h, 2).flatten(1),
                           h[..., centre].mean(-1), h[..., ~centre].mean(-1)])

        def stop(module, inputs, output):
            pool(output)
            raise _StopUNet

        hooks = [block.register_forward_hook(lambda m, i, o: pool(o)) for block in self.unet.down_blocks]
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


def cleanup_distributed(dist_info):
    if dist_info.world_size > 1:
        import torch.distributed as dist

        dist.destroy_process_group()
