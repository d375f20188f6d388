"""The "deepseek" prompt template: a sample -> token ids, per-token labels and per-token kinds.

Template (JANUS_SPEC): ``{system}\\n\\n<|User|>: {msg}\\n\\n<|Assistant|>: {answer}<eos>``, opened by
BOS. Each image becomes ``<begin_of_image>`` + N x ``<image_placeholder>`` + ``<end_of_image>``. Only the
assistant answers (and their EOS) are trained in understanding samples; a text sample is trained on all of
it; a generation prompt ends with ``<begin_of_image>`` and its N slots carry the image (ids or latents),
trained by the image loss, never by the text labels.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from data_prep.schema import (
    GENERATION_TASKS,
    IMAGE_TAG,
    TASKS,
    TEXT_TASKS,
    UNDERSTANDING_TASKS,
    Sample,
    Turn,
)
from model.tokenizer import ASSISTANT, USER, SpecialIds

IGNORE = -100
"""Label of a position that is not trained."""
SEP = "\n\n"
CAPTION_PROMPT = "Describe this image."
"""User turn of a caption sample (the caption is the answer)."""

# Per-token kinds: where the model puts something other than the token's embedding.
TEXT, UND_SLOT, GEN_SLOT, UND_BOI, GEN_BOI = 0, 1, 2, 3, 4


@dataclass
class Example:
    """One tokenized sample, before batching."""

    input_ids: list[int] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    kinds: list[int] = field(default_factory=list)
    """Per token: TEXT, UND_SLOT, GEN_SLOT, UND_BOI or GEN_BOI."""
    task: int = 0
    """Index of the sample's task in data_prep.schema.TASKS."""
    num_und_images: int = 0
    has_gen_image: bool = False

    def add(self, ids: list[int], train: bool, kind: int = TEXT) -> None:
        self.input_ids += ids
        self.labels += ids if train else [IGNORE] * len(ids)
        self.kinds += [kind] * len(ids)

    def __len__(self) -> int:
        return len(self.input_ids)


def _text_ids(tokenizer, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False) if text else []


def _add_with_images(ex: Example, tokenizer, ids: SpecialIds, text: str, train: bool, n_tokens: int) -> None:
    """Text whose IMAGE_TAG marks are replaced by understanding image blocks."""
    pieces = text.split(IMAGE_TAG)
    for i, piece in enumerate(pieces):
        ex.add(_text_ids(tokenizer, piece), train)
        if i < len(pieces) - 1:
            ex.add([ids.boi], False, UND_BOI)
            ex.add([ids.image] * n_tokens, False, UND_SLOT)
            ex.add([ids.eoi], False)
            ex.num_und_images += 1


def understanding_turns(sample: Sample) -> list[Turn]:
    """The conversation of an understanding sample, with the image referenced exactly once."""
    meta = sample.meta
    if meta.task == "caption" and not meta.conversation:
        turns = [Turn("user", f"{IMAGE_TAG}\n{CAPTION_PROMPT}"), Turn("assistant", sample.text or "")]
    else:
        turns = list(meta.conversation)
    if not any(t.role == "assistant" for t in turns):
        raise ValueError(f"sample {sample.key}: {meta.task} sample has no assistant turn")
    tagged = sum(t.content.count(IMAGE_TAG) for t in turns)
    if sample.image is not None and tagged == 0:
        first = next(i for i, t in enumerate(turns) if t.role == "user")
        turns[first] = Turn("user", f"{IMAGE_TAG}\n{turns[first].content}")
    return turns


def build_understanding(sample: Sample, tokenizer, ids: SpecialIds, n_tokens: int) -> Example:
    ex = Example(task=TASKS.index(sample.meta.task))
    ex.add([ids.bos], False)
    for turn in understanding_turns(sample):
        if turn.role == "system":
            _add_with_images(ex, tokenizer, ids, turn.content + SEP, False, n_tokens)
        elif turn.role == "user":
            _add_with_images(ex, tokenizer, ids, f"{USER}: {turn.content}{SEP}", False, n_tokens)
        else:
            ex.add(_text_ids(tokenizer, f"{ASSISTANT}:"), False)
            _add_with_images(ex, tokenizer, ids, f" {turn.content}", True, n_tokens)
            ex.add([ids.eos], True)
    if sample.image is not None and ex.num_und_images != 1:
        raise ValueError(f"sample {sample.key}: the image is referenced {ex.num_und_images} times")
    return ex


