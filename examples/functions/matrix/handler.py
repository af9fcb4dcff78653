"""matrix: numpy linear algebra on seeded data, linpack-like -- an exact integer matrix
product and a float solve of a 300x300 diagonally dominant system whose solution is known.
Answer: "<sha256 hex of the int product and the rounded solution> <sum of the product>"."""
import hashlib

import numpy as np

NAME = "matrix"
N = 300


def run():
    rng = np.random.default_rng(300)
    a = rng.integers(-50, 50, size=(N, N), dtype=np.int64)
    b = rng.integers(-50, 50, size=(N, N), dtype=np.int64)
    prod = a @ b                                                    # exact integer matmul
    x_true = rng.integers(-1000, 1000, size=N).astype(np.float64)
    m = a.astype(np.float64) + np.eye(N) * (N * 60.0)               # diagonally dominant
    rhs = m @ x_true
    x = np.linalg.solve(m, rhs)                                     # LAPACK gesv
    sq = m @ m.T                                                    # BLAS gemm
    xr = np.rint(x).astype(np.int64)
    if not np.array_equal(xr, x_true.astype(np.int64)) or not np.allclose(sq, sq.T):
        raise ArithmeticError("solve did not reproduce the known solution")
    h = hashlib.sha256(prod.tobytes() + xr.tobytes())
    return "%s %d" % (h.hexdigest(), int(prod.sum()))


if __name__ == "__main__":
    print(run())
