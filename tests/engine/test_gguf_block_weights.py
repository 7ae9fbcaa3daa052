"""The embedded SmolLM2 GGUF is Q4_1 (layers) and Q8_0 (embedding = tied LM head): its bf16
decode projections stream those blocks (Linear.use_gguf). The bf16 values multiplied are the loader's bf16 dequantization bit for bit,
so greedy outputs equal those of the same engine without the 4-bit blocks."""
import dataclasses

import pytest

from opdisagg_rt import ops
from opdisagg_rt.engine import Engine
from opdisagg_rt.sampling import SamplingParams


@pytest.mark.skipif(not ops.amx_available(), reason="CPU/OS without AMX-BF16")
def test_q4_1_streaming_gives_the_same_tokens(smollm2):
    # 7 Q4_1 matrices per layer, and the Q8_0 embedding (tied LM head)
    kinds = [kind for kind, _ in smollm2.gguf_blocks.values()]
    assert kinds.count("q4_1") == 7 * smollm2.config.num_hidden_layers and kinds.count("q8_0") == 1
    dense_only = dataclasses.replace(smollm2, gguf_blocks={})
    prompts = ["The capital of France is", "def fibonacci(n):", "1, 2, 3, 4,"]
    params = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    outputs = []
    for loaded in (smollm2, dense_only):
        engine = Engine(loaded, dtype="bfloat16", max_model_len=256)
        streamed = [lin for op in engine.runner.ops for lin in vars(op).values()
                    if getattr(lin, "amx_gguf", None) is not None]
        assert len(streamed) == (4 * smollm2.config.num_hidden_layers + 1 if loaded is smollm2 else 0)
        outputs.append([o.token_ids for o in engine.generate(prompts, params, use_tqdm=False)])
    assert outputs[0] == outputs[1]
