"""Where and how the network runs: the device, bfloat16 on the CPU, windows per pass on CUDA,
`torch.compile` with CUDA graphs, and float32 that is really float32 on CUDA. `inference.segment`
uses all of these; measurements behind the numbers are in benchmarks/README.md."""

from __future__ import annotations

import functools
import logging
import math
from typing import Sequence

import torch

from .fast import ProcessWideSetting

logger = logging.getLogger(__name__)

# Windows per forward pass on CUDA when sw_batch_size is "auto" (or None), before the memory cap below.
# An eager forward pass is bound by kernel launches up to about 8 windows on an H200 (about 55 ms a
# pass for 1 to 8 windows); 16 at once doubles the windows per second (benchmarks/README.md).
CUDA_SW_BATCH = 16
# Rough GPU memory one window needs during a forward pass, per voxel of the window (activations of
# the full-resolution path, softmax and blending), under autocast and in float32 (H200: 0.24 and
# 0.43 GB per 64x128x128 window); only used to cap the auto batch.
_BYTES_PER_WINDOW_VOXEL = {True: 256, False: 512}
# torch.compile mode for compile=True: the window shape never changes, so CUDA graphs (which
# "reduce-overhead" adds to inductor's fused kernels) replay one recorded forward per batch without
# launch overhead; "max-autotune" would spend minutes benchmarking kernels on every new process.
COMPILE_MODE = "reduce-overhead"


def cpu_bf16_is_fast() -> bool:
    """Whether this CPU computes bfloat16 natively (AVX512-BF16 or AMX), where precision="bf16" pays;
    elsewhere bfloat16 is emulated and slower than float32."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """`device`, or CUDA when available, else CPU; refuses CUDA devices that are not there, and other
    device types (Apple's MPS among them: not supported or tested here)."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device={device!r} is not a device name; use 'cpu', 'cuda' or 'cuda:N'") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device={str(device)!r} but CUDA is not available here; use device 'cpu'")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"device={str(device)!r} but only {torch.cuda.device_count()} CUDA device(s) exist; "
                             f"use cuda:0..cuda:{torch.cuda.device_count() - 1}")
    elif dev.type != "cpu":
        raise ValueError(f"device={str(device)!r}: unetrpp runs on the CPU or on CUDA GPUs, not on {dev.type!r} "
                         "devices; use 'cpu', 'cuda' or 'cuda:N'")
    return dev


def auto_sw_batch_size(sw_batch_size: int | str | None, device: torch.device, patch: Sequence[int],
                       autocast: bool = True) -> int:
    """Windows per forward pass: an integer as given; None or "auto" gives 1 on the CPU (a larger
    batch is not faster there) and on CUDA `CUDA_SW_BATCH`, fewer when a quarter of the free GPU
    memory does not hold them (`autocast`: half-precision activations, else float32)."""
    if sw_batch_size is None or sw_batch_size == "auto":
        if device.type != "cuda":
            return 1
        free, _ = torch.cuda.mem_get_info(device)
        fits = int(0.25 * free) // (_BYTES_PER_WINDOW_VOXEL[autocast] * math.prod(patch))
        return max(1, min(CUDA_SW_BATCH, fits))
    if isinstance(sw_batch_size, bool) or not isinstance(sw_batch_size, int) or sw_batch_size < 1:
        raise ValueError(f"sw_batch_size={sw_batch_size!r}: must be a positive integer or 'auto' "
                         f"(1 on CPU, {CUDA_SW_BATCH} on a GPU)")
    return sw_batch_size


