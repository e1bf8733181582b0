"""The shapes world is deterministic, varied and captioned from its attributes."""
import numpy as np

from nanoflux_jax.shapes import world as shapes
def test_deterministic_per_seed_and_index():
  a, b = shapes.ShapesWorld(seed=3), shapes.ShapesWorld(seed=3)
  for i in (0, 1, 17):
    ia, ca, sa = a.example(i)
    ib, cb, sb = b.example(i)
    np.testing.assert_array_equal(ia, ib)
    assert ca == cb and sa == sb
  other = shapes.ShapesWorld(seed=4)
  assert [other.scene(i) for i in range(8)] != [a.scene(i) for i in range(8)]


def test_scenes_cover_the_attribute_space_and_captions_match():
  world = shapes.ShapesWorld(seed=0)
  images, caps, scenes = world.batch(0, 400)
  assert images.shape == (400, 64, 64, 3) and images.dtype == np.uint8
  objs = [o for s in scenes for o in s.objects]
  assert {o.shape for o in objs} == set(shapes.SHAPES)
  assert {o.position for o in objs} == set(shapes.POSITIONS)
  assert {len(s.objects) for s in scenes} == {1, 2}
  for s, c in zip(scenes, caps):
    colours = [o.colour for o in s.objects] + [s.background]
    assert len(set(colours)) == len(colours)  # never camouflaged.
    for o in s.objects:
      assert f'{o.size} {o.colour} {o.shape}' in c
    article = 'an' if s.background == 'orange' else 'a'
    assert c.endswith(f'on {article} {s.background} background')
    assert set(c.replace(',', '').split()) <= set(shapes.vocabulary())


def test_render_draws_the_object_where_the_caption_says():
  scene = shapes.Scene((shapes.Obj('square', 'red', 'left', 'large'),),
                       background='blue')
  img = shapes.render(scene, 64).astype(int)
  red, blue = np.array(shapes.COLOURS['red']), np.array(shapes.COLOURS['blue'])
  assert np.abs(img[32, 16] - red).max() < 10      # object centre.
  assert np.abs(img[32, 48] - blue).max() < 10     # right half: background.
