# The kvfleet image: a Ray image with CUDA, plus kvfleet and its dependencies (torch, Triton, the
# gRPC code generated from protos/). The Helm chart (helm/kvfleet) runs every Ray pod from it.
#
#   docker build -t registry.example.com/kvfleet:0.1.0 .
#   docker push registry.example.com/kvfleet:0.1.0
#   helm install kvfleet ./helm/kvfleet --set image.repository=registry.example.com/kvfleet
#
# RAY_VERSION must equal the chart's `rayVersion` (KubeRay reads it) and be one kvfleet supports
# (pyproject.toml: ray[serve] >= 2.47). RAY_FLAVOR picks the image's Python and CUDA: kvfleet needs
# Python >= 3.11. torch comes from PyPI with its own CUDA libraries (the nodes need a recent driver).
ARG RAY_VERSION=2.60.0
ARG RAY_FLAVOR=py311-cu128
FROM docker.io/rayproject/ray:${RAY_VERSION}-${RAY_FLAVOR}

ARG RAY_VERSION
# Built from a scratch copy, which is then removed: kvfleet lands in site-packages and no source
# tree can shadow it from a worker's working directory. Pinning ray keeps the image's Ray as is.
# /home/ray/models is the demo model pair the package ships (the chart's default model.path).
COPY --chown=ray:users . /tmp/kvfleet-src
RUN pip install --no-cache-dir "/tmp/kvfleet-src" "ray[serve]==${RAY_VERSION}" \
    && rm -rf /tmp/kvfleet-src \
    && ln -s "$(python -c 'from cluster.demo.model import DEMO_PAIR_DIR; print(DEMO_PAIR_DIR)')" /home/ray/models \
    && python -c "import cluster.app, protos.kvfleet.v1.generation_pb2_grpc" \
    && kvfleet --help > /dev/null
WORKDIR /home/ray