def understanding_prompt(
    tokenizer, ids: SpecialIds, question: str, n_tokens: int, has_image: bool, system: str | None = None
) -> Example:
    """An inference prompt: BOS [system] user turn (image first) and ``<|Assistant|>:``, nothing trained."""
    ex = Example()
    ex.add([ids.bos], False)
    if system:
        ex.add(_text_ids(tokenizer, system + SEP), False)
    tag = f"{IMAGE_TAG}\n" if has_image and IMAGE_TAG not in question else ""
    _add_with_images(ex, tokenizer, ids, f"{USER}: {tag}{question}{SEP}", False, n_tokens)
    ex.add(_text_ids(tokenizer, f"{ASSISTANT}:"), False)
    return ex


def build_text(sample: Sample, tokenizer, ids: SpecialIds) -> Example:
    ex = Example(task=TASKS.index(sample.meta.task))
    ex.add([ids.bos], False)
    ex.add(_text_ids(tokenizer, sample.text or ""), True)
    ex.add([ids.eos], True)
    return ex


def generation_prompt(sample: Sample) -> str:
    """The prompt of a t2i sample (its text) or a class-label sample (its class name)."""
    meta = sample.meta
    if meta.task == "class_label":
        name = meta.class_name or sample.text
        return name if name else str(meta.label)
    return sample.text or ""


def prompt_ids(tokenizer, ids: SpecialIds, prompt: str) -> list[int]:
    """BOS + the user turn + ``<|Assistant|>:`` (the generation prompt, without ``<begin_of_image>``)."""
    return [ids.bos, *_text_ids(tokenizer, f"{USER}: {prompt}{SEP}{ASSISTANT}:")]


def build_generation(
    sample: Sample, tokenizer, ids: SpecialIds, n_tokens: int, drop_condition: bool, mask_dropped: bool
) -> tuple[Example, list[int]]:
    """A generation example and its attention mask (0 on dropped prompt tokens when ``mask_dropped``).

    ``drop_condition`` replaces every prompt token but BOS by pad (classifier-free guidance training).
    """
    ex = Example(task=TASKS.index(sample.meta.task), has_gen_image=True)
    prompt = prompt_ids(tokenizer, ids, generation_prompt(sample))
    attn = [1] * len(prompt)
    if drop_condition:
        prompt = [prompt[0]] + [ids.pad] * (len(prompt) - 1)
        if mask_dropped:
            attn = [1] + [0] * (len(prompt) - 1)
    ex.add(prompt, False)
    ex.add([ids.boi], False, GEN_BOI)
    ex.add([ids.image] * n_tokens, False, GEN_SLOT)
    ex.add([ids.eoi], False)
    return ex, attn + [1] * (n_tokens + 2)


def build_example(
    sample: Sample,
    tokenizer,
    ids: SpecialIds,
    n_tokens: int,
    cfg_drop_prob: float = 0.0,
    rng: random.Random | None = None,
    mask_dropped: bool = False,
) -> tuple[Example, list[int]]:
    """Any sample -> (example, attention mask). The task decides the template."""
    task = sample.meta.task
    if task in GENERATION_TASKS:
        drop = rng is not None and cfg_drop_prob > 0 and rng.random() < cfg_drop_prob
        return build_generation(sample, tokenizer, ids, n_tokens, drop, mask_dropped)
    if task in UNDERSTANDING_TASKS:
        ex = build_understanding(sample, tokenizer, ids, n_tokens)
    elif task in TEXT_TASKS:
        ex = build_text(sample, tokenizer, ids)
    else:  # pragma: no cover - schema validates tasks
        raise ValueError(f"sample {sample.key}: unknown task {task!r}")
    return ex, [1] * len(ex)
