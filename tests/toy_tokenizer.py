"""A tokenizer for toy checkpoints, built here with the `tokenizers` library (nothing downloads):
one character per id, so that it reads the same whether transformers loads it as written (word
level) or as the family's BPE class (Qwen2's, whose merges it does not have); special tokens
(a VLM's image placeholders) at the ids the toy's config gives them."""
import json
from pathlib import Path

# a chat template over the characters: x <turn> y, then z to answer; an image as its placeholders
TEMPLATE = ("{% for m in messages %}x {% if m['content'] is string %}{{ m['content'] }} {% else %}"
            "{% for c in m['content'] %}{% if c['type'] == 'image' %}IMAGE{% else %}{{ c['text'] }} {% endif %}"
            "{% endfor %}{% endif %}y {% endfor %}{% if add_generation_prompt %}z{% endif %}")


def char_tokenizer(vocab: int, specials: dict[str, int] | None = None, image: str = ""):
    """``vocab`` ids: lowercase letters first, then CJK characters, ``specials`` at their ids;
    eos is ``b``; ``image``: what the template writes for an image."""
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = specials or {}
    taken = set(specials.values())
    chars = iter(list("abcdefghijklmnopqrstuvwxyz") + [chr(0x4E00 + i) for i in range(vocab)])
    table = {**{next(chars): i for i in range(vocab) if i not in taken}, **specials}
    tok = Tokenizer(models.WordLevel(table, unk_token="a"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="b", unk_token="a",
                                   additional_special_tokens=list(specials) or None)
    fast.chat_template = TEMPLATE.replace("IMAGE", image)
    return fast


def save_with_tokenizer(src, dst: Path) -> Path:
    """A copy of a toy checkpoint with a character tokenizer over its text vocabulary."""
    import shutil

    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    char_tokenizer((cfg.get("text_config") or cfg)["vocab_size"]).save_pretrained(dst)
    return dst
