/**
 * The demo (`npm run demo` / `bash script/demo.sh`): lazy pulling end to end, loopback only, all
 * state in tmp dirs that are removed at the end (also on Ctrl-C or failure).
 *
 * 1. a private registry with a byte-counting proxy in front of it;
 * 2. the stargaze daemon and a private containerd that loads it as the `stargz` proxy snapshotter;
 * 3. a busybox image with a big file the workload never reads, converted to eStargz by `stargaze convert`;
 * 4. baseline: `ctr images pull` + `ctr run` with containerd's overlayfs snapshotter;
 * 5. lazy: `stargaze rpull` + `ctr run --snapshotter stargz`;
 * then pull and run times and bytes fetched from the registry for both.
 *
 * Flags: --size-mib N (big file size, default 64), --no-baseline, --baseline-only (no stargaze),
 * --keep (keep the tmp dirs, for their logs).
 */
import {
  CleanupStack,
  KEEP_TMP_ENV,
  STARGZ_SNAPSHOTTER,
  bigFileFixture,
  buildBusyboxImage,
  STARGAZE_COMMAND,
  STARGAZE_COMMAND_ENV,
  convertWithStargaze,
  run,
  startContainerd,
  startDaemon,
  startRegistry,
  withHost,
  type Containerd,
  type PushedImage,
  type Registry,
} from '../test/e2e/harness';

interface DemoOptions {
  sizeMiB: number;
  baseline: boolean;
  lazy: boolean;
}

interface Measurement {
  label: string;
  pullMs: number;
  runMs: number;
  fetchedBytes: number;
  totalBytes: number;
  output: string;
}

function parseArgs(argv: string[]): DemoOptions {
  const opts: DemoOptions = { sizeMiB: 64, baseline: true, lazy: true };
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i]!;
    if (a === '--size-mib') opts.sizeMiB = Number(argv[++i]);
    else if (a.startsWith('--size-mib=')) opts.sizeMiB = Number(a.slice('--size-mib='.length));
    else if (a === '--no-baseline') opts.baseline = false;
    else if (a === '--baseline-only') opts.lazy = false;
    else if (a === '--keep') process.env[KEEP_TMP_ENV] = '1';
    else if (a === '--help' || a === '-h') {
      process.stdout.write('usage: demo [--size-mib N] [--no-baseline] [--baseline-only] [--keep]\n');
      process.exit(0);
    } else throw new Error(`unknown argument ${a} (try --help)`);
  }
  if (!Number.isFinite(opts.sizeMiB) || opts.sizeMiB <= 0) throw new Error('--size-mib wants a positive number');
  return opts;
}

const started = Date.now();
function step(msg: string): void {
  const t = ((Date.now() - started) / 1000).toFixed(1).padStart(5);
  process.stdout.write(`[${t}s] ${msg}\n`);
}

function mib(bytes: number): string {
  return `${(bytes / (1024 * 1024)).toFixed(1)} MiB`;
}

function secs(ms: number): string {
  return `${(ms / 1000).toFixed(2)} s`;
}

function layerBytesFetched(registry: Registry, image: PushedImage): number {
  return image.layers.reduce((n, l) => n + registry.bytesServed(l.digest), 0);
}

async function measure(
  label: string,
  registry: Registry,
  containerd: Containerd,
  image: PushedImage,
  workload: string[],
  lazy: boolean,
): Promise<Measurement> {
  const namespace = containerd.newNamespace(lazy ? 'demo-lazy' : 'demo-legacy');
  const ref = withHost(image.ref, registry.countingHost);
  registry.resetCounters();
  step(`${label}: ${lazy ? 'stargaze rpull' : 'ctr images pull'} ${ref}`);
  const t0 = Date.now();
  if (lazy) {
    await run(STARGAZE_COMMAND, ['rpull', '--address', containerd.address, '--namespace', namespace, '--plain-http', ref], { env: STARGAZE_COMMAND_ENV });
  } else {
    await containerd.pull(ref, { namespace });
  }
  const pullMs = Date.now() - t0;
  step(`${label}: ctr run ${lazy ? `--snapshotter ${STARGZ_SNAPSHOTTER} ` : ''}${workload.join(' ')}`);
  const t1 = Date.now();
  const r = await containerd.runContainer(ref, workload, {
    namespace,
    snapshotter: lazy ? STARGZ_SNAPSHOTTER : undefined,
  });
  const runMs = Date.now() - t1;
  process.stdout.write(r.stdout.trimEnd().replace(/^/gm, '    | ') + '\n');
  return {
    label,
    pullMs,
    runMs,
    fetchedBytes: layerBytesFetched(registry, image),
    totalBytes: image.totalLayerBytes,
    output: r.stdout,
  };
}

