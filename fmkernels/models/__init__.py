"""Models: `Transformer` (a Llama-style decoder on fmkernels ops), its plain-PyTorch twin `PlainTransformer`
(the reference for convergence tests and benchmarks), `TransformerConfig` and the size `PRESETS`."""
from .config import PRESETS, ConfigError, TransformerConfig
from .plain import PlainTransformer, fmk_to_plain_state_dict, plain_to_fmk_state_dict
from .transformer import KVCache, Transformer

__all__ = [
    "KVCache",
    "Transformer",
    "PlainTransformer",
    "TransformerConfig",
    "PRESETS",
    "ConfigError",
    "fmk_to_plain_state_dict",
    "plain_to_fmk_state_dict",
]
