"""Run folders from Hugging Face checkpoints on disk, and back.

``finemoe import`` reads a LLaMA-family checkpoint — a folder with ``config.json`` and
safetensors (one file or an index of shards), or a ``.gguf`` file, dequantised by
``transformers`` — and writes a finemoe run folder that every other command accepts:

    RUN/checkpoints/step_0000000.pt   model weights, run config, tokenizer, end tokens
    RUN/checkpoints/latest
    RUN/config.yaml                   the run config (``finemoe train -c RUN/config.yaml``)
    RUN/tokenizer.json                the model's tokenizer (``finemoe data --tokenizer``)

Mixtral-style MoE checkpoints map to ``moe``. The weight mapping itself is
``finemoe.convert`` (pure functions on state dicts). A folder is written under a
temporary name and renamed into place when complete: a failure leaves nothing behind.

``finemoe export`` is the way back (``export_hf``): ``dense`` → ``LlamaForCausalLM``,
``moe`` without shared experts → ``MixtralForCausalLM``.
"""

from __future__ import annotations

import json
import os
import shutil
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import Tensor

from finemoe.config import ConfigError, to_dict
from finemoe.errors import InputError

__all__ = ["ImportError_", "HFCheckpoint", "read_hf_checkpoint", "model_from_hf", "is_hf_source", "import_hf",
           "write_run_folder", "export_hf"]


class ImportError_(InputError):
    """A checkpoint that cannot be read or mapped (named ``ImportError_`` so as not to
    shadow Python's ``ImportError``)."""


@dataclass
class HFCheckpoint:
    config: Any
    """``config.json`` as a dict, or a ``transformers`` config object (GGUF)."""
    state_dict: dict[str, Tensor]
    tokenizer_json: str | None = None
    end_tokens: list[str] = field(default_factory=list)
    source: str = ""


# -- reading --------------------------------------------------------------------------------------------------


def _read_safetensors(folder: Path) -> dict[str, Tensor]:
    from safetensors.torch import load_file

    index = folder / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        files = sorted(p.name for p in folder.glob("*.safetensors"))
    if not files:
        raise ImportError_(f"{folder}: no *.safetensors weights (only safetensors are read, not pickled .bin files)")
    tensors: dict[str, Tensor] = {}
    for name in files:
        path = folder / name
        if not path.is_file():
            raise ImportError_(f"{path}: named by the safetensors index but missing")
        try:
            tensors.update(load_file(str(path)))
        except Exception as err:  # safetensors raises its own error types on a torn file
            raise ImportError_(f"{path}: unreadable safetensors file ({str(err).splitlines()[0]})") from None
    return tensors


def _end_tokens(tokenizer_json: str | None, eos_ids: Any, extra: tuple[str, ...] = ()) -> list[str]:
    """The tokens that end a generation: the config's / generation config's
    ``eos_token_id`` (one or a list) and the tokenizer's own eos token, by name."""
    if tokenizer_json is None:
        return []
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_str(tokenizer_json)
    ids = eos_ids if isinstance(eos_ids, list) else [eos_ids] if eos_ids is not None else []
    names = [tokenizer.id_to_token(int(i)) for i in ids]
    names += [t for t in (*extra, "<|endoftext|>") if t and tokenizer.token_to_id(t) is not None]
    return list(dict.fromkeys(n for n in names if n))


def _read_folder(folder: Path) -> HFCheckpoint:
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise ImportError_(f"{folder}: no config.json (a Hugging Face checkpoint folder, or a .gguf file)")
    try:
        config = json.loads(config_path.read_text())
    except json.JSONDecodeError as err:
        raise ImportError_(f"{config_path}: not valid JSON ({err})") from None
    _check_config(config, str(config_path))
    tokenizer_path = folder / "tokenizer.json"
    tokenizer_json = tokenizer_path.read_text() if tokenizer_path.is_file() else None
    eos = config.get("eos_token_id")
    generation = folder / "generation_config.json"
    if generation.is_file():
        eos = json.loads(generation.read_text()).get("eos_token_id", eos)
    extra = ()
    tokenizer_config = folder / "tokenizer_config.json"
    if tokenizer_config.is_file():
        token = json.loads(tokenizer_config.read_text()).get("eos_token")
        extra = (token if isinstance(token, str) else (token or {}).get("content", ""),)
    return HFCheckpoint(config, _read_safetensors(folder), tokenizer_json, _end_tokens(tokenizer_json, eos, extra),
                        str(folder))


