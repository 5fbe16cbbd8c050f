"""Whether this CPU computes bfloat16 natively (AVX512-BF16 or AMX), for CPU mixed precision.

``SOLVER.AMP.ENABLED`` on the CPU trains under bfloat16 autocast. On CPUs with AVX512-BF16 or
AMX, oneDNN runs bfloat16 convolutions and matrix products natively, about twice as fast as
float32. Elsewhere (AVX2-only and older AVX-512 CPUs) bfloat16 is emulated and far slower than
float32: the demo's training step took more than 15 s instead of 1 s in float32 on an AVX2 CPU
(docs/performance.md).
"""

import functools
import logging

logger = logging.getLogger(__name__)


@functools.lru_cache(maxsize=None)
def native_bf16() -> bool:
    """True if this CPU has AVX512-BF16 or AMX tiles (bfloat16 arithmetic in hardware).

    Uses PyTorch's own CPU feature checks (``torch.cpu._is_avx512_bf16_supported`` and
    ``_is_amx_tile_supported``, the checks its CPU kernels dispatch on); where these are
    missing, the ``flags`` line of ``/proc/cpuinfo``; False where neither answers.
    """
    import torch

    checks = [
        getattr(torch.cpu, n, None) for n in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    ]
    if all(callable(c) for c in checks):
        try:
            return any(bool(c()) for c in checks)
        except RuntimeError:  # a build without the CPU feature query
            pass
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "").split()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags
