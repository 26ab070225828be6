"""A pickle-free encoding of what crosses ranks and what a checkpoint holds.

Participants (and the ranks that simulate them) are not trusted: a payload must never be able to
run code on the rank that decodes it, which ``pickle`` (``all_gather_object``, ``torch.load``
without ``weights_only``) allows.  Here a payload is one flat byte string::

    b"FLUXWIRE" | version u32 | header length u64 | header (UTF-8 JSON) | tensor bytes

The header is a tree of typed nodes (None, bool, int, float, str, list, tuple, set, dict,
tensor, and the dataclasses of :data:`ALLOWED_CLASSES`, named, never imported from the payload);
a tensor node names its dtype (from :data:`ALLOWED_DTYPES`), shape and byte range.  Decoding
checks every node (type tags, field names, dtypes, shapes against byte counts, ranges inside the
payload, nesting depth) and raises :class:`WireError` on the first problem.
"""
from __future__ import annotations

import dataclasses
import hashlib
import importlib
import json
import math
import struct
from typing import Any

import torch
from torch import Tensor

MAGIC = b"FLUXWIRE"
VERSION = 1
_PREFIX = struct.Struct("<8sIQ")  # magic, version, header length
MAX_DEPTH = 64
# dataclasses a payload may hold: tag -> "module:Class" (imported by us, never by the payload)
ALLOWED_CLASSES: dict[str, str] = {
    "Update": "flux.federation.update:Update",
    "LocalCosts": "flux.federation.update:LocalCosts",
    "ModelProfile": "flux.profiling.profile:ModelProfile",
    "LayerProfile": "flux.profiling.profile:LayerProfile",
}
ALLOWED_DTYPES: dict[str, torch.dtype] = {
    str(d).removeprefix("torch."): d
    for d in (torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.int16,
              torch.int8, torch.uint8, torch.bool, torch.uint32)
}


class WireError(ValueError):
    """A payload that is malformed, truncated, or holds something not allowed."""


# ---------------------------------------------------------------------------- encoding
def _class_tag(obj: Any) -> str | None:
    name = type(obj).__name__
    target = ALLOWED_CLASSES.get(name)
    if target and f"{type(obj).__module__}:{type(obj).__qualname__}" == target:
        return name
    return None


class _Encoder:
    def __init__(self) -> None:
        self.chunks: list[bytes] = []
        self.size = 0

    def tensor(self, t: Tensor) -> dict:
        t = t.detach()
        dtype = str(t.dtype).removeprefix("torch.")
        if dtype not in ALLOWED_DTYPES:
            raise WireError(f"tensor dtype {t.dtype} cannot be sent (allowed: {', '.join(ALLOWED_DTYPES)})")
        data = t.cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
        node = {"t": "tensor", "dtype": dtype, "shape": list(t.shape), "offset": self.size, "nbytes": len(data)}
        self.chunks.append(data)
        self.size += len(data)
        return node

    def node(self, obj: Any, depth: int = 0) -> dict:
        if depth > MAX_DEPTH:
            raise WireError(f"nesting deeper than {MAX_DEPTH}")
        if obj is None:
            return {"t": "none"}
        if isinstance(obj, bool):
            return {"t": "bool", "v": obj}
        if isinstance(obj, int):
            return {"t": "int", "v": int(obj)}
        if isinstance(obj, float):
            return {"t": "float", "v": repr(obj)}  # repr round-trips, also nan / inf
        if isinstance(obj, str):
            return {"t": "str", "v": obj}
        if isinstance(obj, Tensor):
            return self.tensor(obj)
        if isinstance(obj, (list, tuple, set, frozenset)):
            kind = {list: "list", tuple: "tuple"}.get(type(obj), "set")
            items = sorted(obj, key=repr) if kind == "set" else obj  # a set's order must not vary
            return {"t": kind, "v": [self.node(x, depth + 1) for x in items]}
        if isinstance(obj, dict):
            return {"t": "dict", "k": [self.node(k, depth + 1) for k in obj],
                    "v": [self.node(v, depth + 1) for v in obj.values()]}
        tag = _class_tag(obj) if dataclasses.is_dataclass(obj) else None
        if tag is not None:
            return {"t": "obj", "cls": tag,
                    "f": {f.name: self.node(getattr(obj, f.name), depth + 1) for f in dataclasses.fields(obj)}}
        # numpy scalars and arrays (RNG states): as Python numbers / tensors
        if type(obj).__module__ == "numpy":
            import numpy as np

            if isinstance(obj, np.ndarray):
                return {"t": "ndarray", "v": self.tensor(torch.from_numpy(np.ascontiguousarray(obj)))}
            if isinstance(obj, np.generic):
                return self.node(obj.item(), depth)
        raise WireError(f"a {type(obj).__module__}.{type(obj).__qualname__} cannot be sent")


