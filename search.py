"""
search.py: reward-guided refinement at sampling time, and best-of-n whole images.

    Search          refined_sample's hook (promptloop.Hook): at each refinement the refiner proposes
                    M candidate prompts per image, each distinct one is continued to the next
                    refinement point (the last one to the end of sampling), a scorer judges the
                    latents reached and each image keeps its best candidate
    best_of_sample  n whole (refined) images per prompt from n initial noises, the best one kept

    python sample.py --backbone toy --refiner toy-refiner --search 4 --lrm LRM_DIR --prompt "a circle"

The scorer is a latent reward model (lrm.search_scorer): no decode, no pixel reward in the loop.
Both count the denoiser evaluations they make (RefinedSample.evaluations); evaluate.py --search
2,4,8 --best-of 2,3,4,5,6,8 compares them at equal actual cost.
"""

import math
from dataclasses import dataclass

import torch

from common import UserError
from promptloop import Hook, refined_sample

# single-step samplers: the next state depends on the current latents only, so a search may copy one
# candidate's latents over the others (multistep ones, PNDM or DPM-Solver, keep a history per row)
SEARCH_SCHEDULERS = ("DDIMScheduler", "DDPMScheduler", "LCMScheduler", "FlowMatchEulerDiscreteScheduler")


def best_candidates(scores):
    """(B, m) scores of each image's m candidates -> (B,) index of the best; a NaN score ranks last."""
    return scores.nan_to_num(-math.inf).argmax(1)


def distinct_candidates(prompts, m):
    """(B*m,) candidate prompts, each image's m in a row -> the rows to run, one per distinct prompt of
    an image: (first (R,): each row's first candidate, an index into the B*m; slots (B, m): each
    candidate's row, an index into the R). Equal prompts of an image trace the same trajectory.

    >>> distinct_candidates(["a", "b", "a", "c", "c", "c"], 3)
    (tensor([0, 1, 3]), tensor([[0, 1, 0],
            [2, 2, 2]]))"""
    first, slots, row_of = [], [], {}
    for r, prompt in enumerate(prompts):
        if (r // m, prompt) not in row_of:
            row_of[r // m, prompt] = len(first)
            first.append(r)
        slots.append(row_of[r // m, prompt])
    return torch.tensor(first), torch.tensor(slots).reshape(-1, m)


@dataclass
class Search(Hook):
    """Reward-guided refinement at sampling time (refined_sample's `hook`; sample.py --search M).

    Before the first refinement each image runs one row. At each refinement the refiner proposes m
    candidate prompts per image in one batched call; the image's row branches into one row per
    distinct candidate (an image's equal prompts would trace the same trajectory: they run once and
    share their score); every row is continued to the next refinement point -- the last one to the
    end of sampling -- in the same batched loop; `score` judges the latents reached and each image
    goes on from its best candidate, with its prompt. The last judgement is made in the callback of
    the last step, so the pipeline decodes one row per image.
      score(latents (R, C, h, w), user_prompts (R,), level) -> (R,) scores, higher is better;
      level: the latents' noise level (DDPM timestep or flow sigma, as RefinedSample.state_levels),
      None for the final clean latents.
    Cost (RefinedSample.evaluations): one row per image up to the first refinement, then its
    distinct candidates: at most m x the denoiser evaluations of refined sampling after it; the
    refiner's rows are m per image (refiner.refine takes one row per candidate). With a generator
    per image, the rows of an image draw the same step noise (stochastic samplers). m = 1 is plain
    refined sampling, bit for bit, and never calls `score`."""

    m: int
    score: object

    def start(self, backbone, images, latents, generator, size):
        self.pending, self.first, self.slots, self.fresh = None, None, None, None  # the candidates, until judged
        if self.m > 1 and type(backbone.pipe.scheduler).__name__ not in SEARCH_SCHEDULERS:
            raise UserError(f"search needs a single-step sampler ({', '.join(SEARCH_SCHEDULERS)}); "
                            f"backbone '{backbone.name}' samples with {type(backbone.pipe.scheduler).__name__}")
        if self.m > 1 and getattr(backbone.denoiser.config, "time_cond_proj_dim", None) is not None:
            # its pipeline builds the guidance embedding (timestep_cond) with one row per image, before its loop
            raise UserError(f"search cannot change the rows of backbone '{backbone.name}': its UNet embeds the guidance scale")
        return latents, generator

    def keep(self, result, level):
        """Score the rows run since the last refinement, keep each image's best candidate."""
        if self.pending is None:  # m = 1, or no candidates yet: one row per image already
            return None
        b, user = len(result.prompts[0]), result.prompts[0]
        row_scores = torch.as_tensor(self.score(result.latents, [user[r // self.m] for r in self.first.tolist()], level)).float().cpu().reshape(-1)
        scores = row_scores[self.slots]  # (B, m): an image's equal candidates share their row's score
        best = best_candidates(scores)
        out, self.pending = self.pending, None
        result.candidates.append({"prompts": [out.prompts[i * self.m:(i + 1) * self.m] for i in range(b)], "scores": scores, "chosen": best})
        # the kept candidates' prompts have been in force since the refinement that proposed them
        result.add_refinement(out.rows(torch.arange(b) * self.m + best), result.schedule[len(result.refiner_outputs)])
        return self.slots[torch.arange(b), best]

    def refine(self, result, refiner, previews, user_prompts, current_prompts, step, num_steps):
        if self.m == 1:
            return super().refine(result, refiner, previews, user_prompts, current_prompts, step, num_steps)
        def copies(rows):  # (B,) -> (B*m,): each image's m in a row
            return [x for x in rows for _ in range(self.m)]

        self.pending = refiner.refine(previews.repeat_interleave(self.m, 0), copies(user_prompts), copies(current_prompts), step, num_steps)
        self.first, self.slots = distinct_candidates(self.pending.prompts, self.m)
        self.fresh = [self.pending.prompts[r] for r in self.first.tolist()]

    def due(self, result, step):
        """The distinct candidates' prompts are in force at once (row by row), until their lookahead ends."""
        if self.m == 1:
            return super().due(result, step)
        fresh, self.fresh = self.fresh, None
        return fresh

    def branch(self, result):
        """Each image's row branches into its distinct candidates' rows."""
        return None if self.m == 1 else self.first // self.m


def best_of_sample(backbone, prompts, n, score, latents, **kwargs):
    """Best-of-n whole images: n independent (refined) samples per prompt in one batched call, from
    the initial noises `latents` (B, n, C, h, w); `score` (as Search's, level None) picks each
    prompt's best by its final latents. Returns (the best samples, a RefinedSample of B rows whose
    evaluations are all n samples'; scores (B, n)). kwargs go to refined_sample (refiner, refine_steps, ...)."""
    rows = [p for p in prompts for _ in range(n)]
    sample = refined_sample(backbone, rows, latents=latents.flatten(0, 1), **kwargs)
    scores = torch.as_tensor(score(sample.latents, rows, None)).float().cpu().reshape(len(prompts), n)
    best = sample.rows(torch.arange(len(prompts)) * n + best_candidates(scores))
    best.evaluations = sample.evaluations.reshape(len(prompts), n).sum(1)
    return best, scores
