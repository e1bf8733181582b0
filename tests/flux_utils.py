"""Shared helpers for FLUX transformer tests: tiny diffusers models and inputs."""
import numpy as np

from refs import fill_unique, require


def make_diffusers_flux(heads=4, head_dim=16, layers=2, single_layers=2,
                        in_channels=16, context=24, pooled=32,
                        axes=(4, 6, 6), guidance=False, seed=0):
  torch = require('torch')
  diffusers = require('diffusers')
  torch.manual_seed(seed)
  model = diffusers.FluxTransformer2DModel(
      patch_size=1, in_channels=in_channels, num_layers=layers,
      num_single_layers=single_layers, attention_head_dim=head_dim,
      num_attention_heads=heads, joint_attention_dim=context,
      pooled_projection_dim=pooled, guidance_embeds=guidance,
      axes_dims_rope=axes).eval()
  # Unique values in every tensor, norms included (a swap must show).
  return fill_unique(model, seed)


def image_ids(h, w, batch):
  """[B, h*w, 3] ids (0, row, col) in row-major order."""
  ids = np.zeros((h, w, 3), np.float32)
  ids[..., 1] = np.arange(h)[:, None]
  ids[..., 2] = np.arange(w)[None, :]
  return np.broadcast_to(ids.reshape(1, h * w, 3), (batch, h * w, 3)).copy()


def random_inputs(cfg, batch, h, w, txt_len, seed=0):
  """Random model inputs (numpy) for an h x w token grid."""
  rng = np.random.default_rng(seed)
  out = dict(
      img=rng.standard_normal((batch, h * w, cfg.in_channels), np.float32),
      img_ids=image_ids(h, w, batch),
      txt=rng.standard_normal((batch, txt_len, cfg.context_in_dim), np.float32),
      txt_ids=np.zeros((batch, txt_len, 3), np.float32),
      timesteps=rng.uniform(0.1, 0.9, (batch,)).astype(np.float32),
      y=rng.standard_normal((batch, cfg.vec_in_dim), np.float32))
  if cfg.guidance_embed:
    out['guidance'] = rng.uniform(1, 5, (batch,)).astype(np.float32)
  return out


def run_diffusers(model, inputs, dtype=None):
  """diffusers' forward on our inputs -> float32 numpy; with a torch
  `dtype`, model (converted in place: call it last) and inputs in it."""
  torch = require('torch')
  if dtype is not None:
    model = model.to(dtype)
  cast = (lambda x: x) if dtype is None else (lambda x: x.to(dtype))
  t = lambda k: cast(torch.from_numpy(np.asarray(inputs[k])))
  with torch.no_grad():
    out = model(hidden_states=t('img'), encoder_hidden_states=t('txt'),
                pooled_projections=t('y'), timestep=t('timesteps'),
                img_ids=t('img_ids')[0], txt_ids=t('txt_ids')[0],
                guidance=t('guidance') if 'guidance' in inputs else None,
                return_dict=False)[0]
  return out.float().numpy()
