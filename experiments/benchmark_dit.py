r"""Forward-pass benchmark of nanoflux_jax's FLUX DiT against diffusers.

CPU (default, --size=benchmark): FluxConfig.benchmark() (hidden 768, 12
heads x 64, 4 double + 8 single blocks), batch 1, a 32x32 image-token grid +
128 text tokens, fp32. --size=shapes_teacher: the shapes teacher's config
(data.shapes.teacher_path(); hidden 128, 4 heads x 32, 2 double + 4 single
blocks) at batch 8, 8x8 image + 24 text tokens (88 a sequence), fp32.
The same random weights go into diffusers' FluxTransformer2DModel (torch,
no_grad, eval) and, through a diffusers `save_pretrained` folder and
`load_flux_transformer`, into ours (jax.jit). Prints the parity error, a
timing table (ms after warm-up, runs interleaved so machine load hits
both alike; min and median of the samples), our achieved GFLOP/s next to
two matmul references (experiments/matmul_reference.py): (1) a plain jnp
matmul of the model's widest shape ([tokens, hidden] x [hidden, mlp]), the
large-GEMM rate, and (2) the forward's own GEMMs back to back in one jit,
the practical limit at this size; a per-part breakdown; and as the last line
one JSON object: speed_ratio (diffusers ms / ours ms), matmul_fraction (our
GFLOP/s / reference 1's) and matmul_fraction_same_gemms (/ reference 2's)
from the median times; the same from the minimum times (*_min) and from
process CPU time per call (*_cpu_time). On a shared machine the median pays
a typical wait, the minimum favours short calls and CPU time counts no
waiting; on an idle one they agree.

  python experiments/benchmark_dit.py [--size=shapes_teacher]
      [--grid=32 --txt_len=128 --batch=1 --repeats=7]

GPU (--schnell_gpu): FLUX.1-schnell-size model with random bf16 weights,
1024x1024 image (4096 tokens) + 512 text tokens, ours (cudnn/xla attention)
vs diffusers on CUDA, the same weights copied tensor by tensor on device.
"""
import os

os.environ.setdefault('XLA_PYTHON_CLIENT_PREALLOCATE', 'false')  # Share GPU.

import json
import statistics
import tempfile
import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

import nanoflux_jax as nf
from nanoflux_jax import compress
from nanoflux_jax.convert import flux as convert_flux
from nanoflux_jax.models import flux, layers

import matmul_reference  # experiments/matmul_reference.py, beside this binary.
from matmul_reference import time_interleaved

_SIZE = flags.DEFINE_enum('size', 'benchmark', ['benchmark', 'shapes_teacher'],
                          'Model config and default token counts / batch.')
_GRID = flags.DEFINE_integer('grid', None, 'Image token grid side (tokens = '
                             'grid^2); default 32 (benchmark), 8 (shapes).')
_TXT_LEN = flags.DEFINE_integer('txt_len', None, 'Text tokens; default 128 '
                                '(benchmark), 24 (shapes_teacher).')
_BATCH = flags.DEFINE_integer('batch', None, 'Batch; default 1 (benchmark), '
                              '8 (shapes_teacher).')
_REPEATS = flags.DEFINE_integer('repeats', 7, 'Timed runs per measurement.')
_WARMUP = flags.DEFINE_integer('warmup', 2, 'Untimed runs before timing.')
_TORCH_THREADS = flags.DEFINE_integer('torch_threads', 2, 'torch.set_num_threads.')
_ATTENTION = flags.DEFINE_string('attention_impl', 'auto', 'Our attention impl.')
_PARTS = flags.DEFINE_bool('parts', True, 'Also time blocks / attention / matmuls.')
_TOL = flags.DEFINE_float('tol', 1e-4, 'Max relative error allowed vs diffusers.')
_SCHNELL_GPU = flags.DEFINE_bool('schnell_gpu', False, 'Schnell-size bf16 run on CUDA.')
_GPU_ATTENTION = flags.DEFINE_string('gpu_attention', 'cudnn', "'cudnn' or 'xla'.")
_GPU_SMOKE = flags.DEFINE_bool('gpu_smoke', False, 'The --schnell_gpu path '
                                'with a tiny model on the default devices.')


