"""How one benchmark row is measured: wall time per step, peak memory, FLOPs per step and the fraction of the device's
peak they reach.

Timing: `warmup` untimed calls (allocations, kernel selection, compilation), then `steps` timed calls of every path
of a loop in turn, each ended by a device synchronization so its queued GPU work is inside its window; the median
call is reported. FLOPs: one extra call under `torch.utils.flop_counter.FlopCounterMode` (matmuls, convolutions and their backward; elementwise work is not
counted, so the fraction of peak is a lower bound on how busy the math units are).
"""
from __future__ import annotations

import contextlib
import math
import platform
import statistics
import resource
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

# Dense peak TFLOP/s by device name (a substring of torch.cuda.get_device_name), from the vendors' data sheets (SXM
# parts where both exist). "fp32" is the TF32 tensor-core rate: PyTorch runs fp32 convolutions (nearly all of these
# models' FLOPs) in TF32 by default (torch.backends.cudnn.allow_tf32); "fp32_simt" is the plain CUDA-core rate, used
# when TF32 is switched off. "bf16" is the dense bf16 tensor-core rate.
DEVICE_PEAK_TFLOPS: dict[str, dict[str, float]] = {
    "H200": {"fp32": 494.7, "fp32_simt": 66.9, "bf16": 989.4},
    "H100 PCIe": {"fp32": 378.0, "fp32_simt": 51.2, "bf16": 756.0},
    "H100": {"fp32": 494.7, "fp32_simt": 66.9, "bf16": 989.4},
    "A100": {"fp32": 156.0, "fp32_simt": 19.5, "bf16": 312.0},
    "L40S": {"fp32": 183.0, "fp32_simt": 91.6, "bf16": 362.0},
    "A10": {"fp32": 62.5, "fp32_simt": 31.2, "bf16": 125.0},
    "V100": {"fp32": 15.7, "fp32_simt": 15.7, "bf16": 0.0},  # no TF32/bf16 tensor cores
    "TITAN RTX": {"fp32": 16.3, "fp32_simt": 16.3, "bf16": 0.0},
}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu {platform.machine()} ({torch.get_num_threads()} threads)"


def peak_tflops(device: torch.device, precision: str, override: float | None = None) -> float | None:
    """The device's dense peak for `precision` (fp32 | bf16) in TFLOP/s, or `override`; None when unknown (CPUs)."""
    if override is not None:
        return override
    if device.type != "cuda":
        return None
    name = device_name(device)
    for key, peaks in DEVICE_PEAK_TFLOPS.items():  # more specific names first ("H100 PCIe" before "H100")
        if key.lower() in name.lower():
            column = precision if precision != "fp32" or torch.backends.cudnn.allow_tf32 else "fp32_simt"
            return peaks.get(column) or None
    return None


# ----------------------------------------------------------------------------------------------- peak memory
def _rss_hwm_bytes() -> int:
    """This process's peak resident set size (VmHWM); ru_maxrss where /proc is missing."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    scale = 1 if platform.system() == "Darwin" else 1024  # bytes on macOS, KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def _reset_rss_hwm() -> bool:
    """Reset the peak-RSS mark (Linux: writing 5 to /proc/self/clear_refs); False where that is not possible, and
    the reported peak is then the process's peak so far."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


@contextlib.contextmanager
def peak_memory(device: torch.device):
    """Yields a dict that holds `bytes` (CUDA: max allocated by tensors; CPU: peak RSS of the process) and `kind`
    once the block exits."""
    out: dict[str, object] = {}
    if device.type == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
    else:
        out["kind"] = "rss" if _reset_rss_hwm() else "rss (process lifetime)"
    try:
        yield out
    finally:
        if device.type == "cuda":
            sync(device)
            out.update(bytes=torch.cuda.max_memory_allocated(device), kind="cuda max allocated")
        else:
            out["bytes"] = _rss_hwm_bytes()


