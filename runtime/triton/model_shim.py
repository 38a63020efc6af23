"""Triton Python-backend `model.py` written by sparsevlm-triton: puts `sparsevlm` on the path,
then hands every call to the serving model the config names (sparsevlm.runtime.triton).

`sparsevlm_site_dirs` (os.pathsep-separated) are added with site.addsitedir, after the stub
environment's own, so the stub keeps its numpy<2 while sparsevlm and its dependencies come
from the project environment. `serving_model` is "module:Class"."""

import importlib
import json
import os
import site
import sys


class TritonPythonModel:
    def initialize(self, args):
        params = {k: v.get("string_value", "") for k, v in json.loads(args["model_config"]).get("parameters", {}).items()}
        for directory in params.get("sparsevlm_site_dirs", "").split(os.pathsep):
            if directory and directory not in sys.path:
                site.addsitedir(directory)
        module, name = params["serving_model"].split(":")
        self.model = getattr(importlib.import_module(module), name)()
        self.model.initialize(args)

    def execute(self, requests):
        return self.model.execute(requests)

    def finalize(self):
        self.model.finalize()
