/**
 * The stargaze daemon under test: `node dist/src/cli.js daemon --address <tmp>/stargaze.sock
 * --root <tmp>/root --hosts-dir <tmp>/hosts --config <tmp>/config.toml --log-level debug`, run as
 * its own process group. Its JSON log lines (stdout) are kept in memory and in <tmp>/daemon.log.
 * Cleanup stops it and lazily unmounts FUSE mounts it left under its root.
 */
import { mkdir, readFile, writeFile } from 'node:fs/promises';
import path from 'node:path';
import { bestEffort, type CleanupScope } from './cleanup';
import { readTail, socketAccepts, spawnGroup, waitFor, type ExitStatus, type ProcessGroup } from './exec';
import { createTmpRoot, mountsUnder, unmountUnder, type MountInfo } from './tmp';

/** Repository root, from dist/test/e2e/harness/ (compiled) four levels up. */
export const REPO_ROOT = path.resolve(__dirname, '..', '..', '..', '..');
/** The compiled CLI the daemon is started from. */
export const DEFAULT_CLI_PATH = path.join(REPO_ROOT, 'dist', 'src', 'cli.js');
/** The `stargaze` command as users run it (the package's bin, script/stargaze), with STARGAZE_COMMAND_ENV. */
export const STARGAZE_COMMAND = path.join(REPO_ROOT, 'script', 'stargaze');
/** Runs the command on this Node.js (or on STARGAZE_NODE when set, a wrapper that measures it, say). */
export const STARGAZE_COMMAND_ENV: NodeJS.ProcessEnv = { STARGAZE_NODE: process.env.STARGAZE_NODE ?? process.execPath };
const READY_TIMEOUT_MS = 30_000;
/** The daemon's log line once it serves containerd: restored snapshots mounted, calls answered at once. */
export const SERVING_LOG_MSG = 'serving containerd snapshots';
const STOP_GRACE_MS = 10_000;

/** One parsed log line. Lines that are not JSON objects become `{ level: 'unparsed', msg: line }`. */
export interface LogEntry {
  level?: string | number;
  msg?: string;
  [field: string]: unknown;
}

export interface DaemonOptions {
  /** Where to register cleanup; without it the caller must call `cleanup()`. */
  scope?: CleanupScope;
  /** Contents of config.toml (default: empty file, i.e. all defaults). */
  config?: string;
  /** Registry hosts (`127.0.0.1:port`) to describe in hosts-dir as plain-HTTP servers. */
  plainHttpHosts?: string[];
  /** Defaults to debug. */
  logLevel?: string;
  /** Appended to the daemon arguments. */
  extraArgs?: string[];
  env?: NodeJS.ProcessEnv;
  /** Script run with `node`; defaults to dist/src/cli.js in this repository. */
  cliPath?: string;
  readyTimeoutMs?: number;
}

export interface StargazeDaemon {
  /** Tmp dir holding everything below. */
  readonly dir: string;
  /** The snapshots gRPC socket (containerd's proxy plugin address). */
  readonly address: string;
  /** The socket the daemon pulls on for `stargaze rpull --pull-address` (its default, beside `address`). */
  readonly pullAddress: string;
  /** `--root`. */
  readonly root: string;
  readonly hostsDir: string;
  readonly configPath: string;
  /** stdout (JSON log lines) of every run, appended. */
  readonly logFile: string;
  /** stderr of every run, appended. */
  readonly stderrFile: string;
  /** PID (and process group id) of the current run. */
  pid(): number;
  isRunning(): boolean;
  /** Parsed log lines: of all runs, or with `{ currentRunOnly: true }` since the last (re)start. */
  logs(opts?: { currentRunOnly?: boolean }): LogEntry[];
  /** Resolves with the first entry (of the current run, including past ones) matching `pred`. */
  waitForLog(pred: (e: LogEntry) => boolean, opts?: { timeoutMs?: number; what?: string }): Promise<LogEntry>;
  /** SIGKILL to the process group (FUSE mounts stay behind, as after a crash). */
  killHard(): Promise<ExitStatus>;
  /** SIGTERM to the group, SIGKILL after `timeoutMs`. */
  stop(opts?: { timeoutMs?: number; signal?: NodeJS.Signals }): Promise<ExitStatus>;
  /**
   * Stops (or with `hard`, kills) the daemon and starts it again with the same arguments. Returns once it
   * serves (its SERVING_LOG_MSG line), or with `until: 'socket'` as soon as its socket accepts connections,
   * as containerd sees it.
   */
  restart(opts?: { hard?: boolean; until?: StartedWhen }): Promise<void>;
  /** Mounts currently under the root (FUSE layer mounts, overlays). */
  mounts(): Promise<MountInfo[]>;
  /** Lazily unmounts everything under the root; returns what could not be unmounted. */
  unmountAll(): Promise<MountInfo[]>;
  /** Stops the daemon, unmounts what is left under the tmp dir and removes it. */
  cleanup(): Promise<void>;
}