# ------------------------------------------------------------------------------------------------------- FLOPs
def _conv_backward_flop(grad_out_shape, x_shape, w_shape, _bias, _stride, _padding, _dilation, transposed,
                        _output_padding, _groups, output_mask, out_shape=None, **kwargs) -> int:
    """Each requested gradient of a convolution (input, weight) costs what the forward convolution costs:
    2 * N * (spatial positions) * prod(weight shape), the weight shape carrying C_in / groups. torch's own formula
    (torch 2.x) counts the weight gradient without the groups, `groups` times too high for depthwise convolutions
    (NVAE's cells are mostly depthwise)."""
    spatial = (x_shape if transposed else grad_out_shape)[2:]
    forward = 2 * x_shape[0] * math.prod(spatial) * math.prod(w_shape)
    return forward * (int(bool(output_mask[0])) + int(bool(output_mask[1])))


def count_flops(fn: Callable[[], object]) -> int:
    """FLOPs of one call of `fn` (forward and backward matmuls/convolutions), by torch's FLOP counter."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False,
                              custom_mapping={torch.ops.aten.convolution_backward: _conv_backward_flop})
    with counter:
        fn()
    return int(counter.get_total_flops())


# ------------------------------------------------------------------------------------------------------ timing
@dataclass
class Timing:
    step_s: float  # median wall seconds per timed call (robust to other processes' bursts on a shared host)
    mean_s: float  # mean wall seconds per timed call
    peak_bytes: int  # see `peak_memory`
    peak_kind: str  # what peak_bytes measures
    flops: int | None  # per call; None when not counted


def tensor_bytes(*objects: object) -> int:
    """Bytes held by the tensors of modules (parameters, their gradients, buffers) and optimizers (state), each
    storage counted once: what a path keeps resident between steps."""
    seen, total = set(), 0

    def add(t: object) -> None:
        nonlocal total
        if isinstance(t, torch.Tensor) and t.device.type != "meta":
            key = (t.untyped_storage().data_ptr(), t.device)
            if key not in seen:
                seen.add(key)
                total += t.untyped_storage().nbytes()

    for obj in objects:
        if isinstance(obj, torch.nn.Module):
            for p in obj.parameters():
                add(p)
                add(p.grad)
            for b in obj.buffers():
                add(b)
        elif isinstance(obj, torch.optim.Optimizer):
            for state in obj.state.values():
                for v in state.values():
                    add(v)
    return total


def measure_group(fns: dict[str, Callable[[], object]], device: torch.device, steps: int, warmup: int,
                  resident: dict[str, Callable[[], int]] | None = None,
                  flops: dict[str, bool] | None = None) -> dict[str, Timing]:
    """Time several paths of one loop call by call in turn (A, B, A, B, ...), so a burst of other work on a shared
    host lands on every path alike and their ratio stays meaningful; the same statistics as `measure` per path.

    Peak memory per path on a GPU: its resident tensors (`resident[name]()`, read after the timed calls, when
    optimizer state exists) plus the largest transient of one of its calls (max allocated during the call minus
    allocated before it); the other paths' resident tensors are not counted. On a CPU: the process's peak RSS over
    the whole group (the same for every path)."""
    names = list(fns)
    cuda = device.type == "cuda"
    times: dict[str, list[float]] = {n: [] for n in names}
    transient = {n: 0 for n in names}
    with peak_memory(device) as mem:
        for _ in range(warmup):
            for n in names:
                fns[n]()
        sync(device)
        for _ in range(steps):
            for n in names:
                if cuda:
                    before = torch.cuda.memory_allocated(device)
                    torch.cuda.reset_peak_memory_stats(device)
                start = time.perf_counter()
                fns[n]()
                sync(device)
                times[n].append(time.perf_counter() - start)
                if cuda:
                    transient[n] = max(transient[n], torch.cuda.max_memory_allocated(device) - before)
    out = {}
    for n in names:
        if cuda:
            own = (resident or {}).get(n, lambda: 0)()
            peak, kind = own + transient[n], "cuda resident + call transient"
        else:
            peak, kind = int(mem["bytes"]), f"{mem['kind']} (process, all paths of this loop)"
        counted = count_flops(fns[n]) if (flops or {}).get(n, True) else None
        out[n] = Timing(step_s=statistics.median(times[n]), mean_s=statistics.fmean(times[n]), peak_bytes=int(peak),
                        peak_kind=kind, flops=counted)
    return out
