"""INT4 weights as mma tiles (toolchain.engine.kernels.tile_int4): the permutation is exact and invertible, and
the tiles read by the rules of the PTX ISA's mma.m16n8k16 fragments (the way the tiled kernel's inline PTX reads
them) give the product. On the CPU; the kernel itself runs in tests/test_speed.py's GPU tests."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from conftest import REPO

from toolchain.engine import kernels as K


def _stored(n: int, k: int, group: int, seed: int = 0, zero: bool = True):
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 16, (n, k), generator=g, dtype=torch.int32)
    packed = K.pack_nibbles(q.reshape(n, k // 8, 8))
    scale = (torch.rand(n, k // group, generator=g) * 0.02 + 0.005).to(torch.bfloat16)
    z = torch.randint(0, 16, (n, k // group), generator=g).to(torch.uint8) if zero else None
    return q, packed, scale, z


@pytest.mark.parametrize("n,k,group", [(32, 256, 128), (48, 512, 256), (16, 384, 128)])
def test_tiles_are_a_permutation_that_untile_inverts(n, k, group):
    q, packed, scale, zero = _stored(n, k, group)
    assert torch.equal(K.unpack_int4(packed), q)
    words, ts, tz = K.tile_int4(packed, scale, zero, group)
    assert words.shape == packed.shape and words.dtype == torch.int32
    assert torch.equal(K.untile_int4(words), packed)
    assert torch.equal(K.untile_rows(ts), scale) and torch.equal(K.untile_rows(tz), zero)
    # a permutation of the codes: the same multiset of nibbles, and not the identity
    assert torch.equal(K.unpack_int4(words).flatten().sort().values, q.flatten().sort().values)
    assert not torch.equal(words, packed)


def test_shapes_the_tiles_cannot_hold_are_refused_clearly():
    _, packed, scale, zero = _stored(24, 256, 128)
    assert not K.tiles_fit(24, 256, 128) and not K.tiles_fit(32, 256, 64) and K.tiles_fit(32, 256, 128)
    with pytest.raises(ValueError, match="16 \\| N"):
        K.tile_int4(packed, scale, zero, 128)


def _bf16_pair(v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """An int32 holding two bf16 values (low half first) -> the two values in float64."""
    v = v.to(torch.int64) & 0xFFFFFFFF
    lo = ((v & 0xFFFF) << 16).to(torch.int32).view(torch.float32).double()
    hi = (v & 0xFFFF0000).to(torch.int32).view(torch.float32).double()
    return lo, hi


def _by_fragments(x: torch.Tensor, words: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None,
                  group: int) -> torch.Tensor:
    """The tiled kernel's arithmetic, in float64, reading the tiles by the PTX ISA's fragment rules for
    mma.m16n8k16 (.bf16): lane L = 4 gid + tig holds A[gid][2 tig + {0,1}] (a0, a1), A[gid + 8][...] (a2, a3),
    the same 8 columns on (a4..a7); B[2 tig + {0,1}][gid] (b0, b1) and B[2 tig + 8 + {0,1}][gid] (b2, b3).
    A register of A is (word >> 4 i) & 0x000F000F | bf16(128): element a_{2i}, a_{2i+1} = 128 + its two nibbles."""
    m, k = x.shape
    n = words.shape[0]
    tiles, groups = n // 16, k // 128
    w = words.reshape(tiles, groups, 32, 8).to(torch.int64) & 0xFFFFFFFF
    xi = x.contiguous().view(torch.int32).reshape(m, groups, 4, 16)  # (row, group, lane % 4, pair)
    gid, tig = torch.arange(32) // 4, torch.arange(32) % 4
    y = torch.zeros(m, n, dtype=torch.float64)
    for step in range(8):
        a = torch.zeros(tiles, groups, 16, 16, dtype=torch.float64)
        regs = [((w[..., step] >> (4 * i)) & 0xF, (w[..., step] >> (4 * i + 16)) & 0xF) for i in range(4)]
        for i, (row_off, col_off) in enumerate([(0, 0), (8, 0), (0, 8), (8, 8)]):
            for h in range(2):
                a[:, :, gid + row_off, 2 * tig + col_off + h] = 128.0 + regs[i][h].double()
        b = torch.zeros(groups, 16, m, dtype=torch.float64)
        for reg in range(2):
            lo, hi = _bf16_pair(xi[:, :, :, 2 * step + reg])  # (m, groups, 4)
            b[:, 2 * torch.arange(4) + 8 * reg, :] = lo.permute(1, 2, 0)
            b[:, 2 * torch.arange(4) + 8 * reg + 1, :] = hi.permute(1, 2, 0)
        prod = torch.einsum("tgrc,gcm->tgrm", a, b)  # the mma with A the tile
        xsum = b.sum(1)  # the mma with an all-ones A: (groups, m)
        per = group // 128
        s = scale.reshape(tiles, groups // per, 16).double().repeat_interleave(per, 1)
        z = zero.reshape(tiles, groups // per, 16).double().repeat_interleave(per, 1) if zero is not None \
            else torch.full_like(s, 8.0)
        part = (prod - (128.0 + z)[..., None] * xsum[None, :, None, :]) * s[..., None]  # (t, g, 16, m)
        y += part.sum(1).permute(2, 0, 1).reshape(m, n)
    return y


@pytest.mark.parametrize("group,zero", [(128, True), (128, False), (256, True)])
def test_tiles_read_as_mma_fragments_give_the_product(group, zero):
    n, k, m = 48, 512, 5
    _, packed, scale, z = _stored(n, k, group, seed=1, zero=zero)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(2)).to(torch.bfloat16)
    want = x.double() @ K.dequantize_int4(packed, scale, z, group, torch.float64).T
    words, ts, tz = K.tile_int4(packed, scale, z, group)
    got = _by_fragments(x, words, ts, tz, group)
    assert (got - want).abs().max().item() < 1e-9 * want.abs().max().item()
    # a tile layout off by one lane would not pass: the check can fail
    shifted = torch.roll(words.reshape(n // 16, k // 128, 32, 8), 1, dims=2).reshape(n, k // 8)
    assert (_by_fragments(x, shifted, ts, tz, group) - want).abs().max().item() > 1e-3


def _untile_in_the_interpreter() -> bool:
    _, packed, scale, zero = _stored(32, 512, 128)
    words, _, _ = K.tile_int4(packed, scale, zero, 128)
    return bool(torch.equal(K.untile_int4_gpu(words), packed))


@pytest.mark.skipif(K.triton is None, reason="triton not installed (pip install triton)")
def test_the_untile_kernel_matches_the_torch_inverse_in_the_interpreter():
    code = "from test_int4_tiles import _untile_in_the_interpreter as f; print(f())"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=600,
                       env={**os.environ, "TRITON_INTERPRET": "1",
                            "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests"),
                                                           os.environ.get("PYTHONPATH", "")])})
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip().splitlines()[-1] == "True"


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_the_tiled_kernel_matches_float64_on_the_gpu(dtype):
    """The kernel's inline PTX against float64, every row count up to TILED_MAX_M and past it (the stored-layout
    kernels after untiling), symmetric and asymmetric, groups of 128 and 256, K with an odd number of groups."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    dev = torch.device("cuda")
    assert K.tiles_run(dev, dtype) or torch.cuda.get_device_capability()[0] < 8
    for (n, k, group), zero in [((256, 1152, 128), True), ((4096, 4096, 128), False), ((512, 2048, 256), True)]:
        _, packed, scale, z = _stored(n, k, group, seed=n, zero=zero)
        scale = scale.to(dtype)
        want_w = K.dequantize_int4(packed, scale, z, group, torch.float64).to(dev)
        words, ts, tz = (t.to(dev) if t is not None else None for t in K.tile_int4(packed, scale, z, group))
        assert torch.equal(K.untile_int4_gpu(words).cpu(), packed)
        for m in (1, 3, 8, 13, K.DEFAULTS.tiled_max_m, K.DEFAULTS.tiled_max_m + 24):
            x = torch.randn(m, k, device=dev, generator=torch.Generator(dev).manual_seed(m)).to(dtype)
            want = x.double() @ want_w.T
            parts = K.int4_partials(x, words, ts, tz, group, tiled=True)
            assert parts.shape == (K.partials_split(n, k, m, tiled=True), m, n)
            # no atomics: a second launch gives the same bits
            assert torch.equal(parts, K.int4_partials(x, words, ts, tz, group, tiled=True))
            err = (parts.sum(0).double() - want).abs().max().item() / want.abs().max().item()
            assert err < 1e-4, (n, k, group, zero, m, err)  # float32 accumulation on the tensor cores
