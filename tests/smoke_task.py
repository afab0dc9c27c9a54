"""The issue's API contract, run on the conformance rank pool (every rank runs this)."""
import torch
import torch.distributed as dist


def smoke(checkpoint: str, tp: int, pp: int, out: str) -> dict:
    from bridges import AutoBridge

    bridge = AutoBridge.from_hf_pretrained(checkpoint)
    provider = bridge.to_megatron_provider()
    provider.tensor_model_parallel_size = tp
    provider.pipeline_model_parallel_size = pp
    provider.finalize()
    model = provider.provide_distributed_model(wrap_with_ddp=False)
    bridge.load_hf_weights(model)
    exported = dict(bridge.export_hf_weights(model, cpu=True))
    bridge.save_hf_pretrained(model, out)
    result = {"names": sorted(exported)}
    if dist.get_rank() == 0:
        from transformers import AutoModelForCausalLM

        src = AutoModelForCausalLM.from_pretrained(checkpoint, attn_implementation="eager").eval()
        back = AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
        ids = torch.arange(10).unsqueeze(0)
        with torch.no_grad():
            result["same_logits"] = torch.equal(src(ids).logits, back(ids).logits)
        result["same_class"] = type(src) is type(back)
        sd = src.state_dict()
        result["bit_exact"] = all(torch.equal(sd[k], v) for k, v in exported.items())
    return result
