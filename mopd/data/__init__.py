"""Prompt data: the character tokenizer, synthetic domains and their verifiers, prompt sources
(synthetic, JSONL, HuggingFace datasets) with bad-record reports, and the resumable sampler."""

from mopd.data.records import BadReason, BadRecord, FieldNames, Record, RecordReport
from mopd.data.sampler import PromptSampler, SamplerState
from mopd.data.sources import PromptRenderer, PromptSource, build_source, hf_source, jsonl_source, synthetic_source
from mopd.data.synthetic import DOMAINS, Domain, Example, PiMode, domain_verifier, generate, get_domain, register_domain
from mopd.data.tokenizer import VOCAB_SIZE, build_char_tokenizer
from mopd.data.verifiers import VERIFIERS, Verifier, exact_match, get_verifier, normalize

__all__ = [
    "BadReason", "BadRecord", "DOMAINS", "Domain", "Example", "FieldNames", "PiMode", "PromptRenderer",
    "PromptSampler", "PromptSource", "Record", "RecordReport", "SamplerState", "VERIFIERS", "VOCAB_SIZE",
    "Verifier", "build_char_tokenizer", "build_source", "domain_verifier", "exact_match", "generate",
    "get_domain", "get_verifier", "hf_source", "jsonl_source", "normalize", "register_domain",
    "synthetic_source",
]
