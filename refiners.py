"""
refiners.py: the refiner -- a multimodal LLM policy (Qwen2.5-VL) that rewrites the prompt from a preview.

    messages and answers  the chat messages of one refinement state; the <prompt>...</prompt>
                          answer format, parsed robustly (an unusable answer keeps the prompt)
    Refiner               batched generation with the vision tokens suppressed (a plain decode
                          loop on a DynamicCache), and the teacher-forced log-probs GRPO needs
                          (every input the generation got)
    prefix caching        the text before the image (system message, chat template) is the same in
                          every row: its keys and values are computed once per call, at batch 1
    FastRefiner           the same loop on a static KV cache with a compiled step, prompts padded
                          to a few shapes (--fast-decode; auto: on a GPU); load_refiner picks one
    adapters              PEFT LoRA on the language model, saved as a folder sample.py loads

promptloop.refined_sample calls any object with the Refiner's `refine` method; scripted refiners in
the tests and the toy world use RefinerOutput.from_prompts. train_refiner.py trains the adapter.
Left out on purpose: serving engines (vLLM), other MLLM families' chat templates beyond what their
processors provide.
"""

import json
import math
import os
import re
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from common import (
    TOY_DIR,
    UNREADABLE_ERRORS,
    UserError,
    first_line,
    looks_like_path,
    to_pil,
    unreadable,
)

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


ANSWER_PATTERN = re.compile(r"^\s*<prompt>([^<>]*)</prompt>\s*$")


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


def chat_inputs(processor, conversations, images, image_size=None):
    """Batched inputs of a chat VLM (the refiner, the VLM judge): one conversation with one image
    per row. images: (B, 3, H, W) in [0, 1], resized to image_size px when given. The tokenizer
    pads on the left, so every row's next token is generated at the same (last) column."""
    pil, kwargs = to_pil(images), {}
    if image_size:  # and pin the processor's own resize bounds there (Qwen's: 28 px per merged vision token)
        pil = [image.resize((image_size, image_size), Image.BICUBIC) for image in pil]
        kwargs["size"] = {"shortest_edge": image_size * image_size, "longest_edge": image_size * image_size}
    texts = [processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) for messages in conversations]
    return processor(text=texts, images=pil, padding=True, return_tensors="pt", **kwargs)


@dataclass
class RefinerOutput:
    prompts: list  # the prompts to use next (the current prompt where the answer was unusable)
    answers: list  # raw decoded answers
    fallback: torch.Tensor  # (B,) bool: answer unusable, current prompt kept
    inputs: dict = None  # processor outputs the generation saw (on CPU), for teacher forcing
    completion_ids: torch.Tensor = None  # (B, T) generated tokens, padded
    completion_mask: torch.Tensor = None  # (B, T) 1 up to and including the end token
    logprobs: torch.Tensor = None  # (B, T) log pi(token) at generation time

    @classmethod
    def from_prompts(cls, prompts):
        """The output of a refiner without a model (scripted rules, recorders): well-formed answers."""
        prompts = list(prompts)
        return cls(prompts, [format_answer(p) for p in prompts], torch.zeros(len(prompts), dtype=torch.bool))

    def rows(self, rows):
        """The outputs of `rows` only (a search keeps each image's chosen candidate)."""
        rows = torch.as_tensor(rows).long()
        take = [self.prompts[r] for r in rows.tolist()], [self.answers[r] for r in rows.tolist()], self.fallback[rows]
        tensors = [None if x is None else x[rows] for x in (self.completion_ids, self.completion_mask, self.logprobs)]
        return RefinerOutput(*take, None if self.inputs is None else select_rows(self.inputs, rows), *tensors)