def encode(obj: Any) -> bytes:
    """``obj`` (a tree of the allowed types) as one payload."""
    enc = _Encoder()
    header = json.dumps(enc.node(obj), separators=(",", ":")).encode()
    return _PREFIX.pack(MAGIC, VERSION, len(header)) + header + b"".join(enc.chunks)


# ---------------------------------------------------------------------------- decoding
class _Decoder:
    def __init__(self, body: memoryview) -> None:
        self.body = body

    def tensor(self, node: dict) -> Tensor:
        dtype = ALLOWED_DTYPES.get(node.get("dtype"))
        if dtype is None:
            raise WireError(f"tensor dtype {node.get('dtype')!r} is not allowed")
        shape, offset, nbytes = node.get("shape"), node.get("offset"), node.get("nbytes")
        if not isinstance(shape, list) or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0
                                                  for s in shape):
            raise WireError(f"tensor shape {shape!r} is not a list of ints >= 0")
        if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in (offset, nbytes)):
            raise WireError(f"tensor byte range {offset!r}+{nbytes!r} is not a pair of ints >= 0")
        itemsize = torch.empty((), dtype=dtype).element_size()
        if math.prod(shape) * itemsize != nbytes:
            raise WireError(f"tensor of shape {shape} and dtype {node['dtype']} needs "
                            f"{math.prod(shape) * itemsize} bytes, the header says {nbytes}")
        if offset + nbytes > len(self.body):
            raise WireError(f"tensor bytes {offset}..{offset + nbytes} lie outside the {len(self.body)}-byte payload")
        if nbytes == 0:
            return torch.empty(shape, dtype=dtype)
        raw = torch.frombuffer(bytearray(self.body[offset:offset + nbytes]), dtype=torch.uint8)
        return raw.view(dtype).reshape(shape)

    def node(self, node: Any, depth: int = 0) -> Any:
        if depth > MAX_DEPTH:
            raise WireError(f"nesting deeper than {MAX_DEPTH}")
        if not isinstance(node, dict) or "t" not in node:
            raise WireError(f"malformed node {str(node)[:80]!r}")
        t = node["t"]
        if t == "none":
            return None
        if t in ("bool", "int", "str"):
            v = node.get("v")
            want = {"bool": bool, "int": int, "str": str}[t]
            if not isinstance(v, want) or (t == "int" and isinstance(v, bool)):
                raise WireError(f"{t} node holds a {type(v).__name__}")
            return v
        if t == "float":
            try:
                return float(node.get("v"))
            except (TypeError, ValueError):
                raise WireError(f"float node holds {node.get('v')!r}") from None
        if t == "tensor":
            return self.tensor(node)
        if t == "ndarray":
            return self.tensor(node.get("v") or {}).numpy()
        if t in ("list", "tuple", "set"):
            items = node.get("v")
            if not isinstance(items, list):
                raise WireError(f"{t} node without a list of items")
            values = [self.node(x, depth + 1) for x in items]
            try:
                return {"list": list, "tuple": tuple, "set": set}[t](values)
            except TypeError as exc:
                raise WireError(f"set of unhashable items: {exc}") from None
        if t == "dict":
            keys, values = node.get("k"), node.get("v")
            if not isinstance(keys, list) or not isinstance(values, list) or len(keys) != len(values):
                raise WireError("dict node needs equally long key and value lists")
            out = {}
            for k, v in zip(keys, values):
                key = self.node(k, depth + 1)
                try:
                    out[key] = self.node(v, depth + 1)
                except TypeError:
                    raise WireError(f"unhashable dict key {key!r}") from None
            return out
        if t == "obj":
            return self.obj(node, depth)
        raise WireError(f"unknown node type {t!r}")

    def obj(self, node: dict, depth: int) -> Any:
        tag = node.get("cls")
        target = ALLOWED_CLASSES.get(tag) if isinstance(tag, str) else None
        if target is None:
            raise WireError(f"class {tag!r} is not allowed (allowed: {', '.join(ALLOWED_CLASSES)})")
        module, _, name = target.partition(":")
        cls = getattr(importlib.import_module(module), name)
        fields = node.get("f")
        if not isinstance(fields, dict):
            raise WireError(f"{tag} node without fields")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(fields) - known)
        if unknown:
            raise WireError(f"{tag} has no field {unknown[0]!r}")
        try:
            return cls(**{k: self.node(v, depth + 1) for k, v in fields.items()})
        except TypeError as exc:
            raise WireError(f"{tag}: {exc}") from None


