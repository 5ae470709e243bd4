"""EmbeddedEngine: an in-process HuggingFace causal LM that generates, scores and takes weight updates.

Generation is a KV-cached decode loop written on the model's own forward (``past_key_values``), so
the behaviour logprob of every sampled token is read from the same logits that were sampled from.

Which distribution ``Rollout.behaviour_logprobs`` refers to: the RAW next-token distribution,
``log_softmax(logits)`` at temperature 1 over the full vocabulary, before temperature, top-k or
top-p. The trainer compares it with the student's raw logits for importance ratios, and it is what
SGLang returns when launched with ``SGLANG_RETURN_ORIGINAL_LOGPROB=1`` (sglang_launcher sets it).
Tokens themselves are drawn from the processed distribution (temperature, then top-k, then top-p).
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch

from mopd.config import SamplingConfig
from mopd.errors import EngineError
from mopd.rollout.engine import Engine, Health, ScoreRequest
from mopd.rollout.scoring import derive_seed, scores_from_logits
from mopd.types import Prompt, Rollout, TeacherScores


@dataclass(frozen=True, slots=True)
class _Sequence:
    """One sample being generated: its prompt and its private generator."""

    prompt: Prompt
    generator: torch.Generator


class EmbeddedEngine(Engine):
    """Generation and scoring with a transformers causal LM in this process (CPU or one GPU)."""

    def __init__(
        self,
        model: torch.nn.Module,
        *,
        eos_token_ids: Sequence[int],
        pad_token_id: int,
        name: str = "embedded",
        tokenizer=None,
        max_batch_size: int = 64,
    ) -> None:
        self.model = model.eval()
        self.name = name
        self.eos_token_ids = tuple(int(i) for i in eos_token_ids)
        self.pad_token_id = int(pad_token_id)
        self.tokenizer = tokenizer
        self.max_batch_size = max_batch_size
        self.weight_version = 0
        self.vocab_size = int(model.get_output_embeddings().weight.shape[0])
        # Decoding reads only the last position's logits; models that can skip the LM head on the
        # others (transformers' `logits_to_keep`, as its own `generate` does) save a [B, P, V]
        # projection per prefill, which at a real vocabulary is most of the prefill's cost.
        params = inspect.signature(model.forward).parameters
        self._last_logits_only = {"logits_to_keep": 1} if "logits_to_keep" in params else {}

    @classmethod
    def from_pretrained(
        cls, path: str | os.PathLike, *, name: str = "embedded", dtype: torch.dtype = torch.float32, device: str = "cpu"
    ) -> EmbeddedEngine:
        """Load an HF directory (model and, when present, tokenizer); EOS/pad ids from its configs."""
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if not os.path.isdir(path):
            raise EngineError(f"embedded engine {name!r}: model directory {path} does not exist")
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device)
        try:
            tokenizer = AutoTokenizer.from_pretrained(path)
        except (OSError, ValueError):
            tokenizer = None
        eos = model.generation_config.eos_token_id if model.generation_config else None
        eos = eos if eos is not None else model.config.eos_token_id
        eos_ids = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
        pad = model.config.pad_token_id
        pad = pad if pad is not None else (eos_ids[0] if eos_ids else 0)
        return cls(model, eos_token_ids=eos_ids, pad_token_id=pad, name=name, tokenizer=tokenizer)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    # ------------------------------------------------------------------ generation

    def generate(self, prompts: Sequence[Prompt], sampling: SamplingConfig) -> list[Rollout]:
        """``sampling.n`` rollouts per prompt, prompt-major; see the module docstring for the logprobs.

        Sample ``s`` of a prompt draws from its own generator seeded with
        ``derive_seed(sampling.seed, prompt.index, s)``, so results do not depend on batching.
        """
        expanded = [p for p in prompts for _ in range(sampling.n)]
        seeds = [
            None if sampling.seed is None else derive_seed(sampling.seed, p.index, s)
            for p in prompts
            for s in range(sampling.n)
        ]
        return self.generate_seeded(expanded, sampling, seeds)

    def generate_seeded(
        self, prompts: Sequence[Prompt], sampling: SamplingConfig, seeds: Sequence[int | None]
    ) -> list[Rollout]:
        """One rollout per entry of ``prompts`` (``sampling.n`` is ignored), each with its exact seed.

        This is what a server does with SGLang's per-request ``sampling_seed``; None draws a seed
        from torch's global generator.
        """
        seqs = [_Sequence(p, self._generator(seed)) for p, seed in zip(prompts, seeds, strict=True)]
        out: list[Rollout] = []
        for lo in range(0, len(seqs), self.max_batch_size):
            out += self._generate_batch(seqs[lo : lo + self.max_batch_size], sampling)
        return out

    def _generator(self, seed: int | None) -> torch.Generator:
        gen = torch.Generator(device=self.device)
        gen.manual_seed(int(torch.randint(0, 2**62, ()).item()) if seed is None else seed)
        return gen

    @torch.no_grad()
    def _generate_batch(self, seqs: list[_Sequence], sampling: SamplingConfig) -> list[Rollout]:
        for s in seqs:
            if s.prompt.ids.numel() == 0:
                raise EngineError(f"embedded engine {self.name!r}: prompt {s.prompt.index} has no tokens")
        ids, mask = _left_pad([s.prompt.ids for s in seqs], self.pad_token_id, self.device)
        stop = torch.tensor(sorted(set(self.eos_token_ids) | set(sampling.stop_token_ids)), device=self.device)
        b = len(seqs)
        tokens = torch.empty(b, 0, dtype=torch.long, device=self.device)
        logprobs = torch.empty(b, 0, dtype=torch.float32, device=self.device)
        done = torch.zeros(b, dtype=torch.bool, device=self.device)
        lengths = torch.full((b,), sampling.max_new_tokens, dtype=torch.long, device=self.device)
        cache, step_ids = None, ids
        for step in range(sampling.max_new_tokens):
            positions = (mask.cumsum(-1) - 1).clamp(min=0)[:, -step_ids.shape[1] :]
            out = self.model(
                input_ids=step_ids, attention_mask=mask, position_ids=positions, past_key_values=cache, use_cache=True,
                **self._last_logits_only,
            )
            cache, logits = out.past_key_values, out.logits[:, -1].float()
            next_ids = _sample(logits, sampling, [s.generator for s in seqs])
            raw = torch.log_softmax(logits, dim=-1).gather(1, next_ids.unsqueeze(1)).squeeze(1)
            next_ids = torch.where(done, self.pad_token_id, next_ids)
            tokens = torch.cat([tokens, next_ids.unsqueeze(1)], dim=1)
            logprobs = torch.cat([logprobs, raw.unsqueeze(1)], dim=1)
            stopped = ~done & torch.isin(next_ids, stop)
            lengths = torch.where(stopped, step + 1, lengths)
            done |= stopped
            if bool(done.all()):
                break
            step_ids = next_ids.unsqueeze(1)
            mask = torch.cat([mask, torch.ones(b, 1, dtype=mask.dtype, device=mask.device)], dim=1)
        return [self._rollout(s, tokens[i, : lengths[i]], logprobs[i, : lengths[i]], bool(done[i])) for i, s in enumerate(seqs)]

    def _rollout(self, seq: _Sequence, response: torch.Tensor, logprobs: torch.Tensor, stopped: bool) -> Rollout:
        response = response.cpu()
        text = self.tokenizer.decode(response.tolist()) if self.tokenizer is not None else ""
        return Rollout(
            prompt_ids=seq.prompt.ids.cpu().long(),
            response_ids=response,
            behaviour_logprobs=logprobs.cpu(),
            finish="stop" if stopped else "length",
            weight_version=self.weight_version,
            domain=seq.prompt.domain,
            prompt_index=seq.prompt.index,
            pi=seq.prompt.pi,
            messages=seq.prompt.messages,
            reference=seq.prompt.reference,
            text=text,
        )

    # ------------------------------------------------------------------ scoring

    @torch.no_grad()
    def score(self, requests: Sequence[ScoreRequest], top_k: int) -> list[TeacherScores]:
        """One prefill per batch; row t of a response is predicted by logits at ``response_start + t - 1``."""
        out: list[TeacherScores] = []
        for lo in range(0, len(requests), self.max_batch_size):
            out += self._score_batch(requests[lo : lo + self.max_batch_size], top_k, lo)
        return out

    def _score_batch(self, requests: Sequence[ScoreRequest], top_k: int, offset: int) -> list[TeacherScores]:
        for i, r in enumerate(requests):
            _check_score_request(r, offset + i, self.name)
        ids, mask = _right_pad([r.ids for r in requests], self.pad_token_id, self.device)
        logits = self.model(input_ids=ids, attention_mask=mask).logits
        out = []
        for i, r in enumerate(requests):
            length = r.ids.shape[0]
            sampled = r.sampled_ids if r.sampled_ids is not None else r.ids[r.response_start :]
            rows = logits[i, r.response_start - 1 : length - 1]
            scores = scores_from_logits(rows, sampled.to(self.device), top_k, self.name)
            out.append(_to_cpu(scores))
        return out

    # ------------------------------------------------------------------ weights and health

    @torch.no_grad()
    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int) -> None:
        """Copy HF-named tensors into the model; any subset of its parameters/buffers is allowed."""
        targets = self.model.state_dict(keep_vars=True)
        for name, tensor in named_tensors:
            if name not in targets:
                close = [k for k in targets if k.split(".")[-1] == name.split(".")[-1]][:3]
                raise EngineError(
                    f"embedded engine {self.name!r}: unknown weight {name!r} (not a parameter of the model; "
                    f"e.g. {close}); weight version stays {self.weight_version}"
                )
            target = targets[name]
            if tuple(target.shape) != tuple(tensor.shape):
                raise EngineError(
                    f"embedded engine {self.name!r}: weight {name!r} has shape {tuple(tensor.shape)}, "
                    f"the model expects {tuple(target.shape)}; weight version stays {self.weight_version}"
                )
            target.data.copy_(tensor.to(device=target.device, dtype=target.dtype))
        self.weight_version = int(version)

    def health(self) -> Health:
        return Health(ok=True, detail=f"embedded {type(self.model).__name__} on {self.device}", weight_version=self.weight_version)


def _sample(logits: torch.Tensor, sampling: SamplingConfig, generators: list[torch.Generator]) -> torch.Tensor:
    """[B] next ids from [B, V] fp32 logits: argmax at temperature 0, else temperature/top-k/top-p."""
    if sampling.temperature == 0.0:
        return logits.argmax(dim=-1)
    scaled = logits / sampling.temperature
    if 0 < sampling.top_k < scaled.shape[-1]:
        kth = torch.topk(scaled, sampling.top_k, dim=-1).values[:, -1:]
        scaled = scaled.masked_fill(scaled < kth, -torch.inf)
    if sampling.top_p < 1.0:
        sorted_logits, order = torch.sort(scaled, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        # Drop a token when the mass strictly before it already reaches top_p (the first always stays).
        drop = (probs.cumsum(-1) - probs) >= sampling.top_p
        scaled = scaled.scatter(1, order, sorted_logits.masked_fill(drop, -torch.inf))
    probs = torch.softmax(scaled, dim=-1)
    return torch.cat([torch.multinomial(probs[i], 1, generator=g) for i, g in enumerate(generators)])


def _left_pad(seqs: list[torch.Tensor], pad: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, S] ids and attention mask, left-padded so every row's next token is in the last column."""
    width = max(s.shape[0] for s in seqs)
    ids = torch.full((len(seqs), width), pad, dtype=torch.long, device=device)
    mask = torch.zeros(len(seqs), width, dtype=torch.long, device=device)
    for i, s in enumerate(seqs):
        ids[i, width - s.shape[0] :] = s.to(device)
        mask[i, width - s.shape[0] :] = 1
    return ids, mask


