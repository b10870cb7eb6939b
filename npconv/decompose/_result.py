"""The shared base of every decomposition result, and small helpers the decompositions share.

A decomposition returns a frozen, validated container of its factors:

* it unpacks into its factors, in the order of ``FACTORS`` (``a, b = svd_lowrank(W, 4)``);
* ``to_tensor()`` rebuilds the approximated tensor (for errors and tests; layers never execute it);
* ``errors`` is the history of a fitting error (one float per iteration, or a single value for a closed-form
  fit), ``meta`` a read-only mapping of metadata (the original shape, the rank, the method, ...);
* construction validates the factors' shapes (``_validate``), so a result can also be built by hand.

Writing a new result type (``result_class`` is ``dataclass(frozen=True, eq=False, repr=False)``)::

    @result_class
    class LowRank(Decomposition):
        FACTORS: ClassVar[tuple] = ("a", "b")
        a: np.ndarray
        b: np.ndarray

        def _validate(self):
            a = check_factor(self.a, "a", ndim=2)
            check_factor(self.b, "b", ndim=2, shape=(a.shape[1], None), dtype=a.dtype)

        def to_tensor(self):
            return self.a @ self.b

``errors`` and ``meta`` are keyword-only, so subclasses may declare required factor fields.
"""
from __future__ import annotations

import copy
import numbers
from dataclasses import dataclass, field, fields
from types import MappingProxyType
from typing import Any, ClassVar, Mapping

import numpy as np

from .._backend import FLOAT_DTYPES

__all__ = ["Decomposition", "result_class", "check_factor", "check_tensor", "svd_flip", "check_random_state"]


def result_class(cls):
    """Class decorator for result types: a frozen dataclass that keeps the base ``__repr__``."""
    return dataclass(frozen=True, eq=False, repr=False)(cls)


@result_class
class Decomposition:
    """Base class of the decomposition results (frozen; unpacks into its factors).

    Parameters
    ----------
    errors : sequence of float, keyword-only
        Fitting-error history (e.g. relative Frobenius error per iteration); stored as a tuple of floats.
    meta : mapping, keyword-only
        Metadata (``"shape"`` of the approximated tensor, ``"method"``, ranks, ...); stored read-only.
    """
    #: names of the factor fields, in unpacking order (set by each subclass)
    FACTORS: ClassVar[tuple] = ()

    errors: tuple = field(default=(), kw_only=True)
    meta: Mapping[str, Any] = field(default_factory=dict, kw_only=True)

    def __post_init__(self):
        try:
            errs = tuple(float(e) for e in self.errors)
        except (TypeError, ValueError):
            raise TypeError(f"errors must be a sequence of real numbers, got {self.errors!r}") from None
        object.__setattr__(self, "errors", errs)
        if not isinstance(self.meta, Mapping):
            raise TypeError(f"meta must be a mapping, got {type(self.meta).__name__}")
        object.__setattr__(self, "meta", MappingProxyType(dict(self.meta)))
        self._validate()

    def __deepcopy__(self, memo):
        # ``meta`` is a MappingProxyType, which ``copy.deepcopy`` cannot copy: rebuild (and revalidate) the result
        # from deep copies of its fields, ``meta`` as a plain dict. Networks and layers deep-copy their results.
        vals = {f.name: copy.deepcopy(dict(self.meta) if f.name == "meta" else getattr(self, f.name), memo)
                for f in fields(self) if f.init}
        out = type(self)(**vals)
        memo[id(self)] = out
        return out

    def __getstate__(self):
        # pickling (users' own, e.g. multiprocessing; npconv's file format never pickles): a MappingProxyType
        # cannot be pickled, so ``meta`` travels as a plain dict and is made read-only again in __setstate__
        state = dict(self.__dict__)
        state["meta"] = dict(self.meta)
        return state

    def __setstate__(self, state):
        for k, v in state.items():
            object.__setattr__(self, k, MappingProxyType(dict(v)) if k == "meta" else v)

    # --- subclass hooks ----------------------------------------------------------------------------------
    def _validate(self):
        """Check the factors' shapes and dtypes; raise ValueError/TypeError naming the factor."""

    def to_tensor(self):
        """Rebuild the approximated tensor from the factors."""
        raise NotImplementedError(f"{type(self).__name__} does not define to_tensor()")

    # --- container behaviour -----------------------------------------------------------------------------
    @property
    def factors(self) -> tuple:
        """The factors, in the order of ``FACTORS``."""
        return tuple(getattr(self, n) for n in self.FACTORS)

    def __iter__(self):
        return iter(self.factors)

    def __len__(self):
        return len(self.FACTORS)

    @property
    def error(self):
        """The last entry of ``errors`` (the final fitting error), or None when there is no history."""
        return self.errors[-1] if self.errors else None

    def n_params(self) -> int:
        """Number of stored values in the factors."""
        return int(sum(int(np.size(f)) for f in self.factors))

    def __repr__(self):
        parts = [f"{n}={_describe(getattr(self, n))}" for n in self.FACTORS]
        if self.errors:
            parts.append(f"error={self.errors[-1]:.4g}")
        return f"{type(self).__name__}({', '.join(parts)})"


