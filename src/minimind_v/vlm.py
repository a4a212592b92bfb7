"""MiniMind-V: the MiniMind decoder reading images through a SigLIP tower and a projector.

Each image becomes `image_token_len` (L) visual tokens that replace a block of L `<|image_pad|>` placeholder
embeddings in the prompt. Shapes: B batch, T tokens, M images in the batch, D tower width, H hidden size.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from transformers.modeling_outputs import MoeCausalLMOutputWithPast

from .config import VLMConfig
from .llm import MiniMindForCausalLM, as_kv_cache
from .projector import VisionProjector
from .vision import ImagePreprocessor, build_vision_tower, load_vision_tower, read_preprocessor_config

TOWER_SHAPE_KEYS = (
    "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "image_size", "patch_size",
    "num_channels", "hidden_act", "layer_norm_eps", "attention_dropout",
)


class ImageBatch:
    """Images of a batch in reading order: pixels [M, 3, h, w] (`encoded`: their tower outputs [M, L, D]) and how
    many belong to each row, counts [B].

    `lenient` marks the reference call form (a dict / BatchFeature), which keeps the reference rules: a
    placeholder block without an image keeps its token embeddings, a cut block takes the first rows of its
    image, and unused images are ignored. Every other form must match the placeholders exactly.
    """

    def __init__(self, pixels: torch.Tensor, counts: torch.Tensor, lenient: bool, encoded: bool = False):
        self.pixels, self.counts, self.lenient, self.encoded = pixels, counts, lenient, encoded

    @classmethod
    def from_features(cls, features: list[torch.Tensor], batch: int) -> ImageBatch:
        """B tensors [N_b, L, D], the tower outputs of row b's images (N_b may be 0)."""
        if len(features) != batch:
            raise ValueError(f"image_features is a list of {len(features)} rows but input_ids has {batch} rows")
        return cls(torch.cat(features), torch.tensor([len(rows) for rows in features]), False, encoded=True)

    @classmethod
    def from_any(cls, pixel_values, batch: int) -> ImageBatch:
        """Accepts [B, 3, h, w] (one image a row), [B, N, 3, h, w] (N a row), a list of B tensors [N_b, 3, h, w]
        (N_b may be 0), or any of the tensor forms inside a dict / BatchFeature under `pixel_values`."""
        lenient = isinstance(pixel_values, Mapping)
        if lenient:
            pixel_values = pixel_values["pixel_values"]
        if isinstance(pixel_values, (list, tuple)):
            rows = [p.unsqueeze(0) if p.dim() == 3 else p for p in pixel_values]
            if len(rows) != batch:
                raise ValueError(f"pixel_values is a list of {len(rows)} rows but input_ids has {batch} rows")
            counts = torch.tensor([r.shape[0] for r in rows], device=rows[0].device if rows else None)
            return cls(torch.cat(rows) if rows else torch.empty(0), counts, lenient)
        if not isinstance(pixel_values, torch.Tensor):
            raise TypeError(f"pixel_values must be a tensor, a list of tensors or a dict, got {type(pixel_values)}")
        if pixel_values.dim() == 6 and pixel_values.shape[2] == 1:
            pixel_values = pixel_values.squeeze(2)
        if pixel_values.dim() == 4:
            pixel_values = pixel_values.unsqueeze(1)
        if pixel_values.dim() != 5:
            raise ValueError(f"pixel_values must be [B, 3, h, w] or [B, N, 3, h, w], got {tuple(pixel_values.shape)}")
        if pixel_values.shape[0] != batch:
            raise ValueError(
                f"pixel_values holds images for {pixel_values.shape[0]} rows but input_ids has {batch} rows"
            )
        counts = torch.full((batch,), pixel_values.shape[1], device=pixel_values.device)
        return cls(pixel_values.flatten(0, 1), counts, lenient)


