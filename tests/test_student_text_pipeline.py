"""A FluxPipeline running a distilled student text encoder, and its export."""
import jax
import numpy as np
import pytest

import nanoflux_jax as nf
from nanoflux_jax import checkpoint
from nanoflux_jax.compress import student_t5 as te_student
from nanoflux_jax.export import bundle
from nanoflux_jax.models.t5 import StudentTextEncoder

from refs import max_rel_err, require
from nanoflux_jax.testing.tiny_flux import make_tiny_flux_pipeline

PROMPTS = ['a red circle on the left', 'a photo of a blue dog']
H = W = 16   # tiny VAE factor 2: packed grid 4 x 4.
T = 8        # T5 tokens.


@pytest.fixture(scope='module')
def pipes(tmp_path_factory):
  """(teacher pipeline, student (cfg, out_dim, params), student pipeline)."""
  require('diffusers')
  path = tmp_path_factory.mktemp('pipe')
  make_tiny_flux_pipeline(path)
  pipe = nf.FluxPipeline.from_pretrained(str(path))
  out_dim = pipe.flux_cfg.context_in_dim
  cfg = te_student.student_t5_config(pipe.t5_cfg, num_layers=1)
  student = (cfg, out_dim, te_student.init_student(cfg, out_dim,
                                           jax.random.PRNGKey(0)))
  return pipe, student, pipe.with_text_encoder(student)


def _student_embeds(pipe, student):
  cfg, out_dim, params = student
  ids = pipe.tokenize(PROMPTS, T)[0]
  return StudentTextEncoder(cfg, out_dim).apply({'params': params}, ids)


def _images(pipe):
  return pipe(PROMPTS, H, W, num_steps=2, seed=0, max_sequence_length=T)


def test_encode_prompt_runs_the_student(pipes):
  pipe, student, spipe = pipes
  txt, pooled = spipe.encode_prompt(PROMPTS, T)
  want = _student_embeds(pipe, student)
  assert txt.shape == (2, T, pipe.flux_cfg.context_in_dim)
  np.testing.assert_allclose(txt, want, rtol=1e-6, atol=1e-6)
  t_txt, t_pooled = pipe.encode_prompt(PROMPTS, T)
  assert max_rel_err(txt, t_txt) > 1e-2
  np.testing.assert_array_equal(pooled, t_pooled)  # CLIP is shared.
  assert pipe.t5_out_dim is None  # The teacher pipeline is unchanged.


def test_save_load_round_trip(pipes, tmp_path):
  pipe, student, spipe = pipes
  images = _images(spipe)
  assert images.shape == (2, H, W, 3) and images.dtype == np.uint8
  spipe.save(str(tmp_path / 'saved'))
  loaded = nf.FluxPipeline.from_pretrained(str(tmp_path / 'saved'))
  assert (loaded.t5_cfg, loaded.t5_out_dim) == student[:2]
  np.testing.assert_array_equal(_images(loaded), images)
  # text_encoder_2/ of the saved pipeline is a save_student folder.
  again = pipe.with_text_encoder(str(tmp_path / 'saved' / 'text_encoder_2'))
  np.testing.assert_array_equal(again.encode_prompt(PROMPTS, T)[0],
                                spipe.encode_prompt(PROMPTS, T)[0])


def test_student_folder_and_mismatches(pipes, tmp_path):
  pipe, (cfg, out_dim, params), spipe = pipes
  te_student.save_student(str(tmp_path / 'student'), cfg, out_dim, params)
  from_dir = pipe.with_text_encoder(tmp_path / 'student')
  np.testing.assert_array_equal(from_dir.encode_prompt(PROMPTS, T)[0],
                                spipe.encode_prompt(PROMPTS, T)[0])
  with pytest.raises(ValueError, match='out_dim=7 .*context_in_dim=32'):
    pipe.with_text_encoder((cfg, 7, params))
  with pytest.raises(ValueError, match='vocab_size=301 .*vocab_size=300'):
    pipe.with_text_encoder((cfg.replace(vocab_size=301), out_dim, params))
  checkpoint.save(str(tmp_path / 'teacher'), pipe.t5_cfg, pipe.t5_params)
  with pytest.raises(ValueError, match='not a student'):
    pipe.with_text_encoder(str(tmp_path / 'teacher'))


def test_export_student_t5(pipes, tmp_path):
  require('tensorflow')
  require('ai_edge_litert')
  pipe, student, spipe = pipes
  out = str(tmp_path / 'export')
  bundle.export_pipeline(spipe, out, H, W, num_steps=1, max_sequence_length=T)
  runner = nf.export.TFLitePipeline(out, num_threads=2)
  want = _student_embeds(pipe, student)
  for i, p in enumerate(PROMPTS):
    got = runner.encode_prompt(p)[0]
    assert got.shape == (1, T, student[1])
    assert max_rel_err(got, want[i:i + 1]) < 1e-4
