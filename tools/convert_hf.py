"""HF <-> Megatron-Core checkpoint converter (see mopd/hf/cli.py for the options).

    python tools/convert_hf.py import --hf-dir HF_DIR --megatron-dir OUT [--tp N] [--pp N]
    python tools/convert_hf.py export --megatron-dir IN --hf-dir OUT
    python tools/convert_hf.py from-gguf --gguf FILE --hf-dir OUT [--dtype bf16]
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mopd.hf.cli import main  # noqa: E402

# The guard matters: dist_checkpointing's writer may start a spawn-mode process that re-imports this file.
if __name__ == "__main__":
    sys.exit(main())
