"""Rollout and scoring engines behind one interface (engine.py): embedded (in-process HF) and SGLang."""
