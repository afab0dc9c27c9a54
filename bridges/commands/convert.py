"""mbridge convert: HF checkpoints <-> Megatron-Core distributed checkpoints.

    mbridge convert import --hf <dir|org/model> --out <dir> --tp 2 --pp 2 [--vpp N] [--dtype bfloat16]
    mbridge convert export --megatron <dir> --out <dir> [--hf-source <dir|org/model>] [--tp N --pp N] [--dtype D]
    mbridge convert compare <hf dir> <hf dir>     # bit for bit: exit 0 when identical, 1 naming the differences

Runs as one process, or under torchrun for many ranks; started as one process for a layout
that needs several ranks, it relaunches itself as that many local ranks. The Megatron
checkpoint is written in Megatron-LM's layout (iter_0000000/, latest_checkpointed_iteration.txt)
and can be exported under any other layout. It carries Megatron-LM's ``args`` for the model
(the flags of ``mbridge megatron-args``, as the trainer saves them), so that
``pretrain_gpt.py --use-checkpoint-args`` takes the model from it. Export writes the dtype the
Megatron weights are stored in (a bf16 training run of a float32 source is written in bf16;
``--dtype`` to choose), the source's where they agree.

--out must be new or empty: a directory holding anything else is refused before any work, and
--overwrite replaces only an earlier mbridge output that holds nothing else (a training run's
checkpoint root with its own iterations is never touched; docs/reliability.md). Bad input
prints one line, "mbridge: error: ...", and exits 2; --debug shows the traceback.
"""
from __future__ import annotations

import os
import sys

HELP = "convert HF <-> Megatron-Core distributed checkpoints"
DTYPES = ("float32", "bfloat16", "float16")


def add_arguments(parser) -> None:
    sub = parser.add_subparsers(dest="direction", required=True)
    imp = sub.add_parser("import", help="HF checkpoint -> Megatron-Core distributed checkpoint")
    imp.add_argument("--hf", required=True, help="HF checkpoint directory or hub id")
    exp = sub.add_parser("export", help="Megatron-Core distributed checkpoint -> HF checkpoint")
    exp.add_argument("--megatron", required=True, help="Megatron checkpoint directory")
    exp.add_argument("--hf-source", help="the HF checkpoint it came from (default: recorded at import)")
    exp.add_argument("--fp8", "--keep-quantization", dest="fp8", action="store_true",
                     help="re-quantize tensors that were quantized in the source (FP8, MXFP4, NVFP4, "
                          "compressed-tensors FP8 / packed int) to its layout and scales")
    cmp = sub.add_parser("compare", help="two HF checkpoints, tensor by tensor, bit for bit")
    cmp.add_argument("a", help="HF checkpoint directory (e.g. the source)")
    cmp.add_argument("b", help="HF checkpoint directory (e.g. an export of it)")
    for p in (imp, exp):
        p.add_argument("--out", required=True,
                       help="output directory: new or empty (written atomically, never merged)")
        p.add_argument("--overwrite", action="store_true",
                       help="replace --out if it is an earlier mbridge output holding nothing else")
        p.add_argument("--tp", type=int, default=1)
        p.add_argument("--pp", type=int, default=1)
        p.add_argument("--vpp", type=int, default=None)
        p.add_argument("--ep", type=int, default=1, help="expert parallel size (MoE models)")
        p.add_argument("--etp", type=int, default=None,
                       help="expert tensor parallel size (default: --tp, as Megatron)")
    imp.add_argument("--dtype", choices=DTYPES, help="parameter dtype (default: the checkpoint's)")
    exp.add_argument("--dtype", choices=DTYPES,
                     help="dtype of the written tensors (default: the one the Megatron weights are stored in)")
    imp.add_argument("--strict", action="store_true", help="NaN/Inf weights are an error, not a warning")
    for p in (imp, exp):
        p.add_argument("--trust-remote-code", action="store_true",
                       help="accept a config with auto_map (its code is never run: the bridge is declarative)")
        p.add_argument("--allow-pickle", action="store_true",
                       help="accept .bin/.pt weights (loaded with torch.load(weights_only=True))")


