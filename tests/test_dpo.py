"""DPO: the packed objective equals the reference's padded computation, LoRA's reference model is the base without
adapters, and preference rows that cannot be trained on are skipped by reason."""

from __future__ import annotations

import copy
import io
import json
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from minimind_v.chat_encoder import IGNORE
from minimind_v.data import DataConfig, pack, sample_builder
from minimind_v.lora import adapters, add_lora, target_names
from minimind_v.objectives import make_objective
from minimind_v.samples import BadSample

from conftest import liven


def png(colour: tuple[int, int, int]) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), colour).save(buffer, format="PNG")
    return buffer.getvalue()


def pair(question: str, chosen: str, rejected: str, colour=(200, 30, 30)) -> dict:
    prompt = [{"role": "user", "content": f"<image>\n{question}"}]
    return {"chosen": json.dumps(prompt + [{"role": "assistant", "content": chosen}]),
            "rejected": json.dumps(prompt + [{"role": "assistant", "content": rejected}]), "image_bytes": png(colour)}


RECORDS = [pair("What colour is it?", "red", "blue"), pair("Is there a circle?", "yes", "no", (20, 200, 40)),
           pair("How many shapes are there?", "three", "two", (20, 40, 200)),
           pair("Describe the image.", "A red circle on the left.", "Nothing.")]


def builder(tokenizer, processor, max_seq_len: int = 300):
    config = DataConfig(paths=[], kind="pairs", max_seq_len=max_seq_len, image_token_len=64, add_system_ratio=0,
                        empty_think_ratio=1.0)
    return sample_builder(config, tokenizer, processor)


def reference_dpo_loss(policy, reference, documents, beta: float, rpo_alpha: float = 0.0) -> torch.Tensor:
    """The reference `train_dpo.py`: every sequence padded to one length, x = ids[:-1], y = ids[1:], the loss
    mask shifted the same way, chosen then rejected halves, summed log-probabilities; plus, for RPO, the chosen
    sequences' mean token NLL times rpo_alpha."""
    length = max(len(d.ids) for d in documents)
    ids = torch.zeros(len(documents), length, dtype=torch.long)
    mask = torch.zeros(len(documents), length)
    for row, document in enumerate(documents):
        ids[row, :len(document.ids)] = torch.from_numpy(document.ids)
        mask[row, :len(document.ids)] = torch.from_numpy(document.labels != IGNORE).float()
    order = list(range(0, len(documents), 2)) + list(range(1, len(documents), 2))  # [chosen; rejected]
    ids, mask = ids[order], mask[order]
    pixels = torch.from_numpy(np.stack([documents[i].pixels for i in order]))
    x, y, mask = ids[:, :-1], ids[:, 1:], mask[:, 1:]

    def sums(model) -> torch.Tensor:
        logps = F.log_softmax(model(x, pixel_values=pixels).logits, dim=2).gather(2, y.unsqueeze(2)).squeeze(2)
        return (logps * mask).sum(dim=1)

    policy_sums, reference_sums = sums(policy), sums(reference)
    half = len(documents) // 2
    logits = (policy_sums[:half] - policy_sums[half:]) - (reference_sums[:half] - reference_sums[half:])
    chosen_nll = -policy_sums[:half] / mask[:half].sum(dim=1)
    return (-F.logsigmoid(beta * logits) + rpo_alpha * chosen_nll).mean()


@pytest.mark.parametrize("rpo_alpha", [0.0, 0.7])
def test_packed_dpo_loss_equals_the_reference_padded_computation(lively_vlm, tiny_tokenizer, rpo_alpha):
    pairs = builder(tiny_tokenizer, lively_vlm.image_processor)
    documents = [d for record in RECORDS for d in pairs.build_pair(record, random.Random(0))]
    reference = liven(copy.deepcopy(lively_vlm), seed=5)
    batch = pack(documents, 300, image_token_len=64, rows_used=len(RECORDS))
    assert batch.input_ids.shape[0] < len(documents)  # several documents share a row
    dpo = make_objective("dpo", packing=True, vision=True, beta=0.15, rpo_alpha=rpo_alpha, reference=reference)
    with torch.no_grad():
        out = dpo(lively_vlm, batch)
        expected = reference_dpo_loss(lively_vlm, reference, documents, beta=0.15, rpo_alpha=rpo_alpha)
    assert int(dpo.count(batch)) == len(RECORDS)
    assert (out.loss / len(RECORDS)).item() == pytest.approx(expected.item(), rel=1e-5)
    assert 0 <= out.metrics["reward_accuracy"].item() <= len(RECORDS)


