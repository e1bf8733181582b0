"""experiments/plan.py's memory plan: against XLA's memory_analysis, and the
FLUX.1-schnell ladder on an abstract 64-device mesh (nothing allocated)."""
import importlib.util
import os

import jax
import pytest

from nanoflux_jax import parallel
from nanoflux_jax.configs import FluxConfig
from nanoflux_jax.distill import memory_bytes as mb
from nanoflux_jax.distill import memory_plan as mp
from nanoflux_jax.distill import trainer

# FLUX.1-schnell's block shapes (head_dim 128, RoPE (16, 56, 56)), scaled.
SCALED = dict(hidden_size=256, num_heads=2, head_dim=128, depth=1,
              depth_single_blocks=2, context_in_dim=64, vec_in_dim=32,
              attention_impl='xla')
SCHNELL_PARAMS = 11_891_178_560
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _scaled_step_config():
  c = trainer.default_config()
  c.remat = True
  c.compute_dtype = 'bfloat16'
  c.batch_size = 8
  c.num_sampling_steps = 4
  c.data.grid = (8, 8)
  c.data.txt_len = 32
  c.loss.weights.feature_kd = 0.1
  c.loss.feature_pairs = ((0, 0), (2, 2))
  return c


@pytest.mark.skipif(jax.device_count() < 8, reason='needs 8 (fake) devices')
def test_plan_matches_compiled_memory_analysis():
  mesh = parallel.create_mesh({'data': 2, 'fsdp': 2, 'tensor': 2})
  t_cfg = FluxConfig.schnell(**SCALED)
  t_params = mb.abstract_params(t_cfg, None)  # pylint: disable=protected-access
  s_cfg, s_params = mb.transform_shapes(
      'prune', t_cfg, t_params, dict(keep_heads=0.5, keep_mlp=0.75),
      (1.0, 0.75, 0.5, 0.25, 0.0), t_cfg.vec_in_dim)
  assert s_cfg.single_heads == (1, 1) and s_cfg.single_mlp == (768, 768)
  c = _scaled_step_config()
  plan = mp.dit_rung_plan('prune', c, s_cfg, s_params, t_cfg, t_params, mesh,
                          1 << 40, 'xla')
  got = mp.compiled_peak_bytes(
      mp.lower_train_step(c, s_cfg, s_params, t_cfg, t_params,
                          mesh).compile())
  print('memory_analysis (MiB):', {k: round(v / 2**20, 2)
                                    for k, v in got.items()},
        'plan (MiB):', {k: round(getattr(plan, k) / 2**20, 2) for k in (
            'teacher', 'student', 'grads', 'opt_state', 'batch',
            'activations', 'gathered', 'total')})
  # The state, teacher and batch are exact; the estimate is the rest.
  exact = plan.teacher + plan.student + plan.opt_state + plan.batch
  assert abs(got['arguments'] - exact) <= 0.02 * got['arguments'], (got, plan)
  assert abs(plan.total / got['peak'] - 1) <= 0.25, (got, plan)
  # Not a comparison the exact parts win alone: the estimated gradients,
  # activations and gathered params are most of the peak.
  assert plan.grads + plan.activations + plan.gathered >= 0.5 * plan.total


def test_schnell_ladder_plan_on_64_devices_allocates_nothing():
  spec = importlib.util.spec_from_file_location('ladder_schnell', os.path.join(
      ROOT, 'experiments', 'configs', 'ladder_schnell.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  mesh = mb.abstract_mesh(dict(config.mesh), 64)
  assert dict(mesh.shape) == {'data': 1, 'fsdp': 64, 'tensor': 1}
  plans = mp.plan_ladder(config, mesh, int(95e9))
  assert [p.name for p in plans] == ['0 prune', '1 depth',
                                     '2 static_modulation', '3 downsample',
                                     '4 text_encoder']
  # The bf16 12B teacher, FSDP-split 64 ways (embed 3072 / 64 = 48); the
  # small vectors (norm scales, biases) stay whole: 1.4% over an even split.
  even = 2 * SCHNELL_PARAMS / 64
  assert even <= plans[0].teacher < 1.02 * even
  counts = [p.params_count for p in plans[:4]]
  # Half the heads, 75% of MLP channels; the 3.2B of AdaLN stay until
  # static modulation.
  assert 0.7 * SCHNELL_PARAMS < counts[0] < 0.8 * SCHNELL_PARAMS
  assert counts[0] > counts[1] > counts[2]       # depth, static-LN shrink.
  assert counts[3] > counts[2]                    # + the down-sampler.
  for p in plans:
    # Adam: two moments like the params (+ its int32 step counts).
    assert p.grads == 2 * p.student and 0 <= p.opt_state - 2 * p.student < 64
    assert 0 < p.total < p.budget, p
  assert plans[4].teacher > plans[3].student      # T5-XXL + denoiser.
  text = mp.format_plan(plans, mesh, int(95e9))
  assert text.count('| yes |') == 5
