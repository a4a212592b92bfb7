"""MiniMind-V -> a transformers-native LFM2-VL folder (`Lfm2VlForConditionalGeneration`): `AutoConfig`,
`AutoProcessor` and `AutoModelForImageTextToText` load it without `trust_remote_code`.

Why LFM2-VL: with `downsample_factor=1` its projector is LayerNorm (eps 1e-5) -> Linear -> GELU (erf) -> Linear on
the tower's `last_hidden_state` (after `post_layernorm`), exactly ours; it builds its language model with
`AutoModel.from_config(text_config)`, so a Qwen3 (or Qwen3-MoE) text config is our decoder; its tower is
`Siglip2VisionModel`, which is our `SiglipVisionModel` with the conv patch embedding written as a Linear over
flattened (row, column, channel) patches, and whose position-embedding resize is the identity for the trained grid.
Every other candidate differs somewhere (the export docs list them).

Pixels: the model computes exactly what ours computes from the same pixels. The LFM2-VL image processor keeps the
aspect ratio (no squash): square images become the tower's S x S input (equal to ours for S x S inputs, within one
grey level after its own resize otherwise); other shapes get fewer patches than ours. It needs torchvision.
"""

from __future__ import annotations

import json
import os

import torch
from torch import nn
from transformers import SiglipVisionModel

from ..config import IMAGE_TOKEN
from ..lora import adapters
from ..processor import multimodal_chat_template
from ..weights import replace_folder, unwrap
from .qwen3 import decoder_state_dict, drop_auto_map, fuse_experts, qwen3_config, with_chat_template

PROJECTOR_NAMES = {"0": "layer_norm", "1": "linear_1", "3": "linear_2"}  # our nn.Sequential index -> LFM2-VL name


# `QuantoConfig(modules_to_not_convert=...)` for int8 decoder weights on an exported folder, as `--quantize int8`:
# tower, projector, embeddings, lm_head and the MoE router stay in full precision.
LFM2_VL_KEEP_FULL_PRECISION = ["model.vision_tower", "model.multi_modal_projector", "model.language_model.embed_tokens",
                               "lm_head", "mlp.gate"]

def check_exportable(model: nn.Module) -> None:
    """ValueError when `model` has no LFM2-VL equivalent (nothing has been written yet)."""
    if adapters(model):
        raise ValueError("the model carries LoRA adapters: merge them first (lora.merge_lora, or "
                         "`minimind-v lora merge`); LFM2-VL folders hold plain weights")
    tower = getattr(model, "vision_encoder", None)
    if tower is None:
        raise ValueError("the model has no vision tower: LFM2-VL needs one (load it with --vision_model), or "
                         "export the language model alone with --format qwen3")
    if not isinstance(tower, SiglipVisionModel):
        raise ValueError(f"the vision tower is a {type(tower).__name__}: only a SigLIP tower has an LFM2-VL "
                         "equivalent (Siglip2VisionModel)")
    if getattr(model.config, "max_tiles", 1) > 1:
        raise ValueError(f"the model reads images as up to {model.config.max_tiles} tiles and a thumbnail, which "
                         "LFM2-VL's processor tiles differently; export the remote-code folder (the default "
                         "format), which keeps the tiling")
    qwen3_config(model.config)  # raises for a RoPE setting Qwen3 cannot express


def siglip2_vision_config(tower_config) -> dict:
    """Our `SiglipVisionConfig` as the equivalent `Siglip2VisionConfig` dict (no pooling head)."""
    side = tower_config.image_size // tower_config.patch_size
    fields = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_channels",
              "patch_size", "hidden_act", "layer_norm_eps", "attention_dropout")
    return {"model_type": "siglip2_vision_model", "num_patches": side * side, "vision_use_head": False,
            **{name: getattr(tower_config, name) for name in fields}}


def lfm2_vl_config(model: nn.Module, pad_token_id: int | None = None):
    """The `Lfm2VlConfig` of `model`: Siglip2 tower, Qwen3 text model, our projector (downsample_factor 1)."""
    from transformers import Lfm2VlConfig

    config = model.config
    return Lfm2VlConfig(
        vision_config=siglip2_vision_config(model.vision_encoder.config),
        text_config=qwen3_config(config, pad_token_id).to_dict(),
        image_token_id=config.image_token_id, downsample_factor=1, projector_hidden_size=config.hidden_size,
        projector_hidden_act="gelu", projector_bias=True, projector_use_layernorm=True,
        tie_word_embeddings=config.tie_word_embeddings,
    )


