"""The extensions made for the GPU, checked on the CPU: refinement overlapped with denoising
(--overlap D, overlap.py) and the compiled decode step's fallback when compiling fails."""

import pytest
import torch
from test_sampling import PROMPTS, STEPS, ScriptedRefiner, seeded

import common
import overlap
import promptloop
import refiners
import rewards

GUIDANCE = 4.0


def conditioning_per_step(backbone, hook, script):
    """(the sample, the text conditioning (2B, L, D) of every UNet call, the refiner's steps)."""
    records, refiner = [], ScriptedRefiner(script)
    handle = backbone.pipe.unet.register_forward_pre_hook(
        lambda module, args, kwargs: records.append(kwargs["encoder_hidden_states"].clone()), with_kwargs=True)
    try:
        result = promptloop.refined_sample(backbone, PROMPTS, refiner, refine_steps=2, num_steps=STEPS, guidance=GUIDANCE,
                                           generator=seeded(), hook=hook)
    finally:
        handle.remove()
    return result, records, [call["step"] for call in refiner.calls]


@torch.no_grad()
def test_overlap_applies_each_refinement_d_steps_after_its_preview(sd15):
    """With --overlap 1 the refiner reads the preview before step s (the same preview as without
    overlap), and the UNet gets the refined prompts from step s + 1 on, the old ones at step s."""
    script = [["a green triangle", "a small red square"], ["a large blue circle", "a triangle on a red background"]]
    sync, sync_records, sync_steps = conditioning_per_step(sd15, None, script)
    late, late_records, late_steps = conditioning_per_step(sd15, overlap.Overlap(1), script)
    assert sync.schedule == late.schedule == sync_steps == late_steps == [3, 5]
    assert sync.applied_steps == [3, 5] and late.applied_steps == [4, 6]
    assert torch.equal(sync.previews[0], late.previews[0])  # the first preview precedes any refinement
    encoded = {k: torch.cat(sd15.pipe.encode_prompt(p, "cpu", 1, True)[::-1]) for k, p in enumerate([PROMPTS] + script)}
    for step in range(STEPS):
        want_sync = encoded[sum(step >= s for s in sync.applied_steps)]
        want_late = encoded[sum(step >= s for s in late.applied_steps)]
        assert torch.equal(sync_records[step], want_sync), step
        assert torch.equal(late_records[step], want_late), step
    assert not torch.equal(sync.images, late.images)


def test_overlap_zero_in_a_thread_is_synchronous_refinement_bit_for_bit(sd15, refiner):
    """Overlap(0) runs the refiner in its worker thread but waits for it at once: the same images and
    prompts as the synchronous loop (--overlap 0 passes no hook at all: overlap_hook(0) is None)."""
    assert overlap.overlap_hook(0) is None
    runs = []
    for hook in (None, overlap.Overlap(0)):
        torch.manual_seed(0)  # the refiner samples with the global generator
        runs.append(promptloop.refined_sample(sd15, PROMPTS, refiner, refine_steps=2, num_steps=STEPS, generator=seeded(), hook=hook))
    assert torch.equal(runs[0].images, runs[1].images) and runs[0].prompts == runs[1].prompts
    assert runs[0].applied_steps == runs[1].applied_steps == runs[0].schedule


@pytest.mark.parametrize("refine_steps, delay, message", [(2, -1, ">= 0"), (2, 2, "next refinement"), (1, 4, "the end")])
def test_overlap_that_leaves_a_refinement_no_step_is_refused(sd15, refine_steps, delay, message):
    """N = 8, K = 2 refines before steps 3 and 5: D = 2 would act at step 5, when the next refinement
    reads the prompt in force; K = 1 refines before step 4, and D = 4 would act after the last step."""
    with pytest.raises(common.UserError, match=message):
        promptloop.refined_sample(sd15, PROMPTS, ScriptedRefiner([PROMPTS, PROMPTS]), refine_steps=refine_steps, num_steps=STEPS,
                                  generator=seeded(), hook=overlap.overlap_hook(delay))


def test_a_failing_compile_falls_back_to_the_eager_step_with_one_warning(tiny_refiner_dir, monkeypatch, capsys):
    """--fast-decode on (auto on a GPU) where compiling fails (no Triton, an unsupported platform):
    one warning line, then the same tokens as the plain loop -- not a crashed run."""
    plain = refiners.load_refiner(str(tiny_refiner_dir), max_new_tokens=8, do_sample=False, fast_decode="off")
    fast = refiners.load_refiner(str(tiny_refiner_dir), max_new_tokens=8, do_sample=False, fast_decode="on")
    assert isinstance(fast, refiners.FastRefiner)

    def failing_compile(fn, **kwargs):
        def compiled(*args, **kw):
            raise RuntimeError("Cannot find a working triton installation")
        return compiled

    monkeypatch.setattr(torch, "compile", failing_compile)
    previews = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    want = plain.refine(previews, PROMPTS, PROMPTS, 3, 8)
    for _ in range(2):  # the second call decodes eagerly without a second warning
        got = fast.refine(previews, PROMPTS, PROMPTS, 3, 8)
        assert torch.equal(got.completion_ids, want.completion_ids) and got.answers == want.answers
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "triton" in warnings[0]


def test_grpo_rollouts_and_evaluation_take_the_overlap(sd15):
    """train_refiner's rollouts and evaluate's refined arm sample with --overlap D: each refinement's
    prompts in force from its step + D, the refiner's outputs (what the policy said) kept as they are."""
    import evaluate
    import train_refiner as tr

    script = [["a green triangle", "a small red square"], ["a large blue circle", "a triangle on a red background"]]
    config = tr.Config(overlap=1, refine_steps=2, sampling_steps=STEPS)
    result = tr.sample(sd15, ScriptedRefiner(script), PROMPTS, None, seeded(), config, promptloop.PreviewDecoder("vae", sd15))
    assert result.schedule == [3, 5] and result.applied_steps == [4, 6] and result.prompts[1:] == script
    arms = evaluate.sampling_arms(sd15, ScriptedRefiner(script), evaluate.Config(overlap=1, refine_steps=2, steps=STEPS))
    refined = arms["refined"](PROMPTS, 0, [0, 1])
    assert refined.applied_steps == [4, 6]
    # the whole evaluation, its warm-up included (a short run that must leave the delay its steps)
    config = evaluate.Config(overlap=1, refine_steps=2, steps=STEPS, batch_size=2)
    identity = type("Identity", (), {"refine": lambda self, previews, users, current, step, n: refiners.RefinerOutput.from_prompts(current)})()
    records, *_ = evaluate.evaluate_backbone(sd15, identity, {"jpeg": rewards.build_reward("jpeg")}, PROMPTS, [0], config)
    assert len(records) == 2 and [r["refined_prompt"] for r in records] == PROMPTS
