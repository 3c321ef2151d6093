/**
 * A private containerd (own root, state, sockets and config in a tmp dir; CRI disabled) that
 * optionally loads stargaze as the `stargz` proxy snapshotter, plus `ctr` / `ctr-remote` helpers
 * bound to its socket and per-test namespaces.
 *
 * runc state (/run/containerd/runc/<namespace>) and shim sockets are shared with any other
 * containerd on the machine, so every namespace and container id made here is unique, and `stop()`
 * kills tasks before containerd itself, then sweeps up shims and container processes that escaped.
 */
import { spawnSync } from 'node:child_process';
import { createHash, randomBytes } from 'node:crypto';
import { readdirSync, readFileSync, rmdirSync } from 'node:fs';
import { mkdir, writeFile } from 'node:fs/promises';
import path from 'node:path';
import * as grpc from '@grpc/grpc-js';
import { loadSnapshotsService } from '../../../src/service/snapshots-service';
import { addExitGuard, bestEffort, type CleanupScope } from './cleanup';
import { CommandError, readTail, run, signalGroup, spawnGroup, waitFor, type ProcessGroup, type RunOptions, type RunResult } from './exec';
import { createTmpRoot, unmountUnder } from './tmp';

const CONTAINERD_BIN = 'containerd';
const CTR_BIN = 'ctr';
const CTR_REMOTE_BIN = 'ctr-remote';
const READY_TIMEOUT_MS = 30_000;
const STOP_GRACE_MS = 10_000;
/** The proxy plugin name containerd users pass as `--snapshotter`. */
export const STARGZ_SNAPSHOTTER = 'stargz';
const RUNC_STATE_ROOT = '/run/containerd/runc';
const CGROUP_ROOT = '/sys/fs/cgroup';

export interface ContainerdOptions {
  /** Where to register `stop()`; without it the caller must call `stop()`. */
  scope?: CleanupScope;
  /** Unix socket of the stargaze daemon: adds `[proxy_plugins.<proxyPluginName>]`. */
  stargazeAddress?: string;
  /** The daemon's root, exported to containerd like the reference config does. */
  stargazeRoot?: string;
  /** Defaults to `stargz`. */
  proxyPluginName?: string;
  /** More proxy snapshotters, each under its own name (the benchmarks' peer beside stargaze, say). */
  proxyPlugins?: ProxyPlugin[];
  /** containerd log level; defaults to info. */
  logLevel?: string;
  /** TOML appended to the generated config. */
  extraConfig?: string;
  /** Keep containerd's CRI plugin (disabled by default); configure it through `extraConfig`. */
  enableCri?: boolean;
}

export interface ProxyPlugin {
  /** What `--snapshotter` takes. */
  name: string;
  /** Its unix socket. */
  address: string;
  /** Its root, exported to containerd like the reference config does. */
  root?: string;
}

export interface CtrOptions extends RunOptions {
  /** Defaults to the instance's `namespace`. */
  namespace?: string;
}

export interface PullOptions extends CtrOptions {
  /** Defaults to true: every registry in the harness is plain HTTP on 127.0.0.1. */
  plainHttp?: boolean;
  snapshotter?: string;
  extraArgs?: string[];
}

export interface RunContainerOptions extends CtrOptions {
  snapshotter?: string;
  /** Container id; a unique one is made up otherwise. */
  id?: string;
  extraArgs?: string[];
}

export interface MountImageOptions extends CtrOptions {
  snapshotter?: string;
  rw?: boolean;
}

