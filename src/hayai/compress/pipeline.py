"""Deep Compression end to end: prune -> share -> Huffman code, with the size and quality after each stage.

Han, Mao & Dally, "Deep Compression", ICLR 2016 (arXiv:1510.00149), Figure 1: magnitude pruning with
retraining (`hayai.compress.pruning`), weight sharing by per-layer k-means with centroid fine-tuning
(`hayai.compress.weight_sharing`), and Huffman coding of the codes and sparse offsets (`hayai.compress.huffman`).

Sizes are storage sizes, computed the way the paper counts them, for the targeted weights; every other
parameter (norms, biases, untargeted layers) is counted at its in-memory size in every stage:

  original  n · v bits                       (the dense weight as it is in memory, v = 32 for fp32)
  pruned    E_b · (v + b) bits               in the sparse relative layout: E_b entries including fillers at
                                             index width b (or the dense size if smaller; b in 1..8, cheapest)
  shared    E_b · (⌈log2 K⌉ + b) + K' · v    K codes, K' trainable centroids at the weight's width
  huffman   Huffman-coded codes (+ offsets), with their code tables, + K' · v

ratio = original bytes / stage bytes, over the whole model. Quality is whatever the caller's callback returns
(accuracy, perplexity, ...) after each lossy stage; Huffman coding is lossless, so its quality is the shared
stage's (and `verify=True` decodes every layer to check that exactly).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from torch import nn

from hayai.compress.huffman import EncodedCodes, choose_layout, encode_codes, relative_sparse_counts
from hayai.compress.pruning import Sparsity, iterative_prune
from hayai.compress.weight_sharing import Bits, SharedWeight, share_weights

Quality = Callable[[nn.Module], float]
Retrain = Callable[[nn.Module, str], None]
Progress = Callable[[str, int, int], None]
STAGES = ("original", "pruned", "shared", "huffman")


@dataclass
class LayerSizes:
    """Bytes of one targeted weight at each stage, and the choices made for it."""

    name: str
    shape: tuple[int, ...]
    numel: int
    nonzero: int = 0
    codes: int = 0  # codebook size K (0 before sharing)
    index_bits: int = 0  # relative-offset width of the chosen sparse layout (0 = dense)
    original: int = 0
    pruned: int = 0
    shared: int = 0
    huffman: int = 0


@dataclass
class Stage:
    name: str
    bytes: int
    ratio: float  # original bytes / these bytes
    quality: float | None
    seconds: float


@dataclass
class CompressionReport:
    stages: list[Stage] = field(default_factory=list)
    layers: list[LayerSizes] = field(default_factory=list)
    other_bytes: int = 0  # parameters outside the targeted weights, counted in every stage
    encoded: dict[str, EncodedCodes] = field(default_factory=dict)

    def stage(self, name: str) -> Stage:
        for s in self.stages:
            if s.name == name:
                return s
        raise KeyError(name)

    def to_dict(self) -> dict:
        return {"stages": [asdict(s) for s in self.stages], "other_bytes": self.other_bytes,
                "layers": [asdict(layer) for layer in self.layers]}


# ---- size accounting -------------------------------------------------------------------------------------------
def _sparse_fixed_bytes(codes: np.ndarray, zero_code: int, value_bits: int, num_codes: int) -> tuple[int, int]:
    """(index_bits, bytes) of the cheapest fixed-width sparse relative layout, index width 1..8."""
    best = (0, math.inf)
    for b in range(1, 9):
        entries, _, _ = relative_sparse_counts(codes, zero_code, b, num_codes)
        size = math.ceil(entries * (value_bits + b) / 8)
        if size < best[1]:
            best = (b, size)
    return best[0], int(best[1])


def pruned_bytes(weight: torch.Tensor) -> tuple[int, int]:
    """(index_bits, bytes) of a pruned weight, its values at their own width in the sparse layout (or dense if
    that is smaller)."""
    dense = weight.numel() * weight.element_size()
    flat = (weight.detach().reshape(-1) != 0).to(torch.uint8).cpu().numpy()  # 1 = stored, 0 = pruned
    if flat.all():
        return 0, dense
    bits, size = _sparse_fixed_bytes(flat, 0, 8 * weight.element_size(), 2)
    return (bits, size) if size < dense else (0, dense)


def shared_bytes(shared: SharedWeight) -> tuple[int, int]:
    """(index_bits, bytes) of a shared weight with fixed-width codes (sparse layout if it is smaller)."""
    codes = shared.codes.reshape(-1).cpu().numpy().astype(np.int64)
    value_bits = max(1, math.ceil(math.log2(shared.num_codes)))
    codebook = shared.centroids.numel() * shared.centroids.element_size()
    dense = math.ceil(codes.size * value_bits / 8)
    if shared.zero_code is None:
        return 0, dense + codebook
    bits, size = _sparse_fixed_bytes(codes, shared.zero_code, value_bits, shared.num_codes)
    return (bits, size + codebook) if size < dense else (0, dense + codebook)


def huffman_bytes_of(shared: SharedWeight) -> tuple[int, int]:
    """(index_bits, bytes) of the Huffman-coded layout `encode_codes` would pick, plus the codebook."""
    codes = shared.codes.reshape(-1).cpu().numpy().astype(np.int64)
    bits, size = choose_layout(codes, shared.num_codes, shared.zero_code)
    return bits, size + shared.centroids.numel() * shared.centroids.element_size()


def parameter_bytes(model: nn.Module) -> int:
    """In-memory bytes of a model's parameters, each tensor counted once."""
    return sum(p.numel() * p.element_size() for p in model.parameters())


