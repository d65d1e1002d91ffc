"""A tiny, randomly initialised instruct model for the local enhancer, built on this machine.

The same classes as Qwen2.5's instruct models (Qwen2ForCausalLM, Qwen2Tokenizer with a ChatML chat template), saved
as a normal Hugging Face folder, so it loads through exactly the code path a Hub model uses, in well under a second on
a CPU. Used by the tests and the benchmark (prompts.enhancer_repo = "tiny"); it writes random words, not prompts.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import Qwen2Config, Qwen2ForCausalLM, Qwen2Tokenizer

from engine.storage.files import build_folder_aside

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
# What the tokenizer's merges are learnt from: the words of its random text.
CORPUS = (
    "a the cat dog fox walks runs jumps slowly quickly through across forest city street river under golden soft "
    "light camera pans tracks close wide shot cinematic style red blue green white night morning rain snow wind "
    "glowing fur coat grass sky clouds water reflections smooth gentle steady motion detailed realistic warm cold"
)
VOCAB_SIZE = 400
# ChatML, as Qwen's instruct models write it: the enhancer's system and user turns, then the assistant's to come.
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")


def build_tiny_tokenizer() -> Qwen2Tokenizer:
    """Qwen's byte-level BPE in miniature: every byte, plus merges learnt here from a few words of video prompts, so
    any text encodes and the model's output decodes to words. Nothing is downloaded."""
    learner = Tokenizer(models.BPE())
    learner.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    learner.train_from_iterator([CORPUS], trainer)
    learnt = json.loads(learner.to_str())["model"]
    tokenizer = Qwen2Tokenizer(
        vocab=learnt["vocab"],
        merges=[tuple(pair) for pair in learnt["merges"]],
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token=None,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def build_tiny_model(vocab_size: int, seed: int = 0) -> Qwen2ForCausalLM:
    """A two-layer Qwen2 with a hidden size of 32 and weights drawn from `seed`."""
    torch.manual_seed(seed)
    config = Qwen2Config(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        tie_word_embeddings=True,
        # Drawn with the usual 0.02, the logits are nearly flat and greedy decoding repeats one token for ever; a
        # wider draw writes varied words, which is closer to what the code downstream sees from a real model.
        initializer_range=1.0,
        bos_token_id=SPECIALS.index("<|endoftext|>"),
        eos_token_id=SPECIALS.index("<|im_end|>"),
        pad_token_id=SPECIALS.index("<|endoftext|>"),
    )
    return Qwen2ForCausalLM(config).eval()


def make_tiny_enhancer(target: Path, seed: int = 0) -> Path:
    """The tiny model's folder at `target`, built aside and renamed into place unless it is there already."""

    def build(staging: Path) -> None:
        tokenizer = build_tiny_tokenizer()
        tokenizer.save_pretrained(staging)
        model = build_tiny_model(len(tokenizer), seed)
        # Its random draws stay printable: a lone byte of a character split across tokens, or a control character,
        # is never chosen.
        model.generation_config.suppress_tokens = [
            index for index in tokenizer.get_vocab().values() if not _printable(tokenizer.decode([index]))
        ]
        model.save_pretrained(staging)

    return build_folder_aside(target, FILES, build)


def _printable(text: str) -> bool:
    return text.isprintable() and "\ufffd" not in text  # U+FFFD: what a lone byte of a longer character decodes to