# ----------------------------------------------------------------------------
# Helpers (the timer is matmul_reference.time_interleaved).
# ----------------------------------------------------------------------------
def _jax_call(f, *args):
  return lambda: jax.block_until_ready(f(*args))


def _max_rel_err(ours, ref) -> float:
  ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
  return float(np.abs(ours - ref).max() / (np.abs(ref).max() + 1e-30))


# ----------------------------------------------------------------------------
# CPU benchmark.
# ----------------------------------------------------------------------------
def _diffusers_model(cfg, torch, diffusers, seed=0):
  torch.manual_seed(seed)
  model = diffusers.FluxTransformer2DModel(
      patch_size=1, in_channels=cfg.in_channels, num_layers=cfg.depth,
      num_single_layers=cfg.depth_single_blocks,
      attention_head_dim=cfg.head_dim, num_attention_heads=cfg.num_heads,
      joint_attention_dim=cfg.context_in_dim,
      pooled_projection_dim=cfg.vec_in_dim, guidance_embeds=cfg.guidance_embed,
      axes_dims_rope=cfg.axes_dim).eval()
  with torch.no_grad():  # Zero-initialised tensors would hide layout bugs.
    for p in model.parameters():
      if not p.any():
        p.normal_(0, 0.05)
  return model


def _inputs(cfg, grid, txt_len, seed=0, batch=1):
  rng = np.random.default_rng(seed)
  ids = np.zeros((grid, grid, 3), np.float32)
  ids[..., 1], ids[..., 2] = np.arange(grid)[:, None], np.arange(grid)[None]
  return dict(
      img=rng.standard_normal((batch, grid * grid, cfg.in_channels),
                              np.float32),
      img_ids=np.tile(ids.reshape(1, grid * grid, 3), (batch, 1, 1)),
      txt=rng.standard_normal((batch, txt_len, cfg.context_in_dim),
                              np.float32),
      txt_ids=np.zeros((batch, txt_len, 3), np.float32),
      timesteps=(np.linspace(0.3, 0.9, batch) if batch > 1 else
                 np.array([0.7])).astype(np.float32),
      y=rng.standard_normal((batch, cfg.vec_in_dim), np.float32))


def _size():
  """(config, grid, txt_len, batch) of --size, flags overriding."""
  if _SIZE.value == 'shapes_teacher':
    from nanoflux_jax.shapes import world as shapes  # pylint: disable=g-import-not-at-top
    file = os.path.join(shapes.teacher_path(), 'transformer',
                        'nanoflux_config.json')
    with open(file) as f:
      cfg = nf.FluxConfig(**{k: tuple(v) if isinstance(v, list) else v
                             for k, v in json.load(f)['config'].items()})
    defaults = (8, 24, 8)
  else:
    cfg, defaults = nf.FluxConfig.benchmark(), (32, 128, 1)
  grid, txt_len, batch = (d if f.value is None else f.value for f, d in zip(
      (_GRID, _TXT_LEN, _BATCH), defaults))
  return cfg, grid, txt_len, batch


def _torch_forward(model, inp, torch):
  t = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in inp.items()}
  def run():
    with torch.no_grad():
      return model(hidden_states=t['img'], encoder_hidden_states=t['txt'],
                   pooled_projections=t['y'], timestep=t['timesteps'],
                   img_ids=t['img_ids'][0], txt_ids=t['txt_ids'][0],
                   return_dict=False)[0]
  return run


def _no_attention(q, k, v, impl='auto'):
  del q, k, impl
  return v


