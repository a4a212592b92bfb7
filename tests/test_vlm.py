"""Image injection: placement, several and back-to-back images, text-only rows, input forms, errors."""

import pytest
import torch
from transformers import BatchFeature

from minimind_v.config import preset_config
from minimind_v.vlm import MiniMindVLM, inject_images

L = 64  # visual tokens per image in the tiny preset


@pytest.fixture(scope="module")
def vlm():
    torch.manual_seed(0)
    return MiniMindVLM(preset_config("tiny", vocab_size=300)).eval()


def prompt(*pieces) -> torch.Tensor:
    """Build ids from ints (text tokens) and the string "img" (one block of L placeholders)."""
    ids = []
    for piece in pieces:
        ids += [12] * L if piece == "img" else [piece]
    return torch.tensor(ids)


def images(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, 64, 64, generator=torch.Generator().manual_seed(seed))


def test_inject_places_the_kth_block_of_a_row_on_its_kth_image():
    ids = torch.tensor([[5, 12, 12, 6, 12, 12, 12, 12], [12, 12, 7, 8, 9, 9, 9, 9]])
    embeds = torch.zeros(2, 8, 1)
    features = torch.arange(1, 4).float().view(3, 1, 1).expand(3, 2, 1) * 10 + torch.tensor([[0.0], [1.0]])
    out = inject_images(embeds, ids, features, torch.tensor([2, 1]), token_id=12)[..., 0]
    assert out[0].tolist() == [0, 10, 11, 0, 20, 21, 0, 0]  # run of 4 = two back-to-back blocks, 1 image left
    assert out[1].tolist() == [30, 31, 0, 0, 0, 0, 0, 0]


def test_image_tokens_get_projected_tower_features(vlm):
    ids = prompt(1, 5, "img", 6, 2)[None]
    pixels = images(1)
    with torch.no_grad():
        spliced = vlm.embed_with_images(ids, pixels)
        expected = vlm.vision_proj(vlm.encode_images(pixels))[0]
    assert torch.allclose(spliced[0, 2 : 2 + L], expected)
    assert torch.equal(spliced[0, :2], vlm.model.embed_tokens(ids[0, :2]))


def test_back_to_back_images_and_several_per_row(vlm):
    ids = prompt(1, "img", "img", 7, "img", 2)[None]
    pixels = images(3)
    with torch.no_grad():
        together = vlm(ids, pixel_values=pixels[None]).logits
        as_list = vlm(ids, pixel_values=[pixels]).logits
        feats = vlm.vision_proj(vlm.encode_images(pixels))
        spliced = vlm.embed_with_images(ids, [pixels])
    assert torch.equal(together, as_list)
    assert torch.allclose(spliced[0, 1 : 1 + L], feats[0])
    assert torch.allclose(spliced[0, 1 + L : 1 + 2 * L], feats[1])
    assert torch.allclose(spliced[0, 2 + 2 * L : 2 + 3 * L], feats[2])


def test_text_only_rows_never_run_the_tower(vlm, monkeypatch):
    seen = []
    original = vlm.encode_images
    monkeypatch.setattr(vlm, "encode_images", lambda px: seen.append(px.shape[0]) or original(px))
    with_image, text_only = prompt(1, "img", 2), prompt(*range(40, 40 + L + 2))
    ids = torch.stack([with_image, text_only])
    with torch.no_grad():
        batched = vlm(ids, pixel_values=[images(1), torch.empty(0, 3, 64, 64)]).logits
        alone = vlm(text_only[None]).logits
    assert seen == [1]
    assert torch.allclose(batched[1], alone[0], atol=1e-5)
    with torch.no_grad():
        vlm(text_only[None], pixel_values=[torch.empty(0, 3, 64, 64)])
    assert seen == [1]


def test_pixel_value_forms_agree(vlm):
    ids = torch.stack([prompt(1, "img", 2), prompt(3, "img", 4)])
    pixels = images(2)
    with torch.no_grad():
        reference = vlm(ids, pixel_values=pixels).logits
        for form in (pixels[:, None], list(pixels[:, None]), {"pixel_values": pixels},
                     BatchFeature({"pixel_values": pixels[:, None]}), pixels[:, None, None]):
            assert torch.equal(vlm(ids, pixel_values=form).logits, reference)


@pytest.mark.parametrize("ids, pixels, message", [
    (prompt(1, "img", "img", 2), images(1), "row 0: 128 placeholder tokens for 1 image"),
    (prompt(1, 2, 3), images(1), "row 0: 0 placeholder tokens for 1 image"),
    (prompt(1, "img", 2)[:40], images(1), "row 0: 39 placeholder tokens for 1 image"),
])
def test_mismatched_placeholders_raise_a_clear_value_error(vlm, ids, pixels, message):
    with pytest.raises(ValueError, match=message):
        vlm(ids[None], pixel_values=pixels)


def test_batch_size_mismatch_is_a_value_error_in_every_form(vlm):
    ids = torch.stack([prompt(1, "img", 2), prompt(3, "img", 4)])
    for form in (images(1), {"pixel_values": images(1)}, [images(1)]):
        with pytest.raises(ValueError, match="rows"):
            vlm(ids, pixel_values=form)


def test_images_are_injected_only_at_prefill(vlm):
    ids = prompt(1, "img", 2, 3)[None]
    pixels = images(1)
    with torch.no_grad():
        full = vlm(ids, pixel_values=pixels).logits
        out = vlm(ids[:, :-1], pixel_values=pixels, use_cache=True)
        step = vlm(ids[:, -1:], pixel_values=pixels, past_key_values=out.past_key_values, use_cache=True).logits
    assert torch.allclose(step[0, -1], full[0, -1], atol=1e-5)


def test_frozen_tower_gets_no_gradient_and_projector_does(vlm):
    vlm.train()
    try:
        out = vlm(prompt(1, "img", 2)[None], pixel_values=images(1), labels=prompt(1, "img", 2)[None])
        out.loss.backward()
        assert all(p.grad is None for p in vlm.vision_encoder.parameters())
        assert all(p.grad is not None for p in vlm.vision_proj.parameters())
        assert not vlm.vision_encoder.training
    finally:
        vlm.zero_grad(set_to_none=True)
        vlm.eval()


def test_trainable_tower_learns():
    torch.manual_seed(0)
    model = MiniMindVLM(preset_config("tiny", vocab_size=300)).train()
    model.vision_encoder.requires_grad_(True)
    model.train()
    assert model.vision_encoder.training
    ids = prompt(1, "img", 2)[None]
    model(ids, pixel_values=images(1), labels=ids).loss.backward()
    assert all(p.grad is not None for p in model.vision_encoder.parameters())


def test_model_without_tower_says_so():
    model = MiniMindVLM(preset_config("tiny", vocab_size=300, vision_config=None))
    with pytest.raises(ValueError, match="no vision tower"):
        model(prompt(1, "img", 2)[None], pixel_values=images(1))
