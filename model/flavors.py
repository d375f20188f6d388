"""Model flavors: the dimensions of every model we build, as plain data.

``FLAVORS`` is the one registry (a dict, no registration by import). A flavor is a :class:`FlavorConfig`
composed of per-component configs. ``debug`` is tiny (a few M parameters, 64x64 images, CPU seconds) and
builds either family; the real flavors carry the paper dimensions (JANUS_SPEC.md) and one family each.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

FAMILIES: tuple[str, ...] = ("janus_pro", "janusflow")


def _check_positive(obj: object, *names: str) -> None:
    for name in names:
        value = getattr(obj, name)
        if not isinstance(value, int) or value <= 0:
            raise ValueError(f"{type(obj).__name__}.{name} must be a positive int, got {value!r}")


@dataclass(kw_only=True)
class LLMConfig:
    """The Llama-architecture language model (DeepSeek-LLM)."""

    vocab_size: int = 102400
    """Rows of the token embedding and of the text head."""
    hidden_size: int = 2048
    """Model width D."""
    num_layers: int = 24
    """Decoder blocks."""
    num_heads: int = 16
    """Attention heads (no grouped-query attention in DeepSeek-LLM)."""
    intermediate_size: int = 5632
    """SwiGLU FFN width."""
    max_position_embeddings: int = 4096
    """Trained context length."""
    rope_theta: float = 10000.0
    """RoPE base."""
    rms_norm_eps: float = 1e-6
    """RMSNorm epsilon."""

    def __post_init__(self) -> None:
        _check_positive(self, "vocab_size", "hidden_size", "num_layers", "num_heads", "intermediate_size")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"LLMConfig.hidden_size {self.hidden_size} not divisible by num_heads")


@dataclass(kw_only=True)
class VisionConfig:
    """The understanding encoder (SigLIP) and its input size."""

    hidden_size: int = 1024
    """SigLIP width."""
    num_layers: int = 24
    """SigLIP blocks."""
    num_heads: int = 16
    """SigLIP attention heads."""
    intermediate_size: int = 4096
    """SigLIP MLP width."""
    image_size: int = 384
    """Understanding image side in pixels (long side resized, padded square)."""
    patch_size: int = 16
    """SigLIP patch side; (image_size // patch_size)**2 image tokens per image."""

    def __post_init__(self) -> None:
        _check_positive(self, "hidden_size", "num_layers", "num_heads", "intermediate_size", "image_size")
        if self.image_size % self.patch_size:
            raise ValueError(f"VisionConfig.image_size {self.image_size} not divisible by patch_size")

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size


@dataclass(kw_only=True)
class VQConfig:
    """Janus-Pro's discrete generation tokenizer (LlamaGen VQ) and the generation image size."""

    codebook_size: int = 16384
    """Number of codes; also the width of the generation head's output."""
    embed_dim: int = 8
    """Code dimension (L2-normalised codes)."""
    base_channels: int = 128
    """VQ encoder/decoder base width (>= 32: GroupNorm uses 32 groups)."""
    channel_multiplier: list[int] = field(default_factory=lambda: [1, 1, 2, 2, 4])
    """Width multiplier per resolution; downsampling = 2 ** (len - 1)."""
    num_res_blocks: int = 2
    """Residual blocks per resolution."""
    latent_channels: int = 256
    """Channels before the 1x1 conv to the code dimension."""
    image_size: int = 384
    """Generation image side in pixels (short side resized, centre-cropped)."""

    def __post_init__(self) -> None:
        _check_positive(self, "codebook_size", "embed_dim", "num_res_blocks", "latent_channels", "image_size")
        if self.base_channels < 32 or self.base_channels % 32:
            raise ValueError(f"VQConfig.base_channels must be a multiple of 32, got {self.base_channels}")
        if self.image_size % self.downsample:
            raise ValueError(f"VQConfig.image_size {self.image_size} not divisible by {self.downsample}")

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.channel_multiplier) - 1)

    @property
    def grid(self) -> int:
        return self.image_size // self.downsample


