/**
 * The registry client's undici parts (src/remote/undici-dispatchers.ts): its Pool and Agent answer requests
 * like the index's, and loading the registry client does not load undici's index (what the module is for).
 * The load check runs in a fresh Node process: this one may have the index loaded already.
 */
import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import { createServer } from 'node:http';
import type { AddressInfo } from 'node:net';
import path from 'node:path';
import { promisify } from 'node:util';
import { describe, it } from 'node:test';
import { Agent, Pool } from '../../../src/remote/undici-dispatchers';

const run = promisify(execFile);

describe('undici dispatchers without the index', () => {
  it('Pool and Agent send requests', async () => {
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