def _describe(a):
    if isinstance(a, np.ndarray):
        return f"<{a.dtype} {tuple(a.shape)}>"
    return repr(a)


def check_factor(a, name, *, ndim, shape=None, dtype=None, integer=False):
    """Validate one factor of a result and return it.

    ``shape`` is a tuple with ``None`` for free axes; ``dtype`` (when given) must match exactly.
    Floating factors must be float32/float64 and finite; ``integer=True`` asks for an integer array.
    """
    if not isinstance(a, np.ndarray):
        raise TypeError(f"{name} must be a numpy.ndarray, got {type(a).__name__}")
    if a.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got {a.ndim} (shape {a.shape})")
    if shape is not None:
        for ax, (want, got) in enumerate(zip(shape, a.shape)):
            if want is not None and want != got:
                want_s = "(" + ", ".join("*" if s is None else str(s) for s in shape) + ")"
                raise ValueError(f"{name} must have shape {want_s}, got {a.shape} "
                                 f"(axis {ax}: expected {want}, got {got})")
    if integer:
        if a.dtype.kind not in "iu":
            raise TypeError(f"{name} must be an integer array, got dtype {a.dtype}")
        return a
    if a.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must have dtype float32 or float64, got {a.dtype}")
    if dtype is not None and a.dtype != np.dtype(dtype):
        raise TypeError(f"{name} must have dtype {np.dtype(dtype)} (like the other factors), got {a.dtype}")
    if not np.isfinite(a).all():
        raise ValueError(f"{name} contains non-finite values (NaN or inf)")
    return a


def check_tensor(W, name, *, ndim):
    """Validate a tensor to decompose and return it as a NumPy array (a CuPy array is copied to the host).

    It must be float32/float64 with ``ndim`` dimensions, no empty axis, finite, and not all zero.
    """
    from .._backend import is_cupy_array, to_numpy
    if is_cupy_array(W):
        W = to_numpy(W)
    if not isinstance(W, np.ndarray):
        raise TypeError(f"{name} must be a numpy.ndarray, got {type(W).__name__}")
    if W.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got {W.ndim} (shape {W.shape})")
    if W.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must have dtype float32 or float64, got {W.dtype}")
    if W.size == 0:
        raise ValueError(f"{name} must not be empty, got shape {W.shape}")
    if not np.isfinite(W).all():
        raise ValueError(f"{name} contains {int((~np.isfinite(W)).sum())} non-finite value(s) (NaN or inf)")
    if not np.any(W):
        raise ValueError(f"{name} is all zeros: there is nothing to approximate")
    return W


def svd_flip(u, vt):
    """Deterministic SVD signs: flip each pair so the largest-magnitude entry of ``u[:, k]`` is positive.

    ``u`` is (m, k) (left singular vectors as columns), ``vt`` is (k, n) (right vectors as rows); row ``k``
    of ``vt`` is flipped with column ``k`` of ``u``, so ``u @ diag(s) @ vt`` is unchanged. Ties on the
    largest magnitude go to the first index. Returns new arrays ``(u, vt)``.
    """
    u = np.asarray(u)
    vt = np.asarray(vt)
    if u.ndim != 2 or vt.ndim != 2 or u.shape[1] != vt.shape[0]:
        raise ValueError(f"u and vt must be (m, k) and (k, n), got shapes {u.shape} and {vt.shape}")
    if u.shape[1] == 0:
        return u.copy(), vt.copy()
    idx = np.argmax(np.abs(u), axis=0)
    signs = np.sign(u[idx, np.arange(u.shape[1])])
    signs[signs == 0] = 1
    return u * signs, vt * signs[:, None]


def check_random_state(random_state):
    """``random_state`` -> a ``numpy.random.Generator``.

    None: fresh OS entropy; an int >= 0 or a ``SeedSequence``: a new seeded generator; a ``Generator``:
    returned as is (it is advanced by the caller's draws). Anything else is a TypeError.
    """
    if random_state is None:
        return np.random.default_rng()
    if isinstance(random_state, np.random.Generator):
        return random_state
    if isinstance(random_state, np.random.SeedSequence):
        return np.random.default_rng(random_state)
    if isinstance(random_state, numbers.Integral) and not isinstance(random_state, (bool, np.bool_)):
        if random_state < 0:
            raise ValueError(f"random_state must be >= 0, got {random_state}")
        return np.random.default_rng(int(random_state))
    raise TypeError("random_state must be None, an int, a numpy.random.SeedSequence or a "
                    f"numpy.random.Generator, got {type(random_state).__name__}")
