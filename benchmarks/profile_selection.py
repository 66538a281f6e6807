"""Where the selection pass spends its time (torch.profiler, per kernel): for all heads as
sale.quantize + sale.block_mask_bits and as sale.select (no stored query codes), and as
sale.attention runs it (sale_ops._pipeline.select_blocks: as many heads per step as its memory
share allows), Llama-3.1-8B shapes.

    python benchmarks/profile_selection.py 32768 131072
"""
import sys

import torch
from torch.profiler import ProfilerActivity
from torch.profiler import profile as torch_profile

import sale_ops  # noqa: F401  (registers the ops)
from sale_ops import _pipeline
from sale_ops._pipeline import _largest_step, select_blocks, selection_bytes
from sale_ops.testing import make_qkv

HQ, HKV, D = 32, 8, 128


def kernel_table(fn, calls=3):
    for _ in range(2):
        fn()
    torch.cuda.synchronize()
    with torch_profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    rows = []
    for e in prof.key_averages():
        if e.device_time_total > 0:
            rows.append((e.device_time_total / calls / 1e3, e.count // calls, e.key[:90]))
    return sorted(rows, reverse=True)


def wall_ms(fn, repeats=5):
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / repeats


def profile(n):
    q, k, v = make_qkv(1, HQ, HKV, n, D, device="cuda")
    tau = torch.full((HQ,), 1e-3, device="cuda")
    scale = D**-0.5

    def one_shot():
        qz = torch.ops.sale.quantize(q, k, 32)
        return torch.ops.sale.block_mask_bits(q, k, *qz, tau, 64, 32, 128, scale)

    def fused():
        return torch.ops.sale.select(q, k, tau, 64, 32, 128, scale)

    assert _pipeline.FUSED_SELECTION, "the pipeline's default: its selection goes through sale.select"

    def stepped():  # the pipeline's selection with sale.select
        return select_blocks(q, k, v, tau, 64, 32, 128, scale)

    # The pipeline before sale.select: quantize + block_mask_bits with stored query codes, as many
    # heads per step as fit next to them.
    bits = q.shape[0] * HQ * -(-n // 64) * -(-n // 32 // 32) * 4
    old_kv, old_q = _largest_step(lambda h, s: selection_bytes(1, h, s, n, n, D, True), (q, k, v), bits)

    def two_op_steps():
        parts = []
        for hk in range(0, HKV, old_kv):
            for h in range(hk * (HQ // HKV), (hk + old_kv) * (HQ // HKV), old_kv * old_q):
                hs = slice(h, h + old_kv * old_q)
                qh, kh = q[:, hs], k[:, hk : hk + old_kv]
                qz = torch.ops.sale.quantize(qh, kh, 32)
                parts.append(torch.ops.sale.block_mask_bits(qh, kh, *qz, tau[hs], 64, 32, 128, scale))
                del qz
        return torch.cat(parts, dim=1)

    assert torch.equal(two_op_steps(), stepped()) and torch.equal(fused(), one_shot())

    steps = _pipeline.selection_steps(q, k, v, 64, 32)
    print(f"\nN={n}, Hq {HQ}, Hkv {HKV}, D {D}, bf16; sale.select steps (kv heads, q heads per kv head): {steps}")
    for name, fn in (("quantize + block_mask_bits, all heads", one_shot), ("sale.select, all heads", fused),
                     ("select_blocks with sale.select (pipeline, FUSED_SELECTION on)", stepped),
                     (f"quantize + block_mask_bits in steps of {old_kv} kv x {old_q} q heads (the pipeline before)",
                      two_op_steps)):
        print(f"\n{name}: {wall_ms(fn):.2f} ms per call (CUDA events)")
        print("| GPU ms per call | launches | kernel |\n|---|---|---|")
        for ms, count, key in kernel_table(fn):
            print(f"| {ms:.3f} | {count} | {key} |")


if __name__ == "__main__":
    for n in [int(x) for x in sys.argv[1:]] or [32768]:
        profile(n)
        torch.cuda.empty_cache()
