"""Distil a tiny random teacher T5 into a 1-layer student (CPU smoke run).

  python experiments/distill_text_encoder.py \
      --config=experiments/configs/distill_text_encoder_tiny.py \
      --workdir=/tmp/distill_te_tiny
With a pipeline folder (nanoflux `FluxPipeline.save` or diffusers FLUX):
      --config.pipeline=/path/to/FLUX.1-schnell
`:runlocal` runs a few steps; `:ablation` drops the feature term
(lambda_vis=0, the embedding-MSE-only baseline; vis is still logged).
"""
from nanoflux_jax.config_arg import parse_arg
from nanoflux_jax.distill import t5_distill as text_encoder
def get_config(arg: str = ''):
  a = parse_arg(arg, runlocal=False, ablation=False)
  c = text_encoder.default_config()
  c.num_steps = 200
  c.compute_dtype = 'float32'
  c.student.num_layers = 1          # Half the tiny teacher's 2 layers ...
  c.student.d_model = 16            # ... and half its width (random init).
  c.learning_rate = 3e-3
  c.loss.vis_blocks = (0, 1)        # Both double blocks of the tiny FLUX.
  c.data.txt_len = 8
  c.data.grid = (2, 4)
  c.num_sampling_steps = 2
  c.log_every = 20
  c.checkpoint_every = 100
  if a.runlocal:
    c.num_steps = 4
    c.log_every = 1
    c.checkpoint_every = 2
    c.async_checkpoint = False
  if a.ablation:
    c.loss.lambda_vis = 0.0
  return c
