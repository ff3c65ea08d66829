"""DDPO core: config, trajectories, the DDIM step with log-probs, the policy, LoRA files."""

from ddpo.quiet import quiet

quiet()  # before any ddpo module imports diffusers (ddpo/quiet.py says why)