class Refiner:
    """Qwen2.5-VL (or any chat VLM with a processor) rewriting prompts, batched.

    The policy is pi(token) = softmax(logits / temperature) with the vision special tokens
    masked out (they must never be generated); `token_logprobs` recomputes exactly that with a
    teacher-forced forward that gets every input the generation got (incl. image_grid_thw and
    mm_token_type_ids, which set Qwen2.5-VL's multimodal rope positions)."""

    VISION_TOKENS = ("<|vision_start|>", "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>")

    def __init__(self, model, processor, temperature=1.0, max_new_tokens=96, do_sample=True, max_words=60, preview_size=None,
                 prefix_cache=True):
        self.model, self.processor = model, processor
        self.temperature, self.max_new_tokens, self.do_sample = temperature, max_new_tokens, do_sample
        self.max_words, self.preview_size, self.prefix_cache = max_words, preview_size, prefix_cache
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
            raise UserError(f"toy refiner not built: run `python build_toy_world.py` (looked in {source})")
        if looks_like_path(source) and not Path(source).is_dir():
            raise UserError(f"refiner folder '{name}' not found")
        if Path(source, "adapter_config.json").is_file() and adapter is None:
            adapter = source
            try:
                source = json.loads(Path(source, "adapter_config.json").read_text())["base_model_name_or_path"]
            except (ValueError, KeyError, TypeError) as e:
                raise UserError(f"cannot load refiner '{name}': {unreadable(e, Path(adapter, 'adapter_config.json'))}") from e
            source = REFINERS.get(source, source)
        try:
            processor = AutoProcessor.from_pretrained(adapter if adapter and Path(adapter, "tokenizer_config.json").is_file() else source)
            model = AutoModelForImageTextToText.from_pretrained(source, dtype=dtype)
            if adapter is not None:
                from peft import PeftModel

                model = PeftModel.from_pretrained(model, adapter)
        except (OSError, ValueError) as e:  # not found, offline, a config that does not fit
            raise UserError(f"cannot load refiner '{name}': {first_line(e)}") from e
        except UNREADABLE_ERRORS as e:  # a weights file cut short or garbled: name it
            raise UserError(f"cannot load refiner '{name}': {unreadable(e, adapter, source)}") from e
        if len(processor.tokenizer) < 1000 and not Path(source).is_dir():
            # transformers 5 + HF_HUB_OFFLINE can hand back a near-empty tokenizer from a hub id
            raise UserError(f"refiner '{name}': tokenizer has only {len(processor.tokenizer)} tokens (offline without a cache?)")
        if "preview_size" not in kwargs and not Path(source).is_dir():
            kwargs["preview_size"] = 448  # 448 px -> 16x16 merged vision tokens for Qwen2.5-VL
        return cls(model.to(device).eval(), processor, **kwargs)

    def _inputs(self, previews, user_prompts, current_prompts, step, num_steps):
        conversations = [refiner_messages(u, c, step, num_steps) for u, c in zip(user_prompts, current_prompts)]
        return chat_inputs(self.processor, conversations, previews, self.preview_size)

    def _policy_logits(self, logits):
        logits = logits.float()
        logits[..., self.suppressed] = -math.inf
        return logits / self.temperature

    @torch.no_grad()
    def refine(self, previews, user_prompts, current_prompts, step, num_steps):
        inputs = self._inputs(previews, user_prompts, current_prompts, step, num_steps)
        completion, logprobs, mask = self.generate(inputs)
        answers = self.processor.tokenizer.batch_decode(completion, skip_special_tokens=True)
        prompts, fallback = [], []
        for answer, current in zip(answers, current_prompts):
            parsed = parse_answer(answer, self.max_words)
            fallback.append(parsed is None)
            prompts.append(current if parsed is None else parsed)
        return RefinerOutput(prompts, answers, torch.tensor(fallback), dict(inputs), completion, mask.long(), logprobs)

    # -------------------------------------------------------------------------
    # decoding: our own loop, so that nothing of the vocabulary size is kept (and FastRefiner can
    # swap in a static KV cache and a compiled step)

    @torch.no_grad()
    def generate(self, inputs, max_new_tokens=None):
        """Sample (or, do_sample=False, take the argmax of) pi(token) until every row has ended or
        max_new_tokens. Returns CPU tensors: completion (B, T), padded after each row's end token;
        logprobs (B, T), log pi of the chosen tokens, computed step by step (lean: the (B, T, vocab)
        logits are never kept); mask (B, T) bool, True up to and including the end token.

        Multinomial sampling on softmax(logits / temperature) with the vision tokens banned, one
        draw per row and step (finished rows too): the same draws, in the same order, as
        transformers' generate makes for this policy, so the same seed gives the same tokens."""
        max_new_tokens = max_new_tokens or self.max_new_tokens
        rows = inputs["input_ids"].shape[0]
        batch, cache, mask = self._start_decoding(inputs, max_new_tokens)
        positions = self._rope_model().get_rope_index(
            batch["input_ids"], batch["mm_token_type_ids"], image_grid_thw=batch.get("image_grid_thw"),
            attention_mask=batch["attention_mask"])[0]  # (3, B, L): the multimodal rope positions
        columns = batch["attention_mask"].shape[1]
        # prefill (eager: its shapes change with the images), then one token per step
        logits = self.prefill(batch, positions, cache)
        next_position = positions[..., -1:] + 1  # (3, B, 1): text continues after the last position
        eos = torch.tensor(self.eos_ids, device=logits.device)
        done = torch.zeros(logits.shape[0], dtype=torch.bool, device=logits.device)
        tokens, logprobs = [], []
        for t in range(max_new_tokens):
            scores = self._policy_logits(logits)  # (B, V) fp32
            token = self.choose_token(scores)  # (B,)
            logprobs.append(torch.log_softmax(scores, -1).gather(1, token[:, None]).squeeze(1))
            token = token.masked_fill(done, self.pad_id)
            tokens.append(token)
            done |= torch.isin(token, eos)
            if t + 1 == max_new_tokens or bool(done.all()):
                break
            mask = self._grow_mask(mask, columns + t)
            logits = self.decode_step(token[:, None], next_position + t, mask, cache)
        completion = torch.stack(tokens, 1)[:rows].cpu()  # the caller's rows (FastRefiner adds some)
        is_end = torch.isin(completion, eos.cpu())
        keep = (is_end.cumsum(1) - is_end.long()) == 0  # up to and including the first end token
        logprobs = torch.stack(logprobs, 1)[:rows].cpu().masked_fill(~keep, 0.0)
        return completion.masked_fill(~keep, self.pad_id), logprobs, keep

    def choose_token(self, scores):
        """The next token of every row from the policy's (B, V) scores: a draw, or the argmax."""
        return torch.multinomial(scores.softmax(-1), 1).squeeze(1) if self.do_sample else scores.argmax(-1)

    def _start_decoding(self, inputs, max_new_tokens):
        """(the inputs on the model's device, an empty KV cache, the attention mask that grows by a
        column per generated token)."""
        from transformers import DynamicCache

        batch = self._decoding_batch(inputs)
        return batch, DynamicCache(config=self.model.config), batch["attention_mask"]

    def _decoding_batch(self, inputs):
        """The inputs on the model's device; with prefix_cache, each row's left padding moved to just
        before its image, so that the text every row shares fills the same first columns."""
        inputs = padding_before_image(inputs) if self.prefix_cache else inputs
        return {k: v.to(self.model.device) for k, v in inputs.items()}

    def prefill(self, batch, positions, cache):
        """The prompt into the empty `cache`: (B, V) logits at its last column. With prefix_cache, the
        columns that every row shares come from _fill_prefix and only the rest runs at batch B.
        The positions are explicit, sliced from those of the whole prompt: the model's own fallback
        after a filled cache (arange + rope_deltas kept from an earlier call) would be stale."""
        start = self._fill_prefix(batch, positions, cache) if self.prefix_cache else 0
        rest = dict(batch, input_ids=batch["input_ids"][:, start:], mm_token_type_ids=batch["mm_token_type_ids"][:, start:])
        return self.model(**rest, position_ids=positions[..., start:], past_key_values=cache, use_cache=True,
                          logits_to_keep=1).logits[:, -1]

    def _fill_prefix(self, batch, positions, cache):
        """The keys and values of the columns every row shares, computed at batch 1 and written into
        every row of the empty `cache` (cache.update: a StaticCache in place, so a compiled step keeps
        its addresses). Returns how many columns the cache now holds. Computed again in every call:
        kept across calls, it could outlive the weights (a fused AdamW step or a write through
        .data updates a parameter without bumping its _version)."""
        from transformers import DynamicCache

        rows, length = batch["input_ids"].shape[0], shared_prefix_length(batch)
        if length == 0:
            return 0  # nothing to share
        prefix = DynamicCache(config=self.model.config)
        self.model(input_ids=batch["input_ids"][:1, :length], attention_mask=batch["attention_mask"][:1, :length],
                   position_ids=positions[:, :1, :length], past_key_values=prefix, use_cache=True, logits_to_keep=1)
        for i, layer in enumerate(prefix.layers):  # (1, heads, P, head_dim) -> (B, heads, P, head_dim)
            cache.update(layer.keys.expand(rows, -1, -1, -1), layer.values.expand(rows, -1, -1, -1), i)
        return length

    def _grow_mask(self, mask, column):
        """The mask once the token at `column` is in the cache: (B, column) -> (B, column + 1)."""
        return torch.cat([mask, mask.new_ones(mask.shape[0], 1)], 1)

    def decode_step(self, token, position, mask, cache):
        """One decoding step: (B, 1) tokens at (3, B, 1) positions -> (B, V) logits."""
        return self.model(input_ids=token, position_ids=position, attention_mask=mask, past_key_values=cache,
                          use_cache=True).logits[:, -1]

    def _rope_model(self):
        """The Qwen2.5-VL model under the LM head (and under a PEFT wrapper): it knows the rope positions."""
        model = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
        return model.model

    def token_logprobs(self, inputs, completion_ids, completion_mask):
        """Teacher-forced log pi(completion | inputs): (B, T); differentiable (no no_grad here)."""
        device = self.model.device
        forward = {k: v.to(device) for k, v in inputs.items()}
        forward["input_ids"] = torch.cat([forward["input_ids"], completion_ids.to(device)], 1)
        forward["attention_mask"] = torch.cat([forward["attention_mask"], completion_mask.to(device)], 1)
        if "mm_token_type_ids" in forward:  # generated tokens are text (type 0)
            forward["mm_token_type_ids"] = torch.cat([forward["mm_token_type_ids"], torch.zeros_like(completion_ids).to(device)], 1)
        # only the T+1 last positions' logits: the full-sequence logits (vocab 152k) would dominate memory
        steps = completion_ids.shape[1]
        logits = self.model(**forward, use_cache=False, logits_to_keep=steps + 1).logits[:, :-1]  # (B, T, V)
        logprobs = torch.log_softmax(self._policy_logits(logits), -1)
        return logprobs.gather(-1, completion_ids.to(device).unsqueeze(-1)).squeeze(-1) * completion_mask.to(device)


