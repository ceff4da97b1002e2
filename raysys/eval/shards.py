"""One index shard: a contiguous range of the candidate pool in a FAISS IndexFlatIP.

For a block of queries a shard answers two small questions, so that exact full-pool ranks never
need the whole score matrix in one place (`raysys.eval.ranking` adds the answers over shards):
- `relevant_scores`: the scores (and groups) of the relevant candidates it holds;
- `search_and_count`: its own top-k (FAISS) and, for every relevant candidate of every query
  (wherever that candidate lives), how many of its candidates score strictly above it and how
  many tie with it, over all its candidates and over those of the candidate's group (language).
A shard leaves the query's own relevant candidates out of its counts: the driver orders them
among themselves from their round-1 scores (and adds each one's 1), so a score recomputed one ulp
apart in another GEMM shape can never make two relevant candidates share a rank.

A rank must not depend on how the work is blocked (BLAS rounds a product differently for other
matrix shapes, and shard counts, chunk sizes and devices change the shapes), so every comparison
is the one between float64 scores summed in one fixed order (`exact_scores`), which are the same
in every shard, block and device. The count pass gets there cheaply: it scores column chunks with
a float64 GEMM (`queries @ vectors.T`, float32 inputs), whose error bound is ~1e-13 at d = 768,
so only a candidate within that bound of a relevant one (an exact or near duplicate, a few per
query at most) is scored again in the fixed order.
The vectors live once, in the FAISS IndexFlatIP. On CPU the top-k comes from the count pass's
own score chunks; with a GPU (faiss-gpu) the GPU index searches and the counts run in torch on
the same device (TF32 off).
"""

from __future__ import annotations

import io

import numpy as np

from raysys import storage

try:
    import faiss
except ImportError:  # faiss-cpu and faiss-gpu are extras (pyproject.toml)
    raise ImportError("FAISS is not installed: `pip install raysys[cpu]` or `pip install raysys[gpu]`") from None

GPU_MAX_K = 2048  # FAISS GPU k-selection limit
COUNT_CHUNK = 16384  # candidate columns scored at once: a 512-query block x chunk float64 is 64 MB
# How a shard stores its candidates: fp32 as encoded, or fp16 (half the memory; ranks are then
# exact for the rounded candidates, which is not the fp32 figure: the report says which).
STORAGE_DTYPES = ("fp32", "fp16")


def read_embedding_file(uri: str) -> np.ndarray:
    """The float32 embeddings of one encoder shard file (`raysys.eval.encode`'s .npz)."""
    with np.load(io.BytesIO(storage.read_bytes(uri))) as z:
        return np.ascontiguousarray(z["embedding"], dtype=np.float32)


def exact_scores(queries: np.ndarray, vectors: np.ndarray) -> np.ndarray:
    """Inner products of row pairs (queries[i], vectors[i]) in float64, summed coordinate by
    coordinate in one fixed order. Every product of two float32 values is exact in float64 and
    the order of the additions never depends on how many pairs are scored together, on shard or
    chunk shapes, or on the device: a pair always gets the same score, within d 2^-53 |q| |v|
    of its exact inner product (a float32 GEMM's error is 2^29 times larger)."""
    q = np.ascontiguousarray(np.asarray(queries, np.float64).T)  # [d, n]: one coordinate per row
    v = np.ascontiguousarray(np.asarray(vectors, np.float64).T)
    total = np.zeros(q.shape[1], np.float64)
    for coordinate in range(q.shape[0]):
        total += q[coordinate] * v[coordinate]
    return total


def float64_error_bound(dim: int) -> float:
    """gamma_d = d u / (1 - d u), u = 2^-53: |float64 dot(q, v) - exact| <= gamma_d |q| |v| for any
    summation order (Higham, Accuracy and Stability of Numerical Algorithms, 3.1)."""
    unit = 2.0 ** -53
    return dim * unit / (1 - dim * unit)


