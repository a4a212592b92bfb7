"""Model configurations: the MiniMind decoder (`MiniMindConfig`) and the vision-language model (`VLMConfig`).

Field names and defaults are those of the reference MiniMind / MiniMind-V projects, so their `config.json`
files load unchanged. Named presets live in `PRESETS`; `preset_config(name, **overrides)` builds one.
"""

from __future__ import annotations

import math

from transformers import PretrainedConfig

# The image placeholder: each image fills a block of `image_token_len` of these tokens (fixed id in every MiniMind
# tokenizer, the reference's `image_ids[0]`).
IMAGE_TOKEN = "<|image_pad|>"
IMAGE_TOKEN_ID = 12
IMAGE_MARKER = "<image>"  # where an image goes in message text; expanded to a block of IMAGE_TOKEN
# Ends each row of tiles of an image cut into tiles (`max_tiles` > 1): a reserved special token of every MiniMind
# tokenizer, so the vocabulary is unchanged.
TILE_ROW_END = "<|vision_pad|>"

YARN_SCALING = {
    "beta_fast": 32,
    "beta_slow": 1,
    "factor": 16,
    "original_max_position_embeddings": 2048,
    "attention_factor": 1.0,
    "type": "yarn",
}

# Shape of `siglip2-base-p32-256-ve`: 256x256 input, 32x32 patches -> 8x8 = 64 tokens of width 768.
SIGLIP2_BASE_P32_256 = {
    "model_type": "siglip_vision_model",
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "image_size": 256,
    "patch_size": 32,
    "num_channels": 3,
    "hidden_act": "gelu_pytorch_tanh",
    "layer_norm_eps": 1e-6,
    "vision_use_head": False,
}


