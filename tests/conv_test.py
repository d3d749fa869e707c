"""im2col convolution equals the native convolution."""

import jax
import numpy as np
import pytest

from jattr.models.conv import im2col_conv


@pytest.mark.parametrize("k,stride,padding", [(3, 1, "SAME"), (3, 2, "SAME"), (1, 1, "SAME"),
                                              (3, 1, "VALID"), (3, 2, ((1, 0), (0, 1)))])
def test_im2col_matches_lax(k, stride, padding, x64):
  x = jax.random.normal(jax.random.key(0), (2, 7, 6, 3))
  w = jax.random.normal(jax.random.key(1), (k, k, 3, 5))
  ref = jax.lax.conv_general_dilated(x, w, (stride, stride), padding,
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"))
  out = im2col_conv(x, w, (stride, stride), padding, dimension_numbers=("NHWC", "HWIO", "NHWC"))
  np.testing.assert_allclose(out, ref, rtol=1e-12, atol=1e-12)
  g_ref = jax.grad(lambda w: (jax.lax.conv_general_dilated(
      x, w, (stride, stride), padding, dimension_numbers=("NHWC", "HWIO", "NHWC")) ** 2).sum())(w)
  g = jax.grad(lambda w: (im2col_conv(
      x, w, (stride, stride), padding, dimension_numbers=("NHWC", "HWIO", "NHWC")) ** 2).sum())(w)
  np.testing.assert_allclose(g, g_ref, rtol=1e-10, atol=1e-10)


def test_im2col_refuses_what_it_does_not_implement():
  x, w = np.zeros((1, 4, 4, 2)), np.zeros((3, 3, 2, 2))
  dn = ("NHWC", "HWIO", "NHWC")
  with pytest.raises(NotImplementedError, match="dilation"):
    im2col_conv(x, w, (1, 1), "SAME", rhs_dilation=(2, 2), dimension_numbers=dn)
  with pytest.raises(NotImplementedError, match="grouped"):
    im2col_conv(x, w, (1, 1), "SAME", dimension_numbers=dn, feature_group_count=2)
  with pytest.raises(NotImplementedError, match="NHWC"):
    im2col_conv(x, w, (1, 1), "SAME", dimension_numbers=("NCHW", "OIHW", "NCHW"))
