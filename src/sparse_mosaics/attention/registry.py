"""The method registry: a method name (as written in configs and result tables) -> a spec.

Every attention method of the paper is a Nadaraya–Watson estimator with a compact (or Gaussian)
kernel. A :class:`MethodSpec` records which family computes the weights and which kernel that is:

======================  ==========  =====  ====  ==============================================
name                    family      alpha  k     kernel
======================  ==========  =====  ====  ==============================================
softmax                 softmax     1      -     gaussian
triweight               entmax      4/3    -     triweight (1-u^2)^3_+, adaptive normalisation
biweight                entmax      3/2    -     biweight (1-u^2)^2_+, adaptive normalisation
epanechnikov            entmax      2      -     epanechnikov (1-u^2)_+, adaptive normalisation
entmax_<a>, 1 < a <= 2  entmax      a      -     (1-u^2)^n_+ with n = 1/(a-1)
top<K>_softmax          topk_softmax 1     K     truncated gaussian (Gaussian kNN)
top<K>_uniform          topk_uniform -     K     uniform kNN
norm_relu               norm_relu   -      -     epanechnikov, fixed normalisation
relumax                 relumax     -      -     epanechnikov, support anchored at the best key
======================  ==========  =====  ====  ==============================================

``get_method`` is the only parser of method names; everything else (config validation, tables,
figures) asks it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from fractions import Fraction
from functools import lru_cache

# The eight methods of the paper, in the order the figures list them.
PAPER_METHODS = (
    "softmax",
    "triweight",
    "biweight",
    "epanechnikov",
    "top16_softmax",
    "top16_uniform",
    "norm_relu",
    "relumax",
)

FAMILIES = ("softmax", "entmax", "topk_softmax", "topk_uniform", "norm_relu", "relumax")

VALID_FORMS = (
    "softmax, triweight, biweight, epanechnikov, norm_relu, relumax, "
    "entmax_<alpha> with 1 < alpha <= 2 (e.g. entmax_1.25), "
    "top<K>_softmax and top<K>_uniform with K >= 1 (e.g. top16_softmax)"
)

_NAMED_ENTMAX = {"triweight": 4.0 / 3.0, "biweight": 1.5, "epanechnikov": 2.0}
_ENTMAX_RE = re.compile(r"^entmax_(\d+(?:\.\d+)?)$")
_TOPK_RE = re.compile(r"^top(\d+)_(softmax|uniform)$")


@dataclass(frozen=True)
class MethodSpec:
    """What a method name means.

    Attributes:
        name: the name as given (``"biweight"``, ``"top16_softmax"``, ``"entmax_1.25"``).
        family: one of :data:`FAMILIES`; selects the weight function.
        alpha: the entmax alpha (1.0 for softmax and top-K softmax; ``None`` where it has no
            meaning: top-K uniform, norm_relu, relumax).
        k: K of the top-K families, else ``None``.
        kernel: the Nadaraya–Watson kernel name, as the paper calls it.
        normalisation: ``"adaptive"`` (entmax threshold), ``"sum"`` (divide by the sum),
            ``"knn"`` (restricted to the K nearest keys) or ``"max_anchored"``.
    """

    name: str
    family: str
    alpha: float | None
    k: int | None
    kernel: str
    normalisation: str

    @property
    def kernel_exponent(self) -> float | None:
        """n in (1-u^2)^n_+ for the entmax family: n = 1/(alpha-1); None otherwise."""
        if self.family != "entmax":
            return None
        return 1.0 / (self.alpha - 1.0)

    @property
    def differentiable_scores(self) -> bool:
        """Whether the weights depend differentiably on the scores (top-K uniform does not)."""
        return self.family != "topk_uniform"


def _entmax_kernel_name(alpha: float) -> str:
    n = Fraction(1.0 / (alpha - 1.0)).limit_denominator(1000)
    names = {1: "epanechnikov", 2: "biweight", 3: "triweight"}
    if n.denominator == 1 and n.numerator in names:
        return names[n.numerator]
    return f"compact_n{float(n):g}"


@lru_cache(maxsize=None)
def get_method(name: str) -> MethodSpec:
    """Parse a method name into its :class:`MethodSpec`.

    Raises:
        ValueError: for an unknown name, listing the valid forms.
    """
    if not isinstance(name, str):
        raise ValueError(f"method name must be a string, got {name!r}. Valid forms: {VALID_FORMS}")
    if name == "softmax":
        return MethodSpec(name, "softmax", 1.0, None, "gaussian", "sum")
    if name in _NAMED_ENTMAX:
        alpha = _NAMED_ENTMAX[name]
        return MethodSpec(name, "entmax", alpha, None, name, "adaptive")
    if name == "norm_relu":
        return MethodSpec(name, "norm_relu", None, None, "epanechnikov", "sum")
    if name == "relumax":
        return MethodSpec(name, "relumax", None, None, "epanechnikov", "max_anchored")
    m = _ENTMAX_RE.match(name)
    if m:
        alpha = float(m.group(1))
        if not 1.0 < alpha <= 2.0:
            raise ValueError(
                f"unknown attention method {name!r}: entmax alpha must satisfy 1 < alpha <= 2 "
                f"(alpha = 1 is 'softmax'). Valid forms: {VALID_FORMS}"
            )
        return MethodSpec(name, "entmax", alpha, None, _entmax_kernel_name(alpha), "adaptive")
    m = _TOPK_RE.match(name)
    if m:
        k = int(m.group(1))
        if k < 1:
            raise ValueError(f"unknown attention method {name!r}: K must be >= 1. Valid forms: {VALID_FORMS}")
        if m.group(2) == "softmax":
            return MethodSpec(name, "topk_softmax", 1.0, k, "gaussian_knn", "knn")
        return MethodSpec(name, "topk_uniform", None, k, "uniform_knn", "knn")
    raise ValueError(f"unknown attention method {name!r}. Valid forms: {VALID_FORMS}")


def is_valid_method(name: str) -> bool:
    """True when :func:`get_method` accepts ``name``."""
    try:
        get_method(name)
    except ValueError:
        return False
    return True
