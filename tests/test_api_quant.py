"""`hayai.load` with int8/int4 weights runs them in the activation dtype their packed kernels are fast in."""

from __future__ import annotations

import torch

import hayai
from hayai.models.loading import quantize_to_store
from hayai.quant import Int4Linear, Int8Linear, preferred_activation_dtype
from hayai.runtime import resolve_dtype

CPU = torch.device("cpu")


def kernel_dtype(method: str) -> torch.dtype:
    return preferred_activation_dtype(method, "cpu") or resolve_dtype("auto", CPU)


def test_quant_on_load_picks_the_kernels_dtype_unless_told(tiny_checkpoint, hayai_home):
    for method, layer in (("int4", Int4Linear), ("int8", Int8Linear)):
        llm = hayai.load(str(tiny_checkpoint), quant=method)
        assert isinstance(llm.model.model.layers[0].mlp.up_proj, layer)
        assert llm.model.dtype == kernel_dtype(method)
        assert llm.generate("hello", max_tokens=3, temperature=0) is not None
    assert hayai.load(str(tiny_checkpoint), quant="int4", dtype="fp32").model.dtype == torch.float32


def test_a_quantized_store_entry_loads_in_the_kernels_dtype(tiny_checkpoint, hayai_home):
    quantize_to_store(str(tiny_checkpoint), "int4", name="tiny-int4", dtype=torch.float32)
    llm = hayai.load("tiny-int4")
    assert isinstance(llm.model.model.layers[1].self_attn.q_proj, Int4Linear)
    assert llm.model.dtype == kernel_dtype("int4")
    assert hayai.load("tiny-int4", dtype="fp32").model.dtype == torch.float32
