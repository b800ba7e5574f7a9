"""sparse-mosaics: sparse attention as compact kernel regression, inside Memory Mosaics.

Reproducibility pipeline for Santos, Gonçalves, McNamee, Treviso, Martins (2026),
"Sparse Attention as Compact Kernel Regression". The public entry points are
:func:`sparse_mosaics.attention.kernel_attention`, :class:`sparse_mosaics.model.MemoryMosaic`
and the ``sparse-mosaics`` command line (``sparse_mosaics.cli``).
"""

__version__ = "0.1.0"
