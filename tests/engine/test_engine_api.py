"""The Engine API on the real model: requests, streaming, sampling through the engine, bad input."""
from __future__ import annotations

import pytest

from opdisagg_rt.engine import Engine
from opdisagg_rt.sampling import SamplingParams


@pytest.fixture(scope="module")
def engine(smollm2):
    return Engine(smollm2, dtype="bfloat16", kv_cache_memory=64 << 20, max_model_len=256)


def test_prompt_forms(engine):
    chat = [{"role": "user", "content": "Say hi."}]
    text = engine.tokenizer.apply_chat_template(chat, add_generation_prompt=True)
    ids = engine.tokenize(text)
    assert engine.tokenize(chat) == engine.tokenizer.encode(text, add_special_tokens=False)
    outs = engine.generate([text, ids, chat], SamplingParams(temperature=0, max_tokens=6), use_tqdm=False)
    assert [o.request_id for o in outs] == sorted((o.request_id for o in outs), key=int)
    assert all(len(o.token_ids) <= 6 and o.finished for o in outs)
    assert outs[0].prompt == text and outs[1].prompt is None


def test_output_fields_and_metrics(engine):
    o = engine.generate("Hello, my name is", SamplingParams(temperature=0, max_tokens=5, ignore_eos=True,
                                                            logprobs=3), use_tqdm=False)[0]
    assert o.finish_reason == "length" and len(o.token_ids) == 5
    assert o.text == engine.tokenizer.decode(o.token_ids)
    assert len(o.logprobs) == 5 and all(t in lp and len(lp) >= 3 for t, lp in zip(o.token_ids, o.logprobs))
    m = o.metrics
    assert m.num_prompt_tokens == len(o.prompt_token_ids) and m.num_generated_tokens == 5
    assert 0 < m.ttft and m.tpot > 0 and m.first_token_time <= m.finished_time


def test_seeded_sampling_is_reproducible_in_any_batch(engine):
    p = SamplingParams(temperature=1.0, top_p=0.9, seed=1234, max_tokens=12, ignore_eos=True)
    alone = engine.generate("Once upon a time", p, use_tqdm=False)[0].token_ids
    others = SamplingParams(temperature=0.8, max_tokens=8)
    batched = engine.generate(["A list of colors:", "Once upon a time", "1, 2, 3,"], [others, p, others],
                              use_tqdm=False)[1].token_ids
    assert alone == batched


def test_stop_string_and_stop_token(engine):
    base = engine.generate("1, 2, 3, 4, 5,", SamplingParams(temperature=0, max_tokens=16, ignore_eos=True),
                           use_tqdm=False)[0]
    stop = base.text[4:7]
    o = engine.generate("1, 2, 3, 4, 5,", SamplingParams(temperature=0, max_tokens=16, stop=[stop]),
                        use_tqdm=False)[0]
    assert o.finish_reason == "stop" and o.stop_reason == stop
    assert stop not in o.text and base.text.startswith(o.text)
    tok = base.token_ids[3]
    o = engine.generate("1, 2, 3, 4, 5,", SamplingParams(temperature=0, max_tokens=16, stop_token_ids=[tok]),
                        use_tqdm=False)[0]
    assert o.finish_reason == "stop" and o.stop_reason == tok and o.token_ids[-1] == tok


def test_stream_deltas_concatenate_to_text(engine):
    deltas = list(engine.stream("The weather today is", SamplingParams(temperature=0, max_tokens=10)))
    assert deltas[-1].finished and not any(d.finished for d in deltas[:-1])
    assert "".join(d.text_delta for d in deltas) == deltas[-1].text


def test_step_api_and_abort(engine):
    a = engine.add_request("Tell me a long story.", SamplingParams(temperature=0, max_tokens=50, ignore_eos=True))
    b = engine.add_request("Count: 1, 2,", SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
    seen = {}
    engine.step()
    assert engine.abort(a) and not engine.abort(a)
    while engine.has_unfinished_requests():
        for o in engine.step():
            seen[o.request_id] = o
    assert a not in seen and seen[b].finished and len(seen[b].token_ids) == 4


@pytest.mark.parametrize("prompt, params, match", [
    ("", None, "prompt is empty"),
    ([], None, "prompt is empty"),
    ("x " * 300, None, "max_model_len=256"),
    ([10**9], None, "outside the vocabulary"),
    (3.5, None, "prompt must be text"),
    ("hi", "greedy", "sampling_params must be a SamplingParams"),
])
def test_bad_requests_raise_before_running(engine, prompt, params, match):
    with pytest.raises(ValueError, match=match):
        engine.add_request(prompt, params)
    assert not engine.has_unfinished_requests()


def test_bad_prompt_in_a_batch_starts_nothing(engine):
    with pytest.raises(ValueError, match="prompt is empty"):
        engine.generate(["fine", ""], SamplingParams(max_tokens=2), use_tqdm=False)
    assert not engine.has_unfinished_requests()


@pytest.mark.parametrize("kwargs, match", [
    (dict(temperature=-1), "temperature"),
    (dict(top_p=0), "top_p"),
    (dict(max_tokens=0), "max_tokens"),
    (dict(logprobs=-2), "logprobs"),
])
def test_invalid_sampling_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SamplingParams(**kwargs)


def test_bad_engine_config(smollm2):
    with pytest.raises(ValueError, match="dtype='float16'"):
        Engine(smollm2, dtype="float16")
    with pytest.raises(ValueError, match="max_model_len=100000 exceeds"):
        Engine(smollm2, max_model_len=100000)
    with pytest.raises(ValueError, match="kv_cache_memory"):
        Engine(smollm2, kv_cache_memory=-1)


def test_failed_step_fails_its_requests_not_the_engine(engine, monkeypatch):
    rid = engine.add_request("hello", SamplingParams(max_tokens=3))
    original = engine.runner.execute
    monkeypatch.setattr(engine.runner, "execute", lambda batch: (_ for _ in ()).throw(RuntimeError("boom")))
    outs = engine.step()
    assert outs[0].request_id == rid and outs[0].finish_reason == "error" and "boom" in outs[0].error
    monkeypatch.setattr(engine.runner, "execute", original)
    assert not engine.has_unfinished_requests()
    assert engine.generate("hello", SamplingParams(max_tokens=2), use_tqdm=False)[0].finished


def test_persistent_loop_serves_concurrent_callers(engine):
    import threading

    from opdisagg_rt.scheduler.loop import EngineLoop
    prompts = ["Paris is", "The sum of 2 and 3 is", "My favourite color is"]
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    expected = [o.token_ids for o in engine.generate(prompts, params, use_tqdm=False)]
    loop = EngineLoop(engine)
    try:
        results = [None] * 3

        def client(i):
            results[i] = loop.submit(prompts[i], params).result().token_ids

        threads = [threading.Thread(target=client, args=(i,)) for i in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert results == expected
        with pytest.raises(ValueError, match="prompt is empty"):
            loop.submit("", params)
        long = loop.submit("Tell me everything.", SamplingParams(max_tokens=200, ignore_eos=True))
        loop.abort(long.request_id)
        outs = list(long)  # the stream ends instead of hanging
        assert len(outs) < 200 and not any(o.finish_reason == "length" for o in outs)
    finally:
        loop.shutdown()
    assert not engine.has_unfinished_requests()


def test_startup_heap_is_frozen_out_of_gc(engine):
    # The engine's long-lived startup objects sit in the permanent generation, so the
    # collections a decode loop triggers do not rescan them every time.
    import gc
    assert gc.get_freeze_count() > 10_000
