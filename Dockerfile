# The image the deploy/k8s manifests run: every hami-ray command (scheduler, extender, webhook,
# device-plugin). For Ray nodes (deploy/k8s/raycluster.yaml), install the same package on rayproject/ray.
FROM python:3.11-slim
WORKDIR /src
COPY pyproject.toml setup.py README.md LICENSE ./
COPY hami_ray hami_ray
COPY node_actors node_actors
RUN pip install --no-cache-dir . \
    && python -c "import hami_ray.k8s.deviceplugin" \
    && useradd --uid 65532 --no-create-home hami-ray
USER 65532
ENTRYPOINT []
CMD ["hami-ray", "--help"]
