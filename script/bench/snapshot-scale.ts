/**
 * Snapshot metadata at a busy node's size (`npm run bench -- snapshot-scale`; root needed): stargaze's
 * `stargaze daemon` side by side with the reference snapshotter, the peer (`containerd-stargz-grpc` from
 * STARGAZE_PEER_BIN; without it stargaze runs alone), each with its own root and socket and no containerd: the
 * bench is the only client, a grpc-js client of containerd.services.snapshots.v1.Snapshots on each daemon's socket.
 *
 * Each arm, on a fresh daemon:
 *   create     BENCH_SNAPSHOTS committed snapshots as chains of BENCH_CHAIN, one Prepare + Commit after the
 *              other as containerd's unpacker does for plain (not lazily pulled) layers: key
 *              `extract-<n> <name>`, name a `sha256:` chain id, parent the chain's previous layer. Prepare and
 *              Commit carry one label, `containerd.io/snapshot/bench.group` = chain number mod GROUPS (a
 *              `containerd.io/snapshot/` label, as containerd passes only those through to a proxy snapshotter).
 *   footprint  2 s later (SETTLE_MS), RSS / threads / fds of the daemon's processes (footprint.ts; stargaze: the
 *              daemon and its FUSE server, which serves nothing here), and the daemon process's own RSS.
 *   List       the full stream, BENCH_REPEATS times: time until the stream ends, messages, the most infos one
 *              message held (containerd batches 100), and the daemon process's RSS after each List (in a row: a
 *              List that buffered its whole answer, or leaked it, would show as growth here).
 *   filtered   List with `labels."containerd.io/snapshot/bench.group"==7` (1 in GROUPS chains), the same way.
 *   Stat       of BENCH_STAT_SAMPLE names spread evenly over the snapshots, one call after the other, per pass.
 *   Usage      of the same names, the same way.
 * Every answer is checked (counts, names found), so a daemon that answers wrong fails the bench instead of winning.
 *
 * Then, for stargaze alone and in this process (listHeap): the Snapshots service over a Snapshotter whose store
 * holds the same BENCH_SNAPSHOTS rows, a client on its socket, and the heap after full GCs before the first List,
 * after every 10 of HEAP_LISTS full Lists, and 1 s into a List whose client stopped reading after its first
 * message: what serving Lists keeps, which must not grow with the Lists nor with a slow reader.
 *
 * Arms alternate order from sample to sample (BENCH_SAMPLES, default 1: a create of 10,000 takes tens of seconds);
 * each number is the median over its passes and samples; ratios are stargaze / peer of the medians (below 1:
 * stargaze faster or smaller).
 *
 * Knobs: BENCH_SNAPSHOTS (10000), BENCH_CHAIN (50), BENCH_REPEATS (5), BENCH_STAT_SAMPLE (1000), BENCH_SAMPLES (1),
 * STARGAZE_PEER_BIN; BENCH_DAEMON_NODE_OPTIONS is handed to the stargaze daemon as NODE_OPTIONS (to profile it:
 * `--require` of a script that starts the inspector's profiler).
 */
import crypto from 'node:crypto';
import { readFile } from 'node:fs/promises';
import path from 'node:path';
import { setTimeout as delay } from 'node:timers/promises';
import v8 from 'node:v8';
import vm from 'node:vm';
import * as grpc from '@grpc/grpc-js';
import pino from 'pino';
import { loadSnapshotsService, startSnapshotServer } from '../../src/service/snapshots-service';
import { MetadataStore } from '../../src/snapshot/metadata-store';
import { Snapshotter } from '../../src/snapshot/snapshotter';
import {
  CleanupStack,
  PEER_MISSING_NOTE,
  makeTmpRoot,
  peerBinary,
  startDaemon,
  startPeer,
  type PeerDaemon,
  type StargazeDaemon,
} from '../../test/e2e/harness';
import type { DaemonKind } from './daemon-arm';
import { footprintOfGroups, stargazeGroups, type Footprint } from './footprint';
import { median } from './startup';