def _read_gguf(path: Path) -> HFCheckpoint:
    try:
        import gguf  # noqa: F401
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
        from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint
    except ImportError as err:
        raise ImportError_(f"{path}: reading GGUF needs `transformers` and `gguf` (pip install transformers gguf): "
                           f"{err}") from None
    try:
        hf_config = AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name)
    except Exception as err:  # transformers raises ValueError / KeyError / OSError on foreign files
        raise ImportError_(f"{path}: not a GGUF model transformers can read ({str(err).splitlines()[0]})") from None
    _check_config(hf_config, str(path))
    with torch.device("meta"):  # only its parameter names, to map GGUF's tensor names
        skeleton = AutoModelForCausalLM.from_config(hf_config)
    try:
        tensors = load_gguf_checkpoint(str(path), return_tensors=True, model_to_load=skeleton)["tensors"]
        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    except Exception as err:
        raise ImportError_(f"{path}: unreadable GGUF tensors or tokenizer ({str(err).splitlines()[0]})") from None
    tokenizer_json = tokenizer.backend_tokenizer.to_str()
    return HFCheckpoint(hf_config, {k: v.float() for k, v in tensors.items()}, tokenizer_json,
                        _end_tokens(tokenizer_json, hf_config.eos_token_id, (tokenizer.eos_token,)), str(path))


def _check_config(config: dict, where: str) -> None:
    from finemoe.convert import check_hf_config

    try:
        check_hf_config(config)
    except ConfigError as err:
        raise ImportError_(f"{where}: {err}") from None


def read_hf_checkpoint(path: str | Path) -> HFCheckpoint:
    """A Hugging Face LLaMA / Mixtral checkpoint: a folder (``config.json`` + safetensors
    [+ ``tokenizer.json``]) or a ``.gguf`` file."""
    path = Path(path)
    if path.is_dir():
        return _read_folder(path)
    if path.is_file() and path.suffix == ".gguf":
        return _read_gguf(path)
    if path.is_file():
        raise ImportError_(f"{path}: neither a checkpoint folder nor a .gguf file")
    raise ImportError_(f"{path}: no such file or folder")


# -- a run folder ---------------------------------------------------------------------------------------------


@contextmanager
def _new_folder(out: str | Path) -> Iterator[Path]:
    """A folder built under a temporary name and renamed to ``out`` only when the block
    completes: a failure leaves nothing. Refuses an ``out`` that exists and is not empty."""
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise InputError(f"{out}: already exists and is not empty; choose another output folder")
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
        yield tmp
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_run_folder(out: str | Path, model_state: dict[str, Tensor], run_config, *, tokenizer_json: str | None,
                     extra: dict[str, Any] | None = None) -> Path:
    """Write a run folder holding one checkpoint (step 0) — under a temporary name, then
    renamed into place, so a failure leaves nothing. Refuses a folder that exists."""
    import yaml

    from finemoe.checkpoint import save_checkpoint

    with _new_folder(out) as tmp:
        state = {"model": model_state, "step": 0, "config": to_dict(run_config), "tokenizer_json": tokenizer_json,
                 **(extra or {})}
        save_checkpoint(tmp / "checkpoints", 0, state, keep=1)
        (tmp / "config.yaml").write_text(yaml.safe_dump(to_dict(run_config), sort_keys=False))
        if tokenizer_json is not None:
            (tmp / "tokenizer.json").write_text(tokenizer_json)
    return Path(out)


def _checked_state_dict(checkpoint: HFCheckpoint, model_config) -> dict[str, Tensor]:
    """The finemoe state dict, with a missing tensor or a shape mismatch named."""
    from finemoe.convert import state_dict_from_hf
    from finemoe.model import Transformer

    try:
        sd = state_dict_from_hf(checkpoint.state_dict, model_config)
    except KeyError as err:
        raise ImportError_(f"{checkpoint.source}: missing tensor {err.args[0]}") from None
    with torch.device("meta"):
        expected = Transformer(model_config).state_dict()
    for key, tensor in sd.items():
        if key in expected and tuple(tensor.shape) != tuple(expected[key].shape):
            name = next((k for k, v in checkpoint.state_dict.items() if v is tensor), f"for finemoe's {key}")
            raise ImportError_(f"{checkpoint.source}: tensor {name} has shape {tuple(tensor.shape)}, "
                               f"the config implies {tuple(expected[key].shape)}")
    return {k: v.to(torch.float32).contiguous() for k, v in sd.items()}