def _parts(cfg, params, ref, grid, txt_len, torch, repeats, warmup):
  """Times one double block, one single block (with and without attention),
  attention alone and the blocks' matmuls alone, ours and torch's."""
  li, lt, d = grid * grid, txt_len, cfg.hidden_size
  n, h, hd = li + lt, cfg.num_heads, cfg.head_dim
  rng = np.random.default_rng(1)
  rnd = lambda *s: rng.standard_normal(s, np.float32)
  img, txt, vec = rnd(1, li, d), rnd(1, lt, d), rnd(1, d)
  inp = _inputs(cfg, grid, txt_len)
  ids = np.concatenate([inp['txt_ids'], inp['img_ids']], 1)
  pe = layers.rope(jnp.asarray(ids), cfg.axes_dim, cfg.theta)
  dbl, sgl = flux.DoubleStreamBlock(cfg, 0), flux.SingleStreamBlock(cfg, 0)
  p_dbl, p_sgl = params['double_blocks_0'], params['single_blocks_0']
  orig = layers.attention

  def jit_block(attn_fn, apply):
    def f(*a):
      layers.attention = attn_fn  # Read by flux.py while tracing.
      try:
        return apply(*a)
      finally:
        layers.attention = orig
    return jax.jit(f)

  dbl_apply = lambda p, i, t, c: dbl.apply({'params': p}, i, t, c, pe)
  sgl_apply = lambda p, x, c: sgl.apply({'params': p}, x, c, pe)
  x = np.concatenate([txt, img], 1)
  ji, jt, jv, jx = (jnp.asarray(a) for a in (img, txt, vec, x))
  fns = {
      'double block': _jax_call(jit_block(orig, dbl_apply), p_dbl, ji, jt, jv),
      'double block, no attention': _jax_call(
          jit_block(_no_attention, dbl_apply), p_dbl, ji, jt, jv),
      'single block': _jax_call(jit_block(orig, sgl_apply), p_sgl, jx, jv),
      'single block, no attention': _jax_call(
          jit_block(_no_attention, sgl_apply), p_sgl, jx, jv)}
  q, k, v = (jnp.asarray(rnd(1, n, h, hd)) for _ in range(3))
  attn = {
      f'attention {_ATTENTION.value}': lambda *a: layers.attention(
          *a, impl=_ATTENTION.value),
      'attention per_head, 1 chain, unchunked': lambda *a: (
          layers._attention_per_head(*a, q_chunk=n, groups=1)),  # pylint: disable=protected-access
      'attention xla': lambda *a: layers.attention(*a, impl='xla')}
  for name, f in attn.items():
    fns[name] = _jax_call(jax.jit(f), q, k, v)
  # The matmuls of one block alone (same shapes, random weights).
  m = int(d * cfg.mlp_ratio)
  w = {s: jnp.asarray(rnd(*s) * 0.02) for s in
       ((d, 3 * d), (d, d), (d, m), (m, d))}
  def dbl_mm(a, b):
    out = []
    for t in (a, b):
      out += [t @ w[(d, 3 * d)], t @ w[(d, d)], (t @ w[(d, m)]) @ w[(m, d)]]
    return out
  def sgl_mm(a):
    return [a @ w[(d, 3 * d)], a @ w[(d, d)], (a @ w[(d, m)]) @ w[(m, d)]]
  fns['double block matmuls'] = _jax_call(jax.jit(dbl_mm), ji[0], jt[0])
  fns['single block matmuls'] = _jax_call(jax.jit(sgl_mm), jx[0])

  # torch counterparts.
  tt = lambda a: torch.from_numpy(np.ascontiguousarray(a))
  with torch.no_grad():
    temb = ref.time_text_embed(torch.tensor([700.]), tt(inp['y']))
    rot = ref.pos_embed(tt(ids[0]))
  tw = {s: tt(np.asarray(a)) for s, a in w.items()}
  tq, tk, tv = (tt(np.asarray(a)).transpose(1, 2).contiguous() for a in (q, k, v))
  def no_grad(f):
    def g():
      with torch.no_grad():
        return f()
    return g
  tfns = {
      'double block': no_grad(lambda: ref.transformer_blocks[0](
          tt(img), tt(txt), temb, rot)),
      'single block': no_grad(lambda: ref.single_transformer_blocks[0](
          tt(img), tt(txt), temb, rot)),
      f'attention {_ATTENTION.value}': no_grad(
          lambda: torch.nn.functional.scaled_dot_product_attention(tq, tk, tv)),
      'double block matmuls': no_grad(lambda: [
          f(tt(a)) for a in (img[0], txt[0]) for f in (
              lambda t: t @ tw[(d, 3 * d)], lambda t: t @ tw[(d, d)],
              lambda t: (t @ tw[(d, m)]) @ tw[(m, d)])]),
      'single block matmuls': no_grad(lambda: [
          f(tt(x[0])) for f in (
              lambda t: t @ tw[(d, 3 * d)], lambda t: t @ tw[(d, d)],
              lambda t: (t @ tw[(d, m)]) @ tw[(m, d)])])}
  both = dict(fns)
  both.update({f'torch:{k}': f for k, f in tfns.items()})
  return time_interleaved(both, repeats, warmup, inner={
      k: 3 for k in both if 'attention' in k or 'matmuls' in k})


