"""Trained quantization by weight sharing: per-layer k-means (Deep Compression, stage 2).

Han, Mao & Dally, "Deep Compression", ICLR 2016 (arXiv:1510.00149), §3. The weights of one layer are
clustered into k = 2^b clusters by 1-D k-means, minimising Σ_i Σ_{w ∈ c_i} |w − c_i|²; every weight is then
stored as the b-bit index of its cluster, and the layer as those indices plus a codebook of k shared values:

    W[j] = table[codes[j]],      compression n·32 / (n·b + k·32)  for n fp32 weights

Centroids start *linearly spaced* over [min W, max W] (the paper's best initialisation: it keeps the rare
large weights, which density-based or random initialisation would lose). Lloyd iterations follow (assign
each weight to the nearest centroid, move each centroid to the mean of its weights) until no assignment
changes.

Pruned layers. A layer with exact zeros (after `hayai.compress.pruning`) reserves code 0 for the value 0,
which never trains, and clusters only the nonzero weights into 2^b − 1 centroids. So a layer has at most
2^b distinct values, zeros stay zero through fine-tuning, and the sparse encoding's filler entries have a code.

Fine-tuning. The modules that replace Linear/Conv/Embedding compute W = table[codes] inside forward, so
autograd's backward of the gather sums the gradients of all weights that share a centroid:

    ∂L/∂c_k = Σ_{j : codes[j] = k} ∂L/∂W[j]

which is exactly the paper's centroid update ("the gradients are grouped by colour and summed").
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from fnmatch import fnmatchcase

import torch
import torch.nn.functional as F
from torch import nn

from hayai.compress.targets import COMPRESSIBLE_TYPES, TargetWeight, compressible_weights
from hayai.errors import ConfigError

Bits = int | Mapping[str, int]
INITS = ("linear", "density", "random")


# ---- 1-D k-means -----------------------------------------------------------------------------------------------
def initial_centroids(values: torch.Tensor, k: int, init: str = "linear",
                      generator: torch.Generator | None = None) -> torch.Tensor:
    """k starting centroids [k] (sorted) for 1-D data: linear over [min, max], quantiles, or a random sample."""
    v = values.reshape(-1).double()
    if init == "linear":
        return torch.linspace(float(v.min()), float(v.max()), k, dtype=torch.float64)
    if init == "density":
        return torch.quantile(v if v.numel() <= 1 << 24 else v[:: v.numel() // (1 << 24) + 1],
                              torch.linspace(0, 1, k, dtype=torch.float64))
    if init == "random":
        picks = torch.randperm(v.numel(), generator=generator)[:k]
        return torch.sort(v[picks]).values
    raise ConfigError(f"k-means init {init!r}: expected one of {', '.join(INITS)}")


def assign_to_centroids(values: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """Index of the nearest of the sorted `centroids` for every value (ties go to the lower index)."""
    boundaries = (centroids[1:] + centroids[:-1]) / 2  # [k-1] midpoints
    return torch.bucketize(values.double(), boundaries, right=False)


def kmeans_1d(values: torch.Tensor, k: int, *, init: str = "linear", iterations: int = 10_000, tol: float = 0.0,
              generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Lloyd's k-means on 1-D data -> (centroids [k] float64 sorted, assignment [n] int64 to the nearest one).

    In 1-D every cluster is a contiguous range of the sorted values, bounded by the midpoints between
    neighbouring centroids, so one Lloyd round is k binary searches and prefix-sum differences instead of a
    pass over all n values: the data is sorted once and each round costs O(k log n). Stops when no cluster
    boundary moves (exact convergence), when no centroid moves by more than ``tol · std(values)``, or after
    `iterations` rounds. An empty cluster keeps its centroid.
    """
    v = values.reshape(-1).double()
    if v.numel() == 0:
        raise ConfigError("k-means over no values")
    ordered = torch.sort(v).values  # [n]
    prefix = torch.cat([ordered.new_zeros(1), torch.cumsum(ordered, 0)])  # [n + 1]
    centroids = initial_centroids(v, k, init, generator)
    min_shift = tol * float(v.std()) if v.numel() > 1 else 0.0
    edges = None
    for _ in range(iterations):
        midpoints = (centroids[1:] + centroids[:-1]) / 2  # [k-1]; a value equal to one goes to the lower cluster
        inner = torch.searchsorted(ordered, midpoints, right=True)
        new_edges = torch.cat([inner.new_zeros(1), inner, inner.new_full((1,), ordered.numel())])  # [k + 1]
        if edges is not None and torch.equal(new_edges, edges):
            break
        edges = new_edges
        counts = (edges[1:] - edges[:-1]).double()
        sums = prefix[edges[1:]] - prefix[edges[:-1]]
        new_centroids = torch.where(counts > 0, sums / counts.clamp(min=1), centroids)
        shift = float((new_centroids - centroids).abs().max())
        centroids = new_centroids
        if shift <= min_shift:
            break
    return centroids, assign_to_centroids(v, centroids)


