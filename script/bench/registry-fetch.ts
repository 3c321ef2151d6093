/**
 * Whole-blob download + digest check from a local docker-registry: our parallel range fetch
 * (RegistryClient.fetchBlobParallel) against `curl -s URL | sha256sum` (the same work: fetch and hash),
 * directly on loopback and through a proxy that caps each connection's bandwidth (script/bench/throttle-proxy.ts,
 * its own process). Our single-connection fetchBlob is measured too, for scale.
 *
 * The blob is generated (incompressible 1 MiB blocks), pushed with a streamed chunked upload and removed with
 * the registry's storage directory at the end, so disk use is one copy of the blob while the bench runs.
 *
 * Knobs: BENCH_BLOB_MIB (default 1024), BENCH_SAMPLES (default 3; capped cases run once),
 * BENCH_CAP_MBIT (per-connection cap, default 80, the figure), BENCH_CAPPED_MIB (blob size of the
 * capped cases, default 256), BENCH_CONCURRENCY / BENCH_CHUNK_MIB (default: the client's defaults).
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { createHash, randomBytes } from 'node:crypto';
import path from 'node:path';
import { Readable, Transform } from 'node:stream';
import { request } from 'undici';
import { RegistryClient } from '../../src/remote/registry-client';
import { DEFAULT_PARALLEL_FETCH_CHUNK_BYTES, DEFAULT_PARALLEL_FETCH_CONCURRENCY } from '../../src/remote/parallel-fetch';
import { freePort, startRegistry } from '../../test/unit/remote/registry-harness';

const MIB = 1024 * 1024;
const BLOB_MIB = Number(process.env.BENCH_BLOB_MIB ?? 1024);
const SAMPLES = Number(process.env.BENCH_SAMPLES ?? 3);
const CAP_MBIT = Number(process.env.BENCH_CAP_MBIT ?? 80);
/** The capped cases fetch a smaller blob by default: one 80 Mbit/s connection needs 107 s for 1 GiB. */
const CAPPED_MIB = Number(process.env.BENCH_CAPPED_MIB ?? 256);
const CONCURRENCY = Number(process.env.BENCH_CONCURRENCY ?? DEFAULT_PARALLEL_FETCH_CONCURRENCY);
const CHUNK_BYTES = Number(process.env.BENCH_CHUNK_MIB ?? DEFAULT_PARALLEL_FETCH_CHUNK_BYTES / MIB) * MIB;
const REPO = 'bench/blob';

export interface FetchResult {
  case: string;
  mibPerSec: number;
  seconds: number;
  samples: number;
}

/** Incompressible content: one random 1 MiB block, each copy stamped with its index. */
function blobContent(mib: number): Readable {
  const block = randomBytes(MIB);
  let i = 0;
  return new Readable({
    highWaterMark: 4 * MIB,
    read() {
      if (i >= mib) {
        this.push(null);
        return;
      }
      const b = Buffer.from(block);
      b.writeUInt32BE(i, 0);
      b.writeUInt32BE(i, MIB / 2);
      i++;
      this.push(b);
    },
  });
}

/** POST, one streamed PATCH, PUT ?digest=: the blob never sits in memory. */
async function pushStreamed(host: string, mib: number, repo = REPO): Promise<string> {
  const start = await request(`http://${host}/v2/${repo}/blobs/uploads/`, { method: 'POST' });
  await start.body.dump();
  if (start.statusCode !== 202 || typeof start.headers.location !== 'string') throw new Error(`upload start: HTTP ${start.statusCode}`);
  const hash = createHash('sha256');
  const body = blobContent(mib).pipe(
    new Transform({
      transform(chunk: Buffer, _enc, cb) {
        hash.update(chunk);
        cb(null, chunk);
      },
    }),
  );
  const patch = await request(new URL(start.headers.location, `http://${host}`), {
    method: 'PATCH',
    headers: { 'content-type': 'application/octet-stream' },
    body,
  });
  await patch.body.dump();
  if (patch.statusCode !== 202 || typeof patch.headers.location !== 'string') throw new Error(`upload patch: HTTP ${patch.statusCode}`);
  const digest = `sha256:${hash.digest('hex')}`;
  const put = new URL(patch.headers.location, `http://${host}`);
  put.searchParams.set('digest', digest);
  const done = await request(put, { method: 'PUT', headers: { 'content-length': '0' } });
  await done.body.dump();
  if (done.statusCode !== 201) throw new Error(`upload finish: HTTP ${done.statusCode}`);
  return digest;
}

function sh(script: string): Promise<string> {
  return new Promise((resolve, reject) => {
    const child = spawn('bash', ['-o', 'pipefail', '-c', script], { stdio: ['ignore', 'pipe', 'pipe'] });
    let out = '';
    child.stdout.on('data', (d: Buffer) => (out += d.toString()));
    child.stderr.on('data', (d: Buffer) => (out += d.toString()));
    child.on('error', reject);
    child.on('close', (code) => (code === 0 ? resolve(out) : reject(new Error(`${script}: exit ${code}: ${out}`))));
  });
}

async function drain(body: Readable): Promise<number> {
  let n = 0;
  for await (const c of body) n += (c as Buffer).length;
  return n;
}

/** Median seconds of each of `fns`, run in turns: fns[0], fns[1], ..., then again. */
async function interleaved(samples: number, fns: Array<() => Promise<void>>): Promise<number[]> {
  const times: number[][] = fns.map(() => []);
  for (let i = 0; i < samples; i++) {
    for (let f = 0; f < fns.length; f++) {
      const t0 = process.hrtime.bigint();
      await (fns[f] as () => Promise<void>)();
      (times[f] as number[]).push(Number(process.hrtime.bigint() - t0) / 1e9);
    }
  }
  return times.map((t) => t.sort((a, b) => a - b)[Math.floor(t.length / 2)] as number);
}

