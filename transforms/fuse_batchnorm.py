"""Fold inference batch norm (any per-channel affine chain) into the preceding conv or dense.

Rewrites ``conv(x, w)`` or ``x @ w`` followed by elementwise ``add/sub/mul/div/neg`` with
per-channel constants (``(y - mean) * rsqrt(var + eps) * scale + bias``) into one conv or
dot on folded weights plus one bias add. Identity: for per-channel vectors a, b,
``conv(x, w) * a + b == conv(x, w * a[out_channel]) + b`` (likewise for dots), and every
step of the chain maps ``a*y + b`` to another ``a'*y + b'``.

Must not fire: when a chain operand depends on the conv's own output (training-mode
batch statistics), when an intermediate value is read elsewhere, when the operand the
scale folds into is larger than the activation (scaling weights would cost more than
the elementwise pass it saves), or for ``o / y`` (not affine). Rounding: the folded
form rounds differently (float32 ~1e-6 relative unless y - mean cancels badly).

``RULES`` also holds ``FoldAffineNext`` (``fuse_batchnorm_next``): a per-channel affine
after the activation folded forward into the next dense/conv. The two directions live in
``fuse_batchnorm_prev`` and ``fuse_batchnorm_next`` (which builds on the first); this
module only gathers them.
"""
from __future__ import annotations

from .fuse_batchnorm_prev import AFFINE, FoldAffine, _channel_axes, _per_channel  # noqa: F401
from .fuse_batchnorm_next import FoldAffineNext

RULES = [FoldAffine(), FoldAffineNext()]

__all__ = ["FoldAffine", "FoldAffineNext", "RULES"]