const SNAPSHOTS = Number(process.env.BENCH_SNAPSHOTS ?? 10_000);
const CHAIN = Number(process.env.BENCH_CHAIN ?? 50);
const REPEATS = Math.max(1, Number(process.env.BENCH_REPEATS ?? 5));
const STAT_SAMPLE = Number(process.env.BENCH_STAT_SAMPLE ?? 1000);
const SAMPLES = Math.max(1, Number(process.env.BENCH_SAMPLES ?? 1));
/** Chains fall into this many label groups; the filtered List asks for one. */
const GROUPS = 20;
const FILTER_GROUP = 7;
export const GROUP_LABEL = 'containerd.io/snapshot/bench.group';
const LABEL_FILTER = `labels."${GROUP_LABEL}"==${FILTER_GROUP}`;
/** containerd's snapshot service sends at most this many infos per List message. */
const MAX_INFOS_PER_MESSAGE = 100;
const SETTLE_MS = 2_000;
const MIB = 1024;

interface WireInfo {
  name: string;
  parent: string;
  kind: string;
  labels: Record<string, string>;
}
type Callback<T> = (err: grpc.ServiceError | null, res: T) => void;
type UnaryMethod = (req: object, cb: Callback<unknown>) => void;

/** A Snapshots client on one daemon's socket. */
class SnapshotsClient {
  private readonly client: grpc.Client;
  constructor(address: string) {
    const Ctor = grpc.makeClientConstructor(loadSnapshotsService(), 'Snapshots');
    this.client = new Ctor(`unix://${address}`, grpc.credentials.createInsecure(), {
      'grpc.max_receive_message_length': 64 * 1024 * 1024,
    });
  }

  call<T>(method: string, req: object): Promise<T> {
    const fn = (this.client as unknown as Record<string, UnaryMethod>)[method]!.bind(this.client);
    return new Promise<T>((resolve, reject) => fn(req, (err, res) => (err ? reject(err) : resolve(res as T))));
  }

  /** The List stream's messages, each an array of infos. */
  list(filters: string[]): Promise<WireInfo[][]> {
    const fn = (this.client as unknown as Record<string, (req: object) => grpc.ClientReadableStream<{ info: WireInfo[] }>>)['List']!.bind(this.client);
    return new Promise((resolve, reject) => {
      const messages: WireInfo[][] = [];
      const stream = fn({ snapshotter: 'bench', filters });
      stream.on('data', (m: { info: WireInfo[] }) => messages.push(m.info));
      stream.on('error', reject);
      stream.on('end', () => resolve(messages));
    });
  }

  /** A full List whose reader stops after the first message, runs `whilePaused`, then reads the rest. */
  pausedList<T>(whilePaused: () => Promise<T>): Promise<T> {
    const fn = (this.client as unknown as Record<string, (req: object) => grpc.ClientReadableStream<{ info: WireInfo[] }>>)['List']!.bind(this.client);
    return new Promise((resolve, reject) => {
      const stream = fn({ snapshotter: 'bench', filters: [] });
      let result: T | undefined;
      let first = true;
      stream.on('data', () => {
        if (!first) return;
        first = false;
        stream.pause();
        whilePaused().then((r) => {
          result = r;
          stream.resume();
        }, reject);
      });
      stream.on('error', reject);
      stream.on('end', () => (first ? reject(new Error('List ended before its first message')) : resolve(result as T)));
    });
  }

  close(): void {
    this.client.close();
  }
}

/** The name (a chain id) of layer `layer` of chain `chain`. */
function snapshotName(chain: number, layer: number): string {
  return `sha256:${crypto.createHash('sha256').update(`bench ${chain}/${layer}`).digest('hex')}`;
}

const msSince = (t0: bigint): number => Number(process.hrtime.bigint() - t0) / 1e6;

async function vmRssKib(pid: number): Promise<number> {
  const text = await readFile(`/proc/${pid}/status`, 'utf8');
  return Number(/^VmRSS:\s*(\d+)/m.exec(text)?.[1] ?? 0);
}

export interface ListPass {
  ms: number;
  messages: number;
  maxInfosPerMessage: number;
  infos: number;
  /** The daemon process's RSS right after the List, KiB. */
  daemonRssKibAfter: number;
}

export interface ArmSample {
  kind: DaemonKind;
  sample: number;
  createMs: number;
  footprint: Footprint;
  /** The daemon process alone (stargaze: without its FUSE server), KiB, after create. */
  daemonRssKib: number;
  list: ListPass[];
  filtered: ListPass[];
  statMs: number[];
  usageMs: number[];
}

export interface ArmSummary {
  kind: DaemonKind;
  createMs: number;
  listMs: number;
  filteredMs: number;
  statMs: number;
  usageMs: number;
  rssMib: number;
  daemonRssMib: number;
  threads: number;
  fds: number;
  listMessages: number;
  maxInfosPerMessage: number;
  filteredInfos: number;
  /** Daemon RSS after the last List minus before the first, MiB (median over samples). */
  listRssGrowthMib: number;
}