def run(args) -> int:
    if args.direction == "compare":
        return _compare(args.a, args.b)
    from bridges.core.layout import Layout
    from bridges.core.outdir import check_target

    # experts are saved sequential: Megatron's distributed checkpoint is the same for grouped GEMM
    layout = Layout(tp=args.tp, pp=args.pp, vpp=args.vpp, ep=args.ep, etp=args.etp)
    check_target(args.out, args.overwrite)  # before any work; checked again under the lock
    if "RANK" not in os.environ and layout.world_size > 1:
        # the launcher imports no torch (the ranks do): unless a caller in this process already
        # set up torch.distributed, relaunch
        dist = sys.modules.get("torch.distributed")
        if dist is None or not dist.is_initialized():
            from bridges.launch import relaunch

            return relaunch(args.argv, layout.world_size, args.debug)
    return _import(args, layout) if args.direction == "import" else _export(args, layout)


def _compare(a: str, b: str) -> int:
    from bridges.core.hf_io import HFCheckpoint, differences

    ca, cb = HFCheckpoint(a), HFCheckpoint(b)
    diff = differences(ca, cb)
    if diff:
        print(f"mbridge: {a} and {b} differ:\n  " + "\n  ".join(diff), file=sys.stderr)
        return 1
    print(f"{len(ca.names())} tensors, all bit-exact: {a} = {b}")
    return 0


def _provider(bridge, layout, dtype=None):
    import torch

    provider = bridge.to_megatron_provider().set_layout(layout)
    if dtype:
        provider.params_dtype = getattr(torch, dtype)
    provider.finalize()
    return provider


def _claim(out: str, overwrite: bool):
    """Rank 0 holds the lock of ``out`` from before the model is read to the rename, so a second
    conversion to the same path fails at once instead of racing this one."""
    from bridges.core.outdir import claim_checked
    from bridges.core.parallel import init_distributed

    if "RANK" in os.environ:
        init_distributed()
    return claim_checked(out, overwrite)


def _say(text: str) -> None:
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_rank() == 0:
        print(text, file=sys.stderr, flush=True)


def _import(args, layout) -> int:
    from pathlib import Path

    from bridges import AutoBridge
    from bridges.core.megatron_ckpt import save_megatron

    with _claim(args.out, args.overwrite):
        bridge = AutoBridge.from_hf_pretrained(args.hf, trust_remote_code=args.trust_remote_code,
                                               allow_pickle=args.allow_pickle)
        provider = _provider(bridge, layout, args.dtype)
        chunks = provider.provide_distributed_model()
        _say(f"importing {args.hf} ({bridge.model_type}) at {layout.name}")
        bridge.load_hf_weights(chunks, strict=args.strict)
        meta = {"hf_config": bridge.checkpoint.config(),
                "hf_source": str(Path(bridge.checkpoint.path).resolve()),
                "model_type": bridge.model_type, "layout": layout.name,
                "dtype": str(provider.params_dtype).replace("torch.", "")}
        from bridges.megatron_lm import checkpoint_args

        save_megatron(chunks, args.out, meta, overwrite=args.overwrite, args=checkpoint_args(bridge, provider),
                      last_use=True)
    _say(f"wrote {args.out}")
    return 0


def _export(args, layout) -> int:
    from pathlib import Path

    from bridges import AutoBridge
    from bridges.core.megatron_ckpt import load_megatron, read_meta

    with _claim(args.out, args.overwrite):
        meta = read_meta(args.megatron) if not args.hf_source else {}
        source = args.hf_source or meta.get("hf_source")
        trust = {"trust_remote_code": args.trust_remote_code}
        if source and (Path(source).is_dir() or args.hf_source):
            bridge = AutoBridge.from_hf_pretrained(source, allow_pickle=args.allow_pickle, **trust)
        else:  # the source is gone: rebuild from the recorded config
            bridge = AutoBridge.from_hf_config(meta["hf_config"], **trust)
        import torch

        from bridges.core.megatron_ckpt import stored_dtype

        stored = stored_dtype(args.megatron)
        dtype = args.dtype or (str(stored).replace("torch.", "") if stored is not None else meta.get("dtype"))
        provider = _provider(bridge, layout, dtype)
        if dtype and getattr(torch, dtype) != bridge.megatron_attrs()["params_dtype"]:
            bridge.export_dtype = getattr(torch, dtype)  # e.g. a bf16 training run of an fp32 source
        chunks = provider.provide_distributed_model()
        load_megatron(chunks, args.megatron)
        _say(f"exporting {args.megatron} at {layout.name}")
        bridge.save_hf_pretrained(chunks, args.out, progress=True, quantized=args.fp8,
                                  overwrite=args.overwrite)
    _say(f"wrote {args.out}")
    return 0