# ---- the pipeline ----------------------------------------------------------------------------------------------
def deep_compress(model: nn.Module, *, sparsity: Sparsity = 0.5, bits: Bits = 4, prune_steps: int = 1,
                  schedule: str = "geometric", scope: str = "layer", include: str | Sequence[str] | None = None,
                  exclude: str | Sequence[str] | None = None, retrain: Retrain | None = None,
                  quality: Quality | None = None, encode: bool = False, verify: bool = False,
                  progress: Progress | None = None) -> CompressionReport:
    """Compress `model` in place (its targeted layers become `Shared*` modules) and report each stage.

    retrain(model, stage) is called after each pruning step (stage "prune") and after sharing ("share"); train
    there with a fresh optimizer over the parameters that require grad (masked gradients keep pruned weights at
    zero; after sharing the trainable parameters are the centroids and whatever else was trainable).
    quality(model) is called on the original, pruned and shared model. encode=True keeps the Huffman-coded
    layers in the report (`report.encoded`); verify=True also decodes them and checks every code.
    """
    report = CompressionReport()
    started = time.perf_counter()
    total_before = parameter_bytes(model)

    def finish(name: str, size: int, q: float | None) -> None:
        report.stages.append(Stage(name, size, total_before / max(size, 1), q, time.perf_counter() - started))

    finish("original", total_before, quality(model) if quality is not None else None)

    # 1. pruning (+ retraining)
    sparsity_is_zero = not isinstance(sparsity, Mapping) and float(sparsity) == 0.0
    retrain_prune = None if retrain is None else (lambda m, _p, _s: retrain(m, "prune"))
    pruner = iterative_prune(model, sparsity, steps=prune_steps, schedule=schedule, scope=scope, include=include,
                             exclude=exclude, retrain=retrain_prune,
                             progress=None if progress is None else (lambda d, t: progress("prune", d, t)))
    pruner.remove()
    target_ids = {id(t.weight) for t in pruner.targets}
    report.other_bytes = sum(p.numel() * p.element_size() for p in model.parameters() if id(p) not in target_ids)
    for t in pruner.targets:
        index_bits, size = (0, t.weight.numel() * 4) if sparsity_is_zero else pruned_bytes(t.weight)
        report.layers.append(LayerSizes(t.name, tuple(t.weight.shape), t.weight.numel(),
                                        nonzero=int((t.weight != 0).sum()), index_bits=index_bits,
                                        original=t.weight.numel() * t.weight.element_size(), pruned=size))
    finish("pruned", report.other_bytes + sum(layer.pruned for layer in report.layers),
           quality(model) if quality is not None else None)

    # 2. weight sharing (+ centroid fine-tuning)
    shared = share_weights(model, bits, targets=pruner.targets,
                           progress=None if progress is None else (lambda d, t: progress("share", d, t)))
    if retrain is not None:
        retrain(model, "share")
    by_name = {layer.name: layer for layer in report.layers}
    for name, sw in shared.items():
        layer = by_name[name]
        layer.codes = sw.num_codes
        layer.index_bits, layer.shared = shared_bytes(sw)
    unshared = [layer for layer in report.layers if layer.name not in shared]
    for layer in unshared:  # layers a bits mapping left dense keep their pruned size
        layer.shared = layer.huffman = layer.pruned
    finish("shared", report.other_bytes + sum(layer.shared for layer in report.layers),
           quality(model) if quality is not None else None)

    # 3. Huffman coding (lossless)
    for i, (name, sw) in enumerate(shared.items()):
        layer = by_name[name]
        layer.index_bits, layer.huffman = huffman_bytes_of(sw)
        if encode or verify:
            codes = sw.codes.cpu().numpy().astype(np.int64)
            encoded = encode_codes(codes, sw.num_codes, sw.zero_code, layer.index_bits)
            layer.huffman = encoded.nbytes + sw.centroids.numel() * sw.centroids.element_size()
            if verify and not np.array_equal(encoded.decode(), codes):
                raise AssertionError(f"Huffman round trip changed the codes of {name}")
            if encode:
                report.encoded[name] = encoded
        if progress is not None:
            progress("huffman", i + 1, len(shared))
    finish("huffman", report.other_bytes + sum(layer.huffman for layer in report.layers),
           report.stages[-1].quality)
    return report
