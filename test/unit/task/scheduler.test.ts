import assert from 'node:assert/strict';
import { describe, it } from 'node:test';

import { defaultConfig } from '../../../src/config/config';
import { Scheduler, schedulerLimits } from '../../../src/task/scheduler';

describe('schedulerLimits', () => {
  it('takes its limits from the config', () => {
    const limits = schedulerLimits({ maxConcurrency: 3, blob: { ...defaultConfig().blob, parallelFetchConcurrency: 5 } });
    assert.equal(limits.fetches, 10);
    assert.equal(limits.backgroundLayers, 3);
    assert.ok(limits.inflates >= 1);
  });

  it('never makes a lane of zero (0 in the config means one at a time)', () => {
    const limits = schedulerLimits({ maxConcurrency: 0, blob: { ...defaultConfig().blob, parallelFetchConcurrency: 0 } });
    const scheduler = new Scheduler(limits);
    assert.equal(scheduler.backgroundLayers.limit, 1);
    assert.equal(scheduler.fetches.limit, 2);
  });
});
