"""ThreadedShowcaseAdapter: the threaded server's default adapter, one tool per thread-safety pattern.

    python grpc_server_threaded.py --port 50052 --max-workers 16 --thread-safety-check \\
        --adapter snakepit_bridge.adapters.threaded_showcase.ThreadedShowcaseAdapter

It has every ShowcaseAdapter tool (ping, echo, add, sleep, fail, progress, array_stats, matmul, ...)
plus the patterns of the threaded workers guide:

* Pattern 1, shared read-only: ``self.weights``, ``self.model`` and ``self.config`` are built in
  ``__init__`` and never modified, so every thread reads them without a lock (``predict``,
  ``matrix_multiply``, ``compute_intensive``).
* Pattern 2, thread-local: ``predict`` and ``cached_compute`` keep a per-thread cache with
  ``get_thread_local``/``set_thread_local``; it survives across the requests a pool thread serves.
* Pattern 3, locked shared mutable state: ``total_predictions`` and ``prediction_log`` change only
  inside ``with self.acquire_lock():``, held just for the update, never during the numpy work.

The numpy work (BLAS matrix products, ufuncs on large arrays) releases the GIL, so threads run it in
parallel even on a GIL build; ``python_intensive`` is pure Python and does not.
"""
from __future__ import annotations

import hashlib
import threading
import time

import numpy as np

from ..contract.context import RequestContext
from ..contract.errors import StatusCode, ToolError
from ..threadsafety.adapter import ThreadSafeAdapter, thread_safe_method, tool
from .showcase import ShowcaseAdapter, check_range

_LOG_LIMIT = 1000  # prediction_log keeps the most recent entries


class TorchUnavailableError(RuntimeError):
    """``torch_inference`` was called on a worker without PyTorch installed."""


class _LinearModel:
    """A tiny read-only "pre-trained model": one dense layer with tanh, numpy only."""

    def __init__(self, weights: np.ndarray, bias: np.ndarray, labels: tuple[str, ...]) -> None:
        self.weights = weights
        self.bias = bias
        self.labels = labels
        weights.setflags(write=False)   # read-only for real: an accidental write raises
        bias.setflags(write=False)

    def predict(self, features: np.ndarray) -> tuple[str, float]:
        scores = np.tanh(features @ self.weights + self.bias)
        best = int(np.argmax(scores))
        return self.labels[best], float(scores[best])


