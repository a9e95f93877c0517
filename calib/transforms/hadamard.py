"""Orthogonal matrices for rotations: normalized Hadamard matrices where one is constructible, else random.

A Hadamard matrix ``H`` ``(n, n)`` has entries ``+-1`` and ``H H^T = n I``; ``H / sqrt(n)`` is orthogonal
and spreads every coordinate evenly over all others (each entry has magnitude ``1 / sqrt(n)``), which
is what a rotation before a quantizer wants: an outlier channel ends up as ``n`` equal shares. One
exists only for ``n`` = 1, 2 or a multiple of 4; this module builds those orders that are a power of
two times an order of one of these constructions (the Kronecker product of Hadamard matrices is one):

- Sylvester: ``H_1 = [1]``, ``H_2m = [[H_m, H_m], [H_m, -H_m]]`` (powers of two);
- Paley I: order ``q + 1`` for a prime ``q = 3 (mod 4)``, from the quadratic residues mod ``q``
  (``60 = 59 + 1``: DAT-light's width; ``12 = 11 + 1``, ``24 = 23 + 1``);
- Paley II: order ``2 (q + 1)`` for a prime ``q = 1 (mod 4)`` (``36``, ``52``, ``108`` ...).

Other orders (e.g. 6, 10, 14, 92) get a seeded random orthogonal matrix (QR of a Gaussian matrix,
signs fixed so that the distribution is uniform), as does ``kind="random"`` always.

>>> r, how = rotation_matrix(60)
>>> how, tuple(r.shape), torch.allclose(r @ r.T, torch.eye(60), atol=1e-6)
('hadamard(paley1-59)', (60, 60), True)
>>> rotation_matrix(6)[1]
'random(seed 0)'
"""
from __future__ import annotations

import logging
import math
from typing import Optional

import torch

log = logging.getLogger(__name__)

#: matrix kinds of :func:`rotation_matrix`
KINDS = ("hadamard", "signed-hadamard", "random")


def _is_prime(q: int) -> bool:
    return q >= 2 and all(q % d for d in range(2, math.isqrt(q) + 1))


def _legendre(q: int) -> torch.Tensor:
    """``chi(a)`` for ``a = 0 .. q-1``: 0 at 0, +1 on the quadratic residues mod prime ``q``, -1 elsewhere."""
    chi = -torch.ones(q, dtype=torch.float64)
    chi[0] = 0
    chi[sorted({(a * a) % q for a in range(1, q)})] = 1
    return chi


def _jacobsthal(q: int) -> torch.Tensor:
    """``Q[i, j] = chi(j - i)`` ``(q, q)``."""
    index = torch.arange(q)
    return _legendre(q)[(index.view(1, -1) - index.view(-1, 1)) % q]


def _paley1(q: int) -> torch.Tensor:
    """Order ``q + 1`` (prime ``q = 3 mod 4``): ``I + S``, ``S = [[0, 1^T], [-1, Q]]`` skew-symmetric."""
    s = torch.zeros(q + 1, q + 1, dtype=torch.float64)
    s[0, 1:], s[1:, 0], s[1:, 1:] = 1, -1, _jacobsthal(q)
    return torch.eye(q + 1, dtype=torch.float64) + s


def _paley2(q: int) -> torch.Tensor:
    """Order ``2 (q + 1)`` (prime ``q = 1 mod 4``): each entry of the symmetric conference matrix
    ``C = [[0, 1^T], [1, Q]]`` becomes a 2x2 block (0 -> [[1, -1], [-1, -1]], +-1 -> +-[[1, 1], [1, -1]])."""
    c = torch.zeros(q + 1, q + 1, dtype=torch.float64)
    c[0, 1:], c[1:, 0], c[1:, 1:] = 1, 1, _jacobsthal(q)
    one = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
    zero = torch.tensor([[1.0, -1.0], [-1.0, -1.0]], dtype=torch.float64)
    return torch.kron(c, one) + torch.kron(torch.eye(q + 1, dtype=torch.float64), zero)


def _sylvester(n: int) -> torch.Tensor:
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


def _base(m: int) -> Optional[tuple[torch.Tensor, str]]:
    """A Hadamard matrix of order ``m`` from one Paley construction (or order 1), with its name."""
    if m == 1:
        return torch.ones(1, 1, dtype=torch.float64), "sylvester"
    if m % 4 == 0 and _is_prime(m - 1) and (m - 1) % 4 == 3:
        return _paley1(m - 1), f"paley1-{m - 1}"
    if m % 4 == 0 and _is_prime(m // 2 - 1) and (m // 2 - 1) % 4 == 1:
        return _paley2(m // 2 - 1), f"paley2-{m // 2 - 1}"
    return None


def hadamard_matrix(n: int) -> Optional[tuple[torch.Tensor, str]]:
    """A ``+-1`` Hadamard matrix ``(n, n)`` float64 and its construction, or None where none of the
    constructions of the module docstring reaches ``n``."""
    if n < 1:
        raise ValueError(f"Hadamard order must be positive, got {n}")
    power = n & -n  # the largest power of two dividing n: as much Sylvester as possible
    while power >= 1:
        found = _base(n // power)
        if found is not None:
            h, name = found
            if power > 1:
                h = torch.kron(_sylvester(power), h)
                name = f"sylvester-{power}" if n == power else f"sylvester-{power}x{name}"
            return h, name
        power //= 2
    return None


def random_orthogonal(n: int, seed: int) -> torch.Tensor:
    """A Haar-random orthogonal matrix ``(n, n)`` float64 from ``seed`` (QR of a Gaussian, signs of R's diagonal
    moved into Q)."""
    generator = torch.Generator().manual_seed(seed)
    q, r = torch.linalg.qr(torch.randn(n, n, generator=generator, dtype=torch.float64))
    signs = torch.sign(torch.diagonal(r))
    signs[signs == 0] = 1
    return q * signs.view(1, -1)


def rotation_matrix(n: int, kind: str = "hadamard", seed: int = 0) -> tuple[torch.Tensor, str]:
    """An orthogonal ``R`` ``(n, n)`` float32 and how it was made.

    ``kind`` ``"hadamard"``: ``H / sqrt(n)``; ``"signed-hadamard"``: ``diag(d) H / sqrt(n)`` with seeded
    random signs ``d`` (QuaRot's randomized Hadamard); ``"random"``: :func:`random_orthogonal`. A Hadamard
    kind falls back to a random orthogonal matrix (logged) where no Hadamard matrix of order ``n`` is built.
    """
    if kind not in KINDS:
        raise ValueError(f"rotation matrix kind must be one of {KINDS}, got {kind!r}")
    found = hadamard_matrix(n) if kind != "random" else None
    if found is None:
        if kind != "random":
            log.info("no Hadamard construction of order %d here: a random orthogonal matrix instead", n)
        return random_orthogonal(n, seed).float(), f"random(seed {seed})"
    h, name = found
    h = h / math.sqrt(n)
    if kind == "signed-hadamard":
        generator = torch.Generator().manual_seed(seed)
        signs = torch.randint(0, 2, (n,), generator=generator).to(torch.float64) * 2 - 1
        return (signs.view(-1, 1) * h).float(), f"signed-hadamard({name}, seed {seed})"
    return h.float(), f"hadamard({name})"
