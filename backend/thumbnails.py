"""Small JPEG thumbnails of task images for the review pages, cached on disk with a size bound.

Images come only through the backend's ImageFetcher (its auth, allow-list, SSRF and size
rules); the cache lives under MODEL_DIR (never in the vector store) and forgets the least
recently used thumbnails once it holds more than its bound.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import threading
from pathlib import Path

from PIL import Image

from echolabel.images import ImageFetcher

THUMBNAIL_SIDE = 256


class ThumbnailCache:
    def __init__(
        self, directory: Path, fetcher: ImageFetcher, max_bytes: int, side: int = THUMBNAIL_SIDE
    ) -> None:
        self._dir = directory
        self._fetcher = fetcher
        self._max_bytes = max_bytes
        self._side = side
        self._lock = threading.Lock()
        self._total: int | None = None  # bytes on disk, counted on first use

    def get(self, image_ref: str) -> bytes:
        """The thumbnail of the image `image_ref` names (ImageError when it cannot be read)."""
        path = self._path(image_ref)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            pass
        else:
            # Recently used: evicted last (unless another request evicted it meanwhile).
            with contextlib.suppress(FileNotFoundError):
                os.utime(path)
            return data
        data = self._render(image_ref)
        self._store(path, data)
        return data

    def size_on_disk(self) -> int:
        return sum(p.stat().st_size for p in self._files())

    def _path(self, image_ref: str) -> Path:
        key = hashlib.sha256(f"{self._side}\n{image_ref}".encode()).hexdigest()
        return self._dir / f"{key}.jpg"

    def _render(self, image_ref: str) -> bytes:
        image = self._fetcher.load(image_ref, min_side=self._side)
        image.thumbnail((self._side, self._side), Image.Resampling.LANCZOS)
        buffer = io.BytesIO()
        image.convert("RGB").save(buffer, format="JPEG", quality=80)
        return buffer.getvalue()

    def _store(self, path: Path, data: bytes) -> None:
        self._dir.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{threading.get_ident()}.tmp")
        tmp.write_bytes(data)
        os.replace(tmp, path)  # readers never see half a file
        with self._lock:
            if self._total is None:
                self._total = self.size_on_disk()
            else:
                self._total += len(data)
            if self._total > self._max_bytes:
                self._total = self._evict(keep=path)

    def _evict(self, keep: Path) -> int:
        """Delete the least recently used thumbnails down to 90 % of the bound."""
        files = []
        for file in self._files():
            try:
                files.append((file.stat().st_mtime, file.stat().st_size, file))
            except FileNotFoundError:
                continue
        total = sum(size for _, size, _ in files)
        for _, size, file in sorted(files):
            if total <= self._max_bytes * 0.9:
                break
            if file == keep:
                continue
            file.unlink(missing_ok=True)
            total -= size
        return total

    def _files(self) -> list[Path]:
        return list(self._dir.glob("*.jpg")) if self._dir.exists() else []