/** When a (re)start returns: once the socket accepts connections, or once the daemon says it serves. */
export type StartedWhen = 'socket' | 'serving';

/** Writes `<hostsDir>/<host>/hosts.toml` (containerd's hosts.toml format) for a plain-HTTP registry. */
export async function writePlainHttpHostConfig(hostsDir: string, host: string): Promise<string> {
  const dir = path.join(hostsDir, host);
  await mkdir(dir, { recursive: true });
  const file = path.join(dir, 'hosts.toml');
  await writeFile(
    file,
    [
      `server = "http://${host}"`,
      '',
      `[host."http://${host}"]`,
      '  capabilities = ["pull", "resolve"]',
      '  skip_verify = true',
      '',
    ].join('\n'),
  );
  return file;
}

function parseLogLine(line: string): LogEntry {
  try {
    const v: unknown = JSON.parse(line);
    if (v && typeof v === 'object' && !Array.isArray(v)) return v as LogEntry;
  } catch {
    // fall through
  }
  return { level: 'unparsed', msg: line };
}


/** The PID the daemon's FUSE server wrote to `<root>/fuse/fuse-server.pid`, if it did. */
export async function fuseServerPid(root: string): Promise<number | undefined> {
  const pid = Number((await readFile(path.join(root, 'fuse', 'fuse-server.pid'), 'utf8').catch(() => '')).trim());
  return Number.isInteger(pid) && pid > 1 ? pid : undefined;
}

/** True while a process with this pid exists. */
export function processAlive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch {
    return false;
  }
}

/** The FUSE server the daemon started lives in its own session (it outlives daemon restarts): stop it. */
export async function stopFuseServer(root: string): Promise<void> {
  const pid = await fuseServerPid(root);
  if (pid !== undefined) await stopProcess(pid);
}

/** SIGTERM (a FUSE server unmounts its layers and exits), SIGKILL after 10 s. */
export async function stopProcess(pid: number): Promise<void> {
  const alive = (): boolean => processAlive(pid);
  if (!alive()) return;
  process.kill(pid, 'SIGTERM'); // it unmounts its layers and exits
  const deadline = Date.now() + 10_000;
  while (alive() && Date.now() < deadline) await new Promise((r) => setTimeout(r, 100));
  if (alive()) process.kill(pid, 'SIGKILL');
}

