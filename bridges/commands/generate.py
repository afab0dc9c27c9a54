"""mbridge generate: text from a prompt, run on the Megatron model the bridge builds.

    mbridge generate --hf <dir> --prompt "..." [--image FILE] [--tp N --pp N --vpp N --ep N --etp N]
                     [--max-new-tokens 32] [--no-chat] [--temperature T --top-k K --top-p P --seed S] [--dtype D] [--json]

The checkpoint's own tokenizer encodes the prompt, as a user turn through its chat template
when it has one (--no-chat: the plain text). The weights are imported at the layout and decoded
by full forwards, greedily or, with --temperature > 0, by seeded sampling (top-k / top-p), until
the end-of-sequence token or --max-new-tokens. Rank 0 prints the completion (--json: the ids and
the text). Started as one process for a layout of several ranks, it relaunches itself as that
many local ranks, as `mbridge convert` does. With --image (a vision-language model), the
checkpoint's own processor makes the turn of the image and the prompt through its chat template
(the image's placeholder tokens, the pixel inputs of its family), and the image placeholders are
never generated.
"""
from __future__ import annotations

import os

HELP = "generate text from a prompt with the converted (Megatron) model"


def add_arguments(parser) -> None:
    parser.add_argument("--hf", required=True, help="HF checkpoint directory (weights and tokenizer)")
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--image", help="an image file for a vision-language model (read with Pillow)")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--no-chat", action="store_true", help="encode the prompt as is, without the chat template")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 (default): greedy")
    parser.add_argument("--top-k", type=int, default=0, help="sample among the k likeliest (0: all)")
    parser.add_argument("--top-p", type=float, default=1.0, help="sample within this probability mass")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"),
                        help="parameter dtype (default: the checkpoint's)")
    parser.add_argument("--json", action="store_true", help="print the prompt ids, the new ids and the text as JSON")
    for flag in ("--tp", "--pp", "--ep"):
        parser.add_argument(flag, type=int, default=1)
    parser.add_argument("--vpp", type=int, default=None)
    parser.add_argument("--etp", type=int, default=None, help="expert tensor parallel size (default: --tp)")
    parser.add_argument("--trust-remote-code", action="store_true",
                        help="accept a config with auto_map (its code is never run)")


def run(args) -> int:
    from bridges.core.parallel import Layout

    layout = Layout(tp=args.tp, pp=args.pp, vpp=args.vpp, ep=args.ep, etp=args.etp)
    if args.max_new_tokens < 1 or args.temperature < 0 or not 0 < args.top_p <= 1 or args.top_k < 0:
        from bridges.core.errors import MBridgeError

        raise MBridgeError("--max-new-tokens >= 1, --temperature >= 0, 0 < --top-p <= 1, --top-k >= 0 expected")
    tokenizer = load_tokenizer(args.hf)  # a missing tokenizer fails before any rank starts
    if args.image:  # and so does an image the model or its processor cannot take
        image_inputs(args.hf, args.image, args.prompt)
    if "RANK" not in os.environ and layout.world_size > 1:
        import torch.distributed as dist

        if not dist.is_initialized():
            from bridges.launch import relaunch

            return relaunch(args.argv, layout.world_size, args.debug)
    return _generate(args, layout, tokenizer)


def load_tokenizer(path: str):
    """The checkpoint's own tokenizer (local files only); its absence is an error naming the directory."""
    from pathlib import Path

    from bridges.core.errors import MBridgeError

    if not Path(path).is_dir():
        raise MBridgeError(f"{path}: not a directory (mbridge generate needs a checkpoint with its weights "
                           f"and tokenizer)")
    try:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError, TypeError) as e:
        raise MBridgeError(f"{path}: no tokenizer that transformers can load (tokenizer.json / "
                           f"tokenizer_config.json): {str(e).splitlines()[0]}") from None