class ThreadedShowcaseAdapter(ThreadSafeAdapter, ShowcaseAdapter):
    """Showcase tools plus the guide's three thread-safety patterns. Safe for many threads."""

    __thread_safe__ = True

    def __init__(self) -> None:
        super().__init__()
        rng = np.random.default_rng(20240601)
        # Pattern 1: shared read-only, built once, never modified.
        self.config = {"features": 32, "matrix_size": 16, "cache_limit": 256}
        dim = self.config["features"]
        self.model = _LinearModel(rng.standard_normal((dim, 8)) / np.sqrt(dim), rng.standard_normal(8) * 0.1,
                                  ("alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta"))
        self.weights = rng.standard_normal((self.config["matrix_size"], self.config["matrix_size"]))
        self.weights.setflags(write=False)
        # Pattern 3: shared mutable, only touched under self.acquire_lock().
        self.total_predictions = 0
        self.prediction_log: list[dict] = []
        self._torch_lock = threading.Lock()
        self._torch_model = None

    # -- Pattern 1 + 2: read-only model, thread-local cache ------------------------------------

    def _features(self, text: str) -> np.ndarray:
        digest = hashlib.sha256(text.encode("utf-8")).digest()
        seed = int.from_bytes(digest[:8], "little")
        return np.random.default_rng(seed).standard_normal(self.config["features"])

    @thread_safe_method
    @tool(description="Thread-safe prediction: shared read-only model, per-thread cache, locked log")
    def predict(self, input_data: str) -> dict:
        cache = self.get_thread_local("cache", {})          # Pattern 2: this thread's own cache
        cached = input_data in cache
        if cached:
            label, score = cache[input_data]
        else:
            label, score = self.model.predict(self._features(input_data))   # Pattern 1: shared, read-only
            if len(cache) >= self.config["cache_limit"]:
                cache.clear()
            cache[input_data] = (label, score)
            self.set_thread_local("cache", cache)
        self.log_prediction(label)                            # Pattern 3: locked shared state
        return {"prediction": label, "score": score, "cached": cached,
                "thread": threading.current_thread().name}

    @thread_safe_method
    def log_prediction(self, prediction) -> None:
        with self.acquire_lock():                             # held only for the update
            self.prediction_log.append({"prediction": prediction, "timestamp": time.time()})
            if len(self.prediction_log) > _LOG_LIMIT:
                del self.prediction_log[: len(self.prediction_log) - _LOG_LIMIT]
            self.total_predictions += 1

    @thread_safe_method
    @tool(description="The most recent predictions (the shared log, read under the lock)")
    def recent_predictions(self, limit: int = 10) -> dict:
        check_range("limit", limit, 0, _LOG_LIMIT)
        with self.acquire_lock():
            entries = list(self.prediction_log[-limit:]) if limit else []
            total = self.total_predictions
        return {"total_predictions": total, "recent": entries}

    @thread_safe_method
    @tool(description="Expensive per-key computation cached per thread (no lock on the cache)")
    def cached_compute(self, key: str) -> dict:
        cache = self.get_thread_local("compute_cache", {})
        if key in cache:
            return {"key": key, "value": cache[key], "cached": True,
                    "thread": threading.current_thread().name}
        features = self._features(key)
        value = float(np.linalg.norm(np.outer(features, features) @ features))
        cache[key] = value
        self.set_thread_local("compute_cache", cache)
        return {"key": key, "value": value, "cached": False, "thread": threading.current_thread().name}

    @thread_safe_method
    @tool(description="This thread's cache sizes; clear=true forgets them (only for this thread)")
    def thread_cache_info(self, clear: bool = False) -> dict:
        info = {"thread": threading.current_thread().name,
                "predict_cache": len(self.get_thread_local("cache", {})),
                "compute_cache": len(self.get_thread_local("compute_cache", {}))}
        if clear:
            self.clear_thread_local()
        return info

    # -- numpy work that releases the GIL ------------------------------------------------------

    @thread_safe_method
    @tool(description="Multiply a vector (or rows) by the shared read-only weight matrix")
    def matrix_multiply(self, data: list) -> list:
        arr = np.array(data, dtype=np.float64)
        n = self.weights.shape[0]
        if arr.shape[-1:] != (n,):
            raise ValueError(f"data must have {n} numbers per row, got shape {list(arr.shape)}")
        result = np.dot(arr, self.weights)                    # BLAS: releases the GIL
        return result.tolist()

    @thread_safe_method
    @tool(description="CPU-heavy numpy work that releases the GIL: repeated matrix products seeded by data")
    def compute_intensive(self, data: list[float], size: int = 128, iterations: int = 8,
                          ctx: RequestContext | None = None) -> dict:
        if not data:
            raise ToolError("data must not be empty", code=StatusCode.INVALID_ARGUMENT)
        check_range("size", size, 1, 2048)
        check_range("iterations", iterations, 0, 1000)
        started = time.perf_counter()
        values = np.asarray(data, dtype=np.float64)
        matrix = np.resize(values, (size, size)) / max(1.0, float(np.abs(values).max()) * size)
        state = np.eye(size) + matrix
        for _ in range(iterations):
            if ctx is not None and ctx.cancelled:
                raise ToolError("cancelled", code=StatusCode.CANCELLED)
            state = np.tanh((state @ state.T) / size + matrix)  # BLAS + ufuncs: the GIL is released
        result = {
            "input_size": int(values.size),
            "size": size,
            "iterations": iterations,
            "result": float(state.sum()),
            "checksum": float(np.abs(state).mean()),
            "thread": threading.current_thread().name,
            "elapsed_ms": (time.perf_counter() - started) * 1000.0,
        }
        return result

    @thread_safe_method
    @tool(description="CPU-heavy pure-Python work (holds the GIL): sum of i*i mod 7 for i < n")
    def python_intensive(self, n: int = 200_000, ctx: RequestContext | None = None) -> dict:
        check_range("n", n, 0, 50_000_000)
        started = time.perf_counter()
        total = 0
        for chunk_start in range(0, n, 100_000):  # look at cancellation between chunks of ~5 ms
            if ctx is not None and ctx.cancelled:
                raise ToolError("cancelled", code=StatusCode.CANCELLED)
            for i in range(chunk_start, min(n, chunk_start + 100_000)):
                total += (i * i) % 7
        return {"n": n, "result": total, "thread": threading.current_thread().name,
                "elapsed_ms": (time.perf_counter() - started) * 1000.0}

    # -- optional PyTorch ----------------------------------------------------------------------

    def _torch(self):
        try:
            import torch
        except ImportError as exc:
            raise TorchUnavailableError(
                "torch_inference needs PyTorch, which is not installed in this worker's Python "
                f"({exc}). Install it (pip install torch) or use compute_intensive/predict, which "
                "need only numpy.") from None
        return torch

    def _torch_model_once(self, torch):
        # Lazy initialisation done right: check and create under one lock.
        with self._torch_lock:
            if self._torch_model is None:
                generator = torch.Generator().manual_seed(7)
                model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 4))
                with torch.no_grad():
                    for p in model.parameters():
                        p.copy_(torch.randn(p.shape, generator=generator) * 0.3)
                model.eval()
                self._torch_model = model
            return self._torch_model

    @thread_safe_method
    @tool(description="Forward pass of a small shared PyTorch model (needs torch; releases the GIL)")
    def torch_inference(self, input_tensor: list) -> dict:
        torch = self._torch()
        model = self._torch_model_once(torch)
        x = torch.tensor(input_tensor, dtype=torch.float32)
        if x.shape[-1:] != (16,):
            raise ValueError(f"input_tensor must have 16 numbers per row, got shape {list(x.shape)}")
        with torch.no_grad():
            output = model(x)
        return {"output": output.tolist(), "torch_version": torch.__version__,
                "thread": threading.current_thread().name}

    # -- monitoring ----------------------------------------------------------------------------

    @thread_safe_method
    @tool(description="Thread utilisation: total/active requests, max_workers, per-thread counts")
    def get_thread_stats(self) -> dict:
        return self.get_stats()

    def get_stats(self) -> dict:
        stats = super().get_stats()
        with self.acquire_lock():
            stats["total_predictions"] = self.total_predictions
            stats["prediction_log_size"] = len(self.prediction_log)
        return stats
