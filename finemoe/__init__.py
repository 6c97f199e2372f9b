"""finemoe: transformer language models whose FFNs are made of fine-grained experts."""

from finemoe.config import ConfigError, from_dict, to_dict
from finemoe.layers import FFN_KINDS, FFNConfig, FFNOutput, register_ffn
from finemoe.model import FFNLayers, ModelConfig, ModelOutput, Transformer, build_model

__version__ = "0.1.0"

__all__ = [
    "ConfigError",
    "FFN_KINDS",
    "FFNConfig",
    "FFNLayers",
    "FFNOutput",
    "ModelConfig",
    "ModelOutput",
    "Transformer",
    "build_model",
    "from_dict",
    "register_ffn",
    "to_dict",
]
