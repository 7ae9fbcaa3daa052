"""Tokenizer: a `tokenizers.Tokenizer` plus special tokens and the chat template.

Built from an HF `tokenizer.json` (+ tokenizer_config.json) or from a GGUF file's metadata.
The goal is token-for-token parity with transformers' tokenizer for the same files.
"""
from __future__ import annotations

import json
import os
from datetime import datetime
from typing import Any, Iterable

from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import AddedToken, Regex, decoders, pre_tokenizers, processors
from tokenizers import Tokenizer as Backend
from tokenizers.models import BPE

# llama.cpp's `tokenizer.ggml.pre` names whose split regex differs from GPT-2's (the byte-level
# default). Llama-3's regex (from its tiktoken config); other pre-tokenizers fall back to GPT-2.
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_GGUF_SPLITS = {name: _LLAMA3_SPLIT for name in ("llama3", "llama-v3", "llama-bpe", "smaug-bpe")}

_TOKEN_CONTROL, _TOKEN_USER_DEFINED = 3, 4  # llama.cpp token types


def _byte_alphabet() -> dict[int, str]:
    """GPT-2's byte -> printable character table used by byte-level BPE vocabularies.

    Printable Latin-1 bytes stand for themselves; the other 68 bytes are shifted to U+0100...
    """
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), 256)]
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def _token_text(tok: Any) -> str | None:
    """tokenizer_config.json writes special tokens as a string or as an AddedToken dict."""
    if isinstance(tok, dict):
        return tok.get("content")
    return tok


def _post_processor(bos: str | None, bos_id: int | None, eos: str | None, eos_id: int | None,
                    add_bos: bool, add_eos: bool) -> processors.TemplateProcessing:
    add_bos, add_eos = add_bos and bos_id is not None, add_eos and eos_id is not None
    single = ([f"{bos}:0"] if add_bos else []) + ["$A:0"] + ([f"{eos}:0"] if add_eos else [])
    pair = single + ([f"{bos}:1"] if add_bos else []) + ["$B:1"] + ([f"{eos}:1"] if add_eos else [])
    specials = ([(bos, bos_id)] if add_bos else []) + ([(eos, eos_id)] if add_eos else [])
    return processors.TemplateProcessing(single=single, pair=pair, special_tokens=specials)


