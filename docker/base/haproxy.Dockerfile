# Local stand-in for `haproxy:2.8`, for hosts that cannot pull from an image registry: Debian bookworm's
# HAProxy 2.6 on a base image made by `debootstrap` (scripts/stack.sh builds it). Behaves like the official
# image where the stack relies on it: the configuration at /usr/local/etc/haproxy/haproxy.cfg (the `lb`
# service mounts deploy/haproxy.cfg there), HAProxy in the foreground as the container's process. Select it
# with HAPROXY_IMAGE=onerec-think-local/haproxy:2 (docs/DEPLOY.md). Not used otherwise.
ARG DEBIAN_IMAGE=onerec-think-local/debian:bookworm
FROM ${DEBIAN_IMAGE}
ENV DEBIAN_FRONTEND=noninteractive
RUN apt-get update \
 && apt-get install -y --no-install-recommends haproxy \
 && rm -rf /var/lib/apt/lists/* \
 && mkdir -p /usr/local/etc/haproxy
STOPSIGNAL SIGUSR1
EXPOSE 8080
CMD ["haproxy", "-W", "-db", "-f", "/usr/local/etc/haproxy/haproxy.cfg"]
