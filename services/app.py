"""The serving application, importable by path:

    serve run services.app:build_app model=dolly@latest
    serve build services.app:build_app model=dolly@latest -o serve.yaml     # for a KubeRay serveConfigV2

    serve run services.app:build_app adapters=[dolly-support,dolly-legal]    # LoRA adapters on one base

`args` are ServeConfig's settings (nested ones through a config file's `args:`). Deploying again
with another model version updates the running application in place: Serve starts replicas of
the new version, moves traffic to them and lets the old ones finish what they hold. Adapters
need no redeploy: a promoted version loads on the first request for it.
"""

# No `from __future__ import annotations`: Serve reads the builder's annotation to validate args.
from ray.serve import Application

from services.config import ServeConfig, what_to_serve
from services.ingress import OpenAIIngress
from services.model import DollyModel


def build_app(config: ServeConfig) -> Application:
    served = what_to_serve(config)
    folder = str(served.folder)
    model = DollyModel.options(**config.model_deployment_options()).bind(folder, config, served.adapter, served.base)
    ingress = OpenAIIngress.options(**config.ingress_deployment_options())
    return ingress.bind(model, folder, served.version, config, served.base)