# ---- the shared weight and the modules that use it -------------------------------------------------------------
def _codes_dtype(num_codes: int) -> torch.dtype:
    return torch.uint8 if num_codes <= 256 else torch.int16 if num_codes <= 32768 else torch.int32


class SharedWeight(nn.Module):
    """A weight tensor stored as codes into a small trainable codebook.

    table = [0, c_1, …, c_{k−1}] when `has_zero` (code 0 is the frozen exact zero of pruned entries), else
    [c_0, …, c_{k−1}]; the dense weight is table[codes]. `centroids` is the trainable part of the table.
    """

    def __init__(self, centroids: torch.Tensor, codes: torch.Tensor, has_zero: bool):
        super().__init__()
        self.has_zero = has_zero
        self.centroids = nn.Parameter(centroids)  # [k] or [k − 1] with a reserved zero
        num_codes = centroids.numel() + int(has_zero)
        self.register_buffer("codes", codes.to(_codes_dtype(num_codes)))  # [*weight shape]

    @property
    def num_codes(self) -> int:
        return self.centroids.numel() + int(self.has_zero)

    @property
    def shape(self) -> torch.Size:
        return self.codes.shape

    @property
    def zero_code(self) -> int | None:
        return 0 if self.has_zero else None

    def table(self) -> torch.Tensor:
        """The codebook [num_codes]."""
        if self.has_zero:
            return torch.cat([self.centroids.new_zeros(1), self.centroids])
        return self.centroids

    def forward(self) -> torch.Tensor:
        """The dense weight [*shape]; its gradient reaches each centroid summed over the centroid's cluster."""
        return self.table()[self.codes.long()]

    def rows(self, index: torch.Tensor) -> torch.Tensor:
        """weight[index] without materialising the whole weight (embedding lookups): [*index.shape, *shape[1:]]."""
        return self.table()[self.codes[index].long()]

    def extra_repr(self) -> str:
        return f"shape={tuple(self.shape)}, codes={self.num_codes}, has_zero={self.has_zero}"


class SharedLinear(nn.Module):
    """``y = x · table[codes]ᵀ + b``: an nn.Linear whose weight is a `SharedWeight`."""

    def __init__(self, shared: SharedWeight, bias: nn.Parameter | None):
        super().__init__()
        self.out_features, self.in_features = shared.shape
        self.shared = shared
        self.bias = bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.shared(), self.bias)


class SharedConv(nn.Module):
    """A Conv1d/2d/3d whose weight is a `SharedWeight` (same stride, padding, dilation, groups, padding mode)."""

    def __init__(self, shared: SharedWeight, bias: nn.Parameter | None, conv: nn.Conv1d | nn.Conv2d | nn.Conv3d):
        super().__init__()
        self.shared = shared
        self.bias = bias
        self.dims = conv.weight.dim() - 2
        self.stride, self.padding, self.dilation, self.groups = conv.stride, conv.padding, conv.dilation, conv.groups
        self.padding_mode = conv.padding_mode
        self._pad = list(conv._reversed_padding_repeated_twice)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        conv = (F.conv1d, F.conv2d, F.conv3d)[self.dims - 1]
        if self.padding_mode != "zeros":
            x = F.pad(x, self._pad, mode=self.padding_mode)
            return conv(x, self.shared(), self.bias, self.stride, 0, self.dilation, self.groups)
        return conv(x, self.shared(), self.bias, self.stride, self.padding, self.dilation, self.groups)


class SharedEmbedding(nn.Module):
    """An nn.Embedding whose table is a `SharedWeight`; looks up only the rows it needs."""

    def __init__(self, shared: SharedWeight, padding_idx: int | None = None):
        super().__init__()
        self.num_embeddings, self.embedding_dim = shared.shape
        self.shared = shared
        self.padding_idx = padding_idx

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.shared.rows(ids)  # [*ids.shape, dim]


# ---- applying it to a model ------------------------------------------------------------------------------------
def bits_for(name: str, bits: Bits) -> int | None:
    """A layer's bits: the int itself, or the first matching glob pattern of a mapping (None: not shared)."""
    if isinstance(bits, Mapping):
        for pattern, value in bits.items():
            if fnmatchcase(name, pattern):
                return int(value)
        return None
    return int(bits)


