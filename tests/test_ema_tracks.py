"""Named EMA tracks (`generator.ema_tracks`): parsing and validation, the recursion each track follows,
the non-finite guard, exact resume with tracks, per-track evaluation and export by name."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import assert_trees_equal, gmm_tiny, init_student_params, trees_equal

from emd_jax.config.validation import ConfigError
from emd_jax.distill.state import create_state
from emd_jax.errors import UserError
from emd_jax.jobs import distill as train
from emd_jax.training.ema import EmaTrack, parse_ema_tracks

TRACKS = "fast:0.5,slow:0.9,deb:0.8d"


def test_parse_ema_tracks():
  assert parse_ema_tracks("") == ()
  assert parse_ema_tracks(" ema9999:0.9999 , deb_1:0.999d,") == (
    EmaTrack("ema9999", 0.9999, False),
    EmaTrack("deb_1", 0.999, True),
  )


@pytest.mark.parametrize(
  "text, words",
  [
    ("a:0.9,a:0.5", "twice"),
    ("ema:0.9", "reserved"),
    ("raw:0.9", "reserved"),
    ("a:1.0", "[0, 1)"),
    ("a:-0.1", "[0, 1)"),
    ("a:0.9x", "not a number"),
    ("a=0.9", "name:decay"),
    ("9a:0.9", "letters"),
    ("A-b:0.9", "letters"),
  ],
)
def test_bad_tracks_are_config_errors_naming_the_field(text, words):
  c = gmm_tiny(**{"generator.ema_tracks": text})
  with pytest.raises(ConfigError, match="generator.ema_tracks") as e:
    train.validate_distill(c)
  assert words in str(e.value)
  assert e.value.field == "generator.ema_tracks"


def _stepper(tracks: str):
  c = gmm_tiny(method="sim", **{"generator.ema_tracks": tracks})  # no E-step: a quicker compile
  train.validate_distill(c)
  setup = train.build_setup(c)
  step = jax.jit(
    train.make_train_step(setup.step_cfg, setup.net_apply, setup.teacher.apply, setup.tx_gen, setup.tx_fake)
  )
  return setup, step


def test_tracks_follow_their_recursion_and_keep_still_on_a_rejected_step():
  """Each track: e <- d e + (1 - d) p over ACCEPTED iterates p (numpy, float64), from the initial weights;
  the debiased one is the normalised average sum_k d^(n-k) p_k / sum_k d^(n-k). A non-finite step leaves
  every track bit-identical. And the tracks are passengers: the generator, its `ema` and the fake
  denoiser follow exactly the trajectory of the same run without tracks."""
  setup, step = _stepper(TRACKS)
  plain_setup, plain_step = _stepper("")
  key = jax.random.PRNGKey(0)
  params = init_student_params(setup, key)
  state = create_state(key, params, setup.tx_gen, setup.tx_fake, train.track_names(setup))
  plain = create_state(key, params, plain_setup.tx_gen, plain_setup.tx_fake)
  assert set(state.gen_ema_tracks) == {"fast", "slow", "deb"} and plain.gen_ema_tracks == {}
  nan_teacher = jax.tree.map(lambda x: x * jnp.nan, setup.teacher.params)
  p0 = [np.asarray(x, np.float64) for x in jax.tree.leaves(params)]
  expected = {"fast": p0, "slow": p0}
  iterates = []
  for i in range(4):
    rejected = i == 1
    teacher = nan_teacher if rejected else setup.teacher.params
    before = jax.device_get(state.gen_ema_tracks)
    state, m = step(state, teacher)
    plain, _ = plain_step(plain, teacher)
    assert int(m["nonfinite/skipped"]) == int(rejected)
    if rejected:
      assert_trees_equal(before, jax.device_get(state.gen_ema_tracks), "rejected step moved a track")
      continue
    p = [np.asarray(x, np.float64) for x in jax.tree.leaves(jax.device_get(state.gen_params))]
    iterates.append(p)
    for name, d in (("fast", 0.5), ("slow", 0.9)):
      expected[name] = [d * e + (1 - d) * q for e, q in zip(expected[name], p, strict=True)]
    n = len(iterates)
    w = [0.8 ** (n - 1 - k) for k in range(n)]
    expected["deb"] = [sum(wk * it[j] for wk, it in zip(w, iterates, strict=True)) / sum(w) for j in range(len(p))]
    for name, want in expected.items():
      got = jax.tree.leaves(jax.device_get(state.gen_ema_tracks[name]))
      for a, b in zip(got, want, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6, err_msg=f"track {name} after step {i + 1}")
  # The tracks really differ from each other and from the default EMA (decay 0.999).
  tr = jax.device_get(state.gen_ema_tracks)
  assert not trees_equal(tr["fast"], tr["slow"]) and not trees_equal(tr["slow"], jax.device_get(state.gen_ema))
  for field in ("gen_params", "gen_ema", "fake_params", "gen_opt_state", "step", "nonfinite_count"):
    assert_trees_equal(getattr(plain, field), getattr(state, field), f"tracks changed {field}")


def test_resume_with_tracks_is_bit_identical_and_tracks_are_evaluated_and_exported(tmp_path):
  over = {"generator.ema_tracks": "slow:0.9,deb:0.8d", "eval_every": 100, "method": "sim"}
  full = train.train_and_evaluate(gmm_tiny(total_steps=8, checkpoint_every=4, **over), str(tmp_path / "full"))
  train.train_and_evaluate(gmm_tiny(total_steps=4, checkpoint_every=4, **over), str(tmp_path / "split"))
  resumed = train.train_and_evaluate(gmm_tiny(total_steps=8, checkpoint_every=4, **over), str(tmp_path / "split"))
  assert int(resumed["state"].step) == 8
  assert_trees_equal(full["state"], resumed["state"])
  assert not trees_equal(full["state"].gen_ema_tracks["slow"], full["state"].gen_ema)
  # Evaluation scores every track under its own prefix, next to the default EMA's figures.
  for prefix in ("", "eval_slow/", "eval_deb/"):
    assert f"{prefix}gmm/sliced_wasserstein" in full, sorted(full)
  assert full["eval_slow/gmm/sliced_wasserstein"] != full["gmm/sliced_wasserstein"]
  # ... and draws a sample grid of each into TensorBoard.
  assert {"samples", "samples_slow", "samples_deb"} <= _image_tags(str(tmp_path / "full")), _image_tags(
    str(tmp_path / "full")
  )
  # The same tracks' figures computed independently from the final state, with the evaluation's inputs.
  c = gmm_tiny(total_steps=8, checkpoint_every=4, **over)
  train.validate_distill(c)
  setup = train.build_setup(c)
  k_eval = jax.random.split(jax.random.PRNGKey(c.seed), 3)[2]
  mine, _ = train.evaluate(c, setup, full["state"].gen_ema_tracks["deb"], jax.random.fold_in(k_eval, 8))
  assert mine["gmm/sliced_wasserstein"] == full["eval_deb/gmm/sliced_wasserstein"]
  # Export by name: the track's parameters (and the raw generator's), the default `ema` untouched.
  from emd_jax.formats.generator_export import read_export

  for name, want in (("slow", full["state"].gen_ema_tracks["slow"]), ("raw", full["state"].gen_params)):
    path = train.export(c, setup, full["state"], str(tmp_path / "full"), ema=name, directory=str(tmp_path / name))
    meta, params = read_export(path)
    assert meta["ema"] == name
    assert_trees_equal(jax.device_get(want), params)
  meta, params = read_export(str(tmp_path / "full" / "export"))
  assert "ema" not in meta
  assert_trees_equal(jax.device_get(full["state"].gen_ema), params)
  with pytest.raises(UserError, match="no such EMA track.*raw, ema, deb, slow"):
    train.generator_params(full["state"], "nope")
  # A workdir whose checkpoints hold other tracks is refused by name before anything is restored.
  with pytest.raises(train.TrainingError, match="ema_tracks"):
    train.train_and_evaluate(
      gmm_tiny(total_steps=12, **{**over, "generator.ema_tracks": "slow:0.9"}), str(tmp_path / "full")
    )


def _image_tags(workdir: str) -> set[str]:
  """The tags of the image summaries in `workdir`'s TensorBoard event files."""
  import glob

  import tensorflow as tf

  tags = set()
  for path in glob.glob(os.path.join(workdir, "**", "events.out.tfevents.*"), recursive=True):
    for event in tf.compat.v1.train.summary_iterator(path):
      for v in event.summary.value:
        if v.HasField("image") or (v.metadata.plugin_data.plugin_name == "images"):
          tags.add(v.tag)
  return tags