def placeholder_layout(input_ids: torch.Tensor, token_id: int, block: int):
    """Where each placeholder token's feature comes from, without a host sync.

    Runs of `token_id` are split into blocks of `block` tokens (so back-to-back images work). Returns
    is_image [B, T], block index within the row [B, T], offset inside the block [B, T], blocks per row [B].
    """
    is_image = input_ids == token_id
    positions = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
    run_start = is_image & ~torch.nn.functional.pad(is_image[:, :-1], (1, 0), value=False)
    run_begin = torch.where(run_start, positions, 0).cummax(dim=1).values
    offset = (positions - run_begin) % block
    block_start = is_image & (offset == 0)
    return is_image, block_start.cumsum(dim=1) - 1, offset, block_start.sum(dim=1)


def check_placeholders(input_ids: torch.Tensor, counts: torch.Tensor, token_id: int, block: int) -> None:
    """Raise ValueError unless row b holds exactly counts[b] whole blocks of `block` placeholder tokens."""
    _, _, _, blocks = placeholder_layout(input_ids, token_id, block)
    tokens = (input_ids == token_id).sum(dim=1)
    counts = counts.to(blocks.device)
    bad = (blocks != counts) | (tokens != counts * block)
    if bad.any():
        rows = bad.nonzero().flatten().tolist()
        details = "; ".join(
            f"row {b}: {tokens[b].item()} placeholder tokens for {counts[b].item()} image(s)" for b in rows[:5]
        )
        raise ValueError(
            f"image placeholders do not match the images: each image needs one block of {block} consecutive "
            f"image tokens (id {token_id}). {details}. Expand each <image> marker once per image and do not "
            "truncate inside a block."
        )


def inject_images(embeds: torch.Tensor, input_ids: torch.Tensor, features: torch.Tensor, counts: torch.Tensor,
                  token_id: int) -> torch.Tensor:
    """Replace placeholder embeddings by image features. embeds [B, T, H], features [M, L, H] (reading order),
    counts [B] -> [B, T, H]. Block k of row b takes image k of that row; blocks without an image keep
    their embeddings. Out of place, so gradients reach the projector."""
    block = features.shape[1]
    is_image, block_index, offset, _ = placeholder_layout(input_ids, token_id, block)
    counts = counts.to(input_ids.device)
    first_image = (counts.cumsum(0) - counts).unsqueeze(1)  # [B, 1]
    has_image = is_image & (block_index < counts.unsqueeze(1))
    source = torch.where(has_image, (first_image + block_index) * block + offset, 0)
    picked = features.reshape(-1, features.shape[-1])[source]  # [B, T, H]
    return torch.where(has_image.unsqueeze(-1), picked.to(embeds.dtype), embeds)


