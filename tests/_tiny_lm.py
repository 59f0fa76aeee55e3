"""A tiny random Llama with a word-level tokenizer and a chat template, saved as a local
Hugging Face checkpoint (safetensors), plus a few hundred synthetic alpaca rows.
Used by the SAE training and evaluation tests; builds in about a second."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

WORDS = ("the a cat dog sat on mat ran to park add two and three is five what one plus four six "
         "code print def return list sum write poem about sea sky blue red green answer so").split()
TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}")


def make_rows(n: int, seed: int = 0) -> list[dict]:
    rnd = random.Random(seed)
    rows = []
    for i in range(n):
        topic = rnd.choice([WORDS[:9], WORDS[9:20], WORDS[20:27], WORDS[27:]])
        rows.append({"id": f"r{i}", "instruction": " ".join(rnd.choices(topic, k=rnd.randint(3, 12))),
                     "input": "", "output": " ".join(rnd.choices(topic, k=rnd.randint(5, 30)))})
    return rows


def write_rows(path: Path, rows: list[dict]) -> Path:
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def make_tiny_lm(path: Path, layers: int = 4, hidden: int = 32, seed: int = 0) -> Path:
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    path.mkdir(parents=True, exist_ok=True)
    specials = ["<|pad|>", "<|unk|>", "<|im_start|>", "<|im_end|>"]
    vocab = {w: i for i, w in enumerate(specials + ["user", "assistant", "system"] + WORDS)}
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<|unk|>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<|pad|>", unk_token="<|unk|>",
                                  bos_token="<|im_start|>", eos_token="<|im_end|>",
                                  additional_special_tokens=["<|im_start|>", "<|im_end|>"])
    tok.chat_template = TEMPLATE
    tok.save_pretrained(path)
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(vocab), hidden_size=hidden, intermediate_size=2 * hidden,
                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=256, pad_token_id=0, bos_token_id=2, eos_token_id=3,
                      tie_word_embeddings=True)
    model = LlamaForCausalLM(cfg)
    model.save_pretrained(path, safe_serialization=True)
    assert list(path.glob("*.safetensors")), "tiny model not written as safetensors"
    json.loads((path / "config.json").read_text())
    return path