/** Starts the daemon and waits until its socket accepts connections. */
export async function startDaemon(opts: DaemonOptions = {}): Promise<StargazeDaemon> {
  const tmp = await createTmpRoot('stargaze');
  const dir = tmp.dir;
  const address = path.join(dir, 'stargaze.sock');
  const root = path.join(dir, 'root');
  const hostsDir = path.join(dir, 'hosts');
  const configPath = path.join(dir, 'config.toml');
  const logFile = path.join(dir, 'daemon.log');
  const stderrFile = path.join(dir, 'daemon.stderr.log');
  const cliPath = opts.cliPath ?? DEFAULT_CLI_PATH;
  const args = [
    cliPath,
    'daemon',
    '--address',
    address,
    '--root',
    root,
    '--hosts-dir',
    hostsDir,
    '--config',
    configPath,
    '--log-level',
    opts.logLevel ?? 'debug',
    ...(opts.extraArgs ?? []),
  ];
  const entries: LogEntry[] = [];
  const lines: string[] = [];
  let runStart = 0;
  let proc: ProcessGroup | undefined;
  let cleaned: Promise<void> | undefined;

  await mkdir(root, { recursive: true });
  await mkdir(hostsDir, { recursive: true });
  await writeFile(configPath, opts.config ?? '');
  for (const host of opts.plainHttpHosts ?? []) await writePlainHttpHostConfig(hostsDir, host);

  const startOnce = async (until: StartedWhen = 'serving'): Promise<void> => {
    runStart = entries.length;
    const p = spawnGroup(process.execPath, args, {
      cwd: REPO_ROOT,
      env: opts.env,
      stdoutFile: logFile,
      stderrFile,
      onStdoutLine: (line) => {
        if (line.trim() === '') return;
        lines.push(line);
        entries.push(parseLogLine(line));
      },
    });
    proc = p;
    try {
      await waitFor(`stargaze socket ${address}`, () => socketAccepts(address), {
        timeoutMs: opts.readyTimeoutMs ?? READY_TIMEOUT_MS,
        abortIf: () => (p.isRunning() ? undefined : 'stargaze daemon exited'),
      });
      if (until === 'serving') {
        await waitFor('the stargaze daemon to serve', () => entries.slice(runStart).some((e) => e.msg === SERVING_LOG_MSG), {
          timeoutMs: opts.readyTimeoutMs ?? READY_TIMEOUT_MS,
          intervalMs: 20,
          abortIf: () => (p.isRunning() ? undefined : 'stargaze daemon exited'),
        });
      }
    } catch (err) {
      await p.kill();
      const stderr = await readTail(stderrFile);
      const stdout = lines.slice(-30).join('\n');
      throw new Error(
        `${err instanceof Error ? err.message : String(err)}\n` +
          `command: ${p.command}\n--- daemon stderr ---\n${stderr}\n--- daemon log (last lines) ---\n${stdout}`,
        { cause: err },
      );
    }
  };

  const stop = async (o: { timeoutMs?: number; signal?: NodeJS.Signals } = {}): Promise<ExitStatus> => {
    const p = proc;
    if (!p) return { code: null, signal: null };
    if (o.signal && o.signal !== 'SIGTERM' && p.isRunning()) {
      p.signal(o.signal);
      const timer = setTimeout(() => p.signal('SIGKILL'), o.timeoutMs ?? STOP_GRACE_MS);
      const status = await p.exited;
      clearTimeout(timer);
      return status;
    }
    return p.stop(o.timeoutMs ?? STOP_GRACE_MS);
  };

  const cleanup = (): Promise<void> =>
    (cleaned ??= (async () => {
      await bestEffort('stop stargaze daemon', () => stop());
      await bestEffort('stop the fuse server', () => stopFuseServer(root));
      const left = await unmountUnder(dir);
      if (left.length > 0) {
        process.stderr.write(`harness: mounts left under ${dir}: ${left.map((m) => m.mountpoint).join(', ')}\n`);
      }
      await tmp.remove();
    })());
  opts.scope?.after(cleanup);

  try {
    await startOnce();
  } catch (err) {
    if (!opts.scope) await cleanup();
    throw err;
  }

  return {
    dir,
    address,
    pullAddress: path.join(dir, 'pull.sock'),
    root,
    hostsDir,
    configPath,
    logFile,
    stderrFile,
    pid: () => proc!.pid,
    isRunning: () => proc?.isRunning() ?? false,
    logs: (o) => (o?.currentRunOnly ? entries.slice(runStart) : [...entries]),
    waitForLog: (pred, o) =>
      waitFor(o?.what ?? 'a matching stargaze log line', () => entries.slice(runStart).find(pred), {
        timeoutMs: o?.timeoutMs ?? 30_000,
        intervalMs: 50,
      }),
    killHard: () => proc!.kill(),
    stop,
    restart: async (o) => {
      if (o?.hard) await proc!.kill();
      else await stop();
      await startOnce(o?.until);
    },
    mounts: () => mountsUnder(root),
    unmountAll: () => unmountUnder(root),
    cleanup,
  };
}