def model_from_hf(src: str | Path, *, train_seq_len: int = 2048):
    """``(model, run_config, checkpoint)`` of a HF checkpoint, in memory (float32). The
    run config trains at ``min(train_seq_len, context)`` tokens with a learning rate
    meant for continued training (3e-4); override either as usual."""
    from finemoe.convert import model_config_from_hf
    from finemoe.model import Transformer
    from finemoe.run_config import RunConfig
    from finemoe.run_config import TrainConfig

    checkpoint = read_hf_checkpoint(src)
    try:
        model_config = model_config_from_hf(checkpoint.config)
    except ConfigError as err:
        raise ImportError_(f"{checkpoint.source}: {err}") from None
    state = _checked_state_dict(checkpoint, model_config)
    model = Transformer(model_config)
    model.load_state_dict(state, strict=True)
    run_config = RunConfig(model=model_config,
                           train=TrainConfig(seq_len=min(train_seq_len, model_config.max_seq_len), lr=3e-4),
                           end_tokens=checkpoint.end_tokens or None)
    return model, run_config, checkpoint


def is_hf_source(path: str | Path) -> bool:
    """A ``.gguf`` file, or a folder with ``config.json`` that is not a finemoe run."""
    path = Path(path)
    return (path.is_file() and path.suffix == ".gguf") or (
        path.is_dir() and (path / "config.json").is_file() and not (path / "checkpoints").exists())


def import_hf(src: str | Path, out: str | Path, *, train_seq_len: int = 2048) -> Path:
    """``finemoe import``: a HF checkpoint → a run folder (float32 weights)."""
    model, run_config, checkpoint = model_from_hf(src, train_seq_len=train_seq_len)
    source = {"path": str(Path(src).resolve()), "format": "gguf" if Path(src).suffix == ".gguf" else "safetensors"}
    return write_run_folder(out, model.state_dict(), run_config, tokenizer_json=checkpoint.tokenizer_json,
                            extra={"source": source})


# -- export ---------------------------------------------------------------------------------------------------


def export_hf(run: str | Path, out: str | Path) -> Path:
    """``finemoe export``: a run folder → a Hugging Face folder (``config.json``,
    ``model.safetensors``, ``tokenizer.json``, ``generation_config.json``).
    ``transformers`` loads it without finemoe as ``LlamaForCausalLM`` (an all-dense
    model) or ``MixtralForCausalLM`` (an all-``moe`` model without shared experts); any
    other model is written with finemoe's own weight names and ``modeling_finemoe.py``
    (``finemoe.hf_remote``), loaded with ``trust_remote_code=True`` where finemoe is
    installed."""
    from safetensors.torch import save_file

    from finemoe.checkpoint import load_model
    from finemoe.convert import hf_config_for, state_dict_to_hf

    model, run_config, tokenizer = load_model(run)
    try:
        hf_config = hf_config_for(run_config.model)  # refuses a model with no transformers architecture
        hf_sd = state_dict_to_hf(model.state_dict(), run_config.model)
        remote_code = None
    except ConfigError:  # no native architecture: finemoe's model through remote code
        from finemoe import hf_remote

        hf_config = {"architectures": ["FinemoeForCausalLM"], "model_type": "finemoe",
                     "auto_map": {"AutoConfig": "modeling_finemoe.FinemoeConfig",
                                  "AutoModelForCausalLM": "modeling_finemoe.FinemoeForCausalLM"},
                     "finemoe": to_dict(run_config.model), "vocab_size": run_config.model.vocab_size,
                     "tie_word_embeddings": False}
        hf_sd = {"model." + k: v for k, v in model.state_dict().items()}
        remote_code = Path(hf_remote.__file__).read_text()
    with _new_folder(out) as tmp:
        if remote_code is not None:
            (tmp / "modeling_finemoe.py").write_text(remote_code)
        if tokenizer is not None:
            (tmp / "tokenizer.json").write_text(tokenizer.to_str())
            end_ids = [tokenizer.token_to_id(t) for t in (run_config.end_tokens or ["<|endoftext|>"])]
            end_ids = [i for i in end_ids if i is not None]
            (tmp / "tokenizer_config.json").write_text(json.dumps({
                "tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": run_config.model.max_seq_len,
                "eos_token": tokenizer.id_to_token(end_ids[0]) if end_ids else None}, indent=2))
            if end_ids:
                hf_config["eos_token_id"] = end_ids[0] if len(end_ids) == 1 else end_ids
                (tmp / "generation_config.json").write_text(json.dumps({"eos_token_id": hf_config["eos_token_id"]},
                                                                       indent=2))
        (tmp / "config.json").write_text(json.dumps(hf_config, indent=2))
        # safetensors refuses tensors that share memory (a tied lm_head): write copies
        save_file({k: v.detach().contiguous().clone() for k, v in hf_sd.items()}, str(tmp / "model.safetensors"),
                  metadata={"format": "pt"})
    return Path(out)


