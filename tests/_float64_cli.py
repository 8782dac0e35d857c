"""``python tests/_float64_cli.py ARGS`` is ``python -m segprune.cli ARGS`` with float64 as torch's
default dtype, so the model (and, through ``engine.distributed.to_device``, every batch fed to
it) is float64. Used by tests/test_ddp.py, also under ``torch.distributed.run``, which can launch
a script but not ``python -c``. Not a test module (no ``test_`` prefix)."""
import os
import runpy
import sys

import torch

sys.path[0] = os.getcwd()  # as ``python -m`` (the current folder, not tests/, first on the path)
torch.set_default_dtype(torch.float64)
runpy.run_module("segprune.cli", run_name="__main__", alter_sys=True)
