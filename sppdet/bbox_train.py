"""Training of the box regressors (SPEC section 7): reservoirs of regression examples, streamed
in image by image, and one ridge fit per class (``spp_train_bbox_regressor.m``); the
parametrisation and the trained regressors are :mod:`sppdet.bbox_reg`.

Shape shorthand: ``N`` boxes, ``K`` classes, ``D`` feature dims, ``R`` rows kept for one class.
"""

from __future__ import annotations

import logging
import os
import tempfile

import numpy as np
import torch

from sppdet.bbox_reg import VAR_EPS, BBoxRegConfig, BBoxRegressor, encode

log = logging.getLogger(__name__)


def ridge_fit(
    x: np.ndarray, y: np.ndarray, lam: float, *, form: str = "auto", device: str = "cpu"
) -> tuple[np.ndarray, np.ndarray]:
    """Solve ``min ||[x, 1] B - y||^2 + lam ||B||^2`` (bias penalised, as R-CNN) in float64.

    The primal form factors a ``(D+1)^2`` matrix, the dual form an ``R^2`` one
    (``B = [x, 1]^T (x x^T + 1 + lam I)^-1 y``); ``form="auto"`` picks the one with fewer flops.
    Both are a Cholesky solve (R-CNN ``ridge_reg_chol``), run with torch on ``device``.

    Args:
        x: ``Array[R, D]`` features, or rows that :class:`FileRows` reads back from disk in
            chunks. y: ``Array[R, T]`` targets. lam: penalty, > 0.

    Returns:
        ``w`` ``Array[D, T]`` and ``b`` ``Array[T]``, float64.
    """
    r, d = x.shape
    if form == "auto":
        form = "dual" if r * r * (d + r / 3) < r * d * d + d**3 / 3 else "primal"
    dev = torch.device(device)
    yt = torch.as_tensor(np.asarray(y, np.float64), device=dev)
    if form == "dual":
        xt = torch.as_tensor(x[:r], device=dev).double()
        gram = xt @ xt.T + 1.0
        gram.diagonal().add_(lam)
        alpha = torch.cholesky_solve(yt, torch.linalg.cholesky(gram, out=gram))
        return (xt.T @ alpha).cpu().numpy(), alpha.sum(0).cpu().numpy()
    gram = torch.zeros(d + 1, d + 1, dtype=torch.float64, device=dev)
    rhs = torch.zeros(d + 1, yt.shape[1], dtype=torch.float64, device=dev)
    for s in range(0, r, 4096):  # row chunks: never a float64 copy of all of x
        chunk = torch.as_tensor(x[s : s + 4096], device=dev)
        xc = torch.ones(len(chunk), d + 1, dtype=torch.float64, device=dev)  # [x, 1] in place:
        xc[:, :d] = chunk  # one float64 chunk (0.5 GB at D = 16,000), not two
        gram.addmm_(xc.T, xc)
        rhs.addmm_(xc.T, yt[s : s + 4096])
    gram.diagonal().add_(lam)
    # in place: a second (D+1)^2 float64 matrix is 2 GB at the 16,000-d pool5 of mobilenet_v2_d17
    beta = torch.cholesky_solve(rhs, torch.linalg.cholesky(gram, out=gram)).cpu().numpy()
    return beta[:-1], beta[-1]


class MemoryRows:
    """``Array[R, D]`` rows held in memory, grown as they are written."""

    def __init__(self, dim: int, dtype: np.dtype, cap: int) -> None:
        self.cap, self.n, self._a = cap, 0, np.zeros((0, dim), dtype)

    def __len__(self) -> int:
        return self.n

    @property
    def shape(self) -> tuple[int, int]:
        return self.n, self._a.shape[1]

    def put(self, slots: np.ndarray, rows: np.ndarray) -> None:
        """Write ``rows`` ``Array[M, D]`` to ``slots`` ``Array[M]`` (at most one past the end)."""
        need = int(slots.max()) + 1 if len(slots) else 0
        if need > len(self._a):
            size = min(self.cap, max(need, 2 * len(self._a), 256))
            grown = np.zeros((size, self._a.shape[1]), self._a.dtype)
            grown[: self.n] = self._a[: self.n]
            self._a = grown
        self._a[slots] = rows
        self.n = max(self.n, need)

    def __getitem__(self, index) -> np.ndarray:
        return self._a[: self.n][index]


