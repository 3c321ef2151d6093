#!/usr/bin/env node
// Points containerd's config at stargaze, keeping everything else the file already says (a KinD node's
// config carries its own CRI settings). Run at image build time:
//
//   node configure-containerd.js [CONFIG] [SOCKET] [ROOT]
//     CONFIG  containerd config (default /etc/containerd/config.toml; created if missing)
//     SOCKET  stargaze's socket (default /run/stargaze/stargaze.sock)
//     ROOT    stargaze's --root, exported to containerd as the reference does (default /var/lib/stargaze)
//
// Sets [proxy_plugins.stargz] (type "snapshot", address, exports.root) and, for CRI,
// snapshotter = "stargz" and disable_snapshot_annotations = false (without the annotations CRI pulls
// are never lazy): under plugins."io.containerd.grpc.v1.cri".containerd for config version 2
// (containerd 1.x), under plugins."io.containerd.cri.v1.images" for version 3 (containerd 2.x).
// The file is parsed and written back as TOML (comments are not kept); plain JS so the image needs
// no build step for it, and smol-toml comes from /opt/stargaze/node_modules.
'use strict';
const fs = require('node:fs');
const path = require('node:path');
const TOML = require('smol-toml');

const PROXY_PLUGIN = 'stargz';
const [configPath = '/etc/containerd/config.toml', socket = '/run/stargaze/stargaze.sock', root = '/var/lib/stargaze'] =
  process.argv.slice(2);

function table(parent, key) {
  const v = parent[key];
  if (v === undefined) return (parent[key] = {});
  if (typeof v !== 'object' || v === null || Array.isArray(v)) throw new Error(`${configPath}: ${key} is not a table`);
  return v;
}

const config = fs.existsSync(configPath) ? TOML.parse(fs.readFileSync(configPath, 'utf8')) : {};
const version = config.version ?? 2;
if (config.version === undefined) config.version = version;
if (version !== 2 && version !== 3) throw new Error(`${configPath}: containerd config version ${version} is not supported (2 or 3)`);

const proxy = table(table(config, 'proxy_plugins'), PROXY_PLUGIN);
proxy.type = 'snapshot';
proxy.address = socket;
table(proxy, 'exports').root = root;

const plugins = table(config, 'plugins');
const cri = version === 2 ? table(table(plugins, 'io.containerd.grpc.v1.cri'), 'containerd') : table(plugins, 'io.containerd.cri.v1.images');
cri.snapshotter = PROXY_PLUGIN;
cri.disable_snapshot_annotations = false;

fs.mkdirSync(path.dirname(configPath), { recursive: true });
fs.writeFileSync(configPath, TOML.stringify(config) + '\n');
process.stdout.write(`configured ${configPath}: proxy plugin ${PROXY_PLUGIN} at ${socket}, CRI snapshotter ${PROXY_PLUGIN}\n`);