class CompiledNetwork(torch.nn.Module):
    """`torch.compile` of a network that falls back to the network itself, with one logged warning,
    when compiling fails on the first call (no Triton, no C compiler, an unsupported Python)."""

    def __init__(self, net: torch.nn.Module, mode: str = COMPILE_MODE):
        super().__init__()
        self.net = net
        self.compiled = torch.compile(net, mode=mode, dynamic=False)
        self.cudagraphs = "reduce-overhead" in mode
        self.failed: str | None = None
        self.compiled_for: set[tuple] = set()  # the input kinds compiled so far (`input_kind`)

    @staticmethod
    def input_kind(x: torch.Tensor) -> tuple:
        """What makes torch.compile compile again: the shape, the dtype and the autocast dtype."""
        autocast = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else None
        return tuple(x.shape), x.dtype, autocast

    def will_compile(self, shape: Sequence[int], dtype: torch.dtype, autocast: torch.dtype | None) -> bool:
        """Whether a call with this input (under this autocast dtype, or None) would compile first."""
        return self.failed is None and (tuple(shape), dtype, autocast) not in self.compiled_for

    def forward(self, x: torch.Tensor):
        if self.failed is None:
            try:
                if self.cudagraphs:  # each call is a new step: the last outputs are already consumed
                    torch.compiler.cudagraph_mark_step_begin()
                out = self.compiled(x)
                self.compiled_for.add(self.input_kind(x))
                return out
            except Exception as exc:  # compile errors come in many types; eager gives the same result
                first = str(exc).splitlines()[0] if str(exc) else ""
                self.failed = f"torch.compile failed ({type(exc).__name__}: {first[:200]}); running without it"
                logger.warning(self.failed)
        return self.net(x)

    @property
    def config(self):
        return self.net.config


# Compiled wrappers by id of their network, kept (with the network) for the life of the process:
# compiling takes tens of seconds, and an app segments many volumes with one network.
_COMPILED: dict[int, CompiledNetwork] = {}


def _dynamo_supported() -> bool:
    """Whether torch.compile can trace on this Python and platform (it raises at the first call otherwise)."""
    from torch._dynamo import is_dynamo_supported

    return is_dynamo_supported()


def compile_network(net: torch.nn.Module, device: torch.device) -> tuple[torch.nn.Module, str | None]:
    """(`net` wrapped in torch.compile, None) on CUDA, or (`net`, why not) where compiling does not
    apply. The wrapper is kept per network, so later calls reuse its compiled code and graphs."""
    if device.type != "cuda":
        return net, f"compile=True is for CUDA; running without torch.compile on {device.type}"
    if not _dynamo_supported():
        return net, "compile=True but torch.compile is not supported on this platform; running without it"
    if id(net) not in _COMPILED:
        _COMPILED[id(net)] = CompiledNetwork(net)
    return _COMPILED[id(net)], None


# torch.backends.cudnn.conv exists from torch 2.9: the per-backend fp32_precision settings replace
# the older allow_tf32 flags, and reading an old flag after a new setting raises.
_PRECISION_BACKENDS = ("cuda.matmul", "cudnn.conv", "cudnn.rnn") if hasattr(torch.backends.cudnn, "conv") else ()
_TRUE_FLOAT32 = ("ieee",) * 3 if _PRECISION_BACKENDS else ("highest", False)


def _precision_backends() -> list:
    return [functools.reduce(getattr, name.split("."), torch.backends) for name in _PRECISION_BACKENDS]


def _float32_settings() -> tuple:
    """This torch's TF32 settings; `_TRUE_FLOAT32` is true float32."""
    if _PRECISION_BACKENDS:
        return tuple(backend.fp32_precision for backend in _precision_backends())
    return torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32


def _set_float32_settings(values: tuple) -> None:
    if _PRECISION_BACKENDS:
        for backend, value in zip(_precision_backends(), values):
            backend.fp32_precision = value
    else:
        torch.set_float32_matmul_precision(values[0])
        torch.backends.cudnn.allow_tf32 = values[1]


def _turn_tf32_off() -> tuple:
    saved = _float32_settings()
    _set_float32_settings(_TRUE_FLOAT32)
    return saved


# Float32 products and convolutions on CUDA that are really float32: PyTorch lets cuDNN run float32
# convolutions in TF32 (10-bit mantissa) by default, which moves the golden logits by 2e-2 on an
# H200 against 4e-5 without (benchmarks/README.md). A context manager over process-wide settings:
# the first of overlapping users turns TF32 off, the last one puts the caller's settings back.
true_float32 = ProcessWideSetting(_turn_tf32_off, _set_float32_settings)