def run_cpu():
  import torch  # pylint: disable=g-import-not-at-top
  import diffusers  # pylint: disable=g-import-not-at-top
  torch.set_num_threads(_TORCH_THREADS.value)
  cfg0, grid, txt_len, batch = _size()
  ref = _diffusers_model(cfg0, torch, diffusers)
  with tempfile.TemporaryDirectory() as tmp:
    ref.save_pretrained(os.path.join(tmp, 'transformer'))
    cfg, params = convert_flux.load_flux_transformer(
        os.path.join(tmp, 'transformer'), attention_impl=_ATTENTION.value)
  inp = _inputs(cfg, grid, txt_len, batch=batch)
  fwd = jax.jit(lambda p, x: flux.Flux(cfg).apply({'params': p},
                                                  **x).velocity)
  x = {k: jnp.asarray(v) for k, v in inp.items()}
  ours_fn = _jax_call(fwd, params, x)
  ref_fn = _torch_forward(ref, inp, torch)
  err = _max_rel_err(ours_fn(), ref_fn().numpy())

  # Reference 1 (matmul_fraction): the model's widest matmul, [tokens,
  # hidden] x [hidden, mlp], repeated: the large-GEMM rate.
  mk = batch * (grid * grid + txt_len)
  mn, mm = cfg.hidden_size, int(cfg.hidden_size * cfg.mlp_ratio)
  a = jnp.asarray(np.random.default_rng(0).standard_normal((mk, mn), np.float32))
  b = jnp.asarray(np.random.default_rng(1).standard_normal((mn, mm), np.float32))
  ta, tb = torch.from_numpy(np.array(a)), torch.from_numpy(np.array(b))
  mm_flops = 2 * mk * mn * mm
  flops = compress.count_flops(cfg, grid * grid, txt_len, batch)
  # Reference 2 (matmul_fraction_same_gemms): the forward's own GEMMs, back
  # to back in one jit: the practical matmul limit at this size.
  gemms = matmul_reference.forward_gemms(cfg, grid * grid, txt_len, batch)
  if matmul_reference.gemm_flops(gemms) != flops:
    raise SystemExit(f'matmul_reference: {matmul_reference.gemm_flops(gemms)} FLOPs != {flops}')
  same = _jax_call(*matmul_reference.reference_fn(gemms))
  # Short calls repeat inside a round so each name gets a similar time.
  cpu = {}
  samples = time_interleaved({
      'ours': ours_fn, 'diffusers': ref_fn, 'same GEMMs': same,
      'jnp matmul': _jax_call(jax.jit(jnp.matmul), a, b),
      'torch matmul': lambda: ta @ tb}, _REPEATS.value, _WARMUP.value,
      inner={k: max(1, min(50, int(flops / mm_flops)))
             for k in ('jnp matmul', 'torch matmul')}, stat=None, cpu=cpu)
  t = {k: min(v) for k, v in samples.items()}
  med = {k: statistics.median(v) for k, v in samples.items()}
  load = os.getloadavg()

  print(f'\nFLUX DiT forward ({_SIZE.value}), {cfg.depth} double + '
        f'{cfg.depth_single_blocks} single blocks, hidden {cfg.hidden_size} '
        f'({cfg.num_heads}x{cfg.head_dim}), batch {batch}, {grid * grid} '
        f'image + {txt_len} text tokens, fp32; jax {jax.__version__} '
        f'({jax.default_backend()}), torch {torch.__version__} threads '
        f'{torch.get_num_threads()}, attention_impl={cfg.attention_impl} '
        f'(-> {layers.resolve_impl(cfg.attention_impl, scores=layers.score_bytes((batch, grid * grid + txt_len, cfg.num_heads)))}), '
        f'{os.cpu_count()} CPUs, load avg {load[0]:.2f}')
  print(f'max rel err ours vs diffusers: {err:.2e} (tol {_TOL.value:g})')
  print(f'forward FLOPs (matmuls incl. QK^T, PV): {flops / 1e9:.2f} GFLOP; '
        f'{len(samples["ours"])} samples each')
  mm_name = f'{mk}x{mn}x{mm}'
  print(f'references: (1) large GEMM = jnp / torch matmul {mm_name}, the '
        'widest shape, repeated -> matmul_fraction; (2) same GEMMs = the '
        f'forward\'s own {sum(g.count for g in gemms)} GEMMs ({len(gemms)} '
        'shapes; top: ' + matmul_reference.describe(gemms, 3) +
        '), back to back in one jit -> matmul_fraction_same_gemms')
  print(f'{"":34s}{"min ms":>10s}{"GFLOP/s":>10s}{"median ms":>11s}'
        f'{"GFLOP/s":>10s}')
  for k, f in (('ours', flops), ('diffusers', flops),
               ('jnp matmul', mm_flops), ('torch matmul', mm_flops),
               ('same GEMMs', flops)):
    name = (f'(1) {k} {mm_name}' if 'matmul' in k else
            '(2) same GEMMs, jit' if k == 'same GEMMs' else k)
    print(f'{name:34s}{t[k] * 1e3:10.2f}{f / t[k] / 1e9:10.1f}'
          f'{med[k] * 1e3:11.2f}{f / med[k] / 1e9:10.1f}')
  frac, frac_stats = {}, {'min': t, 'median': med, 'cpu': cpu}
  for r, rf in (('jnp matmul', mm_flops), ('same GEMMs', flops)):
    for stat, v in frac_stats.items():  # Our FLOP rate / the reference's.
      frac[r, stat] = (flops / v['ours']) / (rf / v[r])
  print('CPU seconds per call (all threads): ' + ', '.join(
      f'{k} {v * 1e3:.2f} ms' for k, v in cpu.items()) +
        f'; diffusers / ours: {cpu["diffusers"] / cpu["ours"]:.3f}')
  print(f'speed ratio diffusers_ms / ours_ms: {t["diffusers"] / t["ours"]:.3f}'
        f' (min), {med["diffusers"] / med["ours"]:.3f} (median)')
  for r, what in (('jnp matmul', '(1) large GEMM: matmul_fraction'),
                  ('same GEMMs', '(2) same GEMMs: matmul_fraction_same_gemms')):
    print(f'ours / {what} ' + ', '.join(f'{frac[r, s]:.3f} ({s})' for s in frac_stats))

  if _PARTS.value:
    p = _parts(cfg, params, ref, grid, txt_len, torch, _REPEATS.value,
               _WARMUP.value)
    print(f'\nper part (median ms; load avg {os.getloadavg()[0]:.2f})')
    print(f'{"":40s}{"ours":>9s}{"torch":>9s}')
    for k in p:
      if not k.startswith('torch:'):
        tv = p.get(f'torch:{k}')
        print(f'{k:40s}{p[k] * 1e3:9.1f}' +
              (f'{tv * 1e3:9.1f}' if tv is not None else ''))
    attn = p[f'attention {_ATTENTION.value}']
    n2, n1 = cfg.depth, cfg.depth_single_blocks
    blocks = n2 * p['double block'] + n1 * p['single block']
    mms = n2 * p['double block matmuls'] + n1 * p['single block matmuls']
    print(f'forward estimate from parts: blocks {blocks * 1e3:.0f} ms = '
          f'attention {(n1 + n2) * attn * 1e3:.0f} + block matmuls {mms * 1e3:.0f} + '
          f'rest (norms, RoPE, modulation, GELU, copies) '
          f'{(blocks - (n1 + n2) * attn - mms) * 1e3:.0f}; whole forward '
          f'{t["ours"] * 1e3:.0f} ms')

  if err > _TOL.value:
    raise SystemExit(f'ours vs diffusers max rel err {err:.2e} > {_TOL.value}')
  print(json.dumps({
      'size': _SIZE.value, 'batch': batch, 'tokens': grid * grid + txt_len,
      'ours_ms': round(med['ours'] * 1e3, 3),
      'diffusers_ms': round(med['diffusers'] * 1e3, 3),
      'speed_ratio': round(med['diffusers'] / med['ours'], 4),
      'gflops': round(flops / med['ours'] / 1e9, 2),
      'matmul_gflops': round(mm_flops / med['jnp matmul'] / 1e9, 2),
      'matmul_fraction': round(frac['jnp matmul', 'median'], 4),
      'same_gemms_ms': round(med['same GEMMs'] * 1e3, 3),
      'matmul_fraction_same_gemms': round(frac['same GEMMs', 'median'], 4),
      'speed_ratio_min': round(t['diffusers'] / t['ours'], 4),
      'matmul_fraction_min': round(frac['jnp matmul', 'min'], 4),
      'matmul_fraction_same_gemms_min': round(frac['same GEMMs', 'min'], 4),
      'matmul_fraction_cpu_time': round(frac['jnp matmul', 'cpu'], 4),
      'matmul_fraction_same_gemms_cpu_time': round(
          frac['same GEMMs', 'cpu'], 4),
      'speed_ratio_cpu_time': round(cpu['diffusers'] / cpu['ours'], 4),
      'samples': len(samples['ours']), 'load_avg': round(load[0], 2),
      'max_rel_err': err}))