async function timed(samples: number, fn: () => Promise<void>): Promise<number> {
  const times: number[] = [];
  for (let i = 0; i < samples; i++) {
    const t0 = process.hrtime.bigint();
    await fn();
    times.push(Number(process.hrtime.bigint() - t0) / 1e9);
  }
  times.sort((a, b) => a - b);
  return times[Math.floor(times.length / 2)] as number;
}

export async function startThrottle(target: string, bytesPerSec: number): Promise<{ host: string; stop: () => Promise<void> }> {
  const port = await freePort();
  const child: ChildProcess = spawn(process.execPath, [path.join(__dirname, 'throttle-proxy.js'), String(port), target, String(bytesPerSec)], {
    stdio: ['ignore', 'pipe', 'inherit'],
  });
  await new Promise<void>((resolve, reject) => {
    child.once('error', reject);
    child.once('exit', (code) => reject(new Error(`throttle proxy exited (${code})`)));
    child.stdout?.on('data', (d: Buffer) => {
      if (d.toString().startsWith('ready')) resolve();
    });
  });
  return {
    host: `127.0.0.1:${port}`,
    stop: async () => {
      if (child.exitCode !== null) return;
      const exited = new Promise<void>((r) => child.once('exit', () => r()));
      child.kill('SIGTERM');
      await exited;
    },
  };
}

export async function benchRegistryFetch(): Promise<{ results: FetchResult[]; notes: string[] }> {
  const results: FetchResult[] = [];
  const notes: string[] = [];
  const reg = await startRegistry();
  let throttle: { host: string; stop: () => Promise<void> } | undefined;
  const client = new RegistryClient({ connectionsPerOrigin: Math.max(16, CONCURRENCY) });
  try {
    const digest = await pushStreamed(reg.host, BLOB_MIB);
    const bytes = BLOB_MIB * MIB;
    const record = (name: string, seconds: number, samples: number, mib = BLOB_MIB): void => {
      const r = { case: name, mibPerSec: mib / seconds, seconds, samples };
      results.push(r);
      process.stdout.write(`  ${name.padEnd(58)} ${r.mibPerSec.toFixed(0).padStart(6)} MiB/s  (${seconds.toFixed(2)} s)\n`);
    };
    const curl = async (host: string, d = digest): Promise<void> => {
      const out = await sh(`curl -sf http://${host}/v2/${REPO}/blobs/${d} | sha256sum`);
      if (!out.startsWith(d.slice('sha256:'.length))) throw new Error(`curl | sha256sum gave ${out.trim()}, want ${d}`);
    };
    const parallel = async (host: string, d = digest, n = bytes): Promise<void> => {
      const blob = await client.fetchBlobParallel(`${host}/${REPO}`, d, { concurrency: CONCURRENCY, chunkBytes: CHUNK_BYTES });
      if ((await drain(blob.body)) !== n) throw new Error('short read');
    };
    const single = async (host: string): Promise<void> => {
      const blob = await client.fetchBlob(`${host}/${REPO}`, digest);
      if ((await drain(blob.body)) !== bytes) throw new Error('short read');
    };

    process.stdout.write(`registry fetch: ${BLOB_MIB} MiB blob, fetch + sha256 (median of ${SAMPLES}); parallel = ${CONCURRENCY} x ${CHUNK_BYTES / MIB} MiB ranges\n`);
    // Warm the registry's page cache once so the first case is not penalised; then the cases take turns
    // sample by sample, so load from elsewhere on the machine hits them alike.
    await curl(reg.host);
    const [tCurl, tPar, tSingle] = await interleaved(SAMPLES, [() => curl(reg.host), () => parallel(reg.host), () => single(reg.host)]);
    record('direct: curl -s URL | sha256sum', tCurl as number, SAMPLES);
    record(`direct: stargaze fetchBlobParallel (${CONCURRENCY} conns)`, tPar as number, SAMPLES);
    record('direct: stargaze fetchBlob (1 conn)', tSingle as number, SAMPLES);
    notes.push(`direct: parallel is ${((tCurl as number) / (tPar as number)).toFixed(2)}x curl|sha256sum (target >= 0.9x)`);

    const capBytes = (CAP_MBIT * 1_000_000) / 8;
    const cappedDigest = CAPPED_MIB === BLOB_MIB ? digest : await pushStreamed(reg.host, CAPPED_MIB);
    throttle = await startThrottle(reg.host, capBytes);
    const tCurlCap = await timed(1, () => curl(throttle!.host, cappedDigest));
    record(`capped ${CAP_MBIT} Mbit/s/conn, ${CAPPED_MIB} MiB: curl -s URL | sha256sum`, tCurlCap, 1, CAPPED_MIB);
    const tParCap = await timed(1, () => parallel(throttle!.host, cappedDigest, CAPPED_MIB * MIB));
    record(`capped ${CAP_MBIT} Mbit/s/conn, ${CAPPED_MIB} MiB: stargaze fetchBlobParallel`, tParCap, 1, CAPPED_MIB);
    notes.push(`capped: parallel is ${(tCurlCap / tParCap).toFixed(2)}x a single connection (target >= 4x)`);
    notes.push(`commands: curl -sf http://${'<registry>'}/v2/${REPO}/blobs/<digest> | sha256sum; throttle: node dist/script/bench/throttle-proxy.js <port> <registry> ${capBytes}`);
    return { results, notes };
  } finally {
    await client.close();
    await throttle?.stop();
    await reg.stop();
  }
}
