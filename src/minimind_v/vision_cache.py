"""A feature cache for a frozen vision tower (`minimind-v train --vision_cache DIR`): the tower's output for an
image is computed once, the first time a batch holds the image, and read back in later epochs and stages instead
of decoding the image and running the tower again.

Folders. `{root}/{fingerprint}/` holds the features of one tower. The fingerprint hashes the tower's config, every
tensor of its weights and what its arithmetic runs in (device kind, autocast dtype), so a changed tower gets a
folder of its own and never reads stale features. An image's key is a 16-byte BLAKE2b of its encoded bytes, keyed
by the preprocessing settings. Inside a folder each writing process (one per DDP rank) appends to its own files,
created on its first write, so no two processes ever write to the same file:

    layout.json          the shape [L, D] and dtype of a record: the tower's output dtype, so hits are bit-exact
    {writer}.features    fixed-size records, one image's features [L, D] each
    {writer}.index       32-byte entries, one per record: image key, record number, CRC-32 of the record

A writer appends and flushes a record before its index entry. Readers (the DataLoader workers of every process)
follow the index files as they grow, map the feature files read-only and check a record's CRC before using it, so
a record that is not complete (a crash, a network file system lagging behind) reads as a miss, never as wrong
features. `limit_bytes` bounds the feature files of the whole root: once it is reached nothing more is added and
training goes on, computing what is not cached.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import socket
import zlib
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np
import torch

from .weights import unwrap

INDEX_ENTRY = np.dtype([("key", "u1", (16,)), ("record", "<i8"), ("crc", "<u4"), ("unused", "<u4")])
LAYOUT_FILE = "layout.json"


def unusable_reason(vision: bool, objective: str, tower_trains: bool) -> str | None:
    """Why a run cannot use the cache (its tower output is not a fixed function of the image), or None."""
    if not vision:
        return "this stage reads no images"
    if tower_trains:
        return "the vision tower trains (--train_vision 1, or LoRA adapters on it), so its features change every step"
    if objective == "grpo":
        return "GRPO samples its answers with `generate`, which reads pixels"
    if objective == "distill":
        return "the teacher reads the images through its own tower"
    return None


def tower_fingerprint(tower: torch.nn.Module, precision: dict) -> str:
    """16 hex digits hashing the tower's config, each state_dict tensor (name, dtype, shape, bytes) and
    `precision` (what else decides the rounding of its output)."""
    digest = hashlib.blake2b(digest_size=8)
    config = {k: v for k, v in tower.config.to_dict().items() if k != "transformers_version"}
    digest.update(json.dumps({"config": config, "precision": precision}, sort_keys=True).encode())
    for name, tensor in sorted(tower.state_dict().items()):
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def preprocessing_salt(preprocessor) -> bytes:
    """The key of the image hashes: a digest of the settings that turn image bytes into pixels."""
    settings = {
        "size": preprocessor.size,
        "mean": preprocessor.mean,
        "std": preprocessor.std,
        "resample": preprocessor.resample,
    }
    return hashlib.blake2b(json.dumps(settings, sort_keys=True).encode(), digest_size=32).digest()


def cache_bytes(root: str) -> int:
    """Bytes of every feature file under `root`, all towers."""
    folders = [entry.path for entry in os.scandir(root) if entry.is_dir()]
    return sum(
        entry.stat().st_size for folder in folders for entry in os.scandir(folder) if entry.name.endswith(".features")
    )


@dataclass
class CachedImages:
    """The cache's answer for a document's N images: keys [N, 16] uint8, hit [N] bool, and the features of the
    hits [N_hit, L, D] in reading order (None without hits)."""

    keys: np.ndarray
    hit: np.ndarray
    features: torch.Tensor | None


class FeatureReader:
    """Looks images up in one tower's folder. Works in any process: it pickles without its maps and index."""

    def __init__(self, folder: str, salt: bytes):
        self.folder, self.salt = folder, salt
        self._forget()

    def __getstate__(self) -> dict:
        return {"folder": self.folder, "salt": self.salt}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._forget()

    def _forget(self) -> None:
        self.entries: dict[bytes, tuple[str, int, int]] = {}  # key -> (writer, record, crc)
        self.index_read: dict[str, int] = {}  # writer -> bytes of its index read so far
        self.maps: dict[str, np.memmap] = {}
        self.layout: tuple[tuple[int, ...], torch.dtype, int] | None = None  # shape, dtype, bytes per record

    def __len__(self) -> int:
        return len(self.entries)

    def keys(self, images: list[bytes]) -> np.ndarray:
        """Keys [N, 16] uint8 of encoded images."""
        digests = b"".join(hashlib.blake2b(data, digest_size=16, key=self.salt).digest() for data in images)
        return np.frombuffer(digests, dtype=np.uint8).reshape(-1, 16)

    def lookup(self, images: list[bytes]) -> CachedImages:
        """What the folder holds of these encoded images; a miss first reads the entries written since."""
        keys = self.keys(images)
        found = [self._features(key.tobytes()) for key in keys]
        if any(features is None for features in found):
            self.refresh()
            found = [
                self._features(key.tobytes()) if features is None else features for key, features in zip(keys, found)
            ]
        hits = [features for features in found if features is not None]
        return CachedImages(
            keys, np.array([features is not None for features in found]), torch.stack(hits) if hits else None
        )

    def refresh(self) -> None:
        """Read the index entries appended since the last refresh (whole entries only); a later entry of a key
        replaces an earlier one."""
        for name in os.listdir(self.folder):
            if not name.endswith(".index"):
                continue
            writer = name.removesuffix(".index")
            with open(os.path.join(self.folder, name), "rb") as f:
                f.seek(self.index_read.get(writer, 0))
                tail = f.read()
            entries = np.frombuffer(tail[: len(tail) - len(tail) % INDEX_ENTRY.itemsize], dtype=INDEX_ENTRY)
            self.index_read[writer] = self.index_read.get(writer, 0) + entries.nbytes
            for key, record, crc in zip(entries["key"], entries["record"].tolist(), entries["crc"].tolist()):
                self.entries[key.tobytes()] = (writer, record, crc)

    def _features(self, key: bytes) -> torch.Tensor | None:
        """The features [L, D] stored under `key`, or None: absent, or a record not (yet) complete."""
        if key not in self.entries:
            return None
        writer, record, crc = self.entries[key]
        shape, dtype, size = self._layout()
        mapped = self._map(writer, (record + 1) * size)
        if mapped is None:
            return None
        payload = np.array(mapped[record * size : (record + 1) * size])
        if zlib.crc32(payload) != crc:
            return None
        return torch.from_numpy(payload).view(dtype).view(shape)

    def _layout(self) -> tuple[tuple[int, ...], torch.dtype, int]:
        if self.layout is None:
            with open(os.path.join(self.folder, LAYOUT_FILE), encoding="utf-8") as f:
                layout = json.load(f)
            dtype = getattr(torch, layout["dtype"])
            self.layout = tuple(layout["shape"]), dtype, int(np.prod(layout["shape"])) * dtype.itemsize
        return self.layout

    def _map(self, writer: str, size: int) -> np.memmap | None:
        """A read-only map of the writer's feature file holding at least `size` bytes, or None."""
        mapped = self.maps.get(writer)
        if mapped is None or len(mapped) < size:
            path = os.path.join(self.folder, f"{writer}.features")
            if os.path.getsize(path) < size:
                return None
            mapped = self.maps[writer] = np.memmap(path, dtype=np.uint8, mode="r")
        return mapped


