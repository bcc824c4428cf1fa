"""The serving application, importable by path:

    serve run services.app:build_app model=dolly@latest
    serve build services.app:build_app model=dolly@latest -o serve.yaml     # for a KubeRay serveConfigV2

`args` are ServeConfig's settings (nested ones through a config file's `args:`). Deploying again
with another model version updates the running application in place: Serve starts replicas of
the new version, moves traffic to them and lets the old ones finish what they hold.
"""

# No `from __future__ import annotations`: Serve reads the builder's annotation to validate args.
from ray.serve import Application

from contract.registry import resolve
from services.config import ServeConfig
from services.generator import check_export
from services.ingress import OpenAIIngress
from services.model import DollyModel


def build_app(config: ServeConfig) -> Application:
    folder, version = resolve(config.model, config.registry)
    folder = folder.resolve()  # replicas run in other working directories
    check_export(folder)
    model = DollyModel.options(**config.model_deployment_options()).bind(str(folder), config)
    return OpenAIIngress.options(**config.ingress_deployment_options()).bind(model, str(folder), version, config)
