/**
 * The registry client's undici parts (src/remote/undici-dispatchers.ts): the private lib/ paths it requires
 * still export the very classes and functions undici's index does, its Pool and Agent answer requests like the
 * index's, and loading the registry client does not load undici's index (what the module is for).
 * The load check runs in a fresh Node process: this one loads the index to compare with it.
 */
import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import { createServer } from 'node:http';
import type { AddressInfo } from 'node:net';
import path from 'node:path';
import { promisify } from 'node:util';
import { describe, it } from 'node:test';
import type * as Dispatchers from '../../../src/remote/undici-dispatchers';

const run = promisify(execFile);
/** This file runs from dist/test/unit/remote/. */
const REPO_ROOT = path.resolve(__dirname, '../../../..');

/** undici's version as installed, and as package.json pins it. */
function undiciVersions(): { installed: string; pinned: string } {
  const installed = (require('undici/package.json') as { version: string }).version;
  const pkg = require(path.join(REPO_ROOT, 'package.json')) as { dependencies: Record<string, string> };
  return { installed, pinned: pkg.dependencies.undici ?? '(none)' };
}

/** What to do when a check below fails: said in every failure, since the failing check alone does not. */
function whatToDo(problem: string): string {
  const { installed, pinned } = undiciVersions();
  return (
    `${problem} (undici ${installed} installed, ${pinned} pinned in package.json). ` +
    "src/remote/undici-dispatchers.ts requires undici's private lib/ files to skip loading its index (about 50 ms of " +
    '`stargaze rpull` start). After an undici upgrade, find where the new version keeps Dispatcher, the request API, ' +
    "Pool and Agent (see undici's index.js), update those require paths and this test, and pin the new exact version " +
    "(npm install undici@<version> --save-exact); or give up the saving and import { Pool, Agent } from 'undici'."
  );
}

/** require(id), or a failure that says what to do. */
function requirePrivate(id: string): unknown {
  try {
    return require(id) as unknown;
  } catch (err) {
    assert.fail(whatToDo(`require('${id}') failed: ${err instanceof Error ? err.message : String(err)}`));
  }
}

/** The module under test, loaded here rather than imported, so that a path it requires in vain fails with whatToDo. */
function dispatchers(): typeof Dispatchers {
  try {
    return require('../../../src/remote/undici-dispatchers') as typeof Dispatchers;
  } catch (err) {
    assert.fail(whatToDo(`src/remote/undici-dispatchers.ts does not load: ${err instanceof Error ? err.message : String(err)}`));
  }
}

describe("undici's private paths: still what the index exports", () => {
  // The index itself, loaded here only to compare: the classes must be the very same objects, not look-alikes.
  const index = require('undici') as Record<string, unknown> & { Dispatcher: { prototype: Record<string, unknown> } };

  it('package.json pins undici to the exact version installed', () => {
    const { installed, pinned } = undiciVersions();
    assert.equal(pinned, installed, whatToDo('undici is not pinned to the installed version'));
  });

  it('lib/dispatcher/pool, lib/dispatcher/agent and lib/dispatcher/dispatcher are the index\'s Pool, Agent and Dispatcher', () => {
    for (const [id, name] of [
      ['undici/lib/dispatcher/pool', 'Pool'],
      ['undici/lib/dispatcher/agent', 'Agent'],
      ['undici/lib/dispatcher/dispatcher', 'Dispatcher'],
    ] as const) {
      const exported = requirePrivate(id);
      assert.equal(typeof exported, 'function', whatToDo(`${id} no longer exports a class`));
      assert.equal(exported, index[name], whatToDo(`${id} is not the ${name} that require('undici') gives`));
    }
    const { Pool, Agent } = dispatchers();
    assert.equal(Pool, index.Pool, whatToDo('undici-dispatchers.ts exports a Pool other than undici\'s'));
    assert.equal(Agent, index.Agent, whatToDo('undici-dispatchers.ts exports an Agent other than undici\'s'));
  });

  it("lib/api is the request API the index puts on Dispatcher.prototype, all of it", () => {
    const api = requirePrivate('undici/lib/api') as Record<string, unknown>;
    const names = Object.keys(api);
    for (const name of ['request', 'stream', 'pipeline', 'connect', 'upgrade']) {
      assert.equal(typeof api[name], 'function', whatToDo(`undici/lib/api no longer exports ${name}()`));
    }
    for (const name of names) {
      assert.equal(index.Dispatcher.prototype[name], api[name], whatToDo(`Dispatcher.prototype.${name} is not undici/lib/api's ${name}`));
    }
  });
});

describe('undici dispatchers without the index', () => {
  it('Pool and Agent send requests', async () => {
    const { Pool, Agent } = dispatchers();
    const server = createServer((req, res) => res.end(`hello ${req.url}`));
    await new Promise<void>((r) => server.listen(0, '127.0.0.1', r));
    const origin = `http://127.0.0.1:${(server.address() as AddressInfo).port}`;
    const pool = new Pool(origin);
    const agent = new Agent();
    try {
      const viaPool = await pool.request({ path: '/pool', method: 'GET' });
      assert.equal(viaPool.statusCode, 200);
      assert.equal(await viaPool.body.text(), 'hello /pool');
      const viaAgent = await agent.request({ origin, path: '/agent', method: 'GET' });
      assert.equal(await viaAgent.body.text(), 'hello /agent');
    } finally {
      await pool.close();
      await agent.close();
      await new Promise<void>((r) => server.close(() => r()));
    }
  });

  it("loading the registry client leaves undici's index unloaded", async () => {
    const client = path.resolve(__dirname, '../../../src/remote/registry-client.js');
    const { stdout } = await run(process.execPath, [
      '-e',
      `require(${JSON.stringify(client)}); console.log(Object.keys(require.cache).filter((k) => /undici[\\\\/]index\\.js$/.test(k)).length)`,
    ]);
    assert.equal(stdout.trim(), '0');
  });
});
