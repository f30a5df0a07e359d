"""FP8 (e4m3) weights with float scales: the arithmetic of quantized checkpoints.

A quantized weight W [out, in] is stored as Q (float8_e4m3fn, same shape) and a float scale grid S
whose cells each cover a rectangle of W; W = Q * S[cell]. Every form is a grid:

    per-tensor  S [1] or []           one cell over all of W
    per-channel S [out, 1] or [out]   one cell per output row
    block-wise  S [ceil(out/bn), ceil(in/bk)], block (bn, bk) from the config (128 x 128 mostly):

              in ->  0        bk       2bk   in
          out  0   +--------+--------+-----+
           |       | S[0,0] | S[0,1] | S02 |    W[i, j] = Q[i, j] * S[i // bn, j // bk]
           v   bn  +--------+--------+-----+
                   | S[1,0] | S[1,1] | S12 |    the last row and column of cells are cut short
               out +--------+--------+-----+    when out % bn or in % bk is not 0

(DeepSeek's and Qwen's name for S, `weight_scale_inv`, is a multiplier too, as above.)
Quantizing follows the standard recipe: a cell's scale is its amax / 448 (e4m3's largest finite
value), Q = W / scale rounded to nearest.
"""

from __future__ import annotations

import torch

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8_DTYPE).max)  # 448
_STRIPE_ELEMENTS = 1 << 22  # rows dequantized at a time: ~16 MiB of float32 per temporary


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def scale_cell(
    weight_shape: tuple[int, ...], scale_shape: tuple[int, ...], block: tuple[int, int] | None
) -> tuple[int, int]:
    """(rows, cols) of W that one scale covers, read from the scale's shape; ValueError when the shape
    is none of the grids above (block-wise only with `block`, the config's weight_block_size)."""
    if len(weight_shape) != 2:
        raise ValueError(f"FP8 weights must be 2-D, got shape {tuple(weight_shape)}")
    rows, cols = weight_shape
    numel = 1
    for n in scale_shape:
        numel *= n
    if numel == 1:
        return rows, cols
    if tuple(scale_shape) in ((rows,), (rows, 1)):
        return 1, cols
    if block is not None:
        bn, bk = block
        if tuple(scale_shape) == (_cdiv(rows, bn), _cdiv(cols, bk)):
            return bn, bk
    expected = "[1], [out, 1]" + (
        f" or [ceil(out/{block[0]}), ceil(in/{block[1]})] = {[_cdiv(rows, block[0]), _cdiv(cols, block[1])]}"
        if block is not None
        else ""
    )
    raise ValueError(
        f"scale of shape {list(scale_shape)} does not fit weight of shape {[rows, cols]}: expected {expected}"
    )


@torch.no_grad()
def dequantize_fp8_into_(
    dst: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, block: tuple[int, int] | None = None
) -> None:
    """dst <- weight * scale (grids as in the module doc), computed in float32 on dst's device and
    rounded once to dst's dtype; a stripe of rows at a time, so the float32 temporaries stay small
    whatever the weight's size."""
    if tuple(dst.shape) != tuple(weight.shape):
        raise ValueError(f"weight of shape {list(weight.shape)} does not fit parameter of shape {list(dst.shape)}")
    rows, cols = weight.shape
    cell_rows, cell_cols = scale_cell(tuple(weight.shape), tuple(scale.shape), block)
    device = dst.device
    grid = scale.to(device=device, dtype=torch.float32).reshape(_cdiv(rows, cell_rows), _cdiv(cols, cell_cols))
    col_cells = torch.arange(cols, device=device) // cell_cols if grid.shape[1] > 1 else None
    step = max(1, _STRIPE_ELEMENTS // max(cols, 1))
    for r0 in range(0, rows, step):
        r1 = min(rows, r0 + step)
        s = grid.index_select(0, torch.arange(r0, r1, device=device) // cell_rows)  # [n, grid cols]
        if col_cells is not None:
            s = s.index_select(1, col_cells)  # [n, cols]
        dst[r0:r1].copy_(weight[r0:r1].to(device=device, dtype=torch.float32).mul_(s))


def dequantize_fp8(
    weight: torch.Tensor, scale: torch.Tensor, block: tuple[int, int] | None = None, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """weight * scale as a new `dtype` tensor (see dequantize_fp8_into_)."""
    out = torch.empty(weight.shape, dtype=dtype, device=weight.device)
    dequantize_fp8_into_(out, weight, scale, block)
    return out


@torch.no_grad()
def quantize_fp8(
    weight: torch.Tensor, cell: tuple[int, int], scale_dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor]:
    """(Q float8_e4m3fn [out, in], S [ceil(out/cell rows), ceil(in/cell cols)]) with S = amax / 448 per
    cell (1 for an all-zero cell), rounded to `scale_dtype` before dividing so that Q * S is what a
    loader computes. cell (bn, bk) block-wise; (1, in) per-channel; (out, in) per-tensor."""
    if weight.dim() != 2:
        raise ValueError(f"FP8 quantization takes 2-D weights, got shape {list(weight.shape)}")
    rows, cols = weight.shape
    bn, bk = min(cell[0], rows), min(cell[1], cols)
    gr, gc = _cdiv(rows, bn), _cdiv(cols, bk)
    w = weight.to(torch.float32)
    padded = torch.zeros(gr * bn, gc * bk, dtype=torch.float32, device=w.device)
    padded[:rows, :cols] = w
    amax = padded.view(gr, bn, gc, bk).abs().amax(dim=(1, 3))  # [gr, gc]
    scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax)).to(scale_dtype)
    expanded = scale.float().repeat_interleave(bn, 0).repeat_interleave(bk, 1)[:rows, :cols]
    q = (w / expanded).clamp_(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return q, scale