class IndexShard:
    """Candidates first_id .. first_id + n - 1 (global row numbers of the pool).

    groups: int codes per candidate of this shard (e.g. language), or None (one group).
    parts: [(uri, lo, hi)]: rows lo..hi-1 of each encoder shard file, in order (storage path);
    vectors: an in-memory [n, d] array instead (the in-process path)."""

    def __init__(self, first_id: int, *, parts: list[tuple[str, int, int]] | None = None,
                 vectors: np.ndarray | None = None, groups: np.ndarray | None = None,
                 use_gpu: bool = False, threads: int | None = None, count_chunk: int = COUNT_CHUNK,
                 storage_dtype: str = "fp32"):
        if (parts is None) == (vectors is None):
            raise ValueError("give exactly one of parts (stored files) or vectors (an array)")
        if storage_dtype not in STORAGE_DTYPES:
            raise ValueError(f"storage_dtype must be one of {', '.join(STORAGE_DTYPES)}, got {storage_dtype!r}")
        if threads:
            faiss.omp_set_num_threads(int(threads))
        self.first_id = int(first_id)
        self.count_chunk = int(count_chunk)
        self.storage_dtype = storage_dtype
        blocks = [vectors] if vectors is not None else (read_embedding_file(u)[lo:hi] for u, lo, hi in parts)
        if storage_dtype == "fp16":
            total = len(vectors) if vectors is not None else sum(hi - lo for _, lo, hi in parts)
            index, self.vectors = None, self._fp16_storage(blocks, total)
        else:
            index = None
            # Add file by file: the shard never holds a second full copy outside the FAISS index.
            for block in blocks:
                block = self._checked(block)
                if index is None:
                    index = faiss.IndexFlatIP(block.shape[1])
                index.add(block)
            if index is None or index.ntotal == 0:
                raise ValueError(f"shard at {first_id}: no candidates")
            # A view of the index's own storage (no copy) for the exact counts.
            self.vectors = faiss.rev_swig_ptr(index.get_xb(), index.ntotal * index.d).reshape(index.ntotal, index.d)
        self.n, self.dim = self.vectors.shape
        groups = np.zeros(self.n, np.int64) if groups is None else np.asarray(groups, np.int64).reshape(-1)
        if groups.shape[0] != self.n:
            raise ValueError(f"shard at {first_id}: {groups.shape[0]} groups for {self.n} candidates")
        self.groups = groups
        # The largest vector norm per column chunk: the error bound of its float64 GEMM scores. In
        # float64 (a float16 sum of squares is too coarse), from the host array, before any GPU move.
        self.chunk_norms = [float(np.linalg.norm(self.vectors[c0:c0 + self.count_chunk].astype(np.float64), axis=1).max())
                            for c0 in range(0, self.n, self.count_chunk)]
        self.on_gpu = bool(use_gpu)
        self.index = self._to_gpu(index) if self.on_gpu else index  # CPU fp16: None (top-k from the counts' chunks)
        # Per column chunk, each group's columns (a slice when contiguous, as sorted pools are).
        self.chunks = []
        for c0 in range(0, self.n, self.count_chunk):
            c1 = min(c0 + self.count_chunk, self.n)
            by_group = {}
            for code in np.unique(groups[c0:c1]):
                cols = np.flatnonzero(groups[c0:c1] == code)
                by_group[int(code)] = slice(int(cols[0]), int(cols[-1]) + 1) if cols[-1] - cols[0] + 1 == cols.size else cols
            self.chunks.append((c0, c1, by_group))

    def _to_gpu(self, index):
        if not hasattr(faiss, "StandardGpuResources") or faiss.get_num_gpus() == 0:
            raise RuntimeError("use_gpu=True but this faiss build sees no GPU (install faiss-gpu)")
        import torch

        torch.backends.cuda.matmul.allow_tf32 = False  # exact fp32 products for the counts
        self._res = faiss.StandardGpuResources()
        host = self.vectors
        self.vectors = torch.from_numpy(np.array(host)).cuda()  # counts on the device (fp16 stays fp16)
        if index is not None:
            return faiss.index_cpu_to_gpu(self._res, 0, index)  # the CPU index is dropped by the caller
        # fp16: FAISS stores the same rounded vectors in half precision (float32 in, exact).
        config = faiss.GpuIndexFlatConfig()
        config.useFloat16, config.device = True, 0
        gpu_index = faiss.GpuIndexFlatIP(self._res, self.dim, config)
        for c0 in range(0, self.n, self.count_chunk):
            gpu_index.add(np.ascontiguousarray(host[c0:c0 + self.count_chunk], dtype=np.float32))
        return gpu_index

    def _checked(self, block: np.ndarray) -> np.ndarray:
        block = np.ascontiguousarray(block, dtype=np.float32)
        if block.ndim != 2 or not np.isfinite(block).all():
            raise ValueError(f"shard at {self.first_id}: embeddings must be a finite [n, d] array")
        return block

    def _fp16_storage(self, blocks, total: int) -> np.ndarray:
        """The candidates rounded to float16, in one preallocated array (half the memory of
        float32; never a second full copy)."""
        storage, row = None, 0
        for block in blocks:
            block = self._checked(block)
            if storage is None:
                storage = np.empty((total, block.shape[1]), np.float16)
            with np.errstate(over="ignore"):  # an overflow becomes inf, refused just below
                storage[row:row + len(block)] = block
            if not np.isfinite(storage[row:row + len(block)]).all():
                raise ValueError(f"shard at {self.first_id}: an embedding value exceeds float16's range "
                                 f"(|x| > 65504); use eval.index_dtype=fp32")
            row += len(block)
        if storage is None or row == 0:
            raise ValueError(f"shard at {self.first_id}: no candidates")
        return storage

    # -- the two questions ------------------------------------------------------------------

    def relevant_scores(self, queries: np.ndarray, rows: np.ndarray,
                        ids: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """For (queries[rows[i]], candidate ids[i]) with ids in this shard: their scores
        (`exact_scores`, float64), groups and the candidates' norms (for the GEMM error bound)."""
        rows, local = np.asarray(rows, np.int64), np.asarray(ids, np.int64) - self.first_id
        if rows.size == 0:
            return np.zeros(0, np.float64), np.zeros(0, np.int64), np.zeros(0, np.float64)
        if local.min() < 0 or local.max() >= self.n:
            raise ValueError(f"relevant id outside shard [{self.first_id}, {self.first_id + self.n})")
        q = np.ascontiguousarray(queries, dtype=np.float32)
        vectors = self._rows(local)
        return exact_scores(q[rows], vectors), self.groups[local], np.linalg.norm(vectors.astype(np.float64), axis=1)

    def search_and_count(self, queries: np.ndarray, thresholds: np.ndarray, rel_ids: np.ndarray,
                         rel_groups: np.ndarray, rel_norms: np.ndarray, k: int) -> dict[str, np.ndarray]:
        """queries [B, d]; thresholds / rel_ids / rel_groups / rel_norms [B, R] (the relevant
        candidates' `relevant_scores`, global ids, groups and norms; padding: id -1, threshold
        +inf). Returns top-k 'scores'/'ids' [B, k'] (k' = min(k, shard size, GPU cap); k = 0:
        none) and int64 [B, R] counts 'above', 'tied' (all candidates here) and 'above_group',
        'tied_group', of the candidates that are not relevant to the query."""
        q = np.ascontiguousarray(queries, dtype=np.float32)
        t = np.asarray(thresholds, np.float64)
        rel_ids, rel_groups = np.asarray(rel_ids, np.int64), np.asarray(rel_groups, np.int64)
        if q.ndim != 2 or q.shape[1] != self.dim or t.shape != rel_ids.shape or t.shape[0] != q.shape[0]:
            raise ValueError(f"queries must be [B, {self.dim}] and thresholds/ids [B, R], got {q.shape}, {t.shape}")
        out = {name: np.zeros(t.shape, np.int64) for name in ("above", "tied", "above_group", "tied_group")}
        local = rel_ids - self.first_id
        q_norms = np.linalg.norm(q.astype(np.float64), axis=1)[:, None]
        gamma = float64_error_bound(self.dim)
        # On CPU the top-k comes from the same score chunks as the counts (a FAISS search would
        # compute every product a second time: ~45 % of a block's time, bench_eval_shards.py);
        # on a GPU the FAISS GPU index searches.
        top = None if self.on_gpu else (np.zeros((q.shape[0], 0), np.float32), np.zeros((q.shape[0], 0), np.int64))
        for (c0, c1, by_group), chunk_norm in zip(self.chunks, self.chunk_norms):
            scores = self._scores(q, slice(c0, c1))  # [B, c1 - c0], float64
            if top is not None and k > 0:  # float32 scores, as FAISS reports them (and ties stay ties)
                top = merge_sorted(top, chunk_top_k(scores.astype(np.float32), k, self.first_id + c0), k)
            # The query's relevant candidates held here are not counted (the driver orders them
            # among themselves by their exact scores): -inf is above no threshold and ties none.
            own_rows, own_rel = np.nonzero((local >= c0) & (local < c1))
            if own_rows.size:
                scores[self._like(own_rows, scores), self._like(local[own_rows, own_rel] - c0, scores)] = -np.inf
            # A GEMM score and an exact score are both within gamma |q| |v| of the true product:
            # outside twice the sum of the bounds the GEMM comparison is the exact one.
            margin = 2 * gamma * q_norms * (chunk_norm + np.asarray(rel_norms, np.float64))  # [B, R]
            low, high = self._like(t - margin, scores), self._like(t + margin, scores)
            near_rows, near_cols, near_r = [], [], []
            for r in range(t.shape[1]):
                surely_above = scores > high[:, r:r + 1]
                out["above"][:, r] += self._numpy(surely_above.sum(1))
                for code, cols in by_group.items():
                    rows = np.flatnonzero(rel_groups[:, r] == code)
                    if rows.size:
                        out["above_group"][rows, r] += self._numpy(surely_above[self._like(rows, scores)][:, cols].sum(1))
                rows, cols = self._nonzero((scores >= low[:, r:r + 1]) & ~surely_above)
                near_rows.append(rows)
                near_cols.append(cols)
                near_r.append(np.full(rows.size, r))
            rows, cols, rel = np.concatenate(near_rows), np.concatenate(near_cols), np.concatenate(near_r)
            if rows.size:  # duplicates and near-duplicates: decided by the fixed-order scores
                exact = exact_scores(q[rows], self._rows(c0 + cols))
                above, tied = exact > t[rows, rel], exact == t[rows, rel]
                same = self.groups[c0 + cols] == rel_groups[rows, rel]
                for name, hits in (("above", above), ("tied", tied), ("above_group", above & same),
                                   ("tied_group", tied & same)):
                    np.add.at(out[name], (rows, rel), hits.astype(np.int64))
        out["scores"], out["ids"] = self.search(q, k) if top is None else top
        return out

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """FAISS top-k of this shard: (scores [B, k'], global ids [B, k'])."""
        cap = min(self.n, GPU_MAX_K) if self.on_gpu else self.n
        k = min(int(k), cap)
        if k <= 0:
            return np.zeros((queries.shape[0], 0), np.float32), np.zeros((queries.shape[0], 0), np.int64)
        q = np.ascontiguousarray(queries, dtype=np.float32)
        if self.index is None:  # fp16 storage on CPU: the exact scores' chunks, as the count pass does
            top = (np.zeros((q.shape[0], 0), np.float32), np.zeros((q.shape[0], 0), np.int64))
            for c0 in range(0, self.n, self.count_chunk):
                chunk = self._scores(q, slice(c0, min(c0 + self.count_chunk, self.n))).astype(np.float32)
                top = merge_sorted(top, chunk_top_k(chunk, k, self.first_id + c0), k)
            return top
        wide = k
        while True:
            scores, labels = self.index.search(q, wide)
            # FAISS keeps an arbitrary subset of a tie at the cut: widen until no row's k-th score
            # reaches the last column, so the lowest ids of every tie are in hand.
            if wide >= cap or not np.any(scores[:, -1] == scores[:, k - 1]):
                break
            wide = min(2 * wide, cap)
        order = np.lexsort((labels, -scores), axis=-1)[:, :k]
        scores, labels = np.take_along_axis(scores, order, 1), np.take_along_axis(labels, order, 1)
        return scores, np.where(labels >= 0, labels + self.first_id, -1)

    # -- CPU (numpy) / GPU (torch) arithmetic ---------------------------------------------------

    def _scores(self, q: np.ndarray, cols):
        """float64 scores of the queries against columns `cols` (float32 inputs, exact in float64)."""
        if not self.on_gpu:
            return q.astype(np.float64) @ self.vectors[cols].astype(np.float64).T
        import torch

        q64 = torch.from_numpy(q).to(self.vectors.device, torch.float64)
        return q64 @ self.vectors[self._like(cols, self.vectors)].double().T

    def _rows(self, local: np.ndarray) -> np.ndarray:
        """Vectors of local rows, as a float32 numpy array (copied from the device on a GPU)."""
        return self._numpy(self.vectors[self._like(np.asarray(local, np.int64), self.vectors)])

    def _like(self, array, ref):
        """`array` (numpy or slice) as an operand next to `ref` (a numpy array or a CUDA tensor)."""
        if isinstance(ref, np.ndarray) or isinstance(array, slice):
            return array
        import torch

        return torch.as_tensor(array, device=ref.device)

    @staticmethod
    def _nonzero(mask) -> tuple[np.ndarray, np.ndarray]:
        """(rows, columns) of a 2-D numpy or torch mask's true entries, as numpy arrays."""
        if isinstance(mask, np.ndarray):
            return np.nonzero(mask)
        rows, cols = mask.nonzero(as_tuple=True)
        return rows.cpu().numpy(), cols.cpu().numpy()

    @staticmethod
    def _numpy(x) -> np.ndarray:
        return x if isinstance(x, np.ndarray) else x.cpu().numpy()

    def info(self) -> dict:
        return {"first_id": self.first_id, "n": self.n, "dim": self.dim, "on_gpu": self.on_gpu,
                "storage_dtype": self.storage_dtype}


def chunk_top_k(scores: np.ndarray, k: int, first_id: int) -> tuple[np.ndarray, np.ndarray]:
    """The k best columns of each row, score descending then id ascending, ties at the cut
    resolved to the lowest ids (argpartition alone keeps an arbitrary member of a tie)."""
    k = min(k, scores.shape[1])
    part = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    kth = np.take_along_axis(scores, part, 1).min(1)
    # Rows whose k-th score ties beyond the selection: redo those exactly (rare with real scores).
    ties = np.flatnonzero((scores == kth[:, None]).sum(1) != (np.take_along_axis(scores, part, 1) == kth[:, None]).sum(1))
    for b in ties:
        part[b] = np.lexsort((np.arange(scores.shape[1]), -scores[b]))[:k]
    top = np.take_along_axis(scores, part, 1)
    order = np.lexsort((part, -top), axis=1)
    return np.take_along_axis(top, order, 1), np.take_along_axis(part, order, 1) + first_id


def merge_sorted(a: tuple[np.ndarray, np.ndarray], b: tuple[np.ndarray, np.ndarray], k: int):
    """Two top lists -> the k best, score descending then id ascending."""
    scores, ids = np.concatenate([a[0], b[0]], 1), np.concatenate([a[1], b[1]], 1)
    order = np.lexsort((ids, -scores), axis=1)[:, :k]
    return np.take_along_axis(scores, order, 1), np.take_along_axis(ids, order, 1)
