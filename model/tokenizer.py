"""Tokenizers: the offline byte-level one of the debug flavor, and the special token ids of any tokenizer.

Real flavors load the checkpoint's own tokenizer from a local path. The debug tokenizer is built in code
(no download, no file): byte-level, one token per byte, no merges, plus DeepSeek's special tokens under
their real names so prompts look the same for every flavor.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from model.flavors import FlavorConfig

BOS = "<｜begin▁of▁sentence｜>"
EOS = "<｜end▁of▁sentence｜>"
PAD = "<｜▁pad▁｜>"
IMAGE = "<image_placeholder>"
BOI = "<begin_of_image>"
EOI = "<end_of_image>"
USER = "<|User|>"
ASSISTANT = "<|Assistant|>"
DEBUG_SPECIALS: tuple[str, ...] = (BOS, EOS, PAD, IMAGE, BOI, EOI, USER, ASSISTANT)


@dataclass(frozen=True)
class SpecialIds:
    """Ids of the tokens the prompt format and the losses rely on."""

    bos: int
    eos: int
    pad: int
    image: int
    """``<image_placeholder>``: one per image token slot."""
    boi: int
    """``<begin_of_image>``."""
    eoi: int
    """``<end_of_image>``."""


def build_debug_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level tokenizer (256 byte tokens + DEBUG_SPECIALS), built offline."""
    byte_vocab = pre_tokenizers.ByteLevel.alphabet()
    vocab = {tok: i for i, tok in enumerate(sorted(byte_vocab))}
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    core.add_special_tokens(list(DEBUG_SPECIALS))
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        padding_side="right",
        # the names transformers' JanusProcessor reads
        extra_special_tokens={"image_token": IMAGE, "boi_token": BOI, "eoi_token": EOI},
    )
    tok.add_bos_token = False  # our prompt builder places BOS itself
    return tok


def load_tokenizer(flavor: FlavorConfig, path: str | Path | None = None) -> PreTrainedTokenizerBase:
    """The debug tokenizer (no path) or the tokenizer stored at a local checkpoint ``path``."""
    if path is not None:
        return AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    if not flavor.debug_tokenizer:
        raise ValueError(f"flavor {flavor.name!r} needs a local checkpoint path for its tokenizer")
    return build_debug_tokenizer()


def special_ids(tokenizer: PreTrainedTokenizerBase) -> SpecialIds:
    """Look the special tokens up by name; a tokenizer missing one is an error naming it."""

    def one(token: str) -> int:
        idx = tokenizer.convert_tokens_to_ids(token)
        if idx is None or (idx == tokenizer.unk_token_id and tokenizer.unk_token != token):
            raise ValueError(f"tokenizer has no {token!r} token")
        return int(idx)

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else one(PAD)
    return SpecialIds(
        bos=int(tokenizer.bos_token_id),
        eos=int(tokenizer.eos_token_id),
        pad=int(pad),
        image=one(IMAGE),
        boi=one(BOI),
        eoi=one(EOI),
    )
