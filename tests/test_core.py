"""The compiled core edmrt._core: fused linear combination against numpy, and its input checks."""
import numpy as np
import pytest

from edmrt import _core


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("n", [1, 7, 1823 * 781])  # irregular sizes, one above the OpenMP threshold
def test_lincomb_matches_numpy(dtype, n):
    rng = np.random.default_rng(n)
    xs = [rng.normal(size=n).astype(dtype) for _ in range(4)]
    coeffs = rng.normal(size=4).tolist()
    out = np.full(n, np.nan, dtype=dtype)  # poisoned: an unwritten element fails
    _core.lincomb(out, coeffs, xs)
    ref = sum(c * x.astype(np.float64) for c, x in zip(coeffs, xs))
    tol = 1e-6 if dtype == np.float32 else 1e-14
    np.testing.assert_allclose(out, ref.astype(dtype), rtol=tol, atol=tol)


def test_lincomb_may_alias_an_input():
    x = np.arange(10, dtype=np.float64)
    y = np.ones(10)
    _core.lincomb(x, [2.0, 3.0], [x, y])
    np.testing.assert_array_equal(x, 2 * np.arange(10) + 3)


def test_lincomb_rejects_bad_buffers():
    a = np.zeros(8, dtype=np.float32)
    with pytest.raises(ValueError, match="dtype float32 like out"):
        _core.lincomb(a, [1.0], [np.zeros(8)])
    with pytest.raises(ValueError, match="out must be C-contiguous"):
        _core.lincomb(np.zeros(16, dtype=np.float32)[::2], [1.0], [a])
    with pytest.raises(ValueError, match=r"inputs\[0\] must be C-contiguous"):
        _core.lincomb(a, [1.0], [np.zeros(16, dtype=np.float32)[::2]])
    with pytest.raises(ValueError, match="8 elements"):
        _core.lincomb(a, [1.0], [np.zeros(9, dtype=np.float32)])
    with pytest.raises(ValueError, match="one value per input"):
        _core.lincomb(a, [1.0, 2.0], [a])
    with pytest.raises(ValueError, match="float32 or float64"):
        _core.lincomb(np.zeros(8, dtype=np.int32), [1.0], [np.zeros(8, dtype=np.int32)])
    ro = np.zeros(8, dtype=np.float32)
    ro.setflags(write=False)
    with pytest.raises(ValueError, match="writeable"):
        _core.lincomb(ro, [1.0], [a])
