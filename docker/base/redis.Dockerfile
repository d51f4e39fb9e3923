# Local stand-in for `redis:7`, for hosts that cannot pull from an image registry: Debian bookworm's
# redis-server 7 on a base image made by `debootstrap` (scripts/stack.sh builds it). Behaves like the
# official image where the stack relies on it: data and working directory /data, runs as `redis`,
# `redis-cli` on the PATH, and `redis-server ARGS` without a config file accepts clients from other
# containers (protected mode off, as the official entrypoint does). Select it with
# REDIS_IMAGE=onerec-think-local/redis:7 (docs/DEPLOY.md). Not used otherwise.
ARG DEBIAN_IMAGE=onerec-think-local/debian:bookworm
FROM ${DEBIAN_IMAGE}
ENV DEBIAN_FRONTEND=noninteractive
RUN apt-get update \
 && apt-get install -y --no-install-recommends redis-server \
 && rm -rf /var/lib/apt/lists/* \
 && mkdir -p /data && chown redis:redis /data \
 && printf '%s\n' '#!/bin/sh' \
      '# `redis-server ARGS` without a config file: listen for other containers, like the official image' \
      'if [ "${1:-}" = redis-server ]; then shift; set -- redis-server --protected-mode no "$@"; fi' \
      'exec "$@"' > /usr/local/bin/redis-entrypoint \
 && chmod 755 /usr/local/bin/redis-entrypoint
WORKDIR /data
VOLUME /data
USER redis
EXPOSE 6379
ENTRYPOINT ["/usr/local/bin/redis-entrypoint"]
CMD ["redis-server"]
