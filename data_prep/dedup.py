"""Global deduplication over the small (key, content hash, perceptual hash) table of every source of a job.

What is hashed: exact image duplicates share the SHA-256 of their decoded, EXIF-oriented RGB pixels and size
(``imaging.content_hash``), so a re-saved file with other metadata is exact; near duplicates have 64-bit
pHashes (of the normalised image) within ``max_hamming`` bits, which catches resized and re-encoded copies;
text-only samples are exact duplicates when their stripped text has the same SHA-256.

The representative is the first sample in job order: sources in config order, then each source's input
order. Every later copy is dropped as a duplicate of the kept key. Near-duplicate search uses multi-index
hashing: with the 64 bits cut into ``max_hamming + 1`` chunks, two hashes within the radius agree exactly
on at least one chunk (pigeonhole), so only samples sharing a chunk are compared.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from data_prep.imaging import hamming


@dataclass(kw_only=True)
class DedupConfig:
    exact: bool = True
    """Drop exact image duplicates (same decoded pixels) across all sources."""
    near: bool = True
    """Drop near-duplicate images (pHash within max_hamming bits) across all sources."""
    max_hamming: int = 4
    """Largest Hamming distance between 64-bit pHashes that counts as a near duplicate (0..16)."""
    text: bool = True
    """Drop exact duplicate texts in text-only sources."""

    def __post_init__(self) -> None:
        if not 0 <= self.max_hamming <= 16:
            raise ValueError(f"dedup.max_hamming must be in 0..16, got {self.max_hamming}")


class MultiIndexHash:
    """Radius search over 64-bit hashes by exact lookups on ``radius + 1`` disjoint bit chunks."""

    def __init__(self, radius: int) -> None:
        self.radius = radius
        bounds = np.linspace(0, 64, radius + 2).astype(int)
        self.chunks = [(int(lo), (1 << int(hi - lo)) - 1) for lo, hi in itertools.pairwise(bounds)]
        self.tables: list[dict[int, list[int]]] = [{} for _ in self.chunks]
        self.values: dict[int, int] = {}

    def add(self, value: int, ident: int) -> None:
        self.values[ident] = value
        for table, (shift, mask) in zip(self.tables, self.chunks, strict=True):
            table.setdefault((value >> shift) & mask, []).append(ident)

    def query(self, value: int) -> int | None:
        """The smallest ident whose hash is within the radius, or None."""
        best: int | None = None
        for table, (shift, mask) in zip(self.tables, self.chunks, strict=True):
            for ident in table.get((value >> shift) & mask, ()):
                if (best is None or ident < best) and hamming(self.values[ident], value) <= self.radius:
                    best = ident
        return best


def find_duplicates(
    keys: Sequence[str],
    content_hashes: Sequence[str | None],
    phashes: Sequence[int | None],
    cfg: DedupConfig,
    participates: Sequence[bool] | None = None,
) -> list[tuple[str, str] | None]:
    """Candidates in job order -> per candidate None (kept) or (reason, key of the kept copy).

    Samples with a pHash are images; samples without one are text-only (their content hash is a text hash).
    Reasons: duplicate_key (same key twice in a source), duplicate_exact, duplicate_near, duplicate_text.
    Samples whose ``participates`` flag is False (sources with ``dedup: false``) are neither dropped as
    copies nor kept as representatives; only duplicate keys apply to them.
    """
    out: list[tuple[str, str] | None] = [None] * len(keys)
    seen_key: set[str] = set()
    seen_image: dict[str, int] = {}
    seen_text: dict[str, int] = {}
    index = MultiIndexHash(cfg.max_hamming)
    for i, (key, chash, ph) in enumerate(zip(keys, content_hashes, phashes, strict=True)):
        if key in seen_key:
            out[i] = ("duplicate_key", key)
            continue
        seen_key.add(key)
        if participates is not None and not participates[i]:
            continue
        if ph is None:
            if cfg.text and chash is not None and chash in seen_text:
                out[i] = ("duplicate_text", keys[seen_text[chash]])
            elif chash is not None:
                seen_text.setdefault(chash, i)
            continue
        if cfg.exact and chash in seen_image:
            out[i] = ("duplicate_exact", keys[seen_image[chash]])
            continue
        match = index.query(ph) if cfg.near else None
        if match is not None:
            out[i] = ("duplicate_near", keys[match])
            continue
        seen_image.setdefault(chash, i)
        index.add(ph, i)
    return out
