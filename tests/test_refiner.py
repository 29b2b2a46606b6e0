"""The Qwen2.5-VL refiner wrapper on a tiny random Qwen2.5-VL built in-process."""

import math

import pytest
import torch

import architectures
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


# -----------------------------------------------------------------------------
# decoding: our loop against transformers' generate; the fast path (FastRefiner: static cache,
# buckets, compile); answers of a fixed length (architectures.FixedLength, for bench.py)

STATES = (PREVIEWS, USER, ["a large circle", "a square", "a triangle"], 5, 10)


@pytest.mark.parametrize("do_sample", [True, False])
def test_decode_loop_matches_transformers_generate(tiny_refiner_dir, do_sample):
    """Same seed -> the same tokens as generate (the same multinomial draws, in the same order)
    and the same log-probs, computed as decoding goes instead of from the kept logits."""
    refiner = refiners.load_refiner(str(tiny_refiner_dir), max_new_tokens=12, do_sample=do_sample, temperature=0.7)
    inputs = refiner._inputs(*STATES)
    torch.manual_seed(3)
    tokens, logprobs, mask = refiner.generate(inputs)
    torch.manual_seed(3)
    ref_tokens, ref_logprobs = architectures.generate_keeping_logits(refiner, inputs, refiner.max_new_tokens)  # the reference
    assert torch.equal(tokens[mask], ref_tokens[mask]) and tokens.shape == ref_tokens.shape
    assert mask.sum() > 6
    torch.testing.assert_close(logprobs[mask], ref_logprobs[mask], rtol=0, atol=1e-6)


def test_the_models_generation_config_does_not_change_the_policy(tiny_refiner_dir):
    """A hub model's generation_config.json can set top_k / top_p / repetition_penalty (Qwen's
    Instruct releases do): generate() applies them, and then its samples do not come from the
    policy whose log-probs GRPO trains. The refiner's own loop samples softmax(logits / T) alone."""
    refiner = refiners.load_refiner(str(tiny_refiner_dir), max_new_tokens=8)
    inputs = refiner._inputs(*STATES)
    torch.manual_seed(5)
    before = refiner.generate(inputs)
    refiner.model.generation_config.update(top_k=1, top_p=0.001, repetition_penalty=1.05, do_sample=True)
    torch.manual_seed(5)
    after = refiner.generate(inputs)
    assert all(torch.equal(a, b) for a, b in zip(before, after))
    torch.manual_seed(5)
    with_defaults = architectures.generate_keeping_logits(refiner, inputs, refiner.max_new_tokens, top_k=None, top_p=None)[0]
    assert not torch.equal(with_defaults[:, :before[0].shape[1]], before[0])


def test_fixed_length_answers_keep_the_policys_logprobs(refiner):
    """bench.py times answers of given lengths: no end token is chosen, yet the log-probs are the
    policy's (the end tokens banned from the choice only), as teacher forcing recomputes them."""
    inputs = refiner._inputs(*STATES)
    torch.manual_seed(0)
    tokens, logprobs, mask = architectures.refiner_view(refiner, fixed_length=True).generate(inputs, 10)
    assert tokens.shape == (3, 10) and mask.all()
    assert not torch.isin(tokens, torch.tensor(refiner.eos_ids)).any()
    with torch.no_grad():
        torch.testing.assert_close(refiner.token_logprobs(inputs, tokens, mask.long()), logprobs, rtol=0, atol=1e-5)


def test_bucket_padding_keeps_every_position(refiner):
    """Rows padded to a power of two, columns (on the left) to a multiple of 128: the real tokens'
    rope positions are those of the unpadded batch."""
    inputs = refiner._inputs(*STATES)
    padded = refiners.pad_to_bucket(inputs, refiner.pad_id)
    assert padded["input_ids"].shape[0] == 4 and padded["input_ids"].shape[1] % refiners.PROMPT_BUCKET == 0
    assert torch.equal(padded["input_ids"][:3, -inputs["input_ids"].shape[1]:], inputs["input_ids"])
    rope = refiner._rope_model().get_rope_index

    def positions(x):
        return rope(x["input_ids"], x["mm_token_type_ids"], image_grid_thw=x["image_grid_thw"], attention_mask=x["attention_mask"])[0]

    torch.testing.assert_close(positions(padded)[:, :3, -inputs["input_ids"].shape[1]:], positions(inputs), rtol=0, atol=0)


@pytest.mark.slow
def test_fast_decode_same_greedy_tokens_compiled_once_per_shape(tiny_refiner_dir):
    """The fast path (static KV cache, bucketed shapes, torch.compile, on the CPU here) gives the
    same greedy tokens as the default loop, log-probs that teacher forcing reproduces, and new
    prompts, refinement steps and batch sizes within a bucket do not compile again."""
    from torch._dynamo.utils import counters

    plain = refiners.load_refiner(str(tiny_refiner_dir), max_new_tokens=16, do_sample=False, fast_decode="off")
    fast = refiners.load_refiner(str(tiny_refiner_dir), max_new_tokens=16, do_sample=False, fast_decode="on")
    assert isinstance(fast, refiners.FastRefiner) and not isinstance(plain, refiners.FastRefiner)
    plain, fast = (architectures.refiner_view(r, fixed_length=True) for r in (plain, fast))  # every row decodes 16 tokens
    assert isinstance(fast, refiners.FastRefiner) and not isinstance(plain, refiners.FastRefiner)
    first = [(PREVIEWS, USER, USER, 1, 4), (PREVIEWS[:2], USER[:2], ["a red circle on a blue background", "a square"], 3, 4)]
    again = [(PREVIEWS[1:], USER[1:], ["a large blue triangle on a green background"] * 2, 2, 10),  # 2 rows: bucket of 2
             (PREVIEWS[:1].repeat(4, 1, 1, 1), USER[:1] * 4, ["a circle"] * 4, 7, 10)]  # 4 rows: bucket of 3 rows
    for round, states in enumerate((first, again)):
        graphs = counters["stats"]["unique_graphs"]
        for state in states:
            inputs = plain._inputs(*state)
            tokens, logprobs, mask = plain.generate(inputs)
            fast_tokens, fast_logprobs, fast_mask = fast.generate(inputs)
            assert torch.equal(fast_tokens, tokens) and mask.all() and fast_mask.all()
            torch.testing.assert_close(fast_logprobs, logprobs, rtol=0, atol=1e-5)
        if round == 1:
            assert counters["stats"]["unique_graphs"] == graphs  # nothing compiled again
    torch.manual_seed(0)
    fast.do_sample = True
    out = fast.refine(*STATES)
    with torch.no_grad():
        recomputed = fast.token_logprobs(out.inputs, out.completion_ids, out.completion_mask)
    assert (recomputed - out.logprobs).abs().max() < 1e-4


def test_preview_size_sets_the_vision_tokens(tiny_refiner_dir):
    """--preview-size: the tiny processor's 56 px give 2x2 merged vision tokens, 112 px 4x4."""
    refiner = refiners.load_refiner(str(tiny_refiner_dir))
    image_pad = refiner.processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    counts = {}
    for size in (0, 112):
        refiner = refiners.load_refiner(str(tiny_refiner_dir), preview_size=size)
        counts[size] = int((refiner._inputs(*STATES)["input_ids"][0] == image_pad).sum())
    assert counts == {0: 4, 112: 16}


def test_fast_decode_picks_the_decode_path(tiny_refiner_dir):
    """--fast-decode auto: the fast path where the refiner runs on a GPU, the plain loop elsewhere."""
    assert refiners.refiner_class("auto", "cuda:1") is refiners.FastRefiner and refiners.refiner_class("on") is refiners.FastRefiner
    assert refiners.refiner_class("auto", "cpu") is refiners.refiner_class("off", "cuda") is refiners.Refiner
    assert type(refiners.load_refiner(str(tiny_refiner_dir))) is refiners.Refiner


