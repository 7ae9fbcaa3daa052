import math

import pytest
import torch

from opdisagg_rt.sampling import Sampler, SamplingParams, make_generator

V = 64


def probs_logits(probs: list[float], vocab: int = 8) -> torch.Tensor:
    """Logits whose softmax is `probs` on the first tokens and ~0 elsewhere."""
    x = torch.full((vocab,), -1e4)
    x[: len(probs)] = torch.tensor(probs).log()
    return x


def sample_many(row: torch.Tensor, params: SamplingParams, n: int = 4000, seed: int = 0) -> torch.Tensor:
    """Sample one row n times in a single batch; returns the counts per token."""
    out = Sampler(seed).sample(row.expand(n, -1).contiguous(), [params] * n, [[]] * n, [[]] * n).token_ids
    return torch.bincount(torch.tensor(out), minlength=row.numel())


def test_greedy_is_argmax_fast_path_and_bf16():
    logits = torch.randn(32, V)
    params = [SamplingParams(temperature=0)] * 32
    out = Sampler().sample(logits, params)
    assert out.token_ids == logits.argmax(-1).tolist() and out.logprobs is None
    bf = logits.bfloat16()
    assert Sampler().sample(bf, params).token_ids == bf.argmax(-1).tolist()


def test_top_k_1_is_greedy_and_mixed_batch():
    logits = torch.randn(6, V)
    params = [SamplingParams(top_k=1), SamplingParams(temperature=0), SamplingParams(temperature=0.7, top_k=1)] * 2
    assert Sampler().sample(logits, params).token_ids == logits.argmax(-1).tolist()


def test_logits_not_modified():
    logits = torch.randn(3, V)
    ref = logits.clone()
    params = [SamplingParams(temperature=0.5, top_p=0.9, top_k=5, min_p=0.1, repetition_penalty=1.3,
                             frequency_penalty=0.5, min_tokens=2)] * 3
    Sampler().sample(logits, params, [[1, 2]] * 3, [[3]] * 3, eos_token_ids=[0])
    assert torch.equal(logits, ref)


def test_seeded_reproducible_across_runs_and_batch_positions():
    torch.manual_seed(0)
    steps = [torch.randn(1, V) for _ in range(20)]
    p = SamplingParams(temperature=0.9, seed=1234)

    def run_alone() -> list[int]:
        g, s = make_generator(p.seed), Sampler(seed=7)
        return [s.sample(x, [p], generators=[g]).token_ids[0] for x in steps]

    def run_batched(pos: int, sampler_seed: int) -> list[int]:
        # Batch-mates: unseeded, another seed, top-p (sort branch), greedy.
        others = [SamplingParams(temperature=1.0), SamplingParams(seed=99, top_k=3),
                  SamplingParams(top_p=0.5), SamplingParams(temperature=0)]
        params = others[:pos] + [p] + others[pos:]
        gens = [make_generator(q.seed) if q.seed is not None else None for q in params]
        s, toks = Sampler(seed=sampler_seed), []
        for x in steps:
            batch = torch.randn(len(params), V)
            batch[pos] = x[0]
            toks.append(s.sample(batch, params, generators=gens).token_ids[pos])
        return toks

    alone = run_alone()
    assert alone == run_alone()
    assert len(set(alone)) > 3  # actually random, not degenerate
    for pos, sseed in [(0, 1), (2, 2), (4, 3)]:
        assert run_batched(pos, sseed) == alone
    other = [Sampler().sample(x, [p], generators=[make_generator(4321)]).token_ids[0] for x in steps]
    assert other != alone


def test_top_k_mask_and_distribution():
    row = probs_logits([0.4, 0.3, 0.2, 0.1])
    counts = sample_many(row, SamplingParams(top_k=2))
    assert counts[2:].sum() == 0
    assert abs(counts[0] / counts.sum() - 0.4 / 0.7) < 0.04


def test_top_p_mask_and_distribution():
    row = probs_logits([0.5, 0.3, 0.15, 0.05])
    counts = sample_many(row, SamplingParams(top_p=0.75))  # {0, 1} reach 0.8 >= 0.75
    assert counts[2:].sum() == 0 and counts[1] > 0
    assert abs(counts[0] / counts.sum() - 0.5 / 0.8) < 0.04
    counts = sample_many(row, SamplingParams(top_p=0.9))  # {0, 1, 2}
    assert counts[3:].sum() == 0 and counts[2] > 0


def test_min_p_mask():
    row = probs_logits([0.5, 0.3, 0.15, 0.05])
    counts = sample_many(row, SamplingParams(min_p=0.35))  # threshold 0.175
    assert counts[2:].sum() == 0 and counts[1] > 0


