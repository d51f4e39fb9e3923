# Local stand-in for `python:3.11-slim`, for hosts that cannot pull from an image registry: Debian
# bookworm's Python 3.11 (with venv) on a base image made by `debootstrap` (scripts/stack.sh builds
# both). The project images only need `python` with the venv module: they install into /opt/venv.
# Select it with PYTHON_IMAGE=onerec-think-local/python:3.11 (docs/DEPLOY.md). Not used otherwise.
ARG DEBIAN_IMAGE=onerec-think-local/debian:bookworm
FROM ${DEBIAN_IMAGE}
ENV LANG=C.UTF-8 DEBIAN_FRONTEND=noninteractive
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv python-is-python3 ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && python --version
CMD ["python3"]