export interface ListHeap {
  /** Heap used after full GCs before the first List, MiB. */
  beforeMib: number;
  /** The same after every 10 Lists. */
  afterListsMib: number[];
  /** 1 s into a List whose client read one message and stopped. */
  pausedReaderMib: number;
}

export interface SnapshotScaleResult {
  snapshots: number;
  chain: number;
  repeats: number;
  statSample: number;
  samples: ArmSample[];
  arms: ArmSummary[];
  /** stargaze / peer of each median; undefined without the peer. */
  ratio?: Record<'createMs' | 'listMs' | 'filteredMs' | 'statMs' | 'usageMs' | 'rssMib', number>;
  listHeap: ListHeap;
  notes: string[];
}

const HEAP_LISTS = 50;

/** `gc()` of this process, with V8's flag turned on now (the bench is not started with --expose-gc). */
function exposedGc(): () => void {
  v8.setFlagsFromString('--expose-gc');
  return vm.runInNewContext('gc') as () => void;
}

/** The in-process List memory check described at the top. */
async function listHeap(): Promise<ListHeap> {
  const scope = new CleanupStack();
  try {
    const root = await makeTmpRoot('bench-list-heap', scope);
    // The rows are written straight into the store (no directories, no fsync): only Lists are measured here.
    const store = MetadataStore.open(root, { durability: 'normal' });
    for (let c = 0, n = 0; n < SNAPSHOTS; c++) {
      const labels = { [GROUP_LABEL]: String(c % GROUPS) };
      let parent = '';
      for (let l = 0; l < CHAIN && n < SNAPSHOTS; l++, n++) {
        const name = snapshotName(c, l);
        store.createSnapshot('active', `extract-${n} ${name}`, parent, labels);
        store.commitActive(`extract-${n} ${name}`, name, { size: 4096, inodes: 1 }, labels);
        parent = name;
      }
    }
    store.close();
    const silent = pino({ level: 'silent' });
    const snapshotter = await Snapshotter.open({ root, log: silent });
    scope.after(() => snapshotter.close());
    const server = await startSnapshotServer({ snapshotter, address: path.join(root, 'list-heap.sock'), log: silent });
    scope.after(() => server.close());
    const client = new SnapshotsClient(server.address);
    scope.after(() => client.close());

    const gc = exposedGc();
    const heapMib = (): number => {
      gc();
      gc();
      return process.memoryUsage().heapUsed / (MIB * MIB);
    };
    const beforeMib = heapMib();
    const afterListsMib: number[] = [];
    for (let i = 1; i <= HEAP_LISTS; i++) {
      const infos = (await client.list([])).reduce((n, m) => n + m.length, 0);
      if (infos !== SNAPSHOTS) throw new Error(`in-process List answered ${infos} infos, expected ${SNAPSHOTS}`);
      if (i % 10 === 0) afterListsMib.push(heapMib());
    }
    const pausedReaderMib = await client.pausedList(async () => {
      await delay(1000);
      return heapMib();
    });
    return { beforeMib, afterListsMib, pausedReaderMib };
  } finally {
    await scope.run();
  }
}

async function timedList(client: SnapshotsClient, filters: string[], pid: number, expected: number): Promise<ListPass> {
  const t0 = process.hrtime.bigint();
  const messages = await client.list(filters);
  const ms = msSince(t0);
  const infos = messages.reduce((n, m) => n + m.length, 0);
  if (infos !== expected) throw new Error(`List ${JSON.stringify(filters)} answered ${infos} infos, expected ${expected}`);
  return {
    ms,
    messages: messages.length,
    maxInfosPerMessage: messages.reduce((n, m) => Math.max(n, m.length), 0),
    infos,
    daemonRssKibAfter: await vmRssKib(pid),
  };
}