export interface Containerd {
  /** The containerd gRPC socket (what `--address` takes). */
  readonly address: string;
  /** Tmp dir holding root/, state/, config.toml and containerd.log. */
  readonly dir: string;
  readonly configPath: string;
  readonly logFile: string;
  /** Default namespace for the helpers below (unique to this instance). */
  readonly namespace: string;
  /** A new unique namespace name, remembered for cleanup. */
  newNamespace(label?: string): string;
  /** A unique container id. */
  uniqueId(label?: string): string;
  /** `ctr --address <sock> -n <ns> <args>`. */
  ctr(args: string[], opts?: CtrOptions): Promise<RunResult>;
  /** `ctr-remote --address <sock> -n <ns> <args>`. */
  ctrRemote(args: string[], opts?: CtrOptions): Promise<RunResult>;
  /** `ctr images pull --plain-http [--snapshotter S] <ref>` (fetch and unpack). */
  pull(ref: string, opts?: PullOptions): Promise<RunResult>;
  /** `ctr content fetch --plain-http <ref>`: image record and content, no unpack. */
  fetch(ref: string, opts?: PullOptions): Promise<RunResult>;
  /** `ctr-remote images rpull --plain-http <ref>` (snapshotter defaults to stargz). */
  rpull(ref: string, opts?: PullOptions): Promise<RunResult>;
  /** `ctr run --rm [--snapshotter S] <ref> <id> <command...>`; stdout is the container's. */
  runContainer(ref: string, command: string[], opts?: RunContainerOptions): Promise<RunResult>;
  /** `ctr images mount`: the image's rootfs at `target` (unmounted by `stop()` if still there). */
  mountImage(ref: string, target: string, opts?: MountImageOptions): Promise<void>;
  /** `ctr images unmount --rm <target>`. */
  unmountImage(target: string, opts?: CtrOptions): Promise<void>;
  /** `ctr images rm --sync <refs...>` (content is garbage collected before this returns). */
  removeImages(refs: string[], opts?: CtrOptions): Promise<void>;
  /** Force-deletes every task and container in every namespace of this containerd. */
  killAllTasks(): Promise<void>;
  /** Kills tasks, stops containerd, sweeps leftovers, unmounts and removes the tmp dir. */
  stop(): Promise<void>;
}

interface ApiMount {
  type: string;
  source: string;
  options: string[];
}

/** Snapshots.View on containerd's own API (same service and messages as the proxy's), with labels. */
function viewSnapshot(
  address: string,
  namespace: string,
  snapshotter: string,
  key: string,
  parent: string,
  labels: Record<string, string>,
): Promise<ApiMount[]> {
  const Client = grpc.makeGenericClientConstructor(loadSnapshotsService(), 'Snapshots');
  const client = new Client(`unix://${address}`, grpc.credentials.createInsecure()) as unknown as grpc.Client & {
    View: (req: unknown, md: grpc.Metadata, cb: (err: grpc.ServiceError | null, res?: { mounts: ApiMount[] }) => void) => void;
  };
  const md = new grpc.Metadata();
  md.set('containerd-namespace', namespace);
  return new Promise((resolve, reject) => {
    client.View({ snapshotter, key, parent, labels }, md, (err, res) => {
      client.close();
      if (err) reject(new Error(`Snapshots.View ${key}: ${err.message}`));
      else resolve(res?.mounts ?? []);
    });
  });
}

/** Retries of a container run that containerd failed while reconnecting to the snapshotter. */
const RECONNECT_ATTEMPTS = 10;
const RECONNECT_RETRY_MS = 500;

function randomSuffix(): string {
  return randomBytes(4).toString('hex');
}

function containerdConfig(dir: string, opts: ContainerdOptions): string {
  const q = (s: string): string => JSON.stringify(s);
  const lines = [
    'version = 2',
    `root = ${q(path.join(dir, 'root'))}`,
    `state = ${q(path.join(dir, 'state'))}`,
    'disabled_plugins = [',
    ...(opts.enableCri ? [] : ['  "io.containerd.grpc.v1.cri",']),
    '  "io.containerd.snapshotter.v1.aufs",',
    '  "io.containerd.snapshotter.v1.btrfs",',
    '  "io.containerd.snapshotter.v1.devmapper",',
    '  "io.containerd.snapshotter.v1.zfs",',
    ']',
    '',
    '[grpc]',
    `  address = ${q(path.join(dir, 'containerd.sock'))}`,
    '[ttrpc]',
    `  address = ${q(path.join(dir, 'containerd.sock.ttrpc'))}`,
    '[debug]',
    `  address = ${q(path.join(dir, 'debug.sock'))}`,
    `  level = ${q(opts.logLevel ?? 'info')}`,
    '[metrics]',
    '  address = ""',
    '',
    '[plugins."io.containerd.internal.v1.opt"]',
    `  path = ${q(path.join(dir, 'opt'))}`,
  ];
  const plugins: ProxyPlugin[] = [
    ...(opts.stargazeAddress ? [{ name: opts.proxyPluginName ?? STARGZ_SNAPSHOTTER, address: opts.stargazeAddress, root: opts.stargazeRoot }] : []),
    ...(opts.proxyPlugins ?? []),
  ];
  const names = plugins.map((p) => p.name);
  const twice = names.find((n, i) => names.indexOf(n) !== i);
  if (twice !== undefined) throw new Error(`two proxy plugins named ${twice}: containerd would not start`);
  for (const p of plugins) {
    lines.push('', `[proxy_plugins.${q(p.name)}]`, '  type = "snapshot"', `  address = ${q(p.address)}`);
    if (p.root) lines.push(`[proxy_plugins.${q(p.name)}.exports]`, `  root = ${q(p.root)}`);
  }
  if (opts.extraConfig) lines.push('', opts.extraConfig);
  lines.push('');
  return lines.join('\n');
}

