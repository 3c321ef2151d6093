import assert from 'node:assert/strict';
import { test } from 'node:test';
import { setTimeout as delay } from 'node:timers/promises';

import { exposedGc, IdleCollector } from '../../../src/fs/idle-collector';

test('IdleCollector: a burst of pokes collects once, after the last one has been quiet long enough', async () => {
  let collected = 0;
  const c = new IdleCollector(40, () => void collected++);
  for (let i = 0; i < 5; i++) {
    c.poke();
    await delay(15);
  }
  assert.equal(collected, 0, 'not while pokes keep coming');
  await delay(80);
  assert.equal(collected, 1);
  c.poke();
  await delay(80);
  assert.equal(collected, 2, 'a later burst collects again');
  c.close();
});

test('IdleCollector: close() cancels a pending collection', async () => {
  let collected = 0;
  const c = new IdleCollector(20, () => void collected++);
  c.poke();
  c.close();
  await delay(50);
  assert.equal(collected, 0);
});

test('IdleCollector: without --expose-gc there is nothing to call, and poke() does nothing', async () => {
  // node --test runs this file without --expose-gc (gc stays hidden unless asked for)
  assert.equal(exposedGc(), undefined);
  const c = new IdleCollector(1);
  c.poke();
  await delay(10);
  c.close();
});
