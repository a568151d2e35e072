"""What the CPU matmul tests share: the mark that skips where this torch has no oneDNN linear."""

from __future__ import annotations

import pytest

from training.kernels import cpu_gemm

needs_onednn = pytest.mark.skipif(not cpu_gemm.onednn_available(), reason="this torch has no oneDNN linear")
