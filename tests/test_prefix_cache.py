"""Prefix caching: the text before the image (system message, chat template) is run once per call,
at batch 1, and every prefill starts after it -- the same tokens and log-probs as without it, on
both decode paths, with fresh weights after an optimizer step."""

import pytest
import torch

import architectures
import refiners

PREVIEWS = torch.rand(3, 3, 32, 32)
USER = ["a circle", "a red square", "a blue triangle on a green background"]  # prompts of different lengths
STATE = (PREVIEWS, USER, ["a large circle", "a square on a blue background", "a triangle"], 5, 10)


def views(refiner, **changes):
    """(prefix caching on, off) over the same model, every answer 12 tokens long."""
    return tuple(architectures.refiner_view(refiner, fixed_length=True, max_new_tokens=12, prefix_cache=on, **changes)
                 for on in (True, False))


def prefill_columns(refiner, inputs):
    """The (rows, columns) of every forward of refiner.generate(inputs, 1): what the prefill ran."""
    shapes = []
    handle = refiner.model.get_input_embeddings().register_forward_hook(lambda module, args, out: shapes.append(tuple(out.shape[:2])))
    try:
        refiner.generate(inputs, 1)
    finally:
        handle.remove()
    return shapes


def calls_agree(fast, plain):
    """Two calls of both refiners (other prompts, the same bucket): the fast one gives the plain
    one's tokens and log-probs; yields each call's inputs after checking it."""
    for state in (STATE, (PREVIEWS, USER[::-1], USER, 2, 10)):
        inputs = plain._inputs(*state)
        tokens, logprobs, _ = plain.generate(inputs)
        fast_tokens, fast_logprobs, _ = fast.generate(inputs)
        assert torch.equal(fast_tokens, tokens)
        torch.testing.assert_close(fast_logprobs, logprobs, rtol=0, atol=1e-5)
        yield inputs


def test_padding_moves_before_the_image_and_no_position_moves(refiner):
    inputs = refiner._inputs(*STATE)
    moved = refiners.padding_before_image(inputs)
    rope = refiner._rope_model().get_rope_index

    def positions(x):
        return rope(x["input_ids"], x["mm_token_type_ids"], image_grid_thw=x["image_grid_thw"], attention_mask=x["attention_mask"])[0]

    for row in range(3):  # the same tokens at the same positions, only the padding's columns change
        before, after = inputs["attention_mask"][row].bool(), moved["attention_mask"][row].bool()
        assert torch.equal(inputs["input_ids"][row, before], moved["input_ids"][row, after])
        assert torch.equal(positions(inputs)[:, row, before], positions(moved)[:, row, after])
    assert not inputs["attention_mask"][:, 0].all()  # the rows were padded: the check above moved something
    # the shared prefix: the chat template up to and including <|vision_start|>, in every row
    vision_start = refiner.processor.tokenizer.convert_tokens_to_ids("<|vision_start|>")
    length = refiners.shared_prefix_length(moved)
    assert moved["input_ids"][0, length - 1] == vision_start and (moved["input_ids"][:, :length] == moved["input_ids"][:1, :length]).all()
    assert refiners.shared_prefix_length(inputs) == 0  # left padding: no column is shared


def test_prefix_cache_same_tokens_and_logprobs(refiner):
    """Greedy and sampled, with prompts of different lengths: the same tokens, log-probs equal up to
    float rounding; and the prefill really starts after the prefix (run once, at batch 1)."""
    inputs = refiner._inputs(*STATE)
    for do_sample in (False, True):
        on, off = views(refiner, do_sample=do_sample, temperature=0.7)
        torch.manual_seed(0)
        tokens, logprobs, mask = on.generate(inputs)
        torch.manual_seed(0)
        ref_tokens, ref_logprobs, ref_mask = off.generate(inputs)
        assert torch.equal(tokens, ref_tokens) and mask.all() and ref_mask.all()
        torch.testing.assert_close(logprobs, ref_logprobs, rtol=0, atol=1e-5)
    length = refiners.shared_prefix_length(refiners.padding_before_image(inputs))
    columns = inputs["input_ids"].shape[1]
    assert prefill_columns(on, inputs) == [(1, length), (3, columns - length)]
    assert prefill_columns(off, inputs) == [(3, columns)]
    one = refiner._inputs(PREVIEWS[:1], USER[:1], USER[:1], 1, 4)
    assert prefill_columns(on, one) == [(1, one["input_ids"].shape[1])]  # one row: run whole, nothing to share


def test_prefix_is_fresh_after_the_weights_change(refiner):
    """GRPO updates the LoRA weights in place between calls (a fused AdamW step does not even bump the
    parameters' _version): the next call's log-probs are the new policy's, as teacher forcing and a
    refiner without prefix caching give them."""
    params = refiners.add_lora(refiner, rank=4, alpha=8)
    on, off = views(refiner)
    inputs = refiner._inputs(*STATE)
    torch.manual_seed(0)
    before = on.generate(inputs)
    for p in params:
        p.grad = torch.randn_like(p)
    torch.optim.AdamW(params, lr=0.05, fused=True).step()
    torch.manual_seed(0)
    tokens, logprobs, mask = on.generate(inputs)
    torch.manual_seed(0)
    ref_tokens, ref_logprobs, _ = off.generate(inputs)
    with torch.no_grad():
        forced = on.token_logprobs(inputs, tokens, mask.long())
    assert torch.equal(tokens, ref_tokens)
    torch.testing.assert_close(logprobs, ref_logprobs, rtol=0, atol=1e-5)
    torch.testing.assert_close(logprobs, forced, rtol=0, atol=1e-5)
    assert (logprobs - before[1]).abs().max() > 1e-2  # the step changed the policy: a stale prefix would show


def test_fast_refiner_writes_the_prefix_into_its_static_cache_in_place(refiner):
    """FastRefiner's static cache (bucketed prompts, padding moved before the image) with its step
    eager here (compiling takes about a minute on a CPU: the slow test below does): the plain loop's
    tokens and log-probs, and the cache's tensors keep their addresses from call to call (a compiled
    step, a CUDA graph, is specialised to them)."""
    fast = architectures.refiner_view(refiner, fast=True, fixed_length=True, max_new_tokens=8, do_sample=False)
    fast._compiled_step = refiners.Refiner.decode_step.__get__(fast)  # the eager step
    plain = architectures.refiner_view(fast, fast=False, prefix_cache=False)
    addresses = None
    for inputs in calls_agree(fast, plain):
        (cache,) = fast._caches.values()
        assert addresses in (None, [layer.keys.data_ptr() for layer in cache.layers])
        addresses = [layer.keys.data_ptr() for layer in cache.layers]
    assert prefill_columns(fast, inputs)[0] == (1, refiners.shared_prefix_length(refiners.padding_before_image(inputs)))


@pytest.mark.slow
def test_fast_decode_prefix_cache_same_tokens_compiled_once(refiner):
    """FastRefiner (static cache, compiled step): the prefix written into the static cache in place
    gives the plain loop's tokens and log-probs, and a second call (other prompts, same bucket)
    compiles nothing again."""
    from torch._dynamo.utils import counters

    fast = architectures.refiner_view(refiner, fast=True, fixed_length=True, max_new_tokens=8, do_sample=False)
    plain = architectures.refiner_view(fast, fast=False, prefix_cache=False)
    assert fast.prefix_cache and isinstance(fast, refiners.FastRefiner)
    graphs = None
    for inputs in calls_agree(fast, plain):
        assert graphs in (None, counters["stats"]["unique_graphs"])  # the second call: nothing compiled again
        graphs = counters["stats"]["unique_graphs"]
