"""FFN kinds. Importing this package registers every built-in kind."""

from finemoe.layers.base import FFN, FFN_KINDS, FFNConfig, FFNOutput, register_ffn
from finemoe.layers.dense import DenseConfig, DenseFFN
from finemoe.layers.moe import MoEConfig, MoEFFN

__all__ = [
    "FFN",
    "FFN_KINDS",
    "FFNConfig",
    "FFNOutput",
    "register_ffn",
    "DenseConfig",
    "DenseFFN",
    "MoEConfig",
    "MoEFFN",
]
