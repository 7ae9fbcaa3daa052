import pytest

from opdisagg_rt.detokenizer import IncrementalDetokenizer, RequestStream, check_stop, find_stop
from opdisagg_rt.sampling import SamplingParams

EOS = 256


class ByteTokenizer:
    """ids 0..255 are bytes, 256 is <eos> (special), 257+ are multi-byte pieces."""

    pieces = {257: b"hello", 258: b" world", 259: b"STOP"}

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        out = b""
        for i in ids:
            if i == EOS:
                out += b"" if skip_special_tokens else b"<eos>"
            else:
                out += bytes([i]) if i < 256 else self.pieces[i]
        return out.decode("utf-8", errors="replace")

    def encode(self, s: str) -> list[int]:
        return list(s.encode())


class SentencePieceLike:
    """Decoding strips the leading space of the first piece, as Llama/SentencePiece decoders do."""

    vocab = ["<s>", "▁Hello", "▁world", "!", "▁how", "▁are", "▁you"]

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        s = "".join(self.vocab[i] for i in ids if not (skip_special_tokens and i == 0)).replace("▁", " ")
        return s[1:] if s.startswith(" ") else s


def stream(detok: IncrementalDetokenizer, ids: list[int]) -> list[str]:
    return [detok.push(i) for i in ids]


def test_multibyte_chars_split_across_tokens():
    tok = ByteTokenizer()
    text = "a😀b中文é"
    deltas = stream(IncrementalDetokenizer(tok, tok.encode("hi "), True), tok.encode(text))
    assert "".join(deltas) == text
    assert all("\ufffd" not in d for d in deltas)
    assert deltas[:5] == ["a", "", "", "", "😀"]


def test_sentencepiece_leading_spaces_kept():
    tok = SentencePieceLike()
    d = IncrementalDetokenizer(tok, [0, 1], True)  # prompt "<s> Hello"
    assert stream(d, [2, 3, 4, 5, 6]) == [" world", "!", " how", " are", " you"]
    assert d.text == " world! how are you"
    assert stream(IncrementalDetokenizer(tok, [], True), [1, 2]) == ["Hello", " world"]


def test_skip_special_tokens():
    tok = ByteTokenizer()
    assert "".join(stream(IncrementalDetokenizer(tok, [104], True), [257, EOS])) == "hello"
    assert "".join(stream(IncrementalDetokenizer(tok, [104], False), [257, EOS])) == "hello<eos>"


def test_real_byte_level_bpe():
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|eos|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["hello world", "the quick brown fox", "hello there"] * 10, trainer)
    prompt = tok.encode("hello there").ids
    text = " 😀 wörld 中文 👍🏽 the end"
    ids = tok.encode(text).ids
    assert any("\ufffd" in tok.decode(ids[:i]) for i in range(1, len(ids)))  # really split
    d = IncrementalDetokenizer(tok, prompt, True)
    deltas = stream(d, ids + [tok.token_to_id("<|eos|>")])
    assert "".join(deltas) == text == d.text
    assert all("\ufffd" not in x for x in deltas)


def test_find_stop_spanning_deltas_and_include():
    assert find_stop("hello wor", 3, ["world"], False) is None
    assert find_stop("hello world!", 3, ["world"], False) == (6, "world")
    assert find_stop("hello world!", 3, ["world"], True) == (11, "world")
    assert find_stop("hello world!", 1, ["world"], False) is None  # ended before the new chars
    assert find_stop("a STOP b END", 12, ["END", "STOP"], False) == (2, "STOP")  # earliest wins
    assert find_stop("abc", 0, ["abc"], False) is None


def test_check_stop_eos_ignore_eos_stop_token_length():
    p = SamplingParams(max_tokens=4, stop_token_ids=[7])
    assert check_stop([1, 2], p, [EOS]) is None
    assert check_stop([1, EOS], p, [EOS]) == ("stop", None, 0)
    assert check_stop([1, EOS], SamplingParams(ignore_eos=True), [EOS]) is None
    assert check_stop([1, 7], p, [EOS], "ab", 1) == ("stop", 7, 1)  # stop token's text dropped
    assert check_stop([1, 7], SamplingParams(stop_token_ids=[7], include_stop_str_in_output=True),
                      [EOS], "ab", 1) == ("stop", 7, 2)
    assert check_stop([1, 2, 3, 4], p, [EOS], "abcd", 1) == ("length", None, 4)
    assert check_stop([1, 2, 3, EOS], p, [EOS]).reason == "stop"  # eos on the last allowed token
    assert check_stop([1, EOS], SamplingParams(min_tokens=3), [EOS]) is None
    assert check_stop([1, 2], SamplingParams(max_tokens=None), [EOS], num_prompt_tokens=6,
                      max_model_len=8).reason == "length"
    assert check_stop([1, 2], SamplingParams(max_tokens=None), [EOS]) is None


def run(params: SamplingParams, text: str, prompt: str = "Q: ") -> tuple[RequestStream, list[str]]:
    tok = ByteTokenizer()
    rs = RequestStream(tok, tok.encode(prompt), params, eos_token_ids=[EOS])
    streamed = []
    for t in tok.encode(text) + [EOS]:
        rs.append(t)
        streamed.append(rs.pop_delta())
        if rs.finished:
            break
    return rs, streamed


def test_stream_stop_string_spanning_deltas():
    rs, streamed = run(SamplingParams(stop=["END", "zz"], max_tokens=100), "abc EN😀 ENDxyz")
    assert rs.finish_reason == "stop" and rs.stop_reason == "END"
    assert rs.text == "abc EN😀 " == "".join(streamed)
    assert rs.token_ids[-1] == ord("D")  # tokens run up to the one completing the stop string


def test_stream_never_leaks_partial_stop():
    rs, streamed = run(SamplingParams(stop=["STOP"], max_tokens=100), "go STOP")
    assert rs.text == "go " and "".join(streamed) == "go "
    assert not any("S" in s for s in streamed)


def test_stream_include_stop_str():
    rs, streamed = run(SamplingParams(stop=["END"], include_stop_str_in_output=True, max_tokens=100), "ab END cd")
    assert rs.text == "ab END" == "".join(streamed)


def test_stream_eos_max_tokens_ignore_eos_and_stop_token():
    rs, _ = run(SamplingParams(max_tokens=100), "hi")
    assert (rs.finish_reason, rs.text, rs.token_ids[-1]) == ("stop", "hi", EOS)
    rs, _ = run(SamplingParams(max_tokens=3), "hello")
    assert (rs.finish_reason, rs.text, len(rs.token_ids)) == ("length", "hel", 3)
    rs, _ = run(SamplingParams(max_tokens=5, ignore_eos=True), "hi")
    assert rs.finish_reason is None  # eos ignored, the script ran out of tokens first
    rs, _ = run(SamplingParams(max_tokens=10, stop_token_ids=[ord("!")]), "yes! no")
    assert (rs.finish_reason, rs.stop_reason, rs.text) == ("stop", ord("!"), "yes")
    rs, _ = run(SamplingParams(max_tokens=10, min_tokens=3, stop=["y"]), "yyyy")
    assert rs.text == "yyy" and rs.stop_reason == "y"


def test_stream_requires_tokenizer_for_stop_strings():
    with pytest.raises(ValueError, match="stop"):
        RequestStream(None, [1], SamplingParams(stop=["x"]))
    rs = RequestStream(None, [1], SamplingParams(max_tokens=2))
    assert rs.append(5) is None and rs.append(6) == "length" and rs.text == ""
