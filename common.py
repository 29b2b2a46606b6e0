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
    return os.sep in name or name.startswith(".") or Path(name).exists()


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
        pipe = DiffusionPipeline.from_pretrained(spec.source, torch_dtype=dtype)
        if unet is not None:
            source = ALIGNED_UNETS.get(unet, unet)
            sub = "unet" if not Path(source).is_dir() or (Path(source) / "unet").is_dir() else None
            pipe.unet = UNet2DConditionModel.from_pretrained(source, subfolder=sub, torch_dtype=dtype)
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
                self.tiny = AutoencoderTiny.from_pretrained(source, torch_dtype=self.vae.dtype).to(self.vae.device)
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
        b, c, h, w = x.shape
        features = torch.cat([x.permute(0, 2, 3, 1).reshape(-1, c), torch.ones(b * h * w, 1, device=x.device)], 1)
        rgb = features @ self.linear_map.to(x.device)  # (B*h*w, 3)
        return rgb.reshape(b, h, w, 3).permute(0, 3, 1, 2).clamp(0, 1)


def fit_linear_preview(latents, images):
    """Least-squares affine map latent channels -> RGB: (C+1, 3). Images are pooled to latent size."""
    b, c, h, w = latents.shape
    target = F.adaptive_avg_pool2d(images.float(), (h, w)).permute(0, 2, 3, 1).reshape(-1, 3)
    features = torch.cat([latents.permute(0, 2, 3, 1).reshape(-1, c), torch.ones(b * h * w, 1)], 1)
    return torch.linalg.lstsq(features.cpu(), target.cpu()).solution  # (C+1, 3)


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


ANSWER_PATTERN = re.compile(r"^\s*<prompt>(.*?)</prompt>\s*$", re.DOTALL)


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
        prompt_len = inputs["input_ids"].shape[1]
        forward = {k: v.to(device) for k, v in inputs.items()}
        forward["input_ids"] = torch.cat([forward["input_ids"], completion_ids.to(device)], 1)
        forward["attention_mask"] = torch.cat([forward["attention_mask"], completion_mask.to(device)], 1)
        if "mm_token_type_ids" in forward:  # generated tokens are text (type 0)
            forward["mm_token_type_ids"] = torch.cat([forward["mm_token_type_ids"], torch.zeros_like(completion_ids).to(device)], 1)
        logits = self.model(**forward, use_cache=False).logits[:, prompt_len - 1 : -1]  # (B, T, V)
        logprobs = torch.log_softmax(self._policy_logits(logits), -1)
        return logprobs.gather(-1, completion_ids.to(device).unsqueeze(-1)).squeeze(-1) * completion_mask.to(device)


def load_refiner(name, adapter=None, device="cpu", dtype=torch.float32, **kwargs):
    """'none' -> None (plain sampling); otherwise a Refiner."""
    if name in (None, "", "none"):
        return None
    return Refiner.from_pretrained(name, adapter=adapter, device=device, dtype=dtype, **kwargs)


# -----------------------------------------------------------------------------
# toy world (grammar and weight-free pixel rewards; the artifacts are built by toy.py)


# -----------------------------------------------------------------------------
# prompt sources (text file, Pick-a-Pic captions, toy prompts)


# -----------------------------------------------------------------------------
# rewards


# -----------------------------------------------------------------------------
# latent reward model and preference data


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