def test_min_p_before_top_p_vllm_v1_order():
    # min_p drops token 3 first; top_p=0.75 on the renormalized [.44, .33, .22] keeps only {0, 1}.
    # (top_p before min_p would keep {0, 1, 2}.)
    row = probs_logits([0.4, 0.3, 0.2, 0.1])
    counts = sample_many(row, SamplingParams(min_p=0.3, top_p=0.75))
    assert counts[2:].sum() == 0 and counts[1] > 0


def test_top_k_and_top_p_together_and_branch_independence():
    row = probs_logits([0.3, 0.25, 0.2, 0.15, 0.1])
    counts = sample_many(row, SamplingParams(top_k=3, top_p=0.6))  # top-3 renorm [.4,.33,.27]: {0,1}
    assert counts[2:].sum() == 0 and counts[1] > 0
    counts = sample_many(row, SamplingParams(top_k=3))  # topk branch
    assert counts[3:].sum() == 0 and counts[2] > 0


def test_temperature_distribution():
    row = torch.tensor([2.0, 1.0, 0.0, -1.0])
    counts = sample_many(row, SamplingParams(temperature=2.0), n=8000)
    expected = torch.softmax(row / 2.0, -1)
    assert torch.allclose(counts / counts.sum(), expected, atol=0.03)


def naive_penalize(logits, params, prompts, outputs):
    x = logits.clone()
    for i, p in enumerate(params):
        for t in set(prompts[i]) | set(outputs[i]):
            x[i, t] = x[i, t] / p.repetition_penalty if x[i, t] > 0 else x[i, t] * p.repetition_penalty
        for t in set(outputs[i]):
            x[i, t] -= p.frequency_penalty * outputs[i].count(t) + p.presence_penalty
    return x


def test_penalties_vs_naive():
    torch.manual_seed(1)
    logits = torch.randn(4, V) * 3
    params = [SamplingParams(repetition_penalty=1.5, presence_penalty=0.5, frequency_penalty=0.3),
              SamplingParams(),
              SamplingParams(repetition_penalty=0.7),
              SamplingParams(presence_penalty=-1.0, frequency_penalty=1.2)]
    prompts = [[1, 2, 3, 3], [4, 5], [6, 7, 1], []]
    outputs = [[3, 8, 8, 9], [5], [], [10, 10, 10, 11]]
    got = Sampler._penalize(logits.clone(), params, prompts, outputs)
    assert torch.allclose(got, naive_penalize(logits, params, prompts, outputs), atol=1e-6)
    # End to end with greedy rows: argmax of the penalized logits.
    gp = [SamplingParams(temperature=0, repetition_penalty=q.repetition_penalty,
                         presence_penalty=q.presence_penalty, frequency_penalty=q.frequency_penalty) for q in params]
    out = Sampler().sample(logits, gp, prompts, outputs)
    assert out.token_ids == got.argmax(-1).tolist()


def test_repetition_penalty_flips_greedy_choice():
    logits = torch.tensor([[3.0, 2.5, -1.0, 0.0]])
    p = SamplingParams(temperature=0, repetition_penalty=2.0)
    assert Sampler().sample(logits, [p], [[0]], [[]]).token_ids == [1]  # 3/2 < 2.5
    assert Sampler().sample(logits, [p], [[]], [[]]).token_ids == [0]


def test_min_tokens_masks_eos_and_stop_tokens():
    logits = torch.tensor([[5.0, 4.0, 3.0, 0.0]] * 3)
    eos = [0]
    params = [SamplingParams(temperature=0, min_tokens=2, stop_token_ids=[1]),
              SamplingParams(temperature=0, min_tokens=2, ignore_eos=True),
              SamplingParams(temperature=0, min_tokens=1)]
    out = Sampler().sample(logits, params, [[]] * 3, [[7], [7], [7]], eos_token_ids=eos)
    assert out.token_ids == [2, 0, 0]  # row 0 masked, row 1 ignore_eos: eos not masked, row 2 done
    out = Sampler().sample(logits, params, [[]] * 3, [[7, 7]] * 3, eos_token_ids=eos)
    assert out.token_ids == [0, 0, 0]
    # Also in the random path.
    counts = sample_many(torch.tensor([5.0, 4.0, 3.0, 0.0]), SamplingParams(min_tokens=3, stop_token_ids=[1]), n=500)
    assert counts[1] == 0


