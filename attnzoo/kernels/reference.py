"""Float64 ground truth for every kernel in :mod:`attnzoo.kernels`.

Written as plainly as possible (explicit neighbour / region / window index lists, a dense score matrix
with a mask, softmax, weighted sum), in float64, with no performance intent. Tests compare every
backend to these, forward and backward (autograd through these functions gives the reference
gradients). Never used as a runtime backend.
"""

from __future__ import annotations

__all__: list[str] = []