@torch.no_grad()
def share_weight(weight: torch.Tensor, bits: int, *, init: str = "linear", iterations: int = 10_000,
                 generator: torch.Generator | None = None) -> SharedWeight:
    """Cluster one weight tensor into at most 2^bits shared values (code 0 = exact zero if it has zeros)."""
    if not 1 <= bits <= 16:
        raise ConfigError(f"weight-sharing bits must be in 1..16, got {bits}")
    flat = weight.detach().reshape(-1)
    nonzero = flat != 0
    has_zero = bool((~nonzero).any())
    free = (1 << bits) - int(has_zero)
    values = flat[nonzero]
    if free < 1 or values.numel() == 0:  # 1 bit on a pruned layer, or an all-zero layer: only the zero code
        centroids = torch.zeros(max(free, 0), dtype=torch.float64)
        codes = torch.zeros(flat.shape, dtype=torch.long)
        return SharedWeight(centroids.to(weight.dtype), codes.view(weight.shape), has_zero=True)
    centroids, assignment = kmeans_1d(values, min(free, values.numel()), init=init, iterations=iterations,
                                      generator=generator)
    codes = torch.zeros(flat.shape, dtype=torch.long, device=flat.device)
    codes[nonzero] = assignment + int(has_zero)
    return SharedWeight(centroids.to(weight.dtype), codes.view(weight.shape), has_zero)


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def _replacement(module: nn.Module, shared: SharedWeight) -> nn.Module:
    if isinstance(module, nn.Linear):
        return SharedLinear(shared, module.bias)
    if isinstance(module, nn.Conv1d | nn.Conv2d | nn.Conv3d):
        return SharedConv(shared, module.bias, module)
    if isinstance(module, nn.Embedding):
        if module.max_norm is not None:
            raise ConfigError("weight sharing does not support nn.Embedding with max_norm")
        return SharedEmbedding(shared, module.padding_idx)
    raise ConfigError(f"weight sharing: unsupported module type {type(module).__name__}")


def share_weights(model: nn.Module, bits: Bits = 4, *, include: str | Sequence[str] | None = None,
                  exclude: str | Sequence[str] | None = None, init: str = "linear", iterations: int = 10_000,
                  targets: Sequence[TargetWeight] | None = None,
                  progress: Callable[[int, int], None] | None = None) -> dict[str, SharedWeight]:
    """Replace every targeted Linear/Conv/Embedding with its shared-weight version, in place.

    `bits` is one width for all layers or a mapping of glob patterns to widths (first match wins; unmatched
    layers stay dense), e.g. ``{"*conv*": 8, "*": 5}`` (the paper's AlexNet setting). A weight tied between
    several modules (embedding and LM head) becomes one `SharedWeight` that all of them hold. Returns the
    shared weights by name. The centroids are trainable; everything else keeps its `requires_grad`.
    `targets` (e.g. a `MagnitudePruner`'s) replaces the include/exclude selection.
    """
    if targets is None:
        targets = compressible_weights(model, include, exclude, COMPRESSIBLE_TYPES)
    targets = [t for t in targets if bits_for(t.name, bits) is not None]
    if not targets:
        raise ConfigError("weight sharing: no Linear/Conv/Embedding weights match the include/exclude patterns")
    out: dict[str, SharedWeight] = {}
    for i, target in enumerate(targets):
        shared = share_weight(target.weight, bits_for(target.name, bits) or 0, init=init, iterations=iterations)
        for holder_name, holder in target.holders:
            _set_module(model, holder_name, _replacement(holder, shared))
        out[target.name] = shared
        if progress is not None:
            progress(i + 1, len(targets))
    return out


@torch.no_grad()
def unshare_weights(model: nn.Module) -> int:
    """Replace every Shared* module by the plain nn.Linear/Conv/Embedding with the dense weight table[codes]
    (ties preserved); returns the number of modules replaced. For exporting a normal checkpoint."""
    dense: dict[int, nn.Parameter] = {}
    replaced = 0
    for name, module in list(model.named_modules(remove_duplicate=False)):
        if not isinstance(module, SharedLinear | SharedConv | SharedEmbedding):
            continue
        key = id(module.shared)
        if key not in dense:
            trainable = module.shared.centroids.requires_grad
            dense[key] = nn.Parameter(module.shared().detach().clone(), requires_grad=trainable)
        weight = dense[key]
        _set_module(model, name, _dense_module(module, weight))
        replaced += 1
    return replaced


def _dense_module(module: nn.Module, weight: nn.Parameter) -> nn.Module:
    with torch.device("meta"):
        if isinstance(module, SharedLinear):
            plain: nn.Module = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None)
        elif isinstance(module, SharedEmbedding):
            plain = nn.Embedding(module.num_embeddings, module.embedding_dim, padding_idx=module.padding_idx)
        else:
            assert isinstance(module, SharedConv)
            cls = (nn.Conv1d, nn.Conv2d, nn.Conv3d)[module.dims - 1]
            out_ch, in_per_group, *kernel = weight.shape
            plain = cls(in_per_group * module.groups, out_ch, tuple(kernel), module.stride, module.padding,
                        module.dilation, module.groups, module.bias is not None, module.padding_mode)
    plain.weight = weight
    if getattr(module, "bias", None) is not None:
        plain.bias = module.bias
    return plain
