"""The latent cache: the contract between `data.prepare` (writes) and training (reads).

Layout::

    cache_dir/
      index.json                      {"format": 1, "entries": {key: {file, sha256, bytes, clip_id, bucket, ...}}}
      shards/<key[:2]>/<key>.safetensors
      labels.json                     labels measured from pixels, by (file sha256, bucket, fps, window):
                                      a re-run skips the measuring (delete it to measure again)

One entry (one shard file) per (clip, window). Its key is a content hash (`entry_key`) of the clip's
file bytes and every setting that changes the entry (bucket, fps, window, VAE kind, text encoder id, the
prompt texts), so a changed clip or setting gets a new key and re-encodes, and an unchanged one is found.

Tensors of an entry:
  latent_mean, latent_logvar: [C, F, H, W] float32, the VAE posterior in its normalised latent space
  context: [K, L, D], the K prompt variants' text embeddings cut to L = the longest real length
           (positions past a prompt's length are zero in the encoder output, so nothing is lost)
  context_lens: [K] int64
  image_cond: [C, F, H, W] (I2V only) VAE mean of the first frame followed by zero (mid-grey) frames
Metadata (JSON in the safetensors header, key "wanlora"): clip path, bucket, window, prompts, labels.

Every file is written atomically (temp name + os.replace), the shard before its index record. The index
is rewritten at most every INDEX_FLUSH_S seconds (rewriting it after each of 10,000 entries would write
gigabytes); a shard on disk that the index does not list yet is adopted when the cache is opened (its
name is its key, its header holds its record), so an interrupted prepare loses at most the entry in
flight. Each shard's sha256 is in the index; `verify` finds truncated or altered shards and `read`
refuses them.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import time
from pathlib import Path

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from wan_model.files import atomic_write_bytes

CACHE_FORMAT = 1
INDEX_NAME = "index.json"
META_KEY = "wanlora"
REQUIRED_TENSORS = ("latent_mean", "latent_logvar", "context", "context_lens")
INDEX_FLUSH_S = 10.0


class CacheError(RuntimeError):
    """A cache file is missing, corrupt or from another format; the message names it and the fix."""


def entry_key(file_sha256: str, settings: dict) -> str:
    """sha256 of the clip bytes' hash and the settings (canonical JSON: sorted keys, no spaces)."""
    payload = json.dumps({"format": CACHE_FORMAT, "file": file_sha256, "settings": settings},
                         sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(payload.encode("ascii")).hexdigest()


def entry_order(entries: dict[str, dict]) -> list[str]:
    """Cache keys in reading order: by clip id, then window, then key (the same on every machine)."""
    return sorted(entries, key=lambda k: (str(entries[k]["clip_id"]), entries[k]["window"] or 0, k))


def trim_context(context: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """context: [K, L_full, D] zero past each length -> [K, max(lengths), D] (at least 1 position)."""
    return context[:, : max(1, int(lengths.max()))].contiguous()


def pad_context(context: torch.Tensor, text_len: int) -> torch.Tensor:
    """[..., L, D] -> [..., text_len, D], zeros after L: the encoder's own layout (UMT5 output is zeroed
    past the prompt length in the official `wan/modules/t5.py` use)."""
    length = context.shape[-2]
    if length > text_len:
        raise CacheError(f"cached context has {length} positions, more than text_len {text_len}")
    if length == text_len:
        return context
    pad = context.new_zeros(*context.shape[:-2], text_len - length, context.shape[-1])
    return torch.cat([context, pad], dim=-2)


def _header_metadata(data: bytes, where: Path) -> dict:
    """The JSON metadata from a safetensors header (8-byte little-endian length, then JSON)."""
    (size,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + size])
    return json.loads(header.get("__metadata__", {}).get(META_KEY, "{}"))


class LatentCache:
    """Index + shards under `root`. Entries added with `put`; looked up with `has` / `read`."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self.index_path = self.root / INDEX_NAME
        self.entries: dict[str, dict] = self._load_index()
        self._last_save = time.monotonic()
        self.adopted = self._adopt_unlisted()  # keys of shards found on disk but missing from the index

    def _load_index(self) -> dict[str, dict]:
        if not self.index_path.is_file():
            return {}
        try:
            raw = json.loads(self.index_path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise CacheError(f"{self.index_path}: not valid JSON ({err}); delete the cache folder and re-run "
                             f"python -m data.prepare") from None
        if raw.get("format") != CACHE_FORMAT:
            raise CacheError(f"{self.index_path}: cache format {raw.get('format')!r}, this wanlora reads "
                             f"{CACHE_FORMAT}; re-run python -m data.prepare into a new cache_dir")
        return dict(raw["entries"])

    def _adopt_unlisted(self) -> list[str]:
        """Add shards written after the last index save (an interrupted run) back into the index."""
        listed = {record["file"] for record in self.entries.values()}
        adopted = []
        for path in sorted((self.root / "shards").glob("*/*.safetensors")):
            relative = path.relative_to(self.root).as_posix()
            if relative in listed:
                continue
            data = path.read_bytes()
            try:
                meta = _header_metadata(data, path)
                count = int(meta["variants"])
            except (ValueError, KeyError, struct.error):
                continue  # not one of ours; shards are renamed into place whole, so never a partial write
            self.entries[path.stem] = self._record(relative, data, meta, count)
            adopted.append(path.stem)
        return adopted

    @staticmethod
    def _record(relative: str, data: bytes, meta: dict, variants: int) -> dict:
        return {"file": relative, "sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data),
                "clip_id": meta.get("clip_id"), "bucket": meta.get("bucket"), "window": meta.get("window"),
                "variants": variants}

    def save_index(self) -> None:
        data = json.dumps({"format": CACHE_FORMAT, "entries": self.entries}, indent=1, sort_keys=True)
        atomic_write_bytes(self.index_path, data.encode("utf-8"))
        self._last_save = time.monotonic()

    def flush(self, force: bool = False) -> None:
        """Save the index if `force` or INDEX_FLUSH_S seconds have passed since the last save."""
        if force or time.monotonic() - self._last_save >= INDEX_FLUSH_S:
            self.save_index()

    def shard_path(self, key: str) -> Path:
        return self.root / self.entries[key]["file"]

    def has(self, key: str) -> bool:
        return key in self.entries

    def verify(self, key: str) -> str | None:
        """Why entry `key`'s shard cannot be used (missing, wrong size, wrong sha256), or None."""
        record, path = self.entries[key], self.shard_path(key)
        if not path.is_file():
            return f"shard {path} is missing"
        if path.stat().st_size != record["bytes"]:
            return f"shard {path} has {path.stat().st_size} bytes, the index says {record['bytes']} (truncated?)"
        if hashlib.sha256(path.read_bytes()).hexdigest() != record["sha256"]:
            return f"shard {path} does not match its sha256 in {self.index_path} (corrupted)"
        return None

    def put(self, key: str, tensors: dict[str, torch.Tensor], meta: dict) -> None:
        """Write one entry's shard atomically and record it (file, sha256, size, bucket...) in the index,
        which is saved by `flush` (now if INDEX_FLUSH_S have passed)."""
        missing = [name for name in REQUIRED_TENSORS if name not in tensors]
        if missing:
            raise ValueError(f"cache entry {key} lacks tensors {missing}")
        variants = int(tensors["context"].shape[0])
        data = save_safetensors({k: v.detach().cpu().contiguous() for k, v in tensors.items()},
                                metadata={META_KEY: json.dumps({**meta, "variants": variants}, sort_keys=True)})
        relative = f"shards/{key[:2]}/{key}.safetensors"
        atomic_write_bytes(self.root / relative, data)
        self.entries[key] = self._record(relative, data, meta, variants)
        self.flush()

    def remove(self, key: str) -> None:
        """Forget an entry (its shard file is deleted if present)."""
        record = self.entries.pop(key)
        (self.root / record["file"]).unlink(missing_ok=True)

    def read(self, key: str, check: bool = True) -> tuple[dict[str, torch.Tensor], dict]:
        """(tensors, metadata) of entry `key`; check=True refuses a shard whose sha256 differs from the index."""
        record, path = self.entries[key], self.shard_path(key)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise CacheError(f"{path}: cache shard missing; re-run python -m data.prepare") from None
        if check and hashlib.sha256(data).hexdigest() != record["sha256"]:
            raise CacheError(f"{path}: shard does not match its sha256 in {self.index_path} (corrupted or "
                             f"truncated); re-run python -m data.prepare to re-encode it")
        return load_safetensors(data), _header_metadata(data, path)


class JsonTable:
    """A JSON mapping kept in one file, rewritten atomically by `flush` (prepare's measured labels)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.data: dict = {}
        self._last_save = time.monotonic()
        if self.path.is_file():
            try:
                self.data = json.loads(self.path.read_text(encoding="utf-8"))
            except (json.JSONDecodeError, UnicodeDecodeError):
                self.data = {}  # a damaged table only costs re-measuring: start empty, rewrite on flush

    def get(self, key: str):
        return self.data.get(key)

    def put(self, key: str, value) -> None:
        self.data[key] = value

    def flush(self, force: bool = False) -> None:
        """Save if `force` or INDEX_FLUSH_S seconds have passed since the last save."""
        if force or time.monotonic() - self._last_save >= INDEX_FLUSH_S:
            atomic_write_bytes(self.path, json.dumps(self.data, sort_keys=True).encode("utf-8"))
            self._last_save = time.monotonic()
