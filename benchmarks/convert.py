"""One rank of a conversion benchmark: HF -> Megatron import, then Megatron -> HF export.

    python benchmarks/convert.py CKPT_DIR OUT_DIR --tp 1 [--ep 1] [--pp 1] [--json OUT]
                                 [--profile build,load,export] [--build-only]

For TP x EP > 1 the parent starts one process per rank with RANK / WORLD_SIZE / MASTER_ADDR /
MASTER_PORT set (gloo). Phases, each with its wall time and peak RSS:

- ``start+imports``: from the parent's spawn (``BENCH_T0``) through importing torch,
  megatron.core (GPTModel), transformers and bridges;
- ``setup``: torch.distributed init, ``AutoBridge.from_hf_pretrained`` (config + shard headers),
  provider with TP, EP and ``params_dtype = torch.bfloat16``;
- ``build``: ``provider.provide_distributed_model()`` (Megatron parallel state + GPTModel; a
  bridge made from a checkpoint switches Megatron's random initialisation off);
- ``load``: ``bridge.load_hf_weights(model)``, the part that reads the checkpoint;
- ``export``: ``bridge.save_hf_pretrained(model, OUT_DIR)`` (export_hf_weights ->
  save_hf_checkpoint; rank 0 writes).

On a machine with CUDA the model is built on the GPU (the provider's choice), so ``load`` reads
into GPU parameters and ``export`` writes from them; ``CUDA_VISIBLE_DEVICES=`` keeps it on CPU.

``--profile build,load,export`` runs those phases under cProfile and writes the stats next to
the JSON (``<json>.<phase>.prof``); the memory sampler thread is off in a profiled run.
"""
from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

from _common import Phases, emit

T0 = float(os.environ["BENCH_T0"]) if "BENCH_T0" in os.environ else None


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("ckpt")
    ap.add_argument("out")
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--ep", type=int, default=1, help="expert model parallel size (MoE)")
    ap.add_argument("--pp", type=int, default=1, help="pipeline parallel size")
    ap.add_argument("--build-only", action="store_true",
                    help="stop after the build: the rank's share of the model (its parameters' bytes)")
    ap.add_argument("--json")
    ap.add_argument("--profile", default="",
                    help="comma list of phases (build, load, export) to run under cProfile")
    ap.add_argument("--no-sample", action="store_true",
                    help="no 10 ms RSS sampler thread (RssAnon / RssFile peaks not measured)")
    a = ap.parse_args()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))

    import torch

    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    import megatron.core  # noqa: F401
    from megatron.core.models.gpt import GPTModel  # noqa: F401
    import transformers  # noqa: F401
    from transformers import AutoConfig  # noqa: F401

    import bridges
    from bridges import AutoBridge
    from bridges.core.parallel import init_distributed

    profiled = [p for p in a.profile.split(",") if p]
    # no sampler thread under the profiler: it would show up in the profile
    phases = Phases(T0, sample=not (profiled or a.no_sample))
    phases.startup()
    profs = {}

    def run(name, fn):
        with phases(name):
            if name in profiled:
                import cProfile

                profs[name] = cProfile.Profile()
                profs[name].enable()
            try:
                out = fn()
                if torch.cuda.is_available():  # the copies to and from the GPU are done
                    torch.cuda.synchronize()
                return out
            finally:
                if name in profiled:
                    profs[name].disable()

    def setup():
        init_distributed()
        bridge = AutoBridge.from_hf_pretrained(a.ckpt)
        provider = bridge.to_megatron_provider()
        provider.tensor_model_parallel_size = a.tp
        provider.expert_model_parallel_size = a.ep
        provider.pipeline_model_parallel_size = a.pp
        provider.params_dtype = torch.bfloat16
        provider.finalize()
        return bridge, provider

    bridge, provider = run("setup", setup)
    model = run("build", lambda: provider.provide_distributed_model(wrap_with_ddp=False))
    params = [p for chunk in model for p in chunk.parameters()]
    share = sum(p.numel() * p.element_size() for p in params)
    if a.build_only:
        emit(a.json, phases.result(rank=rank, world=world, share_bytes=share))
        return
    run("load", lambda: bridge.load_hf_weights(model))
    largest_param = max(p.numel() * p.element_size() for p in params)
    dtypes = sorted({str(p.dtype) for p in params})
    run("export", lambda: bridge.save_hf_pretrained(model, a.out))
    written = None
    if rank == 0:
        written = sum(p.stat().st_size for p in Path(a.out).glob("*.safetensors"))
    for name, prof in profs.items():
        prof.dump_stats(f"{a.json or 'convert'}.{name}.prof")
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()
    emit(a.json, phases.result(rank=rank, world=world, tp=a.tp, ep=a.ep, share_bytes=share,
                               largest_param_bytes=largest_param, param_dtypes=dtypes,
                               written_bytes=written, threads=torch.get_num_threads(),
                               end_time=time.time(), device=str(params[0].device),
                               gpu_peak_bytes=(torch.cuda.max_memory_allocated()
                                               if torch.cuda.is_available() else None),
                               bridges_from=str(Path(bridges.__file__).parent)))
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
