"""LoRA on the default model (SmolLM2-135M-Instruct): a few steps learn, and PEFT reads the adapter."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import hayai

pytestmark = pytest.mark.integration

DATA = Path(__file__).resolve().parent.parent / "examples" / "finetune" / "orders_train.jsonl"


def test_lora_on_the_default_model_learns_and_loads_in_peft(tmp_path):
    import peft
    import transformers

    from hayai.models.loading import resolve

    result = hayai.finetune(None, DATA, output=tmp_path, max_steps=4, batch_size=2, seq_len=256, lr=1e-3,
                            warmup=0, autocast="none")
    assert result.losses[-1] < result.losses[0]
    directory, _, _ = resolve(None)
    ids = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8]])
    hf = transformers.LlamaForCausalLM.from_pretrained(directory, torch_dtype=torch.float32).eval()
    with torch.no_grad():
        expected = peft.PeftModel.from_pretrained(hf, tmp_path).eval()(ids).logits
        ours = hayai.load(dtype="fp32", adapter=str(tmp_path)).model(ids)
    assert torch.allclose(ours, expected, atol=2e-3)
