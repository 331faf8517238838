"""Small-batch scoring of an XGBoost tree ensemble, bit for bit as XGBoost scores it.

XGBoost 3.2 pays a fixed cost on every prediction call before it looks at a row: it rebuilds a
view of every tree and walks each one for its depth. For the flights model (164 trees, depth 10)
that is about 0.75 ms for one row on this machine, most of a single-row request's scoring time.
:class:`CompiledTrees` holds the same trees as flat numpy arrays and walks all of them at once,
level by level: about 60 us for one row. XGBoost stays faster from a few hundred rows on, so
:class:`BatchPredictor` uses the compiled trees only for small batches.

Bit for bit means the same float32 arithmetic: inputs rounded to float32, ``x < split`` else
right, a missing value (NaN) takes the node's default branch, leaf values added to the base
margin one tree after another in float32, and the logistic link computed with the C library's
``expf`` as XGBoost's own build computes it. :meth:`CompiledTrees.verified` proves it per model
before the compiled trees are used: rows built from the model's own split values (each split
value, the float just below it, and missing) must reach the same leaf in every tree as XGBoost's
``pred_leaf`` says, and every probability must equal XGBoost's exactly. Otherwise XGBoost scores
everything. Models this module does not cover (categorical splits,
vector leaves, DART, other objectives) also stay with XGBoost.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import json
import logging
from dataclasses import dataclass
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

SMALL_BATCH_ROWS = 128  # measured crossover with XGBoost's own predictor: 200-250 rows
_LINKS = {"binary:logistic": "logistic", "reg:logistic": "logistic", "reg:squarederror": "identity"}


class _LibM:
    """The C library's single-precision ``expf`` and ``logf``, the functions XGBoost calls."""

    def __init__(self) -> None:
        libm = ctypes.CDLL(ctypes.util.find_library("m") or "libm.so.6")
        self.expf, self.logf = libm.expf, libm.logf
        for fn in (self.expf, self.logf):
            fn.restype, fn.argtypes = ctypes.c_float, [ctypes.c_float]


