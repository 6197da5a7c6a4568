# HAProxy for the compose stack, from Debian's haproxy package (2.6, the version
# the project tests against), for hosts that cannot pull the official haproxy:2.6.
# Build from the repository root; `make image` does it:
#   docker build -f deploy/haproxy.Dockerfile --build-arg BASE_IMAGE=sutra-base:bookworm -t sutra-haproxy:2.6 .
# apt reads Debian's archive over plain HTTP (signed by Debian's keys), so no CA
# bundle is needed here.
ARG BASE_IMAGE=debian:bookworm-slim
FROM ${BASE_IMAGE}
ARG HAPROXY_VERSION=2.6.*
LABEL org.opencontainers.image.title="sutra-haproxy" \
      org.opencontainers.image.description="Debian's HAProxy 2.6 for the sutra-embed compose stack"
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# The package's postinst would start a service; policy-rc.d says no. The runtime
# user is uid 10001 like the sutra image, so both read the same certificates volume.
RUN printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod 755 /usr/sbin/policy-rc.d && \
    apt-get update && \
    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "haproxy=${HAPROXY_VERSION}" && \
    rm -rf /var/lib/apt/lists/* /usr/sbin/policy-rc.d && \
    groupadd --system --gid 10001 sutra && \
    useradd --system --uid 10001 --gid 10001 --no-create-home sutra && \
    mkdir -p /usr/local/etc/haproxy
USER 10001:10001
EXPOSE 50060 9999
STOPSIGNAL SIGUSR1
CMD ["haproxy", "-W", "-db", "-f", "/usr/local/etc/haproxy/haproxy.cfg"]
