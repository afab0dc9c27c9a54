"""mbridge generate: the prompt through the checkpoint's own tokenizer and chat template, decoded
on the Megatron model at a layout; greedy gives HF generate's tokens, sampling is seeded, a
checkpoint without a tokenizer is one clear error. The tokenizer is built here (the `tokenizers`
library, a word per token id): nothing downloads."""
import json
import shutil

import pytest
import torch

TEMPLATE = "{% for m in messages %}t7 {{ m['content'] }} t8 {% endfor %}{% if add_generation_prompt %}t9{% endif %}"


@pytest.fixture(scope="module")
def model_dir(conformance, tmp_path_factory):
    """The Qwen3 toy with a word-level tokenizer over its vocabulary and a chat template."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from conformance.models import resolve

    toy = conformance.checkpoint(resolve("Qwen/Qwen3-8B"))
    d = tmp_path_factory.mktemp("generate") / "qwen3-toy"
    shutil.copytree(toy, d)
    cfg = json.loads((d / "config.json").read_text())
    vocab = {f"t{i}": i for i in range(cfg["vocab_size"])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    eos = cfg["eos_token_id"] if isinstance(cfg["eos_token_id"], int) else cfg["eos_token_id"][0]
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=f"t{eos}", unk_token="t0")
    fast.chat_template = TEMPLATE
    fast.save_pretrained(d)
    return d


def _run(conformance, argv):
    results = conformance.pool.run("tests.convert_tasks:cli_stdout", argv=["generate", *argv])
    assert [rc for rc, _ in results] == [0] * len(results), results
    return json.loads(results[0][1])


@pytest.mark.parametrize("layout", [["--tp", "2"], ["--pp", "2"]], ids=["tp2", "pp2"])
def test_greedy_is_hf_generate(conformance, model_dir, layout):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = _run(conformance, ["--hf", str(model_dir), "--prompt", "t5 t6 t42", "--max-new-tokens", "12", "--json",
                             *layout])
    tok = AutoTokenizer.from_pretrained(model_dir)
    ids = tok.apply_chat_template([{"role": "user", "content": "t5 t6 t42"}], add_generation_prompt=True,
                                  tokenize=True)
    ids = list(ids["input_ids"]) if hasattr(ids, "keys") else list(ids)
    assert out["prompt_ids"] == ids == [7, 5, 6, 42, 8, 9]  # through the chat template
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    ref = hf.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.eos_token_id)[0, len(ids):].tolist()
    assert out["new_ids"] == ref and len(ref) >= 1
    assert out["text"] == tok.decode(ref, skip_special_tokens=True)


def test_sampling_is_seeded_and_no_chat_is_the_plain_prompt(conformance, model_dir):
    args = ["--hf", str(model_dir), "--prompt", "t5 t6 t42", "--max-new-tokens", "8", "--json", "--no-chat",
            "--temperature", "1.5", "--top-k", "50", "--top-p", "0.9"]
    a, b = _run(conformance, [*args, "--seed", "1"]), _run(conformance, [*args, "--seed", "1"])
    c = _run(conformance, [*args, "--seed", "2"])
    assert a["prompt_ids"] == [5, 6, 42]
    assert a["new_ids"] == b["new_ids"] and a["new_ids"] != c["new_ids"]


def test_sampler_keeps_the_top_k_and_top_p():
    from bridges.commands.generate import sampler

    logits = torch.tensor([[4.0, 3.0, 2.0, -1.0, -2.0]])
    seen = {int(sampler(1.0, 2, 1.0, s)(logits)) for s in range(200)}
    assert seen == {0, 1}
    seen = {int(sampler(1.0, 0, 0.5, s)(logits)) for s in range(200)}
    assert seen == {0}  # token 0 alone holds over half the mass


def test_a_checkpoint_without_a_tokenizer_is_one_clear_error(tmp_path, capsys):
    from bridges.cli import main

    (tmp_path / "config.json").write_text("{}")
    assert main(["generate", "--hf", str(tmp_path), "--prompt", "hi"]) == 2
    err = capsys.readouterr().err
    assert f"mbridge: error: {tmp_path}: no tokenizer" in err and "Traceback" not in err


def test_a_prompt_that_encodes_to_nothing_is_one_clear_error():
    """A tokenizer that drops every character of the prompt (a BPE without the merges) gives no
    ids: named as such, instead of an empty tensor reaching the embedding."""
    from bridges.commands.generate import prompt_ids
    from bridges.core.errors import MBridgeError

    class Empty:
        chat_template, name_or_path = None, "toy/"

        def __call__(self, text):
            return {"input_ids": []}

    with pytest.raises(MBridgeError, match="--prompt 'hi' encodes to no tokens with Empty"):
        prompt_ids(Empty(), "hi", chat=True)


@pytest.fixture(scope="module")
def vlm_dir(conformance, tmp_path_factory):
    """The Devstral-Small-2 (Mistral3) toy with a processor: Pixtral's image processor at the toy
    tower's patch size, a character tokenizer with the image tokens at the toy's ids."""
    from transformers import PixtralImageProcessor, PixtralProcessor

    from conformance.models import resolve
    from tests.toy_tokenizer import char_tokenizer

    toy = conformance.checkpoint(resolve("mistralai/Devstral-Small-2-24B-Instruct-2512"))
    d = tmp_path_factory.mktemp("generate-vlm") / "mistral3-toy"
    shutil.copytree(toy, d)
    cfg = json.loads((d / "config.json").read_text())
    v = cfg["vision_config"]
    specials = {"[IMG]": cfg["image_token_index"], "[IMG_BREAK]": 498, "[IMG_END]": 499}
    tok = char_tokenizer(cfg["text_config"]["vocab_size"], specials, image="[IMG] ")
    images = PixtralImageProcessor(patch_size=v["patch_size"], size={"longest_edge": v["image_size"]})
    PixtralProcessor(image_processor=images, tokenizer=tok, patch_size=v["patch_size"],
                     spatial_merge_size=cfg["spatial_merge_size"], chat_template=tok.chat_template).save_pretrained(d)
    return d


def test_greedy_with_an_image_is_hf_generate(conformance, vlm_dir, tmp_path):
    """An image file through the checkpoint's processor: the same placeholders, pixels and grid
    sizes reach the Megatron model at TP2 as HF's, and greedy decoding gives HF's tokens."""
    from PIL import Image
    from transformers import AutoModelForImageTextToText

    from bridges.commands.generate import image_inputs
    from conformance.adapters import ImageTextToText
    from conformance.forward import hf_generate

    pixels = torch.Generator().manual_seed(3)
    Image.fromarray((torch.rand(20, 16, 3, generator=pixels) * 255).byte().numpy()).save(tmp_path / "x.png")
    out = _run(conformance, ["--hf", str(vlm_dir), "--prompt", "c d e", "--image", str(tmp_path / "x.png"),
                             "--max-new-tokens", "6", "--json", "--tp", "2"])
    inputs = image_inputs(str(vlm_dir), str(tmp_path / "x.png"), "c d e")
    ids = inputs["input_ids"]
    cfg = json.loads((vlm_dir / "config.json").read_text())
    assert out["prompt_ids"] == ids[0].tolist() and ids[0].tolist().count(cfg["image_token_index"]) >= 4
    hf = AutoModelForImageTextToText.from_pretrained(vlm_dir, dtype=torch.float32).eval()
    ref = hf_generate(hf, ids, len(out["new_ids"]), None, ImageTextToText._rest(inputs),
                      (cfg["image_token_index"],))[0, ids.shape[1]:].tolist()
    assert out["new_ids"] == ref and len(ref) >= 1


def test_an_image_for_a_text_model_or_an_unreadable_one_is_named(model_dir, vlm_dir, tmp_path):
    from bridges.commands.generate import image_inputs
    from bridges.core.errors import MBridgeError

    (tmp_path / "x.png").write_bytes(b"not a png")
    with pytest.raises(MBridgeError, match="without a vision tower"):
        image_inputs(str(model_dir), str(tmp_path / "x.png"), "c")
    with pytest.raises(MBridgeError, match=f"--image {tmp_path / 'x.png'}"):
        image_inputs(str(vlm_dir), str(tmp_path / "x.png"), "c")