class Tokenizer:
    def __init__(self, backend: Backend, *, bos_token: str | None = None,
                 eos_token: str | None = None, unk_token: str | None = None,
                 pad_token: str | None = None, chat_template: str | None = None,
                 extra_eos_token_ids: Iterable[int] = ()):
        self.backend = backend
        self.bos_token, self.eos_token = bos_token, eos_token
        self.unk_token, self.pad_token = unk_token, pad_token
        self.chat_template = chat_template
        self._extra_eos = [i for i in extra_eos_token_ids if i is not None]
        self._template = None  # compiled lazily: most callers never render a chat

    # ---- construction -------------------------------------------------------------------------

    @classmethod
    def from_hf_dir(cls, path: str, extra_eos_token_ids: Iterable[int] = ()) -> "Tokenizer":
        """From `tokenizer.json`, `tokenizer_config.json` and `chat_template.jinja` in `path`."""
        tj = os.path.join(path, "tokenizer.json")
        if not os.path.isfile(tj):
            raise ValueError(f"{path}: no tokenizer.json (only fast tokenizers are supported)")
        backend = Backend.from_file(tj)
        cfg_path = os.path.join(path, "tokenizer_config.json")
        cfg: dict[str, Any] = {}
        if os.path.isfile(cfg_path):
            with open(cfg_path, encoding="utf-8") as f:
                cfg = json.load(f)
        template = cfg.get("chat_template")
        if isinstance(template, list):  # named templates: [{"name": "default", "template": ...}]
            template = next((t["template"] for t in template if t.get("name") == "default"), None)
        jinja_path = os.path.join(path, "chat_template.jinja")
        if os.path.isfile(jinja_path):  # transformers 5 writes the template here
            with open(jinja_path, encoding="utf-8") as f:
                template = f.read()
        tok = cls(backend, bos_token=_token_text(cfg.get("bos_token")),
                  eos_token=_token_text(cfg.get("eos_token")),
                  unk_token=_token_text(cfg.get("unk_token")),
                  pad_token=_token_text(cfg.get("pad_token")), chat_template=template,
                  extra_eos_token_ids=extra_eos_token_ids)
        # Same rule as transformers: explicit add_bos/add_eos flags (or no post-processor at all)
        # replace tokenizer.json's post-processor; otherwise that one decides what BOS/EOS to add.
        if "add_bos_token" in cfg or "add_eos_token" in cfg or backend.post_processor is None:
            backend.post_processor = _post_processor(
                tok.bos_token, tok.bos_token_id, tok.eos_token, tok.eos_token_id,
                bool(cfg.get("add_bos_token")), bool(cfg.get("add_eos_token")))
        return tok

    @classmethod
    def from_gguf_metadata(cls, meta: dict[str, Any], source: str = "<gguf>") -> "Tokenizer":
        """From llama.cpp's `tokenizer.ggml.*` metadata (byte-level BPE, `ggml.model` = gpt2)."""
        model = meta.get("tokenizer.ggml.model")
        if model != "gpt2":
            raise ValueError(f"{source}: unsupported GGUF tokenizer model {model!r} "
                             "(tokenizer.ggml.model); supported: 'gpt2' (byte-level BPE)")
        for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges"):
            if key not in meta:
                raise ValueError(f"{source}: missing GGUF metadata field {key!r}")
        tokens: list[str] = meta["tokenizer.ggml.tokens"]
        types: list[int] = meta.get("tokenizer.ggml.token_type") or [1] * len(tokens)
        alphabet = _byte_alphabet()
        charset = set(alphabet.values())
        # Tokens are stored in the byte alphabet already; a few files store some as raw text
        # (with spaces etc.), which byte-level BPE can only find once re-spelled.
        vocab = {}
        for i, t in enumerate(tokens):
            spelled = t if set(t) <= charset else "".join(alphabet[b] for b in t.encode("utf-8"))
            vocab.setdefault(spelled, i)
        merges = [tuple(m.split(" ", 1)) for m in meta["tokenizer.ggml.merges"]]
        backend = Backend(BPE(vocab=vocab, merges=merges, fuse_unk=False))
        split = _GGUF_SPLITS.get(meta.get("tokenizer.ggml.pre", ""))
        if split is None:
            backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        else:
            backend.pre_tokenizer = pre_tokenizers.Sequence([
                pre_tokenizers.Split(Regex(split), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
        backend.decoder = decoders.ByteLevel()
        # Control tokens (<|im_start|>...) must match whole and be skippable on decode; a control
        # token spelled outside the byte alphabet is a llama.cpp mislabel and is left alone.
        backend.add_special_tokens([
            AddedToken(t, normalized=False, special=True)
            for t, ty in zip(tokens, types) if ty == _TOKEN_CONTROL and set(t) <= charset])
        backend.add_tokens([
            AddedToken(t, normalized=False, special=False)
            for t, ty in zip(tokens, types) if ty == _TOKEN_USER_DEFINED and t in vocab])

        def tok(key: str) -> str | None:
            i = meta.get(f"tokenizer.ggml.{key}")
            return tokens[i] if i is not None and 0 <= i < len(tokens) else None

        extra = [meta.get("tokenizer.ggml.eot_token_id"), meta.get("tokenizer.ggml.eom_token_id")]
        out = cls(backend, bos_token=tok("bos_token_id"), eos_token=tok("eos_token_id"),
                  unk_token=tok("unknown_token_id"), pad_token=tok("padding_token_id"),
                  chat_template=meta.get("tokenizer.chat_template"), extra_eos_token_ids=extra)
        backend.post_processor = _post_processor(
            out.bos_token, out.bos_token_id, out.eos_token, out.eos_token_id,
            bool(meta.get("tokenizer.ggml.add_bos_token", False)),
            bool(meta.get("tokenizer.ggml.add_eos_token", False)))
        return out

    # ---- encode / decode -----------------------------------------------------------------------

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def convert_ids_to_tokens(self, ids: int | Iterable[int]) -> str | None | list[str | None]:
        if isinstance(ids, int):
            return self.backend.id_to_token(ids)
        return [self.backend.id_to_token(i) for i in ids]

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    # ---- special tokens ------------------------------------------------------------------------

    def _id(self, token: str | None) -> int | None:
        return None if token is None else self.backend.token_to_id(token)

    @property
    def bos_token_id(self) -> int | None:
        return self._id(self.bos_token)

    @property
    def eos_token_id(self) -> int | None:
        return self._id(self.eos_token)

    @property
    def eos_token_ids(self) -> list[int]:
        """Every id that ends a generation: the EOS token plus e.g. <|eot_id|> / config extras."""
        ids = [self.eos_token_id, *self._extra_eos]
        return list(dict.fromkeys(i for i in ids if i is not None))

    @property
    def pad_token_id(self) -> int | None:
        return self._id(self.pad_token)

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    @property
    def all_special_ids(self) -> list[int]:
        """bos/eos/unk/pad plus every added token marked special (what decode skips)."""
        named = [self._id(t) for t in (self.bos_token, self.eos_token, self.unk_token, self.pad_token)]
        added = [i for i, t in self.backend.get_added_tokens_decoder().items() if t.special]
        return sorted({i for i in named + added if i is not None})

    # ---- chat ----------------------------------------------------------------------------------

    def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
                            **kwargs: Any) -> str:
        """Render the model's chat template the way transformers does (tokenize=False)."""
        if not self.chat_template:
            raise ValueError("this tokenizer has no chat template")
        if self._template is None:
            self._template = _jinja_env().from_string(self.chat_template)
        variables = {"bos_token": self.bos_token, "eos_token": self.eos_token,
                     "unk_token": self.unk_token, "pad_token": self.pad_token, **kwargs}
        return self._template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                     **variables)


def _raise_exception(message: str) -> None:
    # templates call raise_exception('...') to reject e.g. unsupported roles
    raise ValueError(f"chat template error: {message}")


def _jinja_env() -> ImmutableSandboxedEnvironment:
    # trim_blocks/lstrip_blocks and loopcontrols: the environment chat templates are written for
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = lambda x, indent=None, separators=None, sort_keys=False: json.dumps(
        x, ensure_ascii=False, indent=indent, separators=separators, sort_keys=sort_keys)
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env
