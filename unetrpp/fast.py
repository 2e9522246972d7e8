"""Inference-time rewrites that keep the maths: `optimize_for_inference` swaps layers for subclasses
that compute the same function with faster CPU kernels when no gradient is needed, and
`reuse_freed_memory` keeps freed feature maps for reuse. What each one gains: benchmarks/README.md."""

from __future__ import annotations

import contextlib
import ctypes
import functools
import logging
import sys
import threading
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from .attention import EPA, TransformerBlock

log = logging.getLogger(__name__)


def _fast_path(x: torch.Tensor) -> bool:
    return x.device.type == "cpu" and not torch.is_grad_enabled() and x.dtype in (torch.float32, torch.bfloat16)


# oneDNN's Linear kernel, x (..., K) @ w (O, K)^T + b, the op PyTorch's own compiler (inductor)
# calls on the CPU; absent from builds without oneDNN.
_onednn_linear = getattr(torch.ops.mkldnn, "_linear_pointwise", None) if torch.backends.mkldnn.is_available() else None


def _onednn_ok(*tensors: torch.Tensor) -> bool:
    """oneDNN's product for float32 operands stored densely, row- or column-major: others (a slice of
    wider rows, say) fall back to a reference kernel, hundreds of times slower."""
    return _onednn_linear is not None and all(
        t.dtype == torch.float32 and (t.is_contiguous() or t.mT.is_contiguous()) for t in tensors)