def image_inputs(path: str, image: str, prompt: str) -> dict:
    """The processor's inputs for one user turn of ``image`` and ``prompt`` (ids with the image's
    placeholders, the pixel tensors of the family): a model that is not a VLM, a checkpoint
    without a processor and an unreadable image are errors naming them."""
    import json
    from pathlib import Path

    from bridges.core.errors import MBridgeError

    config = json.loads((Path(path) / "config.json").read_text())
    if "vision_config" not in config:
        raise MBridgeError(f"--image: {path} is a {config.get('model_type')} model without a vision tower "
                           f"(no vision_config in its config.json)")
    try:
        from PIL import Image
    except ImportError:
        raise MBridgeError("--image needs Pillow: pip install pillow") from None
    try:
        picture = Image.open(image).convert("RGB")
    except (OSError, ValueError) as e:
        raise MBridgeError(f"--image {image}: {e}") from None
    try:
        from transformers import AutoProcessor

        processor = AutoProcessor.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError, TypeError, ImportError, AttributeError) as e:  # Qwen-VL's needs torchvision
        raise MBridgeError(f"{path}: no image processor that transformers can load (preprocessor_config.json / "
                           f"processor_config.json): {str(e).splitlines()[0]}") from None
    turn = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
    text = processor.apply_chat_template(turn, add_generation_prompt=True, tokenize=False)
    out = processor(text=[text], images=[picture], return_tensors="pt")
    return {k: v for k, v in out.items() if k != "attention_mask"}


def prompt_ids(tokenizer, prompt: str, chat: bool) -> list[int]:
    """The prompt's token ids: as a user turn through the chat template when there is one."""
    from bridges.core.errors import MBridgeError

    if chat and getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                            tokenize=True)
        ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)  # a BatchEncoding in transformers 5
    else:
        ids = list(tokenizer(prompt)["input_ids"])
    if not ids:
        raise MBridgeError(f"--prompt {prompt!r} encodes to no tokens with {type(tokenizer).__name__} "
                           f"({getattr(tokenizer, 'name_or_path', '')})")
    return ids


def sampler(temperature: float, top_k: int, top_p: float, seed: int):
    """The next-token rule: None (greedy) at temperature 0, else seeded sampling from the
    tempered distribution cut to the top-k and the top-p mass."""
    if temperature == 0:
        return None
    import torch

    g = torch.Generator().manual_seed(seed)

    def choose(last):
        logits = last.float().cpu() / temperature
        if top_k:
            kth = logits.topk(min(top_k, logits.shape[-1]), -1).values[..., -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        probs = logits.softmax(-1)
        if top_p < 1:
            sorted_p, order = probs.sort(-1, descending=True)
            drop = sorted_p.cumsum(-1) - sorted_p >= top_p  # keep the smallest set reaching top_p
            probs = probs.scatter(-1, order, sorted_p.masked_fill(drop, 0.0))
        return torch.multinomial(probs, 1, generator=g).squeeze(-1)
    return choose


def _generate(args, layout, tokenizer) -> int:
    import json
    import sys
    from pathlib import Path

    import torch
    import torch.distributed as dist

    from bridges import AutoBridge
    from bridges.commands.convert import _provider
    from bridges.core.parallel import init_distributed
    from conformance.forward import megatron_generate

    if "RANK" in os.environ:
        init_distributed()
    bridge = AutoBridge.from_hf_pretrained(args.hf, trust_remote_code=args.trust_remote_code)
    provider = _provider(bridge, layout, args.dtype)
    chunks = provider.provide_distributed_model()
    bridge.load_hf_weights(chunks)
    for c in chunks:
        c.eval()
    inputs_for, banned = None, ()
    if args.image:
        from conformance.adapters import ImageTextToText

        inputs = image_inputs(args.hf, args.image, args.prompt)
        prompt = inputs["input_ids"][0].tolist()
        inputs_for = ImageTextToText._rest(inputs)
        banned = tuple(type(bridge).banned_tokens(json.loads((Path(args.hf) / "config.json").read_text())))
    else:
        prompt = prompt_ids(tokenizer, args.prompt, chat=not args.no_chat)
    eos = tokenizer.eos_token_id
    stop = tuple(eos if isinstance(eos, (list, tuple)) else [eos]) if eos is not None else ()
    ids = megatron_generate(chunks, torch.tensor([prompt]), args.max_new_tokens, provider.vocab_size,
                            inputs_for, banned, choose=sampler(args.temperature, args.top_k, args.top_p, args.seed),
                            stop=stop)
    new = ids[0, len(prompt):].tolist()
    if dist.is_initialized() and dist.get_rank() != 0:
        return 0
    text = tokenizer.decode(new, skip_special_tokens=True)
    print(json.dumps({"prompt_ids": prompt, "new_ids": new, "text": text}) if args.json else text)
    sys.stdout.flush()
    return 0
