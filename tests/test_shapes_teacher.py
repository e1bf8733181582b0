"""The shapes-world teacher pipeline: tokenizers, latent space, data."""
import jax
import numpy as np
import pytest

from nanoflux_jax.shapes import world as shapes
import nanoflux_jax as nf
from nanoflux_jax.distill import data as data_lib
from nanoflux_jax.shapes import t5_pretrain as shapes_encoders
from nanoflux_jax.shapes import teacher as shapes_teacher
from nanoflux_jax.shapes import classifier
from nanoflux_jax.evaluate import metrics
from nanoflux_jax.shapes import scoring as toy
@pytest.fixture(scope='module')
def pipe(tmp_path_factory):
  c = shapes_teacher.default_config()
  c.t5_pretrain.steps = 0  # Random T5: these tests read the data path.
  return shapes_teacher.build_pipeline(c, str(tmp_path_factory.mktemp('tok')))


def test_shipped_teacher_scores_on_fresh_prompts():
  """The teacher in the package loads as a pipeline and draws what it is
  asked for: toy-GenEval >= 0.85 on 64 prompts of a world it never saw."""
  pipe = nf.FluxPipeline.from_pretrained(shapes.teacher_path())
  s = toy.eval_set(world_seed=4242, num=64, resolution=64,
                   latent_shape=(64, pipe.flux_cfg.in_channels),
                   num_reference=64)
  images = toy.generate(pipe, s, num_steps=8, txt_len=24, batch=32)
  clf = classifier.Classifier.load(shapes.classifier_path())
  assert metrics.geneval(clf, images, s.scenes) >= 0.85


def test_token_labels_follow_the_caption_phrases():
  scene = shapes.Scene((shapes.Obj('star', 'red', 'left', 'small'),
                        shapes.Obj('circle', 'blue', 'top', 'large')),
                       background='green')
  # 'a small red star on the left, a large blue circle at the top, on a
  # green background' -> 7 + 7 + 4 words.
  lab = shapes_encoders.token_labels(scene, 18, 20)
  positions = tuple(shapes.POSITIONS) + ('background',)
  assert [positions[i] for i in lab['position'][:18]] == (
      ['left'] * 7 + ['top'] * 7 + ['background'] * 4)
  colours = list(shapes.COLOURS)
  assert [colours[i] for i in lab['colour'][:18]] == (
      ['red'] * 7 + ['blue'] * 7 + ['green'] * 4)
  assert list(lab['shape'][14:]) == [-1] * 6  # background, padding.
  assert list(lab['position'][18:]) == [-1, -1]
  with pytest.raises(ValueError, match='word-level'):
    shapes_encoders.token_labels(scene, 25, 30)


def test_t5_caption_pretraining_binds_words_to_their_phrase(pipe):
  """After pretraining, every token's embedding tells which object (or the
  background) its phrase describes: a linear probe reads position and
  colour back from the token embeddings of held-out captions."""
  c = shapes_teacher.default_config()
  _, acc = shapes_encoders.pretrain_t5(
      pipe.t5_cfg, pipe.t5_params, pipe.tokenizer_2, shapes.ShapesWorld(0),
      c.txt_len, steps=300)
  assert acc['position'] > 0.9 and acc['colour'] > 0.9, acc


def test_tokenizer_fits_the_caption_vocabulary(pipe):
  tok = pipe.tokenizer_2
  for word in shapes.vocabulary():
    ids = tok(word)['input_ids']
    assert len(ids) == 2 and ids[0] != tok.unk_token_id, (word, ids)
  lengths = [len(ids) for ids in tok(shapes.ShapesWorld(5).captions(2000))
             ['input_ids']]
  assert max(lengths) <= shapes_teacher.default_config().txt_len


def test_data_is_deterministic_and_latents_encode_the_rendering(pipe):
  world = shapes.ShapesWorld(3)
  data = shapes_teacher.ShapesData(pipe, world, batch_size=4, txt_len=24,
                                   pool_size=10, chunk=4)
  b = data.batch(2)
  assert {k: v.shape for k, v in b.items()} == {
      'txt': (4, 24, 64), 'y': (4, 64), 'noise': (4, 64, 48),
      'latents': (4, 64, 48)}
  jax.tree.map(np.testing.assert_array_equal, b, data.batch(2))
  assert not np.array_equal(b['noise'], data.batch(3)['noise'])
  images, caps, _ = world.batch(0, 10)
  # Each row is one pool scene: its latents decode to its rendering (the
  # linear patch codec keeps 12 of 48 PCA components: > 30 dB) and its
  # embeddings are its caption's.
  decoded = np.asarray(pipe.decode_latents(data.latents, 64, 64))
  assert metrics.psnr(decoded, images) > 30
  assert np.abs(data.latents.std() - 1) < 0.2  # scaling_factor normalises.
  np.testing.assert_allclose(data.txt, pipe.encode_prompt(caps, 24)[0],
                             atol=1e-5)
  for row in range(4):
    i = int(np.argmin(np.abs(data.latents - b['latents'][row]).sum((1, 2))))
    np.testing.assert_array_equal(b['txt'][row], data.txt[i])
  half = data.batch(2, process_index=1, process_count=2)
  jax.tree.map(lambda h, f: np.testing.assert_array_equal(h, f[2:]), half, b)


def test_shapes_prompt_source():
  assert data_lib.load_prompts('shapes:3:5') == [
      shapes.ShapesWorld(5).example(i)[1] for i in range(3)]
  assert data_lib.load_prompts('shapes:2') == shapes.ShapesWorld(0).captions(2)
  for bad in ('shapes:', 'shapes:x', 'shapes:0', 'shapes:2:1:1'):
    with pytest.raises(ValueError, match='shapes:N'):
      data_lib.load_prompts(bad)
