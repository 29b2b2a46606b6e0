"""The toy refiner: its SFT targets and batches (pure functions, tiny processor), and the
committed toy_world/toy-refiner sampled at temperature 1 on previews of the committed toy backbone."""

import random

import pytest
import torch

import build_toy_world
import common
import promptloop
import refiners
import toy

# -----------------------------------------------------------------------------
# SFT targets and batches


def test_refinement_targets_keep_the_user_and_are_diverse():
    rng = random.Random(0)
    for user in toy.toy_prompts("train")[:120]:
        for _ in range(5):
            target = build_toy_world.refinement_target(user, rng)
            assert toy.toy_caption(**toy.parse_toy_prompt(target)) == target  # in the grammar
            assert build_toy_world.keeps_user_words(user, target) and build_toy_world.keeps_user_attributes(user, target)
            named = toy.parse_toy_prompt(target)
            assert named.get("colour") is None or named.get("colour") != named.get("background")
    # a partial prompt has room: many different targets; a full one has none
    assert len({build_toy_world.refinement_target("a circle", rng) for _ in range(200)}) > 30
    full = "a large red circle on a blue background"
    assert {build_toy_world.refinement_target(full, rng) for _ in range(20)} == {full}
    # with a preview, an added background is the one it shows; the shape never takes its colour
    targets = [toy.parse_toy_prompt(build_toy_world.refinement_target("a circle", rng, seen_background="red")) for _ in range(200)]
    assert {t["background"] for t in targets if "background" in t} == {"red"}
    assert "red" not in {t.get("colour") for t in targets}
    assert build_toy_world.refinement_target("a dog", rng) == "a dog"  # not a toy prompt: kept as is


def test_drifted_prompts_go_against_the_user_once_and_drift_states_still_answer_for_the_user():
    rng = random.Random(0)
    for user in toy.toy_prompts("train")[:120]:
        for _ in range(3):
            current = build_toy_world.refinement_target(user, rng)
            drifted = build_toy_world.drifted(current, user, rng)
            assert build_toy_world.in_toy_grammar(drifted) and not build_toy_world.keeps_user_attributes(user, drifted)
            before, after = toy.parse_toy_prompt(current), toy.parse_toy_prompt(drifted)
            assert sum(before.get(key) != after.get(key) for key in before) == 1, (current, drifted)
            assert after.get("colour") is None or after.get("colour") != after.get("background")
    # with drift = 1 every earlier refinement in a state went against the user; the answer is the user's
    states = [build_toy_world.refinement_state(None, "a red circle", 5, 20, rng, drift=1.0) for _ in range(200)]
    later = [current for _, _, current, _, _ in states if current != "a red circle"]
    assert len(later) > 60 and not any(build_toy_world.keeps_user_attributes("a red circle", c) for c in later)
    processor = build_toy_world.toy_refiner_processor()
    preview = torch.rand(3, 56, 56)
    inputs, labels = build_toy_world.sft_batch(processor, [(preview, "a red circle", later[0], 5, 20)], rng)
    answer = processor.tokenizer.decode(labels[0][labels[0] >= 0], skip_special_tokens=True)
    assert build_toy_world.keeps_user_attributes("a red circle", refiners.parse_answer(answer))


def test_keep_checks():
    assert build_toy_world.keeps_user_words("a red circle", "a large red circle on a blue background")
    assert not build_toy_world.keeps_user_words("a red circle", "a large blue circle")
    swapped = "a blue circle on a red background"
    assert build_toy_world.keeps_user_words("a red circle on a blue background", swapped)
    assert not build_toy_world.keeps_user_attributes("a red circle on a blue background", swapped)
    assert build_toy_world.in_toy_grammar(swapped) and build_toy_world.in_toy_grammar("a circle")
    assert not build_toy_world.in_toy_grammar("a yellow circle on a background") and not build_toy_world.in_toy_grammar("a dog")


def test_sft_batch_supervises_exactly_the_answer():
    processor = build_toy_world.toy_refiner_processor()
    tokenizer = processor.tokenizer
    assert all(len(tokenizer(tag)["input_ids"]) == 1 for tag in build_toy_world.ANSWER_TAGS)
    rng = random.Random(1)
    states = [(torch.rand(3, 32, 32), "a circle", "a circle", 3, 20),
              (torch.full((3, 64, 64), 0.5), "a small red square on a blue background", "a small red square", 10, 20)]
    inputs, labels = build_toy_world.sft_batch(processor, states, rng)
    assert labels.shape == inputs["input_ids"].shape and "pixel_values" in inputs and "image_grid_thw" in inputs
    for row, (_, user, *_rest) in enumerate(states):
        supervised = labels[row][labels[row] != -100]
        answer = tokenizer.decode(supervised, skip_special_tokens=False)
        assert answer.endswith(tokenizer.eos_token)
        prompt = refiners.parse_answer(answer[: -len(tokenizer.eos_token)])
        assert prompt is not None and build_toy_world.keeps_user_attributes(user, prompt)
        # everything before the answer is the inference prompt (chat template + generation prompt)
        start = int((labels[row] != -100).nonzero()[0])
        assert tokenizer.decode(inputs["input_ids"][row, :start]).endswith("<|im_start|>assistant\n")
    # the whole state stays short thanks to the whole-word vocabulary
    assert inputs["attention_mask"].sum(1).max() < 200