/**
 * Sweeps up what a stopped (or killed) containerd leaves behind: SIGKILLs its shims (they are
 * started with `-address <its socket>` and outlive it) and the processes in its namespaces'
 * cgroups, force-deletes their runc state, removes the cgroups. Synchronous, so an exit guard can
 * run it too.
 */
function sweepSync(address: string, namespaces: Iterable<string>): void {
  for (const name of readdirSync('/proc')) {
    if (!/^\d+$/.test(name)) continue;
    try {
      const argv = readFileSync(`/proc/${name}/cmdline`, 'utf8').split('\0');
      const i = argv.indexOf('-address');
      if (i >= 0 && argv[i + 1] === address) process.kill(Number(name), 'SIGKILL');
    } catch {
      // exited meanwhile
    }
  }
  let bases: string[] = [];
  try {
    bases = [CGROUP_ROOT, ...readdirSync(CGROUP_ROOT).map((n) => path.join(CGROUP_ROOT, n))];
  } catch {
    // no cgroupfs
  }
  for (const ns of namespaces) {
    const cgroupDirs: string[] = [];
    for (const base of bases) {
      const stack = [path.join(base, ns)];
      while (stack.length > 0) {
        const dir = stack.pop()!;
        try {
          for (const pid of readFileSync(path.join(dir, 'cgroup.procs'), 'utf8').split('\n').filter(Boolean)) {
            try {
              process.kill(Number(pid), 'SIGKILL');
            } catch {
              // gone
            }
          }
          cgroupDirs.push(dir);
          for (const e of readdirSync(dir, { withFileTypes: true })) if (e.isDirectory()) stack.push(path.join(dir, e.name));
        } catch {
          // not there
        }
      }
    }
    const runcRoot = path.join(RUNC_STATE_ROOT, ns);
    try {
      for (const id of readdirSync(runcRoot)) spawnSync('runc', ['--root', runcRoot, 'delete', '--force', id], { stdio: 'ignore' });
      rmdirSync(runcRoot);
    } catch {
      // nothing left
    }
    // killed processes take a moment to leave their cgroups; rmdir fails (EBUSY) until then
    for (const dir of cgroupDirs.sort((a, b) => b.length - a.length)) {
      for (let attempt = 0; attempt < 20; attempt++) {
        try {
          rmdirSync(dir);
          break;
        } catch (err) {
          if ((err as NodeJS.ErrnoException).code === 'ENOENT') break;
          Atomics.wait(new Int32Array(new SharedArrayBuffer(4)), 0, 0, 25);
        }
      }
    }
  }
}