class MiniMindVLM(MiniMindForCausalLM):
    """MiniMind-V. `vision_model_path` (folder or hub id) loads a SigLIP tower; without it a tower is built
    from `config.vision_config` with random weights, or the model has none (text only).
    The tower is frozen (and kept in eval mode) until its parameters are set to require grad.
    """

    config_class = VLMConfig

    def __init__(self, config: VLMConfig, vision_model_path: str | None = None,
                 vision_dtype: torch.dtype = torch.float32):
        super().__init__(config)
        if vision_model_path:
            tower = load_vision_tower(vision_model_path, vision_dtype)
            adopt_tower(config, tower, read_preprocessor_config(vision_model_path))
        elif config.vision_config:
            tower = build_vision_tower(config.vision_config)
            check_tower(config, tower)
        else:
            tower = None
        if tower is not None:
            drop_pooling_head(tower)
            tower.requires_grad_(False)
            tower.eval()
        self.vision_encoder = tower
        self.vision_proj = VisionProjector(config.image_hidden_size, config.hidden_size)
        self.image_processor = ImagePreprocessor.from_config(config)

    @property
    def vision_trainable(self) -> bool:
        return self.vision_encoder is not None and any(p.requires_grad for p in self.vision_encoder.parameters())

    def train(self, mode: bool = True):
        super().train(mode)
        if self.vision_encoder is not None and not self.vision_trainable:
            self.vision_encoder.eval()
        return self

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """pixels [M, 3, h, w] -> tower features [M, L, D] (last_hidden_state, after post_layernorm)."""
        if self.vision_encoder is None:
            raise ValueError(
                "this model has no vision tower: pass vision_model_path=... or a config with vision_config"
            )
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.vision_trainable):
            features = self.vision_encoder(pixel_values=pixels.to(self.vision_encoder.dtype)).last_hidden_state
        if features.shape[1] != self.config.image_token_len:
            raise ValueError(
                f"the vision tower yields {features.shape[1]} tokens per image but image_token_len is "
                f"{self.config.image_token_len}; images must be {self.config.image_size}x{self.config.image_size}"
            )
        return features

    def embed_with_images(self, input_ids: torch.Tensor, pixel_values, check_images: bool = True,
                          image_features: list[torch.Tensor] | None = None) -> torch.Tensor:
        """Token embeddings (after embedding dropout) with image features spliced in: [B, T, H].
        `image_features` (B tensors [N_b, L, D], what `encode_images` gives for row b's images) stand in for
        `pixel_values`: the tower does not run."""
        embeds = self.model.dropout(self.model.embed_tokens(input_ids))
        if image_features is None:
            images = ImageBatch.from_any(pixel_values, input_ids.shape[0])
        else:
            images = ImageBatch.from_features(image_features, input_ids.shape[0])
        token_id, block = self.config.image_token_id, self.config.image_token_len
        if check_images and not images.lenient:
            check_placeholders(input_ids, images.counts, token_id, block)
        if images.pixels.shape[0] == 0:
            return embeds
        pixels = images.pixels.to(embeds.device)
        features = self.vision_proj(pixels if images.encoded else self.encode_images(pixels))
        return inject_images(embeds, input_ids, features, images.counts, token_id)

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        past_key_values=None,
        use_cache: bool = False,
        logits_to_keep: int = 0,
        labels: torch.Tensor | None = None,
        pixel_values=None,
        position_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        check_images: bool = True,
        compute_logits: bool = True,
        image_features: list[torch.Tensor] | None = None,
        **kwargs,
    ) -> MoeCausalLMOutputWithPast:
        """As `MiniMindForCausalLM.forward`, plus `pixel_values` (see `ImageBatch.from_any`) or the tower outputs
        `image_features` (see `embed_with_images`), used at prefill only. `check_images=False` skips the
        placeholder check (one host sync) for callers that validated."""
        cache = as_kv_cache(past_key_values)
        images = pixel_values is not None or image_features is not None
        if images and inputs_embeds is None and (cache is None or cache.length == 0):
            inputs_embeds = self.embed_with_images(input_ids, pixel_values, check_images, image_features)
        out = super().forward(
            input_ids=input_ids if inputs_embeds is None else None,
            attention_mask=attention_mask,
            past_key_values=cache,
            use_cache=use_cache,
            logits_to_keep=logits_to_keep,
            labels=labels,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            compute_logits=compute_logits,
        )
        if self.training:  # keeps the projector in the graph on text-only batches (DDP); adds exactly zero
            out.aux_loss = out.aux_loss + 0 * sum(p.sum() for p in self.vision_proj.parameters())
        return out


MiniMindVLM.register_for_auto_class("AutoModelForCausalLM")


def check_tower(config: VLMConfig, tower) -> None:
    side, patch, width = tower.config.image_size, tower.config.patch_size, tower.config.hidden_size
    if width != config.image_hidden_size:
        raise ValueError(f"the vision tower is {width} wide but image_hidden_size is {config.image_hidden_size}")
    if (side // patch) ** 2 != config.image_token_len:
        raise ValueError(
            f"the vision tower makes {(side // patch) ** 2} patches ({side}px / {patch}px) but image_token_len "
            f"is {config.image_token_len}"
        )


def adopt_tower(config: VLMConfig, tower, preprocessing: dict) -> None:
    """Record a loaded tower's shape and preprocessing in the config, so saved folders can rebuild it."""
    check_tower(config, tower)
    config.vision_config = {"model_type": "siglip_vision_model", "vision_use_head": False,
                            **{k: getattr(tower.config, k) for k in TOWER_SHAPE_KEYS}}
    for key, value in preprocessing.items():
        setattr(config, key, value)


def drop_pooling_head(tower) -> None:
    """The model reads last_hidden_state only; the attention-pooling head would be dead weight."""
    if getattr(tower, "use_head", False):
        tower.use_head = False
        del tower.head
    tower.config.vision_use_head = False
