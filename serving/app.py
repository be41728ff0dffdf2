"""Entry point for `serve run serving.app:app` and `serve deploy serving/config.yaml` (run from the repo root).

Configuration: ANOMALYFLEET_SERVE_CONFIG (a YAML/JSON ServiceConfig), ANOMALYFLEET_REGISTRY, and
ANOMALYFLEET_SERVE_<FIELD> overrides; with none of them it serves the bundled detector as line "default".
`build` is the same application as a Serve application builder, for configs that pass `args`.
"""

from anomalyfleet.serving.app import build_app
from anomalyfleet.serving.config import ServiceConfig

app = build_app(ServiceConfig.from_env_or_file())


def build(args: dict):
    return build_app(ServiceConfig.from_mapping(dict(args)))
