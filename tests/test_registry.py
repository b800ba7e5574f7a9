"""The method registry: names -> specs, and clear errors for unknown names."""

import pytest

from sparse_mosaics.attention import PAPER_METHODS, get_method, is_valid_method


def test_paper_methods_parse_to_their_kernels():
    kernels = {get_method(m).kernel for m in PAPER_METHODS}
    assert {"gaussian", "triweight", "biweight", "epanechnikov", "gaussian_knn", "uniform_knn"} <= kernels
    assert len(PAPER_METHODS) == 8


@pytest.mark.parametrize(
    "name, family, alpha, n",
    [("epanechnikov", "entmax", 2.0, 1), ("biweight", "entmax", 1.5, 2), ("triweight", "entmax", 4 / 3, 3),
     ("entmax_1.25", "entmax", 1.25, 4)],
)
def test_entmax_alpha_is_one_plus_one_over_n(name, family, alpha, n):
    spec = get_method(name)
    assert spec.family == family
    assert spec.alpha == pytest.approx(alpha)
    assert spec.kernel_exponent == pytest.approx(n)


def test_entmax_1_25_is_the_n4_kernel_and_parsed_families():
    assert get_method("entmax_1.25").kernel == "compact_n4"
    assert get_method("entmax_2").kernel == "epanechnikov"
    s = get_method("top7_softmax")
    assert (s.family, s.k, s.alpha) == ("topk_softmax", 7, 1.0)
    u = get_method("top3_uniform")
    assert (u.family, u.k, u.differentiable_scores) == ("topk_uniform", 3, False)


@pytest.mark.parametrize("bad", ["gelu", "entmax_1", "entmax_2.5", "top0_softmax", "top16softmax", "", "Softmax"])
def test_unknown_names_list_the_valid_forms(bad):
    assert not is_valid_method(bad)
    with pytest.raises(ValueError) as e:
        get_method(bad)
    msg = str(e.value)
    assert repr(bad) in msg and "top<K>_softmax" in msg and "entmax_<alpha>" in msg
