# The image every KubeRay pod of k8s/ runs: Ray's own image plus dolly-ray and its pinned stack.
#
#   CPU (k8s/overlays/cpu-dev):
#     docker build -t registry.example.com/dolly-ray:0.1.0-cpu .
#   GPU (k8s/overlays/gpu-a100, gpu-h100):
#     docker build --build-arg RAY_IMAGE=rayproject/ray:2.60.0-py311-gpu -t registry.example.com/dolly-ray:0.1.0-gpu .
#
# Ray's version here, in pyproject.toml and in the manifests' rayVersion must be the same
# (tests/test_k8s.py checks it): KubeRay starts Ray from this image with that version's options.
ARG RAY_IMAGE=rayproject/ray:2.60.0-py311
FROM ${RAY_IMAGE}
ARG RAY_IMAGE

# torch first and exactly pinned, as the Makefile does. The CPU image takes the CPU-only wheel (the
# default Linux wheel pulls gigabytes of CUDA libraries it could not use); the GPU image takes the
# default wheel, built for CUDA, and flash-attention 2, the GPU presets' attn_implementation (its
# setup takes a published wheel that matches torch and CUDA where there is one, else compiles: long).
RUN case "${RAY_IMAGE}" in \
      *-gpu*) pip install --no-cache-dir torch==2.13.0 && pip install --no-cache-dir --no-build-isolation flash-attn==2.8.3 ;; \
      *) pip install --no-cache-dir torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu ;; \
    esac

WORKDIR /home/ray/dolly-ray
# Only what the package needs: no tests, runs, caches or virtual environments from the build context.
COPY --chown=ray:users pyproject.toml README.md ./
COPY --chown=ray:users contract contract
COPY --chown=ray:users pipelines pipelines
COPY --chown=ray:users services services
COPY --chown=ray:users cluster cluster
COPY --chown=ray:users ui ui
COPY --chown=ray:users loop loop
COPY --chown=ray:users cli cli
# Installed, not editable: the `dolly` command is on PATH, and Serve's import paths
# (services.app:build_app, ui.deployment:build_page_app) import from any working directory.
RUN pip install --no-cache-dir .
