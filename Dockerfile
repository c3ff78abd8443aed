# sysmail-relay as a container: the relay as a sidecar, or as a relay for other containers.
#
# Build with deploy/container/build-image.sh: it makes the wheels on the host
# (build/image/wheels/) and then runs `podman build` / `docker build` here; the
# build itself needs no network (pip install --no-index). BASE is any Debian-like
# image with python3 >= 3.11 and its venv module (the official python:*-slim images).
#
# Runtime: non-root user relay (uid/gid 2525); the state directory (spool, outbox,
# OAuth tokens) is the volume /var/lib/sysmail-relay; the configuration comes from
# /etc/sysmail-relay/relay.toml if mounted, else the built-in default, with
# RELAY_SECTION__KEY environment variables over it and secrets read from files
# (password_file = "/run/secrets/..."). The daemon is PID 1 and handles SIGTERM
# itself (stops accepting, finishes what is in flight, exits 0) and SIGHUP (reload).
# See docs/operations.md.
ARG BASE=python:3.12-slim

FROM ${BASE} AS install
LABEL org.sysmail-relay.stage=install
COPY build/image/wheels/ /tmp/wheels/
RUN python3 -m venv /opt/sysmail-relay \
 && /opt/sysmail-relay/bin/pip install --no-index --no-cache-dir --disable-pip-version-check \
        --find-links /tmp/wheels sysmail-relay \
 && /opt/sysmail-relay/bin/pip uninstall --yes --quiet pip setuptools

FROM ${BASE}
RUN groupadd --system --gid 2525 relay \
 && useradd --system --uid 2525 --gid relay --home-dir /var/lib/sysmail-relay --no-create-home \
        --shell /usr/sbin/nologin relay \
 && mkdir -p /var/lib/sysmail-relay /etc/sysmail-relay \
 && chown relay:relay /var/lib/sysmail-relay && chmod 0700 /var/lib/sysmail-relay
COPY --from=install /opt/sysmail-relay /opt/sysmail-relay
COPY deploy/container/healthcheck.py /usr/local/bin/sysmail-relay-healthcheck
ENV PATH=/opt/sysmail-relay/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    STATE_DIRECTORY=/var/lib/sysmail-relay \
    RELAY_LISTENER__HOST=0.0.0.0
VOLUME ["/var/lib/sysmail-relay"]
WORKDIR /var/lib/sysmail-relay
EXPOSE 2525
USER 2525:2525
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=30s --timeout=10s --start-period=20s --retries=3 \
    CMD ["/usr/local/bin/sysmail-relay-healthcheck", "/healthz"]
ENTRYPOINT ["sysmail-relay"]
CMD ["serve"]