/** Starts containerd and waits until `ctr version` answers on its socket. */
export async function startContainerd(opts: ContainerdOptions = {}): Promise<Containerd> {
  const tmp = await createTmpRoot('containerd');
  const dir = tmp.dir;
  const address = path.join(dir, 'containerd.sock');
  const configPath = path.join(dir, 'config.toml');
  const logFile = path.join(dir, 'containerd.log');
  const namespaces = new Set<string>();
  const mountedTargets = new Map<string, string>(); // target -> namespace
  let proc: ProcessGroup | undefined;
  let stopped: Promise<void> | undefined;
  // registered after the tmp root's guard, so it runs before it (LIFO): processes die, then unmount
  const unguard = addExitGuard(() => {
    if (proc) signalGroup(proc.pid, 'SIGKILL');
    sweepSync(address, namespaces);
  });

  const newNamespace = (label = 'e2e'): string => {
    const ns = `stargaze-${label}-${randomSuffix()}`;
    namespaces.add(ns);
    return ns;
  };
  const namespace = newNamespace('e2e');
  const nsOf = (o?: CtrOptions): string => {
    const ns = o?.namespace ?? namespace;
    namespaces.add(ns);
    return ns;
  };
  const ctr = (args: string[], o?: CtrOptions): Promise<RunResult> =>
    run(CTR_BIN, ['--address', address, '--namespace', nsOf(o), ...args], o);
  const ctrRemote = (args: string[], o?: CtrOptions): Promise<RunResult> =>
    run(CTR_REMOTE_BIN, ['--address', address, '--namespace', nsOf(o), ...args], o);
  /** Snapshot views made by mountImage for a non-default snapshotter, by mount target. */
  const snapshotViews = new Map<string, { key: string; snapshotter: string; namespace: string }>();
  /** chainID of an image's top layer, from the config in containerd's content store. */
  const imageChainId = async (ref: string, o?: CtrOptions): Promise<string> => {
    const listed = await ctr(['images', 'ls', `name==${ref}`], o);
    const row = listed.stdout.split('\n').find((l) => l.startsWith(`${ref} `));
    const manifestDigest = row?.match(/sha256:[0-9a-f]{64}/)?.[0];
    if (!manifestDigest) throw new Error(`image ${ref} not found in namespace ${nsOf(o)}`);
    const manifest = JSON.parse((await ctr(['content', 'get', manifestDigest], o)).stdout) as { config: { digest: string } };
    const config = JSON.parse((await ctr(['content', 'get', manifest.config.digest], o)).stdout) as { rootfs: { diff_ids: string[] } };
    let chain = '';
    for (const diffId of config.rootfs.diff_ids) {
      chain = chain === '' ? diffId : `sha256:${createHash('sha256').update(`${chain} ${diffId}`).digest('hex')}`;
    }
    return chain;
  };
  const registryFlags = (o?: PullOptions): string[] => [
    ...(o?.plainHttp === false ? [] : ['--plain-http']),
    ...(o?.snapshotter ? ['--snapshotter', o.snapshotter] : []),
    ...(o?.extraArgs ?? []),
  ];

  const quietLines = async (args: string[], ns: string): Promise<string[]> => {
    const r = await ctr(args, { namespace: ns, allowFailure: true, timeoutMs: 30_000 });
    return r.code === 0 ? r.stdout.split('\n').map((l) => l.trim()).filter(Boolean) : [];
  };

  const killAllTasks = async (): Promise<void> => {
    const live = proc?.isRunning() ? await quietLines(['namespaces', 'ls', '-q'], namespace) : [];
    for (const ns of live) namespaces.add(ns);
    for (const ns of live) {
      for (const id of await quietLines(['tasks', 'ls', '-q'], ns)) {
        await ctr(['tasks', 'kill', '--all', '--signal', 'SIGKILL', id], { namespace: ns, allowFailure: true, timeoutMs: 30_000 });
        await ctr(['tasks', 'delete', '--force', id], { namespace: ns, allowFailure: true, timeoutMs: 30_000 });
      }
      for (const id of await quietLines(['containers', 'ls', '-q'], ns)) {
        await ctr(['containers', 'delete', id], { namespace: ns, allowFailure: true, timeoutMs: 30_000 });
      }
    }
  };

  const stop = (): Promise<void> =>
    (stopped ??= (async () => {
      if (proc?.isRunning()) {
        for (const [target, ns] of [...mountedTargets].reverse()) {
          await bestEffort(`unmount image at ${target}`, () =>
            ctr(['images', 'unmount', '--rm', target], { namespace: ns, allowFailure: true, timeoutMs: 30_000 }),
          );
        }
        await bestEffort('kill containerd tasks', killAllTasks);
        await bestEffort('stop containerd', () => proc!.stop(STOP_GRACE_MS));
      } else if (proc) {
        await proc.kill();
      }
      await bestEffort('sweep shims, container processes, runc state', () => sweepSync(address, namespaces));
      for (const target of mountedTargets.keys()) await bestEffort(`unmount ${target}`, () => unmountUnder(target));
      await tmp.remove();
      unguard();
    })());
  opts.scope?.after(stop);

  try {
    await writeFile(configPath, containerdConfig(dir, opts));
    proc = spawnGroup(CONTAINERD_BIN, ['--config', configPath], { stdoutFile: logFile });
    const p = proc;
    await waitFor(
      `containerd on ${address}`,
      async () => (await run(CTR_BIN, ['--address', address, 'version'], { allowFailure: true, timeoutMs: 5_000 })).code === 0,
      { timeoutMs: READY_TIMEOUT_MS, abortIf: () => (p.isRunning() ? undefined : 'containerd exited') },
    );
  } catch (err) {
    const log = await readTail(logFile);
    if (!opts.scope) await stop();
    throw new Error(`${err instanceof Error ? err.message : String(err)}\n--- containerd log ---\n${log}`, { cause: err });
  }

  return {
    address,
    dir,
    configPath,
    logFile,
    namespace,
    newNamespace,
    uniqueId: (label = 'c') => `stargaze-${label}-${randomSuffix()}`,
    ctr,
    ctrRemote,
    pull: (ref, o) => ctr(['images', 'pull', ...registryFlags(o), ref], o),
    fetch: (ref, o) => ctr(['content', 'fetch', ...registryFlags({ ...o, snapshotter: undefined }), ref], o),
    rpull: (ref, o) =>
      ctrRemote(['images', 'rpull', ...registryFlags({ snapshotter: STARGZ_SNAPSHOTTER, ...o }), ref], o),
    runContainer: async (ref, command, o) => {
      const id = o?.id ?? `stargaze-run-${randomSuffix()}`;
      const flags = [...(o?.snapshotter ? ['--snapshotter', o.snapshotter] : []), ...(o?.extraArgs ?? [])];
      const args = ['run', '--rm', ...flags, ref, id, ...command];
      // Shortly after the snapshotter restarted, containerd's connection to its proxy plugin can still fail
      // a call with "connection error ... unavailable" before anything is created; retry as kubelet would.
      for (let attempt = 1; ; attempt++) {
        const r = await ctr(args, { ...o, allowFailure: true });
        const reconnecting = r.code !== 0 && /connection error.*unavailable/.test(r.stderr);
        if (!reconnecting || attempt === RECONNECT_ATTEMPTS) {
          if (r.code === 0 || o?.allowFailure) return r;
          throw new CommandError(r, `exit code ${r.code}`);
        }
        await new Promise((resolve) => setTimeout(resolve, RECONNECT_RETRY_MS));
      }
    },
    mountImage: async (ref, target, o) => {
      await mkdir(target, { recursive: true });
      mountedTargets.set(target, nsOf(o));
      if (o?.snapshotter && o.snapshotter !== 'overlayfs') {
        // containerd 1.6's `ctr images mount` ignores its --snapshotter flag (it reads a global flag
        // that does not exist) and always unpacks with overlayfs: view the image's top snapshot in the
        // wanted snapshotter through the snapshots API instead.
        const chainId = await imageChainId(ref, o);
        const key = `stargaze-view-${randomSuffix()}`;
        // `ctr snapshots view` creates the view outside any lease and cannot label it, so containerd's GC
        // may collect it at once: create it through containerd's API with a gc.root label instead.
        const mounts = await viewSnapshot(address, nsOf(o), o.snapshotter, key, chainId, {
          'containerd.io/gc.root': new Date().toISOString(),
        });
        snapshotViews.set(target, { key, snapshotter: o.snapshotter, namespace: nsOf(o) });
        for (const m of mounts) await run('mount', ['-t', m.type, m.source, target, '-o', m.options.join(',')]);
        return;
      }
      await ctr(['images', 'mount', ...(o?.rw ? ['--rw'] : []), ref, target], o);
    },
    unmountImage: async (target, o) => {
      const view = snapshotViews.get(target);
      if (view) {
        await unmountUnder(target);
        await ctr(['snapshots', '--snapshotter', view.snapshotter, 'rm', view.key], { ...o, namespace: view.namespace });
        snapshotViews.delete(target);
        mountedTargets.delete(target);
        return;
      }
      // `--rm` removes the lease and the snapshot (of the default snapshotter; a stargz one is
      // garbage collected once its lease is gone); make sure the mount is gone either way
      const r = await ctr(['images', 'unmount', '--rm', target], { ...o, allowFailure: true });
      const left = await unmountUnder(target);
      if (left.length > 0) throw new Error(`${target} is still mounted after ${r.command}: ${r.stderr}`);
      mountedTargets.delete(target);
    },
    removeImages: async (refs, o) => {
      await ctr(['images', 'rm', '--sync', ...refs], o);
    },
    killAllTasks,
    stop,
  };
}
