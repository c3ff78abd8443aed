# Minimal image: the relay as a sidecar on 0.0.0.0:2525 inside the pod.
ARG BASE=python:3.12-slim
FROM ${BASE}
RUN useradd --system --home-dir /var/lib/sysmail-relay --create-home relay
WORKDIR /src
COPY pyproject.toml README.md ./
COPY relay ./relay
RUN pip install --no-cache-dir . && rm -rf /src
USER relay
ENV STATE_DIRECTORY=/var/lib/sysmail-relay \
    RELAY_LISTENER__HOST=0.0.0.0
VOLUME ["/var/lib/sysmail-relay"]
EXPOSE 2525
ENTRYPOINT ["sysmail-relay"]
CMD ["serve"]
