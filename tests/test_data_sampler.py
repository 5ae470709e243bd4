"""PromptSampler: every epoch a permutation, and a resumed sampler draws exactly the same prompts."""

import json
import os
import subprocess
import sys

import pytest
import torch

from mopd.data.sampler import PromptSampler
from mopd.errors import DataError
from mopd.types import Prompt

SOURCE = [Prompt(index=i, ids=torch.tensor([1, 4 + i % 10]), text=f"p{i}", domain="d") for i in range(23)]


def draw(sampler, batches):
    return [[p.index for p in next(sampler)] for _ in range(batches)]


def test_each_epoch_visits_every_prompt_once_and_batches_cross_epochs_full():
    s = PromptSampler(SOURCE, batch_size=5, seed=0)
    flat = [i for b in draw(s, 23) for i in b]  # 115 prompts = exactly 5 epochs
    assert all(len(b) == 5 for b in draw(PromptSampler(SOURCE, 5, 0), 10))
    for e in range(5):
        assert sorted(flat[23 * e:23 * (e + 1)]) == list(range(23))
    assert flat[:23] != flat[23:46]  # a new order each epoch
    assert s.state_dict() == {"epoch": 4, "position": 23, "seed": 0, "num_prompts": 23}


def test_resuming_from_a_state_dict_reproduces_the_uninterrupted_sequence():
    # 23 prompts in batches of 5: stop 4 ends mid-epoch 0, stop 5 crosses into epoch 1; batches of 23
    # stop exactly at the end of an epoch (position 23).
    for batch_size, stop in ((5, 0), (5, 3), (5, 4), (5, 5), (5, 9), (23, 1), (23, 2)):
        full = draw(PromptSampler(SOURCE, batch_size, seed=42), 14)
        first = PromptSampler(SOURCE, batch_size, seed=42)
        head = draw(first, stop)
        state = json.loads(json.dumps(first.state_dict()))  # survives a checkpoint's serialisation
        resumed = PromptSampler(SOURCE, batch_size, seed=42)
        resumed.load_state_dict(state)
        assert head + draw(resumed, 14 - stop) == full, (batch_size, stop)


def test_order_depends_on_the_seed_and_shuffle_false_is_sequential():
    assert draw(PromptSampler(SOURCE, 4, 1), 5) == draw(PromptSampler(SOURCE, 4, 1), 5)
    assert draw(PromptSampler(SOURCE, 4, 1), 5) != draw(PromptSampler(SOURCE, 4, 2), 5)
    assert draw(PromptSampler(SOURCE, 10, 1, shuffle=False), 3) == [
        list(range(10)), list(range(10, 20)), [20, 21, 22, 0, 1, 2, 3, 4, 5, 6]]


def test_a_state_from_another_source_or_seed_is_refused_with_both_sizes_named():
    state = PromptSampler(SOURCE, 4, 1).state_dict()
    with pytest.raises(DataError, match="saved for 23 prompts with seed 1; this sampler has 22 prompts with seed 1"):
        PromptSampler(SOURCE[:22], 4, 1).load_state_dict(state)
    with pytest.raises(DataError, match="saved for 23 prompts with seed 1; this sampler has 23 prompts with seed 9"):
        PromptSampler(SOURCE, 4, 9).load_state_dict(state)
    with pytest.raises(DataError, match=r"sampler state is missing \['position'\]"):
        PromptSampler(SOURCE, 4, 1).load_state_dict({"epoch": 0, "seed": 1, "num_prompts": 23})
    with pytest.raises(DataError, match="empty"):
        PromptSampler([], 4, 1)
    with pytest.raises(DataError, match="batch_size must be positive, got 0"):
        PromptSampler(SOURCE, 0, 1)


def test_the_order_is_the_same_in_a_fresh_process_with_another_hash_seed():
    code = ("import json, torch; from mopd.data.sampler import PromptSampler; from mopd.types import Prompt; "
            "src = [Prompt(index=i, ids=torch.tensor([1]), text='', domain='d') for i in range(23)]; "
            "s = PromptSampler(src, 5, 42); print(json.dumps([[p.index for p in next(s)] for _ in range(9)]))")
    env = {**os.environ, "PYTHONHASHSEED": "999", "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120, check=True)
    assert json.loads(out.stdout) == draw(PromptSampler(SOURCE, 5, 42), 9)
