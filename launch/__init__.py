"""Launchers: TPU VM pods (`tpu_vm.py`) and local multi-process runs (`local.py`)."""
