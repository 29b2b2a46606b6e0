"""
promptloop.py: the method -- refined sampling (PromptLoop, arXiv 2510.00430), and nothing else.

While the stock diffusers pipeline samples, a refiner (an MLLM policy, refiners.py) looks at the
decoded denoised estimate x0_hat at K evenly spaced steps and rewrites the prompt used for the
remaining steps:

    refinement_schedule   the K steps, evenly spaced over the N sampling steps
    capture_denoised      x0_hat of each scheduler step (pred_original_sample, or from the model output)
    PreviewDecoder        x0_hat -> RGB preview: the backbone's VAE, TAESD, or a fitted linear map
    encode_prompts        new prompts -> text conditioning, with the pipeline's own encode_prompt
    refined_sample        the loop: the pipeline's own, driven through callback_on_step_end

Extensions plug in beside the loop, never inside it: a pipeline family through its hooks on the
backbone (common.Family: latent packing, the text inputs, FLUX's pooled embedding), and search
or best-of-n (search.py) through refined_sample's `hook` (Hook below). With no refiner a call is
the stock pipeline call, bit for bit. train_refiner.py trains the refiner on these samples (GRPO).

    >>> sample = refined_sample(common.load_backbone("toy"), ["a circle"], refiners.load_refiner("toy-refiner"))
    >>> sample.prompts    # [user prompts, prompts after refinement 1, ..., after refinement K]
Left out on purpose: refining the negative prompt (the paper rewrites the positive prompt only),
image-to-image and inpainting pipelines.
"""

import contextlib
import functools
import inspect
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from common import (
    UNREADABLE_ERRORS,
    UserError,
    image_side,
    load_failure,
    pipeline_family,
)

# -----------------------------------------------------------------------------
# the refinement schedule and the denoised estimate


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


# -----------------------------------------------------------------------------
# previews and prompts


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
            except UNREADABLE_ERRORS as e:
                raise UserError(f"cannot load TAESD '{source}': {load_failure(e, source)}") from e

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


# -----------------------------------------------------------------------------
# refined sampling


@dataclass
class RefinedSample:
    """What refined_sample returns: the images and latents, the prompt trajectory and what the refiner saw."""

    images: torch.Tensor  # (B, 3, H, W) in [0, 1], exactly what the pipeline returned
    latents: torch.Tensor  # (B, C, h, w) final latents (what a latent reward scores)
    schedule: list  # denoising steps before which the prompt was rewritten
    prompts: list  # prompts[k][b]: prompt in force from applied_steps[k - 1] on (prompts[0] = user prompts)
    previews: list = field(default_factory=list)  # previews[k]: (B, 3, h, w) seen at refinement k
    states: list = field(default_factory=list)  # states[k]: (B, C, h, w) noisy latents x_t when refinement k was made
    state_levels: list = field(default_factory=list)  # their noise level: DDPM timestep (int) or flow sigma (float)
    refiner_outputs: list = field(default_factory=list)  # what the refiner returned at each refinement
    applied_steps: list = field(default_factory=list)  # the step from which each refinement's prompts were in force
    candidates: list = field(default_factory=list)  # search: candidates[k] = {"prompts": [[M prompts] per image], "scores": (B, M), "chosen": (B,)}
    evaluations: torch.Tensor = None  # (B,) denoiser evaluations spent on each image: rows x steps (a CFG pair counts once)

    @property
    def final_prompts(self):
        return self.prompts[-1]

    def add_refinement(self, out, step):
        """A refinement's output put in force before `step`: its prompts are the ones from now on."""
        self.refiner_outputs.append(out)
        self.prompts.append(list(out.prompts))
        self.applied_steps.append(step)

    def rows(self, rows):
        """This sample restricted to `rows` (B',): best-of-n keeps each prompt's best image."""
        rows = torch.as_tensor(rows).long()
        return RefinedSample(
            self.images[rows], self.latents[rows], self.schedule, [[p[r] for r in rows.tolist()] for p in self.prompts],
            [x[rows] for x in self.previews], [x[rows] for x in self.states], self.state_levels,
            [out.rows(rows) for out in self.refiner_outputs], self.applied_steps, evaluations=self.evaluations[rows])

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