def lfm2_vl_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Our weights under LFM2-VL names. The conv patch embedding [D, C, p, p] becomes a Linear [D, p*p*C] over the
    (row, column, channel) flattened patches that the LFM2-VL image processor makes."""
    config = model.config
    decoder = decoder_state_dict(model)
    if config.use_moe:
        decoder = fuse_experts(decoder, config.num_hidden_layers, config.num_experts)
    state = {k if k.startswith("lm_head.") else "model.language_model." + k[len("model."):]: v
             for k, v in decoder.items()}
    for name, tensor in model.vision_encoder.state_dict().items():
        if name.startswith("head."):  # an attention-pooling head that was not dropped: unused, as in our model
            continue
        if name == "embeddings.patch_embedding.weight":
            tensor = tensor.permute(0, 2, 3, 1).reshape(tensor.shape[0], -1)
        state["model.vision_tower." + name] = tensor.detach().cpu()
    for name, tensor in model.vision_proj.state_dict().items():
        _, index, param = name.split(".")
        state[f"model.multi_modal_projector.{PROJECTOR_NAMES[index]}.{param}"] = tensor.detach().cpu()
    return state


def to_lfm2_vl(model: nn.Module, pad_token_id: int | None = None) -> nn.Module:
    """Our VLM as an `Lfm2VlForConditionalGeneration` (eval mode, the decoder's dtype), loaded strictly: a missing,
    extra or misshapen weight raises."""
    from transformers import Lfm2VlForConditionalGeneration

    model = unwrap(model)
    check_exportable(model)
    native = Lfm2VlForConditionalGeneration(lfm2_vl_config(model, pad_token_id))
    native.load_state_dict(lfm2_vl_state_dict(model), strict=True)
    return native.to(model.model.embed_tokens.weight.dtype).eval()


def lfm2_vl_pixels(pixel_values: torch.Tensor, patch_size: int) -> dict[str, torch.Tensor]:
    """Our pixel values [M, 3, S, S] as LFM2-VL model inputs: pixel_values [M, P, p*p*3] ((row, column, channel)
    flattened patches, P = (S/p)^2), spatial_shapes [M, 2] and pixel_attention_mask [M, P]; what
    `Lfm2VlImageProcessor` returns for an S x S image."""
    images, channels, side = pixel_values.shape[0], pixel_values.shape[1], pixel_values.shape[-1] // patch_size
    patches = pixel_values.reshape(images, channels, side, patch_size, side, patch_size)
    patches = patches.permute(0, 2, 4, 3, 5, 1).reshape(images, side * side, -1)
    return {"pixel_values": patches, "spatial_shapes": torch.tensor([[side, side]] * images),
            "pixel_attention_mask": torch.ones(images, side * side, dtype=torch.int32)}


def image_processor_config(model: nn.Module) -> dict:
    """`Lfm2VlImageProcessor` settings closest to our preprocessing: one tile, exactly `image_token_len` tokens,
    bicubic, our mean/std. Square images become S x S; other aspect ratios keep their shape (fewer patches)."""
    config, tower = model.config, model.vision_encoder.config
    tokens, side = config.image_token_len, tower.image_size
    return {
        "image_processor_type": "Lfm2VlImageProcessor", "downsample_factor": 1, "do_image_splitting": False,
        "use_thumbnail": False, "min_image_tokens": tokens, "max_image_tokens": tokens,
        "encoder_patch_size": tower.patch_size, "tile_size": side, "size": {"height": side, "width": side},
        "do_resize": True, "resample": config.image_resample, "do_convert_rgb": True, "do_rescale": True,
        "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": config.image_mean,
        "image_std": config.image_std, "do_pad": True,
    }


def write_processor(model: nn.Module, tokenizer, folder: str) -> None:
    """Tokenizer, chat template (image parts render as one `<|image_pad|>`, which `Lfm2VlProcessor` expands) and
    processor config. Empty image start/end tokens: `Lfm2VlProcessor` would otherwise wrap every image in
    `<|image_start|>`/`<|image_end|>`, which our vocabulary lacks (and in 5.x the switch is not saved)."""
    tokenizer.save_pretrained(folder)
    tokenizer_config = os.path.join(folder, "tokenizer_config.json")
    drop_auto_map(tokenizer_config)
    update_json(tokenizer_config, image_token=IMAGE_TOKEN, image_start_token="", image_end_token="",
                processor_class="Lfm2VlProcessor")
    with open(os.path.join(folder, "chat_template.jinja"), "w", encoding="utf-8") as f:
        f.write(multimodal_chat_template(tokenizer.chat_template, IMAGE_TOKEN))
    image_config = image_processor_config(model)
    update_json(os.path.join(folder, "processor_config.json"), processor_class="Lfm2VlProcessor",
                image_processor=image_config)
    update_json(os.path.join(folder, "preprocessor_config.json"), **image_config)


def update_json(path: str, **fields) -> None:
    data = {}
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    data.update(fields)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, ensure_ascii=False, indent=2)


def export_lfm2_vl(model: nn.Module, tokenizer, out_dir: str) -> None:
    """Write `out_dir` as an LFM2-VL transformers folder: config.json (model_type lfm2_vl, no auto_map),
    safetensors weights in the model's dtype, generation_config.json, the tokenizer, a chat template that renders
    `{"type": "image"}` parts, and the processor config. ValueError, before anything is written, for LoRA adapters
    still attached, a model without a tower, a tower other than SigLIP or a RoPE setting Qwen3 cannot express.
    The folder is filled under a temporary name and renamed."""
    from transformers import GenerationConfig

    if tokenizer is None:
        raise ValueError("an LFM2-VL folder needs the tokenizer (for its processor and chat template)")
    native = to_lfm2_vl(model, tokenizer.pad_token_id)
    text = native.config.text_config
    native.generation_config = GenerationConfig(bos_token_id=text.bos_token_id, eos_token_id=text.eos_token_id,
                                                pad_token_id=text.pad_token_id)
    tokenizer = with_chat_template(tokenizer)

    def write(folder: str) -> None:
        native.save_pretrained(folder)
        write_processor(unwrap(model), tokenizer, folder)

    replace_folder(out_dir, write)
