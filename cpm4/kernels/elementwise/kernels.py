"""The decoder layer's element-wise ops as one Triton kernel each, for the eager (uncompiled) CUDA path: RMSNorm
(eager: five kernels), residual add + RMSNorm (seven), RoPE (about six), SiLU·up (two), residual add (two). Each
rounds where the reference (`reference.py`) rounds, in the same order, with floating-point contraction off, so
results equal eager PyTorch's up to the summation order of the norm's mean square."""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

# No fused multiply-add: eager PyTorch rounds every product (each op is its own kernel), and so does this.
_EXACT = {"enable_fp_fusion": False}


@triton.jit
def _normalize(s, w_ptr, cols, cm, H, eps, OUT: tl.constexpr):
    """rms_norm of one row s (already in the input dtype, as fp32 values): statistics in fp32, the normalised value
    rounded to the input dtype, then times the weight, rounded."""
    sf = s.to(tl.float32)
    var = tl.sum(tl.where(cm, sf * sf, 0.0), 0) * (1.0 / H)  # ATen's mean: the sum times 1/n
    r = tl.rsqrt(var + eps)
    n = (sf * r).to(OUT)
    w = tl.load(w_ptr + cols, mask=cm, other=0.0)
    return (n.to(tl.float32) * w.to(tl.float32)).to(OUT)