def test_decoding_flag_errors(tiny_refiner_dir):
    with pytest.raises(common.UserError, match="--fast-decode"):
        refiners.load_refiner(str(tiny_refiner_dir), fast_decode="yes")
    with pytest.raises(common.UserError, match="--preview-size"):
        refiners.load_refiner(str(tiny_refiner_dir), preview_size=10)


# -----------------------------------------------------------------------------
# temperature: the sampler and teacher forcing use the same pi = softmax(logits / T) at T != 1


@pytest.mark.parametrize("temperature", [0.5, 2.0])
def test_temperature_reaches_generation_and_teacher_forcing(tiny_refiner_dir, temperature):
    """generate's recorded log-probs == token_logprobs' on the same tokens == log_softmax(logits / T)
    (vision tokens banned) from one plain teacher-forced forward of the model, written out here."""
    refiner = refiners.load_refiner(str(tiny_refiner_dir), max_new_tokens=10, temperature=temperature)
    inputs = refiner._inputs(*STATES)
    torch.manual_seed(0)
    tokens, logprobs, mask = refiner.generate(inputs)
    assert mask.sum() > 6
    with torch.no_grad():
        recomputed = refiner.token_logprobs(inputs, tokens, mask.long())
        forward = dict(inputs, input_ids=torch.cat([inputs["input_ids"], tokens], 1),
                       attention_mask=torch.cat([inputs["attention_mask"], mask.long()], 1),
                       mm_token_type_ids=torch.cat([inputs["mm_token_type_ids"], torch.zeros_like(tokens)], 1))
        logits = refiner.model(**forward).logits[:, inputs["input_ids"].shape[1] - 1:-1].float()  # (B, T, V): predicts each token
    logits[..., refiner.suppressed] = -math.inf
    by_hand = torch.log_softmax(logits / temperature, -1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1) * mask
    torch.testing.assert_close(logprobs, by_hand, rtol=0, atol=1e-4)
    torch.testing.assert_close(recomputed, by_hand, rtol=0, atol=1e-4)
    untempered = torch.log_softmax(logits, -1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1) * mask
    assert (untempered - by_hand).abs().max() > 1e-2  # T = 1 would be told apart


@pytest.mark.parametrize("temperature", [0.5, 2.0])
def test_tokens_are_drawn_from_the_tempered_policy(refiner, temperature):
    """The sampler draws from softmax(logits / T): the model's logits are pinned (a hook on lm_head)
    to 1, 0, -1 on three ordinary tokens and -30 elsewhere, so each of 400 decoding steps of one row
    is a draw from softmax([1, 0, -1] / T); their frequencies are that, not softmax([1, 0, -1])."""
    ids = torch.tensor([10, 11, 12])
    assert not torch.isin(ids, torch.tensor(refiner.suppressed + refiner.eos_ids)).any()
    pinned = torch.full((refiner.model.lm_head.out_features,), -30.0)
    pinned[ids] = torch.tensor([1.0, 0.0, -1.0])
    handle = refiner.model.lm_head.register_forward_hook(lambda module, args, output: pinned.expand_as(output).clone())
    refiner.temperature = temperature
    try:
        inputs = refiner._inputs(PREVIEWS[:1], USER[:1], USER[:1], 1, 4)
        torch.manual_seed(0)
        tokens, logprobs, mask = refiner.generate(inputs, max_new_tokens=400)
    finally:
        handle.remove()
    assert mask.all() and torch.isin(tokens, ids).all()
    expected = torch.softmax(pinned[ids] / temperature, -1)
    frequencies = torch.stack([(tokens == i).float().mean() for i in ids])
    assert (frequencies - expected).abs().max() < 0.07, (frequencies, expected)
    assert (torch.softmax(pinned[ids], -1) - expected).abs().max() > 0.15  # what T = 1 would give is far off
    torch.testing.assert_close(logprobs[0], torch.log_softmax(pinned / temperature, -1)[tokens[0]], rtol=0, atol=1e-5)
