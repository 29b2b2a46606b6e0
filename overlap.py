"""
overlap.py: refinement overlapped with denoising (--overlap D), a refined_sample hook.

The refiner reads the preview of step s and its prompts take effect at step s + D; meanwhile the
denoiser goes on with the prompts in force, so the refiner's time hides under D denoiser steps.
It runs in a worker thread (on a GPU, on a CUDA stream of its own); the sampling loop waits for
it only at step s + D. D = 0 is synchronous refinement: the scripts then pass no hook, and the
run is today's, bit for bit. In GRPO the policy's log-probs stay those of what it said: the delay
is part of the environment (RefinedSample.applied_steps records it).

    python sample.py --backbone toy --refiner toy-refiner --prompt "a circle" --overlap 1

Each refinement's prompts must take effect before the next refinement reads the prompt in force,
and before the last step: s_k + D < s_(k+1) and s_K + D < N (else a UserError).

Left out on purpose: more than one refinement in flight, and on a CPU any gain beyond what a second
core gives (the toy's refiner and denoiser share the machine's cores).
"""

from concurrent.futures import ThreadPoolExecutor

import torch

from common import UserError
from promptloop import Hook


class Overlap(Hook):
    """refined_sample's hook: each refinement runs beside the next D denoiser steps."""

    def __init__(self, delay):
        if delay < 0:
            raise UserError(f"--overlap must be >= 0 steps, got {delay}")
        self.delay, self.pending = delay, None  # pending: (the step its prompts take effect, the refiner's future)

    def check(self, schedule, num_steps):
        for step, after in zip(schedule, schedule[1:] + [num_steps]):
            if step + self.delay >= after:
                raise UserError(f"--overlap {self.delay}: the refinement before step {step} would act at step {step + self.delay}, "
                                f"at or after {'the next refinement' if after < num_steps else 'the end'} (step {after}); "
                                f"use a smaller --overlap or fewer --refine-steps")

    def start(self, backbone, images, latents, generator, size):
        self.pending = None
        self.stream = torch.cuda.Stream(backbone.device) if backbone.device.type == "cuda" else None
        return latents, generator

    def refine(self, result, refiner, *args):
        step = args[-2]  # refine(previews, user_prompts, current_prompts, step, num_steps)
        self.pending = (step + self.delay, refiner_thread().submit(self._refine, refiner, *args))

    def _refine(self, refiner, *args):
        if self.stream is None:
            return refiner.refine(*args)
        with torch.cuda.stream(self.stream):  # beside the denoiser's kernels on the default stream
            out = refiner.refine(*args)
        self.stream.synchronize()
        return out

    def due(self, result, step):
        if self.pending is None or self.pending[0] != step:
            return None
        out, self.pending = self.pending[1].result(), None  # the loop waits here if the refiner is not done
        result.add_refinement(out, step)
        return out.prompts


_WORKER = []


def refiner_thread():
    """The one worker thread every overlapped refinement runs on, made on first use: one refinement
    is in flight at a time, and one thread for a whole run (not one per sampling call) keeps a
    compiled CUDA-graph decode step on the thread it was recorded on."""
    if not _WORKER:
        _WORKER.append(ThreadPoolExecutor(max_workers=1, thread_name_prefix="refiner"))
    return _WORKER[0]


def overlap_hook(delay):
    """The hook of --overlap D: None for D = 0 (synchronous refinement, promptloop's default)."""
    return Overlap(delay) if delay else None