@dataclass(frozen=True, eq=False)  # numpy fields: identity, not value, equality
class CompiledTrees:
    """A gbtree ensemble as flat arrays over all nodes of all trees.

    ``feature`` indexes a row widened to ``2 * n_features`` columns: the first half has missing
    values as -inf (they go left, ``x < split``), the second half as +inf (they go right), so a
    node's default branch is folded into the column it reads. ``child[2 * node]`` is the left
    child and ``child[2 * node + 1]`` the right; leaves point at themselves and hold their value
    in ``split``, so every row can take ``depth`` steps without checking for leaves.
    """

    n_features: int
    roots: np.ndarray  # int64 (n_trees,): each tree's first node
    feature: np.ndarray  # int64 (n_nodes,)
    split: np.ndarray  # float32 (n_nodes,): split value, or the leaf value at a leaf
    child: np.ndarray  # int64 (2 * n_nodes,)
    depth: int
    base_margin: np.float32
    link: str  # "logistic" or "identity"

    @classmethod
    def from_booster(cls, booster: Any) -> CompiledTrees | None:
        """The booster's trees, or None for a model this module does not cover."""
        model = json.loads(bytes(booster.save_raw("json")))["learner"]
        params = model["learner_model_param"]
        link = _LINKS.get(model["objective"]["name"])
        gbm = model["gradient_booster"]
        if (
            link is None
            or gbm["name"] != "gbtree"
            or int(params.get("num_class", 0)) > 1
            or int(params.get("num_target", 1)) != 1
        ):
            return None
        trees = gbm["model"]["trees"]
        if not trees or any(int(info) != 0 for info in gbm["model"]["tree_info"]):
            return None
        n_features = int(params["num_feature"])
        sizes = [len(t["left_children"]) for t in trees]
        roots = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
        feature = np.zeros(sum(sizes), np.int64)
        split = np.zeros(sum(sizes), np.float32)
        child = np.zeros(2 * sum(sizes), np.int64)
        depth = 0
        for tree, root in zip(trees, roots.tolist(), strict=True):
            if int(tree["tree_param"].get("size_leaf_vector", "1")) > 1 or any(
                int(s) != 0 for s in tree.get("split_type", ())
            ):
                return None  # vector leaves or categorical splits
            left = np.asarray(tree["left_children"], np.int64)
            right = np.asarray(tree["right_children"], np.int64)
            leaf = left == -1
            nodes = np.arange(len(left), dtype=np.int64) + root
            default_right = ~np.asarray(tree["default_left"], bool)
            columns = np.asarray(tree["split_indices"], np.int64) + n_features * default_right
            feature[nodes] = np.where(leaf, 0, columns)
            split[nodes] = np.asarray(tree["split_conditions"], np.float32)
            child[2 * nodes] = np.where(leaf, nodes, left + root)
            child[2 * nodes + 1] = np.where(leaf, nodes, right + root)
            depth = max(depth, _tree_depth(left, right))
        base = json.loads(params["base_score"]) if params["base_score"].startswith("[") else None
        base_score = np.float32(base[0] if base else float(params["base_score"]))
        if link == "logistic":
            # XGBoost's ProbToMargin, in float32: -logf(1 / p - 1)
            one = np.float32(1)
            base_margin = np.float32(-_libm().logf(float(one / base_score - one)))
        else:
            base_margin = base_score
        return cls(n_features, roots, feature, split, child, depth, base_margin, link)

    def _walk(self, x: np.ndarray) -> np.ndarray:
        """The leaf each row of ``x`` (n_rows, n_features) reaches in each tree (global ids)."""
        n, f = x.shape[0], self.n_features
        x32 = x.astype(np.float32)
        missing = np.isnan(x32)
        wide = np.empty((n, 2 * f), np.float32)
        wide[:, :f] = np.where(missing, -np.inf, x32)
        wide[:, f:] = np.where(missing, np.inf, x32)
        flat = wide.ravel()
        row_start = np.arange(0, n * 2 * f, 2 * f, dtype=np.int64)[:, None]
        node = np.broadcast_to(self.roots, (n, self.roots.size))
        for _ in range(self.depth):
            go_right = flat[self.feature[node] + row_start] >= self.split[node]
            node = self.child[2 * node + go_right]
        return node

    def leaves(self, x: np.ndarray) -> np.ndarray:
        """Per row and tree, the leaf's node id within its tree, as XGBoost's ``pred_leaf``."""
        return self._walk(x) - self.roots

    def margin(self, x: np.ndarray) -> np.ndarray:
        """float32 margins of the rows of ``x`` (n_rows, n_features); NaN is missing."""
        n, node = x.shape[0], self._walk(x)
        # The base margin, then each tree's leaf in tree order: XGBoost's float32 sum, in order
        # (np.add.accumulate adds left to right; np.sum would add pairwise).
        terms = np.empty((n, self.roots.size + 1), np.float32)
        terms[:, 0] = self.base_margin
        terms[:, 1:] = self.split[node]
        return np.add.accumulate(terms, axis=1, dtype=np.float32)[:, -1]

    def predict(self, x: np.ndarray) -> np.ndarray:
        """float32 predictions, as ``booster.inplace_predict`` gives them."""
        margin = self.margin(x)
        if self.link == "identity":
            return margin
        expf, one = _libm().expf, np.float32(1)
        # XGBoost's Sigmoid: 1 / (1 + expf(-x)) in float32 (its 1e-16 guard vanishes next to 1)
        e = np.fromiter((expf(-m) for m in margin.tolist()), np.float32, count=margin.size)
        return one / (one + e)

    def check_rows(self, n_rows: int = 512, seed: int = 0) -> np.ndarray:
        """Rows that land on every kind of branch: each feature takes one of its split values,
        the float just below one, or missing. Deterministic for a seed."""
        rng = np.random.default_rng(seed)
        internal = self.child[0::2] != np.arange(self.split.size)
        cols = self.feature[internal] % self.n_features
        values = self.split[internal]
        x = np.full((n_rows, self.n_features), np.nan, np.float64)
        for f in range(self.n_features):
            splits = np.unique(values[cols == f])
            if splits.size == 0:
                x[:, f] = rng.choice([0.0, np.nan], n_rows)
                continue
            below = np.nextafter(splits, np.float32(-np.inf))
            pool = np.concatenate([splits, below, [np.nan]]).astype(np.float64)
            x[:, f] = rng.choice(pool, n_rows)
        return x

    @classmethod
    def verified(cls, booster: Any, n_rows: int = 512) -> CompiledTrees | None:
        """:meth:`from_booster`, kept only when it equals XGBoost exactly on :meth:`check_rows`:
        the same leaf in every tree, and the same prediction."""
        try:
            compiled = cls.from_booster(booster)
            if compiled is None:
                return None
            import xgboost as xgb

            rows = compiled.check_rows(n_rows)
            matrix = xgb.DMatrix(rows, missing=np.nan, feature_names=booster.feature_names)
            leaves = booster.predict(matrix, pred_leaf=True).reshape(n_rows, -1)
            expected = np.asarray(booster.inplace_predict(rows), np.float32)
            routed = np.all(compiled.leaves(rows) == leaves, axis=1)
            scored = compiled.predict(rows) == expected
        except Exception as exc:  # the fast path must never keep a model from serving
            log.warning("tree scoring: the model could not be compiled (%s); XGBoost scores", exc)
            return None
        if not (routed.all() and scored.all()):
            log.warning(
                "tree scoring: %d of %d check rows differ from XGBoost; XGBoost scores",
                int(np.sum(~(routed & scored))),
                n_rows,
            )
            return None
        return compiled


@functools.cache
def _libm() -> _LibM:
    return _LibM()


def _tree_depth(left: np.ndarray, right: np.ndarray) -> int:
    depth, level = 0, np.array([0])
    while True:
        level = level[left[level] != -1]
        if level.size == 0:
            return depth
        level = np.concatenate([left[level], right[level]])
        depth += 1


class BatchPredictor:
    """``booster.inplace_predict``, with small batches on the verified compiled trees."""

    def __init__(self, booster: Any, small_batch_rows: int = SMALL_BATCH_ROWS) -> None:
        self.booster = booster
        self.small_batch_rows = small_batch_rows
        self.compiled = CompiledTrees.verified(booster) if small_batch_rows > 0 else None

    def __call__(self, x: np.ndarray) -> np.ndarray:
        if self.compiled is not None and x.shape[0] <= self.small_batch_rows:
            return self.compiled.predict(x)
        return self.booster.inplace_predict(x)
