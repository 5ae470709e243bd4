"""Weight sync, student -> rollout engines and tracking teachers (DESIGN.md §1 step 6).

``student`` runs the sync across the Megatron ranks; ``streams`` buckets and fans out HF-named
tensor streams; ``checks`` fingerprints them.
"""

from mopd.sync.checks import checksum, engine_fingerprint, fingerprint, param_dtype
from mopd.sync.streams import (
    DEFAULT_BUCKET_BYTES, Named, WeightConsumer, bucket_tensors, fan_out, load_into, tensor_bytes,
)
from mopd.sync.student import StagedConsumer, SyncReport, WeightSync, tracking

__all__ = [
    "DEFAULT_BUCKET_BYTES", "Named", "StagedConsumer", "SyncReport", "WeightConsumer", "WeightSync", "bucket_tensors",
    "checksum", "engine_fingerprint", "fan_out", "fingerprint", "load_into", "param_dtype", "tensor_bytes", "tracking",
]
