"""The compression ladder: rung kinds, the stage they pass on, the run.

runner.run_ladder walks config.rungs; rungs.py is the rung protocol and
registry, stage.py the value rungs pass on. Importing the package registers
the built-in rung kinds (kinds.py) and evaluators (evaluator_list.py).
"""
from nanoflux_jax.ladder import kinds  # pylint: disable=unused-import
from nanoflux_jax.ladder import evaluator_list  # pylint: disable=unused-import