# ----------------------------------------------------------------------------
# GPU: schnell size, bf16, on one CUDA device.
# ----------------------------------------------------------------------------
def run_schnell_gpu(smoke: bool = False):
  import torch  # pylint: disable=g-import-not-at-top
  import diffusers  # pylint: disable=g-import-not-at-top
  from flax import traverse_util  # pylint: disable=g-import-not-at-top
  t0 = time.perf_counter()
  if smoke:
    cfg = nf.FluxConfig.tiny(dtype='bfloat16', param_dtype='bfloat16',
                             attention_impl=_GPU_ATTENTION.value,
                             mlp_ratio=4.0)
    li, lt, device = 64, 16, 'cpu'
  else:
    cfg = nf.FluxConfig.schnell(dtype='bfloat16', param_dtype='bfloat16',
                                attention_impl=_GPU_ATTENTION.value)
    li, lt, device = 4096, 512, 'cuda'
  sync = torch.cuda.synchronize if device == 'cuda' else (lambda: None)
  with torch.device('meta'):  # No host copy: allocate on device, then init.
    ref = diffusers.FluxTransformer2DModel(
        patch_size=1, in_channels=cfg.in_channels, num_layers=cfg.depth,
        num_single_layers=cfg.depth_single_blocks,
        attention_head_dim=cfg.head_dim, num_attention_heads=cfg.num_heads,
        joint_attention_dim=cfg.context_in_dim,
        pooled_projection_dim=cfg.vec_in_dim, guidance_embeds=False,
        axes_dims_rope=cfg.axes_dim)
  ref = ref.to(torch.bfloat16).to_empty(device=device).eval()
  gen = torch.Generator(device=device).manual_seed(0)
  with torch.no_grad():
    for name, p in ref.named_parameters():
      if p.ndim >= 2:  # Variance-preserving weights keep bf16 activations sane.
        p.normal_(0, p.shape[1] ** -0.5, generator=gen)
      elif 'norm' in name:
        p.normal_(1, 0.05, generator=gen)
      else:
        p.normal_(0, 0.02, generator=gen)
  sync()
  print(f'diffusers model built on {device} in {time.perf_counter() - t0:.0f} '
        f's, {sum(p.numel() for p in ref.parameters()):,} params')

  # Copy into our layout on device, one tensor at a time: dlpack views of the
  # torch tensors through the converter's Entry functions (the q|k|v stacks
  # use np.stack, so those few round-trip through host memory).
  sd = dict(ref.named_parameters())
  target = traverse_util.flatten_dict(  # Shapes do not depend on attention.
      flux.param_shapes(cfg.replace(attention_impl='xla')), sep='/')
  plan = convert_flux.diffusers_plan(cfg)
  dev = jax.devices()[0]
  flat = {}
  for path, shape in target.items():
    entry = plan[path]
    srcs = [jax.dlpack.from_dlpack(sd[k].detach()) for k in entry.sources]
    val = jax.device_put(jnp.asarray(entry.fn(*srcs), jnp.bfloat16), dev)
    if val.shape != shape.shape:
      raise ValueError(f'{path}: built {val.shape}, expected {shape.shape}')
    flat[path] = val
  params = traverse_util.unflatten_dict(flat, sep='/')
  jax.block_until_ready(params)
  print(f'weights copied to our layout at {time.perf_counter() - t0:.0f} s')

  rng = np.random.default_rng(0)
  side = int(li ** 0.5)
  ids = np.zeros((side, side, 3), np.float32)
  ids[..., 1], ids[..., 2] = np.arange(side)[:, None], np.arange(side)[None]
  inp = dict(img=rng.standard_normal((1, li, cfg.in_channels), np.float32),
             img_ids=ids.reshape(1, li, 3),
             txt=rng.standard_normal((1, lt, cfg.context_in_dim), np.float32),
             txt_ids=np.zeros((1, lt, 3), np.float32),
             timesteps=np.array([0.7], np.float32),
             y=rng.standard_normal((1, cfg.vec_in_dim), np.float32))
  x = {k: jnp.asarray(v) for k, v in inp.items()}
  def compile_ours(c):
    fwd = jax.jit(lambda p, x: flux.Flux(c).apply({'params': p},
                                                    **x).velocity)
    return _jax_call(fwd, params, x)
  ours_fn = compile_ours(cfg)
  try:
    ours_out = ours_fn()
  except Exception as e:  # pylint: disable=broad-except
    if cfg.attention_impl != 'cudnn':
      raise
    print(f'cudnn attention failed ({type(e).__name__}: {str(e)[:300]}); '
          "retrying with attention_impl='xla'")
    cfg = cfg.replace(attention_impl='xla')
    ours_fn = compile_ours(cfg)
    ours_out = ours_fn()
  print(f'ours compiled and run once at {time.perf_counter() - t0:.0f} s')
  tin = {k: torch.from_numpy(v).to(device) for k, v in inp.items()}
  def ref_fn():
    with torch.no_grad():
      out = ref(hidden_states=tin['img'].bfloat16(),
                encoder_hidden_states=tin['txt'].bfloat16(),
                pooled_projections=tin['y'].bfloat16(),
                timestep=tin['timesteps'].bfloat16(),
                img_ids=tin['img_ids'][0], txt_ids=tin['txt_ids'][0],
                return_dict=False)[0]
    sync()
    return out
  err = _max_rel_err(np.asarray(ours_out.astype(jnp.float32)),
                     ref_fn().float().cpu().numpy())
  t = time_interleaved({'ours': ours_fn, 'diffusers': ref_fn},
                       max(_REPEATS.value, 5), _WARMUP.value)
  flops = compress.count_flops(cfg, li, lt)
  print(f'\nFLUX.1-{"tiny" if smoke else "schnell"}-size forward, bf16, '
        f'{li} image + {lt} text tokens, '
        f'{jax.devices()[0].device_kind}, attention {cfg.attention_impl}')
  print(f'max rel err ours vs diffusers (bf16): {err:.3e}')
  print(f'forward FLOPs: {flops / 1e12:.2f} TFLOP')
  for k in ('ours', 'diffusers'):
    print(f'{k:12s}{t[k] * 1e3:10.1f} ms{flops / t[k] / 1e12:8.1f} TFLOP/s')
  print(json.dumps({'gpu': jax.devices()[0].device_kind,
                    'ours_ms': round(t['ours'] * 1e3, 2),
                    'diffusers_ms': round(t['diffusers'] * 1e3, 2),
                    'speed_ratio': round(t['diffusers'] / t['ours'], 4),
                    'tflops': round(flops / t['ours'] / 1e12, 2),
                    'max_rel_err': err}))


def main(argv):
  del argv
  if _SCHNELL_GPU.value or _GPU_SMOKE.value:
    run_schnell_gpu(smoke=_GPU_SMOKE.value)
  else:
    run_cpu()


if __name__ == '__main__':
  app.run(main)
