"""HF <-> Megatron-Core checkpoints: family configs, the parameter mapping, streaming import/export.

`megatron_to_hf` is the one stream of HF-named tensors that export, weight sync and EMA teachers use.
"""

from mopd.hf.convert import export_hf, import_hf
from mopd.hf.families import detect_family, hf_config_from_model, model_config_from_hf
from mopd.hf.mapping import megatron_to_hf

__all__ = ["detect_family", "export_hf", "hf_config_from_model", "import_hf", "megatron_to_hf",
           "model_config_from_hf"]
