"""MALMEN's least-squares combination of per-token value shifts, and its backward through the normal equation.

MALMEN asks every cached key k_j (a row of K [n, k]) to map to its own value difference d_j (a row of D [n, v])
and solves for one shift S [k, v] of the layer with a ridge penalty:

    S = argmin_S ‖K S − D‖²_F + λ‖S‖²_F = (KᵀK + λI)⁻¹ KᵀD.

S is in MALMEN's "Conv1D" convention (v = k S); for an nn.Linear (`weight` is [out, in] = [v, k]) the weight
change is Sᵀ.

Why a hand-written backward: the meta-loss is evaluated on the edited model, which yields G = ∂L/∂S. The
gradient with respect to D and λ needs only K, λ, S and G (one more solve with the same matrix), not an autograd
graph over the n rows of D. So MALMEN first pushes the meta-gradient to D, then recomputes the hyper-network
chunk by chunk and back-propagates the proxy loss Σ_j ⟨∂L/∂d_j, d_j⟩, keeping only one chunk's graph alive:
memory stays independent of the number of edited tokens.

Precision rule: M = KᵀK + λI is symmetric positive definite for λ > 0, with λ_min(M) ≥ λ and
λ_max(M) ≤ ‖K‖²_F + λ, so κ̂ = (‖K‖²_F + λ) / λ bounds its condition number from above at the cost of one norm.
The solve (a Cholesky factorisation) runs in float32 when κ̂ ≤ `MAX_FLOAT32_CONDITION` (relative error at most
about κ̂ · 6e-8 ≤ 6e-4) and the float32 factorisation succeeds; otherwise, and always for float64 inputs, it runs
in float64. The k × k system (1536 × 1536 for SmolLM2's down_proj) is cheap in either precision.

Preserved keys (MEMIT's covariance term). Every function takes an optional `prior` P [k, k], symmetric positive
semi-definite, added to the system: S = (KᵀK + P + λI)⁻¹KᵀD minimises ‖K S − D‖²_F + tr(Sᵀ P S) + λ‖S‖²_F. With
P = μ·E[k₀k₀ᵀ] over keys k₀ the edit must not move (other prompts' answer positions), the second term is μ times the
mean squared change of their values, so the shift avoids directions those keys share (e.g. the chat template's).
The backward formulas are unchanged with M = KᵀK + P + λI; κ̂ adds tr(P) to the numerator.
"""

from __future__ import annotations

import torch
from torch import Tensor

MAX_FLOAT32_CONDITION = 1e4
"""Largest condition-number bound κ̂ solved in float32 (see the module docstring)."""


def _lam_value(lam: Tensor | float) -> float:
    """λ as a Python float, validated: a scalar (any shape with one element, e.g. an Embedding row) and ≥ 0."""
    if isinstance(lam, Tensor):
        if lam.numel() != 1:
            raise ValueError(f"lam must hold one value, got shape {tuple(lam.shape)}")
        value = float(lam.detach())
    else:
        value = float(lam)
    if not value >= 0.0:
        raise ValueError(f"lam must be >= 0, got {value}")
    return value


def _check_keys(keys: Tensor, other: Tensor, other_name: str) -> None:
    if keys.dim() != 2 or other.dim() != 2:
        raise ValueError(f"keys and {other_name} must be 2-D, got {tuple(keys.shape)} and {tuple(other.shape)}")


def _check_prior(prior: Tensor | None, size: int) -> None:
    if prior is not None and tuple(prior.shape) != (size, size):
        raise ValueError(f"prior must be [{size}, {size}] like KᵀK, got {tuple(prior.shape)}")


def ridge_precision(keys: Tensor, lam: Tensor | float, prior: Tensor | None = None) -> torch.dtype:
    """The dtype the solve is attempted in: float64 for float64 keys, λ = 0 or κ̂ > `MAX_FLOAT32_CONDITION`.

    float64 value diffs or gradients also force float64, and a float32 Cholesky failure falls back to float64.
    """
    if keys.dtype == torch.float64:
        return torch.float64
    lam_value = _lam_value(lam)
    if lam_value == 0.0:
        return torch.float64
    frobenius_sq = float(torch.linalg.vector_norm(keys, dtype=torch.float64)) ** 2
    prior_trace = float(prior.diagonal().sum()) if prior is not None else 0.0
    bound = (frobenius_sq + prior_trace + lam_value) / lam_value
    return torch.float32 if bound <= MAX_FLOAT32_CONDITION else torch.float64


