"""Exact and near-duplicate detection for the code corpus.

* Exact: SHA-1 of the text after newline normalisation and stripping trailing whitespace per line.
* Near: MinHash over shingles of two consecutive normalised lines (whitespace collapsed, blank lines
  dropped), hashed with CRC-32 so signatures are identical across processes and machines;
  `perms` universal hashes `(a·x + b) mod (2^31 − 1)` computed with numpy. Locality-sensitive hashing
  with `bands` bands of `perms / bands` rows proposes candidate pairs; a pair is a duplicate when the
  signatures agree on at least `threshold` of their positions (the estimated Jaccard similarity).
  The first document in corpus order is kept.

Signatures are computed in the worker processes that read the files; `NearDupIndex` runs in the
parent, one dictionary insert per band and document.
"""

from __future__ import annotations

import hashlib
import re
import zlib

import numpy as np

_PRIME = (1 << 31) - 1
_WS = re.compile(r"\s+")


def normalize_for_exact(text: str) -> str:
    return "\n".join(line.rstrip() for line in text.splitlines()).strip()


def exact_key(text: str) -> str:
    return hashlib.sha1(normalize_for_exact(text).encode("utf-8", "surrogatepass")).hexdigest()


def _hash_params(perms: int, seed: int = 0x5EED) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    a = rng.integers(1, _PRIME, size=perms, dtype=np.uint64)
    b = rng.integers(0, _PRIME, size=perms, dtype=np.uint64)
    return a, b


_PARAMS: dict[int, tuple[np.ndarray, np.ndarray]] = {}


def shingles(text: str) -> np.ndarray:
    """32-bit hashes of the document's 2-line shingles (1-line when it has a single line)."""
    lines = [_WS.sub(" ", ln).strip() for ln in text.splitlines()]
    hashes = [zlib.crc32(ln.encode("utf-8", "surrogatepass")) for ln in lines if ln]
    if not hashes:
        return np.zeros(1, dtype=np.uint64)
    h = np.asarray(hashes, dtype=np.uint64)
    if h.size == 1:
        return h
    return ((h[:-1] * np.uint64(1_000_003)) ^ h[1:]) & np.uint64(0xFFFFFFFF)


def minhash(text: str, perms: int = 64) -> np.ndarray:
    """MinHash signature [perms] (uint32) of `text`'s shingles."""
    if perms not in _PARAMS:
        _PARAMS[perms] = _hash_params(perms)
    a, b = _PARAMS[perms]
    x = np.unique(shingles(text))
    sig = np.full(perms, _PRIME, dtype=np.uint64)
    for start in range(0, x.size, 4096):  # bound the [perms, chunk] temporary
        chunk = x[start:start + 4096]
        vals = (a[:, None] * chunk[None, :] + b[:, None]) % np.uint64(_PRIME)
        np.minimum(sig, vals.min(axis=1), out=sig)
    return sig.astype(np.uint32)


class NearDupIndex:
    """LSH index over MinHash signatures; `add` says whether a document duplicates an earlier one."""

    def __init__(self, perms: int = 64, bands: int = 16, threshold: float = 0.8) -> None:
        if perms % bands:
            raise ValueError(f"minhash_perms ({perms}) must be a multiple of lsh_bands ({bands})")
        self.perms, self.bands, self.rows, self.threshold = perms, bands, perms // bands, threshold
        self.tables: list[dict[bytes, int]] = [{} for _ in range(bands)]
        self.signatures: list[np.ndarray] = []

    def add(self, sig: np.ndarray) -> int | None:
        """Insert `sig`; returns the index of the earlier near-duplicate, or None (then it is kept)."""
        if sig.shape != (self.perms,):
            raise ValueError(f"signature has shape {sig.shape}, expected ({self.perms},)")
        keys = [sig[i * self.rows:(i + 1) * self.rows].tobytes() for i in range(self.bands)]
        checked: set[int] = set()
        for band, key in enumerate(keys):
            other = self.tables[band].get(key)
            if other is None or other in checked:
                continue
            checked.add(other)
            if float(np.mean(self.signatures[other] == sig)) >= self.threshold:
                return other
        idx = len(self.signatures)
        self.signatures.append(sig)
        for band, key in enumerate(keys):
            self.tables[band].setdefault(key, idx)
        return None


def estimated_jaccard(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.mean(a == b))


def true_jaccard(text_a: str, text_b: str) -> float:
    sa, sb = set(shingles(text_a).tolist()), set(shingles(text_b).tolist())
    return len(sa & sb) / max(1, len(sa | sb))
