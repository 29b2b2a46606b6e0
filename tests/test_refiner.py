"""The Qwen2.5-VL refiner wrapper on a tiny random Qwen2.5-VL built in-process."""

import pytest
import torch

import common
import refiners

PREVIEWS = torch.rand(3, 3, 32, 32)
USER = ["a circle", "a red square", "a blue triangle on a green background"]


def test_parse_answer():
    assert refiners.parse_answer("<prompt>a large red circle</prompt>") == "a large red circle"
    assert refiners.parse_answer("  <prompt> a  red\ncircle </prompt>\n") == "a red circle"
    assert refiners.parse_answer(refiners.format_answer("a square")) == "a square"
    assert refiners.parse_answer("<prompt></prompt>") is None  # empty
    assert refiners.parse_answer("<prompt>   </prompt>") is None
    assert refiners.parse_answer("a red circle") is None  # malformed: no tags
    assert refiners.parse_answer("<prompt>a red circle") is None  # cut off
    assert refiners.parse_answer("<prompt>a</prompt><prompt>b</prompt>") is None
    assert refiners.parse_answer("<prompt>" + "word " * 61 + "</prompt>") is None  # overlong
    assert refiners.parse_answer("<prompt>" + "word " * 60 + "</prompt>") is not None


def test_messages_hold_every_part_of_the_state():
    messages = refiners.refiner_messages("a cat", "a fluffy cat", 3, 20)
    assert messages[0]["role"] == "system" and "<prompt>" in messages[0]["content"]
    content = messages[1]["content"]
    assert content[0] == {"type": "image"}
    text = content[1]["text"]
    assert "a cat" in text and "a fluffy cat" in text and "Step 3 of 20" in text


def test_refine_end_to_end(refiner):
    torch.manual_seed(0)
    out = refiner.refine(PREVIEWS, USER, USER, 2, 10)
    assert len(out.prompts) == len(out.answers) == 3
    # a random model answers garbage: every answer falls back to the current prompt, and is counted
    assert out.fallback.all() and out.prompts == USER
    assert out.completion_ids.shape == out.logprobs.shape == out.completion_mask.shape
    assert out.completion_ids.shape[1] <= refiner.max_new_tokens
    assert torch.isfinite(out.logprobs).all() and (out.logprobs <= 0).all()
    assert "image_grid_thw" in out.inputs and "mm_token_type_ids" in out.inputs


def test_teacher_forced_logprobs_match_generation(refiner):
    torch.manual_seed(1)
    out = refiner.refine(PREVIEWS, USER, ["a large circle", "a square", "a triangle"], 5, 10)
    with torch.no_grad():
        recomputed = refiner.token_logprobs(out.inputs, out.completion_ids, out.completion_mask)
    assert out.completion_mask.sum() > 3
    assert (recomputed - out.logprobs).abs().max() < 1e-4


def test_teacher_forcing_needs_the_image_inputs(refiner):
    """Dropping image_grid_thw / mm_token_type_ids changes positions: the check above is not vacuous."""
    torch.manual_seed(1)
    out = refiner.refine(PREVIEWS, USER, USER, 5, 10)
    inputs = {k: v for k, v in out.inputs.items() if k not in ("mm_token_type_ids",)}
    with torch.no_grad():
        wrong = refiner.token_logprobs(inputs, out.completion_ids, out.completion_mask)
    assert (wrong - out.logprobs).abs().max() > 1e-4


def test_vision_tokens_are_never_generated(refiner):
    """Push the vision tokens' logits up by +50: without suppression they would be all that is sampled."""
    ids = torch.tensor(refiner.suppressed)
    assert len(ids) == 5

    def boost(module, args, output):
        output[..., ids] += 50.0
        return output

    handle = refiner.model.lm_head.register_forward_hook(boost)
    try:
        torch.manual_seed(0)
        out = refiner.refine(PREVIEWS, USER, USER, 1, 4)
        with torch.no_grad():
            recomputed = refiner.token_logprobs(out.inputs, out.completion_ids, out.completion_mask)
    finally:
        handle.remove()
    assert not torch.isin(out.completion_ids[out.completion_mask.bool()], ids).any()
    assert (recomputed - out.logprobs).abs().max() < 1e-4


def test_greedy_is_deterministic(tiny_refiner_dir):
    greedy = refiners.load_refiner(str(tiny_refiner_dir), max_new_tokens=8, do_sample=False)
    a = greedy.refine(PREVIEWS, USER, USER, 1, 4)
    b = greedy.refine(PREVIEWS, USER, USER, 1, 4)
    assert torch.equal(a.completion_ids, b.completion_ids)


def test_adapter_folder_loads_over_base(tiny_refiner_dir, tmp_path):
    from peft import LoraConfig, get_peft_model

    base = refiners.load_refiner(str(tiny_refiner_dir))
    peft_model = get_peft_model(base.model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    peft_model.save_pretrained(tmp_path / "adapter")
    for refiner in (refiners.load_refiner(str(tmp_path / "adapter")),  # the adapter folder alone names its base
                    refiners.load_refiner(str(tiny_refiner_dir), adapter=str(tmp_path / "adapter"))):
        inputs = refiner._inputs(PREVIEWS, USER, USER, 1, 4)
        with torch.no_grad():
            adapted = refiner.model(**inputs).logits
            with refiner.model.disable_adapter():
                plain = refiner.model(**inputs).logits
        assert not torch.allclose(adapted, plain)
        with torch.no_grad():
            torch.testing.assert_close(plain, refiners.load_refiner(str(tiny_refiner_dir)).model(**inputs).logits)


def test_refiner_errors(tmp_path):
    assert refiners.load_refiner("none") is None
    with pytest.raises(common.UserError):
        refiners.load_refiner(str(tmp_path / "missing"))