def decode(payload: bytes | bytearray | memoryview | Tensor) -> Any:
    """The object a payload of :func:`encode` holds; :class:`WireError` if it is not one."""
    if isinstance(payload, Tensor):
        if payload.dtype != torch.uint8 or payload.dim() != 1:
            raise WireError(f"a payload tensor must be uint8 [N], got {payload.dtype} {tuple(payload.shape)}")
        payload = payload.cpu().numpy().tobytes()
    buf = memoryview(bytes(payload))
    if len(buf) < _PREFIX.size:
        raise WireError(f"payload of {len(buf)} bytes is shorter than the {_PREFIX.size}-byte prefix")
    magic, version, header_len = _PREFIX.unpack_from(buf)
    if magic != MAGIC:
        raise WireError(f"not a FLUX payload (starts with {bytes(magic)!r}); pickles are never decoded")
    if version != VERSION:
        raise WireError(f"payload version {version}, this FLUX reads version {VERSION}")
    start = _PREFIX.size
    if header_len > len(buf) - start:
        raise WireError(f"header of {header_len} bytes does not fit the {len(buf)}-byte payload")
    try:
        header = json.loads(bytes(buf[start:start + header_len]).decode())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise WireError(f"header is not JSON: {exc}") from None
    except RecursionError:
        raise WireError(f"nesting deeper than {MAX_DEPTH}") from None
    return _Decoder(buf[start + header_len:]).node(header)


# ---------------------------------------------------------------------------- checksummed files
_FILE_MAGIC = b"FLUXCKPT"
_DIGEST = 32  # sha256


def seal(obj: Any) -> bytes:
    """``obj`` encoded, prefixed by a magic and the SHA-256 of the payload (a file format that
    detects truncation and corruption)."""
    payload = encode(obj)
    return _FILE_MAGIC + hashlib.sha256(payload).digest() + payload


def unseal(data: bytes) -> Any:
    """The object :func:`seal` wrote; :class:`WireError` if the checksum does not match."""
    head = len(_FILE_MAGIC) + _DIGEST
    if len(data) < head or data[: len(_FILE_MAGIC)] != _FILE_MAGIC:
        raise WireError("not a FLUX checkpoint (bad magic: an old pickle checkpoint, or another file)")
    digest, payload = data[len(_FILE_MAGIC):head], data[head:]
    if hashlib.sha256(payload).digest() != digest:
        raise WireError(f"checksum mismatch ({len(payload)} payload bytes): the file is truncated or corrupted")
    return decode(payload)
