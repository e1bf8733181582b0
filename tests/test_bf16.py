"""The bf16 paths: the DiT against our fp32 and against diffusers in bf16.

bf16 keeps 8 mantissa bits (relative rounding 2^-9 ~ 2e-3 per op), so a
whole forward lands around 1e-2 of the fp32 output. Bounds:
  * our bf16 velocity vs our fp32 and vs diffusers' bf16: max relative
    error (max |diff| / max |ref|) <= BF16_TOL;
  * our bf16 error (against diffusers fp32) at most BF16_RATIO x diffusers'
    own bf16 error plus BF16_TOL / 10: no worse than the reference's bf16;
  * and > 1e-4: bf16 was really used (an fp32 run would be ~1e-6).
"""
import jax
import jax.numpy as jnp
import numpy as np

from nanoflux_jax.convert import flux as convert_flux
from nanoflux_jax.models import flux

from flux_utils import make_diffusers_flux, random_inputs, run_diffusers
from refs import max_rel_err, require

BF16_TOL = 3e-2
BF16_RATIO = 2.0


def test_dit_bf16_matches_fp32_and_diffusers_bf16(tmp_path):
  ref = make_diffusers_flux(guidance=True)
  ref.save_pretrained(tmp_path / 'transformer')
  cfg, params = convert_flux.load_flux_transformer(str(tmp_path / 'transformer'))
  inputs = random_inputs(cfg, 2, 4, 6, txt_len=7)
  # diffusers casts t and guidance to the model dtype BEFORE scaling them by
  # 1000: at a generic t the bf16-rounded t * 1000 moves the sinusoid phases
  # by radians (measured: diffusers bf16 vs its fp32 2e-1 at random t; ours
  # keeps them fp32, 1e-2). Values whose x1000 survive bf16 rounding (128,
  # 512, 2048, 4096) keep the comparison about the network itself.
  inputs['timesteps'] = np.array([0.128, 0.512], np.float32)
  inputs['guidance'] = np.array([2.048, 4.096], np.float32)
  want32 = run_diffusers(ref, inputs)
  # Last: converts ref to bf16 in place.
  want16 = run_diffusers(ref, inputs, require('torch').bfloat16)
  ours32 = np.asarray(
      flux.Flux(cfg).apply({'params': params}, **inputs).velocity)
  assert max_rel_err(ours32, want32) < 1e-4  # The fp32 baseline.

  # All bf16 (params and compute), as a bf16 checkpoint runs.
  cfg16 = cfg.replace(dtype='bfloat16', param_dtype='bfloat16')
  p16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
  ours16 = flux.Flux(cfg16).apply({'params': p16}, **inputs).velocity
  assert ours16.dtype == jnp.bfloat16
  ours16 = np.asarray(ours16.astype(jnp.float32))
  # fp32 master params, bf16 compute: the trainer's compute_dtype path.
  mixed = np.asarray(flux.Flux(cfg.replace(dtype='bfloat16')).apply(
      {'params': params}, **inputs).velocity.astype(jnp.float32))

  ref_err = max_rel_err(want16, want32)
  for name, got in (('bf16', ours16), ('mixed', mixed)):
    errs = dict(vs_ours_fp32=max_rel_err(got, ours32),
                vs_diffusers_bf16=max_rel_err(got, want16),
                vs_diffusers_fp32=max_rel_err(got, want32),
                diffusers_bf16_vs_fp32=ref_err)
    print(name, {k: f'{v:.2e}' for k, v in errs.items()})
    assert errs['vs_ours_fp32'] <= BF16_TOL, (name, errs)
    assert errs['vs_diffusers_bf16'] <= BF16_TOL, (name, errs)
    assert errs['vs_diffusers_fp32'] <= (
        BF16_RATIO * ref_err + BF16_TOL / 10), (name, errs)
    assert errs['vs_ours_fp32'] > 1e-4, (name, errs)  # bf16 really ran.