class FileRows:
    """``Array[R, D]`` rows in an anonymous temporary file, read back in slices.

    Box regression's reservoirs of 16,000-d pool5 rows take gigabytes (3.4 GB in float16 for
    VOC07 train): kept in a file (explicit reads and writes, not a memory map, whose pages
    would count as the process's memory), the stage's peak is the ridge fit's own matrices.
    The file is unlinked on creation: nothing is left behind, whatever ends the process.
    """

    def __init__(self, dim: int, dtype: np.dtype, directory: str | os.PathLike) -> None:
        self.dim, self.dtype, self.n = dim, np.dtype(dtype), 0
        self._row_bytes = dim * self.dtype.itemsize
        # closed by close() or with the object; unlinked already, so never left behind
        self._f = tempfile.TemporaryFile(dir=directory)  # noqa: SIM115

    def __len__(self) -> int:
        return self.n

    @property
    def shape(self) -> tuple[int, int]:
        return self.n, self.dim

    def put(self, slots: np.ndarray, rows: np.ndarray) -> None:
        """As :meth:`MemoryRows.put`."""
        rows = np.ascontiguousarray(rows, self.dtype).reshape(-1, self.dim)
        fd = self._f.fileno()
        if len(slots) and np.array_equal(slots, np.arange(slots[0], slots[0] + len(slots))):
            _pwrite_all(fd, rows, int(slots[0]) * self._row_bytes)  # one appended run
        else:
            for slot, row in zip(slots.tolist(), rows, strict=True):
                _pwrite_all(fd, row, slot * self._row_bytes)
        self.n = max(self.n, int(slots.max()) + 1 if len(slots) else 0)

    def __getitem__(self, rows: slice) -> np.ndarray:
        start, stop, _ = rows.indices(self.n)
        count = max(stop - start, 0)
        out = np.empty((count, self.dim), self.dtype)
        view, offset = memoryview(out).cast("B"), start * self._row_bytes
        while len(view):  # a read may return less than asked for
            got = os.preadv(self._f.fileno(), [view], offset)
            if got <= 0:
                raise OSError(f"box-regression rows: short read at byte {offset}")
            view, offset = view[got:], offset + got
        return out

    def close(self) -> None:
        self._f.close()


def _pwrite_all(fd: int, array: np.ndarray, offset: int) -> None:
    view = memoryview(np.ascontiguousarray(array)).cast("B")
    while len(view):  # a write may take less than it was given
        done = os.pwrite(fd, view, offset)
        view, offset = view[done:], offset + done


class _Reservoir:
    """A uniform sample of at most ``cap`` rows of a stream (Vitter's algorithm R, batched).
    The rows live in memory, or with ``spill_dir`` in a temporary file there (:class:`FileRows`).
    """

    def __init__(
        self, cap: int, dim: int, dtype: np.dtype, spill_dir: str | os.PathLike | None = None
    ) -> None:
        self.cap = cap
        self.x = (
            MemoryRows(dim, dtype, cap) if spill_dir is None else FileRows(dim, dtype, spill_dir)
        )
        self.y = MemoryRows(4, np.dtype(np.float64), cap)  # the targets, small: in memory
        self.seen = 0

    @property
    def n(self) -> int:
        """Rows held."""
        return len(self.x)

    def add(self, x: np.ndarray, y: np.ndarray, rng: np.random.Generator) -> None:
        take = min(len(x), self.cap - self.n)
        if take:
            slots = np.arange(self.n, self.n + take)
            self.x.put(slots, x[:take])
            self.y.put(slots, y[:take])
        rest = np.arange(take, len(x))
        if len(rest):
            # row number t (0-based) of the stream replaces slot j ~ U{0..t} when j < cap
            j = rng.integers(0, self.seen + rest + 1)
            hit = j < self.cap
            slots, src = j[hit], rest[hit]
            # later rows win a slot drawn twice, as in the sequential algorithm
            last = len(slots) - 1 - np.unique(slots[::-1], return_index=True)[1]
            self.x.put(slots[last], x[src[last]])
            self.y.put(slots[last], y[src[last]])
        self.seen += len(x)


