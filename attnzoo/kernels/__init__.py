"""Fused attention kernels with NATTEN-shaped functional APIs.

Public ops (each an autograd.Function with a fused Triton forward and backward on CUDA, a vectorised
PyTorch path on the CPU, and a FlexAttention path for comparison; see :func:`set_backend`):

- :func:`na1d`, :func:`na2d`, :func:`na3d`: neighborhood attention (NAT/DiNAT), NATTEN semantics.
- :func:`routed_attention`: BiFormer's bi-level routing attention (token-to-token stage);
  :func:`bilevel_routing_attention`: both stages (routing + attention) in one call.
- :func:`halo_attention`: HaloNet's blocked local attention, timm ``HaloAttn`` semantics.
- :func:`key_group_attention`: softmax attention split into per-key-group outputs and masses (forward only;
  attention-level mitigation passes such as VAR).

Importing this package imports neither triton nor FlexAttention; they load on first use.
"""

from __future__ import annotations

from ._backend import BACKENDS, get_backend_override, resolve_backend, set_backend, use_backend
from ._checks import list_checks, register_check

__all__ = [
    "BACKENDS",
    "get_backend_override",
    "list_checks",
    "register_check",
    "resolve_backend",
    "set_backend",
    "use_backend",
]

# --- neighborhood attention (na.py) ---
from .na import na1d, na2d, na3d  # noqa: E402

__all__ += ["na1d", "na2d", "na3d"]
# --- routed attention (routed.py) ---
from .routed import bilevel_routing_attention, region_routing, routed_attention  # noqa: E402

__all__ += ["bilevel_routing_attention", "region_routing", "routed_attention"]
# --- halo attention (halo.py) ---
from .halo import halo_attention  # noqa: E402

__all__ += ["halo_attention"]
# --- key-group attention (grouped_attention.py) ---
from .grouped_attention import key_group_attention  # noqa: E402

__all__ += ["key_group_attention"]
# --- counterfactual attention (counterfactual_attention.py) ---
from .counterfactual_attention import counterfactual_attention  # noqa: E402

__all__ += ["counterfactual_attention"]
# --- strip attention: ELA's strip means and gates (strip_gate.py) ---
from .strip_gate import apply_strip_gates, ela_attention, strip_attention, strip_means  # noqa: E402

__all__ += ["apply_strip_gates", "ela_attention", "strip_attention", "strip_means"]
