"""The API contract, as a script. Run it as one CPU process (TP=PP=1) or under torchrun:

    python examples/smoke.py <hf checkpoint dir> [--tp 2 --pp 2]
    torchrun --nproc-per-node 4 examples/smoke.py <hf checkpoint dir> --tp 2 --pp 2 --out /tmp/x
"""
import argparse

import torch.distributed as dist

from bridges import AutoBridge


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("checkpoint")
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--pp", type=int, default=1)
    ap.add_argument("--out", help="also write the exported HF checkpoint here")
    args = ap.parse_args()

    bridge = AutoBridge.from_hf_pretrained(args.checkpoint)
    provider = bridge.to_megatron_provider()
    provider.tensor_model_parallel_size = args.tp
    provider.pipeline_model_parallel_size = args.pp
    provider.finalize()
    model = provider.provide_distributed_model(wrap_with_ddp=False)  # this rank's chunks
    bridge.load_hf_weights(model)
    for name, tensor in bridge.export_hf_weights(model, cpu=True):
        if dist.get_rank() == 0:
            print(name, tuple(tensor.shape))
    if args.out:
        bridge.save_hf_pretrained(model, args.out)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