class BBoxRegTrainer:
    """Streams regression examples in, image by image, and fits one ridge per class.

    Args:
        num_classes: ``K`` (class indices ``0..K-1``, no background).
        dim: ``D``, the feature length (scaled the same way at train and test time).
        config: :class:`BBoxRegConfig`.
        seed: the reservoir's random seed (training is deterministic given the stream).
        spill_dir: keep the reservoirs' rows in temporary files in this directory, not in
            memory (the same regressors; see :class:`FileRows`).
    """

    def __init__(
        self,
        num_classes: int,
        dim: int,
        config: BBoxRegConfig | None = None,
        seed: int = 0,
        spill_dir: str | os.PathLike | None = None,
    ) -> None:
        self.num_classes, self.dim = num_classes, dim
        self.config = config or BBoxRegConfig()
        self._rng = np.random.default_rng(seed)
        cap, dtype = self.config.max_samples_per_class, np.dtype(self.config.storage_dtype)
        self._res = [_Reservoir(cap, dim, dtype, spill_dir) for _ in range(num_classes)]

    def add(
        self,
        features: np.ndarray,
        proposals: np.ndarray,
        gt_boxes: np.ndarray,
        labels: np.ndarray,
        ious: np.ndarray | None = None,
    ) -> None:
        """Add rows of one image.

        Args:
            features: ``Array[N, D]`` float32.
            proposals: ``Array[N, 4]`` internal xyxy.
            gt_boxes: ``Array[N, 4]`` the ground truth matched to each row.
            labels: ``Array[N]`` int64 class index; ``-1`` skips the row.
            ious: optional ``Array[N]`` IoU of each row with its ground truth; rows below
                ``config.min_iou`` are skipped (e.g. from :func:`match_training_rows`).
        """
        labels = np.asarray(labels, np.int64).reshape(-1)
        keep = labels >= 0
        if ious is not None:
            keep &= np.asarray(ious).reshape(-1) >= self.config.min_iou
        if not keep.any():
            return
        if labels[keep].max() >= self.num_classes:
            raise ValueError(f"label {labels[keep].max()} >= num_classes {self.num_classes}")
        features = np.asarray(features, np.float32).reshape(len(labels), self.dim)
        rows = np.flatnonzero(keep)
        p = np.asarray(proposals, np.float64).reshape(-1, 4)[rows]
        targets = encode(p, np.asarray(gt_boxes, np.float64).reshape(-1, 4)[rows])
        for c in np.unique(labels[rows]):
            sel = labels[rows] == c
            self._res[c].add(features[rows[sel]], targets[sel], self._rng)

    def close(self) -> None:
        """Delete the reservoirs' temporary files (with ``spill_dir``); fit no more after."""
        for res in self._res:
            if isinstance(res.x, FileRows):
                res.x.close()

    def counts(self) -> tuple[list[int], list[int]]:
        """Per class: rows held in the reservoir, rows seen."""
        return [r.n for r in self._res], [r.seen for r in self._res]

    def fit(self, device: str = "cpu") -> BBoxRegressor:
        """Fit the per-class ridge regressors (torch on ``device``; ``"cuda"`` is much faster for
        large ``D``). A class with no rows gets zero deltas (proposals pass unchanged)."""
        k, d, lam = self.num_classes, self.dim, self.config.ridge_lambda
        w = np.zeros((k, d, 4), np.float32)
        b = np.zeros((k, 4), np.float32)
        mean = np.zeros((k, 4), np.float32)
        std = np.ones((k, 4), np.float32)
        for c, res in enumerate(self._res):
            if res.n == 0:
                log.warning("bbox regression: class %d has no training rows", c)
                continue
            y = res.y[: res.n]
            mu, sd = y.mean(0), np.sqrt(y.var(0) + VAR_EPS)
            wc, bc = ridge_fit(res.x, (y - mu) / sd, lam, device=device)
            w[c], b[c], mean[c], std[c] = wc, bc, mu, sd
            log.info("bbox regression: class %d fitted on %d of %d rows", c, res.n, res.seen)
        n = np.array([r.n for r in self._res], np.int64)
        return BBoxRegressor(weights=w, bias=b, target_mean=mean, target_std=std, num_samples=n)
