"""DeepSpeed's bucket, prefetch, persistence and sub-group sizes, once: strategies/deepspeed.py writes them
into the config it generates and strategies/footprint/zero.py counts the buffers they make (no torch here).

Bucket sizes follow the model width as transformers' DeepSpeed integration sets its "auto" values:
DeepSpeed's fixed defaults (5e8-element buckets, 1e5-element persistence) are sized for big models, and
keep every parameter of a small one unpartitioned on every rank under ZeRO-3.
"""

from __future__ import annotations

DEFAULT_BUCKET = 500_000_000  # DeepSpeed's reduce_bucket_size (elements), used when the width is unknown
DEFAULT_PERSISTENCE = 100_000  # DeepSpeed's stage3_param_persistence_threshold (elements), the same
ZERO3_SUB_GROUP = 1_000_000_000  # DeepSpeed's default sub_group_size: one AdamW step counter each
PREFETCH_SHARE = 0.9  # ZeRO-3's prefetch bucket, as a share of the reduce bucket
PERSISTENT_WIDTHS = 10  # ZeRO-3 keeps tensors of at most this many x hidden elements whole on every rank


def reduce_bucket(hidden_size: int | None) -> int:
    """Elements of the gradient reduce bucket: hidden^2."""
    return hidden_size * hidden_size if hidden_size else DEFAULT_BUCKET


def persistence_threshold(hidden_size: int | None) -> int:
    """Largest tensor (elements) ZeRO-3 keeps gathered on every rank instead of partitioning it."""
    return PERSISTENT_WIDTHS * hidden_size if hidden_size else DEFAULT_PERSISTENCE
