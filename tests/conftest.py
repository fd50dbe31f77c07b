"""Tiny backbones and tiny LLaVA checkpoints of every kind, built locally once per test session."""

from __future__ import annotations

import os
import types

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

from llava.demo import backbones  # noqa: E402


def vision_args(tower_dir: str, **overrides) -> types.SimpleNamespace:
    """The model arguments `initialize_vision_modules` reads, with LLaVA-1.5 defaults."""
    args = dict(
        vision_tower=tower_dir,
        mm_vision_select_layer=-2,
        mm_vision_select_feature="patch",
        mm_patch_merge_type="flat",
        mm_projector_type="mlp2x_gelu",
        pretrain_mm_mlp_adapter=None,
        mm_use_im_start_end=False,
        mm_use_im_patch_token=False,
    )
    args.update(overrides)
    return types.SimpleNamespace(**args)


class Tiny:
    """Paths of the tiny backbones plus builders for tiny LLaVA models and checkpoints."""

    def __init__(self, root: str):
        self.root = root
        self.tokenizer_dir = os.path.join(root, "tokenizer")
        self.tokenizer = backbones.build_tokenizer(self.tokenizer_dir)
        self.clip_dir = os.path.join(root, "clip")
        backbones.build_vision_tower(self.clip_dir)
        self.decoder_dirs = {}
        for family in ("llama", "mistral", "qwen2"):
            d = os.path.join(root, family)
            backbones.build_decoder(d, self.tokenizer, family=family)
            self.decoder_dirs[family] = d
        self._count = 0

    def new_dir(self, name: str) -> str:
        self._count += 1
        d = os.path.join(self.root, f"{name}-{self._count}")
        os.makedirs(d, exist_ok=True)
        return d

    def model(self, family: str = "llama", seed: int = 0, image_aspect_ratio: str = "square", **overrides):
        """A tiny LLaVA model on `family` with a randomly initialised (seeded) projector."""
        from llava.model.assemble import PromptSpec, build_llava, specs_from_args

        args = vision_args(self.clip_dir, **overrides)
        vision, projector, _ = specs_from_args(args)
        prompt = PromptSpec(
            image_aspect_ratio=image_aspect_ratio,
            image_grid_pinpoints=overrides.get("image_grid_pinpoints"),
            mm_use_im_start_end=args.mm_use_im_start_end,
            mm_use_im_patch_token=args.mm_use_im_patch_token,
        )
        model = build_llava(self.decoder_dirs[family], vision, projector, prompt, seed=seed)
        model.eval()
        return model

    def save_full(self, model, name: str = "full") -> str:
        d = self.new_dir(name)
        model.save_pretrained(d)
        self.tokenizer.save_pretrained(d)
        return d


@pytest.fixture(scope="session")
def tiny(tmp_path_factory) -> Tiny:
    return Tiny(str(tmp_path_factory.mktemp("tiny")))


@pytest.fixture(scope="session")
def image_processor(tiny):
    from transformers import CLIPImageProcessorPil

    return CLIPImageProcessorPil.from_pretrained(tiny.clip_dir)


@pytest.fixture(params=[1, 2], ids=lambda n: f"threads{n}")
def threads(request) -> int:
    """Run the test with 1, then 2 intra-op threads; the previous setting is restored after."""
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)
