"""FFN kinds. Importing this package registers every built-in kind."""

from finemoe.layers.base import CallContext, FFN, FFN_KINDS, FFNConfig, FFNOutput, LayerContext, intervention, register_ffn
from finemoe.layers.records import Record, Stats
from finemoe.layers.dense import DenseConfig, DenseFFN
from finemoe.layers.moe import MoEConfig, MoEFFN
from finemoe.layers.finedeep import FinedeepConfig, FinedeepFFN
from finemoe.layers.dsmoe import DSMoEConfig, DSMoEFFN
from finemoe.layers.cartesian import CartesianConfig, CartesianFFN
from finemoe.layers.hash import HashConfig, HashFFN
from finemoe.layers.topp import TopPConfig, TopPFFN
from finemoe.layers.peer import PEERConfig, PEERFFN
from finemoe.layers.pkm import PKMConfig, PKMFFN

__all__ = [
    "CallContext",
    "FFN",
    "FFN_KINDS",
    "FFNConfig",
    "FFNOutput",
    "LayerContext",
    "Record",
    "Stats",
    "intervention",
    "register_ffn",
    "DenseConfig",
    "DenseFFN",
    "MoEConfig",
    "MoEFFN",
    "FinedeepConfig",
    "FinedeepFFN",
    "DSMoEConfig",
    "DSMoEFFN",
    "CartesianConfig",
    "CartesianFFN",
    "HashConfig",
    "HashFFN",
    "TopPConfig",
    "TopPFFN",
    "PEERConfig",
    "PEERFFN",
    "PKMConfig",
    "PKMFFN",
]