def test_seen_attributes_and_the_describe_target_read_the_preview():
    image = toy.draw_toy_image("triangle", "red", "large", "blue")
    shown = build_toy_world.seen_attributes([image, toy.draw_toy_image("circle", "white", "small", "black"),
                                             torch.full((3, 32, 32), 0.5)])
    assert shown[0] == dict(background="blue", shape="triangle", colour="red", size="large")
    assert build_toy_world.describe_target(shown[0]) == "a large red triangle on a blue background"
    assert build_toy_world.describe_target(shown[1]) == "a small white circle on a black background"
    assert shown[2] is None and build_toy_world.describe_target(None) is None  # a blank preview shows nothing
    # a preview without a shape yet shows its background only: nothing to describe
    empty = build_toy_world.seen_attributes([torch.tensor(toy.TOY_COLOURS["green"]).view(3, 1, 1).expand(3, 32, 32)])[0]
    assert empty == dict(background="green") and build_toy_world.describe_target(empty) is None


def test_sft_batch_teaches_describing_the_preview():
    processor = build_toy_world.toy_refiner_processor()
    image = toy.draw_toy_image("square", "yellow", "small", "black")
    inputs, labels = build_toy_world.sft_batch(processor, [(image, None, None, None, None)], random.Random(0))
    answer = processor.tokenizer.decode(labels[0][labels[0] != -100], skip_special_tokens=True)
    assert refiners.parse_answer(answer) == "a small yellow square on a black background"
    assert build_toy_world.DESCRIBE_REQUEST in processor.tokenizer.decode(inputs["input_ids"][0])
    with pytest.raises(ValueError, match="shows a shape"):  # a blank preview cannot be described
        build_toy_world.sft_batch(processor, [(torch.full((3, 32, 32), 0.5), None, None, None, None)], random.Random(0))


def test_record_previews_names_the_prompt_each_preview_came_from():
    users = []
    prompts = ["a red circle", "a blue square", "a triangle"]
    states = build_toy_world.record_previews(common.load_backbone("toy"), prompts, 2, seed=0, batch_size=2, users=users)
    assert len(states) == len(users) == 6
    assert users == ["a red circle", "a blue square"] * 2 + ["a triangle"] * 2  # batch, then refinement, then prompt


class ScriptedDescriber:
    """A stand-in refiner for the probe: answers `answers` in order, through the real processor."""

    def __init__(self, answers):
        self.processor, self.preview_size, self.answers = build_toy_world.toy_refiner_processor(), None, answers

    def generate(self, inputs):
        assert inputs["input_ids"].shape[0] == len(self.answers)
        ids = self.processor.tokenizer([refiners.format_answer(a) for a in self.answers], padding=True, return_tensors="pt")
        return ids["input_ids"], None, None


def test_perception_probe_scores_each_attribute_against_the_preview():
    previews = torch.stack([toy.draw_toy_image("circle", "red", "large", "blue"),
                            toy.draw_toy_image("square", "white", "small", "black"),
                            torch.full((3, 32, 32), 0.5)])  # blank: not scored
    right = ["a large red circle on a blue background", "a small white square on a black background"]
    assert build_toy_world.perception_probe(ScriptedDescriber(right), previews) == dict(
        background=1.0, colour=1.0, size=1.0, all=1.0, grammatical=1.0, previews=2)
    wrong = ["a large red circle on a green background", "a large black square on a white background"]
    probe = build_toy_world.perception_probe(ScriptedDescriber(wrong), previews)
    assert probe["background"] == 0.0 and probe["colour"] == 0.5 and probe["size"] == 0.5 and probe["all"] == 0.0
    probe = build_toy_world.perception_probe(ScriptedDescriber(["a circle", "no idea"]), previews)
    assert probe["all"] == 0.0 and probe["grammatical"] == 0.5


class OneAnswer:
    """A stand-in refiner that rewrites every prompt to `answer` (None: an unusable answer)."""

    def __init__(self, answer):
        self.answer = answer

    def refine(self, previews, user_prompts, current_prompts, step, num_steps):
        if self.answer is None:
            return refiners.RefinerOutput(list(current_prompts), ["?"] * len(current_prompts),
                                          torch.ones(len(current_prompts), dtype=torch.bool))
        return refiners.RefinerOutput.from_prompts([self.answer] * len(user_prompts))


