# syntax=docker/dockerfile:1
# genarm-serve on the official vLLM image of the version the package pins (pyproject: gpu extra).
# The CUDA stack, torch and vLLM come from that image; this adds the package and the pinned Python
# packages of deploy/requirements-gpu.txt, and runs as a non-root user.
#
#   docker build -t genarm-serve:0.1.0 .
#   docker run --gpus all --shm-size 8g -p 8000:8000 --stop-timeout 900 -v /srv/models:/models:ro \
#       -e GENARM_API_KEY genarm-serve:0.1.0 --base /models/base --arm harmless=/models/arms/harmless \
#       --shutdown-timeout 600
#
# Configuration: the genarm-serve command line, or a mounted YAML (--config /etc/genarm/serve.yaml),
# and GENARM_API_KEY from the environment. Keep the port 8000 inside the container (the health
# check probes it); publish it as any host port. More: deploy/README.md.
FROM vllm/vllm-openai:v0.26.0

LABEL org.opencontainers.image.title="genarm-serve" \
      org.opencontainers.image.description="OpenAI-compatible server for GenARM guided generation (base LLM + autoregressive reward models in one vLLM engine)" \
      org.opencontainers.image.version="0.1.0" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.base.name="docker.io/vllm/vllm-openai:v0.26.0"

ENV HOME=/home/genarm \
    GENARM_CACHE=/home/genarm/.cache/genarm-serve \
    HF_HOME=/home/genarm/.cache/huggingface \
    VLLM_NO_USAGE_STATS=1 \
    PYTHONUNBUFFERED=1

# Fail fast if the base image does not hold the vLLM version the package is built against.
RUN python3 -c "from importlib.metadata import version; v = version('vllm'); assert v.split('+')[0] == '0.26.0', v"

# Pinned dependencies first (a layer that changes only with the lock), then the package itself.
COPY deploy/requirements-gpu.txt /tmp/genarm/requirements-gpu.txt
RUN python3 -m pip install --no-cache-dir --no-deps -r /tmp/genarm/requirements-gpu.txt

COPY pyproject.toml README.md /tmp/genarm/src/
COPY server /tmp/genarm/src/server
COPY rm_training /tmp/genarm/src/rm_training
COPY genarm_common /tmp/genarm/src/genarm_common
RUN python3 -m pip install --no-cache-dir --no-deps --no-build-isolation /tmp/genarm/src \
    && rm -rf /tmp/genarm \
    && python3 -c "import server.config, server.engine" \
    && python3 -c "from importlib.metadata import entry_points as e; assert 'genarm' in e(group='vllm.general_plugins').names" \
    && useradd --no-log-init --create-home --home-dir /home/genarm --uid 10001 --gid 0 --shell /usr/sbin/nologin genarm \
    && mkdir -p /models /etc/genarm /home/genarm/.cache \
    && chown -R 10001:0 /home/genarm \
    && chmod -R g=u /home/genarm

# Numeric, so that Kubernetes can check runAsNonRoot. Group 0 owns the home directory, so an
# arbitrary UID (OpenShift) still has a writable HOME and caches.
USER 10001:0
WORKDIR /home/genarm
EXPOSE 8000
# On SIGTERM vLLM aborts in-flight generations unless --shutdown-timeout SECONDS lets them finish;
# the stop grace period must be longer (docker stop -t, compose stop_grace_period, Kubernetes
# terminationGracePeriodSeconds).
STOPSIGNAL SIGTERM
# Loading and compiling the models takes minutes on the first start: a long start period, probed often.
HEALTHCHECK --interval=30s --timeout=5s --retries=3 --start-period=20m --start-interval=10s \
    CMD ["python3", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=4)"]
ENTRYPOINT ["genarm-serve"]
CMD []
