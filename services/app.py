"""The serving application, importable by path:

    serve run services.app:build_app model=dolly@latest
    serve build services.app:build_app model=dolly@latest -o serve.yaml     # for a KubeRay serveConfigV2

    serve run services.app:build_app adapters=[dolly-support,dolly-legal]    # LoRA adapters on one base

`args` are ServeConfig's settings (nested ones through a config file's `args:`). Deploying again
with another model version updates the running application in place: Serve starts replicas of
the new version, moves traffic to them and lets the old ones finish what they hold. Adapters
need no redeploy: a promoted version loads on the first request for it.

With engine.kind=vllm the model replicas are Ray Serve LLM's vLLM server (services/vllm_model.py)
under the same ingress, run from vLLM's own environment.
"""

# No `from __future__ import annotations`: Serve reads the builder's annotation to validate args.
from pathlib import Path

from ray.serve import Application

from contract.errors import UserError
from contract.models import load_tokenizer
from services.config import ServeConfig, what_to_serve
from services.ingress import OpenAIIngress
from services.model import DollyModel
from services.prompts import context_limit


def build_app(config: ServeConfig) -> Application:
    served = what_to_serve(config)
    folder = str(served.folder)
    if config.engine.kind == "vllm":  # with adapters, vLLM holds their base and loads each adapter by its version
        model = _vllm_model(config, Path(served.base) if config.adapters else served.folder)
    else:
        model = DollyModel.options(**config.model_deployment_options()).bind(folder, config, served.adapter, served.base)
    ingress = OpenAIIngress.options(**config.ingress_deployment_options())
    return ingress.bind(model, folder, served.version, config, served.base)


def _vllm_model(config: ServeConfig, folder: Path):
    try:
        from services.vllm_model import vllm_deployment
    except ImportError as e:
        raise UserError(
            f"engine.kind=vllm needs vLLM and Ray Serve LLM where the app is built and served ({e}): build their "
            "environment with `make vllm` and serve from it (.venv-vllm/bin/dolly serve ...), or use k8s/'s vLLM "
            "serving image; engine.kind=dolly serves from this one"
        ) from None
    return vllm_deployment(config, folder, context_limit(folder, load_tokenizer(str(folder)), config.engine.max_context))