# -----------------------------------------------------------------------------
# prefix caching: the chat template's text before the image is the same in every row, so its keys
# and values are computed once, at batch 1; the padding moves out of its way


def padding_before_image(inputs):
    """Left-padded processor outputs with each row's padding moved to just before its image: every
    row then starts with its text before the image in columns 0.., and ends where it did. A row
    without an image keeps its padding on the left. Moves no position (the rope positions count
    unmasked tokens only)."""
    pads = (inputs["attention_mask"] == 0).sum(1, keepdim=True)  # (B, 1)
    image = (inputs["mm_token_type_ids"] != 0).long().argmax(1, keepdim=True)  # (B, 1) first image column; 0: none
    text = (image - pads).clamp(min=0)  # (B, 1) tokens before the image
    columns = torch.arange(inputs["input_ids"].shape[1], device=pads.device)  # (L,)
    # column c of the result takes c + pads (the text), c - text (the padding), or c (image and after)
    source = torch.where(columns < text, columns + pads, torch.where(columns < text + pads, columns - text, columns))
    return dict(inputs, **{k: inputs[k].gather(1, source) for k in ("input_ids", "attention_mask", "mm_token_type_ids")})


def shared_prefix_length(batch):
    """How many first columns every row holds the same text tokens in (no padding, no image), at
    most all but the last column (the prefill must run at least one); 0 for a single row, which
    shares nothing."""
    ids = batch["input_ids"]
    if len(ids) == 1:
        return 0
    shared = (ids == ids[:1]).all(0) & batch["attention_mask"].bool().all(0) & (batch["mm_token_type_ids"] == 0).all(0)  # (L,)
    return min(int(shared.long().cumprod(0).sum()), ids.shape[1] - 1)