def test_a_lora_run_compares_against_its_base_without_a_second_copy(lively_vlm, tiny_tokenizer):
    pairs = builder(tiny_tokenizer, lively_vlm.image_processor)
    documents = [d for record in RECORDS for d in pairs.build_pair(record, random.Random(0))]
    batch = pack(documents, 300, image_token_len=64, rows_used=len(RECORDS))
    base = copy.deepcopy(lively_vlm)
    add_lora(lively_vlm, target_names(lively_vlm, ["attention", "mlp"]), rank=4)
    dpo = make_objective("dpo", packing=True, vision=True, beta=0.15, reference=None)
    with torch.no_grad():
        assert (dpo(lively_vlm, batch).loss / len(RECORDS)).item() == pytest.approx(np.log(2), rel=1e-6)
        for lora in adapters(lively_vlm).values():
            lora.B.weight.normal_(0, 0.05)
        against_base = make_objective("dpo", packing=True, vision=True, beta=0.15, reference=base)
        assert dpo(lively_vlm, batch).loss.item() == pytest.approx(against_base(lively_vlm, batch).loss.item(),
                                                                   rel=1e-6)
    assert not lively_vlm.training  # the reference pass restores the mode it found


@pytest.mark.parametrize("record, reason", [
    ({**RECORDS[0], "rejected": json.dumps([{"role": "user", "content": "<image>\nWhat shape is it?"},
                                            {"role": "assistant", "content": "blue"}])}, "prompt_mismatch"),
    ({**RECORDS[0], "chosen": json.dumps([{"role": "user", "content": "<image>\nWhat colour is it?"}])},
     "no_assistant_turn"),
    ({**RECORDS[0], "chosen": json.dumps([{"role": "user", "content": "<image>\nWhat colour is it?"},
                                          {"role": "assistant", "content": "red"},
                                          {"role": "user", "content": "Sure?"}])}, "no_assistant_turn"),
    ({**RECORDS[0], "chosen": "[{"}, "invalid_json"),
    ({**RECORDS[0], "image_bytes": None}, "image_mismatch"),
    (pair("x " * 80 + "What colour is it?", "red", "blue"), "answer_truncated"),
    ({**pair("What colour is it?", "red", "blue"),
      "chosen": json.dumps([{"role": "user", "content": "x " * 150 + "<image>"},
                            {"role": "assistant", "content": "red"}]),
      "rejected": json.dumps([{"role": "user", "content": "x " * 150 + "<image>"},
                              {"role": "assistant", "content": "blue"}])}, "image_truncated"),
])
def test_preference_rows_that_cannot_be_trained_on_are_refused_by_reason(record, reason, tiny_vlm, tiny_tokenizer):
    with pytest.raises(BadSample, match=reason):
        builder(tiny_tokenizer, tiny_vlm.image_processor, max_seq_len=120).build_pair(record, random.Random(0))


def test_eval_scores_preference_pairs_whatever_their_batching(tmp_path, lively_vlm, tiny_tokenizer):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from minimind_v.evaluate import preference_scores

    mismatched = {**RECORDS[0], "rejected": json.dumps([{"role": "user", "content": "<image>\nWhat shape is it?"},
                                                         {"role": "assistant", "content": "blue"}])}
    path = tmp_path / "pairs.parquet"
    pq.write_table(pa.Table.from_pylist([*RECORDS, mismatched, RECORDS[1]]), path)
    lively_vlm.eval()
    one_by_one = preference_scores(lively_vlm, tiny_tokenizer, str(path), batch_size=1)
    together = preference_scores(lively_vlm, tiny_tokenizer, str(path), batch_size=8)
    assert one_by_one["n"] == together["n"] == 5 and together["skipped"] == {"prompt_mismatch": 1}
    assert together["margin"] == pytest.approx(one_by_one["margin"], abs=1e-3)
    assert together["margin"] != 0 and 0 <= together["accuracy"] <= 1
    assert preference_scores(lively_vlm, tiny_tokenizer, str(path), max_samples=2)["n"] == 2
