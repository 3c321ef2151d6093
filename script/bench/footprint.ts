/**
 * What a daemon costs the node it runs on, read from /proc: resident memory, threads and open descriptors,
 * summed over every process of the daemon. A daemon is named by the process groups it runs in: stargaze's
 * daemon and its FUSE server (a session of its own, so it outlives the daemon), the peer's single process.
 *
 * Also here: the floor of a Node process, an empty `node -e` started with the same binary, flags and
 * NODE_OPTIONS as one of stargaze's processes, so what stargaze adds to Node itself can be told apart.
 */
import { spawn } from 'node:child_process';
import { readdir, readFile, readlink } from 'node:fs/promises';
import path from 'node:path';
import { fuseServerPid } from '../../test/e2e/harness';

export interface Footprint {
  /** Sum of VmRSS over the processes, in KiB: what the targets name, though it counts the pages two
   * processes share (the Node binary, shared libraries) once for each. */
  rssKib: number;
  /** Sum of Pss (/proc/PID/smaps_rollup) over the processes, in KiB: shared pages divided among their users. */
  pssKib: number;
  threads: number;
  fds: number;
  pids: number[];
}

/** The process group of each pid in /proc (field 5 of /proc/PID/stat). */
async function processGroups(): Promise<Map<number, number>> {
  const out = new Map<number, number>();
  for (const name of await readdir('/proc')) {
    if (!/^\d+$/.test(name)) continue;
    const stat = await readFile(`/proc/${name}/stat`, 'utf8').catch(() => undefined);
    if (stat === undefined) continue;
    // the command name (field 2) may hold spaces and parentheses: fields after it follow the last ')'
    const fields = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
    out.set(Number(name), Number(fields[2]));
  }
  return out;
}

/** Every live process whose process group is one of `groups` (a group is named by its leader's pid). */
export async function processesInGroups(groups: number[]): Promise<number[]> {
  const wanted = new Set(groups);
  return [...(await processGroups())].filter(([, pgid]) => wanted.has(pgid)).map(([pid]) => pid);
}

async function statusFields(pid: number): Promise<{ rssKib: number; threads: number } | undefined> {
  const text = await readFile(`/proc/${pid}/status`, 'utf8').catch(() => undefined);
  if (text === undefined) return undefined;
  const field = (name: string): number => Number(new RegExp(`^${name}:\\s*(\\d+)`, 'm').exec(text)?.[1] ?? 0);
  return { rssKib: field('VmRSS'), threads: field('Threads') };
}

async function pssKib(pid: number): Promise<number> {
  const text = await readFile(`/proc/${pid}/smaps_rollup`, 'utf8').catch(() => '');
  return Number(/^Pss:\s*(\d+)/m.exec(text)?.[1] ?? 0);
}

/** RSS, PSS, threads and descriptors summed over the processes of `groups`. */
export async function footprintOfGroups(groups: number[]): Promise<Footprint> {
  const pids = await processesInGroups(groups);
  const f: Footprint = { rssKib: 0, pssKib: 0, threads: 0, fds: 0, pids: [] };
  for (const pid of pids) {
    const s = await statusFields(pid);
    if (s === undefined) continue; // exited meanwhile
    f.rssKib += s.rssKib;
    f.pssKib += await pssKib(pid);
    f.threads += s.threads;
    f.fds += (await readdir(path.join('/proc', String(pid), 'fd')).catch(() => [])).length;
    f.pids.push(pid);
  }
  return f;
}

/** The process groups of a stargaze daemon: its own and its FUSE server's (a session of its own). */
export async function stargazeGroups(daemonPid: number, root: string): Promise<number[]> {
  const fuse = await fuseServerPid(root);
  return fuse === undefined ? [daemonPid] : [daemonPid, fuse];
}

/** What keeps an empty Node process alive without doing anything: the floor's whole program. */
const EMPTY_NODE_PROGRAM = 'setInterval(() => {}, 1e9)';

/** How a Node process was started: its binary, the flags before its script, and NODE_OPTIONS. */
export interface NodeInvocation {
  binary: string;
  execArgv: string[];
  nodeOptions: string | undefined;
}

/**
 * Reads how the Node process `pid` was started, from /proc: its binary (exe), its Node and V8 flags (the
 * arguments before the first one that names a script, a `.js` file) and NODE_OPTIONS from its environment.
 */
export async function nodeInvocationOf(pid: number): Promise<NodeInvocation> {
  const [exe, cmdline, environ] = await Promise.all([
    readlink(`/proc/${pid}/exe`),
    readFile(`/proc/${pid}/cmdline`, 'utf8'),
    readFile(`/proc/${pid}/environ`, 'utf8'),
  ]);
  const args = cmdline.split('\0').slice(1, -1);
  const script = args.findIndex((a) => !a.startsWith('-') && a.endsWith('.js'));
  if (script < 0) throw new Error(`process ${pid} (${args.join(' ')}): no script among its arguments`);
  const nodeOptions = environ
    .split('\0')
    .find((e) => e.startsWith('NODE_OPTIONS='))
    ?.slice('NODE_OPTIONS='.length);
  return { binary: exe, execArgv: args.slice(0, script), nodeOptions };
}

/** An empty Node process started as another was: a process group of its own, stopped by `stop()`. */
export interface FloorProcess {
  pid: number;
  stop(): void;
}

/**
 * Starts the floor of `like`: `node <its flags> -e 'setInterval(...)'` with its NODE_OPTIONS and nothing
 * else, in a process group of its own (footprintOfGroups measures it like a daemon's group).
 */
export function startEmptyNode(like: NodeInvocation): FloorProcess {
  const env: NodeJS.ProcessEnv = { PATH: process.env.PATH };
  if (like.nodeOptions !== undefined) env.NODE_OPTIONS = like.nodeOptions;
  const child = spawn(like.binary, [...like.execArgv, '-e', EMPTY_NODE_PROGRAM], { stdio: 'ignore', detached: true, env });
  const pid = child.pid;
  if (pid === undefined) throw new Error(`${like.binary}: could not start an empty Node process`);
  child.unref();
  return {
    pid,
    stop: () => {
      try {
        process.kill(-pid, 'SIGKILL');
      } catch {
        // gone already
      }
    },
  };
}
