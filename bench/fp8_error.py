"""How far FP8 projections move a base's predictions (`TrainingSettings.base_fp8`), on the CPU, emulated.

The GPU benchmarks run Llama-1B with random weights (the real ones do not travel to the device), and random weights
have none of the outlier channels that make pretrained models hard to quantize. This measures the effect of the
rounding itself on the real pretrained SmolLM2-135M (the demo's base) and on random weights of its shape: the seven
projections of every layer computed as `pipeline.models.fp8.reference_linear` computes them (e4m3 values, one scale
per token and per output channel, fp32 products: the function `torch._scaled_mm` computes on the GPU, tested equal
there) against the base's own bf16 GEMMs. Per base: the mean NLL per target token of the general requests' answers
and of the synthetic users' messages (bench/retrain_throughput.py's), and the mean KL from the bf16 model's next-token
distribution over every position of the probe prompts. Prints a table; ``--out`` writes it as markdown too.

    python bench/fp8_error.py [--out bench/results/fp8_error.md]
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.domain.examples import Example, examples_from_events
from pipeline.evaluation.metrics import load_general, load_probes
from pipeline.models import encoding, fp8
from pipeline.models.base import load_base
from pipeline.models.encoding import IGNORE, encode_examples

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@contextlib.contextmanager
def fp8_projections(model: nn.Module) -> Iterator[int]:
    """Every target projection's forward as `fp8.reference_linear` until the block ends; yields how many."""
    patched = []
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] in TARGETS:

            def forward(x: torch.Tensor, m: nn.Linear = module) -> torch.Tensor:
                y = fp8.reference_linear(x.reshape(-1, x.shape[-1]), m.weight, m.bias)
                return y.view(*x.shape[:-1], m.out_features)

            module.forward = forward  # type: ignore[method-assign,assignment]
            patched.append(module)
    try:
        yield len(patched)
    finally:
        for module in patched:
            del module.forward


def nll(model: nn.Module, tokenizer: Any, examples: list[Example]) -> float:
    """Mean NLL per target token of ``examples``."""
    encoded = encode_examples(tokenizer, examples, 128)
    total, count = 0.0, 0
    for i in range(0, len(encoded), 16):
        batch = encoding.collate(encoded[i : i + 16], encoding.pad_id(tokenizer), torch.device("cpu"))
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
        labels = batch["labels"][:, 1:]
        total += float(
            F.cross_entropy(logits[:, :-1].flatten(0, 1), labels.flatten(), ignore_index=IGNORE, reduction="sum")
        )
        count += int((labels != IGNORE).sum())
    return total / count


def probe_logprobs(model: nn.Module, tokenizer: Any, probes: list[str]) -> list[torch.Tensor]:
    out = []
    for p in probes:
        ids = torch.tensor([tokenizer(p)["input_ids"][:128]])
        out.append(F.log_softmax(model(input_ids=ids).logits[0].float(), -1))
    return out


def measure(label: str, model: nn.Module, tokenizer: Any) -> dict[str, Any]:
    from bench.retrain_throughput import user_events

    general = load_general()
    messages = examples_from_events([e for u in range(4) for e in user_events(u, 1)[:40]])
    probes = load_probes()
    model = copy.deepcopy(model).to(torch.bfloat16).eval()  # a copy: the loaded base is shared by the process
    row: dict[str, Any] = {"base": label}
    with torch.no_grad():
        ref = {"general": nll(model, tokenizer, general), "messages": nll(model, tokenizer, messages)}
        ref_lp = probe_logprobs(model, tokenizer, probes)
        with fp8_projections(model) as n:
            got = {"general": nll(model, tokenizer, general), "messages": nll(model, tokenizer, messages)}
            got_lp = probe_logprobs(model, tokenizer, probes)
    row["projections"] = n
    for key in ref:
        row[key] = (ref[key], got[key])
    kl = [float((a.exp() * (a - b)).sum(-1).mean()) for a, b in zip(ref_lp, got_lp, strict=True)]
    row["probe_kl"] = sum(kl) / len(kl)
    row["probe_top1"] = sum(
        float((a.argmax(-1) == b.argmax(-1)).float().mean()) for a, b in zip(ref_lp, got_lp, strict=True)
    ) / len(kl)
    return row


