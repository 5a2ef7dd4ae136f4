"""Reductions of per-example LoRA gradients to feature vectors: one registry, one small class per method.

Every reduction is a fixed linear map applied to each example on its own (no batch statistics), so features
do not depend on how examples are batched, and every reduction is reproducible from its `state()` (the seed
for random ones, the saved basis for fitted ones):

- `none`: the flat gradient itself (dim = D);
- `gaussian` / `rademacher`: a dense `[D, k]` projection scaled by 1/√k, generated block by block of rows
  from the seed, so the matrix is never held whole and every worker regenerates the same blocks;
- `sjlt`: sparse JL: each input coordinate goes to `s` random output buckets with random signs (O(nnz));
- `pca`: the top-k right singular vectors of a sample of training gradients (randomized SVD);
- `kron`: LoGra-style per-module projection of layer inputs and output gradients before the outer product.
"""

from __future__ import annotations

import hashlib
import json
import math
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor

from trustray.core.influence.gradients import GradientBatch

STATE_FILE = "reduction.json"

Sample = list[GradientBatch] | Tensor


def _sub_seed(seed: int, *keys: int | str) -> int:
    """A stable 63-bit seed for (seed, keys): the same on every machine and Python process (unlike `hash`)."""
    digest = hashlib.blake2b(repr((seed, *keys)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def _flat(batch: GradientBatch | Tensor) -> Tensor:
    return batch.flat() if isinstance(batch, GradientBatch) else batch.float()


def _sample_matrix(sample: Sample) -> Tensor:
    if isinstance(sample, Tensor):
        return sample.float()
    return torch.cat([batch.flat() for batch in sample])


def _sha256(arrays: dict[str, np.ndarray]) -> str:
    digest = hashlib.sha256()
    for key in sorted(arrays):
        digest.update(key.encode())
        digest.update(np.ascontiguousarray(arrays[key], dtype=np.float32).tobytes())
    return digest.hexdigest()


def _fix_signs(basis: Tensor) -> Tensor:
    """Make each column's largest-magnitude entry positive: singular vectors are only defined up to sign."""
    rows = basis.abs().argmax(dim=0)
    signs = torch.sign(basis[rows, torch.arange(basis.shape[1])])
    return basis * torch.where(signs == 0, 1.0, signs)


class Reduction(ABC):
    """Base class: `fit` (a no-op unless fitted), `transform`, `state`, `save`/`load`."""

    name: ClassVar[str]
    fitted: ClassVar[bool] = False

    def __init__(self, dim: int | None, seed: int = 0, input_dim: int | None = None, **options: Any) -> None:
        if dim is not None and dim < 1:
            raise ValueError(f"{self.name}: dim must be positive, got {dim}")
        self.dim = dim
        self.seed = int(seed)
        self.input_dim = input_dim
        self.options = options
        self._is_fit = not self.fitted

    def _bind(self, input_dim: int) -> None:
        """Fix the input size on first use; a later input of another size is an error, not a silent remap."""
        if self.input_dim is None:
            self.input_dim = input_dim
        elif self.input_dim != input_dim:
            raise ValueError(f"{self.name}: built for input dim {self.input_dim}, got {input_dim}")

    def fit(self, sample: Sample) -> Reduction:
        self._bind(sample.shape[1] if isinstance(sample, Tensor) else sample[0].dim)
        return self

    def transform(self, batch: GradientBatch | Tensor) -> Tensor:
        if not self._is_fit:
            raise RuntimeError(f"{self.name}: call fit() on a sample of gradients before transform()")
        flat = _flat(batch)
        self._bind(flat.shape[1])
        return self._project(flat).float()

    @abstractmethod
    def _project(self, flat: Tensor) -> Tensor:
        """Map flat per-example gradients `[B, D]` to features `[B, dim]`."""

    def _arrays(self) -> dict[str, np.ndarray]:
        """Fitted parameters to save; empty for reductions reproducible from the seed alone."""
        return {}

    def _set_arrays(self, arrays: dict[str, np.ndarray]) -> None:
        self._is_fit = True

    def state(self) -> dict[str, Any]:
        """JSON-able description for `metadata.json`: enough (with the saved arrays) to rebuild this reduction."""
        state: dict[str, Any] = {
            "name": self.name, "dim": self.dim, "seed": self.seed, "input_dim": self.input_dim,
            "options": dict(self.options),
        }
        if self.fitted:
            if not self._is_fit:
                raise RuntimeError(f"{self.name}: not fitted yet, so it has no state to record")
            state["basis_sha256"] = _sha256(self._arrays())
        return state

    def save(self, folder: str | Path) -> None:
        """Write `reduction.json` and, for fitted reductions, one `.npy` per basis array."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        state = self.state()
        for key, array in (self._arrays() if self.fitted else {}).items():
            np.save(folder / f"reduction_{key}.npy", np.ascontiguousarray(array, dtype=np.float32))
        (folder / STATE_FILE).write_text(json.dumps(state, indent=2))

    @classmethod
    def load(cls, folder: str | Path) -> Reduction:
        """Rebuild whichever reduction `save` wrote to `folder`, checking the basis hash."""
        folder = Path(folder)
        state = json.loads((folder / STATE_FILE).read_text())
        reduction = build_reduction(
            state["name"], state["dim"], state["seed"], input_dim=state["input_dim"], **state["options"]
        )
        if reduction.fitted:
            arrays = {
                path.name[len("reduction_") : -len(".npy")]: np.load(path)
                for path in sorted(folder.glob("reduction_*.npy"))
            }
            if _sha256(arrays) != state["basis_sha256"]:
                raise ValueError(f"{folder}: saved basis does not match the sha256 in {STATE_FILE}")
            reduction._set_arrays(arrays)
        return reduction


class NoReduction(Reduction):
    """The flat LoRA gradient (dim = D)."""

    name = "none"

    def __init__(self, dim: int | None = None, seed: int = 0, input_dim: int | None = None, **options: Any) -> None:
        super().__init__(input_dim, seed, input_dim, **options)

    def _bind(self, input_dim: int) -> None:
        super()._bind(input_dim)
        self.dim = input_dim

    def _project(self, flat: Tensor) -> Tensor:
        return flat


class DenseRandomProjection(Reduction):
    """A dense `[D, k]` random matrix / √k, generated `block_rows` rows at a time from (seed, block index).

    Blocks are drawn on `generator_device` ("cpu" or "cuda"): the two generators give different, equally valid
    matrices, so every worker of one run must use the same setting (it is part of `state()`). If the whole
    matrix fits in `max_cache_bytes` it is kept after the first batch; otherwise blocks are regenerated per
    batch (the cost then scales with D·k, independent of the batch size).
    """

    name = "gaussian"

    def __init__(
        self,
        dim: int,
        seed: int = 0,
        input_dim: int | None = None,
        block_rows: int = 1024,
        generator_device: str = "cpu",
        max_cache_bytes: int = 2**30,
    ) -> None:
        super().__init__(dim, seed, input_dim, block_rows=block_rows, generator_device=generator_device)
        self.max_cache_bytes = max_cache_bytes
        self._cache: dict[int, Tensor] = {}

    def _draw(self, rows: int, generator: torch.Generator, device: str) -> Tensor:
        return torch.randn(rows, self.dim, generator=generator, device=device)

    def block(self, index: int, device: torch.device | str = "cpu") -> Tensor:
        """Rows `[index·block_rows, (index+1)·block_rows)` of the scaled matrix, on `device`."""
        if index in self._cache:
            return self._cache[index].to(device)
        block_rows, generator_device = self.options["block_rows"], self.options["generator_device"]
        rows = min(block_rows, self.input_dim - index * block_rows)
        generator = torch.Generator(device=generator_device).manual_seed(_sub_seed(self.seed, index))
        block = (self._draw(rows, generator, generator_device) / math.sqrt(self.dim)).to(device)
        if self.input_dim * self.dim * 4 <= self.max_cache_bytes:
            self._cache[index] = block
        return block

    def _project(self, flat: Tensor) -> Tensor:
        block_rows = self.options["block_rows"]
        out = torch.zeros(flat.shape[0], self.dim, device=flat.device)
        for index in range(math.ceil(self.input_dim / block_rows)):
            start = index * block_rows
            out.addmm_(flat[:, start : start + block_rows], self.block(index, flat.device))
        return out


class RademacherProjection(DenseRandomProjection):
    """Like `gaussian` with ±1 entries (scaled by 1/√k)."""

    name = "rademacher"

    def _draw(self, rows: int, generator: torch.Generator, device: str) -> Tensor:
        bits = torch.randint(0, 2, (rows, self.dim), generator=generator, device=device)
        return bits.float().mul_(2).sub_(1)


class SparseJLProjection(Reduction):
    """Sparse JL: input coordinate j adds ±x_j/√s to `s` buckets drawn (with replacement) from (seed, block).

    Bucket indices and signs are generated on the CPU per block of `block_rows` coordinates (so every device
    agrees) and cached: D·s int64 indices, small next to the gradients.
    """

    name = "sjlt"

    def __init__(
        self, dim: int, seed: int = 0, input_dim: int | None = None, s: int = 4, block_rows: int = 65536,
        chunk: int = 2**20,
    ) -> None:
        super().__init__(dim, seed, input_dim, s=s, block_rows=block_rows)
        self.chunk = chunk
        self._tables: dict[str, tuple[Tensor, Tensor]] = {}

    def tables(self, device: torch.device | str = "cpu") -> tuple[Tensor, Tensor]:
        """`(buckets [D, s] int64, signs [D, s] float32 already scaled by 1/√s)` on `device`."""
        key = str(device)
        if key not in self._tables:
            s, block_rows = self.options["s"], self.options["block_rows"]
            buckets, signs = [], []
            for index in range(math.ceil(self.input_dim / block_rows)):
                rows = min(block_rows, self.input_dim - index * block_rows)
                generator = torch.Generator().manual_seed(_sub_seed(self.seed, index))
                buckets.append(torch.randint(0, self.dim, (rows, s), generator=generator))
                signs.append(torch.randint(0, 2, (rows, s), generator=generator).float().mul_(2).sub_(1))
            scale = 1 / math.sqrt(s)
            self._tables[key] = (torch.cat(buckets).to(device), (torch.cat(signs) * scale).to(device))
        return self._tables[key]

    def _project(self, flat: Tensor) -> Tensor:
        buckets, signs = self.tables(flat.device)
        out = torch.zeros(flat.shape[0], self.dim, device=flat.device)
        # Chunks of coordinates bound the [B, chunk, s] temporary.
        for start in range(0, self.input_dim, self.chunk):
            stop = min(start + self.chunk, self.input_dim)
            values = flat[:, start:stop].unsqueeze(-1) * signs[start:stop]
            out.index_add_(1, buckets[start:stop].flatten(), values.flatten(1))
        return out


class PCAReduction(Reduction):
    """Top-`dim` principal directions of a sample of training gradients, orthonormal `[D, dim]`.

    By default the basis is fitted on the raw (uncentred) gradients and applied as `x @ basis`: that subspace
    best reconstructs the gradients themselves, so projected inner products and cosines approximate the exact
    LESS scores (centring would drop the mean gradient direction, which dominates cosine similarity). With
    `center=True` the sample mean is subtracted before fitting and before projecting (a covariance PCA, whose
    features score correlation rather than cosine). Fitted by randomized SVD (`torch.pca_lowrank`) under a
    seeded RNG, with signs fixed, so a refit on the same sample gives the same basis.
    """

    name = "pca"
    fitted = True

    def __init__(
        self, dim: int, seed: int = 0, input_dim: int | None = None, center: bool = False, niter: int = 4,
        oversample: int = 10,
    ) -> None:
        super().__init__(dim, seed, input_dim, center=center, niter=niter, oversample=oversample)
        self.basis: Tensor | None = None
        self.mean: Tensor | None = None

    def fit(self, sample: Sample) -> PCAReduction:
        matrix = _sample_matrix(sample)
        self._bind(matrix.shape[1])
        n, d = matrix.shape
        if self.dim > min(n, d):
            raise ValueError(f"pca: dim {self.dim} exceeds the rank bound min(sample size {n}, D {d})")
        center = self.options["center"]
        self.mean = matrix.mean(dim=0) if center else None
        q = min(self.dim + self.options["oversample"], n, d)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            _, _, v = torch.pca_lowrank(matrix, q=q, center=center, niter=self.options["niter"])
        self.basis = _fix_signs(v[:, : self.dim]).contiguous()
        self._is_fit = True
        return self

    def _project(self, flat: Tensor) -> Tensor:
        basis = self.basis.to(flat.device)
        if self.mean is not None:
            flat = flat - self.mean.to(flat.device)
        return flat @ basis

    def _arrays(self) -> dict[str, np.ndarray]:
        arrays = {"basis": self.basis.cpu().numpy()}
        if self.mean is not None:
            arrays["mean"] = self.mean.cpu().numpy()
        return arrays

    def _set_arrays(self, arrays: dict[str, np.ndarray]) -> None:
        self.basis = torch.from_numpy(arrays["basis"])
        self.mean = torch.from_numpy(arrays["mean"]) if "mean" in arrays else None
        super()._set_arrays(arrays)


def kron_split(dim: int, shapes: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Per-module `(k_in, k_out)` for a total budget of `dim` over modules of `(in, out)` shape.

    Modules are visited in order; each gets the budget b = remaining // modules left, split near-square:
    k_out = min(out, ⌊√b⌋), k_in = min(in, b // k_out), then k_out = min(out, b // k_in) so a side capped by its
    size passes its share to the other. What a module cannot use (b not a product within its shape) carries
    over to the next ones, so the total never exceeds `dim` and falls short of it by at most the last
    modules' rounding (a budget above in·out keeps that module whole).
    """
    if dim < len(shapes):
        raise ValueError(f"kron: dim {dim} is below the number of LoRA modules ({len(shapes)})")
    split, remaining = [], dim
    for index, (size_in, size_out) in enumerate(shapes):
        budget = remaining // (len(shapes) - index)
        k_out = min(size_out, max(1, math.isqrt(budget)))
        k_in = min(size_in, max(1, budget // k_out))
        k_out = min(size_out, max(1, budget // k_in))
        split.append((k_in, k_out))
        remaining -= k_in * k_out
    return split


class KroneckerProjection(Reduction):
    """LoGra: per module, features `(P_outᵀ G P_in)` with G = Σ_t g_t x_tᵀ, computed as Σ_t (P_outᵀ g_t)(P_inᵀ x_t)ᵀ.

    Needs `GradientBatch` input (the factors, not the flat gradient). Module shapes are taken from the first
    batch (or `fit`) unless given as `shapes`; `dim` becomes the actual total of `kron_split`. `init="random"`
    draws Gaussian `P` / √k per module and side from the seed (a side kept whole uses the identity);
    `init="pca"` fits `P_in` / `P_out` as the top eigenvectors of each module's uncentred input and
    output-gradient second moments over the sample's real (unpadded) positions.
    """

    name = "kron"

    def __init__(
        self, dim: int, seed: int = 0, input_dim: int | None = None, init: str = "random",
        shapes: list[list[int]] | None = None,
    ) -> None:
        if init not in ("random", "pca"):
            raise ValueError(f"kron: init must be 'random' or 'pca', got {init!r}")
        super().__init__(dim, seed, input_dim, init=init, shapes=shapes)
        self.requested_dim = dim
        self.fitted = init == "pca"
        self._is_fit = not self.fitted
        self.projections: list[tuple[Tensor, Tensor]] = []
        if shapes is not None:
            self._bind_shapes([tuple(shape) for shape in shapes])

    def _bind_shapes(self, shapes: list[tuple[int, int]]) -> None:
        if self.options["shapes"] is not None and [tuple(s) for s in self.options["shapes"]] != shapes:
            raise ValueError(f"kron: built for module shapes {self.options['shapes']}, got {shapes}")
        self.options["shapes"] = [list(shape) for shape in shapes]
        self.split = kron_split(self.requested_dim, shapes)
        self.dim = sum(k_in * k_out for k_in, k_out in self.split)
        self._bind(sum(size_in * size_out for size_in, size_out in shapes))
        if not self.fitted and not self.projections:
            self.projections = [
                (self._random(index, "in", size_in, k_in), self._random(index, "out", size_out, k_out))
                for index, ((size_in, size_out), (k_in, k_out)) in enumerate(zip(shapes, self.split, strict=True))
            ]

    def _random(self, index: int, side: str, size: int, k: int) -> Tensor:
        if k == size:
            return torch.eye(size)
        generator = torch.Generator().manual_seed(_sub_seed(self.seed, index, side))
        return torch.randn(size, k, generator=generator) / math.sqrt(k)

    @staticmethod
    def _shapes(batch: GradientBatch) -> list[tuple[int, int]]:
        return [(x.shape[-1], g.shape[-1]) for x, g in batch.factors.values()]

    def fit(self, sample: Sample) -> KroneckerProjection:
        if isinstance(sample, Tensor):
            raise TypeError("kron: fit needs GradientBatch objects (layer inputs and output gradients)")
        self._bind_shapes(self._shapes(sample[0]))
        if not self.fitted:
            return self
        moments: list[list[Tensor]] | None = None
        for batch in sample:
            real = batch.mask.bool() if batch.mask is not None else None
            sums = []
            for x, g in batch.factors.values():
                rows_x, rows_g = (t[real] if real is not None else t.flatten(0, 1) for t in (x, g))
                # float64: second moments summed over many tokens lose the small eigenvalues in float32.
                rows_x, rows_g = rows_x.double(), rows_g.double()
                sums.append([rows_x.T @ rows_x, rows_g.T @ rows_g])
            moments = sums if moments is None else [[a + b for a, b in zip(m, s, strict=True)]
                                                    for m, s in zip(moments, sums, strict=True)]
        self.projections = [
            (self._top_eigenvectors(m_in, k_in), self._top_eigenvectors(m_out, k_out))
            for (m_in, m_out), (k_in, k_out) in zip(moments, self.split, strict=True)
        ]
        self._is_fit = True
        return self

    @staticmethod
    def _top_eigenvectors(moment: Tensor, k: int) -> Tensor:
        _, vectors = torch.linalg.eigh(moment)
        return _fix_signs(vectors[:, -k:].flip(-1).float()).contiguous()

    def _project(self, flat: Tensor) -> Tensor:
        raise TypeError("kron: transform needs a GradientBatch (layer inputs and output gradients), not flat gradients")

    def transform(self, batch: GradientBatch | Tensor) -> Tensor:
        if not isinstance(batch, GradientBatch):
            return self._project(batch)
        if not self._is_fit:
            raise RuntimeError("kron: init='pca' needs fit() on a sample of gradients before transform()")
        self._bind_shapes(self._shapes(batch))
        parts = []
        for (x, g), (p_in, p_out) in zip(batch.factors.values(), self.projections, strict=True):
            x_proj = x @ p_in.to(x.device)
            g_proj = g @ p_out.to(g.device)
            parts.append(torch.einsum("bto,bti->boi", g_proj, x_proj).flatten(1))
        return torch.cat(parts, dim=1).float()

    def _arrays(self) -> dict[str, np.ndarray]:
        arrays = {}
        for index, (p_in, p_out) in enumerate(self.projections):
            arrays[f"{index:04d}_in"] = p_in.cpu().numpy()
            arrays[f"{index:04d}_out"] = p_out.cpu().numpy()
        return arrays

    def _set_arrays(self, arrays: dict[str, np.ndarray]) -> None:
        count = len(self.split)
        self.projections = [
            (torch.from_numpy(arrays[f"{i:04d}_in"]), torch.from_numpy(arrays[f"{i:04d}_out"])) for i in range(count)
        ]
        super()._set_arrays(arrays)

    def state(self) -> dict[str, Any]:
        state = super().state()
        state["dim"] = self.requested_dim
        state["actual_dim"] = self.dim
        return state


REDUCTIONS: dict[str, type[Reduction]] = {
    cls.name: cls
    for cls in (NoReduction, DenseRandomProjection, RademacherProjection, SparseJLProjection, PCAReduction,
                KroneckerProjection)
}


def build_reduction(name: str, dim: int | None, seed: int = 0, **options: Any) -> Reduction:
    """Build a registered reduction; `options` are the class's keyword arguments (e.g. `s`, `center`, `init`)."""
    if name not in REDUCTIONS:
        raise ValueError(f"unknown reduction {name!r}; choose one of {sorted(REDUCTIONS)}")
    return REDUCTIONS[name](dim=dim, seed=seed, **options)
