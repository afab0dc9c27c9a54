"""mbridge megatron-args: Megatron-LM's pretrain_gpt.py model arguments for a model, from the
provider the bridge builds (architecture, norm, rope and its scaling, biases, QK norm, MoE
flags, vocabulary padding, the layout), one per line, or on one line for $(...):

    mbridge megatron-args Qwen/Qwen3-8B --tp 2 > model.args
    torchrun ... pretrain_gpt.py $(cat model.args) --load <ckpt> --no-load-optim --no-load-rng ...

A checkpoint from `mbridge convert import` carries these flags as Megatron-LM's saved ``args``:
with ``pretrain_gpt.py --use-checkpoint-args`` the trainer takes most of the model from it, and
``--beside-checkpoint-args`` prints only the flags it does not restore (QK norm, the norm
epsilon, the vocabulary, the layout, ...).

A model whose layers Megatron-LM's local GPT spec cannot build is refused, naming why. The
flag table follows NVIDIA/Megatron-LM main at d98e8a64dd (bridges/megatron_lm.py)."""
HELP = "Megatron-LM pretrain_gpt.py model arguments for a model"


def add_arguments(parser) -> None:
    parser.add_argument("model", help="org/model (shipped fixture or hub config), a directory or a config.json")
    for flag, what in (("--tp", "tensor"), ("--pp", "pipeline"), ("--ep", "expert")):
        parser.add_argument(flag, type=int, default=1, help=f"{what} parallel size (default 1)")
    parser.add_argument("--vpp", type=int, default=None, help="virtual pipeline stages per rank")
    parser.add_argument("--etp", type=int, default=None, help="expert tensor parallel size (default: --tp)")
    parser.add_argument("--one-line", action="store_true", help="all flags on one line")
    parser.add_argument("--beside-checkpoint-args", action="store_true",
                        help="only the flags pretrain_gpt.py --use-checkpoint-args does not take from a converted checkpoint")


def run(args) -> int:
    from bridges.commands.flops import _bridge
    from bridges.megatron_lm import beside_checkpoint_args, megatron_lm_args

    flags = megatron_lm_args(_bridge(args.model), tp=args.tp, pp=args.pp, vpp=args.vpp, ep=args.ep, etp=args.etp)
    if args.beside_checkpoint_args:
        flags = beside_checkpoint_args(flags)
    print_flags(flags, args.one_line)
    return 0


def print_flags(flags: list[str], one_line: bool = False) -> None:
    """A flag with its value on one line (shell-quoted), or everything on one line."""
    import shlex

    lines, i = [], 0
    while i < len(flags):
        take = 2 if i + 1 < len(flags) and not flags[i + 1].startswith("--") else 1
        lines.append(" ".join(shlex.quote(f) for f in flags[i:i + take]))
        i += take
    print(" ".join(lines) if one_line else "\n".join(lines))
