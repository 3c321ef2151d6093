import assert from 'node:assert/strict';
import { test } from 'node:test';
import { setTimeout as delay } from 'node:timers/promises';

import { exposedGc, IdleCollector } from '../../../src/fs/idle-collector';

test('IdleCollector: a burst of pokes collects once, after the last one has been quiet long enough', async () => {
  let collected = 0;
  const c = new IdleCollector(40, () => void collected++, 0);
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
  const c = new IdleCollector(20, () => void collected++, 0);
  c.poke();
  c.close();
  await delay(50);
  assert.equal(collected, 0);
});

test('IdleCollector: collections are at least the interval apart, however often pokes come', async () => {
  let collected = 0;
  const c = new IdleCollector(10, () => void collected++, 150);
  c.poke();
  await delay(40);
  assert.equal(collected, 1, 'the first burst collects after quietMs');
  c.poke();
  await delay(40);
  assert.equal(collected, 1, 'not again within the interval');
  await delay(150);
  assert.equal(collected, 2, 'the later burst collects once the interval has passed');
  c.close();
});

test('IdleCollector: without --expose-gc there is nothing to call', () => {
  // node --test runs this file without --expose-gc (gc stays hidden unless asked for)
  assert.equal(exposedGc(), undefined);
});
