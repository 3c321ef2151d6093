/**
 * What a daemon costs the node it runs on, read from /proc: resident memory, threads and open descriptors,
 * summed over every process of the daemon. A daemon is named by the process groups it runs in: stargaze's
 * daemon and its FUSE server (a session of its own, so it outlives the daemon), the peer's single process.
 */
import { readdir, readFile } from 'node:fs/promises';
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
