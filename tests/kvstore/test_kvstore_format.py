"""Entry format and keys: round trips, every corruption is detected, keys are stable and salted."""
import subprocess
import sys

import pytest
import torch

from opdisagg_rt.kvstore.format import CorruptEntry, decode, encode
from opdisagg_rt.kvstore.keys import KeySpace

KEY, FIELDS, TOKS = b"k" * 16, "fp|bfloat16|v1|attn2|c4", [5, 6, 7, 8]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_round_trip(dtype):
    t = torch.randn(2, 2, 4, 3, 5).to(dtype)
    blob = encode(KEY, FIELDS, TOKS, t)
    out = decode(bytes(blob), KEY, FIELDS, TOKS)
    assert out.dtype == dtype and torch.equal(out, t)


def test_every_corruption_is_a_miss():
    blob = bytes(encode(KEY, FIELDS, TOKS, torch.randn(2, 2, 4, 3, 5)))
    for pos in (0, 10, len(blob) // 2, len(blob) - 1):  # header, key area, tokens/payload, last byte
        bad = bytearray(blob)
        bad[pos] ^= 0x40
        with pytest.raises(CorruptEntry):
            decode(bytes(bad), KEY, FIELDS, TOKS)
    for n in (0, 3, 30, len(blob) - 1):
        with pytest.raises(CorruptEntry):
            decode(blob[:n], KEY, FIELDS, TOKS)
    with pytest.raises(CorruptEntry, match="key"):
        decode(blob, b"x" * 16, FIELDS, TOKS)
    with pytest.raises(CorruptEntry, match="fields"):
        decode(blob, KEY, "otherfp|bfloat16|v1|attn2|c4", TOKS)
    with pytest.raises(CorruptEntry, match="token"):
        decode(blob, KEY, FIELDS, [5, 6, 7, 9])


def test_no_pickle_in_the_format():
    import opdisagg_rt.kvstore as kvs
    import inspect
    for mod in ("format", "store", "connector", "memory", "disk", "redis_tier", "keys"):
        src = inspect.getsource(__import__(f"opdisagg_rt.kvstore.{mod}", fromlist=["x"]))
        assert "pickle" not in src.replace("No pickle", "").replace("no pickle", ""), mod
    assert kvs.encode is encode


def _ks(**kw):
    base = dict(model_fingerprint="fp", dtype="bfloat16", layer_group="attn30-x", chunk_size=4)
    return KeySpace(**{**base, **kw})


def test_keys_chain_and_commit_to_everything():
    toks = list(range(100, 113))  # 3 full chunks of 4 and a partial one
    keys = _ks().chunk_keys(toks)
    assert len(keys) == 3 and len(set(keys)) == 3
    assert _ks().chunk_keys(toks[:8]) == keys[:2]  # a prefix has the same keys
    assert _ks().chunk_keys(toks, 2, keys[1]) == keys[2:]  # extending a chain
    other = toks[:]
    other[0] += 1  # changing chunk 0 changes every later key (chained)
    assert not set(_ks().chunk_keys(other)) & set(keys)
    for kw in [dict(model_fingerprint="fp2"), dict(dtype="float32"), dict(layer_group="attn15-y"),
               dict(salt="tenant-a"), dict(salt=""), dict(layout_version=2)]:
        assert not set(_ks(**kw).chunk_keys(toks)) & set(keys), kw
    assert _ks(salt="a").chunk_keys(toks) != _ks(salt="b").chunk_keys(toks)


def test_keys_are_stable_across_processes():
    code = ("from opdisagg_rt.kvstore.keys import KeySpace;"
            "print(KeySpace('fp','bfloat16','g',4,'s').chunk_keys(list(range(8)))[1].hex())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={"PYTHONHASHSEED": "123", "PATH": ""}).stdout.strip()
    assert out == KeySpace("fp", "bfloat16", "g", 4, "s").chunk_keys(list(range(8)))[1].hex()


def test_request_cache_salt_keys_the_chain():
    toks = list(range(100, 112))
    plain = _ks().chunk_keys(toks)
    assert _ks().chunk_keys(toks, cache_salt=None) == plain  # no request salt: keys as before
    a, b = _ks().chunk_keys(toks, cache_salt="a"), _ks().chunk_keys(toks, cache_salt="b")
    assert a == _ks().chunk_keys(toks, cache_salt="a")
    assert len({a[0], b[0], plain[0]}) == 3 and a[2] != b[2]
    # The engine-wide salt and the request salt are distinct fields: neither stands in for the other.
    assert _ks(salt="a").chunk_keys(toks) != a
    assert _ks(salt="a").chunk_keys(toks, cache_salt="b") not in (a, b, _ks(salt="b").chunk_keys(toks, cache_salt="a"))
    assert _ks().chunk_keys(toks, 1, a[0], cache_salt="ignored") == a[1:]  # extending a salted chain