def test_logprobs_are_raw_log_softmax():
    torch.manual_seed(2)
    logits = torch.randn(4, V)
    params = [SamplingParams(temperature=0.5, top_k=3, logprobs=5, repetition_penalty=1.2),
              SamplingParams(),
              SamplingParams(temperature=0, logprobs=0),
              SamplingParams(temperature=0, logprobs=2)]
    out = Sampler().sample(logits, params, [[1]] * 4, [[2]] * 4)
    ref = logits.log_softmax(-1)
    assert out.logprobs[1] is None
    for i in (0, 2, 3):
        entry, k = out.logprobs[i], params[i].logprobs
        assert len(entry) == 1 + k and entry[0][0] == out.token_ids[i]
        for tok, lp in entry:
            assert math.isclose(lp, ref[i, tok].item(), rel_tol=1e-5, abs_tol=1e-6)
        assert [t for t, _ in entry[1:]] == ref[i].topk(k).indices.tolist() if k else True
    # Fast path with logprobs.
    fast = Sampler().sample(logits, [SamplingParams(temperature=0, logprobs=1)] * 4)
    assert fast.token_ids == logits.argmax(-1).tolist()
    assert all(e[0] == e[1] for e in fast.logprobs)


@pytest.mark.parametrize("kwargs, field", [
    ({"temperature": -0.1}, "temperature"),
    ({"temperature": float("nan")}, "temperature"),
    ({"top_p": 0.0}, "top_p"),
    ({"top_p": 1.5}, "top_p"),
    ({"top_k": -2}, "top_k"),
    ({"top_k": 2.5}, "top_k"),
    ({"min_p": 1.1}, "min_p"),
    ({"repetition_penalty": 0.0}, "repetition_penalty"),
    ({"presence_penalty": 2.5}, "presence_penalty"),
    ({"frequency_penalty": -3}, "frequency_penalty"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"min_tokens": -1}, "min_tokens"),
    ({"min_tokens": 5, "max_tokens": 4}, "min_tokens"),
    ({"logprobs": 21}, "logprobs"),
    ({"logprobs": -1}, "logprobs"),
    ({"seed": 1.5}, "seed"),
    ({"seed": "1"}, "seed"),
    ({"stop": ["ok", ""]}, "stop"),
    ({"stop_token_ids": [-1]}, "stop_token_ids"),
])
def test_validation_names_field(kwargs, field):
    with pytest.raises(ValueError, match=rf"SamplingParams\.{field} must be"):
        SamplingParams(**kwargs)


def test_normalization():
    p = SamplingParams(stop="x", top_k=-1, max_tokens=None)
    assert p.stop == ["x"] and p.stop_token_ids == [] and p.top_k == 0
    assert SamplingParams(temperature=1e-6).greedy


@pytest.mark.parametrize("shape", [(3, 1000), (4, 49152), (2, 100)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_block_argmax_matches_torch(shape, dtype):
    from opdisagg_rt.sampling import argmax
    x = torch.randn(shape).to(dtype)
    x[0, 7] = x[0, shape[1] - 1] = 100  # tie across blocks: first index wins
    x[1, 3] = x[1, 4] = 100  # tie inside a block
    assert argmax(x).tolist() == x.argmax(-1).tolist() and argmax(x)[0] == 7


def naive_top_p(x: torch.Tensor, top_p: float) -> torch.Tensor:
    srt, idx = x.sort(descending=True)
    p = srt.softmax(-1)
    keep = (p.cumsum(-1) - p) < top_p
    return torch.full_like(x, float("-inf")).scatter(0, idx[keep], srt[keep])


def test_top_p_candidates_and_full_sort_fallback():
    from opdisagg_rt.sampling import _top_p
    torch.manual_seed(3)
    v = 5000
    x = torch.stack([torch.randn(v) * 8, torch.randn(v) * 0.01, torch.randn(v) * 2])  # row 1: flat
    tp = torch.tensor([[0.9], [0.6], [0.95]])
    out = _top_p((x - x.amax(-1, keepdim=True)).exp(), tp)  # takes unnormalized probabilities
    for i in range(3):
        ref = naive_top_p(x[i], tp[i].item())
        assert torch.equal(out[i] > 0, ref.isfinite()), i
    assert (out[1] > 0).sum() > 1024  # the flat row needed the fallback


def test_sampling_distribution_large_vocab():
    torch.manual_seed(4)
    v, n = 1000, 20000  # v not a multiple of the block: padded path
    row = torch.randn(v) * 2
    counts = sample_many(row, SamplingParams(), n=n)
    tv = 0.5 * (counts / n - row.softmax(-1)).abs().sum()
    assert tv < 0.06, tv
    counts = sample_many(row, SamplingParams(top_k=5, temperature=3.0), n=2000)
    assert set(counts.nonzero().squeeze(1).tolist()) <= set(row.topk(5).indices.tolist())
