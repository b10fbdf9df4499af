"""Kernels of a batched-training step, one at a time, on a GPU: equality with the reference and time per call.

    python bench/retrain_kernels.py [--tokens 131072] [--users 256] [--out bench/results]

1. The fused RMSNorm's backward when the weight takes no gradient (the frozen base's norms):
   `pipeline.models.fused_layers`' row launch (one program per row) against liger-kernel's own (one program per SM),
   dX compared bit for bit.
2. The per-row LoRA branch of `pipeline.models.multilora.MultiLoraLinear` in training (r=1, K users, bf16 branch,
   fp32 stacks), forward + backward, per projection shape of SmolLM2-135M: as one autograd node (the trainer's),
   as plain autograd ops (``ops``, before), and two other ways to compute it, to see what a replacement could
   gain: ``dense``, every user's shrink for every token as one GEMM ([T, in] x [in, K*r]), the other users'
   columns masked to zero, and the expand as one GEMM onto the base output (all dense tensor-core GEMMs, K*r/in
   more FLOPs); ``gather``, the shrink as a per-token dot product with the row's A (element-wise multiply and sum)
   and the expand as an element-wise add. Their gradients are compared with the layer's (relative error of dA,
   dB, dx).

Prints a table and writes retrain_kernels.json to --out. Times: CUDA events over 20 calls after 3 warm-up calls.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline.models import fp8, fused_layers, multilora

RESULTS = Path(__file__).resolve().parent / "results"


def timed(fn: Any, warm: int = 3, n: int = 20) -> float:
    """Mean milliseconds of ``fn()`` on the current stream."""
    for _ in range(warm):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(n):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / n


def rms_norm(tokens: int, width: int) -> dict[str, Any]:
    liger = fused_layers.liger()
    if liger is None:
        return {"error": "liger-kernel not importable"}
    gen = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(tokens, width, device="cuda", dtype=torch.bfloat16, generator=gen)
    w = (1 + 0.1 * torch.randn(width, device="cuda", generator=gen)).to(torch.bfloat16)
    dy = torch.randn(tokens, width, device="cuda", dtype=torch.bfloat16, generator=gen)
    out: dict[str, Any] = {"tokens": tokens, "width": width}
    grads = {}
    for mode in ("liger", "row"):
        fused_layers.ROW_BACKWARD = mode == "row"
        xi = x.clone().requires_grad_(True)
        y = liger.rms_norm.apply(xi, w, 1e-5, 0.0, "llama", False)

        def back(y: torch.Tensor = y, xi: torch.Tensor = xi) -> None:
            xi.grad = None
            y.backward(dy, retain_graph=True)

        back()
        grads[mode] = xi.grad.clone()
        out[f"{mode}_backward_ms"] = timed(back)
    fused_layers.ROW_BACKWARD = True
    out["forward_ms"] = timed(lambda: liger.rms_norm.apply(x, w, 1e-5, 0.0, "llama", False))
    out["dx_equal"] = bool(torch.equal(grads["liger"], grads["row"]))
    out["dx_max_abs_diff"] = float((grads["liger"].float() - grads["row"].float()).abs().max())
    # The floor: read X and dY, write dX (bf16), at the copy speed of this device.
    buf = torch.empty(tokens * width * 3, device="cuda", dtype=torch.bfloat16)
    dst = torch.empty_like(buf)
    out["copy_same_bytes_ms"] = timed(lambda: dst.copy_(buf)) / 2  # a copy reads and writes: half is one pass
    return out


class Dense(torch.autograd.Function):
    """result + per-token LoRA delta with every user's shrink for every token (the others' masked)."""

    @staticmethod
    def forward(ctx: Any, result: torch.Tensor, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
                s: torch.Tensor, user: torch.Tensor) -> torch.Tensor:  # fmt: skip
        k, r, _ = a.shape
        a2 = a.reshape(k * r, -1).to(x.dtype)  # [Kr, in]
        b2 = b.permute(1, 0, 2).reshape(b.shape[1], k * r).to(x.dtype)  # [out, Kr]
        h = (x @ a2.t()).view(-1, k, r)  # [T, K, r]
        mask = torch.zeros(x.shape[0], k, 1, device=x.device, dtype=x.dtype)
        mask.scatter_(1, user[:, None, None], s.to(x.dtype)[user][:, None, None])
        hm = (h * mask).view(-1, k * r)
        ctx.save_for_backward(x, a2, b2, hm, mask)
        ctx.shapes = (k, r)
        return torch.addmm(result, hm, b2.t())

    @staticmethod
    def backward(ctx: Any, dy: torch.Tensor) -> tuple[Any, ...]:
        x, a2, b2, hm, mask = ctx.saved_tensors
        k, r = ctx.shapes
        dhm = (dy @ b2).view(-1, k, r) * mask
        db = (dy.t() @ hm).view(-1, k, r).permute(1, 0, 2).float()
        dh = dhm.view(-1, k * r)
        dx = dh @ a2
        da = (dh.t() @ x).view(k, r, -1).float()
        return dy, dx, da, db, None, None


class Gather(torch.autograd.Function):
    """result + per-token LoRA delta at r=1 as element-wise work: h = sum(x * a[user]), out = result + s h b[user]."""

    @staticmethod
    def forward(ctx: Any, result: torch.Tensor, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
                s: torch.Tensor, user: torch.Tensor) -> torch.Tensor:  # fmt: skip
        ar = a[:, 0].to(x.dtype)[user]  # [T, in]
        br = b[:, :, 0].to(x.dtype)[user]  # [T, out]
        h = (x * ar).sum(-1, keepdim=True) * s.to(x.dtype)[user][:, None]  # [T, 1]
        ctx.save_for_backward(x, ar, br, h, s, user)
        ctx.k = a.shape[0]
        return torch.addcmul(result, h, br)

    @staticmethod
    def backward(ctx: Any, dy: torch.Tensor) -> tuple[Any, ...]:
        x, ar, br, h, s, user = ctx.saved_tensors
        k = ctx.k
        dh = (dy * br).sum(-1, keepdim=True) * s.to(dy.dtype)[user][:, None]  # [T, 1]
        db = torch.zeros(k, dy.shape[1], device=dy.device, dtype=torch.float32)
        db.index_add_(0, user, (dy * h).float())
        da = torch.zeros(k, x.shape[1], device=x.device, dtype=torch.float32)
        da.index_add_(0, user, (x * dh).float())
        return dy, dh * ar, da[:, None], db[:, :, None], None, None


def lora(tokens: int, users: int, rows: int, shapes: list[tuple[int, int]]) -> list[dict[str, Any]]:
    gen = torch.Generator(device="cuda").manual_seed(1)
    return [lora_shape(tokens, users, rows, d_in, d_out, gen) for d_in, d_out in shapes]


def lora_shape(tokens: int, users: int, rows: int, d_in: int, d_out: int, gen: torch.Generator) -> dict[str, Any]:
    n = tokens // rows
    base = nn.Linear(d_in, d_out, bias=False, device="cuda", dtype=torch.bfloat16).requires_grad_(False)
    a = nn.Parameter(torch.randn(users, 1, d_in, device="cuda", generator=gen) / d_in**0.5)
    b = nn.Parameter(torch.randn(users, d_out, 1, device="cuda", generator=gen) * 0.02)
    s = torch.full((users,), 2.0, device="cuda")
    index = torch.randint(0, users, (rows,), device="cuda", generator=gen)
    x = torch.randn(rows, n, d_in, device="cuda", dtype=torch.bfloat16, generator=gen).requires_grad_(True)
    dy = torch.randn(rows, n, d_out, device="cuda", dtype=torch.bfloat16, generator=gen).view(-1, d_out)
    wrap = multilora._Rows(native=True)
    wrap.index = index
    layer = multilora.MultiLoraLinear.over(base, multilora.LoraStack(a, b, s), wrap)
    user = index.repeat_interleave(n)

    def switched(train_branch: bool, triton: bool) -> Any:
        def run() -> torch.Tensor:
            multilora.TRAIN_BRANCH, multilora.TRITON_BRANCH = train_branch, triton
            try:
                return layer(x)
            finally:
                multilora.TRAIN_BRANCH, multilora.TRITON_BRANCH = True, True

        return run

    ways = {
        "ops": switched(False, False),
        "node": switched(True, False),
        "layer": lambda: layer(x),
        "dense": lambda: Dense.apply(base(x).view(-1, d_out), x.view(-1, d_in), a, b, s, user),
        "gather": lambda: Gather.apply(base(x).view(-1, d_out), x.view(-1, d_in), a, b, s, user),
    }
    row: dict[str, Any] = {"in": d_in, "out": d_out, "tokens": rows * n, "users": users}
    row["base_linear_fwd_bwd_ms"] = timed(lambda: base(x).view(-1, d_out).backward(dy))
    ref = None
    for name, fn in ways.items():

        def step(fn: Any = fn) -> None:
            a.grad = b.grad = x.grad = None
            fn().reshape(-1, d_out).backward(dy)

        step()
        assert a.grad is not None and b.grad is not None and x.grad is not None
        got = (a.grad.clone(), b.grad.clone(), x.grad.clone())
        if ref is None:
            ref = got
        else:
            row[f"{name}_rel_err"] = max(
                float((g.float() - r.float()).norm() / r.float().norm().clamp_min(1e-30))
                for g, r in zip(got, ref, strict=True)
            )
        row[f"{name}_fwd_bwd_ms"] = timed(step)
    return row


def packed_shape(
    tokens: int, users: int, d_in: int, d_out: int, lo: int, hi: int, gen: torch.Generator, quick: bool = False
) -> dict[str, Any]:
    """The trainer's LoRA node over packed rows (lengths uniform in lo..hi, sorted as `micro_batches` sorts them,
    each row a random user's), r=1: forward + backward with each program walking the whole width
    (`lora_kernels.SPLIT` False, keys ``one_*``) and with the split kernels (True, ``split_*``), against the torch
    path with every token a row of its own (relative error of y, dx, dA, dB). ``quick``: the split kernels' forward
    + backward time alone (no whole-width run, no errors), for sweeps."""
    from pipeline.models import lora_kernels

    g = torch.Generator().manual_seed(d_in * 7 + d_out)
    lengths: list[int] = []
    while sum(lengths) < tokens:
        lengths.append(int(torch.randint(lo, hi + 1, (1,), generator=g)))
    lengths.sort()
    total, rows = sum(lengths), len(lengths)
    base = nn.Linear(d_in, d_out, bias=False, device="cuda", dtype=torch.bfloat16).requires_grad_(False)
    a = nn.Parameter(torch.randn(users, 1, d_in, device="cuda", generator=gen) / d_in**0.5)
    b = nn.Parameter(torch.randn(users, d_out, 1, device="cuda", generator=gen) * 0.02)
    s = torch.full((users,), 2.0, device="cuda")
    slots = torch.randint(0, users, (rows,), device="cuda", generator=gen)
    wrap = multilora._Rows(native=True)
    layer = multilora.MultiLoraLinear.over(base, multilora.LoraStack(a, b, s), wrap)
    offsets = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], device="cuda", dtype=torch.int32)
    token_rows = torch.repeat_interleave(torch.arange(rows, device="cuda"), torch.tensor(lengths, device="cuda"))
    wrap.index, wrap.offsets, wrap.longest, wrap.token_index = slots, offsets, max(lengths), slots[token_rows]
    x = torch.randn(1, total, d_in, device="cuda", dtype=torch.bfloat16, generator=gen).requires_grad_(True)
    dy = torch.randn(1, total, d_out, device="cuda", dtype=torch.bfloat16, generator=gen)
    row: dict[str, Any] = {"in": d_in, "out": d_out, "tokens": total, "rows": rows, "users": users}
    row["base_linear_fwd_bwd_ms"] = timed(lambda: base(x).backward(dy))
    # what the node must move at least (bf16): forward x read, y read and written; backward dy read, x read, dx read
    # and written
    row["floor_bytes"] = total * 2 * (4 * d_in + 3 * d_out)
    got: dict[str, tuple[torch.Tensor, ...]] = {}

    def step() -> None:
        a.grad = b.grad = x.grad = None
        fp8.forget_input()  # each forward quantizes its input (in training a new one each time)
        layer(x).backward(dy)

    def measure(name: str) -> None:
        y = layer(x).detach()
        step()
        got[name] = (y, x.grad.clone(), a.grad.clone(), b.grad.clone())
        row[f"{name}_fwd_bwd_ms"] = timed(step)
        if not quick:
            with torch.no_grad():
                row[f"{name}_fwd_nograd_ms"] = timed(lambda: (fp8.forget_input(), layer(x)))

    for split in (True,) if quick else (False, True):
        lora_kernels.SPLIT = split
        measure("split" if split else "one")
    lora_kernels.SPLIT = True
    if quick:
        return row
    # the frozen projection's GEMMs in FP8 (`pipeline.models.fp8`, TrainingSettings.base_fp8), split kernels
    if fp8.supported(x, base.weight):
        wrap.fp8 = True
        try:
            measure("fp8")
        finally:
            wrap.fp8 = False
            fp8.forget_input()
    # the dense form (`multilora._DenseBranch`), whatever its share rule says for this shape
    share, multilora.DENSE_MAX_SHARE, multilora.DENSE_BRANCH = multilora.DENSE_MAX_SHARE, float("inf"), True
    try:
        measure("dense")
    finally:
        multilora.DENSE_MAX_SHARE, multilora.DENSE_BRANCH = share, False
    # the torch reference: each token a row of its own (the packed path's torch form), fp32 reference values
    ref_layer = multilora.MultiLoraLinear.over(base, multilora.LoraStack(a, b, s), multilora._Rows(native=True))
    ref_layer._rows.index = wrap.token_index
    multilora.TRITON_BRANCH = False
    try:
        xr = x.detach()[0, :, None, :].clone().requires_grad_(True)
        a.grad = b.grad = None
        yr = ref_layer(xr)
        yr.backward(dy[0, :, None, :])
        ref = (yr.detach()[:, 0][None], xr.grad[:, 0][None], a.grad.clone(), b.grad.clone())
    finally:
        multilora.TRITON_BRANCH = True
    for name, vals in got.items():
        row[f"{name}_rel_err"] = {
            n: float((g.float() - r.float()).norm() / r.float().norm().clamp_min(1e-30))
            for n, g, r in zip(("y", "dx", "dA", "dB"), vals, ref, strict=True)
        }
    return row


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=131072)
    ap.add_argument("--users", type=int, default=256)
    ap.add_argument("--rows", type=int, default=1024, help="sequences of the micro-batch (tokens / rows each)")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument(
        "--packed-only",
        action="store_true",
        help="only the packed-rows comparison of one kernel per pass against the split kernels (135M and 1B shapes)",
    )
    ap.add_argument(
        "--sweep",
        action="store_true",
        help="with --packed-only: the split kernels per launch configuration (SWEEP), against the memory floor",
    )
    ap.add_argument("--only", choices=("smollm2-135m", "llama-1b"), help="with --packed-only: one model's shapes")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("retrain_kernels.py needs a CUDA device")
    started = time.perf_counter()
    report: dict[str, Any] = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
    if args.packed_only:
        packed(report, args.out, args.only)
        if args.sweep:
            sweep(report, args.out)
        return
    report["rms_norm"] = rms_norm(args.tokens, 576)
    print(json.dumps(report["rms_norm"]), flush=True)
    shapes = [(576, 576), (576, 192), (576, 1536), (1536, 576)]
    report["lora"] = lora(args.tokens, args.users, args.rows, shapes)
    report["seconds"] = time.perf_counter() - started
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "retrain_kernels.json").write_text(json.dumps(report, indent=1))
    r = report["rms_norm"]
    print(f"\nRMSNorm backward, {r['tokens']} x {r['width']} bf16 ({report['device']}):")
    print(
        "| liger (program per SM) ms | row (program per row) ms | forward ms | one pass of the bytes ms | dX equal |"
    )
    print("| ---: | ---: | ---: | ---: | --- |")
    print(f"| {r['liger_backward_ms']:.3f} | {r['row_backward_ms']:.3f} | {r['forward_ms']:.3f} | "
          f"{r['copy_same_bytes_ms']:.3f} | {r['dx_equal']} |")  # fmt: skip
    print(f"\nLoRA branch r=1, K={args.users}, forward + backward (base Linear's own fwd+bwd for scale):")
    print(
        "| in -> out | tokens | base Linear ms | layer (Triton kernels) ms (rel err) | one node ms (rel err) | "
        "autograd ops ms | dense ms (rel err) | gather ms (rel err) |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for row in report["lora"]:
        print(
            f"| {row['in']} -> {row['out']} | {row['tokens']} | {row['base_linear_fwd_bwd_ms']:.3f} | "
            f"{row['layer_fwd_bwd_ms']:.3f} ({row['layer_rel_err']:.1e}) | "
            f"{row['node_fwd_bwd_ms']:.3f} ({row['node_rel_err']:.1e}) | {row['ops_fwd_bwd_ms']:.3f} | "
            f"{row['dense_fwd_bwd_ms']:.3f} ({row['dense_rel_err']:.1e}) | "
            f"{row['gather_fwd_bwd_ms']:.3f} ({row['gather_rel_err']:.1e}) |"
        )


def packed(report: dict[str, Any], out: Path, only: str | None = None) -> None:
    """The `--packed-only` run: SmolLM2-135M's projections at 131,072 tokens (256 users) and Llama-1B's at 21,504
    (64 users), rows of 20..128 tokens (``only``: one of the two)."""
    gen = torch.Generator(device="cuda").manual_seed(3)
    cases = []
    if only in (None, "smollm2-135m"):
        cases += [(131072, 256, d_in, d_out) for d_in, d_out in ((576, 576), (576, 192), (576, 1536), (1536, 576))]
    if only in (None, "llama-1b"):
        cases += [(21504, 64, d_in, d_out) for d_in, d_out in ((2048, 2048), (2048, 512), (2048, 8192), (8192, 2048))]
    report["packed"] = []
    print(
        "| in -> out | tokens (rows) | base Linear ms | whole width a program ms | split ms | dense ms | "
        "no-grad whole / split / dense ms | rel err whole (y, dx, dA, dB) | rel err split | rel err dense |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- | --- | --- |")
    for tokens, users, d_in, d_out in cases:
        r = packed_shape(tokens, users, d_in, d_out, 20, 128, gen)
        report["packed"].append(r)

        def errs(e: dict[str, float]) -> str:
            return ", ".join(f"{v:.1e}" for v in e.values())

        print(
            f"| {d_in} -> {d_out} | {r['tokens']} ({r['rows']}) | {r['base_linear_fwd_bwd_ms']:.3f} | "
            f"{r['one_fwd_bwd_ms']:.3f} | {r['split_fwd_bwd_ms']:.3f} | {r['dense_fwd_bwd_ms']:.3f} | "
            f"{r['one_fwd_nograd_ms']:.3f} / {r['split_fwd_nograd_ms']:.3f} / {r['dense_fwd_nograd_ms']:.3f} | "
            f"{errs(r['one_rel_err'])} | "
            f"{errs(r['split_rel_err'])} | {errs(r['dense_rel_err'])} |",
            flush=True,
        )
    fp8_rows = [r for r in report["packed"] if "fp8_fwd_bwd_ms" in r]
    if fp8_rows:
        print("\nThe frozen projection's GEMMs in FP8 (base_fp8), split kernels, against bf16:")
        print(
            "| in -> out | tokens | bf16 node fwd+bwd ms | fp8 node fwd+bwd ms | bf16 / fp8 no-grad ms | "
            "rel err fp8 (y, dx, dA, dB) |"
        )
        print("| --- | ---: | ---: | ---: | --- | --- |")
        for r in fp8_rows:
            print(
                f"| {r['in']} -> {r['out']} | {r['tokens']} | {r['split_fwd_bwd_ms']:.3f} | "
                f"{r['fp8_fwd_bwd_ms']:.3f} | "
                f"{r['split_fwd_nograd_ms']:.3f} / {r['fp8_fwd_nograd_ms']:.3f} | {errs(r['fp8_rel_err'])} |",
                flush=True,
            )
    out.mkdir(parents=True, exist_ok=True)
    (out / "retrain_kernels_packed.json").write_text(json.dumps(report, indent=1))


#: `sweep`'s launch configurations: (tokens per program, columns per loop iteration, columns per program, warps).
SWEEP = [
    (bt, wb, span, warps) for bt in (16, 32, 64) for wb in (64, 128) for span in (256, 512, 1024) for warps in (4, 8)
]
#: Bytes a second `sweep` takes as reachable (an H200's HBM3e moves ~4.8 TB/s at its peak).
FLOOR_BANDWIDTH = 4.0e12


def sweep(report: dict[str, Any], out: Path) -> None:
    """Forward + backward ms of the split LoRA kernels over packed rows per `SWEEP` configuration on four shapes,
    next to the memory floor of what the node moves (`FLOOR_BANDWIDTH`): which launch configuration the kernels
    should take, and how far the best is from the bytes it must move."""
    from pipeline.models import lora_kernels

    gen = torch.Generator(device="cuda").manual_seed(5)
    default = lora_kernels.TOKEN_BLOCK, lora_kernels.WIDTH_BLOCK, lora_kernels.SPAN, lora_kernels.WARPS
    report["sweep"] = []
    shapes = ((131072, 256, 576, 576), (131072, 256, 576, 1536), (21504, 64, 2048, 8192), (21504, 64, 8192, 2048))
    best: dict[tuple[int, int], dict[str, Any]] = {}
    for tokens, users, d_in, d_out in shapes:
        for bt, wb, span, warps in SWEEP:
            lora_kernels.TOKEN_BLOCK, lora_kernels.WIDTH_BLOCK, lora_kernels.SPAN, lora_kernels.WARPS = (
                bt, wb, span, warps
            )  # fmt: skip
            try:
                r = packed_shape(tokens, users, d_in, d_out, 20, 128, gen, quick=True)
            except Exception as e:  # a configuration Triton cannot build
                print(f"sweep {d_in}->{d_out} {bt}/{wb}/{span}/{warps}: {e!r}"[:300], flush=True)
                continue
            entry = {"in": d_in, "out": d_out, "bt": bt, "width_block": wb, "span": span, "warps": warps,
                     "base": r["base_linear_fwd_bwd_ms"], "split": r["split_fwd_bwd_ms"],
                     "floor_ms": r["floor_bytes"] / FLOOR_BANDWIDTH * 1e3}  # fmt: skip
            report["sweep"].append(entry)
            print(json.dumps(entry), flush=True)
            if (d_in, d_out) not in best or entry["split"] < best[(d_in, d_out)]["split"]:
                best[(d_in, d_out)] = entry
    lora_kernels.TOKEN_BLOCK, lora_kernels.WIDTH_BLOCK, lora_kernels.SPAN, lora_kernels.WARPS = default
    print("\n| in -> out | base Linear ms | default ms | best ms (tokens / width block / span / warps) | floor ms |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for (d_in, d_out), e in best.items():
        dflt = next(
            (x["split"] for x in report["sweep"] if (x["in"], x["out"]) == (d_in, d_out)
             and (x["bt"], x["width_block"], x["span"], x["warps"]) == default),
            float("nan"),
        )  # fmt: skip
        print(f"| {d_in} -> {d_out} | {e['base']:.3f} | {dflt:.3f} | {e['split']:.3f} ({e['bt']} / "
              f"{e['width_block']} / {e['span']} / {e['warps']}) | {e['floor_ms']:.3f} |")  # fmt: skip
    (out / "retrain_kernels_packed.json").write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