class Hook:
    """refined_sample's extension point; this default is plain refined sampling: each refinement's
    prompts take effect at once, before the step it was made for.

    The loop holds rows, one per image at first; a hook may change them between two steps (search:
    M candidates per image after a refinement, each image's best one where they are judged), and the
    loop takes the same rows of the latents and of every tensor that carries the batch. An extension
    (search.Search, overlap.Overlap) overrides what it changes:
      check(schedule, num_steps) -- UserError if the extension cannot act on this schedule
      start(backbone, images, latents, generator, size) -> (latents, generator) of the B images
      keep(result, level) -> None, or the rows the sampling goes on with (an index into the rows held,
          one row per image in order): where a refinement reads the latents (result.latents, the rows
          held, at noise level `level`) and after the last step, before the pipeline decodes (level None)
      refine(result, refiner, *args) -- ask the refiner for a refinement (refiner.refine(*args), one row per image)
      due(result, step) -> the prompts that take effect before `step` (one per row after `branch`), or None
      branch(result) -> None, or the rows that due's prompts continue (an index into the rows held, one per prompt)
      finish(result) -- after the pipeline's loop"""

    def check(self, schedule, num_steps):
        pass

    def start(self, backbone, images, latents, generator, size):
        return latents, generator

    def keep(self, result, level):
        return None

    def refine(self, result, refiner, *args):
        self.ready = refiner.refine(*args)

    def due(self, result, step):
        out, self.ready = getattr(self, "ready", None), None
        if out is None:
            return None
        result.add_refinement(out, step)
        return out.prompts

    def branch(self, result):
        return None

    def finish(self, result):
        pass


