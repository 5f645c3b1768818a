# vitpeer for volunteers: one image runs a peer (`join`), a coordinator or the swarm monitor.
#
#   docker build -t vitpeer .
#   docker run --rm --gpus all --ipc host -p 31337:31337 -p 9470:9470 -v vitpeer-data:/data \
#       vitpeer join --coordinator http://HOST:8470 --output-dir /data/peer --host-port 31337 \
#       --metrics-addr 0.0.0.0 --metrics-port 9470
#
# The base image already holds CUDA, cuDNN, torch and torchvision (about 3 GB); installing vitpeer must not pull a
# second torch. vitpeer's own pins are lower bounds (torch>=2.4, torchvision>=0.19) and so are its dependencies'
# (pytorch-lightning: torch>=2.1; torchmetrics: torch>=2.0; hivemind and lightning-utilities: torch>=1.9; timm: any
# torch and torchvision), so the preinstalled builds satisfy them. The constraint file written below pins torch and
# torchvision to exactly the preinstalled versions, so a dependency that ever wanted another torch fails the build
# instead of silently downloading one. (constraints.txt in the repository pins the versions CI tests with; it is not
# used here.) Pick another CUDA build with --build-arg BASE_IMAGE=pytorch/pytorch:<version>-cuda<X.Y>-cudnn9-runtime.
ARG BASE_IMAGE=pytorch/pytorch:2.9.1-cuda12.8-cudnn9-runtime

# Stage 1: the wheel, exactly what `pip install vitpeer` would install (vitpeer.peer, .coordinator, .monitor and the
# configs and monitoring files as package data), built from the sources only; its dependencies are not resolved here.
FROM ${BASE_IMAGE} AS wheel
WORKDIR /src
COPY pyproject.toml README.md ./
COPY configs ./configs
COPY peer ./peer
COPY coordinator ./coordinator
COPY monitor ./monitor
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /wheels .

# Stage 2: the image volunteers run. No source tree in it: vitpeer lives in site-packages, and `--config NAME` finds
# the configs there (vitpeer.configs).
FROM ${BASE_IMAGE}

# Everything a run writes (checkpoints, identity keys, data sets, Hugging Face and torch caches) goes under /data:
# mount a volume there to keep a peer's identity and downloads across restarts.
ENV HOME=/data \
    XDG_CACHE_HOME=/data/.cache \
    HF_HOME=/data/.cache/huggingface \
    TORCH_HOME=/data/.cache/torch \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

RUN groupadd --system --gid 10001 vitpeer \
    && useradd --system --uid 10001 --gid vitpeer --home-dir /data --no-create-home --shell /usr/sbin/nologin vitpeer \
    && mkdir -p /data \
    && chown vitpeer:vitpeer /data

# The wheel is bind-mounted from stage 1 (BuildKit), so it leaves no layer behind; pip compiles the installed modules,
# as root, so the non-root user never needs to write bytecode.
RUN --mount=type=bind,from=wheel,source=/wheels,target=/wheels \
    python -c "import importlib.metadata as m; print('\n'.join(f'{d}=={m.version(d)}' for d in ('torch', 'torchvision')))" \
        > /tmp/preinstalled.txt \
    && pip install --no-cache-dir --constraint /tmp/preinstalled.txt /wheels/vitpeer-*.whl \
    && rm /tmp/preinstalled.txt

# numeric, so that Kubernetes' runAsNonRoot and hosts without this passwd entry can check it
USER 10001:10001
VOLUME /data
WORKDIR /data
# 31337: DHT (libp2p, TCP), open it to the internet; 9470: a peer's /metrics; 8470: the coordinator's HTTP API.
# Both HTTP servers bind 127.0.0.1 unless asked, which a published port cannot reach: pass --metrics-addr 0.0.0.0
# (a peer) or --http-host 0.0.0.0 (a coordinator).
EXPOSE 31337 9470 8470

# Healthy while /metrics answers: a peer's exporter (VITPEER_METRICS_PORT, default 9470), or the coordinator's API
# when the container sets VITPEER_METRICS_PORT=8470. Exec form: no shell, so the port is read inside Python.
HEALTHCHECK --interval=15s --timeout=5s --start-period=2m --retries=3 \
    CMD ["python", "-c", "import os, sys, urllib.request; port = os.environ.get('VITPEER_METRICS_PORT') or '9470'; sys.exit(0 if urllib.request.urlopen(f'http://127.0.0.1:{port}/metrics', timeout=4).status == 200 else 1)"]

ENTRYPOINT ["vitpeer"]
CMD ["join", "--help"]