/** One arm on a fresh daemon of `kind`: create, footprint, Lists, Stats, Usages. */
async function runArm(kind: DaemonKind, sample: number): Promise<ArmSample> {
  const scope = new CleanupStack();
  try {
    let daemon: StargazeDaemon | PeerDaemon;
    let groups: () => Promise<number[]>;
    if (kind === 'stargaze') {
      const nodeOptions = process.env.BENCH_DAEMON_NODE_OPTIONS;
      const d = await startDaemon({ scope, logLevel: 'info', env: nodeOptions ? { NODE_OPTIONS: nodeOptions } : undefined });
      daemon = d;
      groups = () => stargazeGroups(d.pid(), d.root);
    } else {
      const d = await startPeer({ scope, logLevel: 'info' });
      daemon = d;
      groups = () => Promise.resolve([d.pid()]);
    }
    const client = new SnapshotsClient(daemon.address);
    scope.after(() => client.close());

    const chains = Math.ceil(SNAPSHOTS / CHAIN);
    const t0 = process.hrtime.bigint();
    let n = 0;
    for (let c = 0; c < chains && n < SNAPSHOTS; c++) {
      const labels = { [GROUP_LABEL]: String(c % GROUPS) };
      let parent = '';
      for (let l = 0; l < CHAIN && n < SNAPSHOTS; l++, n++) {
        const name = snapshotName(c, l);
        const key = `extract-${n} ${name}`;
        await client.call('Prepare', { snapshotter: 'bench', key, parent, labels });
        await client.call('Commit', { snapshotter: 'bench', name, key, labels });
        parent = name;
      }
    }
    const createMs = msSince(t0);
    process.stdout.write(`  ${kind.padEnd(8)} sample ${sample + 1}: created ${n} snapshots in ${(createMs / 1000).toFixed(1)} s\n`);

    await delay(SETTLE_MS);
    const footprint = await footprintOfGroups(await groups());
    const daemonRssKib = await vmRssKib(daemon.pid());

    let filteredExpected = 0;
    for (let c = 0, left = SNAPSHOTS; left > 0; c++, left -= CHAIN) if (c % GROUPS === FILTER_GROUP) filteredExpected += Math.min(CHAIN, left);
    const list: ListPass[] = [];
    for (let i = 0; i < REPEATS; i++) list.push(await timedList(client, [], daemon.pid(), SNAPSHOTS));
    const filtered: ListPass[] = [];
    for (let i = 0; i < REPEATS; i++) filtered.push(await timedList(client, [LABEL_FILTER], daemon.pid(), filteredExpected));

    const step = Math.max(1, Math.floor(SNAPSHOTS / STAT_SAMPLE));
    const names: string[] = [];
    for (let i = 0; i < SNAPSHOTS && names.length < STAT_SAMPLE; i += step) names.push(snapshotName(Math.floor(i / CHAIN), i % CHAIN));
    const statMs: number[] = [];
    const usageMs: number[] = [];
    for (let i = 0; i < REPEATS; i++) {
      let t = process.hrtime.bigint();
      for (const key of names) {
        const { info } = await client.call<{ info: WireInfo }>('Stat', { snapshotter: 'bench', key });
        if (info.name !== key || info.kind !== 'COMMITTED') throw new Error(`Stat ${key} answered ${info.name} ${info.kind}`);
      }
      statMs.push(msSince(t));
      t = process.hrtime.bigint();
      for (const key of names) {
        const usage = await client.call<{ size: string; inodes: string }>('Usage', { snapshotter: 'bench', key });
        if (usage.inodes === undefined) throw new Error(`Usage ${key} answered no inodes`);
      }
      usageMs.push(msSince(t));
    }
    return { kind, sample, createMs, footprint, daemonRssKib, list, filtered, statMs, usageMs };
  } finally {
    await scope.run();
  }
}

function summarize(kind: DaemonKind, samples: ArmSample[]): ArmSummary {
  const mine = samples.filter((s) => s.kind === kind);
  const all = <T>(f: (s: ArmSample) => T[]): T[] => mine.flatMap(f);
  return {
    kind,
    createMs: median(mine.map((s) => s.createMs)),
    listMs: median(all((s) => s.list.map((p) => p.ms))),
    filteredMs: median(all((s) => s.filtered.map((p) => p.ms))),
    statMs: median(all((s) => s.statMs)),
    usageMs: median(all((s) => s.usageMs)),
    rssMib: median(mine.map((s) => s.footprint.rssKib / MIB)),
    daemonRssMib: median(mine.map((s) => s.daemonRssKib / MIB)),
    threads: median(mine.map((s) => s.footprint.threads)),
    fds: median(mine.map((s) => s.footprint.fds)),
    listMessages: Math.max(...all((s) => s.list.map((p) => p.messages))),
    maxInfosPerMessage: Math.max(...all((s) => [...s.list, ...s.filtered].map((p) => p.maxInfosPerMessage))),
    filteredInfos: mine[0]!.filtered[0]!.infos,
    listRssGrowthMib: median(mine.map((s) => (s.list[s.list.length - 1]!.daemonRssKibAfter - s.daemonRssKib) / MIB)),
  };
}

