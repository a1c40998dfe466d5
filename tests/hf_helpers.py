"""Tiny random-weight Hugging Face decoders (Llama, Mistral, Qwen2, Qwen3) with a small byte-level BPE tokenizer
and a chat template, written as model directories for the `--hf` tests."""
from __future__ import annotations

import json
from pathlib import Path

CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")

TEXT = ("def add(a, b):\n    return a + b\n\nclass Point:\n    def __init__(self, x, y):\n        self.x = x\n"
        "The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs.\n") * 20


def make_tokenizer(vocab_size: int = 320, chat: bool = True):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tr = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                             initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tk.train_from_iterator([TEXT], tr)
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                  bos_token=None)
    if chat:
        tok.chat_template = CHAT_TEMPLATE
    return tok


def hf_config(family: str, vocab_size: int, **kw):
    import transformers as T

    common = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-6,
                  tie_word_embeddings=family in ("llama", "qwen3"), rope_theta=10000.0)
    common.update(kw)
    if family == "llama":
        return T.LlamaConfig(**common)
    if family == "mistral":
        return T.MistralConfig(sliding_window=None, **common)
    if family == "qwen2":
        return T.Qwen2Config(**common)
    if family == "qwen3":
        return T.Qwen3Config(head_dim=24, **common)
    if family == "gpt2":
        return T.GPT2Config(vocab_size=vocab_size, n_embd=64, n_layer=2, n_head=4, n_positions=256)
    raise ValueError(family)


def make_hf_dir(path, family: str = "llama", chat: bool = True, seed: int = 0, **kw) -> Path:
    import torch
    from transformers import AutoModelForCausalLM

    path = Path(path)
    tok = make_tokenizer(chat=chat)
    cfg = hf_config(family, len(tok), **kw)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    with torch.no_grad():  # random norms and biases so that a mapping mistake shows
        for n, p in model.named_parameters():
            if p.dim() == 1:
                p.copy_(1 + 0.2 * torch.randn_like(p) if "norm" in n else 0.2 * torch.randn_like(p))
    model.save_pretrained(str(path), safe_serialization=True)
    tok.save_pretrained(str(path))
    return path


def write_jsonl(path, rows) -> Path:
    path = Path(path)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def pc_rows(n: int = 60):
    return [{"prompt": f"Q{i}: what is {i} + {i}?\nA:", "completion": f" {2 * i}. def add(a, b): return a + b"}
            for i in range(n)]


def chat_rows(n: int = 60):
    return [{"messages": [{"role": "user", "content": f"say {i}"},
                          {"role": "assistant", "content": f"{i} is a number; the quick brown fox"}]} for i in range(n)]


def text_rows(n: int = 60):
    return [{"text": f"{i}: " + TEXT[(7 * i) % 200:(7 * i) % 200 + 120]} for i in range(n)]