def _copy_generator(generator):
    return torch.Generator(generator.device).set_state(generator.get_state())


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
    hook=None,
):
    """Sample `prompts` with the stock pipeline; a refiner rewrites them at K evenly spaced steps.

    The pipeline runs its own loop; `callback_on_step_end` (a public diffusers hook) swaps the
    text conditioning after a refinement. At refinement k (before step s_k):
      x0_hat (from the step just taken) -> preview decoder -> refiner(previews, user prompts,
      current prompts, s_k, N) -> new prompts -> encode_prompt -> new prompt_embeds (+ pooled).
    The CFG negative half and SDXL's time ids are kept as the pipeline built them.
    With refiner=None the call is exactly the stock pipeline call (bit-identical images).

    refiner: any object with `refine(previews, user_prompts, current_prompts, step, num_steps)`
             returning an object with `.prompts` (see refiners.Refiner).
    blank_preview: show the refiner a grey image instead of x0_hat (the no-feedback ablation).
    latents: initial noise (B, C, h, w) (common.latent_shape; FLUX's are packed here, as its pipeline wants).
    guidance: the backbone's (BackboneSpec.guidance); true_cfg: FLUX's two-pass CFG (1 = off).
    hook:    an extension (Hook), e.g. search.Search: M candidate refinements per image, the best kept."""
    pipe, family = backbone.pipe, backbone.hooks
    prompts = list(prompts)
    if not prompts or any(not isinstance(p, str) or not p.strip() for p in prompts):
        raise UserError("every prompt must be a non-empty string")
    num_steps = num_steps or backbone.spec.steps
    guidance = backbone.spec.guidance if guidance is None else guidance
    guidance_kwargs = family.sampling_kwargs(backbone, guidance, true_cfg, negative_prompt)
    size = image_side(backbone, size)  # what the pipeline would pick itself, checked
    schedule = refinement_schedule(num_steps, refine_steps) if refiner is not None else []
    hook = hook if hook is not None and schedule else Hook()
    hook.check(schedule, num_steps)
    b = len(prompts)
    latents, generator = hook.start(backbone, b, latents, generator, size)
    if isinstance(generator, list):  # one per row; the loop may change the rows, in this copy of the list
        generator = list(generator)
    if isinstance(guidance_kwargs["negative_prompt"], str):
        guidance_kwargs["negative_prompt"] = [guidance_kwargs["negative_prompt"]] * b  # the pipeline wants one per prompt
    latent_side = size // pipe.vae_scale_factor
    if latents is not None:  # the pipeline moves given latents to its device but keeps their dtype
        latents = family.pack(latents.to(backbone.device, backbone.denoiser.dtype))
    result = RefinedSample(images=None, latents=None, schedule=schedule, prompts=[prompts], evaluations=torch.zeros(b, dtype=torch.long))
    owner = torch.arange(b)  # (R,) the image of each row the loop holds
    decoder = preview_decoder if isinstance(preview_decoder, PreviewDecoder) else None
    if schedule and decoder is None and not blank_preview:
        decoder = PreviewDecoder(preview_decoder, backbone)

    def take_rows(rows, tensors, updates):
        """Go on with `rows` (an index into the rows held): the latents and every tensor of the loop
        that carries the batch take them, with CFG in both halves of cat([negative, positive])."""
        nonlocal owner
        held, rows = len(owner), torch.as_tensor(rows).long()
        owner, result.latents = owner[rows], result.latents[rows]
        for key in ("latents", *family.text_inputs, *family.row_inputs):
            x = updates.get(key, tensors[key])
            updates[key] = torch.cat([x[:held][rows], x[held:][rows]]) if len(x) == 2 * held else x[rows]
        if isinstance(generator, list):  # the pipeline holds this list: a stochastic sampler's step noise, one per row
            generator[:] = [_copy_generator(generator[r]) for r in rows.tolist()]
        swapped(updates, rows=rows)  # what the family passes outside the callback (FLUX: guidance, pooled text)

    def on_step_end(pipe, i, t, tensors):
        result.evaluations += torch.bincount(owner, minlength=b)  # the step just taken ran every row held
        result.latents = family.unpack(tensors["latents"], latent_side)
        updates, refining, keep = {}, i + 1 in schedule, None
        if refining or i + 1 == num_steps:
            level = family.noise_level(pipe.scheduler, i + 1) if refining else None
            keep = hook.keep(result, level)  # search: the candidates have looked ahead to here, each image's best goes on
            if keep is not None:
                take_rows(keep, tensors, updates)
        if refining:
            if not torch.equal(owner, torch.arange(b)):
                raise ValueError("a refinement reads one row per image: a hook's keep must leave them so")
            x0 = family.unpack(denoised["x0"], latent_side)
            previews = torch.full((b, 3, 64, 64), 0.5) if blank_preview else decoder(x0 if keep is None else x0[keep])  # (B, 3, h, w)
            hook.refine(result, refiner, previews.float().cpu(), prompts, result.prompts[-1], i + 1, num_steps)
            result.previews.append(previews.float().cpu())
            result.states.append(result.latents.float().cpu())  # what step i + 1 will denoise
            result.state_levels.append(level)
        new_prompts = hook.due(result, i + 1)  # plain: the refinement just made; overlap: one made D steps ago
        if new_prompts is None:
            return updates
        branch = hook.branch(result)  # search: each image's distinct candidates, each from the image's row
        if branch is not None:
            take_rows(branch, tensors, updates)
        new = encode_prompts(pipe, list(new_prompts), backbone.spec.text_length if backbone.flow_matching else None)
        for key in family.text_inputs:
            old, value = updates.get(key, tensors[key]), new[key].to(tensors[key].dtype)
            # with CFG the loop holds cat([negative, positive]); keep the negative half
            updates[key] = torch.cat([old[: len(value)], value]) if len(old) == 2 * len(value) else value
        swapped(updates, new)
        return updates

    tensor_inputs = ["latents", *family.text_inputs, *family.row_inputs] if schedule else ["latents"]
    call_kwargs = dict(
        prompt=prompts, num_inference_steps=num_steps, generator=generator, latents=latents, output_type="pt",
        callback_on_step_end=on_step_end, callback_on_step_end_tensor_inputs=tensor_inputs,
        height=size, width=size, **guidance_kwargs,
    )
    with family.text_swap(backbone.denoiser) as swapped, capture_denoised(pipe.scheduler) as denoised, torch.no_grad():
        result.images = pipe(**call_kwargs).images.float().cpu()  # the rows held at the end: one per image
    hook.finish(result)
    return result
