"""Decode throughput and weight memory of the cost model: exactly N new tokens, one forward per token (the first
is the prefill), on a physically pruned model with different head counts per layer; weight bytes counted apart."""

import math

import torch

from inferno.cost import decode_tokens_per_s, weight_memory_mb
from inferno.models.hf import tiny_causal_lm
from inferno.pruning.llm.surgery import BlockDecision, apply

torch.set_num_threads(1)


def test_decode_runs_one_forward_per_new_token_on_a_pruned_model():
    model = tiny_causal_lm("llama", seed=0, layers=3)
    apply(model, {0: BlockDecision(heads=[1], neurons=[0, 5]), 2: BlockDecision(neurons=list(range(64)))})
    calls = []
    model.model.register_forward_pre_hook(lambda mod, args, kwargs: calls.append(kwargs["input_ids"].shape[1]),
                                          with_kwargs=True)
    ids = torch.randint(3, 256, (1, 10), generator=torch.Generator().manual_seed(0))
    rate = decode_tokens_per_s(model, ids, new_tokens=7, warmup=1, repeats=2)
    assert math.isfinite(rate) and rate > 0
    # 3 generate calls (1 warm-up + 2 timed), each: the 10-token prefill, then 6 single-token steps with the cache
    assert calls == ([10] + [1] * 6) * 3


def test_weight_memory_counts_every_parameter_and_buffer():
    model = tiny_causal_lm("opt", seed=0).to(torch.float16)
    expect = sum(p.numel() * 2 for p in model.parameters()) + sum(b.numel() * b.element_size() for b in model.buffers())
    assert weight_memory_mb(model) * 2**20 == expect
