"""A tiny random transformers CLIPModel folder, built offline for tests.

`make_tiny_clip_model(path)` writes what a local save of
openai/clip-vit-large-patch14 holds, at toy size: config.json and
model.safetensors of a `transformers.CLIPModel` (text: the tiny FLUX CLIP
text sizes; vision: ViT with 28 px images and 7 px patches), the tiny CLIP
tokenizer (tiny_tokenizers.make_clip_tokenizer) and a
preprocessor_config.json whose resize / crop match the vision tower.
"""
from __future__ import annotations

import pathlib
import shutil

from nanoflux_jax.testing import tiny_flux
from nanoflux_jax.testing import tiny_tokenizers

TEXT = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2,
            num_attention_heads=4)
VISION = dict(hidden_size=24, intermediate_size=40, num_hidden_layers=2,
              num_attention_heads=2, image_size=28, patch_size=7)
PROJECTION_DIM = 16


def make_tiny_clip_model(path, *, seed: int = 0, image_size: int = 28):
  """Builds, saves to `path` (replaced if it exists) and returns a tiny
  random `transformers.CLIPModel` (fp32, eval mode) with its tokenizer and
  image processor config.

  Norm scales, biases and the logit scale are perturbed away from their
  constant initial values, so a converter that swaps two of them fails.
  """
  # Deferred: torch and transformers are optional (the 'dev' extra), heavy.
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  path = pathlib.Path(path)
  if path.exists():
    shutil.rmtree(path)
  path.mkdir(parents=True)
  tokenizer = tiny_tokenizers.make_clip_tokenizer(path)
  torch.manual_seed(seed)
  config = transformers.CLIPConfig(
      text_config=dict(
          TEXT, vocab_size=len(tokenizer),
          max_position_embeddings=tiny_tokenizers.CLIP_MAX_LENGTH,
          # As CLIP-L's config: eos 2 selects argmax(input_ids) pooling, and
          # the tiny tokenizer's EOS has the largest id.
          bos_token_id=0, pad_token_id=1, eos_token_id=2),
      vision_config=dict(VISION, image_size=image_size),
      projection_dim=PROJECTION_DIM)
  model = transformers.CLIPModel(config).eval()
  # pylint: disable-next=protected-access
  tiny_flux._perturb_constant_tensors(model, seed + 7)
  model.save_pretrained(path, safe_serialization=True)
  # Without torchvision transformers builds its PIL backend; either backend
  # writes the same preprocessor_config.json.
  processor = transformers.CLIPImageProcessor(
      size={'shortest_edge': image_size},
      crop_size={'height': image_size, 'width': image_size})
  processor.save_pretrained(path)
  return model
