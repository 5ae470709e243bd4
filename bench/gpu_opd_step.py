"""One opd step of the real SmolLM2-135M-Instruct student on one GPU (a part of bench/gpu_check.py).

The student is the Megatron model built for this machine (the Transformer Engine spec when TE imports),
loaded from `tools/convert_hf.py import` of the HF folder. The HF folder itself, in transformers on the
same GPU (mopd's embedded engine), generates the rollouts and scores them top-64 as the teacher; the
student then trains three steps on the top-K forward KL with tail bucket, all through mopd's own
build_train_batches / loss / train_step. Teacher and student start from the same weights, so the first
loss is the divergence between the two implementations (bf16 rounding, FP8 quantisation): small.
"""

from __future__ import annotations

import math
import os
import socket
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FIRST_LOSS_BOUND = {"none": 0.05, "tensorwise": 0.5}
"""nats per token: bf16 implementations agree closely; FP8 quantises activations and weights."""
QUESTIONS = ["What is 17 + 25?", "Name a prime number larger than 50.", "Write a haiku about rain.",
             "Reverse the word 'planet'.", "What is the capital of France?", "Explain what a GPU is in one line.",
             "Count from 1 to 7.", "Give a synonym for 'quick'."]


def _single_process_world() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))


def _student_config(megatron_dir: Path, fp8: str):
    from mopd.config import Dtype, Fp8Recipe, OptimizerConfig, PrecisionConfig, StudentConfig, TrainConfig
    from mopd.hf.convert import MODEL_YAML, read_model_yaml

    model = read_model_yaml(megatron_dir / MODEL_YAML)
    return StudentConfig(
        model=model, precision=PrecisionConfig(dtype=Dtype.bf16, fp8=Fp8Recipe(fp8)),
        optimizer=OptimizerConfig(lr=1e-5, clip_grad=1.0),
        # FP8 with one row per micro-batch: the padded length must make the token count a multiple of 16.
        train=TrainConfig(steps=10, global_batch_size=8, micro_batch_size=1 if fp8 != "none" else 4,
                          max_seq_len=model.max_position_embeddings, loss_chunk_tokens=1024),
    )


def _prompts(tokenizer):
    import torch

    from mopd.data.chat import conversation, render_chat
    from mopd.types import Prompt

    out = []
    for i, question in enumerate(QUESTIONS):
        messages = conversation(question)
        out.append(Prompt(index=i, ids=torch.tensor(render_chat(tokenizer, messages), dtype=torch.long), text=question, domain="chat",
                          messages=messages))
    return out


def _hf_mapping_check(chunks, cfg, hf_dir: Path) -> dict:
    """The TE model's parameters, streamed to HF names, equal the HF checkpoint's tensors."""
    from safetensors import safe_open

    from mopd.hf.mapping import megatron_to_hf

    try:
        with safe_open(str(hf_dir / "model.safetensors"), "pt") as f:
            names = set(f.keys())
            mismatched = [name for name, t in megatron_to_hf(chunks, cfg.model)
                          if name in names and not (t.cpu() == f.get_tensor(name).to(t.dtype)).all()]
            streamed = {name for name, _ in megatron_to_hf(chunks, cfg.model)}
    except Exception as e:  # noqa: BLE001 - the report records the failure (review defect 2 under TE)
        return {"ok": False, "error": f"{type(e).__name__}: {e}"[:500]}
    return {"ok": not mismatched and streamed == names, "mismatched": mismatched[:5],
            "missing": sorted(names - streamed)[:5]}


def opd_step(fp8: str = "none", device: str = "cuda") -> dict:
    """The part's result; ``device="cpu"`` runs the same code on a CPU machine (slow; to check the driver)."""
    import torch

    sys.path.insert(0, str(ROOT / "tests"))
    from real_models import smollm2_hf_dir, smollm2_megatron_dir

    from mopd.config import ObjectiveConfig, SamplingConfig
    from mopd.hf.gather import unwrap
    from mopd.parallel import destroy_parallel, init_parallel
    from mopd.rollout.embedded import EmbeddedEngine
    from mopd.rollout.engine import ScoreRequest
    from mopd.stages.batches import loss_fn_for
    from mopd.student import build_model, build_optimizer, load_model_weights, train_step
    from mopd.student.hardware import fp8_problems, probe_capabilities
    from mopd.student.train_step import _common_shape
    from mopd.teachers import build_train_batches
    from mopd.types import Routing, TeacherScores

    hf_dir, megatron_dir = smollm2_hf_dir(), smollm2_megatron_dir(1)
    cfg = _student_config(megatron_dir, fp8)
    caps = probe_capabilities(torch.device(device, 0) if device == "cuda" else torch.device("cpu"))
    if why := fp8_problems(cfg.precision, caps):
        return {"ok": True, "skipped_reason": why[0]}
    _single_process_world()
    layout = init_parallel(cfg.parallel, seed=0)
    try:
        chunks = build_model(cfg, layout)
        load_model_weights(megatron_dir, chunks)
        spec = type(unwrap(chunks[0]).decoder.layers[0].self_attention.linear_qkv).__name__
        mapping = _hf_mapping_check(chunks, cfg, hf_dir) if fp8 == "none" else None
        optimizer, scheduler = build_optimizer(cfg, chunks)
        engine = EmbeddedEngine.from_pretrained(hf_dir, dtype=torch.bfloat16, device=device)
        rollouts = engine.generate(_prompts(engine.tokenizer), SamplingConfig(max_new_tokens=48, seed=0))
        scores = TeacherScores.concat(engine.score(
            [ScoreRequest(ids=torch.cat([r.prompt_ids, r.response_ids]), response_start=int(r.prompt_ids.numel()))
             for r in rollouts], top_k=64))
        tokens = sum(int(r.response_ids.numel()) for r in rollouts)
        routing = Routing(teachers=("teacher",), index=torch.zeros(tokens, dtype=torch.long))
        batches = build_train_batches(rollouts, scores, routing, cfg.train.micro_batch_size, engine.pad_token_id)
        loss_fn = loss_fn_for(cfg, layout, {0: [ObjectiveConfig()]}, ("teacher",))
        cuda = device == "cuda"
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        losses, times = [], []
        for step in range(3):
            start = time.perf_counter()
            losses.append(train_step(chunks, optimizer, scheduler, batches, loss_fn, layout, step=step).loss)
            if cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        rows, padded = _common_shape(batches, layout, chunks[0].config)
        ok = all(math.isfinite(x) for x in losses) and 0 <= losses[0] < FIRST_LOSS_BOUND[fp8]
        return {"ok": ok and (mapping is None or mapping["ok"]), "fp8": fp8, "layer_spec": spec,
                "losses": losses, "first_loss_bound": FIRST_LOSS_BOUND[fp8], "response_tokens": tokens,
                "micro_batch": [rows, int(batches[0].tokens.shape[1])], "padded_length": padded,
                "step_s": times, "tokens_per_s": tokens / min(times[1:]),
                "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None, "hf_mapping": mapping,
                "fast_paths": {k: bool(getattr(chunks[0].config, k)) for k in (
                    "gradient_accumulation_fusion", "apply_rope_fusion", "masked_softmax_fusion")}}
    finally:
        destroy_parallel(process_group=True)


if __name__ == "__main__":
    import json

    sys.path.insert(0, str(ROOT))
    print(json.dumps(opd_step(*sys.argv[1:3])))

