"""The token down/up-sampler against a PyTorch reference written from its
definition (models/downsample.py's docstring), with random params (no
identity-making zero convs) on a non-square grid, so a transposed grid, a
wrong cell order or a swapped skip/update shows."""
import jax
import jax.numpy as jnp
import numpy as np

import nanoflux_jax as nf
from nanoflux_jax.models import downsample

from refs import max_rel_err, require

TOL = 1e-5  # fp32; observed ~1e-7.
GRID = (4, 6)  # h != w; coarse 2 x 3.


def _random_params(cfg):
  shapes = jax.eval_shape(lambda: downsample.init_params(cfg, jax.random.key(0)))
  rng = np.random.default_rng(0)

  def leaf(path, s):
    name = jax.tree_util.keystr(path)
    x = rng.standard_normal(s.shape).astype(np.float32)
    if name.endswith("['scale']"):
      return 1.0 + 0.3 * x
    if name.endswith("['bias']"):
      return 0.1 * x
    fan_in = int(np.prod(s.shape[:-1]))
    return x / np.sqrt(fan_in)
  return jax.tree_util.tree_map_with_path(leaf, shapes)


def _torch_resblock(torch, p, x, groups):
  """x [B, D, h, w] + conv2(silu(gn2(conv1(silu(gn1(x))))))."""
  fn = torch.nn.functional
  t = lambda a: torch.from_numpy(np.asarray(a, np.float32))
  conv = lambda c, h: fn.conv2d(h, t(c['kernel']).permute(3, 2, 0, 1),
                                t(c['bias']), padding=1)
  gn = lambda n, h: fn.group_norm(h, groups, t(n['scale']), t(n['bias']),
                                  eps=1e-6)
  h = conv(p['conv1'], fn.silu(gn(p['norm1'], x)))
  h = conv(p['conv2'], fn.silu(gn(p['norm2'], h)))
  return x + h


def _reference(cfg, p, img, coarse_out):
  torch = require('torch')
  f = cfg.downsample_factor
  h, w = GRID
  hc, wc = h // f, w // f
  d = img.shape[-1]
  groups = downsample.num_groups(d, downsample.channels(cfg))
  t = lambda a: torch.from_numpy(np.asarray(a, np.float32))
  grid = img.reshape(img.shape[0], h, w, d)  # Row-major tokens.
  # Cell (r, c) gathers tokens (f r + dy, f c + dx), ordered (dy, dx, channel).
  cells = np.zeros((img.shape[0], hc, wc, f * f * d), np.float32)
  for r in range(hc):
    for c in range(wc):
      cells[:, r, c] = np.concatenate(
          [grid[:, f * r + dy, f * c + dx] for dy in range(f)
           for dx in range(f)], -1)
  x = t(cells) @ t(p['down_proj']['kernel']) + t(p['down_proj']['bias'])
  x = _torch_resblock(torch, p['down_res'], x.permute(0, 3, 1, 2), groups)
  coarse = x.permute(0, 2, 3, 1).reshape(img.shape[0], hc * wc, d)
  # Up: the update the coarse blocks made, a ResNet block, nearest copies.
  delta = (t(coarse_out) - coarse).reshape(img.shape[0], hc, wc, d)
  delta = _torch_resblock(torch, p['up_res'], delta.permute(0, 3, 1, 2),
                          groups).permute(0, 2, 3, 1)
  up = delta.repeat_interleave(f, 1).repeat_interleave(f, 2).reshape(
      img.shape[0], h * w, d)
  merged = torch.cat([t(img), up], -1) @ t(p['merge']['kernel']) + t(
      p['merge']['bias'])
  return coarse.numpy(), merged.numpy()


def test_down_and_up_match_torch_reference():
  cfg = nf.FluxConfig.tiny(downsample_start=1, downsample_end=2,
                           attention_impl='xla')
  p = _random_params(cfg)
  rng = np.random.default_rng(1)
  n = GRID[0] * GRID[1]
  img = rng.standard_normal((2, n, cfg.hidden_size)).astype(np.float32)
  f = cfg.downsample_factor
  coarse_out = rng.standard_normal(
      (2, n // (f * f), cfg.hidden_size)).astype(np.float32)
  module = downsample.TokenDownsampler(cfg)
  coarse = module.apply({'params': p}, jnp.asarray(img), GRID,
                        method=module.down)
  want_coarse, want_out = _reference(cfg, p, img, coarse_out)
  assert max_rel_err(coarse, want_coarse) < TOL
  out = module.apply({'params': p}, jnp.asarray(coarse_out), coarse,
                     jnp.asarray(img), GRID, method=module.up)
  assert out.shape == img.shape
  assert max_rel_err(out, want_out) < TOL
