"""
search.py: reward-guided refinement at sampling time, and best-of-n whole images.

    Search          refined_sample's hook (promptloop.Hook): at each refinement the refiner proposes
                    M candidate prompts per image, each is continued to the next refinement point
                    (the last one to the end of sampling), a scorer judges the latents reached and
                    each image keeps its best candidate
    best_of_sample  n whole (refined) images per prompt from n initial noises, the best one kept

    python sample.py --backbone toy --refiner toy-refiner --search 4 --lrm LRM_DIR --prompt "a circle"

The scorer is a latent reward model (lrm.search_scorer): no decode, no pixel reward in the loop.
evaluate.py --search 2,4,8 compares the two at the same number of denoiser evaluations.
"""

import math
from dataclasses import dataclass

import torch

from common import UserError, latent_shape
from promptloop import Hook, refined_sample

# single-step samplers: the next state depends on the current latents only, so a search may copy one
# candidate's latents over the others (multistep ones, PNDM or DPM-Solver, keep a history per row)
SEARCH_SCHEDULERS = ("DDIMScheduler", "DDPMScheduler", "LCMScheduler", "FlowMatchEulerDiscreteScheduler")


def best_candidates(scores):
    """(B, m) scores of each image's m candidates -> (B,) index of the best; a NaN score ranks last."""
    return scores.nan_to_num(-math.inf).argmax(1)


@dataclass
class Search(Hook):
    """Reward-guided refinement at sampling time (refined_sample's `hook`; sample.py --search M).

    At each refinement the refiner proposes m candidate prompts per image in one batched call (B*m
    rows, each image's m copies sharing its state); every candidate is continued to the next
    refinement point -- the last one to the end of sampling -- in the same batched loop; `score`
    judges the latents reached and each image keeps its best candidate: its latents replace the
    other copies' and the next refinement starts from them.
      score(latents (R, C, h, w), user_prompts (R,), level, group) -> (R,) scores, higher is better;
      level: the latents' noise level (DDPM timestep or flow sigma, as RefinedSample.state_levels),
      None for the final clean latents; group = m: the rows come as each image's m candidates (a
      scorer that draws noise should give them the same draws).
    Cost: every step runs m rows per image (m x the denoiser evaluations, the same as best-of-m),
    the copies before the first refinement identical (a pipeline's batch is fixed for its loop).
    m = 1 is plain refined sampling, bit for bit, and never calls `score`."""

    m: int
    score: object

    @property
    def copies(self):
        return self.m

    def start(self, backbone, images, latents, generator, size):
        self.pending, self.fresh = [], None  # the last refinement's candidates, until their lookahead ends
        if self.m == 1:
            return latents, generator
        if type(backbone.pipe.scheduler).__name__ not in SEARCH_SCHEDULERS:
            raise UserError(f"search needs a single-step sampler ({', '.join(SEARCH_SCHEDULERS)}); "
                            f"backbone '{backbone.name}' samples with {type(backbone.pipe.scheduler).__name__}")
        if latents is None:  # the noise the pipeline would draw for the B images, then m copies of each
            from diffusers.utils.torch_utils import randn_tensor

            latents = randn_tensor((images, *latent_shape(backbone, size)),
                                   generator=generator, device=backbone.device, dtype=backbone.denoiser.dtype)
        if isinstance(generator, list):  # one per row, as the pipeline checks (stochastic samplers draw from it)
            generator = [g for g in generator for _ in range(self.m)]
        return latents.repeat_interleave(self.m, 0), generator

    def keep(self, result, level):
        """Score each image's m candidates, keep the best (before the first refinement: its first copy)."""
        if self.m == 1:
            return None
        b = len(result.prompts[0])
        best = torch.zeros(b, dtype=torch.long)
        if self.pending:
            rows = [p for p in result.prompts[0] for _ in range(self.m)]
            scores = torch.as_tensor(self.score(result.latents, rows, level, self.m)).float().cpu().reshape(b, self.m)
            best = best_candidates(scores)
            out = self.pending.pop()
            result.candidates.append({"prompts": [out.prompts[i * self.m:(i + 1) * self.m] for i in range(b)],
                                      "scores": scores, "chosen": best})
            # the kept candidates' prompts have been in force since the refinement that proposed them
            result.add_refinement(out.rows(torch.arange(b) * self.m + best), result.schedule[len(result.refiner_outputs)])
        return (torch.arange(b) * self.m + best).repeat_interleave(self.m)

    def refine(self, result, refiner, *args):
        if self.m == 1:
            return super().refine(result, refiner, *args)
        self.fresh = refiner.refine(*args)
        self.pending.append(self.fresh)

    def due(self, result, step):
        """Every candidate's prompt is in force at once (row by row), until its lookahead ends."""
        if self.m == 1:
            return super().due(result, step)
        fresh, self.fresh = self.fresh, None
        return None if fresh is None else fresh.prompts

    def finish(self, result):
        """The last refinement's candidates looked ahead to the end: score the final latents."""
        if self.m > 1:
            keep = self.keep(result, None)[:: self.m]
            result.images, result.latents = result.images[keep], result.latents[keep]


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
