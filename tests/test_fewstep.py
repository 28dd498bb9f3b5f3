"""Few-step students (`generator.num_steps`): grid, sampler, backward simulation, export, resume, CLI."""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import assert_trees_equal, flat, gmm_tiny, init_student_params, rel_err, step_gradients

from emd_jax import diffusion, nets
from emd_jax import sample as sample_cli
from emd_jax.config.validation import ConfigError
from emd_jax.distill import step as step_lib
from emd_jax.distill.state import create_state
from emd_jax.errors import UserInputError
from emd_jax.formats import generator_export as export_lib
from emd_jax.jobs import distill

SPEC = {"arch": "mlp", "dim": 2, "hidden": 16, "depth": 1, "emb_dim": 8}


def test_default_grid_is_karras_and_sub_grids_keep_first_and_last():
  assert diffusion.student_sigmas(1, 2.5, 0.2) == (2.5, 0.0)
  g = diffusion.student_sigmas(4, 2.5, 0.2)
  # rho = 7 interpolation written out: ((1 - t) 2.5^(1/7) + t 0.2^(1/7))^7 at t = 0, 1/3, 2/3, 1.
  want = [((1 - t) * 2.5 ** (1 / 7) + t * 0.2 ** (1 / 7)) ** 7 for t in (0, 1 / 3, 2 / 3, 1)]
  np.testing.assert_allclose(g[:-1], want, rtol=1e-12)
  assert g[0] == 2.5 and g[-1] == 0.0 and all(a > b for a, b in zip(g[:-1], g[1:], strict=True))
  assert diffusion.sub_grid(g, 4) == g
  assert diffusion.sub_grid(g, 1) == (2.5, 0.0)
  assert diffusion.sub_grid(g, 2) == (g[0], g[3], 0.0)
  assert diffusion.sub_grid(g, 3) == (g[0], g[2], g[3], 0.0)  # round(1.5) = 2 (banker's rounding)
  with pytest.raises(ValueError, match=r"\[1, 4\]"):
    diffusion.sub_grid(g, 5)


def test_sampler_one_step_is_the_denoiser_and_n_steps_renoise_each_prediction():
  """N = 1 is `D(z, sigma_0)` bit for bit; N = 3 with a linear denoiser against the recursion by hand."""
  module = nets.build(SPEC)
  params = module.init(jax.random.key(0), jnp.zeros((1, 2)), jnp.ones((1,)))["params"]
  z = 2.5 * jax.random.normal(jax.random.key(1), (16, 2))
  denoise = lambda x, s, lab: module.apply({"params": params}, x, s, lab)  # noqa: E731
  one = diffusion.student_sample(denoise, z, (2.5, 0.0))
  np.testing.assert_array_equal(one, module.apply({"params": params}, z, jnp.full((16,), 2.5)))

  # D(x, s) = x / (1 + s^2) (the exact denoiser of N(0, 1) data): x0_n = x_n / (1 + s_n^2).
  sig = (2.0, 0.7, 0.1, 0.0)
  noise = np.asarray(jax.random.normal(jax.random.key(2), (2, 16, 2)))
  lin = lambda x, s, lab: x / (1.0 + s[:, None] ** 2)  # noqa: E731
  x = np.asarray(z, np.float64)
  for n in range(3):
    x0 = x / (1 + sig[n] ** 2)
    x = x0 + (sig[n + 1] * noise[n] if n < 2 else 0)
  np.testing.assert_allclose(diffusion.student_sample(lin, z, sig, jnp.asarray(noise)), x0, rtol=1e-5, atol=1e-6)


def _few_setup(num_steps=2, **kw):
  c = gmm_tiny(
    **{"generator.num_steps": num_steps, "method": "di", "batch_size": 32, "generator.train_step": "uniform", **kw},
    **{"generator.sigma_min": 0.2},  # the library default grid (configs/gmm.py sets 0.5)
  )
  distill.validate_distill(c)
  return c, distill.build_setup(c)