def _right_pad(seqs: list[torch.Tensor], pad: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, S] ids and attention mask, right-padded (positions then start at 0 in every row)."""
    width = max(s.shape[0] for s in seqs)
    ids = torch.full((len(seqs), width), pad, dtype=torch.long, device=device)
    mask = torch.zeros(len(seqs), width, dtype=torch.long, device=device)
    for i, s in enumerate(seqs):
        ids[i, : s.shape[0]] = s.to(device)
        mask[i, : s.shape[0]] = 1
    return ids, mask


def _check_score_request(r: ScoreRequest, index: int, engine: str) -> None:
    length = int(r.ids.shape[0])
    if not 1 <= r.response_start <= length:
        raise EngineError(
            f"engine {engine!r}: score request {index} has response_start={r.response_start}, "
            f"which must be in [1, {length}] (at least one context token precedes the response)"
        )
    if r.sampled_ids is not None and r.sampled_ids.shape[0] != length - r.response_start:
        raise EngineError(
            f"engine {engine!r}: score request {index} has {r.sampled_ids.shape[0]} sampled_ids for "
            f"{length - r.response_start} response positions"
        )


def _to_cpu(s: TeacherScores) -> TeacherScores:
    return TeacherScores(s.topk_ids.cpu(), s.topk_logprobs.cpu(), s.sampled_logprob.cpu(), s.tail_logmass.cpu(), s.teacher)
