"""mbridge flops: FLOPs of one training step, per component, with parameter counts (and MFU
when a measured step time and the peak FLOP/s are given). Conventions: docs/flops.md."""
HELP = "FLOPs per training step, per component, parameter counts and MFU"


def add_arguments(parser) -> None:
    parser.add_argument("model", help="org/model (shipped fixture or hub config), a local "
                                      "directory, or a config.json path; MoE / MLA families "
                                      "without a bridge (qwen3_moe, qwen2_moe, mixtral, "
                                      "deepseek_v2, deepseek_v3, kimi_k2) by path")
    parser.add_argument("--seq-len", type=int, default=4096, metavar="N",
                        help="tokens per sequence (default 4096)")
    parser.add_argument("--batch", type=int, default=1, metavar="B",
                        help="sequences per step, the global batch (default 1)")
    parser.add_argument("--step-time", type=float, default=None, metavar="S",
                        help="measured seconds per training step (with --peak: MFU)")
    parser.add_argument("--peak", type=float, default=None, metavar="TFLOPS",
                        help="peak dense TFLOP/s of one device, e.g. 989 for an H100 SXM in bf16")
    parser.add_argument("--devices", type=int, default=1, metavar="N",
                        help="devices the step runs on, for MFU (default 1)")
    parser.add_argument("--non-causal", action="store_true",
                        help="count full s^2 attention instead of the causal s(s+1)/2 pairs")
    parser.add_argument("--recompute", choices=("selective", "full"), default=None,
                        help="add the recomputed forward (hardware FLOPs rather than model FLOPs)")


def _bridge(name: str):
    """The bridge for a config.json, a directory holding one, or a model name the suite resolves
    (its shipped config): the calculator reads the bridge's translation of it."""
    from pathlib import Path

    from bridges import AutoBridge
    from conformance.models import resolve

    p = Path(name).expanduser()
    if (p / "config.json").is_file() or p.is_file():
        return AutoBridge.from_hf_config(p)
    return AutoBridge.from_hf_config(resolve(name).config)


def _si(x: float) -> str:
    for unit, scale in (("E", 1e18), ("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.3f} {unit}"
    return f"{x:.0f} "


def run(args) -> int:
    import sys

    from bridges.core.config import ConfigError
    from bridges.core.registry import UnknownModelError
    from bridges.flops import training_flops
    from conformance.models import ModelNotFound

    if (args.step_time is None) != (args.peak is None):
        print("mbridge flops: MFU needs both --step-time and --peak", file=sys.stderr)
        return 2
    try:
        report = training_flops(_bridge(args.model), args.seq_len, args.batch,
                                causal=not args.non_causal, recompute=args.recompute)
    except (ModelNotFound, ConfigError, UnknownModelError, ValueError) as e:
        print(f"mbridge flops: {args.model}: {e}", file=sys.stderr)
        return 2
    attention = "full s^2 attention" if args.non_causal else "causal attention, s(s+1)/2 pairs"
    print(f"{args.model}: seq {args.seq_len} x batch {args.batch} = {report.tokens:,} tokens; "
          f"{attention}; 2 FLOPs per multiply-add; backward = 2 x forward"
          + (f"; {args.recompute} recompute" if args.recompute else ""))
    print(f"{'component':<29}{'forward':>24}{'training step':>24}{'share':>8}")
    for t in report.terms:
        print(f"{t.name:<29}{t.forward:>24,}{t.step:>24,}{100 * t.step / report.total:>7.2f}%")
    print(f"{'total':<29}{report.forward:>24,}{report.total:>24,}{100.0:>7.2f}%")
    print(f"FLOPs per step: {report.total:.4e} ({_si(report.total)}FLOPs); "
          f"per token: {report.per_token:.4e}")
    p = report.params
    print(f"parameters: total {p.total:,} ({p.total / 1e9:.2f} B), active {p.active:,} "
          f"({p.active / 1e9:.2f} B), non-embedding {p.non_embedding:,}")
    if "mtp" in p.by_component:
        print(f"without MTP: total {p.main:,} ({p.main / 1e9:.2f} B), active {p.main_active:,} "
              f"({p.main_active / 1e9:.2f} B); MTP layers {p.by_component['mtp']:,} (sharing the "
              f"embedding and output head)")
    if args.step_time is not None:
        achieved = report.total / args.step_time
        mfu = report.mfu(args.step_time, args.peak * 1e12 * args.devices)
        label = "HFU" if args.recompute else "MFU"
        print(f"{label}: {100 * mfu:.2f} % ({_si(achieved / args.devices)}FLOP/s per device of "
              f"{args.peak:g} TFLOP/s peak, {args.devices} device(s), "
              f"{report.tokens / args.step_time:,.0f} tokens/s)")
    return 0