def test_backward_simulation_trains_each_step_on_the_students_own_earlier_output():
  """The generator pass of an example at step 1 sees `x0_0 + sigma_1 u`, where `x0_0` is the student's
  own first step from pure noise (computed here with the network directly): a step fed forward-noised
  data or teacher samples instead, or the wrong level, fails. Step-0 examples see pure noise."""
  c, setup = _few_setup(2)
  cfg = setup.step_cfg
  assert cfg.gen_sigmas == (2.5, 0.2, 0.0)
  key = jax.random.PRNGKey(0)
  params = init_student_params(setup, key)
  state = create_state(key, params, setup.tx_gen, setup.tx_fake)
  calls = []

  def recording_apply(p, x, sigma, labels=None):
    if not isinstance(x, jax.core.Tracer):
      calls.append((np.asarray(x), np.asarray(sigma)))
    return setup.net_apply(p, x, sigma, labels)

  nets_ = step_lib.Nets(recording_apply, setup.teacher.apply)
  step_lib.train_step(cfg, nets_, step_lib.Txs(setup.tx_gen, setup.tx_fake), state, setup.teacher.params)

  # The same draws, recomputed; the expected inputs from the module itself.
  d = step_lib.draw_randomness(cfg, step_lib.step_key(state))
  n = np.asarray(d.gen_step)
  assert set(n.tolist()) == {0, 1}, "both steps train in a batch of 32 (train_step 'uniform')"
  sig = np.where(n == 1, 0.2, 2.5)
  np.testing.assert_array_equal(np.asarray(d.gen_sigma), sig.astype(np.float32))
  first = setup.module.apply({"params": params}, 2.5 * d.sim_noise[0], jnp.full((32,), 2.5))
  unit = np.asarray(d.z) / sig[:, None]
  want = np.where(n[:, None] == 1, np.asarray(first) + 0.2 * unit, 2.5 * unit)
  gen_calls = [x for x, s in calls if s.shape == (32,) and np.array_equal(s, sig.astype(np.float32))]
  assert gen_calls, "no generator pass at the examples' own levels"
  np.testing.assert_allclose(gen_calls[0], want, rtol=1e-5, atol=1e-5)
  # The simulation itself ran the first step on pure noise at sigma_0.
  assert any(np.array_equal(x, np.asarray(2.5 * d.sim_noise[0])) and np.all(s == 2.5) for x, s in calls)


def test_one_step_config_draws_and_step_are_unchanged():
  """`num_steps = 1` adds nothing to the step: no few-step draws, the generator is `D(z, sigma_init)`."""
  c = gmm_tiny(batch_size=16)
  distill.validate_distill(c)
  setup = distill.build_setup(c)
  assert setup.step_cfg.gen_sigmas == () and setup.step_cfg.gen_steps == 1
  d = step_lib.draw_randomness(setup.step_cfg, jax.random.key(0))
  assert d.gen_step is None and d.sim_noise is None and d.base is None
  p = init_student_params(setup, jax.random.key(1))
  np.testing.assert_array_equal(
    step_lib.generate(setup.step_cfg, step_lib.Nets(setup.net_apply, setup.teacher.apply), p, d.z, d),
    setup.module.apply({"params": p}, d.z, jnp.full((16,), 2.5)),
  )


def test_gradients_through_the_earlier_steps_only_when_asked():
  """`backprop_steps`: the generator gradient gains the earlier steps' path (it differs); without it the
  earlier steps are constants. Both differ from zero."""
  g0, _, _ = step_gradients(gmm_tiny(**{"generator.num_steps": 3, "batch_size": 32}))
  g1, _, _ = step_gradients(gmm_tiny(**{"generator.num_steps": 3, "batch_size": 32, "generator.backprop_steps": True}))
  assert np.linalg.norm(flat(g0)) > 1e-3 and np.linalg.norm(flat(g1)) > 1e-3
  assert rel_err(g1, g0) > 1e-3


@pytest.mark.parametrize(
  "overrides, message",
  [
    ({"generator.num_steps": 0}, "generator.num_steps: must be an integer >= 1"),
    ({"generator.num_steps": 2, "generator.sigmas": (2.5, 0.0)}, "needs num_steps + 1 = 3 levels"),
    ({"generator.num_steps": 2, "generator.sigmas": (2.5, 1.0, 0.1)}, "must end at 0"),
    ({"generator.num_steps": 2, "generator.sigmas": (2.5, 3.0, 0.0)}, "strictly descending"),
    ({"generator.num_steps": 2, "generator.sigmas": (2.0, 1.0, 0.0)}, "generator.sigma_init is 2.5"),
    ({"generator.num_steps": 2, "generator.sigmas": (2.5, float("nan"), 0.0)}, "must be finite"),
    ({"generator.num_steps": 3, "generator.sigma_min": 3.0}, "generator.sigma_min: must be in (0, sigma_init"),
  ],
)
def test_bad_grids_name_the_field(overrides, message):
  with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace("+", r"\+")):
    distill.validate_distill(gmm_tiny(**overrides))


