"""Method presets: the rows of ALGORITHMS.md section 6 as config defaults.

`config.method` names a preset. Fields left as placeholders (None) in
`config.estep` and `config.loss` take the preset's value; a field set in the
config file or on the command line wins, so e.g.
`--config.method=emd --config.estep.num_steps=16` is EMD-16.
"""

from __future__ import annotations

# name -> (estep.num_steps, loss.name, loss.distance, loss.weight, description)
PRESETS: dict[str, tuple[int, str, str, str, str]] = {
  "emd_sim": (4, "emd", "pseudo_huber", "one", "EMD E-step + SIM's pseudo-Huber as a fixed direction"),
  "emd": (4, "emd", "linear", "sigma2", "EM Distillation: E-step + linear M-step"),
  "sim": (0, "sim", "pseudo_huber", "one", "Score Implicit Matching, pseudo-Huber"),
  "sid": (0, "sid", "l2", "one", "Score identity Distillation (SiD), alpha = loss.sid_alpha"),
  "di": (0, "di", "linear", "one", "Diff-Instruct / VSD (reverse KL)"),
  "dmd": (0, "dmd", "linear", "one", "DMD: Diff-Instruct with DMD's normalised weight"),
  "emd_simloss": (4, "sim", "pseudo_huber", "one", "EMD E-step + SIM's loss at its samples (default)"),
  "emd_simloss_k1": (1, "sim", "pseudo_huber", "one", "the same with one Langevin step (digits default)"),
  # With the adversarial term on real data (ADVERSARIAL below; docs/algorithms.md "Adversarial term").
  "sida": (0, "sid", "l2", "one", "SiDA: SiD + adversarial term (discriminator on the fake score's encoder)"),
  "dmd2": (0, "dmd", "linear", "one", "DMD2: DMD + adversarial term, 5 fake updates per generator step"),
  "emd_sim_adv": (4, "sim", "pseudo_huber", "one", "the default row (emd_simloss) + adversarial term"),
}

# The adversarial presets' extra fields. `loss.adv_weight` and `fake.adv_weight` are placeholders
# (None: from here, 0.0 for every other row); `fake.steps_per_gen_step` is set only while it holds
# its default 1 (an explicit 1 cannot be told apart: use `method=dmd` with the weights for that).
# DMD2's values are its ImageNet-64 recipe (gen 3e-3, discriminator 1e-2, 5 fake updates per generator
# update); SiDA and emd_sim_adv reuse those weights (project choice; docs/algorithms.md).
ADVERSARIAL: dict[str, dict[str, float]] = {
  "sida": {"loss.adv_weight": 3e-3, "fake.adv_weight": 1e-2},
  "dmd2": {"loss.adv_weight": 3e-3, "fake.adv_weight": 1e-2, "fake.steps_per_gen_step": 5},
  "emd_sim_adv": {"loss.adv_weight": 3e-3, "fake.adv_weight": 1e-2},
}


def resolve(config) -> None:
  """Fills unset `estep.num_steps`, `loss.name/distance/weight` from `config.method`.

  Mutates `config` in place (unlock-free: only placeholder fields are set). `config.method` must
  be a key of `PRESETS`: `emd_jax.config.validation.validate_distill` checks it (and then calls
  this); a bad name here is a `KeyError`.
  """
  num_steps, name, distance, weight, _ = PRESETS[config.method]
  if config.estep.num_steps is None:
    config.estep.num_steps = num_steps
  if config.loss.name is None:
    config.loss.name = name
  if config.loss.distance is None:
    config.loss.distance = distance
  if config.loss.weight is None:
    config.loss.weight = weight
  extra = ADVERSARIAL.get(config.method, {})
  for section in ("loss", "fake"):
    if section in config and config[section].get("adv_weight", 0.0) is None:
      config[section].adv_weight = extra.get(f"{section}.adv_weight", 0.0)
  if "fake.steps_per_gen_step" in extra and config.fake.steps_per_gen_step == 1:
    config.fake.steps_per_gen_step = extra["fake.steps_per_gen_step"]


def describe() -> str:
  """A markdown table of the presets (for --help text and README)."""
  rows = ["| method | E-step K | M-step loss | distance | weight | what it is |", "|---|---|---|---|---|---|"]
  for key, (k, name, dist, w, desc) in PRESETS.items():
    rows.append(f"| `{key}` | {k} | {name} | {dist} | {w} | {desc} |")
  return "\n".join(rows)
