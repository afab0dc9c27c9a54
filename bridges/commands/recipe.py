"""mbridge recipe: the training recipe of a model for a mode and a cluster, as Megatron-LM
``pretrain_gpt.py`` flags (the model's for the recipe's layout, then the training ones), one per
line or on one line for $(...); the recipe's source and the memory estimate per GPU go to stderr:

    mbridge recipe Qwen/Qwen3-8B --mode sft --gpus 8 --gpu-memory 80 > train.args
    torchrun --nproc-per-node 8 pretrain_gpt.py $(cat train.args) --load <ckpt> ...

Recipes are data beside each bridge (bridges/models/<family>/recipes.toml); a GPU count or card
with no stored layout gets the least model parallelism whose estimate fits. LoRA (``--mode peft``)
has no flag in Megatron-LM's pretrain_gpt.py: its settings are printed to stderr and with
``--json`` (docs/recipes.md)."""
HELP = "training recipe (layout, batch, schedule, LoRA) as Megatron-LM flags, with a memory estimate"


def add_arguments(parser) -> None:
    parser.add_argument("model", help="org/model (shipped fixture or hub config), a directory or a config.json")
    parser.add_argument("--mode", choices=("pretrain", "sft", "peft"), default="sft")
    parser.add_argument("--gpus", type=int, default=8, help="GPUs in the job (default 8)")
    parser.add_argument("--gpu-memory", type=float, default=80, help="GiB per GPU (default 80)")
    parser.add_argument("--one-line", action="store_true", help="all flags on one line")
    parser.add_argument("--training-only", action="store_true",
                        help="only the training flags (the layout's are in the model flags)")
    parser.add_argument("--json", action="store_true", help="the recipe and its estimate as JSON")


def run(args) -> int:
    import dataclasses
    import json
    import sys

    from bridges import recipes as R
    from bridges.commands.flops import _bridge
    from bridges.commands.megatron_args import print_flags
    from bridges.core.config import ConfigError

    if args.gpus < 1 or args.gpu_memory <= 0:
        raise ConfigError(f"--gpus {args.gpus} --gpu-memory {args.gpu_memory:g}: both must be positive")
    bridge = _bridge(args.model)
    r = R.recipe(bridge, args.model, args.mode, args.gpus, args.gpu_memory)
    mem = R.memory(bridge, r)
    if args.json:
        print(json.dumps({"recipe": dataclasses.asdict(r), "layout": r.layout_name,
                          "memory_gib": {k: round(v / R.GIB, 2) for k, v in mem.items()},
                          "usable_gib": round(R.usable(r.gpu_memory) / R.GIB, 2)}, indent=1))
        return 0
    print(f"# {r.model} {r.mode} on {r.gpus} x {r.gpu_memory:g} GiB: {r.layout_name}, recompute {r.recompute} "
          f"({r.source})\n# estimated per GPU: {mem['total'] / R.GIB:.1f} GiB of {R.usable(r.gpu_memory) / R.GIB:.1f} "
          f"usable (" + ", ".join(f"{k} {v / R.GIB:.1f}" for k, v in mem.items() if k != "total") + ")", file=sys.stderr)
    if r.lora:
        print(f"# LoRA (no pretrain_gpt.py flag): rank {r.lora['rank']}, alpha {r.lora['alpha']}, dropout "
              f"{r.lora['dropout']}, targets {' '.join(r.lora['targets'])}", file=sys.stderr)
    print_flags(R.training_flags(r) if args.training_only else R.flags(bridge, r), args.one_line)
    return 0
