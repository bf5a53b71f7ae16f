"""hayai.quant: weight formats (int8 / int4 weight-only, NF4 with double quantization) as module replacements.

    from hayai.quant import quantize_model, save_quantized, load_quantized
    summary = quantize_model(model, "int4", group_size=32, embeddings=True)   # in place
    save_quantized(model, "model.q4.safetensors", summary.config)
    load_quantized(float_skeleton, "model.q4.safetensors")                     # no re-quantization

Layer 5 of hayai: tensors and modules only, no model internals.
"""

from hayai.quant.base import QuantizedLinear
from hayai.quant.checkpoint import load_quantized, quant_config, read_quantized, rebuild_quantized, save_quantized
from hayai.quant.double_quant import double_dequantize, double_quantize, dynamic_map
from hayai.quant.embedding import QuantizedEmbedding
from hayai.quant.int4 import Int4Linear
from hayai.quant.int8 import Int8Linear
from hayai.quant.kernels import preferred_activation_dtype
from hayai.quant.nf4 import NF4_CODE, NF4Linear, dequantize_nf4, nf4_bits_per_parameter, quantize_nf4
from hayai.quant.transform import METHODS, QuantSummary, model_activation_dtype, quantize_model

__all__ = [
    "METHODS",
    "NF4_CODE",
    "Int4Linear",
    "Int8Linear",
    "NF4Linear",
    "QuantSummary",
    "QuantizedEmbedding",
    "QuantizedLinear",
    "dequantize_nf4",
    "double_dequantize",
    "double_quantize",
    "dynamic_map",
    "load_quantized",
    "model_activation_dtype",
    "nf4_bits_per_parameter",
    "preferred_activation_dtype",
    "quant_config",
    "quantize_model",
    "quantize_nf4",
    "read_quantized",
    "rebuild_quantized",
    "save_quantized",
]