export async function benchSnapshotScale(): Promise<SnapshotScaleResult> {
  const notes: string[] = [];
  const kinds: DaemonKind[] = peerBinary() === undefined ? ['stargaze'] : ['stargaze', 'peer'];
  if (kinds.length === 1) notes.push(PEER_MISSING_NOTE);
  const samples: ArmSample[] = [];
  for (let s = 0; s < SAMPLES; s++) {
    const order = s % 2 === 0 ? kinds : [...kinds].reverse();
    for (const kind of order) samples.push(await runArm(kind, s));
  }
  const arms = kinds.map((k) => summarize(k, samples));
  const ours = arms.find((a) => a.kind === 'stargaze')!;
  const peer = arms.find((a) => a.kind === 'peer');
  const ratio = peer && {
    createMs: ours.createMs / peer.createMs,
    listMs: ours.listMs / peer.listMs,
    filteredMs: ours.filteredMs / peer.filteredMs,
    statMs: ours.statMs / peer.statMs,
    usageMs: ours.usageMs / peer.usageMs,
    rssMib: ours.rssMib / peer.rssMib,
  };
  if (ours.maxInfosPerMessage > MAX_INFOS_PER_MESSAGE) {
    notes.push(`stargaze sent ${ours.maxInfosPerMessage} infos in one List message: more than containerd's ${MAX_INFOS_PER_MESSAGE}`);
  }
  process.stdout.write(`  stargaze in-process: heap during ${HEAP_LISTS} Lists and a paused reader\n`);
  return { snapshots: SNAPSHOTS, chain: CHAIN, repeats: REPEATS, statSample: STAT_SAMPLE, samples, arms, ratio, listHeap: await listHeap(), notes };
}

/** The result as the table `npm run bench` prints. */
export function snapshotScaleTable(r: SnapshotScaleResult): string {
  const rows: [string, (a: ArmSummary) => string, keyof NonNullable<SnapshotScaleResult['ratio']> | undefined][] = [
    [`create ${r.snapshots} (s)`, (a) => (a.createMs / 1000).toFixed(2), 'createMs'],
    ['List, full stream (ms)', (a) => a.listMs.toFixed(1), 'listMs'],
    [`List, label filter (ms)`, (a) => a.filteredMs.toFixed(1), 'filteredMs'],
    [`Stat x ${r.statSample} (ms)`, (a) => a.statMs.toFixed(0), 'statMs'],
    [`Usage x ${r.statSample} (ms)`, (a) => a.usageMs.toFixed(0), 'usageMs'],
    ['RSS after create (MiB)', (a) => a.rssMib.toFixed(1), 'rssMib'],
    ['  daemon process (MiB)', (a) => a.daemonRssMib.toFixed(1), undefined],
    ['threads / fds', (a) => `${a.threads} / ${a.fds}`, undefined],
    ['List messages / max infos', (a) => `${a.listMessages} / ${a.maxInfosPerMessage}`, undefined],
    ['filtered infos', (a) => String(a.filteredInfos), undefined],
    [`daemon RSS growth, ${r.repeats} Lists (MiB)`, (a) => a.listRssGrowthMib.toFixed(1), undefined],
  ];
  const cell = (s: string): string => s.padStart(14);
  const lines = [`  ${''.padEnd(34)}${r.arms.map((a) => cell(a.kind)).join('')}${r.ratio ? cell('stargaze/peer') : ''}`];
  for (const [label, value, ratioKey] of rows) {
    const ratio = r.ratio && ratioKey ? cell(`${r.ratio[ratioKey].toFixed(2)}x`) : '';
    lines.push(`  ${label.padEnd(34)}${r.arms.map((a) => cell(value(a))).join('')}${ratio}`);
  }
  const h = r.listHeap;
  lines.push(
    `  stargaze List memory (in-process, heap after GC): ${h.beforeMib.toFixed(2)} MiB before, ` +
      `${h.afterListsMib.map((m) => m.toFixed(2)).join(' / ')} after each 10 Lists, ` +
      `${h.pausedReaderMib.toFixed(2)} MiB with a reader paused after one message`,
  );
  return lines.join('\n');
}
