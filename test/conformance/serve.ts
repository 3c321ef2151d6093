/**
 * A minimal daemon for the conformance suite: a Snapshotter (no remote filesystem) behind the gRPC
 * service on a unix socket. `node dist/test/conformance/serve.js --root DIR --address SOCK`; stops on
 * SIGINT/SIGTERM. The Go side (main_test.go) starts one per test case, or one for all.
 */
import { parseArgs } from 'node:util';
import { log } from '../../src/log';
import { startSnapshotServer } from '../../src/service/snapshots-service';
import { Snapshotter } from '../../src/snapshot/snapshotter';

async function main(): Promise<void> {
  const { values } = parseArgs({
    options: { root: { type: 'string' }, address: { type: 'string' } },
    strict: true,
  });
  if (values.root === undefined || values.address === undefined) {
    throw new Error('usage: serve.js --root DIR --address SOCK');
  }
  const snapshotter = await Snapshotter.open({ root: values.root });
  await snapshotter.restore();
  const server = await startSnapshotServer({ snapshotter, address: values.address });
  log.info({ address: server.address, root: snapshotter.root }, 'conformance daemon serving');
  await new Promise<void>((resolve) => {
    process.once('SIGINT', resolve);
    process.once('SIGTERM', resolve);
  });
  await server.close();
  await snapshotter.close();
}

main().catch((err: unknown) => {
  log.error({ err: err instanceof Error ? err.message : String(err) }, 'conformance daemon failed');
  process.exitCode = 1;
});
