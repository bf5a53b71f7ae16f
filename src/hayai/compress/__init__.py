"""hayai.compress: Deep Compression (Han, Mao & Dally, ICLR 2016) for any PyTorch model.

- `pruning.py`        iterative magnitude pruning with retraining; masks hold weights and gradients at zero
- `weight_sharing.py` per-layer k-means (linear init), Shared{Linear,Conv,Embedding} with trainable centroids
- `huffman.py`        canonical Huffman coding of codes and of sparse relative offsets (with fillers)
- `pipeline.py`       deep_compress: prune -> share -> code, the size and quality after each stage
- `targets.py`        which weights are compressed (glob patterns over module names, tied weights once)
"""

from hayai.compress.huffman import (
    EncodedCodes,
    HuffmanCode,
    HuffmanStream,
    choose_layout,
    encode_codes,
    from_relative_sparse,
    huffman_code_lengths,
    to_relative_sparse,
)
from hayai.compress.pipeline import CompressionReport, LayerSizes, Stage, deep_compress
from hayai.compress.pruning import MagnitudePruner, iterative_prune, sparsity_schedule
from hayai.compress.targets import compressible_weights
from hayai.compress.weight_sharing import (
    SharedConv,
    SharedEmbedding,
    SharedLinear,
    SharedWeight,
    kmeans_1d,
    share_weight,
    share_weights,
    unshare_weights,
)

__all__ = [
    "CompressionReport",
    "EncodedCodes",
    "HuffmanCode",
    "HuffmanStream",
    "LayerSizes",
    "MagnitudePruner",
    "SharedConv",
    "SharedEmbedding",
    "SharedLinear",
    "SharedWeight",
    "Stage",
    "choose_layout",
    "compressible_weights",
    "deep_compress",
    "encode_codes",
    "from_relative_sparse",
    "huffman_code_lengths",
    "iterative_prune",
    "kmeans_1d",
    "share_weight",
    "share_weights",
    "sparsity_schedule",
    "to_relative_sparse",
    "unshare_weights",
]