class FeatureWriter:
    """Appends features to this process's own files in one tower's folder while the root stays under
    `limit_bytes`. Features on a GPU are copied to the host without waiting and written by a later call, once
    the copy is done, so writing never synchronises the device."""

    def __init__(self, folder: str, limit_bytes: int, log: Callable[[str], None]):
        self.folder, self.limit_bytes, self.log = folder, limit_bytes, log
        self.name = f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(4)}"
        self.pending: deque = deque()  # (keys [n, 16], host features [n, L, D], copy-done event or None)
        self.files = None
        self.records = 0
        self.full = False

    def add(self, keys: np.ndarray, features: torch.Tensor) -> None:
        """Queue the features [n, L, D] (any device) of the images with keys [n, 16]; each key is written once."""
        if self.full:
            return
        host = features.detach().to("cpu", non_blocking=True)  # from a GPU: into pinned memory, not waited for
        copied = None
        if features.is_cuda:
            copied = torch.cuda.Event()
            copied.record()
        self.pending.append((keys, host, copied))
        self.write_ready()

    def write_ready(self) -> None:
        """Write the queued features whose copy to the host is done."""
        while self.pending and (self.pending[0][2] is None or self.pending[0][2].query()):
            keys, features, _ = self.pending.popleft()
            self._write(keys, features)

    def _write(self, keys: np.ndarray, features: torch.Tensor) -> None:
        keys, first = np.unique(keys, axis=0, return_index=True)  # a preference pair holds its images twice
        records = features.reshape(len(features), -1).view(torch.uint8).numpy()[first]  # [n, bytes per record]
        root = os.path.dirname(self.folder)
        if cache_bytes(root) + records.nbytes > self.limit_bytes:
            self._stop(f"it holds {self.limit_bytes / 1e9:g} GB (--vision_cache_gb)")
            return
        entries = np.zeros(len(keys), dtype=INDEX_ENTRY)
        entries["key"] = keys
        entries["record"] = np.arange(self.records, self.records + len(keys))
        entries["crc"] = [zlib.crc32(record) for record in records]
        try:
            features_file, index_file = self.files or self._open(features)
            features_file.write(records.tobytes())
            features_file.flush()
            index_file.write(entries.tobytes())
            index_file.flush()
        except OSError as err:
            self._stop(f"writing failed ({err})")
            return
        self.records += len(keys)

    def _open(self, features: torch.Tensor) -> tuple:
        """This writer's files, after `layout.json` (the first writer of a folder writes it)."""
        layout_path = os.path.join(self.folder, LAYOUT_FILE)
        if not os.path.exists(layout_path):
            temporary = f"{layout_path}.{self.name}.tmp"
            with open(temporary, "w", encoding="utf-8") as f:
                json.dump({"shape": list(features.shape[1:]), "dtype": str(features.dtype).removeprefix("torch.")}, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(temporary, layout_path)
        base = os.path.join(self.folder, self.name)
        self.files = open(f"{base}.features", "ab"), open(f"{base}.index", "ab")  # noqa: SIM115 (open for the run)
        return self.files

    def _stop(self, why: str) -> None:
        self.full = True
        self.pending.clear()
        self.log(f"vision cache: adding no more features, {why}; images it lacks are computed as without a cache")


class CachedTowerObjective:
    """An objective whose batches carry what the cache holds of their images (`Batch.lookup`). The images it
    lacks go through the model's tower (inside the loop's autocast, as without a cache) and are queued for
    writing; the objective then sees the batch with `image_features`, every image's tower output, and no pixels."""

    def __init__(self, objective, writer: FeatureWriter):
        self.objective, self.writer = objective, writer
        self.metrics = objective.metrics

    def count(self, batch) -> torch.Tensor:
        return self.objective.count(batch)

    def __call__(self, model, batch):
        self.writer.write_ready()
        if batch.lookup is not None:
            batch = replace(batch, pixel_values=None, image_features=self.features(unwrap(model), batch))
        return self.objective(model, batch)

    def features(self, model, batch) -> list[torch.Tensor]:
        """Every image's tower output: R tensors [N_r, L, D], the images of row r in reading order."""
        lookup = batch.lookup
        parts = [] if lookup.hits is None else [lookup.hits]
        if len(lookup.miss_keys):
            with torch.no_grad():
                computed = model.encode_images(torch.cat(batch.pixel_values))
            self.writer.add(lookup.miss_keys, computed)
            parts.append(computed)
        return list(torch.cat(parts)[lookup.slots].split(lookup.row_counts))


@dataclass
class VisionCache:
    """One run's cache of one tower: `reader` for the data workers, `writer` for the training process."""

    folder: str
    reader: FeatureReader
    writer: FeatureWriter

    def wrap(self, objective) -> CachedTowerObjective:
        return CachedTowerObjective(objective, self.writer)


def open_cache(
    *,
    root: str,
    tower: torch.nn.Module,
    preprocessor,
    device_type: str,
    autocast: str,
    limit_bytes: int,
    log: Callable[[str], None],
) -> VisionCache:
    """The folder of this tower under `root` (created), with a reader that has read its index."""
    precision = {"device": device_type, "autocast": autocast}
    folder = os.path.join(root, tower_fingerprint(tower, precision))
    os.makedirs(folder, exist_ok=True)
    reader = FeatureReader(folder, preprocessing_salt(preprocessor))
    reader.refresh()
    return VisionCache(folder, reader, FeatureWriter(folder, limit_bytes, log))
