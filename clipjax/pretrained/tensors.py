"""Checkpoint files as {name: numpy array}: safetensors without torch, PyTorch files with it.

safetensors (`.safetensors`) is a plain header plus raw little-endian arrays, read here with the
`safetensors` package's numpy API. PyTorch's `.pt` / `.bin` files are Python pickles of torch
tensors (or, for OpenAI's original CLIP releases, TorchScript archives) and need torch to read;
that is the only place torch is imported. bfloat16 tensors come back as float32.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import zipfile

import numpy as np

from clipjax import paths
from clipjax.checkpoint import one_line
from clipjax.pretrained.layouts import HF_CONFIG, ConversionError


@contextlib.contextmanager
def _reading(path: str):
    """A file the libraries cannot read (truncated, another format, torch missing) is the user's
    to fix: a ConversionError (one line, exit status 2) that names the file."""
    try:
        yield
    except (ConversionError, FileNotFoundError):
        raise
    except ImportError as e:
        raise ConversionError(f"--checkpoint {path}: {e}") from None
    except Exception as e:  # noqa: BLE001 - safetensors, torch and pickle errors alike
        raise ConversionError(f"--checkpoint {path}: cannot be read ({one_line(e)})") from None


def _local(path: str) -> tuple[str, tempfile.TemporaryDirectory | None]:
    """A local file for `path`: itself, or a temporary copy of a bucket object."""
    if not paths.is_remote(path):
        return paths.resolve(path), None
    tmp = tempfile.TemporaryDirectory(prefix="clipjax-convert-")
    local = os.path.join(tmp.name, os.path.basename(path))
    with open(local, "wb") as f:
        f.write(paths.read_bytes(path))
    return local, tmp


def read_safetensors(path: str) -> dict[str, np.ndarray]:
    from safetensors import safe_open

    local, tmp = _local(path)
    try:
        out = {}
        # framework="numpy" cannot hold bfloat16: read those through their raw bits.
        with safe_open(local, framework="numpy") as f:
            for name in f.keys():
                out[name] = f.get_tensor(name)
        return out
    except (TypeError, ValueError) as e:
        if "bfloat16" not in str(e) and "bf16" not in str(e).lower():
            raise
        return _read_safetensors_raw(local)
    finally:
        if tmp is not None:
            tmp.cleanup()


_DTYPES = {"F32": np.float32, "F16": np.float16, "F64": np.float64, "I64": np.int64, "I32": np.int32}


def _read_safetensors_raw(local: str) -> dict[str, np.ndarray]:
    """safetensors by its format (8-byte header length, JSON header, data), bf16 widened."""
    with open(local, "rb") as f:
        size = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(size))
        data = f.read()
    out = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        start, stop = entry["data_offsets"]
        raw = data[start:stop]
        if entry["dtype"] == "BF16":
            bits = np.frombuffer(raw, np.uint16).astype(np.uint32) << 16
            out[name] = bits.view(np.float32).reshape(entry["shape"])
        else:
            out[name] = np.frombuffer(raw, _DTYPES[entry["dtype"]]).reshape(entry["shape"]).copy()
    return out


def read_torch(path: str) -> dict[str, np.ndarray]:
    """A PyTorch state dict (or a TorchScript archive's) as numpy; needs torch."""
    try:
        import torch
    except ImportError:
        raise ImportError(
            "reading a PyTorch .pt/.bin checkpoint needs torch (pip install torch); "
            "safetensors files are read without it"
        ) from None
    local, tmp = _local(path)
    try:
        if is_torchscript(local):  # OpenAI's releases (torch.load would warn, then do the same)
            state = torch.jit.load(local, map_location="cpu").state_dict()
        else:
            state = torch.load(local, map_location="cpu", weights_only=True)
        if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
            state = state["state_dict"]  # open_clip training checkpoints wrap it
        out = {}
        for name, value in state.items():
            if not hasattr(value, "detach"):
                out[name] = np.asarray(value)
                continue
            value = value.detach().cpu()
            if value.dtype == torch.bfloat16:
                value = value.float()
            out[name.removeprefix("module.")] = value.numpy()
        return out
    finally:
        if tmp is not None:
            tmp.cleanup()


def read_checkpoint(path: str) -> dict[str, np.ndarray]:
    """The tensors of one checkpoint file, by its extension."""
    if not paths.exists(path):
        raise FileNotFoundError(f"--checkpoint {path!r} does not exist")
    if str(path).endswith(".safetensors"):
        with _reading(path):
            return read_safetensors(path)
    if str(path).endswith((".pt", ".pth", ".bin")):
        with _reading(path):
            return read_torch(path)
    raise ValueError(f"--checkpoint {path!r}: expected a .safetensors, .pt, .pth or .bin file")


def is_torchscript(local: str) -> bool:
    """Whether a local file is a TorchScript archive (`torch.jit.save`: a zip holding the module's
    code/ and constants.pkl beside its data; a `torch.save` state dict has neither), read with
    zipfile alone. OpenAI's original CLIP releases are the TorchScript files of this family."""
    if not zipfile.is_zipfile(local):
        return False
    with zipfile.ZipFile(local) as archive:
        names = archive.namelist()
    return any(n.endswith("/constants.pkl") for n in names) and any("/code/" in n for n in names)


def read_open_clip_checkpoint(path: str) -> tuple[dict[str, np.ndarray], str | None]:
    """(tensors, why the file is one of OpenAI's own releases, or None) of an open_clip / OpenAI
    checkpoint file. OpenAI's files are TorchScript archives whose state dict also holds the
    entries input_resolution, context_length and vocab_size, which open_clip's own files never do."""
    if not paths.exists(path):
        raise FileNotFoundError(f"--checkpoint {path!r} does not exist")
    local, tmp = _local(path)  # a bucket object is copied once, for both looks
    try:
        tensors = read_checkpoint(path if tmp is None else local)  # messages name the user's path
        if is_torchscript(local):
            return tensors, "a TorchScript archive, as OpenAI's releases are"
    finally:
        if tmp is not None:
            tmp.cleanup()
    if all(name in tensors for name in ("input_resolution", "context_length", "vocab_size")):
        return tensors, "it holds OpenAI's input_resolution, context_length and vocab_size entries"
    return tensors, None


# The weights of an open_clip model folder (its Hugging Face repositories; clipjax's exports), in
# open_clip's order of preference; open_clip_config.json lies beside them.
OPEN_CLIP_WEIGHTS = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")


def open_clip_files(checkpoint: str) -> tuple[str, dict | None]:
    """(the weights file, the `model_cfg` of the open_clip_config.json beside it or None) of an
    open_clip checkpoint given as a file or as an open_clip model folder."""
    if paths.isdir(checkpoint):
        found = [
            paths.join(checkpoint, n) for n in OPEN_CLIP_WEIGHTS if paths.exists(paths.join(checkpoint, n))
        ]
        if not found:
            raise FileNotFoundError(
                f"--checkpoint {checkpoint!r}: no {' or '.join(OPEN_CLIP_WEIGHTS)} in the folder"
            )
        checkpoint = found[0]
    config_path = str(paths.path(checkpoint).parent / "open_clip_config.json")
    if not paths.exists(config_path):
        return checkpoint, None
    return checkpoint, json.loads(paths.read_text(config_path)).get("model_cfg")


def read_hf_directory(directory: str) -> tuple[dict[str, np.ndarray], dict]:
    """(tensors, config.json) of a Hugging Face model folder (model.safetensors, else
    pytorch_model.bin; sharded safetensors through their index)."""
    config_path = paths.join(directory, HF_CONFIG)
    if not paths.exists(config_path):
        raise FileNotFoundError(f"--checkpoint {directory!r}: no config.json (a Hugging Face model folder)")
    with _reading(config_path):
        config = json.loads(paths.read_text(config_path))
    index = paths.join(directory, "model.safetensors.index.json")
    if paths.exists(index):
        files = sorted(set(json.loads(paths.read_text(index))["weight_map"].values()))
        tensors = {}
        for name in files:
            with _reading(paths.join(directory, name)):
                tensors.update(read_safetensors(paths.join(directory, name)))
        return tensors, config
    for name in ("model.safetensors", "pytorch_model.bin"):
        if paths.exists(paths.join(directory, name)):
            return read_checkpoint(paths.join(directory, name)), config
    raise FileNotFoundError(f"--checkpoint {directory!r}: no model.safetensors or pytorch_model.bin")


def write_safetensors(tensors: dict[str, np.ndarray], path: str) -> None:
    from safetensors.numpy import save

    # np.require keeps 0-d arrays 0-d (np.ascontiguousarray would make them [1]).
    data = save({k: np.require(v, requirements="C") for k, v in tensors.items()}, metadata={"format": "pt"})
    paths.write_atomic(path, data)