def test_four_step_student_trains_resumes_exactly_exports_and_samples(tmp_path):
  """A 4-step GMM student: 20 + 20 steps resumed == 40 straight; the export records the grid; the
  loaded sampler runs the 4 steps (the sampler recursion with the export's own noise) and subsets;
  the CLI states the NFE; a tampered grid is refused naming the file."""
  cfg = lambda steps: gmm_tiny(**{"generator.num_steps": 4, "total_steps": steps, "checkpoint_every": 20})  # noqa: E731
  full = distill.train_and_evaluate(cfg(40), str(tmp_path / "full"))
  distill.train_and_evaluate(cfg(20), str(tmp_path / "split"))
  resumed = distill.train_and_evaluate(cfg(40), str(tmp_path / "split"))
  assert_trees_equal(full["state"], resumed["state"])

  export = str(tmp_path / "full" / "export")
  meta = json.load(open(os.path.join(export, "generator.json")))
  grid = diffusion.student_sigmas(4, 2.5, 0.5)  # configs/gmm.py: generator.sigma_min 0.5
  assert meta["kind"] == "few_step_generator" and meta["format_version"] == 2
  assert meta["num_steps"] == 4 and tuple(meta["sigmas"]) == grid
  sampler = export_lib.load_sampler(export)
  assert sampler.num_steps == 4 and sampler.nfe() == 4 and sampler.nfe(2) == 2
  x = np.asarray(sampler.sample(jax.random.key(3), 64))
  # The same samples by the recursion, with the sampler's documented noise streams.
  k_z, _ = jax.random.split(jax.random.key(3))
  z = 2.5 * jax.random.normal(k_z, (64, 2))
  noise = jax.random.normal(jax.random.fold_in(k_z, 1), (3, 64, 2))
  module = nets.build(meta["net"])
  xx = z
  for i in range(4):
    x0 = module.apply({"params": sampler.params}, xx, jnp.full((64,), grid[i]))
    xx = x0 + grid[i + 1] * noise[i] if i < 3 else xx
  np.testing.assert_allclose(x, x0, rtol=1e-5, atol=1e-5)
  one = np.asarray(sampler.sample(jax.random.key(3), 64, num_steps=1))
  want_one = module.apply({"params": sampler.params}, z, jnp.full((64,), 2.5))
  np.testing.assert_allclose(one, want_one, rtol=1e-5, atol=1e-6)
  assert not np.allclose(one, x)

  out = tmp_path / "s.npz"
  assert sample_cli.run_in_process(["--generator", export, "--num", "32", "--num_steps", "2", "--out", str(out)]) == 0
  assert np.load(out)["samples"].shape == (32, 2)
  assert sample_cli.run_in_process(["--generator", export, "--num_steps", "5", "--out", str(out)]) == 2

  meta["sigmas"] = [2.5, 0.1, 0.5, 0.2, 0.0]
  json.dump(meta, open(os.path.join(export, "generator.json"), "w"))
  with pytest.raises(UserInputError, match="generator.json: sigmas must descend"):
    export_lib.load_sampler(export)


def test_train_step_last_trains_only_the_final_step_on_the_full_simulation():
  """`train_step='last'` (the default): every example trains step N - 1, its input the student's own
  steps 0..N-2 run from pure noise (here by the sampler itself, with the simulation's noises)."""
  c, setup = _few_setup(3, **{"generator.train_step": "last"})
  cfg = setup.step_cfg
  params = init_student_params(setup, jax.random.PRNGKey(0))
  d = step_lib.draw_randomness(cfg, jax.random.key(5))
  assert np.all(np.asarray(d.gen_step) == 2) and np.allclose(d.gen_sigma, cfg.gen_sigmas[2])
  d = step_lib.with_base(cfg, step_lib.Nets(setup.net_apply, setup.teacher.apply), params, d)
  denoise = lambda x, s, lab: setup.module.apply({"params": params}, x, s)  # noqa: E731
  # The sampler over the first two levels returns x0_1, the base of step 2.
  want = diffusion.student_sample(
    denoise, cfg.gen_sigmas[0] * d.sim_noise[0], cfg.gen_sigmas[:2] + (0.0,), d.sim_noise[1:]
  )
  np.testing.assert_allclose(d.base, want, rtol=1e-5, atol=1e-6)


