"""mopd: multi-teacher on-policy distillation on Megatron-Core.

The student is a Megatron-Core GPTModel (TP/PP/DP); rollouts come from SGLang (or the in-process
embedded engine); teachers send back top-K logprobs per response token; a per-token divergence on the
student's vocab-parallel logits trains it. See DESIGN.md for the data flow.
"""

__version__ = "0.1.0"
