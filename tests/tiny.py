"""Tiny models and tokenizers built locally, for tests: nothing is downloaded."""

from __future__ import annotations

import json
import random
from pathlib import Path

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIALS = ["<pad>", "<s>", "</s>", "<unk>", "<|im_start|>", "<|im_end|>"]


SENTENCES = """The quick brown fox jumps over the lazy dog.
Hello world! How many miles is 12 kilometres?
Name a thing that is green. Give three tips for staying healthy. What is the capital of France?
Write a short story about a robot who learns to paint. Explain why the sky is blue.
Translate the following sentence into French. Summarize the text below in one sentence.
The answer is yes. The answer is no. I think that it will rain today, so take an umbrella.
Here is a list of the most common questions and their answers, with examples for each one.
Please classify the following review as positive or negative: the food was good but the service was bad.
Describe the process of photosynthesis in simple words for a child of ten years.
Once upon a time there was a small village near a river, where people lived from fishing and farming.
Can you help me write an email to my manager about the meeting next week?
Sure! Here are some ideas. First, make a plan; second, start early; third, ask for help when you need it.
User: Say hello. Assistant: Hello! How can I help you today?
Résumé, café, naïve: non-ASCII text is text too. 1, 2, 3, 10, 100, 2024, 3.14.""".splitlines()


def corpus() -> list[str]:
    """Text to train the tiny tokenizer on, made here (the tests' tokenizer is the same on every machine): plain
    sentences, and the words and phrasings of the rows the tests make (keyword_rows and the like), so that a row of
    five words fits in 16 tokens."""
    rng = random.Random(0)
    texts = list(SENTENCES)
    for w in WORDS + ["good", "bad"]:
        texts += [f"the {w} is near the {v}." for v in WORDS] + [f"Name a thing like {w}.", f"A {w}.", f"Say {w}"]
    for _ in range(400):
        texts.append(" ".join(rng.sample(WORDS + ["good", "bad"], 5)))
    return texts


def tiny_tokenizer(vocab_size: int = 600):
    """A byte-level BPE tokenizer (any text round-trips) with bos/eos/pad and a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus(), trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>")
    fast.chat_template = CHAT_TEMPLATE
    return fast


def tiny_model_dir(path: Path, kind: str = "llama", tokenizer=None, weights: bool = False, **config) -> Path:
    """Write a config and tokenizer for a tiny model into `path`, and random weights when asked."""
    from transformers import BertConfig, GPT2Config, LlamaConfig

    tokenizer = tokenizer or tiny_tokenizer()
    n = len(tokenizer)
    cfg = {
        "llama": lambda: LlamaConfig(vocab_size=n, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                                     pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                                     eos_token_id=tokenizer.eos_token_id, **config),
        "gpt2": lambda: GPT2Config(vocab_size=n, n_embd=32, n_layer=2, n_head=4, n_positions=512, **config),
        "bert": lambda: BertConfig(vocab_size=n, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, max_position_embeddings=512,
                                   pad_token_id=tokenizer.pad_token_id, **config),
    }[kind]()
    path.mkdir(parents=True, exist_ok=True)
    if weights:
        import torch
        from transformers import AutoModel, AutoModelForCausalLM

        torch.manual_seed(0)
        cls = AutoModel if kind == "bert" else AutoModelForCausalLM
        cls.from_config(cfg).save_pretrained(path)
    cfg.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


WORDS = "apple river stone cloud window green table music paper light north silver garden road".split()


def keyword_rows(n: int, seed: int = 0) -> list[dict]:
    """Learnable: the label is whether 'good' or 'bad' appears among random words."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        label = "pos" if i % 2 else "neg"
        words = rng.sample(WORDS, 4)
        words.insert(rng.randrange(5), "good" if label == "pos" else "bad")
        rows.append({"text": " ".join(words), "label": label})
    return rows


def faults(**args) -> str:
    """Lines under a recipe's `train:` that ask for jobs.faults (slow steps, a pause, a crash, records), e.g.
    faults(step_delay=0.2): what the tests and the chaos bench inject into real jobs, through the recipe."""
    return "  callbacks:\n    - use: jobs.faults:Faults\n      args: " + json.dumps(args) + "\n"