def _gmm_config(num_steps: int):
  """The GMM default (full-size MLP, exact teacher) at a short budget; N > 1: the grid (2.5, 0.8, 0)."""
  from helpers import override

  from configs.gmm import get_config

  overrides = {"total_steps": 300, "batch_size": 128, "teacher.surrogate_steps": 600, "eval_every": 300}
  overrides.update({"checkpoint_every": 300, "log_every": 300, "eval_num_samples": 2000, "generator.decay": "none"})
  overrides["mesh.devices"] = 1  # one device: no cross-device rendezvous to time out on a loaded machine
  # The recipe the figures below were measured on (the GMM default before 2026-12-06): from sigma_init
  # 1.0 the one-step student starts near the modes, and 300 steps no longer separate the two students.
  overrides.update({"generator.sigma_init": 2.5, "method": "emd_simloss", "fake.decay": "none"})
  overrides["generator.ema_decay"] = 0.999
  if num_steps > 1:
    overrides.update({"generator.num_steps": num_steps, "generator.sigma_min": 0.8})
  return override(get_config(), **overrides)


def _gmm_scores(x, teacher) -> dict:
  """`emd_jax.evaluators.gmm` figures of samples `x`, without their `gmm/` prefix."""
  from emd_jax.evaluators import gmm

  return {k.split("/", 1)[1]: v for k, v in gmm.gmm_metrics(np.asarray(x), jax.device_get(teacher.params)).items()}


def test_two_step_student_is_ahead_of_the_one_step_student_at_equal_steps(tmp_path):
  """Issue 17's property on the analytic GMM: the same recipe and number of generator updates (300),
  a 2-step student (grid 2.5, 0.8, 0; `train_step="last"`) against the one-step student, each scored
  on 8,000 samples with the exact figures; and the 2-step student trains (it beats its own starting
  point, the surrogate run as a 2-step sampler). Measured under load: sliced Wasserstein 0.18 (2 steps)
  vs 0.36 (1 step); mode-mass TV 0.07 vs 0.20; 0 vs 3 dropped modes. (At the benchmark's 6,000
  steps the two are level within the seed-to-seed spread: benchmarks/results/gmm_seeds_fewstep.md.)"""
  scores = {}
  for n in (1, 2):
    config = _gmm_config(n)
    distill.train_and_evaluate(config, str(tmp_path / f"n{n}"))
    sampler = export_lib.load_sampler(str(tmp_path / f"n{n}" / "export"))
    teacher = distill.teachers.from_config(config.teacher)
    scores[n] = _gmm_scores(sampler.sample(jax.random.key(7), 8000), teacher)
  # The untrained 2-step sampler: the surrogate the student starts from, the same grid and noise streams.
  setup = distill.build_setup(config)
  start = distill.initial_student_params(config, setup, jax.random.key(0))
  k_z, _ = jax.random.split(jax.random.key(7))
  z = 2.5 * jax.random.normal(k_z, (8000, 2))
  noise = jax.random.normal(jax.random.fold_in(k_z, 1), (1, 8000, 2))
  denoise = lambda x, s, labels: setup.module.apply({"params": start}, x, s)  # noqa: E731
  untrained = _gmm_scores(diffusion.student_sample(denoise, z, (2.5, 0.8, 0.0), noise), teacher)
  one, two = scores[1], scores[2]
  assert two["sliced_wasserstein"] < 0.7 * one["sliced_wasserstein"], (one, two)
  assert two["mode_mass_tv"] < one["mode_mass_tv"], (one, two)
  assert two["off_mode_fraction"] < one["off_mode_fraction"] - 0.1, (one, two)
  assert two["dropped_modes"] <= one["dropped_modes"], (one, two)
  assert two["sliced_wasserstein"] < 0.8 * untrained["sliced_wasserstein"], (two, untrained)