def test_sampling_keep_rate_counts_every_rewrite_against_the_user():
    backbone = common.load_backbone("toy")
    prompts = ["a circle", "a red circle", "a small circle", "a blue square"]
    rate = build_toy_world.sampling_keep_rate(OneAnswer("a large red circle"), backbone, prompts, refine_steps=2)
    assert rate == dict(keep_attributes_rate=0.5, rewrites=8)  # 2 of 4 users keep their attributes, at both refinements
    assert build_toy_world.sampling_keep_rate(OneAnswer(None), backbone, prompts, refine_steps=2)["rewrites"] == 0


def test_answer_loss_falls_when_fitting_one_batch():
    processor = build_toy_world.toy_refiner_processor()
    model = toy.tiny_qwen_model(processor, hidden=32, layers=1).train()
    states = [(torch.rand(3, 32, 32), "a large red circle on a blue background", "a circle", 5, 20)] * 4
    inputs, labels = build_toy_world.sft_batch(processor, states, random.Random(0))  # a full prompt: one target
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(15):
        loss = build_toy_world.answer_loss(model, inputs, labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.3 * losses[0], losses


# -----------------------------------------------------------------------------
# the committed toy refiner


@pytest.fixture(scope="module")
def toy_refiner():
    torch.manual_seed(0)
    return refiners.load_refiner("toy-refiner", temperature=1.0, max_new_tokens=32)


def test_committed_refiner_is_small_and_complete(toy_refiner):
    folder = common.TOY_DIR / "toy-refiner"
    assert sum(f.stat().st_size for f in folder.iterdir()) < 10 * 2**20
    assert type(toy_refiner.model).__name__ == "Qwen2_5_VLForConditionalGeneration"
    assert toy_refiner.processor.chat_template and len(toy_refiner.processor.tokenizer) < 1000


@pytest.mark.slow
def test_committed_refiner_samples_valid_diverse_prompts(toy_refiner):
    prompts = toy.toy_prompts("test", n=16, seed=5)  # held-out combinations
    states = build_toy_world.record_previews(common.load_backbone("toy"), prompts, 1, seed=5)
    previews = torch.stack([preview for preview, _, _ in states])
    torch.manual_seed(0)
    stats = build_toy_world.refiner_sampling_stats(toy_refiner, previews, prompts, states[0][1], states[0][2], samples=8)
    assert stats["parse_rate"] >= 0.95, stats
    assert stats["keep_words_rate"] >= 0.75 and stats["grammatical_rate"] >= 0.8, stats
    # sampled, it is not committed to one refinement: about as diverse as its SFT targets
    assert stats["distinct_partial"] >= 2.5 and stats["distinct"] >= 0.6 * stats["distinct_targets"], stats


@pytest.mark.slow
def test_committed_refiner_keeps_the_user_and_sees_the_preview(toy_refiner):
    """The base GRPO starts from behaves like an instruction-following MLLM that sees: in refined
    sampling at temperature 1 its rewrites keep every attribute the user named, and asked to write
    the prompt of a held-out preview it names what the preview shows (docs/RESULTS.md, "What the
    toy refiner sees and keeps"; the shape colour is read less well than the 0.9 aimed for)."""
    backbone = common.load_backbone("toy")
    torch.manual_seed(0)
    keep = build_toy_world.sampling_keep_rate(toy_refiner, backbone, toy.toy_prompts("test", n=64, seed=10), seed=10)
    assert keep["rewrites"] >= 300 and keep["keep_attributes_rate"] >= 0.98, keep  # measured 0.994 (the previous refiner: 0.950)
    previews = torch.stack([state[0] for state in build_toy_world.record_previews(backbone, toy.toy_prompts("test", n=24, seed=10), 5, 110)])
    probe = build_toy_world.perception_probe(toy_refiner, previews)
    # measured 0.96 / 0.81 / 0.92 (112 previews, one thread): a few previews of margin for other CPUs' rounding
    assert probe["previews"] >= 100 and probe["background"] >= 0.9 and probe["size"] >= 0.85 and probe["colour"] >= 0.75, probe


def test_refined_sample_end_to_end_with_the_toy_refiner(toy_refiner):
    backbone = common.load_backbone("toy")
    prompts = ["a circle", "a red square", "a triangle on a blue background", "a small green circle"]
    torch.manual_seed(0)
    result = promptloop.refined_sample(backbone, prompts, toy_refiner, refine_steps=5,
                                   generator=torch.Generator().manual_seed(0))
    size = backbone.spec.size
    assert result.images.shape == (4, 3, size, size) and torch.isfinite(result.images).all()
    assert len(result.schedule) == 5 and len(result.prompts) == 6 and len(result.previews) == 5
    refined = [(user, prompt) for step_prompts in result.prompts[1:] for user, prompt in zip(prompts, step_prompts)]
    assert sum(build_toy_world.keeps_user_words(user, prompt) for user, prompt in refined) >= 0.7 * len(refined)
    fallback = torch.cat([out.fallback for out in result.refiner_outputs]).float().mean().item()
    assert fallback <= 0.1
    assert result.final_prompts != prompts  # it did refine (the partial prompts got attributes)
