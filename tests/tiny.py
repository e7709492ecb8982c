"""Tiny randomly-initialised models of every supported architecture, built from configs (no downloads)."""

from __future__ import annotations

import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

from steerstrength.models import Model, wrap

WORDS = (
    "the a an i you we they he she it is was am are be happy sad joy glad angry calm cat dog house "
    "kitchen morning evening friend note table walked saw left on in at of and to my your our today "
    "sun rain smile laugh cry love hate good bad very really so . , ! ? yes no 0 1 A B C D answer"
).split()
SPECIALS = ["<pad>", "<bos>", "<eos>", "<unk>"]
# Float32 results of one computation under two batch shapes, chunkings, thread counts or CPUs: no BLAS promises
# the same bits, only the same value to rounding. Through a tiny model's blocks and a softmax the difference was
# measured at 2.3e-7 relative, 4e-9 absolute; 2e-5 relative (~170 float32 ulps) bounds it with room and is far
# below any change a wrong input makes. Compare across shapes, threads or machines with this, never bit for bit.
FLOAT32 = dict(rtol=2e-5, atol=1e-8)

ARCH_KWARGS = {
    "gpt2": dict(n_layer=3, n_embd=32, n_head=2, n_positions=128),
    "llama": dict(num_hidden_layers=3, hidden_size=32, intermediate_size=64, num_attention_heads=2, num_key_value_heads=1),
    "mistral": dict(num_hidden_layers=3, hidden_size=32, intermediate_size=64, num_attention_heads=2,
                    num_key_value_heads=1, sliding_window=8),
    "qwen2": dict(num_hidden_layers=3, hidden_size=32, intermediate_size=64, num_attention_heads=2, num_key_value_heads=1),
    "qwen3": dict(num_hidden_layers=3, hidden_size=32, intermediate_size=64, num_attention_heads=2,
                  num_key_value_heads=1, head_dim=16),
    "gemma": dict(num_hidden_layers=3, hidden_size=32, intermediate_size=64, num_attention_heads=2,
                  num_key_value_heads=1, head_dim=16),
    "gemma2": dict(num_hidden_layers=3, hidden_size=32, intermediate_size=64, num_attention_heads=2,
                   num_key_value_heads=1, head_dim=16, sliding_window=8),
    "gemma3_text": dict(num_hidden_layers=3, hidden_size=32, intermediate_size=64, num_attention_heads=2,
                        num_key_value_heads=1, head_dim=16, sliding_window=8),
    "gpt_neox": dict(num_hidden_layers=3, hidden_size=32, intermediate_size=64, num_attention_heads=2),
    "phi": dict(num_hidden_layers=3, hidden_size=32, intermediate_size=64, num_attention_heads=2),
}
ARCHITECTURES = tuple(ARCH_KWARGS) + ("gemma3",)  # gemma3: the multimodal layout


def tiny_tokenizer(add_bos: bool = True) -> PreTrainedTokenizerFast:
    """A word-level tokenizer over WORDS; `add_bos` sets its BOS convention."""
    vocab = {tok: i for i, tok in enumerate(SPECIALS + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece(prefix="##")
    if add_bos:
        tok.post_processor = processors.TemplateProcessing(single="<bos> $A", pair="<bos> $A $B", special_tokens=[("<bos>", 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
                                   unk_token="<unk>")
    fast.chat_template = (
        "{% for m in messages %}<bos> {{ m['role'] }} {{ m['content'] }} <eos> {% endfor %}"
        "{% if add_generation_prompt %}<bos> assistant {% endif %}"
    )
    return fast


def tiny_hf(arch: str, seed: int = 0):
    torch.manual_seed(seed)
    vocab = len(SPECIALS) + len(WORDS)
    if arch == "gemma3":
        from transformers import Gemma3Config, Gemma3ForConditionalGeneration

        text = dict(ARCH_KWARGS["gemma3_text"], vocab_size=vocab + 3)
        vision = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                      image_size=28, patch_size=14)
        cfg = Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4,
                           image_token_index=vocab + 2, boi_token_index=vocab, eoi_token_index=vocab + 1)
        hf = Gemma3ForConditionalGeneration(cfg)
    else:
        cfg = transformers.AutoConfig.for_model(arch, vocab_size=vocab, bos_token_id=1, eos_token_id=2,
                                                pad_token_id=0, **ARCH_KWARGS[arch])
        hf = AutoModelForCausalLM.from_config(cfg)
    return hf.float().eval()


def tiny_model(arch: str = "llama", *, add_bos: bool = True, seed: int = 0) -> Model:
    """A steerstrength Model around a tiny random `arch` model."""
    return wrap(tiny_hf(arch, seed), tiny_tokenizer(add_bos), name=f"tiny-{arch}", source="test")


def save_tiny_models(root, archs=(("gpt2", "tiny-gpt2"), ("llama", "tiny-llama"))) -> list:
    """Tiny models saved as model directories (root/<name>), for runs that load models by path."""
    from pathlib import Path

    paths = []
    for arch, name in archs:
        path = Path(root) / name
        model = tiny_model(arch)
        model.hf.save_pretrained(path)
        model.tokenizer.save_pretrained(path)
        paths.append(path)
    return paths
