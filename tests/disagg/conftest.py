import pytest

from opdisagg_rt.models.loader import load_model


@pytest.fixture(scope="session")
def smollm2():
    """The real default model, loaded once per test session (float32 weights)."""
    return load_model(None)


ATTN_REST = {"stages": {
    "rest": {"device": "cpu", "threads": 1, "ops": ["embed", "layers.*.attn_norm", "layers.*.qkv_proj",
                                                     "layers.*.o_proj", "layers.*.mlp_norm", "layers.*.mlp",
                                                     "final_norm", "lm_head"]},
    "attn": {"device": "cpu", "threads": 1, "ops": ["layers.*.attn"]}}, "micro_batches": 1}


def llama_sigs(n_layers: int):
    """The tensor declarations of a Llama decoder's operations (checked against the real ops)."""
    from opdisagg_rt.disagg.graph import OpSig
    sigs = [OpSig("embed", (), ("residual",))]
    for i in range(n_layers):
        p = f"layers.{i}."
        sigs += [OpSig(p + "attn_norm", ("residual",), ("hidden",)), OpSig(p + "qkv_proj", ("hidden",), ("q", "k", "v")),
                 OpSig(p + "attn", ("q", "k", "v"), ("attn_out",)),
                 OpSig(p + "o_proj", ("attn_out", "residual"), ("residual",)),
                 OpSig(p + "mlp_norm", ("residual",), ("hidden",)), OpSig(p + "mlp", ("hidden", "residual"), ("residual",))]
    return sigs + [OpSig("final_norm", ("residual",), ("hidden",)), OpSig("lm_head", ("hidden",), ("logits",))]
