"""Tiny backbones built locally and saved as ordinary Hugging Face directories (tokenizer, decoder, vision tower).

They stand in for Vicuna and CLIP-L/336 in tests and in the demo: the training and loading code receives their
paths exactly as it would receive real ones.
"""

from __future__ import annotations

import io
import os
from collections.abc import Iterable
from dataclasses import dataclass

import torch

# Enough varied text for a byte-fallback BPE of a few hundred pieces.
_BASE_TEXT = """
A chat between a curious human and an artificial intelligence assistant.
The assistant gives helpful, detailed, and polite answers to the human's questions.
USER: What is in the picture? ASSISTANT: A red square on a blue background.
What colour is the circle? The circle is green. How many triangles are there? There are three triangles.
Where is the star? The star is in the top left corner. Is the shape large or small? It is small.
Describe the image briefly. A yellow circle next to a purple square. Answer the question using a single word.
You are a helpful language and vision assistant. Yes. No. one two three four five six seven eight nine ten
left right top bottom center middle above below next to inside outside big small large tiny
red green blue yellow purple orange black white gray pink brown cyan
square circle triangle star rectangle line dot cross heart diamond
The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs.
system user assistant [INST] [/INST] <<SYS>> <</SYS>> ### Human: Assistant:
"""

SPECIALS = ("<unk>", "<s>", "</s>", "<pad>")


@dataclass
class TinySizes:
    """Dimensions of the tiny backbones: small enough that building and a forward pass take milliseconds."""

    vocab_size: int = 400
    hidden_size: int = 64
    intermediate_size: int = 128
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    max_position_embeddings: int = 2048
    vision_hidden_size: int = 32
    vision_layers: int = 3
    vision_heads: int = 4
    image_size: int = 32
    patch_size: int = 8


def build_tokenizer(out_dir: str, texts: Iterable[str] = (), vocab_size: int = 400):
    """Train a LLaMA-style SentencePiece BPE (byte fallback, BOS/EOS/pad) and save it as `out_dir`."""
    import sentencepiece as spm
    from transformers import LlamaTokenizer

    os.makedirs(out_dir, exist_ok=True)
    lines = [line for line in (_BASE_TEXT + "\n" + "\n".join(texts)).splitlines() if line.strip()]
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_writer=buf,
        model_type="bpe",
        vocab_size=vocab_size,
        byte_fallback=True,
        character_coverage=1.0,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=3,
        hard_vocab_limit=False,
        minloglevel=2,
    )
    # Must be named tokenizer.model: under any other name LlamaTokenizer loads silently empty.
    with open(os.path.join(out_dir, "tokenizer.model"), "wb") as f:
        f.write(buf.getvalue())
    tok = LlamaTokenizer.from_pretrained(out_dir, add_bos_token=True, add_eos_token=False, pad_token="<pad>")
    if len(tok) < 100 or not tok("hello world").input_ids:
        raise RuntimeError(f"The tiny tokenizer in `{out_dir}` did not load correctly (size {len(tok)}).")
    tok.save_pretrained(out_dir)
    return tok


def build_decoder(out_dir: str, tokenizer, family: str = "llama", sizes: TinySizes | None = None, seed: int = 0):
    """A randomly initialised decoder of `family` (llama | mistral | qwen2), saved as an HF model dir."""
    import transformers

    sizes = sizes or TinySizes()
    names = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2"}
    if family not in names:
        raise ValueError(f"Unknown tiny decoder family `{family}`; valid: {', '.join(names)}.")
    config_cls = getattr(transformers, f"{names[family]}Config")
    model_cls = getattr(transformers, f"{names[family]}ForCausalLM")
    config = config_cls(
        vocab_size=len(tokenizer),
        hidden_size=sizes.hidden_size,
        intermediate_size=sizes.intermediate_size,
        num_hidden_layers=sizes.num_hidden_layers,
        num_attention_heads=sizes.num_attention_heads,
        num_key_value_heads=sizes.num_key_value_heads,
        max_position_embeddings=sizes.max_position_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = model_cls(config)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return model


def build_vision_tower(out_dir: str, sizes: TinySizes | None = None, seed: int = 0, position_std: float | None = None):
    """A randomly initialised CLIP vision encoder and its image processor, saved as an HF dir.

    `position_std` draws the patch position embeddings at that scale instead of CLIP's initial 0.02 (which the
    patch embeddings drown out): at about the patch embeddings' scale (1.0), every patch feature says where in the
    image it is, as a trained CLIP's do. None keeps CLIP's own initialisation.
    """
    from transformers import CLIPImageProcessorPil, CLIPVisionConfig, CLIPVisionModel

    sizes = sizes or TinySizes()
    config = CLIPVisionConfig(
        hidden_size=sizes.vision_hidden_size,
        intermediate_size=sizes.vision_hidden_size * 2,
        num_hidden_layers=sizes.vision_layers,
        num_attention_heads=sizes.vision_heads,
        image_size=sizes.image_size,
        patch_size=sizes.patch_size,
        projection_dim=sizes.vision_hidden_size,
    )
    torch.manual_seed(seed)
    model = CLIPVisionModel(config)
    if position_std is not None:
        with torch.no_grad():
            _vision_embeddings(model).position_embedding.weight.normal_(0.0, position_std)
    model.save_pretrained(out_dir)
    side = sizes.image_size
    CLIPImageProcessorPil(size={"shortest_edge": side}, crop_size={"height": side, "width": side}).save_pretrained(
        out_dir
    )
    return model


def _vision_embeddings(model):
    """The `CLIPVisionEmbeddings` module of a CLIP model (its nesting differs between transformers versions)."""
    for module in model.modules():
        if type(module).__name__ == "CLIPVisionEmbeddings":
            return module
    raise ValueError(f"No CLIPVisionEmbeddings module in {type(model).__name__}.")
