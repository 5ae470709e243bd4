"""Prompt data. Import from the modules (this package imports nothing, so that light users such as
``mopd.data.synthetic`` do not pay for torch and transformers):

- ``tokenizer``: ``load_run_tokenizer(name, model)``, ``data.tokenizer`` checked against the student model, and
  ``build_char_tokenizer()``, the offline character tokenizer of the demo;
- ``synthetic``: registered domains (``reverse``, ``caesar``, ``addition``, ``addition3``, ``sort``),
  ``generate(domain, num, split, seed)``, PI text, ``domain_verifier(domain)``;
- ``verifiers``: ``verifier(response, reference) -> 1.0 | 0.0`` by name;
- ``chat``: ``render_chat(tokenizer, messages)``, the one chat-template renderer, and PI placement;
- ``identity``: name-question paraphrases for the identity-rule OPSD example;
- ``records``: validation of JSONL lines / dataset rows and the bad-record report;
- ``sources``: ``build_source(DataConfig, tokenizer, ...) -> PromptSource`` (synthetic, JSONL, HF datasets);
- ``sampler``: ``PromptSampler(source, batch_size, seed)``, deterministic and resumable;
- ``calibrate``: ``python -m mopd.data.calibrate DOMAIN...``, how fast a tiny Llama learns a domain.
"""