@dataclass(kw_only=True)
class FlowConfig:
    """JanusFlow's generation path: VAE latents, ConvNeXt encoder/decoder, REPA head."""

    channels: int = 768
    """Width of the generation encoder/decoder (ConvNeXt blocks)."""
    num_blocks: int = 2
    """ConvNeXt blocks in the encoder and in the decoder each."""
    patch_size: int = 2
    """Patchify stride on the latent (and pixel-shuffle factor of the decoder)."""
    image_size: int = 384
    """Generation image side in pixels."""
    vae_block_out_channels: list[int] = field(default_factory=lambda: [128, 256, 512, 512])
    """diffusers AutoencoderKL widths (SDXL-VAE); downsampling = 2 ** (len - 1)."""
    vae_layers_per_block: int = 2
    """AutoencoderKL resnet layers per block."""
    vae_norm_num_groups: int = 32
    """AutoencoderKL GroupNorm groups."""
    latent_channels: int = 4
    """VAE latent channels."""
    vae_scaling_factor: float = 0.13025
    """Latents are multiplied by this before entering the model (SDXL-VAE value)."""
    repa_layer: int = 6
    """REPA reads the LLM hidden state after this many decoder blocks."""
    repa_hidden_size: int = 2048
    """Width of the 3-layer REPA MLP."""
    norm_eps: float = 1e-6
    """RMSNorm epsilon inside the encoder/decoder."""

    def __post_init__(self) -> None:
        _check_positive(self, "channels", "num_blocks", "patch_size", "latent_channels", "repa_layer")
        grid = self.image_size // self.vae_downsample
        if self.image_size % self.vae_downsample or grid % self.patch_size:
            raise ValueError(f"FlowConfig.image_size {self.image_size} does not tile into patches")

    @property
    def vae_downsample(self) -> int:
        return 2 ** (len(self.vae_block_out_channels) - 1)

    @property
    def latent_size(self) -> int:
        return self.image_size // self.vae_downsample

    @property
    def grid(self) -> int:
        return self.latent_size // self.patch_size


@dataclass(kw_only=True)
class FlavorConfig:
    """One buildable model: its family and the dimensions of each part."""

    name: str
    """Registry key."""
    families: tuple[str, ...] = FAMILIES
    """Families this flavor can build; the first is the default."""
    llm: LLMConfig = field(default_factory=LLMConfig)
    """Language model dimensions."""
    vision: VisionConfig = field(default_factory=VisionConfig)
    """Understanding encoder dimensions."""
    vq: VQConfig = field(default_factory=VQConfig)
    """Janus-Pro generation tokenizer dimensions."""
    flow: FlowConfig = field(default_factory=FlowConfig)
    """JanusFlow generation path dimensions."""
    debug_tokenizer: bool = False
    """Build the byte-level tokenizer in code (no checkpoint path needed)."""
    image_token_id: int = 100581
    """Id of ``<image_placeholder>`` in the flavor's tokenizer (transformers' Janus config needs it)."""

    def __post_init__(self) -> None:
        bad = [f for f in self.families if f not in FAMILIES]
        if not self.families or bad:
            raise ValueError(f"FlavorConfig.families {self.families!r}: each must be one of {FAMILIES}")

    def family(self, family: str | None = None) -> str:
        """Resolve ``family`` (None -> the default) and check this flavor builds it (its dimensions too, by
        the family's own rule: checked here, not at construction, since the families import the flavors)."""
        family = family or self.families[0]
        if family not in self.families:
            raise ValueError(f"flavor {self.name!r} builds {self.families}, not {family!r}")
        from model.family import get_family

        get_family(family).check_flavor(self)
        return family

    def num_image_tokens(self, family: str | None = None) -> int:
        """Image tokens per generation image (== per understanding image)."""
        from model.family import get_family

        return get_family(self.family(family)).gen_grid(self) ** 2


DEBUG_VOCAB = 272
"""256 bytes + the special tokens of :mod:`model.tokenizer`, rounded up to a multiple of 16."""

FLAVORS: dict[str, FlavorConfig] = {
    "debug": FlavorConfig(
        name="debug",
        llm=LLMConfig(
            vocab_size=DEBUG_VOCAB,
            hidden_size=128,
            num_layers=4,
            num_heads=4,
            intermediate_size=352,
            max_position_embeddings=1024,
        ),
        vision=VisionConfig(
            hidden_size=64, num_layers=2, num_heads=4, intermediate_size=128, image_size=64, patch_size=8
        ),
        vq=VQConfig(
            codebook_size=256,
            embed_dim=8,
            base_channels=32,
            channel_multiplier=[1, 1, 2, 2],
            num_res_blocks=1,
            latent_channels=32,
            image_size=64,
        ),
        flow=FlowConfig(
            channels=32,
            num_blocks=2,
            image_size=64,
            vae_block_out_channels=[16, 32, 32],
            vae_layers_per_block=1,
            vae_norm_num_groups=8,
            vae_scaling_factor=1.0,
            repa_layer=2,
            repa_hidden_size=64,
        ),
        debug_tokenizer=True,
        image_token_id=259,
    ),
    "janus_pro_1b": FlavorConfig(name="janus_pro_1b", families=("janus_pro",)),
    "janus_pro_7b": FlavorConfig(
        name="janus_pro_7b",
        families=("janus_pro",),
        llm=LLMConfig(hidden_size=4096, num_layers=30, num_heads=32, intermediate_size=11008),
    ),
    "janusflow_1_3b": FlavorConfig(name="janusflow_1_3b", families=("janusflow",)),
}


def get_flavor(name: str) -> FlavorConfig:
    """The flavor called ``name`` (a deep copy, safe to modify). Unknown names list the valid ones."""
    if name not in FLAVORS:
        raise KeyError(f"unknown model flavor {name!r}; valid flavors: {sorted(FLAVORS)}")
    return copy.deepcopy(FLAVORS[name])