def _cholesky(keys: Tensor, lam_value: float, dtype: torch.dtype, prior: Tensor | None) -> tuple[Tensor, int]:
    keys = keys.to(dtype)
    system = keys.T @ keys
    if prior is not None:
        system += prior.to(dtype)
    system.diagonal().add_(lam_value)
    factor, info = torch.linalg.cholesky_ex(system)
    return factor, int(info)


def _factor(keys: Tensor, lam: Tensor | float, float64: bool, prior: Tensor | None = None) -> Tensor:
    """Cholesky factor of KᵀK + P + λI in float64 if asked, else as `ridge_precision` says (float64 if float32 fails)."""
    _check_prior(prior, keys.shape[1])
    lam_value = _lam_value(lam)
    dtype = torch.float64 if float64 else ridge_precision(keys, lam, prior)
    factor, info = _cholesky(keys, lam_value, dtype, prior)
    if info != 0 and dtype == torch.float32:
        factor, info = _cholesky(keys, lam_value, torch.float64, prior)
    if info != 0:
        raise ValueError(
            f"KᵀK + P + λI is not positive definite (λ = {lam_value}, keys {tuple(keys.shape)}): "
            "use lam > 0 unless the keys have full column rank"
        )
    return factor


def _result_dtype(*tensors: Tensor) -> torch.dtype:
    """float64 if any input is float64, else float32 (bf16/fp16 activations give a float32 shift)."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _solve(keys: Tensor, value_diffs: Tensor, lam: Tensor | float, prior: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """(S, Cholesky factor of M); the factor is kept by `RidgeSolve` so its backward needs no second factorisation."""
    _check_keys(keys, value_diffs, "value_diffs")
    if keys.shape[0] != value_diffs.shape[0]:
        raise ValueError(f"keys have {keys.shape[0]} rows but value_diffs {value_diffs.shape[0]}")
    out_dtype = _result_dtype(keys, value_diffs)
    factor = _factor(keys, lam, float64=out_dtype == torch.float64, prior=prior)
    rhs = keys.to(factor.dtype).T @ value_diffs.detach().to(factor.dtype)
    return torch.cholesky_solve(rhs, factor).to(out_dtype), factor


def ridge_solve(keys: Tensor, value_diffs: Tensor, lam: Tensor | float, prior: Tensor | None = None) -> Tensor:
    """S = (KᵀK + P + λI)⁻¹ KᵀD, the [k, v] shift minimising ‖K S − D‖²_F + tr(SᵀPS) + λ‖S‖²_F (P = 0 if None).

    Works for n < k (λ makes the system invertible; λ → 0 gives the minimum-norm S with K S = D) and n ≥ k.
    Returns float64 for float64 inputs, else float32. For an nn.Linear the weight change is the transpose, Sᵀ.
    Not differentiable (use `ridge` for that).
    """
    return _solve(keys, value_diffs, lam, prior)[0]


def ridge_solve_gram(gram: Tensor, cross: Tensor, lam: Tensor | float, prior: Tensor | None = None) -> Tensor:
    """S = (G + P + λI)⁻¹ C from accumulated G = KᵀK [k, k] and C = KᵀD [k, v]: `ridge_solve` when the rows are
    too many to hold at once (sum the products of each chunk of rows, in float64). Returns float32."""
    lam_value = _lam_value(lam)
    if gram.shape[0] != gram.shape[1] or cross.shape[0] != gram.shape[0]:
        raise ValueError(f"gram {tuple(gram.shape)} must be [k, k] and cross {tuple(cross.shape)} [k, v]")
    _check_prior(prior, gram.shape[0])
    system = gram.to(torch.float64).clone()
    if prior is not None:
        system += prior.to(torch.float64)
    system.diagonal().add_(lam_value)
    factor, info = torch.linalg.cholesky_ex(system)
    if int(info) != 0:
        raise ValueError(f"KᵀK + P + λI is not positive definite (λ = {lam_value}): use lam > 0")
    return torch.cholesky_solve(cross.to(torch.float64), factor).to(torch.float32)


def _gradients(keys: Tensor, factor: Tensor, solution: Tensor, grad_solution: Tensor) -> tuple[Tensor, Tensor]:
    """(∂L/∂D, ∂L/∂λ) from the Cholesky factor of M; see `ridge_backward`."""
    out_dtype = _result_dtype(keys, solution, grad_solution)
    mixed = torch.cholesky_solve(grad_solution.to(factor.dtype), factor)
    grad_value_diffs = keys.to(factor.dtype) @ mixed
    grad_lam = -(mixed * solution.to(factor.dtype)).sum()
    return grad_value_diffs.to(out_dtype), grad_lam.to(out_dtype)


def ridge_backward(
    keys: Tensor, lam: Tensor | float, solution: Tensor, grad_solution: Tensor, prior: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Exact (∂L/∂D [n, v], ∂L/∂λ scalar) given S = `ridge_solve(K, D, λ, P)` and G = ∂L/∂S [k, v].

    With M = KᵀK + P + λI (symmetric) and S = M⁻¹KᵀD:  dS = M⁻¹(Kᵀ dD − dλ S), hence with X = M⁻¹G
    dL = ⟨G, dS⟩ = ⟨KX, dD⟩ − dλ ⟨X, S⟩  ⇒  ∂L/∂D = K X,  ∂L/∂λ = −⟨X, S⟩_F.

    For λ = exp(θ) multiply ∂L/∂λ by λ. ∂L/∂D can be consumed chunk by chunk of rows (see the module docstring).
    """
    _check_keys(keys, grad_solution, "grad_solution")
    if solution.shape != grad_solution.shape or solution.shape[0] != keys.shape[1]:
        raise ValueError(
            f"solution {tuple(solution.shape)} and grad_solution {tuple(grad_solution.shape)} must both be "
            f"[k, v] with k = {keys.shape[1]}"
        )
    float64 = _result_dtype(keys, solution, grad_solution) == torch.float64
    return _gradients(keys, _factor(keys, lam, float64, prior), solution.detach(), grad_solution)