def train(base: Any, k: int, steps: int, tmp: Path) -> list[dict[str, Any]]:
    """A wave of ``k`` users (bench/retrain_throughput.py's `wave`: round 0 of 2 steps, round 1 of ``steps``, both
    gated on the base itself) trained with the base's own GEMMs and with FP8's rounding emulated (`fp8.EMULATE`) on
    every projection (`fp8.MIN_WEIGHTS` 0: the size rule would leave SmolLM2-135M's all in bf16): the same users and
    data; the gate never rounds."""
    from bench.retrain_throughput import wave
    from pipeline.config import TrainingSettings
    from pipeline.evaluation.rules import load_rules

    rules = load_rules(Path(__file__).parents[1] / "infra" / "gating" / "default_rules.yaml")
    rows = []
    for on in (False, True):
        fp8.EMULATE, min_weights = on, fp8.MIN_WEIGHTS
        fp8.MIN_WEIGHTS = 0
        try:
            settings = TrainingSettings(base_fp8=on, max_steps=steps)
            w = wave(base, k, settings, 2, "cpu", tmp / ("fp8" if on else "base"), rules)
        finally:
            fp8.EMULATE, fp8.MIN_WEIGHTS = False, min_weights
        rows.append({"fp8": on, **w})
        print(
            f"trained with {'fp8 (emulated)' if on else 'the base'}: gain vs current {w['gain_vs_current']:.4f}, "
            f"vs base {w['gain_vs_base']:.4f}, promoted {w['promoted']}/{k}, {w['seconds']['train']:.0f} s",
            flush=True,
        )
    return rows


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, help="also write the table here (markdown)")
    ap.add_argument("--base", default="smollm2-135m", help="the pretrained base (ModelSettings.base)")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument(
        "--train",
        type=int,
        default=0,
        metavar="K",
        help="also train a wave of K users on the pretrained base with and without FP8's rounding (emulated, slow) "
        "and compare their holdout gains under the gate",
    )
    ap.add_argument("--steps", type=int, default=20, help="with --train: steps of the timed round")
    ap.add_argument("--skip-predictions", action="store_true", help="only --train")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    base = load_base(args.base)
    lines: list[str] = []
    if args.train:
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            trained = train(base, args.train, args.steps, Path(tmp))
        lines += [
            f"Training a wave of {args.train} users on {args.base} (pretrained, fp32 on the CPU; round 1 of "
            f"{args.steps} steps from 2-step parents), the base's GEMMs against FP8's rounding emulated; the gate on "
            "the base itself:",
            "",
            "| training's projections | gain vs current | gain vs base | promoted | train s |",
            "| --- | ---: | ---: | ---: | ---: |",
        ]
        for t in trained:
            lines.append(
                f"| {'FP8 (emulated)' if t['fp8'] else 'the base (fp32)'} | {t['gain_vs_current'] * 100:.2f}% | "
                f"{t['gain_vs_base'] * 100:.2f}% | {t['promoted']}/{args.train} | {t['seconds']['train']:.0f} |"
            )
        lines.append("")
    if args.skip_predictions:
        emit(lines, args.out)
        return []
    rows = [measure(f"{args.base} (pretrained)", base.model, base.tokenizer)]
    from transformers import AutoModelForCausalLM

    random_model = AutoModelForCausalLM.from_config(base.model.config)
    rows.append(measure(f"{args.base} shape, random weights", random_model, base.tokenizer))
    lines += [
        "| base | projections in FP8 | general answers NLL bf16 -> fp8 | users' messages NLL bf16 -> fp8 | "
        "probes: KL(bf16 || fp8) nats/token | probes: same top-1 token |",
        "| --- | ---: | --- | --- | ---: | ---: |",
    ]
    for r in rows:
        g, m = r["general"], r["messages"]
        lines.append(
            f"| {r['base']} | {r['projections']} | {g[0]:.4f} -> {g[1]:.4f} ({(g[1] / g[0] - 1) * 100:+.2f}%) | "
            f"{m[0]:.4f} -> {m[1]:.4f} ({(m[1] / m[0] - 1) * 100:+.2f}%) | {r['probe_kl']:.4f} | "
            f"{r['probe_top1'] * 100:.1f}% |"
        )
    emit(lines, args.out)
    return rows


def emit(lines: list[str], out: Path | None) -> None:
    """Print the table, and write it to ``out`` when given."""
    print("\n".join(lines))
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
