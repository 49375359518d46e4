"""Timing, peak memory, worker subprocesses and tables shared by the benchmark scripts.

Each side of a comparison runs in its own worker subprocess (`python -m bench.<script> --worker JSON`),
so that its peak RSS / CUDA peak is its own and an out-of-memory run cannot take the other side down.
The parent drives the workers step by step over stdin/stdout and interleaves the two sides' steps.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from typing import Any

import torch

PRECISIONS: dict[str, torch.dtype | None] = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
READY = "BENCH_READY"
TIME_MARKER = "BENCH_TIME "
RESULT_MARKER = "BENCH_RESULT "
GIB = 2**30
# Dense bf16 tensor-core peaks (TFLOP/s, no sparsity) from the vendors' data sheets, matched against
# torch.cuda.get_device_name() in this order (first substring that matches wins).
BF16_PEAK_TFLOPS: tuple[tuple[str, float], ...] = (
    ("H200", 989.0), ("H100 NVL", 835.0), ("H100 PCIe", 756.0), ("H100", 989.0), ("A100", 312.0),
    ("L40S", 362.0), ("L4", 121.0), ("A10G", 70.0), ("RTX 4090", 165.0),
)


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1 (steps, runs, batch sizes)."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {value}")
    return value


def autocast_dtype(precision: str) -> torch.dtype | None:
    """None for fp32, else the autocast dtype ("bf16", "fp16")."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {tuple(PRECISIONS)}, got {precision!r}")
    return PRECISIONS[precision]


def autocast(device: torch.device, precision: str) -> AbstractContextManager:
    """torch.autocast for `precision` (disabled for fp32)."""
    dtype = autocast_dtype(precision)
    return torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak_memory(device: torch.device) -> None:
    """Start a new CUDA peak (on CPU the RSS peak of the process cannot be reset; it covers the run)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_bytes(device: torch.device) -> int:
    """CUDA: torch.cuda.max_memory_allocated since the last reset. CPU: the peak RSS of this process."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def bf16_peak_tflops(device: torch.device) -> float | None:
    """The GPU's dense bf16 peak from `BF16_PEAK_TFLOPS`, or None when unknown (or on CPU)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in BF16_PEAK_TFLOPS if key in name), None)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({torch.get_num_threads()} torch threads)"


class WorkerError(RuntimeError):
    """A worker died (e.g. out of memory) or broke the protocol."""


def serve(step: Callable[[], Any], device: torch.device, finish: Callable[[], dict[str, Any]]) -> None:
    """Worker side: announce READY, then run one `step` per "step" line on stdin until "finish", which
    answers `finish()` (peak memory etc.) and returns.

    The answer to "step" is the step's wall time, or the float that `step` returns when it times
    itself (e.g. the median DDIM step inside one sampling run).
    """
    print(READY, flush=True)
    for line in sys.stdin:
        command = line.strip()
        if command == "step":
            start = time.perf_counter()
            own_time = step()
            synchronize(device)
            seconds = own_time if isinstance(own_time, float) else time.perf_counter() - start
            print(f"{TIME_MARKER}{seconds}", flush=True)
        elif command == "finish":
            print(RESULT_MARKER + json.dumps(finish()), flush=True)
            return


class Worker:
    """Parent side of one worker subprocess: `python -m module --worker JSON(job)`."""

    def __init__(self, module: str, job: dict[str, Any]):
        self.log = tempfile.TemporaryFile(mode="w+")  # stderr (warnings, progress bars), read on failure
        self.process = subprocess.Popen([sys.executable, "-m", module, "--worker", json.dumps(job)],
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, text=True)

    def wait_ready(self) -> None:
        """Block until the worker has built its side."""
        self._expect(READY)

    def _expect(self, marker: str) -> str:
        for line in self.process.stdout:  # other lines (library prints) are skipped
            if line.startswith(marker):
                return line[len(marker):].strip()
        self.process.wait()
        self.log.seek(0)
        tail = " | ".join(self.log.read().strip().splitlines()[-4:])
        raise WorkerError(f"worker exited with {self.process.returncode}: {tail}")

    def _send(self, command: str, marker: str) -> str:
        try:
            self.process.stdin.write(command + "\n")
            self.process.stdin.flush()
        except BrokenPipeError:
            pass  # the worker is gone; _expect reports why
        return self._expect(marker)

    def step(self) -> float:
        """Run one step in the worker; its wall time in seconds."""
        return float(self._send("step", TIME_MARKER))

    def finish(self) -> dict[str, Any]:
        result = json.loads(self._send("finish", RESULT_MARKER))
        self.process.wait()
        return result

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        self.log.close()


def run_interleaved(module: str, jobs: dict[str, dict[str, Any]], warmup: int, steps: int) -> dict[str, dict]:
    """Run each job in its own worker, their steps interleaved (A B, B A, A B, ...), so that a change in
    the machine's load hits both sides alike. Each result gets `step_seconds` (the timed steps, warm-up
    excluded) and `median_step_s`; a failed side gets {"error": ...}.

    The workers build their sides at the same time (nothing is timed then) and stay alive together;
    during the timed steps only one computes at a time.
    """
    workers = {name: Worker(module, job) for name, job in jobs.items()}
    results: dict[str, dict[str, Any]] = {name: {"step_seconds": []} for name in jobs}
    try:
        for name, worker in workers.items():
            try:
                worker.wait_ready()
            except WorkerError as err:
                results[name] = {"error": str(err)}
        order = list(workers)
        for index in range(warmup + steps):
            for name in order if index % 2 == 0 else order[::-1]:
                if "error" in results[name]:
                    continue
                try:
                    seconds = workers[name].step()
                except WorkerError as err:
                    results[name] = {"error": str(err)}
                    continue
                if index >= warmup:
                    results[name]["step_seconds"].append(seconds)
        for name, worker in workers.items():
            if "error" in results[name]:
                continue
            try:
                results[name].update(worker.finish())
            except WorkerError as err:
                results[name] = {"error": str(err)}
                continue
            results[name]["median_step_s"] = median(results[name]["step_seconds"])
    finally:
        for worker in workers.values():
            worker.close()
    return results


def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub-markdown table (readable in a terminal, pasteable into the README)."""
    cells = [[str(h) for h in headers]] + [[_cell(v) for v in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) + " |" for row in cells]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 100 else f"{value:.0f}"
    return str(value)


def ratio(ours: float | None, peer: float | None) -> float | None:
    if ours is None or peer is None or peer == 0:
        return None
    return ours / peer
