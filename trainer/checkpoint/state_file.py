"""Nested training state (dicts, lists, numbers, strings and tensors) as one safetensors file: the tensors as
tensors, everything else as JSON in the file's metadata. Loading reads JSON and raw tensor bytes only: a state file
from someone else's run directory cannot run code, as a pickle could."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save

from shards.bounded_read import parse_json

TREE = "tree"
TENSOR = "__tensor__"


def state_bytes(state: Any) -> bytes:
    """The safetensors file of `state`: JSON-able values and CPU or device tensors, nested in dicts with string keys
    and lists."""
    tensors: dict[str, torch.Tensor] = {}

    def pack(value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            name = f"t{len(tensors)}"
            tensors[name] = value.detach().cpu().contiguous().clone()
            return {TENSOR: name}
        if isinstance(value, dict):
            assert all(isinstance(k, str) for k in value), f"state keys must be strings: {list(value)[:5]}"
            return {k: pack(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [pack(v) for v in value]
        assert value is None or isinstance(value, (bool, int, float, str)), f"cannot store {type(value).__name__}"
        return value

    tree = pack(state)
    return save(tensors, metadata={TREE: json.dumps(tree)})


def load_state_file(path: str | Path) -> Any:
    """What `state_bytes` stored, tensors on the CPU.

    Raises:
        ValueError: the file is not a state file (not safetensors, no JSON tree, or a tensor reference it lacks).
    """
    try:
        with safe_open(str(path), framework="pt") as handle:
            tree = parse_json((handle.metadata() or {})[TREE], f"{path}'s metadata")
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118 (not a dict)
    except Exception as err:  # safetensors' own error type, KeyError, JSONDecodeError: one message
        raise ValueError(f"{path} is not a readable state file ({type(err).__name__}: {err!s:.120})") from None

    def unpack(value: Any) -> Any:
        if isinstance(value, dict):
            if set(value) == {TENSOR}:
                if value[TENSOR] not in tensors:
                    raise ValueError(f"{path} refers to a tensor {value[TENSOR]!r:.40} it does not hold")
                return tensors[value[TENSOR]]
            return {k: unpack(v) for k, v in value.items()}
        if isinstance(value, list):
            return [unpack(v) for v in value]
        return value

    return unpack(tree)