def _linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x @ weight^T + bias by oneDNN; should a PyTorch build refuse the call (the op is internal to
    PyTorch's compiler), once a warning and from then on PyTorch's own linear."""
    global _onednn_linear
    if _onednn_linear is not None:
        try:
            return _onednn_linear(x, weight, bias, "none", [], "")
        except RuntimeError as exc:
            log.warning("oneDNN matrix product unavailable (%s); using torch's", str(exc).splitlines()[0])
            _onednn_linear = None
    return F.linear(x, weight, bias)


def _mix_channels(weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """weight (O, C) applied to every voxel of x (B, C, ...) -> (B, O, N), one 2-D product per sample
    (a broadcast batched matmul would transpose and copy both operands first)."""
    B, C = x.shape[:2]
    flat = x.reshape(B, C, -1)
    if C == 1:  # an outer product: a broadcast multiply is cheaper than a rank-1 matmul
        return weight.view(1, -1, 1) * flat
    if B == 1 and _onednn_ok(weight, flat[0]):  # (O, C) @ (C, N), as Linear(x=weight, w=flat^T)
        return _linear(weight.contiguous(), flat[0].t(), None).unsqueeze(0)
    out = flat.new_empty(B, weight.shape[0], flat.shape[-1])
    for b in range(B):
        torch.mm(weight, flat[b], out=out[b])
    return out


class FastConv3d(nn.Conv3d):
    """oneDNN called directly: on small grids (16^3 to 4^3) PyTorch's dispatcher picks its reference
    kernel, 5-15x slower there; 1x1x1 convolutions become one matrix product, with no layout reorders."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not _fast_path(x) or self.padding_mode != "zeros" or x.dtype != self.weight.dtype:
            return super().forward(x)
        if self.kernel_size == (1, 1, 1) and self.stride == (1, 1, 1) and self.groups == 1:
            B, C, Z, Y, X = x.shape
            y = _mix_channels(self.weight.flatten(1), x)  # (B, O, N)
            if self.bias is not None:
                y += self.bias[:, None]
            return y.view(B, -1, Z, Y, X)
        return torch.mkldnn_convolution(x.contiguous(), self.weight, self.bias, self.padding, self.stride,
                                        self.dilation, self.groups)


class FastLinear(nn.Linear):
    """oneDNN's matrix product rather than MKL's, which keeps to its AVX2 code on AMD CPUs (half the
    rate); only for dense operands, since oneDNN's reference kernel takes strided ones."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _fast_path(x) and x.is_contiguous() and _onednn_ok(x, self.weight):
            return _linear(x, self.weight, self.bias)
        return super().forward(x)


class FastConvTranspose3d(nn.ConvTranspose3d):
    """A kernel equal to its stride (every UNETR++ upsampling) as one matrix product: each input voxel
    paints its own output block, which is then put in place."""

    def forward(self, x: torch.Tensor, output_size: list[int] | None = None) -> torch.Tensor:
        patchwise = (self.kernel_size == self.stride and self.padding == (0, 0, 0) and self.groups == 1
                     and self.output_padding == (0, 0, 0) and self.dilation == (1, 1, 1) and output_size is None)
        if not patchwise or not _fast_path(x) or x.dtype != self.weight.dtype:
            return super().forward(x, output_size)
        B, C, Z, Y, X = x.shape
        kz, ky, kx = self.kernel_size
        y = _mix_channels(self.weight.flatten(1).t(), x)  # (B, O*kz*ky*kx, N)
        O = self.out_channels
        out = y.new_empty(B, O, Z * kz, Y * ky, X * kx)
        # each voxel's (kz, ky, kx) block into place, the bias added on the way (one pass, not two)
        blocks = y.view(B, O, kz, ky, kx, Z, Y, X).permute(0, 1, 5, 2, 6, 3, 7, 4)  # (B, O, Z, kz, Y, ky, X, kx)
        if self.bias is None:
            out.view(blocks.shape).copy_(blocks)
        else:
            torch.add(blocks, self.bias.view(1, O, 1, 1, 1, 1, 1, 1), out=out.view(blocks.shape))
        return out


class FastInstanceNorm3d(nn.InstanceNorm3d):
    """Group norm with one channel per group: the same statistics, a faster kernel."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.affine or self.track_running_stats or not _fast_path(x):
            return super().forward(x)
        return F.group_norm(x, x.shape[1], eps=self.eps)  # one channel per group = instance norm


# Queries per step of the spatial attention at inference: the (h, chunk, P) scores of one step
# (2 MiB of float32 for the synapse network's first stage, batch 1) stay in the CPU cache between the two products.
SPATIAL_CHUNK = 2048


def spatial_attention_in_chunks(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T) v for q (B, h, N, d) and k, v (B, h, P, d), returned transposed as (B, h, d, N)
    (stored as (B, d, h, N), the layout EPA reshapes next), SPATIAL_CHUNK queries at a time.

    The same maths as `scaled_dot_product_attention(q, k, v, scale=1)`, faster on the CPU for EPA's
    shapes (d of 8 to 32, P of 32 to 64), where the fused kernel's small blocks cost more than the maths.
    """
    B, h, N, d = q.shape
    out = q.new_empty(B, d, h, N).transpose(1, 2)  # (B, h, d, N)
    k_t, v_t = k.transpose(-2, -1), v.transpose(-2, -1)  # (B, h, d, P)
    for start in range(0, N, SPATIAL_CHUNK):
        scores = (q[:, :, start:start + SPATIAL_CHUNK] @ k_t).softmax(dim=-1)  # (B, h, chunk, P)
        out[..., start:start + SPATIAL_CHUNK] = v_t @ scores.transpose(-2, -1)  # (B, h, d, chunk)
    return out


def _without_autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """Autocast switched off inside, where it is on (it would run a float32 product in float16)."""
    if device.type in ("cpu", "cuda") and torch.is_autocast_enabled(device.type):
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()


class FastEPA(EPA):
    """EPA for inference, the same function computed faster: the unit-length normalisation of q and k
    only scales whole channels, so it goes onto the small (d, d) product and the (P, d) projected keys
    instead of passes over the (N, d) tensors; the spatial attention runs SPATIAL_CHUNK queries at a
    time on the CPU (4.7 ms per first-stage synapse block, against 8 ms for PyTorch's fused kernel and
    about 20 ms for EPA's explicit form) and through the fused kernel on GPUs. Training and kept
    attention maps take EPA's own forward."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training or self.keeps_attention():
            return super().forward(x)
        B, N, C = x.shape
        qkvv = self.qkvv(x)  # (B, N, 4C)
        q, k, v_ca, v_sa = rearrange(qkvv, "b n (four h d) -> four b h n d", four=4, h=self.heads)
        # each (B, h, N, d), a view of the one product; E and F act along N, here (P, N) @ (N, d)
        k_proj, v_proj = self._project_tokens(k), self._project_tokens(v_sa, values=True)  # (B, h, P, d)
        qk = qkvv[..., :2 * C]
        qk = qk.float() if qk.dtype == torch.float16 else qk  # float16 squares overflow above 256
        lengths = qk.square().sum(dim=1).sqrt().clamp_min(1e-12)  # (B, 2C)
        q_len, k_len = rearrange(lengths, "b (two h d) -> two b h 1 d", two=2, h=self.heads)  # each (B, h, 1, d)

        # Channel attention: q.k over all N tokens divided into cosines. The sums exceed float16's range
        # with trained weights before the division, so under autocast this small product runs in float32.
        wide = torch.promote_types(q.dtype, torch.float32)  # float32, or float64 for a float64 network
        with _without_autocast(q.device):
            cosine = q.transpose(-2, -1).to(wide) @ k.to(wide) / (q_len.transpose(-2, -1) * k_len).to(wide)
        attn_ca = (cosine.to(q.dtype) * self.temperature).softmax(dim=-1)  # (B, h, d, d)
        x_ca = rearrange(attn_ca @ v_ca.transpose(-2, -1), "b h d n -> b n (h d)")  # (B, N, C)

        # Spatial attention: the temperature and q's 1/length scale whole channels of q: onto the keys.
        k_proj = k_proj * (self.temperature2 / q_len)  # (B, h, P, d)
        if q.device.type == "cpu":
            x_sa = spatial_attention_in_chunks(q, k_proj, v_proj)  # (B, h, d, N)
        else:  # GPUs: one fused kernel, without storing the (N, P) map
            x_sa = F.scaled_dot_product_attention(q, k_proj, v_proj, scale=1.0).transpose(-2, -1)  # (B, h, d, N)
        x_sa = x_sa.transpose(1, 2).reshape(B, N, C)  # via (B, d, h, N): the original's reshape (issue #62)
        return self.fuse(x_sa, x_ca)

    def _project_tokens(self, t: torch.Tensor, values: bool = False) -> torch.Tensor:
        """`EPA.project` for tokens-major operands: (B, h, N, d) -> (B, h, P, d)."""
        if self.kv_projection == "single":
            return torch.einsum("bhnd,nk->bhkd", t, self.EF)
        linear = self.F if values else self.E
        return torch.matmul(linear.weight, t) + linear.bias[:, None]  # (P, N) @ (N, d) + b


# Below this many tokens per sample the channel-major block is no faster (measured on 2 cores).
MIN_CHANNEL_MAJOR_TOKENS = 512  # 8^3: 1.1 -> 0.9 ms; 4^3: 0.56 -> 0.83 ms for the attention half


class FastTransformerBlock(TransformerBlock):
    """The attention half of a TransformerBlock computed channel-major, one sample at a time.

    The feature map arrives and leaves channel-major, (C, N) per sample, and EPA's products all have
    a channel-major form (the original code itself turns q, k and v to (h, d, N)), so only the
    LayerNorm runs on tokens:
    - the qkvv product writes q, k and the spatial values as dense (C, N) row blocks, which oneDNN
      reads directly; k and the spatial values meet E in one product when one matrix projects both
      ("shared", "single");
    - the channel values are never stored: their weights, the channel branch's (d x d) maps and
      out_proj2 ("concat") multiply into one small matrix applied to the tokens;
    - the layer scale goes into the output projections ("concat") or scales the sum ("sum").
    The attention half of a first-stage synapse block takes about 30 % less time (14.6 -> 10.4 ms on
    2 cores); grids of fewer than MIN_CHANNEL_MAJOR_TOKENS tokens keep the plain path, where this one
    is slower. EPA's own submodules are not called here, so a block whose EPA carries forward hooks
    (on itself or a submodule) takes the plain path, where they fire.
    """

    def attend(self, x: torch.Tensor) -> torch.Tensor:
        epa = self.epa_block
        if (not _fast_path(x) or x.dtype != torch.float32 or self.gamma.dtype != x.dtype or self.training
                or epa.keeps_attention() or x.shape[2:] != self.grid or _onednn_linear is None
                or x[0, 0].numel() < MIN_CHANNEL_MAJOR_TOKENS
                or any(m._forward_hooks or m._forward_pre_hooks for m in epa.modules())):
            return super().attend(x)  # training, attention maps, other dtypes, small grids, hooks
        B, C, Z, Y, X = x.shape
        N, h = Z * Y * X, epa.heads
        d = C // h
        w = epa.qkvv.weight  # (4C, C), rows q, k, v_ca, v_sa
        w_qkv, w_vca = torch.cat((w[:2 * C], w[3 * C:])), w[2 * C:3 * C]  # rows q, k, v_sa: k next to v_sa
        out = x.new_empty(B, C, N)
        for b in range(B):
            t = torch.add(self.pos_embed[0], x[b].reshape(C, N).t(), out=x.new_empty(N, C))  # (N, C) tokens
            tokens = self.norm(t)  # (N, C)
            qkv = _linear(w_qkv, tokens, None)  # (3C, N)
            q, k, v_sa = qkv.split(C)  # each (C, N), rows (h d)
            lengths = torch.linalg.vector_norm(qkv[:2 * C], dim=-1).clamp_min(1e-12)  # (2C,), as F.normalize
            q_len, k_len = lengths.view(2, h, d, 1)  # each (h, d, 1)

            if epa.kv_projection == "shared":  # the projections act along N: (2C, N) @ (N, P), split in two
                k_proj, v_proj = _linear(qkv[C:], epa.E.weight, epa.E.bias).split(C)  # each (C, P)
            elif epa.kv_projection == "separate":
                k_proj, v_proj = _linear(k, epa.E.weight, epa.E.bias), _linear(v_sa, epa.F.weight, epa.F.bias)
            else:
                k_proj, v_proj = _linear(qkv[C:], epa.EF.t(), None).split(C)
            P = k_proj.shape[1]

            # channel attention: the diagonal (d, d) blocks of q k^T (C, C), divided into cosines
            cosine = _linear(q, k, None).view(h, d, h, d).diagonal(dim1=0, dim2=2).permute(2, 0, 1)  # (h, d, d)
            attn_ca = (cosine / (q_len * k_len.transpose(-2, -1)) * epa.temperature).softmax(dim=-1)
            # x_ca = mix_ca @ v_ca with v_ca = w_vca @ tokens^T: the (C, C) matrices multiply first,
            # and the channel values are never stored
            mix_ca = torch.block_diag(*attn_ca) @ w_vca  # (C, C)

            # spatial attention, as EPA computes it on the CPU; q (h, N, d) is a transposed view
            k_scaled = k_proj.view(h, d, P) * (epa.temperature2 / q_len)  # (h, d, P)
            x_sa = spatial_attention_in_chunks(q.view(1, h, d, N).mT, k_scaled.mT[None], v_proj.view(1, h, d, P).mT)
            x_sa = x_sa.transpose(1, 2).reshape(N, C)  # the original's token/channel-mixing reshape

            g = self.gamma[:, None]  # (C, 1)
            o = out[b]  # (C, N)
            if epa.branch_fusion == "concat":  # spatial half first, each through its projection
                half = C // 2
                w_sa, w_ca = epa.out_proj.weight * g[:half], (epa.out_proj2.weight @ mix_ca) * g[half:]
                torch.cat((_linear(w_sa, x_sa, None), _linear(w_ca, tokens, None)), out=o)
                o += torch.cat((epa.out_proj.bias, epa.out_proj2.bias))[:, None] * g
            else:  # sum
                torch.mm(mix_ca, tokens.t(), out=o)
                o += x_sa.t()
                o *= g
            o += t.t()
        return out.view(B, C, Z, Y, X)


_SWAPS = {nn.Conv3d: FastConv3d, nn.ConvTranspose3d: FastConvTranspose3d, nn.InstanceNorm3d: FastInstanceNorm3d,
          nn.Linear: FastLinear, EPA: FastEPA, TransformerBlock: FastTransformerBlock}


def optimize_for_inference(model: nn.Module) -> nn.Module:
    """Swap in the faster layers above, in place; returns `model`. Parameters and outputs stay the same."""
    swaps = _SWAPS if torch.backends.mkldnn.is_available() else {EPA: FastEPA}  # FastEPA needs no oneDNN
    swapped = 0
    for m in model.modules():
        if type(m) in swaps:
            m.__class__ = swaps[type(m)]
            swapped += 1
    log.debug("optimize_for_inference: %d layers swapped", swapped)
    return model


class ProcessWideSetting:
    """A process-wide setting as a context manager that nests and is safe across threads: the first
    user in calls `apply()` (which returns what to put back), the last one out `restore(saved)`."""

    def __init__(self, apply: Callable[[], Any], restore: Callable[[Any], None]):
        self._apply, self._restore = apply, restore
        self._lock = threading.Lock()
        self._users = 0
        self._saved: Any = None

    @contextlib.contextmanager
    def __call__(self) -> Iterator[None]:
        with self._lock:
            self._users += 1
            if self._users == 1:
                self._saved = self._apply()
        try:
            yield
        finally:
            with self._lock:
                self._users -= 1
                if self._users == 0:
                    self._restore(self._saved)


# glibc's mallopt parameters (malloc.h) and their documented defaults.
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8
_DEFAULT_TRIM_THRESHOLD, _DEFAULT_MMAP_MAX = 128 * 1024, 65536


@functools.cache
def _glibc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None)  # the C library this process already runs on
        libc.gnu_get_libc_version  # glibc only: musl and others have no such tunables
        return libc
    except (OSError, AttributeError):
        return None


def _keep_freed_memory() -> None:
    _glibc().mallopt(_M_MMAP_MAX, 0)
    _glibc().mallopt(_M_TRIM_THRESHOLD, 2**31 - 1)  # the largest value an int holds


def _return_freed_memory(_) -> None:
    _glibc().mallopt(_M_MMAP_MAX, _DEFAULT_MMAP_MAX)
    _glibc().mallopt(_M_TRIM_THRESHOLD, _DEFAULT_TRIM_THRESHOLD)
    _glibc().malloc_trim(0)


_reuse = ProcessWideSetting(_keep_freed_memory, _return_freed_memory)


def share_main_heap() -> None:
    """Threads started from now on allocate from glibc's main heap, like the main thread (glibc on Linux;
    elsewhere a no-op). Call it before starting the threads that will segment (a server's workers).

    glibc gives other threads heaps of their own, capped at 64 MB each, which cannot keep a 64 MB feature
    map: there `reuse_freed_memory` cannot help, and a forward pass in a worker thread took 0.80 s
    against 0.47 s. One shared heap costs a lock that large tensors hardly notice.
    """
    if _glibc() is not None:
        _glibc().mallopt(_M_ARENA_MAX, 1)


def reuse_freed_memory() -> contextlib.AbstractContextManager:
    """Inside the block, freed memory stays with the process for reuse (glibc on Linux; elsewhere a no-op).

    By default glibc gives every block above 32 MB its own mapping and unmaps it on free, so each
    64 MB feature map of every window is faulted in again, 4 KB at a time. Here large blocks come from
    the heap and stay there until the outermost block ends, when the memory goes back to the system
    (`malloc_trim`). Nests and is safe across threads (the last one out restores the defaults), but
    only the main thread and threads started after `share_main_heap()` gain from it.
    """
    return _reuse() if _glibc() is not None else contextlib.nullcontext()