@triton.jit
def _rms_norm_kernel(x_ptr, w_ptr, o_ptr, H, stride_x, stride_o, eps, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    cm = cols < H
    x = tl.load(x_ptr + row * stride_x + cols, mask=cm, other=0.0)
    tl.store(o_ptr + row * stride_o + cols, _normalize(x, w_ptr, cols, cm, H, eps, o_ptr.dtype.element_ty), mask=cm)


@triton.jit
def _add_rms_norm_kernel(x_ptr, y_ptr, w_ptr, s_ptr, o_ptr, H, stride_x, stride_y, stride_o, scale, eps,
                         BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    cm = cols < H
    dt = s_ptr.dtype.element_ty
    x = tl.load(x_ptr + row * stride_x + cols, mask=cm, other=0.0)
    y = tl.load(y_ptr + row * stride_y + cols, mask=cm, other=0.0)
    s = (x.to(tl.float32) + (y.to(tl.float32) * scale).to(dt).to(tl.float32)).to(dt)  # x + (y * scale)
    tl.store(s_ptr + row * stride_o + cols, s, mask=cm)
    tl.store(o_ptr + row * stride_o + cols, _normalize(s, w_ptr, cols, cm, H, eps, dt), mask=cm)


@triton.jit
def _add_scaled_kernel(x_ptr, y_ptr, o_ptr, n, scale, BLOCK: tl.constexpr):
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = i < n
    dt = o_ptr.dtype.element_ty
    x = tl.load(x_ptr + i, mask=m, other=0.0)
    y = tl.load(y_ptr + i, mask=m, other=0.0)
    tl.store(o_ptr + i, (x.to(tl.float32) + (y.to(tl.float32) * scale).to(dt).to(tl.float32)).to(dt), mask=m)


@triton.jit
def _silu_mul_kernel(g_ptr, u_ptr, o_ptr, I, stride_g, stride_u, stride_o, BLOCK: tl.constexpr,
                     LIBDEVICE: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    cm = cols < I
    dt = o_ptr.dtype.element_ty
    g = tl.load(g_ptr + row * stride_g + cols, mask=cm, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + row * stride_u + cols, mask=cm, other=0.0).to(tl.float32)
    if LIBDEVICE:  # ATen's F.silu uses the precise expf; tl.exp is the fast approximation
        e = libdevice.exp(-g)
    else:  # the interpreter (numpy's exp is precise)
        e = tl.exp(-g)
    act = (g / (1.0 + e)).to(dt)  # F.silu, rounded to the input dtype
    tl.store(o_ptr + row * stride_o + cols, (act.to(tl.float32) * u).to(dt), mask=cm)


# T (tokens per row) changes every prefill step, a packed one being all of the step's tokens: specialized, each
# new class of it (1, a multiple of 16, other) compiled two kernels (q's and k's head counts) in the middle of
# serving (H200, 0.5B: two compilations inside every timed run). It only divides the program id.
@triton.jit(do_not_specialize=["T"])
def _rotary_kernel(x_ptr, c_ptr, s_ptr, o_ptr, T, NH, stride_xb, stride_xt, stride_xh, stride_cb, stride_ct,
                   stride_ob, stride_ot, stride_oh, HALF: tl.constexpr, NH_PAD: tl.constexpr):
    """One (batch row, token): all heads. out = x*cos + rotate_half(x)*sin in fp32, rounded to x's dtype."""
    r = tl.program_id(0)
    b = (r // T).to(tl.int64)
    t = (r % T).to(tl.int64)
    hh = tl.arange(0, NH_PAD)
    dd = tl.arange(0, HALF)
    hm = (hh < NH)[:, None]
    xp = x_ptr + b * stride_xb + t * stride_xt + hh[:, None] * stride_xh + dd[None, :]
    x1 = tl.load(xp, mask=hm, other=0.0).to(tl.float32)
    x2 = tl.load(xp + HALF, mask=hm, other=0.0).to(tl.float32)
    cp = b * stride_cb + t * stride_ct + dd
    c1, c2 = tl.load(c_ptr + cp)[None, :], tl.load(c_ptr + cp + HALF)[None, :]
    s1, s2 = tl.load(s_ptr + cp)[None, :], tl.load(s_ptr + cp + HALF)[None, :]
    dt = o_ptr.dtype.element_ty
    op = o_ptr + b * stride_ob + t * stride_ot + hh[:, None] * stride_oh + dd[None, :]
    tl.store(op, (x1 * c1 + (-x2) * s1).to(dt), mask=hm)
    tl.store(op + HALF, (x2 * c2 + x1 * s2).to(dt), mask=hm)


def _rows(x: torch.Tensor) -> torch.Tensor:
    """x as [rows, last] with unit stride along the last dimension (a view where possible)."""
    x = x if x.stride(-1) == 1 else x.contiguous()
    return x.reshape(-1, x.shape[-1])


def _check_norm(x: torch.Tensor, weight: torch.Tensor) -> None:
    if weight.shape != (x.shape[-1],):
        raise ValueError(f"norm weight {tuple(weight.shape)} does not fit hidden size {x.shape[-1]}")


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    _check_norm(x, weight)
    xr = _rows(x)
    out = torch.empty(xr.shape, device=x.device, dtype=x.dtype)
    if xr.numel():
        h = xr.shape[1]
        _rms_norm_kernel[(xr.shape[0],)](xr, weight, out, h, xr.stride(0), out.stride(0), eps,
                                         BLOCK=triton.next_power_of_2(h), num_warps=_warps(h), **_EXACT)
    return out.view(x.shape)


def add_rms_norm(x: torch.Tensor, y: torch.Tensor, scale: float, weight: torch.Tensor, eps: float
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    _check_norm(x, weight)
    if x.shape != y.shape or x.dtype != y.dtype:
        raise ValueError(f"residual {tuple(x.shape)} {x.dtype} and update {tuple(y.shape)} {y.dtype} differ")
    xr, yr = _rows(x), _rows(y)
    s = torch.empty(xr.shape, device=x.device, dtype=x.dtype)
    out = torch.empty_like(s)
    if xr.numel():
        h = xr.shape[1]
        _add_rms_norm_kernel[(xr.shape[0],)](xr, yr, weight, s, out, h, xr.stride(0), yr.stride(0), s.stride(0),
                                             scale, eps, BLOCK=triton.next_power_of_2(h), num_warps=_warps(h),
                                             **_EXACT)
    return s.view(x.shape), out.view(x.shape)


def add_scaled(x: torch.Tensor, y: torch.Tensor, scale: float) -> torch.Tensor:
    if x.shape != y.shape or x.dtype != y.dtype:
        raise ValueError(f"residual {tuple(x.shape)} {x.dtype} and update {tuple(y.shape)} {y.dtype} differ")
    x, y = x.contiguous(), y.contiguous()
    out = torch.empty_like(x)
    n = x.numel()
    if n:
        block = 2048
        _add_scaled_kernel[(triton.cdiv(n, block),)](x, y, out, n, scale, BLOCK=block, num_warps=8, **_EXACT)
    return out


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    if gate.shape != up.shape or gate.dtype != up.dtype:
        raise ValueError(f"gate {tuple(gate.shape)} {gate.dtype} and up {tuple(up.shape)} {up.dtype} differ")
    g, u = _rows(gate), _rows(up)
    out = torch.empty(g.shape, device=gate.device, dtype=gate.dtype)
    if g.numel():
        block = min(2048, triton.next_power_of_2(g.shape[1]))
        _silu_mul_kernel[(g.shape[0], triton.cdiv(g.shape[1], block))](
            g, u, out, g.shape[1], g.stride(0), u.stride(0), out.stride(0), BLOCK=block,
            LIBDEVICE=os.environ.get("TRITON_INTERPRET") != "1", num_warps=4, **_EXACT)
    return out.view(gate.shape)


def rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, T, H, d] (any strides, d contiguous); cos/sin [B, T, d] float32."""
    if x.dim() != 4 or cos.shape != (x.shape[0], x.shape[1], x.shape[3]) or sin.shape != cos.shape:
        raise ValueError(f"rotary needs x [B, T, H, d] and cos/sin [B, T, d]; got {tuple(x.shape)}, "
                         f"{tuple(cos.shape)}, {tuple(sin.shape)}")
    if x.shape[3] % 2 or x.shape[3] & (x.shape[3] - 1):
        raise ValueError(f"rotary needs a power-of-two head dim, got {x.shape[3]}")
    x = x if x.stride(3) == 1 else x.contiguous()
    cos, sin = cos.float().contiguous(), sin.float().contiguous()
    b, t, nh, d = x.shape
    out = torch.empty((b, t, nh, d), device=x.device, dtype=x.dtype)
    if out.numel():
        _rotary_kernel[(b * t,)](x, cos, sin, out, t, nh, x.stride(0), x.stride(1), x.stride(2), cos.stride(0),
                                 cos.stride(1), out.stride(0), out.stride(1), out.stride(2), HALF=d // 2,
                                 NH_PAD=triton.next_power_of_2(nh), num_warps=4, **_EXACT)
    return out


def _warps(h: int) -> int:
    return 4 if h <= 1024 else 8
