"""Memory Mosaics: leaky-averaged keys, look-ahead values, context and persistent memory.

    from sparse_mosaics.model import MemoryMosaic, MemoryMosaicConfig
    model = MemoryMosaic(MemoryMosaicConfig(vocab_size=36, n_layer=2, n_head=8, n_embd=512))
    logits, loss = model(idx, targets, loss_mask=mask, lengths=lengths)
"""

from .leaky_average import leaky_average, leaky_average_dense, leaky_average_reference
from .mosaic import (
    Block,
    ContextMemory,
    KeyFeaturizer,
    LayerNorm,
    MemoryMosaic,
    MemoryMosaicConfig,
    PersistentMemory,
    ValueFeaturizer,
)

__all__ = [
    "Block",
    "ContextMemory",
    "KeyFeaturizer",
    "LayerNorm",
    "MemoryMosaic",
    "MemoryMosaicConfig",
    "PersistentMemory",
    "ValueFeaturizer",
    "leaky_average",
    "leaky_average_dense",
    "leaky_average_reference",
]