# -----------------------------------------------------------------------------
# the fast path: the same loop on a static KV cache, its decode step compiled once per shape;
# prompts padded to a few bucketed shapes so that the compiled step is reused across calls

PROMPT_BUCKET = 128  # fast decoding pads prompts to a multiple of this many tokens (few shapes to compile)


def pad_to_bucket(inputs, pad_id, bucket=PROMPT_BUCKET):
    """Processor outputs padded for the fast decode path: rows to the next power of two (copies of
    the last row; callers drop them), columns on the left to a multiple of `bucket` (padding, mask 0).
    Left padding moves no position (the rope positions count unmasked tokens only)."""
    rows = inputs["input_ids"].shape[0]
    extra = (1 << (rows - 1).bit_length()) - rows
    if extra:
        inputs = select_rows(inputs, list(range(rows)) + [rows - 1] * extra)
    columns = inputs["input_ids"].shape[1]
    pad = -columns % bucket
    out = dict(inputs)
    for key, value in (("input_ids", pad_id), ("attention_mask", 0), ("mm_token_type_ids", 0)):
        if key in inputs:
            out[key] = torch.nn.functional.pad(inputs[key], (pad, 0), value=value)
    return out


class FastRefiner(Refiner):
    """The Refiner decoding on a StaticCache with a torch.compile'd step: the same policy, tokens
    and log-probs. A compiled step is specialised to its tensors' shapes and addresses, so the
    prompts are padded to buckets (pad_to_bucket), the cache of each shape is made once and reset,
    and the attention mask spans the whole cache from the start (future columns 0)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._caches, self._compiled_step = {}, None  # {(rows, length): StaticCache}, the compiled decode_step

    def _start_decoding(self, inputs, max_new_tokens):
        batch = self._decoding_batch(pad_to_bucket(inputs, self.pad_id))
        mask = batch["attention_mask"]
        cache = self._static_cache(mask.shape[0], mask.shape[1] + max_new_tokens)
        return batch, cache, torch.cat([mask, mask.new_zeros(mask.shape[0], max_new_tokens)], 1)

    def _grow_mask(self, mask, column):
        mask[:, column] = 1
        return mask

    def decode_step(self, token, position, mask, cache):
        if self._compiled_step is None:
            # every (rows, prompt bucket + max_new_tokens) is one specialisation; allow more than dynamo's default 8
            torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
            # CUDA graphs on a GPU ("reduce-overhead": a decode step of a 3B model is bound by kernel
            # launches), inductor's default on a CPU
            mode = "reduce-overhead" if self.model.device.type == "cuda" else None
            self._compiled_step = torch.compile(super().decode_step, mode=mode, dynamic=False)
        try:
            # a copy: a CUDA graph writes its next output into the same buffer, and the policy masks it in place
            return self._compiled_step(token, position, mask, cache).clone()
        except Exception as e:  # any compiler failure (no Triton, an unsupported GPU or platform): decode eagerly
            if self._compiled_step == super().decode_step:
                raise  # the eager step itself failed: not the compiler's doing
            print(f"warning: the refiner's compiled decode step failed ({first_line(e)}); decoding without it", file=sys.stderr)
            self._compiled_step = super().decode_step
            return self._compiled_step(token, position, mask, cache)

    def _static_cache(self, rows, length):
        """The StaticCache of this shape, made once and reset for every call (a new one would recompile)."""
        from transformers import StaticCache

        if (rows, length) not in self._caches:
            self._caches[rows, length] = StaticCache(config=self.model.config, max_cache_len=length)
        cache = self._caches[rows, length]
        cache.reset()
        return cache


FAST_DECODE = {"auto": None, "on": True, "off": False}  # auto: on where the refiner runs on a GPU


def refiner_class(fast_decode="auto", device="cpu"):
    """Refiner, or FastRefiner where --fast-decode is on (auto: where the refiner runs on a GPU)."""
    fast = FAST_DECODE[fast_decode]
    return FastRefiner if (torch.device(device).type == "cuda" if fast is None else fast) else Refiner


def load_refiner(name, adapter=None, device="cpu", dtype=torch.float32, fast_decode="auto", preview_size=0, **kwargs):
    """'none' -> None (plain sampling); otherwise a Refiner (a FastRefiner per --fast-decode). The
    scripts' --fast-decode and --preview-size (0: the refiner's default, 448 px for hub models) are checked here."""
    if name in (None, "", "none"):
        return None
    if fast_decode not in FAST_DECODE:
        raise UserError(f"--fast-decode must be one of {', '.join(FAST_DECODE)}, got '{fast_decode}'")
    if preview_size and preview_size < 28:
        raise UserError(f"--preview-size must be 0 (the refiner's default) or >= 28 px, got {preview_size}")
    if preview_size:
        kwargs["preview_size"] = preview_size
    return refiner_class(fast_decode, device).from_pretrained(name, adapter=adapter, device=device, dtype=dtype, **kwargs)


# -----------------------------------------------------------------------------
# training helpers (train_refiner.py, bench.py): minibatch rows, LoRA, adapter folders


def select_rows(inputs, rows):
    """Rows of a batched Qwen2.5-VL processor output (on CPU), for a minibatch.

    pixel_values hold every image's patches concatenated, (sum_i t_i*h_i*w_i, D), so they are cut
    with image_grid_thw; the other tensors are (B, ...). Columns that are left padding in every
    selected row are dropped (the rope positions come from the attention mask, so they do not
    change)."""
    rows = torch.as_tensor(rows)
    out = {}
    for key, value in inputs.items():
        if key == "pixel_values" and "image_grid_thw" in inputs:
            counts = inputs["image_grid_thw"].prod(-1)  # (B,) patches per image
            starts = torch.cumsum(counts, 0) - counts
            out[key] = torch.cat([value[starts[r]: starts[r] + counts[r]] for r in rows.tolist()])
        else:
            out[key] = value[rows]
    first = int(out["attention_mask"].any(0).float().argmax())  # first column not all padding
    for key in ("input_ids", "attention_mask", "mm_token_type_ids"):
        if key in out:
            out[key] = out[key][:, first:]
    return out


LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")  # every linear layer


def add_lora(refiner, rank, alpha, targets=LORA_TARGETS):
    """Wrap the refiner's model in a peft LoRA on the language model's linear layers named in
    `targets` (e.g. ["q_proj", "v_proj"]); the vision tower stays frozen. Returns the trainable parameters."""
    from peft import LoraConfig, get_peft_model

    # a regex, so that the vision tower's layers of the same name (mlp.gate_proj, ...) stay frozen
    target = rf".*language_model.*\.({'|'.join(targets)})"
    lora = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, target_modules=target)
    try:
        model = get_peft_model(refiner.model, lora)
    except ValueError as e:
        raise UserError(f"LoRA targets '{','.join(targets)}' not found in the refiner's language model: {e}") from e
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("language_model" in n and "lora_" in n for n in trainable), trainable[:4]
    refiner.model = model
    return [p for p in model.parameters() if p.requires_grad]


def base_model_name(name):
    """What adapter_config.json records as the base: the alias (resolved by REFINERS on
    load, wherever the toy world lives), an absolute folder, or the hub id."""
    if name in REFINERS:
        return name
    return str(Path(name).resolve()) if Path(name).is_dir() else name


def save_adapter(model, out, base_name):
    """PEFT adapter folder in `out` (adapter_config.json + adapter_model.safetensors), each file
    written to a temp folder first and moved in with an atomic rename."""
    model.peft_config["default"].base_model_name_or_path = base_name
    with tempfile.TemporaryDirectory(dir=out) as tmp:
        model.save_pretrained(tmp)
        for f in Path(tmp).iterdir():
            os.replace(f, Path(out) / f.name)