function report(results: Measurement[]): void {
  const rows = [
    ['', 'pull', 'run', 'pull+run', 'layer bytes fetched'],
    ...results.map((m) => [
      m.label,
      secs(m.pullMs),
      secs(m.runMs),
      secs(m.pullMs + m.runMs),
      `${mib(m.fetchedBytes)} of ${mib(m.totalBytes)} (${((100 * m.fetchedBytes) / m.totalBytes).toFixed(1)}%)`,
    ]),
  ];
  const widths = rows[0]!.map((_, c) => Math.max(...rows.map((r) => r[c]!.length)));
  process.stdout.write('\n');
  for (const r of rows) process.stdout.write('  ' + r.map((cell, c) => cell.padEnd(widths[c]!)).join('   ') + '\n');
  process.stdout.write('\n');
}

async function demo(opts: DemoOptions, cleanup: CleanupStack): Promise<void> {
  step('starting a registry on 127.0.0.1 (with a byte-counting proxy)');
  const registry = await startRegistry({ scope: cleanup });
  step(`registry ${registry.host}, counting proxy ${registry.countingHost}`);

  let stargazeAddress: string | undefined;
  let stargazeRoot: string | undefined;
  let daemonLogs: (() => Array<Record<string, unknown>>) | undefined;
  if (opts.lazy) {
    step('starting stargaze daemon');
    const daemon = await startDaemon({
      scope: cleanup,
      logLevel: 'info',
      // The demo shows what a container start costs; background fetch would then download the rest.
      config: 'no_background_fetch = true\n',
      plainHttpHosts: [registry.host, registry.countingHost],
    });
    stargazeAddress = daemon.address;
    stargazeRoot = daemon.root;
    daemonLogs = () => daemon.logs();
    step(`stargaze listening on ${daemon.address} (log: ${daemon.logFile})`);
  }

  step('starting containerd' + (stargazeAddress ? ` with [proxy_plugins.${STARGZ_SNAPSHOTTER}]` : ''));
  const containerd = await startContainerd({ scope: cleanup, stargazeAddress, stargazeRoot });

  const fixture = bigFileFixture({ sizeBytes: Math.round(opts.sizeMiB * 1024 * 1024) });
  step(`building a busybox image with a ${mib(fixture.bigFileBytes)} file the workload never reads`);
  const original = await buildBusyboxImage({
    host: registry.host,
    repo: 'demo/busybox',
    tag: 'v1',
    extraFiles: fixture.extraFiles,
  });
  step('converting it to eStargz and pushing it (stargaze convert)');
  const estargz = await convertWithStargaze(original.ref, `${registry.host}/demo/busybox:v1-esgz`);

  const results: Measurement[] = [];
  if (opts.baseline) {
    results.push(await measure('overlayfs (full pull)', registry, containerd, original, fixture.workload, false));
  }
  if (opts.lazy) {
    results.push(await measure('stargaze (lazy pull)', registry, containerd, estargz, fixture.workload, true));
    const prepared = (daemonLogs?.() ?? []).filter((e) => e['remote-snapshot-prepared'] === 'true').length;
    step(`stargaze mounted ${prepared} layer(s) remotely (log lines with remote-snapshot-prepared=true)`);
  }
  for (const m of results) {
    if (m.output !== fixture.probeContent) throw new Error(`${m.label}: unexpected output ${JSON.stringify(m.output)}`);
  }
  report(results);
}

async function main(): Promise<number> {
  const opts = parseArgs(process.argv.slice(2));
  if (process.getuid?.() !== 0) throw new Error('the demo needs root (containerd, runc, mounts, FUSE)');
  const cleanup = new CleanupStack();
  let signalled = false;
  const onSignal = (sig: NodeJS.Signals): void => {
    if (signalled) {
      process.stderr.write(`demo: ${sig} again, exiting now\n`);
      process.exit(130); // exit guards still kill, unmount and remove
    }
    signalled = true;
    process.stderr.write(`\ndemo: ${sig}, cleaning up...\n`);
    void cleanup.run().finally(() => process.exit(130));
  };
  process.on('SIGINT', onSignal);
  process.on('SIGTERM', onSignal);
  process.on('SIGHUP', onSignal);
  try {
    await demo(opts, cleanup);
    return 0;
  } finally {
    step('cleaning up');
    await cleanup.run();
  }
}

main().then(
  (code) => {
    process.exitCode = code;
  },
  (err: unknown) => {
    process.stderr.write(`demo failed: ${err instanceof Error ? err.message : String(err)}\n`);
    if (process.env[KEEP_TMP_ENV] !== '1') process.stderr.write('(run again with --keep to keep the logs)\n');
    process.exitCode = 1;
  },
);