class RidgeSolve(torch.autograd.Function):
    """`ridge_solve` as an autograd op whose backward is `ridge_backward` (differentiable in D and λ).

    The keys are treated as constants (MALMEN's cached activations are detached); passing keys that require grad
    is an error rather than a silently missing gradient.
    """

    @staticmethod
    def forward(ctx, keys: Tensor, value_diffs: Tensor, lam: Tensor | float, prior: Tensor | None) -> Tensor:
        if ctx.needs_input_grad[0] or ctx.needs_input_grad[3]:
            raise ValueError("RidgeSolve does not differentiate through the keys or the prior; pass them detached")
        solution, factor = _solve(keys, value_diffs, lam, prior)
        ctx.save_for_backward(keys, factor, solution)
        ctx.lam_meta = (lam.shape, lam.dtype) if isinstance(lam, Tensor) else None
        ctx.value_diffs_dtype = value_diffs.dtype
        return solution

    @staticmethod
    def backward(ctx, grad_solution: Tensor) -> tuple[None, Tensor | None, Tensor | None, None]:
        keys, factor, solution = ctx.saved_tensors
        grad_value_diffs, grad_lam = _gradients(keys, factor, solution, grad_solution)
        lam_grad = None
        if ctx.needs_input_grad[2] and ctx.lam_meta is not None:
            shape, dtype = ctx.lam_meta
            lam_grad = grad_lam.reshape(shape).to(dtype)
        value_grad = grad_value_diffs.to(ctx.value_diffs_dtype) if ctx.needs_input_grad[1] else None
        return None, value_grad, lam_grad, None


def ridge(keys: Tensor, value_diffs: Tensor, lam: Tensor | float, prior: Tensor | None = None) -> Tensor:
    """Differentiable `ridge_solve` (gradients reach `value_diffs` and a tensor `lam` through `RidgeSolve`)."""
    return RidgeSolve.apply(keys, value_diffs, lam, prior)
