# syntax=docker/dockerfile:1
#
# stargaze images. Targets:
#   kind-node (default)  a KinD node image: kindest/node plus stargaze, its systemd unit (started before
#                        containerd), and containerd configured with the `stargz` proxy snapshotter for CRI.
#                          docker build -t stargaze-kind-node .
#                          kind create cluster --image stargaze-kind-node
#   daemon               a plain image whose entrypoint is `stargaze daemon`, for a DaemonSet (see README).
#                          docker build --target daemon -t stargaze .
#
# Base images are build args, so a mirror or a pinned digest can be used (and the tests build this file
# offline against stand-ins made locally: test/e2e/dockerfile.test.ts).
ARG NODE_IMAGE=node:20-bookworm
ARG NODE_RUNTIME_IMAGE=node:20-bookworm-slim
ARG KIND_NODE_IMAGE=kindest/node:v1.29.14

# --- builder: compile, then keep only the runtime dependencies -----------------------------------------
FROM ${NODE_IMAGE} AS builder
# fuse-native's install keeps its prebuilt addon only if the addon loads, which needs libfuse.so.2;
# without it, it would compile from source.
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends libfuse2 \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY package.json package-lock.json ./
# Native modules: prebuilt binaries (better-sqlite3's are downloaded by prebuild-install, fuse-native's
# ship in its package), else compiled with the base image's toolchain.
RUN npm ci --no-audit --no-fund
COPY tsconfig.json ./
COPY proto ./proto
COPY src ./src
RUN npm run build \
 && npm prune --omit=dev --no-audit --no-fund \
 && mkdir -p /opt/stargaze/dist /opt/stargaze/script \
 && cp -a package.json proto node_modules /opt/stargaze/ \
 && cp -a dist/src /opt/stargaze/dist/src
COPY script/kind /opt/stargaze/script/kind
COPY --chmod=0755 script/stargaze /opt/stargaze/script/stargaze

# --- daemon: `stargaze daemon` as a container (DaemonSet) -----------------------------------------------
FROM ${NODE_RUNTIME_IMAGE} AS daemon
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends libfuse2 fuse3 ca-certificates \
 && rm -rf /var/lib/apt/lists/*
COPY --from=builder /opt/stargaze /opt/stargaze
COPY --chmod=0755 script/kind/stargaze /usr/local/bin/stargaze
# Mount /dev/fuse, /run/stargaze and /var/lib/stargaze (with Bidirectional propagation) from the host.
ENTRYPOINT ["/usr/local/bin/stargaze", "daemon"]
CMD ["--address", "/run/stargaze/stargaze.sock", "--root", "/var/lib/stargaze", "--config", "/etc/stargaze/config.toml", "--hosts-dir", "/etc/containerd/certs.d"]

# --- kind-node: a KinD node with stargaze as containerd's CRI snapshotter -------------------------------
FROM ${KIND_NODE_IMAGE} AS kind-node
# libfuse2: the FUSE library fuse-native loads; fuse3: fusermount3 and /etc/fuse.conf; pigz: containerd
# unpacks the layers that are not lazy (plain gzip) with parallel gzip.
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends libfuse2 fuse3 pigz ca-certificates \
 && rm -rf /var/lib/apt/lists/*
# The Node.js runtime is the builder's (one file; its libraries, glibc and libstdc++, are in the node image).
COPY --from=builder /usr/local/bin/node /usr/local/bin/node
COPY --from=builder /opt/stargaze /opt/stargaze
COPY --chmod=0755 script/kind/stargaze /usr/local/bin/stargaze
COPY script/systemd/stargaze.service /etc/systemd/system/stargaze.service
# Enabled by hand (what `systemctl enable` would link): started at boot, and pulled in by containerd,
# which is ordered after it (Before=containerd.service in the unit).
RUN mkdir -p /etc/systemd/system/multi-user.target.wants /etc/systemd/system/containerd.service.wants \
 && ln -sf /etc/systemd/system/stargaze.service /etc/systemd/system/multi-user.target.wants/stargaze.service \
 && ln -sf /etc/systemd/system/stargaze.service /etc/systemd/system/containerd.service.wants/stargaze.service \
 && /usr/local/bin/node /opt/stargaze/script/kind/configure-containerd.js \
      /etc/containerd/config.toml /run/stargaze/stargaze.sock /var/lib/stargaze \
 && /usr/local/bin/stargaze --version
