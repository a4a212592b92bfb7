"""LoRA adapters: merged and unmerged models agree, reference adapter files load with the reference's numerics,
our PEFT-format files load in peft on the exported folder, and adapters that do not fit are named."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from minimind_v.config import preset_config
from minimind_v.loading import export_pretrained, load_model
from minimind_v.lora import (
    adapters,
    adapters_disabled,
    add_lora,
    load_adapter,
    lora_state_dict,
    merge_lora,
    save_adapter,
    target_names,
)
from minimind_v.vlm import MiniMindVLM

from conftest import liven


def tiny(vocab_size: int = 600, hidden_size: int = 64) -> MiniMindVLM:
    torch.manual_seed(0)
    return liven(MiniMindVLM(preset_config("tiny", vocab_size=vocab_size, hidden_size=hidden_size)).eval())


def inputs(model: MiniMindVLM) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(40, model.config.vocab_size, (2, 80), generator=generator)
    ids[:, 4:68] = 12
    return ids, torch.randn(2, 3, 64, 64, generator=generator)


def randomise_adapters(model: nn.Module, seed: int = 2) -> None:
    """Trained-looking adapters: B is zero at initialisation, which would make every check trivial."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for lora in adapters(model).values():
            lora.B.weight.copy_(torch.randn(lora.B.weight.shape, generator=generator) * 0.05)


def logits(model: nn.Module) -> torch.Tensor:
    ids, pixels = inputs(model)
    with torch.no_grad():
        return model(ids, pixel_values=pixels).logits


def test_targets_name_groups_and_patterns():
    model = tiny()
    attention = target_names(model, ["attention"])
    assert len(attention) == 8 and all(n.endswith(("q_proj", "k_proj", "v_proj", "o_proj")) for n in attention)
    assert target_names(model, ["projector"]) == ["vision_proj.mlp.1", "vision_proj.mlp.3"]
    assert all(n.startswith("vision_encoder.") for n in target_names(model, ["vision"]))
    assert target_names(model, [r"model\.layers\.0\.mlp\.up_proj"]) == ["model.layers.0.mlp.up_proj"]
    with pytest.raises(ValueError, match="matches no linear layer"):
        target_names(model, ["q_proj"])  # a whole-name pattern: a bare suffix names nothing


def test_merged_and_unmerged_logits_agree_and_a_disabled_adapter_is_the_base():
    model = tiny()
    base = logits(model)
    add_lora(model, target_names(model, ["attention", "mlp", "projector", "vision"]), rank=4, alpha=8)
    assert torch.equal(logits(model), base)  # B starts at zero
    randomise_adapters(model)
    unmerged = logits(model)
    assert (unmerged - base).abs().max() > 1e-2
    with adapters_disabled(model):
        assert torch.equal(logits(model), base)
    assert merge_lora(model) == 8 + 6 + 2 + len(target_names(model, ["vision"]))
    assert not adapters(model) and not any(".lora." in k for k in model.state_dict())
    merged = logits(model)
    assert ((merged - unmerged).abs().max() / unmerged.abs().max()).item() < 1e-5


def test_moe_experts_take_adapters_in_both_modes():
    torch.manual_seed(0)
    model = liven(MiniMindVLM(preset_config("tiny", use_moe=True, vocab_size=600, hidden_size=64)).eval())
    experts = target_names(model, ["mlp"])
    assert len(experts) == 2 * 4 * 3 and all(".mlp.experts." in name for name in experts)  # never the router
    add_lora(model, experts, rank=4)
    randomise_adapters(model)
    ids, _ = inputs(model)
    for training in (True, False):  # training adds the aux loss and keeps idle experts in the graph
        model.train(training)
        with torch.no_grad(), adapters_disabled(model):
            base = model(ids).logits
        with torch.no_grad():
            assert (model(ids).logits - base).abs().max() > 1e-2
    unmerged = logits(model)
    merge_lora(model)
    assert ((logits(model) - unmerged).abs().max() / unmerged.abs().max()).item() < 1e-5


def test_reference_adapter_file_gives_the_reference_outputs(tmp_path):
    """The reference format: `{module}.lora.A/B.weight` in fp16 on every square linear layer, rank 16, no
    scaling, applied as `layer(x) + B(A(x))` by a patched forward."""
    model = tiny()
    generator = torch.Generator().manual_seed(3)
    state = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and module.in_features == module.out_features:
            state[f"module.{name}.lora.A.weight"] = (torch.randn(16, module.in_features, generator=generator)
                                                     * 0.02).half()
            state[f"module.{name}.lora.B.weight"] = (torch.randn(module.out_features, 16, generator=generator)
                                                     * 0.05).half()
    torch.save(state, tmp_path / "lora_medical_64.pth")
    reference = tiny()
    modules = dict(reference.named_modules())
    for key in state:
        if key.endswith("A.weight"):
            name = key.removeprefix("module.").removesuffix(".lora.A.weight")
            a, b = state[key].float(), state[key.replace(".A.", ".B.")].float()
            original = modules[name].forward
            modules[name].forward = lambda x, layer=original, a=a, b=b: layer(x) + F.linear(F.linear(x, a), b)
    names = load_adapter(model, str(tmp_path / "lora_medical_64.pth"))
    assert len(names) == len(state) // 2 and {lora.rank for lora in adapters(model).values()} == {16}
    assert torch.equal(logits(model), logits(reference))
    assert all(torch.equal(v.half(), state[f"module.{k}"]) for k, v in lora_state_dict(model).items())


def test_peft_loads_our_adapter_on_the_exported_folder(tmp_path, tiny_tokenizer):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = tiny(vocab_size=len(tiny_tokenizer))
    export_pretrained(model, str(tmp_path / "hf"), tiny_tokenizer)
    add_lora(model, target_names(model, ["attention", "mlp", "projector"]), rank=4, alpha=16)
    randomise_adapters(model)
    save_adapter(model, str(tmp_path / "adapter"), base_model=str(tmp_path / "hf"))
    ours, _ = load_model(load_from=str(tmp_path / "hf"), lora=str(tmp_path / "adapter"))
    remote = AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"), trust_remote_code=True)
    peft = PeftModel.from_pretrained(remote, str(tmp_path / "adapter")).eval()
    expected = logits(ours)
    assert torch.allclose(expected, logits(model), atol=1e-6)
    assert ((logits(peft) - expected).abs().max() / expected.abs().max()).item() < 1e-5


def test_an_adapter_that_does_not_fit_is_named_with_keys_and_shapes(tmp_path):
    wide = tiny()
    add_lora(wide, target_names(wide, ["attention"]), rank=4)
    save_adapter(wide, str(tmp_path / "wide"))
    narrow = tiny(hidden_size=32)
    with pytest.raises(ValueError, match=r"does not fit this model: .*model\.layers\.0\.self_attn\.q_proj\.lora: "
                                         r"A \(4, 64\) and B \(64, 4\) do not fit a layer of 32 -> 32 features"):
        load_adapter(narrow, str(tmp_path / "wide"))
    torch.save({"model.layers.9.self_attn.q_proj.lora.A.weight": torch.zeros(4, 64),
                "model.layers.9.self_attn.q_proj.lora.B.weight": torch.zeros(64, 4)}, tmp_path / "deep.pth")
    with pytest.raises(ValueError, match=r"model\.layers\.9\.self_attn\.q_proj: no such module"):
        load_adapter(tiny(), str(tmp_path / "deep.pth"))
    with pytest.raises(FileNotFoundError, match="no LoRA adapter at"):
        load_adapter(tiny(), str(tmp_path / "missing.pth"))
