"""The backend contract: the memory-bound passes over ``X [T, N]``, and nothing else.

A backend implements what differs between devices and kernel libraries: the Gram pass
(stage 1), the cross product the backward needs, the combine pass (stage 3, with an
optional second operand for the backward) and whether it can run on a device. The
algorithm itself (forward and backward) is composed once from these primitives in
:mod:`ortholora_kernels.ops`; the tiny T x T solve (stage 2) lives in
:mod:`ortholora_kernels.solve`. A backend whose kernels carry the built-in PCGrad solve
may fuse it (:meth:`Backend.gram_solve`, :meth:`Backend.fused_forward`); every other
solve goes through :meth:`Backend.gram` and :meth:`Backend.combine`. See ARCHITECTURE.md.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar

import torch

from .._args import Segments


class Backend(ABC):
    """What one backend provides. Shapes: ``x [T, N]`` row-major, ``S`` segments.

    All methods run without host synchronisation; all Gram-like outputs are float64.
    """

    name: ClassVar[str]

    @abstractmethod
    def availability(self, device: torch.device) -> str | None:
        """None when usable on ``device``, else a one-line reason."""

    @abstractmethod
    def gram(self, x: torch.Tensor, seg: Segments) -> torch.Tensor:
        """Stage 1: ``[S, T, T]`` float64 ``G_s = X_s X_s^T`` per segment."""

    @abstractmethod
    def cross(self, y: torch.Tensor, x: torch.Tensor, seg: Segments) -> torch.Tensor:
        """``[S, R, T]`` float64 ``Y_s X_s^T`` for ``y [R, N]`` (the backward's ``v = dY X^T``)."""

    @abstractmethod
    def combine(self, seg: Segments, x: torch.Tensor, a: torch.Tensor, y: torch.Tensor | None = None,
                b: torch.Tensor | None = None, out_dtype: torch.dtype | None = None) -> torch.Tensor:
        """Stage 3: ``[R, N]`` with ``out_s = A_s X_s (+ B_s Y_s)``, accumulated in fp32 or better.

        ``a [S, R, T]``, ``b [S, R, K]`` (may be strided views, e.g. a transpose) and
        ``y [K, N]``; the result has ``out_dtype`` (default: the dtype of ``x``).
        """

    def gram_solve(self, x: torch.Tensor, seg: Segments, order: torch.Tensor, reduction: str):
        """Stages 1-2 fused for the built-in PCGrad solve: ``(G, C, W, nproj)``, or None.

        None (the default) means "not fused": the op calls :meth:`gram` and the solve.
        """
        return None

    def solve_vjp(self, gram: torch.Tensor, order: torch.Tensor, reduction: str, weights_grad: torch.Tensor,
                  seg: Segments):
        """The backward's stage 2 fused for the built-in PCGrad solve, or None (the default).

        Returns ``(M, W)``: ``M = Gbar + Gbar^T`` ``[S, T, T]`` (``Gbar = dL/dG`` given
        ``weights_grad = dL/dW [S, R, T]``) and the forward's weights ``W [S, R, T]``, both
        float64. None: the op runs :class:`~ortholora_kernels.solve.PCGradSolve`'s forward
        and ``vjp`` (torch ops, about 35 T small kernels per call).
        """
        return None

    def fused_forward(self, x: torch.Tensor, seg: Segments, order: torch.Tensor, reduction: str):
        """Stages 1-3 fused for the built-in PCGrad solve: ``(out, G, C, nproj)``, or None.

        ``out`` is ``[N]`` (sum/mean) or ``[T, N]`` (none). None (the default): not fused.
        """
        return None


def empty_outputs(grads: torch.Tensor, num_segments: int, reduction: str):
    """Uninitialised ``(out, G, C, nproj)`` of the projection's shapes and dtypes.

    The shape function (fake) of both the public custom op and the compiled one.
    """
    t, n = grads.shape
    out = grads.new_empty((t, n) if reduction == "none" else (n,))
    gram = grads.new_empty((num_segments, t, t), dtype=torch.float64)
    return out, gram, torch.empty_like(gram), grads.new_empty((num_segments,), dtype=torch.int32)
