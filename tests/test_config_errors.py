"""Every malformed command line stops with one `error: <field>: ...` line, exit status 2, no traceback.

The cases run in-process through `emd_jax.main.run_in_process` (the same parsing
and error mapping as the real entry point, with fresh flags); two run as real
subprocesses to cover `absl.app` itself.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

from emd_jax import main as main_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--config", "configs/gmm.py:tiny"]


@pytest.fixture(scope="module")
def teachers_dir(tmp_path_factory):
  """Small network teachers: a good one, one with mismatched params, one without params, one with bad JSON."""
  from emd_jax import nets
  from emd_jax.teachers import network

  root = tmp_path_factory.mktemp("teachers")
  spec = {"arch": "mlp", "dim": 2, "hidden": 8, "depth": 1, "emb_dim": 8}

  def params(hidden):
    module = nets.build({**spec, "hidden": hidden})
    return module.init(jax.random.PRNGKey(0), jnp.zeros((1, 2)), jnp.ones((1,)))["params"]

  network.save(str(root / "good"), spec, params(8), meta={"data_shape": [2]})
  network.save(str(root / "mismatch"), spec, params(16), meta={"data_shape": [2]})
  network.save(str(root / "noparams"), spec, params(8), meta={"data_shape": [2]})
  os.remove(root / "noparams" / network.PARAMS_FILE)
  network.save(str(root / "badjson"), spec, params(8), meta={"data_shape": [2]})
  (root / "badjson" / network.SPEC_FILE).write_text("{not json")
  network.save(str(root / "badarch"), {**spec, "arch": "resnet"}, params(8), meta={"data_shape": [2]})
  info = json.loads((root / "good" / network.SPEC_FILE).read_text())
  assert info["net"]["hidden"] == 8
  return root


def _ck(name):
  return ["--config.teacher.kind=checkpoint", f"--config.teacher.checkpoint={{teachers}}/{name}"]


# (argv after the program name, with {workdir} / {teachers} placeholders; expected text after "error: ")
CASES = [
  # malformed overrides: unknown keys, wrong types, unparsable values
  (["--config.nonexistent=1"], "--config.nonexistent: no such config field"),
  (["--config.teacher.nope=1"], "--config.teacher.nope: no such config field"),
  (["--config.batch_size=abc"], "--config.batch_size=abc"),
  (["--config.total_steps=1.5"], "--config.total_steps=1.5"),
  (["--config.export_at_end=maybe"], "--config.export_at_end=maybe"),
  (["--config.teacher.weights=(1,2"], "--config.teacher.weights"),
  # names
  (["--config.method=magic"], "method: unknown method 'magic'"),
  (["--config.loss.distance=cosine"], "loss.distance: unknown distance 'cosine'"),
  (["--config.loss.weight=heavy"], "loss.weight: unknown weight 'heavy'"),
  (["--config.schedule=cosine"], "schedule: must be 've' or 'vp'"),
  (["--config.estep.gamma_z_scaling=cubic"], "estep.gamma_z_scaling"),
  (["--config.fake.noise.kind=uniform"], "fake.noise.kind: unknown noise distribution"),
  (["--config.job=finetune"], "config.job: unknown job 'finetune'"),
  # ranges and combinations
  (["--config.method=emd", "--config.estep.num_steps=0"], "estep.num_steps: loss 'emd' needs an E-step"),
  (["--config.loss.huber_c=0"], "loss.huber_c: must be > 0"),
  (["--config.loss.power=3"], "loss.power: must be an even integer"),
  (["--config.estep.gamma_eps=1.5"], "estep.gamma_eps: must be in (0, 1]"),
  (["--config.generator.sigma_init=0"], "generator.sigma_init: must be > 0"),
  (["--config.generator.ema_decay=1.0"], "generator.ema_decay: must be in [0, 1)"),
  (["--config.generator.lr=-1"], "generator.lr: must be > 0"),
  (["--config.fake.b2=1.0"], "fake.b2: must be in [0, 1)"),
  (["--config.generator.decay=step"], "generator.decay: unknown 'step'"),
  (["--config.fake.end_factor=2.0"], "fake.end_factor: must be in [0, 1]"),
  (["--config.loss.noise.sigma_min=0"], "loss.noise.sigma_min: must be > 0"),
  (["--config.fake.steps_per_gen_step=0"], "fake.steps_per_gen_step: must be >= 1"),
  (["--config.fake.loop=twice"], "fake.loop: must be 'auto', 'unroll' or 'scan', got 'twice'"),
  (["--config.draws=sobol"], "draws: must be one of ('iid', 'stratified'), got 'sobol'"),
  (["--config.method=sim", "--config.estep.gamma_z_scaling=cubic"], "estep.gamma_z_scaling: must be 'constant' or"),
  (["--config.grad_accum_steps=0"], "grad_accum_steps: must be >= 1, got 0"),
  (["--config.grad_accum_steps=3"], "grad_accum_steps: 3 does not divide batch_size=64 into equal micro-batches"),
  (["--config.remat=some"], "remat: must be one of ['dots', 'full', 'none'], got 'some'"),
  (["--config.total_steps=-1"], "total_steps: must be >= 0"),
  (["--config.batch_size=0"], "batch_size: must be > 0"),
  (["--config.log_every=0"], "log_every: must be > 0"),
  (["--config.checkpoint_every=0"], "checkpoint_every: must be > 0"),
  (["--config.max_checkpoints=0"], "max_checkpoints: must be >= 1"),
  (["--config.nonfinite_limit=0"], "nonfinite_limit: must be >= 1"),
  (["--config.spike_factor=-1"], "spike_factor: must be >= 0"),
  (["--config.eval_num_samples=0"], "eval_num_samples: must be > 0"),
  (["--config.seed=-1"], "seed: must be in [0, 2^31)"),
  (["--config.debug.kill_phase=later"], "debug.kill_phase: must be one of"),
  (["--config.debug.nan_at_steps=(0,)"], "debug.nan_at_steps: step numbers must be >= 1"),
  # the mesh against the 8 (fake) devices of the test process
  (["--config.mesh.data=3"], "mesh.data: data=3 x fsdp=1 = 3 devices, but 8 are available"),
  (["--config.mesh.fsdp=3"], "mesh.fsdp: 3 does not divide the 8 available devices"),
  (["--config.mesh.fsdp=0"], "mesh.fsdp: must be >= 1"),
  (["--config.mesh.gather=some"], "mesh.gather: must be one of ('auto', 'per_layer'), got 'some'"),
  (["--config.batch_size=60"], "batch_size: 60 is not divisible by the 8 data-parallel devices"),
  # teacher and student shapes, missing and damaged files
  (["--config.teacher.kind=diffusion"], "teacher.kind: unknown teacher kind 'diffusion'"),
  (["--config.teacher.num_modes=3"], "teacher.weights: has 8 entries for 3 modes"),
  (["--config.teacher.std=0"], "teacher.std: must be > 0"),
  (["--config.net.arch=song_unet"], "net.arch: 'song_unet' needs image data"),
  (["--config.net.arch=transformer"], "net.arch: unknown network arch 'transformer'"),
  (["--config.net.hidden=0"], "net.hidden: must be >= 1"),
  (["--config.net.dtype=int8"], "net.dtype: must be"),
  (["--config.teacher.kind=checkpoint"], "teacher.checkpoint: no teacher checkpoint directory given"),
  (_ck("missing"), "teacher.checkpoint: teacher checkpoint not found"),
  (
    _ck("noparams"),
    "teacher.checkpoint: incomplete teacher checkpoint: {teachers}/noparams: "
    "params.msgpack listed in _COMPLETE missing",
  ),
  (_ck("badjson"), "teacher.checkpoint: {teachers}/badjson/teacher.json: not valid JSON"),
  (_ck("badarch"), "teacher.checkpoint: {teachers}/badarch/teacher.json: unknown network arch 'resnet'"),
  (_ck("mismatch"), "params.msgpack (net 'mlp' of teacher.json): does not match its spec"),
  # the command line itself
  (["--config=configs/missing.py"], "--config: the config file failed to load: OSError"),
  (
    ["--config=configs/gmm.py:bogus"],
    "--config: the config file failed to load: ValueError: configs/gmm.py: unknown variant",
  ),
  (["extra"], "unexpected arguments: extra"),
  (["--no_such_flag"], "no_such_flag"),
]


def _argv(case: list[str], workdir: str, teachers: str, with_config: bool = True) -> list[str]:
  case = [a.format(workdir=workdir, teachers=teachers) for a in case]
  base = [] if any(a.startswith("--config=") for a in case) else TINY
  return [*base, "--workdir", workdir, *case] if with_config else ["--workdir", workdir, *case]


def _run(argv, capsys) -> tuple[int, str]:
  capsys.readouterr()
  code = main_lib.run_in_process(argv)
  out = capsys.readouterr()
  return code, out.out + out.err


@pytest.mark.parametrize("case, message", CASES, ids=[" ".join(c)[:60] for c, _ in CASES])
def test_bad_command_line_is_one_clear_line(tmp_path, teachers_dir, capsys, case, message):
  workdir = str(tmp_path / "w")
  code, text = _run(_argv(case, workdir, str(teachers_dir)), capsys)
  assert code == 2, text[-2000:]
  assert "error: " in text and message.format(teachers=teachers_dir) in text, text[-2000:]
  assert "Traceback" not in text, text[-2000:]
  assert not os.path.exists(os.path.join(workdir, "checkpoints"))  # stopped before any compute


def test_required_flags(tmp_path, capsys):
  code, text = _run(["--workdir", str(tmp_path)], capsys)
  assert code == 2 and "error: --config is required" in text
  code, text = _run(TINY, capsys)
  assert code == 2 and "error: --workdir is required" in text


def test_good_teacher_checkpoint_passes_validation(teachers_dir):
  from configs.gmm import get_config
  from emd_jax.config.validation import validate_distill

  c = get_config("tiny")
  c.teacher.kind = "checkpoint"
  c.teacher.checkpoint = str(teachers_dir / "good")
  validate_distill(c)


def test_assert_at_least_thirty_cases():
  assert len(CASES) >= 30


@pytest.mark.parametrize(
  "args, message",
  [
    (["--config.nonexistent=1"], "--config.nonexistent: no such config field"),
    (["--config=configs/none.py"], "--config"),
  ],
)
def test_real_process(tmp_path, args, message):
  env = {**os.environ, "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu"}
  base = [] if args[0].startswith("--config=") else TINY
  cmd = [sys.executable, "-m", "emd_jax.main", *base, "--workdir", str(tmp_path / "w"), *args]
  r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=env, timeout=300)
  assert r.returncode == 2, r.stderr[-2000:]
  assert message in r.stderr and "Traceback" not in r.stderr + r.stdout, r.stderr[-2000:]


def test_inception_fid_without_its_files_fails_at_validation(tmp_path):
  """`eval.evaluator=inception_fid` is checked with the config, before the teacher or any compute."""
  from configs.digits import get_config
  from emd_jax.config.validation import ConfigError, validate_distill

  c = get_config("tiny")
  c.eval.evaluator = "inception_fid"
  with pytest.raises(ConfigError, match=r"eval\.inception_fid\.weights"):
    validate_distill(c)
  c.eval.inception_fid = {"weights": str(tmp_path / "absent.npz"), "reference_stats": str(tmp_path / "absent.npz")}
  with pytest.raises(ConfigError, match="absent.npz"):
    validate_distill(c)


def test_ud2m_scores_with_a_restoration_evaluator_only():
  """UD2M's PSNR/SSIM come from the registry's `restoration` evaluator; a samples-kind one is refused."""
  import ml_collections

  from configs.ud2m_digits_deblur import get_config
  from emd_jax.config.validation import ConfigError
  from emd_jax.jobs import ud2m

  c = get_config()
  ud2m.validate(c)  # no eval section: the `restoration` evaluator's defaults
  c.eval = ml_collections.ConfigDict({"evaluator": "digits"})
  with pytest.raises(ConfigError, match=r"eval\.evaluator.*restoration kind"):
    ud2m.validate(c)
  c.eval = ml_collections.ConfigDict({"evaluator": "restoration", "restoration": {"data_range": 2.0, "gamma": 1}})
  with pytest.raises(ConfigError, match=r"eval\.restoration\.gamma"):
    ud2m.validate(c)