class MiniMindConfig(PretrainedConfig):
    """Decoder configuration. `intermediate_size` defaults to ceil(hidden * pi / 64) * 64 (768 -> 2432)."""

    model_type = "minimind"

    def __init__(
        self,
        hidden_size: int = 768,
        num_hidden_layers: int = 8,
        use_moe: bool = False,
        dropout: float = 0.0,
        vocab_size: int = 6400,
        bos_token_id: int = 1,
        eos_token_id: int = 2,
        flash_attn: bool = True,
        num_attention_heads: int = 8,
        num_key_value_heads: int = 4,
        head_dim: int | None = None,
        hidden_act: str = "silu",
        intermediate_size: int | None = None,
        max_position_embeddings: int = 32768,
        rms_norm_eps: float = 1e-6,
        rope_theta: float = 1e6,
        inference_rope_scaling: bool = False,
        num_experts: int = 4,
        num_experts_per_tok: int = 1,
        moe_intermediate_size: int | None = None,
        norm_topk_prob: bool = True,
        router_aux_loss_coef: float = 5e-4,
        tie_word_embeddings: bool = True,
        initializer_range: float = 0.02,
        **kwargs,
    ):
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.use_moe = bool(use_moe)
        self.dropout = dropout
        self.vocab_size = vocab_size
        self.flash_attn = flash_attn
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads
        self.head_dim = head_dim or hidden_size // num_attention_heads
        self.hidden_act = hidden_act
        self.intermediate_size = intermediate_size or math.ceil(hidden_size * math.pi / 64) * 64
        self.max_position_embeddings = max_position_embeddings
        self.rms_norm_eps = rms_norm_eps
        self.rope_theta = rope_theta
        self.inference_rope_scaling = inference_rope_scaling
        self.num_experts = num_experts
        self.num_experts_per_tok = num_experts_per_tok
        self.moe_intermediate_size = moe_intermediate_size or self.intermediate_size
        self.norm_topk_prob = norm_topk_prob
        self.router_aux_loss_coef = router_aux_loss_coef
        self.initializer_range = initializer_range  # std of the from-scratch init; only new weights use it
        # The scaling follows `inference_rope_scaling` alone, as in the reference; saved copies are ignored.
        kwargs.pop("rope_scaling", None)
        kwargs.pop("rope_parameters", None)
        super().__init__(
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            tie_word_embeddings=tie_word_embeddings,
            **kwargs,
        )
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads ({num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({num_key_value_heads})"
            )

    @property
    def yarn_scaling(self) -> dict | None:
        """The YaRN parameters when long-context scaling is enabled, else None."""
        return YARN_SCALING if self.inference_rope_scaling else None


class VLMConfig(MiniMindConfig):
    """MiniMind-V configuration: the decoder plus the image placeholder and vision tower description.

    `vision_config` (a SiglipVisionConfig dict) describes the tower so that a checkpoint folder can rebuild it
    without the original tower directory; `image_mean`/`image_std`/`image_resample` are its preprocessing.
    `max_tiles` > 1 cuts large images into up to that many tiles besides their thumbnail
    (`vision.select_grid`); 1 reads every image as one square, as the reference does.
    """

    model_type = "minimind-v"

    def __init__(
        self,
        image_special_token: str = IMAGE_TOKEN,
        image_ids: list[int] | None = None,
        image_hidden_size: int = 768,
        image_token_len: int = 64,
        vision_config: dict | None = None,
        image_mean: list[float] | None = None,
        image_std: list[float] | None = None,
        image_resample: int = 3,
        max_tiles: int = 1,
        **kwargs,
    ):
        self.image_special_token = image_special_token
        self.image_ids = list(image_ids) if image_ids is not None else [IMAGE_TOKEN_ID]
        self.image_hidden_size = image_hidden_size
        self.image_token_len = image_token_len
        self.vision_config = dict(vision_config) if vision_config else None
        self.image_mean = list(image_mean) if image_mean is not None else [0.5, 0.5, 0.5]
        self.image_std = list(image_std) if image_std is not None else [0.5, 0.5, 0.5]
        self.image_resample = image_resample
        self.max_tiles = max_tiles
        super().__init__(**kwargs)

    @property
    def image_token_id(self) -> int:
        return self.image_ids[0]

    @property
    def image_size(self) -> int:
        """Side of the square tower input; 256 when no tower is described."""
        return (self.vision_config or {}).get("image_size", 256)


MiniMindConfig.register_for_auto_class()
VLMConfig.register_for_auto_class()

TINY_VISION = {
    **SIGLIP2_BASE_P32_256,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "image_size": 64,
    "patch_size": 8,
}

# The demo's tower: 16x16-pixel patches of a 64x64 image (16 visual tokens, 2x2 per quarter of the image). With
# 8x8 patches (64 tokens) every step costs ~1.5x more and, in the same minutes, the model learned less.
SMALL_VISION = {
    **TINY_VISION, "hidden_size": 128, "intermediate_size": 512, "num_attention_heads": 4, "patch_size": 16,
}

# Tower shapes for from-zero training, selected with `--vision_model random:<name>`.
VISION_PRESETS: dict[str, dict] = {
    "siglip2-base-p32-256": SIGLIP2_BASE_P32_256, "tiny": TINY_VISION, "small": SMALL_VISION,
}

PRESETS: dict[str, dict] = {
    "minimind-3v": dict(hidden_size=768, num_hidden_layers=8, vision_config=SIGLIP2_BASE_P32_256),
    "minimind-3v-moe": dict(hidden_size=768, num_hidden_layers=8, use_moe=True, vision_config=SIGLIP2_BASE_P32_256),
    # Reference head counts (8 query, 4 key/value), so the native-weight flags rebuild it exactly.
    "tiny": dict(
        hidden_size=64, num_hidden_layers=2, image_hidden_size=64, image_token_len=64, vision_config=TINY_VISION
    ),
}


def vision_dims(vision_config: dict) -> dict:
    """`image_hidden_size` and `image_token_len` implied by a SigLIP tower config."""
    patches = (vision_config["image_size"] // vision_config["patch_size"]) ** 2
    return {"image_hidden_size": vision_config["hidden_size"], "image_token_len": patches}


def preset_config(name: str, **overrides) -> VLMConfig:
    """Build the `VLMConfig` of a named preset (`minimind-3v`, `minimind-3v-moe`, `tiny`) with overrides."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    return VLMConfig(**{**PRESETS[name], **overrides})
